"""PCB's compiled loop (``terge.kernels.fastpcb``) against its reference
(``terge.families.elementwise.pcb_merge``), bit for bit; its refusals, its fallbacks to the
reference, and the check that its ``exp`` and ``tanh`` are torch's."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import terge
from terge import kernels
from terge.families import elementwise
from terge.kernels import cpu, fastpcb

from helpers import near_base, same_bits

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

needs_loop = pytest.mark.skipif(
    not fastpcb.available(),
    reason="terge.kernels._fastpcb is not built, or this torch has no MKL exp and tanh",
)
pytestmark = needs_loop


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    """Both paths in every run: the compiled one here, the reference called directly."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")


def reference(base, tensors, ratio, scale, dtype):
    """What execute.run_step computes without the loop: the float64 reference, rounded once."""
    merged = elementwise.pcb_merge(
        [t.double() for t in tensors], [1.0] * len(tensors), base.double(), ratio=ratio, scale=scale
    )
    out = torch.empty(base.shape, dtype=dtype)
    kernels.store_whole(out, merged, kernels.ChunkBuffers(torch.float64))
    return out


def compiled(base, tensors, ratio, scale, dtype, inplace=False):
    destination = base if inplace else torch.empty(base.shape, dtype=dtype)
    assert fastpcb.pcb_into(
        destination, tensors, [1.0] * len(tensors), base, ratio=ratio, scale=scale
    )
    return destination


def models(numel, count, seed, dtypes=(torch.float32,), sparse=0.0, spread=0.01):
    """A base and ``count`` models near it; a share ``sparse`` of each model's entries equal to
    the base's (a mostly unchanged task vector: its balances tie at zero)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=generator, dtype=torch.float64)
    out = []
    for i in range(count):
        moved = base + torch.randn(numel, generator=generator, dtype=torch.float64) * spread
        kept = torch.rand(numel, generator=generator) < sparse
        out.append(torch.where(kept, base, moved).to(dtypes[i % len(dtypes)]))
    return base.to(dtypes[0]), out


# --- the same bits ------------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [2, 3, 37, 1000, 8191, 8192, 20_000, 70_001])
@pytest.mark.parametrize("count", [1, 2, 5])
def test_the_same_bits_as_the_reference(numel, count):
    """Small tensors (every balance collected) and sampled ones (a bracket), one to five task
    vectors (past four, the reference's sums are its own folds, not ``sum(dim=0)``'s order)."""
    for ratio in (0.1, 0.5, 1.0):
        base, tensors = models(numel, count, seed=numel + count)
        got = compiled(base, tensors, ratio, 1.0, torch.float32)
        assert same_bits(got, reference(base, tensors, ratio, 1.0, torch.float32)), ratio


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_every_dtype_in_and_out(dtype, out_dtype):
    base, tensors = models(30_000, 3, seed=7, dtypes=(dtype, torch.float32, torch.bfloat16))
    got = compiled(base, tensors, 0.2, 0.7, out_dtype)
    assert same_bits(got, reference(base, tensors, 0.2, 0.7, out_dtype))


@pytest.mark.parametrize("numel", [5_000, 50_000])
@pytest.mark.parametrize("sparse", [0.5, 0.95, 1.0])
def test_balances_tied_at_the_floor(numel, sparse):
    """Mostly unchanged task vectors: most balances are zero, so the floor falls among
    thousands of equal keys (counted at the bracket's ends, never collected)."""
    base, tensors = models(numel, 2, seed=3, sparse=sparse)
    for ratio in (0.01, 0.1, 0.3):
        got = compiled(base, tensors, ratio, 1.0, torch.float32)
        assert same_bits(got, reference(base, tensors, ratio, 1.0, torch.float32)), ratio


@pytest.mark.parametrize("kind", [0, 1])
def test_awkward_values_or_a_refusal(kind):
    """Ties at every threshold, signed zeros and subnormals match; where an input holds a NaN or
    an infinity the loop declines, having written nothing (the reference's orders are its own)."""
    base, *tensors = near_base(12_345, [torch.float64, torch.float32, torch.float64], 5, kind)
    destination = torch.full(base.shape, 7.0)
    done = fastpcb.pcb_into(destination, tensors, [1.0, 1.0], base, ratio=0.1, scale=1.0)
    finite = all(bool(torch.isfinite(t.double() - base).all()) for t in tensors)
    assert done == finite
    if done:
        assert same_bits(destination, reference(base, tensors, 0.1, 1.0, torch.float32))
    else:
        assert bool((destination == 7.0).all())


def test_in_place_into_the_base_and_into_a_model():
    base, tensors = models(20_000, 2, seed=11)
    expected = reference(base, tensors, 0.1, 1.0, torch.float32)
    assert same_bits(
        compiled(base.clone(), tensors, 0.1, 1.0, torch.float32, inplace=True), expected
    )
    first = tensors[0].clone()
    into = [first, tensors[1]]
    assert fastpcb.pcb_into(first, into, [1.0, 1.0], base, ratio=0.1, scale=1.0)
    assert same_bits(first, expected)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_any_number_of_threads_gives_the_same_bits(threads, monkeypatch):
    monkeypatch.setattr(cpu, "PER_THREAD", 1 << 12)
    base, tensors = models(100_003, 3, seed=2)
    expected = reference(base, tensors, 0.1, 1.0, torch.float32)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert same_bits(compiled(base, tensors, 0.1, 1.0, torch.float32), expected)
    finally:
        torch.set_num_threads(previous)


VALUES = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 0.5, -0.25, 3.0, 1e-310, -5e-324, 1e-3, 2.0**-30, 1e30, -7.5]
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    columns=st.lists(st.tuples(VALUES, VALUES, VALUES), min_size=2, max_size=40),
    ratio=st.sampled_from([0.05, 0.1, 0.5, 0.9, 1.0]),
    scale=st.sampled_from([1.0, 0.5, -2.0]),
)
def test_property_small_awkward_tensors(columns, ratio, scale):
    """Signed zeros, subnormals, huge and tied values, a base and two models: the same bits."""
    base, a, b = (torch.tensor(c, dtype=torch.float64) for c in zip(*columns, strict=True))
    tensors = [a, b]
    got = compiled(base, tensors, ratio, scale, torch.float64)
    assert same_bits(got, reference(base, tensors, ratio, scale, torch.float64))


