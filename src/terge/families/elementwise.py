"""Task-vector methods that decide entry by entry: DELLA, SCE, MagMax, TALL-mask consensus, PCB
and NearSwap.

Every function takes the contributors' tensors, their weights and the base (float64, one shape)
and returns ``base + scale * merged task vector``. Products are rounded before they are added
(``acc.add_(x * w)``, never a fused multiply-add), so a result is the same on any device.
"""

from __future__ import annotations

import math

import torch

from ..errors import MethodNotApplicableError
from ..kernels import fastelementwise
from ..kernels.primitives import (
    chunk_for,
    counter_uniform,
    divide,
    draw_key,
    exact_totals,
    kth_largest_magnitude_bits,
    magnitude_bits,
    square_sums,
)
from ..sharding import Layout

__all__ = [
    "consensus_merge",
    "della_merge",
    "della_probabilities",
    "divide",
    "magmax_merge",
    "nearswap_merge",
    "pcb_merge",
    "sce_merge",
    "sign_consensus",
]

ROW_BLOCK = 1 << 20
"""Elements per block of rows when ranking DELLA's magnitudes (a few 8 MiB temporaries)."""


def _task_vectors(
    name: str, tensors: list[torch.Tensor], base: torch.Tensor | None
) -> list[torch.Tensor]:
    if base is None:
        raise MethodNotApplicableError(f"{name}: needs a base model to take task vectors from.")
    return [theta - base for theta in tensors]


