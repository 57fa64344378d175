"""The merge methods against their formulas, written out here independently of terge's helpers."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from terge import methods
from terge.errors import (
    MergeArgumentError,
    MethodNotApplicableError,
    TergeError,
    UnknownMergeMethodError,
)
from terge.layerwise import ByLayer
from terge.methods import (
    REGISTRY,
    Method,
    breadcrumbs,
    custom,
    dare_linear,
    dare_ties,
    model_stock,
    readme_table,
    resolve,
    slerp,
    task_arithmetic,
    ties,
)

from helpers import streamed, whole

SHAPE = (6, 7)
TASK_VECTOR_FACTORIES = [task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs]


def rand(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def models(n: int, seed: int = 0, shape: tuple[int, ...] = SHAPE):
    base = rand(*shape, seed=seed)
    thetas = [base + rand(*shape, seed=seed + 1 + i) for i in range(n)]
    return thetas, base


def normalised(raw: list[float]) -> list[float]:
    return [w / sum(raw) for w in raw]


# --- independent references: plain Python over flattened lists ------------------------------------


def flat(tensor: torch.Tensor) -> list[float]:
    return tensor.reshape(-1).tolist()


def unflat(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(like.shape)


def ref_task_vectors(thetas, base):
    b = flat(base)
    return [[x - y for x, y in zip(flat(theta), b, strict=True)] for theta in thetas]


def ref_combine(vectors, weights, base, scale, consensus):
    b = flat(base)
    out = []
    for j in range(len(b)):
        if consensus:
            mass = sum(w * v[j] for v, w in zip(vectors, weights, strict=True))
            sign = 1.0 if mass >= 0 else -1.0
            numerator = sum(
                w * v[j] for v, w in zip(vectors, weights, strict=True) if v[j] * sign > 0
            )
            denominator = sum(w for v, w in zip(vectors, weights, strict=True) if v[j] * sign > 0)
            delta = numerator / denominator if denominator != 0 else numerator
        else:
            delta = sum(w * v[j] for v, w in zip(vectors, weights, strict=True))
        out.append(b[j] + scale * delta)
    return unflat(out, base)


def kth_largest(vector, k):
    return sorted((abs(v) for v in vector), reverse=True)[k - 1]


def ref_top(vector, k):
    # A threshold: every entry at least as large as the k-th largest magnitude, ties included.
    threshold = kth_largest(vector, k)
    return [v if abs(v) >= threshold else 0.0 for v in vector]


def ref_ties(thetas, weights, base, density, scale):
    n = base.numel()
    k = max(1, int(density * n))
    trimmed = [ref_top(tau, k) for tau in ref_task_vectors(thetas, base)]
    return ref_combine(trimmed, weights, base, scale, consensus=True)


def ref_breadcrumbs(thetas, weights, base, density, gamma, scale):
    n = base.numel()
    keep = max(1, int(density * n))
    top = min(int(gamma * n), n - keep)
    vectors = []
    for tau in ref_task_vectors(thetas, base):
        low = kth_largest(tau, top + keep)
        high = kth_largest(tau, top) if top else math.inf
        vectors.append([v if low <= abs(v) < high else 0.0 for v in tau])
    return ref_combine(vectors, weights, base, scale, consensus=False)


M64 = 2**64
GOLDEN = 0x9E3779B97F4A7C15


def ref_mix(z):
    # splitmix64's finaliser on Python ints, written out from the specification.
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M64
    return z ^ (z >> 31)


def ref_uniform(seed, position, j):
    key = ref_mix((seed + position * GOLDEN) % M64)
    return (ref_mix((key + (j + 1) * GOLDEN) % M64) >> 11) * 2.0**-53


def ref_dare(thetas, weights, base, density, scale, seed, consensus):
    # The documented draw: entry j of the i-th task vector survives when u(seed, i, j) < density.
    vectors = []
    for i, tau in enumerate(ref_task_vectors(thetas, base)):
        vectors.append(
            [v / density if ref_uniform(seed, i, j) < density else 0.0 for j, v in enumerate(tau)]
        )
    return ref_combine(vectors, weights, base, scale, consensus)


def ref_slerp(a, b, t):
    x, y = flat(a), flat(b)
    nx = math.sqrt(sum(v * v for v in x))
    ny = math.sqrt(sum(v * v for v in y))
    if nx == 0 or ny == 0:
        return unflat([(1 - t) * u + t * v for u, v in zip(x, y, strict=True)], a)
    cos = sum(u * v for u, v in zip(x, y, strict=True)) / (nx * ny)
    if abs(cos) > 1 - 1e-4:
        return unflat([(1 - t) * u + t * v for u, v in zip(x, y, strict=True)], a)
    omega = math.acos(cos)
    s0 = math.sin((1 - t) * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return unflat([s0 * u + s1 * v for u, v in zip(x, y, strict=True)], a)


def ref_model_stock(thetas, base):
    taus = ref_task_vectors(thetas, base)
    n = len(taus)
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            ni = math.sqrt(sum(v * v for v in taus[i]))
            nj = math.sqrt(sum(v * v for v in taus[j]))
            dot = sum(u * v for u, v in zip(taus[i], taus[j], strict=True))
            cosines.append(dot / (ni * nj) if ni and nj else 0.0)
    cos = min(max(sum(cosines) / len(cosines), 0.0), 1.0)
    t = n * cos / (1 + (n - 1) * cos)
    b = flat(base)
    mean = [sum(column) / n for column in zip(*(flat(theta) for theta in thetas), strict=True)]
    return unflat([t * m + (1 - t) * y for m, y in zip(mean, b, strict=True)], base)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float64 rounding: the references below compute in Python floats, in their own
    order of operations (and with math.sin, math.acos...), so the last bits may differ."""
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


