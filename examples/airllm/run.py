"""AirLLM (METHODS.md entry 32): a PPO + diffusion policy picks per-module LoRA ranks for a wireless channel's SNR.

The action is a rank vector ``r`` over every LoRA-inserted projection of a tiny Llama (levels 0/1/2/4/8). Reward:

    R(r, snr) = q(r) - c * bytes(r) / bytes_ref / log2(1 + snr),     bytes(r) = sum_i r_i (d_in,i + d_out,i) * 4

``q`` is a fine-tuning quality proxy: the task is a teacher made by planting low-rank updates ``Delta_i`` in a few
projections, and ``q(r) = sum_i sum_{k <= r_i} s_ik^2 / sum_ik s_ik^2`` is the share of their energy a rank-``r_i``
LoRA can hold (Eckart-Young). As in the paper, PPO makes the coarse decision (a PPO actor maps the SNR to one rank
level per transformer block: clipped ratio objective, critic baseline) and a DDIM denoiser refines it into a
per-module vector. The denoiser is fitted on random refinements of PPO's actions, conditioned on the SNR, the coarse
vector and on whether the refinement beat the coarse reward, with classifier-free guidance (condition dropped 20% of
the time); the two are trained alternately. At decision time the coarse vector is noised half-way and denoised
with guidance towards "better" (SDEdit-style), then rounded to the levels. lorakit builds the adapter from the
chosen vector (:func:`lorakit.rank.airllm.rank_vector`) and distils the teacher into it; the same for a uniform rank.

Simplified: the state is the SNR alone (no linguistic-complexity feature), the channel is a Shannon rate, the policy
and denoiser are small MLPs, the reward is separable per module (so an exact optimum is printed), and the task is a
planted update on a random-weight Llama rather than remote fine-tuning of a real LLM.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.rank.airllm import RankVector, rank_vector, target_geometries

LEVELS = torch.tensor([0, 1, 2, 4, 8])
PLANTED = {"model.layers.0.self_attn.q_proj": [1.6, 1.2, 0.9, 0.7, 0.5, 0.4, 0.3, 0.2],
           "model.layers.1.mlp.down_proj": [1.4, 1.0, 0.7, 0.5], "model.layers.0.self_attn.o_proj": [1.0, 0.6]}
COST, UNIFORM, STEPS_T, JUMP = 10.0, 4, 50, 5  # cost of bytes_ref at 1 bit/s/Hz; uniform rank; diffusion steps
TOP = len(LEVELS) - 1


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1))


def plant(base: nn.Module) -> nn.Module:
    """The teacher: ``W_i + U diag(s_i) V^T`` (random orthonormal ``U``, ``V``) on the planted projections."""
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for path, s in PLANTED.items():
            w = teacher.get_submodule(path).weight
            u, v = (torch.linalg.qr(torch.randn(n, len(s)))[0] for n in w.shape)
            w += u @ torch.diag(torch.tensor(s)) @ v.T
    return teacher


class Task:
    """Quality proxy, bytes and reward of level indices ``(batch, modules)``."""

    def __init__(self, model: nn.Module) -> None:
        geometries = target_geometries(model)
        self.paths = list(geometries)
        self.block = torch.tensor([int(p.split(".")[2]) for p in self.paths])  # module -> transformer block
        width = torch.tensor([float(g.d_in + g.d_out) for g in geometries.values()])
        self.bytes_per_level = 4 * width[:, None] * LEVELS[None].float()  # (M, L)
        self.bytes_ref = float(self.bytes_per_level[:, -1].sum())
        energy = torch.zeros(len(self.paths), int(LEVELS[-1]) + 1)  # energy a rank 0..8 LoRA captures
        for path, s in PLANTED.items():
            energy[self.paths.index(path), 1:len(s) + 1] = (torch.tensor(s) ** 2).cumsum(0)
        energy = torch.cummax(energy, 1).values
        self.quality_per_level = energy[:, LEVELS] / energy[:, -1].sum()  # (M, L)

    def per_module(self, snr_db: Tensor) -> Tensor:
        """``(batch, M, L)``: each level's reward on each module (the reward is the sum over modules)."""
        rate = torch.log2(1 + 10 ** (snr_db / 10))[:, None, None]
        return self.quality_per_level - COST * self.bytes_per_level / self.bytes_ref / rate

    def reward(self, idx: Tensor, snr_db: Tensor) -> Tensor:
        return self.per_module(snr_db).gather(2, idx[..., None]).squeeze(2).sum(1)

    def bytes(self, idx: Tensor) -> Tensor:
        return self.bytes_per_level.gather(1, idx.T).T.sum(-1)


