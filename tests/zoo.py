"""Tiny models for tests: one of each supported host layer type, and small transformers models; the config variants
(forms) each method is tested in."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.config import AdapterConfig
from lorakit.methods.base import METHODS, Capabilities


class Net(nn.Module):
    """Wraps one layer as ``self.layer`` so configs can target ``["layer"]``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# name -> (layer factory, input factory for a batch of n rows)
LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "linear": (lambda: nn.Linear(12, 10), lambda n: torch.randn(n, 5, 12)),
    "gpt2_conv1d": (lambda: Conv1D(10, 12), lambda n: torch.randn(n, 5, 12)),
    "conv1d": (lambda: nn.Conv1d(3, 6, 3, padding=1), lambda n: torch.randn(n, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1), lambda n: torch.randn(n, 3, 8, 8)),
    "conv3d": (lambda: nn.Conv3d(2, 4, (1, 3, 3)), lambda n: torch.randn(n, 2, 3, 6, 6)),
    "embedding": (lambda: nn.Embedding(20, 8, padding_idx=0), lambda n: torch.randint(0, 20, (n, 6))),
}

KIND = {"linear": "linear", "gpt2_conv1d": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv",
        "embedding": "embedding"}


def net(layer_name: str) -> tuple[Net, torch.Tensor]:
    make_layer, make_input = LAYERS[layer_name]
    torch.manual_seed(0)
    model = Net(make_layer())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, make_input(4)


def forms(method: str) -> list[str | None]:
    """The variants of ``method`` to test: ``None`` (its default config, ``form`` not given) first, then every other
    value of its ``form`` field (a config class with several forms lists them in ``FORMS``)."""
    config_cls = METHODS.get(method)[1]
    default = next((f.default for f in dataclasses.fields(config_cls) if f.name == "form"), None)
    return [None] + [form for form in getattr(config_cls, "FORMS", ()) if form != default]


def form_config(method: str, form: str | None) -> AdapterConfig:
    """``method``'s config on ``Net``'s layer: the default one (``form=None``) or the one of ``form``."""
    return lorakit.build_config(method, targets=["layer"], **({} if form is None else {"form": form}))


def variant_id(method: str, form: str | None, *rest: str) -> str:
    """A test id: ``lora-linear`` for a default config, ``mosa-parallel-linear`` for another form."""
    return "-".join(part for part in (method, form, *rest) if part)


@functools.cache
def built_capabilities(method: str, form: str | None) -> Capabilities:
    """The capabilities of the adapter ``form_config(method, form)`` builds on a linear layer (every method supports
    one): what that variant declares, which the registered class's capabilities need not be (a form may build
    another adapter class, or set its own)."""
    model, _ = net("linear")
    lorakit.adapt(model, form_config(method, form))
    return model.layer.adapters["default"].capabilities


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_unet(seed: int = 0) -> nn.Module:
    """A ~50k-parameter ``UNet2DConditionModel`` (latents ``(B, 4, 8, 8)``, text states ``(B, T, 12)``), eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)
    return unet.eval()


def perturb(module: nn.Module, std: float = 0.3) -> None:
    """Give every adapter tensor a non-trivial value (so properties are not checked at a zero update)."""
    with torch.no_grad():
        for host in lorakit.inject.hosts(module):
            for adapter in host.adapters.values():
                for p in adapter.parameters():
                    p.add_(torch.randn_like(p) * std)
        for shared in lorakit.inject.shared_states(module).values():  # pools / factors shared by all layers
            for p in shared.parameters():
                p.add_(torch.randn_like(p) * std)