# --- against the formulas -------------------------------------------------------------------------

WEIGHTS3 = normalised([0.5, 0.3, 0.2])


@pytest.mark.parametrize("scale", [1.0, 0.7, -0.5])
def test_task_arithmetic_formula(scale):
    thetas, base = models(3)
    vectors = ref_task_vectors(thetas, base)
    expected = ref_combine(vectors, WEIGHTS3, base, scale, consensus=False)
    close(task_arithmetic(scale=scale)(thetas, WEIGHTS3, base), expected)


@pytest.mark.parametrize(
    ("density", "scale"), [(0.2, 1.0), (0.3, 1.0), (0.5, 0.8), (0.8, 1.0), (1.0, 1.0), (0.01, 2.0)]
)
def test_ties_formula(density, scale):
    thetas, base = models(3)
    expected = ref_ties(thetas, WEIGHTS3, base, density, scale)
    close(ties(density=density, scale=scale)(thetas, WEIGHTS3, base), expected)


@pytest.mark.parametrize(
    ("density", "gamma", "scale"),
    [(0.2, 0.01, 1.0), (0.35, 0.06, 1.0), (0.5, 0.1, 0.9), (0.9, 0.1, 1.0), (0.3, 0, 1)],
)
def test_breadcrumbs_formula(density, gamma, scale):
    thetas, base = models(3)
    expected = ref_breadcrumbs(thetas, WEIGHTS3, base, density, gamma, scale)
    method = breadcrumbs(density=density, gamma=gamma, scale=scale)
    close(method(thetas, WEIGHTS3, base), expected)


@pytest.mark.parametrize(("factory", "consensus"), [(dare_linear, False), (dare_ties, True)])
@pytest.mark.parametrize(("density", "scale"), [(0.5, 1.0), (0.3, 0.6), (1.0, 1.0)])
def test_dare_formula(factory, consensus, density, scale):
    thetas, base = models(3)
    expected = ref_dare(thetas, WEIGHTS3, base, density, scale, seed=7, consensus=consensus)
    method = factory(density=density, scale=scale)
    close(method(thetas, WEIGHTS3, base, seed=7), expected)


def test_slerp_formula():
    a, b = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        close(slerp()([a, b], [1 - t, t], None), ref_slerp(a, b, t))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_formula(n):
    base = rand(*SHAPE, seed=0)
    shared = rand(*SHAPE, seed=99)  # a common direction, so the cosines are positive
    thetas = [base + shared + rand(*SHAPE, seed=10 + i) for i in range(n)]
    result = model_stock()(thetas, normalised([1.0] * n), base)
    close(result, ref_model_stock(thetas, base))


# --- properties -----------------------------------------------------------------------------------


def test_ties_at_full_density_without_conflicts_is_task_arithmetic():
    base = rand(*SHAPE, seed=0)
    magnitude = rand(*SHAPE, seed=1).abs() + 0.1
    sign = torch.where(rand(*SHAPE, seed=2) >= 0, 1.0, -1.0).double()
    thetas = [base + sign * magnitude * (i + 1) for i in range(3)]
    expected = task_arithmetic()(thetas, WEIGHTS3, base)
    close(ties(density=1.0)(thetas, WEIGHTS3, base), expected)


@pytest.mark.parametrize("factory", TASK_VECTOR_FACTORIES)
def test_scale_zero_gives_the_base(factory):
    thetas, base = models(3)
    method = factory(scale=0.0)
    result = method(thetas, WEIGHTS3, base, seed=1234)
    assert torch.equal(result, base)


@pytest.mark.parametrize("factory", [*TASK_VECTOR_FACTORIES, slerp, model_stock])
def test_methods_leave_their_inputs_alone(factory):
    thetas, base = models(2)
    copies = [t.clone() for t in thetas], base.clone()
    method = factory()
    method(thetas, [0.4, 0.6], base, 1234)
    assert all(torch.equal(t, c) for t, c in zip(thetas, copies[0], strict=True))
    assert torch.equal(base, copies[1])


def test_dare_keeps_about_density_and_rescales_exactly():
    n, density = 200_000, 0.3
    base = torch.zeros(n, dtype=torch.float64)
    tau = rand(n, seed=5)
    result = dare_linear(density=density)([tau], [1.0], base, seed=3)
    kept = result != 0
    sigma = math.sqrt(density * (1 - density) / n)
    assert abs(kept.double().mean().item() - density) < 6 * sigma
    assert torch.equal(result[kept], tau[kept] / density)  # bit-exact rescale


