"""The GPU issue's figures in one script (issue 16): lorakit and PEFT side by side, same shapes, one process.

1. ``step``: one training step (forward + cross-entropy + backward + fused AdamW) on TinyLlama-1.1B shapes (hidden
   2048, 22 layers, GQA 32/4 heads, vocab 32000, random weights), bf16 base, r=16 on all linear layers (float32
   adapters, as ``lorakit finetune`` and PEFT make them), batch 4 x 1024; each variant as a multiple of the frozen-base
   step (backward through the frozen network) timed interleaved with it.
2. ``mixed``: the forward of a batch mixing N random LoRA adapters read from files (r=16, all linear, bf16):
   lorakit's ``AdapterPool`` + ``route`` vs PEFT's ``adapter_names``, as multiples of the base model's forward;
   decode (B=64 rows, T=1, no KV cache: row i uses adapter i % N) and prefill (B=16, T=256).
3. ``finetune``: ``lorakit finetune``'s own code path on SmolLM2-135M shapes (random weights, a word-level tokenizer,
   synthetic text; batch 8 x 128 tokens) on ``--device``: training tokens per second.

    python benchmarks/gpu.py                                  # on the GPU, ~5 minutes on an H100/H200
    python benchmarks/gpu.py --parts finetune --device cpu    # the CPU figure the GPU's is compared with
    python benchmarks/gpu.py --smoke --device cpu             # tiny shapes: the script runs (no GPU needed)
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from common import interleaved_medians, peak_bytes
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit


@dataclass(frozen=True)
class Shapes:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie: bool = False

    def config(self, **extra: object) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                           intermediate_size=self.intermediate, tie_word_embeddings=self.tie,
                           max_position_embeddings=2048, **extra)


TINYLLAMA = Shapes(32000, 2048, 22, 32, 4, 5632)
SMOLLM2 = Shapes(49152, 576, 30, 9, 3, 1536, tie=True)
SMOKE = Shapes(512, 64, 2, 4, 2, 128)


@dataclass(frozen=True)
class Sizes:
    """Batch shapes of each part (the issue's, or tiny ones with ``--smoke``)."""

    step_batch: tuple[int, int] = (4, 1024)
    decode_batch: int = 64
    prefill_batch: tuple[int, int] = (16, 256)
    finetune_steps: int = 20


SMOKE_SIZES = Sizes(step_batch=(2, 16), decode_batch=8, prefill_batch=(4, 16), finetune_steps=3)


def build(shapes: Shapes, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """A random model of ``shapes`` made directly on ``device`` (no host copy of 1.1B weights)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(shapes.config())
    return model.to(dtype).eval()


# -- 1. the training step ------------------------------------------------------------------------------------------
def train_step(model: torch.nn.Module, ids: torch.Tensor, params: list[torch.Tensor],
               before: Callable[[], None]) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None

    def step() -> None:
        before()
        model(input_ids=ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def step_part(shapes: Shapes, sizes: Sizes, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> None:
    import peft

    ids = torch.randint(0, shapes.vocab, sizes.step_batch, device=device)
    plain = build(shapes, device, dtype)
    plain.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(out.is_floating_point()))
    full_params = list(plain.parameters())

    ours = build(shapes, device, dtype)
    for name, cls in (("lora", lorakit.LoraConfig), ("dora", lorakit.DoraConfig)):
        lorakit.adapt(ours, cls(r=16, alpha=32, targets="all-linear"), name, dtype=torch.float32, activate=False)
    theirs = peft.get_peft_model(build(shapes, device, dtype),
                                 peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), adapter_name="lora")
    theirs.add_adapter("dora", peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True))

    def frozen(flag: bool) -> Callable[[], None]:
        return lambda: plain.requires_grad_(not flag)

    def ours_on(name: str) -> Callable[[], None]:
        return lambda: lorakit.set_active(ours, name)

    def theirs_on(name: str) -> Callable[[], None]:
        return lambda: theirs.base_model.set_adapter(name)

    variants = {
        "frozen base (floor)": (plain, [], frozen(True)),
        "full fine-tuning": (plain, full_params, frozen(False)),
        "lorakit LoRA": (ours, list(lorakit.trainable_parameters(ours, "lora").values()), ours_on("lora")),
        "PEFT LoRA": (theirs, _peft_params(theirs, "lora"), theirs_on("lora")),
        "lorakit DoRA": (ours, list(lorakit.trainable_parameters(ours, "dora").values()), ours_on("dora")),
        "PEFT DoRA": (theirs, _peft_params(theirs, "dora"), theirs_on("dora")),
    }
    steps = {name: train_step(model, ids, params, before) for name, (model, params, before) in variants.items()}
    for model in (plain, ours, theirs):
        model.train()
    medians = interleaved_medians(steps, args.reps, args.warmup, device)
    floor = medians["frozen base (floor)"]
    print(f"\n## training step: batch {sizes.step_batch[0]}x{sizes.step_batch[1]}, r=16 all-linear, base {dtype}, "
          f"adapters float32, {args.reps} interleaved reps (median)", flush=True)
    print("| variant | trainable | ms | x floor | peak memory MiB |\n|---|---:|---:|---:|---:|")
    for name, (_, params, before) in variants.items():
        before()
        _, nbytes = peak_bytes(steps[name], device, params)
        print(f"| {name} | {sum(p.numel() for p in params):,} | {medians[name] * 1e3:.1f} "
              f"| {medians[name] / floor:.2f}x | {nbytes / 2**20:,.0f} |", flush=True)


def _peft_params(model: torch.nn.Module, adapter: str) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if f".{adapter}." in n or n.endswith(f".{adapter}")]


# -- 2. mixed-adapter batches --------------------------------------------------------------------------------------
def save_random_adapters(shapes: Shapes, device: torch.device, dtype: torch.dtype, n: int, root: Path) -> list[Path]:
    """``n`` random rank-16 LoRA adapters on all linear layers, saved in PEFT's format under ``root``."""
    model = build(shapes, device, dtype)
    lorakit.adapt(model, lorakit.LoraConfig(r=16, alpha=32, targets="all-linear", init="random"), "x", dtype=dtype)
    params = list(lorakit.trainable_parameters(model, "x").values())
    paths = []
    for i in range(n):
        with torch.no_grad():
            for p in params:
                p.normal_(0, 0.02)
        paths.append(lorakit.save_adapter(model, root / f"a{i}", "x"))
    return paths


def mixed_part(shapes: Shapes, sizes: Sizes, device: torch.device, dtype: torch.dtype,
               args: argparse.Namespace) -> None:
    import peft

    most = max(args.adapters)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        paths = save_random_adapters(shapes, device, dtype, most, Path(tmp))
        base = build(shapes, device, dtype)
        ours = build(shapes, device, dtype)
        pool = lorakit.AdapterPool(ours, capacity=most)
        theirs = peft.PeftModel.from_pretrained(build(shapes, device, dtype), paths[0], adapter_name="a0").eval()
        for i, path in enumerate(paths):
            pool.register(f"a{i}", path)
            if i:
                theirs.load_adapter(path, adapter_name=f"a{i}")
        loaded = time.perf_counter() - started
        print(f"\n## mixed-adapter forward: {most} adapters written and loaded in {loaded:.0f} s; "
              f"x the base model's forward ({args.reps} interleaved reps, median)", flush=True)
        print("| pass | N | distinct in batch | base ms | lorakit | PEFT |\n|---|---:|---:|---:|---:|---:|")
        passes = {"decode": (sizes.decode_batch, 1), "prefill": sizes.prefill_batch}
        for label, (rows, tokens) in passes.items():
            ids = torch.randint(0, shapes.vocab, (rows, tokens), device=device)
            for n in args.adapters:
                names = [f"a{i % n}" for i in range(rows)]
                pool.acquire(names)

                def routed(ids: torch.Tensor = ids, names: list[str] = names) -> None:
                    with lorakit.route(ours, names):
                        ours(input_ids=ids, use_cache=False)

                steps = {"base": lambda ids=ids: base(input_ids=ids, use_cache=False), "lorakit": routed,
                         "peft": lambda ids=ids, names=names: theirs(input_ids=ids, adapter_names=names,
                                                                     use_cache=False)}
                with torch.inference_mode():
                    med = interleaved_medians(steps, args.reps, args.warmup, device)
                pool.release(names)
                print(f"| {label} B={rows} T={tokens} | {n} | {len(set(names))} | {med['base'] * 1e3:.2f} "
                      f"| {med['lorakit'] / med['base']:.2f}x | {med['peft'] / med['base']:.2f}x |", flush=True)


# -- 3. finetune throughput ----------------------------------------------------------------------------------------
def model_folder(shapes: Shapes, folder: Path) -> Path:
    """A random model of ``shapes`` with a word-level tokenizer (no hub access needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>",
                                                                                               "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    LlamaForCausalLM(shapes.config(pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id)
                     ).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


WORDS = [f"w{i}" for i in range(400)]


def finetune_part(shapes: Shapes, sizes: Sizes, device: torch.device, args: argparse.Namespace) -> None:
    import json
    import random

    from lorakit.train.checkpoint import METRICS_FILE, MetricsLog
    from lorakit.train.run import Options, finetune

    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(shapes, Path(tmp) / "model")
        data = Path(tmp) / "texts.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(150, 200)))}) + "\n"
                                for _ in range(400)))
        output = Path(tmp) / "run"
        finetune(Options(model=str(folder), data=str(data), task="causal-lm", steps=sizes.finetune_steps,
                         batch_size=8, max_length=128, eval_size=8, device=str(device), output=str(output)))
        steps = [r for r in MetricsLog(output / METRICS_FILE).read() if r["kind"] == "step"][1:]  # first: warm-up
    tokens, seconds = sum(r["tokens"] for r in steps), sum(r["seconds"] for r in steps)
    print(f"\n## finetune on {device} ({torch.get_num_threads()} CPU threads): {tokens / seconds:,.0f} training "
          f"tokens/s ({len(steps)} steps of 8 x 128 tokens after a warm-up step)", flush=True)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--parts", default="step,mixed,finetune", help="comma-separated: step, mixed, finetune")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and batches: check that the script runs")
    parser.add_argument("--adapters", type=lambda s: [int(v) for v in s.split(",")], default=None,
                        help="adapter counts N of the mixed part (default 1,8,64; --smoke: 1,2)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 10; --smoke: 2)")
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.adapters = args.adapters or ([1, 2] if args.smoke else [1, 8, 64])
    args.reps = args.reps or (2 if args.smoke else 10)
    model_shapes, sizes = (SMOKE, SMOKE_SIZES) if args.smoke else (TINYLLAMA, Sizes())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# benchmarks/gpu.py on {name}: torch {torch.__version__}, {'smoke shapes' if args.smoke else 'full'}")
    parts = args.parts.split(",")
    if "step" in parts:
        step_part(model_shapes, sizes, device, dtype, args)
        _free(device)  # the part's models are gone with its frame
    if "mixed" in parts:
        mixed_part(model_shapes, sizes, device, dtype, args)
        _free(device)
    if "finetune" in parts:
        finetune_part(SMOKE if args.smoke else SMOLLM2, sizes, device, args)


if __name__ == "__main__":
    main()
