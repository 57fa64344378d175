"""The task-vector methods as compiled CPU loops, reading the inputs as stored.

:func:`merge_into` writes what :func:`terge.methods._task_vector_merge` computes, bit for bit,
without its float64 copies of every input: one read of the base and the models finds the trims'
thresholds (TIES, breadcrumbs), and a second computes the task vectors, their masks or DARE's
draws, the elected signs and the merge, rounding the result once into the destination. Both are
split between threads. It runs for whole CPU tensors with float64 accumulation where
``terge._fastmethods`` was built, unless ``TERGE_KERNELS=torch`` forces the reference.

The thresholds are exact k-th largest magnitude bit patterns (as
:func:`terge.kernels.primitives.kth_largest_magnitude_bits`). Samples spread over each task vector
bracket the k-th; the pass counts the magnitudes above the bracket and collects those inside it
(a few percent), and the k-th is selected among them. Where the bracket misses (or holds too
many), 65,536-bin histograms narrow the range pass by pass, as
:func:`terge.kernels.primitives.radix_kth_largest_bits` does, until it holds one value or few
enough to collect: the samples only decide how fast, never what.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import fastloop
from .cpu import DTYPE_CODES, overlaps, plain, ranges, run, split
from .primitives import draw_key

try:
    from . import _fastmethods
except ImportError:  # not compiled: terge.methods' reference does the work
    _fastmethods = None  # type: ignore[assignment]

_TOP = 1 << 63
"""Above every magnitude's bit pattern: no upper bound."""
_MAX_MODELS = 64
_SAMPLED = 1 << 13
"""Task vectors at least this long get a sampled bracket; shorter ones collect every magnitude.
Measured on two models' thresholds (2026-11-27): collecting everything costs 14-19 ns an entry
per model from 16K entries up (30K: 815 us for breadcrumbs' two thresholds, sampled 243 us;
65,535: 1,630 against 323 us); at 8K the two are even, at 4K collecting wins (126 against
170 us)."""
_SAMPLES = (1 << 11, 1 << 17)
"""Fewest and most samples per task vector; in between ``n ** (2/3) / 2``, which balances the
cost of sampling (a cache miss for each run of 16) against that of the values collected, a share
of ``1 / sqrt(samples)``. Twice as many cost more in sampling than they saved in selecting
(GPT-2 small, 2026-11-27)."""
_RUN = 16
"""Samples are taken in runs of this many adjacent entries (``_fastmethods.sample``)."""
_SAMPLE_THREADED = 1 << 14
"""Samples from this many up are drawn in every thread, each taking its share of the runs."""
_MARGIN = 4.0
"""The bracket's half-width, in standard deviations of the sample's count above the k-th: a
miss (about 6e-5 a search for independent samples) costs passes, never bits. 5 collected a
quarter more values (GPT-2 small: their selection 26-39 ms against 22-28 ms, 2026-11-27)."""
_COLLECT = 1 << 20
"""Most values collected after a histogram pass; more take another histogram."""
_SERIAL_SELECT = 1 << 16
"""Fewer values collected than this (a small tensor's): selected in the calling thread, one
search after another (handing each to a worker thread took longer than selecting)."""
_BINS = 1 << 16
_SLACK = 8
"""Slots past the cap of a collecting buffer, which the compiled loop may write (not count)."""
_KEY_SLACK = 16
"""The same for the float32 pairs a key pass collects (``cap + 16`` x, then as many b)."""
_KEYED = (torch.float32, torch.bfloat16, torch.float16)
"""The dtypes whose first pass compares float32 keys (``_fastmethods.scan_keys``)."""

_SPARSIFY = {None: 0, "magnitude": 1, "breadcrumbs": 1, "random": 2}
_CONSENSUS = {None: 0, "sign": 1}


def available() -> bool:
    """Whether the compiled loops are built and not switched off by ``TERGE_KERNELS=torch``."""
    return _fastmethods is not None and fastloop.available()


