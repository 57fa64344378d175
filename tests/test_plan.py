"""build_plan(): every tensor's fate decided (and every bad call refused) before any is touched."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from collections import OrderedDict

import pytest
import torch

import terge
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
from terge.layerwise import by_layer
from terge.plan import (
    Plan,
    _share_memory,
    build_plan,
    check_seed,
    derive_seed,
    is_registered,
    step_from_entry,
)
from terge.sources import ModuleSource, StateDictSource
from terge.vocabulary import OutputVocabulary

from helpers import Tied

THIRD = 1 / 3


class Untouchable(StateDictSource):
    """A source that fails if asked for a tensor: a plan is built from names, shapes and dtypes."""

    def get(self, name: str) -> torch.Tensor:
        raise AssertionError(f"build_plan read the tensor {name!r}")


DEFAULTS = {
    "method": "arithmetic",
    "weights": None,
    "included": None,
    "excluded": None,
    "dtype": torch.float64,
    "normalize": True,
    "seed": 7,
}
"""merge()'s defaults, as build_plan takes them."""


def plan_of(models, base=0, **options) -> Plan:
    """build_plan over state dicts with merge()'s defaults; ``base`` an index or a state dict."""
    sources = [Untouchable(m, where=f"models[{i}]") for i, m in enumerate(models)]
    if isinstance(base, int):
        base_index, base_source = base, sources[base]
    else:
        base_index, base_source = None, Untouchable(base, where="base")
    return build_plan(sources, base_source, base_index, **{**DEFAULTS, **options})


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
    top = hashlib.sha256(b"7\x00a").digest()[:8]  # its 64th bit is set: cleared
    assert derive_seed(7, "a") == int.from_bytes(top, "little") - 2**63


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
        ({"weights": b"123"}, MergeArgumentError, r"`weights` must be a list of numbers.*bytes"),
        (
            {"weights": torch.ones(3, device="meta")},
            MergeArgumentError,
            r"`weights` must be a list of numbers, one per model; Cannot copy out of meta",
        ),
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


# --------------------------------------------------------------------------------------------
# Audit: behaviour the tests above left open
# --------------------------------------------------------------------------------------------


def test_methods_get_the_weights_as_given_only_when_normalising_by_a_positive_sum():
    """A method where only ratios matter, or one that divides its sum itself, takes the weights
    as given when they sum to a positive number; a negative sum would flip every sign, so then
    it gets the normalised weights (and no divisor)."""
    ties = step(plan_of(trio(), method="ties", weights=[1, 2, 6]), "w")
    assert ties.method_weights == (2.0, 6.0)
    ties = step(plan_of(trio(), method="ties", weights=[1, -2, -6]), "w")
    assert ties.divisor == -8.0
    assert ties.method_weights == (0.25, 0.75)
    summed = step(plan_of(trio(), method="task_arithmetic", weights=[1, 2, 6]), "w")
    assert summed.method_divides and summed.method_divisor == 8.0
    assert summed.method_weights == (2.0, 6.0)
    summed = step(plan_of(trio(), method="task_arithmetic", weights=[1, -2, -6]), "w")
    assert not summed.method_divides and summed.method_divisor is None
    assert summed.method_weights == (0.25, 0.75)


def test_a_step_is_rebuilt_from_its_lineage_entry_seed_included():
    for method in ("dare_linear", "ties", "arithmetic"):
        s = step(plan_of(trio(), method=method, weights=[1, 2, 6], seed=11), "w")
        assert step_from_entry("w", s.lineage_entry(), s.method) == s
    assert step_from_entry("w", s.lineage_entry(), methods.dare_linear()).seed is None


def test_the_same_function_configured_otherwise_is_a_custom_method():
    ties = methods.ties()
    other = functools.partial(ties.function.func, **{**ties.function.keywords, "consensus": None})
    assert is_registered(dataclasses.replace(ties, function=functools.partial(ties.function)))
    assert not is_registered(dataclasses.replace(ties, function=other))


