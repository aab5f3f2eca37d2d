"""EasyRef (METHODS.md entry 98): a group of reference images + an instruction, encoded by a multimodal transformer and
injected into the diffusion UNet through IP-Adapter-style decoupled cross-attention; a tuned LoRA is the baseline.

The multimodal encoder is a tiny Llama (transformers ``LlamaConfig``) reading ``[instruction tokens; patch tokens of
each reference image (a frozen patch-embedding "vision tower"); M learnable reference tokens]``; the final states of
the M reference tokens aggregate the whole group (EasyRef's reference aggregation: a fixed number of tokens whatever
the number of references). They enter every cross-attention layer of the frozen UNet through diffusers'
``IPAdapterAttnProcessor2_0``:

    out = softmax(Q K_text^T / sqrt(d)) V_text + lambda softmax(Q (W'_k R)^T / sqrt(d)) (W'_v R)

with new trainable ``W'_k, W'_v``. Trained: those projections, the reference tokens, and a LoRA on the encoder's
attention projections (``lorakit.adapt`` on the Llama). Training groups are shape x colour concepts; the evaluation
groups are held-out concepts (zero-shot, no tuning). The baseline is the tuning-based one the paper compares with: a
LoRA on the UNet fitted on each held-out group's references (one adapter per group, all groups in one batch through
``lorakit.route``). Printed: the denoising loss on held-out targets of the base UNet, of EasyRef (with the group's own
references and with another group's), and of the per-group LoRAs.

Simplified: tiny random models, one instruction ("an image like these"), synthetic 8x8 / 16x16 images, no progressive
training and no MRBench. This shows the mechanism, not the paper's quality or generalisation claims.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaModel

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _diffusion import (  # noqa: E402
    COLOURS,
    Diffusion,
    Predict,
    Prompts,
    colours_of,
    draw,
    example_parser,
    fit,
    pick,
    report,
    tiny_unet,
)

SHAPES = ("ring", "cross", "stripes", "checker")
WIDTH, QUERIES, REFERENCES, INSTRUCTION = 32, 4, 3, (3, 7)  # INSTRUCTION: its token ids


class ReferenceEncoder(nn.Module):
    """Instruction + reference images -> ``QUERIES`` aggregated reference tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.vision = nn.Conv2d(3, WIDTH, 4, stride=4).requires_grad_(False)  # stand-in for a pre-trained tower
        self.llm = LlamaModel(LlamaConfig(vocab_size=16, hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                          max_position_embeddings=128))
        self.queries = nn.Parameter(0.02 * torch.randn(QUERIES, WIDTH))

    def forward(self, references: Tensor) -> Tensor:
        """``(B, R, 3, H, W)`` references -> ``(B, QUERIES, WIDTH)``."""
        b = references.shape[0]
        patches = self.vision(references.flatten(0, 1)).flatten(2).transpose(1, 2).reshape(b, -1, WIDTH)
        words = self.llm.embed_tokens(torch.tensor(INSTRUCTION)).expand(b, -1, -1)
        sequence = torch.cat([words, patches, self.queries.expand(b, -1, -1)], dim=1)
        return self.llm(inputs_embeds=sequence).last_hidden_state[:, -QUERIES:]


def add_reference_attention(unet: nn.Module) -> list[nn.Parameter]:
    """Give every cross-attention layer a decoupled reference branch; its new (trainable) parameters."""
    new = []
    for attn in unet.modules():
        if isinstance(attn, Attention) and attn.is_cross_attention:
            attn.set_processor(IPAdapterAttnProcessor2_0(attn.to_k.out_features, attn.to_k.in_features, QUERIES))
            new += list(attn.processor.parameters())
    if not new:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layer to add a reference branch to")
    return new


