"""Multi-SLERP, NuSLERP and the Karcher mean against closed forms and mergekit's algorithms
written out here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import terge
from terge.errors import MergeArgumentError, MethodNotApplicableError
from terge.families import spherical
from terge.kernels import ChunkBuffers
from terge.methods import REGISTRY, karcher, multislerp, nuslerp, resolve, slerp

from helpers import same_bits, streamed, whole

T = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=T)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=T)


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


# --- Multi-SLERP ----------------------------------------------------------------------------------


def mergekit_multislerp(tensors, weights, eps=0.0):
    """mergekit's algorithm, tangent step included (its eps terms with ``eps``: the units
    ``x / (|x| + eps)`` and the step ``|tangent| + eps``)."""
    flat = torch.stack([x.reshape(-1) for x in tensors])
    w = torch.tensor(weights, dtype=T)
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
    step = tangent.norm() + eps
    result = mean * torch.cos(step) + (tangent * torch.sin(step) / step if step > 0 else 0)
    return (result * (norms[:, 0] * w).sum()).reshape(tensors[0].shape)


def test_multislerp_of_orthogonal_unit_vectors():
    merged = multislerp()([t(1, 0), t(0, 3)], [0.5, 0.5], None)
    close(merged, t(2 / math.sqrt(2), 2 / math.sqrt(2)))


@pytest.mark.parametrize("n", [2, 3, 5])
def test_multislerp_is_mergekit_s_algorithm(n):
    tensors = [rand(4, 5, seed=i) for i in range(n)]
    weights = [(i + 1) / (n * (n + 1) / 2) for i in range(n)]
    close(multislerp()(tensors, weights, None), mergekit_multislerp(tensors, weights))


@pytest.mark.parametrize("n", [2, 3])
def test_multislerp_with_eps_is_mergekit_s_arithmetic(n):
    """eps weighs the directions as mergekit does: x / (|x| + eps). A large eps shows it."""
    tensors = [rand(4, 5, seed=i) * (i + 1) for i in range(n)]
    weights = [(i + 1) / (n * (n + 1) / 2) for i in range(n)]
    method = multislerp(eps=0.5)
    expected = mergekit_multislerp(tensors, weights, eps=0.5)
    close(method(tensors, weights, None), expected)
    assert not torch.allclose(multislerp()(tensors, weights, None), expected, rtol=1e-6)
    narrowed = [x.float() for x in tensors]  # the streamed path: the same bits as the reference
    assert same_bits(
        streamed(method, torch.float32, narrowed, weights, None),
        whole(method, torch.float32, narrowed, weights, None),
    )
    assert method.settings == {"task_vectors": False, "eps": 0.5}
    assert multislerp().settings == {"task_vectors": False}  # the default is not recorded


@pytest.mark.parametrize("eps", [-1e-8, math.inf, math.nan])
def test_multislerp_eps_must_be_positive_and_finite(eps):
    with pytest.raises(MergeArgumentError, match=r"^multislerp: eps must be in \(0, ∞\), got"):
        multislerp(eps=eps)


def test_multislerp_on_task_vectors_adds_the_base_back():
    base = rand(3, 4, seed=9)
    thetas = [base + rand(3, 4, seed=i) for i in range(3)]
    expected = base + mergekit_multislerp([x - base for x in thetas], [0.2, 0.3, 0.5])
    close(multislerp(task_vectors=True)(thetas, [0.2, 0.3, 0.5], base), expected)
    method = multislerp(task_vectors=True)
    assert method.task_vectors and method.needs_base
    with pytest.raises(MethodNotApplicableError, match=r"^multislerp: needs a base model"):
        method(thetas, [0.2, 0.3, 0.5], None)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 1000), st.integers(1, 4), st.data())
def test_multislerp_of_one_model_is_the_model_and_order_does_not_matter(seed, n, data):
    tensors = [rand(3, 3, seed=seed + i) for i in range(n)]
    assert torch.equal(multislerp()(tensors[:1], [1.0], None), tensors[0])
    weights = [1 / n] * n
    order = data.draw(st.permutations(range(n)))
    close(
        multislerp()([tensors[i] for i in order], weights, None),
        multislerp()(tensors, weights, None),
    )


def test_multislerp_without_a_mean_direction_is_linear_and_ignores_zero_tensors():
    a = t(1, 2, 3)
    assert torch.equal(multislerp()([a, -a], [0.5, 0.5], None), torch.zeros(3, dtype=T))
    close(multislerp()([a, torch.zeros(3, dtype=T)], [0.5, 0.5], None), a * 0.5)


# --- NuSLERP --------------------------------------------------------------------------------------


def closed_slerp(t_, a, b):
    cos = torch.dot(a, b) / (a.norm() * b.norm())
    w = torch.acos(cos)
    return (torch.sin((1 - t_) * w) * a + torch.sin(t_ * w) * b) / torch.sin(w)


def test_nuslerp_flattened_is_slerp():
    a, b = rand(4, 5, seed=1), rand(4, 5, seed=2)
    merged = nuslerp()([a, b], [0.25, 0.75], None)
    close(merged, closed_slerp(0.75, a.reshape(-1), b.reshape(-1)).reshape(4, 5))
    close(merged, slerp()([a, b], [0.25, 0.75], None))
    close(nuslerp()([a, b], [1.0, 3.0], None), merged)  # t = w_2 / (w_1 + w_2)


@pytest.mark.parametrize("row_wise", [False, True])
def test_nuslerp_vector_by_vector(row_wise):
    a, b = rand(4, 5, seed=3), rand(4, 5, seed=4)
    b[1] = 2 * a[1]  # a parallel row: linear there
    merged = nuslerp(flatten=False, row_wise=row_wise)([a, b], [0.6, 0.4], None)
    if row_wise:  # along the first dimension: each column
        expected = torch.stack([closed_slerp(0.4, a[:, j], b[:, j]) for j in range(5)], dim=1)
    else:
        rows = [closed_slerp(0.4, a[i], b[i]) for i in range(4)]
        rows[1] = 0.6 * a[1] + 0.4 * b[1]
        expected = torch.stack(rows)
    close(merged, expected)


def test_nuslerp_zero_vectors_are_interpolated_linearly():
    a, b = t(0, 0, 0), t(1, 2, 3)
    close(nuslerp()([a, b], [0.5, 0.5], None), b * 0.5)


def test_nuslerp_takes_exactly_two_models_and_flattened_runs_on_shards():
    method = nuslerp()
    assert (method.min_models, method.max_models) == (2, 2) and method.layout_aware
    assert not nuslerp(flatten=False).layout_aware
    # vector by vector along the last dimension: each row alone, merged a block of rows at a time
    assert nuslerp(flatten=False).rowwise
    assert not nuslerp(flatten=False, row_wise=True).rowwise and not method.rowwise
    with pytest.raises(MethodNotApplicableError, match=r"^nuslerp: interpolates exactly two"):
        method([t(1.0)] * 3, [1 / 3] * 3, None)


def test_nuslerp_on_task_vectors():
    base = rand(6, seed=0)
    a, b = base + rand(6, seed=1), base + rand(6, seed=2)
    merged = nuslerp(task_vectors=True)([a, b], [0.5, 0.5], base)
    close(merged, base + closed_slerp(0.5, a - base, b - base))


# --- Karcher --------------------------------------------------------------------------------------


def test_karcher_of_two_is_the_geodesic_midpoint():
    a, b = rand(10, seed=1), rand(10, seed=2)
    merged = karcher(max_iter=50, tol=1e-12)([a, b], [0.5, 0.5], None)
    ua, ub = a / a.norm(), b / b.norm()
    close(merged, (ua + ub) / (ua + ub).norm() * (a.norm() + b.norm()) / 2)


def test_karcher_of_orthonormal_vectors_by_symmetry():
    e = torch.eye(3, dtype=T)
    merged = karcher()(list(e), [1 / 3] * 3, None)
    close(merged, torch.ones(3, dtype=T) / math.sqrt(3))


def test_karcher_weighted_converges_to_the_weighted_geodesic_point():
    # On a great circle the weighted Karcher mean of two points is at the weighted angle.
    a, b = t(1, 0), t(0, 2)
    merged = karcher(max_iter=100, tol=1e-14)([a, b], [0.75, 0.25], None)
    angle = 0.25 * math.pi / 2
    close(merged, t(math.cos(angle), math.sin(angle)) * (0.75 * 1 + 0.25 * 2))


def test_karcher_one_model_zero_tensors_and_max_iter():
    a = rand(5, seed=3)
    assert torch.equal(karcher()([a], [1.0], None), a)
    zero = torch.zeros(5, dtype=T)
    assert torch.equal(karcher()([zero, zero], [0.5, 0.5], None), zero)
    close(karcher()([a, zero], [0.5, 0.5], None), a * 0.5)  # direction a, half its norm
    many = [rand(5, seed=i) for i in range(3)]
    one = karcher(max_iter=1)(many, [1 / 3] * 3, None)
    assert not torch.equal(one, karcher(max_iter=30, tol=1e-15)(many, [1 / 3] * 3, None))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_iter": 0}, r"max_iter must be an integer of at least 1, got 0\."),
        ({"max_iter": 2.5}, r"max_iter must be an integer of at least 1, got 2\.5\."),
        ({"tol": 0}, r"tol must be in \(0, ∞\), got 0\."),
        ({"tol": math.nan}, r"tol must be in \(0, ∞\), got nan\."),
        ({"task_vectors": 1}, r"task_vectors must be True or False; got 1\."),
    ],
)
def test_karcher_settings_are_checked(options, message):
    with pytest.raises(MergeArgumentError, match=f"^karcher: {message}$"):
        karcher(**options)


@pytest.mark.parametrize("factory", [multislerp, nuslerp])
def test_flags_must_be_booleans(factory):
    with pytest.raises(MergeArgumentError, match=r"task_vectors must be True or False; got 'no'"):
        factory(task_vectors="no")


# --- all of them ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["multislerp", "nuslerp", "karcher"])
def test_through_merge_with_and_without_a_base(name):
    assert REGISTRY[name].paper
    models = [
        {"w": rand(4, 6, seed=i).float(), "b": rand(6, seed=10 + i).float()} for i in range(3)
    ]
    contributors = models[:2] if name == "nuslerp" else models
    merged, lineage = terge.merge(contributors, method=name, lineage=True)
    method = resolve(name)
    n = len(contributors)
    for key in ("w", "b"):
        expected = method([m[key].double() for m in contributors], [1 / n] * n, None)
        assert torch.equal(merged[key], expected.float())
        assert lineage[key].settings == dict(method.settings)
    on_tasks = getattr(terge.methods, name)(task_vectors=True)
    merged = terge.merge(models[1:], base=models[0], method=on_tasks)
    expected = on_tasks([m["w"].double() for m in models[1:]], [0.5, 0.5], models[0]["w"].double())
    assert torch.equal(merged["w"], expected.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["multislerp", "nuslerp", "karcher"])
def test_on_the_gpu_as_on_the_cpu(name):
    tensors = [rand(16, 12, seed=i) for i in range(2 if name == "nuslerp" else 3)]
    weights = [1 / len(tensors)] * len(tensors)
    method = resolve(name)
    cpu = method(tensors, weights, None)
    gpu = method([x.cuda() for x in tensors], weights, None)
    close(gpu.cpu(), cpu)


@pytest.mark.parametrize("task_vectors", [False, True])
@pytest.mark.parametrize("factory", [multislerp, nuslerp, karcher])
def test_inputs_are_left_alone(factory, task_vectors):
    tensors = [rand(3, 4, seed=i) for i in range(2)]
    base = rand(3, 4, seed=7)
    copies = [x.clone() for x in (*tensors, base)]
    factory(task_vectors=task_vectors)(tensors, [0.5, 0.5], base)
    assert all(torch.equal(x, y) for x, y in zip((*tensors, base), copies, strict=True))


# --- streamed: the Gram matrix in one pass, the combination in another ----------------------------

SIZES = [1, 7, (1 << 15) - 1, (1 << 15) + 3, 2 * (1 << 15) + 11]
"""Around the statistics' chunks (32,768 entries)."""

