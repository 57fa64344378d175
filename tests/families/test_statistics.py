"""Fisher merging and RegMean against hand-computed cases and their defining equations, and the
hooks that compute their statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import terge
from terge.errors import MergeArgumentError, MethodNotApplicableError
from terge.methods import REGISTRY, fisher, fisher_diagonals, gram_matrices, readme_table, regmean

T = torch.float64


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=T)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=T)


def call(method, tensors, weights, name="w", contributors=None):
    contributors = list(range(len(tensors))) if contributors is None else contributors
    return method(tensors, weights, None, name=name, contributors=contributors)


# --- Fisher ---------------------------------------------------------------------------------------


def test_fisher_hand_computed():
    method = fisher([{"w": t(1, 0)}, {"w": t(3, 0)}], epsilon=0.0)
    # entry 0: (0.5 * 1 * 1 + 0.5 * 3 * 3) / (0.5 + 1.5); entry 1: no information: the mean
    assert call(method, [t(1, 2), t(3, 4)], [0.5, 0.5]).tolist() == [2.5, 3.0]


def test_fisher_with_equal_information_is_the_weighted_mean_and_of_one_model_the_model():
    thetas = [rand(3, 4, seed=i) for i in range(3)]
    same = fisher([{"w": torch.full((3, 4), 2.0)}] * 3)
    weights = [0.2, 0.3, 0.5]
    expected = sum(x * w for x, w in zip(thetas, weights, strict=True))
    torch.testing.assert_close(call(same, thetas, weights), expected, rtol=1e-14, atol=1e-15)
    one = fisher([{"w": rand(3, 4, seed=9).abs()}])
    torch.testing.assert_close(call(one, thetas[:1], [1.0]), thetas[0], rtol=1e-15, atol=0)


def test_fisher_parameters_without_diagonals_take_the_mean_and_partial_ones_are_an_error():
    method = fisher([{"w": t(1.0)}, {}])
    assert call(method, [t(1.0), t(3.0)], [0.5, 0.5], name="b").tolist() == [2.0]
    with pytest.raises(
        MethodNotApplicableError,
        match=r"^fisher: the parameter 'w' has Fisher diagonals for some models but not for "
        r"models \[1\]; give every contributing model's Fisher diagonals for it, or none",
    ):
        call(method, [t(1.0), t(3.0)], [0.5, 0.5])
    wrong = fisher([{"w": t(1.0, 2.0)}, {"w": t(1.0)}])
    with pytest.raises(
        MethodNotApplicableError,
        match=r"^fisher: models\[0\]'s Fisher diagonals for 'w' has shape \(2,\), expected \(1,\)",
    ):
        call(wrong, [t(1.0), t(3.0)], [0.5, 0.5])


def test_fisher_looks_statistics_up_by_model_index():
    # the second contributor is models[2]: its diagonal, not models[1]'s
    method = fisher([{"w": t(1.0)}, {"w": t(100.0)}, {"w": t(3.0)}], epsilon=0.0)
    merged = call(method, [t(1.0), t(5.0)], [0.5, 0.5], contributors=[0, 2])
    assert merged.tolist() == [(0.5 * 1 * 1 + 1.5 * 5) / 2.0]


# --- RegMean --------------------------------------------------------------------------------------


def test_regmean_hand_computed_for_one_input_feature():
    method = regmean([{"w": t(1.0).reshape(1, 1)}, {"w": t(3.0).reshape(1, 1)}], alpha=1.0)
    merged = call(method, [t(2.0).reshape(1, 1), t(4.0).reshape(1, 1)], [0.5, 0.5])
    assert merged.tolist() == [[3.5]]  # (1 * 2 + 3 * 4) / 4


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.0])
def test_regmean_solves_its_normal_equations(alpha):
    grams, weights_ = [], []
    for i in range(3):
        x = rand(20, 5, seed=10 + i)
        grams.append({"w": x.T @ x})
        weights_.append(rand(4, 5, seed=i))
    merged = call(regmean(grams, alpha=alpha), weights_, [1 / 3] * 3).numpy()
    reduced = []
    for g in grams:
        m = g["w"].numpy() * alpha
        np.fill_diagonal(m, np.diag(g["w"].numpy()))
        reduced.append(m / 3)
    lhs = sum(g @ merged.T for g in reduced)
    rhs = sum(g @ w.numpy().T for g, w in zip(reduced, weights_, strict=True))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


def test_regmean_with_equal_grams_is_the_mean_and_other_parameters_are_averaged():
    x = rand(10, 3, seed=0)
    method = regmean([{"w": x.T @ x}] * 2)
    a, b = rand(2, 3, seed=1), rand(2, 3, seed=2)
    torch.testing.assert_close(call(method, [a, b], [0.5, 0.5]), (a + b) / 2)
    assert call(method, [t(1.0, 2.0), t(3.0, 4.0)], [0.5, 0.5], name="bias").tolist() == [2, 3]
    with pytest.raises(MethodNotApplicableError, match=r"^regmean: the parameter 'w' has Gram"):
        call(method, [t(1.0, 2.0), t(3.0, 4.0)], [0.5, 0.5])


def test_regmean_refuses_singular_grams():
    method = regmean([{"w": torch.zeros(2, 2, dtype=T)}] * 2)
    with pytest.raises(
        MethodNotApplicableError, match=r"^regmean: the summed Gram matrices of 'w'"
    ):
        call(method, [rand(3, 2, seed=0), rand(3, 2, seed=1)], [0.5, 0.5])


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "options", "message"),
    [
        (fisher, {"fishers": {"w": t(1.0)}}, r"^fisher: fishers must be a list with one mapping"),
        (fisher, {"fishers": [[1]]}, r"^fisher: fishers\[0\] must be a mapping of parameter names"),
        (fisher, {"fishers": [{"w": 1.0}]}, r"^fisher: fishers\[0\] must map parameter names"),
        (fisher, {"fishers": [], "epsilon": -1.0}, r"^fisher: epsilon must be in \[0, ∞\)"),
        (regmean, {"grams": "g"}, r"^regmean: grams must be a list with one mapping"),
        (regmean, {"grams": [], "alpha": 1.5}, r"^regmean: alpha must be in \[0, 1\], got 1\.5"),
    ],
)
def test_settings_are_checked(factory, options, message):
    with pytest.raises(MergeArgumentError, match=message):
        factory(**options)


@pytest.mark.parametrize("name", ["fisher", "regmean"])
def test_by_name_they_ask_for_their_statistics(name):
    assert REGISTRY[name].paper
    with pytest.raises(MergeArgumentError, match=f"names the merge method '{name}', which needs"):
        terge.merge([{"w": torch.ones(2)}] * 2, method=name)
    assert f"| `{name}` | `" in readme_table() and "(required)" in readme_table()


# --- the hooks ------------------------------------------------------------------------------------


def net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_gram_matrices_are_the_inputs_x_t_x_of_every_linear_layer():
    model = net(0)
    batches = [rand(5, 3, seed=i).float() for i in range(3)]
    grams = gram_matrices(model, batches)
    assert set(grams) == {"0.weight", "2.weight"}
    x = torch.cat(batches).double()
    torch.testing.assert_close(grams["0.weight"], x.T @ x)
    hidden = torch.relu(model[0](torch.cat(batches))).double()
    torch.testing.assert_close(grams["2.weight"], hidden.T @ hidden, rtol=1e-6, atol=1e-6)
    assert not model[0]._forward_pre_hooks  # the hooks are gone


def test_fisher_diagonals_are_mean_squared_gradients_and_leave_gradients_alone():
    model = net(1)
    batches = [(rand(4, 3, seed=i).float(), rand(4, 2, seed=10 + i).float()) for i in range(2)]

    def loss(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    diagonals = fisher_diagonals(model, batches, loss)
    expected = {n: torch.zeros(p.shape, dtype=T) for n, p in model.named_parameters()}
    for batch in batches:
        grads = torch.autograd.grad(loss(model, batch), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), grads, strict=True):
            expected[n] += g.double().square() / 2
    assert set(diagonals) == set(expected)
    for n in expected:
        torch.testing.assert_close(diagonals[n], expected[n])
    assert all(p.grad is None for p in model.parameters())


def test_merging_models_with_their_statistics_records_a_run_that_cannot_be_recomputed():
    models = [net(i) for i in range(2)]
    batches = [rand(6, 3, seed=i).float() for i in range(2)]
    grams = [gram_matrices(m, batches) for m in models]
    merged, lineage = terge.merge(models, method=regmean(grams), lineage=True)
    first = models[0][0].weight.double(), models[1][0].weight.double()
    expected = call(regmean(grams), list(first), [0.5, 0.5], name="0.weight")
    assert torch.equal(merged[0].weight, expected.float())
    assert torch.equal(
        merged[0].bias, ((models[0][0].bias.double() + models[1][0].bias.double()) / 2).float()
    )
    assert lineage["0.weight"].custom and lineage["0.weight"].settings == {"alpha": 0.9}
    fishers = [{n: torch.ones(p.shape) for n, p in m.named_parameters()} for m in models]
    merged = terge.merge(models, method=fisher(fishers, epsilon=0.0), weights=[1, 3])
    mean = terge.merge(models, weights=[1, 3])
    for a, b in zip(merged.parameters(), mean.parameters(), strict=True):
        torch.testing.assert_close(a, b)
