"""build_plan(): every tensor's fate decided (and every bad call refused) before any is touched."""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict

import pytest
import torch

from terge import lineage as reasons
from terge import methods
from terge.errors import (
    MergeArgumentError,
    MetaTensorError,
    MethodNotApplicableError,
    NoMergeMethodFoundForParameterError,
    ParameterModelWeightsSumToZeroError,
    TergeError,
    UnknownMergeMethodError,
)
from terge.plan import Plan, build_plan, check_seed, derive_seed, is_registered
from terge.sources import StateDictSource

THIRD = 1 / 3


class Untouchable(StateDictSource):
    """A source that fails if asked for a tensor: a plan is built from names, shapes and dtypes."""

    def get(self, name: str) -> torch.Tensor:
        raise AssertionError(f"build_plan read the tensor {name!r}")


def plan_of(models, base=0, **options) -> Plan:
    """build_plan over state dicts with merge()'s defaults; ``base`` an index or a state dict."""
    sources = [Untouchable(m, where=f"models[{i}]") for i, m in enumerate(models)]
    if isinstance(base, int):
        base_index, base_source = base, sources[base]
    else:
        base_index, base_source = None, Untouchable(base, where="base")
    settings = {
        "method": "arithmetic",
        "weights": None,
        "included": None,
        "excluded": None,
        "dtype": torch.float64,
        "normalize": True,
        "seed": 7,
        **options,
    }
    return build_plan(sources, base_source, base_index, **settings)


def trio() -> list[dict[str, torch.Tensor]]:
    """Three models holding "w" (3, 2) and "b" (2,)."""
    return [{"w": torch.full((3, 2), float(i)), "b": torch.full((2,), float(i))} for i in range(3)]


def step(plan: Plan, name: str):
    """The plan's one step for ``name``."""
    (found,) = [s for s in plan.steps if s.name == name]
    return found


# --------------------------------------------------------------------------------------------
# What is merged and what is left alone, with the reason
# --------------------------------------------------------------------------------------------


def test_every_reason_to_leave_a_tensor_alone_is_recorded():
    shared = torch.zeros(3)
    base = OrderedDict(
        merged=shared,
        alias=shared,  # the same view under a second name: tied
        dropped=torch.zeros(2),
        resized=torch.zeros(2),
        mine=torch.zeros(2),
        steps=torch.tensor([1]),
        config="not a tensor",
    )
    other = {
        "merged": torch.ones(3),
        "alias": torch.ones(3),
        "dropped": torch.ones(2),
        "resized": torch.ones(5),
        "steps": torch.tensor([2]),
        "renamed": torch.ones(1),
    }
    plan = plan_of([base, other, dict(other)], excluded="dropped")
    assert plan.skipped == {
        "config": reasons.NOT_A_TENSOR,
        "alias": reasons.TIED,
        "dropped": reasons.EXCLUDED,
        "resized": reasons.SHAPE_MISMATCH,
        "mine": reasons.ONE_MODEL,
        "steps": reasons.NOT_FLOATING,
    }
    assert set(plan.skipped.values()) <= set(reasons.REASONS)  # each one a documented reason
    assert [s.name for s in plan.steps] == ["merged"]
    assert plan.steps[0].aliases == ("alias",)
    assert plan.tied == {"alias": "merged"}
    assert plan.unused == {"renamed": (1, 2)}


def test_exclusion_is_decided_before_holders_and_dtype():
    """An excluded tensor is "excluded" even if it is an integer one or held by one model."""
    models = [{"n": torch.tensor([1]), "solo": torch.zeros(1)}, {"n": torch.tensor([2])}]
    plan = plan_of(models, excluded=["n", "solo"])
    assert plan.skipped == {"n": reasons.EXCLUDED, "solo": reasons.EXCLUDED}
    plan = plan_of(models, included=["n", "solo"])
    assert plan.skipped == {"n": reasons.NOT_FLOATING, "solo": reasons.ONE_MODEL}
    assert plan.steps == ()


def test_a_shape_mismatch_is_told_apart_from_a_name_no_other_model_holds():
    models = [{"x": torch.zeros(2), "y": torch.zeros(2)}, {"x": torch.zeros(3)}]
    assert plan_of(models).skipped == {"x": reasons.SHAPE_MISMATCH, "y": reasons.ONE_MODEL}


def test_only_models_holding_a_tensor_contribute_to_it():
    models = trio()
    del models[1]["b"]
    plan = plan_of(models, weights=[1, 2, 3])
    assert step(plan, "w").contributors == (0, 1, 2)
    assert step(plan, "b").contributors == (0, 2)
    assert step(plan, "b").weights == (0.25, 0.75)  # 1 and 3, normalised over the holders


