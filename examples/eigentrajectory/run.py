"""EigenTrajectory (METHODS.md entry 94): forecasting multi-modal trajectories in a low-rank "ET space".

Trajectories are normalised (translated to the last observed position, rotated so the last observed heading is +x)
and flattened to vectors ``x = (x_1..x_T, y_1..y_T)``. The ET space is spanned by the top-``k`` right singular
vectors ``V_k`` of the training matrix (one for the observed part, one for the future): a trajectory is described by
``c = V_k^T x`` and rebuilt as ``V_k c``. The forecaster maps the observed descriptor to ``K`` future descriptors,
each an *anchor* (k-means centre of the training futures' descriptors) plus a predicted refinement, and a score per
mode; it is trained winner-takes-all (the mode nearest to the truth, in coordinates) plus cross-entropy on the scores.
The baseline is the same network predicting ``K`` futures in raw coordinates. Reported: minADE / minFDE over the
modes on held-out trajectories, and the ET reconstruction error against the rank (non-increasing, 0 at full rank:
the subspaces are nested) with the effective rank of the spectrum (:func:`lorakit.analysis.spectrum.effective_rank`).

Data: a synthetic agent moving at 0.3-0.6 m per step, whose future goes straight, turns left or turns right, and
speeds up or slows down. Simplified: one agent at a time (no social interactions), an MLP forecaster rather than the
paper's host models (Social-STGCNN, PECNet, ...), 6 modes rather than 20. This paper is not about adapters; lorakit
only supplies the spectrum analysis.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.analysis.spectrum import effective_rank

T_OBS, T_PRED, MODES = 8, 12, 6


def trajectories(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Observed ``(n, 8, 2)`` and future ``(n, 12, 2)`` positions, normalised."""
    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen)

    speed = 0.3 + 0.3 * rand(n, 1)
    turn = (torch.randint(0, 3, (n, 1), generator=gen) - 1) * 0.15  # straight, left or right
    curvature = torch.cat([0.03 * (2 * rand(n, 1) - 1) * torch.ones(n, T_OBS), turn + 0.02 * (2 * rand(n, 1) - 1)
                           * torch.ones(n, T_PRED)], 1)
    step = speed * torch.cat([torch.ones(n, T_OBS), torch.ones(n, T_PRED) * (0.7 + 0.6 * rand(n, 1))], 1)
    heading = 6.283 * rand(n, 1) + curvature.cumsum(1)  # a random global frame
    path = torch.stack([heading.cos(), heading.sin()], -1) * step[..., None]
    path = path.cumsum(1) + 5 * rand(n, 1, 2) + 0.02 * torch.randn(n, T_OBS + T_PRED, 2, generator=gen)
    last, before = path[:, T_OBS - 1], path[:, T_OBS - 2]
    angle = torch.atan2(*(last - before).flip(-1).unbind(-1))  # heading of the last observed step
    rot = torch.stack([torch.stack([angle.cos(), angle.sin()], -1), torch.stack([-angle.sin(), angle.cos()], -1)], 1)
    path = (path - last[:, None]) @ rot.transpose(1, 2)
    return path[:, :T_OBS], path[:, T_OBS:]


def flat(xy: Tensor) -> Tensor:
    return xy.transpose(1, 2).flatten(1)  # (n, 2T): all x then all y


def unflat(v: Tensor) -> Tensor:
    return v.view(*v.shape[:-1], 2, -1).transpose(-1, -2)  # (..., T, 2)


def et_basis(x: Tensor) -> tuple[Tensor, Tensor]:
    """Right singular vectors ``(2T, 2T)`` and singular values of the flattened training trajectories."""
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return vh.T, s


def kmeans(x: Tensor, k: int, gen: torch.Generator, iters: int = 25) -> Tensor:
    centres = x[torch.randperm(len(x), generator=gen)[:k]]
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        centres = torch.stack([x[assign == j].mean(0) if (assign == j).any() else centres[j] for j in range(k)])
    return centres


