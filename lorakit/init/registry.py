"""The initialiser registry: weight-based and data-driven initialisations of low-rank factors.

An initialiser turns a layer's weight (PiSSA, OLoRA, NLoRA, LoftQ) or statistics gathered on data (LoRA-GA, EVA,
LoRA-SB) into :class:`Factors`: the factors the adapter starts from and how the frozen base changes. Methods with
low-rank factors accept any registered name whose :attr:`Initialiser.form` matches their parametrisation
(``"BA"``: LoRA, DoRA, LoRA-FA; ``"BMA"``: LoRA-XS, SLoRA). This module imports no method.

Every matrix here is in the *factor layout* ``(rows, cols)`` with ``delta = B @ A`` of shape ``(rows, cols)``:
``(d_out, d_in)`` for linear layers, ``(d_out, d_in * prod(kernel))`` for convolutions, ``(dim, num_embeddings)``
for embeddings (see :mod:`lorakit.init.layout`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from ..errors import require
from ..registry import Registry


@dataclass(frozen=True)
class Factors:
    """What an initialiser produces for one layer (factor layout).

    Attributes:
        b: ``(rows, r)`` up factor.
        a: ``(r, cols)`` down factor.
        m: ``(r, r)`` middle factor of three-factor methods (``delta = s * B M A``), else ``None``.
        compensate: rewrite the base to ``W - s * B M A`` so the adapted layer starts equal to the base layer.
        base: a replacement base weight (LoftQ's quantised weight), factor layout; excludes ``compensate``.
    """

    b: Tensor  # (rows, r)
    a: Tensor  # (r, cols)
    m: Tensor | None = None  # (r, r)
    compensate: bool = False
    base: Tensor | None = None  # (rows, cols)

    def __post_init__(self) -> None:
        require(not (self.compensate and self.base is not None), "compensate", True,
                "cannot be combined with a replacement base weight")


@dataclass(frozen=True)
class LayerInfo:
    """What a data-driven initialiser knows about one adapted layer."""

    path: str
    rows: int
    cols: int
    r: int
    scale: float


@dataclass(frozen=True)
class Initialiser:
    """One registered initialisation.

    Attributes:
        form: ``"BA"`` or ``"BMA"``, the parametrisation its :class:`Factors` fill.
        options: accepted options and their defaults (``init_options`` of a config may override them).
        fn: weight-based: ``fn(w, r, scale, **options) -> Factors`` with ``w`` the float32 ``(rows, cols)`` weight.
            Data-driven: ``fn(stat, layer, **options) -> summary`` per layer, with ``stat`` the layer's statistic.
        statistic: ``""`` for weight-based initialisers; ``"gradient"`` (mean ``dL/dW``, ``(rows, cols)``) or
            ``"inputs"`` (Gram matrix ``X^T X`` of the layer's inputs, ``(cols, cols)``) for data-driven ones.
        combine: data-driven only: ``combine(summaries, layers, **options) -> {path: Factors}`` once every layer
            is summarised (EVA's rank allocation); ``None`` means each summary already is the layer's Factors.
    """

    name: str
    form: str
    fn: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    statistic: str = ""
    combine: Callable[..., dict[str, Factors]] | None = None

    @property
    def needs_data(self) -> bool:
        return bool(self.statistic)


INITS: Registry[Initialiser] = Registry("initialiser")


def register_init(name: str, form: str = "BA", *, options: Mapping[str, Any] | None = None, statistic: str = "",
                  combine: Callable[..., dict[str, Factors]] | None = None) -> Callable[[Callable], Callable]:
    """Function decorator: register ``fn`` as initialiser ``name``."""
    require(form in ("BA", "BMA"), "form", form, "must be 'BA' or 'BMA'")
    require(statistic in ("", "gradient", "inputs"), "statistic", statistic, "must be '', 'gradient' or 'inputs'")

    def wrap(fn: Callable) -> Callable:
        INITS.register(name, Initialiser(name, form, fn, dict(options or {}), statistic, combine))
        return fn

    return wrap


def check_init(init: str, options: Mapping[str, Any], form: str, builtins: tuple[str, ...]) -> None:
    """Validate a config's ``init`` / ``init_options``: a built-in name or a registered initialiser of ``form``."""
    allowed = [*builtins, *(n for n in INITS.names() if INITS.get(n).form == form)]
    require(init in allowed, "init", init, f"must be one of {', '.join(allowed)}")
    accepted = INITS.get(init).options if init in INITS else {}
    for key in options:
        require(key in accepted, f"init_options[{key!r}]", options[key],
                f"is not an option of init {init!r}; options: {', '.join(accepted) or 'none'}")


def options_of(init: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The registered defaults of ``init`` updated with a config's ``init_options``."""
    return {**INITS.get(init).options, **overrides}
