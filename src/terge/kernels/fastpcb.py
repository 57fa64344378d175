"""PCB as compiled CPU loops, reading the inputs as stored.

:func:`pcb_into` writes what :func:`terge.families.elementwise.pcb_merge` computes, bit for bit,
without its ``n x d`` float64 buffers: the magnitudes' clipping bounds from the selection TIES'
thresholds use (:func:`terge.kernels.fastmethods.kth_largest_magnitudes`), then each balance
floor from a sample, a counting pass and a selection among the few balances near it, then the
merge pass, which computes the balances again rather than storing them. Extra memory: a few
blocks per thread and the collected balances.

The balances need torch's own float64 ``exp`` and ``tanh``: on builds with MKL these are VML's
``vmdExp`` and ``vmdTanh`` (high accuracy), which libtorch exports. They are looked up once and
checked against ``torch.exp`` and ``torch.tanh`` on a probe of awkward values; where they are
missing or differ by one bit, the loops do not run and the reference does, with the same bits
as ever.
"""

from __future__ import annotations

import ctypes
import functools
import math
import struct
from collections.abc import Sequence
from pathlib import Path

import torch

from . import fastmethods
from .cpu import DTYPE_CODES, overlaps, plain, ranges, run

try:
    from . import _fastpcb
except ImportError:  # not compiled: the reference does the work
    _fastpcb = None  # type: ignore[assignment]

CLIP = 0.0001
"""The magnitudes' quantiles PCB clips to (the reference's ``PCB_CLIP``)."""
_MAX_MODELS = 64
_SMALL = 1 << 13
"""Tensors with fewer entries collect every balance rather than sample a bracket."""
_RUN = 16
_SAMPLES = (1 << 11, 1 << 16)
_MARGIN = 4.0
_TOP = 1 << 63
_MASK = (1 << 64) - 1
Spec = tuple[list[int], list[int], list[float], list[float]]
"""What every pass is given: the models' addresses and dtype codes, their clipping bounds."""
_VML_MODE = 0x2 | 0x00140000 | 0x100
"""VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE: the mode ATen's ``vml.h`` calls them in."""


def available() -> bool:
    """Whether the loop is built, allowed, and has torch's own ``exp`` and ``tanh``."""
    return _fastpcb is not None and fastmethods.available() and _configured()


@functools.cache
def _configured() -> bool:
    """Find MKL's ``vmdExp``/``vmdTanh`` in libtorch and check them against torch's ``exp`` and
    ``tanh``; hand them to the loop if they agree on every probe value, bit for bit."""
    functions = _vml_functions()
    if functions is None:
        return False
    _fastpcb.configure(*functions[:2], _VML_MODE, functions[2])
    probe = _probe()
    n = probe.numel() // 2
    got = torch.empty(n, dtype=torch.float64)
    _fastpcb.balance(probe.data_ptr(), n, got.data_ptr())
    expected = torch.exp(probe[:n]) * torch.tanh(probe[n:])
    return bool(torch.equal(got.view(torch.int64), expected.view(torch.int64)))


def _vml_functions() -> tuple[int, int, int] | None:
    """The addresses of ``vmdExp`` and ``vmdTanh`` in the loaded libtorch_cpu, if it has them,
    and of ``MKL_SET_NUM_THREADS_LOCAL`` (0 where it is missing or does not work as
    documented: the passes then leave MKL's threads as they are, slower, the same bits)."""
    if not torch.backends.mkl.is_available():
        return None
    folder = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (folder / name).exists():
            try:
                library = ctypes.CDLL(str(folder / name))
                exp, tanh = (
                    ctypes.cast(getattr(library, f), ctypes.c_void_p).value
                    for f in ("vmdExp", "vmdTanh")
                )
            except (OSError, AttributeError):
                return None
            return exp or 0, tanh or 0, _local_threads(library)
    return None


def _local_threads(library: ctypes.CDLL) -> int:
    """``MKL_SET_NUM_THREADS_LOCAL``'s address where setting 1 through it makes
    ``mkl_get_max_threads`` say 1 in this thread (then restored), else 0."""
    try:
        setter, getter = library.MKL_SET_NUM_THREADS_LOCAL, library.mkl_get_max_threads
    except AttributeError:
        return 0
    setter.restype = getter.restype = ctypes.c_int
    previous = setter(ctypes.byref(ctypes.c_int(1)))
    serial = getter()
    setter(ctypes.byref(ctypes.c_int(previous)))
    return (ctypes.cast(setter, ctypes.c_void_p).value or 0) if serial == 1 else 0


