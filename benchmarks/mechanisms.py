"""Nine mechanisms of issue 15, item 7, each measured against its baseline on the embedded default (one seed).

The embedded default is ``lorakit finetune`` with no options: SmolLM2-135M-Instruct classifies tweet sentiment,
LoRA r=16 (alpha 32) on all linear layers, 45 steps of 8, AdamW lr 1e-3, seed 0, 200 held-out tweets. Every row
changes one thing and compares with the run it claims to improve on, in this process:

- LoftQ (``--init loftq``) vs QLoRA's default init (Kaiming A, zero B), both on the same lorakit-codebook base, at
  NF4 and at 2-bit NF2 (the LoftQ paper's claim is strongest at low bits).
- Flexora (:class:`~lorakit.rank.flexora.FlexoraHook`): per-block scales learnt on a validation loss for the first
  steps (16 training tweets that no step draws), then only the best half of the blocks keeps training; vs LoRA on
  every layer.
- CoLoRA (:mod:`lorakit.rank.colora`): per-layer ranks proportional to ``||dW|| / ||W0||`` of the baseline's adapter
  after its first 10 steps (the probe), same total rank (16 x layers) and the same scale 2 per layer; vs LoRA r=16.
- LoRA-GGPO (:class:`~lorakit.rank.ggpo.GgpoHook`, alpha 0.05, beta 0.01) and PEGO (two LoRAs r=8, the same
  parameters as one r=16, plus :class:`~lorakit.rank.pego.PegoHook`'s orthogonality terms) vs LoRA.
- INT2.1 (:func:`~lorakit.quant.int21.int21`): an int2 base plus LoRA r=16 trained by LREC (logit regression on 64
  training tweets against the fp32 model) vs the same int2 base alone, with the fp32 model beside them.
- Natural GaLore vs GaLore (rank 128, T=200, scale 0.25) on the same full fine-tuning run (``--method full``).
- SLTrain (:func:`~lorakit.optim.sltrain.sltrain`, r=32, density 0.03): pre-training from scratch, a 4-layer
  byte-level Llama (hidden 128) learning the tweets as text; vs the dense model and vs low-rank only at equal
  parameters; held-out byte perplexity.
- LoRAM (:mod:`lorakit.optim.loram`): LoRA trained on SmolLM2 with half of its MLP channels pruned, recovered onto
  the full model; vs LoRA trained on the full model.

Measured: held-out accuracy and loss (the classification cross-entropy over the label tokens), training time (the
sum of the trainer's step times: no loading, initialisation or evaluation), trainable parameters and memory as the
bytes of the stored weights (quantised layers by their storage; SLTrain's int64 support indices included) +
gradients of the trained tensors + optimizer state, counted at the last step (activations are not counted).
"held?" compares the numbers with the paper's claimed direction: accuracy differences within 2 points are noise (one
seed, 200 tweets: about +-3 points of sampling noise), losses and perplexities within 2%; INT2.1 holds when LREC
recovers at least half of the held-out language-model loss gap to fp32, SLTrain's "comparable to dense" when within
5% perplexity.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/mechanisms.py [--only loftq,flexora] [--steps 45]
        [--seed 0] [--output mechanisms.jsonl]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mechanisms.py --smoke   # every code path, ~15 s

Expected run time on the project's 2 quiet cores, estimated from the default run (~80 s: ~55 s of 45 steps, two
evaluations of ~10 s) and docs/benchmarks.md, not yet timed end to end: ~25-30 minutes in all. LoRA baseline 80 s;
LoftQ 4 runs ~6.5 min (2 bit widths x QLoRA / LoftQ, codebook steps ~1.1x, LoftQ's SVDs); Flexora ~2 min (15 extra
validation passes); CoLoRA, GGPO, PEGO, LoRAM ~1.5 min each; INT2.1 ~2.5 min (three evaluations plus full-vocabulary
LM losses); GaLore + Natural GaLore ~5 min (full fine-tuning, every projector fitted by SVD in step 1); SLTrain ~4 min
(3 x 300 small steps). ``--only`` runs a subset; the LoRA baseline runs once, when a row first needs it.

``--smoke`` runs every row on a 2-layer random Llama (from a transformers config) with a word-level tokenizer and
120 synthetic sentiment rows, 2 steps each: its numbers mean nothing, it only checks that the code paths run.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from quant import weight_bytes
from torch import Tensor, nn

import lorakit
from lorakit.hooks import TrainingHook, optimized_parameters
from lorakit.inject import hosts
from lorakit.optim.loram import prune_mlp_channels, recover_adapter
from lorakit.optim.sltrain import SparseLowRankLinear, sltrain
from lorakit.quant.int21 import effective_bits, int21
from lorakit.quant.model import bits_per_parameter
from lorakit.rank.colora import allocate_ranks, contributions
from lorakit.rank.flexora import FlexoraHook
from lorakit.rank.ggpo import GgpoHook
from lorakit.rank.pego import PegoHook, pego_penalty
from lorakit.train.checkpoint import METRICS_FILE, MetricsLog
from lorakit.train.data import BatchOrder, split
from lorakit.train.default import default_records
from lorakit.train.evaluate import evaluate
from lorakit.train.loop import Trainer
from lorakit.train.model import load_model
from lorakit.train.run import (
    Options,
    Prepared,
    adapter_config,
    finetune,
    prepare,
    prepare_data,
    records_of,
    train_config,
)
from lorakit.train.steps import AdapterSteps, TrainConfig
from lorakit.train.tasks import IGNORE, CausalLMTask, Example, Task

ACCURACY_NOISE = 2.0  # points: one seed on 200 held-out tweets
RELATIVE_NOISE = 0.02  # losses and perplexities
LAST_STEPS = 10  # training loss reported as the mean of the last steps (the same batches in every run)
MIB = 2**20

CLAIMS = {
    "loftq": "better than QLoRA's init on the same quantised base, most at low bits (2-bit QLoRA often fails)",
    "flexora": "beats LoRA (less overfitting) while training only the selected layers",
    "colora": "per-layer ranks from each layer's contribution: better than uniform LoRA (~ full tuning)",
    "ggpo": "beats LoRA (flatter minima, no double descent) for less than one extra forward per step",
    "pego": "better generalisation than LoRA (a group of LoRAs kept orthogonal; shown on ViT domain generalisation)",
    "int21": "LoRA error correction makes a 2-bit model usable (coherent English) at ~1.05x the 2-bit size",
    "natural-galore": "lower loss than GaLore at equal steps; extra memory only s stored projected gradients",
    "sltrain": "sparse + low-rank ~ full-rank quality with far fewer parameters; better than low-rank alone",
    "loram": "LoRA trained on a pruned model, recovered onto the full one, keeps LoRA's gain at ~(1 - ratio) memory",
}


# -- settings ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setup:
    """What every row shares (the embedded default, or the smoke model and data) and each mechanism's knobs."""

    steps: int
    seed: int
    smoke: bool = False
    model: str | None = None
    data: str | None = None
    rank: int = 16
    eval_size: int | None = None  # None: finetune's default (200 held-out tweets)
    loftq_schemes: tuple[str, ...] = ("nf4", "nf2")
    flexora_keep: float = 0.5  # share of the transformer blocks kept
    flexora_search: int = 15  # steps of the search phase
    flexora_val: int = 16  # validation tweets (training tweets no step draws): each search step runs them
    colora_probe: int = 10  # baseline steps whose adapter gives the contributions
    pego_weights: tuple[float, float] = (3e-6, 2e-2)  # base, group: each term ~0.1 at init (initial loss ~1)
    int21_batches: int = 8  # calibration batches of 8 tweets
    galore_rank: int = 128
    galore_lr: float = 1e-4  # x scale 0.25: 2.5e-5 effective, near full fine-tuning's 2e-5 (docs/benchmarks.md)
    loram_ratio: float = 0.5
    sltrain_steps: int = 300
    sltrain_hidden: int = 128
    sltrain_layers: int = 4
    sltrain_rank: int = 32
    sltrain_density: float = 0.03
    sltrain_lr: float = 2e-3
    sltrain_batch: int = 16

    def options(self, **overrides: Any) -> Options:
        base: dict[str, Any] = dict(model=self.model, data=self.data, task="classification" if self.data else None,
                                    rank=self.rank, alpha=2.0 * self.rank, steps=self.steps, seed=self.seed,
                                    eval_size=self.eval_size, overwrite=True)
        return Options(**{**base, **overrides})


