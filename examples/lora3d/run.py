"""LoRA3D (METHODS.md entry 93): self-calibrating a 3D geometric model on a new scene with a per-scene LoRA, from
confidence-weighted pseudo-labels made by a robust multi-view optimisation, without ground truth.

The geometric model (a tiny bidirectional transformer, a BERT built from its config) reads one view's observations
of ``N`` scene points, ``(u, v, log apparent size)`` each, and predicts each point's depth and a confidence
``c = 1 + exp(.)``, trained as DUSt3R with ``c |log d - log d_gt| - a log c``. Pre-training scenes hold objects of
radius 0.08-0.12; the new scene's are 0.15-0.25, so the model's size-to-depth prior underestimates every depth.

Self-calibration on ``V`` views of the new scene (camera poses known here; LoRA3D estimates them too), 10% of whose
observations are wrong matches: for each point, a weighted linear least squares over all views of

    reprojection rows   (R_v[0] - u R_v[2]) X = u t_z - t_x,   (R_v[1] - v R_v[2]) X = v t_z - t_y   (weight w_vi)
    depth-prior rows    R_v[2] X + t_z = d_pred_vi                                  (weight lambda c_vi)

re-weighted (IRLS from the network's confidences, then Cauchy weights ``w = 1 / (1 + (e / s)^2)`` of the
reprojection error ``e``, ``s`` its median) to reject the wrong matches. Pseudo-labels: the depth of the fitted
point in each view, with confidence ``w``. A LoRA on the model's attention and MLP projections is trained on them
(confidence-weighted log-depth loss). Reported: the absolute relative depth error against the (unused) ground truth
on the calibration views and on held-out views of the scene, before and after, and the adapter's size.
Simplified: synthetic point scenes, known poses, 2D points in place of images.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import BertConfig, BertModel

import lorakit

N_POINTS, VIEWS, OUTLIERS = 32, 8, 0.1


def rotations(n: int, degrees: float, gen: torch.Generator) -> Tensor:
    """``(n, 3, 3)`` rotations about random axes by up to ``degrees``."""
    axis = F.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    angle = math.radians(degrees) * (2 * torch.rand(n, 1, 1, generator=gen) - 1)
    k = torch.zeros(n, 3, 3)
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    return torch.eye(3) + angle.sin() * k + (1 - angle.cos()) * k @ k


def scenes(n: int, radius: tuple[float, float], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Points ``(n, N, 3)`` in a box 2.5-5.5 m ahead of the reference camera, and their objects' radii ``(n, N)``."""
    low, high = torch.tensor([-1.5, -1.0, 2.5]), torch.tensor([1.5, 1.0, 5.5])
    points = low + (high - low) * torch.rand(n, N_POINTS, 3, generator=gen)
    return points, radius[0] + (radius[1] - radius[0]) * torch.rand(n, N_POINTS, generator=gen)