def _weighted_sum(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i w_i d_i``, each product rounded before it is added."""
    total = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        total.add_(delta * weight)
    return total


def sign_consensus(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """TIES' elected sign and disjoint mean (https://arxiv.org/abs/2306.01708): the sign of
    ``sum_i w_i d_i`` wins (0 counts as +), and each entry is ``sum_i w_i a_i d_i / sum_i w_i
    a_i`` over the ``d_i`` that agree with it (``a_i``); 0 where none does."""
    positive = _weighted_sum(deltas, weights) >= 0
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = torch.where(positive, delta > 0, delta < 0)
        numerator.add_(delta.masked_fill(~agrees, 0).mul_(weight))
        denominator.add_(agrees.to(delta.dtype).mul_(weight))
    return torch.where(denominator != 0, numerator / denominator, numerator)


def _finish(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
    return base + merged.mul_(scale)


# --- DELLA ----------------------------------------------------------------------------------------


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows DELLA ranks within: a 2-D or larger tensor's ``shape[0]`` rows (each flattened),
    a 0-D or 1-D tensor as one row."""
    if tensor.dim() < 2:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def della_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities for a block of rows: entry ``j`` of a row of ``n``, ranked
    ``r_j`` in 0..n-1 by magnitude (ascending; equal magnitudes by position), is kept with
    ``p_j = (density - epsilon) + (r_j / (n - 1)) * (2 * epsilon)`` (``density`` when
    ``n = 1``), so the largest magnitudes are the likeliest to stay."""
    n = rows.shape[1]
    if n < 2:
        return torch.full_like(rows, density)
    order = torch.argsort(magnitude_bits(rows), dim=1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(n, dtype=order.dtype, device=order.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return divide(ranks.to(rows.dtype), n - 1).mul_(2 * epsilon).add_(density - epsilon)


def _della_sparsify(
    tau: torch.Tensor,
    density: float,
    epsilon: float,
    key: int,
    layout: Layout,
    divide: bool = True,
) -> torch.Tensor:
    """Keep entry ``j`` (its row-major index in the whole tensor) when
    ``counter_uniform(key, j) < p_j`` and divide it by ``p_j`` (``divide``; else keep it as it
    is, for a rescale by the norm as mergekit's); drop it otherwise."""
    rows = _rows(tau)
    width = rows.shape[1]
    per_block = max(1, chunk_for(tau.device, ROW_BLOCK) // max(width, 1))
    for first in range(0, rows.shape[0], per_block):
        block = rows[first : first + per_block]
        p = della_probabilities(block, density, epsilon)
        start = first * width
        draw = counter_uniform(key, layout.indices(start, start + block.numel(), tau.device))
        keep = draw.view_as(block) < p
        block.copy_(torch.where(keep, block / p if divide else block, torch.zeros_like(block)))
    return tau


def della_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    seed: int | None,
    layout: Layout | None = None,
    density: float,
    epsilon: float,
    scale: float,
    consensus: bool,
) -> torch.Tensor:
    """DELLA (https://arxiv.org/abs/2406.11617): MagPrune each task vector (keep entry ``j``
    with :func:`della_probabilities`' ``p_j`` and rescale it by ``1 / p_j``, so its expectation
    is unchanged), then either TIES' sign election and disjoint mean (``consensus``, ``della``)
    or the weighted sum (``della_linear``); ``base + scale * merged``. The draws are DARE's
    counter-based ones (:func:`~terge.kernels.primitives.counter_uniform`), keyed by the seed
    and the model's position."""
    if layout is None:
        layout = Layout.whole(tensors[0].shape)
    if seed is None:
        seed = int(torch.randint(0, (1 << 63) - 1, ()).item())  # torch's global generator
    deltas = _task_vectors("della" if consensus else "della_linear", tensors, base)
    for position, tau in enumerate(deltas):
        _della_sparsify(tau, density, epsilon, draw_key(seed, position), layout)
    merged = sign_consensus(deltas, weights) if consensus else _weighted_sum(deltas, weights)
    return _finish(base, merged, scale)  # type: ignore[arg-type]


# --- SCE ------------------------------------------------------------------------------------------


def _total(layout: Layout, values: list[torch.Tensor]) -> list[float]:
    """Float64 partial sums of the local shards, summed over every shard (one ``all_reduce``)."""
    return layout.sum(torch.stack(values).to(torch.float64)).tolist()


def sce_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    layout: Layout | None = None,
    select_topk: float,
    scale: float,
    floor: float = 0.0,
) -> torch.Tensor:
    """SCE (https://arxiv.org/abs/2408.07990): *select* the entries whose task vectors vary most
    across the models (population variance, computed as ``sum_{i<j} (tau_i - tau_j)^2 / n^2``;
    the ``k = int(select_topk * nonzero)`` largest,
    every tie at the threshold kept), *calculate* each model's weight ``c_i`` as its task
    vector's mean square over the sum of them (equal weights when all are 0; each sum of squares
    correctly rounded), *erase* the entries
    whose sign disagrees with the sign of ``sum_i tau_i``, and take the weighted mean of the rest:
    ``base + scale * sum_i c_i a_i tau_i / sum_i c_i a_i``, computed with the sums of squares
    themselves (the normalisation cancels). The merge weights are not used.

    ``floor > 0`` is mergekit's arithmetic (its ``1e-6``): equal weights where the mean squares
    sum to less than ``floor``, otherwise ``c_i`` normalised, and the agreeing weights' sum
    raised to at least ``floor`` before dividing."""
    if layout is None:
        layout = Layout.whole(tensors[0].shape)
    deltas = _task_vectors("sce", tensors, base)
    n = len(deltas)
    if select_topk < 1:
        # n^2 times the population variance, as the sum of squared pairwise differences: 0
        # exactly where every model agrees, and independent of the models' order when exact
        variance = torch.zeros_like(deltas[0])
        for i in range(n):
            for j in range(i + 1, n):
                variance.add_((deltas[i] - deltas[j]).square_())
        (nonzero,) = _total(layout, [torch.count_nonzero(variance).to(torch.float64)])
        k = int(select_topk * int(nonzero))
        if k == 0:
            return base.clone()  # type: ignore[union-attr]
        reduce = layout.sum if layout.sharded else None
        threshold = kth_largest_magnitude_bits(variance.reshape(-1), k, reduce)
        drop = magnitude_bits(variance) < threshold
        for delta in deltas:
            delta.masked_fill_(drop, 0)
        del variance, drop
    # The weights' common factor 1 / sum_j |tau_j|^2 cancels in the mean: left out, so that
    # exact inputs give exact results. Each sum of squares is correctly rounded (integer sums
    # per exponent, added up over the shards), so it is the same on every device, however the
    # tensor is sharded, and in the compiled loops (a BLAS dot's order is its own).
    sums = layout.sum(torch.stack([square_sums(d) for d in deltas]))
    squares = exact_totals(sums)
    coefficients = squares if sum(squares) > 0 else [1.0] * n
    if floor > 0:  # mergekit's: weights normalised (or equal), the divisor at least floor
        means = [s / layout.numel for s in squares]
        total = sum(means)
        coefficients = [1.0 / n] * n if abs(total) < floor else [m / total for m in means]
    positive = _weighted_sum(deltas, [1.0] * n) >= 0
    numerator = torch.zeros_like(deltas[0])
    denominator = torch.zeros_like(deltas[0])
    for delta, c in zip(deltas, coefficients, strict=True):
        agrees = torch.where(positive, delta > 0, delta < 0)
        numerator.add_(delta.masked_fill(~agrees, 0).mul_(c))
        denominator.add_(agrees.to(delta.dtype).mul_(c))
    if floor > 0:
        merged = numerator.div_(denominator.clamp_(min=floor))
    else:
        merged = torch.where(denominator != 0, numerator / denominator, numerator)
    return _finish(base, merged, scale)  # type: ignore[arg-type]


# --- MagMax ---------------------------------------------------------------------------------------


def magmax_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scale: float,
) -> torch.Tensor:
    """MagMax (https://arxiv.org/abs/2407.06322): each entry takes the task vector entry of the
    largest magnitude (the first model's among equals), ``base + scale * tau_{argmax_i
    |tau_i|}``. The merge weights are not used."""
    deltas = _task_vectors("magmax", tensors, base)
    best = deltas[0]
    for delta in deltas[1:]:
        larger = magnitude_bits(delta) > magnitude_bits(best)
        best = torch.where(larger, delta, best)
    return _finish(base, best.clone(), scale)  # type: ignore[arg-type]


