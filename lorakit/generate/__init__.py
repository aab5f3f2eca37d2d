"""Adapters generated or fused from other adapters (METHODS.md, merging papers), one module each:

* :mod:`~lorakit.generate.sg_lora` -- SG-LoRA: a LoRA for a new task description from a bank of expert LoRAs, weighted
  by the description's semantic similarity to the experts' (exact weighted sum of their updates);
* :mod:`~lorakit.generate.icm_fusion` -- ICM-Fusion: meta-learned, context-conditioned fusion weights over LoRA task
  vectors, the fused LoRA written exactly;
* :mod:`~lorakit.generate.icm_lora` -- ICM-LoRA: a conditional VAE that emits a LoRA's weights from a task context;
* :mod:`~lorakit.generate.trans_lora` -- Trans-LoRA: moving a LoRA to a new base model by distillation on synthetic
  data.

Every generated adapter is a plain lorakit adapter on the model: it saves and loads in PEFT's format.
"""