@pytest.mark.parametrize("factory", [dare_linear, dare_ties])
def test_dare_same_seed_same_result(factory):
    thetas, base = models(3)
    method = factory(density=0.4)
    first = method(thetas, WEIGHTS3, base, seed=11)
    assert torch.equal(first, method(thetas, WEIGHTS3, base, seed=11))
    assert not torch.equal(first, method(thetas, WEIGHTS3, base, seed=12))


def test_dare_without_a_seed_draws_one_from_the_global_generator():
    thetas, base = models(2)
    torch.manual_seed(0)
    first = dare_ties(density=0.5)(thetas, [0.5, 0.5], base)
    torch.manual_seed(0)
    assert torch.equal(first, dare_ties(density=0.5)(thetas, [0.5, 0.5], base))


@pytest.mark.parametrize("factory", [ties, breadcrumbs, dare_ties])
def test_non_contiguous_tensors(factory):
    thetas, base = models(2, shape=(7, 6))
    transposed = [t.t() for t in thetas]
    expected = factory()([t.t().contiguous() for t in thetas], [0.4, 0.6], base.t(), 1234)
    close(factory()(transposed, [0.4, 0.6], base.t(), 1234), expected)


def test_ties_trim_keeps_at_least_one_entry():
    base = torch.zeros(3, dtype=torch.float64)
    theta = torch.tensor([1.0, -3.0, 2.0], dtype=torch.float64)
    result = ties(density=0.1)([theta], [1.0], base)
    assert result.tolist() == [0.0, -3.0, 0.0]


def test_ties_keeps_every_entry_tied_at_the_threshold():
    base = torch.zeros(5, dtype=torch.float64)
    theta = torch.tensor([3.0, 2.0, -2.0, 2.0, 1.0], dtype=torch.float64)
    # k = int(0.4 * 5) = 2: the threshold is the 2nd largest magnitude, 2, and all three 2s stay.
    assert ties(density=0.4)([theta], [1.0], base).tolist() == [3.0, 2.0, -2.0, 2.0, 0.0]


