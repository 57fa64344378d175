"""Methods chosen through merge(): contributors, settings in the lineage, seeds, errors."""

from __future__ import annotations

import re

import pytest
import torch

import terge
from terge import MethodNotApplicableError, MethodResultError, methods

from helpers import assert_unchanged, snapshot


def states(count: int, seed: int = 0, width: int = 64) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "w": torch.randn(width, width, generator=generator),
            "b": torch.randn(width, generator=generator),
        }
        for _ in range(count)
    ]


def test_task_vector_methods_use_the_base_index_as_reference_only():
    models = states(3)
    merged, lineage = terge.merge(models, method="task_arithmetic", weights=[5, 1, 3], lineage=True)
    assert lineage["w"] == ("task_arithmetic", [(1, 0.25), (2, 0.75)])
    assert lineage["w"].settings == {"scale": 1.0}
    base = models[0]["w"].double()
    # base + (w1 tau1 + w2 tau2), each product rounded, as the method computes it: bit for bit.
    expected = base + (
        0.25 * (models[1]["w"].double() - base) + 0.75 * (models[2]["w"].double() - base)
    )
    assert torch.equal(merged["w"], expected.float())


def test_scale_zero_gives_the_base_for_every_task_vector_method():
    models = states(3)
    for factory in (
        methods.task_arithmetic,
        methods.ties,
        methods.dare_linear,
        methods.dare_ties,
        methods.breadcrumbs,
    ):
        merged = terge.merge(models, method=factory(scale=0.0), seed=1)
        assert torch.equal(merged["w"], models[0]["w"]), factory.__name__


def test_method_maps_mix_names_and_configured_factories():
    models = states(3)
    method = {"b": "arithmetic", re.compile("w"): methods.ties(density=0.5)}
    _, lineage = terge.merge(models, method=method, lineage=True)
    assert lineage["b"] == ("arithmetic", [(0, 1 / 3), (1, 1 / 3), (2, 1 / 3)])
    assert lineage["w"] == ("ties", [(1, 0.5), (2, 0.5)])
    assert lineage["w"].settings == {"density": 0.5, "scale": 1.0}
    assert lineage["b"].settings == {}


def test_ties_at_full_density_without_conflicts_equals_task_arithmetic():
    base = states(1)[0]
    delta = {k: v.abs() + 0.1 for k, v in states(1, seed=5)[0].items()}
    models = [
        base,
        {k: base[k] + delta[k] for k in base},
        {k: base[k] + 2 * delta[k] for k in base},
    ]
    ties = terge.merge(models, method=methods.ties(density=1.0))
    plain = terge.merge(models, method="task_arithmetic")
    for name in base:
        # TIES' disjoint mean divides by the agreeing weights' sum (1 up to float64 rounding),
        # which may move the float32 result by one ulp: not bit for bit.
        torch.testing.assert_close(ties[name], plain[name], rtol=0, atol=1e-6)


def test_a_separate_base_is_the_reference_and_counts_as_a_holder():
    base, tuned = states(2)
    merged, lineage = terge.merge([tuned], base=base, method="task_arithmetic", lineage=True)
    assert lineage["w"] == ("task_arithmetic", [(0, 1.0)])
    assert torch.equal(merged["w"], tuned["w"])


def test_random_methods_depend_only_on_seed_and_name():
    models = states(3)
    whole = terge.merge(models, method="dare_ties", seed=7)
    alone = terge.merge(models, method="dare_ties", seed=7, included="w")
    torch.randn(10)  # global RNG state must not matter
    again = terge.merge(models, method="dare_ties", seed=7)
    assert torch.equal(whole["w"], alone["w"]) and torch.equal(whole["w"], again["w"])
    other = terge.merge(models, method="dare_ties", seed=8)
    assert not torch.equal(whole["w"], other["w"])
    renamed = terge.merge([{"v": m["w"]} for m in models], method="dare_ties", seed=7)
    assert not torch.equal(whole["w"], renamed["v"])  # the name is part of the derivation