def _probe() -> torch.Tensor:
    """Arguments for ``exp`` (PCB's ``n * r^2``, 0 to 64) and ``tanh`` (anything), the awkward
    ones first: both ends, zeros, subnormals, near-ties."""
    f64 = torch.float64
    generator = torch.Generator().manual_seed(0)
    exps = torch.cat(
        [
            torch.tensor([0.0, -0.0, 1e-300, 5e-324, 1.0, 2.0, 64.0, 63.999999999999], dtype=f64),
            torch.rand(4088, generator=generator, dtype=f64) * 64,
        ]
    )
    tanhs = torch.cat(
        [
            torch.tensor(
                [0.0, -0.0, 5e-324, -5e-324, 1e-10, 19.06, 20.0, -20.0, 1e300, -1e300], dtype=f64
            ),
            torch.randn(4086, generator=generator, dtype=f64)
            * torch.exp2(torch.randint(-40, 6, (4086,), generator=generator).double()),
        ]
    )
    return torch.cat([exps, tanhs])


def pcb_into(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    *,
    ratio: float,
    scale: float,
    scratch: object | None = None,
) -> bool:
    """:func:`~terge.families.elementwise.pcb_merge` into ``destination``, which may be
    ``base`` itself; ``False``, nothing written, where the loop does not apply (not built or
    not checked, not plain whole CPU tensors of one shape, overlapping memory, fewer than two
    entries) or the inputs hold a NaN or an infinity (the reference's orders for those are its
    own), or a bracket missed its floor (not expected: the reference then runs)."""
    if not _applies(destination, tensors, base) or not available():
        return False
    assert base is not None  # _applies saw to it
    d = base.numel()
    low_index, high_index = int(d * CLIP), int(d * (1 - CLIP)) - 1
    if d < 2 or not 0 <= low_index <= high_index < d:
        return False
    found = fastmethods.kth_largest_magnitudes(
        base, tensors, [(d - low_index, d - high_index)] * len(tensors), scratch
    )
    bounds = [(_magnitude(low), _magnitude(high)) for low, high in found]
    if any(math.isnan(low) or math.isnan(high) for low, high in bounds):
        return False
    spec: Spec = (
        fastmethods.addresses(tensors, 0),
        [DTYPE_CODES[t.dtype] for t in tensors],
        [low for low, _ in bounds],
        [high for _, high in bounds],
    )
    floors = _floors(base, tensors, spec, min(int(d * (1 - ratio)), d - 1))
    if floors is None:
        return False
    gaps = [greatest - floor for floor, greatest in floors]

    def part(start: int, stop: int) -> bool:
        models = fastmethods.addresses(tensors, start)
        return _fastpcb.merge(
            destination.data_ptr() + start * destination.element_size(),
            DTYPE_CODES[destination.dtype],
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            stop - start,
            models,
            *spec[1:],
            [floor for floor, _ in floors],
            gaps,
            float(scale),
        )

    run([functools.partial(part, start, stop) for start, stop in ranges(d)])
    return True


def _applies(
    destination: torch.Tensor, tensors: Sequence[torch.Tensor], base: torch.Tensor | None
) -> bool:
    return (
        base is not None
        and _fastpcb is not None
        and 0 < len(tensors) <= _MAX_MODELS
        and destination.numel() > 0
        and plain(destination)
        and all(plain(t) and t.shape == destination.shape for t in (base, *tensors))
        and not any(overlaps(destination, t) for t in (base, *tensors))
    )


def _magnitude(bits: int) -> float:
    """The float64 whose magnitude bits these are (NaN for a NaN's)."""
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


def _number(key: int) -> float:
    """The float64 of an order key (``_fastpcb.c``'s ``order_key``)."""
    bits = key & ~_TOP if key >= _TOP else ~key & _MASK
    return struct.unpack("<d", struct.pack("<Q", bits))[0]


Counts = tuple[int, int, int, int, int, int]
"""A thread's range's counts for one model (``_fastpcb.scan``): balances below the bracket, at
its low end, strictly inside (collected), at its high end; the greatest balance's key; and how
many balances were computed (the others screened out below the bracket)."""