def test_breadcrumbs_cuts_are_thresholds_too():
    base = torch.zeros(8, dtype=torch.float64)
    theta = torch.tensor([5.0, -5.0, 3.0, 2.0, -2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    # top = int(0.125 * 8) = 1, keep = 4: hi = the 1st largest (5), lo = the 5th (2). Both 5s
    # go with the outliers; 2 <= |x| < 5 stays.
    result = breadcrumbs(density=0.5, gamma=0.125)([theta], [1.0], base)
    assert result.tolist() == [0.0, 0.0, 3.0, 2.0, -2.0, 0.0, 0.0, 0.0]


def test_ties_where_no_model_agrees_is_zero():
    base = torch.zeros(2, dtype=torch.float64)
    a = torch.tensor([1.0, 0.0], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    # Entry 0: the masses cancel, + wins, only a agrees -> a's value; entry 1: nobody -> 0.
    assert ties(density=1.0)([a, b], [0.5, 0.5], base).tolist() == [1.0, 0.0]


def test_breadcrumbs_never_wipes_a_small_tensor():
    base = torch.zeros(1, dtype=torch.float64)
    theta = torch.tensor([4.0], dtype=torch.float64)
    assert breadcrumbs(density=0.1, gamma=0.5)([theta], [1.0], base).tolist() == [4.0]
    base = torch.zeros(4, dtype=torch.float64)
    theta = torch.tensor([1.0, -4.0, 3.0, 2.0], dtype=torch.float64)
    # keep int(0.5 * 4) = 2 after removing int(0.25 * 4) = 1 outlier: -4 goes, 3 and 2 stay.
    result = breadcrumbs(density=0.5, gamma=0.25)([theta], [1.0], base)
    assert result.tolist() == [0.0, 0.0, 3.0, 2.0]


def test_slerp_endpoints():
    a, b = rand(*SHAPE, seed=1), rand(*SHAPE, seed=2)
    close(slerp()([a, b], [1.0, 0.0], None), a)
    close(slerp()([a, b], [0.0, 1.0], None), b)


def test_slerp_of_orthogonal_vectors_is_the_closed_form():
    a = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64)
    for t in (0.1, 0.5, 0.8):
        expected = math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b
        close(slerp()([a, b], [1 - t, t], None), expected)
    # the arc keeps the norm the chord would lose
    assert math.isclose(slerp()([a, b], [0.5, 0.5], None).norm().item(), 3.0)


@pytest.mark.parametrize("factor", [2.0, -0.5, 1.0 + 1e-7])
def test_slerp_of_parallel_tensors_is_linear(factor):
    a = rand(*SHAPE, seed=1)
    b = a * factor
    close(slerp()([a, b], [0.7, 0.3], None), 0.7 * a + 0.3 * b)


def test_slerp_with_a_zero_tensor_is_linear():
    a = rand(*SHAPE, seed=1)
    zero = torch.zeros_like(a)
    close(slerp()([a, zero], [0.6, 0.4], None), 0.6 * a)
    close(slerp()([zero, a], [0.6, 0.4], None), 0.4 * a)
    assert torch.equal(slerp()([zero, zero], [0.5, 0.5], None), zero)


def test_model_stock_of_identical_task_vectors_is_their_mean():
    base = rand(*SHAPE, seed=0)
    tau = rand(*SHAPE, seed=1)
    thetas = [base + tau, base + tau, base + tau]
    close(model_stock()(thetas, [0.2, 0.3, 0.5], base), base + tau)


def test_model_stock_handles_zero_and_opposed_task_vectors():
    base = rand(*SHAPE, seed=0)
    tau = rand(*SHAPE, seed=1)
    # a zero task vector: every pair touching it counts cos = 0
    thetas = [base.clone(), base + tau, base + tau]
    close(model_stock()(thetas, WEIGHTS3, base), ref_model_stock(thetas, base))
    # opposed: mean cos = -1 would divide by zero; clamped to 0, the merge stays at the base
    result = model_stock()([base + tau, base - tau], [0.5, 0.5], base)
    assert torch.isfinite(result).all()
    close(result, base)
    # all zero: the base
    close(model_stock()([base.clone(), base.clone()], [0.5, 0.5], base), base)


# --- hypothesis -----------------------------------------------------------------------------------

_values = st.floats(min_value=0.01, max_value=10.0, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(
    magnitudes=st.lists(st.lists(_values, min_size=5, max_size=5), min_size=1, max_size=4),
    signs=st.lists(st.booleans(), min_size=5, max_size=5),
    raw_weights=st.lists(st.floats(min_value=0.1, max_value=5.0), min_size=4, max_size=4),
)
def test_ties_without_conflicts_is_task_arithmetic(magnitudes, signs, raw_weights):
    base = torch.linspace(-1, 1, 5, dtype=torch.float64)
    sign = torch.tensor([1.0 if s else -1.0 for s in signs], dtype=torch.float64)
    thetas = [base + sign * torch.tensor(m, dtype=torch.float64) for m in magnitudes]
    weights = normalised(raw_weights[: len(thetas)])
    expected = task_arithmetic()(thetas, weights, base)
    # TIES divides by the agreeing weights' sum (1 up to rounding) where task arithmetic does
    # not: equal up to float64 rounding, not bit for bit.
    close(ties(density=1.0)(thetas, weights, base), expected)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 4),
    density=st.floats(min_value=0.05, max_value=1.0),
    data=st.data(),
)
def test_ties_is_invariant_to_model_order(seed, n, density, data):
    thetas, base = models(n, seed=seed, shape=(4, 5))
    weights = normalised([1.0 + i for i in range(n)])
    order = data.draw(st.permutations(range(n)))
    method = ties(density=density)
    permuted = method([thetas[i] for i in order], [weights[i] for i in order], base)
    # Another order of the models sums the same products in another order: float64 rounding.
    close(permuted, method(thetas, weights, base))


# --- bad settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", [ties, dare_linear, dare_ties, breadcrumbs])
@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan")])
def test_density_out_of_range(factory, density):
    name = factory.__name__
    message = rf"^{name}: density must be in \(0, 1\], got {density!r}\.$"
    with pytest.raises(MergeArgumentError, match=message):
        factory(density=density)


@pytest.mark.parametrize("factory", [ties, dare_linear, dare_ties, breadcrumbs])
@pytest.mark.parametrize(("density", "shown"), [("0.5", "'0.5' (str)"), (True, "True (bool)")])
def test_density_not_a_number(factory, density, shown):
    message = rf"^{factory.__name__}: density must be a real number, got {re.escape(shown)}\.$"
    with pytest.raises(MergeArgumentError, match=message):
        factory(density=density)


@pytest.mark.parametrize("factory", TASK_VECTOR_FACTORIES)
@pytest.mark.parametrize("scale", [float("inf"), float("-inf"), float("nan")])
def test_scale_not_finite(factory, scale):
    message = rf"^{factory.__name__}: scale must be a finite number, got {scale!r}\.$"
    with pytest.raises(MergeArgumentError, match=message):
        factory(scale=scale)


@pytest.mark.parametrize("factory", TASK_VECTOR_FACTORIES)
def test_scale_not_a_number(factory):
    message = rf"^{factory.__name__}: scale must be a real number, got None \(NoneType\)\.$"
    with pytest.raises(MergeArgumentError, match=message):
        factory(scale=None)


@pytest.mark.parametrize("gamma", [1, 1.0, -0.01, float("nan")])
def test_breadcrumbs_gamma_out_of_range(gamma):
    with pytest.raises(
        MergeArgumentError, match=rf"^breadcrumbs: gamma must be in \[0, 1\), got {gamma!r}\.$"
    ):
        breadcrumbs(gamma=gamma)


def test_breadcrumbs_density_plus_gamma_above_one():
    message = (
        r"^breadcrumbs: density \+ gamma must be at most 1 \(density of the entries are kept "
        r"after the gamma largest are removed\), got density=0\.95 \+ gamma=0\.1 = 1\.05"
    )
    with pytest.raises(MergeArgumentError, match=message):
        breadcrumbs(density=0.95, gamma=0.1)
    breadcrumbs(density=0.7, gamma=0.3)  # a float sum a hair from 1 is fine


def test_settings_are_keyword_only():
    with pytest.raises(TypeError):
        ties(0.5)  # type: ignore[misc]


def test_bad_settings_are_terge_errors_and_value_errors():
    with pytest.raises(TergeError):
        ties(density=2)
    with pytest.raises(ValueError, match="ties: density"):
        ties(density=2)


def test_slerp_of_three_models_is_not_applicable():
    a = rand(3, seed=1)
    with pytest.raises(
        MethodNotApplicableError, match=r"^slerp: interpolates exactly two models, got 3\.$"
    ):
        slerp()([a, a, a], [0.3, 0.3, 0.4], None)


def test_model_stock_of_one_model_is_not_applicable():
    thetas, base = models(1)
    message = r"^model_stock: needs at least two models besides the base, got 1\.$"
    with pytest.raises(MethodNotApplicableError, match=message):
        model_stock()(thetas, [1.0], base)
    with pytest.raises(MethodNotApplicableError, match=r"^model_stock: needs a base model"):
        model_stock()(thetas * 2, [0.5, 0.5], None)


@pytest.mark.parametrize("factory", TASK_VECTOR_FACTORIES)
def test_task_vector_methods_need_a_base(factory):
    thetas, _ = models(2)
    message = rf"^{factory.__name__}: needs a base model to take task vectors from\.$"
    with pytest.raises(MethodNotApplicableError, match=message):
        factory()(thetas, [0.5, 0.5], None, seed=1234)


# --- the registry and the Method contract ---------------------------------------------------------

DEFAULTS = {
    "arithmetic": {},
    "task_arithmetic": {"scale": 1.0},
    "ties": {"density": 0.2, "scale": 1.0},
    "dare_linear": {"density": 0.5, "scale": 1.0},
    "dare_ties": {"density": 0.5, "scale": 1.0},
    "breadcrumbs": {"density": 0.2, "gamma": 0.01, "scale": 1.0},
    "slerp": {},
    "model_stock": {},
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_resolve_gives_the_defaults(name):
    method = resolve(name)
    assert isinstance(method, Method)
    assert method.name == name
    assert dict(method.settings) == DEFAULTS[name]
    assert method.paper == REGISTRY[name].paper
    assert method.paper is not None


def test_registry_lists_every_method():
    assert list(REGISTRY)[: len(DEFAULTS)] == list(DEFAULTS)  # the newer: tests/families


def test_settings_record_the_given_values_as_floats():
    method = ties(density=1, scale=2)
    assert dict(method.settings) == {"density": 1.0, "scale": 2.0}
    assert all(type(v) is float for v in method.settings.values())


def test_method_flags():
    for name in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"):
        method = resolve(name)
        assert method.task_vectors
        assert method.needs_base
        assert method.random == name.startswith("dare")
        assert not method.streaming
        assert method.layout_aware  # runs on shards, summing its thresholds over them
    stock = model_stock()
    assert (stock.task_vectors, stock.needs_base, stock.min_models) == (True, True, 2)
    interpolation = slerp()
    assert (interpolation.min_models, interpolation.max_models) == (2, 2)
    assert not interpolation.task_vectors
    assert not interpolation.needs_base
    assert resolve("arithmetic").streaming
    assert resolve("arithmetic").elementwise
    assert interpolation.layout_aware and stock.layout_aware
    assert not custom(lambda tensors, weights, base: tensors[0]).elementwise
    assert custom(lambda tensors, weights, base: tensors[0], elementwise=True).elementwise
    with pytest.raises(MergeArgumentError, match=r"^`elementwise` must be True or False; got 1\.$"):
        custom(lambda tensors, weights, base: tensors[0], elementwise=1)


def test_dare_through_method_call_uses_the_seed():
    thetas, base = models(2)
    method = resolve("dare_linear")
    assert torch.equal(method(thetas, [0.5, 0.5], base, 5), method(thetas, [0.5, 0.5], base, 5))
    assert not torch.equal(method(thetas, [0.5, 0.5], base, 5), method(thetas, [0.5, 0.5], base, 6))


def test_resolve_unknown_name_lists_the_valid_names():
    with pytest.raises(UnknownMergeMethodError, match="unknown merge method 'nope'") as info:
        resolve("nope")
    for name in REGISTRY:
        assert repr(name) in str(info.value)
    assert isinstance(info.value, KeyError)


def test_resolve_passes_methods_and_wraps_callables():
    method = ties(density=0.4)
    assert resolve(method) is method

    def my_merge(tensors, weights, base):
        return tensors[0]

    wrapped = resolve(my_merge)
    assert wrapped.name == "test_resolve_passes_methods_and_wraps_callables.<locals>.my_merge"
    a = rand(3, seed=1)
    assert wrapped([a], [1.0], None) is a
    with pytest.raises(MergeArgumentError, match="must be a method name"):
        resolve(3)


def test_custom_names():
    def mean(tensors, weights, base):
        return sum(tensors) / len(tensors)

    assert custom(mean).name.endswith("mean")
    assert custom(mean, name="avg").name == "avg"
    with pytest.raises(MergeArgumentError, match="must accept \\(tensors, weights, base\\)"):
        custom(lambda tensors: tensors)


def test_readme_table():
    table = readme_table()
    lines = table.splitlines()
    assert lines[0] == "| method | settings (defaults) | formula | paper |"
    assert len(lines) == 2 + len(REGISTRY)
    assert "| `ties` | `density=0.2`, `scale=1.0` |" in table
    assert "[arXiv:2306.01708](https://arxiv.org/abs/2306.01708)" in table
    assert "\\|cos W\\|" in table  # pipes inside a cell are escaped
    for line in lines[2:]:
        assert line.replace("\\|", "").count("|") == 5


def test_all_names_exist():
    for name in methods.__all__:
        assert hasattr(methods, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("factory", [dare_linear, dare_ties])
def test_dare_draws_the_same_on_any_device(factory):
    thetas, base = models(2)
    on_cpu = factory(density=0.4)(thetas, [0.5, 0.5], base, seed=3)
    cuda = [t.cuda() for t in thetas]
    on_cuda = factory(density=0.4)(cuda, [0.5, 0.5], base.cuda(), seed=3)
    assert on_cuda.device.type == "cuda"
    assert torch.equal((on_cuda.cpu() != base), (on_cpu != base))  # the same entries dropped
    assert torch.equal(on_cuda.cpu(), on_cpu)  # and the same bits: the rescale divides exactly


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "name",
    ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "model_stock", "della"],
)
def test_task_vector_merges_give_the_same_bits_on_the_gpu_as_on_the_cpu(name):
    """A merge of GPU models (the torch reference on the GPU) equals the CPU's (the compiled
    loops where built) bit for bit, for bf16 and fp32 parameters."""
    import terge

    torch.manual_seed(0)
    cpu = [
        {"w": torch.randn(257, 129), "h": torch.randn(4099).bfloat16(), "b": torch.randn(7)}
        for _ in range(3)
    ]
    gpu = [{k: v.cuda() for k, v in m.items()} for m in cpu]
    on_cpu = terge.merge(cpu, method=name, weights=[1.0, 0.7, 0.3], seed=5)
    on_gpu = terge.merge(gpu, method=name, weights=[1.0, 0.7, 0.3], seed=5)
    for key, value in on_cpu.items():
        assert on_gpu[key].device.type == "cuda"
        assert torch.equal(on_gpu[key].cpu(), value), key


# --- mergekit's definitions, as options (closed forms written here) ------------------------------


def test_trim_exact_keeps_exactly_k_entries_ties_broken_by_position():
    base = torch.zeros(6, dtype=torch.float64)
    tau = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, -2.0], dtype=torch.float64)
    exact = ties(density=0.5, trim="exact")([tau], [1.0], base)  # k = 3: 3, then the first 2s
    assert exact.tolist() == [0.0, 3.0, 2.0, 2.0, 0.0, 0.0]
    threshold = ties(density=0.5)([tau], [1.0], base)  # every tie at the threshold
    assert threshold.tolist() == [0.0, 3.0, 2.0, 2.0, 2.0, -2.0]


