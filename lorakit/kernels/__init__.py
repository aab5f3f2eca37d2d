"""Kernels for the hot paths: the fused LoRA/DoRA linear autograd function (:mod:`.lora_linear`, PyTorch, any
device) and the grouped multi-adapter Triton kernels for serving on GPUs (:mod:`.grouped`, optional triton)."""
