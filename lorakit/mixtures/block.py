"""Block-level mixtures of LoRA experts: MixLoRA, LLaVA-MoLE, MoLA.

MixLoRA (Li et al. 2024, METHODS.md entry 44) turns a frozen FFN into a sparse mixture of experts whose experts share
the FFN's frozen weights and differ by their own LoRA on its projections (gate / up / down):

    y_t = sum_{i in topk(x_t)} w_{t,i} FFN_i(x_t)        FFN_i = the FFN with expert i's adapters,
    w_t = renormalised top-k of softmax(G x_t)

with a Switch load-balance loss ``E sum_i f_i P_i``. LLaVA-MoLE (entry 45) is the same layer with ``k = 1``;
MoLA (entry 46) gives block ``l`` its own number of experts ``N_l`` (more in higher layers). The experts are ordinary
lorakit adapters named ``<name>_0 .. <name>_{E-1}`` on the block's linear layers (any method of the catalogue), the
router a :class:`~lorakit.routing.routers.GateRouter` registered on the model as ``lorakit_routers.<name>``.

Dispatch: ``"sparse"`` (default) runs the FFN once per routed (token, expert) pair -- ``k`` rows per token, whatever
the number of experts -- in one batched call whose rows are grouped by expert and carry its name (the per-row
routing of :class:`~lorakit.routing.rows.RowRouting`: one grouped product per layer for LoRA-family experts, no
scatter), then each token sums its ``k`` rows; ``"dense"`` runs every expert's FFN on every token (the reference,
``E`` rows per token).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import LorakitError, require
from ..hosts.geometry import is_linear_like
from ..hosts.host import HostLayer
from ..inject import _replace, adapt, using
from ..mixing import add_router
from ..routing.routers import GateRouter
from ..routing.rows import RowRouting
from ..routing.weighted import DISPATCHES


class ExpertBlock(nn.Module):
    """Wraps a block (an FFN): ``y = sum_i w_i(x) block_i(x)`` over expert adapters ``experts`` (see module doc)."""

    def __init__(self, block: nn.Module, path: str, experts: Sequence[str], router: GateRouter,
                 dispatch: str = "sparse") -> None:
        super().__init__()
        require(dispatch in DISPATCHES, "dispatch", dispatch, f"must be one of {DISPATCHES}")
        self.block, self.path, self.experts, self.dispatch = block, path, list(experts), dispatch
        self.__dict__["router"] = router  # owned by the model's lorakit_routers, not a child of every block

    def extra_repr(self) -> str:
        return f"experts={len(self.experts)}, top_k={self.router.top_k}, dispatch={self.dispatch!r}"

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights = self.router(self.path, flat)  # (N, E), zero outside each token's experts
        if self.dispatch == "dense":
            out = None
            for i, name in enumerate(self.experts):
                y = self._run(flat, [name] * flat.shape[0], *args, **kwargs)
                out = weights[:, i:i + 1].to(y.dtype) * y if out is None else out + weights[:, i:i + 1] * y
            return out.reshape(*x.shape[:-1], out.shape[-1])
        k = self.router.top_k or len(self.experts)
        kept, expert = weights.topk(k, dim=-1)  # (N, k): each token's routed experts and weights
        order = expert.reshape(-1).argsort(stable=True)  # the (token, expert) pairs grouped by expert
        names = [self.experts[e] for e in expert.reshape(-1).index_select(0, order).tolist()]
        y = self._run(flat.index_select(0, order // k), names, *args, **kwargs)  # (N k, d_out), by expert
        y = y.index_select(0, order.argsort()).view(flat.shape[0], k, -1)  # back to (token, expert) order
        out = (y * kept.unsqueeze(-1).to(y.dtype)).sum(1)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _run(self, rows: Tensor, names: list[str], *args: Any, **kwargs: Any) -> Tensor:
        """The block on ``rows`` (one token each), every row through its own expert's adapters."""
        with using(self.block, RowRouting(names)):
            return self.block(rows.unsqueeze(1), *args, **kwargs).squeeze(1)


