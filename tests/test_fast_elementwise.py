"""The compiled element-wise methods (MagMax, TALL-mask consensus, NearSwap, SCE:
``terge.kernels.fastelementwise``) against their references in ``terge.families.elementwise``,
bit for bit, and SCE's exact sums of squares against ``math.fsum``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import terge
from terge import kernels, methods
from terge.errors import MethodNotApplicableError
from terge.families import elementwise
from terge.kernels import cpu, fastelementwise, fastmethods
from terge.kernels.primitives import (
    EXPONENTS,
    HALF,
    exact_total,
    exact_totals,
    magnitude_bits,
    square_sums,
)

from helpers import near_base, same_bits

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
NAMES = ["magmax", "consensus", "nearswap", "sce"]
BOUNDARIES = [127, 128, 129, 1023, 1024, 1025, 2047, 2048, 2049]
"""Lengths around the loops' blocks (128 elements for the selection, 1024 for the merge)."""

needs_loops = pytest.mark.skipif(
    fastmethods._fastmethods is None,
    reason="terge.kernels._fastmethods is not built (pip install -e .)",
)


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    """Both paths in every run: the compiled one here, the reference called directly."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")


def method_of(name: str, scale: float, k: int, mask_lambda: float, t: float, topk: float):
    if name == "magmax":
        return methods.magmax(scale=scale)
    if name == "consensus":
        return methods.consensus(k=k, mask_lambda=mask_lambda, scale=scale)
    if name == "nearswap":
        return methods.nearswap(t=t)
    return methods.sce(select_topk=topk, scale=scale)


def reference(method, destination_dtype, base, tensors, weights):
    """What execute.run_step computes without the compiled loops."""
    result = method([t.double() for t in tensors], weights, base.double())
    out = torch.empty(base.shape, dtype=destination_dtype)
    kernels.store_whole(out, result, kernels.ChunkBuffers(torch.float64))
    return out


def fast(method, destination_dtype, base, tensors, weights, inplace):
    if inplace:
        destination = base = base.clone()
    else:
        destination = torch.empty(base.shape, dtype=destination_dtype)
    assert method.merge_into(destination, tensors, weights, base)
    return destination


def check(name, numel, dtypes, out_dtype, seed, kind, scale, k, mask_lambda, t, topk, inplace):
    method = method_of(name, scale, k, mask_lambda, t, topk)
    if name == "nearswap":
        dtypes = dtypes[:2]
    base, *tensors = near_base(numel, dtypes, seed, kind)
    if inplace:
        out_dtype = base.dtype
    weights = [0.5, 1.25, -0.3, 1 / 3, 2.0][: len(tensors)]
    expected = reference(method, out_dtype, base, tensors, weights)
    got = fast(method, out_dtype, base, tensors, weights, inplace)
    assert same_bits(got, expected)


SETTINGS = {
    "scale": st.sampled_from([1.0, 0.5, -1.0, 0.3, 2.0]),
    "k": st.integers(0, 7),
    "mask_lambda": st.sampled_from([0.0, 0.2, 0.6, 1.0, 3.7]),
    "t": st.sampled_from([1e-3, 0.1, 0.25, 1.0, 1e-300, 1e300]),
    "topk": st.sampled_from([1.0, 0.999, 0.5, 0.3, 0.01, 1e-9]),
}


@needs_loops
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    numel=st.one_of(st.integers(1, 70), st.integers(100, 3000), st.sampled_from(BOUNDARIES)),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=2, max_size=6),
    out_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 3),
    inplace=st.booleans(),
    **SETTINGS,
)
def test_equals_the_reference_bit_for_bit(
    name, numel, dtypes, out_dtype, seed, kind, inplace, scale, k, mask_lambda, t, topk
):
    """Every dtype in and out, 1 to 5 models, NaN, inf, -0, subnormals, ties, odd lengths."""
    check(name, numel, dtypes, out_dtype, seed, kind, scale, k, mask_lambda, t, topk, inplace)


@needs_loops
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    models=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    **SETTINGS,
)
def test_split_between_threads_and_sampled(
    name, models, dtype, seed, kind, scale, k, mask_lambda, t, topk
):
    """Ranges split between threads (and SCE's threshold bracketed by samples): the same bits."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "PER_THREAD", 1000)
        patch.setattr(fastmethods, "_SAMPLED", 1000)
        patch.setattr(torch, "get_num_threads", lambda: 3)
        dtypes = [dtype] * (models + 1)
        check(name, 4 * 1024 + 77, dtypes, dtype, seed, kind, scale, k, mask_lambda, t, topk, True)


@needs_loops
@pytest.mark.parametrize("topk", [0.5, 0.05])
def test_sce_selection_over_many_threads_equals_one(topk, monkeypatch):
    """The variance's k-th largest found by sampled brackets over three threads is the one a
    single whole-tensor selection finds: the same bits."""
    base, *tensors = near_base(300_000, [torch.float32] * 4, 11, 1)
    method = methods.sce(select_topk=topk)
    one = fast(method, torch.float32, base, tensors, [1.0] * 3, False)
    monkeypatch.setattr(cpu, "PER_THREAD", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    many = fast(method, torch.float32, base, tensors, [1.0] * 3, False)
    assert same_bits(one, many)
    assert same_bits(many, reference(method, torch.float32, base, tensors, [1.0] * 3))


@needs_loops
def test_sce_that_selects_nothing_returns_the_base():
    """k = int(select_topk * nonzero) = 0: the base itself, -0 and subnormals included."""
    base = torch.tensor([1.0, 1e-40, 7.0, -0.0, 3.0])
    tensors = [base + torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]), base.clone()]
    method = methods.sce(select_topk=0.5)  # one entry varies: int(0.5 * 1) = 0
    got = fast(method, torch.bfloat16, base, tensors, [1.0, 1.0], False)
    assert same_bits(got, base.to(torch.bfloat16))
    assert same_bits(got, reference(method, torch.bfloat16, base, tensors, [1.0, 1.0]))


