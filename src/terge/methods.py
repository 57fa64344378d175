"""The registry of merge methods and their settings.

A method is a small pure function over float64 tensors:

    function(tensors, weights, base, *, generator=None, **settings) -> Tensor

``tensors`` are the contributing models' tensors (float64, same shape, on the destination's
device), ``weights`` their weights (normalised to sum to 1 unless ``normalize=False``), ``base`` the
reference tensor in float64 (or ``None`` when the method uses none), ``generator`` a
``torch.Generator`` seeded per parameter for random methods. It returns the merged float64 tensor.

``method='name'`` takes a registered method with its defaults; a factory such as
``terge.methods.ties(density=0.3)`` configures one with keyword settings, checked at once; a plain
callable ``f(tensors, weights, base)`` is accepted wherever a method is.

The task-vector methods (task arithmetic, TIES, DARE, breadcrumbs) share one core,
:func:`_task_vector_merge`, configured by a *sparsification* (none, magnitude, random, breadcrumbs)
and a *consensus* (none, or TIES' sign election with its disjoint mean), so a fix to one is a fix
to all. Their task vectors are ``tau_i = theta_i - base``.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any

import torch

from .errors import MergeArgumentError, MethodNotApplicableError, UnknownMergeMethodError
from .layerwise import ByLayer

__all__ = [
    "REGISTRY",
    "Method",
    "MethodFunction",
    "MethodInfo",
    "arithmetic",
    "breadcrumbs",
    "custom",
    "dare_linear",
    "dare_ties",
    "model_stock",
    "readme_table",
    "resolve",
    "slerp",
    "task_arithmetic",
    "ties",
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
    streaming: bool = False
    """Computed by the chunked linear kernel rather than ``function`` on whole tensors."""
    paper: str | None = None

    def __call__(
        self,
        tensors: list[torch.Tensor],
        weights: list[float],
        base: torch.Tensor | None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if self.random:
            return self.function(tensors, weights, base, generator=generator, **self.settings)
        return self.function(tensors, weights, base, **self.settings)


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


# --- arithmetic -----------------------------------------------------------------------------------


def _arithmetic(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None):
    """The weighted sum of the tensors (a weighted mean when the weights are normalised)."""
    result = tensors[0] * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        result.add_(tensor, alpha=weight)
    return result


def arithmetic() -> Method:
    """The weighted arithmetic mean, ``sum_i w_i theta_i`` (terge 0.1.1's only method).

    A uniform mean of fine-tuned models is a "model soup", https://arxiv.org/abs/2203.05482.
    """
    return Method("arithmetic", _arithmetic, streaming=True, min_models=1, paper=_MODEL_SOUPS)


# --- the task-vector core -------------------------------------------------------------------------


def _zero_outside(flat: torch.Tensor, keep: torch.Tensor) -> None:
    """Zero the entries of ``flat`` whose index is not in ``keep``, in place."""
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[keep] = True
    flat.masked_fill_(~mask, 0)


def _keep_largest(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: keep the ``int(density * numel)`` largest magnitudes (at least one)."""
    flat = tau.view(-1)
    n = flat.numel()
    k = max(1, int(density * n))
    if k >= n:
        return tau
    magnitude = flat.abs()
    if k <= n - k:  # select the smaller side, which topk does faster and in less memory
        _zero_outside(flat, torch.topk(magnitude, k, sorted=False).indices)
    else:
        flat[torch.topk(magnitude, n - k, largest=False, sorted=False).indices] = 0
    return tau


def _keep_breadcrumbs(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs' mask: drop the ``int(gamma * numel)`` largest magnitudes (outliers) and then
    the smallest, leaving ``int(density * numel)`` entries (at least one, so a small tensor such as
    a bias or a norm scale is never wiped whole)."""
    flat = tau.view(-1)
    n = flat.numel()
    keep = max(1, int(density * n))
    if keep >= n:
        return tau
    top = min(int(gamma * n), n - keep)
    # The top + keep largest magnitudes, less their top largest: two partial selections instead
    # of a full sort (about 7x faster on an embedding matrix).
    candidates = torch.topk(flat.abs(), top + keep, sorted=False)
    kept = candidates.indices
    if top:
        outliers = torch.topk(candidates.values, top, sorted=False).indices
        inside = torch.ones(top + keep, dtype=torch.bool, device=flat.device)
        inside[outliers] = False
        kept = kept[inside]
    _zero_outside(flat, kept)
    return tau


def _random_drop(
    tau: torch.Tensor, density: float, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE: drop each entry with probability ``1 - density``, divide the survivors by ``density``
    so the task vector's expectation is unchanged. The draw is ``torch.rand(shape) < density`` in
    float32 on the generator's device (one draw per task vector, in model order), then moved."""
    if density == 1:
        return tau
    device = generator.device if generator is not None else tau.device
    draw = torch.rand(tau.shape, generator=generator, device=device, dtype=torch.float32)
    keep = (draw < density).to(tau.device)
    del draw
    return tau.masked_fill_(~keep, 0).div_(density)


def _task_vector_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    generator: torch.Generator | None = None,
    name: str,
    sparsification: str | None,
    consensus: str | None,
    scale: float = 1.0,
    density: float = 1.0,
    gamma: float = 0.0,
) -> torch.Tensor:
    """``base + scale * combine_i(w_i, sparsify(tau_i))``: the core of every task-vector method.

    ``sparsification`` is ``None``, ``"magnitude"`` (TIES' trim), ``"random"`` (DARE's drop and
    rescale) or ``"breadcrumbs"``; ``consensus`` is ``None`` (the weighted sum) or ``"sign"``
    (TIES' elected sign and disjoint mean).
    """
    if base is None:
        raise MethodNotApplicableError(f"{name}: needs a base model to take task vectors from.")

    def sparsified(theta: torch.Tensor) -> torch.Tensor:
        tau = (theta - base).contiguous()
        if sparsification == "magnitude":
            return _keep_largest(tau, density)
        if sparsification == "random":
            return _random_drop(tau, density, generator)
        if sparsification == "breadcrumbs":
            return _keep_breadcrumbs(tau, density, gamma)
        return tau

    if consensus is None:  # one task vector alive at a time
        merged = torch.zeros_like(base)
        for theta, weight in zip(tensors, weights, strict=True):
            merged.add_(sparsified(theta), alpha=weight)
        return base.add(merged, alpha=scale)

    # TIES (https://arxiv.org/abs/2306.01708): the sign with the larger weighted mass wins (a tie
    # counts as +), and each entry is the weighted mean of the task vectors that agree with it.
    deltas = [sparsified(theta) for theta in tensors]
    elected = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights, strict=True):
        elected.add_(delta, alpha=weight)
    positive = elected >= 0
    del elected
    numerator = torch.zeros_like(base)
    denominator = torch.zeros_like(base)
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = torch.where(positive, delta > 0, delta < 0)
        numerator.add_(delta.masked_fill(~agrees, 0), alpha=weight)
        denominator.add_(agrees.to(base.dtype), alpha=weight)
    del deltas
    # Where no model agrees the numerator is 0 too; where agreeing weights cancel (only possible
    # with unnormalised signed weights) the weighted sum stands, as in mergekit.
    merged = torch.where(denominator != 0, numerator / denominator, numerator)
    return base.add(merged, alpha=scale)


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
    return Method(
        name,
        function,
        settings=settings,
        task_vectors=True,
        needs_base=True,
        min_models=1,
        random=sparsification == "random",
        paper=paper,
    )


