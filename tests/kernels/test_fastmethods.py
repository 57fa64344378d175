"""The compiled task-vector methods (``terge.kernels._fastmethods``) against the plain-torch reference,
bit for bit."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import terge
from terge import methods
from terge.kernels import cpu, fastmethods
from terge.kernels.fastmethods import _TOP

from helpers import fast, near_base, reference, same_bits

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
DENSITIES = [1e-9, 0.01, 0.1, 0.2, 0.25, 0.5, 0.7, 0.999, 1.0]
WEIGHTS = st.lists(
    st.sampled_from([1.0, 0.5, 0.25, -0.5, 1 / 3, 0.7, -1.3, 2.0, 1e-3, 0.0]),
    min_size=5,
    max_size=5,
)

needs_loops = pytest.mark.skipif(
    fastmethods._fastmethods is None,
    reason="terge.kernels._fastmethods is not built (pip install -e .)",
)


REFERENCE_RUN = os.environ.get("TERGE_KERNELS", "").lower() == "torch"


def test_the_compiled_methods_are_built():
    """The README's install builds them; only an explicit TERGE_KERNELS=torch run may lack them."""
    if REFERENCE_RUN:
        pytest.skip("TERGE_KERNELS=torch selects the reference")
    assert fastmethods.available()


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    """Both paths in every run: the compiled one here, the reference called directly."""
    monkeypatch.setenv("TERGE_KERNELS", "auto")


def method_of(name: str, density: float, gamma: float, scale: float) -> methods.Method:
    if name == "task_arithmetic":
        return methods.task_arithmetic(scale=scale)
    if name == "breadcrumbs":
        return methods.breadcrumbs(density=density, gamma=min(gamma, 1 - density), scale=scale)
    return getattr(methods, name)(density=density, scale=scale)


def check(
    name,
    numel,
    dtypes,
    out_dtype,
    seed,
    kind,
    density,
    gamma,
    scale,
    weights,
    inplace,
    divisor=None,
):
    method = method_of(name, density, gamma, scale)
    base, *tensors = near_base(numel, dtypes, seed, kind)
    if inplace:
        out_dtype = base.dtype
    weights = weights[: len(tensors)]
    divisor = divisor if method.divides else None  # the sign consensus takes ratios instead
    expected = reference(method, out_dtype, base, tensors, weights, seed, divisor)
    got = fast(method, out_dtype, base, tensors, weights, seed, inplace, divisor)
    assert same_bits(got, expected)


NAMES = ["ties", "dare_ties", "dare_linear", "task_arithmetic", "breadcrumbs"]


BOUNDARIES = [127, 128, 129, 1023, 1024, 1025, 2047, 2048, 2049]
"""Lengths around the loops' blocks (128 elements for the thresholds, 1024 for the merge)."""


@needs_loops
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(NAMES),
    numel=st.one_of(st.integers(1, 70), st.integers(100, 3000), st.sampled_from(BOUNDARIES)),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=2, max_size=6),
    out_dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    density=st.sampled_from(DENSITIES),
    gamma=st.sampled_from([0.0, 0.01, 0.1, 0.3]),
    scale=st.sampled_from([1.0, 0.7, -2.0]),
    weights=WEIGHTS,
    equal=st.booleans(),
    inplace=st.booleans(),
    same=st.booleans(),
    divisor=st.sampled_from([None, 3.0, 4.0, 0.1, 2.0**-1030, 6.5e307]),
)
def test_equals_the_reference_bit_for_bit(
    name,
    numel,
    dtypes,
    out_dtype,
    seed,
    kind,
    density,
    gamma,
    scale,
    weights,
    equal,
    inplace,
    same,
    divisor,
):
    """Every dtype mix, 1 to 5 models, awkward values, into a fresh tensor or the base itself;
    the weighted sums divided once by a divisor (by a power of two, a subnormal one too, as a
    product with its exact inverse) or not."""
    if same:  # one dtype for all: float32 runs the loops straight from the inputs
        dtypes = [dtypes[0]] * len(dtypes)
        out_dtype = dtypes[0]
    if equal:  # normalised equal weights: with two models, TIES divides by powers of two
        weights = [1 / (len(dtypes) - 1)] * 5
    check(
        name, numel, dtypes, out_dtype, seed, kind, density, gamma, scale, weights, inplace, divisor
    )


