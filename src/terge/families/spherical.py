"""Interpolation on the sphere for more than two models, or row by row: Multi-SLERP, NuSLERP and
the Karcher mean.

Each works on the flattened tensors (or, with ``task_vectors``, on ``theta_i - base``, the base
added back at the end). Their whole-tensor statistics are float64 dot products, summed over the
shards of a sharded parameter (:class:`~terge.sharding.Layout`), so a sharded merge gives the
whole one's result up to the rounding of those sums.
"""

from __future__ import annotations

import math

import torch

from ..errors import MethodNotApplicableError, ShardingError
from ..sharding import Layout

__all__ = ["karcher_merge", "multislerp_merge", "nuslerp_merge"]


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


def multislerp_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    layout: Layout | None = None,
    task_vectors: bool,
) -> torch.Tensor:
    """Multi-SLERP (mergekit's ``multislerp``, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
    the weighted mean direction of the unit vectors ``u_i = x_i / |x_i|`` scaled to the weighted
    mean norm, ``(sum_i w_i |x_i|) * m / |m|`` with ``m = sum_i w_i u_i``; its tangent step at
    ``m / |m|`` is 0 (the weighted tangent vectors there sum to nothing), so this is its exact
    value. A zero ``x_i`` has no direction (``u_i = 0``); where ``m = 0`` it is the weighted sum
    ``sum_i w_i x_i``."""
    if len(tensors) == 1:  # nothing to interpolate: the model itself
        return tensors[0].clone()
    if layout is None:
        layout = Layout.whole(tensors[0].shape)
    vectors = _vectors("multislerp", tensors, base, task_vectors)
    norms = [math.sqrt(s) for s in _dots(layout, [(v, v) for v in vectors])]
    mean = torch.zeros_like(vectors[0])
    for vector, weight, norm in zip(vectors, weights, norms, strict=True):
        if norm > 0:
            mean.add_(vector * (weight / norm))
    (square,) = _dots(layout, [(mean, mean)])
    if not square > 0:  # no mean direction (or NaN, which the sum propagates)
        result = torch.zeros_like(vectors[0])
        for vector, weight in zip(vectors, weights, strict=True):
            result.add_(vector * weight)
        return _add_base(result, base, task_vectors)
    radius = math.fsum(w * n for w, n in zip(weights, norms, strict=True))
    return _add_base(mean.mul_(radius / math.sqrt(square)), base, task_vectors)


NUSLERP_COLINEAR = 1e-8
"""NuSLERP interpolates linearly where ``|sin W| < NUSLERP_COLINEAR`` (mergekit's ``eps``)."""


def _slerp_rows(
    t: float, v0: torch.Tensor, v1: torch.Tensor, layout: Layout | None
) -> torch.Tensor:
    """SLERP of each row (last dimension) of ``v0`` and ``v1`` by ``t``; a row with a zero or
    (anti)parallel vector is interpolated linearly."""
    if layout is not None:  # one row, the whole (possibly sharded) tensor
        s00, s11, s01 = _dots(layout, [(v0, v0), (v1, v1), (v0, v1)])
        square0 = torch.tensor([s00], dtype=v0.dtype, device=v0.device)
        square1 = torch.tensor([s11], dtype=v0.dtype, device=v0.device)
        dot = torch.tensor([s01], dtype=v0.dtype, device=v0.device)
    else:
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
    v0, v1 = _vectors("nuslerp", tensors, base, task_vectors)
    total = weights[0] + weights[1]
    t = 0.5 if total == 0 else weights[1] / total
    if flatten or v0.dim() < 2:
        result = _slerp_rows(t, v0, v1, layout)
    elif layout.sharded:
        raise ShardingError(
            "nuslerp: with flatten=False it needs whole rows and columns, but this parameter is "
            "sharded; use flatten=True, or gather it (.full_tensor()) and merge whole tensors."
        )
    elif row_wise:
        result = _slerp_rows(t, v0.transpose(0, -1), v1.transpose(0, -1), None).transpose(0, -1)
    else:
        result = _slerp_rows(t, v0, v1, None)
    return _add_base(result.contiguous(), base, task_vectors)


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