def merge_into(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None,
    *,
    seed: int | None = None,
    sparsification: str | None,
    consensus: str | None,
    scale: float = 1.0,
    density: float = 1.0,
    gamma: float = 0.0,
    scratch: object | None = None,
    divisor: float | None = None,
    **options: Any,
) -> bool:
    """Write the task-vector merge (see :func:`terge.methods._task_vector_merge`) into
    ``destination``, which may be ``base`` itself; ``False`` (and nothing written) where the
    compiled loops do not apply: not built, not plain whole CPU tensors, no seed to draw from,
    or a mergekit option (:data:`OPTIONS`) other than the default, which the reference computes.
    ``divisor`` divides the weighted sum of a method without sign consensus once (see
    ``Method.divides``).
    Scratch memory is kept for the calls given the same ``scratch`` object (one merge's buffers)
    and freed with it."""
    if (
        base is None
        or not _defaults(density, gamma, options)
        or not _applies(destination, tensors, weights, base, seed, sparsification)
    ):
        return False
    workspace = _Workspace() if scratch is None else _WORKSPACES.setdefault(scratch, _Workspace())
    lows, highs = _bounds(base, tensors, sparsification, density, gamma, workspace)
    if sparsification == "random" and density == 1:  # the reference keeps every entry, undivided
        sparsification = None
    keys = [0] * len(tensors)
    if sparsification == "random" and seed is not None:  # _applies saw to the seed
        keys = [draw_key(seed, i) for i in range(len(tensors))]
    multiply = (sparsification != "random" or _power_of_two(density)) and (
        consensus != "sign" or _exact_denominators(tuple(float(w) for w in weights))
    )
    settings = (
        [float(w) for w in weights],
        _SPARSIFY[sparsification],
        lows,
        highs,
        keys,
        float(density),
        math.ceil(density * 2.0**53),  # u = z * 2**-53 < density exactly when z < this
        _CONSENSUS[consensus],
        float(scale),
        multiply,
        0.0 if divisor is None else float(divisor),  # the weighted sum divided once (0: not)
    )

    def part(start: int, stop: int) -> None:
        _fastmethods.merge(
            destination.data_ptr() + start * destination.element_size(),
            DTYPE_CODES[destination.dtype],
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            stop - start,
            start,
            _addresses(tensors, start),
            [DTYPE_CODES[t.dtype] for t in tensors],
            *settings,
        )

    split(base.numel(), part)
    return True


OPTIONS = {"trim": "threshold", "elect": "task_vector", "disjoint_mean": True}
"""The reference's options the loops compute, at these values only; any other value (or an
option unknown here) is declined, so a new option can never be silently ignored."""


def _defaults(density: Any, gamma: Any, options: dict[str, Any]) -> bool:
    """Whether the settings are the ones the loops compute: one density and gamma for every
    model, and every option at its default."""
    if isinstance(density, (list, tuple)) or isinstance(gamma, (list, tuple)):
        return False
    return all(key in OPTIONS and value == OPTIONS[key] for key, value in options.items())


def _applies(
    destination: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor,
    seed: int | None,
    sparsification: str | None,
) -> bool:
    """Whether the compiled loops can take this merge: built and allowed, whole contiguous CPU
    tensors of one shape, a seed for a random method, no partial overlaps."""
    return (
        available()
        and 0 < len(tensors) == len(weights) <= _MAX_MODELS
        and destination.numel() > 0
        and (seed is not None or sparsification != "random")
        and plain(destination)
        and all(plain(t) and t.shape == destination.shape for t in (base, *tensors))
        and not any(overlaps(destination, t) for t in (base, *tensors))
    )


def _power_of_two(value: float) -> bool:
    """Whether ``value`` is +-2**e with ``1 / value`` exact and both normal: dividing by it is
    multiplying by its inverse, the same real number rounded the same way."""
    mantissa, exponent = math.frexp(value)
    return abs(mantissa) == 0.5 and -1021 <= exponent <= 1023


_MAX_MODELS_EXACT = 8
"""Most models whose denominators are checked (2 ** models sums); more always divide."""


@functools.lru_cache(maxsize=64)
def _exact_denominators(weights: tuple[float, ...]) -> bool:
    """Whether every value TIES' denominator can take is 0 or a power of two: the weights of each
    subset of the models that agree, summed in model order as the loops sum them."""
    if len(weights) > _MAX_MODELS_EXACT:
        return False
    for pattern in range(1 << len(weights)):
        total = 0.0
        for i, weight in enumerate(weights):
            total = total + (1.0 if pattern >> i & 1 else 0.0) * weight
        if total != 0 and not _power_of_two(total):
            return False
    return True