@needs_loops
def test_sce_weights_overflowing_to_infinity_give_the_reference_nans():
    """Sums of squares that overflow make a coefficient inf: 0 * inf is NaN where a model
    disagrees, as the reference computes it literally."""
    base = torch.zeros(4, dtype=torch.float64)
    tensors = [
        torch.tensor([1e200, -1e200, 1.0, 0.0], dtype=torch.float64),
        torch.tensor([1.0, 2.0, -3.0, 0.0], dtype=torch.float64),
    ]
    method = methods.sce()
    got = fast(method, torch.float64, base, tensors, [1.0, 1.0], False)
    assert same_bits(got, reference(method, torch.float64, base, tensors, [1.0, 1.0]))
    assert got.isnan().any()


# --- SCE's exact sums of squares ------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=0, max_size=60
    ),
    cut=st.integers(0, 60),
)
def test_square_sums_round_their_exact_total_once(values, cut):
    """The total is math.fsum's (correctly rounded) of the rounded squares, in any split."""
    tensor = torch.tensor(values, dtype=torch.float64)
    squares = [x * x for x in values]
    expected = math.fsum(squares) if all(math.isfinite(s) for s in squares) else math.inf
    whole = square_sums(tensor)
    parts = square_sums(tensor[:cut]) + square_sums(tensor[cut:])
    assert torch.equal(whole, parts)
    assert exact_total(whole) == expected or (
        math.isinf(expected) and exact_total(whole) == math.inf
    )


