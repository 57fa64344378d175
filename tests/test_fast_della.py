"""DELLA and DELLA-linear's compiled loop (``terge.kernels._fastrank``) against the plain-torch
reference (``families.elementwise.della_merge``), bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import terge
from terge import kernels, methods
from terge.families import elementwise
from terge.kernels import cpu, fastelementwise, fastmethods, fastrank
from terge.kernels.primitives import magnitude_bits
from terge.sharding import Layout

from helpers import same_bits

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [
    (),
    (1,),
    (2,),
    (3,),
    (1, 1),
    (5, 1),
    (4, 2),
    (3, 7),
    (2, 3, 5),
    (17,),
    (6, 129),
    (2, 1000),
]
SETTINGS = [(0.5, 0.1), (0.2, 0.1), (0.9, 0.1), (0.5, 0.0), (0.3, 0.29), (1.0, 0.0), (0.51, 0.49)]

needs_loop = pytest.mark.skipif(
    fastrank._fastrank is None, reason="terge.kernels._fastrank is not built (pip install -e .)"
)


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    """Both paths in every run: the compiled one here, the reference called directly."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")


def awkward(shape: tuple[int, ...], seed: int, kind: int) -> torch.Tensor:
    """Float64 values with signed zeros, infinities, NaNs, subnormals and many equal
    magnitudes (kind 0: a few values, so ties of either sign everywhere)."""
    generator = torch.Generator().manual_seed(seed)
    numel = max(1, int(torch.tensor(shape).prod()))
    if kind == 0:
        values = torch.randint(-3, 4, (numel,), generator=generator).double() * 0.25
    else:
        values = torch.randn(numel, generator=generator, dtype=torch.float64)
        values *= torch.exp2(torch.randint(-30, 5, (numel,), generator=generator).double())
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-310, -5e-324, 2.0**-1074],
        dtype=torch.float64,
    )
    picks = torch.randint(0, numel, (min(numel, kind * 3),), generator=generator)
    values[picks] = specials[torch.arange(picks.numel()) % specials.numel()]
    return values.reshape(shape)


def inputs(shape, dtypes, seed, kind):
    """A base and models near it: task vectors with ties, zeros and the values above."""
    base = awkward(shape, seed, kind)
    tensors = [base.to(dtypes[0])]
    for i, dtype in enumerate(dtypes[1:], start=1):
        delta = awkward(shape, seed + i, kind) * 0.125
        keep = torch.rand(shape, generator=torch.Generator().manual_seed(seed - i)) < 0.8
        tensors.append(torch.where(keep, base + delta, base).to(dtype))
    return tensors


def reference(method, out_dtype, base, tensors, weights, seed):
    """What execute.run_step computes without the compiled loop."""
    result = method([t.double() for t in tensors], weights, base.double(), seed)
    out = torch.empty(base.shape, dtype=out_dtype)
    kernels.store_whole(out, result, kernels.ChunkBuffers(torch.float64))
    return out


def fast(method, out_dtype, base, tensors, weights, seed, inplace):
    if inplace:
        destination = base = base.clone()
    else:
        destination = torch.empty(base.shape, dtype=out_dtype)
    assert method.merge_into(destination, tensors, weights, base, seed)
    return destination


def check(name, shape, dtypes, out_dtype, seed, kind, density, epsilon, scale, weights, inplace):
    method = getattr(methods, name)(density=density, epsilon=epsilon, scale=scale)
    base, *tensors = inputs(shape, dtypes, seed, kind)
    if inplace:
        out_dtype = base.dtype
    weights = weights[: len(tensors)]
    expected = reference(method, out_dtype, base, tensors, weights, seed)
    got = fast(method, out_dtype, base, tensors, weights, seed, inplace)
    assert same_bits(got, expected)


@needs_loop
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["della", "della_linear"]),
    shape=st.sampled_from(SHAPES),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=2, max_size=5),
    out_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    setting=st.sampled_from(SETTINGS),
    scale=st.sampled_from([1.0, 0.7, -2.0]),
    weights=st.lists(
        st.sampled_from([1.0, 0.5, -0.5, 1 / 3, 0.7, -1.3, 1e-3, 0.0]), min_size=4, max_size=4
    ),
    inplace=st.booleans(),
    same=st.booleans(),
)
def test_equals_the_reference_bit_for_bit(
    name, shape, dtypes, out_dtype, seed, kind, setting, scale, weights, inplace, same
):
    """Every dtype mix, 1 to 4 models, 0-D to 3-D tensors with rows of 1, 2 and odd widths,
    awkward values, into a fresh tensor or the base itself."""
    if same:
        dtypes = [dtypes[0]] * len(dtypes)
        out_dtype = dtypes[0]
    density, epsilon = setting
    check(name, shape, dtypes, out_dtype, seed, kind, density, epsilon, scale, weights, inplace)