def test_weights_that_differ_per_tensor_only_in_who_holds_it_are_weighed_apart():
    models = trio()
    del models[2]["w"], models[1]["b"]
    plan = plan_of(models, weights=[1, 2, 3])
    assert step(plan, "w").weights == (1 / 3, 2 / 3)
    assert step(plan, "b").weights == (0.25, 0.75)


def test_a_weight_of_zero_for_the_only_contributor_cannot_be_normalised():
    models = trio()[:2]
    with pytest.raises(
        ParameterModelWeightsSumToZeroError, match=r"'w' .*\(models \[1\] have weights \[0.0\]\)"
    ):
        plan_of(models, method="task_arithmetic", weights=[1, 0])


def test_weights_whose_normalised_values_overflow_are_refused():
    with pytest.raises(
        MergeArgumentError,
        match=r"sum to 5e-324 in torch.float64, so they normalise to \[inf, -inf, 1.0\]",
    ):
        plan_of(trio(), weights=[1, -1, 5e-324])


# --- per-layer weights ------------------------------------------------------------------------


def layered() -> list[dict[str, torch.Tensor]]:
    """Two models of two blocks."""
    return [{"layers.0.w": torch.zeros(2), "layers.1.w": torch.zeros(2)} for _ in range(2)]


def test_per_layer_weights_are_resolved_for_each_block():
    plan = plan_of(layered(), weights=[by_layer([1, 3]), 1])
    assert step(plan, "layers.0.w").weights == (0.5, 0.5)
    assert step(plan, "layers.1.w").weights == (0.75, 0.25)


def test_per_layer_weights_keep_the_sign_of_zero():
    plan = plan_of(layered(), weights=[by_layer([-0.0, 0.0]), 1], normalize=False)
    assert str(step(plan, "layers.0.w").weights) == "(-0.0, 1.0)"
    assert str(step(plan, "layers.1.w").weights) == "(0.0, 1.0)"


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ([by_layer([1, 3])], r"`weights` has 1 weights but there are 2 models"),
        ([by_layer([1, 3]), "a"], r"`weights` must be a list of numbers, one per model"),
        ([by_layer([1, 3]), float("inf")], r"`weights` holds a weight that is not finite"),
    ],
)
def test_a_list_with_per_layer_weights_is_checked_like_any_other(weights, message):
    with pytest.raises(MergeArgumentError, match=message):
        plan_of(layered(), weights=weights)


def test_a_per_layer_weight_that_overflows_the_accumulation_dtype_is_refused():
    """1e39 is finite, but not in float32: every other weight is checked in the dtype."""
    with pytest.raises(
        MergeArgumentError,
        match=r"the weights of 'layers.0.w' hold a weight that is not finite in torch.float32 "
        r"\(\[inf, 1.0\], from \[1e\+39, 1\]\)",
    ):
        plan_of(layered(), weights=[by_layer([1e39, 1]), 1], normalize=False, dtype=torch.float32)


# --- what is left alone, and why -------------------------------------------------------------


def test_names_tied_to_a_tensor_left_alone_are_tied_too():
    shared = torch.zeros(2)
    base = OrderedDict(first=shared, second=shared)
    plan = plan_of([base, {"first": torch.ones(2), "second": torch.ones(2)}], excluded="first")
    assert plan.steps == ()
    assert plan.skipped == {"first": reasons.EXCLUDED, "second": reasons.TIED}
    assert plan.tied == {"second": "first"}


