"""Shared helpers for the side-by-side benchmarks: models, timing, memory accounting."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab: int = 8192, hidden: int = 384, layers: int = 8, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """The benchmark model of the core issue: vocab 8192, hidden 384, 8 layers (random weights)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(steps: dict[str, Callable[[], None]], reps: int, warmup: int,
                        device: torch.device) -> dict[str, float]:
    """Median seconds per call of each step, alternating variants every repetition so drift hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@contextmanager
def saved_activation_bytes() -> Iterator[list[int]]:
    """Bytes of distinct storages autograd saves for backward inside the block (activation memory)."""
    seen: dict[int, int] = {}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total[0] = sum(seen.values())


def peak_bytes(step: Callable[[], None], device: torch.device, params: list[torch.Tensor]) -> tuple[str, int]:
    """Peak memory of one step: CUDA's allocator peak, or on CPU saved activations + trainable state."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return "cuda peak allocated", torch.cuda.max_memory_allocated(device)
    with saved_activation_bytes() as total:
        step()
    state = sum(p.numel() * p.element_size() * 4 for p in params)  # weight + grad + Adam m, v
    return "saved activations + trainable state", total[0] + state