def test_disjoint_mean_false_sums_the_agreeing_weighted_task_vectors():
    base = torch.zeros(3, dtype=torch.float64)
    taus = [torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, -1.0, -1.0])]
    taus = [t.double() for t in taus]
    summed = ties(density=1.0, disjoint_mean=False)(taus, [0.5, 2.0], base)
    # elected: + (6.5), + (-1: 1 - 2 = -1 < 0 so -), - ; agreeing sums of w_i tau_i
    assert summed.tolist() == [0.5 + 6.0, -2.0, -0.5 - 2.0]
    mean = ties(density=1.0)(taus, [0.5, 2.0], base)
    assert mean.tolist() == [6.5 / 2.5, -1.0, -1.0]


def test_elect_weighted_counts_agreement_of_the_weighted_task_vector():
    base = torch.zeros(1, dtype=torch.float64)
    taus = [torch.tensor([1.0]).double(), torch.tensor([-1.0]).double()]
    weights = [1.0, -0.5]  # w_i tau_i = 1, 0.5: both +; tau_i themselves disagree
    weighted = ties(density=1.0, elect="weighted", disjoint_mean=False)(taus, weights, base)
    assert weighted.tolist() == [1.5]
    plain = ties(density=1.0, disjoint_mean=False)(taus, weights, base)
    assert plain.tolist() == [1.0]


