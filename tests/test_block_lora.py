"""Block-LoRA stores ``A_s`` and ``B = sum_i B_i`` once (issue 15, item 2).

The reference below is the copy layout the method used to store, written out independently: ``n`` up-projections
``B_i`` (all zero at init) summed in the forward. These tests check that the stored update is the paper's block
product, that the copies it replaced never diverge, and that training the summed ``B`` at ``n`` times the learning
rate (``weight_decay / n``) follows the copy layout's trajectory exactly under SGD, Adam and AdamW.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import Net

import lorakit
from lorakit.io.files import read_safetensors, write_safetensors
from lorakit.optim.registry import build_optimizer

D_IN, D_OUT, R, N, ALPHA = 12, 10, 6, 3, 4.0
SCALE = ALPHA / R


class CopyLayout(nn.Module):
    """The old storage: ``h = W0 x + b + s (sum_i B_i) (A_s x)`` with ``n`` zero-initialised ``B_i``."""

    def __init__(self, base: nn.Linear, a_s: torch.Tensor, n: int) -> None:
        super().__init__()
        self.base = base
        self.a_s = nn.Parameter(a_s.detach().clone())
        self.b = nn.Parameter(torch.zeros(n, base.out_features, a_s.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + SCALE * F.linear(F.linear(x, self.a_s), self.b.sum(0))


def pair() -> tuple[Net, CopyLayout]:
    torch.manual_seed(0)
    model = Net(nn.Linear(D_IN, D_OUT))
    model.layer.requires_grad_(False)
    lorakit.adapt(model, lorakit.build_config("block-lora", targets=["layer"], r=R, n=N, alpha=ALPHA))
    ref = CopyLayout(model.layer.base_layer, model.layer.adapters["default"].block_A, N)
    return model, ref


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, D_IN, generator=g), torch.randn(16, D_OUT, generator=g)


def new_groups(model: Net, opt: Callable[..., torch.optim.Optimizer], lr: float, wd: float, ratio: float):
    adapter = model.layer.adapters["default"]
    return opt([{"params": [adapter.block_A], "lr": lr, "weight_decay": wd},
                {"params": [adapter.block_B], "lr": ratio * lr, "weight_decay": wd / ratio}])


def step(module: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    F.mse_loss(module(x), y).backward()
    opt.step()


def test_stored_update_is_the_papers_block_product_and_a_rank_r_over_n_factorisation():
    model, _ = pair()
    adapter = model.layer.adapters["default"]
    with torch.no_grad():
        adapter.block_B.normal_()
    a_s, b = adapter.block_A.detach(), adapter.block_B.detach()
    blocks = [torch.randn_like(b) for _ in range(N - 1)]
    blocks.append(b - sum(blocks))  # any B_1..B_n whose sum is the stored B
    dense = SCALE * torch.cat(blocks, dim=1) @ torch.cat([a_s] * N, dim=0)  # s [B_1 ... B_n] [A_s; ...; A_s]
    torch.testing.assert_close(adapter.delta_weight(model.layer.backend), dense, atol=1e-5, rtol=1e-5)
    x = torch.randn(4, D_IN)
    torch.testing.assert_close(model(x), model.layer.base_layer(x) + x @ dense.T, atol=1e-5, rtol=1e-5)
    fb, fa = adapter.factors()
    assert fb.shape == (D_OUT, R // N) and fa.shape == (R // N, D_IN)
    torch.testing.assert_close(fb @ fa, dense, atol=1e-5, rtol=1e-5)


def test_storage_is_one_shared_a_and_one_summed_b():
    torch.manual_seed(0)
    model = Net(nn.Linear(768, 768))
    lorakit.adapt(model, lorakit.build_config("block-lora", targets=["layer"], r=8, n=4))
    shapes = {k: tuple(p.shape) for k, p in lorakit.trainable_parameters(model).items()}
    assert shapes == {"layer.adapters.default.block_A": (2, 768), "layer.adapters.default.block_B": (768, 2)}
    assert sum(p.numel() for p in lorakit.trainable_parameters(model).values()) == 2 * (768 + 768)  # 3072
    assert 4 * 768 * 2 + 2 * 768 == 7680  # what the copy layout stored for the same layer
    assert lorakit.inject.parameter_roles(model) == {"layer.adapters.default.block_B": "up"}


def test_identity_at_init_and_equal_to_the_copy_layout():
    model, ref = pair()
    x, _ = batch()
    torch.testing.assert_close(model(x), model.layer.base_layer(x))
    torch.testing.assert_close(model(x), ref(x))


def test_the_copies_receive_one_gradient_so_only_their_sum_matters():
    _, ref = pair()
    with torch.no_grad():
        ref.b.normal_()  # even copies that start apart get the same gradient: B_i - B_j never changes
    x, y = batch()
    F.mse_loss(ref(x), y).backward()
    for i in range(1, N):
        torch.testing.assert_close(ref.b.grad[i], ref.b.grad[0])


OPTIMIZERS = {
    "sgd-momentum-l2": lambda params, lr=0.0: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "adam-l2": lambda params, lr=0.0: torch.optim.Adam(params, lr=lr),
    "adamw": lambda params, lr=0.0: torch.optim.AdamW(params, lr=lr),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_summed_b_at_n_times_the_learning_rate_follows_the_copy_layout(name):
    opt, lr, wd = OPTIMIZERS[name], 0.05 if name.startswith("sgd") else 0.01, 0.1
    model, ref = pair()
    adapter = model.layer.adapters["default"]
    new_opt = new_groups(model, opt, lr, wd, ratio=N)
    ref_opt = opt([{"params": [ref.a_s, ref.b], "lr": lr, "weight_decay": wd}])
    x, y = batch()
    for _ in range(6):
        step(model, new_opt, x, y)
        step(ref, ref_opt, x, y)
        torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.block_B.detach(), ref.b.detach().sum(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.block_A.detach(), ref.a_s.detach(), atol=1e-5, rtol=1e-5)
    for i in range(1, N):  # the copies the new storage replaces stayed identical
        torch.testing.assert_close(ref.b[i], ref.b[0])
    assert adapter.block_B.abs().max() > 1e-3  # it did train


def test_at_one_learning_rate_the_summed_b_first_moves_n_times_less_than_the_copies():
    model, ref = pair()
    x, y = batch()
    step(model, new_groups(model, torch.optim.SGD, 0.1, 0.0, ratio=1), x, y)
    step(ref, torch.optim.SGD(ref.parameters(), lr=0.1), x, y)
    torch.testing.assert_close(N * model.layer.adapters["default"].block_B.detach(), ref.b.detach().sum(0))


def test_loraplus_with_ratio_n_gives_the_copy_layouts_adamw_steps():
    model, ref = pair()
    named = lorakit.trainable_parameters(model)
    new_opt = build_optimizer("loraplus", named, lr=0.01, weight_decay=0.0, ratio=float(N),
                              roles=lorakit.inject.parameter_roles(model))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.0)
    x, y = batch()
    for _ in range(4):
        step(model, new_opt, x, y)
        step(ref, ref_opt, x, y)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_round_trip_and_files_of_the_copy_layout_are_refused(tmp_path):
    model, _ = pair()
    with torch.no_grad():
        model.layer.adapters["default"].block_B.normal_()
    lorakit.save_adapter(model, tmp_path / "new")
    x, _ = batch()
    torch.manual_seed(5)
    fresh = Net(nn.Linear(D_IN, D_OUT))
    fresh.layer.load_state_dict(model.layer.base_layer.state_dict())
    lorakit.load_adapter(fresh, tmp_path / "new")
    torch.testing.assert_close(fresh(x), model(x))

    old = tmp_path / "old"  # a file as the copy layout wrote it: block_B of shape (n, d_out, r/n)
    old.mkdir()
    tensors, metadata = read_safetensors(tmp_path / "new" / "adapter_model.safetensors")
    key = "base_model.model.layer.block_B"
    tensors[key] = torch.stack([tensors[key] / N] * N)
    write_safetensors(old / "adapter_model.safetensors", tensors, metadata)
    (old / "adapter_config.json").write_text((tmp_path / "new" / "adapter_config.json").read_text())
    with pytest.raises(lorakit.AdapterFileError, match=r"block_B has shape \(3, 10, 2\), the model expects \(10, 2\)"):
        lorakit.load_adapter(Net(nn.Linear(D_IN, D_OUT)), old)