# --- refusals and fallbacks -----------------------------------------------------------------------


def test_declines_what_it_cannot_take():
    base, tensors = models(100, 2, seed=1)
    out = torch.empty(100)
    call = fastpcb.pcb_into
    assert not call(out, tensors, [1.0, 1.0], None, ratio=0.1, scale=1.0)  # no base
    assert not call(torch.empty(1), [torch.ones(1)], [1.0], torch.zeros(1), ratio=0.1, scale=1.0)
    assert not call(
        out[::2], [t[::2] for t in tensors], [1.0, 1.0], base[::2], ratio=0.1, scale=1.0
    )
    assert not call(
        out, [tensors[0], tensors[1][:50].repeat(2)[:99]], [1, 1], base, ratio=0.1, scale=1.0
    )
    assert not call(out, tensors * 33, [1.0] * 66, base, ratio=0.1, scale=1.0)  # over 64 models
    shifted = torch.empty(101)
    assert not call(shifted[1:], [shifted[:100], tensors[1]], [1, 1], base, ratio=0.1, scale=1.0)
    assert not call(
        out, [tensors[0].to(torch.int32), tensors[1]], [1, 1], base, ratio=0.1, scale=1.0
    )


@pytest.mark.parametrize("how", ["miss", "overflow"])
def test_a_missed_or_overflowing_bracket_leaves_the_merge_to_the_reference(how, monkeypatch):
    """A bracket that does not hold the floor, or holds more balances than its buffers, makes
    the loop decline with nothing written; ``terge.merge`` then runs the reference: same bits."""
    real = fastpcb._brackets

    def broken(base, spec, rank):
        brackets = real(base, spec, rank)
        if how == "miss":  # a bracket above every balance
            return [(fastpcb._MASK - 1, fastpcb._MASK, cap) for *_, cap in brackets]
        return [(0, fastpcb._MASK, 16) for _ in brackets]  # everything inside, room for 16

    monkeypatch.setattr(fastpcb, "_brackets", broken)
    base, tensors = models(20_000, 2, seed=4)
    destination = torch.full((20_000,), 7.0)
    assert not fastpcb.pcb_into(destination, tensors, [1.0, 1.0], base, ratio=0.1, scale=1.0)
    assert bool((destination == 7.0).all())
    merged = terge.merge([{"w": t} for t in tensors], base={"w": base}, method="pcb")
    assert same_bits(merged["w"], reference(base, tensors, 0.1, 1.0, torch.float32))


def test_the_bracket_holds_the_floor_with_few_values():
    """The sampled bracket is narrow (a few percent of the balances collected) yet holds the
    floor: the counts below it and inside it place the floor's rank inside."""
    base, tensors = models(200_000, 2, seed=9)
    spec = ([t.data_ptr() for t in tensors], [1, 1], [0.0, 0.0], [0.05, 0.05])
    brackets = fastpcb._brackets(base, spec, int(200_000 * 0.9))
    assert brackets is not None and all(cap < 200_000 * 0.15 for *_, cap in brackets)


