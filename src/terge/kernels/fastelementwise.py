"""MagMax, TALL-mask consensus, NearSwap and SCE as compiled CPU loops, reading the inputs as
stored; and PCB's order statistics (:func:`order_statistics`).

Each ``*_into`` writes what its reference in :mod:`terge.families.elementwise` computes, bit for
bit, straight into the destination: the inputs widened to float64 a block at a time (exactly),
the reference's float64 operations in its order (no fused multiply-add), the result rounded once
into the destination's dtype. No float64 copy of a whole tensor is made. The work is split
between threads, the GIL released. SCE takes up to three reads of the inputs: the variance's
nonzero count and k-th largest (only when ``select_topk < 1``; the selection machinery of
:mod:`terge.kernels.fastmethods`), the exact sums of squares of the kept task vectors
(:func:`terge.kernels.primitives.square_sums`, added up over threads), then the merge.

Each returns ``False``, having written nothing, where the loops do not apply (not built,
``TERGE_KERNELS=torch``, not plain whole CPU tensors of one shape, overlapping memory); the
reference then runs as before, with the same bits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import fastmethods
from .cpu import DTYPE_CODES, PER_THREAD, overlaps, plain, ranges, run, split
from .primitives import EXPONENTS, exact_totals

try:
    from . import _fastmethods
except ImportError:  # not compiled: the references do the work
    _fastmethods = None  # type: ignore[assignment]

MAGMAX, CONSENSUS, NEARSWAP, SCE, BASE = 0, 1, 2, 3, 4
"""The loops' method codes (``_fastmethods.elementwise``)."""
_MAX_MODELS = 64


def _applies(
    destination: torch.Tensor, tensors: Sequence[torch.Tensor], base: torch.Tensor | None
) -> bool:
    """Whether the loops can take this merge: built and allowed, a base, whole contiguous CPU
    tensors of one shape, no partial overlaps (``destination`` may be ``base`` itself)."""
    return (
        base is not None
        and fastmethods.available()
        and 0 < len(tensors) <= _MAX_MODELS
        and destination.numel() > 0
        and plain(destination)
        and all(plain(t) and t.shape == destination.shape for t in (base, *tensors))
        and not any(overlaps(destination, t) for t in (base, *tensors))
    )


def _addresses(tensors: Sequence[torch.Tensor], start: int) -> list[int]:
    return [t.data_ptr() + start * t.element_size() for t in tensors]


