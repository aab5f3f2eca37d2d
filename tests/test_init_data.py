"""Data-driven initialisers (LoRA-GA, EVA, LoRA-SB), checked against brute-force computations on tiny layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from zoo import tiny_llama

import lorakit
from lorakit.init.eva import allocate

TARGET = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 8, dtype=torch.float64)
        self.down = nn.Linear(8, 4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def batches(n: int = 4, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(3, 5, 6, generator=gen, dtype=dtype) for _ in range(n)]


def loss_fn(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    return (out - TARGET.to(out.dtype)).pow(2).mean()


def brute_force_gradients(model: nn.Module, data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mean dL/dW of every Linear weight with plain autograd on a copy of the model."""
    model = copy.deepcopy(model)
    for batch in data:
        loss_fn(model(batch), batch).backward()
    return {name: m.weight.grad / len(data) for name, m in model.named_children()}


def best_rank(g: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, :k] * s[:k] @ vh[:k]


def layer(model: nn.Module, name: str):
    host = getattr(model, name)
    return host, host.adapters["default"]


# --- LoRA-GA ---------------------------------------------------------------------------------------------------
def test_lora_ga_first_sgd_step_is_the_projected_full_gradient_step():
    model, data = MLP(), batches()
    grads = brute_force_gradients(model, data)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_children()}
    x = data[0]
    expected = model(x)
    cfg = lorakit.LoraConfig(r=2, alpha=4, init="lora-ga", init_options={"niter": None}, targets=["up", "down"])
    lorakit.adapt(model, cfg)
    lorakit.initialize(model, data, loss_fn=loss_fn, layers_per_pass=1)
    torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=0)  # W_res = W - s B A: identity at init

    eta = 1e-7
    opt = torch.optim.SGD(list(lorakit.trainable_parameters(model).values()), lr=eta)
    sum(loss_fn(model(b), b) for b in data).div(len(data)).backward()
    opt.step()
    for name in ("up", "down"):
        host, ad = layer(model, name)
        step = host.backend.weight() + ad.scale * ad.b @ ad.a - w0[name]  # W_eff after one step - W0 (float64)
        c2 = host.geometry.d_out**0.5 / 16.0  # c^2 with gamma = 16
        predicted = -eta * ad.scale**2 * c2 * best_rank(grads[name], 4)  # -eta s^2 c^2 SVD_2r(G)
        torch.testing.assert_close(step, predicted, atol=1e-6 * predicted.abs().max().item(), rtol=0)


def test_lora_ga_gradients_are_gathered_a_group_of_layers_at_a_time():
    data = batches(2)
    seen: list[int] = []
    reference = lorakit.adapt(MLP(), lorakit.LoraConfig(r=2, init="lora-ga", init_options={"niter": None},
                                                        targets=["up", "down"]))
    lorakit.initialize(reference, data, loss_fn=loss_fn)
    model = lorakit.adapt(MLP(), lorakit.configs(reference)["default"])
    for host in lorakit.inject.hosts(model):
        host.register_forward_pre_hook(
            lambda m, args: seen.append(sum(p.requires_grad for p in model.parameters() if p.dim() == 2)))
    lorakit.initialize(model, data, loss_fn=loss_fn, layers_per_pass=1)
    assert max(seen) == 1  # one full weight requires grad at a time (adapter factors are frozen meanwhile)
    for name in ("up", "down"):
        torch.testing.assert_close(layer(model, name)[1].a, layer(reference, name)[1].a)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_lora_ga_on_a_transformers_model_uses_the_output_loss_and_keeps_outputs(tmp_path):


    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    model = tiny_llama()
    expected = model(ids).logits
    lorakit.adapt(model, lorakit.LoraConfig(r=2, alpha=4, init="lora-ga"))
    lorakit.initialize(model, [{"input_ids": ids, "labels": ids}], layers_per_pass=5)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(lorakit.LorakitError, match="export_lora"):  # a plain file would be wrong on the stock base
        lorakit.save_adapter(model, tmp_path)
    with pytest.raises(lorakit.ConfigError, match="data-driven initialiser"):
        lorakit.initialize(lorakit.adapt(tiny_llama(), lorakit.LoraConfig(init="pissa")), [ids])


# --- EVA -------------------------------------------------------------------------------------------------------
def test_eva_rows_of_a_are_the_top_right_singular_vectors_of_the_layer_inputs():
    model, data = MLP(), batches()
    inputs = {"up": torch.cat([b.reshape(-1, 6) for b in data]),
              "down": torch.cat([torch.tanh(model.up(b)).reshape(-1, 8).detach() for b in data])}
    x = data[0]
    expected = model(x)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, alpha=4, init="eva", targets=["up", "down"]))
    lorakit.initialize(model, data)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)  # B = 0
    ranks = {}
    for name in ("up", "down"):
        host, ad = layer(model, name)
        ranks[name] = ad.a.shape[0]
        vh = torch.linalg.svd(inputs[name], full_matrices=False).Vh[: ranks[name]]
        torch.testing.assert_close((ad.a * vh).sum(1).abs(), torch.ones(ranks[name], dtype=torch.float64))
        assert ad.b.abs().max() == 0 and ad.scale == 2.0  # alpha / r kept after redistribution
    assert sum(ranks.values()) == 4