def test_a_nan_or_infinity_anywhere_makes_merge_run_the_reference():
    base, tensors = models(20_000, 2, seed=6)
    tensors[1][12_345] = math.inf
    destination = torch.full((20_000,), 7.0)
    assert not fastpcb.pcb_into(destination, tensors, [1.0, 1.0], base, ratio=0.1, scale=1.0)
    assert bool((destination == 7.0).all())
    merged = terge.merge([{"w": t} for t in tensors], base={"w": base}, method="pcb")
    assert same_bits(merged["w"], reference(base, tensors, 0.1, 1.0, torch.float32))


def test_merge_uses_the_loop_for_pcb(monkeypatch):
    from helpers import count_calls

    counts = count_calls(monkeypatch, fastpcb, "pcb_into")
    base, tensors = models(20_000, 2, seed=8)
    merged = terge.merge([{"w": t} for t in tensors], base={"w": base}, method="pcb")
    assert counts["pcb_into"] == 1
    assert same_bits(merged["w"], reference(base, tensors, 0.1, 1.0, torch.float32))


# --- torch's own exp and tanh ---------------------------------------------------------------------


@pytest.fixture
def reconfigured():
    """A monkeypatch for tests that configure the loop with other functions: undone, and the
    loop configured properly again, after each."""
    fastpcb._configured.cache_clear()
    with pytest.MonkeyPatch.context() as patch:
        yield patch
    fastpcb._configured.cache_clear()
    assert fastpcb.available()


def test_functions_that_are_not_torchs_are_refused(reconfigured):
    """The probe: ``vmdTanh`` given as ``exp`` (or anything not bit-equal to torch's) turns the
    loop off, and PCB runs as the reference."""
    _, tanh, threads = fastpcb._vml_functions()
    reconfigured.setattr(fastpcb, "_vml_functions", lambda: (tanh, tanh, threads))
    assert not fastpcb.available()
    base, tensors = models(300, 2, seed=1)
    assert not fastpcb.pcb_into(torch.empty(300), tensors, [1.0, 1.0], base, ratio=0.1, scale=1.0)


def test_no_mkl_functions_no_loop(reconfigured):
    reconfigured.setattr(fastpcb, "_vml_functions", lambda: None)
    assert not fastpcb.available()


def test_the_probe_holds_the_awkward_arguments():
    probe = fastpcb._probe()
    n = probe.numel() // 2
    exps, tanhs = probe[:n], probe[n:]
    assert float(exps.max()) == 64.0 and float(exps.min()) == 0.0
    assert bool((exps[1:2].signbit()).all()) and 5e-324 in tanhs.tolist()
    assert bool((tanhs.abs() > 19).any()) and bool((tanhs.abs() < 1e-10).any())


def test_mkl_runs_each_pass_on_its_own_thread_and_restores_the_setting():
    """VML threads a call from outside OpenMP: each pass sets MKL's thread-local count to 1 and
    restores it, so two passes at once do not oversubscribe the cores."""
    library = ctypes.CDLL(str(next(iter(_torch_cpu()))))
    getter = library.mkl_get_max_threads
    before = getter()
    assert fastpcb._vml_functions()[2] != 0
    base, tensors = models(20_000, 2, seed=1)
    compiled(base, tensors, 0.1, 1.0, torch.float32)
    assert getter() == before


def _torch_cpu():
    from pathlib import Path

    folder = Path(torch.__file__).parent / "lib"
    return [p for p in folder.iterdir() if p.name.startswith(("libtorch_cpu.", "torch_cpu."))]


# --- the compiled entries' own refusals -----------------------------------------------------------


