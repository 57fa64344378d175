"""The element-wise task-vector methods (DELLA, SCE, breadcrumbs_ties, MagMax, TALL consensus, PCB,
NearSwap) against hand-computed cases and references written here in plain Python."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import terge
from terge.errors import MergeArgumentError, MethodNotApplicableError
from terge.families.elementwise import (
    _della_sparsify,
    _sorted_at,
    della_probabilities,
    sign_consensus,
)
from terge.kernels.primitives import draw_key, mix64
from terge.methods import (
    REGISTRY,
    breadcrumbs,
    breadcrumbs_ties,
    consensus,
    della,
    della_linear,
    magmax,
    nearswap,
    pcb,
    resolve,
    sce,
    task_arithmetic,
    ties,
)
from terge.plan import derive_seed
from terge.sharding import Layout

T = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=T)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=T)


def family(n: int, shape=(5, 6), seed: int = 0):
    base = rand(*shape, seed=seed)
    return [base + rand(*shape, seed=seed + 1 + i) for i in range(n)], base


def integers(n: int, shape=(4, 5), seed: int = 0):
    """Integer-valued float64 models: every sum and difference exact, so orders cannot matter."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 8, shape, generator=g).to(T)
    return [base + torch.randint(-8, 8, shape, generator=g).to(T) for _ in range(n)], base


def uniform(key: int, j: int) -> float:
    """counter_uniform's specification, in plain Python."""
    return (mix64(key + (j + 1) * 0x9E3779B97F4A7C15) >> 11) * 2.0**-53


# --- DELLA ----------------------------------------------------------------------------------------


def test_della_probabilities_rise_with_the_magnitude_rank():
    rows = t(0.1, -0.3, 0.2).reshape(1, 3)
    p = della_probabilities(rows, 0.5, 0.1)
    assert p.tolist() == [[0.4, 1.0 * (2 * 0.1) + 0.4, (1 / 2) * (2 * 0.1) + 0.4]]


def test_della_probabilities_break_ties_by_position_and_rank_within_rows():
    rows = t(1, -1, 2, 5, 4, 3).reshape(2, 3)
    p = della_probabilities(rows, 0.5, 0.2)
    assert p[0].tolist() == [0.3, (1 / 2) * 0.4 + 0.3, 0.4 + 0.3]
    assert p[1].tolist() == [0.4 + 0.3, (1 / 2) * 0.4 + 0.3, 0.3]
    assert della_probabilities(t(7.0).reshape(1, 1), 0.5, 0.2).tolist() == [[0.5]]


def ref_della_deltas(thetas, base, density, epsilon, seed):
    """DELLA's MagPrune written out entry by entry (rows: the first dimension)."""
    out = []
    for position, theta in enumerate(thetas):
        tau = (theta - base).reshape(theta.shape[0], -1).tolist()
        key = draw_key(seed, position)
        width = len(tau[0])
        rows = []
        for r, row in enumerate(tau):
            order = sorted(range(width), key=lambda j: (abs(row[j]), j))
            rank = {j: i for i, j in enumerate(order)}
            kept = []
            for j, value in enumerate(row):
                p = (density - epsilon) + (rank[j] / (width - 1)) * (2 * epsilon)
                kept.append(value / p if uniform(key, r * width + j) < p else 0.0)
            rows.append(kept)
        out.append(torch.tensor(rows, dtype=T).reshape(theta.shape))
    return out


@pytest.mark.parametrize(("density", "epsilon", "scale"), [(0.5, 0.1, 1.0), (0.3, 0.2, 0.7)])
def test_della_linear_formula(density, epsilon, scale):
    thetas, base = family(3)
    weights = [0.2, 0.3, 0.5]
    deltas = ref_della_deltas(thetas, base, density, epsilon, seed=9)
    expected = torch.zeros_like(base)
    for delta, w in zip(deltas, weights, strict=True):
        expected += delta * w
    expected = base + expected * scale
    method = della_linear(density=density, epsilon=epsilon, scale=scale)
    assert torch.equal(method(thetas, weights, base, seed=9), expected)


