"""Federated fine-tuning of adapters on Flower: aggregators (FedAvg, FFA-LoRA, Fed-SB, FLoRA, FedSVD, LoRA-FAIR),
DP-SGD clients with Opacus, fault screening, and the ``lorakit federate`` runner (in-process or Flower simulation).

Flower and Opacus are the ``[federated]`` extra; importing this package needs them.
"""
from .aggregators import AGGREGATORS, Aggregator, LayerResult, LayerRound, aggregation_error, ideal_update
from .partition import partition
from .privacy import PrivacyConfig, PrivacyLedger
from .setup import FederationConfig

__all__ = ["AGGREGATORS", "Aggregator", "FederationConfig", "LayerResult", "LayerRound", "PrivacyConfig",
           "PrivacyLedger", "aggregation_error", "federate", "ideal_update", "partition"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: the runner imports Flower's apps
    if name == "federate":
        from .run import federate

        return federate
    raise AttributeError(name)
