"""Interpolation on the sphere for more than two models, or row by row: Multi-SLERP, NuSLERP and
the Karcher mean.

Each works on the flattened tensors (or, with ``task_vectors``, on ``theta_i - base``, the base
added back at the end). Their whole-tensor statistics are float64 dot products, summed over the
shards of a sharded parameter (:class:`~terge.sharding.Layout`), so a sharded merge gives the
whole one's result up to the rounding of those sums.

Whatever these methods compute is a linear combination of the models: every norm and angle they
need is a quadratic form of the coefficients in the models' Gram matrix ``G_ij = <x_i, x_j>``.
So each takes the Gram matrix in one pass (:func:`~terge.kernels.statistics.dot_products`),
works out its coefficients in Python floats, and combines the models in one more pass (the
linear loops): streamed from the inputs as stored (``*_into``), no float64 copy of a model, the
same bits as the whole-tensor function. Where a norm of a combination would come from a
cancelling sum (more than 20 bits lost: directions that nearly cancel) or a dot product is not
finite, the function computes on the vectors themselves instead, as before, and the streamed form
declines.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from ..errors import MethodNotApplicableError, ShardingError
from ..kernels import ChunkBuffers, combine_whole, linear_combine
from ..kernels.statistics import dot_products
from ..sharding import Layout

__all__ = [
    "karcher_into",
    "karcher_merge",
    "multislerp_into",
    "multislerp_merge",
    "nuslerp_into",
    "nuslerp_merge",
]

CANCELLED = 2.0**-20
"""A quadratic form ``c^T G c`` below this share of ``|c|^T |G| |c|`` has lost more than 20 bits to
cancellation: the norm is then computed on the vectors themselves."""

Gram = list[list[float]]


def _dots(layout: Layout, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """``<a, b>`` of whole tensors for each pair: local float64 dot products summed over the
    shards in one ``all_reduce``."""
    values = [torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in pairs]
    return layout.sum(torch.stack(values).to(torch.float64)).tolist()


def _vectors(
    name: str, tensors: list[torch.Tensor], base: torch.Tensor | None, task_vectors: bool
) -> list[torch.Tensor]:
    if not task_vectors:
        return tensors
    if base is None:
        raise MethodNotApplicableError(f"{name}: needs a base model to take task vectors from.")
    return [theta - base for theta in tensors]


def _add_base(result: torch.Tensor, base: torch.Tensor | None, task_vectors: bool) -> torch.Tensor:
    return result.add_(base) if task_vectors else result  # type: ignore[arg-type]


def _pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i, n)]


def _gram(
    tensors: list[torch.Tensor], base: torch.Tensor | None, layout: Layout | None
) -> Gram | None:
    """The Gram matrix of the ``tensors`` (of ``tensors[i] - base`` with a base) in float64,
    summed over the shards of a sharded parameter; ``None`` where a value is not finite."""
    n = len(tensors)
    pairs = _pairs(n)
    if layout is not None and layout.sharded:
        flats = [t.reshape(-1) if base is None else (t - base).reshape(-1) for t in tensors]
        sums = _dots(layout, [(flats[i], flats[j]) for i, j in pairs])
    else:
        sums = dot_products(tensors, base, pairs, tensors[0].device)
    if not all(math.isfinite(value) for value in sums):
        return None
    gram = [[0.0] * n for _ in range(n)]
    for (i, j), value in zip(pairs, sums, strict=True):
        gram[i][j] = gram[j][i] = value
    return gram


def _form(gram: Gram, c: list[float]) -> float:
    """``c^T G c``: each product rounded, their sum rounded once (``math.fsum``)."""
    return math.fsum(c[i] * gram[i][j] * c[j] for i in range(len(c)) for j in range(len(c)))


def _square(gram: Gram, c: list[float]) -> float | None:
    """``c^T G c`` as :func:`_form` sums it, or ``None`` where it is not positive or has lost
    more than 20 bits to cancellation."""
    terms = [c[i] * gram[i][j] * c[j] for i in range(len(c)) for j in range(len(c))]
    value = math.fsum(terms)
    scale = math.fsum(abs(term) for term in terms)
    return value if value >= CANCELLED * scale and value > 0 else None


def _terms(
    tensors: list[torch.Tensor], base: torch.Tensor | None, coefficients: list[float]
) -> tuple[list[torch.Tensor], list[float]]:
    """The terms of ``sum_i c_i x_i``, plus the base with task vectors (``sum_i c_i theta_i +
    (1 - sum_i c_i) base``), those with a zero coefficient left out (with finite inputs they
    add nothing but a zero's sign)."""
    sources, weights = list(tensors), list(coefficients)
    if base is not None:
        sources.append(base)
        weights.append(1 - math.fsum(coefficients))
    kept = [(source, weight) for source, weight in zip(sources, weights, strict=True) if weight]
    return [source for source, _ in kept], [weight for _, weight in kept]


def _combine(
    tensors: list[torch.Tensor], base: torch.Tensor | None, coefficients: list[float]
) -> torch.Tensor:
    """The combination of whole tensors, in the linear loops' arithmetic (:func:`combine_whole`)."""
    sources, weights = _terms(tensors, base, coefficients)
    return combine_whole(sources, weights) if sources else torch.zeros_like(tensors[0])


def _combine_into(
    destination: torch.Tensor,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None,
    coefficients: list[float],
    scratch: object,
) -> bool:
    """The combination streamed into ``destination`` by the linear loops; ``False`` (nothing
    written) where every coefficient is 0 (the reference writes zeros)."""
    sources, weights = _terms(tensors, base, coefficients)
    if not sources:
        return False
    linear_combine(destination, sources, weights, scratch)  # type: ignore[arg-type]
    return True


def _streamable(
    scratch: object, tensors: list[torch.Tensor], base: torch.Tensor | None, task_vectors: bool
) -> bool:
    """Whether the streamed form applies: the linear loops' buffers given, something to
    interpolate, and a base where task vectors need one (else the function says what is
    wrong)."""
    return (
        isinstance(scratch, ChunkBuffers)
        and len(tensors) > 1
        and (base is not None or not task_vectors)
    )


Rule = Callable[[Gram, list[float]], list[float] | None]
"""A method's coefficients from the Gram matrix and the weights (``None``: not from these)."""


def _coefficients(
    tensors: list[torch.Tensor],
    origin: torch.Tensor | None,
    layout: Layout | None,
    weights: list[float],
    rule: Rule,
) -> list[float] | None:
    gram = _gram(tensors, origin, layout)
    return None if gram is None else rule(gram, weights)


def _streamed(
    destination: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    scratch: object,
    task_vectors: bool,
    rule: Rule,
) -> bool:
    """A method's ``into``: its coefficients by ``rule`` from the Gram matrix of the inputs as
    stored, then the combination streamed into ``destination``; ``False`` (nothing written)
    where the whole-tensor function computes otherwise."""
    if not _streamable(scratch, tensors, base, task_vectors):
        return False
    origin = base if task_vectors else None
    coefficients = _coefficients(tensors, origin, None, weights, rule)
    return coefficients is not None and _combine_into(
        destination, tensors, origin, coefficients, scratch
    )


def _checked_base(name: str, base: torch.Tensor | None, task_vectors: bool) -> torch.Tensor | None:
    """The origin the vectors are taken from: the base with ``task_vectors``, else none."""
    if task_vectors and base is None:
        raise MethodNotApplicableError(f"{name}: needs a base model to take task vectors from.")
    return base if task_vectors else None


def _multislerp_coefficients(
    gram: Gram, weights: list[float], eps: float = 0.0
) -> list[float] | None:
    """Multi-SLERP's ``c_i = w_i / (|x_i| + eps) * (sum_j w_j |x_j|) / |m|`` (``0`` for a
    zero ``x_i``), ``|m|^2`` a quadratic form of the Gram matrix; ``None`` where ``m`` has no
    reliable direction (see :func:`_square`)."""
    norms = [math.sqrt(gram[i][i]) for i in range(len(gram))]
    scaled = [w / (norm + eps) if norm > 0 else 0.0 for w, norm in zip(weights, norms, strict=True)]
    square = _square(gram, scaled)
    if square is None:
        return None
    factor = math.fsum(w * n for w, n in zip(weights, norms, strict=True)) / math.sqrt(square)
    if eps:  # mergekit's exponential map of a tangent step of length 0 + eps
        factor *= math.cos(eps)
    return [c * factor for c in scaled]


def multislerp_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    layout: Layout | None = None,
    task_vectors: bool,
    eps: float = 0.0,
) -> torch.Tensor:
    """Multi-SLERP (mergekit's ``multislerp``, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
    the weighted mean direction of the unit vectors ``u_i = x_i / |x_i|`` scaled to the weighted
    mean norm, ``(sum_i w_i |x_i|) * m / |m|`` with ``m = sum_i w_i u_i``; its tangent step at
    ``m / |m|`` is 0 (the weighted tangent vectors there sum to nothing), so this is its exact
    value. A zero ``x_i`` has no direction (``u_i = 0``); where ``m = 0`` it is the weighted sum
    ``sum_i w_i x_i``. Computed as ``sum_i c_i x_i`` from the Gram matrix (module docstring).
    ``eps > 0`` is mergekit's arithmetic (its default ``1e-8``): ``u_i = x_i / (|x_i| + eps)``
    and the exponential map of its tangent step, of length ``0 + eps``: a factor ``cos(eps)``."""
    if len(tensors) == 1:  # nothing to interpolate: the model itself
        return tensors[0].clone()
    origin = _checked_base("multislerp", base, task_vectors)
    rule = functools.partial(_multislerp_coefficients, eps=eps)
    coefficients = _coefficients(tensors, origin, layout, weights, rule)
    if coefficients is None:
        return _multislerp_on_vectors(tensors, weights, base, layout, task_vectors, eps)
    return _combine(tensors, origin, coefficients)


