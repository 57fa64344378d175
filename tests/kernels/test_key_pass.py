"""The thresholds' first pass in float32 keys (``_fastmethods.scan_keys``, ``kth_pairs``,
``key_bounds``): the same thresholds, so the same bits, as the float64 magnitudes give."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from terge import methods
from terge.kernels import fastmethods
from terge.kernels.fastmethods import _TOP

from helpers import count_calls, fast, near_base, reference, same_bits

KEY_NAN = 0x7F800001

needs_loops = pytest.mark.skipif(
    fastmethods._fastmethods is None,
    reason="terge.kernels._fastmethods is not built (pip install -e .)",
)
F64, F32, BF16, F16 = 0, 1, 2, 3


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    monkeypatch.setenv("TERGE_KERNELS", "auto")


def merge_both(name, base, tensors, weights=None, density=0.2):
    method = (
        methods.breadcrumbs(density=density, gamma=0.05)
        if name == "breadcrumbs"
        else methods.ties(density=density)
    )
    weights = weights or [1.0] * len(tensors)
    expected = reference(method, base.dtype, base, tensors, weights, None)
    got = fast(method, base.dtype, base, tensors, weights, None, False)
    return got, expected


def key_of_pair(x: torch.Tensor, b: torch.Tensor) -> list[int]:
    """What scan_keys compares: |fl32(x - b)|'s bits from the inputs widened to float32, every
    NaN as 0x7F800001."""
    difference = (x.float() - b.float()).abs()
    keys = difference.view(torch.int32).long().tolist()
    return [KEY_NAN if k > 0x7F800000 else k for k in keys]


def magnitude_of_pair(x: torch.Tensor, b: torch.Tensor) -> list[int]:
    """What the float64 loops compare: |x - b| in float64, its bits (every NaN as inf + 1)."""
    difference = (x.double() - b.double()).abs()
    bits = difference.view(torch.int64).tolist()
    return [min(u, 0x7FF0000000000001) for u in bits]


@needs_loops
@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.float32] * 3,
        [torch.bfloat16] * 3,
        [torch.float16] * 3,
        [torch.float32, torch.bfloat16, torch.float16],
        [torch.float16, torch.float32],
    ],
)
@pytest.mark.parametrize("name", ["ties", "breadcrumbs"])
def test_float32_bfloat16_and_float16_take_the_key_pass(dtypes, name, monkeypatch):
    monkeypatch.setattr(fastmethods, "_SAMPLED", 1000)
    calls = count_calls(monkeypatch, fastmethods._fastmethods, "scan_keys", "scan")
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(20_000, generator=generator)
    tensors = [(base + 0.1 * torch.randn(20_000, generator=generator)) for _ in dtypes[1:]]
    base = base.to(dtypes[0])
    tensors = [t.to(d) for t, d in zip(tensors, dtypes[1:], strict=True)]
    got, expected = merge_both(name, base, tensors)
    assert same_bits(got, expected)
    assert calls["scan_keys"] == 1
    assert calls["scan"] == 0  # every threshold found in the key pass's pairs


@needs_loops
@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_float64_input_keeps_the_float64_pass(position, monkeypatch):
    monkeypatch.setattr(fastmethods, "_SAMPLED", 1000)
    calls = count_calls(monkeypatch, fastmethods._fastmethods, "scan_keys", "scan")
    generator = torch.Generator().manual_seed(4)
    inputs = [torch.randn(20_000, generator=generator) for _ in range(3)]
    inputs[position] = inputs[position].double()
    got, expected = merge_both("breadcrumbs", inputs[0], inputs[1:])
    assert same_bits(got, expected)
    assert calls["scan_keys"] == 0
    assert calls["scan"] >= 1


@needs_loops
def test_without_the_key_loop_the_brackets_go_on_in_float64(monkeypatch):
    """Where scan_keys answers None (built without AVX-512, or a machine without it), the
    searches go on from their float64 brackets: the same thresholds."""
    monkeypatch.setattr(fastmethods, "_SAMPLED", 1000)
    compiled = fastmethods._fastmethods

    class NoKeys:
        def __getattr__(self, name):
            return getattr(compiled, name)

        @staticmethod
        def scan_keys(*args):
            return None

    monkeypatch.setattr(fastmethods, "_fastmethods", NoKeys())
    calls = count_calls(monkeypatch, fastmethods, "_pass")
    base, *tensors = near_base(20_000, [torch.float32] * 3, 5, 1)
    for name in ["ties", "breadcrumbs"]:
        got, expected = merge_both(name, base, tensors)
        assert same_bits(got, expected)
    assert calls["_pass"] >= 2


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("unchanged", "keyed"), [(0.9, False), (0.0, True)])
def test_many_ties_at_a_brackets_end_keep_the_float64_pass(dtype, unchanged, keyed, monkeypatch):
    """The zeros of a mostly unchanged task vector, tied at the low threshold's bracket, are
    counted by the float64 pass rather than collected by the key pass."""
    monkeypatch.setattr(fastmethods, "_SAMPLED", 1000)
    calls = count_calls(monkeypatch, fastmethods._fastmethods, "scan_keys")
    generator = torch.Generator().manual_seed(8)
    base = torch.randn(50_000, generator=generator)
    tensors = []
    for _ in range(2):
        changed = torch.rand(50_000, generator=generator) >= unchanged
        tensors.append((base + changed * torch.randn(50_000, generator=generator)).to(dtype))
    got, expected = merge_both("breadcrumbs", base.to(dtype), tensors)
    assert same_bits(got, expected)
    assert (calls["scan_keys"] == 1) == keyed


def never_ends(monkeypatch):
    """Brackets taken by the key pass even where the samples hold many ties at their ends."""
    original = fastmethods._bracket

    def bracket(base, tensors, searches, workspace):
        original(base, tensors, searches, workspace)
        for search in searches:
            search.few_tied = True

    monkeypatch.setattr(fastmethods, "_bracket", bracket)


AWKWARD = [
    0.0, -0.0, 1.0, -1.0, 1.0 + 2.0**-23, 2.0**-24, 3.0e38, -3.0e38, 3.4028234e38, 1e-45,
    -1e-45, 1.2e-38, 65504.0, -65504.0, 6e-8, float("inf"), float("-inf"), float("nan"), 0.1, 7.0,
]  # fmt: skip
"""Values whose float32 differences overflow (3e38 - -3e38), vanish into subnormals, are NaN or
infinite, or tie: keys and float64 magnitudes must still order them the same way."""


@needs_loops
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["ties", "breadcrumbs"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    models=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    share=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    density=st.sampled_from([0.01, 0.2, 0.5, 0.9]),
)
def test_awkward_values_give_the_references_bits(name, dtype, models, seed, share, density):
    """A share of the entries drawn from AWKWARD, the rest random near the base; brackets never
    count their ends apart, so the key pass takes them all (or misses and starts again)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fastmethods, "_SAMPLED", 500)
        never_ends(patch)
        generator = torch.Generator().manual_seed(seed)
        pool = torch.tensor(AWKWARD, dtype=torch.float32)
        inputs = []
        base = torch.randn(3000, generator=generator)
        for i in range(models + 1):
            values = base + (0.05 * torch.randn(3000, generator=generator) if i else 0.0)
            awkward = torch.rand(3000, generator=generator) < share
            drawn = pool[torch.randint(len(AWKWARD), (3000,), generator=generator)]
            inputs.append(torch.where(awkward, drawn, values).to(dtype))
        got, expected = merge_both(name, inputs[0], inputs[1:], density=density)
        assert same_bits(got, expected)


