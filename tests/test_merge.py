"""merge(): terge 0.1.1 compatibility, exactness, safety in training loops, and bad input."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict

import pytest
import regex
import torch

import terge
from terge import (
    BaseIndexError,
    Lineage,
    MergeArgumentError,
    MetaTensorError,
    NoMergeMethodFoundForParameterError,
    NoParametersToMergeWarning,
    ParameterModelWeightsSumToZeroError,
    PatternTypeError,
    TergeError,
    UnknownMergeMethodError,
)
from terge.lineage import BUFFER, NOT_FLOATING
from terge.policy import Policy, check_lineage

from helpers import Tied, assert_unchanged, nearest, snapshot, states

THIRD = 0.3333333333333333


def weighted(tensors, weights):
    """The closed form: sum_i w_i x_i / sum_i w_i, in float64."""
    total = sum(w * t.detach().double() for w, t in zip(weights, tensors))
    return total / sum(weights)


# --- terge 0.1.1 compatibility ------------------------------------------------------------------


def test_lineage_has_terge_0_1_1_format_and_equality(linears):
    _merged, lineage = terge.merge(linears, lineage=True)
    assert lineage == {
        "weight": ("arithmetic", [(0, THIRD), (1, THIRD), (2, THIRD)]),
        "bias": ("arithmetic", [(0, THIRD), (1, THIRD), (2, THIRD)]),
    }
    assert isinstance(lineage, dict) and isinstance(lineage, Lineage)
    assert type(lineage["bias"][1][0][1]) is float
    assert list(lineage) == ["weight", "bias"]  # the base's order


def test_default_is_the_equal_weighted_mean(linears):
    merged = terge.merge(linears)
    for name in ("weight", "bias"):
        tensors = [getattr(m, name) for m in linears]
        assert torch.equal(getattr(merged, name), weighted(tensors, [1, 1, 1]).float())


def test_relative_weights_are_normalised(linears):
    merged, lineage = terge.merge(linears, weights=[1, 2, 3], lineage=True)
    assert torch.equal(merged.weight, weighted([m.weight for m in linears], [1, 2, 3]).float())
    assert lineage["weight"][1] == [(0, 1 / 6), (1, 2 / 6), (2, 3 / 6)]


def test_weights_may_be_a_tensor(linears):
    _, lineage = terge.merge(linears, weights=torch.tensor([1.0, 1.0, 2.0]), lineage=True)
    assert lineage["bias"][1] == [(0, 0.25), (1, 0.25), (2, 0.5)]


def test_weight_map_is_first_match_wins_and_unmatched_get_equal_weights(linears):
    weights = {re.compile("weight"): [1, 0, 0], "weight": [0, 1, 0]}
    merged, lineage = terge.merge(linears, weights=weights, lineage=True)
    assert torch.equal(merged.weight, linears[0].weight)
    assert lineage["weight"][1] == [(0, 1.0), (1, 0.0), (2, 0.0)]
    assert lineage["bias"][1] == [(0, THIRD), (1, THIRD), (2, THIRD)]


def test_a_catch_all_at_the_end_of_the_weight_map_replaces_equal_weights(linears):
    weights = {"bias": [3, 2, 1], re.compile(".*"): [1, 1, 2]}
    _, lineage = terge.merge(linears, weights=weights, lineage=True)
    assert lineage["bias"][1] == [(0, 0.5), (1, 2 / 6), (2, 1 / 6)]
    assert lineage["weight"][1] == [(0, 0.25), (1, 0.25), (2, 0.5)]


def test_string_patterns_match_exactly_and_compiled_ones_search():
    models = [torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)) for _ in range(2)]
    _, lineage = terge.merge(models, included="0.weight", lineage=True)
    assert list(lineage) == ["0.weight"]
    _, lineage = terge.merge(models, included=re.compile("weight"), lineage=True)
    assert list(lineage) == ["0.weight", "1.weight"]
    _, lineage = terge.merge(models, included=regex.compile(r"^1\."), lineage=True)
    assert list(lineage) == ["1.weight", "1.bias"]
    _, lineage = terge.merge(models, included=["0.bias", re.compile("^1.w")], lineage=True)
    assert list(lineage) == ["0.bias", "1.weight"]


def test_excluded_applies_after_included(linears):
    _, lineage = terge.merge(
        linears, included=re.compile("weight|bias"), excluded=["bias"], lineage=True
    )
    assert list(lineage) == ["weight"]
    assert lineage.skipped == {"bias": "excluded"}


def test_method_map_must_match_every_merged_parameter(linears):
    before = snapshot(linears[0])
    with pytest.raises(NoMergeMethodFoundForParameterError, match=r"parameter 'bias'"):
        terge.merge(linears, method={"weight": "arithmetic"}, inplace=True)
    assert_unchanged(linears[0], before)  # validated before anything was written
    _, lineage = terge.merge(
        linears, method={"weight": "arithmetic"}, excluded="bias", lineage=True
    )
    assert list(lineage) == ["weight"]


def test_method_map_is_not_consulted_for_tensors_held_by_one_model():
    models = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)]
    with pytest.warns(NoParametersToMergeWarning):
        _, lineage = terge.merge(models, method={"bias": "arithmetic"}, lineage=True)
    assert list(lineage) == []  # 'weight' (2x2 vs 3x2) is held by one model only: no error
    assert lineage.skipped == {"weight": "shape mismatch", "bias": "shape mismatch"}


def test_different_architectures_merge_what_they_share():
    torch.manual_seed(0)
    one, two = torch.nn.LSTM(10, 1, num_layers=1), torch.nn.LSTM(10, 1, num_layers=2)
    merged, lineage = terge.merge([one, two], base=1, lineage=True)
    assert set(lineage) == {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"}
    assert lineage.skipped == dict.fromkeys(
        ["weight_ih_l1", "weight_hh_l1", "bias_ih_l1", "bias_hh_l1"], "held by one model"
    )
    assert torch.equal(merged.weight_ih_l1, two.weight_ih_l1)
    expected = weighted([one.weight_ih_l0, two.weight_ih_l0], [1, 1]).float()
    assert torch.equal(merged.weight_ih_l0, expected)


def test_nothing_shared_warns_and_returns_a_copy_of_the_base():
    models = [torch.nn.Linear(10, 1), torch.nn.Linear(1, 10)]
    with pytest.warns(NoParametersToMergeWarning, match="none of them share"):
        merged = terge.merge(models)
    assert merged is not models[0]
    assert torch.equal(merged.weight, models[0].weight)


def test_a_separate_base_supplies_defaults_and_is_not_a_contributor(linears):
    base = torch.nn.Sequential()
    base.weight = torch.nn.Parameter(torch.zeros(3, 5))
    base.extra = torch.nn.Parameter(torch.ones(2))
    merged, lineage = terge.merge(linears, base=base, lineage=True)
    assert lineage["weight"][1] == [(0, THIRD), (1, THIRD), (2, THIRD)]
    assert torch.equal(merged.weight, weighted([m.weight for m in linears], [1, 1, 1]).float())
    assert torch.equal(merged.extra, base.extra)
    assert lineage.skipped == {"extra": "held by one model"}
    assert torch.equal(base.weight, torch.zeros(3, 5))


def test_a_custom_method_receives_the_separate_base_which_is_not_among_the_tensors(linears):
    base = torch.nn.Linear(5, 3)
    seen = []

    def task_sum(tensors, weights, base_tensor):  # a user's own task-vector method
        seen.append((len(tensors), base_tensor))
        return base_tensor + sum(t - base_tensor for t in tensors)

    merged = terge.merge(linears, base=base, method=task_sum)
    assert [count for count, _ in seen] == [3, 3]  # the three models, not the base
    expected = base.weight.double() + sum(m.weight.double() - base.weight.double() for m in linears)
    assert torch.equal(merged.weight, expected.float())
    assert torch.equal(seen[0][1], base.weight.double())


def test_a_custom_method_receives_models_base_as_the_base_and_among_the_tensors(linears):
    seen = []

    def record(tensors, weights, base_tensor):
        seen.append((tensors, base_tensor))
        return tensors[0]

    terge.merge(linears, base=1, method=record)
    tensors, base_tensor = seen[0]
    assert len(tensors) == 3  # models[1] contributes as the model it is, once
    assert torch.equal(base_tensor, linears[1].weight.double())
    assert torch.equal(tensors[1], base_tensor)


def test_base_index_picks_the_defaults_and_negative_indices_work():
    models = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 3)]
    with pytest.warns(NoParametersToMergeWarning):
        merged = terge.merge(models, base=-1)
    assert merged.weight.shape == (3, 2)
    assert torch.equal(merged.weight, models[2].weight)


def test_module_list_of_models_is_accepted(linears):
    merged = terge.merge(torch.nn.ModuleList(linears))
    assert torch.equal(merged.bias, weighted([m.bias for m in linears], [1, 1, 1]).float())


# --- exactness -----------------------------------------------------------------------------------


def accumulated(tensors, weights):
    """The float64 accumulation in model order, as documented: w_0 x_0, then += (w_i x_i), / sum
    (each product rounded before it is added: never a fused multiply-add)."""
    total = tensors[0].detach().double() * weights[0]
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor.detach().double() * weight)
    return total / torch.tensor(weights, dtype=torch.float64).sum()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_accumulates_in_float64_and_rounds_once_into_the_parameters_dtype(dtype):
    from fractions import Fraction

    torch.manual_seed(0)
    tensors = [torch.randn(4096).to(dtype) for _ in range(3)]
    weights = [0.2, 0.7, 1.3]
    merged = terge.merge([{"x": t} for t in tensors], weights=weights)["x"]
    assert merged.dtype == dtype
    expected = accumulated(tensors, weights)
    if dtype in (torch.float64, torch.float32):
        assert torch.equal(merged, expected.to(dtype))  # float64 -> float32 rounds once
    else:
        for i in range(0, 4096, 5):
            assert merged[i].item() == nearest(Fraction(expected[i].item()), dtype).item()
    # terge 0.1.1 multiplied in the parameter's dtype; float64 accumulation differs from that:
    in_dtype = sum(t * torch.tensor(w / 2.2, dtype=torch.float64) for t, w in zip(tensors, weights))
    if dtype != torch.float64:
        assert not torch.equal(merged, in_dtype)


@pytest.mark.parametrize("weights", [None, [1 / 3] * 3, [0.7] * 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_means_are_correctly_rounded(dtype, weights):
    """An equal-weight mean of bf16/fp16 tensors is the correctly rounded exact mean, however the
    equal weights are written (1/3 is inexact in binary: terge sums with 1s and divides by 3)."""
    from fractions import Fraction

    torch.manual_seed(0)
    tensors = [torch.randn(3000).to(dtype) for _ in range(3)]
    merged, lineage = terge.merge([{"x": t} for t in tensors], weights=weights, lineage=True)
    merged = merged["x"]
    given = torch.tensor(weights or [1.0] * 3, dtype=torch.float64)
    assert lineage["x"][1] == list(enumerate((given / given.sum()).tolist()))  # as in 0.1.1
    for i in range(0, 3000, 7):
        exact = sum(Fraction(t[i].item()) for t in tensors) / 3
        assert merged[i].item() == nearest(exact, dtype).item()


def test_dtype_argument_sets_the_accumulation_precision():
    big, small = torch.tensor([1.0, 2.0**24], dtype=torch.float64), torch.tensor([1e-9, 1.0])
    models = [{"x": big}, {"x": small.double()}]
    exact = terge.merge(models, normalize=False)["x"]
    assert exact.tolist() == [1.000000001, 2.0**24 + 1]
    rough, lineage = terge.merge(models, normalize=False, dtype=torch.float32, lineage=True)
    assert rough["x"].tolist() == [1.0, 2.0**24]  # float32 accumulation loses both
    assert lineage["x"][1] == [(0, 1.0), (1, 1.0)]


def test_float32_weights_in_lineage_when_accumulating_in_float32(linears):
    _, lineage = terge.merge(linears, dtype=torch.float32, lineage=True)
    assert lineage["bias"][1][0][1] == torch.tensor(1 / 3, dtype=torch.float32).item()


def test_mixed_dtypes_keep_the_base_dtype():
    torch.manual_seed(0)
    a, b = torch.randn(100), torch.randn(100).half()
    merged = terge.merge([{"x": a}, {"x": b}])["x"]
    assert merged.dtype == torch.float32
    assert torch.equal(merged, weighted([a, b], [1, 1]).float())


# --- in place, copies, ties, buffers -------------------------------------------------------------


def test_inplace_keeps_parameter_identity_dtype_device_and_requires_grad(linears):
    base = linears[0]
    base.bias.requires_grad_(False)
    parameters = dict(base.named_parameters())
    expected = weighted([m.weight for m in linears], [1, 1, 1]).float()
    merged = terge.merge(linears, inplace=True)
    assert merged is base
    for name, parameter in base.named_parameters():
        assert parameter is parameters[name]
    assert torch.equal(base.weight, expected)
    assert base.weight.requires_grad and not base.bias.requires_grad
    assert base.weight.dtype == torch.float32 and base.weight.device.type == "cpu"


def test_optimizer_keeps_working_after_an_inplace_merge(linears):
    model = linears[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 5)).sum().backward()
    terge.merge(linears, inplace=True)
    merged_weight = model.weight.detach().clone()
    optimizer.step()  # the optimizer still holds the same Parameters
    assert not torch.equal(model.weight, merged_weight)
    # SGD computes p.add_(grad, alpha=-lr), which torch may fuse into one multiply-add: equal
    # to merged - 0.1 * grad up to float32 rounding, not bit for bit.
    torch.testing.assert_close(model.weight, merged_weight - 0.1 * model.weight.grad)


def test_without_inplace_no_input_is_modified(tied_models):
    before = [snapshot(m) for m in tied_models]
    separate = Tied()
    separate_before = snapshot(separate)
    terge.merge(tied_models, buffers=True)
    terge.merge(tied_models, base=separate, buffers=True)
    for model, snap in zip(tied_models, before):
        assert_unchanged(model, snap)
    assert_unchanged(separate, separate_before)


def test_tied_weights_are_merged_once_and_stay_tied(tied_models):
    merged, lineage = terge.merge(tied_models, lineage=True)
    assert merged.head.weight is merged.embed.weight
    assert "embed.weight" in lineage and "head.weight" not in lineage
    assert lineage.tied == {"head.weight": "embed.weight"}
    assert lineage.skipped["head.weight"] == "tied"
    expected = weighted([m.embed.weight for m in tied_models], [1, 1, 1]).float()
    assert torch.equal(merged.head.weight, expected)
    terge.merge(tied_models, inplace=True)
    assert tied_models[0].head.weight is tied_models[0].embed.weight


def test_tied_state_dict_entries_stay_shared_in_the_copy(tied_models):
    states = [m.state_dict() for m in tied_models]
    merged, lineage = terge.merge(states, lineage=True)
    assert merged["head.weight"] is merged["embed.weight"]
    assert lineage.tied == {"head.weight": "embed.weight"}


def test_untied_contributor_of_a_tied_base_is_read_by_every_name():
    torch.manual_seed(0)
    tied = Tied()
    untied = Tied()
    untied.head.weight = torch.nn.Parameter(untied.embed.weight.detach().clone() + 1)
    merged = terge.merge([tied, untied])
    assert merged.head.weight is merged.embed.weight  # the base's structure wins
    expected = weighted([tied.embed.weight, untied.embed.weight], [1, 1]).float()
    assert torch.equal(merged.embed.weight, expected)


def test_buffers_are_left_alone_by_default(tied_models):
    merged = terge.merge(tied_models)
    assert torch.equal(merged.norm.running_mean, tied_models[0].norm.running_mean)
    assert merged.norm.running_mean is not tied_models[0].norm.running_mean


def test_buffers_left_alone_are_in_the_lineage_with_their_reason(tied_models):
    """A module's state dict holds its persistent buffers, so a merge written from it does too:
    the lineage says why they are the base's (``buffer``; an integer one is ``not floating
    point``, as with ``buffers=True``), and leaves out what no state dict holds (a
    non-persistent buffer) and what is merged (``buffers=True``)."""
    for model in tied_models:
        model.register_buffer("table", torch.arange(3.0), persistent=False)
    _, lineage = terge.merge(tied_models, lineage=True)
    expected = {f"norm.{b}": BUFFER for b in ("running_mean", "running_var")}
    assert {n: r for n, r in lineage.skipped.items() if r == BUFFER} == expected
    assert lineage.skipped["norm.num_batches_tracked"] == NOT_FLOATING  # as with buffers=True
    assert "table" not in lineage.skipped and "table" not in lineage
    compiled = [torch.compile(m) for m in tied_models]  # names as the module's, not the wrapper's
    _, through = terge.merge(compiled, lineage=True)
    assert {n: r for n, r in through.skipped.items() if r == BUFFER} == expected
    _, merged = terge.merge(tied_models, buffers=True, lineage=True)
    assert BUFFER not in merged.skipped.values()
    violations = check_lineage(lineage, Policy(forbid_skipped=BUFFER))
    assert {v.name for v in violations} == set(expected)


def test_buffers_true_merges_floating_buffers_and_keeps_integer_ones(tied_models):
    tied_models[1].norm.num_batches_tracked += 100
    merged, lineage = terge.merge(tied_models, buffers=True, lineage=True)
    means = [m.norm.running_mean for m in tied_models]
    assert torch.equal(merged.norm.running_mean, weighted(means, [1, 1, 1]).float())
    assert merged.norm.num_batches_tracked.item() == 7  # the base's
    assert lineage.skipped["norm.num_batches_tracked"] == "not floating point"
    assert "norm.running_var" in lineage


def test_state_dicts_in_state_dict_out_and_mixed_with_modules(linears):
    states = [m.state_dict() for m in linears]
    merged = terge.merge(states)
    assert isinstance(merged, OrderedDict) and list(merged) == ["weight", "bias"]
    mixed = terge.merge([linears[0], states[1], dict(states[2])])
    assert isinstance(mixed, torch.nn.Linear)
    assert torch.equal(mixed.weight, merged["weight"])
    as_dict = terge.merge([linears[0], states[1]], base=1)
    assert isinstance(as_dict, OrderedDict)


def test_state_dict_inplace_returns_the_same_mapping(linears):
    states = [m.state_dict() for m in linears]
    weight = states[0]["weight"]
    merged = terge.merge(states, inplace=True)
    assert merged is states[0] and merged["weight"] is weight
    assert torch.equal(linears[0].weight, weight)  # state_dict() tensors share the module's memory


def test_integer_tensors_in_state_dicts_are_kept_from_the_base_and_reported():
    states = [{"steps": torch.tensor([i]), "x": torch.full((2,), float(i))} for i in (2, 4)]
    merged, lineage = terge.merge(states, lineage=True)
    assert merged["steps"].item() == 2
    assert merged["x"].tolist() == [3.0, 3.0]
    assert lineage.skipped == {"steps": "not floating point"}


def test_non_tensor_state_dict_values_are_kept(linears):
    states = [dict(m.state_dict(), note="hello") for m in linears]
    merged, lineage = terge.merge(states, lineage=True)
    assert merged["note"] == "hello"
    assert lineage.skipped == {"note": "not a tensor"}


def test_normalize_false_writes_any_linear_combination(linears):
    merged, lineage = terge.merge(linears, weights=[1, 1, -1], normalize=False, lineage=True)
    a, b, c = (m.weight.detach().double() for m in linears)
    assert torch.equal(merged.weight, (a + b - c).float())
    assert lineage["weight"][1] == [(0, 1.0), (1, 1.0), (2, -1.0)]


def test_normalize_false_allows_weights_summing_to_zero(linears):
    merged = terge.merge(linears[:2], weights=[1, -1], normalize=False)
    expected = (linears[0].weight.detach().double() - linears[1].weight.detach().double()).float()
    assert torch.equal(merged.weight, expected)


def test_progress_bar_counts_what_is_actually_merged(monkeypatch, linears):
    import terge.execute

    totals = []

    class FakeBar:
        def __init__(self, total, **kwargs):
            totals.append(total)
            self.updates = 0

        def __enter__(self):
            return self

        def __exit__(self, *args):
            totals.append(self.updates)

        def update(self, n):
            self.updates += n

    monkeypatch.setattr(terge.execute, "tqdm", FakeBar)
    terge.merge(linears, excluded="bias", progress=True)
    assert totals == [1, 1]


def test_progress_bar_really_renders(capsys, linears):
    terge.merge(linears, progress=True)
    assert "Merging the models' parameters" in capsys.readouterr().err


def test_identical_models_give_the_model_back_exactly(linears):
    merged = terge.merge([linears[0]] * 3, weights=[0.1, 0.2, 0.7])
    for name, parameter in linears[0].named_parameters():
        assert torch.equal(merged.get_parameter(name), parameter)


# --- bad input: refused before anything is modified ----------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda ms: terge.merge([]), MergeArgumentError, r"`models` is empty"),
        (
            lambda ms: terge.merge(ms[0]),
            MergeArgumentError,
            r"got a single Linear.*Wrap it in a list",
        ),
        (lambda ms: terge.merge("ab"), MergeArgumentError, r"`models` must be a list"),
        (lambda ms: terge.merge([ms[0], 3]), MergeArgumentError, r"models\[1\] is a int"),
        (
            lambda ms: terge.merge(ms, base=3),
            BaseIndexError,
            r"`base` is 3, but there are only 3 models; pass an index from -3 to 2",
        ),
        (lambda ms: terge.merge(ms, base="0"), MergeArgumentError, r"`base` must be an index"),
        (lambda ms: terge.merge(ms, base=True), MergeArgumentError, r"`base` must be an index"),
        (
            lambda ms: terge.merge(ms, weights=[1, 2]),
            MergeArgumentError,
            r"`weights` has 2 weights but there are 3 models",
        ),
        (
            lambda ms: terge.merge(ms, weights=[1, 2, 3, 4]),
            MergeArgumentError,
            r"has 4 weights but there are 3 models",
        ),
        (
            lambda ms: terge.merge(ms, weights=[[1, 2, 3]]),
            MergeArgumentError,
            r"has shape \(1, 3\) weights",
        ),
        (
            lambda ms: terge.merge(ms, weights=[1, float("nan"), 1]),
            MergeArgumentError,
            r"not finite",
        ),
        (lambda ms: terge.merge(ms, weights=[1, "a", 1]), MergeArgumentError, r"list of numbers"),
        (lambda ms: terge.merge(ms, weights="111"), MergeArgumentError, r"got str"),
        (
            lambda ms: terge.merge(ms, weights={"bias": [1]}),
            MergeArgumentError,
            r"`weights\['bias'\]` has 1 weights",
        ),
        (
            lambda ms: terge.merge(ms, weights={"nothing": [1, 2]}),
            MergeArgumentError,
            r"`weights\['nothing'\]`",
        ),
        (
            lambda ms: terge.merge(ms, weights={3: [1, 1, 1]}),
            PatternTypeError,
            r"`weights` got a pattern of type int",
        ),
        (
            lambda ms: terge.merge(ms, method="average"),
            UnknownMergeMethodError,
            r"unknown merge method 'average'; the valid names are 'arithmetic'",
        ),
        (
            lambda ms: terge.merge(ms, method={"bias": "mean"}),
            UnknownMergeMethodError,
            r"`method\['bias'\]` names an unknown merge method 'mean'",
        ),
        (
            lambda ms: terge.merge(ms, method=3),
            MergeArgumentError,
            r"`method` must be a method name",
        ),
        (
            lambda ms: terge.merge(ms, method={re.compile("b"): "arithmetic", 2.5: "arithmetic"}),
            PatternTypeError,
            r"`method` got a pattern of type float",
        ),
        (lambda ms: terge.merge(ms, included=5), PatternTypeError, r"`included` must be a str"),
        (
            lambda ms: terge.merge(ms, excluded=[re.compile("a"), 5]),
            PatternTypeError,
            r"`excluded` got a pattern of type int",
        ),
        (
            lambda ms: terge.merge(ms, dtype=torch.int64),
            MergeArgumentError,
            r"`dtype` must be a floating-point torch.dtype",
        ),
        (lambda ms: terge.merge(ms, dtype="float64"), MergeArgumentError, r"got 'float64'"),
        (lambda ms: terge.merge(ms, seed=1.5), MergeArgumentError, r"`seed` must be an int"),
        (
            lambda ms: terge.merge(ms, weights=[1, -1, 0]),
            ParameterModelWeightsSumToZeroError,
            r"parameter 'weight'.*sum to 0 \(models \[0, 1, 2\] have weights \[1.0, -1.0, 0.0\]\).*normalize=False",
        ),
        (
            lambda ms: terge.merge([ms[0], {1: torch.zeros(1)}]),
            MergeArgumentError,
            r"has the key 1 of type int; tensor names must be str",
        ),
    ],
)
def test_bad_input_is_refused_before_anything_is_modified(linears, call, error, message):
    before = snapshot(linears[0])
    with pytest.raises(error, match=message):
        call(linears)
    assert_unchanged(linears[0], before)


def test_every_error_is_a_terge_error_and_keeps_0_1_1_builtin_types(linears):
    with pytest.raises(TergeError):
        terge.merge(linears, method="nope")
    with pytest.raises(KeyError):  # terge 0.1.1 raised KeyError for unknown methods
        terge.merge(linears, method="nope")
    with pytest.raises(ZeroDivisionError):
        terge.merge(linears, weights=[1, -1, 0])
    with pytest.raises(IndexError):
        terge.merge(linears, base=7)
    assert str(UnknownMergeMethodError("plain words")) == "plain words"


def test_zero_sum_error_in_a_later_parameter_leaves_an_inplace_base_untouched(linears):
    before = snapshot(linears[0])
    with pytest.raises(ParameterModelWeightsSumToZeroError, match="'bias'"):
        terge.merge(linears, weights={"bias": [1, -1, 0]}, inplace=True)
    assert_unchanged(linears[0], before)


def test_meta_tensors_are_refused_naming_the_parameter(linears):
    with torch.device("meta"):
        ghost = torch.nn.Linear(5, 3)
    with pytest.raises(
        MetaTensorError, match=r"models\[1\]'s tensor 'weight' is on the meta device"
    ):
        terge.merge([linears[0], ghost])
    with pytest.raises(MetaTensorError, match=r"the base's tensor 'weight' is on the meta device"):
        terge.merge([ghost, linears[0]])


def test_meta_tensors_that_are_not_merged_are_fine(linears):
    with torch.device("meta"):
        ghost = torch.nn.Linear(5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoParametersToMergeWarning)
        merged = terge.merge([ghost, linears[0]], excluded=["weight", "bias"])
    assert merged.weight.is_meta


def test_tensors_only_other_models_hold_are_recorded_not_dropped_silently():
    torch.manual_seed(0)
    base = {"embed": torch.randn(2), "head": torch.randn(2)}
    renamed = {"embed": torch.randn(2), "lm_head": torch.randn(2)}
    extra = {"embed": torch.randn(2), "lm_head": torch.randn(2), "extra": torch.randn(1)}
    _, lineage = terge.merge([base, renamed, extra], lineage=True)
    assert lineage.unused == {"lm_head": [1, 2], "extra": [2]}
    assert lineage.skipped == {"head": "held by one model"}
    assert "unused={'lm_head': [1, 2]" in repr(lineage)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_on_different_devices_merge_onto_the_destinations_device():
    torch.manual_seed(0)
    cpu = {"x": torch.randn(1000), "y": torch.randn(10).bfloat16()}
    gpu = {k: torch.randn_like(v.float()).to(v.dtype).cuda() for k, v in cpu.items()}
    for base, expected_device in ((0, "cpu"), (1, "cuda")):
        merged = terge.merge([cpu, gpu], base=base)
        for name in cpu:
            assert merged[name].device.type == expected_device
            reference = terge.merge([cpu, {k: v.cpu() for k, v in gpu.items()}])[name]
            assert torch.equal(merged[name].cpu(), reference)


def test_a_spec_base_is_the_model_with_the_same_file_entry_and_prefix(tmp_path):
    """A spec base names one of the models when file, entry and prefix agree; another entry of
    the same file is a separate base."""
    raw, ema = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    torch.save({"state_dict": raw, "state_dict_ema": ema}, tmp_path / "a.pth")
    torch.save({"state_dict": raw, "state_dict_ema": ema}, tmp_path / "b.pth")
    ema_a = terge.checkpoint(tmp_path / "a.pth", entry="state_dict_ema")
    ema_b = f"{tmp_path}/b.pth::state_dict_ema"
    _, lineage = terge.merge([ema_a, ema_b], base=ema_b, lineage=True)
    assert lineage.base.index == 1
    _, lineage = terge.merge(
        [ema_a, ema_b], base=terge.checkpoint(tmp_path / "b.pth", entry="state_dict"), lineage=True
    )
    assert lineage.base.index == "separate"
    assert lineage.base.path == f"{tmp_path / 'b.pth'}::entry=state_dict,prefix="
    with pytest.raises(MergeArgumentError, match=r"which is no existing file or folder"):
        terge.merge([ema_a, ema_b], base=terge.checkpoint(tmp_path / "c.pth", entry="x"))
    with pytest.raises(MergeArgumentError, match=r"got a single path"):
        terge.merge(ema_a)  # type: ignore[arg-type]


# --- distributed=True (the distributed runs are in tests/e2e/test_distributed_files.py) -------


def test_distributed_needs_out(linears):
    with pytest.raises(MergeArgumentError, match=r"distributed=True splits the shards .* out="):
        terge.merge(linears, distributed=True)


def test_distributed_needs_an_initialised_process_group(tmp_path):
    paths = []
    for i, state in enumerate(states()):
        terge.save(state, tmp_path / f"m{i}")
        paths.append(tmp_path / f"m{i}")
    with pytest.raises(MergeArgumentError, match=r"needs torch.distributed initialised .*torchrun"):
        terge.merge(paths, out=tmp_path / "out", distributed=True)
    assert not (tmp_path / "out").exists()


def test_distributed_merges_files_only(linears, tmp_path):
    terge.save(linears[0], tmp_path / "m0")
    with pytest.raises(MergeArgumentError, match=r"but models\[1\] is a Linear in this process"):
        terge.merge([tmp_path / "m0", *linears[1:]], out=tmp_path / "out", distributed=True)
    assert not (tmp_path / "out").exists()


def test_distributed_must_be_a_bool(linears, tmp_path):
    with pytest.raises(MergeArgumentError, match=r"`distributed` must be True or False"):
        terge.merge(linears, out=tmp_path / "out", distributed="yes")


def test_distributed_writes_safetensors_or_a_distributed_checkpoint_only(tmp_path):
    """A distributed file merge splits safetensors shards or a distributed checkpoint's data
    files; a LoRA adapter is written by one process, so the two together are refused before any
    rank talks to another."""
    terge.save({"w": torch.ones(2, 2)}, tmp_path / "a")
    terge.save({"w": torch.zeros(2, 2)}, tmp_path / "b")
    with pytest.raises(MergeArgumentError, match=r"out_format='lora'; merge on one process"):
        terge.merge(
            [tmp_path / "a", tmp_path / "b"],
            out=tmp_path / "o",
            out_format="lora",
            lora_rank=1,
            distributed=True,
        )


class _ManyTensors(torch.nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(4)) for _ in range(count)
        )


@pytest.fixture
def collections():
    """The garbage collections that start while the test runs (``gc.callbacks``)."""
    import gc

    started = []

    def record(phase, info):
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(record)
    yield started
    gc.callbacks.remove(record)


def test_no_garbage_collection_starts_during_a_merge_in_memory(collections):
    """A merge of many tensors makes thousands of small objects; the collector stays paused
    while it plans and merges with terge's own methods (a full collection walks every object of
    the process), and runs again after."""
    import gc

    models = [_ManyTensors(600) for _ in range(3)]
    assert gc.isenabled()
    collections.clear()  # those while the models were built
    terge.merge(models, inplace=True, method={"weights.0": "ties", re.compile(r".*"): "arithmetic"})
    assert collections == []
    assert gc.isenabled()
    gc.collect()  # the collector still works after
    assert collections


def test_a_users_method_runs_with_the_collector_on(collections):
    """A user's method may leave a cycle holding a tensor: the collector is back on before the
    tensors are computed (the plan was made with it paused)."""
    import gc

    models = [_ManyTensors(600) for _ in range(3)]
    seen = []

    def mean(tensors, weights, base):
        seen.append(gc.isenabled())
        return sum(tensors) / len(tensors)

    collections.clear()
    terge.merge(models, inplace=True, method={"weights.0": mean, re.compile(r".*"): "arithmetic"})
    assert seen == [True]
    assert gc.isenabled()


def test_the_collector_is_resumed_after_a_failed_merge_and_left_off_if_it_was_off():
    import gc

    with pytest.raises(MergeArgumentError):
        terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], weights=[1.0])
    assert gc.isenabled()
    gc.disable()
    try:
        terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_merge_written_to_files_runs_with_the_collector_on(tmp_path):
    """Writing goes tensor by tensor and must not keep what it drops in a cycle until the end."""
    import gc

    seen = []

    def mean(tensors, weights, base):
        seen.append(gc.isenabled())
        return sum(tensors) / len(tensors)

    terge.merge([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], method=mean, out=tmp_path / "o")
    assert seen == [True, True]
