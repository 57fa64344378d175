"""Truncated SVD into LoRA factors: closed forms, Eckart-Young, the energy rule, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from terge.errors import MergeArgumentError
from terge.lowrank import check_energy, check_rank, factor, rank_for_energy


def low_rank(out: int, inner: int, rank: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(out, rank, generator=generator, dtype=torch.float64)
    right = torch.randn(rank, inner, generator=generator, dtype=torch.float64)
    return left @ right


def test_an_exactly_low_rank_difference_is_factored_exactly():
    delta = low_rank(12, 9, 3)
    found = factor(delta, rank=3)
    assert (found.A.shape, found.B.shape, found.rank) == ((3, 9), (12, 3), 3)
    torch.testing.assert_close(found.B @ found.A, delta, rtol=0, atol=1e-12)
    assert found.error < 1e-12
    assert found.energy == pytest.approx(1.0)
    assert found.norm == pytest.approx(float(torch.linalg.norm(delta)))


def test_the_factors_share_the_singular_values_evenly():
    found = factor(low_rank(10, 7, 4, seed=1), rank=4)
    # B = U sqrt(S), A = sqrt(S) V^T: B's columns and A's rows have equal norms, sqrt(s_i)
    torch.testing.assert_close(found.B.norm(dim=0), found.A.norm(dim=1))


@pytest.mark.parametrize("rank", [1, 2, 5, 8])
def test_the_reported_error_is_the_truncation_error_and_the_best_possible(rank):
    delta = torch.randn(8, 11, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    found = factor(delta, rank=rank)
    residual = torch.linalg.norm(delta - found.B @ found.A) / torch.linalg.norm(delta)
    assert found.error == pytest.approx(float(residual), rel=1e-9, abs=1e-12)
    s = torch.linalg.svdvals(delta)
    assert found.error == pytest.approx(float(s[rank:].norm() / s.norm()), rel=1e-9, abs=1e-12)
    assert found.energy == pytest.approx(1 - found.error**2)
    # Eckart-Young: no rank-r matrix is closer, e.g. a random one or the first r columns' fit
    other = low_rank(8, 11, rank, seed=99)
    assert torch.linalg.norm(delta - other) >= torch.linalg.norm(delta - found.B @ found.A)


def test_the_error_falls_as_the_rank_rises_and_vanishes_at_full_rank():
    delta = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = [factor(delta, rank=r).error for r in range(1, 7)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-12


def test_a_float32_input_is_factored_in_float64():
    delta = low_rank(5, 4, 2).float()
    found = factor(delta, rank=2)
    assert found.A.dtype == found.B.dtype == torch.float64


def test_a_zero_difference_has_no_error():
    found = factor(torch.zeros(4, 3), rank=1)
    assert (found.error, found.energy, found.norm) == (0.0, 1.0, 0.0)
    assert not (found.B @ found.A).any()


# --- the energy rule on constructed spectra ---------------------------------------------------


@pytest.mark.parametrize(
    ("energy", "expected"),
    [(0.5, 1), (0.64, 1), (0.65, 2), (0.8, 2), (0.89, 3), (0.9, 3), (0.91, 4), (1.0, 4)],
)
def test_energy_picks_the_smallest_rank_that_keeps_it(energy, expected):
    # squares 64, 16, 10, 10 of 100: cumulative shares 0.64, 0.80, 0.90, 1.0
    s = torch.tensor([8.0, 4.0, math.sqrt(10), math.sqrt(10)], dtype=torch.float64)
    assert rank_for_energy(s, energy) == expected
    U, _ = torch.linalg.qr(torch.randn(6, 4, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(5, 4, dtype=torch.float64))
    found = factor(U @ torch.diag(s) @ V.T, energy=energy)
    assert found.rank == expected
    assert found.energy >= energy - 1e-12
    # one rank fewer would not have kept it
    assert expected == 1 or factor(U @ torch.diag(s) @ V.T, rank=expected - 1).energy < energy


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8),
    st.floats(0.01, 1.0),
)
def test_energy_rank_is_minimal(values, energy):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    rank = rank_for_energy(s, energy)
    shares = torch.cumsum(s.square(), 0) / s.square().sum()
    assert 1 <= rank <= len(values)
    assert rank == len(values) or shares[rank - 1] >= energy - 1e-12
    assert rank == 1 or shares[rank - 2] < energy - 1e-12


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, "4", None])
def test_a_rank_must_be_a_positive_int(rank):
    with pytest.raises(MergeArgumentError, match=r"`rank` must be a positive int .* got"):
        check_rank(rank)


@pytest.mark.parametrize("energy", [0, 0.0, -0.5, 1.01, float("nan"), True, "0.9"])
def test_energy_must_be_in_the_half_open_unit_interval(energy):
    with pytest.raises(MergeArgumentError, match=r"`energy` must be .*\(0, 1\]"):
        check_energy(energy)


def test_a_rank_above_the_smaller_dimension_is_refused():
    with pytest.raises(MergeArgumentError, match=r"rank 5 exceeds .* \(4, 7\) matrix \(4\)"):
        factor(torch.randn(4, 7), rank=5)


def test_factor_takes_one_of_rank_and_energy_and_a_matrix():
    with pytest.raises(MergeArgumentError, match="exactly one of `rank` and `energy`"):
        factor(torch.randn(3, 3))
    with pytest.raises(MergeArgumentError, match="exactly one of `rank` and `energy`"):
        factor(torch.randn(3, 3), rank=1, energy=0.5)
    with pytest.raises(MergeArgumentError, match=r"2-D tensor; got shape \(3,\)"):
        factor(torch.randn(3), rank=1)


def test_edges_of_the_energy_rule():
    """Energy 1 is allowed and keeps every singular value; a zero difference takes rank 1; a
    share short of the threshold by more than rounding (5e-5 here) does not reach it."""
    delta = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    assert check_energy(1) == 1.0
    assert factor(delta, energy=1.0).rank == 3
    assert factor(torch.zeros(4, 3), energy=0.9).rank == 1
    values = torch.tensor([0.9999, 0.0001], dtype=torch.float64).sqrt()
    assert rank_for_energy(values, 0.99995) == 2
    assert rank_for_energy(values, 0.9999) == 1


def test_only_matrices_are_factored():
    with pytest.raises(
        MergeArgumentError, match=r"factor\(\) takes a 2-D tensor; got shape \(2, 3, 4\)"
    ):
        factor(torch.zeros(2, 3, 4), rank=1)
