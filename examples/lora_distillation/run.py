"""LoRA-Enhanced Distillation (METHODS.md entry 92): a guided teacher distilled into the same base plus a LoRA.

The teacher is the base UNet with classifier-free guidance, two evaluations per denoising step, run inside
``lorakit.disable(unet)`` (the adapter switched off: the frozen base weights only):

    eps_teacher = eps_W(x_t, t, null) + w (eps_W(x_t, t, c) - eps_W(x_t, t, null))

The student is the *same module* with its LoRA on (attention projections and ResNet convolutions), one evaluation:
``eps_student = eps_{W+BA}(x_t, t, c)``, trained on ``||eps_student - eps_teacher||^2``. No second copy of the UNet
exists: the script records (a ``TorchDispatchMode`` watching every operator) the storages of the parameters each pass
actually reads, checks that the teacher reads no storage the student does not, and compares the parameter memory of
teacher + student with that of a deep-copied teacher beside an adapted student. Printed: the teacher's match with the
base model before adaptation, the distillation loss before/after, the memory figures and the per-step time of the
guided teacher (two evaluations) vs the student (one).

Simplified: a tiny random UNet pre-trained for a few hundred steps on synthetic class-conditional shapes with 10%
condition dropout (so it has an unconditional mode), pixel space, no image-quality or prompt-alignment metrics. This
shows the mechanism (the paper's memory and time accounting), not its image-quality claims.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _diffusion import (  # noqa: E402
    COLOURS,
    SHAPES,
    Diffusion,
    Prompts,
    at_least,
    colours_of,
    draw,
    example_parser,
    fit,
    pick,
    report,
    timed,
    tiny_unet,
)


class StorageLog(TorchDispatchMode):
    """Records the storage address of every tensor an operator reads while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        for a in [*args, *(kwargs or {}).values()]:
            for t in a if isinstance(a, (list, tuple)) else [a]:
                if isinstance(t, Tensor):
                    self.seen.add(t.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def parameter_storages(model: torch.nn.Module, run: Callable[[], object]) -> dict[int, int]:
    """``{storage address: bytes}`` of the parameters of ``model`` that ``run()`` reads."""
    params = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    with torch.no_grad(), StorageLog() as log:
        run()
    return {ptr: size for ptr, size in params.items() if ptr in log.seen}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = example_parser(__doc__)
    parser.add_argument("--guidance", type=at_least(0.0), default=3.0, help="the teacher's guidance weight w")
    args = parser.parse_args(argv)
    smoke = args.smoke
    size, pre_steps, distil_steps, batch = (8, 15, 20, 8) if smoke else (16, 300, 300, 16)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    classes = torch.randint(0, len(SHAPES), (512,), generator=gen)  # class k: SHAPES[k] in the k-th colour
    images = draw([SHAPES[k] for k in classes], colours_of([list(COLOURS)[k] for k in classes]), size, gen, noise=0.05)
    prompts = Prompts(len(SHAPES), dim=32)
    unet = tiny_unet(smoke, cross_dim=32, seed=args.seed)
    diffusion = Diffusion()

    def pretrain_step(step: int) -> Tensor:
        i = pick(len(classes), batch, gen)
        keep = torch.rand(batch, generator=gen) > 0.1  # 10% unconditional (prompt 0) for guidance
        p = torch.where(keep, classes[i] + 1, 0)
        return diffusion.loss(lambda x, t: unet(x, t, prompts(p)).sample, images[i], gen)

    def guided(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """Classifier-free guidance: the conditional and unconditional evaluations (as one batch of 2B rows, as
        diffusers pipelines run them), combined with weight w."""
        both = prompts(torch.cat([c + 1, torch.zeros_like(c)]))
        cond, uncond = unet(torch.cat([x, x]), torch.cat([t, t]), both).sample.chunk(2)
        return uncond + args.guidance * (cond - uncond)

    def teacher(x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        with torch.no_grad(), lorakit.disable(unet):
            return guided(x, t, c)

    student = lambda x, t, c: unet(x, t, prompts(c + 1)).sample

    fit(unet.parameters(), pretrain_step, pre_steps, lr=1e-3)
    unet.eval()
    c_held = torch.arange(len(SHAPES)).repeat(3)
    x_held, t_held, _ = diffusion.noised(images[: len(c_held)], torch.Generator().manual_seed(1234))
    with torch.no_grad():
        base_guided = guided(x_held, t_held, c_held)  # the plain base model, before any adapter exists
    lorakit.adapt(unet, lorakit.LoraConfig(r=4, alpha=8, targets=["to_q", "to_k", "to_v", "to_out.0", "conv1",
                                                                    "conv2"]))
    held_loss = lambda: (student(x_held, t_held, c_held) - teacher(x_held, t_held, c_held)).pow(2).mean().item()
    with torch.no_grad():
        before = held_loss()
    teacher_gap = (teacher(x_held, t_held, c_held) - base_guided).abs().max().item()

    def distil_step(step: int) -> Tensor:
        i = pick(len(classes), batch, gen)
        x_t, t, _ = diffusion.noised(images[i], gen)
        return (student(x_t, t, classes[i]) - teacher(x_t, t, classes[i])).pow(2).mean()

    unet.train()
    fit(lorakit.trainable_parameters(unet).values(), distil_step, distil_steps, lr=3e-3)
    unet.eval()
    with torch.no_grad():
        after = held_loss()
    read_teacher = parameter_storages(unet, lambda: teacher(x_held, t_held, c_held))
    read_student = parameter_storages(unet, lambda: student(x_held, t_held, c_held))
    lora = {p.untyped_storage().data_ptr() for p in lorakit.trainable_parameters(unet).values()}
    shared_bytes = sum({**read_teacher, **read_student}.values())  # teacher + student, one base
    copy_bytes = shared_bytes + sum(read_teacher.values())  # plus a deep-copied teacher
    with torch.no_grad():
        teacher_ms = timed(lambda: teacher(x_held, t_held, c_held))
        student_ms = timed(lambda: student(x_held, t_held, c_held))
    return report(f"LoRA-Enhanced Distillation: guided teacher (w={args.guidance}) -> base + LoRA student", {
        "teacher_vs_base_max_diff": teacher_gap, "distill_loss_before": before, "distill_loss_after": after,
        "base_tensors_shared": len(read_teacher.keys() & read_student.keys()),
        "teacher_only_tensors": len(read_teacher.keys() - read_student.keys()),
        "student_only_tensors_not_lora": len(read_student.keys() - read_teacher.keys() - lora),
        "memory_shared_mb": shared_bytes / 2 ** 20, "memory_with_copy_mb": copy_bytes / 2 ** 20,
        "memory_ratio": shared_bytes / copy_bytes, "teacher_step_ms": teacher_ms, "student_step_ms": student_ms})


if __name__ == "__main__":
    main()