class _Workspace:
    """int64 scratch tensors by role, kept from tensor to tensor and grown as needed: their pages
    are mapped once, not faulted in again for every tensor."""

    def __init__(self) -> None:
        self._tensors: dict[object, torch.Tensor] = {}

    def get(self, role: object, size: int) -> torch.Tensor:
        tensor = self._tensors.get(role)
        if tensor is None or tensor.numel() < size:
            tensor = self._tensors[role] = torch.empty(size, dtype=torch.int64)
        return tensor[:size]

    def address(self, role: object, size: int) -> int:
        """``get(role, size).data_ptr()`` without the view (a merge asks hundreds of times)."""
        tensor = self._tensors.get(role)
        if tensor is None or tensor.numel() < size:
            tensor = self._tensors[role] = torch.empty(size, dtype=torch.int64)
        return tensor.data_ptr()


_WORKSPACES: weakref.WeakKeyDictionary[object, _Workspace] = weakref.WeakKeyDictionary()


# --- thresholds -----------------------------------------------------------------------------------


def _bounds(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    sparsification: str | None,
    density: float,
    gamma: float,
    workspace: _Workspace,
) -> tuple[list[int], list[int]]:
    """Each task vector's kept magnitude bits ``[low, high)``: methods._keep_largest's and
    methods._keep_breadcrumbs' thresholds (everything when they keep everything)."""
    count = len(tensors)
    lows, highs = [0] * count, [_TOP] * count
    n = base.numel()
    keep = max(1, int(density * n))
    if sparsification not in ("magnitude", "breadcrumbs") or keep >= n:
        return lows, highs
    top = min(int(gamma * n), n - keep) if sparsification == "breadcrumbs" else 0
    low_searches = [_Search(i, top + keep) for i in range(count)]
    high_searches = [_Search(i, top) for i in range(count)] if top else []
    _select(base, tensors, low_searches + high_searches, workspace)
    for search in low_searches:
        lows[search.model] = search.value  # type: ignore[assignment]
    for search in high_searches:
        highs[search.model] = search.value  # type: ignore[assignment]
    return lows, highs


def kth_largest_magnitudes(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    ranks: Sequence[Sequence[int]],
    scratch: object | None,
) -> list[list[int]]:
    """For each model, the ``k``-th largest magnitude bits of its task vector for each ``k`` in
    ``ranks[i]`` (1-based, at most two a model), exactly: the searches TIES' thresholds use
    (PCB's clipping bounds)."""
    workspace = _Workspace() if scratch is None else _WORKSPACES.setdefault(scratch, _Workspace())
    searches = [[_Search(i, k) for k in wanted] for i, wanted in enumerate(ranks)]
    _select(base, tensors, [s for row in searches for s in row], workspace)
    return [[s.value for s in row] for row in searches]  # type: ignore[misc]


def kth_largest_values(values: torch.Tensor, ks: Sequence[int]) -> list[int]:
    """For each ``k`` of ``ks`` (1-based, at most 16), the ``k``-th largest of a contiguous 1-D
    int64 tensor's values read as uint64 (the tensor is permuted), from one histogram."""
    found = _fastmethods.kth_many(values.data_ptr(), values.numel(), list(ks))
    return [value for value, _ in found]


def kth_largest_between(
    values: torch.Tensor, segments: Sequence[tuple[int, int]], k: int, lo: int, hi: int
) -> int:
    """The ``k``-th largest (1-based) of the values in ``segments`` (offset, count) of a
    contiguous int64 tensor, read as uint64, every one in ``[lo, hi)``: radix selection in that
    range. The segments are first moved together to the tensor's start (it is overwritten)."""
    return _fastmethods.kth_largest(values.data_ptr(), list(segments), k, lo, hi)[0]


def addresses(tensors: Sequence[torch.Tensor], start: int) -> list[int]:
    """Each tensor's address of its element ``start``."""
    return _addresses(tensors, start)


VARIANCE = -1
"""A search's ``model`` for SCE's variance over every model (``sum_{i<j} (tau_i - tau_j)^2``)
rather than one model's task vector."""


