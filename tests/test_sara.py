"""SaRA's training rule (METHODS.md entry 15): the nuclear-norm regulariser against an independent reference, and the
progressive re-selection of the mask against the smallest ``|W0 + dW|`` computed here."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lorakit
from lorakit.errors import LorakitError
from lorakit.hooks import HookList, training_hooks
from lorakit.hosts.host import adapters_named
from lorakit.methods.sara import Sara, SaraConfig, SaraNuclear, SaraReselect


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 12), nn.Linear(12, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.tanh(self.up(x)))


def sara_model(names: tuple[str, ...] = ("default",), std: float = 0.5, **fields: float) -> nn.Module:
    torch.manual_seed(0)
    model = MLP()
    for name in names:
        lorakit.adapt(model, SaraConfig(targets=["up", "down"], **fields), name)
    with torch.no_grad():  # trained values large enough that some entries leave the smallest-|w| set
        for _, adapter in adapters_named(model, names[-1], Sara):  # the last one adapted: the active one
            adapter.sara_values.normal_(0, std)
    return model


def layers(model: nn.Module, name: str = "default") -> list[tuple[nn.Linear, Sara]]:
    return [(host.base_layer, adapter) for host, adapter in adapters_named(model, name, Sara)]


def dense(adapter: Sara) -> Tensor:
    """The update written out here: zeros with the trained values at the mask and the frozen ones at theirs."""
    flat = torch.zeros(adapter.shape).flatten()
    flat[adapter.sara_index] = adapter.sara_values.detach()
    if hasattr(adapter, "sara_frozen_index"):
        used = adapter.sara_frozen_index >= 0
        flat[adapter.sara_frozen_index[used]] = adapter.sara_frozen_values[used]
    return flat.view(adapter.shape)


# -- nuclear-norm regulariser ----------------------------------------------------------------------------------------
def test_regulariser_equals_the_weighted_nuclear_norm_and_its_autograd_gradient() -> None:
    model = sara_model(fraction=0.3, nuclear_weight=0.7)
    hooks = HookList(training_hooks(lorakit.inject.configs(model)["default"], "default", 10))
    assert [type(h) for h in hooks.hooks] == [SaraNuclear]
    leaves = [adapter.sara_values.detach().clone().requires_grad_(True) for _, adapter in layers(model)]
    reference = sum(0.7 * torch.linalg.matrix_norm(
        torch.zeros(a.shape).flatten().index_put((a.sara_index,), leaf).view(a.shape), "nuc")
        for leaf, (_, a) in zip(leaves, layers(model)))
    reference.backward()
    term = hooks.regulariser(model)
    assert term is not None
    torch.testing.assert_close(term, reference.detach())
    term.backward()
    for leaf, (_, adapter) in zip(leaves, layers(model)):
        torch.testing.assert_close(adapter.sara_values.grad, leaf.grad)


def test_a_step_on_the_regulariser_alone_decreases_the_nuclear_norm() -> None:
    model = sara_model(fraction=0.3, nuclear_weight=1.0)
    hooks = HookList(training_hooks(lorakit.inject.configs(model)["default"], "default", 10))
    before = [float(torch.linalg.matrix_norm(dense(a), "nuc")) for _, a in layers(model)]
    optimizer = torch.optim.SGD(lorakit.trainable_parameters(model).values(), lr=0.01)
    term = hooks.regulariser(model)
    assert term is not None
    term.backward()
    optimizer.step()
    after = [float(torch.linalg.matrix_norm(dense(a), "nuc")) for _, a in layers(model)]
    assert all(a < b - 1e-3 for a, b in zip(after, before)), (before, after)


# -- progressive re-selection ----------------------------------------------------------------------------------------
def test_reselection_takes_the_smallest_current_weights_and_keeps_the_function_and_moments() -> None:
    model = sara_model(names=("other", "default"), fraction=0.2, reselect_at=0.5)
    hooks = HookList(training_hooks(lorakit.inject.configs(model)["default"], "default", 6))
    assert [(type(h), h.at) for h in hooks.hooks] == [(SaraReselect, 3)]
    optimizer = torch.optim.Adam(lorakit.trainable_parameters(model).values(), lr=1e-3)
    x = torch.randn(5, 16)
    model(x).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    out = model(x).detach()
    before = [(a.sara_index.clone(), a.sara_values.detach().clone(), dense(a), optimizer.state[a.sara_values]
               ["exp_avg"].clone(), base.weight.detach() + dense(a)) for base, a in layers(model)]
    other = [a.sara_index.clone() for _, a in layers(model, "other")]
    params = [a.sara_values for _, a in layers(model)]

    hooks.after_step(model, optimizer, 2)  # not the re-selection step: nothing changes
    assert all(torch.equal(a.sara_index, b[0]) for (_, a), b in zip(layers(model), before))
    hooks.after_step(model, optimizer, 3)

    torch.testing.assert_close(model(x), out)  # W0 + dW is unchanged by the re-selection
    for (_, a), (old, values, delta, moment, current), p in zip(layers(model), before, params):
        nnz = old.numel()
        reference = current.abs().flatten().sort().values[nnz - 1] >= current.abs().flatten()  # smallest |W0 + dW|
        assert int(reference.sum()) == nnz
        assert torch.equal(a.sara_index, reference.nonzero().flatten())  # the new mask, ascending
        assert not torch.equal(a.sara_index, old)  # the fixture made some entries leave
        kept = torch.isin(old, a.sara_index)
        new_slot = torch.searchsorted(a.sara_index, old[kept])
        assert torch.equal(a.sara_values.detach()[new_slot], values[kept])  # trained values kept
        joined = ~torch.isin(a.sara_index, old)
        assert bool(joined.any()) and bool((a.sara_values.detach()[joined] == 0).all())  # new entries start at 0
        dropped = old[~kept]
        used = a.sara_frozen_index >= 0
        assert torch.equal(a.sara_frozen_index[used], dropped)  # left the mask: value frozen, not lost
        assert torch.equal(a.sara_frozen_values[used], values[~kept])
        torch.testing.assert_close(dense(a), delta)
        assert a.sara_values is p and any(q is p for g in optimizer.param_groups for q in g["params"])
        state = optimizer.state[p]["exp_avg"]
        assert torch.equal(state[new_slot], moment[kept]) and bool((state[joined] == 0).all())
    assert all(torch.equal(a.sara_index, o) for (_, a), o in zip(layers(model, "other"), other))  # name-scoped

    model(x).square().sum().backward()  # the new mask trains; frozen and unmasked entries stay put
    optimizer.step()
    for (base, a), (old, _, _, _, current) in zip(layers(model), before):
        w = base.weight.detach() + dense(a)
        moved = (w != current).flatten()
        assert bool(moved[a.sara_index[~torch.isin(a.sara_index, old)]].all())
        assert not bool(moved[~torch.isin(torch.arange(moved.numel()), a.sara_index)].any())
    with pytest.raises(LorakitError, match="already re-selected"):
        hooks.after_step(model, optimizer, 3)


def test_a_reselected_adapter_round_trips_through_its_file(tmp_path: Path) -> None:
    model = sara_model(fraction=0.2, reselect_at=0.5)
    SaraReselect("default", 1).after_step(model, torch.optim.SGD(lorakit.trainable_parameters(model).values(),
                                                                 lr=0.1), 1)
    x = torch.randn(3, 16)
    lorakit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = lorakit.load_adapter(MLP(), tmp_path)  # same base (seed 0), mask and frozen entries from the file
    torch.testing.assert_close(fresh(x), model(x))


def test_reselection_is_validated() -> None:
    with pytest.raises(lorakit.errors.ConfigError, match="reselect_at"):
        SaraConfig(reselect_at=1.0)
    assert training_hooks(SaraConfig(), "default", 10) == []
    model = sara_model(fraction=0.2)
    with pytest.raises(LorakitError, match="reselect_at=0"):
        SaraReselect("default", 1).after_step(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))]), 1)