@needs_loop
@settings(max_examples=20, deadline=None)
@given(
    name=st.sampled_from(["della", "della_linear"]),
    models=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    rows=st.integers(1, 40),
    workers=st.integers(2, 5),
)
def test_split_between_threads(name, models, dtype, seed, kind, rows, workers):
    """Blocks of whole rows in several threads give the same bits."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "PER_THREAD", 10)
        patch.setattr(torch, "get_num_threads", lambda: workers)
        check(name, (rows, 33), [dtype] * (models + 1), dtype, seed, kind, 0.5, 0.2, 1.0,
              [0.6, 0.4, -0.3, 1.0], True)  # fmt: skip


@needs_loop
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from(SHAPES),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    setting=st.sampled_from(SETTINGS),
    divide=st.booleans(),
    offset=st.sampled_from([0, 7, 1 << 40]),
)
def test_prune_equals_the_reference_bit_for_bit(shape, dtypes, seed, kind, setting, divide, offset):
    """One model's MagPrune (mergekit's options' path): every dtype, kept entries divided by
    their probability or not, rows anywhere in a larger tensor (the draws' indices)."""
    base, theta = inputs(shape, dtypes, seed, kind)
    density, epsilon = setting
    key = 12345 + seed
    rows = max(1, shape[0]) if len(shape) >= 2 else 1
    width = max(1, base.numel() // rows)
    whole = (rows + offset // width + 1, width)
    first_row = offset // width  # a block of whole rows of a larger tensor
    layout = Layout(whole, (rows, width), (first_row, 0))
    expected = (theta.double() - base.double()).reshape(rows, width).contiguous()
    expected = elementwise._della_sparsify(expected, density, epsilon, key, layout, divide)
    out = torch.empty(base.shape, dtype=torch.float64)
    assert fastrank.prune_into(
        out, theta, base, key=key, density=density, epsilon=epsilon, divide=divide,
        first=first_row * width,
    )  # fmt: skip
    assert same_bits(out.reshape(rows, width), expected)


@needs_loop
def test_prune_declines_what_it_does_not_take():
    base, theta = torch.zeros(2, 3), torch.ones(2, 3)
    out = torch.empty(2, 3, dtype=torch.float64)
    kwargs = {"key": 1, "density": 0.5, "epsilon": 0.1, "divide": True}
    assert not fastrank.prune_into(out.float(), theta, base, **kwargs)  # float64 out only
    assert not fastrank.prune_into(out[:, :2], theta[:, :2], base[:, :2], **kwargs)
    assert not fastrank.prune_into(out, theta.t().contiguous().t(), base, **kwargs)
    assert not fastrank.prune_into(
        torch.empty(0, dtype=torch.float64), theta[:0], base[:0], **kwargs
    )
    assert not fastrank.prune_into(out, theta, base, **{**kwargs, "density": 1})  # not a float
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TERGE_KERNELS", "torch")
        assert not fastrank.prune_into(out, theta, base, **kwargs)


@needs_loop
@pytest.mark.parametrize("rescale", ["probability", "none", "l1"])
def test_della_with_mergekit_s_options_prunes_in_the_loop_with_the_references_bits(
    rescale, monkeypatch
):
    base, *thetas = inputs((9, 31), [torch.float32] * 3, 5, 1)
    method = methods.della(density=[0.5, 0.6], epsilon=0.2, rescale=rescale, elect="weighted")
    args = ([t.double() for t in thetas], [0.7, -0.3], base.double())
    taken = []
    original = methods.della_prune_into
    monkeypatch.setattr(
        methods, "della_prune_into", lambda *a, **k: taken.append(original(*a, **k)) or taken[-1]
    )
    fast_ = method(*args, seed=4)
    assert taken == [True, True]  # both models pruned in the loop
    monkeypatch.setenv("TERGE_KERNELS", "torch")
    assert same_bits(method(*args, seed=4), fast_)
    assert taken[2:] == [False, False]  # then by the torch reference


def inverse_argsort(keys: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(keys, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(keys.numel())
    return ranks


@needs_loop
@settings(max_examples=100, deadline=None)
@given(
    n=st.one_of(st.integers(1, 40), st.integers(100, 5000)),
    bits=st.integers(1, 63),
    low_bits=st.integers(0, 20),
    distinct=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_rank_is_a_stable_sorts_order(n, bits, low_bits, distinct, seed):
    """Keys of any span (the magnitudes' low bits dropped and sorted again when the positions
    need room), few distinct values (ties by position), runs equal in all but the low bits."""
    generator = torch.Generator().manual_seed(seed)
    high = torch.randint(0, distinct, (n,), generator=generator) << max(0, bits - 6)
    low = torch.randint(0, 1 << low_bits, (n,), generator=generator)
    keys = (high + low).clamp_(0, (1 << 63) - 1)
    assert torch.equal(fastrank.rank(keys), inverse_argsort(keys))
    wide = torch.randint(0, 1 << 62, (n,), generator=generator) * 2 + low % 2
    assert torch.equal(fastrank.rank(wide), inverse_argsort(wide))


@needs_loop
def test_rank_of_float_magnitudes_and_errors():
    values = awkward((3000,), 3, 1)
    keys = magnitude_bits(values)
    assert torch.equal(fastrank.rank(keys), inverse_argsort(keys))
    with pytest.raises(ValueError, match="non-empty 1-D int64"):
        fastrank.rank(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-negative"):
        fastrank.rank(torch.tensor([3, -1]))


@needs_loop
def test_declines_where_it_does_not_apply():
    """No seed, a strided or non-CPU-plain tensor, different shapes, partial overlap: False
    and nothing written (the reference runs)."""
    method = methods.della()
    base = torch.randn(4, 6)
    tensors = [torch.randn(4, 6), torch.randn(4, 6)]
    out = torch.full((4, 6), 7.0)
    assert not method.merge_into(out, tensors, [0.5, 0.5], base, None)
    assert not method.merge_into(out, [t.t() for t in tensors], [0.5, 0.5], base.t(), 1)
    assert not method.merge_into(out, [torch.randn(6, 4), tensors[1]], [0.5, 0.5], base, 1)
    storage = torch.randn(30)
    assert not method.merge_into(
        storage[1:25].view(4, 6), tensors, [0.5, 0.5], storage[:24].view(4, 6), 1
    )
    assert torch.equal(out, torch.full((4, 6), 7.0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TERGE_KERNELS", "torch")
        assert not method.merge_into(out, tensors, [0.5, 0.5], base, 1)


def models_for_merge(seed: int, dtype: torch.dtype) -> list[torch.nn.Module]:
    models = []
    for i in range(3):
        torch.manual_seed(seed + i)
        model = torch.nn.Sequential(
            torch.nn.Embedding(50, 24), torch.nn.Linear(24, 40), torch.nn.LayerNorm(40)
        ).to(dtype)
        models.append(model)
    return models


def merged(name: str, dtype: torch.dtype, inplace: bool, seed: int = 5) -> dict[str, torch.Tensor]:
    models = models_for_merge(0, dtype)
    result = terge.merge(models, method=name, seed=seed, inplace=inplace, lineage=False)
    return {k: v.detach().clone() for k, v in result.state_dict().items()}


@needs_loop
@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace", [False, True])
def test_merge_takes_the_compiled_path_with_the_references_bits(name, dtype, inplace, monkeypatch):
    """terge.merge in and out of place: the compiled loop runs (the reference, patched to fail,
    is never called) and gives the reference's bits (TERGE_KERNELS=torch)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TERGE_KERNELS", "torch")
        expected = merged(name, dtype, inplace)

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(elementwise, "della_merge", refuse)
    got = merged(name, dtype, inplace)
    assert expected.keys() == got.keys()
    for key in expected:
        assert same_bits(got[key], expected[key]), key
    monkeypatch.setenv("TERGE_KERNELS", "torch")
    with pytest.raises(Exception, match="the reference ran"):
        merged(name, dtype, inplace)


@needs_loop
def test_the_seed_matters():
    a, b, c = (merged("della", torch.float32, False, seed) for seed in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --- PCB: the same operations with fewer buffers ---------------------------------------------------


def pcb_before(tensors, weights, base, *, ratio, scale, fold=False):
    """pcb_merge as first written (commit 6ac49d9's oracle), verbatim: its sums over the models
    are torch's ``sum(dim=0)`` (``fold``: folds in the models' order instead), its scores
    ``maximum`` then min-max scaling."""

    def total(rows, keepdim=False):
        if not fold:
            return rows.sum(dim=0, keepdim=keepdim)
        out = torch.zeros_like(rows[0])
        for row in rows:
            out = out + row
        return out.unsqueeze(0) if keepdim else out

    deltas = [theta - base for theta in tensors]
    n = len(deltas)
    stack = torch.stack([d.reshape(-1) for d in deltas])
    del deltas
    d = stack.shape[1]
    magnitudes = stack.abs()
    low = elementwise._sorted_at(magnitudes, int(d * elementwise.PCB_CLIP))
    high = elementwise._sorted_at(magnitudes, int(d * (1 - elementwise.PCB_CLIP)) - 1)
    magnitudes = torch.maximum(torch.minimum(magnitudes, high), low)
    clipped = torch.sign(stack) * magnitudes
    intra = elementwise._normalise(magnitudes).square_().mul_(n).exp_()
    del magnitudes
    inter = torch.tanh(stack * total(stack, keepdim=True))
    del stack
    balance = intra.mul_(inter)
    del inter
    floor = elementwise._sorted_at(balance, min(int(d * (1 - ratio)), d - 1))
    scores = elementwise._normalise(torch.maximum(balance, floor))
    del balance
    numerator = total(clipped * scores)
    denominator = total(scores)
    merged = torch.where(denominator != 0, numerator / denominator, torch.zeros_like(numerator))
    return base + merged.reshape(base.shape).mul_(scale)


@settings(max_examples=150, deadline=None)
@given(
    shape=st.sampled_from([(2,), (3,), (17,), (4, 2), (3, 7), (2, 3, 5), (6, 129), (2, 1000)]),
    models=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    ratio=st.sampled_from([0.1, 0.5, 1.0, 1e-3]),
    scale=st.sampled_from([1.0, -0.7]),
)
def test_pcb_keeps_its_values(shape, models, seed, kind, ratio, scale):
    """The rewrites (three n x d buffers instead of eight; then sums as folds in the models'
    order, scores by ``where``) give the first version's values, NaN, inf and ties included,
    bit for bit but for zeros' signs (``maximum`` of -0 and +0 was torch's vector or scalar
    path's choice); past four task vectors, with its sums as folds (``sum(dim=0)`` adds in an
    order of its own there)."""
    base, *tensors = [t.double() for t in inputs(shape, [torch.float64] * (models + 1), seed, kind)]
    weights = [1.0] * models
    expected = pcb_before(tensors, weights, base, ratio=ratio, scale=scale, fold=models > 4)
    got = elementwise.pcb_merge(tensors, weights, base, ratio=ratio, scale=scale)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])  # -0 == +0
    with pytest.raises(terge.errors.MethodNotApplicableError, match="pcb: needs a base"):
        elementwise.pcb_merge(tensors, weights, None, ratio=ratio, scale=scale)


def test_past_four_rows_torchs_sum_is_not_a_fold():
    """Why the reference folds: torch's sum over more than four rows is not always
    ((0 + r0) + r1) + ... (here six rows of 100), while over four it is."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 100, generator=generator, dtype=torch.float64)
    rows *= torch.exp2(torch.randint(-30, 30, (6, 100), generator=generator).double())

    def fold(block):
        total = torch.zeros(block.shape[1], dtype=torch.float64)
        for row in block:
            total = total + row
        return total

    assert not torch.equal(rows.sum(dim=0), fold(rows))
    assert torch.equal(rows[:4].sum(dim=0), fold(rows[:4]))


# --- PCB's order statistics: the compiled selection against topk ----------------------------------

needs_selection = pytest.mark.skipif(
    fastmethods._fastmethods is None, reason="terge.kernels._fastmethods is not built"
)
ORDERED = st.floats(allow_nan=False, width=64) | st.sampled_from(
    [0.0, -0.0, math.inf, -math.inf, 5e-324, -5e-324, 1.0, -1.0]
)


def by_topk(values, index, monkeypatch):
    """_sorted_at with the compiled selection switched off: topk's answer."""
    with monkeypatch.context() as patch:
        patch.setenv("TERGE_KERNELS", "torch")
        return elementwise._sorted_at(values, index)


@needs_selection
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rows=st.lists(st.lists(ORDERED, min_size=1, max_size=40), min_size=1, max_size=4),
    where=st.floats(0, 1),
)
def test_order_statistics_are_the_sorted_entries(rows, where, monkeypatch):
    """Each row's index-th smallest, exactly the sorted row's entry (a zero as +0.0), and what
    topk gives: infinities, subnormals, both zeros and ties included."""
    width = min(len(row) for row in rows)
    values = torch.tensor([row[:width] for row in rows], dtype=torch.float64)
    index = min(int(where * width), width - 1)
    got = fastelementwise.order_statistics(values, index)
    expected = values.sort(dim=1).values[:, index : index + 1] + 0.0
    assert got is not None and same_bits(got, expected)
    assert same_bits(by_topk(values, index, monkeypatch), expected)
    assert same_bits(elementwise._sorted_at(values, index), expected)


@needs_selection
def test_order_statistics_on_long_rows_use_every_bin(monkeypatch):
    """Rows long enough that the first read's bins hold many values each: the 0.01%, median
    and 99.99% entries of a million, with heavy ties."""
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(3, 1_000_003, dtype=torch.float64, generator=generator)
    values[1] = values[1].round()  # a few dozen distinct values, each tied many times
    values[2, ::3] = -0.0
    for index in (0, 100, 500_001, 999_902, 1_000_002):
        expected = values.sort(dim=1).values[:, index : index + 1] + 0.0
        assert same_bits(fastelementwise.order_statistics(values, index), expected), index
        assert same_bits(by_topk(values, index, monkeypatch), expected), index


@needs_selection
def test_a_small_matrix_is_selected_without_a_worker_thread(monkeypatch):
    """A small tensor's rows are selected in the calling thread (the hand-off cost more)."""
    monkeypatch.setattr(cpu, "threads", lambda: pytest.fail("a worker thread was asked for"))
    values = torch.randn(3, 5000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = values.sort(dim=1).values[:, 17:18] + 0.0
    assert same_bits(fastelementwise.order_statistics(values, 17), expected)


@needs_selection
def test_a_zero_is_plus_zero_both_ways(monkeypatch):
    """Which zero a sort puts at the index is its own affair; _sorted_at says +0.0 both ways."""
    values = torch.tensor([[-0.0, -0.0, 1.0], [2.0, -0.0, 0.0]], dtype=torch.float64)
    for got in (fastelementwise.order_statistics(values, 0), by_topk(values, 0, monkeypatch)):
        assert got.view(torch.int64).tolist() == [[0], [0]]


@needs_selection
def test_a_nan_leaves_the_row_to_topk(monkeypatch):
    """topk orders NaN above everything; the compiled selection declines a matrix holding one,
    and _sorted_at gives topk's answer."""
    values = torch.tensor([[3.0, math.nan, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    assert fastelementwise.order_statistics(values, 1) is None
    assert same_bits(elementwise._sorted_at(values, 1), torch.tensor([[2.0], [2.0]]).double())
    assert same_bits(elementwise._sorted_at(values, 3), torch.tensor([[math.nan], [4.0]]).double())
    assert same_bits(by_topk(values, 3, monkeypatch), elementwise._sorted_at(values, 3))


@needs_selection
def test_order_statistics_decline_what_they_do_not_take():
    values = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    assert fastelementwise.order_statistics(values.float(), 1) is None  # float32
    assert fastelementwise.order_statistics(values.t(), 1) is None  # not contiguous
    assert fastelementwise.order_statistics(values.reshape(-1), 1) is None  # 1-D
    assert fastelementwise.order_statistics(values, 4) is None  # past the row
    address = values.data_ptr()
    with pytest.raises(ValueError, match=r"order_statistic: index 4 is not in \[0, 4\)"):
        fastmethods._fastmethods.order_statistic(address, 4, 4)
    with pytest.raises(ValueError, match=r"order_statistic: index -1 is not in \[0, 4\)"):
        fastmethods._fastmethods.order_statistic(address, 4, -1)


@needs_selection
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=st.sampled_from([(17,), (3, 7), (6, 129), (2, 1000)]),
    models=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    ratio=st.sampled_from([0.1, 0.5, 1e-3]),
)
def test_pcb_is_the_same_with_and_without_the_compiled_selection(
    shape, models, seed, kind, ratio, monkeypatch
):
    """PCB's bits do not depend on which path found its quantiles, and the compiled one ran
    (topk refused) wherever no NaN was in the way."""
    base, *tensors = [t.double() for t in inputs(shape, [torch.float64] * (models + 1), seed, kind)]
    weights = [1.0] * models
    with monkeypatch.context() as patch:
        patch.setenv("TERGE_KERNELS", "torch")
        expected = elementwise.pcb_merge(tensors, weights, base, ratio=ratio, scale=1.0)
    has_nan = any(bool((t - base).isnan().any()) for t in tensors)
    with monkeypatch.context() as patch:
        if not has_nan:
            patch.setattr(torch, "topk", lambda *a, **k: pytest.fail("topk ran"))
        got = elementwise.pcb_merge(tensors, weights, base, ratio=ratio, scale=1.0)
    assert same_bits(got, expected)