def test_della_formula_elects_signs_over_the_pruned_deltas():
    thetas, base = family(3, seed=4)
    weights = [0.5, 0.25, 0.25]
    deltas = ref_della_deltas(thetas, base, 0.4, 0.1, seed=2)
    expected = base + sign_consensus(deltas, weights)
    assert torch.equal(della(density=0.4, epsilon=0.1)(thetas, weights, base, seed=2), expected)


def test_della_prunes_about_density_and_keeps_the_expectation():
    thetas, base = family(1, shape=(200, 300))
    merged = della_linear(density=0.3, epsilon=0.2)(thetas, [1.0], base, seed=1)
    kept = (merged != base).double().mean().item()
    assert kept == pytest.approx(0.3, abs=0.01)
    tau = thetas[0] - base  # large magnitudes are kept more often than small ones
    big = tau.abs() > tau.abs().median()
    assert (merged != base)[big].double().mean() > (merged != base)[~big].double().mean() + 0.1


def test_della_at_density_one_is_task_arithmetic_and_ties():
    thetas, base = integers(3)
    weights = [0.25, 0.25, 0.5]
    linear = della_linear(density=1.0, epsilon=0.0)(thetas, weights, base, seed=0)
    assert torch.equal(linear, task_arithmetic()(thetas, weights, base))
    elected = della(density=1.0, epsilon=0.0)(thetas, weights, base, seed=0)
    assert torch.equal(elected, ties(density=1.0)(thetas, weights, base))


def test_della_same_seed_same_draw_and_inputs_untouched():
    thetas, base = family(2)
    copies = [x.clone() for x in (*thetas, base)]
    a = della()(thetas, [0.5, 0.5], base, seed=5)
    assert torch.equal(a, della()(thetas, [0.5, 0.5], base, seed=5))
    assert not torch.equal(a, della()(thetas, [0.5, 0.5], base, seed=6))
    assert all(torch.equal(x, y) for x, y in zip((*thetas, base), copies, strict=True))


@pytest.mark.parametrize("factory", [della, della_linear])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"density": 0.0}, r"density must be in \(0, 1\], got 0\.0\."),
        ({"density": 1.2}, r"density must be in \(0, 1\], got 1\.2\."),
        ({"epsilon": -0.1}, r"epsilon must be in \[0, 1\), got -0\.1\."),
        ({"epsilon": "0.1"}, r"epsilon must be a real number, got '0\.1' \(str\)\."),
        (
            {"density": 0.2, "epsilon": 0.2},
            r"density - epsilon must be above 0 and density \+ epsilon at most 1 \(they bound "
            r"the keep probabilities\), got density=0\.2, epsilon=0\.2\.",
        ),
        (
            {"density": 0.9, "epsilon": 0.15},
            r"density - epsilon .* got density=0\.9, epsilon=0\.15\.",
        ),
        ({"scale": math.inf}, r"scale must be a finite number"),
        ({"density": []}, r"density is an empty list; give one per model\."),
        ({"density": [0.5, 1.5]}, r"density must be in \(0, 1\], got 1\.5\."),
        (
            {"density": [0.5, 0.3], "epsilon": [0.1, 0.1, 0.1]},
            r"density has 2 per-model values and epsilon 3; give both one per contributing",
        ),
        (  # per model: 0.1 - 0.05 is fine for the first, 0.2 + 0.9 too much for the second
            {"density": [0.1, 0.9], "epsilon": [0.05, 0.2]},
            r"density - epsilon must be above 0 and density \+ epsilon at most 1 .* got "
            r"density=0\.9, epsilon=0\.2\.",
        ),
        ({"rescale": "density"}, r"rescale must be one of 'probability', 'l1', 'l2', 'linf', "),
    ],
)
def test_della_settings_are_checked(factory, options, message):
    with pytest.raises(MergeArgumentError, match=f"^{factory.__name__}: {message}"):
        factory(**options)