# --- TALL-mask consensus --------------------------------------------------------------------------


def consensus_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    k: int,
    mask_lambda: float,
    scale: float,
) -> torch.Tensor:
    """Consensus merging with TALL masks (https://arxiv.org/abs/2405.07813): task ``t``'s mask
    keeps the entries where ``|tau_t| >= mask_lambda * |tau_MTL - tau_t|``, ``tau_MTL = sum_i
    tau_i``; the consensus mask keeps the entries at least ``k`` masks keep, and the merge is
    task arithmetic on them: ``base + scale * mask * sum_i w_i tau_i``."""
    deltas = _task_vectors("consensus", tensors, base)
    total = _weighted_sum(deltas, [1.0] * len(deltas))
    votes = torch.zeros_like(total, dtype=torch.int64)
    for delta in deltas:
        votes.add_(delta.abs() >= (total - delta).abs_().mul_(mask_lambda))
    del total
    merged = _weighted_sum(deltas, weights).masked_fill_(votes < k, 0)
    return _finish(base, merged, scale)  # type: ignore[arg-type]


# --- PCB ------------------------------------------------------------------------------------------

PCB_CLIP = 0.0001
"""PCB clips each task vector's magnitudes to their ``PCB_CLIP`` and ``1 - PCB_CLIP``
quantiles (as the authors' code does) before scoring them."""


def _sorted_at(values: torch.Tensor, index: int) -> torch.Tensor:
    """Each row's ``index``-th smallest value (0-based), as a column, a zero always +0.0 (the
    two zeros compare equal: which one a sort puts there is its own affair). The compiled
    selection where it applies (:func:`terge.kernels.fastelementwise.order_statistics`), else
    the least of the ``d - index`` largest or the greatest of the ``index + 1`` smallest,
    whichever side is shorter (``topk`` keeps only those; ``kthvalue`` copies the whole row
    with its indices: twice as slow at PCB's 0.01% clip). The same value every way."""
    selected = fastelementwise.order_statistics(values, index)
    if selected is not None:
        return selected
    d = values.shape[1]
    if d - index <= index + 1:
        top = torch.topk(values, d - index, dim=1, largest=True, sorted=False).values
        nan = top.isnan()  # topk and kthvalue both order NaN above everything
        least = torch.where(nan, math.inf, top).amin(dim=1, keepdim=True)
        return torch.where(nan.all(dim=1, keepdim=True), math.nan, least).add_(0.0)
    bottom = torch.topk(values, index + 1, dim=1, largest=False, sorted=False).values
    return bottom.amax(dim=1, keepdim=True).add_(0.0)


def _normalise(values: torch.Tensor) -> torch.Tensor:
    """Each row mapped to [0, 1] by its minimum and maximum (0 where they are equal)."""
    low = values.amin(dim=1, keepdim=True)
    span = values.amax(dim=1, keepdim=True) - low
    return torch.where(span > 0, (values - low) / span, torch.zeros_like(values))


