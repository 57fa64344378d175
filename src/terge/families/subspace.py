"""Merges in the singular subspaces of 2-D task vectors: TSV-M, Iso-C and Iso-CTS.

Each decomposes whole 2-D tensors with ``torch.linalg.svd`` in the dtype it is given (terge gives
float64). Tensors of any other rank take the method's ``fallback``: ``"mean"`` (the papers' code:
``mean_i tau_i``) or ``"sum"`` (``sum_i tau_i``), recorded with the method's settings in the
lineage. They are not applied to sharded parameters (DTensors): the plan refuses them, since a
decomposition needs the whole matrix.
"""

from __future__ import annotations

import torch

from ..errors import MethodNotApplicableError
from .elementwise import divide

__all__ = ["iso_c_merge", "iso_cts_merge", "polar", "thin_svd", "tsv_merge"]


#: A matrix whose long side is at least this many times its short side is reduced by QR first.
LONG = 2


def thin_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(matrix, full_matrices=False)``, a long matrix first reduced by a QR
    decomposition to its short side's square (``matrix = Q R``, ``R = U' S V^T``, ``U = Q U'``:
    Chan's R-SVD, backward stable as the SVD itself). Why: LAPACK reduces a tall matrix so itself,
    but torch hands it GPT-2's wide 768 x 2,304 and 768 x 3,072 projections as they are (on this
    project's 2-core CPU: 0.45 s -> 0.27 s for one 768 x 2,304 float64 SVD). On an H200 it
    changed no SVD's time (measured 2026-11-27)."""
    rows, columns = matrix.shape
    if max(rows, columns) < LONG * min(rows, columns):
        return torch.linalg.svd(matrix, full_matrices=False)
    if rows >= columns:
        q, r = torch.linalg.qr(matrix)
        u, s, vh = torch.linalg.svd(r)
        return q @ u, s, vh
    q, r = torch.linalg.qr(matrix.mT)
    u, s, vh = torch.linalg.svd(r)
    return vh.mT, s, (q @ u).mT


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows), ``A B`` for ``matrix = A S B``:
    how TSV-M and Iso-CTS orthogonalise the singular vectors they gather."""
    left, _, right = thin_svd(matrix)
    return left @ right


def _prepare(
    name: str, tensors: list[torch.Tensor], base: torch.Tensor | None
) -> list[torch.Tensor]:
    if base is None:
        raise MethodNotApplicableError(f"{name}: needs a base model to take task vectors from.")
    return [theta - base for theta in tensors]


def _fallback(deltas: list[torch.Tensor], fallback: str) -> torch.Tensor:
    total = torch.zeros_like(deltas[0])
    for delta in deltas:
        total.add_(delta)
    return divide(total, len(deltas)) if fallback == "mean" else total


def _sum(deltas: list[torch.Tensor]) -> torch.Tensor:
    return _fallback(deltas, "sum")


def tsv_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scale: float,
    fallback: str,
) -> torch.Tensor:
    """TSV-M, task singular vectors merging (https://arxiv.org/abs/2412.00081): of each 2-D
    task vector ``tau_i = U_i S_i V_i^T`` keep the top ``k = max(1, int(r / T))`` singular
    triplets (``r = min(m, n)``, ``T`` tasks), gather them as ``U = [U_1k ... U_Tk]``, ``S``,
    ``V``, orthogonalise ``U`` and ``V`` (:func:`polar`), and add ``scale * polar(U) diag(S)
    polar(V)^T`` to the base. The merge weights are not used."""
    deltas = _prepare("tsv_m", tensors, base)
    if deltas[0].dim() != 2:
        return base + _fallback(deltas, fallback).mul_(scale)  # type: ignore[operator]
    k = max(1, int(min(deltas[0].shape) / len(deltas)))
    us, ss, vs = [], [], []
    for delta in deltas:
        u, s, vh = thin_svd(delta)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k])
    merged = (polar(torch.cat(us, dim=1)) * torch.cat(ss)) @ polar(torch.cat(vs, dim=0))
    return base + merged.mul_(scale)  # type: ignore[operator]


def iso_c_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    scale: float,
    fallback: str,
) -> torch.Tensor:
    """Iso-C (https://arxiv.org/abs/2502.04959): the 2-D task arithmetic sum ``sum_i tau_i =
    U S V^T`` with its spectrum made isotropic, ``scale * mean(S) U V^T`` added to the base.
    The merge weights are not used."""
    deltas = _prepare("iso_c", tensors, base)
    if deltas[0].dim() != 2:
        return base + _fallback(deltas, fallback).mul_(scale)  # type: ignore[operator]
    u, s, vh = thin_svd(_sum(deltas))
    return base + (u @ vh).mul_(s.mean() * scale)  # type: ignore[operator]


def iso_cts_merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    *,
    common_fraction: float,
    scale: float,
    fallback: str,
) -> torch.Tensor:
    """Iso-CTS (https://arxiv.org/abs/2502.04959): Iso-C with task-specific directions. Of
    ``r = min(m, n)`` directions, each of the ``T`` tasks gets ``s = round((r - c0) / T)``,
    ``c0 = int(r * common_fraction)``, and the common subspace the other ``c = r - s T``: the top
    ``c`` singular vectors of ``sum_i tau_i``; task ``i`` contributes the top ``s`` of its
    residual ``tau_i - U_c U_c^T tau_i``. The gathered ``U`` and ``V`` are orthogonalised
    (:func:`polar`) and every singular value set to their mean: ``scale * mean(S) polar(U)
    polar(V)^T`` added to the base. The merge weights are not used."""
    deltas = _prepare("iso_cts", tensors, base)
    if deltas[0].dim() != 2:
        return base + _fallback(deltas, fallback).mul_(scale)  # type: ignore[operator]
    r, t = min(deltas[0].shape), len(deltas)
    per_task = round((r - int(r * common_fraction)) / t)
    common = r - per_task * t
    u, s, vh = thin_svd(_sum(deltas))
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common]]
    projector = us[0]
    for delta in deltas:
        if per_task == 0:
            break
        residual = delta - projector @ (projector.T @ delta)
        ut, st, vht = thin_svd(residual)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vht[:per_task])
    mean = torch.cat(ss).mean()
    merged = polar(torch.cat(us, dim=1)) @ polar(torch.cat(vs, dim=0))
    return base + merged.mul_(mean * scale)  # type: ignore[operator]