@needs_loops
@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(NAMES),
    models=st.integers(1, 5),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    density=st.sampled_from(DENSITIES),
    weights=WEIGHTS,
)
def test_split_between_threads_and_sampled(name, models, dtype, seed, kind, density, weights):
    """Ranges split between threads (and thresholds bracketed by samples) give the same bits."""
    numel = 4 * 1024 + 77
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu, "PER_THREAD", 1000)
        patch.setattr(fastmethods, "_SAMPLED", 1000)
        patch.setattr(torch, "get_num_threads", lambda: 3)
        dtypes = [dtype] * (models + 1)
        check(name, numel, dtypes, dtype, seed, kind, density, 0.05, 1.0, weights, True)


@needs_loops
@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["ties", "breadcrumbs", "dare_ties"]),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=3, max_size=3),
    same=st.booleans(),
    seed=st.integers(0, 2**16),
    kind=st.integers(0, 2),
    density=st.sampled_from([0.2, 0.5, 1.0]),
    inplace=st.booleans(),
)
def test_two_models_with_unit_weights_and_scale(name, dtypes, same, seed, kind, density, inplace):
    """TIES' and breadcrumbs' defaults with two models (weights 1, scale 1) have a loop of their
    own, with num / den as num, num or num * 0.5: the reference's bits, ties and NaNs included."""
    if same:
        dtypes = [dtypes[0]] * 3
    check(name, 2000, dtypes, dtypes[0], seed, kind, density, 0.05, 1.0, [1.0, 1.0], inplace)


@needs_loops
@pytest.mark.parametrize("numel", [fastmethods._SAMPLED - 1, fastmethods._SAMPLED, 30_000])
def test_the_default_sampling_threshold_gives_the_references_bits(numel, monkeypatch):
    """Without any patching, a tensor just below the threshold collects every magnitude and one
    at or above it is bracketed by samples (counted here): both give the reference's bits."""
    sampled = []
    original = fastmethods._bracket

    def counted(*args):
        sampled.append(1)
        return original(*args)

    monkeypatch.setattr(fastmethods, "_bracket", counted)
    for name in ["ties", "breadcrumbs"]:
        check(name, numel, [torch.float32] * 3, torch.float32, 3, 0, 0.3, 0.05, 1.0,
              [0.5, 0.5], False)  # fmt: skip
    assert bool(sampled) == (numel >= fastmethods._SAMPLED)


def brackets(kind: str):
    """A stand-in for fastmethods._bracket that puts the bracket where the k-th is not (or
    leaves too little room), so that the fallbacks run."""
    original = fastmethods._bracket

    def bracket(base, tensors, searches, workspace):
        original(base, tensors, searches, workspace)
        for search in searches:
            if kind == "high":  # above every magnitude: the k-th lies below the bracket
                search.lo, search.hi = _TOP - 3, _TOP - 1
            elif kind == "low":  # nothing but zeros in it: the k-th lies above
                search.lo, search.hi = 0, 1
            elif kind == "full":  # too many to collect: histograms narrow it down
                search.cap = 5

    return bracket


@needs_loops
@pytest.mark.parametrize("kind", ["high", "low", "full"])
@pytest.mark.parametrize("collect", [1 << 20, 3])
@pytest.mark.parametrize("values", [0, 1])
def test_brackets_that_miss_fall_back_to_histograms(kind, collect, values, monkeypatch):
    monkeypatch.setattr(fastmethods, "_SAMPLED", 100)
    monkeypatch.setattr(fastmethods, "_COLLECT", collect)
    monkeypatch.setattr(fastmethods, "_bracket", brackets(kind))
    for name in ["ties", "breadcrumbs"]:
        check(name, 2000, [torch.float32] * 3, torch.float32, 7, values, 0.3, 0.1, 1.0,
              [0.5, 0.5], False)  # fmt: skip


@needs_loops
def test_one_value_everywhere_and_k_of_one(monkeypatch):
    """All magnitudes tied (counted at a bracket's end, never collected) and k = 1."""
    monkeypatch.setattr(fastmethods, "_SAMPLED", 100)
    base = torch.zeros(5000)
    tensors = [torch.full((5000,), 0.5), torch.full((5000,), -0.5)]
    for density in [1e-9, 0.3]:
        method = methods.ties(density=density)
        expected = reference(method, torch.float32, base, tensors, [0.3, 0.7], None)
        assert same_bits(
            fast(method, torch.float32, base, tensors, [0.3, 0.7], None, False), expected
        )