@given(
    models=st.lists(
        st.lists(
            st.floats(width=64) | st.sampled_from([0.0, 1e200, 5e-324, float("nan")]),
            min_size=0,
            max_size=20,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_exact_totals_of_a_stack_are_each_models_own(models):
    """A stack of sums (one row per model, read in one go) gives each model the total it gives
    alone: NaN where a square is NaN, else infinity where one is infinite or the sum
    overflows, else math.fsum's correctly rounded sum of the rounded squares."""
    stack = torch.stack([square_sums(torch.tensor(v, dtype=torch.float64)) for v in models])
    for got, values in zip(exact_totals(stack), models, strict=True):
        squares = [x * x for x in values]
        if any(math.isnan(x) for x in squares):
            assert math.isnan(got)
            continue
        expected = math.fsum(squares) if all(math.isfinite(x) for x in squares) else math.inf
        assert got == expected or (math.isinf(expected) and got == math.inf), (got, expected)


def _rounded_in_c(tables: torch.Tensor, least: int, most: int):
    parts, models = tables.shape[:2]
    return fastmethods._fastmethods.round_sums(tables.data_ptr(), parts, models, least, most)


def _same_floats(got, expected) -> bool:
    return all(
        (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
        for a, b in zip(got, expected, strict=True)
    )


@needs_loops
@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.lists(
        st.tuples(
            st.integers(0, EXPONENTS - 2),
            st.integers(-(2**40), 2**59),  # twelve of them sum within int64, as the reference
            st.integers(-(2**40), 2**40),  # sums the parts in torch (it wrapped at 2 x 2**62)
        ),
        min_size=0,
        max_size=12,
    ),
    st.integers(0, 7),
)
def test_the_compiled_rounding_of_sums_equals_pythons_exact_one(parts, models, rows, specials):
    """round_sums (C: limbs, the smaller part taken from the larger, ties to even) gives what
    exact_totals (Python's integers) gives for any table: rows anywhere from the subnormals to
    past overflow, signed halves, spread over the threads' parts; NaN and infinity counts."""
    tables = torch.zeros(parts, models, EXPONENTS, 2, dtype=torch.int64)
    for index, (exponent, high, low) in enumerate(rows):
        tables[index % parts, index % models, exponent] += torch.tensor([high, low])
    if specials & 1:
        tables[0, 0, EXPONENTS - 1, 1] = 1  # an infinity
    if specials & 2:
        tables[parts - 1, models - 1, EXPONENTS - 1, 0] = 2  # NaNs
    used = [exponent for exponent, *_ in rows] or [EXPONENTS - 1]
    least, most = min(used), max(used) if rows else -1
    expected = exact_totals(tables.sum(0))
    got = _rounded_in_c(tables, least, most)
    if got is None:  # only where a total is negative: not a sum of squares
        exact = [
            sum(((int(h) << HALF) + int(lo)) << max(e - 1, 0) for e, (h, lo) in enumerate(rows))
            for rows in tables.sum(0)[:, : EXPONENTS - 1].tolist()
        ]
        assert any(total < 0 for total in exact)
        return
    assert _same_floats(got, expected), (got, expected)


@needs_loops
def test_the_threads_parts_are_summed_past_int64():
    """Two parts of 2**62 each: their sum, 2**63, does not wrap (twice the one part's total)."""
    tables = torch.zeros(2, 1, EXPONENTS, 2, dtype=torch.int64)
    tables[:, 0, 0, 0] = 2**62
    (one,) = _rounded_in_c(tables[:1].clone(), 0, 0)
    (two,) = _rounded_in_c(tables, 0, 0)
    assert one > 0
    assert two == 2 * one


@needs_loops
@pytest.mark.parametrize(
    ("value", "exponent"),
    [
        (0, 1),
        (1, 1),  # the least subnormal
        (2**52 + 1, 1),  # a subnormal's 53 bits, exact
        (2**53 - 1, 1),
        (2**53 + 1, 1),  # 54 bits, exactly half way: to even (down)
        (2**54 + 2, 1),  # half way, even below: down
        (2**54 + 6, 1),  # half way, odd below: up
        (2**54 + 7, 1),  # above half way: up
        (2**54 + 5, 1),  # below half way: down
        (2**54 + 6, 1000),  # half way, shifted across limbs
        (2**88 + 2**35 + 1, 700),  # far past 53 bits: the sticky bits in lower limbs
        (2**53 - 1, 2046),  # the greatest float64
        (2**54 - 1, 2045),  # half way between it and 2**1024: to even, so overflows
        (2**54 - 1, 2046),  # overflows
    ],
)
def test_the_compiled_rounding_is_correct_at_half_way_cases(value, exponent):
    """A total written in one row (row e holds (high 2**26 + low) 2**(e - 1) units of
    2**-1074), so that the exact value is known: rounded ties to even, past the greatest
    float64 to infinity, as Python's integer division rounds it."""
    tables = torch.zeros(1, 1, EXPONENTS, 2, dtype=torch.int64)
    tables[0, 0, exponent] = torch.tensor([value >> HALF, value & ((1 << HALF) - 1)])
    try:
        expected = (value << (exponent - 1)) / (1 << 1074)
    except OverflowError:
        expected = math.inf
    (got,) = _rounded_in_c(tables, exponent, exponent)
    assert got == expected and expected == exact_totals(tables.sum(0))[0]


@needs_loops
def test_the_compiled_rounding_borrows_through_equal_limbs():
    """(2**128 + 2**64) - (2**64 + 1): the negative part's middle limb equals the positive
    part's, so the borrow from the lowest must pass through it (2**128 - 1, rounded: 2**128)."""
    tables = torch.zeros(1, 1, EXPONENTS, 2, dtype=torch.int64)
    tables[0, 0, 65] = torch.tensor([2**38, 1])  # (2**64 + 1) 2**64
    tables[0, 0, 1] = torch.tensor([-(2**38), -1])  # -(2**64 + 1)
    assert _rounded_in_c(tables, 1, 65) == [2.0 ** (128 - 1074)] == exact_totals(tables.sum(0))


@needs_loops
def test_the_compiled_rounding_refuses_rows_outside_the_table():
    tables = torch.zeros(1, 1, EXPONENTS, 2, dtype=torch.int64)
    for least, most in [(-1, 3), (0, EXPONENTS - 1)]:
        with pytest.raises(ValueError, match=r"rows within 0\.\.2046"):
            _rounded_in_c(tables, least, most)
    with pytest.raises(ValueError, match="expected at least one of each"):
        fastmethods._fastmethods.round_sums(tables.data_ptr(), 0, 1, 0, 3)


def test_square_sums_count_nans_and_infinities():
    sums = square_sums(torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0]))
    assert sums.shape == (EXPONENTS, 2)
    assert sums[EXPONENTS - 1].tolist() == [1, 2]
    assert math.isnan(exact_total(sums))
    assert exact_total(square_sums(torch.tensor([float("inf"), 1.0]))) == math.inf
    assert exact_total(square_sums(torch.tensor([1e200, 1e200], dtype=torch.float64))) == math.inf
    subnormal = torch.tensor([5e-324, 1e-160], dtype=torch.float64)
    assert exact_total(square_sums(subnormal)) == math.fsum([5e-324 * 5e-324, 1e-160 * 1e-160])
    assert exact_total(square_sums(torch.tensor([1.0, 1e-30, -1.0]))) == math.fsum(
        [1.0, 1e-30 * 1e-30, 1.0]
    )


def exact_integer(sums: torch.Tensor) -> int:
    """The exact total the integer sums hold, in units of 2**-1074 (the rows may split it
    differently: the compiled loop adds whole blocks' exact partial sums, signed)."""
    total = 0
    for exponent, (high, low) in enumerate(sums[: EXPONENTS - 1].tolist()):
        total += ((high << HALF) + low) << max(exponent - 1, 0)
    return total


def fsum_of_squares(values: torch.Tensor) -> float:
    squares = [x * x for x in values.double().tolist()]
    if any(math.isnan(s) for s in squares):
        return math.nan
    if any(math.isinf(s) for s in squares):
        return math.inf
    try:
        return math.fsum(squares)
    except OverflowError:
        return math.inf


def assert_square_sums_match(base, tensors, threshold=None, keep=None):
    tables, (least, most) = fastelementwise._square_tables(base, tensors, threshold)
    got = tables.sum(0)
    totals = fastelementwise._square_totals(base, tensors, threshold)  # rounded in C
    outside = torch.ones(EXPONENTS - 1, dtype=torch.bool)
    outside[least : most + 1] = False
    assert not got[:, : EXPONENTS - 1][:, outside].any()  # the rows said to be used hold all
    if least <= most:  # and the least and greatest of them are used
        assert got[:, least].any() and got[:, most].any()
    for sums, total, tensor in zip(got, totals, tensors, strict=True):
        delta = tensor.double() - base.double()
        if keep is not None:
            delta = delta.masked_fill(~keep, 0)
        expected = square_sums(delta)
        assert torch.equal(sums[EXPONENTS - 1], expected[EXPONENTS - 1])  # NaNs, infinities
        assert exact_integer(sums) == exact_integer(expected)
        assert same_bits(torch.tensor(exact_total(sums)), torch.tensor(exact_total(expected)))
        assert same_bits(torch.tensor(exact_total(sums)), torch.tensor(fsum_of_squares(delta)))
        assert same_bits(torch.tensor(total), torch.tensor(exact_total(expected)))


@needs_loops
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_compiled_square_sums_equal_the_reference(dtype):
    """The same exact total (its split into rows may differ), so the same rounded sum."""
    base, *tensors = near_base(5000, [dtype] * 3, 4, 1)
    assert_square_sums_match(base, tensors)


def spread_block(numel: int, binades: int, seed: int) -> torch.Tensor:
    """Task vectors whose squares span about ``binades`` binades within each block: the loop's
    error-free extraction takes more levels the wider they span, and gives up past its
    limit."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(numel, generator=generator, dtype=torch.float64) + 0.5
    shifts = torch.randint(0, max(binades // 2, 1), (numel,), generator=generator)
    signs = torch.where(torch.rand(numel, generator=generator) < 0.5, -1.0, 1.0)
    return values * torch.exp2(-shifts.double()) * signs


@needs_loops
@pytest.mark.parametrize("binades", [0, 2, 30, 60, 90, 140, 250, 400, 900, 2000])
@pytest.mark.parametrize("numel", [1, 31, 33, 1023, 1024, 1025, 3000])
def test_the_square_sums_are_exact_at_every_spread(binades, numel):
    """One level, several, and past the lowest sigma (the residuals added one by one); blocks
    ending anywhere in the 32 partial sums."""
    base = torch.zeros(numel, dtype=torch.float64)
    tensors = [spread_block(numel, binades, seed) for seed in range(3)]
    assert_square_sums_match(base, tensors)


@needs_loops
def test_the_square_sums_are_exact_at_each_spread_of_one_block():
    """Each 1024-entry block: one square near 1 and the rest about 2^-s below it with full
    significands, for every s from 0 to 260 — so the extraction ends at every level count, on
    each side of the spread where one level fewer would leave a last bit behind."""
    generator = torch.Generator().manual_seed(7)
    blocks = []
    for spread in range(261):
        block = (1 + torch.rand(1024, generator=generator, dtype=torch.float64)) * 2.0 ** (
            -spread / 2
        )
        block[0] = 1.2345678901234567
        blocks.append(block)
    values = torch.cat(blocks)
    assert_square_sums_match(torch.zeros_like(values), [values, values.neg(), values * 1.5])


@needs_loops
@pytest.mark.parametrize(
    "values",
    [
        [1e154, 1e154, 3.0],  # squares near overflow: the plain path
        [1e300, 1.0],  # a square overflows: infinity
        [float("nan"), 1.0, 2.0],
        [float("inf"), -float("inf"), 1.0],
        [5e-324, 1e-200, 1e-160],  # subnormal squares (and squares that are 0)
        [1e-150, 1.0000000000000002e-150, 3e-160],  # squares just above the subnormals
        [0.0, -0.0, 0.0],
        [1.0, 1e-30, -1.0],
        [2.0**-537, 2.0**-500, 2.0**-480],  # the lowest level's sigma near 2^-1000
    ],
)
def test_the_square_sums_handle_every_kind_of_value(values):
    repeated = torch.tensor(values * 700, dtype=torch.float64)
    base = torch.zeros_like(repeated)
    assert_square_sums_match(base, [repeated, repeated.flip(0), repeated * 0.5])


@needs_loops
@settings(max_examples=60, deadline=None)
@given(
    exponents=st.lists(st.integers(-540, 500), min_size=1, max_size=40),
    numel=st.integers(1, 2100),
    seed=st.integers(0, 2**20),
)
def test_the_square_sums_are_exact_for_any_mix_of_magnitudes(exponents, numel, seed):
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(exponents), (numel,), generator=generator)
    scale = torch.exp2(torch.tensor(exponents, dtype=torch.float64)[picks])
    values = (torch.rand(numel, generator=generator, dtype=torch.float64) - 0.5) * scale
    base = torch.zeros_like(values)
    assert_square_sums_match(base, [values, values.roll(1), values * 3])


@needs_loops
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_selected_square_sums_equal_the_reference(dtype):
    """With SCE's selection: the entries whose variance is below the threshold add 0."""
    base, *tensors = near_base(5000, [dtype] * 4, 6, 1)
    deltas = [t.double() - base.double() for t in tensors]
    variance = torch.zeros_like(deltas[0])
    for i in range(3):
        for j in range(i + 1, 3):
            variance.add_((deltas[i] - deltas[j]).square_())
    k = int(0.3 * int(torch.count_nonzero(variance)))
    threshold = fastmethods.variance_kth_largest(base, tensors, k, None)
    keep = magnitude_bits(variance) >= threshold
    assert 0 < int(keep.sum()) < keep.numel()
    assert_square_sums_match(base, tensors, threshold, keep)


# --- through terge.merge --------------------------------------------------------------------------


def models_near(count: int, seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    models = [
        torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.LayerNorm(48)) for _ in range(count)
    ]
    for model in models[1:]:
        with torch.no_grad():
            for p, q in zip(model.parameters(), models[0].parameters(), strict=True):
                p.copy_(q + 0.01 * torch.randn_like(q))
    return models


def settings_of(name: str) -> dict:
    return {"sce": {"select_topk": 0.4}, "consensus": {"k": 1}}.get(name, {})


@needs_loops
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_merge_equals_the_reference_end_to_end(name, inplace, monkeypatch):
    """Whole models, in place and not, both ways: the same state dicts bit for bit (the
    parameters require grad)."""
    models = models_near(2 if name == "nearswap" else 4, 3)
    assert all(p.requires_grad for p in models[0].parameters())
    method = getattr(methods, name)(**settings_of(name))
    results = {}
    for kernels_ in ["torch", "auto"]:
        monkeypatch.setenv("TERGE_KERNELS", kernels_)
        copies = [copy.deepcopy(m) for m in models]
        merged = terge.merge(copies, method=method, weights=None, inplace=inplace)
        results[kernels_] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    for key, value in results["torch"].items():
        assert same_bits(results["auto"][key], value), key


@needs_loops
@pytest.mark.parametrize("name", NAMES)
def test_merge_takes_the_compiled_path(name, monkeypatch):
    """merge() never runs the reference for whole CPU tensors with float64 accumulation; with
    float32 accumulation (no compiled path) it does."""

    def refuse(*_, **__):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(elementwise, f"{name}_merge", refuse)
    models = models_near(2 if name == "nearswap" else 3, 0)
    terge.merge(models, method=name)
    with pytest.raises(Exception, match="the reference ran"):
        terge.merge(models, method=name, dtype=torch.float32)


@needs_loops
@pytest.mark.parametrize("name", NAMES)
def test_terge_kernels_torch_forces_the_reference(name, monkeypatch):
    monkeypatch.setenv("TERGE_KERNELS", "torch")
    monkeypatch.setattr(fastmethods._fastmethods, "elementwise", None)  # fails if called
    base, *tensors = near_base(100, [torch.float32] * 3, 0, 1)
    method = method_of(name, 1.0, 2, 0.6, 0.1, 0.5)
    assert not method.merge_into(
        torch.empty(100),
        tensors[:1] if name == "nearswap" else tensors,
        [1.0, 1.0][: 1 if name == "nearswap" else 2],
        base,
    )


@pytest.mark.parametrize("name", NAMES)
def test_falls_back_where_the_loops_do_not_apply(name):
    """Non-contiguous, empty, partly overlapping, baseless: declined, nothing written."""
    method = method_of(name, 1.0, 2, 0.6, 0.1, 0.5)
    count = 1 if name == "nearswap" else 2
    base = torch.randn(8, 8)
    tensors = [torch.randn(8, 8) for _ in range(count)]
    weights = [0.5] * count
    untouched = torch.full((8, 8), 7.0)
    assert not method.merge_into(untouched.t(), tensors, weights, base)
    assert torch.equal(untouched, torch.full((8, 8), 7.0))
    assert not method.merge_into(torch.empty(0), [torch.empty(0)] * count, weights, torch.empty(0))
    assert not method.merge_into(torch.empty(8, 8), tensors, weights, None)
    overlapping = torch.randn(65)
    tensors = [overlapping[:64]] * count
    assert not method.merge_into(overlapping[1:], tensors, weights, torch.randn(64))


def test_nearswap_of_two_models_is_left_to_the_reference_to_refuse():
    base = torch.randn(10)
    tensors = [torch.randn(10), torch.randn(10)]
    assert not methods.nearswap().merge_into(torch.empty(10), tensors, [1.0, 1.0], base)
    with pytest.raises(MethodNotApplicableError, match="exactly one model"):
        methods.nearswap()(tensors, [1.0, 1.0], base)
