"""The compiled loop (``terge.fastloop._fastloop``) against the plain-torch reference, bit for bit."""

from __future__ import annotations

import importlib
import itertools
import os
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import terge
from terge import kernels
from terge.kernels import cpu, fastloop

from helpers import FLOAT_DTYPES as DTYPES
from helpers import awkward, same_bits

needs_loop = pytest.mark.skipif(
    fastloop._fastloop is None, reason="terge.fastloop._fastloop is not built (pip install -e .)"
)


def test_the_compiled_loop_is_built():
    """The README's install builds it; only an explicit TERGE_KERNELS=torch run may lack it."""
    if os.environ.get("TERGE_KERNELS", "").lower() == "torch":
        pytest.skip("TERGE_KERNELS=torch selects the reference loop")
    assert fastloop._fastloop is not None, (
        "terge.fastloop._fastloop is not built: run `pip install -e .` (needs a C compiler)"
    )
    assert fastloop.available()


@pytest.mark.parametrize("module", ["_fastloop", "_fastmethods", "_faststatistics", "_fastrank"])
def test_every_compiled_module_is_built(module):
    """setup.py builds four C modules; a missing one would silently run the slower torch path."""
    if os.environ.get("TERGE_KERNELS", "").lower() == "torch":
        pytest.skip("TERGE_KERNELS=torch selects the reference loops")
    importlib.import_module(f"terge.kernels.{module}")


def combine(destination, sources, coefficients, divisor, *, reference):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TERGE_KERNELS", "torch" if reference else "auto")
        assert fastloop.available() is (not reference)
        kernels.linear_combine(
            destination, sources, coefficients, kernels.ChunkBuffers(torch.float64), divisor
        )


@needs_loop
@settings(max_examples=60, deadline=None)
@given(
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=9),
    out_dtype=st.sampled_from(DTYPES),
    numel=st.integers(1, 3000),
    coefficient_seed=st.integers(0, 2**16),
    divisor=st.sampled_from([None, 1.0, 3.0, 0.7, -2.5]),
    same=st.booleans(),
)
def test_equals_the_reference_bit_for_bit(
    dtypes, out_dtype, numel, coefficient_seed, divisor, same
):
    if same:  # the fused same-dtype loops (the usual case) as well as the mixed-dtype blocks
        dtypes = [dtypes[0]] * len(dtypes)
    sources = [awkward(numel, dtype, coefficient_seed + i) for i, dtype in enumerate(dtypes)]
    generator = torch.Generator().manual_seed(coefficient_seed)
    coefficients = [
        float(c) if i % 3 else 1.0
        for i, c in enumerate(torch.randn(len(sources), generator=generator))
    ]
    fast = torch.empty(numel, dtype=out_dtype)
    slow = torch.empty(numel, dtype=out_dtype)
    combine(fast, sources, coefficients, divisor, reference=False)
    combine(slow, sources, coefficients, divisor, reference=True)
    assert same_bits(fast, slow)


@needs_loop
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_tensors_split_between_threads_in_place(dtype, monkeypatch):
    """Past the per-thread threshold the range is split; in place, the base is also an input."""
    numel = 3 * cpu.PER_THREAD + 77
    sources = [awkward(numel, dtype, seed) for seed in range(3)]
    expected = sources[0].clone()
    combine(expected, [expected, *sources[1:]], [1.0, 1.0, 1.0], 3.0, reference=True)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: 3)
        combine(sources[0], sources, [1.0, 1.0, 1.0], 3.0, reference=False)
    assert same_bits(sources[0], expected)


@needs_loop
def test_half_way_cases_round_to_even_once(monkeypatch):
    """(a + b) / 2 landing exactly between two bfloat16 values must round to even, and a value
    just above half-way must round up (float64 -> float32 -> bfloat16 would round it down)."""
    a = torch.tensor([1.0, 1.0], dtype=torch.float64)
    ulp = 2.0**-7  # bfloat16's spacing at 1
    b = torch.tensor([1.0 + ulp, 1.0 + ulp + 2.0**-40], dtype=torch.float64)
    out = torch.empty(2, dtype=torch.bfloat16)
    combine(out, [a, b], [1.0, 1.0], 2.0, reference=False)
    assert out[0].item() == 1.0  # the tie goes to the even neighbour
    assert out[1].item() == 1.0 + ulp  # above the tie: up, although float32 would round to it


