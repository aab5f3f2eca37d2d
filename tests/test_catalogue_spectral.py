"""Spectral-domain catalogue methods (METHODS.md section A): WaRA (wavelet) and LoCA (inverse DCT with learned
locations): updates checked against transforms built independently here, trainable counts, and LoCA's location
learning (probes, moves, data-parallel agreement)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_catalogue_a import adapted, n_trainable
from zoo import Net

import lorakit
from lorakit.hooks import training_hooks


# -- WaRA -----------------------------------------------------------------------------------------------------------
def haar_matrix(d: int, dtype=torch.float32) -> torch.Tensor:
    """The one-level orthonormal Haar analysis matrix, written from its definition."""
    h = torch.zeros(d, d, dtype=dtype)
    for i in range(d // 2):
        h[i, 2 * i] = h[i, 2 * i + 1] = 2 ** -0.5
        h[d // 2 + i, 2 * i], h[d // 2 + i, 2 * i + 1] = 2 ** -0.5, -(2 ** -0.5)
    return h


def test_wara_update_is_the_inverse_haar_of_a_subband_low_rank_matrix():
    model, host, wara = adapted(torch.nn.Linear(12, 10), "wara", r=2, alpha=4)
    a, b = wara.wara_A.detach(), wara.wara_B.detach()  # (2, 2, r, 6), (2, 2, 5, r)
    z = torch.cat([torch.cat([b[o, c] @ a[o, c] for c in range(2)], dim=1) for o in range(2)], dim=0)  # (10, 12)
    h_out, h_in = haar_matrix(10), haar_matrix(12)
    dense = 2.0 * h_out.t() @ z @ h_in  # s * IDWT2(Z)
    torch.testing.assert_close(wara.delta_weight(host.backend), dense, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(model(x), host.base_layer(x) + F.linear(x, dense), atol=1e-5, rtol=1e-5)
    b_eff, a_eff = wara.factors()
    assert b_eff.shape == (10, 8) and a_eff.shape == (8, 12)
    torch.testing.assert_close(b_eff @ a_eff, dense, atol=1e-5, rtol=1e-5)


def test_haar_is_exactly_invertible_and_wara_reaches_rank_4r():
    from lorakit.methods.wara import haar, inverse_haar

    m = torch.randn(6, 16, dtype=torch.float64)
    torch.testing.assert_close(inverse_haar(haar(m)), m, atol=1e-12, rtol=0)
    torch.testing.assert_close(haar(m).flatten(-2), m @ haar_matrix(16, torch.float64).t(), atol=1e-12, rtol=0)
    _, host, wara = adapted(torch.nn.Linear(32, 32), "wara", r=2)
    assert torch.linalg.matrix_rank(wara.delta_weight(host.backend)) == 8  # 4 r > r


def test_wara_refuses_odd_sizes_and_counts_four_subband_factorisations():
    with pytest.raises(lorakit.ConfigError, match="even d_in"):
        lorakit.adapt(Net(torch.nn.Linear(7, 10)), lorakit.build_config("wara", targets=["layer"]))
    model, _, _ = adapted(torch.nn.Linear(12, 10), "wara", r=3)
    assert n_trainable(model) == 4 * 3 * (12 // 2 + 10 // 2)  # 4 sub-bands x r (d_in / 2 + d_out / 2)


# -- LoCA -----------------------------------------------------------------------------------------------------------
def dct_matrix_by_fft(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix computed column by column with an FFT (Makhoul's even extension), float64."""
    eye = torch.eye(n, dtype=torch.float64)
    spectrum = torch.fft.fft(torch.cat((eye, eye.flip(1)), dim=1), dim=1)[:, :n]  # (n inputs, n freqs)
    k = torch.arange(n, dtype=torch.float64)
    coeffs = (spectrum * torch.exp(-1j * math.pi * k / (2 * n))).real  # 2 sum_t x_t cos(pi k (2t+1) / 2n)
    norm = torch.full((n,), (2 * n) ** -0.5, dtype=torch.float64)
    norm[0] = (4 * n) ** -0.5
    return (coeffs * norm).t()  # rows = frequencies


def test_loca_update_is_the_inverse_dct_of_its_sparse_spectrum():
    model, host, loca = adapted(torch.nn.Linear(12, 10), "loca", n=20, alpha=3.0)
    loc = loca.loca_locations
    assert len({tuple(p) for p in loc.tolist()}) == 20, "locations must be distinct"
    spectrum = torch.zeros(10, 12, dtype=torch.float64)
    spectrum[loc[:, 0], loc[:, 1]] = loca.loca_spectrum.detach().double()
    c_out, c_in = dct_matrix_by_fft(10), dct_matrix_by_fft(12)
    torch.testing.assert_close(c_out @ c_out.t(), torch.eye(10, dtype=torch.float64))
    dense = 3.0 * c_out.t() @ spectrum @ c_in  # alpha * iDCT2(S)
    delta = loca.delta_weight(host.backend).double()
    torch.testing.assert_close(delta, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.norm(), 3.0 * spectrum.norm(), atol=1e-5, rtol=1e-5)  # orthonormal DCT
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(model(x), host.base_layer(x) + F.linear(x, dense.float()), atol=1e-5, rtol=1e-5)