def test_tied_names_after_the_merged_one_become_its_aliases_in_order():
    shared = torch.zeros(2)
    base = OrderedDict(first=shared, second=shared, third=shared)
    plan = plan_of([base, {"first": torch.ones(2)}])
    assert [s.name for s in plan.steps] == ["first"]
    assert plan.steps[0].aliases == ("second", "third")
    assert plan.tied == {"second": "first", "third": "first"}


# --------------------------------------------------------------------------------------------
# Weights and methods, resolved per tensor
# --------------------------------------------------------------------------------------------


def test_weights_are_normalised_and_the_kernel_gets_them_as_given_with_one_divisor():
    s = step(plan_of(trio(), weights=[1, 2, 3]), "w")
    assert s.weights == (1 / 6, 2 / 6, 3 / 6)
    assert s.coefficients == (1.0, 2.0, 3.0)
    assert s.divisor == 6.0


def test_equal_weights_however_written_sum_with_ones_and_divide_by_the_count():
    for weights in (None, [0.1, 0.1, 0.1], [7, 7, 7]):
        s = step(plan_of(trio(), weights=weights), "w")
        assert s.weights == (THIRD, THIRD, THIRD)
        assert s.coefficients == (1.0, 1.0, 1.0)
        assert s.divisor == 3.0


def test_without_normalising_the_weights_are_used_as_given():
    s = step(plan_of(trio(), weights=[1, -2, 0.5], normalize=False), "w")
    assert s.weights == s.coefficients == (1.0, -2.0, 0.5)
    assert s.divisor is None


def test_the_accumulation_dtype_is_the_weights_dtype():
    s = step(plan_of(trio(), dtype=torch.float32), "w")
    assert s.weights == (0.3333333432674408,) * 3  # 1/3 rounded to float32


def test_a_weight_map_is_first_match_wins_with_equal_weights_elsewhere():
    plan = plan_of(trio(), weights={"w": [1, 0, 3], "w|b": [5, 5, 0]})
    assert step(plan, "w").weights == (0.25, 0.0, 0.75)
    plan = plan_of(trio(), weights={"x": [1, 0, 3]})
    assert step(plan, "w").weights == step(plan, "b").weights == (THIRD,) * 3


def test_a_method_map_gives_each_tensor_its_method():
    models = trio()
    del models[2]["b"]
    plan = plan_of(models, method={"w": "ties", re.compile("."): methods.slerp()})
    assert step(plan, "w").method.name == "ties"
    assert step(plan, "b").method.name == "slerp"
    # slerp needs exactly two contributors: b is held by three, so it is refused up front
    with pytest.raises(MethodNotApplicableError, match=r"'slerp' needs exactly 2 .* 'b' has 3"):
        plan_of(trio(), method={"w": "ties", re.compile("."): methods.slerp()})


def test_task_vector_methods_leave_the_base_out_of_the_contributors():
    s = step(plan_of(trio(), method="task_arithmetic", weights=[5, 1, 3]), "w")
    assert s.contributors == (1, 2)
    assert s.weights == (0.25, 0.75)
    assert s.uses_base
    assert not step(plan_of(trio()), "w").uses_base


def test_only_random_methods_carry_the_seed():
    assert step(plan_of(trio(), method="dare_linear", seed=11), "w").seed == 11
    assert step(plan_of(trio(), method="ties", seed=11), "w").seed is None
    entry = step(plan_of(trio(), method="dare_linear", seed=11), "w").lineage_entry()
    assert entry.settings == {"density": 0.5, "scale": 1.0, "seed": 11}


def test_a_separate_base_is_a_holder_only_for_methods_that_read_it():
    model = {"w": torch.ones(2)}
    base = {"w": torch.zeros(2)}
    assert plan_of([model], base=base).skipped == {"w": reasons.ONE_MODEL}
    resized = {"w": torch.ones(5)}
    assert plan_of([model, resized], base=base).skipped == {"w": reasons.SHAPE_MISMATCH}
    s = step(plan_of([model], base=base, method="task_arithmetic"), "w")
    assert s.contributors == (0,)
    assert s.weights == (1.0,)