def test_della_per_model_pairs_are_checked_model_by_model():
    method = della(density=[0.1, 0.9], epsilon=[0.05, 0.1])  # 0.1 +/- 0.1 would not be
    assert method.settings == {"density": [0.1, 0.9], "epsilon": [0.05, 0.1], "scale": 1.0}


def test_della_election_options_belong_to_della_alone():
    with pytest.raises(MergeArgumentError, match=r"^della_linear: elect and disjoint_mean"):
        terge.methods._della("della_linear", 0.5, 0.1, 1.0, False, "probability", "weighted")


@pytest.mark.parametrize("factory", [della, della_linear])
def test_della_with_options_at_their_defaults_is_the_paper_s_della(factory):
    """Per-model lists of one value go through the options' path: the same bits as the
    default (and the compiled row loop's reference), draws keyed alike."""
    thetas, base = family(3, shape=(7, 9), seed=8)
    weights = [0.2, 0.5, 0.3]
    plain = factory(density=0.6, epsilon=0.2)
    listed = factory(density=[0.6] * 3, epsilon=[0.2] * 3)
    assert plain.into is not None and listed.into is None  # the options: the reference alone
    expected = plain(thetas, weights, base, seed=11)
    assert torch.equal(listed(thetas, weights, base, seed=11), expected)
    assert not torch.equal(listed(thetas, weights, base, seed=12), expected)


def test_della_rescale_by_the_l1_norm_keeps_the_draws_and_the_norm():
    """mergekit's rescale: the same entries kept as without rescaling, the pruned task vector
    then scaled to its L1 norm before; 'none' keeps the kept entries as they are."""
    (theta,), base = family(1, shape=(30, 40), seed=9)
    tau = theta - base
    kept = della_linear(density=0.5, epsilon=0.2, rescale="none")([theta], [1.0], base, seed=5)
    kept = kept - base
    assert ((kept == 0) | (kept == tau)).all()  # no 1 / p
    assert 0.45 < float((kept != 0).double().mean()) < 0.55
    scaled = della_linear(density=0.5, epsilon=0.2, rescale="l1")([theta], [1.0], base, seed=5)
    scaled = scaled - base
    assert torch.equal(scaled != 0, kept != 0)
    ratio = tau.abs().sum() / kept.abs().sum()
    torch.testing.assert_close(scaled, kept * ratio, rtol=1e-14, atol=0)
    torch.testing.assert_close(scaled.abs().sum(), tau.abs().sum(), rtol=1e-13, atol=0)
    assert della(rescale="l1").settings["rescale"] == "l1"
    assert "rescale" not in della(rescale="probability").settings


def test_della_weighted_election_and_sum_as_ties_options():
    """elect='weighted' and disjoint_mean=False, as ties': the pruned task vectors (the same
    draws as the default), the sign of sum_i w_i d_i elected, the agreeing w_i d_i summed."""
    thetas, base = family(2, shape=(6, 8), seed=10)
    weights = [1.0, -0.5]
    method = della(density=0.5, epsilon=0.1, elect="weighted", disjoint_mean=False)
    merged = method(thetas, weights, base, seed=2)
    layout = Layout.whole(base.shape)
    pruned = [
        _della_sparsify((theta - base).contiguous(), 0.5, 0.1, draw_key(2, i), layout)
        for i, theta in enumerate(thetas)
    ]
    weighted = [d * w for d, w in zip(pruned, weights, strict=True)]
    positive = sum(weighted) >= 0
    expected = base + sum(torch.where(positive, x > 0, x < 0) * x for x in weighted)
    torch.testing.assert_close(merged, expected, rtol=1e-14, atol=1e-15)
    unweighted = della(density=0.5, epsilon=0.1)(thetas, weights, base, seed=2)
    assert not torch.allclose(unweighted, merged)  # the default divides and elects otherwise


def test_della_per_layer_settings_are_checked_together():
    with pytest.raises(MergeArgumentError, match=r"got density=0\.1, epsilon=0\.1"):
        della(density=terge.by_layer([0.1, 0.5]), epsilon=0.1)