@needs_loops
@pytest.mark.parametrize("kind", ["high", "low", "full"])
def test_a_key_bracket_that_misses_starts_again_from_every_magnitude(kind, monkeypatch):
    """A miss (the k-th above or below the key bracket) or an overflowing collection starts the
    search again from a histogram of every magnitude: the same thresholds."""
    monkeypatch.setattr(fastmethods, "_SAMPLED", 1000)
    original = fastmethods._keyed

    def keyed(base, tensors, searches):
        if not original(base, tensors, searches):
            return False
        for search in searches:
            if kind == "high":
                search.keys = (0x7F800000, 0x80000000)  # infinities and NaNs only
            elif kind == "low":
                search.keys = (0, 1)  # the zeros only
            else:
                search.cap = 5  # far too few slots
        return True

    monkeypatch.setattr(fastmethods, "_keyed", keyed)
    calls = count_calls(monkeypatch, fastmethods._fastmethods, "scan_keys", "kth_pairs")
    binned = []
    original_binned = fastmethods._binned
    monkeypatch.setattr(
        fastmethods, "_binned", lambda *a: (binned.append(1), original_binned(*a))[1]
    )
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(20_000, generator=generator)
    tensors = [base + torch.randn(20_000, generator=generator) for _ in range(2)]
    for name in ["ties", "breadcrumbs"]:
        got, expected = merge_both(name, base, tensors)
        assert same_bits(got, expected)
    assert calls["scan_keys"] == 2
    assert calls["kth_pairs"] == 0  # no search found its k-th in the pairs
    assert binned  # every search started again from a histogram


