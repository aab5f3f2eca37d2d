"""Reading records from files, the fixed held-out split, and the order in which training batches are drawn.

A *record* is one row of the data as a dict (a JSON object, a CSV row, ``{"text": line}`` for a text file or a row of
a ``datasets`` folder). Tasks (:mod:`lorakit.train.tasks`) turn records into token examples.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import DataError

Record = dict[str, Any]
SPLIT_SEED = 0  # the held-out split does not depend on --seed, so runs with different seeds share one eval set


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        warnings.warn(f"{path} is not valid UTF-8; undecodable bytes were replaced by U+FFFD", stacklevel=3)
        return raw.decode("utf-8", errors="replace")


def _read_jsonl(path: Path) -> list[Record]:
    records = []
    for number, line in enumerate(_decode(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number} must hold a JSON object, found {type(record).__name__}")
        records.append(record)
    return records


def _read_csv(path: Path) -> list[Record]:
    return [dict(row) for row in csv.DictReader(io.StringIO(_decode(path)))]


def _read_txt(path: Path) -> list[Record]:
    return [{"text": line} for line in _decode(path).splitlines() if line.strip()]


def _read_datasets_folder(path: Path) -> list[Record]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a folder; reading a `datasets` folder needs: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path} is not a folder written by datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path} holds splits {sorted(loaded)}; lorakit reads the 'train' split")
        loaded = loaded["train"]
    return [dict(row) for row in loaded]


READERS: dict[str, Callable[[Path], list[Record]]] = {".jsonl": _read_jsonl, ".csv": _read_csv, ".txt": _read_txt}


def read_records(path: str | Path) -> list[Record]:
    """All records of a ``.jsonl`` / ``.csv`` / ``.txt`` file (one record per non-empty line) or a datasets folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        records = _read_datasets_folder(path)
    elif path.suffix in READERS:
        records = READERS[path.suffix](path)
    else:
        raise DataError(f"data file {path} has an unknown type; use one of {', '.join(READERS)} or a datasets folder")
    if not records:
        raise DataError(f"data file {path} holds no records")
    return records


def require_column(records: Sequence[Record], column: str, option: str) -> None:
    """Raise :class:`DataError` unless every record has a non-empty ``column`` (``option`` names the CLI flag)."""
    available = sorted(records[0])
    missing = [i for i, r in enumerate(records) if r.get(column) in (None, "")]
    if len(missing) == len(records):
        raise DataError(f"{option} {column!r} is not a column of the data; columns: {available}")
    if missing:
        raise DataError(f"{len(missing)} records have no {column!r} value (first: record {missing[0]}); "
                        f"fix or remove them")


def split(items: Sequence[Any], eval_size: int) -> tuple[list[Any], list[Any]]:
    """``(train, held_out)``: a fixed seeded shuffle, the first ``eval_size`` items held out."""
    if not 0 < eval_size < len(items):
        raise DataError(f"--eval-size {eval_size} must be between 1 and the number of examples - 1 ({len(items) - 1})")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    return [items[i] for i in order[eval_size:]], [items[i] for i in order[:eval_size]]


class BatchOrder:
    """Global batches as consecutive slices of an endless stream of per-epoch shuffles of ``range(n)``.

    Step ``s`` uses stream items ``[s * batch, (s + 1) * batch)``; so the data position is a function of the step
    alone, and a resumed run (or one on more processes) sees exactly the same batches.
    """

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self._cached: tuple[int, list[int]] | None = None

    def _epoch(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n, generator=generator).tolist())
        return self._cached[1]

    def position(self, step: int) -> dict[str, int]:
        """Where step ``step`` starts: epoch, offset within the epoch, and examples consumed before it."""
        seen = step * self.batch
        return {"epoch": seen // self.n, "offset": seen % self.n, "examples_seen": seen}

    def indices(self, step: int) -> list[int]:
        """Example indices of the global batch of step ``step``."""
        out: list[int] = []
        seen = step * self.batch
        while len(out) < self.batch:
            epoch, offset = divmod(seen + len(out), self.n)
            out.extend(self._epoch(epoch)[offset:offset + self.batch - len(out)])
        return out
