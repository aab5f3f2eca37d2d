"""Federations end to end on a tiny model: every aggregator through the Flower apps (in-process grid and Flower's
simulation engine), fault handling, resume, traffic and privacy accounting."""
import json
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import load_file
from test_cli import make_model_folder, sentiment_rows, write_jsonl

from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.federated import AGGREGATORS, FederationConfig, PrivacyConfig, partition
from lorakit.federated.grid import InProcessGrid, server_identity
from lorakit.federated.layers import layer_tensors
from lorakit.federated.run import federate
from lorakit.federated.setup import federation
from lorakit.train.options import Options


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fed")
    return make_model_folder(root / "model"), write_jsonl(root / "data.jsonl", sentiment_rows(96))


def config(setup, out: Path, **fields) -> FederationConfig:
    model, data = setup
    given = {"model": str(model), "data": str(data), "task": "classification", "rank": 4, "alpha": 8.0, "lr": 5e-3,
             "batch_size": 4, "eval_size": 16, "eval_batch_size": 16, "output": str(out), "overwrite": True}
    opts = Options(**{**given, **fields.pop("options", {})})
    return FederationConfig(options=opts, **{"clients": 3, "rounds": 2, "local_steps": 2, "server_examples": 8,
                                             "partition": "iid", **fields})


def rounds(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "round"]


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_every_aggregator_runs_through_the_flower_apps_and_states_its_exactness(setup, tmp_path, name) -> None:
    ranks = (2, 4, 3) if AGGREGATORS.get(name).fresh else ()
    result = federate(config(setup, tmp_path, aggregator=name, client_ranks=ranks))
    log = rounds(tmp_path)
    assert [r["round"] for r in log] == [1, 2] and all(r["kept"] == [0, 1, 2] for r in log)
    error = log[-1]["aggregation_error"]
    assert error < 1e-5 if AGGREGATORS.get(name).exact else error > 1e-4
    assert (tmp_path / "adapter_model.safetensors").is_file() and "accuracy" in result["after"]


def test_eight_clients_non_iid_in_process(setup, tmp_path) -> None:
    federate(config(setup, tmp_path, aggregator="ffa-lora", clients=8, rounds=1, partition="dirichlet:0.3"))
    (record,) = rounds(tmp_path)
    assert record["kept"] == list(range(8)) and record["aggregation_error"] < 1e-5


def test_faulty_clients_are_excluded_with_reasons_and_the_round_completes(setup, tmp_path) -> None:
    faults = {0: "drop", 1: "nan", 2: "shape", 3: "huge"}
    federate(config(setup, tmp_path, aggregator="fedavg", clients=6, rounds=1, inject_faults=faults))
    (record,) = rounds(tmp_path)
    reasons = {e["client"]: e["reason"] for e in record["excluded"]}
    assert record["kept"] == [4, 5] and record["applied"]
    assert "dropped out" in reasons.get(0, "") or any("dropped out" in r for r in reasons.values())
    assert "non-finite" in reasons[1] and "shape" in reasons[2] and "median" in reasons[3]


def test_a_round_with_too_few_valid_clients_leaves_the_global_adapter_unchanged(setup, tmp_path) -> None:
    cfg = config(setup, tmp_path, aggregator="ffa-lora", clients=3, rounds=1, min_clients=2,
                 inject_faults={0: "nan", 1: "shape"})
    federate(cfg)
    (record,) = rounds(tmp_path)
    assert not record["applied"] and record["kept"] == [2]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(float(t.abs().max()) == 0 for k, t in saved.items() if "lora_B" in k)  # B still its zero init