STREAMED = [
    (multislerp(), 3, False),
    (multislerp(task_vectors=True), 3, True),
    (nuslerp(), 2, False),
    (nuslerp(task_vectors=True, flatten=False), 2, True),  # 1-D: flattened all the same
    (karcher(), 3, False),
    (karcher(max_iter=3, tol=1e-9, task_vectors=True), 4, True),
]


@pytest.mark.parametrize("numel", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", range(len(STREAMED)))
def test_streamed_equals_the_reference_bit_for_bit(numel, dtype, case):
    method, n, with_base = STREAMED[case]
    base = rand(numel, seed=0).to(dtype)
    tensors = [(base.double() + rand(numel, seed=i) * 0.1).to(dtype) for i in range(1, n + 1)]
    weights = [(i + 1) / (n * (n + 1) / 2) for i in range(n)]
    origin = base if with_base else None
    expected = whole(method, dtype, tensors, weights, origin)
    assert same_bits(streamed(method, dtype, tensors, weights, origin), expected)
    copies = [x.clone() for x in tensors]  # in place: into the base, or the first model
    into = streamed(method, dtype, copies, weights, base.clone() if with_base else None, True)
    assert same_bits(into, expected)


def _on_vectors(name, tensors, weights, base, options):
    """The same methods computed on the vectors themselves (terge's code before the Gram matrix
    took over, kept for directions that cancel): an independent oracle for the coefficients."""
    task_vectors = options.get("task_vectors", False)
    if name == "multislerp":
        return spherical._multislerp_on_vectors(tensors, weights, base, None, task_vectors)
    if name == "karcher":
        return spherical._karcher_on_vectors(
            tensors, weights, base, None, options["max_iter"], options["tol"], task_vectors
        )
    v0, v1 = [(x - base if task_vectors else x).reshape(1, -1) for x in tensors]
    rows = spherical._slerp_rows(weights[1] / (weights[0] + weights[1]), v0, v1)
    return rows.reshape(tensors[0].shape) + (base if task_vectors else 0)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["multislerp", "nuslerp", "karcher"]),
    st.integers(2, 4),
    st.booleans(),
    st.integers(1, 6),
    st.integers(0, 10_000),
    st.data(),
)
def test_the_gram_matrix_gives_what_the_vectors_give(name, n, task_vectors, iterations, seed, data):
    n = 2 if name == "nuslerp" else n
    spread = data.draw(st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
    base = rand(5, 3, seed=seed)
    tensors = [base + rand(5, 3, seed=seed + 1 + i) * spread for i in range(n)]
    weights = [data.draw(st.floats(0.05, 1.0)) for _ in range(n)]
    options = {"task_vectors": task_vectors}
    if name == "karcher":
        options |= {"max_iter": iterations, "tol": 1e-12}
    merged = {"multislerp": multislerp, "nuslerp": nuslerp, "karcher": karcher}[name](**options)(
        tensors, weights, base
    )
    expected = _on_vectors(name, tensors, weights, base, options)
    torch.testing.assert_close(merged, expected, rtol=1e-10, atol=1e-12 * spread)


def test_directions_that_nearly_cancel_are_computed_on_the_vectors():
    """``m = (x_1 / |x_1| + x_2 / |x_2|) / 2`` for nearly opposite ``x_i``: ``|m|^2`` from the Gram
    matrix would be a difference of terms 10^8 times larger, so half its digits would be lost;
    on the vectors ``|m|`` is exact to the last place and so is the merge's larger entry."""
    d = 1e-4
    x1, x2 = t(1, 0), t(-1, d)
    n2 = math.hypot(1, d)
    m1, m2 = 0.5 * d * d / (n2 * (n2 + 1)), 0.5 * d / n2  # 0.5 (1 - 1 / n2) written stably
    scale = 0.5 * (1 + n2) / math.hypot(m1, m2)
    merged = multislerp()([x1, x2], [0.5, 0.5], None)
    torch.testing.assert_close(merged[1], t(m2 * scale)[0], rtol=1e-14, atol=0)
    torch.testing.assert_close(merged[0], t(m1 * scale)[0], rtol=1e-6, atol=0)
    gram = spherical._gram([x1, x2], None, None)
    assert gram is not None and spherical._multislerp_coefficients(gram, [0.5, 0.5]) is None
    buffers = ChunkBuffers(torch.float64)
    destination = torch.full((2,), 7.0, dtype=T)
    assert not multislerp().merge_into(destination, [x1, x2], [0.5, 0.5], None, scratch=buffers)


def test_a_cancelling_sum_is_told_by_its_share_of_the_terms():
    # |x_1 - x_2|^2 of four terms whose magnitudes sum to about 4: 2^-20 of that is 2^-18
    gram = [[1.0, -1.0], [-1.0, 1.0 + 2.0**-17]]
    assert spherical._square(gram, [1.0, 1.0]) == 2.0**-17
    assert spherical._square([[1.0, -1.0], [-1.0, 1.0 + 2.0**-19]], [1.0, 1.0]) is None
    assert spherical._square([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]) is None  # no direction
    assert spherical._square([[1.0, 0.0], [0.0, 1.0]], [3.0, 4.0]) == 25.0


def test_the_streamed_forms_decline_what_they_do_not_compute():
    x = rand(4, 5, seed=1)
    nan = torch.full_like(x, math.nan)
    buffers = ChunkBuffers(torch.float64)
    cases = [
        (nuslerp(flatten=False), [x, x * 2 + 1], None),  # vector by vector
        (nuslerp(row_wise=True, flatten=False), [x, x * 2 + 1], None),
        (multislerp(), [x], None),  # one model: the function returns it
        (multislerp(task_vectors=True), [x, x * 2], None),  # no base: the function says so
        (karcher(task_vectors=True), [x, x * 2], None),
        (multislerp(), [x, -x], None),  # no mean direction
        (karcher(), [x, -x], None),
        (multislerp(), [x, nan], None),  # not finite
        (karcher(), [x, nan], None),
        (karcher(tol=100.0), [x, x * 2], None),  # every vector below tol: zeros
    ]
    for method, tensors, base in cases:
        destination = torch.full(x.shape, 7.0, dtype=T)
        assert not method.merge_into(
            destination, tensors, [0.5] * len(tensors), base, scratch=buffers
        )
        assert torch.equal(destination, torch.full(x.shape, 7.0, dtype=T)), method
    assert not multislerp().merge_into(torch.empty_like(x), [x, x * 2], [0.5, 0.5], None)
    assert torch.equal(karcher(tol=100.0)([x, x * 2], [0.5, 0.5], None), torch.zeros_like(x))


def test_non_finite_inputs_merge_as_they_did():
    x, nan = rand(6, seed=2), torch.full((6,), math.nan, dtype=T)
    for name in ("multislerp", "karcher", "nuslerp"):
        merged = resolve(name)([x, nan], [0.5, 0.5], None)
        assert torch.isnan(merged).all(), name


def test_karcher_starts_from_the_first_direction_when_the_weighted_one_is_shorter_than_tol():
    """Three orthogonal directions: their mean has norm 1/sqrt(3), under tol = 0.6, so the
    iteration starts from the first (mergekit's rule), as on the vectors themselves."""
    e = torch.eye(3, dtype=T) * torch.tensor([[1.0], [2.0], [3.0]], dtype=T)
    method = karcher(max_iter=1, tol=0.6)
    merged = method(list(e), [1 / 3] * 3, None)
    close(merged, spherical._karcher_on_vectors(list(e), [1 / 3] * 3, None, None, 1, 0.6, False))
    assert not torch.allclose(merged, karcher(max_iter=1, tol=0.5)(list(e), [1 / 3] * 3, None))


def test_karcher_leaves_out_directions_closer_to_the_mean_than_tol():
    """On a circle the Karcher iteration is one of angles: ``phi += sum_i a_i (theta_i - phi)``
    over the directions at least ``tol`` from ``phi``, stopping at a step under ``tol``. With
    weights 0.98 and 0.02 on directions 0 and pi/2 and tol = 0.025, the first direction is
    0.0204 from the start and left out of the first step (0.031), so the mean moves; counting
    it would make the step 0.011 and stop at the start."""
    weights, angles, tol = [0.98, 0.02], [0.0, math.pi / 2], 0.025
    phi = math.atan2(0.02, 0.98)
    for _ in range(10):
        step = sum(a * (th - phi) for a, th in zip(weights, angles) if abs(th - phi) >= tol)
        if abs(step) < tol:
            break
        phi += step
    assert phi > 0.05  # it moved
    merged = karcher(max_iter=10, tol=tol)([t(1, 0), t(0, 2)], weights, None)
    close(merged, t(math.cos(phi), math.sin(phi)) * (0.98 * 1 + 0.02 * 2))