def test_tensors_the_kernels_cannot_take_are_left_alone_or_dropped_with_the_reason():
    f8 = torch.float8_e4m3fn
    base = {"f8": torch.zeros(2, dtype=f8), "w": torch.zeros(2)}
    other = {"f8": torch.zeros(2), "w": torch.zeros(2, dtype=f8)}
    plan = plan_of([base, other, {"w": torch.zeros(2)}])
    assert plan.skipped == {"f8": reasons.UNSUPPORTED_DTYPE}
    assert plan.dropped == {"w": {1: reasons.UNSUPPORTED_DTYPE}}
    assert step(plan, "w").contributors == (0, 2)
    plan = plan_of([base, other])
    assert plan.skipped["w"] == reasons.OTHERS_NOT_MERGEABLE
    assert plan.dropped == {"w": {1: reasons.UNSUPPORTED_DTYPE}}


def test_a_sparse_tensor_is_not_dense():
    """The one tensor a plan looks at: one whose key says it has no plain storage."""
    models = [{"s": torch.eye(2).to_sparse()}, {"s": torch.eye(2)}]
    sources = [StateDictSource(m) for m in models]
    plan = build_plan(sources, sources[0], 0, **DEFAULTS)
    assert plan.skipped == {"s": reasons.NOT_DENSE}


def test_names_the_base_holds_as_non_tensors_or_buffers_are_not_unused():
    plan = plan_of(
        [{"w": torch.zeros(1), "config": 3}, {"w": torch.ones(1), "config": torch.ones(1)}]
    )
    assert plan.unused == {}
    assert plan.skipped == {"config": reasons.NOT_A_TENSOR}
    base = ModuleSource(Tied(), buffers=False)
    other = StateDictSource(Tied().state_dict())
    plan = build_plan([base, other], base, 0, **DEFAULTS)
    assert plan.unused == {}
    assert plan.skipped["norm.running_mean"] == reasons.BUFFER


def test_a_tensor_only_the_base_holds_is_left_alone_whatever_the_method():
    models = trio()
    models[0]["mine"] = torch.zeros(2)
    assert plan_of(models, method="task_arithmetic").skipped == {"mine": reasons.ONE_MODEL}


def test_a_separate_base_is_a_holder_for_a_user_s_own_method_which_reads_it():
    """One fine-tuned model and a separate base: a user's own task-vector method is called
    (it receives the base, as every built-in that reads it does), not silently skipped."""

    def doubled(tensors, weights, base):
        return base + 2 * (tensors[0] - base)

    plan = plan_of([{"w": torch.ones(2)}], base={"w": torch.zeros(2)}, method=doubled)
    s = step(plan, "w")
    assert s.contributors == (0,) and s.uses_base and plan.skipped == {}
    merged = terge.merge([{"w": torch.ones(2)}], base={"w": torch.zeros(2)}, method=doubled)
    assert merged["w"].tolist() == [2.0, 2.0]


def test_a_separate_base_is_a_holder_for_a_method_that_declares_it_needs_it():
    reader = dataclasses.replace(
        methods.custom(lambda tensors, weights, base: base), needs_base=True
    )
    s = step(plan_of([{"w": torch.ones(2)}], base={"w": torch.zeros(2)}, method=reader), "w")
    assert s.contributors == (0,) and s.uses_base


# --- vocabularies -----------------------------------------------------------------------------


def test_rows_that_differ_are_reported_only_when_no_vocabulary_was_asked():
    models = [
        {"embed": torch.zeros(3, 2), "bias": torch.zeros(3)},
        {"embed": torch.zeros(4, 2), "bias": torch.zeros(4)},
    ]
    assert plan_of(models).rows_differ == ("embed",)
    same = OutputVocabulary("base", 0, {}, 3, (torch.arange(3), torch.arange(3)), (3, 3))
    plan = plan_of(models, vocabulary=same)
    assert plan.rows_differ == ()
    assert plan.vocabulary is None  # nothing aligned: no vocabulary record
    assert plan.lineage().vocabulary is None


