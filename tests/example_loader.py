"""Runs an application example (``examples/<folder>/run.py``) in this process, as CI's smoke mode does."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(folder: str) -> ModuleType:
    """The example's ``run.py`` as a module (examples are scripts, not a package)."""
    path = EXAMPLES / folder / "run.py"
    spec = importlib.util.spec_from_file_location(f"example_{folder}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(folder: str, *args: str) -> dict[str, Any]:
    """``main(["--smoke", *args])`` of the example: the metrics it returns."""
    return load_example(folder).main(["--smoke", *args])
