"""Composing several LoRAs on one model without retraining them (mostly multi-concept diffusion), one module each:

* :mod:`~lorakit.compose.cached` -- CMLoRA: frequency-ordered, cached multi-LoRA fusion while sampling;
* :mod:`~lorakit.compose.contrastive` -- CLoRA: contrastive cross-attention latent updates, attention-mask fusion;
* :mod:`~lorakit.compose.gated_fusion` -- AutoLoRA: LoRA retrieval by weight encoding, gates per layer and timestep;
* :mod:`~lorakit.compose.lion` -- LiON-LoRA: per-layer orthogonality / norms of contributions, norm consistency;
* :mod:`~lorakit.compose.break_for_make` -- Break-for-Make: content / style adapters in orthogonal subspaces, made
  into one.

All of them weigh adapters through :func:`lorakit.mix` (weighted routing) or plain adapters; none touches the base.
"""
from . import gated_fusion  # noqa: F401  (registers the "gated_fusion" router kind for load_router)