# --- SCE ------------------------------------------------------------------------------------------


def ref_sce(thetas, base, select_topk, scale=1.0, floor=0.0):
    b = base.reshape(-1).tolist()
    taus = [[x - y for x, y in zip(th.reshape(-1).tolist(), b, strict=True)] for th in thetas]
    n, d = len(taus), len(b)
    if select_topk < 1:
        variance = []
        for j in range(d):  # n^2 times the variance, exact for these integer task vectors
            pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
            variance.append(sum((taus[a][j] - taus[b][j]) ** 2 for a, b in pairs))
        k = int(select_topk * sum(v != 0 for v in variance))
        threshold = sorted(variance, reverse=True)[k - 1] if k else math.inf
        taus = [[v if variance[j] >= threshold else 0.0 for j, v in enumerate(tau)] for tau in taus]
    squares = [sum(v * v for v in tau) / d for tau in taus]  # mean squares
    c = [s / sum(squares) for s in squares] if sum(squares) else [1 / n] * n
    if floor:  # mergekit's: equal weights below floor, the divisor at least floor
        c = [1 / n] * n if abs(sum(squares)) < floor else c
    out = []
    for j in range(d):
        sign = 1 if sum(tau[j] for tau in taus) >= 0 else -1
        agree = [i for i in range(n) if taus[i][j] * sign > 0]
        den = sum(c[i] for i in agree)
        num = sum(taus[i][j] * c[i] for i in agree)
        if floor:
            out.append(b[j] + scale * (num / max(den, floor)))
        else:
            out.append(b[j] + scale * (num / den if den else 0.0))
    return torch.tensor(out, dtype=T).reshape(base.shape)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce_formula(select_topk):
    thetas, base = integers(3, seed=2)
    merged = sce(select_topk=select_topk)(thetas, [0.1, 0.2, 0.7], base)
    torch.testing.assert_close(merged, ref_sce(thetas, base, select_topk), rtol=1e-14, atol=0)


@pytest.mark.parametrize("select_topk", [1.0, 0.5])
@pytest.mark.parametrize("size", [1.0, 1e-4])  # mean squares above 1e-6, and below: equal
def test_sce_floor_is_mergekit_s_arithmetic(select_topk, size):
    thetas, base = integers(3, seed=4)
    thetas = [base + (theta - base) * size for theta in thetas]
    method = sce(select_topk=select_topk, floor=1e-6)
    expected = ref_sce(thetas, base, select_topk, floor=1e-6)
    torch.testing.assert_close(method(thetas, [1.0] * 3, base), expected, rtol=1e-13, atol=0)
    assert method.settings == {"select_topk": select_topk, "scale": 1.0, "floor": 1e-6}
    plain = sce(select_topk=select_topk)(thetas, [1.0] * 3, base)
    assert torch.equal(plain, expected) is False or size == 1.0  # below 1e-6 they differ


def test_sce_floor_raises_a_small_divisor_as_mergekit_does():
    base = t(0, 0)
    thetas = [t(1e-4, 0), t(0, 1000)]  # model 0's weight is about 1e-14, below the floor
    torch.testing.assert_close(sce()(thetas, [0.5, 0.5], base), t(1e-4, 1000.0), rtol=1e-15, atol=0)
    floored = sce(floor=1e-6)(thetas, [0.5, 0.5], base)
    c0 = (1e-8 / 2) / (1e-8 / 2 + 1e6 / 2)
    torch.testing.assert_close(floored, t(1e-4 * c0 / 1e-6, 1000.0), rtol=1e-13, atol=0)


@pytest.mark.parametrize("floor", [-1e-6, math.inf, math.nan])
def test_sce_floor_must_be_positive_and_finite(floor):
    with pytest.raises(MergeArgumentError, match=r"^sce: floor must be in \(0, ∞\), got"):
        sce(floor=floor)