@needs_loops
@pytest.mark.parametrize("unchanged", [1.0, 0.9, 0.5])
def test_a_mostly_unchanged_task_vector_takes_one_pass(unchanged, monkeypatch):
    """Zeros tied at a bracket's end are counted, not collected: no fallback pass for them."""
    passes = []
    for name in ["_pass", "_pass_keys"]:  # every read of the inputs after the samples
        original = getattr(fastmethods, name)
        monkeypatch.setattr(fastmethods, name, lambda *a, f=original: (passes.append(1), f(*a))[1])
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(200_000, generator=generator)
    changed = torch.rand(200_000, generator=generator) >= unchanged
    tensors = [base + changed * torch.randn(200_000, generator=generator) for _ in range(2)]
    for name in ["ties", "breadcrumbs"]:
        method = method_of(name, 0.2, 0.01, 1.0)
        expected = reference(method, torch.float32, base, tensors, [0.5, 0.5], None)
        got = fast(method, torch.float32, base, tensors, [0.5, 0.5], None, False)
        assert same_bits(got, expected)
    assert len(passes) == 2


@needs_loops
@pytest.mark.parametrize("serial", [0, 1 << 30])
def test_selections_in_threads_or_in_the_caller_give_the_same_bits(serial, monkeypatch):
    """The selections after a pass run in the worker threads (serial 0) or one after another
    in the calling thread: the same thresholds either way."""
    monkeypatch.setattr(fastmethods, "_SERIAL_SELECT", serial)
    monkeypatch.setattr(fastmethods, "_SAMPLED", 1000)
    for name in ["ties", "breadcrumbs"]:
        check(name, 20_000, [torch.float32] * 4, torch.float32, 3, 1, 0.2, 0.05, 1.0,
              [0.5, 0.3, 0.2], False)  # fmt: skip


@needs_loops
def test_a_small_tensor_never_waits_on_a_worker_thread(monkeypatch):
    """A small tensor's selections (a few thousand values) run in the calling thread: handing
    each to a worker cost more than the selection (a GPT-2's 98 small tensors: 23-28 ms ->
    13 ms for breadcrumbs_ties)."""
    monkeypatch.setattr(cpu, "threads", lambda: pytest.fail("a worker thread was asked for"))
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(3072, generator=generator)
    tensors = [base + torch.randn(3072, generator=generator) for _ in range(3)]
    for name in ["ties", "breadcrumbs"]:
        method = method_of(name, 0.2, 0.05, 1.0)
        expected = reference(method, torch.float32, base, tensors, [0.5, 0.3, 0.2], None)
        got = fast(method, torch.float32, base, tensors, [0.5, 0.3, 0.2], None, False)
        assert same_bits(got, expected)


@needs_loops
def test_equal_power_of_two_weights_multiply_and_others_divide():
    assert fastmethods._power_of_two(0.5) and fastmethods._power_of_two(-4.0)
    assert not fastmethods._power_of_two(1 / 3) and not fastmethods._power_of_two(5e-324)
    assert fastmethods._exact_denominators((0.5, 0.5))
    assert fastmethods._exact_denominators((1.0, -2.0))  # 0, 1, -2, -1
    assert not fastmethods._exact_denominators((1 / 3,) * 3)
    assert not fastmethods._exact_denominators((0.5,) * 9)  # too many to check: divide


@needs_loops
def test_the_sign_consensus_takes_no_divisor():
    """A divisor with TIES' disjoint mean would be silently ignored by the loops: refused."""
    base, *tensors = near_base(64, [torch.float32] * 3, 0, 1)
    with pytest.raises(ValueError, match="the sign consensus takes no divisor"):
        fastmethods.merge_into(
            base.clone(),
            tensors,
            [1.0, 1.0],
            base,
            sparsification=None,
            consensus="sign",
            divisor=2.0,
        )


@needs_loops
def test_merge_takes_the_compiled_path(monkeypatch):
    """merge() never runs the torch function for whole CPU tensors with float64 accumulation."""

    def refuse(*_, **__):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(methods, "_task_vector_merge", refuse)
    torch.manual_seed(0)
    models = [torch.nn.Linear(300, 300) for _ in range(3)]
    for name in NAMES:
        terge.merge(models, method=name, seed=1)
    with pytest.raises(AssertionError, match="the reference ran"):
        terge.merge(models, method="ties", dtype=torch.float32)