@needs_loops
def test_a_kth_just_above_the_key_bracket_starts_again(monkeypatch):
    """Exactly `rank` keys at or above the bracket: the k-th is the least of them, not among the
    pairs collected, so the search starts again (the same thresholds)."""
    monkeypatch.setattr(fastmethods, "_SAMPLED", 1000)
    generator = torch.Generator().manual_seed(9)
    base = torch.randn(20_000, generator=generator)
    tensors = [base + torch.randn(20_000, generator=generator) for _ in range(2)]
    original = fastmethods._keyed

    def keyed(base_, tensors_, searches):
        if not original(base_, tensors_, searches):
            return False
        for search in searches:
            keys = sorted(key_of_pair(tensors_[search.model], base_), reverse=True)
            assert keys[search.rank - 1] > keys[search.rank]  # no tie at the k-th
            search.keys = (keys[search.rank + 50], keys[search.rank - 1])
        return True

    monkeypatch.setattr(fastmethods, "_keyed", keyed)
    calls = count_calls(monkeypatch, fastmethods._fastmethods, "kth_pairs")
    got, expected = merge_both("ties", base, tensors)
    assert same_bits(got, expected)
    assert calls["kth_pairs"] == 0


FLOAT32S = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@needs_loops
@settings(max_examples=500, deadline=None)
@given(
    x=FLOAT32S, b=FLOAT32S, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
)
def test_an_entrys_key_is_its_float64_magnitude_rounded_to_float32(x, b, dtype):
    """key_bounds(u, u + 1) is (K(u), K(u) + 1), and the key scan_keys computes for an entry
    whose float64 magnitude bits are u is K(u): rounding x - b to float32 once, or to float64
    then float32, gives the same float32 for inputs that float32 holds exactly."""
    xs = torch.tensor([x], dtype=torch.float32).to(dtype)
    bs = torch.tensor([b], dtype=torch.float32).to(dtype)
    (key,) = key_of_pair(xs, bs)
    (u,) = magnitude_of_pair(xs, bs)
    assert fastmethods._fastmethods.key_bounds(u, u + 1) == (key, key + 1)


@needs_loops
@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(FLOAT32S, FLOAT32S), min_size=2, max_size=40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
)
def test_keys_never_order_two_entries_against_their_magnitudes(pairs, dtype):
    """u_a < u_b implies key_a <= key_b: what lets the key pass count and collect by keys."""
    xs = torch.tensor([p[0] for p in pairs], dtype=torch.float32).to(dtype)
    bs = torch.tensor([p[1] for p in pairs], dtype=torch.float32).to(dtype)
    keys, magnitudes = key_of_pair(xs, bs), magnitude_of_pair(xs, bs)
    for key_a, u_a in zip(keys, magnitudes, strict=True):
        for key_b, u_b in zip(keys, magnitudes, strict=True):
            assert not (u_a < u_b and key_a > key_b)