# -- measuring a run -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One training run's numbers."""

    accuracy: float
    loss: float  # held-out
    train_s: float  # sum of the trainer's step times
    wall_s: float
    trainable: int  # parameters the optimizer updates at the end
    memory: int  # bytes: stored weights + gradients of the trained tensors + optimizer state, at the end
    first_loss: float  # training loss of step 1: the starting point (the same batch in every run)
    last_loss: float  # mean training loss of the last LAST_STEPS steps
    step_s: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Probe(TrainingHook):
    """Counts what the optimizer trains and the memory at the last step; optionally calls ``at(model)`` after step
    ``at_step`` (the result is kept in :attr:`found`)."""

    def __init__(self, steps: int, at_step: int | None = None, at: Callable[[nn.Module], Any] | None = None) -> None:
        self.steps, self.at_step, self.at = steps, at_step, at
        self.trainable, self.memory, self.found = 0, 0, None

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.at is not None and step == self.at_step:
            self.found = self.at(model)
        if step == self.steps:
            trained = optimized_parameters(optimizer)
            state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                        if isinstance(v, Tensor))
            self.trainable = sum(p.numel() for p in trained)
            self.memory = weight_bytes(model) + sum(p.numel() * p.element_size() for p in trained) + state


def step_records(folder: Path) -> list[dict[str, Any]]:
    return [r for r in MetricsLog(folder / METRICS_FILE).read() if r["kind"] == "step"]