@needs_loops
def test_terge_kernels_torch_forces_the_reference(monkeypatch):
    monkeypatch.setenv("TERGE_KERNELS", "torch")
    calls = []
    real = methods._task_vector_merge
    monkeypatch.setattr(
        methods, "_task_vector_merge", lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    )
    monkeypatch.setattr(fastmethods._fastmethods, "merge", None)  # would fail if called
    models = [torch.nn.Linear(4, 4) for _ in range(3)]
    terge.merge(models, method="ties")
    assert len(calls) == 2


@needs_loops
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("weights", [None, [1, 2, 3, 4]])
@pytest.mark.parametrize("name", NAMES)
def test_merge_equals_the_reference_end_to_end(name, weights, inplace, monkeypatch):
    """Whole models, in place and not, both ways: the same state dicts bit for bit."""
    torch.manual_seed(3)
    models = [
        torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.LayerNorm(48)) for _ in range(4)
    ]
    for model in models[1:]:
        with torch.no_grad():
            for p, q in zip(model.parameters(), models[0].parameters(), strict=True):
                p.copy_(q + 0.01 * torch.randn_like(q))
    results = {}
    for kernels_ in ["torch", "auto"]:
        monkeypatch.setenv("TERGE_KERNELS", kernels_)
        copies = [copy.deepcopy(m) for m in models]
        merged = terge.merge(copies, method=name, seed=5, weights=weights, inplace=inplace)
        results[kernels_] = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    for key, value in results["torch"].items():
        assert same_bits(results["auto"][key], value), key


def test_falls_back_where_the_loops_do_not_apply():
    """Non-contiguous, empty, seedless random or partly overlapping tensors: the reference."""
    method = methods.ties()
    base = torch.randn(8, 8)
    tensors = [torch.randn(8, 8) for _ in range(2)]
    assert not method.merge_into(torch.empty(8, 8).t(), tensors, [0.5, 0.5], base)
    assert not method.merge_into(torch.empty(0), [torch.empty(0)], [1.0], torch.empty(0))
    assert not methods.dare_ties().merge_into(torch.empty(8, 8), tensors, [0.5, 0.5], base, None)
    overlapping = torch.randn(65)
    assert not method.merge_into(overlapping[1:], [overlapping[:64]], [1.0], torch.randn(64))


# --- mergekit's options: the loops decline them, the reference computes them ---------------------


@needs_loops
@pytest.mark.parametrize(
    "method",
    [
        methods.ties(trim="exact"),
        methods.ties(rescale="l1"),
        methods.ties(elect="weighted"),
        methods.ties(disjoint_mean=False),
        methods.ties(density=[0.2, 0.5]),
        methods.dare_ties(rescale="none"),
        methods.dare_linear(rescale="l2"),
        methods.breadcrumbs(density=0.9, gamma=0.2, trim="exact"),
        methods.breadcrumbs(gamma=[0.01, 0.02]),
    ],
    ids=repr,
)
def test_the_loops_decline_mergekit_options_and_write_nothing(method):
    base, *tensors = near_base(300, [torch.float32] * 3, 0, 1)
    destination = torch.full(base.shape, 7.0)
    assert not method.merge_into(destination, tensors, [0.5, 0.5], base, 1)
    assert torch.equal(destination, torch.full(base.shape, 7.0))


@needs_loops
def test_an_option_the_loops_do_not_know_is_declined_not_ignored():
    base, *tensors = near_base(300, [torch.float32] * 3, 0, 1)
    destination = torch.empty(base.shape)
    args = (destination, tensors, [0.5, 0.5], base)
    assert not fastmethods.merge_into(*args, sparsification=None, consensus=None, novel=1)


@needs_loops
@pytest.mark.parametrize(
    "method",
    [methods.ties(rescale="none", elect="task_vector"), methods.dare_ties(rescale="density")],
    ids=repr,
)
def test_options_at_their_defaults_keep_the_loops(method):
    assert not {"rescale", "elect", "trim"} & set(method.settings)  # not recorded either
    base, *tensors = near_base(300, [torch.float32] * 3, 0, 1)
    destination = torch.empty(base.shape)
    assert method.merge_into(destination, tensors, [0.5, 0.5], base, 1)
