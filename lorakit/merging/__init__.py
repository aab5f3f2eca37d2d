"""Merging adapters and adapter algebra (METHODS.md section G): rules defined on the updates ``delta_i``.

* :mod:`~lorakit.merging.rules` -- the rules as pure functions on one layer's updates (``cat``, ``linear``, ``svd``,
  ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``, ``lego``) in :data:`MERGE_RULES`;
* :mod:`~lorakit.merging.model` -- :func:`merge_adapters`: a model's adapters merged layer by layer into a new LoRA;
* :mod:`~lorakit.merging.extract` -- a LoRA extracted from a fully fine-tuned model's difference to its base;
* :mod:`~lorakit.merging.lego` -- LoRA-LEGO's rank-wise units and their clustering.
"""