def test_sce_floor_merges_through_the_reference_in_a_merge():
    thetas, base = integers(3, seed=5)
    models = [{"w": x.float()} for x in (base, *thetas)]
    method = sce(floor=1e-6)
    merged = terge.merge(models, method=method, base=0)["w"]
    expected = method([x.double() for x in thetas], [1.0] * 3, base.double()).float()
    assert torch.equal(merged, expected)


def test_breadcrumbs_ties_takes_mergekit_s_options():
    thetas, base = family(3, shape=(8, 9), seed=6)
    weights = [0.5, -0.25, 0.75]
    options = {"trim": "exact", "rescale": "l1", "elect": "weighted", "disjoint_mean": False}
    method = breadcrumbs_ties(density=[0.5, 0.3, 0.7], gamma=0.1, **options)
    assert method.settings == {"density": [0.5, 0.3, 0.7], "gamma": 0.1, "scale": 1.0, **options}
    masked = [  # mergekit: each pruned task vector rescaled, weighted, then the consensus
        (breadcrumbs(density=d, gamma=0.1, trim="exact", rescale="l1")([x], [1.0], base) - base) * w
        for x, d, w in zip(thetas, [0.5, 0.3, 0.7], weights, strict=True)
    ]
    positive = sum(masked) >= 0
    agreeing = [torch.where(positive, m > 0, m < 0) for m in masked]
    expected = base + sum(torch.where(a, m, 0.0) for a, m in zip(agreeing, masked, strict=True))
    torch.testing.assert_close(method(thetas, weights, base), expected, rtol=1e-14, atol=1e-15)


def test_sce_hand_computed():
    base = t(0, 0, 0)
    thetas = [t(2, -1, 1), t(2, 3, -1)]  # squares 6 and 14: c = 0.3, 0.7 (exactly: 6/20, 14/20)
    # entry 0 agrees: (0.3 * 2 + 0.7 * 2) / 1 = 2; entry 1 sum +2: only model 1, 3;
    # entry 2 sum 0 counts as +: only model 0, 1.
    assert sce()(thetas, [0.5, 0.5], base).tolist() == [2.0, 3.0, 1.0]
    # select_topk=0.5 of the 2 varying entries (1 and 2) keeps 1: the most varying, entry 1
    assert sce(select_topk=0.5)(thetas, [0.5, 0.5], base).tolist() == [0.0, 3.0, 0.0]


def test_sce_of_one_model_is_the_model_and_weights_do_not_matter():
    thetas, base = integers(1)
    assert torch.equal(sce()(thetas, [1.0], base), thetas[0])
    more, base = integers(3)
    assert torch.equal(sce()(more, [0.2, 0.3, 0.5], base), sce()(more, [1 / 3] * 3, base))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([1.0, 0.6, 0.3]), st.permutations([0, 1, 2]))
def test_sce_is_invariant_to_model_order(seed, select_topk, order):
    thetas, base = integers(3, seed=seed)
    method = sce(select_topk=select_topk)
    expected = method(thetas, [1 / 3] * 3, base)
    assert torch.equal(method([thetas[i] for i in order], [1 / 3] * 3, base), expected)


@pytest.mark.parametrize("value", [0, 1.5, -0.2, math.nan])
def test_sce_select_topk_out_of_range(value):
    with pytest.raises(MergeArgumentError, match=r"^sce: select_topk must be in \(0, 1\], got"):
        sce(select_topk=value)


# --- breadcrumbs_ties -----------------------------------------------------------------------------


def test_breadcrumbs_ties_is_the_breadcrumbs_mask_then_ties_consensus():
    thetas, base = family(3, shape=(8, 9), seed=3)
    weights = [0.2, 0.5, 0.3]
    masked = [
        breadcrumbs(density=0.5, gamma=0.1, scale=1.0)([theta], [1.0], base) - base
        for theta in thetas
    ]
    expected = base + sign_consensus(masked, weights)
    merged = breadcrumbs_ties(density=0.5, gamma=0.1)(thetas, weights, base)
    assert torch.equal(merged, expected)
    assert breadcrumbs_ties().settings == {"density": 0.2, "gamma": 0.01, "scale": 1.0}


