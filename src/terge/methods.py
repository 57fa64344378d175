"""The registry of merge methods and their settings.

A method is a small pure function over float64 tensors:

    function(tensors, weights, base, *, seed=None, layout=None, **settings) -> Tensor

``tensors`` are the contributing models' tensors (float64, same shape, on the destination's
device), ``weights`` their weights (normalised to sum to 1 unless ``normalize=False``), ``base`` the
reference tensor in float64 (``None`` for a built-in method that uses none; a user's own method
always receives it). A random method gets
``seed``, the parameter's own seed (see ``terge.plan.derive_seed``), and draws with
:func:`terge.primitives.counter_uniform`; a method marked ``layout_aware`` gets ``layout``, a
:class:`terge.sharding.Layout` saying where its tensors lie in the whole parameter: when the
parameter is sharded (a DTensor), the tensors are this rank's local shards, and every whole-tensor
statistic is summed over the other shards with ``layout.sum``. It returns the merged float64
tensor (the local shard's, when sharded).

``method='name'`` takes a registered method with its defaults; a factory such as
``terge.methods.ties(density=0.3)`` configures one with keyword settings, checked at once; a plain
callable ``f(tensors, weights, base)`` is accepted wherever a method is.

The task-vector methods (task arithmetic, TIES, DARE, breadcrumbs) share one core,
:func:`_task_vector_merge`, configured by a *sparsification* (none, magnitude, random, breadcrumbs)
and a *consensus* (none, or TIES' sign election with its disjoint mean), so a fix to one is a fix
to all. Their task vectors are ``tau_i = theta_i - base``. That core is the reference: for whole
CPU tensors with float64 accumulation, :mod:`terge.fastmethods` computes the same bits in
compiled loops straight from the inputs as stored (a method's ``into``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any

import torch

from .errors import MergeArgumentError, MethodNotApplicableError, UnknownMergeMethodError
from .families import elementwise, spherical, statistics, subspace
from .kernels import (
    ChunkBuffers,
    combine_whole,
    fastelementwise,
    fastpcb,
    linear_combine,
    primitives,
)
from .kernels.fastmethods import merge_into
from .kernels.fastrank import della_into
from .kernels.fastrank import prune_into as della_prune_into
from .kernels.primitives import (
    DRAW_CHUNK,
    counter_uniform,
    draw_key,
    kth_largest_magnitude_bits,
    zero_below,
)
from .kernels.statistics import dot_products
from .layerwise import ByLayer
from .sharding import Layout

__all__ = [
    "REGISTRY",
    "Method",
    "MethodFunction",
    "MethodInfo",
    "arithmetic",
    "breadcrumbs",
    "breadcrumbs_ties",
    "consensus",
    "custom",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "fisher",
    "fisher_diagonals",
    "gram_matrices",
    "iso_c",
    "iso_cts",
    "karcher",
    "magmax",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "pcb",
    "readme_table",
    "regmean",
    "resolve",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
    "tsv_m",
]

MethodFunction = Callable[..., torch.Tensor]

_MODEL_SOUPS = "https://arxiv.org/abs/2203.05482"
_TASK_ARITHMETIC = "https://arxiv.org/abs/2212.04089"
_TIES = "https://arxiv.org/abs/2306.01708"
_DARE = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS = "https://arxiv.org/abs/2312.06795"
_SLERP = "https://dl.acm.org/doi/10.1145/325165.325242"
_MODEL_STOCK = "https://arxiv.org/abs/2403.19522"


@dataclass(frozen=True)
class Method:
    """A merge method configured with its settings; what ``method=`` values resolve to."""

    name: str
    function: MethodFunction
    settings: Mapping[str, Any] = field(default_factory=dict)
    task_vectors: bool = False
    """The base is the reference and contributes no task vector (it is not a contributor)."""
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    """``function`` takes ``seed=``, the parameter's seed, and draws from it alone."""
    streaming: bool = False
    """Computed by the chunked linear kernel rather than ``function`` on whole tensors."""
    paper: str | None = None
    layout_aware: bool = False
    """``function`` takes ``layout=`` and sums its whole-tensor statistics over the shards, so it
    runs on sharded parameters (DTensors) as it does on whole ones."""
    elementwise: bool = False
    """Each entry of the result depends only on the same entry of the inputs, so ``function``
    runs on each shard of a sharded parameter as it is."""
    rowwise: bool = False
    """Each row of the result (the ``shape[0]`` rows, flattened) depends only on the same row of
    the inputs, and random draws are keyed by the layout's whole-tensor indices: ``function``
    may run on blocks of whole rows, each told where it lies by its :class:`Layout`."""

    into: Callable[..., bool] | None = None
    """Optionally, ``function`` computed straight into the destination from the inputs as stored
    (no float64 copies), equal to it bit for bit: ``into(destination, tensors, weights, base,
    [seed=], scratch=, **settings)`` returns ``False``, having written nothing, where it does not
    apply."""
    ratios: bool = False
    """Only the ratios of the weights matter (weights scaled by a positive number give the same
    result): the method is given the weights as given, not normalised to inexact values, so
    ``(a + b + c) / 3`` is not computed as ``a/3 + b/3 + c/3``."""
    divides: bool = False
    """The result is a weighted sum (task arithmetic's ``sum_i w_i tau_i``): when normalising by
    a positive sum, the method is given the weights as given and ``divisor=``, their sum, and
    divides the weighted sum once, so ``(a + b + c) / 3`` is not computed as
    ``a/3 + b/3 + c/3`` (whose rounding error can land a half-way case on the wrong side)."""
    named: bool = False
    """``function`` takes ``name=``, the parameter's name, and ``contributors=``, the indices
    (into ``models``) of the models its tensors come from: for statistics kept per parameter."""
    builtin: bool = field(default=False, compare=False)
    """Made by one of terge's factories (a user's own method may raise anything, which terge
    re-raises as :class:`~terge.errors.MethodError`)."""

    def __call__(
        self,
        tensors: list[torch.Tensor],
        weights: list[float],
        base: torch.Tensor | None,
        seed: int | None = None,
        layout: Layout | None = None,
        name: str | None = None,
        contributors: Sequence[int] | None = None,
        divisor: float | None = None,
    ) -> torch.Tensor:
        """Merge ``tensors``; ``seed`` seeds a random method (``None``: drawn from torch's global
        generator), ``layout`` tells a layout-aware one where the tensors lie (``None``: whole),
        ``name`` and ``contributors`` tell a named one which parameter of which models, and
        ``divisor`` one that :attr:`divides` what to divide its weighted sum by."""
        options: dict[str, Any] = {}
        if self.random:
            options["seed"] = seed
        if self.divides:
            options["divisor"] = divisor
        if self.layout_aware or self.rowwise:
            options["layout"] = layout
        if self.named:
            options["name"] = name
            options["contributors"] = contributors
        return self.function(tensors, weights, base, **options, **self.settings)

    def merge_into(
        self,
        destination: torch.Tensor,
        tensors: list[torch.Tensor],
        weights: list[float],
        base: torch.Tensor | None,
        seed: int | None = None,
        scratch: object | None = None,
        divisor: float | None = None,
    ) -> bool:
        """Merge whole ``tensors`` (as stored) straight into ``destination`` with :attr:`into`,
        float64 accumulation; ``False`` where it does not apply (then call the method).
        ``scratch`` identifies one merge's scratch memory, reused from tensor to tensor."""
        if self.into is None:
            return False
        options: dict[str, Any] = {"seed": seed} if self.random else {}
        if self.divides:
            options["divisor"] = divisor
        return self.into(
            destination, tensors, weights, base, scratch=scratch, **options, **self.settings
        )


# --- setting checks -------------------------------------------------------------------------------