def test_per_model_densities_apply_in_contributor_order():
    base = torch.zeros(4, dtype=torch.float64)
    tau = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    merged = breadcrumbs(density=[0.25, 1.0], gamma=0.0)([tau, tau], [1.0, 1.0], base)
    assert merged.tolist() == [8.0, 3.0, 2.0, 1.0]
    with pytest.raises(MethodNotApplicableError, match="density has 2 per-model values, but 3"):
        breadcrumbs(density=[0.25, 1.0], gamma=0.0)([tau] * 3, [1.0] * 3, base)
    with pytest.raises(MergeArgumentError, match="ties: density must be in"):
        ties(density=[0.5, 1.5])
    with pytest.raises(MergeArgumentError, match="not both"):
        ties(density=[ByLayer([0.1, 0.2])])


def test_rescale_to_the_norm_before_sparsifying():
    base = torch.zeros(4, dtype=torch.float64)
    tau = torch.tensor([4.0, -3.0, 2.0, 1.0], dtype=torch.float64)
    l1 = ties(density=0.5, rescale="l1")([tau], [1.0], base)
    assert l1.tolist() == [4.0 * 10 / 7, -3.0 * 10 / 7, 0.0, 0.0]
    l2 = ties(density=0.5, rescale="l2")([tau], [1.0], base)
    assert torch.allclose(l2, torch.tensor([4.0, -3.0, 0, 0]).double() * math.sqrt(30) / 5)
    linf = ties(density=0.5, rescale="linf")([tau], [1.0], base)
    assert linf.tolist() == [4.0, -3.0, 0.0, 0.0]
    density = ties(density=0.5, rescale="density")([tau], [1.0], base)
    assert density.tolist() == [8.0, -6.0, 0.0, 0.0]
    dare = dare_linear(density=0.5, rescale="none")([tau], [1.0], base, seed=3)
    assert set(dare.tolist()) <= {0.0, *tau.tolist()}  # kept entries undivided