def test_the_entries_refuse_bad_arguments():
    from terge.kernels import _fastpcb

    with pytest.raises(ValueError, match="null function address"):
        _fastpcb.configure(0, 1, 0, 0)
    base, tensors = models(64, 2, seed=1)
    spec = ([t.data_ptr() for t in tensors], [1, 1], [0.0, 0.0], [1.0, 1.0])
    keys = torch.empty(2, 64, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^sample: 1 <= runs <= total / 16$"):
        _fastpcb.sample(base.data_ptr(), 1, 64, *spec, 5, keys.data_ptr())
    with pytest.raises(ValueError, match=r"^sample: 1 <= runs <= total / 16$"):
        _fastpcb.sample(base.data_ptr(), 1, 64, *spec, 0, keys.data_ptr())
    refused = r"^scan: m >= 0 and 0 <= cap <= stride$"
    with pytest.raises(ValueError, match=refused):
        _fastpcb.scan(base.data_ptr(), 1, -1, *spec, [0, 0], [1, 1], 4, keys.data_ptr(), 64)
    with pytest.raises(ValueError, match=refused):
        _fastpcb.scan(base.data_ptr(), 1, 4, *spec, [0, 0], [1, 1], -4, keys.data_ptr(), 64)
    with pytest.raises(ValueError, match=refused):  # model 1's slots would overlap model 0's
        _fastpcb.scan(base.data_ptr(), 1, 4, *spec, [0, 0], [1, 1], 65, keys.data_ptr(), 64)
    with pytest.raises(ValueError, match=r"^merge: m >= 0$"):
        _fastpcb.merge(base.data_ptr(), 1, base.data_ptr(), 1, -1, *spec, [0.0] * 2, [1.0] * 2, 1.0)
    with pytest.raises(ValueError, match=r"^unknown dtype code 4$"):
        _fastpcb.merge(base.data_ptr(), 4, base.data_ptr(), 1, 4, *spec, [0.0] * 2, [1.0] * 2, 1.0)
    with pytest.raises(ValueError, match=r"^codes: expected 2 values$"):
        _fastpcb.scan(base.data_ptr(), 1, 4, spec[0], [1], *spec[2:], [0, 0], [1, 1], 4, 0, 4)
    with pytest.raises(ValueError, match=r"^models: between 1 and 64 values$"):
        _fastpcb.scan(base.data_ptr(), 1, 4, [], [], [], [], [], [], 4, 0, 4)
    with pytest.raises(ValueError, match=r"^floors: expected 2 values$"):
        _fastpcb.merge(base.data_ptr(), 1, base.data_ptr(), 1, 4, *spec, [0.0], [1.0] * 2, 1.0)
    with pytest.raises(ValueError, match=r"^balance: 0 <= n < 2\*\*31$"):
        _fastpcb.balance(keys.data_ptr(), -1, keys.data_ptr())


# --- the screen -----------------------------------------------------------------------------------


def _exact_and_bound(z: list[float], v: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    from terge.kernels import _fastpcb

    values = torch.tensor(z + v, dtype=torch.float64)
    exact, bound = (
        torch.empty(len(z), dtype=torch.float64),
        torch.empty(len(z), dtype=torch.float64),
    )
    _fastpcb.balance(values.data_ptr(), len(z), exact.data_ptr())
    _fastpcb.bounds(values.data_ptr(), len(z), bound.data_ptr())
    return exact, bound


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(
            st.one_of(
                st.floats(0.0, 0.5),
                st.floats(0.0, 1e-6),
                st.sampled_from([0.0, 5e-324, 2.0**-52, 0.5]),
            ),
            st.one_of(
                st.floats(1e-300, 1e3),
                st.floats(1e-12, 1e-4),
                st.sampled_from([5e-324, 1e-308, 2.0**-1022, 1.0, 0.999999999, 19.06, 1e300]),
            ),
        ),
        min_size=1,
        max_size=64,
    )
)
def test_the_screens_bound_is_never_below_the_exact_balance(pairs):
    """What makes skipping a screened balance exact: for ``0 <= z <= 1/2`` and ``v > 0``, the
    bound the screen computes is at least the balance the loop would compute, whatever the
    roundings (tiny ``z`` and ``v``, where the bound is tightest, included)."""
    z, v = (list(column) for column in zip(*pairs, strict=True))
    exact, bound = _exact_and_bound(z, v)
    assert bool((bound >= exact).all()), [
        (a, b) for a, b, ok in zip(z, v, bound >= exact) if not ok
    ]


def test_the_bound_holds_where_its_own_roundings_are_as_large_as_its_margin():
    """For z near 1e-8 the bound's 1 + z + z^2 exceeds e^z by less than one rounding of 1 + z:
    without its SLACK, about one in a hundred such bounds came out below the balance (tanh(v)
    is v for these v)."""
    generator = torch.Generator().manual_seed(0)
    z = (torch.rand(200_000, generator=generator, dtype=torch.float64) * 1e-7).tolist()
    for v in (1e-9, 7.77e-12, 1e-300):
        exact, bound = _exact_and_bound(z, [v] * len(z))
        assert bool((bound >= exact).all()), v