def test_the_vocabulary_record_counts_the_tokens_each_model_added_and_groups_the_rows():
    models = [
        {"embed": torch.zeros(3, 2)},
        {"embed": torch.ones(5, 2)},
        {"embed": torch.ones(4, 2)},
    ]
    union = OutputVocabulary(
        "union",
        0,
        {},
        5,
        (
            torch.tensor([0, 1, 2, -1, -1]),
            torch.tensor([0, 1, 2, 3, 4]),
            torch.tensor([0, 1, 2, 3, -1]),
        ),
        (3, 5, 4),
        ((1, "d"), (1, "e")),
    )
    plan = plan_of(models, vocabulary=union)
    assert plan.vocabulary_record() == {
        "source": "union",
        "rows": 5,
        "normalize": True,
        "added": {"1": 2},
        "tensors": {
            "embed": [
                {"models": [1], "weights": [1.0], "rows": [[4, 5]], "copied": True},
                {"models": [1, 2], "weights": [0.5, 0.5], "rows": [[3, 4]]},
                {"models": [0, 1, 2], "weights": [THIRD, THIRD, THIRD], "rows": [[0, 3]]},
            ]
        },
    }


# --- in place: the base's tensors must own their memory --------------------------------------


def in_place(base: dict[str, torch.Tensor]) -> Plan:
    """An in-place plan over ``base`` and a model holding the same names (float32 copies)."""
    return plan_of(
        [base, {n: torch.zeros(t.shape, dtype=t.dtype) for n, t in base.items()}], inplace=True
    )


def test_in_place_an_expanded_view_is_refused():
    with pytest.raises(
        MergeArgumentError, match=r"'w': it is an expanded view \(strides \(0,\) for shape \(2,\)\)"
    ):
        in_place({"w": torch.zeros(1).expand(2)})
    plan_of([{"w": torch.zeros(1).expand(2)}, {"w": torch.ones(2)}])  # not in place: fine


def test_in_place_views_sharing_memory_are_refused_even_when_only_one_is_merged():
    memory = torch.zeros(6)
    models = [{"a": memory[:4], "b": memory[2:]}, {"a": torch.ones(4)}]
    with pytest.raises(
        MergeArgumentError, match=r"'a' and 'b': they are different views of the same memory"
    ):
        plan_of(models, inplace=True)
    # bytes 3-5 of memory whose bytes 0-4 are merged: one byte shared, by an integer tensor
    halves = torch.zeros(4, dtype=torch.float16)
    models = [
        {"w": halves[:2], "u": halves.view(torch.uint8)[3:5]},
        {"w": torch.ones(2, dtype=torch.float16), "u": torch.ones(2, dtype=torch.uint8)},
    ]
    with pytest.raises(MergeArgumentError, match=r"'u' and 'w': they are different views"):
        plan_of(models, inplace=True)


def test_in_place_views_that_touch_or_interleave_without_sharing_an_element_are_fine():
    matrix = torch.zeros(3, 2)
    assert len(in_place({"even": matrix[:, 0], "odd": matrix[:, 1]}).steps) == 2
    # adjacent halves of one buffer too large to list their elements
    halves = torch.empty(2 * (2**23 + 1), dtype=torch.float16).split(2**23 + 1)
    assert len(in_place({"first": halves[0], "second": halves[1]}).steps) == 2


def test_in_place_misaligned_views_that_share_bytes_are_refused():
    memory = bytearray(32)
    a = torch.frombuffer(memory, dtype=torch.float32, count=4)[::2]  # bytes 0-4 and 8-12
    b = torch.frombuffer(memory, dtype=torch.float32, count=4, offset=6)[::2]  # 6-10, 14-18
    with pytest.raises(MergeArgumentError, match=r"'a' and 'b': they are different views"):
        in_place({"a": a, "b": b})


def test_tensors_on_different_devices_never_share_memory():
    cpu = (torch.device("cpu"), 4096, (4,), (1,), torch.float32)
    assert not _share_memory(cpu, (torch.device("cuda", 0), *cpu[1:]))
    assert _share_memory(cpu, (torch.device("cpu"), 4100, (4,), (1,), torch.float32))