def task_arithmetic(*, scale: float = 1.0) -> Method:
    """Task arithmetic, ``base + scale * sum_i w_i tau_i`` (https://arxiv.org/abs/2212.04089).

    Adding fine-tuning deltas to the base model keeps what each fine-tune learned; ``scale`` (λ)
    tunes how strongly, and a negative one subtracts a task.
    """
    settings = {"scale": _check_scale("task_arithmetic", scale)}
    return _task_vector_method("task_arithmetic", None, None, settings, _TASK_ARITHMETIC)


def ties(*, density: float = 0.2, scale: float = 1.0) -> Method:
    """TIES-merging: trim, elect sign, disjoint merge (https://arxiv.org/abs/2306.01708).

    Each task vector keeps its ``int(density * numel)`` largest magnitudes (small deltas are mostly
    noise), the sign with the larger weighted mass is elected per entry, and only the entries that
    agree with it are averaged, so opposing updates do not cancel. The default ``density=0.2``
    is the top-20% the paper uses throughout.
    """
    settings = {
        "density": _check_density("ties", density),
        "scale": _check_scale("ties", scale),
    }
    return _task_vector_method("ties", "magnitude", "sign", settings, _TIES)


def dare_linear(*, density: float = 0.5, scale: float = 1.0) -> Method:
    """DARE then task arithmetic (https://arxiv.org/abs/2311.03099).

    Dropping a random ``1 - density`` of each task vector and rescaling the rest by
    ``1 / density`` keeps its expectation while making the task vectors sparse, so they interfere
    less. The default ``density=0.5`` is conservative: the paper drops 90% of small SFT deltas,
    but the ``1 / density`` rescale amplifies the noise of larger deltas.
    """
    settings = {
        "density": _check_density("dare_linear", density),
        "scale": _check_scale("dare_linear", scale),
    }
    return _task_vector_method("dare_linear", "random", None, settings, _DARE)