def test_an_unseeded_random_merge_records_a_seed_that_reproduces_it():
    models = states(3)
    merged, lineage = terge.merge(models, method="dare_linear", lineage=True)
    seed = lineage["w"].settings["seed"]
    assert isinstance(seed, int)
    again = terge.merge(models, method="dare_linear", seed=seed)
    assert torch.equal(merged["w"], again["w"]) and torch.equal(merged["b"], again["b"])
    assert "seed" not in terge.merge(models, method="ties", lineage=True)[1]["w"].settings


def test_slerp_with_three_contributors_is_refused_naming_the_parameter():
    models = states(3)
    before = snapshot(models[0])
    with pytest.raises(
        MethodNotApplicableError,
        match=r"'slerp' needs exactly 2 contributing models, but the parameter 'w' has 3",
    ):
        terge.merge(models, method={"b": "arithmetic", "w": "slerp"}, inplace=True)
    assert_unchanged(models[0], before)


def test_slerp_interpolates_between_two_models_by_the_second_weight():
    a, b = states(2)
    merged, lineage = terge.merge([a, b], method="slerp", weights=[1, 0], lineage=True)
    assert torch.equal(merged["w"], a["w"])
    assert lineage["w"] == ("slerp", [(0, 1.0), (1, 0.0)])
    merged = terge.merge([a, b], method="slerp", weights=[0, 1])
    assert torch.equal(merged["w"], b["w"])


def test_model_stock_needs_two_task_vectors():
    models = states(2)
    with pytest.raises(
        MethodNotApplicableError,
        match=r"'model_stock' needs at least 2 contributing models, but the parameter 'w' has 1",
    ):
        terge.merge(models, method="model_stock")
    merged = terge.merge(states(3), method="model_stock")
    assert merged["w"].dtype == torch.float32


def test_half_precision_parameters_keep_their_dtype_under_every_method():
    models = [{k: v.bfloat16() for k, v in m.items()} for m in states(3)]
    for name, info in methods.REGISTRY.items():
        # per-model statistics (none here: the mean); slerp, nuslerp and nearswap take two
        method = info.factory([{}] * 3) if name in ("fisher", "regmean") else name
        count = 2 if name in ("slerp", "nuslerp", "nearswap") else 3
        merged = terge.merge(models[:count], method=method, seed=0)
        assert merged["w"].dtype == torch.bfloat16, name


def test_a_custom_function_gets_float64_tensors_and_is_named_in_the_lineage():
    seen = {}

    def elementwise_max(tensors, weights, base):
        seen["dtypes"] = {t.dtype for t in tensors}
        seen["weights"] = weights
        seen.setdefault("bases", []).append(base)
        return torch.stack(tensors).amax(0)

    models = states(3)
    merged, lineage = terge.merge(models, method=elementwise_max, weights=[1, 1, 2], lineage=True)
    bases = seen.pop("bases")
    assert seen == {"dtypes": {torch.float64}, "weights": [0.25, 0.25, 0.5]}
    assert len(bases) == len(lineage)  # models[base]'s tensors (0.1.1 passed None)
    assert all(torch.equal(b, models[0][n].double()) for b, n in zip(bases, lineage))
    assert (
        lineage["w"][0]
        == "test_a_custom_function_gets_float64_tensors_and_is_named_in_the_lineage.<locals>.elementwise_max"
    )
    expected = torch.stack([m["w"] for m in models]).amax(0)
    assert torch.equal(merged["w"], expected)


def test_custom_functions_see_raw_weights_without_normalising():
    got = []
    terge.merge(
        states(2), method=lambda t, w, b: got.append(w) or t[0], weights=[2, -3], normalize=False
    )
    assert got == [[2.0, -3.0], [2.0, -3.0]]


