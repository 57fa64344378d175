"""The exact primitives the task-vector methods are built on, the same whether a tensor is whole
or sharded across processes.

- :func:`kth_largest_magnitude`: the k-th largest ``|x|`` of a tensor, by radix selection on the
  bit patterns of the magnitudes. Sharded, each level's histogram is summed over the shards (one
  small ``all_reduce`` per level), so every rank finds the same threshold as the whole tensor
  would, with no gather.
- :func:`counter_uniform`: DARE's random draws, a pure function of (parameter seed, model
  position, element index): a shard draws exactly its slice of the whole tensor's draw, on any
  device and however the tensor is split.

- :func:`square_sums` and :func:`exact_total` (:func:`exact_totals` for a stack): a sum of
  squares correctly rounded (SCE's weights), as integer sums per binary exponent, which add up
  the same in any order: over threads, shards, devices.

All are specified bit for bit (in the docstrings) so that other implementations (the C
kernels) can match them exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

SELECT_CHUNK = 1 << 20
"""Elements per chunk when scanning for the k-th largest magnitude (8 MiB of int64 scratch)."""

DRAW_CHUNK = 1 << 16
"""Elements per chunk of DARE's counter-based draw (a few 512 KiB int64 temporaries)."""

GPU_CHUNK = 1 << 24
"""Elements per chunk on a GPU, where the CPU's cache-sized chunks would make thousands of
kernel launches a tensor, each costing more CPU time than its kernel takes (128 MiB float64
temporaries)."""


def chunk_for(device: torch.device, chunk: int) -> int:
    """``chunk`` on the CPU, at least :data:`GPU_CHUNK` elsewhere. Only how a loop is cut: the
    results are the same for any chunk."""
    return chunk if device.type == "cpu" else max(chunk, GPU_CHUNK)


_BINS = 1 << 16
_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over every shard of a parameter (in place) and returns it: an ``all_reduce``."""


# --- the k-th largest magnitude -------------------------------------------------------------------


def divide(tensor: torch.Tensor, number: float) -> torch.Tensor:
    """``tensor / number`` in place, correctly rounded on every device: torch divides a GPU
    tensor by a Python number as a product with the number's reciprocal, which can be an ulp
    off the quotient; dividing by a (0-dim) tensor divides, as the CPU always does."""
    if tensor.device.type == "cpu":
        return tensor.div_(number)
    return tensor.div_(torch.tensor(number, dtype=tensor.dtype, device=tensor.device))


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``|values|`` as non-negative int64, which order exactly as the
    magnitudes do (``+0`` lowest, ``inf`` above every finite value), every NaN as the one pattern
    just above ``inf``'s: a NaN's payload is no part of the result (torch's kernels give ``x - y``
    either operand's payload when both are NaN), so it must not move a threshold."""
    width = values.element_size()
    bits = values.view(_INT_OF[width]).to(torch.int64)  # for float64, a view: never in place
    bits = bits & ((1 << (8 * width - 1)) - 1)  # the sign bit cleared: |x|, -0 and NaN too
    return bits.clamp_max_(_infinity_bits(values.dtype) + 1)


@functools.cache
def _infinity_bits(dtype: torch.dtype) -> int:
    integer = _INT_OF[torch.empty((), dtype=dtype).element_size()]
    return int(torch.tensor(float("inf"), dtype=dtype).view(integer).item())


def _check_float(values: torch.Tensor) -> None:
    if not values.dtype.is_floating_point or values.element_size() not in _INT_OF:
        raise TypeError(f"kth_largest_magnitude needs a 16, 32 or 64-bit float; got {values.dtype}")


def kth_largest_magnitude_bits(values: torch.Tensor, k: int, reduce: Reduce | None = None) -> int:
    """The bit pattern (see :func:`magnitude_bits`) of the ``k``-th largest ``|x|`` over
    ``values``, or over every shard of a tensor when ``reduce`` sums across them.

    A whole tensor uses ``torch.kthvalue`` on the bit patterns; a sharded one
    :func:`radix_kth_largest_bits`. Both are exact, so they give the same threshold.
    """
    _check_float(values)
    if reduce is not None:
        return radix_kth_largest_bits(values, k, reduce)
    bits = magnitude_bits(values.reshape(-1))
    if not 1 <= k <= bits.numel():
        raise ValueError(f"k = {k} is not between 1 and the number of elements ({bits.numel()})")
    if bits.device.type != "cpu":
        return kth_largest_by_topk(bits, k)
    return int(torch.kthvalue(bits, bits.numel() - k + 1).values)


