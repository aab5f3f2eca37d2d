import os
import random
from pathlib import Path
from typing import Iterator

import pytest
import torch

# Without a GPU the Triton kernels (lorakit.kernels.grouped) run under Triton's interpreter in the tests; triton reads
# TRITON_INTERPRET when it decorates them, so it is set here, before any test module imports lorakit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from test_cli import FILLER, make_model_folder, write_jsonl  # noqa: E402  (imports lorakit)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; several spinning OpenMP threads per process crawl when the cores are
    shared (pytest -n 2, other jobs). A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a word-level tokenizer, saved like a hub model."""
    return make_model_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Texts of 2 to 12 words, so micro-batches hold different numbers of tokens."""
    rng = random.Random(1)
    rows = [{"text": " ".join(rng.choices(FILLER, k=rng.randint(2, 12)))} for _ in range(120)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "texts.jsonl", rows)
