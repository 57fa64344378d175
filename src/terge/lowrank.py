"""Truncated SVD in float64: a weight difference as the two LoRA factors that reproduce it best.

For a difference ``D`` (``out x in``) with singular values ``s``, the rank-``r`` truncation
``D_r = U_r diag(s_r) V_r^T`` is the closest rank-``r`` matrix in the Frobenius and spectral norms
(Eckart-Young). It is split evenly, ``B = U_r sqrt(s_r)`` and ``A = sqrt(s_r) V_r^T``, so that
``B @ A == D_r`` with a LoRA scaling of 1 (``lora_alpha == r``) and neither factor dwarfs the
other. The relative error ``||D - D_r||_F / ||D||_F = sqrt(sum_{i>r} s_i^2 / sum s_i^2)`` comes
from the singular values, without forming ``D_r``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from .errors import MergeArgumentError

ENERGY_TOLERANCE = 1e-12
"""A cumulative share this close below the threshold counts as reaching it (float64 sums)."""


class Factors(NamedTuple):
    """``B @ A`` is the rank-``rank`` truncation of the difference, in float64."""

    A: torch.Tensor
    """``rank x in``: ``sqrt(s) V^T``."""
    B: torch.Tensor
    """``out x rank``: ``U sqrt(s)``."""
    rank: int
    error: float
    """``||D - B @ A||_F / ||D||_F`` (0 for an exact factoring; 0 when ``D`` is zero)."""
    energy: float
    """The share of ``||D||_F^2`` kept: ``sum_{i<=r} s_i^2 / sum s_i^2`` (1 when ``D`` is zero)."""
    norm: float
    """``||D||_F``."""


def check_rank(rank: Any, where: str = "`rank`") -> int:
    """A rank: an int of at least 1 (never a bool, a float or a string)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MergeArgumentError(
            f"{where} must be a positive int (the number of singular values kept); got {rank!r}."
        )
    return rank


def check_energy(energy: Any) -> float:
    """An energy threshold: a real number in (0, 1]."""
    if isinstance(energy, bool) or not isinstance(energy, (int, float)):
        raise MergeArgumentError(
            f"`energy` must be a number in (0, 1] (the share of the squared singular values to "
            f"keep, e.g. 0.9); got {energy!r}."
        )
    value = float(energy)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise MergeArgumentError(
            f"`energy` must be in (0, 1] (the share of the squared singular values to keep, "
            f"e.g. 0.9); got {energy!r}."
        )
    return value


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep at least ``energy`` of ``sum s_i^2``
    (at least 1; all of them for ``energy == 1``)."""
    squares = singular_values.to(torch.float64).square()
    total = float(squares.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    # the first index whose cumulative share reaches energy, within rounding (a share that is
    # exactly the threshold may be summed a hair below it); clamped, as the last share may be
    # a hair below 1
    short = int((kept < energy - ENERGY_TOLERANCE).sum())
    return min(short + 1, squares.numel())


def factor(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Factors:
    """The best rank-``rank`` factors of the 2-D ``delta`` (or the smallest rank keeping
    ``energy``), computed by a full thin SVD in float64.

    ``rank`` must not exceed ``min(delta.shape)``; give exactly one of ``rank`` and ``energy``.
    """
    if (rank is None) == (energy is None):
        raise MergeArgumentError("factor() takes exactly one of `rank` and `energy`.")
    if delta.dim() != 2:
        raise MergeArgumentError(f"factor() takes a 2-D tensor; got shape {tuple(delta.shape)}.")
    work = delta.detach().to(torch.float64)
    if work.shape[0] < work.shape[1]:
        # LAPACK's thin SVD of a wide matrix is several times slower than of its (tall)
        # transpose: D^T = U S V^T gives D = V S U^T, the same factors swapped
        V, S, Uh = torch.linalg.svd(work.T.contiguous(), full_matrices=False)
        U, Vh = Uh.T, V.T
    else:
        U, S, Vh = torch.linalg.svd(work.contiguous(), full_matrices=False)
    if energy is not None:
        rank = rank_for_energy(S, energy)
    assert rank is not None
    if rank > S.numel():
        raise MergeArgumentError(
            f"rank {rank} exceeds the smallest dimension of a {tuple(delta.shape)} matrix "
            f"({S.numel()}); pass a rank of at most {S.numel()}."
        )
    squares = S.square()
    total = float(squares.sum())
    dropped = float(squares[rank:].sum())
    root = S[:rank].sqrt()
    B = U[:, :rank] * root
    A = root[:, None] * Vh[:rank]
    error = math.sqrt(dropped / total) if total > 0 else 0.0
    energy_kept = 1.0 - dropped / total if total > 0 else 1.0
    return Factors(A.contiguous(), B.contiguous(), rank, error, energy_kept, math.sqrt(total))
