"""Catalogue methods of METHODS.md section A (Hydra, TLoRA, FLoRA-N, CP-LoRA, WaRA, LoCA, Block-LoRA) and the
output-map merge protocol: each method's defining property and its trainable-parameter formula, checked against
dense reference computations written out here independently of the implementations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo import Net, perturb

import lorakit


def adapted(layer: torch.nn.Module, method: str, names=("default",), **fields):
    torch.manual_seed(0)
    model = Net(layer)
    for name in names:
        lorakit.adapt(model, lorakit.build_config(method, targets=["layer"], **fields), name)
    perturb(model)
    host = model.layer
    return model, host, host.adapters[names[0]]


def n_trainable(model) -> int:
    return sum(p.numel() for p in lorakit.trainable_parameters(model).values())


# -- Hydra ----------------------------------------------------------------------------------------------------------
def test_hydra_forward_and_merge_are_the_two_branch_formula():
    model, host, hydra = adapted(torch.nn.Linear(12, 10), "hydra", r=4, alpha=8)
    w0, bias = host.base_layer.weight.detach().clone(), host.base_layer.bias.detach().clone()
    s = 8 / 4
    bp, ap = hydra.lora_B.weight.detach(), hydra.lora_A.weight.detach()
    bs, as_ = hydra.seq_B.weight.detach(), hydra.seq_A.weight.detach()
    expected_w = w0 + s * bp @ ap + s * bs @ as_ @ w0  # W0 + B_p A_p + B_s A_s W0
    x = torch.randn(3, 5, 12)
    expected = x @ w0.t() + s * (x @ ap.t() @ bp.t()) + s * (x @ w0.t() @ as_.t() @ bs.t()) + bias
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hydra.delta_weight(host.backend), expected_w - w0, atol=1e-5, rtol=1e-5)
    lorakit.merge(model)
    torch.testing.assert_close(host.base_layer.weight, expected_w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(host.base_layer.bias, bias, atol=0, rtol=0)
    lorakit.unmerge(model)
    torch.testing.assert_close(host.base_layer.weight, w0, atol=1e-6, rtol=1e-6)


def test_hydra_with_zero_sequential_branch_is_exactly_lora():
    model, host, hydra = adapted(torch.nn.Linear(12, 10), "hydra", r=4, alpha=8)
    lora_model = lorakit.adapt(Net(host.base_layer), lorakit.LoraConfig(r=4, alpha=8, targets=["layer"]))
    lora = lora_model.layer.adapters["default"]
    with torch.no_grad():
        hydra.seq_B.weight.zero_()
        lora.lora_A.weight.copy_(hydra.lora_A.weight)
        lora.lora_B.weight.copy_(hydra.lora_B.weight)
    x = torch.randn(2, 5, 12)
    assert torch.equal(hydra(x, host.base_layer(x), host.backend), lora(x, host.base_layer(x), host.backend))
    assert torch.equal(hydra.delta_weight(host.backend), lora.delta_weight(host.backend))


def test_hydra_on_conv2d_mixes_output_channels_of_the_base_convolution():
    conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
    model, host, hydra = adapted(conv, "hydra", r=2, alpha=2)
    w0 = host.base_layer.weight.detach()
    mix = torch.eye(6) + hydra.seq_B.weight.detach() @ hydra.seq_A.weight.detach()  # s = 1
    lora_kernel = (hydra.lora_B.weight.detach().reshape(6, 2) @ hydra.lora_A.weight.detach().reshape(2, -1))
    kernel = (mix @ w0.reshape(6, -1) + lora_kernel).reshape(w0.shape)
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x, kernel, host.base_layer.bias, stride=2, padding=1)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_hydra_trainable_count_is_two_rank_r_branches():
    model, _, _ = adapted(torch.nn.Linear(12, 10), "hydra", r=3)
    assert n_trainable(model) == 3 * (12 + 10) + 2 * 3 * 10  # parallel r(d_in + d_out) + sequential 2 r d_out


# -- the output-map merge protocol ----------------------------------------------------------------------------------
def test_merging_a_map_adapter_with_additive_and_rescaling_adapters_is_exact():
    torch.manual_seed(0)
    model = Net(torch.nn.Linear(12, 10))
    for name, cfg in {"h": lorakit.build_config("hydra", r=3), "t": lorakit.build_config("tlora", r=2),
                      "d": lorakit.DoraConfig(r=2), "l": lorakit.LoraConfig(r=2)}.items():
        lorakit.adapt(model, cfg.replace(targets=["layer"]), name)
    perturb(model)
    lorakit.set_active(model, ["h", "t", "d", "l"])
    w0 = model.layer.base_layer.weight.detach().clone()
    x = torch.randn(4, 5, 12)
    out = model(x).detach()
    lorakit.merge(model, ["h"])
    lorakit.merge(model, ["t", "d", "l"])  # re-merges all four relative to W0: M = I + sum(L_i - I) + (diag(c) - I)
    assert model.layer.merged == ["h", "t", "d", "l"]
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)  # float32 rounding of the merged weight, amplified by cond(M) (M far from I here)
    torch.testing.assert_close(model.layer.base_layer.weight, w0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shrink", [1.0, 1.0 - 1e-9])  # singular; condition number 1e9
def test_merge_refuses_a_singular_output_map_and_leaves_the_base_alone(shrink):
    model, host, hydra = adapted(torch.nn.Linear(12, 10), "hydra", r=1, alpha=1)
    with torch.no_grad():  # I + B_s A_s with B_s A_s = -shrink e0 e0^T: row 0 of W0 would be (nearly) lost
        hydra.seq_A.weight.zero_()[0, 0] = 1.0
        hydra.seq_B.weight.zero_()[0, 0] = -shrink
    w0 = host.base_layer.weight.detach().clone()
    with pytest.raises(lorakit.LorakitError, match="singular"):
        lorakit.merge(model)
    assert torch.equal(host.base_layer.weight, w0) and host.merged == []


def test_output_map_merge_round_trips_in_bfloat16():
    model, host, _ = adapted(torch.nn.Linear(16, 16), "tlora", r=2)
    model.to(torch.bfloat16)
    w0 = host.base_layer.weight.detach().clone()
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16)
    out = model(x).float()
    lorakit.merge(model)
    torch.testing.assert_close(model(x).float(), out, atol=0.1, rtol=0.05)
    lorakit.unmerge(model)
    torch.testing.assert_close(host.base_layer.weight.float(), w0.float(), atol=0.05, rtol=0.02)


# -- TLoRA ----------------------------------------------------------------------------------------------------------
def tlora_transform(tl) -> torch.Tensor:
    c1, c2 = tl.transform_core_1.detach(), tl.transform_core_2.detach()
    return sum(torch.kron(c1[k], c2[k]) for k in range(c1.shape[0]))


def test_tlora_is_the_transformed_base_plus_a_lora_residual_and_merges_exactly():
    model, host, tl = adapted(torch.nn.Linear(12, 10), "tlora", r=3, alpha=6, transform_rank=2)
    assert (tl.n1, tl.n2) == (2, 5)
    w0, bias = host.base_layer.weight.detach().clone(), host.base_layer.bias.detach()
    expected_w = tlora_transform(tl) @ w0 + 2.0 * tl.lora_B.weight.detach() @ tl.lora_A.weight.detach()
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(model(x), F.linear(x, expected_w, bias), atol=1e-5, rtol=1e-5)
    lorakit.merge(model)
    torch.testing.assert_close(host.base_layer.weight, expected_w, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(host.base_layer.weight, w0, atol=1e-6, rtol=1e-6)


def test_tlora_starts_at_the_identity_transform():
    torch.manual_seed(0)
    model = lorakit.adapt(Net(torch.nn.Linear(12, 10)), lorakit.build_config("tlora", targets=["layer"]))
    tl = model.layer.adapters["default"]
    assert torch.equal(tlora_transform(tl), torch.eye(10))
    assert torch.equal(tl.delta_weight(model.layer.backend), torch.zeros(10, 12))


def test_tlora_with_identity_transform_is_lora():
    model, host, tl = adapted(torch.nn.Linear(12, 10), "tlora", r=4, alpha=8)
    lora_model = lorakit.adapt(Net(host.base_layer), lorakit.LoraConfig(r=4, alpha=8, targets=["layer"]))
    lora = lora_model.layer.adapters["default"]
    with torch.no_grad():
        tl.transform_core_1.zero_()[0] = torch.eye(2)
        tl.transform_core_2.zero_()[0] = torch.eye(5)
        lora.lora_A.weight.copy_(tl.lora_A.weight)
        lora.lora_B.weight.copy_(tl.lora_B.weight)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(tl(x, host.base_layer(x), host.backend), lora(x, host.base_layer(x), host.backend))


def test_tlora_with_a_diagonal_transform_reproduces_dora():
    model, host, dora = adapted(torch.nn.Linear(12, 10), "dora", r=3, alpha=3)
    tl_model = lorakit.adapt(Net(host.base_layer), lorakit.build_config("tlora", r=3, alpha=3, targets=["layer"]))
    tl = tl_model.layer.adapters["default"]
    w0 = host.base_layer.weight.detach()
    b, a = dora.lora_B.weight.detach(), dora.lora_A.weight.detach()
    g = dora.lora_magnitude_vector.detach() / (w0 + b @ a).norm(dim=1)  # m / ||W0 + s B A||, s = 1
    u, sv, vh = torch.linalg.svd(g.reshape(2, 5), full_matrices=False)  # diag(g) = sum_k diag(s_k u_k) kron diag(v_k)
    with torch.no_grad():
        for k in range(2):
            tl.transform_core_1[k] = torch.diag(sv[k] * u[:, k])
            tl.transform_core_2[k] = torch.diag(vh[k])
        tl.lora_A.weight.copy_(a)
        tl.lora_B.weight.copy_(g[:, None] * b)  # R = diag(g) s B A
    torch.testing.assert_close(tlora_transform(tl), torch.diag(g), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(tl.delta_weight(host.backend), dora.delta_weight(host.backend), atol=1e-5, rtol=1e-5)


def test_tlora_on_conv2d_transforms_output_channels():
    model, host, tl = adapted(torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), "tlora", r=2, alpha=2)
    w0 = host.base_layer.weight.detach()
    lora_kernel = tl.lora_B.weight.detach().reshape(6, 2) @ tl.lora_A.weight.detach().reshape(2, -1)
    kernel = (tlora_transform(tl) @ w0.reshape(6, -1) + lora_kernel).reshape(w0.shape)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), F.conv2d(x, kernel, host.base_layer.bias, 2, 1), atol=1e-5, rtol=1e-5)


def test_tlora_trainable_count_is_the_tt_cores_plus_the_residual():
    model, _, _ = adapted(torch.nn.Linear(12, 10), "tlora", r=3, transform_rank=2)
    assert n_trainable(model) == 2 * (2 * 2 + 5 * 5) + 3 * (12 + 10)  # rho (n1^2 + n2^2) + r (d_in + d_out)


# -- FLoRA (N-dim Tucker) -------------------------------------------------------------------------------------------
def tucker(core, out, inp, *kernel_factors):
    """``G x_1 U_out x_2 U_in x_3 U_k1 ...`` written as one einsum over explicit mode letters."""
    modes = "abcde"[: core.dim()]
    out_modes = "ABCDE"[: core.dim()]
    factors = [out, inp, *kernel_factors]
    spec = modes + "," + ",".join(f"{o}{m}" for o, m in zip(out_modes, modes)) + "->" + out_modes
    return torch.einsum(spec, core, *factors)


@pytest.mark.parametrize("conv,x", [
    (lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 9)),
    (lambda: torch.nn.Conv3d(3, 5, (2, 3, 3), padding=(0, 1, 1), dilation=(1, 2, 1)), torch.randn(2, 3, 4, 7, 7)),
])
def test_flora_n_update_is_the_tucker_product_and_keeps_the_kernel_shape(conv, x):
    model, host, fl = adapted(conv(), "flora-n", r=2, kernel_r=2, alpha=4)
    ks = [u.detach() for u in fl.flora_kernel]
    dense = tucker(fl.flora_core.detach(), fl.flora_out.detach(), fl.flora_in.detach(), *ks) * 2.0  # s = 4 / 2
    w0 = host.base_layer.weight.detach()
    assert dense.shape == w0.shape
    torch.testing.assert_close(fl.delta_weight(host.backend), dense, atol=1e-5, rtol=1e-5)
    conv_fn = F.conv2d if w0.dim() == 4 else F.conv3d
    base = host.base_layer
    expected = conv_fn(x, w0 + dense, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    b, a = fl.factors()
    torch.testing.assert_close((b @ a).reshape(w0.shape), dense, atol=1e-5, rtol=1e-5)


def test_flora_n_on_a_matrix_is_a_lora_with_a_core():
    model, host, fl = adapted(torch.nn.Linear(12, 10), "flora-n", r=3, alpha=3)
    u1, g, u2 = fl.flora_out.detach(), fl.flora_core.detach(), fl.flora_in.detach()
    torch.testing.assert_close(fl.delta_weight(host.backend), u1 @ g @ u2.t(), atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(model(x), host.base_layer(x) + x @ (u1 @ g @ u2.t()).t(), atol=1e-5, rtol=1e-5)


def test_flora_n_with_orthonormal_factors_preserves_the_core_norm():
    torch.manual_seed(0)
    model = lorakit.adapt(Net(torch.nn.Conv2d(4, 6, 3)), lorakit.build_config("flora-n", r=3, alpha=3,
                                                                               targets=["layer"]))
    fl = model.layer.adapters["default"]
    with torch.no_grad():
        fl.flora_core.normal_()
    delta = fl.delta_weight(model.layer.backend)
    torch.testing.assert_close(delta.norm(), fl.flora_core.detach().norm(), atol=1e-5, rtol=1e-5)


def test_flora_n_trainable_count_is_the_core_plus_the_factor_matrices():
    model, _, _ = adapted(torch.nn.Conv2d(4, 6, 3), "flora-n", r=2, kernel_r=2)
    assert n_trainable(model) == 2 * 2 * 2 * 2 + 6 * 2 + 4 * 2 + 2 * (3 * 2)  # core + U_out + U_in + U_k1, U_k2
    model, _, _ = adapted(torch.nn.Conv2d(4, 6, 3), "flora-n", r=8)  # ranks capped at (6, 4, 3, 3)
    assert n_trainable(model) == 6 * 4 * 3 * 3 + 6 * 6 + 4 * 4 + 2 * (3 * 3)


# -- CP-LoRA / CP-DoRA ----------------------------------------------------------------------------------------------
def cp_kernel(cp) -> torch.Tensor:
    a, b = cp.cp_out.detach(), cp.cp_in.detach()
    ks = [u.detach() for u in cp.cp_kernel]
    letters = "hwd"[: len(ks)]
    spec = "or,ir," + ",".join(f"{c}r" for c in letters) + "->oi" + letters
    return torch.einsum(spec, a, b, *ks) * cp.scale  # sum_i a_i o b_i o c_i o d_i ...


@pytest.mark.parametrize("conv,x", [
    (lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 9)),
    (lambda: torch.nn.Conv3d(3, 5, (2, 3, 3), padding=(0, 1, 1), dilation=(1, 2, 1)), torch.randn(2, 3, 4, 7, 7)),
])
def test_cp_lora_kernel_is_the_sum_of_outer_products_applied_without_forming_it(conv, x):
    model, host, cp = adapted(conv(), "cp-lora", r=3, alpha=6)
    dense = cp_kernel(cp)
    w0, base = host.base_layer.weight.detach(), host.base_layer
    assert dense.shape == w0.shape
    torch.testing.assert_close(cp.delta_weight(host.backend), dense, atol=1e-5, rtol=1e-5)
    conv_fn = F.conv2d if w0.dim() == 4 else F.conv3d
    expected = conv_fn(x, w0 + dense, base.bias, base.stride, base.padding, base.dilation)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    b, a = cp.factors()
    torch.testing.assert_close((b @ a).reshape(w0.shape), dense, atol=1e-5, rtol=1e-5)


def test_cp_lora_trainable_count_is_rank_times_the_mode_sizes():
    model, _, _ = adapted(torch.nn.Conv2d(4, 6, (3, 5)), "cp-lora", r=3)
    assert n_trainable(model) == 3 * (6 + 4 + 3 + 5)
    model, _, _ = adapted(torch.nn.Linear(12, 10), "cp-lora", r=3)
    assert n_trainable(model) == 3 * (10 + 12)


def test_cp_dora_is_magnitude_times_normalised_cp_direction():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    model, host, cp = adapted(conv, "cp-dora", r=3, alpha=3)
    w0, bias = host.base_layer.weight.detach().clone(), host.base_layer.bias.detach()
    v = w0 + cp_kernel(cp)
    expected_w = cp.magnitude.detach()[:, None, None, None] * v / v.reshape(6, -1).norm(dim=1)[:, None, None, None]
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(model(x), F.conv2d(x, expected_w, bias, padding=1), atol=1e-5, rtol=1e-5)
    lorakit.merge(model)
    torch.testing.assert_close(host.base_layer.weight, expected_w, atol=1e-5, rtol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(host.base_layer.weight, w0, atol=1e-6, rtol=1e-6)


def test_cp_dora_on_a_linear_layer_is_dora():
    model, host, cp = adapted(torch.nn.Linear(12, 10), "cp-dora", r=3, alpha=3)
    dora_model = lorakit.adapt(Net(host.base_layer), lorakit.DoraConfig(r=3, alpha=3, targets=["layer"]))
    dora = dora_model.layer.adapters["default"]
    with torch.no_grad():
        dora.lora_B.weight.copy_(cp.cp_out)
        dora.lora_A.weight.copy_(cp.cp_in.t())
        dora.lora_magnitude_vector.copy_(cp.magnitude)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(cp(x, host.base_layer(x), host.backend), dora(x, host.base_layer(x), host.backend),
                               atol=1e-5, rtol=1e-5)


# -- Block-LoRA -----------------------------------------------------------------------------------------------------
def test_block_lora_equals_lora_with_concatenated_blocks_and_a_repeated_shared_down_projection():
    model, host, bl = adapted(torch.nn.Linear(12, 10), "block-lora", r=6, n=3, alpha=6)
    a_s, b_sum = bl.block_A.detach(), bl.block_B.detach()  # (2, 12), (10, 2): B = B_1 + B_2 + B_3 stored once
    blocks = [torch.randn_like(b_sum), torch.randn_like(b_sum)]
    blocks.append(b_sum - blocks[0] - blocks[1])  # any three blocks with that sum
    b_full = torch.cat(blocks, dim=1)  # [B_1 B_2 B_3]: (10, 6)
    a_full = torch.cat([a_s] * 3, dim=0)  # [A_s; A_s; A_s]: (6, 12)
    dense = b_full @ a_full  # s = 6 / 6
    torch.testing.assert_close(bl.delta_weight(host.backend), dense, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(model(x), host.base_layer(x) + F.linear(x, dense), atol=1e-5, rtol=1e-5)
    b, a = bl.factors()
    torch.testing.assert_close(b @ a, dense, atol=1e-5, rtol=1e-5)


def test_block_lora_trainable_count_and_block_rule():
    model, _, _ = adapted(torch.nn.Linear(12, 10), "block-lora", r=6, n=3)
    assert n_trainable(model) == (6 // 3) * (10 + 12)  # (r/n)(d_out + d_in): the n equal B_i are stored as their sum
    with pytest.raises(lorakit.ConfigError, match="dividing r=6"):
        lorakit.build_config("block-lora", r=6, n=4)


# -- configs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,field,value", [
    ("hydra", "r", 0), ("hydra", "lora_bias", True), ("tlora", "transform_rank", 0), ("tlora", "transform_factor", 0),
    ("tlora", "transform_init_std", -1.0), ("flora-n", "r", 0), ("flora-n", "kernel_r", 0), ("flora-n", "alpha", 0),
    ("cp-lora", "r", -1), ("cp-dora", "alpha", -2.0), ("wara", "r", 0), ("loca", "n", 0), ("loca", "alpha", 0.0),
    ("block-lora", "n", 0), ("block-lora", "r", 0),
])
def test_bad_config_values_name_the_field(method, field, value):
    with pytest.raises(lorakit.ConfigError, match=f"{field}="):
        lorakit.adapt(Net(torch.nn.Linear(12, 10)), lorakit.build_config(method, targets=["layer"], **{field: value}))