def _real(method: str, setting: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MergeArgumentError(
            f"{method}: {setting} must be a real number, got {value!r} ({type(value).__name__})."
        )
    return float(value)


def _per_layer(check: Callable[[str, Any], float]) -> Callable[[str, Any], Any]:
    """Let a setting be a ``by_layer`` value, each of whose values passes the same check."""

    def checked(method: str, value: Any) -> Any:
        if isinstance(value, ByLayer):
            return value.checked(lambda v: check(method, v))
        return check(method, value)

    return checked


def _check_scale(method: str, scale: Any) -> float:
    value = _real(method, "scale", scale)
    if not math.isfinite(value):
        raise MergeArgumentError(f"{method}: scale must be a finite number, got {scale!r}.")
    return value


def _check_density(method: str, density: Any) -> float:
    value = _real(method, "density", density)
    if not 0 < value <= 1:
        raise MergeArgumentError(f"{method}: density must be in (0, 1], got {density!r}.")
    return value


def _check_gamma(method: str, gamma: Any) -> float:
    value = _real(method, "gamma", gamma)
    if not 0 <= value < 1:
        raise MergeArgumentError(f"{method}: gamma must be in [0, 1), got {gamma!r}.")
    return value


_check_scale = _per_layer(_check_scale)  # type: ignore[assignment]
_check_density = _per_layer(_check_density)  # type: ignore[assignment]
_check_gamma = _per_layer(_check_gamma)  # type: ignore[assignment]


def _per_model(check: Callable[[str, Any], Any], setting: str) -> Callable[[str, Any], Any]:
    """Let a setting be a list with one value per contributing model (the base excluded), as
    mergekit's per-model ``parameters``; each value passes the same check. Kept as a list, as a
    lineage file holds it."""

    def checked(method: str, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if not value:
                raise MergeArgumentError(
                    f"{method}: {setting} is a list of per-model values, one per contributing "
                    "model; got an empty list."
                )
            if any(isinstance(v, ByLayer) for v in value):
                raise MergeArgumentError(
                    f"{method}: {setting} is either per model (a list of numbers) or per layer "
                    "(by_layer), not both."
                )
            return [check(method, v) for v in value]
        return check(method, value)

    return checked


_density_setting = _per_model(_check_density, "density")
_gamma_setting = _per_model(_check_gamma, "gamma")

_RESCALES = ("density", "l1", "l2", "linf", "none")
"""How a sparsified task vector is rescaled: by ``1 / density`` (DARE's expectation), to its
L1, L2 or L-infinity norm before sparsifying (mergekit's ``rescale: true`` is ``l1``), or not."""
_TRIMS = ("threshold", "exact")
_ELECTIONS = ("task_vector", "weighted")


def _choice(method: str, setting: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise MergeArgumentError(
            f"{method}: {setting} must be one of {', '.join(map(repr, choices))}; got {value!r}."
        )
    return value


def _flag(method: str, setting: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise MergeArgumentError(f"{method}: {setting} must be True or False; got {value!r}.")
    return value


def _options(method: str, defaults: Mapping[str, Any], **given: Any) -> dict[str, Any]:
    """The mergekit-compatible options that differ from terge's defaults, checked: only those
    go into the settings (and the lineage), so a default merge records what 0.1.1 did."""
    checks: dict[str, Callable[[Any], Any]] = {
        "trim": lambda v: _choice(method, "trim", v, _TRIMS),
        "rescale": lambda v: _choice(method, "rescale", v, _RESCALES),
        "elect": lambda v: _choice(method, "elect", v, _ELECTIONS),
        "disjoint_mean": lambda v: _flag(method, "disjoint_mean", v),
    }
    checked = {key: checks[key](value) for key, value in given.items()}
    return {key: value for key, value in checked.items() if value != defaults[key]}


# --- arithmetic -----------------------------------------------------------------------------------


def _arithmetic(
    tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None
) -> torch.Tensor:
    """The weighted sum of the tensors (a weighted mean when the weights are normalised)."""
    result = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        result.add_(tensor, alpha=weight)
    return result


def arithmetic() -> Method:
    """The weighted arithmetic mean, ``sum_i w_i theta_i`` (terge 0.1.1's only method).

    A uniform mean of fine-tuned models is a "model soup", https://arxiv.org/abs/2203.05482.
    """
    return Method(
        "arithmetic",
        _arithmetic,
        streaming=True,
        min_models=1,
        paper=_MODEL_SOUPS,
        elementwise=True,
        builtin=True,
    )


# --- the task-vector core -------------------------------------------------------------------------


def _sum_over_shards(layout: Layout) -> Any:
    """What sums a histogram over the other shards: nothing for a whole tensor."""
    return layout.sum if layout.sharded else None


def _keep_largest(tau: torch.Tensor, density: float, layout: Layout) -> torch.Tensor:
    """TIES' trim, as a threshold: with ``k = max(1, int(density * numel))`` and ``t`` the
    ``k``-th largest magnitude of the whole tensor, keep the entries with ``|tau| >= t`` (every
    tie at the threshold too, so at least ``k``)."""
    n = layout.numel
    k = max(1, int(density * n))
    if k >= n:
        return tau
    flat = tau.view(-1)
    zero_below(flat, kth_largest_magnitude_bits(flat, k, _sum_over_shards(layout)))
    return tau


def _keep_breadcrumbs(
    tau: torch.Tensor, density: float, gamma: float, layout: Layout
) -> torch.Tensor:
    """Breadcrumbs' mask, as two thresholds: with ``keep = max(1, int(density * numel))`` and
    ``top = int(gamma * numel)`` (at most ``numel - keep``), keep ``t_lo <= |tau| < t_hi``, where
    ``t_lo`` is the ``(top + keep)``-th largest magnitude and ``t_hi`` the ``top``-th (no upper
    bound when ``top`` is 0): the outliers go, then the smallest, and a small tensor such as a
    bias or a norm scale is never wiped whole."""
    n = layout.numel
    keep = max(1, int(density * n))
    if keep >= n:
        return tau
    top = min(int(gamma * n), n - keep)
    flat = tau.view(-1)
    reduce = _sum_over_shards(layout)
    low = kth_largest_magnitude_bits(flat, top + keep, reduce)
    high = kth_largest_magnitude_bits(flat, top, reduce) if top else None
    zero_below(flat, low, high)
    return tau


def _random_drop(
    tau: torch.Tensor,
    density: float,
    seed: int,
    position: int,
    layout: Layout,
    divide: bool = True,
) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density``, divide the survivors by ``density``
    so the task vector's expectation is unchanged. Entry ``j`` (its row-major index in the whole
    tensor) of the ``position``-th contributor survives when
    ``counter_uniform(draw_key(seed, position), j) < density``: a pure function of the seed, the
    model's position and the index, so a shard draws its own slice of the whole draw, on any
    device."""
    if density == 1:
        return tau
    key = draw_key(seed, position)
    flat = tau.view(-1)
    chunk = primitives.chunk_for(flat.device, DRAW_CHUNK)
    for start in range(0, flat.numel(), chunk):
        stop = min(start + chunk, flat.numel())
        draw = counter_uniform(key, layout.indices(start, stop, flat.device))
        flat[start:stop].masked_fill_(draw >= density, 0)
    return primitives.divide(tau, density) if divide else tau


def _divided(total: torch.Tensor, divisor: float | None) -> torch.Tensor:
    """A weighted sum divided once by its weights' sum (``None``: weights already as wanted)."""
    return total if divisor is None or divisor == 1 else primitives.divide(total, divisor)


def _whole_only(name: str, option: str, layout: Layout) -> None:
    """Refuse an option that ranks the whole tensor on a sharded parameter."""
    if layout.sharded:
        raise MethodNotApplicableError(
            f"{name}: {option} ranks the entries of the whole tensor, which a sharded parameter "
            "(DTensor) does not hold; use the default (thresholds summed over the shards) or "
            "merge whole tensors."
        )


def _keep_exactly(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim as mergekit ranks: exactly ``k = max(1, int(density * numel))`` entries, the
    largest magnitudes, ties at the threshold broken by position (the first kept)."""
    n = tau.numel()
    k = max(1, int(density * n))
    if density >= 1 or k >= n:
        return tau
    flat = tau.view(-1)
    order = torch.sort(flat.abs(), descending=True, stable=True).indices
    flat[order[k:]] = 0
    return tau


def _keep_breadcrumbs_exactly(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs as mergekit ranks (``magnitude_outliers``): in ascending order of magnitude
    (ties by position), drop the ``n - keep - top`` smallest (none when ``density + gamma > 1``)
    and keep the next ``keep = int(density * numel)`` (no floor of one), ``top = int(gamma *
    numel)``."""
    if density >= 1:
        return tau
    n = tau.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    flat = tau.view(-1)
    order = torch.sort(flat.abs(), stable=True).indices
    kept = torch.zeros(n, dtype=torch.bool, device=flat.device)
    kept[order[bottom : bottom + keep]] = True
    return tau.masked_fill_(~kept.view(tau.shape), 0)


_RESCALE_EPS = 1e-7
"""mergekit's: where either norm is below it, the masked task vector is left unscaled."""


def _norm(tau: torch.Tensor, norm: str, layout: Layout) -> float:
    """The L1, L2 or L-infinity norm of a task vector, over every shard."""
    flat = tau.reshape(-1)
    if norm == "l1":
        local_value = flat.abs().sum()
    elif norm == "l2":
        local_value = torch.dot(flat, flat)
    else:
        local_value = flat.abs().max() if flat.numel() else flat.new_zeros(())
    if layout.sharded:
        if norm == "linf":
            _whole_only("rescale='linf'", "the largest magnitude", layout)
        local_value = layout.sum(local_value.reshape(1).to(torch.float64))[0]
    value = float(local_value)
    return math.sqrt(value) if norm == "l2" else value


def _rescaled(tau: torch.Tensor, before: float, norm: str, layout: Layout) -> torch.Tensor:
    """Scale a masked task vector back to its norm ``before`` masking (mergekit's
    ``rescaled_masked_tensor``)."""
    after = _norm(tau, norm, layout)
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return tau
    return tau.mul_(before / after)


def _per(value: Any, position: int) -> float:
    """A setting's value for the ``position``-th contributor (a per-model list, or one value)."""
    return value[position] if isinstance(value, (list, tuple)) else value


def _check_per_model(name: str, settings: Mapping[str, Any], count: int) -> None:
    for key, value in settings.items():
        if isinstance(value, (list, tuple)) and len(value) != count:
            raise MethodNotApplicableError(
                f"{name}: {key} has {len(value)} per-model values, but {count} models contribute "
                "to this parameter (the base excluded); give one per contributing model."
            )


def _task_vector_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    seed: int | None = None,
    layout: Layout | None = None,
    name: str,
    sparsification: str | None,
    consensus: str | None,
    scale: float = 1.0,
    density: float | list[float] = 1.0,
    gamma: float | list[float] = 0.0,
    epsilon: float | list[float] = 0.0,
    trim: str = "threshold",
    rescale: str | None = None,
    elect: str = "task_vector",
    disjoint_mean: bool = True,
    divisor: float | None = None,
) -> torch.Tensor:
    """``base + scale * combine_i(w_i, sparsify(tau_i))``: the core of every task-vector method.

    ``sparsification`` is ``None``, ``"magnitude"`` (TIES' trim), ``"random"`` (DARE's drop and
    rescale) or ``"breadcrumbs"``; ``consensus`` is ``None`` (the weighted sum) or ``"sign"``
    (TIES' elected sign and disjoint mean); ``"della"`` is DELLA's MagPrune (``epsilon``, rows
    ranked whole) with its options. Everything but the trims' thresholds is element-wise,
    and those are summed over the shards of a sharded parameter, so a sharded merge gives
    exactly the whole one's entries.

    The options that reproduce mergekit's definitions: ``density`` and ``gamma`` may be lists,
    one value per contributor; ``trim="exact"`` keeps exactly the counts mergekit keeps (ties
    broken by position) rather than every tie at a threshold; ``rescale`` (``None``: the
    method's own, ``1 / density`` for DARE and nothing otherwise) rescales each sparsified task
    vector to its ``"l1"``, ``"l2"`` or ``"linf"`` norm before, by ``"density"``, or not
    (``"none"``); ``elect="weighted"`` counts a model as agreeing where ``w_i tau_i`` (not
    ``tau_i``) has the elected sign; ``disjoint_mean=False`` sums the agreeing weighted task
    vectors without dividing by their weights (mergekit's ``normalize: false``).

    ``divisor`` (where the combination is a weighted sum: no sign consensus, or one without the
    disjoint mean) divides the weighted sum once: the weights are then as given, not
    normalised to inexact values (see :attr:`Method.divides`).
    """
    if base is None:
        raise MethodNotApplicableError(f"{name}: needs a base model to take task vectors from.")
    if layout is None:
        layout = Layout.whole(base.shape)
    _check_per_model(name, {"density": density, "gamma": gamma, "epsilon": epsilon}, len(tensors))
    if trim == "exact" and sparsification in ("magnitude", "breadcrumbs"):
        _whole_only(name, "trim='exact'", layout)
    if rescale is None:
        rescale = {"random": "density", "della": "probability"}.get(sparsification or "", "none")
    if sparsification in ("random", "della") and seed is None:
        seed = int(torch.randint(0, (1 << 63) - 1, ()).item())  # torch's global generator

    def sparsified(theta: torch.Tensor, position: int) -> torch.Tensor:
        tau = (theta - base).contiguous()
        if sparsification is None:
            return tau
        share = _per(density, position)
        if share >= 1 and sparsification != "breadcrumbs":
            return tau
        before = _norm(tau, rescale, layout) if rescale in ("l1", "l2", "linf") else 0.0
        if sparsification == "magnitude":
            if trim == "exact":
                tau = _keep_exactly(tau, share)
            else:
                tau = _keep_largest(tau, share, layout)
        elif sparsification == "random":
            tau = _random_drop(tau, share, seed, position, layout, rescale == "density")  # type: ignore[arg-type]
        elif sparsification == "della":
            epsilon_ = _per(epsilon, position)
            tau = _della_pruned(theta, base, tau, share, epsilon_, seed, position, layout, rescale)
        elif trim == "exact":
            tau = _keep_breadcrumbs_exactly(tau, share, _per(gamma, position))
        else:
            tau = _keep_breadcrumbs(tau, share, _per(gamma, position), layout)
        if rescale in ("l1", "l2", "linf"):
            return _rescaled(tau, before, rescale, layout)
        if rescale == "density" and sparsification != "random" and share != 1:
            return primitives.divide(tau, share)
        return tau

    # Every product is rounded before it is added (``acc.add_(x.mul_(w))``, never
    # ``acc.add_(x, alpha=w)``, which torch may compute as a fused multiply-add in its vectorised
    # loop and not in its tail), so the result is well defined and the compiled loops match it.
    if consensus is None:  # one task vector alive at a time
        merged = torch.zeros_like(base)
        for position, (theta, weight) in enumerate(zip(tensors, weights, strict=True)):
            merged.add_(sparsified(theta, position).mul_(weight))
        return base + _divided(merged, divisor).mul_(scale)

    # TIES (https://arxiv.org/abs/2306.01708): the sign with the larger weighted mass wins (a tie
    # counts as +), and each entry is the weighted mean of the task vectors that agree with it.
    deltas = [sparsified(theta, position) for position, theta in enumerate(tensors)]
    elected = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights, strict=True):
        elected.add_(delta * weight)
    positive = elected >= 0
    del elected
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base) if disjoint_mean else None
    for delta, weight in zip(deltas, weights, strict=True):
        if elect == "weighted" and weight < 0:  # w_i tau_i has the opposite sign of tau_i
            agrees = torch.where(positive, delta < 0, delta > 0)
        else:
            agrees = torch.where(positive, delta > 0, delta < 0)
        numerator.add_(delta.masked_fill(~agrees, 0).mul_(weight))
        if denominator is not None:
            denominator.add_(agrees.to(base.dtype).mul_(weight))
    del deltas
    if denominator is None:  # the sum of the agreeing weighted task vectors
        return base + _divided(numerator, divisor).mul_(scale)
    # Where no model agrees the numerator is 0 too; where agreeing weights cancel (only possible
    # with unnormalised signed weights) the weighted sum stands, as in mergekit.
    merged = torch.where(denominator != 0, numerator / denominator, numerator)
    return base + merged.mul_(scale)


def _della_pruned(
    theta: torch.Tensor,
    base: torch.Tensor,
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    seed: Any,
    position: int,
    layout: Layout,
    rescale: str,
) -> torch.Tensor:
    """DELLA's MagPrune of one task vector with mergekit's options: the compiled row loop where
    it applies (the same bits as the torch reference, which runs elsewhere)."""
    key, divide = draw_key(seed, position), rescale == "probability"
    first = int(layout.indices(0, 1, "cpu")[0]) if tau.numel() else 0
    if tau.device.type == "cpu" and della_prune_into(
        tau, theta, base, key=key, density=density, epsilon=epsilon, divide=divide, first=first
    ):
        return tau
    return elementwise._della_sparsify(tau, density, epsilon, key, layout, divide)


def _task_vector_method(
    name: str,
    sparsification: str | None,
    consensus: str | None,
    settings: dict[str, float],
    paper: str,
) -> Method:
    function = partial(
        _task_vector_merge, name=name, sparsification=sparsification, consensus=consensus
    )
    into = partial(merge_into, sparsification=sparsification, consensus=consensus)
    return Method(
        name,
        function,
        into=into,
        settings=settings,
        task_vectors=True,
        needs_base=True,
        min_models=1,
        random=sparsification in ("random", "della"),
        paper=paper,
        layout_aware=True,
        ratios=consensus == "sign" and bool(settings.get("disjoint_mean", True)),
        divides=consensus is None or not settings.get("disjoint_mean", True),
        builtin=True,
    )


def task_arithmetic(*, scale: float = 1.0) -> Method:
    """Task arithmetic, ``base + scale * sum_i w_i tau_i`` (https://arxiv.org/abs/2212.04089).

    Adding fine-tuning deltas to the base model keeps what each fine-tune learned; ``scale`` (λ)
    tunes how strongly, and a negative one subtracts a task.
    """
    settings = {"scale": _check_scale("task_arithmetic", scale)}
    return _task_vector_method("task_arithmetic", None, None, settings, _TASK_ARITHMETIC)


_MERGEKIT_OPTIONS = """

    mergekit's definitions (see the README's "From mergekit"): ``density`` (and ``gamma``) may
    be a list, one value per contributing model (the base excluded); ``trim="exact"`` keeps
    exactly the count mergekit keeps, ties broken by position, rather than every entry tied at
    the threshold; ``rescale`` rescales each sparsified task vector to its ``"l1"`` (mergekit's
    ``rescale: true``), ``"l2"`` or ``"linf"`` norm before sparsifying, by ``"density"``
    (``1 / density``) or ``"none"`` (``None``: the method's own); ``elect="weighted"`` counts a
    model as agreeing where ``w_i tau_i`` has the elected sign (mergekit) rather than ``tau_i``
    (they differ for negative weights); ``disjoint_mean=False`` sums the agreeing weighted task
    vectors (mergekit's ``normalize: false``). Options left at their defaults are not recorded.
    """

_DEFAULTS = {"trim": "threshold", "rescale": "none", "elect": "task_vector", "disjoint_mean": True}
_DARE_DEFAULTS = {**_DEFAULTS, "rescale": "density"}


def _own(rescale: Any, default: str) -> Any:
    """``rescale=None`` is the method's own rescale (recorded only where it differs)."""
    return default if rescale is None else rescale


def ties(
    *,
    density: float | list[float] = 0.2,
    scale: float = 1.0,
    trim: str = "threshold",
    rescale: str | None = None,
    elect: str = "task_vector",
    disjoint_mean: bool = True,
) -> Method:
    """TIES-merging: trim, elect sign, disjoint merge (https://arxiv.org/abs/2306.01708).

    Each task vector keeps its entries at least as large in magnitude as its ``k``-th largest,
    ``k = max(1, int(density * numel))`` (small deltas are mostly noise; entries tied at that
    threshold are all kept), the sign with the larger weighted mass is elected per entry, and
    only the entries that agree with it are averaged, so opposing updates do not cancel. The
    default ``density=0.2`` is the top-20% the paper uses throughout.
    """
    settings = {
        "density": _density_setting("ties", density),
        "scale": _check_scale("ties", scale),
        **_options(
            "ties",
            _DEFAULTS,
            trim=trim,
            rescale=_own(rescale, "none"),
            elect=elect,
            disjoint_mean=disjoint_mean,
        ),
    }
    return _task_vector_method("ties", "magnitude", "sign", settings, _TIES)


def dare_linear(
    *, density: float | list[float] = 0.5, scale: float = 1.0, rescale: str | None = None
) -> Method:
    """DARE then task arithmetic (https://arxiv.org/abs/2311.03099).

    Dropping a random ``1 - density`` of each task vector and rescaling the rest by
    ``1 / density`` keeps its expectation while making the task vectors sparse, so they interfere
    less. The default ``density=0.5`` is conservative: the paper drops 90% of small SFT deltas,
    but the ``1 / density`` rescale amplifies the noise of larger deltas. The draw is
    counter-based (:func:`terge.primitives.counter_uniform`): entry ``j`` of the ``i``-th
    contributor is kept when ``u(seed, i, j) < density``, the same on any device and for any
    sharding of the tensor.
    """
    settings = {
        "density": _density_setting("dare_linear", density),
        "scale": _check_scale("dare_linear", scale),
        **_options("dare_linear", _DARE_DEFAULTS, rescale=_own(rescale, "density")),
    }
    return _task_vector_method("dare_linear", "random", None, settings, _DARE)


def dare_ties(
    *,
    density: float | list[float] = 0.5,
    scale: float = 1.0,
    rescale: str | None = None,
    elect: str = "task_vector",
    disjoint_mean: bool = True,
) -> Method:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean
    (https://arxiv.org/abs/2311.03099, https://arxiv.org/abs/2306.01708). Defaults as
    :func:`dare_linear`."""
    settings = {
        "density": _density_setting("dare_ties", density),
        "scale": _check_scale("dare_ties", scale),
        **_options(
            "dare_ties",
            _DARE_DEFAULTS,
            rescale=_own(rescale, "density"),
            elect=elect,
            disjoint_mean=disjoint_mean,
        ),
    }
    return _task_vector_method("dare_ties", "random", "sign", settings, _DARE)


def breadcrumbs(
    *,
    density: float | list[float] = 0.2,
    gamma: float | list[float] = 0.01,
    scale: float = 1.0,
    trim: str = "threshold",
    rescale: str | None = None,
) -> Method:
    """Model Breadcrumbs (https://arxiv.org/abs/2312.06795): task arithmetic over task vectors
    with both tails masked, the ``gamma`` largest magnitudes (outliers that overwrite the other
    tasks) and the smallest (noise), keeping ``density`` of the entries. Both cuts are
    thresholds on the magnitude: entries tied with the top cut go with the outliers, entries
    tied with the bottom cut stay.

    Defaults: ``gamma=0.01`` (the top 1%, as the paper's and mergekit's) and ``density=0.2``
    (the same share as :func:`ties`, close to the paper's 85%-bottom masks). With
    ``trim="exact"`` (mergekit's ``magnitude_outliers``), exactly ``int(density * numel)``
    entries are kept (no floor of one), ranked by position among ties, and ``density + gamma``
    may exceed 1: then fewer outliers go.
    """
    density_ = _density_setting("breadcrumbs", density)
    gamma_ = _gamma_setting("breadcrumbs", gamma)
    options = _options("breadcrumbs", _DEFAULTS, trim=trim, rescale=_own(rescale, "none"))
    largest = _largest(density_) + _largest(gamma_)  # per-layer values: the worst case
    if largest > 1 + 1e-12 and options.get("trim") != "exact":  # tolerate sums such as 0.7 + 0.3
        raise MergeArgumentError(
            "breadcrumbs: density + gamma must be at most 1 (density of the entries are kept "
            f"after the gamma largest are removed), got density={density!r} + gamma={gamma!r} "
            f"= {largest!r}; trim='exact' (mergekit's ranking) removes fewer outliers instead."
        )
    settings = {
        "density": density_,
        "gamma": gamma_,
        "scale": _check_scale("breadcrumbs", scale),
        **options,
    }
    return _task_vector_method("breadcrumbs", "breadcrumbs", None, settings, _BREADCRUMBS)


for _factory in (ties, dare_linear, dare_ties, breadcrumbs):
    _factory.__doc__ = (_factory.__doc__ or "") + _MERGEKIT_OPTIONS


def _largest(value: Any) -> float:
    if isinstance(value, (list, tuple)):
        return max(value)
    if isinstance(value, ByLayer):
        return max((*value.values, *(() if value.other is None else (value.other,))))
    return value


# --- slerp ----------------------------------------------------------------------------------------

_PARALLEL = 1e-4
"""SLERP interpolates linearly when ``|cos| > 1 - _PARALLEL``: the angle is too small (or too
close to π) for ``sin`` to divide by."""
_THRESHOLD = 1 - _PARALLEL
_ZEROS = ("linear", "unnormalised")
_NORM_EPS = 1e-8
"""mergekit's: a norm at most this is taken as 1 (the tensor is not normalised)."""


def _dot_products(
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    pairs: list[tuple[int, int]],
    device: torch.device,
) -> list[float]:
    """``sum(x_i * x_j)`` for each pair, in float64, where ``x_i`` is ``tensors[i] - base`` (or
    ``tensors[i]`` without a base), in the order :mod:`terge.kernels.statistics` defines: the
    reference, given float64 tensors, and the streamed pass, given the inputs as stored, compute
    the very same sums, on any device and however many threads share the work."""
    return dot_products(tensors, base, pairs, device)


def _sums_over_shards(layout: Layout, values: list[torch.Tensor]) -> list[float]:
    """Float64 partial sums (0-d tensors) of the local shards, summed over every shard in one
    ``all_reduce``."""
    return layout.sum(torch.stack(values).to(torch.float64)).tolist()


def _slerp(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    layout: Layout | None = None,
    threshold: float = _THRESHOLD,
    zero: str = "linear",
) -> torch.Tensor:
    if len(tensors) != 2:
        raise MethodNotApplicableError(
            f"slerp: interpolates exactly two models, got {len(tensors)}."
        )
    v0, v1 = tensors
    t = float(weights[1])
    if zero == "unnormalised":
        if layout is not None and layout.sharded:
            _whole_only("slerp", "zero='unnormalised' (mergekit's arithmetic)", layout)
        return _slerp_mergekit(v0, v1, t, threshold)
    if layout is not None and layout.sharded:  # the angle from dot products summed over shards
        flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
        sums = _sums_over_shards(
            layout, [torch.dot(flat0, flat0), torch.dot(flat1, flat1), torch.dot(flat0, flat1)]
        )
    else:
        sums = _dot_products([v0, v1], None, _SLERP_PAIRS, v0.device)
    return combine_whole([v0, v1], _slerp_coefficients(sums, t, threshold))


_SLERP_PAIRS = [(0, 0), (1, 1), (0, 1)]


def _slerp_coefficients(sums: list[float], t: float, threshold: float) -> list[float]:
    """SLERP's two coefficients from ``|v0|^2, |v1|^2, v0 . v1``: ``1 - t, t`` where the line is
    all there is (a zero tensor, (anti)parallel ones, or NaN, which the products propagate)."""
    square0, square1, dot = sums
    norm0, norm1 = math.sqrt(square0), math.sqrt(square1)
    if norm0 == 0 or norm1 == 0:  # no direction to rotate
        return [1 - t, t]
    cos = dot / (norm0 * norm1)
    if not abs(cos) <= threshold:
        return [1 - t, t]
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return [math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega]


def _slerp_into(
    destination: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scratch: Any = None,
    threshold: float = _THRESHOLD,
    zero: str = "linear",
) -> bool:
    """SLERP streamed from the inputs as stored: one pass for the dot products, one (the linear
    kernel) for the combination; the same bits as :func:`_slerp`."""
    if zero != "linear" or len(tensors) != 2 or not isinstance(scratch, ChunkBuffers):
        return False
    device = destination.device
    sums = _dot_products(list(tensors), None, _SLERP_PAIRS, device)
    linear_combine(
        destination, list(tensors), _slerp_coefficients(sums, float(weights[1]), threshold), scratch
    )
    return True


_MERGEKIT_CHUNK = 1024 * 1024
"""mergekit's slerp sums its norms and dot product over chunks of this many entries."""


def _slerp_mergekit(v0: torch.Tensor, v1: torch.Tensor, t: float, threshold: float) -> torch.Tensor:
    """SLERP in mergekit's arithmetic, operation for operation (``mergekit.merge_methods.slerp``
    on one tensor): chunked norms, a norm of at most ``1e-8`` taken as 1, the cosine of the
    normalised vectors clamped to [-1, 1], ``(1 - t) a + t b`` where linear."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    if not a.shape[1]:
        return v0.clone()
    step = _MERGEKIT_CHUNK
    starts = range(0, a.shape[1], step)
    norm_a = torch.linalg.vector_norm(
        torch.stack(
            [torch.linalg.vector_norm(a[:, i : i + step], dim=1, keepdim=True) for i in starts]
        ),
        dim=0,
    )
    norm_b = torch.linalg.vector_norm(
        torch.stack(
            [torch.linalg.vector_norm(b[:, i : i + step], dim=1, keepdim=True) for i in starts]
        ),
        dim=0,
    )
    norm_a = torch.where(norm_a > _NORM_EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _NORM_EPS, norm_b, 1)
    parts = [
        ((a[:, i : i + step] / norm_a) * (b[:, i : i + step] / norm_b)).sum(dim=1, keepdim=True)
        for i in starts
    ]
    cos = torch.stack(parts).sum(dim=0).clamp(-1, 1)
    linear = cos.abs() > threshold
    theta = torch.acos(torch.where(linear, 0, cos))
    sin_theta = torch.sin(theta)
    weight = torch.tensor([[t]], dtype=a.dtype, device=a.device)
    coef_a = torch.where(linear, 1 - weight, torch.sin((1 - weight) * theta) / sin_theta)
    coef_b = torch.where(linear, weight, torch.sin(weight * theta) / sin_theta)
    result = torch.empty_like(a)
    for i in starts:
        result[:, i : i + step] = coef_a * a[:, i : i + step] + coef_b * b[:, i : i + step]
    return result.reshape(v0.shape)


def slerp(*, threshold: float = _THRESHOLD, zero: str = "linear") -> Method:
    """Spherical linear interpolation of two models (Shoemake 1985,
    https://dl.acm.org/doi/10.1145/325165.325242).

    Interpolating along the arc between the flattened tensors, rather than the chord, keeps the
    norm from shrinking between dissimilar models. ``t`` is the second model's weight (normalised
    weights ``[1 - t, t]``); (anti)parallel or zero tensors fall back to linear interpolation.
    A sharded parameter's angle comes from float64 dot products summed over the shards: the
    same as the whole tensor's up to rounding.

    mergekit's definition: ``threshold`` is the ``|cos|`` above which the tensors count as
    parallel (terge ``1 - 1e-4``, mergekit ``0.9995``); ``zero="unnormalised"`` takes a norm of
    at most ``1e-8`` as 1 (mergekit) rather than interpolating a zero tensor linearly, so a zero
    tensor makes a right angle with the other, and computes as mergekit does operation for
    operation (whole tensors only). Options left at their defaults are not recorded.
    """
    value = _real("slerp", "threshold", threshold)
    if not 0 < value <= 1:
        raise MergeArgumentError(f"slerp: threshold must be in (0, 1], got {threshold!r}.")
    given = {"threshold": value, "zero": _choice("slerp", "zero", zero, _ZEROS)}
    defaults = {"threshold": _THRESHOLD, "zero": "linear"}
    return Method(
        "slerp",
        _slerp,
        into=_slerp_into,
        settings={key: v for key, v in given.items() if v != defaults[key]},
        min_models=2,
        max_models=2,
        paper=_SLERP,
        layout_aware=True,
        builtin=True,
    )


# --- model stock ----------------------------------------------------------------------------------

_NORM_PRODUCT_FLOOR = 1e-6
"""mergekit's floor under a pair's norm product, and its bound on ``|1 + (N - 1) cos|`` below
which a row keeps the base (``t = 0``)."""


def _mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The plain mean, summed then divided once (``1 / N`` is inexact)."""
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return primitives.divide(total, len(tensors))


def _model_stock(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    layout: Layout | None = None,
    clamp: bool = True,
    filter_wise: bool = False,
) -> torch.Tensor:
    if base is None:
        raise MethodNotApplicableError("model_stock: needs a base model to take task vectors from.")
    n = len(tensors)
    if n < 2:
        raise MethodNotApplicableError(
            f"model_stock: needs at least two models besides the base, got {n}."
        )
    sharded = layout is not None and layout.sharded
    if filter_wise:
        if sharded:
            _whole_only("model_stock", "filter_wise=True", layout)  # type: ignore[arg-type]
        return _model_stock_rows(tensors, base, clamp, base.shape[-1] if base.dim() else 1)
    if not clamp and not sharded:  # mergekit's arithmetic, the whole tensor one row
        return _model_stock_rows(tensors, base, clamp, base.numel())
    if sharded:  # norms and dot products summed over the shards
        taus = [(theta - base).reshape(-1) for theta in tensors]
        sums = _sums_over_shards(layout, [torch.dot(taus[i], taus[j]) for i, j in _gram_pairs(n)])  # type: ignore[arg-type]
        del taus
    else:
        sums = _dot_products(tensors, base, _gram_pairs(n), base.device)
    coefficients, divisor = _model_stock_coefficients(sums, n, clamp)
    return combine_whole([*tensors, base], coefficients, divisor)


def _gram_pairs(n: int) -> list[tuple[int, int]]:
    """Each task vector with itself (its squared norm), then each pair ``i < j``."""
    return [(i, i) for i in range(n)] + [(i, j) for i in range(n) for j in range(i + 1, n)]


def _model_stock_coefficients(sums: list[float], n: int, clamp: bool) -> tuple[list[float], float]:
    """``t * mean_i theta_i + (1 - t) * base`` as the linear kernel's coefficients over
    ``[theta_1, ..., theta_N, base]`` and divisor ``N``: ``(t sum_i theta_i + N (1 - t) base) /
    N``, which is the mean exactly where ``t = 1`` and the base where ``t = 0``."""
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    norms = [math.sqrt(square) for square in sums[:n]]
    dots = dict(zip(pairs, sums[n:], strict=True))
    total = 0.0
    for i, j in pairs:
        if clamp:
            if norms[i] > 0 and norms[j] > 0:  # a zero task vector has no angle: cos = 0
                total += dots[i, j] / (norms[i] * norms[j])
        else:  # mergekit's: the norm product floored, each cosine clamped to [-1, 1]
            pair = dots[i, j] / max(norms[i] * norms[j], _NORM_PRODUCT_FLOOR)
            total += min(max(pair, -1.0), 1.0)
    cos = total / len(pairs)
    if clamp:
        cos = min(max(cos, 0.0), 1.0)
        t = n * cos / (1 + (n - 1) * cos)
    else:
        denominator = 1 + (n - 1) * cos
        t = 0.0 if abs(denominator) < _NORM_PRODUCT_FLOOR else n * cos / denominator
    if t == 0:
        return [0.0] * n + [1.0], 1.0
    return [t] * n + [n * (1 - t)], float(n)


def _model_stock_into(
    destination: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scratch: Any = None,
    clamp: bool = True,
    filter_wise: bool = False,
) -> bool:
    """Model Stock streamed from the inputs as stored: one pass for the task vectors' dot
    products, one (the linear kernel) for the combination; the same bits as
    :func:`_model_stock`."""
    n = len(tensors)
    if filter_wise or not clamp or base is None or n < 2 or not isinstance(scratch, ChunkBuffers):
        return False
    device = destination.device
    sums = _dot_products(list(tensors), base, _gram_pairs(n), device)
    coefficients, divisor = _model_stock_coefficients(sums, n, clamp)
    linear_combine(destination, [*tensors, base], coefficients, scratch, divisor)
    return True


def _model_stock_rows(
    tensors: list[torch.Tensor], base: torch.Tensor, clamp: bool, width: int
) -> torch.Tensor:
    """Model Stock with one ``t`` per row of ``width`` entries (``filter_wise``: the vectors
    along the last dimension, a 1-D tensor one row), in mergekit's arithmetic."""
    n = len(tensors)
    width = max(width, 1)
    w0 = base.reshape(-1, width)
    taus = [theta.reshape(-1, width) - w0 for theta in tensors]
    norms = [torch.linalg.vector_norm(tau, dim=-1) for tau in taus]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = (taus[i] * taus[j]).sum(dim=-1)
            product = norms[i] * norms[j]
            if clamp:
                cosines.append(
                    torch.where(product > 0, dot / product.masked_fill(product == 0, 1), 0)
                )
            else:
                cosines.append((dot / product.clamp(min=_NORM_PRODUCT_FLOOR)).clamp(-1, 1))
    del taus
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    if clamp:
        cos = cos.clamp(0, 1)
        t = n * cos / (1 + (n - 1) * cos)
    else:
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < _NORM_PRODUCT_FLOOR
        t = torch.where(singular, 0, n * cos / denominator.masked_fill(singular, 1))
    mean = _mean([theta.reshape(-1, width) for theta in tensors])
    return (t * mean + (1 - t) * w0).reshape(base.shape)


def model_stock(*, clamp: bool = True, filter_wise: bool = False) -> Method:
    """Model Stock (https://arxiv.org/abs/2403.19522): ``t * mean_i theta_i + (1 - t) * base``
    with ``t = N cos / (1 + (N - 1) cos)``, ``cos`` the mean pairwise cosine of the task vectors.

    The less the fine-tunes agree (smaller angle cosine), the closer to the base the merge stays.
    The weights are unused: the method sets its own. A pair with a zero task vector counts as
    ``cos = 0``, and ``cos`` is clamped to [0, 1] so that ``t`` stays in [0, 1]: below 0 the
    formula would move away from the models, and at ``cos = -1/(N-1)`` divide by zero. A
    sharded parameter's cosines come from float64 dot products summed over the shards: the
    same as the whole tensor's up to rounding.

    mergekit's definition: ``clamp=False`` leaves ``cos`` unclamped (each pair's in [-1, 1],
    its norm product floored at ``1e-6``; ``t = 0`` where ``|1 + (N - 1) cos| < 1e-6``);
    ``filter_wise=True`` gives each row (vector along the last dimension) its own ``cos`` and
    ``t`` (so a large tensor merges a block of rows at a time). Options left at their defaults
    are not recorded.
    """
    given = {
        "clamp": _flag("model_stock", "clamp", clamp),
        "filter_wise": _flag("model_stock", "filter_wise", filter_wise),
    }
    defaults = {"clamp": True, "filter_wise": False}
    return Method(
        "model_stock",
        _model_stock,
        into=_model_stock_into,
        settings={key: v for key, v in given.items() if v != defaults[key]},
        task_vectors=True,
        needs_base=True,
        min_models=2,
        paper=_MODEL_STOCK,
        layout_aware=True,
        rowwise=given["filter_wise"],
        builtin=True,
    )


# --- the newer methods (their arithmetic lives in terge.families) ---------------------------------

_DELLA = "https://arxiv.org/abs/2406.11617"
_SCE = "https://arxiv.org/abs/2408.07990"
_MAGMAX = "https://arxiv.org/abs/2407.06322"
_TALL = "https://arxiv.org/abs/2405.07813"
_PCB = "https://arxiv.org/abs/2410.02396"
_NEARSWAP = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
_MULTISLERP = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
_KARCHER = "https://en.wikipedia.org/wiki/Karcher_mean"
_TSV = "https://arxiv.org/abs/2412.00081"
_ISO = "https://arxiv.org/abs/2502.04959"
_FALLBACKS = ("mean", "sum")


def _each(value: Any) -> tuple[float, ...]:
    """Every value a (possibly per-layer) setting can take."""
    if isinstance(value, ByLayer):
        return (*value.values, *(() if value.other is None else (value.other,)))
    return (value,)


def _check_in(
    method: str, setting: str, value: Any, low: float, high: float, interval: str
) -> float:
    number = _real(method, setting, value)
    inside = {
        "(]": low < number <= high,
        "[]": low <= number <= high,
        "()": low < number < high,
        "[)": low <= number < high,
    }[interval]
    if not inside:
        shown = f"{interval[0]}{low:g}, {high:g}{interval[1]}".replace("inf", "∞")
        raise MergeArgumentError(f"{method}: {setting} must be in {shown}, got {value!r}.")
    return number


def _ranged(method: str, setting: str, value: Any, low: float, high: float, interval: str) -> Any:
    """A real setting in an interval, or a ``by_layer`` value all of whose values are."""
    if isinstance(value, ByLayer):
        return value.checked(lambda v: _check_in(method, setting, v, low, high, interval))
    return _check_in(method, setting, value, low, high, interval)


def _count(method: str, setting: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise MergeArgumentError(
            f"{method}: {setting} must be an integer of at least {low}, got {value!r}."
        )
    return int(value)


_DELLA_RESCALES = ("probability", "l1", "l2", "linf", "none")
"""How DELLA rescales a kept entry: divided by its keep probability (the paper's), or the
pruned task vector to its L1 (mergekit's ``rescale: true``), L2 or L-infinity norm before, or
not at all (mergekit's ``rescale: false``)."""


def _della_values(name: str, setting: str, value: Any, interval: str) -> Any:
    """A DELLA setting: one value, a per-layer value, or a list of one per contributing model."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise MergeArgumentError(f"{name}: {setting} is an empty list; give one per model.")
        return [_check_in(name, setting, v, 0, 1, interval) for v in value]
    return _ranged(name, setting, value, 0, 1, interval)


def _della_pairs(name: str, density: Any, epsilon: Any) -> list[tuple[float, float]]:
    """The (density, epsilon) pairs a model can get: per model where lists, else every one."""
    if isinstance(density, list) and isinstance(epsilon, list):
        if len(density) != len(epsilon):
            raise MergeArgumentError(
                f"{name}: density has {len(density)} per-model values and epsilon "
                f"{len(epsilon)}; give both one per contributing model."
            )
        return list(zip(density, epsilon, strict=True))
    densities = density if isinstance(density, list) else _each(density)
    epsilons = epsilon if isinstance(epsilon, list) else _each(epsilon)
    return [(d, e) for d in densities for e in epsilons]


def _della(
    name: str,
    density: Any,
    epsilon: Any,
    scale: Any,
    consensus: bool,
    rescale: Any = "probability",
    elect: Any = "task_vector",
    disjoint_mean: Any = True,
) -> Method:
    density_ = _della_values(name, "density", density, "(]")
    epsilon_ = _della_values(name, "epsilon", epsilon, "[)")
    for d, e in _della_pairs(name, density_, epsilon_):
        if not (d - e > 0 and d + e <= 1):
            raise MergeArgumentError(
                f"{name}: density - epsilon must be above 0 and density + epsilon at most 1 "
                f"(they bound the keep probabilities), got density={d!r}, epsilon={e!r}."
            )
    settings: dict[str, Any] = {
        "density": density_,
        "epsilon": epsilon_,
        "scale": _check_scale(name, scale),
    }
    if _choice(name, "rescale", rescale, _DELLA_RESCALES) != "probability":
        settings["rescale"] = rescale
    settings.update(
        _options(name, _DEFAULTS, elect=elect, disjoint_mean=disjoint_mean) if consensus else {}
    )
    if not consensus and (elect != "task_vector" or disjoint_mean is not True):
        raise MergeArgumentError(
            f"{name}: elect and disjoint_mean belong to the sign election, which della_linear "
            "does not hold; use della."
        )
    plain = set(settings) == {"density", "epsilon", "scale"} and not any(
        isinstance(v, list) for v in (density_, epsilon_)
    )
    if plain:  # the paper's definition: the reference and its compiled row loop
        return Method(
            name,
            partial(elementwise.della_merge, consensus=consensus),
            into=partial(della_into, consensus=consensus),
            settings=settings,
            task_vectors=True,
            needs_base=True,
            random=True,
            paper=_DELLA,
            rowwise=True,
            builtin=True,
        )
    method = _task_vector_method(name, "della", "sign" if consensus else None, settings, _DELLA)
    # rows ranked whole: no shards; a norm rescale needs the whole tensor, not blocks of rows
    rowwise = settings.get("rescale", "probability") in ("probability", "none")
    return dataclasses.replace(method, into=None, layout_aware=False, rowwise=rowwise)


def della(
    *,
    density: float | list[float] = 0.5,
    epsilon: float | list[float] = 0.1,
    scale: float = 1.0,
    rescale: str = "probability",
    elect: str = "task_vector",
    disjoint_mean: bool = True,
) -> Method:
    """DELLA-merging (https://arxiv.org/abs/2406.11617): MagPrune, then TIES' sign election and
    disjoint mean, then ``scale`` (λ).

    MagPrune keeps each task vector entry with a probability that grows with its magnitude rank
    within its row, from ``density - epsilon`` (the smallest) to ``density + epsilon`` (the
    largest), and divides a kept entry by its probability, so the expectation is unchanged. The
    draw is counter-based like DARE's, reproducible from the recorded seed. Whole rows are
    ranked, so a sharded parameter (DTensor) is refused.

    mergekit's definition (what ``terge.from_mergekit`` sets): ``density`` and ``epsilon`` may
    be lists, one per contributing model; ``rescale="l1"`` (mergekit's ``rescale: true``) keeps
    the kept entries as they are and rescales the pruned task vector to its L1 norm before
    (``"l2"``, ``"linf"`` likewise), ``"none"`` does not rescale (``rescale: false``);
    ``elect="weighted"`` and ``disjoint_mean=False`` as :func:`ties`'s. The draws stay terge's
    (mergekit's come from torch's global generator). Options left at their defaults are not
    recorded, and only the default runs in the compiled loop.
    """
    return _della("della", density, epsilon, scale, True, rescale, elect, disjoint_mean)


def della_linear(
    *,
    density: float | list[float] = 0.5,
    epsilon: float | list[float] = 0.1,
    scale: float = 1.0,
    rescale: str = "probability",
) -> Method:
    """DELLA's MagPrune then task arithmetic, without sign election
    (https://arxiv.org/abs/2406.11617); settings as :func:`della`."""
    return _della("della_linear", density, epsilon, scale, False, rescale)


def sce(*, select_topk: float = 1.0, scale: float = 1.0, floor: float = 0.0) -> Method:
    """SCE (https://arxiv.org/abs/2408.07990): select, calculate, erase, as mergekit's ``sce``.

    Keeps the ``select_topk`` share of entries (of those that vary at all) whose task vectors
    vary most across the models, weights each model by its task vector's mean square, erases the
    entries whose sign disagrees with the summed task vectors' and averages the rest. The merge
    weights are not used. Differences from mergekit: entries tied at the selection threshold are
    all kept, and the weights fall back to equal only when every task vector is 0 (mergekit:
    when their sum is below 1e-6), and the disjoint mean divides wherever the agreeing weight is
    not 0 (mergekit clamps it to 1e-6). ``floor=1e-6`` is mergekit's arithmetic for both
    (what ``terge.from_mergekit`` sets; the float64 reference runs). A sharded parameter's
    selection and weights come from histograms and sums over the shards, so it merges exactly
    as the whole.
    """
    settings = {
        "select_topk": _ranged("sce", "select_topk", select_topk, 0, 1, "(]"),
        "scale": _check_scale("sce", scale),
    }
    if floor != 0:  # left out at its default: default merges and lineages are unchanged
        settings["floor"] = _ranged("sce", "floor", floor, 0, math.inf, "()")
    return Method(
        "sce",
        elementwise.sce_merge,
        into=fastelementwise.sce_into,
        settings=settings,
        task_vectors=True,
        needs_base=True,
        paper=_SCE,
        layout_aware=True,
        builtin=True,
    )


def breadcrumbs_ties(
    *,
    density: float | list[float] = 0.2,
    gamma: float | list[float] = 0.01,
    scale: float = 1.0,
    trim: str = "threshold",
    rescale: str | None = None,
    elect: str = "task_vector",
    disjoint_mean: bool = True,
) -> Method:
    """Model Breadcrumbs' mask, then TIES' sign election and disjoint mean (mergekit's
    ``breadcrumbs_ties``; https://arxiv.org/abs/2312.06795, https://arxiv.org/abs/2306.01708).
    Settings as :func:`breadcrumbs` and :func:`ties`; runs in the same compiled loops and on
    sharded parameters as TIES does."""
    method = breadcrumbs(density=density, gamma=gamma, scale=scale, trim=trim, rescale=rescale)
    settings = {
        **method.settings,
        **_options("breadcrumbs_ties", _DEFAULTS, elect=elect, disjoint_mean=disjoint_mean),
    }
    return _task_vector_method("breadcrumbs_ties", "breadcrumbs", "sign", settings, _BREADCRUMBS)


breadcrumbs_ties.__doc__ = (breadcrumbs_ties.__doc__ or "") + _MERGEKIT_OPTIONS


def _elementwise_task_vectors(
    name: str,
    function: MethodFunction,
    settings: dict[str, Any],
    paper: str,
    into: Callable[..., bool] | None = None,
) -> Method:
    return Method(
        name,
        function,
        into=into,
        settings=settings,
        task_vectors=True,
        needs_base=True,
        paper=paper,
        elementwise=True,
        builtin=True,
    )


def magmax(*, scale: float = 1.0) -> Method:
    """MagMax (https://arxiv.org/abs/2407.06322): every entry takes the task vector entry of the
    largest magnitude across the models (the first model's among equals), times ``scale``.
    The merge weights are not used. Element-wise, so it runs on sharded parameters as is."""
    settings = {"scale": _check_scale("magmax", scale)}
    return _elementwise_task_vectors(
        "magmax", elementwise.magmax_merge, settings, _MAGMAX, fastelementwise.magmax_into
    )


def consensus(*, k: int = 2, mask_lambda: float = 0.6, scale: float = 1.0) -> Method:
    """Consensus merging with TALL masks (https://arxiv.org/abs/2405.07813).

    Task ``t``'s TALL mask keeps the entries where its task vector is at least ``mask_lambda``
    times the rest of the summed task vectors (``|tau_t| >= mask_lambda |sum_i tau_i - tau_t|``);
    entries kept by fewer than ``k`` masks (selfish or catastrophic weights) are removed from the
    task arithmetic merge ``base + scale * sum_i w_i tau_i``. ``k=2`` and ``mask_lambda=0.6``
    are the paper's and FusionBench's defaults (the paper tunes λ per task on validation data).
    """
    settings = {
        "k": _count("consensus", "k", k, 0),
        "mask_lambda": _ranged("consensus", "mask_lambda", mask_lambda, 0, math.inf, "[)"),
        "scale": _check_scale("consensus", scale),
    }
    return _elementwise_task_vectors(
        "consensus", elementwise.consensus_merge, settings, _TALL, fastelementwise.consensus_into
    )


def pcb(*, ratio: float = 0.1, scale: float = 1.0) -> Method:
    """PCB-merging, parameter competition balancing (https://arxiv.org/abs/2410.02396).

    Scores each task vector entry by *intra-balancing* (its magnitude within its own task
    vector, ``exp(n * normalised^2)``) times *inter-balancing* (``tanh`` of its product with the
    summed task vectors: agreement with the others), keeps about the top ``ratio`` of each
    task's scores, and averages the (clipped) task vectors weighted by the normalised scores.
    The authors' code scores the whole model as one vector; terge scores each tensor (a
    parameter's own scale then matters, not the model's). The merge weights are not used;
    a sharded parameter is refused (the scores' quantiles need the whole tensor).
    """
    settings = {
        "ratio": _ranged("pcb", "ratio", ratio, 0, 1, "(]"),
        "scale": _check_scale("pcb", scale),
    }
    return Method(
        "pcb",
        elementwise.pcb_merge,
        into=fastpcb.pcb_into,
        settings=settings,
        task_vectors=True,
        needs_base=True,
        paper=_PCB,
        builtin=True,
    )


def nearswap(*, t: float = 0.001) -> Method:
    """NearSwap (mergekit's ``nearswap``): one model merged into the base, taking the model's
    value where the two are within ``t`` of each other and leaning towards the base the further
    they are apart: ``w = min(1, t / |theta - base|)``, ``w theta + (1 - w) base``. Exactly one
    model besides the base; its weight is not used."""
    settings = {"t": _ranged("nearswap", "t", t, 0, math.inf, "()")}
    method = _elementwise_task_vectors(
        "nearswap", elementwise.nearswap_merge, settings, _NEARSWAP, fastelementwise.nearswap_into
    )
    return dataclasses.replace(method, min_models=1, max_models=1)


def _spherical(
    name: str,
    function: MethodFunction,
    into: Callable[..., bool],
    settings: dict[str, Any],
    paper: str,
    **flags: Any,
) -> Method:
    task_vectors = settings["task_vectors"]
    return Method(
        name,
        function,
        into=into,
        settings=settings,
        task_vectors=task_vectors,
        needs_base=task_vectors,
        paper=paper,
        builtin=True,
        **{"layout_aware": True, **flags},
    )


def multislerp(*, task_vectors: bool = False, eps: float = 0.0) -> Method:
    """Multi-SLERP (mergekit's ``multislerp``): the weighted mean of any number of models on
    the sphere, ``(sum_i w_i |x_i|) m / |m|`` with ``m = sum_i w_i x_i / |x_i|``, over the
    flattened tensors (``task_vectors=True``: over ``theta_i - base``, the base added back).
    A sharded parameter's norms are float64 sums over the shards. ``eps`` is mergekit's
    ``x_i / (|x_i| + eps)`` (its default 1e-8, which ``terge.from_mergekit`` sets): the
    directions are then weighted as mergekit weighs them."""
    settings: dict[str, Any] = {"task_vectors": _flag("multislerp", "task_vectors", task_vectors)}
    if eps != 0:  # left out at its default: default merges and lineages are unchanged
        settings["eps"] = _ranged("multislerp", "eps", eps, 0, math.inf, "()")
    return _spherical(
        "multislerp", spherical.multislerp_merge, spherical.multislerp_into, settings, _MULTISLERP
    )


def nuslerp(*, flatten: bool = True, row_wise: bool = False, task_vectors: bool = False) -> Method:
    """NuSLERP (mergekit's ``nuslerp``): SLERP of two models by ``t = w_2 / (w_1 + w_2)``,
    over the flattened tensors (``flatten=True``, the default) or vector by vector along the
    last dimension (``flatten=False``), or the first (``row_wise=True``, mergekit's
    ``nuslerp_row_wise``); ``task_vectors=True`` interpolates ``theta_i - base``. Zero or
    (anti)parallel vectors are interpolated linearly (mergekit slerps a zero vector as if at
    a right angle). Flattened, it runs on sharded parameters; vector by vector it is refused.
    Along the last dimension each row's vectors are its own, so a large tensor is merged a
    block of rows at a time (no float64 copy of a whole model)."""
    settings = {
        "flatten": _flag("nuslerp", "flatten", flatten),
        "row_wise": _flag("nuslerp", "row_wise", row_wise),
        "task_vectors": _flag("nuslerp", "task_vectors", task_vectors),
    }
    return _spherical(
        "nuslerp",
        spherical.nuslerp_merge,
        spherical.nuslerp_into,
        settings,
        _MULTISLERP,
        min_models=2,
        max_models=2,
        layout_aware=settings["flatten"],
        rowwise=not settings["flatten"] and not settings["row_wise"],
    )


def karcher(*, max_iter: int = 10, tol: float = 1e-5, task_vectors: bool = False) -> Method:
    """The Karcher mean (mergekit's ``karcher``; https://en.wikipedia.org/wiki/Karcher_mean):
    the weighted Riemannian mean of the models' directions on the sphere, by up to ``max_iter``
    gradient steps until the step is below ``tol``, scaled to their weighted mean norm. With
    equal weights it is mergekit's definition (which ignores weights); ``task_vectors=True``
    averages ``theta_i - base``. A sharded parameter's dot products are summed over the shards.
    """
    settings = {
        "max_iter": _count("karcher", "max_iter", max_iter, 1),
        "tol": _ranged("karcher", "tol", tol, 0, math.inf, "()"),
        "task_vectors": _flag("karcher", "task_vectors", task_vectors),
    }
    return _spherical(
        "karcher", spherical.karcher_merge, spherical.karcher_into, settings, _KARCHER
    )


def _subspace(name: str, function: MethodFunction, settings: dict[str, Any], paper: str) -> Method:
    settings["scale"] = _check_scale(name, settings["scale"])
    settings["fallback"] = _choice(name, "fallback", settings["fallback"], _FALLBACKS)
    return Method(
        name,
        function,
        settings=settings,
        task_vectors=True,
        needs_base=True,
        paper=paper,
        builtin=True,
    )


def tsv_m(*, scale: float = 1.0, fallback: str = "mean") -> Method:
    """TSV-M, task singular vectors merging (https://arxiv.org/abs/2412.00081): each 2-D task
    vector keeps its top ``1/T`` singular triplets; the gathered singular vectors are
    orthogonalised and recombined with their singular values, in float64 with
    ``torch.linalg.svd``. Tensors that are not 2-D take ``fallback``: ``"mean"`` of the task
    vectors (the paper's code) or their ``"sum"``, recorded in the lineage with the settings.
    The merge weights are not used; a sharded parameter is refused."""
    settings: dict[str, Any] = {"scale": scale, "fallback": fallback}
    return _subspace("tsv_m", subspace.tsv_merge, settings, _TSV)


def iso_c(*, scale: float = 1.0, fallback: str = "mean") -> Method:
    """Iso-C (https://arxiv.org/abs/2502.04959): the 2-D sum of the task vectors with its
    singular values all set to their mean (an isotropic spectrum), in float64 with
    ``torch.linalg.svd``. Other tensors take ``fallback`` as in :func:`tsv_m`. The paper tunes
    ``scale``; the merge weights are not used; a sharded parameter is refused."""
    settings: dict[str, Any] = {"scale": scale, "fallback": fallback}
    return _subspace("iso_c", subspace.iso_c_merge, settings, _ISO)


def iso_cts(*, common_fraction: float = 0.8, scale: float = 1.0, fallback: str = "mean") -> Method:
    """Iso-CTS (https://arxiv.org/abs/2502.04959): Iso-C over a common subspace (the top
    ``common_fraction`` of the summed task vectors' directions) plus each task's own top
    directions outside it, orthogonalised, with an isotropic spectrum. Other tensors take
    ``fallback`` as in :func:`tsv_m`; the merge weights are not used; a sharded parameter is
    refused."""
    settings: dict[str, Any] = {
        "common_fraction": _ranged("iso_cts", "common_fraction", common_fraction, 0, 1, "[]"),
        "scale": scale,
        "fallback": fallback,
    }
    return _subspace("iso_cts", subspace.iso_cts_merge, settings, _ISO)


_FISHER = "https://arxiv.org/abs/2111.09832"
_REGMEAN = "https://arxiv.org/abs/2212.09849"


def _statistics(method: str, setting: str, value: Any) -> tuple[Mapping[str, torch.Tensor], ...]:
    """Per-model statistics: a list with one mapping of parameter names to tensors per model."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise MergeArgumentError(
            f"{method}: {setting} must be a list with one mapping (parameter name to tensor) per "
            f"model, in the order of `models`; got {type(value).__name__}."
        )
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise MergeArgumentError(
                f"{method}: {setting}[{index}] must be a mapping of parameter names to tensors; "
                f"got {type(item).__name__}."
            )
        for key, tensor in item.items():
            if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
                raise MergeArgumentError(
                    f"{method}: {setting}[{index}] must map parameter names (str) to tensors; "
                    f"got {key!r}: {type(tensor).__name__}."
                )
    return tuple(value)


def _with_statistics(
    name: str, function: MethodFunction, settings: dict[str, Any], paper: str
) -> Method:
    return Method(name, function, settings=settings, paper=paper, named=True, builtin=True)


def fisher(fishers: Sequence[Mapping[str, torch.Tensor]], *, epsilon: float = 1e-6) -> Method:
    """Fisher merging (https://arxiv.org/abs/2111.09832): each entry the models' entries
    weighted by their Fisher information, ``sum_i w_i (F_i + epsilon) theta_i / sum_i w_i (F_i +
    epsilon)``, so each model decides the parameters it is sure of.

    ``fishers`` has one mapping per model (in the order of ``models``) from parameter names to
    Fisher diagonals of the parameter's shape, as :func:`fisher_diagonals` computes them; a
    parameter none of them covers takes the weighted mean, and one only some cover is an error.
    ``epsilon`` (default 1e-6, FusionBench's ``minimal_fisher_weight``) keeps an entry no model
    is informed about at the weighted mean. The statistics are not in the lineage, so such a
    merge is recorded as one that cannot be recomputed.
    """
    settings = {"epsilon": _ranged("fisher", "epsilon", epsilon, 0, math.inf, "[)")}
    function = partial(statistics.fisher_merge, fishers=_statistics("fisher", "fishers", fishers))
    return _with_statistics("fisher", function, settings, _FISHER)


def regmean(grams: Sequence[Mapping[str, torch.Tensor]], *, alpha: float = 0.9) -> Method:
    """RegMean (https://arxiv.org/abs/2212.09849): each linear layer's weight solved in closed
    form to reproduce every model's outputs on its own inputs, ``W^T = (sum_i w_i G_i)^-1 sum_i
    w_i G_i W_i^T`` with ``G_i`` the Gram matrix of model ``i``'s inputs to the layer.

    ``grams`` has one mapping per model from a linear layer's weight name to its ``in x in``
    Gram matrix, as :func:`gram_matrices` computes them; ``alpha`` scales their off-diagonal
    entries (the paper's regularisation; 0.9 is its usual choice, 1 the plain least squares).
    Parameters without Gram matrices (biases, norms, embeddings) take the weighted mean. The
    statistics are not in the lineage, so such a merge is recorded as one that cannot be
    recomputed.
    """
    settings = {"alpha": _ranged("regmean", "alpha", alpha, 0, 1, "[]")}
    function = partial(statistics.regmean_merge, grams=_statistics("regmean", "grams", grams))
    return _with_statistics("regmean", function, settings, _REGMEAN)


fisher_diagonals = statistics.fisher_diagonals
gram_matrices = statistics.gram_matrices


# --- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodInfo:
    """A registry entry: the factory, its paper and the formula the README shows."""

    factory: Callable[..., Method]
    formula: str
    paper: str | None = None


REGISTRY: Mapping[str, MethodInfo] = MappingProxyType(
    {
        "arithmetic": MethodInfo(arithmetic, "sum_i w_i theta_i", _MODEL_SOUPS),
        "task_arithmetic": MethodInfo(
            task_arithmetic,
            "base + scale * sum_i w_i tau_i, where tau_i = theta_i - base",
            _TASK_ARITHMETIC,
        ),
        "ties": MethodInfo(
            ties,
            "t_i = tau_i where |tau_i| >= its k-th largest magnitude, k = "
            "max(1, int(density * numel)), else 0; "
            "s = sign(sum_i w_i t_i) (0 counts as +); a_i = [sign(t_i) = s]; "
            "base + scale * sum_i w_i a_i t_i / sum_i w_i a_i (0 where none agrees)",
            _TIES,
        ),
        "dare_linear": MethodInfo(
            dare_linear,
            "d_i = tau_i * [u_ij < density] / density, u_ij uniform from (seed, i, j); "
            "base + scale * sum_i w_i d_i",
            _DARE,
        ),
        "dare_ties": MethodInfo(
            dare_ties,
            "d_i = tau_i * [u_ij < density] / density, u_ij uniform from (seed, i, j); then "
            "ties' sign election and disjoint mean of the d_i",
            _DARE,
        ),
        "breadcrumbs": MethodInfo(
            breadcrumbs,
            "b_i = tau_i where lo <= |tau_i| < hi, else 0: hi its top-th largest magnitude "
            "(none when top = 0), lo its (top + keep)-th, top = int(gamma * numel), keep = "
            "max(1, int(density * numel)); base + scale * sum_i w_i b_i",
            _BREADCRUMBS,
        ),
        "slerp": MethodInfo(
            slerp,
            "t = w_2; (sin((1 - t) W) theta_1 + sin(t W) theta_2) / sin W, W the angle between "
            "theta_1 and theta_2 (linear when |cos W| > 1 - 1e-4 or a tensor is 0)",
            _SLERP,
        ),
        "model_stock": MethodInfo(
            model_stock,
            "c = mean_{i<j} cos(tau_i, tau_j) clamped to [0, 1]; t = N c / (1 + (N - 1) c); "
            "t * mean_i theta_i + (1 - t) * base",
            _MODEL_STOCK,
        ),
        "della": MethodInfo(
            della,
            "p_ij = density - epsilon + 2 epsilon r_ij / (n - 1), r_ij the rank of |tau_ij| in its "
            "row of n (ascending, ties by position); d_i = tau_i * [u_ij < p_ij] / p_ij, u_ij "
            "uniform from (seed, i, j); then ties' sign election and disjoint mean of the d_i, "
            "times scale",
            _DELLA,
        ),
        "della_linear": MethodInfo(
            della_linear,
            "d_i as della's; base + scale * sum_i w_i d_i",
            _DELLA,
        ),
        "sce": MethodInfo(
            sce,
            "keep entries whose variance across the tau_i is at least its k-th largest, k = "
            "int(select_topk * nonzero); c_i = mean(tau_i^2) / sum_j mean(tau_j^2); a_i = "
            "[sign(tau_i) = sign(sum_j tau_j)]; base + scale * sum_i c_i a_i tau_i / sum_i c_i a_i",
            _SCE,
        ),
        "breadcrumbs_ties": MethodInfo(
            breadcrumbs_ties,
            "b_i as breadcrumbs'; then ties' sign election and disjoint mean of the b_i",
            _BREADCRUMBS,
        ),
        "magmax": MethodInfo(
            magmax,
            "base + scale * tau_m, m = argmax_i |tau_i| per entry (the first among equals)",
            _MAGMAX,
        ),
        "consensus": MethodInfo(
            consensus,
            "m_t = [|tau_t| >= mask_lambda |sum_i tau_i - tau_t|]; base + scale * "
            "[sum_t m_t >= k] * sum_i w_i tau_i",
            _TALL,
        ),
        "pcb": MethodInfo(
            pcb,
            "c_i = tau_i with |tau_i| clipped to its 1e-4 quantiles; b_i = exp(n norm(|c_i|)^2) "
            "tanh(tau_i sum_j tau_j); s_i = norm(max(b_i, its int(d (1 - ratio))-th smallest)); "
            "base + scale * sum_i s_i c_i / sum_i s_i (norm: min-max to [0, 1])",
            _PCB,
        ),
        "nearswap": MethodInfo(
            nearswap,
            "w = min(1, t / |theta - base|); w theta + (1 - w) base (one model)",
            _NEARSWAP,
        ),
        "multislerp": MethodInfo(
            multislerp,
            "m = sum_i w_i x_i / |x_i|; (sum_i w_i |x_i|) m / |m| (x_i = theta_i, or tau_i with "
            "the base added back)",
            _MULTISLERP,
        ),
        "nuslerp": MethodInfo(
            nuslerp,
            "t = w_2 / (w_1 + w_2); slerp(x_1, x_2, t) over the flattened tensors, or per vector "
            "along the last (row_wise: first) dimension",
            _MULTISLERP,
        ),
        "karcher": MethodInfo(
            karcher,
            "m <- exp_m(sum_i a_i W_i / sin W_i (u_i - cos W_i m)) up to max_iter times until the "
            "step < tol, u_i = x_i / |x_i|; (sum_i w_i |x_i|) m",
            _KARCHER,
        ),
        "tsv_m": MethodInfo(
            tsv_m,
            "2-D: tau_i = U_i S_i V_i^T, top k = max(1, int(r / T)) of each gathered; "
            "base + scale * polar(U) diag(S) polar(V)^T; else the fallback (mean or sum of the "
            "tau_i)",
            _TSV,
        ),
        "iso_c": MethodInfo(
            iso_c,
            "2-D: sum_i tau_i = U S V^T; base + scale * mean(S) U V^T; else the fallback",
            _ISO,
        ),
        "iso_cts": MethodInfo(
            iso_cts,
            "2-D: the top c directions of sum_i tau_i and the top s of each tau_i's residual, "
            "c + T s = r; base + scale * mean(S) polar(U) polar(V)^T; else the fallback",
            _ISO,
        ),
        "fisher": MethodInfo(
            fisher,
            "sum_i w_i (F_i + epsilon) theta_i / sum_i w_i (F_i + epsilon), F_i model i's Fisher "
            "diagonal (given per model); without one, sum_i w_i theta_i",
            _FISHER,
        ),
        "regmean": MethodInfo(
            regmean,
            "linear weights: W^T = (sum_i w_i G_i)^-1 sum_i w_i G_i W_i^T, G_i model i's Gram "
            "matrix X_i^T X_i (given per model) with off-diagonals times alpha; others: "
            "sum_i w_i theta_i",
            _REGMEAN,
        ),
    }
)
"""Every named method, in the order the README's table lists them."""


def _paper_link(url: str | None) -> str:
    if url is None:
        return ""
    if "arxiv.org/abs/" in url:
        label = "arXiv:" + url.rsplit("/abs/", 1)[1]
    elif "/doi/" in url:
        label = "doi:" + url.rsplit("/doi/", 1)[1]
    else:
        label = url
    return f"[{label}]({url})"


def _required(factory: Callable[..., Method]) -> list[str]:
    """The arguments a factory cannot do without (the per-model statistics)."""
    return [
        p.name
        for p in inspect.signature(factory).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def _settings_shown(factory: Callable[..., Method]) -> list[str]:
    required = _required(factory)
    if not required:
        return [f"`{k}={v!r}`" for k, v in factory().settings.items()]
    optional = [
        f"`{p.name}={p.default!r}`"
        for p in inspect.signature(factory).parameters.values()
        if p.default is not inspect.Parameter.empty
    ]
    return [f"`{name}` (required)" for name in required] + optional


def readme_table() -> str:
    """The README's table of methods, rendered from :data:`REGISTRY` so the two cannot drift."""
    rows = [
        "| method | settings (defaults) | formula | paper |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in REGISTRY.items():
        settings = ", ".join(_settings_shown(info.factory)) or "—"
        formula = info.formula.replace("|", "\\|")
        rows.append(f"| `{name}` | {settings} | {formula} | {_paper_link(info.paper)} |")
    return "\n".join(rows) + "\n"


def resolve(method: Any, argument: str = "method") -> Method:
    """Turn a method name, a ``Method`` or a user's callable into a ``Method``."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        info = REGISTRY.get(method)
        if info is None:
            raise UnknownMergeMethodError(
                f"`{argument}` names an unknown merge method {method!r}; the valid names are "
                f"{', '.join(repr(n) for n in REGISTRY)}, or pass a callable "
                "f(tensors, weights, base) -> tensor."
            )
        required = _required(info.factory)
        if required:
            raise MergeArgumentError(
                f"`{argument}` names the merge method {method!r}, which needs "
                f"{', '.join(required)} (per-model statistics); pass "
                f"terge.methods.{method}({required[0]}=[...]) instead of its name."
            )
        return info.factory()
    if callable(method):
        return custom(method)
    raise MergeArgumentError(
        f"`{argument}` must be a method name ({', '.join(repr(n) for n in REGISTRY)}), a method "
        f"from terge.methods, a callable, or a map of patterns to those; got "
        f"{type(method).__name__}."
    )


def custom(
    function: Callable[..., torch.Tensor], name: str | None = None, *, elementwise: bool = False
) -> Method:
    """Wrap a user's ``f(tensors, weights, base) -> tensor`` as a method named after it.

    ``base`` is the base's float64 tensor (the separate ``base=`` model's, or ``models[base]``'s,
    which is then also among ``tensors``), so a task-vector method of one's own can be written.

    ``elementwise=True`` declares that each entry of the result depends only on the same entry
    of the inputs (a median, a clamp), so the function may run on each shard of a sharded
    parameter (a DTensor) as it is; without it, a sharded parameter is refused.
    """
    if not isinstance(elementwise, bool):
        raise MergeArgumentError(f"`elementwise` must be True or False; got {elementwise!r}.")
    if name is None:
        name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
        name = name or type(function).__name__
    try:
        inspect.signature(function).bind([], [], None)
    except TypeError as error:
        raise MergeArgumentError(
            f"the custom merge method {name!r} must accept (tensors, weights, base); {error}."
        ) from None
    except ValueError:  # builtins without a signature: trust them
        pass
    return Method(
        name,
        lambda tensors, weights, base: function(tensors, weights, base),
        elementwise=elementwise,
    )
