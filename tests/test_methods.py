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
    "name", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"]
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