def test_a_custom_function_returning_the_wrong_shape_is_reported():
    with pytest.raises(
        MethodResultError,
        match=r"returned \(1,\) for the parameter 'w', which has shape \(64, 64\)",
    ):
        terge.merge(states(2), method=lambda t, w, b: torch.zeros(1))
    with pytest.raises(MethodResultError, match=r"returned list"):
        terge.merge(states(2), method=lambda t, w, b: [1])


def test_a_custom_function_with_the_wrong_signature_is_refused_up_front():
    with pytest.raises(terge.MergeArgumentError, match=r"must accept \(tensors, weights, base\)"):
        terge.merge(states(2), method=lambda tensors: tensors[0])


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_ties_disjoint_mean_of_equal_weights_rounds_half_way_points_right(
    method, kernels, monkeypatch
):
    """(a + b + c) / 3 at exact float32 half-way points rounds once, to even: the disjoint mean
    is formed from the weights as given (1, 1, 1), not from 1/3 (which was 111 entries off)."""
    monkeypatch.setenv("TERGE_KERNELS", kernels)
    generator = torch.Generator().manual_seed(0)
    x = (1 + torch.rand(4096, generator=generator, dtype=torch.float64)).float()
    a = torch.full_like(x, 1.5 * 2.0**-23)
    exact = (a.double() + x.double() + 2 * x.double()) / 3
    assert torch.equal(exact, x.double() + 2.0**-24)  # every entry a half-way point
    models = [{"w": torch.zeros_like(x)}, {"w": a}, {"w": x}, {"w": 2 * x}]
    configured = getattr(methods, method)(density=1.0)
    merged = terge.merge(models, method=configured, seed=0)
    assert torch.equal(merged["w"], exact.float())


SUM_METHODS = {
    "task_arithmetic": lambda: methods.task_arithmetic(),
    "dare_linear": lambda: methods.dare_linear(density=1.0),
    "breadcrumbs": lambda: methods.breadcrumbs(density=1.0, gamma=0.0),
    "ties without the disjoint mean": lambda: methods.ties(density=1.0, disjoint_mean=False),
}


@pytest.mark.parametrize("kernels", ["auto", "torch"])
@pytest.mark.parametrize("method", sorted(SUM_METHODS))
@pytest.mark.parametrize("weights", [None, [1, 2, 3]], ids=["equal", "unequal"])
def test_weighted_sums_divide_once_at_half_way_points(method, weights, kernels, monkeypatch):
    """The task-vector methods whose combination is a weighted sum are given the weights as
    given and divide the sum once by their total (issue #17): at exact float32 half-way points,
    sum_i (w_i / W) tau_i with w_i / W rounded (1/3, 1/6) lands on the wrong side in a third
    or more of the entries; (sum_i w_i tau_i) / W rounds once, to even."""
    monkeypatch.setenv("TERGE_KERNELS", kernels)
    generator = torch.Generator().manual_seed(0)
    x = (1 + torch.rand(4096, generator=generator, dtype=torch.float64)).float()
    if weights is None:  # (a + x + 2x) / 3 = x + 2**-24
        a = torch.full_like(x, 1.5 * 2.0**-23)
        thetas = [a, x, 2 * x]
        exact = (a.double() + 3 * x.double()) / 3
    else:  # (a + 2x + 3x) / 6 = x + 2**-24 with a = x + 3 * 2**-23
        a = x + 3 * 2.0**-23
        thetas = [a, x, x]
        exact = (a.double() + 5 * x.double()) / 6
    assert torch.equal(exact, x.double() + 2.0**-24)  # every entry a half-way point
    models = [{"w": torch.zeros_like(x)}, *({"w": theta} for theta in thetas)]
    given = None if weights is None else [0, *weights]  # the base contributes nothing
    merged, lineage = terge.merge(
        models, method=SUM_METHODS[method](), weights=given, seed=0, lineage=True
    )
    assert torch.equal(merged["w"], exact.float())
    recorded = lineage.entries["w"] if hasattr(lineage, "entries") else lineage["w"]
    assert recorded.divisor == (3.0 if weights is None else 6.0)
