"""Merging adapters and adapter algebra (METHODS.md section G): rules defined on the updates ``delta_i``.

* :mod:`~lorakit.merge.rules` -- the rules as pure functions on one layer's updates (``cat``, ``linear``, ``svd``,
  ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``, ``lego``) in :data:`MERGE_RULES`;
* :mod:`~lorakit.merge.model` -- :func:`merge_adapters`: a model's adapters merged layer by layer into a new LoRA;
* :mod:`~lorakit.merge.extract` -- a LoRA extracted from a fully fine-tuned model's difference to its base;
* :mod:`~lorakit.merge.lego` -- LoRA-LEGO's rank-wise units and their clustering.
"""