def test_the_lineage_is_the_plan_recorded():
    models = trio()
    models[0]["steps"] = torch.tensor([0])
    lineage = plan_of(models, weights=[1, 2, 1]).lineage()
    assert lineage == {
        "w": ("arithmetic", [(0, 0.25), (1, 0.5), (2, 0.25)]),
        "b": ("arithmetic", [(0, 0.25), (1, 0.5), (2, 0.25)]),
    }
    assert lineage["w"].coefficients == (1.0, 2.0, 1.0)
    assert lineage["w"].divisor == 4.0
    assert lineage.skipped == {"steps": reasons.ONE_MODEL}
    ties = plan_of(trio(), method="ties").lineage()["w"]
    assert ties.coefficients == (1.0, 1.0) and ties.divisor == 2.0  # its weights as given
    summed = plan_of(trio(), method="task_arithmetic").lineage()["w"]
    assert summed.coefficients == (1.0, 1.0) and summed.divisor == 2.0  # divides its sum once
    other = plan_of(trio(), method="magmax").lineage()["w"]
    assert other.coefficients is None and other.divisor is None  # given the normalised weights


def test_registered_methods_are_told_apart_from_custom_ones():
    assert is_registered(methods.ties())
    assert is_registered(methods.resolve("arithmetic"))
    assert not is_registered(methods.custom(lambda tensors, weights, base: tensors[0]))
    entry = step(plan_of(trio(), method=lambda tensors, weights, base: tensors[0]), "w")
    assert entry.lineage_entry().custom


# --------------------------------------------------------------------------------------------
# Seeds
# --------------------------------------------------------------------------------------------


def test_a_parameters_seed_depends_on_the_seed_and_its_name_only():
    expected = hashlib.sha256(b"7\x00layers.0.weight").digest()
    assert derive_seed(7, "layers.0.weight") == int.from_bytes(expected[:8], "little") % 2**63
    assert derive_seed(7, "a") != derive_seed(7, "b") != derive_seed(8, "b")
    assert 0 <= derive_seed(2**62, "x") < 2**63


@pytest.mark.parametrize("seed", [True, 1.0, "1", [1]])
def test_a_seed_must_be_an_int(seed):
    with pytest.raises(
        MergeArgumentError, match=rf"`seed` must be an int or None; got {re.escape(repr(seed))}"
    ):
        check_seed(seed)


def test_an_int_or_none_seed_passes():
    assert check_seed(None) is None
    assert check_seed(-3) == -3


# --------------------------------------------------------------------------------------------
# Bad calls are refused while planning, before any tensor is read
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"dtype": torch.int64}, MergeArgumentError, r"`dtype` must be a floating-point"),
        ({"dtype": "float64"}, MergeArgumentError, r"`dtype` must be a floating-point"),
        ({"weights": [1, 2]}, MergeArgumentError, r"`weights` has 2 weights but there are 3"),
        ({"weights": [[1, 2, 3]]}, MergeArgumentError, r"`weights` has shape \(1, 3\) weights"),
        ({"weights": "123"}, MergeArgumentError, r"`weights` must be a list of numbers.*str"),
        ({"weights": [1, "a", 2]}, MergeArgumentError, r"`weights` must be a list of numbers"),
        ({"weights": [1, float("nan"), 2]}, MergeArgumentError, r"not finite"),
        ({"weights": {"w": [1, 2]}}, MergeArgumentError, r"`weights\['w'\]` has 2 weights"),
        ({"weights": [1, -1, 0]}, ParameterModelWeightsSumToZeroError, r"parameter '(w|b)'"),
        ({"method": "nope"}, UnknownMergeMethodError, r"unknown merge method 'nope'"),
        ({"method": {"w": "ties"}}, NoMergeMethodFoundForParameterError, r"parameter 'b'"),
        ({"method": "slerp"}, MethodNotApplicableError, r"needs exactly 2 .* has 3"),
        ({"included": 3}, TergeError, r"included"),
    ],
)
def test_bad_calls_are_refused_before_any_tensor_is_read(options, error, message):
    with pytest.raises(error, match=message):
        plan_of(trio(), **options)


def test_weights_summing_to_zero_only_over_a_tensors_holders_name_it():
    models = trio()
    del models[2]["b"]
    plan_of(models, weights=[1, -1, 5], excluded="b")  # w's weights sum to 5: fine
    with pytest.raises(
        ParameterModelWeightsSumToZeroError,
        match=r"'b' .*\(models \[0, 1\] have weights \[1.0, -1.0\]\)",
    ):
        plan_of(models, weights=[1, -1, 5])


def test_meta_tensors_that_would_be_merged_are_refused_naming_model_and_tensor():
    models = trio()
    models[1]["w"] = torch.empty(3, 2, device="meta")
    with pytest.raises(MetaTensorError, match=r"models\[1\]'s tensor 'w' is on the meta device"):
        plan_of(models)
    models[0]["w"] = torch.empty(3, 2, device="meta")
    with pytest.raises(MetaTensorError, match=r"the base's tensor 'w' is on the meta device"):
        plan_of(models)
    assert [s.name for s in plan_of(models, excluded="w").steps] == ["b"]