def test_falls_back_where_the_loop_does_not_apply(monkeypatch):
    """Float32 accumulation, transposed destinations and CUDA-less fallbacks use the reference."""
    x = torch.randn(64, 32)
    y = torch.randn(64, 32)
    destination = torch.empty(32, 64).t()  # not contiguous
    kernels.linear_combine(destination, [x, y], [1.0, 1.0], kernels.ChunkBuffers(torch.float64), 2)
    assert torch.equal(destination, ((x.double() + y.double()) / 2).float())
    low = torch.empty(64, 32)
    kernels.linear_combine(low, [x, y], [1.0, 1.0], kernels.ChunkBuffers(torch.float32), 2)
    assert torch.equal(low, (x + y) / 2)


@needs_loop
def test_merge_uses_the_compiled_loop(monkeypatch):
    """merge() reaches the compiled loop for CPU float64 accumulation (and not otherwise)."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")
    calls = []
    real = fastloop._fastloop
    spy = {
        name: staticmethod(lambda *a, name=name: (calls.append(name), getattr(real, name)(*a))[1])
        for name in ("combine", "combine_many")
    }
    monkeypatch.setattr(fastloop, "_fastloop", type("Spy", (), {**vars(real), **spy}))
    models = [torch.nn.Linear(8, 8) for _ in range(3)]
    terge.merge(models)
    assert calls == ["combine_many"]  # weight and bias, held and computed in one call
    calls.clear()
    terge.merge(models, dtype=torch.float32)
    assert calls == []


@needs_loop
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_merges_with_threads_of_its_own(monkeypatch):
    """A child forked after a merge (a DataLoader worker, say) inherits the thread pool but none
    of its threads; its own merge must start new ones rather than wait forever."""
    import multiprocessing

    monkeypatch.setenv("TERGE_KERNELS", "auto")
    numel = 4 * cpu.PER_THREAD
    tensors = [torch.full((numel,), float(i)) for i in range(3)]
    kernels.linear_combine(
        torch.empty(numel), tensors, [1.0] * 3, kernels.ChunkBuffers(torch.float64), 3
    )
    assert cpu._pool is not None

    def child(queue):
        out = torch.empty(numel)
        kernels.linear_combine(out, tensors, [1.0] * 3, kernels.ChunkBuffers(torch.float64), 3)
        # Only a sample is checked: torch's own parallel ops are not fork-safe (OpenMP).
        queue.put(out[:: numel // 64].tolist() == [1.0] * 64)

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(timeout=60)
    if process.is_alive():
        process.kill()
        pytest.fail("the forked child's merge hung")
    assert queue.get(timeout=5) is True


@needs_loop
@settings(max_examples=40, deadline=None)
@given(
    in_dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=3),
    out_dtype=st.sampled_from(DTYPES),
    numels=st.lists(st.integers(1, 1500), min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
    divisor=st.sampled_from([None, 1.0, 3.0, -2.5]),
    threads=st.sampled_from([1, 3]),
)
def test_combine_many_equals_one_combine_per_tensor(
    in_dtypes, out_dtype, numels, seed, divisor, threads
):
    """combine_many (the running average's batched small tensors) computes each tensor exactly
    as the reference does, however the tensors are split between threads."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastloop, "PER_THREAD", 64)  # small batches split between threads too
        patch.setattr(torch, "get_num_threads", lambda: threads)
        parts = fastloop.partition(numels)
    generator = torch.Generator().manual_seed(seed)
    coefficients = [float(c) for c in torch.randn(len(in_dtypes), generator=generator)]
    inputs = [
        [awkward(n, dtype, seed + 17 * i + j) for j, n in enumerate(numels)]
        for i, dtype in enumerate(in_dtypes)
    ]
    outs = [torch.empty(n, dtype=out_dtype) for n in numels]
    fastloop.combine_many(
        cpu.DTYPE_CODES[out_dtype],
        [o.data_ptr() for o in outs],
        numels,
        [cpu.DTYPE_CODES[d] for d in in_dtypes],
        [[t.data_ptr() for t in tensors] for tensors in inputs],
        coefficients,
        divisor,
        parts,
    )
    for j, out in enumerate(outs):
        expected = torch.empty_like(out)
        combine(expected, [tensors[j] for tensors in inputs], coefficients, divisor, reference=True)
        assert same_bits(out, expected), j


def ema_many(outs, base, model, weights, parts=None) -> None:
    """``fastloop.combine_many`` of float32 ``outs[j] = weights[0] * base[j] + weights[1] *
    model[j]``, every tensor by its address."""
    code = cpu.DTYPE_CODES[torch.float32]
    fastloop.combine_many(
        code,
        [o.data_ptr() for o in outs],
        [o.numel() for o in outs],
        [code, code],
        [[t.data_ptr() for t in base], [t.data_ptr() for t in model]],
        weights,
        None,
        parts,
    )


@needs_loop
@pytest.mark.skipif(
    not getattr(fastloop._fastloop, "SHARED_WORK", 0), reason="shared work needs GCC or clang"
)
@settings(max_examples=25, deadline=None)
@given(
    picks=st.lists(st.integers(0, 11), min_size=1, max_size=8),
    threads=st.integers(2, 4),
    inplace=st.booleans(),
    seed=st.integers(0, 2**16),
    openmp=st.booleans(),
)
def test_threads_sharing_pieces_compute_every_element_once(picks, threads, inplace, seed, openmp):
    """The threads claim pieces from one counter: large tensors cut into PIECE-element pieces
    (the loop with cache hints inside those of HINTED elements or more), small ones in runs. Every element is
    computed once, as the reference computes it: in place a second pass would change it."""
    piece, hinted = fastloop._fastloop.PIECE, fastloop._fastloop.HINTED
    sizes = [0, 1, 5, 1000, hinted - 1, hinted, hinted + 13, piece - 1, piece,
             piece + 1, 2 * piece + 255, 3 * piece + 4099]  # fmt: skip
    numels = [sizes[p] for p in picks]

    def values(n: int, seed: int) -> torch.Tensor:
        return awkward(n, torch.float32, seed) if n else torch.empty(0)

    base = [values(n, seed + j) for j, n in enumerate(numels)]
    model = [values(n, seed + 100 + j) for j, n in enumerate(numels)]
    expected = [torch.empty(n, dtype=torch.float32) for n in numels]
    for e, b, m in zip(expected, base, model, strict=True):
        combine(e, [b, m], [0.999, 0.001], None, reference=True)
    outs = base if inplace else [torch.full((n,), float("nan")) for n in numels]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TERGE_OPENMP", "1" if openmp else "0")  # torch's OpenMP team, or ours
        patch.setattr(fastloop, "PER_THREAD", 1)
        patch.setattr(torch, "get_num_threads", lambda: threads)
        parts = fastloop.partition(numels)
        ema_many(outs, base, model, [0.999, 0.001], parts)
    for j, (out, want) in enumerate(zip(outs, expected, strict=True)):
        assert same_bits(out, want), (j, numels[j])


@needs_loop
def test_combine_many_in_place_and_its_partition():
    """The output may be an input (an EMA's shadow); the partition covers every tensor once."""
    a = [torch.full((n,), 2.0) for n in (3, 1000, 5)]
    b = [torch.full((n,), 4.0) for n in (3, 1000, 5)]
    fastloop.combine_many(
        1,
        [t.data_ptr() for t in a],
        [3, 1000, 5],
        [1, 1],
        [[t.data_ptr() for t in a], [t.data_ptr() for t in b]],
        [0.75, 0.25],
        None,
    )
    assert all(torch.equal(t, torch.full_like(t, 2.5)) for t in a)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastloop, "PER_THREAD", 10)
        patch.setattr(torch, "get_num_threads", lambda: 4)
        parts = fastloop.partition([5, 50, 5, 5, 40, 1, 1])
    assert parts[0][0] == 0 and parts[-1][1] == 7
    assert all(p[1] == q[0] for p, q in itertools.pairwise(parts))
    assert len(parts) > 1
    with pytest.raises(ValueError, match="same length"):
        fastloop._fastloop.combine_many(1, [a[0].data_ptr()], [3], [1], [], [1.0], None)
    with pytest.raises(ValueError, match="expected 1 entries"):
        fastloop._fastloop.combine_many(1, [a[0].data_ptr()], [3, 4], [1], [[1]], [1.0], None)