def measured(after: dict[str, float], steps: list[dict[str, Any]], probe: Probe, wall: float, **extra: Any) -> Run:
    losses = [r["loss"] for r in steps]
    return Run(accuracy=after.get("accuracy", float("nan")), loss=after["loss"],
               train_s=sum(r["seconds"] for r in steps), wall_s=wall, trainable=probe.trainable, memory=probe.memory,
               first_loss=losses[0], last_loss=statistics.mean(losses[-LAST_STEPS:]),
               step_s=[r["seconds"] for r in steps], extra=extra)


def finetune_run(setup: Setup, hooks: Sequence[TrainingHook] = (), probe: Probe | None = None,
                 **overrides: Any) -> Run:
    """``lorakit finetune`` with ``overrides`` of the default options and extra training ``hooks``."""
    probe = probe or Probe(setup.steps)
    with tempfile.TemporaryDirectory() as tmp:
        opts = setup.options(output=str(Path(tmp) / "run"), **overrides)
        result = finetune(opts, hooks=[*hooks, probe])
        steps = step_records(Path(opts.output))
    return measured(result["after"], steps, probe, result["seconds"], before=result["before"].get("accuracy"))


def trainer_run(model: nn.Module, task: Task, train: Sequence[Example], config: TrainConfig,
                hooks: Sequence[TrainingHook] = (), trainer: type[Trainer] = Trainer) -> tuple[list[dict], Probe]:
    """lorakit's Trainer on ``model`` (its adapter ``default``, or every weight when it has none)."""
    probe = Probe(config.steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer(model, task, train, config, Path(tmp), hooks=[*hooks, probe]).train()
        return step_records(Path(tmp)), probe


class GroupTrainer(Trainer):
    """lorakit's Trainer whose optimizer updates every adapter of the model (a PEGO group), not only ``default``."""

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        AdapterSteps.__init__(self, model, lorakit.trainable_parameters(model), self.config, self.hooks.hooks)


@torch.no_grad()
def lm_loss(model: nn.Module, task: Task, examples: Sequence[Example], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over the examples' own tokens (tweet + template): language-model quality."""
    model.eval()
    total, count = 0.0, 0
    for first in range(0, len(examples), batch_size):
        batch = task.collate(examples[first:first + batch_size])
        mask = batch["attention_mask"].bool()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:].masked_fill(~(mask[:, :-1] & mask[:, 1:]), IGNORE)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return total / count


# -- verdicts and rows ---------------------------------------------------------------------------------------------
def judge(gain: float, noise: float, text: str) -> str:
    """``gain`` > 0 is the claimed direction; within ``noise`` it is not resolved."""
    if abs(gain) <= noise:
        return f"within noise ({text})"
    return f"{'yes' if gain > 0 else 'no'} ({text})"


def judge_accuracy(mech: float, base: float) -> str:
    points = 100 * (mech - base)
    return judge(points, ACCURACY_NOISE, f"{points:+.1f} points")


def judge_lower(mech: float, base: float, what: str) -> str:
    gain = (base - mech) / base
    return judge(gain, RELATIVE_NOISE, f"{-100 * gain:+.1f}% {what}")


@dataclass
class Row:
    mechanism: str
    against: str
    metric: str
    base: str
    value: str
    time: str  # train seconds, baseline -> mechanism
    memory: str  # MiB, baseline -> mechanism
    trainable: str
    claim: str
    held: str
    data: dict[str, Any] = field(default_factory=dict)


def acc_loss(run: Run) -> str:
    return f"{run.accuracy:.1%} / {run.loss:.3f}"


def pair(a: float, b: float, fmt: str = "{:.0f}") -> str:  # baseline -> mechanism
    return f"{fmt.format(a)} → {fmt.format(b)}"


def params(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,.0f}"


def versus(name: str, against: str, base: Run, mech: Run, claim: str, held: str, **data: Any) -> Row:
    """A row of held-out accuracy / loss of two runs of the embedded task."""
    return Row(name, against, "held-out acc / loss", acc_loss(base), acc_loss(mech), pair(base.train_s, mech.train_s),
               pair(base.memory / MIB, mech.memory / MIB, "{:.1f}"),
               f"{params(base.trainable)} → {params(mech.trainable)}", claim, held,
               {"baseline": asdict(base), "mechanism": asdict(mech), **data})


# -- the rows ------------------------------------------------------------------------------------------------------
class Bench:
    """The setup, the rows asked for, and the LoRA baseline (run once, when a row first needs it)."""

    def __init__(self, setup: Setup, selected: Sequence[str]) -> None:
        self.setup, self.selected = setup, list(selected)
        self._lora: Run | None = None
        self.contributions: dict[str, tuple[float, int]] = {}

    def lora(self) -> Run:
        """The default run, LoRA r=16; when CoLoRA is asked for, its contributions are read at step ``probe``."""
        if self._lora is None:
            probe = Probe(self.setup.steps)
            if "colora" in self.selected:
                probe.at_step, probe.at = min(self.setup.colora_probe, self.setup.steps), layer_contributions
            self._lora = finetune_run(self.setup, probe=probe)
            self.contributions = probe.found or {}
        return self._lora

    @property
    def ran_lora(self) -> bool:
        return self._lora is not None


def layer_contributions(model: nn.Module) -> dict[str, tuple[float, int]]:
    """CoLoRA's ``||dW|| / ||W0||`` per adapted layer, with the layer's smaller side (the largest rank it takes)."""
    sides = {h.path: min(h.backend.weight().shape) for h in hosts(model)}
    return {path: (score, sides[path]) for path, score in contributions(model).items()}


def loftq_rows(bench: Bench) -> list[Row]:
    rows = []
    for scheme in bench.setup.loftq_schemes:
        common = dict(quant=scheme, quant_backend="lorakit")
        qlora = finetune_run(bench.setup, **common)
        loftq = finetune_run(bench.setup, init="loftq", method_options={"init_options": {"scheme": scheme}}, **common)
        held = (f"{judge_accuracy(loftq.accuracy, qlora.accuracy)}; step-1 loss {qlora.first_loss:.3f} → "
                f"{loftq.first_loss:.3f}")
        rows.append(versus(f"LoftQ ({scheme}, 1 iteration)", f"QLoRA init on the same {scheme} base (lorakit "
                           f"codebook); its base alone: {qlora.extra['before']:.1%}", qlora, loftq,
                           CLAIMS["loftq"], held, scheme=scheme))
    return rows


def unused_training_examples(setup: Setup, n: int) -> tuple[Task, list[Example]]:
    """``n`` training examples that no step of the run draws (Flexora's validation set), and the task."""
    opts = setup.options()
    _, tokenizer = load_model(opts.model, meta=True)
    task, train, _ = prepare_data(opts, tokenizer, records_of(opts))
    order = BatchOrder(len(train), opts.batch_size * opts.grad_accum, opts.seed)
    drawn = {i for step in range(setup.steps) for i in order.indices(step)}
    return task, [e for i, e in enumerate(train) if i not in drawn][:n]


def flexora_rows(bench: Bench) -> list[Row]:
    setup = bench.setup
    task, val = unused_training_examples(setup, setup.flexora_val)
    batch, total = task.collate(val), sum(e.weight for e in val)
    blocks = load_model(setup.model, meta=True)[0].config.num_hidden_layers
    keep = max(1, round(setup.flexora_keep * blocks))
    hook = FlexoraHook(lambda model: task.loss_sums(model, batch).loss / total,
                       search_steps=min(setup.flexora_search, setup.steps), keep=keep)
    run = finetune_run(setup, hooks=[hook])
    base = bench.lora()
    held = f"{judge_accuracy(run.accuracy, base.accuracy)}; {run.trainable / base.trainable:.0%} of the parameters"
    return [versus(f"Flexora ({keep} of {blocks} blocks after {hook.search_steps} search steps)",
                   "LoRA on every layer", base, run, CLAIMS["flexora"], held, selected=hook.selected)]


def colora_rows(bench: Bench) -> list[Row]:
    setup, base = bench.setup, bench.lora()
    found = bench.contributions
    r_max = min(4 * setup.rank, min(side for _, side in found.values()))
    ranks = allocate_ranks({p: score for p, (score, _) in found.items()}, budget=setup.rank * len(found), r_max=r_max)
    chosen = {p: r for p, r in ranks.items() if r > 0}
    if not chosen:
        raise SystemExit(f"CoLoRA: no layer changed in the probe's {setup.colora_probe} steps (still in warmup?)")
    # lorakit.rank.colora.allocated_config would say the same as one regex of every path, which exceeds lorakit's
    # 1000-character pattern limit on SmolLM2's 210 layers: the paths go as a list of names instead.
    pattern = {path.replace(".", r"\."): r for path, r in chosen.items()}
    run = finetune_run(setup, targets=",".join(chosen), method_options={
        "rank_pattern": pattern, "alpha_pattern": {k: 2.0 * r for k, r in pattern.items()}})
    probe_s = sum(base.step_s[:setup.colora_probe])
    run.train_s += probe_s
    values = sorted(chosen.values())
    held = judge_accuracy(run.accuracy, base.accuracy)
    return [versus(f"CoLoRA (ranks {values[0]}..{values[-1]}, median {statistics.median(values):g}, "
                   f"{len(found) - len(chosen)} layers dropped)",
                   f"LoRA r={setup.rank} everywhere (same total rank; CoLoRA's time includes its "
                   f"{setup.colora_probe}-step probe)", base, run, CLAIMS["colora"], held, ranks=ranks,
                   probe_s=probe_s)]


def seeded_prepare(setup: Setup) -> tuple[Options, Prepared]:
    """The setup's options and its model, tokenizer and split, loaded after seeding with its seed."""
    opts = setup.options()
    torch.manual_seed(opts.seed)
    return opts, prepare(opts)


def ggpo_rows(bench: Bench) -> list[Row]:
    run = finetune_run(bench.setup, hooks=[GgpoHook(alpha=0.05, beta=0.01, seed=bench.setup.seed)])
    base = bench.lora()
    held = f"{judge_accuracy(run.accuracy, base.accuracy)}; step time x{run.train_s / base.train_s:.2f}"
    return [versus("LoRA-GGPO (alpha 0.05, beta 0.01)", "LoRA", base, run, CLAIMS["ggpo"], held)]


def pego_rows(bench: Bench) -> list[Row]:
    setup = bench.setup
    started = time.perf_counter()
    opts, prepared = seeded_prepare(setup)
    half = adapter_config(opts).replace(r=opts.rank // 2, alpha=opts.alpha / 2)  # same scale 2, same parameters
    names = ["default", "pego1"]
    for name in names:
        lorakit.adapt(prepared.model, half, name, activate=False, dtype=torch.float32)
    lorakit.set_active(prepared.model, names)
    base_w, group_w = setup.pego_weights
    torch.manual_seed(opts.seed)
    steps, probe = trainer_run(prepared.model, prepared.task, prepared.train, train_config(opts, len(prepared.train)),
                               [PegoHook(names, base_w, group_w)], GroupTrainer)
    after = evaluate(prepared.model, prepared.task, prepared.held_out, opts.eval_batch_size, desc="eval PEGO")
    with torch.no_grad():
        terms = [float(pego_penalty(prepared.model, names, 1.0, 0.0)), float(pego_penalty(prepared.model, names, 0, 1))]
    run = measured(after, steps, probe, time.perf_counter() - started, penalty_terms_end=terms)
    base = bench.lora()
    return [versus(f"PEGO (2 x LoRA r={half.r}, weights {base_w:g} / {group_w:g})", f"LoRA r={opts.rank}", base, run,
                   CLAIMS["pego"], judge_accuracy(run.accuracy, base.accuracy))]


def int21_rows(bench: Bench) -> list[Row]:
    setup = bench.setup
    opts, prepared = seeded_prepare(setup)
    model, task, held_out = prepared.model, prepared.task, prepared.held_out

    def scores(desc: str) -> tuple[float, float, float]:
        metrics = evaluate(model, task, held_out, opts.eval_batch_size, desc=desc)
        return metrics["accuracy"], metrics["loss"], lm_loss(model, task, held_out)

    fp32, fp32_bytes = scores("eval fp32"), weight_bytes(model)
    calibration = []
    for i in range(setup.int21_batches):
        batch = task.collate(prepared.train[i * opts.batch_size:(i + 1) * opts.batch_size])
        calibration.append({k: v for k, v in batch.items() if k != "label"})
    started = time.perf_counter()
    report = int21(model, adapter_config(opts), calibration, steps=setup.steps, lr=opts.lr)
    seconds = time.perf_counter() - started
    corrected, bits, base_bits = scores("eval int2 + LREC"), effective_bits(model), bits_per_parameter(model)
    with lorakit.disable(model):
        alone = scores("eval int2 alone")
    recovered = (alone[2] - corrected[2]) / (alone[2] - fp32[2]) if alone[2] != fp32[2] else float("nan")
    verdict = "yes" if recovered >= 0.5 else "partly" if recovered > 0.1 else "no"

    def text(s: tuple[float, float, float]) -> str:
        return f"{s[0]:.1%} / {s[1]:.3f} / {s[2]:.3f}"

    adapter = sum(p.numel() for p in lorakit.trainable_parameters(model).values())
    return [Row(f"INT2.1 (int2 base, block 64, + LoRA r={setup.rank} by LREC)",
                f"int2 base alone; fp32 model: {text(fp32)}",
                "held-out acc / loss / LM loss", text(alone), text(corrected), f"- → {seconds:.0f} (LREC)",
                pair(fp32_bytes / MIB, weight_bytes(model) / MIB, "{:.1f}") + " (weights: fp32 → int2 + LoRA)",
                f"- → {params(adapter)}", CLAIMS["int21"],
                f"{verdict}: {recovered:.0%} of the LM-loss gap recovered; {bits:.2f} bits per weight with a "
                f"16-bit adapter, x{bits / base_bits:.2f} the int2 base's {base_bits:.2f}",
                {"fp32": fp32, "int2": alone, "int2_lrec": corrected, "recovered": recovered, "bits": bits,
                 "calibration_mse": [report.initial, report.final], "lrec_s": seconds})]


def natural_galore_rows(bench: Bench) -> list[Row]:
    setup = bench.setup
    common = dict(method="full", lr=setup.galore_lr, optimizer_options={"rank": setup.galore_rank})
    galore = finetune_run(setup, optimizer="galore", **common)
    natural = finetune_run(setup, optimizer="natural-galore", **common)
    held = (f"{judge_lower(natural.last_loss, galore.last_loss, 'train loss')}; held-out "
            f"{judge_accuracy(natural.accuracy, galore.accuracy)}")
    return [Row(f"Natural GaLore (s=10, lambda 1e-3; rank {setup.galore_rank})",
                f"GaLore (rank {setup.galore_rank}, T=200, scale 0.25), full fine-tuning at lr {setup.galore_lr:g}",
                f"train loss (last {LAST_STEPS} steps) / held-out acc",
                f"{galore.last_loss:.3f} / {galore.accuracy:.1%}", f"{natural.last_loss:.3f} / {natural.accuracy:.1%}",
                pair(galore.train_s, natural.train_s), pair(galore.memory / MIB, natural.memory / MIB, "{:.1f}"),
                f"{params(galore.trainable)} → {params(natural.trainable)}", CLAIMS["natural-galore"], held,
                {"baseline": asdict(galore), "mechanism": asdict(natural)})]


# -- SLTrain: pre-training a small byte-level Llama from scratch ---------------------------------------------------
def byte_tokenizer() -> Any:
    """A tokenizer of the 256 bytes plus <pad> and <eos> (no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(["<pad>", "<eos>", *alphabet])}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def small_llama(setup: Setup, vocab: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    h = setup.sltrain_hidden
    torch.manual_seed(setup.seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=h * 8 // 3 // 32 * 32,
                                        num_hidden_layers=setup.sltrain_layers, num_attention_heads=max(1, h // 32),
                                        num_key_value_heads=max(1, h // 32), max_position_embeddings=256,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=None))


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    head = model.get_output_embeddings()
    return [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, nn.Linear) and m is not head]


def block_weights(model: nn.Module) -> int:
    """Parameters of the linear layers SLTrain replaces (every one but the head): dense, low-rank or both."""
    head = model.get_output_embeddings()
    return sum(p.numel() for m in model.modules() if isinstance(m, (nn.Linear, SparseLowRankLinear)) and m is not head
               for p in m.parameters())


def sltrain_rows(bench: Bench) -> list[Row]:
    setup = bench.setup
    tokenizer = byte_tokenizer()
    task = CausalLMTask(tokenizer, max_length=128)
    records = records_of(setup.options()) if setup.smoke else default_records()
    train, held_out = split(task.encode(records), setup.eval_size or 200)
    config = TrainConfig(steps=setup.sltrain_steps, batch_size=setup.sltrain_batch, lr=setup.sltrain_lr,
                         seed=setup.seed)
    shapes = linear_shapes(small_llama(setup, len(tokenizer)))
    r, density = setup.sltrain_rank, setup.sltrain_density
    equal = round(r + sum(round(density * m * n) for m, n in shapes) / sum(m + n for m, n in shapes))
    variants = {"dense": None, f"low-rank r={equal}": (equal, 0.0), f"SLTrain r={r}, delta={density:g}": (r, density)}
    runs: dict[str, Run] = {}
    for name, parametrisation in variants.items():
        model = small_llama(setup, len(tokenizer))
        if parametrisation is not None:
            sltrain(model, parametrisation[0], parametrisation[1], seed=setup.seed)
        linear = block_weights(model)
        started = time.perf_counter()
        torch.manual_seed(setup.seed)
        steps, probe = trainer_run(model, task, train, config)
        after = evaluate(model, task, held_out, desc=f"eval {name}")
        runs[name] = measured(after, steps, probe, time.perf_counter() - started, perplexity=after["perplexity"],
                              linear_params=linear)
    dense, low, sparse = runs.values()
    ppl = {name: run.extra["perplexity"] for name, run in runs.items()}
    names = list(variants)
    header = (f"byte perplexity on {len(held_out)} held-out tweets ({setup.sltrain_layers}-layer Llama, hidden "
              f"{setup.sltrain_hidden}, {setup.sltrain_steps} steps of {setup.sltrain_batch})")

    def row(base_name: str, base: Run, held: str) -> Row:
        return Row(names[2], base_name, header, f"{ppl[base_name]:.2f}", f"{ppl[names[2]]:.2f}",
                   pair(base.train_s, sparse.train_s), pair(base.memory / MIB, sparse.memory / MIB, "{:.1f}"),
                   f"{params(base.extra['linear_params'])} → {params(sparse.extra['linear_params'])} (blocks' "
                   f"weights)", CLAIMS["sltrain"], held, {"baseline": asdict(base), "mechanism": asdict(sparse)})

    gap = ppl[names[2]] / ppl[names[0]] - 1
    comparable = "yes" if gap <= 0.05 else "no"
    return [row(names[1], low, judge_lower(ppl[names[2]], ppl[names[1]], "perplexity") + ", equal parameters"),
            row(names[0], dense, f"comparable to dense: {comparable} ({100 * gap:+.1f}% perplexity) with "
                                 f"{sparse.extra['linear_params'] / dense.extra['linear_params']:.0%} of its weights")]


def loram_rows(bench: Bench) -> list[Row]:
    setup = bench.setup
    started = time.perf_counter()
    opts, prepared = seeded_prepare(setup)
    small, prune_map = prune_mlp_channels(prepared.model, setup.loram_ratio)
    lorakit.adapt(small, adapter_config(opts), dtype=torch.float32)
    torch.manual_seed(opts.seed)
    steps, probe = trainer_run(small, prepared.task, prepared.train, train_config(opts, len(prepared.train)))
    on_small = evaluate(small, prepared.task, prepared.held_out, opts.eval_batch_size, desc="eval pruned + LoRA")
    recover_adapter(small, prepared.model, prune_map)
    del small
    after = evaluate(prepared.model, prepared.task, prepared.held_out, opts.eval_batch_size, desc="eval recovered")
    run = measured(after, steps, probe, time.perf_counter() - started, pruned_with_adapter=on_small["accuracy"])
    base = bench.lora()
    untuned = base.extra["before"]
    keeps = run.accuracy >= base.accuracy - ACCURACY_NOISE / 100 and run.accuracy > untuned + ACCURACY_NOISE / 100
    held = (f"{'yes' if keeps else 'no'}: {100 * (run.accuracy - base.accuracy):+.1f} points vs LoRA on the full "
            f"model, {100 * (run.accuracy - untuned):+.1f} vs the untuned model ({untuned:.1%}); memory "
            f"x{run.memory / base.memory:.2f}, pruned model + adapter {on_small['accuracy']:.1%}")
    return [versus(f"LoRAM (MLP channels pruned {setup.loram_ratio:.0%}, no alignment pre-training)",
                   "LoRA trained on the full model", base, run, CLAIMS["loram"], held)]


MECHANISMS: dict[str, Callable[[Bench], list[Row]]] = {
    "loftq": loftq_rows,
    "flexora": flexora_rows,
    "colora": colora_rows,
    "ggpo": ggpo_rows,
    "pego": pego_rows,
    "int21": int21_rows,
    "natural-galore": natural_galore_rows,
    "sltrain": sltrain_rows,
    "loram": loram_rows,
}


# -- table, smoke inputs, main -------------------------------------------------------------------------------------
COLUMNS = ("mechanism", "against", "metric", "baseline", "mechanism value", "train s (baseline → mechanism)",
           "memory MiB: weights + grads + optimizer", "trainable", "paper's claim", "held?")


def table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = (r.mechanism, r.against, r.metric, r.base, r.value, r.time, r.memory, r.trainable, r.claim, r.held)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def baseline_row(run: Run, rank: int) -> Row:
    return Row(f"LoRA r={rank}, all linear (the default)", "-", "held-out acc / loss", "-", acc_loss(run),
               f"{run.train_s:.0f}", f"{run.memory / MIB:.1f}", params(run.trainable), "-",
               f"untuned model: {run.extra['before']:.1%}", {"run": asdict(run)})


POSITIVE, NEGATIVE, NEUTRAL = ["good", "great", "love"], ["bad", "awful", "hate"], ["okay", "fine", "plain"]
FILLER = ["the", "day", "was", "my", "flight", "food", "and", "very", "today", "service", "crew", "seat"]


def smoke_inputs(folder: Path) -> tuple[str, str]:
    """A 2-layer random Llama with a word-level tokenizer, and 120 sentiment rows over its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = POSITIVE + NEGATIVE + NEUTRAL + FILLER + ["positive", "negative", "neutral", "Text", ":", "Label"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder / "model")
    fast.save_pretrained(folder / "model")
    rng = random.Random(0)
    rows = []
    for _ in range(120):
        label, pool = rng.choice([("positive", POSITIVE), ("negative", NEGATIVE), ("neutral", NEUTRAL)])
        words = rng.sample(FILLER, 4) + [rng.choice(pool)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    data = folder / "sentiment.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "model"), str(data)


def make_setup(args: argparse.Namespace, folder: Path) -> Setup:
    if not args.smoke:
        return Setup(steps=args.steps, seed=args.seed)
    model, data = smoke_inputs(folder)
    return Setup(steps=2, seed=args.seed, smoke=True, model=model, data=data, rank=4, eval_size=20,
                 flexora_search=1, flexora_val=8, colora_probe=2, int21_batches=2, galore_rank=8, sltrain_steps=2,
                 sltrain_hidden=32, sltrain_layers=2, sltrain_rank=4, sltrain_batch=4)


def append_json(path: Path, name: str, setup: Setup, rows: Sequence[Row]) -> None:
    with path.open("a") as f:
        for r in rows:
            record = {"row": "lora" if r.against == "-" else name, "steps": setup.steps, "seed": setup.seed,
                      "smoke": setup.smoke, **asdict(r)}
            f.write(json.dumps(record, default=str) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(MECHANISMS), help=f"rows, comma-separated: {', '.join(MECHANISMS)}")
    parser.add_argument("--steps", type=int, default=45, help="training steps of every embedded-task run (and LREC)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, synthetic rows, 2 steps: code paths")
    parser.add_argument("--output", type=Path, help="append one JSON line per row to this file")
    args = parser.parse_args()
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(MECHANISMS))
    if unknown:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(MECHANISMS)}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(make_setup(args, Path(tmp)), selected)
        for name in selected:
            started = time.perf_counter()
            new = MECHANISMS[name](bench)
            print(f"\n{name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            if bench.ran_lora and not any(r.against == "-" for r in rows):
                new.insert(0, baseline_row(bench.lora(), bench.setup.rank))
            rows.extend(new)
            if args.output:
                append_json(args.output, name, bench.setup, new)
            print(table(rows), flush=True)
    print(f"\n{'SMOKE RUN: the numbers mean nothing. ' if args.smoke else ''}One seed; accuracy differences within "
          f"{ACCURACY_NOISE:g} points and loss / perplexity differences within {100 * RELATIVE_NOISE:g}% are noise.")


if __name__ == "__main__":
    main()