def multislerp_into(
    destination: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scratch: object = None,
    task_vectors: bool,
    eps: float = 0.0,
) -> bool:
    """:func:`multislerp_merge` streamed from the inputs as stored, the same bits; ``False``
    (nothing written) where it computes on the vectors themselves."""
    rule = functools.partial(_multislerp_coefficients, eps=eps)
    return _streamed(destination, tensors, weights, base, scratch, task_vectors, rule)


def _multislerp_on_vectors(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    layout: Layout | None,
    task_vectors: bool,
    eps: float = 0.0,
) -> torch.Tensor:
    """Multi-SLERP on the vectors themselves: where the directions nearly cancel."""
    if layout is None:
        layout = Layout.whole(tensors[0].shape)
    vectors = _vectors("multislerp", tensors, base, task_vectors)
    norms = [math.sqrt(s) for s in _dots(layout, [(v, v) for v in vectors])]
    mean = torch.zeros_like(vectors[0])
    for vector, weight, norm in zip(vectors, weights, norms, strict=True):
        if norm > 0:
            mean.add_(vector * (weight / (norm + eps)))
    (square,) = _dots(layout, [(mean, mean)])
    if not square > 0:  # no mean direction (or NaN, which the sum propagates)
        result = torch.zeros_like(vectors[0])
        for vector, weight in zip(vectors, weights, strict=True):
            result.add_(vector * weight)
        return _add_base(result, base, task_vectors)
    radius = math.fsum(w * n for w, n in zip(weights, norms, strict=True))
    if eps:  # mergekit's exponential map of a tangent step of length 0 + eps
        radius *= math.cos(eps)
    return _add_base(mean.mul_(radius / math.sqrt(square)), base, task_vectors)