@given(lengths=st.lists(st.integers(1, 1000), min_size=1, max_size=40), threads=st.integers(2, 5))
@settings(max_examples=200, deadline=None)
def test_the_partition_cuts_each_share_at_the_nearer_tensor_boundary(lengths, threads):
    """Every tensor in exactly one range, in order; each cut is the tensor boundary nearest the
    ideal share's end (on its side of the range's start), so a large tensor crossing the share
    goes to whichever side leaves the ranges more even."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastloop, "PER_THREAD", 1)
        patch.setattr(torch, "get_num_threads", lambda: threads)
        parts = fastloop.partition(lengths)
    assert parts[0][0] == 0 and parts[-1][1] == len(lengths)
    assert all(p[1] == q[0] and p[0] < p[1] for p, q in itertools.pairwise(parts))
    total = sum(lengths)
    workers = min(threads, total, len(lengths))
    assert len(parts) <= workers
    bounds = [0, *itertools.accumulate(lengths)]  # elements before each tensor boundary
    for number, (_, stop) in enumerate(parts[:-1], start=1):
        target = total * number / workers
        here = abs(bounds[stop] - target)
        assert here <= min(abs(b - target) for b in bounds[parts[number - 1][0] + 1 :]) + 1e-9


def test_a_large_tensor_crossing_the_half_goes_to_the_lighter_side():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastloop, "PER_THREAD", 1)
        patch.setattr(torch, "get_num_threads", lambda: 2)
        assert fastloop.partition([40, 20, 40]) == [(0, 2), (2, 3)]  # 60/40 either way: after
        assert fastloop.partition([45, 30, 25]) == [(0, 1), (1, 3)]  # 45/55, not 75/25
        assert fastloop.partition([10, 60, 30]) == [(0, 2), (2, 3)]  # 70/30, not 10/90


@needs_loop
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_every_kind_of_float64_once(dtype):
    """Random float64 bit patterns (every exponent, subnormals, infinities, NaNs, values that
    overflow or underflow the target) stored by the compiled loop (its branch-free rounding to
    odd, its vector clones) as the reference stores them."""
    generator = torch.Generator().manual_seed(15)
    bits = torch.randint(-(2**63), 2**63 - 1, (1 << 16,), generator=generator, dtype=torch.int64)
    values = bits.view(torch.float64)
    near = torch.randn(1 << 14, generator=generator, dtype=torch.float64)  # near the targets'
    low = near.abs().to(dtype)
    integer = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
    high = (low.view(integer[dtype]) + 1).view(dtype)  # the next value up
    halfway = (low.double() + high.double()) / 2  # ties, and just off them both ways
    off = halfway * 2.0**-40
    sources = torch.cat([values, near, halfway, halfway + off, halfway - off, near * 1e-41])
    fast = torch.empty(sources.numel(), dtype=dtype)
    slow = torch.empty(sources.numel(), dtype=dtype)
    combine(fast, [sources], [1.0], None, reference=False)
    combine(slow, [sources], [1.0], None, reference=True)
    assert same_bits(fast, slow)


@needs_loop
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float64, torch.bfloat16, torch.float16, torch.float32])
def test_every_half_precision_value_is_read_and_stored_as_torch_does(dtype, out_dtype):
    """All 65,536 bit patterns of a 16-bit float (subnormals, infinities, every NaN payload)
    read by the compiled loop, whose conversions are written without branches so that they
    vectorise, and stored into each dtype: the same bits as the reference's conversions."""
    values = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    fast = torch.empty(values.numel(), dtype=out_dtype)
    slow = torch.empty(values.numel(), dtype=out_dtype)
    combine(fast, [values], [1.0], None, reference=False)
    combine(slow, [values], [1.0], None, reference=True)
    assert same_bits(fast, slow)
    if out_dtype == torch.float64:
        assert same_bits(fast, values.to(torch.float64))