def test_eva_whitening_gives_projected_inputs_identity_second_moment():
    model, data = MLP(), batches()
    x = torch.cat([b.reshape(-1, 6) for b in data]).double()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, alpha=4, init="eva", init_options={"whiten": True},
                                            targets=["up"]))
    lorakit.initialize(model, data)
    a = layer(model, "up")[1].a.double()
    projected = a @ x.t()  # (r, tokens)
    torch.testing.assert_close(projected @ projected.t(), torch.eye(a.shape[0], dtype=torch.float64),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(lorakit.ConfigError, match="whiten"):
        other = lorakit.adapt(MLP(), lorakit.LoraConfig(r=2, init="eva", init_options={"whiten": "yes"},
                                                        targets=["up"]))
        lorakit.initialize(other, data)


def test_eva_allocation_follows_explained_variance_under_a_fixed_budget():
    ratios = {"a": torch.tensor([0.9, 0.05, 0.03, 0.02]), "b": torch.tensor([0.4, 0.3, 0.2, 0.1])}
    assert allocate(ratios, 4, {"a": 4, "b": 4}) == {"a": 1, "b": 3}
    assert allocate(ratios, 4, {"a": 4, "b": 2}) == {"a": 2, "b": 2}  # per-layer cap rho * r
    same = {"a": ratios["b"], "b": ratios["b"].clone()}
    assert allocate(same, 6, {"a": 4, "b": 4}) == {"a": 3, "b": 3}  # identical spectra: uniform


def test_eva_gives_a_low_rank_input_layer_fewer_ranks_and_the_result_round_trips(tmp_path):
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.full, self.low = nn.Linear(6, 4), nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.full(x) + self.low(x[..., :1].expand_as(x))  # inputs of `low` have rank 1

    torch.manual_seed(0)
    model = lorakit.adapt(Two(), lorakit.LoraConfig(r=2, init="eva", targets=["full", "low"]))
    lorakit.initialize(model, batches(dtype=torch.float32))
    assert layer(model, "low")[1].a.shape[0] == 1 and layer(model, "full")[1].a.shape[0] == 3
    with torch.no_grad():
        for p in lorakit.trainable_parameters(model).values():
            p.add_(0.1)
    x = batches(1, torch.float32)[0]
    lorakit.save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = lorakit.load_adapter(Two(), tmp_path)
    torch.testing.assert_close(fresh(x), model(x))


# --- LoRA-SB ---------------------------------------------------------------------------------------------------
def test_lora_sb_starts_at_the_best_rank_r_first_update_and_trains_the_projected_gradient():
    model, data = MLP(), batches()
    grads = brute_force_gradients(model, data)
    w0 = {n: m.weight.detach().clone() for n, m in model.named_children()}
    cfg = lorakit.LoraXsConfig(r=2, alpha=2, init="lora-sb", init_options={"update": "sgd", "lr": 0.5},
                               targets=["up", "down"])
    lorakit.adapt(model, cfg)
    lorakit.initialize(model, data, loss_fn=loss_fn)
    for name in ("up", "down"):
        host, ad = layer(model, name)
        torch.testing.assert_close(host.backend.weight(), w0[name])  # base not compensated
        torch.testing.assert_close(ad.delta_weight(host.backend).double(), best_rank(-0.5 * grads[name], 2))
        torch.testing.assert_close(ad.lora_B.t() @ ad.lora_B, torch.eye(2, dtype=torch.float64))
    # dL/dR = s B^T G A^T, with G the full-weight gradient at the current (initialised) weights
    for host in (model.up, model.down):
        host.base_layer.weight.requires_grad_(True)
    loss_fn(model(data[0]), data[0]).backward()
    for name in ("up", "down"):
        host, ad = layer(model, name)
        g = host.base_layer.weight.grad
        torch.testing.assert_close(ad.lora_R.grad, ad.scale * ad.lora_B.t() @ g @ ad.lora_A.t())
    assert [p.numel() for p in lorakit.trainable_parameters(model).values()] == [4, 4]


def test_eva_reads_all_layers_in_one_pass_per_batch_and_siblings_share_their_inputs():
    model = tiny_llama()  # 14 linear layers: more than layers_per_pass
    calls = []
    model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    lorakit.adapt(model, lorakit.LoraConfig(r=2, init="eva"))
    lorakit.initialize(model, [{"input_ids": ids}, {"input_ids": ids.flip(0)}], layers_per_pass=4)
    assert len(calls) == 2  # one forward per batch, not one per group of layers
    q, k = (model.get_submodule(f"model.layers.0.self_attn.{n}").adapters["default"].a for n in ("q_proj", "k_proj"))
    n = min(q.shape[0], k.shape[0])  # same inputs: the same top right singular vectors (up to sign)
    assert n > 0
    torch.testing.assert_close((q[:n] * k[:n]).sum(1).abs(), torch.ones(n), atol=1e-4, rtol=1e-4)


def test_layers_sharing_an_input_share_one_gram_and_changing_sharing_stays_exact():
    """q/k/v (and gate/up) read one tensor: one Gram object for them; a layer pair that shares its input in one
    batch but not the next gets separate, exact sums."""
    from lorakit.data_init import _input_grams

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3, dtype=torch.float64), nn.Linear(4, 3, dtype=torch.float64)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.a(x) + self.b(x if self.calls == 1 else 2 * x)  # shared in the first batch only

    model = lorakit.adapt(Branchy(), lorakit.LoraConfig(r=1, targets=["a", "b"]))
    data = [torch.randn(5, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]
    hosts = list(lorakit.inject.hosts(model))
    grams = _input_grams(model, hosts, data, lambda m, x: m(x))
    torch.testing.assert_close(grams["a"], data[0].T @ data[0] + data[1].T @ data[1])
    torch.testing.assert_close(grams["b"], data[0].T @ data[0] + 4 * data[1].T @ data[1])

    llama = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=2))
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(3))
    layers = [h for h in lorakit.inject.hosts(llama) if ".layers.0." in h.path]
    grams = _input_grams(llama, layers, [{"input_ids": ids}, {"input_ids": ids.flip(1)}], lambda m, b: m(**b))
    attn, mlp = (f"model.layers.0.{p}" for p in ("self_attn", "mlp"))
    assert grams[f"{attn}.q_proj"] is grams[f"{attn}.k_proj"] is grams[f"{attn}.v_proj"]
    assert grams[f"{mlp}.gate_proj"] is grams[f"{mlp}.up_proj"]
    assert len({id(g) for g in grams.values()}) == 4  # attention input, o_proj, MLP input, down_proj