def mlp(d_in: int, d_out: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, d_out))


ALPHA_BAR = torch.cumprod(1 - torch.linspace(1e-4, 0.2, STEPS_T), 0)
Sample = tuple[Tensor, Tensor, Tensor, Tensor]  # snr, coarse level per module, refined level per module, better?


def scaled(idx: Tensor) -> Tensor:
    return idx.float() / TOP * 2 - 1


def denoiser_input(x: Tensor, t: Tensor, snr: Tensor, coarse: Tensor, better: Tensor, keep: Tensor) -> Tensor:
    return torch.cat([x, scaled(coarse), t[:, None] / STEPS_T, snr[:, None] / 20, (better * keep)[:, None],
                      keep[:, None]], 1)


def ppo_round(actor: nn.Module, critic: nn.Module, opt: torch.optim.Optimizer, task: Task, iters: int,
              batch: int, buffer: list[Sample]) -> None:
    """PPO on one-step episodes (a fresh SNR each); every coarse action also gets a random refinement for the
    denoiser's data, labelled by whether it beat the coarse reward."""
    blocks = int(task.block.max()) + 1
    for _ in range(iters):
        snr = torch.rand(batch) * 20
        state = snr[:, None] / 20
        with torch.no_grad():
            dist = torch.distributions.Categorical(logits=actor(state).view(batch, blocks, -1))
            action = dist.sample()
            old_logp = dist.log_prob(action).sum(1)
            coarse = action[:, task.block]  # (batch, M)
            reward = task.reward(coarse, snr)
            advantage = reward - critic(state).squeeze(1)
            fine = (coarse + torch.randn(coarse.shape) * 1.5).round().long().clamp(0, TOP)
        buffer.append((snr, coarse, fine, (task.reward(fine, snr) > reward).float()))
        for _ in range(4):
            dist = torch.distributions.Categorical(logits=actor(state).view(batch, blocks, -1))
            ratio = (dist.log_prob(action).sum(1) - old_logp).exp()
            clipped = torch.minimum(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
            loss = -clipped.mean() + F.mse_loss(critic(state).squeeze(1), reward) - 0.01 * dist.entropy().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


def fit_denoiser(den: nn.Module, opt: torch.optim.Optimizer, buffer: list[Sample], steps: int) -> None:
    """Epsilon prediction on the refinements (levels scaled to [-1, 1]); "better" dropped 20% of the time."""
    snr, coarse, fine, better = (torch.cat(parts) for parts in zip(*buffer))
    for _ in range(steps):
        i, t = torch.randint(len(snr), (256,)), torch.randint(STEPS_T, (256,))
        noise, ab = torch.randn(256, fine.shape[1]), ALPHA_BAR[t][:, None]
        xt = ab.sqrt() * scaled(fine[i]) + (1 - ab).sqrt() * noise
        keep = (torch.rand(256) > 0.2).float()
        loss = F.mse_loss(den(denoiser_input(xt, t.float(), snr[i], coarse[i], better[i], keep)), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def refine(den: nn.Module, coarse: Tensor, snr: Tensor, guidance: float = 3.0, start: int = STEPS_T // 2,
           draws: int = 8) -> Tensor:
    """DDIM from the coarse vector noised to step ``start``, guided towards "better"; the mean of ``draws`` runs,
    rounded to the levels."""
    coarse, snr = coarse.repeat_interleave(draws, 0), snr.repeat_interleave(draws, 0)
    x = ALPHA_BAR[start].sqrt() * scaled(coarse) + (1 - ALPHA_BAR[start]).sqrt() * torch.randn(coarse.shape)
    ones, zeros = torch.ones(len(x)), torch.zeros(len(x))
    for t in range(start, -1, -JUMP):
        tt = torch.full((len(x),), float(t))
        eps_u = den(denoiser_input(x, tt, snr, coarse, zeros, zeros))
        eps = eps_u + guidance * (den(denoiser_input(x, tt, snr, coarse, ones, ones)) - eps_u)
        x0 = ((x - (1 - ALPHA_BAR[t]).sqrt() * eps) / ALPHA_BAR[t].sqrt()).clamp(-1, 1)
        prev = ALPHA_BAR[t - JUMP] if t >= JUMP else torch.tensor(1.0)
        x = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
    return ((x0.view(-1, draws, x0.shape[1]).mean(1) + 1) / 2 * TOP).round().long()


def distil(base: nn.Module, teacher: nn.Module, vector: RankVector, steps: int) -> tuple[float, float]:
    """KL(teacher || student) on random tokens before and after training a LoRA of ``vector``'s ranks."""
    student = copy.deepcopy(base)
    lorakit.adapt(student, vector.config(alpha=2.0, init="gaussian"))
    opt = torch.optim.Adam(lorakit.trainable_parameters(student).values(), lr=5e-3)
    ids = torch.randint(0, 64, (16, 12))
    with torch.no_grad():
        target = F.log_softmax(teacher(ids).logits, -1)
    kls = []
    for _ in range(steps + 1):
        kl = F.kl_div(F.log_softmax(student(ids).logits, -1), target, log_target=True, reduction="batchmean")
        kls.append(kl.item())
        opt.zero_grad()
        kl.backward()
        opt.step()
    return kls[0], kls[-1]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget, seconds on one CPU thread")
    parser.add_argument("--snr", type=float, default=10.0, help="channel SNR (dB) the adapter is sent over")
    args = parser.parse_args(argv)
    rounds, iters, den_steps, distil_steps = (5, 20, 150, 20) if args.smoke else (20, 50, 1000, 300)
    torch.manual_seed(0)
    begin = time.process_time()
    base = tiny_llama().eval()
    teacher, task = plant(base), Task(base)
    m, blocks = len(task.paths), int(task.block.max()) + 1
    actor, critic, den = mlp(1, blocks * len(LEVELS)), mlp(1, 1), mlp(2 * m + 4, m, 128)
    ppo_opt = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=3e-3)
    den_opt = torch.optim.Adam(den.parameters(), lr=2e-3)
    snr = torch.tensor([0.0, 10.0, 20.0, args.snr])

    buffer: list[Sample] = []
    for _ in range(rounds):  # alternate: PPO on the channel, then the denoiser on refinements of PPO's actions
        ppo_round(actor, critic, ppo_opt, task, iters, 64, buffer)
        fit_denoiser(den, den_opt, buffer, den_steps)
    with torch.no_grad():
        coarse = actor(snr[:, None] / 20).view(len(snr), blocks, -1).argmax(-1)[:, task.block]
    refined = refine(den, coarse, snr)
    oracle = task.per_module(snr).argmax(2)
    uniform = torch.full_like(coarse, int((LEVELS == UNIFORM).nonzero()))
    rows = {"PPO (coarse)": coarse, "PPO+DDIM": refined, "optimum": oracle, f"uniform r={UNIFORM}": uniform}
    for label, idx in rows.items():
        print(f"{label:>13}: reward at SNR 0/10/20/{args.snr:g} dB "
              + " / ".join(f"{r:+.3f}" for r in task.reward(idx, snr)) + "   bytes "
              + " / ".join(f"{b:.0f}" for b in task.bytes(idx).tolist()))
    chosen = {p: int(LEVELS[i]) for p, i in zip(task.paths, refined[-1])}
    print(f"ranks at {args.snr:g} dB:", {p.removeprefix("model."): r for p, r in chosen.items() if r})
    policy_vec, uniform_vec = rank_vector(base, chosen), rank_vector(base, lambda *_: UNIFORM)
    kl_base, kl_policy = distil(base, teacher, policy_vec, distil_steps)
    _, kl_uniform = distil(base, teacher, uniform_vec, distil_steps)
    reward = {k: task.reward(v, snr) for k, v in rows.items()}
    metrics = {"reward_ppo": reward["PPO (coarse)"][-1].item(), "reward_ppo_ddim": reward["PPO+DDIM"][-1].item(),
               "reward_optimum": reward["optimum"][-1].item(),
               "bytes_policy": float(policy_vec.total_bytes()), "bytes_uniform": float(uniform_vec.total_bytes()),
               "bytes_snr0": task.bytes(refined)[0].item(), "bytes_snr20": task.bytes(refined)[2].item(),
               "kl_base": kl_base, "kl_policy": kl_policy, "kl_uniform": kl_uniform}
    print(f"lorakit adapter at {args.snr:g} dB: {metrics['bytes_policy']:.0f} bytes (uniform r={UNIFORM}: "
          f"{metrics['bytes_uniform']:.0f}); KL to teacher {kl_base:.4f} -> {kl_policy:.4f} (uniform: {kl_uniform:.4f})"
          f"  [{time.process_time() - begin:.1f} s]")
    return metrics


if __name__ == "__main__":
    main()