class _Subclass(torch.Tensor):
    pass


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: torch.ones(4, 3), True),
        (lambda: torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16)), True),
        (lambda: torch.ones(3, dtype=torch.float16), True),
        (lambda: torch.ones(4, 3).T, False),  # not contiguous
        (lambda: torch.ones(4, 3, device="meta"), False),
        (lambda: torch.ones(3, dtype=torch.int64), False),
        (lambda: torch.ones(3, dtype=torch.complex64), False),
        (lambda: torch._neg_view(torch.ones(3)), False),  # negated lazily: raw memory is not it
        (lambda: torch.ones(3, dtype=torch.complex64).conj(), False),
        (lambda: torch.ones(3).as_subclass(_Subclass), False),
    ],
)
def test_plain_says_which_tensors_the_compiled_loops_read_as_raw_memory(make, expected):
    from terge.kernels.cpu import plain

    assert plain(make()) is expected


@needs_loop
@pytest.mark.skipif(not fastloop._loaded_openmp(), reason="torch loaded no OpenMP runtime here")
def test_the_shared_work_runs_on_torchs_openmp_threads(monkeypatch):
    """Where torch runs on OpenMP (Linux wheels), the batched loop joins that team: one call
    does the work of every thread (no Python thread is started), with the same bits."""
    assert fastloop.openmp_team()
    calls = []
    monkeypatch.setattr(fastloop, "run", lambda parts: calls.append(parts))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(fastloop, "PER_THREAD", 1)
    numels = [70_000, 3, 300_000, 5]
    base = [awkward(n, torch.float32, j) for j, n in enumerate(numels)]
    model = [awkward(n, torch.float32, 10 + j) for j, n in enumerate(numels)]
    expected = [torch.empty(n) for n in numels]
    for e, b, m in zip(expected, base, model, strict=True):
        combine(e, [b, m], [0.9, 0.1], None, reference=True)
    ema_many(base, base, model, [0.9, 0.1])
    assert calls == []  # no thread of terge's own
    for got, want in zip(base, expected, strict=True):
        assert same_bits(got, want)