def cameras(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(R (n, 3, 3), t (n, 3))``: world -> camera, cameras up to 1 m from the reference, turned up to 10 degrees."""
    return rotations(n, 10.0, gen), 2 * torch.rand(n, 3, generator=gen) - 1


def observe(points: Tensor, radii: Tensor, rot: Tensor, t: Tensor, outliers: float,
            gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Each camera's view of each scene: features ``(..., N, 3)`` = (u, v, log size), true depth, inlier mask."""
    cam = points @ rot.transpose(-1, -2) + t[..., None, :]  # (..., N, 3)
    depth = cam[..., 2]
    uv = cam[..., :2] / depth[..., None]
    size = radii / depth * (1 + 0.05 * torch.randn(depth.shape, generator=gen))
    inlier = torch.rand(depth.shape, generator=gen) >= outliers
    uv = torch.where(inlier[..., None], uv, 0.6 * (2 * torch.rand(uv.shape, generator=gen) - 1))  # wrong matches
    return torch.cat([uv, size.log()[..., None]], -1), depth, inlier


class DepthNet(nn.Module):
    """Per-point ``(log depth, confidence)`` from one view's point set."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 32)
        self.encoder = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0), add_pooling_layer=False)
        self.head = nn.Linear(32, 2)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        out = self.head(self.encoder(inputs_embeds=self.embed(feats)).last_hidden_state)
        return out[..., 0], 1 + out[..., 1].exp()


def confident_loss(net: DepthNet, feats: Tensor, log_depth: Tensor, weight: Tensor) -> Tensor:
    """DUSt3R's confidence-aware regression on log depth, weighted per observation."""
    pred, conf = net(feats)
    return (weight * (conf * (pred - log_depth).abs() - 0.2 * conf.log())).sum() / weight.sum()


@torch.no_grad()
def pseudo_labels(feats: Tensor, rot: Tensor, t: Tensor, log_depth: Tensor, conf: Tensor, prior: float = 1e-4,
                  rounds: int = 10) -> tuple[Tensor, Tensor]:
    """Robust multi-view fit of every point: IRLS triangulation starting from the network's confidences, with its
    depths as a weak prior (which also fixes points seen well by too few views). Returns the fitted points' depths
    in each view ``(V, N)`` and the final confidence weights ``(V, N)``."""
    u, v = feats[..., 0], feats[..., 1]  # (V, N)
    r0, r1, r2 = (rot[:, None, k].expand(-1, N_POINTS, 3) for k in range(3))  # (V, N, 3)
    rows = torch.cat([r0 - u[..., None] * r2, r1 - v[..., None] * r2, r2], 0)  # (3V, N, 3)
    rhs = torch.cat([u * t[:, 2:] - t[:, :1], v * t[:, 2:] - t[:, 1:2], log_depth.exp() - t[:, 2:]], 0)
    weight = conf / conf.mean()
    for _ in range(rounds):
        w = torch.cat([weight, weight, prior * conf * weight], 0).sqrt()  # (3V, N)
        a, b = (w[..., None] * rows).transpose(0, 1), (w * rhs).T[..., None]  # (N, 3V, 3), (N, 3V, 1)
        points = torch.linalg.lstsq(a, b).solution.squeeze(-1)  # (N, 3)
        cam = points @ rot.transpose(1, 2) + t[:, None]  # (V, N, 3)
        err = (cam[..., :2] / cam[..., 2:] - feats[..., :2]).norm(dim=-1)
        weight = 1 / (1 + (err / err.median()) ** 2)
    return cam[..., 2], weight


def abs_rel(net: DepthNet, feats: Tensor, depth: Tensor, inlier: Tensor) -> float:
    """Mean |d - d_gt| / d_gt over the correct observations."""
    with torch.no_grad():
        pred = net(feats)[0].exp()
    return ((pred - depth).abs() / depth)[inlier].mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget, seconds on one CPU thread")
    args = parser.parse_args(argv)
    pre_steps, lora_steps = (150, 60) if args.smoke else (3000, 400)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    begin = time.process_time()
    net = DepthNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(pre_steps):  # pre-training on the first scene distribution, with ground truth
        feats, depth, _ = observe(*scenes(64, (0.08, 0.12), gen), *cameras(64, gen), 0.0, gen)
        loss = confident_loss(net, feats, depth.log(), torch.ones_like(depth))
        opt.zero_grad()
        loss.backward()
        opt.step()

    points, radii = scenes(1, (0.15, 0.25), gen)  # the new scene: calibration views and held-out views
    calib_cams = cameras(VIEWS, gen)
    calib = observe(points, radii, *calib_cams, OUTLIERS, gen)
    held_out = observe(points, radii, *cameras(VIEWS, gen), OUTLIERS, gen)
    with torch.no_grad():
        log_depth, conf = net(calib[0])
    labels, weight = pseudo_labels(calib[0], *calib_cams, log_depth, conf)
    inlier = calib[2]
    label_error = (weight * (labels - calib[1]).abs() / calib[1])[inlier].sum() / weight[inlier].sum()
    results = {"calib_before": abs_rel(net, *calib), "held_out_before": abs_rel(net, *held_out),
               "pseudo_label_error": label_error.item(),
               "outlier_weight": weight[~inlier].mean().item(), "inlier_weight": weight[inlier].mean().item()}

    lorakit.adapt(net, lorakit.LoraConfig(r=4, alpha=8, targets=["query", "key", "value", "dense"]), "scene")
    opt = torch.optim.AdamW(lorakit.trainable_parameters(net).values(), lr=3e-3)
    for _ in range(lora_steps):  # self-calibration: pseudo-labels only, no ground truth
        loss = confident_loss(net, calib[0], labels.log(), weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    results.update(calib_after=abs_rel(net, *calib), held_out_after=abs_rel(net, *held_out),
                   adapter_bytes=float(sum(p.numel() * p.element_size()
                                           for p in lorakit.trainable_parameters(net).values())))
    print(f"pseudo-labels: confidence-weighted AbsRel {results['pseudo_label_error']:.3f}; mean confidence weight "
          f"of wrong matches {results['outlier_weight']:.2f} vs correct ones {results['inlier_weight']:.2f}")
    print(f"depth AbsRel on the new scene: calibration views {results['calib_before']:.3f} -> "
          f"{results['calib_after']:.3f}, held-out views {results['held_out_before']:.3f} -> "
          f"{results['held_out_after']:.3f}; adapter {results['adapter_bytes'] / 1024:.1f} KiB"
          f"  [{time.process_time() - begin:.1f} s]")
    return results


if __name__ == "__main__":
    main()
