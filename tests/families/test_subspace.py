"""TSV-M, Iso-C and Iso-CTS against closed forms and the papers' algorithms written out here
with numpy's SVD."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import terge
from terge.errors import MergeArgumentError, MethodNotApplicableError
from terge.families.subspace import polar, thin_svd
from terge.methods import REGISTRY, iso_c, iso_cts, resolve, tsv_m

T = torch.float64


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=T)


def family(n: int, shape=(6, 5), seed: int = 0):
    base = rand(*shape, seed=seed)
    return [base + rand(*shape, seed=seed + 1 + i) for i in range(n)], base


def close(a, b) -> None:
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=T), torch.as_tensor(b, dtype=T), rtol=1e-10, atol=1e-12
    )


def np_polar(m):
    u, _, vh = np.linalg.svd(m, full_matrices=False)
    return u @ vh


# --- TSV-M ----------------------------------------------------------------------------------------


def np_tsv(taus):
    k = max(1, int(min(taus[0].shape) / len(taus)))
    svds = [np.linalg.svd(x, full_matrices=False) for x in taus]
    u = np.concatenate([s[0][:, :k] for s in svds], axis=1)
    s = np.concatenate([s[1][:k] for s in svds])
    vh = np.concatenate([s[2][:k] for s in svds], axis=0)
    return np_polar(u) @ np.diag(s) @ np_polar(vh)


@pytest.mark.parametrize(("n", "shape"), [(2, (6, 5)), (3, (4, 9)), (4, (3, 3))])
def test_tsv_m_is_the_paper_s_algorithm(n, shape):
    thetas, base = family(n, shape)
    taus = [(x - base).numpy() for x in thetas]
    merged = tsv_m(scale=0.7)(thetas, [1 / n] * n, base)
    close(merged, base.numpy() + 0.7 * np_tsv(taus))


def test_tsv_m_of_task_vectors_in_orthogonal_subspaces_is_their_sum():
    # rank-2 task vectors with disjoint row and column spaces: nothing to orthogonalise
    base = torch.zeros(4, 4, dtype=T)
    one = torch.zeros(4, 4, dtype=T)
    one[:2, :2] = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    two = torch.zeros(4, 4, dtype=T)
    two[2:, 2:] = torch.tensor([[5.0, 0.0], [1.0, 1.0]])
    close(tsv_m()([one, two], [0.5, 0.5], base), one + two)


def test_polar_gives_orthonormal_columns():
    q = polar(rand(7, 3, seed=1))
    close(q.T @ q, torch.eye(3, dtype=T))


# --- Iso-C ----------------------------------------------------------------------------------------


def test_iso_c_hand_computed():
    base = torch.zeros(2, 2, dtype=T)
    one = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=T)
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=T)  # sum diag(3, 1): mean 2, U V^T = I
    close(iso_c()([one, two], [0.5, 0.5], base), 2 * torch.eye(2, dtype=T))
    close(iso_c(scale=0.5)([one, two], [0.9, 0.1], base), torch.eye(2, dtype=T))


def test_iso_c_is_the_paper_s_algorithm():
    thetas, base = family(3, (5, 8))
    total = sum((x - base).numpy() for x in thetas)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    close(iso_c()(thetas, [1 / 3] * 3, base), base.numpy() + s.mean() * (u @ vh))


# --- Iso-CTS --------------------------------------------------------------------------------------


def np_iso_cts(taus, fraction):
    r, n = min(taus[0].shape), len(taus)
    per_task = round((r - int(r * fraction)) / n)
    common = r - per_task * n
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [u[:, :common]], [s[:common]], [vh[:common]]
    for x in taus:
        if per_task == 0:
            break
        residual = x - u[:, :common] @ u[:, :common].T @ x
        a, b, c = np.linalg.svd(residual, full_matrices=False)
        us.append(a[:, :per_task])
        ss.append(b[:per_task])
        vs.append(c[:per_task])
    mean = np.concatenate(ss).mean()
    return mean * np_polar(np.concatenate(us, axis=1)) @ np_polar(np.concatenate(vs, axis=0))


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
@pytest.mark.parametrize(("n", "shape"), [(2, (8, 6)), (3, (10, 12))])
def test_iso_cts_is_the_paper_s_algorithm(fraction, n, shape):
    thetas, base = family(n, shape)
    taus = [(x - base).numpy() for x in thetas]
    merged = iso_cts(common_fraction=fraction)(thetas, [1 / n] * n, base)
    close(merged, base.numpy() + np_iso_cts(taus, fraction))


def test_iso_cts_with_all_directions_common_is_iso_c():
    thetas, base = family(3, (6, 6))
    close(
        iso_cts(common_fraction=1.0)(thetas, [1 / 3] * 3, base), iso_c()(thetas, [1 / 3] * 3, base)
    )


# --- what all three share -------------------------------------------------------------------------

FACTORIES = [tsv_m, iso_c, iso_cts]


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize(("fallback", "divide"), [("mean", True), ("sum", False)])
def test_other_tensors_take_the_fallback(factory, fallback, divide):
    base = torch.tensor([1.0, 2.0, 3.0], dtype=T)
    thetas = [base + torch.tensor([1.0, 0.0, 4.0], dtype=T), base + torch.tensor([3.0, 2.0, 0.0])]
    total = torch.tensor([4.0, 2.0, 4.0], dtype=T)
    expected = base + (total / 2 if divide else total) * 0.5
    merged = factory(scale=0.5, fallback=fallback)(thetas, [0.5, 0.5], base)
    assert torch.equal(merged, expected)


@pytest.mark.parametrize("factory", FACTORIES)
def test_weights_are_not_used(factory):
    thetas, base = family(3)
    assert torch.equal(
        factory()(thetas, [0.2, 0.3, 0.5], base), factory()(thetas, [1 / 3] * 3, base)
    )


def test_tsv_m_of_one_model_is_the_model():
    thetas, base = family(1)
    close(tsv_m()(thetas, [1.0], base), thetas[0])


@pytest.mark.parametrize("factory", FACTORIES)
def test_settings_are_checked(factory):
    name = factory.__name__
    with pytest.raises(
        MergeArgumentError,
        match=f"^{name}: fallback must be one of 'mean', 'sum'; got 'median'\\.$",
    ):
        factory(fallback="median")
    with pytest.raises(MergeArgumentError, match=f"^{name}: scale must be a finite number"):
        factory(scale=math.nan)
    with pytest.raises(MethodNotApplicableError, match=f"^{name}: needs a base model"):
        factory()([rand(2, 2, seed=0)], [1.0], None)


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_iso_cts_common_fraction_in_range(value):
    with pytest.raises(MergeArgumentError, match=r"^iso_cts: common_fraction must be in \[0, 1\]"):
        iso_cts(common_fraction=value)


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_through_merge_records_the_fallback_and_refuses_shards(name):
    assert REGISTRY[name].paper
    models = [
        {"w": rand(4, 6, seed=i).float(), "b": rand(6, seed=10 + i).float()} for i in range(3)
    ]
    merged, lineage = terge.merge(models[1:], base=models[0], method=name, lineage=True)
    method = resolve(name)
    for key in ("w", "b"):
        expected = method(
            [m[key].double() for m in models[1:]], [0.5, 0.5], models[0][key].double()
        )
        assert torch.equal(merged[key], expected.float())
        assert lineage[key].settings["fallback"] == "mean"
    assert not (method.layout_aware or method.elementwise or method.streaming)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("factory", FACTORIES)
def test_on_the_gpu_as_on_the_cpu(factory):
    thetas, base = family(3, (24, 16))
    cpu = factory()(thetas, [1 / 3] * 3, base)
    gpu = factory()([x.cuda() for x in thetas], [1 / 3] * 3, base.cuda())
    close(gpu.cpu(), cpu)


@pytest.mark.parametrize("factory", FACTORIES)
def test_inputs_are_left_alone(factory):
    thetas, base = family(2)
    copies = [x.clone() for x in (*thetas, base)]
    factory()(thetas, [0.5, 0.5], base)
    assert all(torch.equal(x, y) for x, y in zip((*thetas, base), copies, strict=True))


@pytest.mark.parametrize("shape", [(40, 7), (7, 40), (13, 7), (7, 13), (9, 9), (1, 5), (5, 1)])
def test_thin_svd_is_the_svd_of_long_and_short_matrices(shape):
    """The QR-first route (a side at least twice the other) and the plain one both give the
    matrix back, orthonormal singular vectors and numpy's singular values."""
    matrix = rand(*shape, seed=3)
    u, s, vh = thin_svd(matrix)
    r = min(shape)
    assert (u.shape, s.shape, vh.shape) == ((shape[0], r), (r,), (r, shape[1]))
    close(u * s @ vh, matrix)
    close(u.T @ u, torch.eye(r, dtype=T))
    close(vh @ vh.T, torch.eye(r, dtype=T))
    close(s, np.linalg.svd(matrix.numpy(), compute_uv=False))
    assert bool((s[:-1] >= s[1:]).all())


def test_thin_svd_reduces_a_long_matrix_by_qr_first(monkeypatch):
    calls = []
    real = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda m: calls.append(tuple(m.shape)) or real(m))
    thin_svd(rand(14, 7, seed=1))
    thin_svd(rand(7, 14, seed=1))
    thin_svd(rand(13, 7, seed=1))  # under twice as long: the SVD alone
    assert calls == [(14, 7), (14, 7)]