@pytest.mark.parametrize("whiten", [False, True])
def test_eva_randomized_top_k_matches_the_exact_eigendecomposition(whiten):
    """``init_options={"niter": N}``: the top eigenpairs by randomized subspace iteration on a 96-wide layer whose
    inputs have a decaying spectrum equal the exact ``eigh``'s (rows of A up to sign, ratios, ranks)."""
    gen = torch.Generator().manual_seed(4)
    mix = torch.linalg.qr(torch.randn(96, 96, generator=gen, dtype=torch.float64)).Q * 0.8 ** torch.arange(96.0)
    data = [torch.randn(40, 96, generator=gen, dtype=torch.float64) @ mix.T for _ in range(3)]
    results = {}
    for niter in (None, 6):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(96, 16, dtype=torch.float64), nn.Linear(16, 8, dtype=torch.float64))
        options = {"whiten": whiten} if niter is None else {"whiten": whiten, "niter": niter}
        lorakit.adapt(model, lorakit.LoraConfig(r=4, init="eva", init_options=options, targets=["0", "1"]))
        lorakit.initialize(model, data)
        results[niter] = [model.get_submodule(n).adapters["default"].a.detach() for n in ("0", "1")]
    for exact, fast in zip(results[None], results[6]):
        assert exact.shape == fast.shape
        norms = exact.norm(dim=1)
        torch.testing.assert_close((exact * fast).sum(1).abs(), norms * fast.norm(dim=1), rtol=1e-6, atol=0)
        torch.testing.assert_close(fast.norm(dim=1), norms, rtol=1e-6, atol=0)
    with pytest.raises(lorakit.ConfigError, match="niter"):
        bad = lorakit.adapt(MLP(), lorakit.LoraConfig(r=2, init="eva", init_options={"niter": 0}, targets=["up"]))
        lorakit.initialize(bad, batches())


def test_lora_ga_default_passes_fill_the_gradient_budget(monkeypatch):
    """Without ``layers_per_pass`` a pass holds as many layers' float32 gradients as fit in the byte budget."""
    import lorakit.data_init as data_module

    model = lorakit.adapt(MLP(), lorakit.LoraConfig(r=2, init="lora-ga", targets=["up", "down"]))
    layers = list(lorakit.inject.hosts(model))  # up: 8 x 6, down: 4 x 8 -> 192 and 128 bytes of float32
    assert [len(g) for g in data_module._passes(layers, None)] == [2]
    monkeypatch.setattr(data_module, "GRADIENT_BUDGET", 300)
    assert [[h.path for h in g] for g in data_module._passes(layers, None)] == [["up"], ["down"]]
    monkeypatch.setattr(data_module, "GRADIENT_BUDGET", 1)  # a layer larger than the budget still gets a pass
    assert [len(g) for g in data_module._passes(layers, None)] == [1, 1]
    assert [len(g) for g in data_module._passes(layers, 5)] == [2]