def variance_nonzero(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> int:
    """How many entries of SCE's variance over the task vectors (see
    :func:`terge.families.elementwise.sce_merge`) are not 0: one read of the inputs."""
    spans = ranges(base.numel())

    def part(span: tuple[int, int]) -> int:
        start, stop = span
        bins = torch.zeros(1, dtype=torch.int64)  # the zeros' count, unused
        query = (VARIANCE, 0, 1, _TOP, 0, bins.data_ptr(), 0, False)
        ((above, _, _, _),) = _fastmethods.scan(
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            stop - start,
            _addresses(tensors, start),
            [DTYPE_CODES[t.dtype] for t in tensors],
            [query],
        )
        return above

    return sum(run([functools.partial(part, span) for span in spans]))


def variance_kth_largest(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], rank: int, scratch: object | None
) -> int:
    """The ``rank``-th largest magnitude bits of SCE's variance over the task vectors (as
    :func:`terge.kernels.primitives.kth_largest_magnitude_bits` gives them), exactly."""
    workspace = _Workspace() if scratch is None else _WORKSPACES.setdefault(scratch, _Workspace())
    search = _Search(VARIANCE, rank)
    _select(base, tensors, [search], workspace)
    return search.value  # type: ignore[return-value]


@dataclass
class _Search:
    """The ``rank``-th largest magnitude of a model's task vector (or of SCE's variance:
    ``model`` :data:`VARIANCE`), narrowed pass by pass: it is always the ``rank``-th largest of
    the magnitudes in ``[low, high)``."""

    model: int
    rank: int
    value: int | None = None
    low: int = 0
    high: int = _TOP
    lo: int = 0
    hi: int = _TOP
    """The next pass collects ``[lo, hi)`` (into ``cap`` slots per range) and counts
    ``[hi, high)``; with ``cap`` 0, it counts ``[low, high)`` in 65,536 bins."""
    cap: int = 0
    ends: bool = True
    """Collecting, count ``lo`` and ``hi - 1`` rather than collect them: where many are tied."""
    keys: tuple[int, int] | None = None
    """The bracket ``[lo, hi)`` as float32 keys, for a first pass by ``_pass_keys``."""
    few_tied: bool = True
    """The samples tied at the bracket's ends are few (a quarter of those in it at most): the key
    pass, which collects its ends like any value, takes it (many ties, such as the zeros of a
    mostly unchanged task vector, would overflow its buffers)."""

    @property
    def shift(self) -> int:
        """Bits dropped from ``u - low`` to make a bin index."""
        return max(0, (self.high - self.low - 1).bit_length() - 16)


def _select(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    searches: list[_Search],
    workspace: _Workspace,
) -> None:
    """Fill in each search's value, one read of every input per pass."""
    n = base.numel()
    if n < _SAMPLED and all(search.model >= 0 for search in searches):
        _small(base, tensors, searches, workspace)
        return
    if n < _SAMPLED:
        for search in searches:
            search.cap = n
    else:
        _bracket(base, tensors, searches, workspace)
        if _keyed(base, tensors, searches):
            _pass_keys(base, tensors, sorted(searches, key=lambda s: s.model), workspace)
    while pending := [s for s in searches if s.value is None]:
        _pass(base, tensors, sorted(pending, key=lambda s: s.model), workspace)


def _small(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    searches: list[_Search],
    workspace: _Workspace,
) -> None:
    """A small tensor's searches in one compiled call: each model's magnitudes, then their
    order statistics (the Python of a pass per tensor cost more than the work)."""
    ranks: list[list[int]] = [[] for _ in tensors]
    for search in searches:
        ranks[search.model].append(search.rank)
    scratch = workspace.address("small", base.numel())
    found = _fastmethods.small_thresholds(
        base.data_ptr(),
        DTYPE_CODES[base.dtype],
        base.numel(),
        _addresses(tensors, 0),
        [DTYPE_CODES[t.dtype] for t in tensors],
        ranks,
        scratch,
    )
    for search in searches:
        search.value = found[search.model][ranks[search.model].index(search.rank)][0]


def _addresses(tensors: Sequence[torch.Tensor], start: int) -> list[int]:
    return [t.data_ptr() + start * t.element_size() for t in tensors]


