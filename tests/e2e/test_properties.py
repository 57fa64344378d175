"""Invariants of merge(), checked by hypothesis on random models and weights."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

import terge

from helpers import assert_unchanged, snapshot

shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
int_weights = st.lists(st.integers(1, 9), min_size=2, max_size=4)


def random_states(seed: int, count: int, shape: tuple[int, ...], dtype: torch.dtype):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "a": torch.randn(shape, generator=generator).to(dtype),
            "b": torch.randn(3, generator=generator).to(dtype),
        }
        for _ in range(count)
    ]


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 2**31), shapes, dtypes, st.lists(st.floats(0.01, 100), min_size=2, max_size=4)
)
def test_merging_a_model_with_itself_gives_it_back(seed, shape, dtype, weights):
    (state,) = random_states(seed, 1, shape, dtype)
    merged = terge.merge([state] * len(weights), weights=weights)
    for name in state:
        if dtype == torch.float64:
            # Accumulating float64 in float64 leaves no spare bits: a few ulps of rounding remain.
            torch.testing.assert_close(merged[name], state[name], rtol=1e-15, atol=1e-15)
        else:  # float64 accumulation error is far below half an ulp of these dtypes
            assert torch.equal(merged[name], state[name])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), shapes, dtypes, int_weights, st.randoms(use_true_random=False))
def test_order_invariance_with_permuted_weights(seed, shape, dtype, weights, rng):
    # Integer weights make every float64 product and partial sum exact, so any order agrees.
    states = random_states(seed, len(weights), shape, dtype)
    order = list(range(len(weights)))
    rng.shuffle(order)
    merged = terge.merge(states, weights=weights)
    permuted = terge.merge(
        [states[i] for i in order], weights=[weights[i] for i in order], base=order.index(0)
    )
    for name in merged:
        assert torch.equal(merged[name], permuted[name])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), shapes, dtypes, int_weights, st.integers(-20, 20))
def test_scaling_all_weights_changes_nothing_when_normalised(seed, shape, dtype, weights, power):
    states = random_states(seed, len(weights), shape, dtype)
    scale = 2.0**power  # exact in binary, so results must agree bit for bit
    merged, lineage = terge.merge(states, weights=weights, lineage=True)
    scaled, scaled_lineage = terge.merge(states, weights=[w * scale for w in weights], lineage=True)
    assert lineage == scaled_lineage
    for name in merged:
        assert torch.equal(merged[name], scaled[name])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), shapes, st.lists(st.floats(0.1, 10), min_size=2, max_size=4))
def test_scaling_by_any_factor_changes_results_by_rounding_at_most(seed, shape, weights):
    states = random_states(seed, len(weights), shape, torch.float64)
    merged = terge.merge(states, weights=weights)
    scaled = terge.merge(states, weights=[w * 3.7 for w in weights])
    for name in merged:
        # 3.7 is no power of two: the normalised weights w*3.7 / sum(w*3.7) differ from
        # w / sum(w) by rounding, which moves a float64 result by a few ulps.
        torch.testing.assert_close(merged[name], scaled[name], rtol=1e-13, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), shapes, dtypes, int_weights, st.booleans())
def test_inputs_untouched_and_identity_kept_in_place(seed, shape, dtype, weights, inplace):
    states = random_states(seed, len(weights), shape, dtype)
    before = [snapshot(s) for s in states]
    tensors = dict(states[0])
    merged = terge.merge(states, weights=weights, inplace=inplace)
    if inplace:
        assert merged is states[0]
        assert all(merged[name] is tensors[name] for name in tensors)
        before, states = before[1:], states[1:]
    else:
        assert all(merged[name] is not tensors[name] for name in tensors)
    for state, snap in zip(states, before):
        assert_unchanged(state, snap)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31), shapes, int_weights)
def test_merge_equals_its_closed_form(seed, shape, weights):
    states = random_states(seed, len(weights), shape, torch.float32)
    merged = terge.merge(states, weights=weights)
    for name in merged:
        expected = sum(w * s[name].double() for w, s in zip(weights, states)) / sum(weights)
        assert torch.equal(merged[name], expected.float())  # exact: integer weights
