"""Client-level DP (DP-FedAvg) and FedProx: the mechanisms checked against their formulas, then end to end."""
import math

import pytest
import torch
from test_federated import config, rounds, setup  # noqa: F401 - the shared fixture and helpers

from lorakit.errors import ConfigError
from lorakit.federated import PrivacyConfig
from lorakit.federated.client import local_train
from lorakit.federated.client_dp import clip_update, privatise, update_norm
from lorakit.federated.layers import trained_tensors
from lorakit.federated.run import federate
from lorakit.federated.server import FederatedServer
from lorakit.federated.setup import federation


def layers(*shapes: tuple[int, ...], scale: float = 1.0) -> dict:
    return {f"l{i}": {"B": torch.randn(shape) * scale} for i, shape in enumerate(shapes)}


def test_updates_are_clipped_jointly_over_layers_and_small_ones_left_alone() -> None:
    reference = layers((8, 4), (6, 4))
    big = {p: {r: t + 3.0 for r, t in roles.items()} for p, roles in reference.items()}
    clipped = clip_update(big, reference, 0.5)
    assert update_norm(clipped, reference) == pytest.approx(0.5, rel=1e-5)
    direction = [(clipped[p]["B"] - reference[p]["B"]) / (big[p]["B"] - reference[p]["B"]) for p in reference]
    assert all(torch.allclose(d, direction[0][0, 0]) for d in direction)  # one factor for every layer
    small = {p: {r: t + 1e-3 for r, t in roles.items()} for p, roles in reference.items()}
    assert all(torch.equal(clip_update(small, reference, 0.5)[p]["B"], small[p]["B"]) for p in reference)


def test_noise_through_the_uniform_mean_has_std_sigma_c_over_k() -> None:
    reference = {"l": {"B": torch.zeros(200, 100)}}
    uploads = [{"l": {"B": torch.zeros(200, 100)}} for _ in range(4)]
    noisy = privatise(uploads, reference, clip=0.5, sigma=2.0, generator=torch.Generator().manual_seed(0))
    mean = sum(u["l"]["B"] for u in noisy) / 4
    assert float(mean.std()) == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    assert all(torch.equal(u["l"]["B"], torch.zeros(200, 100)) for u in noisy[1:])


def test_client_level_dp_end_to_end_reports_its_epsilon(setup, tmp_path) -> None:  # noqa: F811
    cfg = config(setup, tmp_path, aggregator="fed-sb", client_privacy=PrivacyConfig(noise_multiplier=1.0,
                                                                                    max_grad_norm=0.05))
    federate(cfg)
    log = rounds(tmp_path)
    assert 0 < log[0]["client_epsilon"] < log[1]["client_epsilon"] and all(r["kept"] == [0, 1, 2] for r in log)


@pytest.mark.parametrize("name", ["flora", "lora-fair"])
def test_client_level_dp_refuses_aggregators_that_release_each_update(setup, tmp_path, name) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match="client_privacy"):
        config(setup, tmp_path, aggregator=name, client_privacy=PrivacyConfig(noise_multiplier=1.0))


def test_fedprox_keeps_the_local_update_closer_to_the_global_adapter(setup, tmp_path) -> None:  # noqa: F811
    distances = []
    for mu in (0.0, 100.0):
        fed = federation(config(setup, tmp_path, aggregator="ffa-lora", prox_mu=mu, local_steps=6))
        server = FederatedServer(fed)
        result = local_train(fed, 0, 1, server.payload(), {})
        start = {p: {r: server.state[p][r] for r in roles} for p, roles in result.upload.items()}
        distances.append(math.sqrt(sum(float(((t - start[p][r]) ** 2).sum())
                                       for p, roles in result.upload.items() for r, t in roles.items())))
    assert 0 < distances[1] < 0.5 * distances[0]
    assert trained_tensors(fed.model, "default").keys() == result.upload.keys()
