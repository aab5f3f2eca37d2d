"""Quantised bases (QLoRA, METHODS.md entry 39), LoftQ/QPiSSA on them, LQ-LoRA (40) and INT2.1 (41)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM
from zoo import perturb, tiny_llama

import lorakit
from lorakit.hosts import codebook
from lorakit.hosts.codecs import CODECS
from lorakit.hosts.quantized import QuantizedBackend
from lorakit.init.alternating import decompose
from lorakit.quant.int21 import effective_bits, int21
from lorakit.quant.lq_lora import allocate, empirical_fisher, lq_lora
from lorakit.quant.model import bits_per_parameter, quantized_layers

pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")

NF4_BACKENDS = ("torchao", "bitsandbytes", "lorakit")
# QLoRA's NF4 table (bitsandbytes / the paper), an independent reference for lorakit's k-bit NormalFloat
NF4_TABLE = (-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0, 0.0795803,
             0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0)


def gaussian(rows: int, cols: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).to(dtype)


def linear_model(weight: torch.Tensor, bias: bool = True) -> nn.Sequential:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias:
            layer.bias.normal_()
    return nn.Sequential(layer)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(b.float())).item()


# --- the NF4 format -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nf4_with_double_quantisation_stores_at_most_4_13_bits_per_parameter(backend, dtype):
    model = linear_model(gaussian(1024, 4096, dtype=dtype), bias=False)
    lorakit.quantize(model, "nf4", backend)
    bits = bits_per_parameter(model)
    # QLoRA: 4 + 8/64 (int8 block scales) + 32/(64*256) (second-level scales) = 4.127, plus the code tables
    assert 4 + 8 / 64 < bits <= 4.13


def test_codebook_storage_is_k_bits_plus_a_float16_scale_per_block():
    for scheme, bits in (("nf2", 2), ("nf3", 3), ("nf4", 4), ("int8", 8)):
        model = linear_model(gaussian(64, 256), bias=False)
        lorakit.quantize(model, scheme, "lorakit", block=64)
        assert bits_per_parameter(model) == bits + 16 / 64


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
def test_nf4_reconstruction_is_finer_than_fp4_on_gaussian_weights_and_keeps_zero(backend):
    w = gaussian(256, 512)
    w[0, :5] = 0
    nf4 = CODECS.get(backend).fake_quantize(w, "nf4", 64)
    fp4 = CODECS.get("bitsandbytes").fake_quantize(w, "fp4", 64)  # the only blockwise FP4 of the two libraries
    assert rel(nf4, w) < 0.8 * rel(fp4, w)
    assert torch.equal(nf4[0, :5], torch.zeros(5))


def test_lorakit_nf4_codebook_is_qlora_table_and_its_round_trip_matches_the_libraries():
    torch.testing.assert_close(codebook.levels("nf4"), torch.tensor(NF4_TABLE), atol=1e-6, rtol=0)
    w = gaussian(128, 256)
    ours = CODECS.get("lorakit").fake_quantize(w, "nf4", 64)
    bnb = CODECS.get("bitsandbytes").fake_quantize(w, "nf4", 64)
    assert abs(rel(ours, w) - rel(bnb, w)) < 0.002  # same codebook and blocks; scales stored differently
    assert (ours - bnb).abs().gt(1e-2).float().mean() < 0.01


@pytest.mark.parametrize("bits", range(2, 9))
def test_codebook_packing_round_trips_in_k_bits_per_code(bits):
    idx = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = codebook._pack(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == 126 * bits  # ceil(1001 / 8) groups of k bytes
    assert torch.equal(codebook._unpack(packed, bits, 1001), idx)


def test_lorakit_codebook_is_idempotent_and_lower_bits_cost_accuracy():
    codec, w = CODECS.get("lorakit"), gaussian(64, 256)
    once = codec.fake_quantize(w, "nf3", 64)
    assert torch.equal(codec.fake_quantize(once, "nf3", 64), once)
    errors = [rel(codec.fake_quantize(w, f"nf{k}", 64), w) for k in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2]
    for k in (3, 4):  # (at 2 bits NormalFloat's asymmetric 4 levels lose to uniform's symmetric ones)
        assert rel(codec.fake_quantize(w, f"nf{k}", 64), w) < rel(codec.fake_quantize(w, f"int{k}", 64), w)


# --- QLoRA: adapters on the quantised base ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", NF4_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_forward_and_backward_equal_lora_on_the_dequantised_weight(backend, dtype):
    model = linear_model(gaussian(48, 64, dtype=dtype))
    lorakit.quantize(model, "nf4", backend)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, alpha=8, init="random", targets=["0"]))
    host = model[0]
    assert isinstance(host.backend, QuantizedBackend)
    w_dq = host.backend.weight().detach()  # (48, 64)
    a, b, bias = host.adapters["default"].a, host.adapters["default"].b, host.base_layer.bias
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    out = model(x)
    out.square().sum().backward()
    grads = (x.grad.clone(), a.grad.clone(), b.grad.clone())
    x_ref = x.detach().float().requires_grad_(True)
    a_ref, b_ref = a.detach().float().requires_grad_(True), b.detach().float().requires_grad_(True)
    ref = x_ref @ w_dq.float().t() + bias.float() + 2.0 * (x_ref @ a_ref.t()) @ b_ref.t()
    ref.square().sum().backward()
    for got, want in zip((out, *grads), (ref, x_ref.grad, a_ref.grad, b_ref.grad)):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        else:  # bf16 compute against an fp32 reference: bf16's 8-bit mantissa, summed over 64 terms
            assert rel(got, want) < 1e-2
    assert host.base_layer.bias.grad is None and all(p.grad is None for p in host.base_layer.parameters())


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("order", ["quantize-then-adapt", "adapt-then-quantize"])
def test_adapters_keep_their_contract_on_a_quantised_llama(method, order):
    model, ids = tiny_llama(), torch.randint(0, 96, (2, 7))
    config = lorakit.build_config(method, r=4, targets=["q_proj", "v_proj", "down_proj"])
    if order == "quantize-then-adapt":
        lorakit.quantize(model, "nf4")
        quantized_out = model(ids).logits.detach()
        lorakit.adapt(model, config)
    else:
        lorakit.adapt(model, config)
        lorakit.quantize(model, "nf4")
        with lorakit.disable(model):
            quantized_out = model(ids).logits.detach()
    assert len(quantized_layers(model)) == 14  # every linear layer but the head, adapted or not
    if order == "quantize-then-adapt":  # identity at init holds on the quantised base
        torch.testing.assert_close(model(ids).logits, quantized_out, atol=1e-5, rtol=1e-5)
    perturb(model, 0.1)
    out = model(ids).logits
    assert (out - quantized_out).abs().max() > 1e-3
    out.square().mean().backward()
    trainable = set(lorakit.trainable_parameters(model).values())
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in model.parameters() if p not in trainable)
    with lorakit.disable(model):
        torch.testing.assert_close(model(ids).logits, quantized_out, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torchao", "bitsandbytes"])
def test_a_qlora_adapter_saves_and_loads_onto_a_freshly_quantised_model(backend, tmp_path):
    model, ids = lorakit.quantize(tiny_llama(), "nf4", backend), torch.randint(0, 96, (2, 7))
    lorakit.adapt(model, lorakit.LoraConfig(r=4, targets=["q_proj", "up_proj"]))
    perturb(model, 0.1)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(lorakit.quantize(tiny_llama(), "nf4", backend), tmp_path)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("backend", NF4_BACKENDS)
def test_merge_into_a_quantised_base_reports_a_bounded_rounding_error_and_unmerge_is_exact(backend):
    model = linear_model(gaussian(32, 128))
    lorakit.quantize(model, "nf4", backend)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, init="random", targets=["0"]))
    perturb(model, 0.05)
    host = model[0]
    before = host.backend.weight()
    target = (before + host.adapters["default"].delta_weight(host.backend)).detach()
    lorakit.merge(model)
    stored = host.backend.weight()
    error = lorakit.rounding_errors(model)["0"]
    assert error == pytest.approx(rel(stored, target), rel=1e-5) and error > 0
    # NF4's rounding: each value moves by at most half the widest gap of the table times its block's absmax
    half_gap = (torch.tensor(NF4_TABLE).diff().max() / 2).item()
    absmax = target.reshape(-1, 64).abs().amax(dim=1, keepdim=True)  # (blocks, 1)
    assert ((stored - target).reshape(-1, 64).abs() <= half_gap * absmax * 1.02 + 1e-6).all()
    lorakit.unmerge(model)  # restores the codes stored before the merge instead of rounding a second time
    torch.testing.assert_close(host.backend.weight(), before, atol=0, rtol=0)


def test_quantising_a_pissa_residual_is_qpissa_and_beats_quantising_w():
    w = gaussian(64, 64) + gaussian(64, 4, 1) @ gaussian(4, 64, 2) * 2  # a few strong directions
    model = linear_model(w, bias=False)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, alpha=4, init="pissa", targets=["0"]))
    lorakit.quantize(model, "nf4")
    host = model[0]
    adapted = host.backend.weight() + host.adapters["default"].delta_weight(host.backend)
    qlora = CODECS.get("bitsandbytes").fake_quantize(w, "nf4", 64)  # lorakit.quantize's default backend
    assert rel(adapted, w) < 0.8 * rel(qlora, w)


@pytest.mark.parametrize("backend", NF4_BACKENDS)
def test_loftq_then_quantize_stores_loftq_base_in_real_nf4_and_keeps_its_error(backend):
    w = gaussian(64, 128) + gaussian(64, 2, 1) @ gaussian(2, 128, 2) * 3
    model = linear_model(w, bias=False)
    options = {"iters": 4, "backend": backend}  # LoftQ needs W itself: initialise, then quantise its Q_T
    lorakit.adapt(model, lorakit.LoraConfig(r=4, alpha=8, init="loftq", init_options=options, targets=["0"]))
    lorakit.quantize(model, "nf4", backend)
    host = model[0]
    loftq = lorakit.init.loftq.loftq(w, 4, 2.0, **options)
    stored = host.backend.weight()
    if backend == "lorakit":  # idempotent codec: the base stores exactly LoftQ's Q_T
        torch.testing.assert_close(stored, loftq.base, atol=0, rtol=0)
    adapted = stored + host.adapters["default"].delta_weight(host.backend)
    qlora = CODECS.get(backend).fake_quantize(w, "nf4", 64)
    assert rel(adapted, w) < 0.8 * rel(qlora, w)


# --- errors -----------------------------------------------------------------------------------------------------
def test_bad_scheme_backend_and_targets_raise_clear_errors():
    with pytest.raises(lorakit.ConfigError, match="backend='gptq'.*bitsandbytes, lorakit, torchao"):
        lorakit.quantize(tiny_llama(), "nf4", "gptq")
    with pytest.raises(lorakit.ConfigError, match="scheme='fp4'.*backend 'torchao'.*nf4"):
        lorakit.quantize(tiny_llama(), "fp4", "torchao")
    with pytest.raises(lorakit.ConfigError, match="scheme='nf5'.*bitsandbytes.*nf4, fp4"):
        lorakit.quantize(tiny_llama(), "nf5", "bitsandbytes")
    with pytest.raises(lorakit.TargetError, match="cannot quantise 'model.embed_tokens', a Embedding"):
        lorakit.quantize(tiny_llama(), targets=["embed_tokens"])
    model = lorakit.quantize(tiny_llama(), targets=["q_proj"])
    with pytest.raises(lorakit.LorakitError, match="already quantised"):
        lorakit.quantize(model, targets=["q_proj"])
    with pytest.raises(lorakit.LorakitError, match="multiple of block=64"):
        lorakit.quantize(linear_model(gaussian(3, 7)), "nf4", "torchao")


# --- LQ-LoRA ----------------------------------------------------------------------------------------------------
def low_rank_plus_noise(rows: int = 64, cols: int = 128, seed: int = 0) -> torch.Tensor:
    return gaussian(rows, cols, seed) * 0.5 + gaussian(rows, 4, seed + 1) @ gaussian(4, cols, seed + 2)


def test_lq_decomposition_error_decreases_over_iterations_and_beats_plain_quantisation():
    w = low_rank_plus_noise()
    dec = decompose(w, 4, "nf3", 64, iters=6)
    assert dec.errors[dec.best] == min(dec.errors) and dec.errors[-1] < dec.errors[0]
    codec = CODECS.get("lorakit")
    torch.testing.assert_close(dec.q, codec.fake_quantize(dec.source, "nf3", 64), atol=0, rtol=0)
    assert dec.error == pytest.approx(torch.linalg.norm(w - dec.q - dec.l1 @ dec.l2).square().item(), rel=1e-4)
    assert dec.error < 0.7 * torch.linalg.norm(w - codec.fake_quantize(w, "nf3", 64)).square().item()


def test_fisher_weighted_decomposition_has_the_lower_fisher_weighted_error():
    w = low_rank_plus_noise()
    row = torch.ones(64)
    row[:8] = 50.0  # a few rows matter much more
    fisher = torch.outer(row, torch.linspace(0.5, 2.0, 128))
    plain, weighted = (decompose(w, 2, "nf2", 64, iters=4, fisher=f) for f in (None, fisher))

    def weighted_error(d):
        return torch.sum(fisher * (w - d.q - d.l1 @ d.l2) ** 2).item()

    assert weighted_error(weighted) < 0.9 * weighted_error(plain)


def _knapsack(errors, costs, capacity):
    """Exact multiple-choice knapsack by dynamic programming over integer costs (the reference)."""
    best = {0: (0.0, [])}
    for row_e, row_c in zip(errors, costs):
        nxt = {}
        for spent, (err, picks) in best.items():
            for k, (e, c) in enumerate(zip(row_e, row_c)):
                s = spent + c
                if s <= capacity and (s not in nxt or err + e < nxt[s][0]):
                    nxt[s] = (err + e, picks + [k])
        best = nxt
    return min(best.values())[0]


@pytest.mark.parametrize("n", [5, 14])  # 3**5 assignments: exact enumeration; 3**14: Lagrangian + greedy
def test_bit_allocation_meets_the_budget_and_is_optimal_or_near(n):
    gen = torch.Generator().manual_seed(n)
    bits = [2, 3, 4]
    errors = [sorted(torch.rand(3, generator=gen).tolist(), reverse=True) for _ in range(n)]
    sizes = [int(s) for s in torch.randint(1, 5, (n,), generator=gen)]
    budget = 3.0
    choice = allocate(errors, [bits] * n, sizes, budget)
    assert sum(bits[k] * s for k, s in zip(choice, sizes)) <= budget * sum(sizes)
    optimum = _knapsack(errors, [[b * s for b in bits] for s in sizes], int(budget * sum(sizes)))
    ours = sum(e[k] for e, k in zip(errors, choice))
    assert ours == pytest.approx(optimum) if n == 5 else ours <= 1.05 * optimum
    with pytest.raises(lorakit.ConfigError, match="budget=1.0 is invalid: is below the cheapest configuration"):
        allocate(errors, [bits] * n, sizes, 1.0)


def test_lq_lora_on_a_llama_meets_its_budget_and_starts_from_its_decomposition():
    model = tiny_llama()
    weights = {p: m.weight.detach().clone() for p, m in model.named_modules() if p.endswith(("q_proj", "up_proj"))}
    config = lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "up_proj"])
    report = lq_lora(model, config, configs=(("nf2", 64), ("nf4", 64)), budget=3.2, iters=3)
    assert report.bits_per_weight <= 3.2
    assert bits_per_parameter(model) == pytest.approx(report.bits_per_weight)  # the accounting is the storage
    assert {c for c in report.configs.values()} == {("nf2", 64), ("nf4", 64)}  # the budget forces a mix
    for path, w in weights.items():
        host = model.get_submodule(path)
        adapted = host.backend.weight() + host.adapters["default"].delta_weight(host.backend)
        assert torch.linalg.norm(w - adapted).square().item() == pytest.approx(min(report.errors[path]), rel=1e-3)
    with pytest.raises(lorakit.ConfigError, match="budget=None is invalid: is needed"):
        lq_lora(tiny_llama(), config, configs=(("nf2", 64), ("nf4", 64)))


def test_empirical_fisher_is_the_mean_squared_weight_gradient_and_leaves_the_model_frozen():
    model, path = tiny_llama().requires_grad_(False), "model.layers.0.self_attn.q_proj"
    batches = [{"input_ids": torch.randint(0, 96, (2, 6)), "labels": torch.randint(0, 96, (2, 6))} for _ in range(2)]
    fisher = empirical_fisher(model, batches, [path])[path]
    weight = model.get_submodule(path).weight
    expected = torch.zeros_like(weight)
    for batch in batches:
        with torch.enable_grad():
            weight.requires_grad_(True)
            expected += torch.autograd.grad(model(**batch).loss, weight)[0].square() / 2
            weight.requires_grad_(False)
    torch.testing.assert_close(fisher, expected)
    assert not weight.requires_grad and fisher.abs().sum() > 0


# --- INT2.1 -----------------------------------------------------------------------------------------------------
def test_int21_error_correction_reduces_the_gap_to_the_full_precision_model():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    calibration = [torch.randint(0, 96, (4, 16), generator=gen) for _ in range(3)]
    report = int21(model, lorakit.LoraConfig(r=4, alpha=8), calibration, steps=30, lr=3e-3)
    assert report.initial > 0 and report.final < 0.7 * report.initial
    assert len(quantized_layers(model)) == 14
    adapters = sum(p.numel() for p in lorakit.trainable_parameters(model).values())
    weights = sum(m.in_features * m.out_features for m in quantized_layers(model).values())
    assert effective_bits(model) == pytest.approx(2 + 16 / 64 + 16 * adapters / weights)


def test_int21_error_leaves_padded_positions_out():
    """What the model outputs at a padded position cannot matter: changing it leaves the error as it was."""
    from lorakit.quant.int21 import squared_error

    target = torch.zeros(2, 4, 5)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    output = torch.ones(2, 4, 5)
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}
    noisy = output.clone()
    noisy[0, :2] = 100.0  # the left-padded positions of row 0
    assert float(squared_error(noisy, target, batch)) == pytest.approx(float(squared_error(output, target, batch)))
    assert float(squared_error(output, target, batch)) == pytest.approx(1.0)  # mean over 6 real positions x 5


# --- lorakit finetune --quant -----------------------------------------------------------------------------------
def test_finetune_cli_trains_an_adapter_on_an_nf4_base(tmp_path, capsys):
    from test_cli import finetune_args, make_model_folder, metrics, sentiment_rows, write_jsonl

    from lorakit.cli import main
    from lorakit.train.run import Options, prepare

    model_dir = make_model_folder(tmp_path / "model")
    data = write_jsonl(tmp_path / "sentiment.jsonl", sentiment_rows(240))
    prepared = prepare(Options(model=str(model_dir), data=str(data), task="classification", quant="nf4"))
    assert len(quantized_layers(prepared.model)) == 14
    assert main(finetune_args(model_dir, data, tmp_path / "run", "--quant", "nf4", "--quant-backend", "torchao")) == 0
    evals = {r["when"]: r for r in metrics(tmp_path / "run") if r["kind"] == "eval"}
    assert evals["after"]["accuracy"] > evals["before"]["accuracy"] + 0.2
    assert main(finetune_args(model_dir, data, tmp_path / "bad", "--quant", "nf5")) != 0
    assert "scheme='nf5' is invalid" in capsys.readouterr().err


def test_finetune_quantises_after_an_initialiser_that_needs_the_full_precision_weight(tmp_path):
    from test_cli import make_model_folder, sentiment_rows, write_jsonl

    from lorakit.train.run import Options, finetune

    model_dir = make_model_folder(tmp_path / "model")
    data = write_jsonl(tmp_path / "sentiment.jsonl", sentiment_rows(60))
    seen = []
    opts = Options(model=str(model_dir), data=str(data), task="classification", quant="nf4", init="pissa", rank=2,
                   steps=1, eval_size=10, output=str(tmp_path / "run"))
    finetune(opts, callbacks=[lambda trainer, _: seen.append(trainer.model)])
    hosts = list(lorakit.inject.hosts(seen[0]))
    assert len(quantized_layers(seen[0])) == 14 and all(isinstance(h.backend, QuantizedBackend) for h in hosts)
    original = LlamaForCausalLM.from_pretrained(model_dir)
    codec = CODECS.get("bitsandbytes")
    for host in hosts:  # PiSSA of the full-precision W, then the residual quantised (QPiSSA): Q(W - s B0 A0)
        adapter, w = host.adapters["default"], original.get_submodule(host.path).weight.detach()
        b0, a0 = adapter.init_lora_B, adapter.init_lora_A
        u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
        principal = (u[:, :2] * sv[:2]) @ vh[:2]
        assert rel(adapter.scale * b0 @ a0, principal) < 1e-4  # the factors are W's principal part, not Q(W)'s
        assert torch.equal(host.backend.weight(), codec.fake_quantize(w - adapter.scale * b0 @ a0, "nf4", 64))