def test_a_resumed_federation_ends_where_an_uninterrupted_one_does(setup, tmp_path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    federate(config(setup, straight, aggregator="fedsvd", rounds=3))
    federate(config(setup, split, aggregator="fedsvd", rounds=2))
    resumed = config(setup, split, aggregator="fedsvd", rounds=3, options={"overwrite": False, "resume": True})
    federate(resumed)
    assert [r["round"] for r in rounds(split)] == [1, 2, 3]
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(split / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fed_sb_traffic_is_r_squared_per_layer_whatever_the_number_of_clients(setup, tmp_path) -> None:
    per_client = []
    for clients in (2, 4):
        federate(config(setup, tmp_path / str(clients), aggregator="fed-sb", clients=clients, rounds=2))
        log = rounds(tmp_path / str(clients))
        per_client.append(set(log[0]["up_bytes"].values()))
        assert log[1]["down_changed_bytes"] == layers * 4 * 4 * 4  # round 2: a stateful client needs only R
        assert log[0]["down_changed_bytes"] > 10 * log[1]["down_changed_bytes"]  # round 1: B and A from the server
    assert per_client[0] == per_client[1] == {layers * 4 * 4 * 4}  # r x r float32


layers = 2 * 7  # the tiny model: two blocks, seven linear layers each


def test_ffa_lora_with_dp_noises_b_only_and_reports_the_privacy_spent(setup, tmp_path) -> None:
    cfg = config(setup, tmp_path, aggregator="ffa-lora", privacy=PrivacyConfig(noise_multiplier=1.0))
    federate(cfg)
    log = rounds(tmp_path)
    assert 0 < log[0]["epsilon"] < log[1]["epsilon"]
    saved = load_file(tmp_path / "adapter_model.safetensors")
    b = [t for k, t in saved.items() if "lora_B" in k]
    assert all(float(t.abs().max()) > 0 for t in b)
    assert log[0]["up_bytes"]["0"] == sum(t.numel() * 4 for t in b)  # only B travels
    fed = federation(cfg)
    fed.fresh_adapter()  # what every client rebuilds from the shared seed
    seed_a = {path: roles["A"] for path, roles in layer_tensors(fed.model, "default").items()}
    for path, a in seed_a.items():
        assert torch.equal(saved[f"base_model.model.{path}.lora_A.weight"], a)  # the noise never reached A


def test_in_process_grid_drops_a_reply_that_misses_the_timeout() -> None:
    app = ClientApp()

    @app.train()
    def train(message: Message, context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"x": 1})}), reply_to=message)

    ticks = iter([0.0, 0.5, 10.0, 30.0])  # client 0 takes 0.5 s, client 1 takes 20 s
    grid = InProcessGrid(app, 2, clock=lambda: next(ticks))
    with server_identity():
        messages = [Message(RecordDict(), node, "train") for node in (0, 1)]
        replies = list(grid.send_and_receive(messages, timeout=5.0))
    assert [r.metadata.src_node_id for r in replies] == [0]


def test_flower_simulation_engine_runs_two_clients(setup, tmp_path) -> None:
    federate(config(setup, tmp_path, aggregator="ffa-lora", clients=2, rounds=1, engine="flower"))
    (record,) = rounds(tmp_path)
    assert record["kept"] == [0, 1] and record["aggregation_error"] < 1e-5


def test_partitions_cover_every_example_once_and_dirichlet_skews_labels() -> None:
    labels = [i % 3 for i in range(300)]
    for scheme in ("iid", "dirichlet:0.1", "dirichlet:100"):
        shards = partition(labels, 6, scheme, seed=1)
        assert sorted(i for s in shards for i in s) == list(range(300)) and all(shards)
    skew = [max(sum(labels[i] == c for i in s) for c in range(3)) / len(s) for s in partition(labels, 6,
                                                                                             "dirichlet:0.1", 1)]
    even = [max(sum(labels[i] == c for i in s) for c in range(3)) / len(s) for s in partition(labels, 6, "iid", 1)]
    assert sum(skew) / 6 > 0.7 > 0.45 > sum(even) / 6


@pytest.mark.parametrize("fields, message", [
    ({"partition": "zipf"}, "dirichlet:ALPHA"), ({"aggregator": "avg"}, "available"),
    ({"aggregator": "fedavg", "client_ranks": (2, 4)}, "stacks"), ({"min_clients": 9}, "between"),
    ({"inject_faults": {0: "explode"}}, "drop"),
])
def test_bad_federation_settings_are_refused_clearly(setup, tmp_path, fields, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config(setup, tmp_path, **fields)


def test_cli_federate_and_its_errors(setup, tmp_path, capsys) -> None:
    model, data = setup
    args = ["federate", "--model", str(model), "--data", str(data), "--task", "classification", "--clients", "2",
            "--rounds", "1", "--local-steps", "1", "--rank", "2", "--server-examples", "4", "--eval-size", "8",
            "--output", str(tmp_path / "run"), "--aggregator", "fed-sb", "--method-option",
            'init_options={"lr": 1e-5}']
    assert main(args) == 0
    assert "round 1/1" in capsys.readouterr().out
    settings = json.loads((tmp_path / "run" / "run.json").read_text())
    assert settings["options"]["method_options"] == {"init_options": {"lr": 1e-5}}
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite", "--inject-faults", "x=nan"]) == 2 and "cK" in capsys.readouterr().err
