"""Mixtures of LoRA experts built on weighted routing (METHODS.md section F), one module per mechanism:

* :mod:`~lorakit.mixtures.block` -- FFN expert blocks: MixLoRA, LLaVA-MoLE (top-1), MoLA (per-layer expert counts);
* :mod:`~lorakit.mixtures.xlora` -- X-LoRA's scalings head (two passes), equal to PEFT's ``XLoraModel``;
* :mod:`~lorakit.mixtures.meteora` -- MeteoRA: many off-the-shelf adapters behind a top-2 token gate;
* :mod:`~lorakit.mixtures.lora_mixer` -- LoRA-Mixer: routed experts on attention / SSM projections, SBL loss;
* :mod:`~lorakit.mixtures.multitask` -- MTLoRA: a shared adapter plus one per task;
* :mod:`~lorakit.mixtures.personal` -- RecLoRA: per-user weights over a bank of meta-LoRAs;
* :mod:`~lorakit.mixtures.files` -- experts from files (frozen) and whole mixtures in one folder;
* :mod:`~lorakit.mixtures.hooks` -- the routers' auxiliary losses and statistics in training.

SMoRA (rank-wise experts) is an adapter method: :mod:`lorakit.methods.smora`. Importing this package registers the
router kinds of :data:`~lorakit.routing.routers.ROUTER_KINDS` its modules define (``xlora``, ``mixer``, ``user``).
"""
from . import lora_mixer, personal, xlora  # noqa: F401  (router kinds registered for load_router)