def kth_largest_by_topk(bits: torch.Tensor, k: int) -> int:
    """The ``k``-th largest of a 1-D integer tensor by ``topk`` on the shorter side: the least
    of the ``k`` largest, or the greatest of the ``n - k + 1`` smallest. What a GPU runs: torch's
    CUDA ``kthvalue`` works through a whole slice in one thread block (about 20x slower than a
    sort on 100M elements, pytorch/pytorch#75599), its ``topk`` in many."""
    n = bits.numel()
    if k <= n - k + 1:
        return int(torch.topk(bits, k, largest=True, sorted=False).values.min())
    return int(torch.topk(bits, n - k + 1, largest=False, sorted=False).values.max())


def radix_kth_largest_bits(
    values: torch.Tensor, k: int, reduce: Reduce | None = None, chunk: int = SELECT_CHUNK
) -> int:
    """:func:`kth_largest_magnitude_bits` by radix selection, with no gather: exact over the
    shards of a tensor when ``reduce`` sums a histogram across them (an ``all_reduce``).

    16 bits at a time from the top (4 levels for float64, 2 for float32): each level
    histograms (65,536 bins, ``torch.bincount``) the elements whose higher bits match the prefix
    found so far, sums the histogram over the shards, and walks down from the top bin to the one
    holding the ``k``-th largest, whose count above it is taken off ``k``. After the last level
    the prefix is the whole pattern. Ties count as often as they occur; ``1 <= k <= n``, ``n``
    the total number of elements, and every shard calls it with the same ``k``.
    """
    _check_float(values)
    flat = values.reshape(-1)
    chunk = chunk_for(flat.device, chunk)
    width = 8 * values.element_size()
    prefix = 0
    for level in range(width // 16):
        shift = width - 16 * (level + 1)
        histogram = torch.zeros(_BINS, dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), chunk):
            bits = magnitude_bits(flat[start : start + chunk])
            if level:  # only the elements under the prefix found so far
                bits = bits[(bits >> (shift + 16)) == prefix]
            histogram += torch.bincount((bits >> shift) & (_BINS - 1), minlength=_BINS)
        if reduce is not None:
            histogram = reduce(histogram)
        from_top = histogram.flip(0).cumsum(0)  # from_top[i]: elements in the i + 1 top bins
        position = int(torch.searchsorted(from_top, k))
        if k < 1 or position >= _BINS:
            raise ValueError(
                f"k = {k} is not between 1 and the number of elements ({from_top[-1]})"
            )
        if position:
            k -= int(from_top[position - 1])
        prefix = (prefix << 16) | (_BINS - 1 - position)
    return prefix


def bits_to_float(bits: int, dtype: torch.dtype = torch.float64) -> float:
    """The magnitude whose bit pattern is ``bits`` (see :func:`magnitude_bits`)."""
    integer = _INT_OF[torch.empty((), dtype=dtype).element_size()]
    return torch.tensor([bits], dtype=torch.int64).to(integer).view(dtype).item()


def kth_largest_magnitude(values: torch.Tensor, k: int, reduce: Reduce | None = None) -> float:
    """The ``k``-th largest ``|x|`` of ``values`` (over every shard with ``reduce``): exactly
    ``torch.kthvalue(values.abs().flatten(), n - k + 1)``, NaN counting as the largest."""
    return bits_to_float(kth_largest_magnitude_bits(values, k, reduce), values.dtype)


def zero_below(flat: torch.Tensor, low: int, high: int | None = None) -> None:
    """Zero, in place, the entries of the 1-D ``flat`` whose magnitude bits are below ``low`` or,
    with ``high``, at or above it: what stays is ``low <= |x| < high``."""
    chunk = chunk_for(flat.device, SELECT_CHUNK)
    for start in range(0, flat.numel(), chunk):
        piece = flat[start : start + chunk]
        bits = magnitude_bits(piece)
        drop = bits < low
        if high is not None:
            drop |= bits >= high
        piece.masked_fill_(drop, 0)


# --- DARE's counter-based draw --------------------------------------------------------------------

_M = 1 << 64
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _int64(value: int) -> int:
    """The int64 with the same 64 bits as the unsigned ``value``."""
    return value - _M if value >= 1 << 63 else value


def mix64(z: int) -> int:
    """splitmix64's finaliser on a Python int, modulo 2**64 (the reference for :func:`_mix`)."""
    z %= _M
    z = ((z ^ (z >> 30)) * _MIX1) % _M
    z = ((z ^ (z >> 27)) * _MIX2) % _M
    return z ^ (z >> 31)