def _codes(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [DTYPE_CODES[t.dtype] for t in tensors]


def _merge(
    kind: int,
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    weights: Sequence[float],
    *,
    scale: float = 1.0,
    mask_lambda: float = 0.0,
    t: float = 0.0,
    votes: int = 0,
    threshold: int | None = None,
) -> None:
    settings = (
        [float(w) for w in weights],
        float(scale),
        float(mask_lambda),
        float(t),
        int(votes),
        threshold is not None,
        0 if threshold is None else threshold,
    )

    def part(start: int, stop: int) -> None:
        _fastmethods.elementwise(
            kind,
            destination.data_ptr() + start * destination.element_size(),
            DTYPE_CODES[destination.dtype],
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            stop - start,
            _addresses(tensors, start),
            _codes(tensors),
            *settings,
        )

    split(base.numel(), part)


def magmax_into(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    *,
    scale: float,
    scratch: object | None = None,
) -> bool:
    """:func:`~terge.families.elementwise.magmax_merge` into ``destination``."""
    if not _applies(destination, tensors, base):
        return False
    _merge(MAGMAX, destination, tensors, base, [1.0] * len(tensors), scale=scale)  # type: ignore[arg-type]
    return True


def consensus_into(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    *,
    k: int,
    mask_lambda: float,
    scale: float,
    scratch: object | None = None,
) -> bool:
    """:func:`~terge.families.elementwise.consensus_merge` into ``destination``."""
    if not _applies(destination, tensors, base) or len(weights) != len(tensors):
        return False
    votes = min(int(k), len(tensors) + 1)  # more than every mask: nothing is kept
    _merge(
        CONSENSUS,
        destination,
        tensors,
        base,  # type: ignore[arg-type]
        weights,
        scale=scale,
        mask_lambda=mask_lambda,
        votes=votes,
    )
    return True


def nearswap_into(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    *,
    t: float,
    scratch: object | None = None,
) -> bool:
    """:func:`~terge.families.elementwise.nearswap_merge` into ``destination`` (one model; the
    reference raises for any other count, so it is left to do so)."""
    if len(tensors) != 1 or not _applies(destination, tensors, base):
        return False
    _merge(NEARSWAP, destination, tensors, base, [1.0], t=t)  # type: ignore[arg-type]
    return True


def sce_into(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    *,
    select_topk: float,
    scale: float,
    floor: float = 0.0,
    scratch: object | None = None,
) -> bool:
    """:func:`~terge.families.elementwise.sce_merge` into ``destination``: the selection's
    threshold, the kept task vectors' sums of squares, then the sign-elected weighted mean.
    mergekit's arithmetic (``floor > 0``) is left to the reference."""
    if floor > 0 or not _applies(destination, tensors, base):
        return False
    assert base is not None  # _applies saw to it
    threshold = None
    if select_topk < 1:
        k = int(select_topk * fastmethods.variance_nonzero(base, tensors))
        if k == 0:  # the reference returns the base
            _merge(BASE, destination, tensors, base, [1.0] * len(tensors))
            return True
        threshold = fastmethods.variance_kth_largest(base, tensors, k, scratch)
    squares = _square_totals(base, tensors, threshold)
    coefficients = squares if sum(squares) > 0 else [1.0] * len(tensors)
    _merge(SCE, destination, tensors, base, coefficients, scale=scale, threshold=threshold)
    return True


def _square_tables(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], threshold: int | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One table of integer sums per thread's range and model (``(parts, models, EXPONENTS,
    2)``): added up over the parts, each model's holds the same exact total as
    :func:`~terge.kernels.primitives.square_sums` of its kept task vector, split differently
    over the rows (blocks' exact partial sums, signed). Also the least and greatest rows
    written below the last (every other is 0). One read of the inputs split between threads."""
    spans = ranges(base.numel())
    tables = torch.zeros(len(spans), len(tensors), EXPONENTS, 2, dtype=torch.int64)

    def part(piece: int) -> tuple[int, int]:
        start, stop = spans[piece]
        return _fastmethods.square_sums(
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            stop - start,
            _addresses(tensors, start),
            _codes(tensors),
            threshold is not None,
            0 if threshold is None else threshold,
            tables[piece].data_ptr(),
        )

    used = run([functools.partial(part, piece) for piece in range(len(spans))])
    return tables, (min(least for least, _ in used), max(most for _, most in used))


def _square_totals(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], threshold: int | None
) -> list[float]:
    """Each model's sum of its kept task vector's squares, correctly rounded: what
    :func:`exact_totals` gives for the reference's sums, rounded by the compiled loop
    (``round_sums``: 16-60 us a tensor in Python, about 1 us there)."""
    tables, (least, most) = _square_tables(base, tensors, threshold)
    parts, models = tables.shape[:2]
    totals = _fastmethods.round_sums(tables.data_ptr(), parts, models, least, most)
    if totals is None:  # a negative total: not a sum of squares, so not expected; said exactly
        return exact_totals(tables.sum(0))
    return totals


def order_statistics(values: torch.Tensor, index: int) -> torch.Tensor | None:
    """Each row's ``index``-th smallest value (0-based) of a float64 CPU matrix, as a column,
    +0.0 for a zero of either sign: what :func:`terge.families.elementwise._sorted_at` computes,
    by radix selection in two reads of each row (the rows split between threads) rather than
    ``topk``. ``None`` where the loop does not apply: not built, ``TERGE_KERNELS=torch``, not a
    plain 2-D float64 CPU tensor, or a NaN in any row (``topk``'s NaN order is left to it)."""
    if not (
        fastmethods.available()
        and values.dim() == 2
        and values.dtype == torch.float64
        and values.shape[1] > 0
        and 0 <= index < values.shape[1]
        and plain(values)
    ):
        return None
    rows, width = values.shape
    address, row_bytes = values.data_ptr(), width * values.element_size()

    def part(row: int) -> float | None:
        return _fastmethods.order_statistic(address + row * row_bytes, width, index)

    parts = [functools.partial(part, row) for row in range(rows)]
    # a small tensor's rows in this thread: the hand-off to a worker costs more than the work
    found = run(parts) if rows * width >= PER_THREAD else [select() for select in parts]
    if any(value is None for value in found):
        return None
    return torch.tensor(found, dtype=torch.float64).reshape(rows, 1)
