"""The training schedule is transformers' linear warmup/decay, without importing transformers.optimization (which
imports peft, bitsandbytes and torchao when they are installed)."""
from __future__ import annotations

import subprocess
import sys

import torch
from transformers import get_linear_schedule_with_warmup

from lorakit.train.steps import linear_schedule_with_warmup


def test_linear_schedule_matches_transformers() -> None:
    for warmup, total in ((0, 5), (3, 60), (7, 7), (2, 45)):
        ours, theirs = (torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3) for _ in range(2))
        a, b = linear_schedule_with_warmup(ours, warmup, total), get_linear_schedule_with_warmup(theirs, warmup, total)
        for _ in range(total + 2):
            assert a.get_last_lr() == b.get_last_lr()
            ours.step(), theirs.step(), a.step(), b.step()
        restored = linear_schedule_with_warmup(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3),
                                               warmup, total)
        restored.load_state_dict(b.state_dict())  # checkpoints written with transformers' schedule still load
        assert restored.get_last_lr() == b.get_last_lr()


def test_the_finetune_command_does_not_import_quantisation_libraries() -> None:
    code = ("import sys, lorakit.cli, lorakit.train.loop; "
            "print(sorted(m for m in ('peft', 'bitsandbytes', 'torchao', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