def test_breadcrumbs_exact_allows_density_plus_gamma_above_one_and_no_floor():
    base = torch.zeros(5, dtype=torch.float64)
    tau = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    # keep 4, top 2: the bottom cut is max(0, 5 - 4 - 2) = 0, so the 4 smallest stay
    merged = breadcrumbs(density=0.8, gamma=0.4, trim="exact")([tau], [1.0], base)
    assert merged.tolist() == [0.0, 4.0, 3.0, 2.0, 1.0]
    none = breadcrumbs(density=0.1, gamma=0.0, trim="exact")([tau], [1.0], base)
    assert none.tolist() == [0.0] * 5  # int(0.5) = 0 kept: no floor of one
    with pytest.raises(MergeArgumentError, match="trim='exact'"):
        breadcrumbs(density=0.8, gamma=0.4)


def test_mergekit_options_are_checked_and_only_non_defaults_recorded():
    assert ties().settings == {"density": 0.2, "scale": 1.0}
    assert ties(trim="exact", disjoint_mean=False).settings == {
        "density": 0.2,
        "scale": 1.0,
        "trim": "exact",
        "disjoint_mean": False,
    }
    assert dare_ties(rescale="density").settings == {"density": 0.5, "scale": 1.0}
    assert slerp().settings == {} and model_stock().settings == {}
    assert slerp(threshold=0.9995, zero="unnormalised").settings == {
        "threshold": 0.9995,
        "zero": "unnormalised",
    }
    for call, message in [
        (lambda: ties(trim="all"), "ties: trim must be one of 'threshold', 'exact'; got 'all'"),
        (lambda: dare_linear(rescale="l3"), "dare_linear: rescale must be one of"),
        (lambda: ties(disjoint_mean=1), "ties: disjoint_mean must be True or False; got 1"),
        (lambda: slerp(threshold=0), re.escape("slerp: threshold must be in (0, 1]")),
        (lambda: slerp(zero="x"), "slerp: zero must be one of 'linear', 'unnormalised'"),
        (lambda: model_stock(clamp="no"), "model_stock: clamp must be True or False"),
    ]:
        with pytest.raises(MergeArgumentError, match=message):
            call()


def test_slerp_threshold_and_the_zero_rule():
    v0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v1 = torch.tensor([math.cos(0.02), math.sin(0.02)], dtype=torch.float64)  # cos 0.9998
    linear = torch.lerp(v0, v1, 0.5)
    assert torch.equal(slerp(threshold=0.9995)([v0, v1], [0.5, 0.5], None), linear)  # mergekit
    spherical = slerp()([v0, v1], [0.5, 0.5], None)  # terge's 0.9999: on the arc
    assert torch.allclose(spherical, torch.tensor([math.cos(0.01), math.sin(0.01)]).double())
    assert not torch.allclose(spherical, linear, rtol=0, atol=1e-6)
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(slerp()([zero, v1], [0.5, 0.5], None), v1 * 0.5)
    right_angle = slerp(zero="unnormalised")([zero, v1], [0.5, 0.5], None)
    assert torch.allclose(right_angle, v1 * math.sin(math.pi / 4))  # cos 0: a right angle


def test_model_stock_unclamped_and_filter_wise():
    base = torch.zeros(2, 2, dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    # row 0: cosines -1, 0, 0 -> mean -1/3 -> 1 + 2 cos = 1/3, t = -1/(1/3) = -3
    rows = model_stock(clamp=False, filter_wise=True)([a, b, c], [1 / 3] * 3, base)
    assert torch.allclose(rows[0], -3 * (a[0] + b[0] + c[0]) / 3)
    assert torch.equal(rows[1], torch.tensor([1.0, 0.0]).double())  # cos 1, t 1: the mean
    clamped = model_stock(filter_wise=True)([a, b, c], [1 / 3] * 3, base)
    assert torch.equal(clamped[0], torch.zeros(2).double())  # cos clamped to 0: t = 0
    # whole tensors: cos(a, b) = 0, cos(a, c) = 1/2, cos(b, c) = -1/2 + ... computed here
    flat = [t.reshape(-1) for t in (a, b, c)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    cos = sum(float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm())) for i, j in pairs) / 3
    t = 3 * cos / (1 + 2 * cos)
    whole = model_stock(clamp=False)([a, b, c], [1 / 3] * 3, base)
    assert torch.allclose(whole, t * (a + b + c) / 3, rtol=0, atol=1e-15)
    # filter-wise, each row alone: a large tensor merges a block of rows at a time
    assert model_stock(filter_wise=True).rowwise
    assert not model_stock().rowwise and not model_stock(clamp=False).rowwise


