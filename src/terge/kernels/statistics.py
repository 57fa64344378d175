"""Float64 dot products of whole tensors (SLERP's and Model Stock's angles) in terge's own order.

``sum(x_i * x_j)`` for pairs of inputs, ``x_i`` an input minus the base (or the input itself),
every value widened to float64 exactly and subtracted once. The summation order is defined here
(it cannot be torch.dot's, whose order depends on the build and the CPU) so that every path
gives the same bits:

* the tensor in chunks of :data:`CHUNK` entries, the last padded with ``+0``;
* a chunk as ``CHUNK / LANES`` rows of :data:`LANES` lanes (entry ``r * LANES + l``); each
  product rounded, then the rows folded pairwise, neighbours first (``p[r] = p[2r] + p[2r+1]``),
  then the lanes the same way: the chunk's sum;
* the chunks' sums added in chunk order, starting from ``+0``.

On the CPU, the compiled loop (``_faststatistics.c``, built at install) computes this in one read
of the inputs as stored, threads sharing the chunks. Elsewhere (GPU tensors, other layouts, the
loop not built, ``TERGE_KERNELS=torch``) :func:`reference_chunk_sums` computes the same folds
with plain element-wise torch operations, a few chunks at a time: IEEE additions and
multiplications, correctly rounded on every device, so a CUDA tensor's sums are the CPU's bits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from . import fastloop
from .cpu import DTYPE_CODES, plain, ranges, run

try:
    from . import _faststatistics
except ImportError:  # not compiled: the reference computes the same sums
    _faststatistics = None  # type: ignore[assignment]

CHUNK = 1 << 15
"""Entries per chunk (256 KiB of float64): the unit the threads share and the sums add up."""
LANES = 32
"""Lanes per row of a chunk: the compiled loop's vectors (four AVX-512 registers)."""
GROUP_ENTRIES = 1 << 21
"""Float64 entries (inputs, products and folds together) the reference holds at once on the
CPU: 16 MiB."""
GROUP_ENTRIES_CUDA = 1 << 25
"""The same on a GPU: 256 MiB, so that a GPT-2 embedding takes a few dozen groups of kernels
rather than a few hundred."""
MAX_INPUTS = 64
MAX_PAIRS = 4096

Pairs = Sequence[tuple[int, int]]


def available() -> bool:
    """Whether the compiled loop is built and not switched off by ``TERGE_KERNELS=torch``."""
    return _faststatistics is not None and fastloop.available()


def dot_products(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    pairs: Pairs,
    device: torch.device | None = None,
) -> list[float]:
    """``sum(x_i * x_j)`` in float64 for each pair ``(i, j)`` of ``tensors`` (``x_i`` is
    ``tensors[i] - base``, or ``tensors[i]`` without a base), in the order this module defines:
    the same bits whatever the inputs' dtypes are widened from, the device, or the threads.
    The reference runs on ``device`` (default: the first tensor's)."""
    flats = [t.reshape(-1) for t in tensors]
    origin = None if base is None else base.reshape(-1)
    if compiled(flats, origin, pairs):
        return _compiled(flats, origin, pairs)
    where = flats[0].device if device is None else device
    return totals(reference_chunk_sums(flats, origin, pairs, where))


def compiled(flats: Sequence[torch.Tensor], origin: torch.Tensor | None, pairs: Pairs) -> bool:
    """Whether the compiled loop takes these inputs: built and allowed, plain CPU tensors of one
    length, few enough inputs and pairs."""
    inputs = [*flats, *([] if origin is None else [origin])]
    return (
        available()
        and 0 < len(flats) <= MAX_INPUTS
        and 0 < len(pairs) <= MAX_PAIRS
        and all(plain(t) and t.numel() == flats[0].numel() for t in inputs)
    )


def _compiled(
    flats: Sequence[torch.Tensor], origin: torch.Tensor | None, pairs: Pairs
) -> list[float]:
    n = flats[0].numel()
    count = -(-n // CHUNK)
    sums = torch.empty(max(count, 1), len(pairs), dtype=torch.float64)
    addresses = [t.data_ptr() for t in flats]
    codes = [DTYPE_CODES[t.dtype] for t in flats]
    base = 0 if origin is None else origin.data_ptr()
    base_code = 0 if origin is None else DTYPE_CODES[origin.dtype]
    pairs = [(int(i), int(j)) for i, j in pairs]
    groups = len(ranges(n))  # as many threads as the linear loop uses
    step = -(-count // groups) if count else 1

    def part(first: int, last: int) -> None:
        out = sums.data_ptr() + first * len(pairs) * 8
        _faststatistics.chunks(base, base_code, n, first, last, addresses, codes, pairs, out)

    run(
        [
            functools.partial(part, first, min(first + step, count))
            for first in range(0, count, step)
        ]
    )
    return _faststatistics.total(sums.data_ptr(), count, len(pairs))


def reference_chunk_sums(
    flats: Sequence[torch.Tensor],
    origin: torch.Tensor | None,
    pairs: Pairs,
    device: torch.device,
) -> torch.Tensor:
    """Each chunk's sums (one row per chunk, one column per pair, float64 on ``device``) in
    plain torch operations, a group of chunks at a time: every pair's products folded together
    (about twenty kernels a group, whatever the number of pairs), the group sized so that its
    float64 buffers stay within :data:`GROUP_ENTRIES` entries (:data:`GROUP_ENTRIES_CUDA` on a
    GPU, where each kernel's launch, not its bytes, is the cost)."""
    n = flats[0].numel()
    count = -(-n // CHUNK)
    rows = torch.empty(count, len(pairs), dtype=torch.float64, device=device)
    budget = GROUP_ENTRIES_CUDA if device.type == "cuda" else GROUP_ENTRIES
    # the inputs, the products and the first fold's halves: (inputs + 2 pairs) entries per entry
    group = max(1, budget // CHUNK // (len(flats) + 2 * len(pairs) + 1))
    for first in range(0, count, group):
        last = min(first + group, count)
        start, stop = first * CHUNK, min(last * CHUNK, n)
        size = (last - first) * CHUNK
        xs = torch.empty(len(flats), size, dtype=torch.float64, device=device)
        if stop - start < size:
            xs[:, stop - start :].zero_()  # the last chunk's padding: +0
        for slot, flat in enumerate(flats):
            xs[slot, : stop - start].copy_(flat[start:stop])  # widened exactly
        if origin is not None:
            xs[:, : stop - start].sub_(origin[start:stop].to(device=device, dtype=torch.float64))
        products = torch.empty(len(pairs), size, dtype=torch.float64, device=device)
        for q, (i, j) in enumerate(pairs):
            torch.mul(xs[i], xs[j], out=products[q])
        del xs
        sums = _fold(products.view(len(pairs), last - first, -1, LANES))
        rows[first:last] = sums.transpose(0, 1)
    return rows


def _fold(products: torch.Tensor) -> torch.Tensor:
    """``(..., rows, LANES)`` products to ``(...)`` sums: rows, then lanes, folded pairwise,
    neighbours first."""
    while products.shape[-2] > 1:
        products = products[..., 0::2, :] + products[..., 1::2, :]
    lanes = products[..., 0, :]
    while lanes.shape[-1] > 1:
        lanes = lanes[..., 0::2] + lanes[..., 1::2]
    return lanes[..., 0]


def totals(rows: torch.Tensor) -> list[float]:
    """The chunks' sums added in chunk order, from ``+0`` (Python floats: float64 additions)."""
    sums = [0.0] * rows.shape[1]
    for row in rows.tolist():
        sums = [total + value for total, value in zip(sums, row, strict=True)]
    return sums
