"""DELLA and DELLA-linear as compiled CPU loops, row by row, reading the inputs as stored.

:func:`della_into` writes what :func:`terge.families.elementwise.della_merge` computes, bit for
bit, without its float64 copies and without torch's ``argsort``: each row's magnitudes are
ranked by a radix sort in the row's own buffers (in cache), the keep probabilities, draws and
the merge follow in the same pass over the row, and the result is rounded once into the
destination. Blocks of rows are split between threads; extra memory is a few rows per thread.
It runs for whole CPU tensors where ``terge.kernels._fastrank`` was built, unless
``TERGE_KERNELS=torch`` forces the reference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import cpu, fastloop
from .cpu import DTYPE_CODES, plain, run
from .primitives import draw_key

try:
    from . import _fastrank
except ImportError:  # not compiled: the reference does the work
    _fastrank = None  # type: ignore[assignment]

_MAX_MODELS = 64
MAX_WIDTH = 1 << 31
"""Rows at least this long (positions past 31 bits) are left to the reference."""


def available() -> bool:
    """Whether the compiled loop is built and not switched off by ``TERGE_KERNELS=torch``."""
    return _fastrank is not None and fastloop.available()


def della_into(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    *,
    seed: int | None,
    density: float,
    epsilon: float,
    scale: float,
    consensus: bool,
    scratch: object | None = None,
) -> bool:
    """Write DELLA (``consensus``) or DELLA-linear into ``destination``, which may be ``base``
    itself; ``False`` (and nothing written) where the loop does not apply: not built, no seed
    or base, not plain whole CPU tensors of one shape, or rows too long."""
    del scratch  # the row buffers are the loop's own, a few rows per thread
    if base is None or seed is None or not _applies(destination, tensors, weights, base):
        return False
    if not all(isinstance(v, float) for v in (density, epsilon, scale)):
        return False
    rows, width = _rows(destination)
    if width >= MAX_WIDTH:
        return False
    settings = (
        [DTYPE_CODES[t.dtype] for t in tensors],
        [float(w) for w in weights],
        [draw_key(seed, i) for i in range(len(tensors))],
        density,
        density - epsilon,  # as the reference computes them
        2 * epsilon,
        scale,
        consensus,
    )

    def part(first: int, last: int) -> None:
        start = first * width
        _fastrank.della(
            destination.data_ptr() + start * destination.element_size(),
            DTYPE_CODES[destination.dtype],
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            last - first,
            width,
            start,
            [t.data_ptr() + start * t.element_size() for t in tensors],
            *settings,
        )

    run([functools.partial(part, first, last) for first, last in row_ranges(rows, width)])
    return True


def prune_into(
    out: torch.Tensor,
    tensor: torch.Tensor,
    base: torch.Tensor,
    *,
    key: int,
    density: float,
    epsilon: float,
    divide: bool,
    first: int = 0,
) -> bool:
    """One model's task vector ``tensor - base`` pruned by DELLA's MagPrune into the float64
    ``out`` (each kept entry divided by its keep probability where ``divide``, else kept as
    it is), as :func:`terge.families.elementwise._della_sparsify` prunes it, bit for bit;
    ``first``: the whole tensor's index of the first entry (a block of rows). ``False``
    (nothing written) where the loop does not apply."""
    if not (
        available()
        and out.dtype == torch.float64
        and plain(out)
        and plain(tensor)
        and plain(base)
        and tensor.shape == base.shape == out.shape
        and out.numel() > 0
        and not _overlap(out, tensor)
        and not _overlap(out, base)
        and all(isinstance(v, float) for v in (density, epsilon))
    ):
        return False
    rows, width = _rows(out)
    if width >= MAX_WIDTH:
        return False

    def part(begin: int, stop: int) -> None:
        start = begin * width
        _fastrank.prune(
            out.data_ptr() + start * out.element_size(),
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            tensor.data_ptr() + start * tensor.element_size(),
            DTYPE_CODES[tensor.dtype],
            stop - begin,
            width,
            first + start,
            key,
            density,
            density - epsilon,  # as the reference computes them
            2 * epsilon,
            divide,
        )

    run([functools.partial(part, begin, stop) for begin, stop in row_ranges(rows, width)])
    return True


def _rows(tensor: torch.Tensor) -> tuple[int, int]:
    """The rows DELLA ranks within, and their width: a 2-D or larger tensor's ``shape[0]``, a
    0-D or 1-D tensor as one row (as the reference's ``_rows``)."""
    if tensor.dim() < 2:
        return 1, tensor.numel()
    return tensor.shape[0], tensor.numel() // tensor.shape[0]


def row_ranges(rows: int, width: int) -> list[tuple[int, int]]:
    """One range of whole rows per thread (a single range for small tensors)."""
    workers = min(torch.get_num_threads(), max(1, rows * width // cpu.PER_THREAD), rows)
    step = -(-rows // max(1, workers))
    return [(first, min(first + step, rows)) for first in range(0, rows, step)]


def rank(keys: torch.Tensor) -> torch.Tensor:
    """Each entry's rank (0-based, int64) in the 1-D int64 ``keys`` (non-negative), ascending,
    equal keys by position: the inverse of ``torch.argsort(keys, stable=True)``."""
    if _fastrank is None:
        raise RuntimeError("terge.kernels._fastrank is not built")
    if keys.dim() != 1 or keys.dtype != torch.int64 or keys.numel() < 1:
        raise ValueError("rank: a non-empty 1-D int64 tensor")
    if bool((keys < 0).any()):
        raise ValueError("rank: the keys must be non-negative")
    keys = keys.contiguous()
    ranks = torch.empty_like(keys)
    _fastrank.rank(keys.data_ptr(), keys.numel(), ranks.data_ptr())
    return ranks


def _applies(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor,
) -> bool:
    """Whether the loop can take this merge: built and allowed, whole contiguous CPU tensors of
    one shape, no partial overlaps."""
    return (
        available()
        and 0 < len(tensors) == len(weights) <= _MAX_MODELS
        and destination.numel() > 0
        and plain(destination)
        and all(plain(t) and t.shape == destination.shape for t in (base, *tensors))
        and not any(_overlap(destination, t) for t in (base, *tensors))
    )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share memory other than element for element (the loop reads a
    row of every input before it writes the same row of the destination, nothing more)."""
    if a.data_ptr() == b.data_ptr() and a.element_size() == b.element_size():
        return False
    a_end = a.data_ptr() + a.numel() * a.element_size()
    b_end = b.data_ptr() + b.numel() * b.element_size()
    return a.data_ptr() < b_end and b.data_ptr() < a_end