@needs_loops
@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(st.tuples(FLOAT32S, FLOAT32S), min_size=1, max_size=300),
    parts=st.sampled_from([1, 2, 3, 300]),  # one segment a thread: 300 on a large machine
    k=st.integers(1, 300),
)
def test_kth_pairs_is_the_kth_largest_magnitude(pairs, parts, k):
    """kth_pairs against sorting the float64 magnitudes, with the pairs split into segments."""
    k = min(k, len(pairs))
    cap = len(pairs)
    slots = cap + 16  # uint64 slots a segment: cap + 16 floats of x, as many of b
    buffer = torch.zeros(parts * slots, dtype=torch.int64)
    floats = buffer.view(torch.float32)
    chunks = [pairs[i::parts] for i in range(parts)]
    for part, chunk in enumerate(chunks):
        start = part * 2 * slots
        floats[start : start + len(chunk)] = torch.tensor([p[0] for p in chunk])
        floats[start + slots : start + slots + len(chunk)] = torch.tensor([p[1] for p in chunk])
    segments = [(part * slots, len(chunk)) for part, chunk in enumerate(chunks)]
    scratch = torch.empty(len(pairs), dtype=torch.int64)
    got = fastmethods._fastmethods.kth_pairs(
        buffer.data_ptr(), segments, cap, k, scratch.data_ptr()
    )
    x = torch.tensor([p[0] for p in pairs])
    b = torch.tensor([p[1] for p in pairs])
    assert got == sorted(magnitude_of_pair(x, b), reverse=True)[k - 1]