def _bracket(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    searches: list[_Search],
    workspace: _Workspace,
) -> None:
    """A first range for each search from samples spread over its task vector: where the k-th of
    the whole would fall among them, give or take ``_MARGIN`` standard deviations."""
    n = base.numel()
    m = min(max(round(n ** (2 / 3) / 2), _SAMPLES[0]), _SAMPLES[1], n) // _RUN * _RUN
    of_variance = any(search.model == VARIANCE for search in searches)
    sample = workspace.get("sample", (1 if of_variance else len(tensors)) * m)
    runs = m // _RUN
    parts = max(1, min(torch.get_num_threads() if m >= _SAMPLE_THREADED else 1, runs))
    bounds = [runs * p // parts for p in range(parts + 1)]

    def draw(start: int, stop: int) -> None:
        _fastmethods.sample(
            base.data_ptr(),
            DTYPE_CODES[base.dtype],
            n,
            _addresses(tensors, 0),
            [DTYPE_CODES[t.dtype] for t in tensors],
            m,
            sample.data_ptr(),
            of_variance,
            start,
            stop,
        )

    run([functools.partial(draw, *bounds[p : p + 2]) for p in range(parts)])
    ends = {}
    for search in searches:
        share = search.rank / n
        spread = _MARGIN * math.sqrt(m * share * (1 - share)) + 1
        ends[id(search)] = math.floor(share * m - spread), math.ceil(share * m + spread)
    rows: dict[int, list[int]] = {}  # the ranks each row of samples is asked for
    for search in searches:
        first, last = ends[id(search)]
        rows.setdefault(max(search.model, 0), []).extend(k for k in (first, last) if 1 <= k <= m)
    found: dict[tuple[int, int], tuple[int, int]] = {}
    for row, ranks in rows.items():
        ranks = sorted(set(ranks))
        address = sample.data_ptr() + row * m * 8
        found.update(zip(((row, k) for k in ranks), _fastmethods.kth_many(address, m, ranks)))
    for search in searches:
        first, last = ends[id(search)]
        row = max(search.model, 0)
        top, tied_top = (_TOP - 1, 1) if first < 1 else found[row, first]
        search.lo, tied_low = (0, 1) if last > m else found[row, last]
        search.hi = top + 1
        search.cap = min(n, 2 * math.ceil((last - first + 1) * n / m) + 4096)
        search.ends = tied_top > 1 or tied_low > 1  # ties in the sample: many more in the whole
        search.few_tied = 4 * max(tied_top, tied_low) <= last - first + 1


def _keyed(base: torch.Tensor, tensors: Sequence[torch.Tensor], searches: list[_Search]) -> bool:
    """Whether the first pass can compare float32 keys: float32, bfloat16 or float16 inputs, each
    search one model's task vector (at most two a model) with few ties at its ends. Sets the
    searches' key brackets when it can."""
    if base.dtype not in _KEYED or any(t.dtype not in _KEYED for t in tensors):
        return False
    models = [s.model for s in searches]
    if any(s.model < 0 or not s.few_tied or models.count(s.model) > 2 for s in searches):
        return False
    for search in searches:
        search.keys = _fastmethods.key_bounds(search.lo, search.hi)
    return True


def _pass_keys(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    searches: list[_Search],
    workspace: _Workspace,
) -> None:
    """The first pass in float32 keys (see ``_fastmethods.scan_keys``): each search whose k-th is
    among the pairs collected is finished from them; one whose bracket missed (or overflowed)
    starts again from a histogram of every magnitude. Where the loop is not built for this
    machine, the searches go on with their brackets unchanged."""
    spans = ranges(base.numel())
    pieces = len(spans)
    slots = [s.cap + _KEY_SLACK for s in searches]
    buffers = [workspace.address(q, pieces * slot) for q, slot in enumerate(slots)]

    def part(piece: int) -> list[tuple[int, int]] | None:
        start, stop = spans[piece]
        queries = [
            (s.model, *s.keys, buffer + piece * slot * 8, s.cap)  # type: ignore[misc]
            for s, buffer, slot in zip(searches, buffers, slots, strict=True)
        ]
        return _fastmethods.scan_keys(
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            stop - start,
            _addresses(tensors, start),
            [DTYPE_CODES[t.dtype] for t in tensors],
            queries,
        )

    counts = run([functools.partial(part, piece) for piece in range(pieces)])
    if any(c is None for c in counts):
        return
    finish = []
    collected = 0
    for q, (search, buffer, slot) in enumerate(zip(searches, buffers, slots, strict=True)):
        found = [c[q] for c in counts]  # type: ignore[index]
        above = sum(a for a, _ in found)
        inside = sum(i for _, i in found)
        search.keys = None
        if not above < search.rank <= above + inside or any(i > search.cap for _, i in found):
            search.cap = 0  # again from a histogram of [low, high): every magnitude, still
            continue
        segments = [(piece * slot, i) for piece, (_, i) in enumerate(found)]
        scratch = workspace.address(("pairs", q), inside)
        finish.append(
            functools.partial(_select_pairs, search, buffer, segments, search.rank - above, scratch)
        )
        collected += inside
    if collected < _SERIAL_SELECT:
        for select in finish:
            select()
    else:
        run(finish)


def _select_pairs(
    search: _Search,
    buffer: int,
    segments: list[tuple[int, int]],
    rank: int,
    scratch: int,
) -> None:
    search.value = _fastmethods.kth_pairs(buffer, segments, search.cap, rank, scratch)


def _pass(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    searches: list[_Search],
    workspace: _Workspace,
) -> None:
    """One read of the inputs for every pending search (grouped by model), split between
    threads, then each search narrowed (or finished) by what it counted. Each range collects
    into its own part of a search's buffer (up to ``cap`` values each: pages never written are
    never mapped) or counts into its own histogram."""
    spans = ranges(base.numel())
    pieces = len(spans)
    buffers = [
        workspace.get(q, pieces * (s.cap + _SLACK))
        if s.cap
        else workspace.get(q, pieces * _BINS).zero_()
        for q, s in enumerate(searches)
    ]

    def part(piece: int) -> list[tuple[int, int, int, int]]:
        start, stop = spans[piece]
        queries = []
        for search, buffer in zip(searches, buffers, strict=True):
            if search.cap:
                bounds, shift, slots = (search.lo, search.hi, search.high), -1, search.cap + _SLACK
            else:
                bounds, shift, slots = (search.low, search.high, search.high), search.shift, _BINS
            out = buffer.data_ptr() + piece * slots * 8
            queries.append((search.model, *bounds, shift, out, search.cap, search.ends))
        return _fastmethods.scan(
            base.data_ptr() + start * base.element_size(),
            DTYPE_CODES[base.dtype],
            stop - start,
            _addresses(tensors, start),
            [DTYPE_CODES[t.dtype] for t in tensors],
            queries,
        )

    counts = run([functools.partial(part, piece) for piece in range(pieces)])
    finish = []
    collected = 0
    for q, (search, buffer) in enumerate(zip(searches, buffers, strict=True)):
        found = [c[q] for c in counts]
        if search.cap:
            finish += _collected(search, buffer, found)
            collected += sum(c[1] for c in found)
        else:
            _binned(search, buffer.view(pieces, _BINS).sum(0))
    if collected < _SERIAL_SELECT:  # a handful of values: the threads' hand-off would cost more
        for select in finish:
            select()
    else:
        run(finish)


def _collected(
    search: _Search, buffer: torch.Tensor, found: Sequence[tuple[int, int, int, int]]
) -> list:
    """Narrow ``search`` by a collecting pass's (above, inside, floor, ceiling) counts per
    range; return the selection to run when the k-th was among the values collected."""
    above, inside, floor, ceiling = (sum(counts) for counts in zip(*found, strict=True))
    if search.rank <= above:  # the bracket was too low
        search.low, search.cap = search.hi, 0
        return []
    if search.rank > above + ceiling + inside + floor:  # too high
        search.rank -= above + ceiling + inside + floor
        search.high, search.cap = search.lo, 0
        return []
    search.rank -= above
    search.low, search.high = search.lo, search.hi
    if search.rank <= ceiling:
        search.value = search.high - 1
        return []
    if search.rank > ceiling + inside:
        search.value = search.low
        return []
    if any(counts[1] > search.cap for counts in found):  # too many to hold: histograms take over
        search.cap = 0
        return []
    rank, slots = search.rank - ceiling, search.cap + _SLACK
    segments = [(piece * slots, counts[1]) for piece, counts in enumerate(found)]

    def select() -> None:  # among the values strictly between low and high - 1, or all of them
        ends = search.ends
        low, high = (search.low + 1, search.high - 1) if ends else (search.low, search.high)
        search.value = _fastmethods.kth_largest(buffer.data_ptr(), segments, rank, low, high)[0]

    return [select]


def _binned(search: _Search, histogram: torch.Tensor) -> None:
    """Narrow ``search`` to the bin that holds its k-th: its value when the bin is one wide, else
    the next pass collects the bin or, if it is too full, bins it again."""
    from_top = histogram.flip(0).cumsum(0)  # from_top[i]: values in the i + 1 top bins
    position = int(torch.searchsorted(from_top, search.rank))
    if position:
        search.rank -= int(from_top[position - 1])
    shift, index = search.shift, _BINS - 1 - position
    search.low += index << shift
    search.high = min(search.high, search.low + (1 << shift))
    if shift == 0:
        search.value = search.low
        return
    count = int(histogram[index])
    search.lo, search.hi, search.cap = search.low, search.high, count if count <= _COLLECT else 0