def test_breadcrumbs_ties_checks_its_settings_as_breadcrumbs():
    with pytest.raises(MergeArgumentError, match=r"density \+ gamma must be at most 1"):
        breadcrumbs_ties(density=0.9, gamma=0.2)


def test_breadcrumbs_ties_compiled_loop_matches_the_reference():
    thetas, base = family(3, shape=(30, 40))
    thetas32 = [x.float() for x in thetas]
    method = breadcrumbs_ties(density=0.3, gamma=0.05)
    expected = method([x.double() for x in thetas32], [0.3, 0.3, 0.4], base.float().double())
    out = torch.empty(30, 40, dtype=torch.float32)
    if not method.merge_into(out, thetas32, [0.3, 0.3, 0.4], base.float()):
        pytest.skip("the compiled task-vector loops are not built")
    assert torch.equal(out, expected.float())


# --- MagMax ---------------------------------------------------------------------------------------


def test_magmax_hand_computed():
    base = t(1, 1, 1, 1)
    thetas = [t(3, 0, 1, -1), t(0, 4, 1, 3)]  # tau: (2, -1, 0, -2) and (-1, 3, 0, 2)
    assert magmax()(thetas, [0.5, 0.5], base).tolist() == [3.0, 4.0, 1.0, -1.0]  # a tie: first
    assert magmax(scale=0.5)(thetas, [0.9, 0.1], base).tolist() == [2.0, 2.5, 1.0, 0.0]


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 4))
def test_magmax_of_one_model_is_the_model_and_order_does_not_matter(seed, n):
    thetas, base = family(n, seed=seed)  # continuous draws: no equal magnitudes
    assert torch.equal(magmax()(thetas[:1], [1.0], base), base + (thetas[0] - base))
    expected = magmax()(thetas, [1 / n] * n, base)
    assert torch.equal(magmax()(thetas[::-1], [1 / n] * n, base), expected)


# --- TALL-mask consensus --------------------------------------------------------------------------


def test_consensus_hand_computed():
    base = t(0, 0, 0)
    thetas = [t(1, 1, 4), t(1, -3, 0), t(0, 0.1, 0)]  # sum (2, -1.9, 4)
    # entry 0: |1| >= 0.6 * |1| for models 0 and 1, not |0| >= 0.6 * 2 (2 votes); entry 1:
    # model 1 only (|-3| >= 0.6 * 1.1); entry 2: model 0 only (|4| >= 0.6 * 0).
    merged = consensus()(thetas, [0.5, 0.25, 0.25], base)
    assert merged.tolist() == [0.75, 0.0, 0.0]
    everything = consensus(k=1)(thetas, [0.5, 0.25, 0.25], base)
    assert everything.tolist() == [0.75, 0.5 * 1 + 0.25 * -3 + 0.25 * 0.1, 2.0]


def test_consensus_with_k_zero_is_task_arithmetic_and_above_n_is_the_base():
    thetas, base = family(3)
    weights = [0.2, 0.3, 0.5]
    assert torch.equal(
        consensus(k=0, scale=0.8)(thetas, weights, base),
        task_arithmetic(scale=0.8)(thetas, weights, base),
    )
    assert torch.equal(consensus(k=4)(thetas, weights, base), base)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": -1}, r"k must be an integer of at least 0, got -1\."),
        ({"k": 1.5}, r"k must be an integer of at least 0, got 1\.5\."),
        ({"k": True}, r"k must be an integer of at least 0, got True\."),
        ({"mask_lambda": -0.1}, r"mask_lambda must be in \[0, ∞\), got -0\.1\."),
        ({"mask_lambda": math.inf}, r"mask_lambda must be in \[0, ∞\), got inf\."),
    ],
)
def test_consensus_settings_are_checked(options, message):
    with pytest.raises(MergeArgumentError, match=f"^consensus: {message}$"):
        consensus(**options)


# --- PCB ------------------------------------------------------------------------------------------