def test_loca_one_hot_spectrum_is_an_outer_product_of_dct_basis_vectors():
    _, host, loca = adapted(torch.nn.Linear(12, 10), "loca", n=1)
    with torch.no_grad():
        loca.loca_locations.copy_(torch.tensor([[7, 11]]))
        loca.loca_spectrum.fill_(1.0)
    expected = torch.outer(dct_matrix_by_fft(10)[7], dct_matrix_by_fft(12)[11])
    torch.testing.assert_close(loca.delta_weight(host.backend).double(), expected, atol=1e-6, rtol=1e-6)


def test_loca_basis_stays_orthonormal_at_high_frequencies():
    from lorakit.methods.loca import dct_basis

    rows = dct_basis(torch.arange(3000, 3008), 3008, torch.float64)
    torch.testing.assert_close(rows @ rows.t(), torch.eye(8, dtype=torch.float64), atol=1e-9, rtol=0)


def test_loca_trains_exactly_n_values_and_refuses_too_many():
    model, _, _ = adapted(torch.nn.Linear(12, 10), "loca", n=37)
    assert n_trainable(model) == 37
    with pytest.raises(lorakit.ConfigError, match="n=121"):
        lorakit.adapt(Net(torch.nn.Linear(12, 10)), lorakit.build_config("loca", n=121, targets=["layer"]))


def test_loca_probes_read_the_dct_of_the_weight_gradient_without_changing_the_output():
    model, host, loca = adapted(torch.nn.Linear(12, 10), "loca", n=6, alpha=2.0)
    x, target = torch.randn(4, 5, 12), torch.randn(4, 5, 10)
    out = model(x).detach()
    loca.start_probe()
    probed = model(x)
    torch.testing.assert_close(probed, out, atol=0, rtol=0)
    (probed - target).pow(2).sum().backward()
    probe_locations, probe_values = loca._probe
    # oracle: dL/dW of the same loss on the dense weight, taken to the DCT domain by FFT-built DCT matrices
    w = (host.base_layer.weight.detach() + loca.delta_weight(host.backend).detach()).requires_grad_()
    (F.linear(x, w, host.base_layer.bias) - target).pow(2).sum().backward()
    spectrum_grad = dct_matrix_by_fft(10) @ w.grad.double() @ dct_matrix_by_fft(12).t()
    expected = 2.0 * spectrum_grad[probe_locations[..., 0], probe_locations[..., 1]]
    torch.testing.assert_close(probe_values.grad.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(probe_values.grad[:, 0], loca.loca_spectrum.grad, atol=1e-4, rtol=1e-4)


def test_loca_location_step_moves_a_coefficient_towards_the_target_frequency():
    from lorakit.hooks import HookList
    from lorakit.methods.loca import LocaLocations

    torch.manual_seed(0)
    model = lorakit.adapt(Net(torch.nn.Linear(12, 10)), lorakit.build_config("loca", n=1, targets=["layer"]))
    host, loca = model.layer, model.layer.adapters["default"]
    with torch.no_grad():
        loca.loca_locations.copy_(torch.tensor([[4, 5]]))
        loca.loca_spectrum.fill_(1.0)
    x = torch.linalg.qr(torch.randn(200, 12))[0]  # X^T X = I: the spectrum gradient is exactly 2 (S - S*)
    target_delta = torch.outer(dct_matrix_by_fft(10)[5], dct_matrix_by_fft(12)[5]).float()  # S* one-hot at (5, 5)
    target = host.base_layer(x) + x @ target_delta.t()
    hooks = HookList([LocaLocations("default", every=1)])
    optimizer = torch.optim.SGD([loca.loca_spectrum], lr=0.0)  # values fixed: only the location may change
    hooks.before_forward(model, 0)
    (model(x) - target).pow(2).sum().backward()
    hooks.before_step(model, optimizer, 0)
    assert loca.loca_locations.tolist() == [[5, 5]] and hooks.hooks[0].moved == 1 and not loca.probing
    torch.testing.assert_close(loca.delta_weight(host.backend), target_delta, atol=1e-6, rtol=1e-6)


def test_loca_relocation_never_stacks_two_coefficients_on_one_frequency():
    _, host, loca = adapted(torch.nn.Linear(12, 10), "loca", n=60)
    x = torch.randn(8, 12)
    moved = 0
    for _ in range(5):
        loca.start_probe()
        loca(x, host.base_layer(x), host.backend).pow(2).sum().backward()
        moved += loca.relocate()
    assert moved > 0 and len({tuple(p) for p in loca.loca_locations.tolist()}) == 60


def test_loca_asks_for_its_location_hook_only_when_locations_move():
    hooks = training_hooks(lorakit.build_config("loca", relocate_every=5), "default", 100)
    assert [(type(h).__name__, h.every, h.until) for h in hooks] == [("LocaLocations", 5, 50)]
    assert training_hooks(lorakit.build_config("loca", relocate_every=0), "default", 100) == []


def _seeded_linear() -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(12, 10)


def _relocate_on_rank(rank: int, port: int, x: torch.Tensor, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model, host, loca = adapted(_seeded_linear(), "loca", n=30)
        loca.start_probe()
        model(x[rank::2]).pow(2).sum().backward()  # each rank its half of the batch
        loca.relocate()
        torch.save(loca.loca_locations, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_loca_relocation_under_data_parallel_matches_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    x = torch.randn(8, 5, 12)
    torch.multiprocessing.spawn(_relocate_on_rank, args=(port, x, str(tmp_path)), nprocs=2)
    model, host, loca = adapted(_seeded_linear(), "loca", n=30)
    start = loca.loca_locations.clone()
    loca.start_probe()
    model(x).pow(2).sum().backward()
    loca.relocate()
    assert not torch.equal(loca.loca_locations, start)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), loca.loca_locations)
