"""``lorakit federate``: federated fine-tuning of an adapter over simulated clients (needs the ``[federated]`` extra).

    lorakit federate --clients 8 --rounds 20 --aggregator fed-sb --partition dirichlet:0.3
    lorakit federate --aggregator ffa-lora --dp-epsilon 8          # DP-SGD on every client
    lorakit federate --engine flower --clients 2                     # Flower's simulation engine (Ray)
"""
from __future__ import annotations

import argparse
import importlib.util

from ..errors import ConfigError
from .options import KeyValue, add_data_args, add_model_args, options_from

AGGREGATOR_NAMES = ("fedavg", "ffa-lora", "fed-sb", "flora", "fedsvd", "lora-fair")


def federate_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    add_data_args(parser)
    group = parser.add_argument_group("federation")
    group.add_argument("--aggregator", default="fedavg", choices=AGGREGATOR_NAMES,
                       help="server aggregation (it decides the adapter clients train: lora, lora-fa or lora-xs)")
    group.add_argument("--clients", type=int, default=8)
    group.add_argument("--rounds", type=int, default=10)
    group.add_argument("--local-steps", type=int, default=10, help="optimizer steps per client per round")
    group.add_argument("--partition", default="dirichlet:0.3", help="iid or dirichlet:ALPHA (non-IID over labels)")
    group.add_argument("--fraction", type=float, default=1.0, help="share of the clients sampled each round")
    group.add_argument("--min-clients", type=int, default=2,
                       help="a round with fewer valid uploads leaves the global adapter unchanged")
    group.add_argument("--client-ranks", type=lambda t: tuple(int(r) for r in t.split(",")), default=(),
                       help="flora: per-client ranks, cycled over the clients (e.g. 4,8,16)")
    group.add_argument("--aggregator-option", dest="aggregator_options", action=KeyValue, default={},
                       metavar="KEY=VALUE", help="fedsvd: every=K (re-basis period); lora-fair: lam=L")
    group.add_argument("--prox-mu", type=float, default=0.0, help="FedProx: (mu/2)||theta - theta_global||^2")
    group.add_argument("--server-examples", type=int, default=64,
                       help="training examples the server keeps for a data-driven init (fed-sb's LoRA-SB)")
    group.add_argument("--max-update-ratio", type=float, default=100.0,
                       help="exclude an update this many times the round's median norm")
    group.add_argument("--client-timeout", type=float, default=600.0, help="seconds before a client's reply is "
                                                                             "dropped")
    group.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                       help="inprocess: clients one after another in this process; flower: Flower's simulation "
                            "engine (Ray actors)")
    group.add_argument("--inject-faults", dest="inject_faults", action=KeyValue, default={}, metavar="cK=KIND",
                       help="drill: client K misbehaves (drop, nan, shape, huge), e.g. c3=nan")
    privacy = parser.add_argument_group("differential privacy (DP-SGD on every client, Opacus)")
    privacy.add_argument("--dp-epsilon", type=float, help="target epsilon after all rounds (picks the noise)")
    privacy.add_argument("--dp-noise", type=float, help="noise multiplier sigma (instead of --dp-epsilon)")
    privacy.add_argument("--dp-clip", type=float, default=1.0, help="per-example clipping norm C")
    privacy.add_argument("--dp-delta", type=float, default=1e-5)
    privacy.add_argument("--client-dp-noise", type=float, help="client-level DP (DP-FedAvg on the server): noise "
                                                               "multiplier sigma on the mean of clipped updates")
    privacy.add_argument("--client-dp-epsilon", type=float, help="client-level DP: target epsilon after all rounds")
    privacy.add_argument("--client-dp-clip", type=float, default=0.1, help="client-level DP: update clipping norm")
    train = parser.add_argument_group("training")
    train.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--alpha", type=float, default=32.0)
    train.add_argument("--targets", default="all-linear")
    train.add_argument("--method-option", dest="method_options", action=KeyValue, default={}, metavar="KEY=VALUE",
                       help="another config field of the clients' method, e.g. init_options='{\"lr\": 1e-5}' for "
                            "fed-sb's LoRA-SB initialisation")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output", help="run folder (default runs/federate-<time>)")
    train.add_argument("--resume", action="store_true", help="continue the federation in --output after its last "
                                                             "round")
    train.add_argument("--overwrite", action="store_true", help="replace the run in --output")


def config_from(args: argparse.Namespace):  # noqa: ANN201 - FederationConfig, imported with the extra
    from ..federated import FederationConfig, PrivacyConfig

    privacy = None
    if args.dp_epsilon is not None or args.dp_noise is not None:
        privacy = PrivacyConfig(noise_multiplier=args.dp_noise, max_grad_norm=args.dp_clip,
                                target_epsilon=args.dp_epsilon, delta=args.dp_delta)
    client_privacy = None
    if args.client_dp_noise is not None or args.client_dp_epsilon is not None:
        client_privacy = PrivacyConfig(noise_multiplier=args.client_dp_noise, max_grad_norm=args.client_dp_clip,
                                       target_epsilon=args.client_dp_epsilon, delta=args.dp_delta)
    faults = {}
    for key, kind in args.inject_faults.items():
        if not (key.startswith("c") and key[1:].isdigit()):
            raise ConfigError(f"--inject-faults {key}={kind}: write the client as cK (e.g. c3={kind})")
        faults[int(key[1:])] = str(kind)
    return FederationConfig(
        options=options_from(args), aggregator=args.aggregator, clients=args.clients, rounds=args.rounds,
        local_steps=args.local_steps, partition=args.partition, fraction=args.fraction, min_clients=args.min_clients,
        client_ranks=args.client_ranks, aggregator_options=args.aggregator_options, prox_mu=args.prox_mu,
        privacy=privacy, client_privacy=client_privacy, server_examples=args.server_examples,
        max_update_ratio=args.max_update_ratio, client_timeout=args.client_timeout, engine=args.engine,
        inject_faults=faults)


def run_federate(args: argparse.Namespace) -> int:
    missing = [m for m in ("flwr", "opacus") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"lorakit federate needs {' and '.join(missing)}: pip install 'lorakit[federated]'")
    from ..federated.run import federate

    federate(config_from(args))
    return 0
