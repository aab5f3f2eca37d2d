"""Mixtures of LoRA experts built on weighted routing: block-level experts (MixLoRA, LLaVA-MoLE, MoLA), X-LoRA's
scalings head, experts loaded from files, and the training hook of routers' auxiliary losses."""