def ref_pcb(thetas, base, ratio, scale):
    """The authors' algorithm on one flattened tensor, with sorted lists for the quantiles."""
    taus = [(th - base).reshape(-1).tolist() for th in thetas]
    n, d = len(taus), len(taus[0])

    def clip(row, lo_index, hi_index):
        ordered = sorted(row)
        lo, hi = ordered[lo_index], ordered[hi_index]
        return [min(max(v, lo), hi) for v in row]

    def norm(row):
        lo, hi = min(row), max(row)
        return [(v - lo) / (hi - lo) if hi > lo else 0.0 for v in row]

    total = [sum(tau[j] for tau in taus) for j in range(d)]
    clipped, scores = [], []
    for tau in taus:
        mags = clip([abs(v) for v in tau], int(d * 0.0001), int(d * (1 - 0.0001)) - 1)
        clipped.append([math.copysign(m, v) if v else 0.0 for m, v in zip(mags, tau, strict=True)])
        intra = [math.exp(n * v * v) for v in norm(mags)]
        inter = [math.tanh(v * s) for v, s in zip(tau, total, strict=True)]
        balance = [a * b for a, b in zip(intra, inter, strict=True)]
        scores.append(norm(clip(balance, min(int(d * (1 - ratio)), d - 1), d - 1)))
    out = []
    for j in range(d):
        den = sum(s[j] for s in scores)
        num = sum(c[j] * s[j] for c, s in zip(clipped, scores, strict=True))
        out.append(num / den if den else 0.0)
    b = base.reshape(-1).tolist()
    return torch.tensor([x + scale * m for x, m in zip(b, out, strict=True)], dtype=T).reshape(
        base.shape
    )


@pytest.mark.parametrize(("ratio", "scale"), [(0.1, 1.0), (0.5, 0.8), (1.0, 1.0)])
@pytest.mark.parametrize("n", [2, 3])
def test_pcb_formula(ratio, scale, n):
    thetas, base = family(n, shape=(12, 10), seed=n)
    merged = pcb(ratio=ratio, scale=scale)(thetas, [1 / n] * n, base)
    torch.testing.assert_close(merged, ref_pcb(thetas, base, ratio, scale), rtol=1e-12, atol=1e-14)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.lists(
            st.sampled_from([-2.0, -1.0, -0.0, 0.0, 1.0, 2.5, math.inf, -math.inf, math.nan]),
            min_size=1,
            max_size=12,
        ),
        min_size=1,
        max_size=3,
    ),
    data=st.data(),
)
def test_pcb_quantiles_are_kthvalue(rows, data):
    """PCB's quantiles come from ``topk`` on the shorter side; they are ``kthvalue``'s, NaNs
    (ordered above everything by both), infinities and ties included."""
    d = min(len(row) for row in rows)
    values = torch.tensor([row[:d] for row in rows], dtype=torch.float64)
    index = data.draw(st.integers(0, d - 1))
    expected = torch.kthvalue(values, index + 1, dim=1, keepdim=True).values
    got = _sorted_at(values, index)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got[~got.isnan()], expected[~expected.isnan()])


def test_pcb_keeps_about_ratio_of_the_scores_and_ignores_weights():
    thetas, base = family(3, shape=(40, 50))
    merged = pcb(ratio=0.2)(thetas, [0.2, 0.3, 0.5], base)
    assert torch.equal(merged, pcb(ratio=0.2)(thetas, [1 / 3] * 3, base))
    changed = (merged != base).double().mean().item()
    assert 0.2 <= changed <= 0.6  # the union of three tasks' top 20%


@pytest.mark.parametrize("ratio", [0, -0.1, 1.01])
def test_pcb_ratio_out_of_range(ratio):
    with pytest.raises(MergeArgumentError, match=r"^pcb: ratio must be in \(0, 1\], got"):
        pcb(ratio=ratio)


# --- NearSwap -------------------------------------------------------------------------------------