NUSLERP_COLINEAR = 1e-8
"""NuSLERP interpolates linearly where ``|sin W| < NUSLERP_COLINEAR`` (mergekit's ``eps``)."""


def _slerp_rows(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of each row (last dimension) of ``v0`` and ``v1`` by ``t``; a row with a zero or
    (anti)parallel vector is interpolated linearly."""
    square0 = (v0 * v0).sum(dim=-1, keepdim=True)
    square1 = (v1 * v1).sum(dim=-1, keepdim=True)
    dot = (v0 * v1).sum(dim=-1, keepdim=True)
    cos = (dot / (square0 * square1).sqrt()).clamp(-1, 1)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    linear = ~(sin.abs() >= NUSLERP_COLINEAR)  # also a zero row (NaN cosine)
    safe_sin = torch.where(linear, torch.ones_like(sin), sin)
    a = torch.where(linear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / safe_sin)
    b = torch.where(linear, torch.full_like(sin, t), torch.sin(t * theta) / safe_sin)
    return (v0 * a).add_(v1 * b)


def _nuslerp_t(weights: list[float]) -> float:
    total = weights[0] + weights[1]
    return 0.5 if total == 0 else weights[1] / total


def _nuslerp_coefficients(gram: Gram | None, t: float) -> list[float]:
    """SLERP's ``sin((1 - t) W) / sin W`` and ``sin(t W) / sin W`` for the angle ``W`` of the two
    flattened vectors; ``1 - t, t`` where a vector is zero, they are (anti)parallel, or a dot
    product is not finite (the linear combination then carries the NaN or infinity)."""
    if gram is None or not gram[0][0] * gram[1][1] > 0:
        return [1 - t, t]
    cos = min(max(gram[0][1] / math.sqrt(gram[0][0] * gram[1][1]), -1.0), 1.0)
    angle = math.acos(cos)
    sin = math.sin(angle)
    if not abs(sin) >= NUSLERP_COLINEAR:
        return [1 - t, t]
    return [math.sin((1 - t) * angle) / sin, math.sin(t * angle) / sin]


def nuslerp_into(
    destination: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scratch: object = None,
    flatten: bool,
    row_wise: bool,
    task_vectors: bool,
) -> bool:
    """Flattened :func:`nuslerp_merge` streamed from the inputs as stored, the same bits;
    ``False`` (nothing written) vector by vector."""
    if len(tensors) != 2 or not _streamable(scratch, tensors, base, task_vectors):
        return False
    if not (flatten or tensors[0].dim() < 2):
        return False
    origin = base if task_vectors else None
    coefficients = _nuslerp_coefficients(_gram(tensors, origin, None), _nuslerp_t(weights))
    return _combine_into(destination, tensors, origin, coefficients, scratch)


def nuslerp_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    layout: Layout | None = None,
    flatten: bool,
    row_wise: bool,
    task_vectors: bool,
) -> torch.Tensor:
    """NuSLERP (mergekit's ``nuslerp``): SLERP of two models (or their task vectors) by
    ``t = w_2 / (w_1 + w_2)``, over the flattened tensors (``flatten``) or vector by vector:
    along the last dimension, or with ``row_wise`` along the first (mergekit's
    ``nuslerp_row_wise``); zero or (anti)parallel vectors are interpolated linearly."""
    if len(tensors) != 2:
        raise MethodNotApplicableError(
            f"nuslerp: interpolates exactly two models, got {len(tensors)}."
        )
    if layout is None:
        layout = Layout.whole(tensors[0].shape)
    t = _nuslerp_t(weights)
    if flatten or tensors[0].dim() < 2:
        origin = _checked_base("nuslerp", base, task_vectors)
        return _combine(tensors, origin, _nuslerp_coefficients(_gram(tensors, origin, layout), t))
    v0, v1 = _vectors("nuslerp", tensors, base, task_vectors)
    if layout.sharded:
        raise ShardingError(
            "nuslerp: with flatten=False it needs whole rows and columns, but this parameter is "
            "sharded; use flatten=True, or gather it (.full_tensor()) and merge whole tensors."
        )
    elif row_wise:
        result = _slerp_rows(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        result = _slerp_rows(t, v0, v1)
    return _add_base(result.contiguous(), base, task_vectors)


def _karcher_coefficients(
    gram: Gram, weights: list[float], max_iter: int, tol: float
) -> list[float] | None:
    """The Karcher mean's ``c_i`` over the ``x_i``, its iterations worked on coefficients: the
    mean and the tangent are combinations of the unit vectors, so every cosine and norm is a
    product with their Gram matrix. ``None`` where the mean's norm would come from a cancelling
    sum (see :func:`_square`)."""
    n = len(gram)
    norms = [math.sqrt(gram[i][i]) for i in range(n)]
    radius = math.fsum(w * x for w, x in zip(weights, norms, strict=True))
    valid = [i for i, x in enumerate(norms) if x > tol]
    if not valid:
        return [0.0] * n
    weight_sum = math.fsum(weights[i] for i in valid)
    alphas = [weights[i] / weight_sum for i in valid]
    units = [[gram[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]
    k = len(valid)
    square = _square(units, alphas)
    if square is None:
        return None
    root = math.sqrt(square)
    mean = [1.0] + [0.0] * (k - 1) if root < tol else [alpha / root for alpha in alphas]
    for _ in range(max_iter):
        tangent = [0.0] * k
        for i, alpha in enumerate(alphas):
            cos = math.fsum(mean[j] * units[j][i] for j in range(k))
            cos = min(max(cos, -1.0), 1.0)
            angle = math.acos(cos)
            if angle < tol or math.sin(angle) == 0:  # at the mean, or exactly opposite it
                continue
            factor = alpha * angle / math.sin(angle)
            tangent[i] += factor
            for j in range(k):
                tangent[j] -= factor * cos * mean[j]
        step = math.sqrt(max(_form(units, tangent), 0.0))
        if step < tol:
            break
        mean = [math.cos(step) * m + g * (math.sin(step) / step) for m, g in zip(mean, tangent)]
        square = _square(units, mean)
        if square is None:
            return None
        if math.sqrt(square) > tol:
            mean = [m / math.sqrt(square) for m in mean]
    coefficients = [0.0] * n
    for m, i in zip(mean, valid, strict=True):
        coefficients[i] = radius * m / norms[i]
    return coefficients


def karcher_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    layout: Layout | None = None,
    max_iter: int,
    tol: float,
    task_vectors: bool,
) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean of the directions ``u_i = x_i / |x_i|`` on the unit
    sphere, scaled to ``sum_i w_i |x_i|`` (mergekit's ``karcher``): start from the normalised
    ``sum_i a_i u_i`` (``a_i`` the weights of the nonzero ``x_i``, renormalised), then up to
    ``max_iter`` times step along ``g = sum_i a_i (W_i / sin W_i) (u_i - cos W_i m)``
    (``W_i`` the angle to the mean ``m``, terms with ``W_i < tol`` left out) by the exponential
    map, ``m <- cos|g| m + sin|g| g / |g|``, stopping once ``|g| < tol``."""
    if len(tensors) == 1:  # nothing to average: the model itself
        return tensors[0].clone()
    origin = _checked_base("karcher", base, task_vectors)
    rule = functools.partial(_karcher_coefficients, max_iter=max_iter, tol=tol)
    coefficients = _coefficients(tensors, origin, layout, weights, rule)
    if coefficients is None:
        return _karcher_on_vectors(tensors, weights, base, layout, max_iter, tol, task_vectors)
    return _combine(tensors, origin, coefficients)


def karcher_into(
    destination: torch.Tensor,
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scratch: object = None,
    max_iter: int,
    tol: float,
    task_vectors: bool,
) -> bool:
    """:func:`karcher_merge` streamed from the inputs as stored, the same bits; ``False``
    (nothing written) where it computes on the vectors themselves."""
    rule = functools.partial(_karcher_coefficients, max_iter=max_iter, tol=tol)
    return _streamed(destination, tensors, weights, base, scratch, task_vectors, rule)


def _karcher_on_vectors(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    layout: Layout | None,
    max_iter: int,
    tol: float,
    task_vectors: bool,
) -> torch.Tensor:
    """The Karcher mean on the vectors themselves: where the mean's norm would cancel."""
    if layout is None:
        layout = Layout.whole(tensors[0].shape)
    vectors = _vectors("karcher", tensors, base, task_vectors)
    norms = [math.sqrt(s) for s in _dots(layout, [(v, v) for v in vectors])]
    radius = math.fsum(w * n for w, n in zip(weights, norms, strict=True))
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return _add_base(torch.zeros_like(vectors[0]), base, task_vectors)
    weight_sum = math.fsum(weights[i] for i in valid)
    alphas = [weights[i] / weight_sum for i in valid]
    units = [vectors[i] / norms[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units, strict=True):
        mean.add_(unit * alpha)
    (square,) = _dots(layout, [(mean, mean)])
    mean = units[0].clone() if math.sqrt(square) < tol else mean.div_(math.sqrt(square))
    for _ in range(max_iter):
        cosines = _dots(layout, [(mean, unit) for unit in units])
        tangent = torch.zeros_like(mean)
        for alpha, unit, cos in zip(alphas, units, cosines, strict=True):
            cos = min(max(cos, -1.0), 1.0)
            angle = math.acos(cos)
            if angle < tol or math.sin(angle) == 0:  # at the mean, or exactly opposite it
                continue
            tangent.add_((unit - mean * cos) * (alpha * angle / math.sin(angle)))
        (square,) = _dots(layout, [(tangent, tangent)])
        step = math.sqrt(square)
        if step < tol:
            break
        mean = (mean * math.cos(step)).add_(tangent * (math.sin(step) / step))
        (square,) = _dots(layout, [(mean, mean)])
        if math.sqrt(square) > tol:
            mean.div_(math.sqrt(square))
    return _add_base(mean.mul_(radius), base, task_vectors)