def test_the_bound_is_tight_where_balances_are_small():
    """And close (within 1e-5) for the small arguments fine-tuning gives: the screen keeps few."""
    z = [1e-6 * k for k in range(1, 200)]
    v = [1e-5 * k for k in range(1, 200)]
    exact, bound = _exact_and_bound(z, v)
    assert bool(((bound - exact) / exact < 1e-5).all())


def test_the_screen_keeps_few_balances_yet_merges_the_same_bits(monkeypatch):
    """The scan computes exact balances for little more than the top tenth (the others are
    screened out below its bracket), with the same result as the reference."""
    from terge.kernels import _fastpcb

    counted = []
    real = _fastpcb.scan

    def scan(*args):
        result = real(*args)
        counted.append((args[2], result))
        return result

    monkeypatch.setattr(
        fastpcb,
        "_fastpcb",
        type(
            "Proxy",
            (),
            {"__getattr__": lambda _, n: getattr(_fastpcb, n), "scan": staticmethod(scan)},
        )(),
    )
    base, tensors = models(100_000, 2, seed=12)
    got = compiled(base, tensors, 0.1, 1.0, torch.float32)
    assert same_bits(got, reference(base, tensors, 0.1, 1.0, torch.float32))
    entries = sum(m for m, _ in counted)
    for model in range(2):
        computed = sum(result[model][5] for _, result in counted)
        assert 0.1 * entries < computed < 0.15 * entries


def test_small_tensors_and_zero_floors_compute_every_balance():
    """No screen without a positive threshold: a small tensor's bracket is everything, and a
    floor of zero (mostly unchanged task vectors) bounds nothing."""
    from terge.kernels import _fastpcb

    base, tensors = models(1_000, 2, seed=3)
    spec = ([t.data_ptr() for t in tensors], [1, 1], [0.0, 0.0], [0.05, 0.05])
    buffer = torch.empty(2, 1_000, dtype=torch.int64)
    counts = _fastpcb.scan(
        base.data_ptr(),
        1,
        1_000,
        *spec,
        [0, 0],
        [fastpcb._MASK] * 2,
        1_000,
        buffer.data_ptr(),
        1_000,
    )
    assert [c[5] for c in counts] == [1_000, 1_000] and [c[2] for c in counts] == [1_000, 1_000]
    zero = fastpcb._TOP  # +0's key
    counts = _fastpcb.scan(
        base.data_ptr(),
        1,
        1_000,
        *spec,
        [zero] * 2,
        [fastpcb._MASK] * 2,
        1_000,
        buffer.data_ptr(),
        1_000,
    )
    assert [c[5] for c in counts] == [1_000, 1_000]


def _int64(key: int) -> int:
    """A uint64 key as the int64 of the same bits (how the buffers hold them)."""
    return key - (1 << 64) if key >= 1 << 63 else key


@pytest.mark.parametrize("split", [False, True])
def test_the_floor_key_at_every_edge_of_its_bracket(split):
    """The rank placed among one model's counts: below the bracket (a miss), at its low end,
    each key collected inside it in order (over one range's buffer or two), at its high end,
    past it (a miss)."""
    top = fastpcb._TOP
    lo, hi, keys = top + 10, top + 100, [top + 50, top + 20, top + 70]
    if split:  # two ranges: 10 below, 2 at lo, 3 inside, 4 at hi in all
        counts = [(6, 1, 2, 3, hi, 12), (4, 1, 1, 1, hi, 7)]
        collected = torch.tensor([[_int64(k) for k in keys[:2]] + [0], [_int64(keys[2]), 0, 0]])
        caps = [3, 3]
    else:
        counts = [(10, 2, 3, 4, hi, 19)]
        collected = torch.tensor([[_int64(k) for k in keys] + [0] * 5])
        caps = [8]
    expected = {9: None, 10: lo, 11: lo, 12: top + 20, 13: top + 50, 14: top + 70}
    expected |= {15: hi, 16: hi, 17: hi, 18: hi, 19: None}
    for rank, key in expected.items():
        got = fastpcb._floor_key(lo, hi, rank, counts, collected.clone(), caps)
        assert got == key, rank


def test_the_floor_key_refuses_an_overflowed_range():
    top = fastpcb._TOP
    counts = [(10, 2, 4, 4, top + 100, 20)]  # four inside, room for three: some were not kept
    collected = torch.tensor([[_int64(top + 20), _int64(top + 50), _int64(top + 70)]])
    assert fastpcb._floor_key(top + 10, top + 100, 13, counts, collected, [3]) is None
    assert fastpcb._floor_key(top + 10, top + 100, 11, counts, collected, [3]) == top + 10