def test_nearswap_hand_computed():
    base = t(0, 0, 0, 0, 1)
    theta = t(0.0005, 0.002, -0.004, 0, 1)
    merged = nearswap(t=0.001)([theta], [1.0], base)
    assert merged.tolist() == [0.0005, 0.001, -0.001, 0.0, 1.0]


def test_nearswap_takes_exactly_one_model():
    thetas, base = family(2)
    with pytest.raises(MethodNotApplicableError, match=r"^nearswap: merges exactly one model"):
        nearswap()(thetas, [0.5, 0.5], base)
    method = nearswap()
    assert (method.min_models, method.max_models, method.task_vectors) == (1, 1, True)


@pytest.mark.parametrize("value", [0, -1e-3, math.inf, math.nan])
def test_nearswap_t_must_be_positive_and_finite(value):
    with pytest.raises(MergeArgumentError, match=r"^nearswap: t must be in \(0, ∞\), got"):
        nearswap(t=value)


# --- all of them ----------------------------------------------------------------------------------

NEW = ["della", "della_linear", "sce", "breadcrumbs_ties", "magmax", "consensus", "pcb", "nearswap"]


@pytest.mark.parametrize("name", NEW)
def test_registered_with_paper_and_needing_a_base(name):
    assert name in REGISTRY and REGISTRY[name].paper
    method = resolve(name)
    assert method.task_vectors and method.needs_base and method.builtin
    assert method.random == name.startswith("della")
    with pytest.raises(MethodNotApplicableError, match=f"^{name}: needs a base model"):
        method(*family(1)[:1], [1.0], None, seed=0)


def test_which_run_on_shards():
    assert resolve("magmax").elementwise and resolve("consensus").elementwise
    assert resolve("nearswap").elementwise
    assert resolve("sce").layout_aware and resolve("breadcrumbs_ties").layout_aware
    for name in ("della", "della_linear", "pcb"):  # rows or quantiles of the whole tensor
        method = resolve(name)
        assert not (method.layout_aware or method.elementwise or method.streaming)


@pytest.mark.parametrize("name", NEW)
def test_merge_rounds_once_and_records_the_settings(name):
    models = [
        {"w": rand(4, 6, seed=i).float(), "b": rand(6, seed=10 + i).float()} for i in range(3)
    ]
    count = 1 if name == "nearswap" else 2
    merged, lineage = terge.merge(
        models[1 : 1 + count], base=models[0], method=name, seed=3, lineage=True
    )
    method = resolve(name)
    for key in ("w", "b"):
        expected = method(
            [m[key].double() for m in models[1 : 1 + count]],
            [1 / count] * count,
            models[0][key].double(),
            seed=derive_seed(3, key) if method.random else None,
        )
        assert torch.equal(merged[key], expected.float())
        recorded = dict(method.settings)
        if method.random:
            recorded["seed"] = 3
        assert lineage[key].settings == recorded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NEW)
def test_the_same_bits_on_the_gpu_as_on_the_cpu(name):
    thetas, base = family(1 if name == "nearswap" else 3, shape=(64, 48))
    weights = [1 / len(thetas)] * len(thetas)
    method = resolve(name)
    cpu = method(thetas, weights, base, seed=4) if method.random else method(thetas, weights, base)
    gpu_in = [x.cuda() for x in thetas]
    gpu = (
        method(gpu_in, weights, base.cuda(), seed=4)
        if method.random
        else method(gpu_in, weights, base.cuda())
    )
    if name in ("pcb", "sce"):  # exp, tanh and sums of squares: libm differs by an ulp or so
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-15)
    else:
        assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("name", NEW)
def test_inputs_are_left_alone(name):
    thetas, base = family(1 if name == "nearswap" else 3)
    copies = [x.clone() for x in (*thetas, base)]
    method = resolve(name)
    weights = [1 / len(thetas)] * len(thetas)
    method(thetas, weights, base, seed=1) if method.random else method(thetas, weights, base)
    assert all(torch.equal(x, y) for x, y in zip((*thetas, base), copies, strict=True))