def set_reference_scale(unet: nn.Module, scale: float) -> None:
    """``lambda`` of every reference branch (0: the branch is skipped)."""
    for attn in unet.modules():
        if isinstance(attn, Attention) and isinstance(attn.processor, IPAdapterAttnProcessor2_0):
            attn.processor.scale = [scale]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    args = parser.parse_args(argv)
    smoke = args.smoke
    size, pre_steps, steps, tune_steps, batch = (8, 10, 30, 15, 8) if smoke else (16, 300, 400, 100, 16)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    concepts = [(s, c) for c in COLOURS for s in SHAPES]  # 24 groups; 5 held out, each of whose shape and colour
    held = [i for i in range(len(concepts)) if i % 5 == 0]  # occur in other, training groups
    train = [i for i in range(len(concepts)) if i % 5 != 0]
    pool = torch.stack([draw([s] * 16, colours_of([c] * 16), size, gen, noise=0.05) for s, c in concepts])

    def group(ids: Tensor) -> tuple[Tensor, Tensor]:
        """References ``(B, R, 3, H, W)`` and one target ``(B, 3, H, W)`` per group id, distinct pool images."""
        picks = torch.stack([torch.randperm(16, generator=gen)[: REFERENCES + 1] for _ in ids])
        images = pool[ids[:, None], picks]
        return images[:, :REFERENCES], images[:, REFERENCES]

    instruction = Prompts(1, WIDTH)  # the instruction, as the UNet's text condition
    prompt = lambda n: instruction(torch.ones(n, dtype=torch.long))
    unet = tiny_unet(smoke, cross_dim=WIDTH, seed=args.seed)
    diffusion = Diffusion()
    generic_ids = torch.randint(0, len(concepts), (256,), generator=gen)
    generic = pool[generic_ids, torch.randint(0, 16, (256,), generator=gen)]
    plain = lambda model: (lambda x, t: model(x, t, prompt(len(x))).sample)
    fit(unet.parameters(), lambda s: diffusion.loss(plain(unet), generic[pick(256, batch, gen)], gen), pre_steps,
        lr=1e-3)
    unet.requires_grad_(False)
    baseline = copy.deepcopy(unet)  # the baseline's UNet: the same base, for the per-group LoRAs

    per_group, order = 4 if smoke else 8, torch.randperm(16, generator=gen)  # each held-out group: one reference
    eval_ids = torch.tensor(held).repeat_interleave(per_group)  # set and `per_group` other images as targets
    eval_refs = pool[torch.tensor(held)][:, order[:REFERENCES]].repeat_interleave(per_group, 0)
    eval_targets = pool[eval_ids, order[REFERENCES: REFERENCES + per_group].repeat(len(held))]
    other_refs = eval_refs.roll(per_group, dims=0)  # the previous held-out group's references

    def held_loss(predict: Predict) -> float:  # the same noise for every model
        with torch.no_grad():
            return diffusion.loss(predict, eval_targets, torch.Generator().manual_seed(1234)).item()

    base_loss = held_loss(plain(unet))
    encoder = ReferenceEncoder()
    lorakit.adapt(encoder.llm, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
    branch = add_reference_attention(unet)
    with_refs = lambda refs: (lambda x, t: unet(x, t, (prompt(len(x)), [encoder(refs)])).sample)
    set_reference_scale(unet, 0.0)  # lambda = 0: exactly the base UNet
    zero_branch_gap = abs(held_loss(with_refs(eval_refs)) - base_loss)
    set_reference_scale(unet, 1.0)

    def easyref_step(step: int) -> Tensor:
        refs, targets = group(torch.tensor(train)[pick(len(train), batch, gen)])
        return diffusion.loss(with_refs(refs), targets, gen)

    trained = [*branch, encoder.queries, *lorakit.trainable_parameters(encoder.llm).values()]
    fit(trained, easyref_step, steps, lr=2e-3)
    easyref, wrong = held_loss(with_refs(eval_refs)), held_loss(with_refs(other_refs))

    names = [f"group_{i}" for i in held]
    for name in names:
        lorakit.adapt(baseline, lorakit.LoraConfig(r=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0"]), name)
    adapter_of = lambda ids: [names[held.index(i)] for i in ids.tolist()]

    def tune_step(step: int) -> Tensor:  # each held-out group's LoRA on that group's own references
        i, r = pick(len(eval_ids), batch, gen), torch.randint(0, REFERENCES, (batch,), generator=gen)
        with lorakit.route(baseline, adapter_of(eval_ids[i])):
            return diffusion.loss(plain(baseline), eval_refs[i, r], gen)

    fit(lorakit.trainable_parameters(baseline).values(), tune_step, tune_steps, lr=3e-3)
    with lorakit.route(baseline, adapter_of(eval_ids)):
        lora = held_loss(plain(baseline))
    return report(f"EasyRef: {REFERENCES} references -> {QUERIES} tokens, held-out groups", {
        "zero_branch_gap": zero_branch_gap, "loss_base": base_loss, "loss_easyref": easyref,
        "loss_easyref_wrong_refs": wrong, "loss_lora_per_group": lora})


if __name__ == "__main__":
    main()