def draw_key(seed: int, position: int) -> int:
    """The key of a model's draw: ``mix64(seed + position * 0x9E3779B97F4A7C15)`` (mod 2**64)."""
    return mix64(seed + position * _GOLDEN)


def _shift_right(z: torch.Tensor, s: int) -> torch.Tensor:
    """A logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 bit patterns, in place (int64 products wrap mod 2**64)."""
    z ^= _shift_right(z, 30)
    z *= _int64(_MIX1)
    z ^= _shift_right(z, 27)
    z *= _int64(_MIX2)
    z ^= _shift_right(z, 31)
    return z


def counter_uniform(key: int, indices: torch.Tensor) -> torch.Tensor:
    """Uniform float64 draws in [0, 1), one per element index ``j`` (int64, global row-major
    indices): ``(mix64(key + (j + 1) * 0x9E3779B97F4A7C15) >> 11) * 2**-53``.

    A pure function of ``(key, j)``: no state, no device or order dependence, so any slice of a
    tensor can draw its own part of the whole tensor's draw.
    """
    z = (indices + 1).mul_(_int64(_GOLDEN)).add_(_int64(key % _M))
    return _shift_right(_mix(z), 11).to(torch.float64).mul_(2.0**-53)


# --- exact sums of squares ------------------------------------------------------------------------

EXPONENTS = 2048
"""Rows of :func:`square_sums`: one per biased float64 exponent; the last counts NaNs and
infinities."""
HALF = 26
"""Bits in the low half of a significand (53 bits: the high half has 27)."""


def square_sums(values: torch.Tensor) -> torch.Tensor:
    """The squares ``x * x`` (float64, each rounded) of ``values`` as exact integer sums: an int64
    ``(EXPONENTS, 2)`` tensor whose row ``e`` sums the high and low :data:`HALF`-bit halves of the
    53-bit significands of the squares with biased exponent ``e`` (0: subnormals, no hidden bit);
    row 2047 counts the NaNs (column 0) and infinities (column 1). Integer sums: the same in any
    order, so threads, shards and devices add them up alike (:func:`exact_total` rounds them)."""
    squares = values.reshape(-1).to(torch.float64)
    squares = squares * squares
    bits = squares.view(torch.int64)
    exponent = (bits >> 52) & 0x7FF
    fraction = bits & ((1 << 52) - 1)
    significand = fraction | ((exponent != 0).to(torch.int64) << 52)
    special = exponent == 0x7FF
    sums = torch.zeros(EXPONENTS * 2, dtype=torch.int64, device=values.device)
    finite = ~special
    index = exponent[finite] * 2
    sums.index_add_(0, index, significand[finite] >> HALF)
    sums.index_add_(0, index + 1, significand[finite] & ((1 << HALF) - 1))
    sums[(EXPONENTS - 1) * 2] = torch.count_nonzero(special & (fraction != 0))
    sums[(EXPONENTS - 1) * 2 + 1] = torch.count_nonzero(special & (fraction == 0))
    return sums.view(EXPONENTS, 2)


def exact_total(sums: torch.Tensor) -> float:
    """The sum that :func:`square_sums` (added up over any parts) holds, correctly rounded to
    float64 (ties to even): NaN where a square is NaN, else infinity where one is infinite or
    the total overflows."""
    return exact_totals(sums.unsqueeze(0))[0]


def exact_totals(sums: torch.Tensor) -> list[float]:
    """:func:`exact_total` of each of a stack of sums (``(models, EXPONENTS, 2)``), reading the
    stack in a few torch calls for all of them (each call on a small tensor costs microseconds:
    one model at a time took about 80 us, 35 ms of an SCE merge of GPT-2 small)."""
    special = sums[:, EXPONENTS - 1].tolist()
    rows = sums[:, : EXPONENTS - 1]
    used = rows.ne(0).any(2).nonzero()  # (model, exponent) pairs: a few dozen per model
    totals = [0] * len(special)  # in units of 2**-1074, the least subnormal
    pairs = used.tolist()
    for (model, exponent), (high, low) in zip(
        pairs, rows[used[:, 0], used[:, 1]].tolist(), strict=True
    ):
        totals[model] += ((high << HALF) + low) << max(exponent - 1, 0)
    results = []
    for (nans, infinities), total in zip(special, totals, strict=True):
        if nans:
            results.append(float("nan"))
        elif infinities:
            results.append(float("inf"))
        else:
            try:
                results.append(total / (1 << 1074))  # Python's integer division rounds correctly
            except OverflowError:
                results.append(float("inf"))
    return results
