"""The examples of docs/architecture.md run as written (in a fresh interpreter: they register example methods)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "architecture.md"
RUNNER = """
import sys
for i, block in enumerate(sys.argv[1:]):
    try:
        exec(compile(block, f"docs/architecture.md block {i}", "exec"), {"__name__": f"doc_block_{i}"})
    except Exception:
        print(f"--- block {i} ---\\n{block}", file=sys.stderr)
        raise
"""


def test_architecture_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    done = subprocess.run([sys.executable, "-c", RUNNER, *blocks], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
