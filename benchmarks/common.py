"""Shared helpers for the side-by-side benchmarks: models, timing, memory accounting."""
from __future__ import annotations

import argparse
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


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """``t``, or the plain tensors a wrapper tensor subclass (torchao's NF4Tensor) holds; they own the storage."""
    if not hasattr(t, "__tensor_flatten__"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [inner for name in names for inner in _plain_tensors(getattr(t, name))]


@contextmanager
def saved_activation_bytes() -> Iterator[list[int]]:
    """Bytes of distinct storages autograd saves for backward inside the block (activation memory)."""
    seen: dict[int, int] = {}
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        for inner in _plain_tensors(t):
            storage = inner.untyped_storage()
            seen.setdefault(storage.data_ptr(), storage.nbytes())
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


def step_parser(doc: str | None, reps: int, warmup: int) -> argparse.ArgumentParser:
    """The arguments every train-step benchmark takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    return parser


Built = tuple[torch.nn.Module, list[torch.Tensor]]


def run_steps(variants: dict[str, Callable[[torch.device], Built]], args: argparse.Namespace,
              make_step: Callable[[torch.nn.Module, torch.Tensor, list[torch.Tensor]], Callable[[], None]],
              ) -> dict[str, float]:
    """Build every variant, time its train step interleaved, print one table (x the first variant); medians."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    built = {name: build(device) for name, build in variants.items()}
    steps = {name: make_step(model, ids, params) for name, (model, params) in built.items()}
    medians = interleaved_medians(steps, args.reps, args.warmup, device)
    floor = medians[next(iter(variants))]
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} reps={args.reps}")
    print(f"{'variant':<22}{'trainable':>12}{'median ms':>11}{'x floor':>9}{'memory MB':>11}  memory measure")
    for name, (_, params) in built.items():
        measure, nbytes = peak_bytes(steps[name], device, params)
        n = sum(p.numel() for p in params)
        print(f"{name:<22}{n:>12,}{medians[name] * 1e3:>11.1f}{medians[name] / floor:>9.3f}{nbytes / 2**20:>11.1f}"
              f"  {measure}")
    return medians