def bits32(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


@needs_loops
def test_key_bounds_at_the_ends():
    key_bounds = fastmethods._fastmethods.key_bounds
    assert key_bounds(0, 1) == (0, 1)
    assert key_bounds(0, _TOP) == (0, KEY_NAN + 1)  # NaNs' magnitudes included
    inf = 0x7FF0000000000000
    assert key_bounds(inf, inf + 1) == (0x7F800000, 0x7F800001)
    assert key_bounds(inf + 1, inf + 2) == (KEY_NAN, KEY_NAN + 1)
    one = 0x3FF0000000000000
    assert key_bounds(one, one + 1) == (bits32(1.0), bits32(1.0) + 1)
    # float64 magnitudes past float32's largest round to its infinity, 2**128 - 2**103 up
    assert key_bounds(0x47EFFFFFF0000000, 0x47EFFFFFF0000001) == (0x7F800000, 0x7F800001)
    assert key_bounds(0x47EFFFFFEFFFFFFF, 0x47EFFFFFF0000000) == (0x7F7FFFFF, 0x7F800000)


@needs_loops
@pytest.mark.parametrize(
    ("lo", "hi"), [(5, 5), (6, 5), (0, _TOP + 1)], ids=["empty", "reversed", "past the top"]
)
def test_key_bounds_refuses_a_bad_range(lo, hi):
    with pytest.raises(ValueError, match=r"key_bounds needs lo < hi <= 2\*\*63"):
        fastmethods._fastmethods.key_bounds(lo, hi)


def scan_keys(base, models, queries):
    return fastmethods._fastmethods.scan_keys(
        base.data_ptr(),
        {torch.float64: F64, torch.float32: F32}[base.dtype],
        base.numel(),
        [m.data_ptr() for m in models],
        [{torch.float64: F64, torch.float32: F32}[m.dtype] for m in models],
        queries,
    )


@needs_loops
def test_scan_keys_counts_and_collects():
    """Counts against a plain count of the keys, and the pairs collected in order."""
    generator = torch.Generator().manual_seed(7)
    base = torch.randn(5000, generator=generator)  # 5000: a last vector of 8 lanes
    models = [base + torch.randn(5000, generator=generator) for _ in range(2)]
    models[0][::7] = float("nan")  # NaNs of several payloads, all one key above inf's
    models[0][3::7] = torch.tensor(-1, dtype=torch.int32).view(torch.float32)
    models[1][::5] = base[::5]  # zeros
    low, high = bits32(0.5), bits32(1.5)
    out = [torch.zeros(2 * (5000 + 16), dtype=torch.float32) for _ in range(4)]
    queries = [
        (0, low, high, out[0].data_ptr(), 5000),
        (0, high, KEY_NAN + 1, out[1].data_ptr(), 5000),
        (1, 0, low, out[2].data_ptr(), 5000),
        (1, low, high, out[3].data_ptr(), 5000),
    ]
    counts = scan_keys(base, models, queries)
    for (model, lo, hi, _, _), (above, inside), buffer in zip(queries, counts, out, strict=True):
        keys = torch.tensor(key_of_pair(models[model], base))
        chosen = (keys >= lo) & (keys < hi)
        assert above == int((keys >= hi).sum())
        assert inside == int(chosen.sum())
        assert inside > 0
        assert same_bits(buffer[:inside], models[model][chosen])
        assert same_bits(buffer[5016 : 5016 + inside], base[chosen])
    keys = torch.tensor(key_of_pair(models[0], base))
    assert int((keys == KEY_NAN).sum()) == len(range(0, 5000, 7)) + len(range(3, 5000, 7))
    assert counts[1][0] == 0  # every NaN, whatever its payload, at the one key above inf's


@needs_loops
def test_scan_keys_collects_no_further_than_its_cap():
    """Past the cap only the count goes on: the slots after cap + 16 are never written."""
    base = torch.zeros(4000)
    model = torch.ones(4000)
    buffer = torch.full((2 * (100 + 16) + 64,), 7.0)
    ((above, inside),) = scan_keys(base, [model], [(0, 0, 0x80000000, buffer.data_ptr(), 100)])
    assert (above, inside) == (0, 4000)
    assert (buffer[2 * 116 :] == 7.0).all()


@needs_loops
@pytest.mark.parametrize(
    ("queries", "message"),
    [
        ([(0, 0, 1, 0, 5)] * 3, "a key query out of range or out of order"),
        ([(1, 0, 1, 0, 5), (0, 0, 1, 0, 5)], "a key query out of range or out of order"),
        ([(2, 0, 1, 0, 5)], "a key query out of range or out of order"),
        ([(0, 2, 1, 0, 5)], "a key query out of range or out of order"),
        ([(0, 0, 1, 0, -1)], "a key query out of range or out of order"),
        ([], "between 1 and 128 queries"),
        ([(0, 0, 1)], "a key query"),
    ],
    ids=[
        "three for a model",
        "out of order",
        "no such model",
        "reversed",
        "negative cap",
        "none",
        "short",
    ],
)
def test_scan_keys_refuses_bad_queries(queries, message):
    base, models = torch.zeros(8), [torch.zeros(8), torch.zeros(8)]
    with pytest.raises((ValueError, TypeError), match=message):
        scan_keys(base, models, queries)


@needs_loops
def test_scan_keys_refuses_float64():
    base = torch.zeros(8)
    with pytest.raises(ValueError, match="scan_keys takes float32, bfloat16 and float16 inputs"):
        scan_keys(base, [torch.zeros(8, dtype=torch.float64)], [(0, 0, 1, 0, 5)])
    with pytest.raises(ValueError, match="scan_keys takes float32, bfloat16 and float16 inputs"):
        scan_keys(base.double(), [torch.zeros(8)], [(0, 0, 1, 0, 5)])


@needs_loops
@pytest.mark.parametrize(
    ("segments", "cap", "k", "message"),
    [
        ([(0, 3)], 3, 0, r"k = 0 is not between 1 and 3"),
        ([(0, 3)], 3, 4, r"k = 4 is not between 1 and 3"),
        ([(0, 4)], 3, 1, "a segment's count must be between 0 and cap"),
        ([(0, -1)], 3, 1, "a segment's count must be between 0 and cap"),
        ([(0, 1)], -1, 1, "kth_pairs: cap must be at least 0"),
    ],
)
def test_kth_pairs_refuses_bad_segments(segments, cap, k, message):
    buffer = torch.zeros(64, dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        fastmethods._fastmethods.kth_pairs(buffer.data_ptr(), segments, cap, k, buffer.data_ptr())