class Forecaster(nn.Module):
    """``MODES`` futures of ``d_out`` values each (+ anchors) and a score per mode from an ``d_in`` input."""

    def __init__(self, d_in: int, d_out: int, anchors: Tensor | None = None) -> None:
        super().__init__()
        self.d_out = d_out
        self.net = nn.Sequential(nn.Linear(d_in, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, MODES * (d_out + 1)))
        self.register_buffer("anchors", anchors if anchors is not None else torch.zeros(MODES, d_out))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(x).view(len(x), MODES, self.d_out + 1)
        return self.anchors + out[..., :-1], out[..., -1]


def train_and_score(model: Forecaster, inputs: Tensor, futures: Tensor, to_xy: Callable[[Tensor], Tensor], steps: int,
                    test_in: Tensor, test_fut: Tensor) -> tuple[float, float]:
    """Winner-takes-all training in coordinates; minADE / minFDE over the modes on the test set."""
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        i = torch.randint(len(inputs), (128,))
        modes, scores = model(inputs[i])
        dist = (to_xy(modes) - futures[i, None]).norm(dim=-1).mean(-1)  # (128, MODES)
        best = dist.argmin(1)
        loss = dist.gather(1, best[:, None]).mean() + 0.1 * F.cross_entropy(scores, best)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = (to_xy(model(test_in)[0]) - test_fut[:, None]).norm(dim=-1)  # (n, MODES, T_PRED)
    return err.mean(-1).min(1).values.mean().item(), err[..., -1].min(1).values.mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget, seconds on one CPU thread")
    parser.add_argument("--rank", type=int, default=6, help="ET space dimension of the observed and future parts")
    args = parser.parse_args(argv)
    if not 1 <= args.rank <= 2 * T_OBS:
        parser.error(f"--rank must be in [1, {2 * T_OBS}], got {args.rank}")
    n_train, steps = (2000, 200) if args.smoke else (20000, 4000)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    begin = time.process_time()
    obs, fut = trajectories(n_train, gen)
    test_obs, test_fut = trajectories(2000, gen)
    v_obs, _ = et_basis(flat(obs))
    v_fut, s_fut = et_basis(flat(fut))
    recon = [(unflat(flat(test_fut) @ v_fut[:, :k] @ v_fut[:, :k].T) - test_fut).norm(dim=-1).mean().item()
             for k in range(1, 2 * T_PRED + 1)]
    print("ET reconstruction error of held-out futures (m) by rank:",
          " ".join(f"{k}:{e:.3f}" for k, e in enumerate(recon, 1) if k in (1, 2, 4, 6, 8, 12, 24)),
          f"| effective rank of the spectrum {effective_rank(s_fut):.2f}")
    k = args.rank
    c_obs, c_fut = flat(obs) @ v_obs[:, :k], flat(fut) @ v_fut[:, :k]
    anchors = kmeans(c_fut, MODES, gen)
    et = Forecaster(k, k, anchors)
    et_ade, et_fde = train_and_score(et, c_obs, fut, lambda c: unflat(c @ v_fut[:, :k].T), steps,
                                     flat(test_obs) @ v_obs[:, :k], test_fut)
    raw = Forecaster(2 * T_OBS, 2 * T_PRED)
    raw_ade, raw_fde = train_and_score(raw, flat(obs), fut, unflat, steps, flat(test_obs), test_fut)
    print(f"minADE / minFDE over {MODES} modes (m): ET space (rank {k}) + anchors {et_ade:.3f} / {et_fde:.3f}, "
          f"raw coordinates {raw_ade:.3f} / {raw_fde:.3f}  [{time.process_time() - begin:.1f} s]")
    return {"et_ade": et_ade, "et_fde": et_fde, "raw_ade": raw_ade, "raw_fde": raw_fde,
            **{f"recon_rank_{r}": e for r, e in enumerate(recon, 1)}}


if __name__ == "__main__":
    main()
