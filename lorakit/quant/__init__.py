"""Quantised bases: codecs over torchao / bitsandbytes / lorakit's k-bit codebook, and what is built on them.

``lorakit.quantize`` (:mod:`.model`) quantises a model's frozen base (QLoRA); :mod:`.lq_lora` and :mod:`.int21`
build LQ-LoRA's low-rank-plus-quantised decomposition and INT2.1's error-correction adapter on the same codecs.
This package imports nothing from :mod:`lorakit.inject` at import time (the host layer imports the codecs).
"""
