"""Computational Limits of LoRA (METHODS.md entry 82): the gradient of a LoRA layer never forms a ``(d_out, d_in)``
tensor, so what backward allocates grows with ``tokens x width`` and ``rank x width``, not with ``d_in x d_out``.

Every tensor created during backward is recorded by a dispatch mode; the largest one is compared with the weight."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit


class LargestNew(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def backward_largest(width: int, tokens: int = 8, rank: int = 4) -> int:
    layer = torch.nn.Sequential(torch.nn.Linear(width, width, bias=False))
    lorakit.adapt(layer, lorakit.LoraConfig(r=rank, targets=["0"], init="random"), "default")
    loss = layer(torch.randn(tokens, width)).square().sum()
    with LargestNew() as mode:
        loss.backward()
    assert layer[0].adapters["default"].lora_B.weight.grad is not None
    assert layer[0].base_layer.weight.grad is None
    return mode.largest


def test_lora_backward_allocates_nothing_the_size_of_the_weight() -> None:
    sizes = {width: backward_largest(width) for width in (64, 256, 1024)}
    for width, largest in sizes.items():
        assert largest <= 8 * width < width * width  # tokens x width at most; the weight is width x width
    assert sizes[1024] == 16 * sizes[64]  # linear in the width (x16), not in width^2 (x256)