# --- ratios formed from the weights as given: exact half-way points -------------------------------


def halfway_trio(count: int = 4096, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Float32 ``a, b, c`` whose mean is exactly a float32 half-way point ``x + ulp(x) / 2``:
    ``b = x``, ``c = 2 x``, ``a = 1.5 ulp(x)``; and that mean, in float64."""
    generator = torch.Generator().manual_seed(seed)
    x = (1 + torch.rand(count, generator=generator, dtype=torch.float64)).float()  # in [1, 2)
    ulp = 2.0**-23
    a = torch.full_like(x, 1.5 * ulp)
    mean = (a.double() + x.double() + 2 * x.double()) / 3
    assert torch.equal(mean, x.double() + ulp / 2)  # exact, a half-way point
    return [a, x, 2 * x], mean


def test_model_stock_mean_is_summed_then_divided():
    (a, b, c), mean = halfway_trio()
    base = torch.zeros(mean.numel(), 1, dtype=torch.float64)
    models = [t.double().reshape(-1, 1) for t in (a, b, c)]  # one-entry rows: cos 1, t = 1
    result = model_stock(filter_wise=True)(models, [1 / 3] * 3, base)
    assert torch.equal(result.reshape(-1), mean)  # not a/3 + b/3 + c/3
    assert torch.equal(result.reshape(-1).float(), mean.float())


# --- slerp and model_stock streamed: two passes over the inputs as stored ------------------------


SIZES = [1, 7, (1 << 15) - 1, (1 << 15) + 3, 2 * (1 << 15) + 11]
"""Around the statistics' chunks (32,768 entries)."""


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_slerp_streamed_equals_the_reference_bit_for_bit(numel, dtype):
    v0, v1 = rand(numel, seed=1).to(dtype), rand(numel, seed=2).to(dtype)
    for method in (slerp(), slerp(threshold=0.5)):
        for t in (0.3, 0.5):
            expected = whole(method, dtype, [v0, v1], [1 - t, t], None)
            got = streamed(method, dtype, [v0, v1], [1 - t, t], None)
            assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    parallel = streamed(slerp(), dtype, [v0, v0 * 2], [0.7, 0.3], None)
    assert torch.equal(parallel, whole(slerp(), dtype, [v0, v0 * 2], [0.7, 0.3], None))


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("models", [2, 4])
def test_model_stock_streamed_equals_the_reference_bit_for_bit(numel, dtype, models):
    base = rand(numel, seed=0).to(dtype)
    tensors = [(base.double() + rand(numel, seed=i) * 0.1).to(dtype) for i in range(1, models + 1)]
    weights = [1 / models] * models
    expected = whole(model_stock(), dtype, tensors, weights, base)
    got = streamed(model_stock(), dtype, tensors, weights, base)
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    in_place = streamed(model_stock(), dtype, tensors, weights, base.clone(), inplace=True)
    assert torch.equal(in_place, expected)


def test_the_streamed_options_decline_what_they_do_not_compute():
    from terge.kernels import ChunkBuffers

    x = rand(8, seed=1)
    buffers = ChunkBuffers(torch.float64)
    for method, base in [
        (slerp(zero="unnormalised"), None),
        (model_stock(clamp=False), x),
        (model_stock(filter_wise=True), x),
    ]:
        destination = torch.full((8,), 7.0, dtype=torch.float64)
        assert not method.merge_into(destination, [x, x * 2], [0.5, 0.5], base, scratch=buffers)
        assert torch.equal(destination, torch.full((8,), 7.0, dtype=torch.float64))


def test_streamed_angles_match_the_float64_closed_form():
    """The chunked sums differ from a whole-tensor dot product only by float64 rounding."""
    numel = 3 * (1 << 16) + 5
    v0, v1 = rand(numel, seed=3), rand(numel, seed=4) * 0.5 + rand(numel, seed=3) * 0.5
    cos = float(v0 @ v1 / (v0.norm() * v1.norm()))
    omega, t = math.acos(cos), 0.3
    closed = (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)
    got = slerp()([v0, v1], [1 - t, t], None)
    assert torch.allclose(got, closed, rtol=1e-12, atol=1e-15)
    base = rand(numel, seed=5)
    tensors = [base + rand(numel, seed=6 + i) * 0.1 + 0.05 for i in range(3)]
    taus = [t_ - base for t_ in tensors]
    c = (
        sum(
            float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm()))
            for i, j in [(0, 1), (0, 2), (1, 2)]
        )
        / 3
    )
    k = 3 * c / (1 + 2 * c)
    closed = k * (tensors[0] + tensors[1] + tensors[2]) / 3 + (1 - k) * base
    assert torch.allclose(model_stock()(tensors, [1 / 3] * 3, base), closed, rtol=1e-12, atol=1e-15)


def test_model_stock_whole_mean_is_exact_at_half_way_points():
    (a, b, c), mean = halfway_trio()
    # one-entry tensors: every cosine is exactly 1, so t = 1 and the result is the mean itself
    for i in range(0, mean.numel(), 97):
        pick = [t[i : i + 1].double() for t in (a, b, c)]
        result = model_stock()(pick, [1 / 3] * 3, torch.zeros(1, dtype=torch.float64))
        assert torch.equal(result, mean[i : i + 1])