def pcb_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    ratio: float,
    scale: float,
) -> torch.Tensor:
    """PCB merging (https://arxiv.org/abs/2410.02396), per tensor of ``d`` entries and ``n``
    task vectors: clip the magnitudes ``|tau_i|`` to their sorted entries ``int(d * 1e-4)`` and
    ``int(d * (1 - 1e-4)) - 1`` (``c_i = sign(tau_i) * clipped``); *intra-balancing*
    ``exp(n * norm(clipped)^2)``, *inter-balancing* ``tanh(tau_i * sum_j tau_j)``; their
    product ``b_i``, raised to its sorted entry ``f_i = int(d * (1 - ratio))`` (so only about
    the top ``ratio`` stay above it) and normalised to [0, 1], is ``s_i``;
    ``base + scale * sum_i s_i c_i / sum_i s_i`` (0 where every ``s_i`` is 0), ``norm`` a row's
    min-max scaling (0 for a constant row). The merge weights are not used.

    Every sum over the models is a fold from +0 in the models' order (``(0 + x_0) + x_1 ...``),
    and ``s_i = (b_i > f_i ? b_i - f_i : 0) / (max b_i - f_i)``: the values of torch's
    ``sum(dim=0)`` and of ``maximum`` then min-max scaling, with an order and zeros' signs that
    do not depend on torch's kernels (its sums over rows change order past four rows; its
    ``maximum`` of -0 and +0 differs between its vector and scalar paths). The compiled loop
    (:func:`terge.kernels.fastpcb.pcb_into`) computes the same bits."""
    if base is None:
        raise MethodNotApplicableError("pcb: needs a base model to take task vectors from.")
    # The reference's operations on the same (n, d) tensors, in place where it made new ones:
    # the same bits, with three n x d buffers (stack, magnitudes, clipped) instead of eight.
    n = len(tensors)
    flat = base.reshape(-1)
    stack = torch.empty((n, flat.numel()), dtype=base.dtype, device=base.device)
    for row, theta in zip(stack, tensors, strict=True):
        torch.sub(theta.reshape(-1), flat, out=row)
    d = stack.shape[1]
    magnitudes = stack.abs()
    low = _sorted_at(magnitudes, int(d * PCB_CLIP))
    high = _sorted_at(magnitudes, int(d * (1 - PCB_CLIP)) - 1)
    torch.minimum(magnitudes, high, out=magnitudes)
    torch.maximum(magnitudes, low, out=magnitudes)
    clipped = torch.sign(stack).mul_(magnitudes)
    intra = _normalise_(magnitudes).square_().mul_(n).exp_()
    del magnitudes
    inter = stack.mul_(_fold(stack)).tanh_()
    balance = intra.mul_(inter)
    del stack, inter
    floor = _sorted_at(balance, min(int(d * (1 - ratio)), d - 1))
    span = balance.amax(dim=1, keepdim=True).sub_(floor)
    above = balance > floor
    scores = balance.sub_(floor).masked_fill_(~above, 0).div_(span).masked_fill_(~(span > 0), 0)
    del above
    denominator = _fold(scores)
    numerator = _fold(clipped.mul_(scores))
    del clipped, scores
    # torch.where(denominator != 0, numerator / denominator, 0), in numerator's own buffer
    merged = numerator.div_(denominator).masked_fill_(denominator == 0, 0)
    return _finish(base, merged.reshape(base.shape), scale)


def _fold(rows: torch.Tensor) -> torch.Tensor:
    """``(0 + rows[0]) + rows[1] + ...``: a sum over the rows in their order, each addition
    rounded (``sum(dim=0)`` adds in an order of its own past four rows)."""
    total = torch.zeros_like(rows[0])
    for row in rows:
        total.add_(row)
    return total


def _normalise_(values: torch.Tensor) -> torch.Tensor:
    """:func:`_normalise` in place: the same operations, no new rows."""
    low = values.amin(dim=1, keepdim=True)
    span = values.amax(dim=1, keepdim=True) - low
    return values.sub_(low).div_(span).masked_fill_(~(span > 0), 0)


# --- NearSwap -------------------------------------------------------------------------------------


def nearswap_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    t: float,
) -> torch.Tensor:
    """NearSwap (mergekit's ``nearswap``): where the model is close to the base it takes the
    model's value, elsewhere it leans to the base: ``w = min(1, t / |theta - base|)`` (1 where
    they are equal), ``w * theta + (1 - w) * base``. The merge weights are not used."""
    if base is None:
        raise MethodNotApplicableError("nearswap: needs a base model to swap values with.")
    if len(tensors) != 1:
        raise MethodNotApplicableError(
            f"nearswap: merges exactly one model into the base, got {len(tensors)}."
        )
    theta = tensors[0]
    w = torch.full_like(theta, t).div_((theta - base).abs_()).clamp_(max=1.0)
    w = torch.where(torch.isnan(w), torch.ones_like(w), w)
    return (theta * w).add_(base * (1 - w))