def dare_ties(*, density: float = 0.5, scale: float = 1.0) -> Method:
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean
    (https://arxiv.org/abs/2311.03099, https://arxiv.org/abs/2306.01708). Defaults as
    :func:`dare_linear`."""
    settings = {
        "density": _check_density("dare_ties", density),
        "scale": _check_scale("dare_ties", scale),
    }
    return _task_vector_method("dare_ties", "random", "sign", settings, _DARE)


def breadcrumbs(*, density: float = 0.2, gamma: float = 0.01, scale: float = 1.0) -> Method:
    """Model Breadcrumbs (https://arxiv.org/abs/2312.06795): task arithmetic over task vectors
    with both tails masked, the ``gamma`` largest magnitudes (outliers that overwrite the other
    tasks) and the smallest (noise), keeping ``density`` of the entries.

    Defaults: ``gamma=0.01`` (the top 1%, as the paper's and mergekit's) and ``density=0.2``
    (the same share as :func:`ties`, close to the paper's 85%-bottom masks).
    """
    density_ = _check_density("breadcrumbs", density)
    gamma_ = _check_gamma("breadcrumbs", gamma)
    largest = _largest(density_) + _largest(gamma_)  # per-layer values: the worst case
    if largest > 1 + 1e-12:  # tolerate float sums such as 0.7 + 0.3
        raise MergeArgumentError(
            "breadcrumbs: density + gamma must be at most 1 (density of the entries are kept "
            f"after the gamma largest are removed), got density={density!r} + gamma={gamma!r} "
            f"= {largest!r}."
        )
    settings = {"density": density_, "gamma": gamma_, "scale": _check_scale("breadcrumbs", scale)}
    return _task_vector_method("breadcrumbs", "breadcrumbs", None, settings, _BREADCRUMBS)


def _largest(value: Any) -> float:
    if isinstance(value, ByLayer):
        return max((*value.values, *(() if value.other is None else (value.other,))))
    return value


# --- slerp ----------------------------------------------------------------------------------------

_PARALLEL = 1e-4
"""SLERP interpolates linearly when ``|cos| > 1 - _PARALLEL``: the angle is too small (or too
close to π) for ``sin`` to divide by."""


def _slerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None):
    if len(tensors) != 2:
        raise MethodNotApplicableError(
            f"slerp: interpolates exactly two models, got {len(tensors)}."
        )
    v0, v1 = tensors
    t = float(weights[1])
    flat0, flat1 = v0.reshape(-1), v1.reshape(-1)
    norm0 = torch.linalg.vector_norm(flat0).item()
    norm1 = torch.linalg.vector_norm(flat1).item()
    if norm0 == 0 or norm1 == 0:  # no direction to rotate: the line is all there is
        return torch.lerp(v0, v1, t)
    cos = torch.dot(flat0, flat1).item() / (norm0 * norm1)
    if not abs(cos) <= 1 - _PARALLEL:  # (anti)parallel; also NaN, which lerp propagates
        return torch.lerp(v0, v1, t)
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    result = v0 * (math.sin((1 - t) * omega) / sin_omega)
    return result.add_(v1, alpha=math.sin(t * omega) / sin_omega)


def slerp() -> Method:
    """Spherical linear interpolation of two models (Shoemake 1985,
    https://dl.acm.org/doi/10.1145/325165.325242).

    Interpolating along the arc between the flattened tensors, rather than the chord, keeps the
    norm from shrinking between dissimilar models. ``t`` is the second model's weight (normalised
    weights ``[1 - t, t]``); (anti)parallel or zero tensors fall back to linear interpolation.
    """
    return Method("slerp", _slerp, min_models=2, max_models=2, paper=_SLERP)


# --- model stock ----------------------------------------------------------------------------------


def _model_stock(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None):
    if base is None:
        raise MethodNotApplicableError("model_stock: needs a base model to take task vectors from.")
    n = len(tensors)
    if n < 2:
        raise MethodNotApplicableError(
            f"model_stock: needs at least two models besides the base, got {n}."
        )
    taus = [(theta - base).reshape(-1) for theta in tensors]
    norms = [torch.linalg.vector_norm(tau).item() for tau in taus]
    total = 0.0
    for i in range(n):
        for j in range(i + 1, n):
            if norms[i] > 0 and norms[j] > 0:  # a zero task vector has no angle: cos = 0
                total += torch.dot(taus[i], taus[j]).item() / (norms[i] * norms[j])
    del taus
    cos = min(max(total / (n * (n - 1) / 2), 0.0), 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    mean = _arithmetic(tensors, [1 / n] * n, None)
    return mean.mul_(t).add_(base, alpha=1 - t)


def model_stock() -> Method:
    """Model Stock (https://arxiv.org/abs/2403.19522): ``t * mean_i theta_i + (1 - t) * base``
    with ``t = N cos / (1 + (N - 1) cos)``, ``cos`` the mean pairwise cosine of the task vectors.

    The less the fine-tunes agree (smaller angle cosine), the closer to the base the merge stays.
    The weights are unused: the method sets its own. A pair with a zero task vector counts as
    ``cos = 0``, and ``cos`` is clamped to [0, 1] so that ``t`` stays in [0, 1]: below 0 the
    formula would move away from the models, and at ``cos = -1/(N-1)`` divide by zero.
    """
    return Method(
        "model_stock",
        _model_stock,
        task_vectors=True,
        needs_base=True,
        min_models=2,
        paper=_MODEL_STOCK,
    )


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
            "t_i = tau_i trimmed to its max(1, int(density * numel)) largest magnitudes; "
            "s = sign(sum_i w_i t_i) (0 counts as +); a_i = [sign(t_i) = s]; "
            "base + scale * sum_i w_i a_i t_i / sum_i w_i a_i (0 where none agrees)",
            _TIES,
        ),
        "dare_linear": MethodInfo(
            dare_linear,
            "d_i = tau_i * Bernoulli(density) / density; base + scale * sum_i w_i d_i",
            _DARE,
        ),
        "dare_ties": MethodInfo(
            dare_ties,
            "d_i = tau_i * Bernoulli(density) / density; then ties' sign election and "
            "disjoint mean of the d_i",
            _DARE,
        ),
        "breadcrumbs": MethodInfo(
            breadcrumbs,
            "b_i = tau_i less its int(gamma * numel) largest and its smallest magnitudes, "
            "keeping max(1, int(density * numel)); base + scale * sum_i w_i b_i",
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


def readme_table() -> str:
    """The README's table of methods, rendered from :data:`REGISTRY` so the two cannot drift."""
    rows = [
        "| method | settings (defaults) | formula | paper |",
        "| --- | --- | --- | --- |",
    ]
    for name, info in REGISTRY.items():
        settings = ", ".join(f"`{k}={v!r}`" for k, v in info.factory().settings.items()) or "—"
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
        return info.factory()
    if callable(method):
        return custom(method)
    raise MergeArgumentError(
        f"`{argument}` must be a method name ({', '.join(repr(n) for n in REGISTRY)}), a method "
        f"from terge.methods, a callable, or a map of patterns to those; got "
        f"{type(method).__name__}."
    )


def custom(function: Callable[..., torch.Tensor], name: str | None = None) -> Method:
    """Wrap a user's ``f(tensors, weights, base) -> tensor`` as a method named after it."""
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
    return Method(name, lambda tensors, weights, base: function(tensors, weights, base))
