"""LoRA for educational guidance (METHODS.md entry 91): two-phase QLoRA SFT of a small instruct model as a
study-abroad advisor.

The paper fine-tunes Mistral-7B-Instruct with LoRA on a 4-bit base, first on synthetic Q&A (generated with Gemini
Pro), then on curated StudyAbroadGPT answers, and reports the training loss falling by 52.7%. Here: the embedded
SmolLM2-135M-Instruct, its linear layers stored in NF4 (``lorakit.quantize(model, "nf4")``, QLoRA's base), a LoRA
on every linear layer, and the chat-template SFT loss on the answers only (:class:`lorakit.train.tasks.SFTTask`).
Phase 1 trains on templated "synthetic" pairs built from a small fact table; phase 2 on hand-written "curated"
answers in markdown. Reported: each phase's loss on its own data before and after the phase, and its drop.

Smoke mode runs the same code path (NF4 base, LoRA, SFT task) on a tiny random Llama with a word-level tokenizer
built here. Simplified: a 135M model instead of 7B, a few dozen Q&A pairs instead of thousands, no accuracy or
formatting evaluation.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit
from lorakit.quant.model import quantized_layers
from lorakit.train.model import load_model
from lorakit.train.tasks import Example, SFTTask

FACTS = {  # country: (tuition, visa, language test, scholarship)
    "Germany": ("public universities charge almost no tuition, only a semester fee", "a national student visa",
                "TestDaF or IELTS", "DAAD scholarships"),
    "Canada": ("tuition is about 20000 to 40000 dollars a year", "a study permit", "IELTS or TOEFL",
               "Vanier and university entrance scholarships"),
    "Japan": ("national universities charge about 5000 dollars a year", "a college student visa", "JLPT or TOEFL",
              "MEXT scholarships"),
    "Netherlands": ("tuition is about 10000 to 20000 euros a year", "an MVV entry visa and residence permit",
                    "IELTS or TOEFL", "the Holland Scholarship"),
    "Australia": ("tuition is about 30000 to 45000 dollars a year", "a subclass 500 student visa",
                  "IELTS or PTE", "Australia Awards"),
}
TEMPLATES = [("How much does it cost to study in {c}?", "In {c}, {0}."),
             ("Which visa do I need to study in {c}?", "To study in {c} you need {1}."),
             ("Which language test does {c} accept?", "Universities in {c} usually accept {2}."),
             ("Are there scholarships for {c}?", "Yes: look at {3}, and at your university's own awards.")]
CURATED = [
    ("I have a 3.2 GPA. Can I still get into a master's program in Germany?",
     "Yes.\n- Many programs weigh your **grade conversion** (the modified Bavarian formula), not the raw GPA.\n"
     "- Strengthen your file with **work experience** and a clear **motivation letter**.\n"
     "- Apply to several universities: requirements differ."),
    ("How should I plan my budget for studying in Canada?",
     "Plan three parts:\n1. **Tuition**: 20000 to 40000 dollars a year.\n2. **Living costs**: show about 20000 dollars "
     "for the study permit.\n3. **Extras**: health insurance, books and travel."),
    ("What documents do I need for a Japanese university application?",
     "Prepare:\n- **Transcripts** and degree certificates\n- **JLPT or TOEFL** scores\n- A **study plan**\n"
     "- Recommendation letters\nCheck each university's deadlines: many are in autumn."),
    ("Should I choose the Netherlands or Australia for engineering?",
     "Compare:\n| | Netherlands | Australia |\n|---|---|---|\n"
     "| Tuition | 10000 to 20000 euros | 30000 to 45000 dollars |\n"
     "| Work after study | orientation year | graduate visa |\nBoth teach engineering in English."),
    ("How early should I start preparing to study abroad?",
     "Start **12 to 18 months** ahead:\n1. Choose countries and programs.\n2. Take the **language test**.\n"
     "3. Apply for **scholarships** before the program deadlines.\n4. Apply for the **visa** once admitted."),
    ("Can I work while studying in Australia?",
     "Yes, with limits:\n- Your student visa allows **48 hours per fortnight** during semesters.\n"
     "- Full time during **scheduled breaks**.\n- Keep your attendance and grades up: the visa depends on them."),
]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def synthetic_pairs() -> list[dict[str, str]]:
    """Phase 1: the templated pairs (the paper's Gemini-generated data, here from the fact table)."""
    return [{"prompt": q.format(c=c), "response": a.format(*facts, c=c)}
            for c, facts in FACTS.items() for q, a in TEMPLATES]


def curated_pairs() -> list[dict[str, str]]:
    """Phase 2: hand-written markdown answers (the paper's curated StudyAbroadGPT data)."""
    return [{"prompt": q, "response": a} for q, a in CURATED]


def tiny_model(records: list[dict[str, str]]) -> tuple[torch.nn.Module, Any]:
    """A random 2-layer Llama and a word-level tokenizer with a chat template that knows every word of ``records``."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    text = " ".join(f"{r['prompt']} {r['response']}" for r in records) + " <|user|> <|assistant|> <|end|>"
    tokenizer.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=fast.pad_token_id)
    return LlamaForCausalLM(config), fast


def mean_loss(model: torch.nn.Module, task: SFTTask, examples: list[Example]) -> float:
    """Answer-token cross-entropy of ``examples`` (eval mode, no gradient)."""
    model.eval()
    with torch.no_grad():
        sums = [task.loss_sums(model, task.collate(examples[i:i + 8])) for i in range(0, len(examples), 8)]
    return sum(s.loss.item() for s in sums) / sum(s.count for s in sums)


def sft_phase(model: torch.nn.Module, task: SFTTask, examples: list[Example], steps: int, batch: int, lr: float,
              rng: random.Random) -> tuple[float, float]:
    """``steps`` AdamW steps on random batches of ``examples``; their loss before and after."""
    before = mean_loss(model, task, examples)
    opt = torch.optim.AdamW(lorakit.trainable_parameters(model).values(), lr=lr)
    model.train()
    for _ in range(steps):
        sums = task.loss_sums(model, task.collate(rng.sample(examples, batch)))
        opt.zero_grad()
        (sums.loss / sums.count).backward()
        opt.step()
    return before, mean_loss(model, task, examples)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, seconds on one CPU thread")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per phase")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    steps = args.steps
    torch.manual_seed(0)
    rng = random.Random(0)
    begin = time.process_time()
    synthetic, curated = synthetic_pairs(), curated_pairs()
    model, tokenizer = tiny_model(synthetic + curated) if args.smoke else load_model(None)
    lorakit.quantize(model, "nf4", backend="lorakit")  # QLoRA: the base in 4-bit NormalFloat (pure PyTorch)
    lorakit.adapt(model, lorakit.LoraConfig(r=8, alpha=16, targets="all-linear"))
    task = SFTTask(tokenizer, max_length=160)
    lr = 3e-3 if args.smoke else 2e-4
    metrics: dict[str, float] = {}
    for phase, records in (("synthetic", synthetic), ("curated", curated)):
        before, after = sft_phase(model, task, task.encode(records), steps, 4, lr, rng)
        metrics.update({f"{phase}_before": before, f"{phase}_after": after, f"{phase}_drop": 1 - after / before})
        print(f"phase {phase:>9} ({len(records)} pairs, {steps} steps): loss {before:.3f} -> {after:.3f} "
              f"({-100 * metrics[f'{phase}_drop']:+.1f}%)")
    metrics["trainable"] = float(sum(p.numel() for p in lorakit.trainable_parameters(model).values()))
    metrics["nf4_layers"] = float(len(quantized_layers(model)))
    print(f"{metrics['trainable']:.0f} trainable LoRA values on {metrics['nf4_layers']:.0f} NF4 layers"
          f"  [{time.process_time() - begin:.1f} s]")
    return metrics


if __name__ == "__main__":
    main()