@needs_loop
def test_joining_a_team_never_loads_a_library_and_a_team_needs_one():
    assert fastloop._fastloop.join_team("/nonexistent/libgomp.so.1") is False
    assert fastloop._fastloop.join_team("libm.so.6") is False  # loaded, but no GOMP_parallel
    with pytest.raises(ValueError, match=r"a team needs join_team\(\) first, and a counter"):
        fastloop._fastloop.combine_many(1, [], [], [1], [[]], [1.0], None, None, 2)


@needs_loop
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_uses_threads_of_its_own():
    """An OpenMP runtime is not promised to work in a forked child of a process that used its
    threads (torch's own loops hang there: DataLoader's workers run one thread): a child does
    not join the team, and its threads of terge's own compute the same bits. (The child runs no
    torch loop of its own: its tensors come from the parent.)"""
    import ctypes
    import multiprocessing
    from queue import Empty

    fastloop.openmp_team()  # the parent has looked (and joined, where it could)
    numels = [70_000, 3, 300_000]
    _FORKED["base"] = [awkward(n, torch.float32, j) for j, n in enumerate(numels)]
    _FORKED["model"] = [awkward(n, torch.float32, 10 + j) for j, n in enumerate(numels)]
    _FORKED["expected"] = [torch.empty(n) for n in numels]
    for e, b, m in zip(_FORKED["expected"], _FORKED["base"], _FORKED["model"], strict=True):
        combine(e, [b, m], [0.9, 0.1], None, reference=True)
    _FORKED["counter"] = torch.zeros(1, dtype=torch.int64)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=_in_forked_child, args=(queue,))
    process.start()
    try:  # read before joining: the child's feeder thread waits until its bytes are read
        joined, threads, results = queue.get(timeout=60)
    except Empty:
        process.kill()
        pytest.fail("the forked child's merge hung (did it join the parent's OpenMP team?)")
    process.join(timeout=10)
    assert joined is False
    assert threads == 2  # terge's own: the work was split, not run in one thread
    for got, want in zip(results, _FORKED["expected"], strict=True):
        assert got == ctypes.string_at(want.data_ptr(), want.numel() * 4)


_FORKED: dict[str, object] = {}


def _in_forked_child(queue: Any) -> None:
    import ctypes

    base, model = _FORKED["base"], _FORKED["model"]
    started = []
    original = fastloop.run

    def counted(parts):
        started.append(len(parts))
        return original(parts)

    fastloop.run = counted
    fastloop.PER_THREAD = 1
    torch.get_num_threads = lambda: 2
    ema_many(base, base, model, [0.9, 0.1])
    # the bytes as they are, read without a torch loop (one would hang in this child)
    results = [ctypes.string_at(t.data_ptr(), t.numel() * 4) for t in base]
    queue.put((fastloop.openmp_team(), started[0] if started else 0, results))


def test_openmp_paths_are_the_mapped_runtimes_gnus_first():
    maps = [
        "7f00-7f01 r-xp 00000000 08:01 12 /a/intel/lib/libiomp5.so",
        "7f02-7f03 r-xp 00000000 08:01 13 /env/torch/lib/libgomp-a34b3233.so.1",
        "7f04-7f05 r--p 00001000 08:01 13 /env/torch/lib/libgomp-a34b3233.so.1",
        "7f06-7f07 rw-p 00000000 00:00 0 ",
        "7f08-7f09 r-xp 00000000 08:01 14 /usr/lib/libm.so.6",
    ]
    assert fastloop.openmp_paths(maps) == [
        "/env/torch/lib/libgomp-a34b3233.so.1",
        "/a/intel/lib/libiomp5.so",
    ]
    assert fastloop.openmp_paths(maps[3:]) == []