def _floors(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], spec: Spec, rank: int
) -> list[tuple[float, float]] | None:
    """Each model's balance floor (its ``rank``-th smallest balance, +0.0 for a zero) and its
    greatest balance; ``None`` where a task vector entry is not finite or a bracket missed."""
    d = base.numel()
    if d < _SMALL:
        brackets = [(0, _MASK, d)] * len(tensors)  # every finite balance's key is strictly inside
    else:
        sampled = _brackets(base, spec, rank)
        if sampled is None:
            return None
        brackets = sampled
    spans = ranges(d)
    cap = max(cap for *_, cap in brackets)
    caps = [min(stop - start, cap) for start, stop in spans]
    # model i's keys from range p at buffer[i, p]: each model's in one block, to select from
    buffer = torch.empty(len(tensors), len(spans), max(caps), dtype=torch.int64)
    stride = len(spans) * max(caps)

    def part(piece: int) -> list[Counts] | None:
        start, stop = spans[piece]
        return _fastpcb.scan(
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            stop - start,
            fastmethods.addresses(tensors, start),
            *spec[1:],
            [lo for lo, _, _ in brackets],
            [hi for _, hi, _ in brackets],
            caps[piece],
            buffer[0, piece].data_ptr(),
            stride,
        )

    counted = run([functools.partial(part, piece) for piece in range(len(spans))])
    parts = [c for c in counted if c is not None]
    if len(parts) < len(counted):
        return None
    floors = []
    for i, (lo, hi, _) in enumerate(brackets):
        mine = [c[i] for c in parts]
        key = _floor_key(lo, hi, rank, mine, buffer[i], caps)
        if key is None:
            return None
        floors.append((_number(key), _number(max(c[4] for c in mine))))
    return floors


def _floor_key(
    lo: int, hi: int, rank: int, counts: list[Counts], collected: torch.Tensor, caps: list[int]
) -> int | None:
    """The key of the ``rank``-th smallest balance from one model's counts against its bracket
    ``[lo, hi]`` and the keys each range collected strictly inside it (``collected[p]``);
    ``None`` where the rank is not in the bracket or a range collected more than it had room
    for."""
    below, at_lo, inside, at_hi = (sum(c[j] for c in counts) for j in range(4))
    k = rank - below
    if k < 0 or k >= at_lo + inside + at_hi:
        return None
    if k < at_lo:
        return lo
    if k >= at_lo + inside:
        return hi
    if any(c[2] > cap for c, cap in zip(counts, caps, strict=True)):
        return None  # overflowed
    width = collected.shape[1]
    segments = [(p * width, c[2]) for p, c in enumerate(counts)]
    return fastmethods.kth_largest_between(collected, segments, inside - (k - at_lo), lo + 1, hi)


def _brackets(base: torch.Tensor, spec: Spec, rank: int) -> list[tuple[int, int, int]] | None:
    """Each model's key bracket ``(lo, hi, cap)`` around its ``rank``-th smallest balance, from
    runs of balances spread over the tensor: where the rank falls among them, give or take
    ``_MARGIN`` standard deviations; ``cap`` bounds how many a thread's range collects."""
    d = base.numel()
    m = min(max(round(d ** (2 / 3) / 2), _SAMPLES[0]), _SAMPLES[1], d) // _RUN * _RUN
    runs = m // _RUN
    count = len(spec[0])
    keys = torch.empty(count, m, dtype=torch.int64)
    if not _fastpcb.sample(
        base.data_ptr(), DTYPE_CODES[base.dtype], d, *spec, runs, keys.data_ptr()
    ):
        return None
    share = rank / d
    spread = _MARGIN * math.sqrt(m * share * (1 - share)) + 1
    first, last = math.floor(share * m - spread), math.ceil(share * m + spread)
    cap = min(d, 2 * math.ceil((last - first + 1) * d / m) + 4096)
    # the first-th and last-th smallest samples (0-based): the (m - first)-th and (m - last)-th
    # largest; past either end, the bracket is open there
    ranks = [m - i for i in (first, last) if 0 <= i < m]
    brackets = []
    for row in keys:
        found = dict(zip(ranks, fastmethods.kth_largest_values(row, ranks), strict=True))
        lo = found[m - first] if first >= 0 else 0
        hi = found[m - last] if last < m else _MASK
        brackets.append((lo, hi, cap))
    return brackets