def expert_names(name: str, n: int) -> list[str]:
    """The adapter names of a mixture's ``n`` experts."""
    return [f"{name}_{i}" for i in range(n)]


def add_expert_blocks(model: nn.Module, name: str, config: AdapterConfig, experts: int | dict[str, int],
                      top_k: int = 2, blocks: str = "mlp", dispatch: str = "sparse", **router_options: Any
                      ) -> GateRouter:
    """Turn every block of ``model`` whose module name is ``blocks`` (``"mlp"``: Llama / Qwen / Mistral FFNs) into an
    :class:`ExpertBlock` with experts of ``config``'s method on its linear layers (``config.targets`` inside the
    block, or all of them with ``"all-linear"``), and a top-``k`` :class:`GateRouter` named ``name``.

    ``experts``: one count for every block (MixLoRA, LLaVA-MoLE) or ``{block path: count}`` (MoLA: e.g. more in
    higher layers); block ``l`` holds experts ``<name>_0 .. <name>_{N_l - 1}``. ``router_options``: ``balance``
    (Switch load-balance coefficient), ``z_loss``, ``noisy``, ``hard``, ``temperature``. Returns the router.
    """
    found = {path: m for path, m in model.named_modules() if path.rpartition(".")[2] == blocks
             and not isinstance(m, ExpertBlock)}
    if not found:
        raise LorakitError(f"no module of this model is named {blocks!r}; give `blocks` the name of its FFN blocks "
                           f"(e.g. 'mlp')")
    counts = {p: experts for p in found} if isinstance(experts, int) else dict(experts)
    require(set(counts) == set(found) and all(isinstance(c, int) and c >= 1 for c in counts.values()), "experts",
            experts, f"must be a positive count or one for each block: {sorted(found)[:4]}...")
    widths = {p: _input_width(p, m) for p, m in found.items()}
    router = GateRouter(max(counts.values()), widths, top_k, experts=counts, **router_options)
    names = expert_names(name, router.n)
    for i, expert in enumerate(names):
        paths = [p for p in found if counts[p] > i]
        adapt(model, config.replace(targets=_targets(config, {p: found[p] for p in paths})), expert)
    w = next(next(iter(found.values())).parameters())
    add_router(model, name, router.to(device=w.device, dtype=w.dtype if w.is_floating_point() else None))
    for path, block in found.items():
        _replace(model, path, ExpertBlock(block, path, names[: counts[path]], router, dispatch))
    return router


def _input_width(path: str, block: nn.Module) -> int:
    first = next((m for m in block.modules() if is_linear_like(m)), None)
    if first is None:
        raise LorakitError(f"block {path!r} has no linear layer to hold experts")
    return first.in_features if isinstance(first, nn.Linear) else first.weight.shape[0]


def _targets(config: AdapterConfig, blocks: dict[str, nn.Module]) -> tuple[str, ...]:
    """``config.targets`` restricted to the layers inside ``blocks``, as full paths."""
    inside = [f"{path}.{sub}" for path, block in blocks.items() for sub, m in block.named_modules()
              if sub and (is_linear_like(m) or isinstance(m, HostLayer))
              and not any(sub.startswith(h + ".") for h in _hosted(block))]
    if config.targets == "all-linear":
        return tuple(inside)
    if isinstance(config.targets, str):
        raise LorakitError("experts take `targets` as layer names inside the block (e.g. ['gate_proj', 'up_proj', "
                           "'down_proj']) or 'all-linear', not a regular expression")
    chosen = tuple(p for p in inside if any(p.endswith("." + t) for t in config.targets))
    if not chosen:
        raise LorakitError(f"none of the targets {list(config.targets)} is a linear layer inside the blocks; "
                           f"they hold: {sorted({p.rpartition('.')[2] for p in inside})}")
    return chosen


def _hosted(block: nn.Module) -> list[str]:
    return [sub for sub, m in block.named_modules() if isinstance(m, HostLayer)]


def expert_blocks(model: nn.Module) -> list[ExpertBlock]:
    """Every :class:`ExpertBlock` of ``model``."""
    return [m for m in model.modules() if isinstance(m, ExpertBlock)]
