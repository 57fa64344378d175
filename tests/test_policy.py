"""Lineage policies: each rule catches what it names, and passes a merge that keeps it."""

from __future__ import annotations

import pytest
import regex
import torch
from safetensors.torch import save_file

import terge
from terge.errors import PolicyError, TergeError
from terge.lineage import (
    EXCLUDED,
    NOT_A_TENSOR,
    NOT_FLOATING,
    ONE_MODEL,
    SEPARATE,
    SHAPE_MISMATCH,
    TIED,
    ModelRecord,
)
from terge.policy import RULES, Policy, Violation, check_lineage


def _state(seed: int, head: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(5, 2, generator=generator),
        "model.layers.0.mlp.up_proj.weight": torch.randn(3, 2, generator=generator),
        "model.layers.1.mlp.up_proj.weight": torch.randn(3, 2, generator=generator),
        "lm_head.weight": torch.randn(head, 2, generator=generator),
        "steps": torch.tensor([1]),
    }


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, head in enumerate([5, 5, 7]):  # model 2's head has another shape
        save_file(_state(i, head), f"m{i}.safetensors")
    return [f"m{i}.safetensors" for i in range(3)]


def _merged(files, **options):
    terge.merge(files, out="out", overwrite=True, **options)
    return terge.load_lineage("out")


def rules(found: list[Violation]) -> list[tuple[str, str | None]]:
    return [(v.rule, v.name) for v in found]


def test_an_empty_policy_passes_anything(files):
    lineage = _merged(files)
    assert Policy().empty
    assert check_lineage(lineage, Policy()) == []


def test_required_tensors_left_alone_name_their_reason(files):
    lineage = _merged(files[:2], excluded=["lm_head.weight"])
    found = check_lineage(lineage, Policy(require_merged=(regex.compile("head|mlp"),)))
    assert rules(found) == [("merged", "lm_head.weight")]
    assert "left as in the base (excluded)" in found[0].message
    assert check_lineage(lineage, Policy(require_merged=(regex.compile("mlp"),))) == []


def test_a_required_pattern_that_matches_nothing_fails(files):
    found = check_lineage(_merged(files), Policy(require_merged=("lm_haed.weight",)))
    assert rules(found) == [("merged", None)]
    assert "matches no tensor" in found[0].message


def test_forbidden_reasons_fail(files):
    lineage = _merged(files)  # model 2's head has another shape: merged from 0 and 1 only
    assert lineage.skipped == {"steps": NOT_FLOATING}
    assert check_lineage(lineage, Policy(forbid_skipped=(SHAPE_MISMATCH,))) == []
    found = check_lineage(lineage, Policy(forbid_skipped=(NOT_FLOATING,)))
    assert rules(found) == [("skipped", "steps")]
    only_two_agree = _merged([files[0], files[2]])
    found = check_lineage(only_two_agree, Policy(forbid_skipped=(SHAPE_MISMATCH,)))
    assert rules(found) == [("skipped", "lm_head.weight")]
    assert "(shape mismatch)" in found[0].message


def test_the_merged_set_against_the_base_floating_tensors(files):
    policy = Policy(merged_is_base_floating=True)
    assert check_lineage(_merged(files), policy) == []
    lineage = _merged(files, excluded=[regex.compile("layers.1")])
    found = check_lineage(lineage, policy)  # the base's headers, read from the recorded path
    assert rules(found) == [("base", "model.layers.1.mlp.up_proj.weight")]
    assert "(excluded)" in found[0].message
    lineage.base = ModelRecord(0, "state_dict")  # no path: judged by the lineage's record
    assert rules(check_lineage(lineage, policy)) == rules(found)


def test_dtype_changes(files):
    policy = Policy(same_dtypes=True)
    assert check_lineage(_merged(files), policy) == []
    lineage = _merged(files, out_dtype="bfloat16")
    found = check_lineage(lineage, policy)
    assert {name for _, name in rules(found)} == {
        "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "lm_head.weight",
    }
    assert "written as bfloat16, but the base holds float32" in found[0].message
    assert rules(check_lineage(lineage, policy, merged="out")) == rules(found)
    lineage.base = ModelRecord(0, "state_dict")
    found = check_lineage(lineage, policy)
    assert rules(found) == [("dtypes", None)]
    assert "give --base" in found[0].message
    given = check_lineage(lineage, policy, base=files[0])  # --base: named per tensor again
    assert len(given) == 4 and all(v.name is not None for v in given)


def test_tied_tensors_must_stay_tied(tied_models):
    _, lineage = terge.merge(tied_models, lineage=True)
    alias, first = next(iter(lineage.tied.items()))
    assert check_lineage(lineage, Policy(tied=((alias, first),))) == []
    assert check_lineage(lineage, Policy(tied=((first, alias),))) == []
    other = next(name for name in lineage if name != first)
    found = check_lineage(lineage, Policy(tied=((first, other),)))
    assert rules(found) == [("tied", first)]
    assert "two tensors" in found[0].message


def test_models_must_be_pinned(files):
    policy = Policy(pinned=True)
    found = check_lineage(_merged(files), policy)
    assert rules(found) == [("pinned", None)] * 3
    assert "models[0] (file, read from m0.safetensors) is not pinned" in found[0].message
    pinned = _merged(files, digests=True)
    assert all(record.files for record in pinned.models)
    assert check_lineage(pinned, policy) == []
    unpinned = _merged(files)
    unpinned.models = (
        ModelRecord(0, "file", files[0], revision="0123abc"),
        *pinned.models[1:],
    )
    assert check_lineage(unpinned, policy) == []  # a revision pins too
    _, in_memory = terge.merge([_state(0), _state(1)], lineage=True)
    assert "read from memory" in check_lineage(in_memory, policy)[0].message


def test_weights_and_settings_within_ranges(files):
    lineage = _merged(files[:2], weights=[1, 3])
    assert check_lineage(lineage, Policy(ranges={"weight": (0.0, 1.0)})) == []
    found = check_lineage(lineage, Policy(ranges={"weight": (0.3, 1.0)}))
    assert {v.message for v in found} == {"models[0]'s weight is 0.25, outside [0.3, 1.0]"}
    assert len(found) == 4  # every merged tensor
    lineage = _merged(files[:3], method="ties", seed=0)
    found = check_lineage(lineage, Policy(ranges={"density": (0.3, 0.9)}))
    assert "the setting density is 0.2, outside [0.3, 0.9]" in found[0].message
    assert check_lineage(lineage, Policy(ranges={"density": (0.1, 0.2)})) == []


@pytest.mark.parametrize(
    ("rules_", "message"),
    [
        ({"forbid_skipped": ("shape mismatches",)}, "'shape mismatches' is not a reason"),
        ({"ranges": {"densty": (0, 1)}}, "'densty' is neither 'weight' nor a setting"),
        ({"ranges": {"weight": (1, 0)}}, r"two finite numbers with low <= high"),
        ({"ranges": {"weight": (0, float("inf"))}}, r"two finite numbers"),
        ({"tied": (("a",),)}, "must be a pair of tensor names"),
        (
            {"require_merged": (b"mlp",)},
            r"`require_merged` got a pattern of type bytes \(b'mlp'\); .* pass 'mlp' instead",
        ),
    ],
)
def test_bad_policies_are_refused(rules_, message):
    with pytest.raises(TergeError, match=message):
        Policy(**rules_)
    assert issubclass(PolicyError, ValueError)


def test_forbidden_reasons_cover_models_dropped_from_a_merged_tensor():
    lineage = terge.Lineage(
        {"w": terge.LineageEntry("arithmetic", [(0, 0.5), (2, 0.5)])},
        dropped={"w": {1: NOT_FLOATING}},
    )
    found = check_lineage(lineage, Policy(forbid_skipped=(NOT_FLOATING,)))
    assert [str(v) for v in found] == [
        "w: models[1]'s tensor did not contribute (not floating point), which the policy forbids"
    ]
    found = check_lineage(lineage, Policy(require_merged=("w",), forbid_skipped=(SHAPE_MISMATCH,)))
    assert found == []


def _by_hand(weights=((0, 0.5), (1, 0.5)), **record) -> terge.Lineage:
    return terge.Lineage({"w": terge.LineageEntry("arithmetic", list(weights))}, **record)


@pytest.mark.parametrize(
    ("rules_", "message"),
    [
        ({"tied": (("a", ""),)}, "tied: ('a', '') must be a pair of tensor names."),
        ({"tied": (("a", 1),)}, "tied: ('a', 1) must be a pair of tensor names."),
        ({"tied": (("a", "b", "c"),)}, "tied: ('a', 'b', 'c') must be a pair of tensor names."),
        (
            {"ranges": {"weight": (0, 1, 2)}},
            "ranges: 'weight' must be [low, high], two finite numbers with low <= high; got "
            "[0, 1, 2].",
        ),
        (
            {"ranges": {"weight": (False, 1)}},
            "ranges: 'weight' must be [low, high], two finite numbers with low <= high; got "
            "[False, 1].",
        ),
    ],
)
def test_each_bad_rule_is_refused_by_its_own_check(rules_, message):
    """An empty name, a name that is no string, three names, three bounds and a bool bound are
    each refused
    (exact messages: no other check may fire first)."""
    with pytest.raises(PolicyError, match=regex.escape(message)):
        Policy(**rules_)


def test_a_range_of_one_value_is_a_range():
    """low == high is allowed (inclusive bounds), and a weight on either bound passes."""
    policy = Policy(ranges={"weight": (0.5, 0.5)})
    assert check_lineage(_by_hand(), policy) == []
    assert check_lineage(_by_hand(), Policy(ranges={"weight": (0.25, 0.5)})) == []


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (2.0, "w: models[0]'s weight is 2.0, outside [0.0, 1.0]"),
        (float("nan"), "w: models[0]'s weight is nan, outside [0.0, 1.0]"),
    ],
)
def test_a_weight_above_the_range_or_not_a_number_breaks_it(weight, message):
    """The upper bound is checked too, and a NaN weight (which no comparison orders) fails."""
    lineage = _by_hand(weights=((0, weight), (1, 0.5)))
    found = check_lineage(lineage, Policy(ranges={"weight": (0.0, 1.0)}))
    assert [str(v) for v in found] == [message]


@pytest.mark.parametrize(
    "rules_",
    [
        {"require_merged": ("w",)},
        {"forbid_skipped": (EXCLUDED,)},
        {"merged_is_base_floating": True},
        {"same_dtypes": True},
        {"tied": (("a", "b"),)},
        {"pinned": True},
        {"ranges": {"weight": (0.0, 1.0)}},
    ],
)
def test_any_one_rule_makes_a_policy_not_empty(rules_):
    """`terge lineage check` refuses an empty policy (it would pass anything): every rule on its
    own counts."""
    assert not Policy(**rules_).empty


def test_a_tied_alias_counts_as_merged_only_when_its_tensor_is():
    """An alias (skipped as tied) of a merged tensor is merged; one tied to a tensor not merged
    is not, and the message says why (with the models dropped from it)."""
    lineage = _by_hand(
        skipped={"a": TIED, "b": TIED, "x": ONE_MODEL},
        tied={"a": "w", "b": "x"},
        dropped={"x": {1: SHAPE_MISMATCH}},
    )
    found = check_lineage(lineage, Policy(require_merged=("a", "b", "x")))
    assert [str(v) for v in found] == [
        "b: must be merged ('b'), but was left as in the base (tied)",
        "x: must be merged ('x'), but was left as in the base (held by one model; models[1] "
        "dropped: shape mismatch)",
    ]


def test_the_base_rule_from_the_lineage_alone_ignores_what_cannot_be_merged():
    """Without the base's headers, tensors left alone as tied, not floating or not tensors are
    not floating tensors left unmerged; any other reason is."""
    lineage = _by_hand(
        skipped={"a": TIED, "n": NOT_A_TENSOR, "s": NOT_FLOATING, "x": EXCLUDED},
        tied={"a": "w"},
    )
    found = check_lineage(lineage, Policy(merged_is_base_floating=True))
    assert rules(found) == [("base", "x")]


def test_the_base_rule_against_the_bases_headers(tmp_path):
    """With the base's headers: a tied alias of a merged tensor is merged, a merged name the
    base lacks and a merged tensor the base holds as integers are violations."""
    save_file(
        {"w": torch.ones(2), "a": torch.ones(3), "steps": torch.tensor([1])},
        tmp_path / "base.safetensors",
    )
    lineage = terge.Lineage(
        {
            "w": terge.LineageEntry("arithmetic", [(0, 1.0)]),
            "z": terge.LineageEntry("arithmetic", [(0, 1.0)]),
            "steps": terge.LineageEntry("arithmetic", [(0, 1.0)]),
        },
        skipped={"a": TIED},
        tied={"a": "w"},
    )
    found = check_lineage(
        lineage, Policy(merged_is_base_floating=True), base=tmp_path / "base.safetensors"
    )
    assert [str(v) for v in found] == [
        "z: merged, but the base has no such tensor",
        "steps: merged, but the base holds int64",
    ]


def test_a_recorded_base_path_not_found_is_judged_by_the_lineage(files):
    """A base path the lineage records but this machine lacks is no error: the lineage's own
    record judges it (as a base merged from memory)."""
    lineage = _merged(files, excluded=[regex.compile("layers.1")])
    lineage.base = ModelRecord(0, "file", "elsewhere/m0.safetensors")
    found = check_lineage(lineage, Policy(merged_is_base_floating=True))
    assert rules(found) == [("base", "model.layers.1.mlp.up_proj.weight")]


def test_same_dtypes_reads_the_merged_checkpoints_headers(files):
    """With --merged, the written headers are compared (a file edited after the merge is
    caught even though the lineage records no out_dtype); an out_dtype equal to the base's
    dtype is no change."""
    policy = Policy(same_dtypes=True)
    lineage = _merged(files)
    terge.save({k: v.to(torch.bfloat16) for k, v in terge.load("out").items()}, "edited")
    found = check_lineage(lineage, policy, merged="edited")
    assert "lm_head.weight" in {v.name for v in found}
    assert "written as bfloat16, but the base holds float32" in found[0].message
    assert check_lineage(_merged(files, out_dtype="float32"), policy) == []


def test_pinned_needs_models_and_a_pinned_separate_base():
    """A lineage that records no models pins none; a separate base must be pinned too."""
    found = check_lineage(_by_hand(), Policy(pinned=True))
    assert [str(v) for v in found] == ["the lineage records no models, so none is pinned"]
    digests = {"model.safetensors": "0" * 64}
    lineage = _by_hand(
        models=(ModelRecord(0, "file", "a", digests), ModelRecord(1, "file", "b", digests)),
        base=ModelRecord(SEPARATE, "file", "base"),
    )
    found = check_lineage(lineage, Policy(pinned=True))
    assert [str(v) for v in found] == [
        "the base (file, read from base) is not pinned: no file digests and no revision; merge "
        "from files with digests=True (--digests)"
    ]


def test_violations_come_in_the_order_of_the_rules():
    """One lineage breaking every rule once: the violations come rule by rule, in RULES's order
    (what `terge lineage check` prints and counts)."""
    lineage = _by_hand(weights=((0, 2.0),), skipped={"x": EXCLUDED}, out_dtype=torch.bfloat16)
    policy = Policy(
        require_merged=("x",),
        forbid_skipped=(EXCLUDED,),
        merged_is_base_floating=True,
        same_dtypes=True,
        tied=(("w", "x"),),
        pinned=True,
        ranges={"weight": (0.0, 1.0)},
    )
    found = check_lineage(lineage, policy)
    assert [v.rule for v in found] == list(RULES)
    assert rules(found) == [
        ("merged", "x"),
        ("skipped", "x"),
        ("base", "x"),
        ("dtypes", None),
        ("tied", "w"),
        ("pinned", None),
        ("range", "w"),
    ]


def test_each_rule_reading_the_base_runs_only_when_asked():
    """Both rules read the base's headers, but each judges only when it is in the policy."""
    lineage = _by_hand(skipped={"x": EXCLUDED}, out_dtype=torch.bfloat16)
    assert rules(check_lineage(lineage, Policy(same_dtypes=True))) == [("dtypes", None)]
    assert rules(check_lineage(lineage, Policy(merged_is_base_floating=True))) == [("base", "x")]


def test_the_base_path_may_start_with_a_tilde(tmp_path, monkeypatch):
    """`--base ~/...` is the user's home, as a shell would expand it."""
    save_file({"w": torch.ones(2), "x": torch.ones(2)}, tmp_path / "base.safetensors")
    monkeypatch.setenv("HOME", str(tmp_path))
    found = check_lineage(
        _by_hand(), Policy(merged_is_base_floating=True), base="~/base.safetensors"
    )
    assert [str(v) for v in found] == [
        "x: a floating tensor of the base, but not in the lineage (the base has no such tensor)"
    ]


def test_wrapper_prefixes_are_stripped_from_the_base_and_merged_headers(tmp_path):
    """A base and a merged checkpoint saved from a DDP or compiled model (``module.``,
    ``_orig_mod.``) name their tensors as the lineage does once the prefixes are stripped."""
    save_file(
        {"module.w": torch.ones(2), "module.steps": torch.tensor([1])},
        tmp_path / "base.safetensors",
    )
    save_file({"_orig_mod.w": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "out.safetensors")
    lineage = _by_hand(skipped={"steps": NOT_FLOATING})
    base = tmp_path / "base.safetensors"
    assert check_lineage(lineage, Policy(merged_is_base_floating=True), base=base) == []
    found = check_lineage(
        lineage, Policy(same_dtypes=True), base=base, merged=tmp_path / "out.safetensors"
    )
    assert [str(v) for v in found] == ["w: written as bfloat16, but the base holds float32"]


def test_same_dtypes_with_a_merged_checkpoint(tmp_path):
    """A merged tensor the base lacks has no base dtype to keep (no error); without the base's
    headers, the merged checkpoint cannot be compared and the lineage's out_dtype judges."""
    save_file({"w": torch.ones(2)}, tmp_path / "base.safetensors")
    save_file(
        {"w": torch.ones(2), "extra": torch.ones(2, dtype=torch.bfloat16)},
        tmp_path / "out.safetensors",
    )
    policy, out = Policy(same_dtypes=True), tmp_path / "out.safetensors"
    assert check_lineage(_by_hand(), policy, base=tmp_path / "base.safetensors", merged=out) == []
    assert check_lineage(_by_hand(), policy, merged=out) == []  # no base: no out_dtype, no change
    found = check_lineage(_by_hand(out_dtype=torch.bfloat16), policy, merged=out)
    assert rules(found) == [("dtypes", None)]
    assert "give --base" in found[0].message


def test_models_dropped_are_listed_in_index_order():
    """Both the forbidden reasons and the reason a required tensor was not merged list the
    models dropped by index, whatever order the lineage records them in."""
    lineage = _by_hand(
        weights=((0, 0.5), (3, 0.5)),
        skipped={"x": ONE_MODEL},
        dropped={"w": {2: SHAPE_MISMATCH, 1: NOT_FLOATING}, "x": {2: SHAPE_MISMATCH, 1: EXCLUDED}},
    )
    found = check_lineage(lineage, Policy(forbid_skipped=(SHAPE_MISMATCH, NOT_FLOATING)))
    assert [str(v) for v in found] == [
        "w: models[1]'s tensor did not contribute (not floating point), which the policy forbids",
        "w: models[2]'s tensor did not contribute (shape mismatch), which the policy forbids",
        "x: models[2]'s tensor did not contribute (shape mismatch), which the policy forbids",
    ]
    found = check_lineage(lineage, Policy(require_merged=("x",)))
    assert [str(v) for v in found] == [
        "x: must be merged ('x'), but was left as in the base (held by one model; models[1] "
        "dropped: excluded; models[2] dropped: shape mismatch)"
    ]


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (
            ("w", "x"),
            "w: must be tied to 'x', but they are two tensors ('w': merged by arithmetic; 'x': "
            "left as in the base (held by one model))",
        ),
        (
            ("a", "nope"),
            "a: must be tied to 'nope', but they are two tensors ('a': tied to 'w'; 'nope': not "
            "in the lineage (the base has no such tensor))",
        ),
    ],
)
def test_tied_violations_say_what_each_name_is(pair, message):
    lineage = _by_hand(skipped={"a": TIED, "x": ONE_MODEL}, tied={"a": "w"})
    assert [str(v) for v in check_lineage(lineage, Policy(tied=(pair,)))] == [message]


def test_a_seed_may_be_bounded():
    """`seed` is a setting a range may bound (the random methods record it)."""
    lineage = terge.Lineage({"w": terge.LineageEntry("dare_ties", [(0, 1.0)], {"seed": 3})})
    assert check_lineage(lineage, Policy(ranges={"seed": (0, 3)})) == []
    found = check_lineage(lineage, Policy(ranges={"seed": (0, 0)}))
    assert [str(v) for v in found] == ["w: the setting seed is 3, outside [0, 0]"]


def test_a_setting_that_is_no_number_is_outside_any_range():
    """A bool or a str setting is never within [low, high] (nor an error): the bounds are
    numbers, and True is not 1 here."""
    entry = terge.LineageEntry("custom", [(0, 1.0)], {"rescale": True, "elect": "sum"})
    found = check_lineage(
        terge.Lineage({"w": entry}), Policy(ranges={"rescale": (0, 1), "elect": (0, 1)})
    )
    assert [str(v) for v in found] == [
        "w: the setting rescale is True, outside [0, 1]",
        "w: the setting elect is 'sum', outside [0, 1]",
    ]


def test_ranges_skip_settings_an_entry_lacks():
    """A setting the entry's method does not record is passed over and the next range still
    applies, also for entries assigned as plain (method, weights) tuples (no settings)."""
    policy = Policy(ranges={"density": (0.0, 1.0), "weight": (0.0, 0.4)})
    expected = [
        "w: models[0]'s weight is 0.5, outside [0.0, 0.4]",
        "w: models[1]'s weight is 0.5, outside [0.0, 0.4]",
    ]
    assert [str(v) for v in check_lineage(_by_hand(), policy)] == expected
    plain = terge.Lineage({"w": ("arithmetic", [(0, 0.5), (1, 0.5)])})
    assert [str(v) for v in check_lineage(plain, policy)] == expected


def test_every_models_weight_is_bounded():
    lineage = _by_hand(weights=((0, 0.5), (1, 2.0)))
    found = check_lineage(lineage, Policy(ranges={"weight": (0.0, 1.0)}))
    assert [str(v) for v in found] == ["w: models[1]'s weight is 2.0, outside [0.0, 1.0]"]


def test_one_pattern_reason_or_pair_is_a_rule_of_one(files):
    """A single name is one pattern, not its letters (which matched nothing, one violation a
    letter); a single compiled pattern, a ``terge.layers(...)``, a single reason and a single
    pair are rules of one; lists become tuples, so the policy is what it was made with."""
    lineage = _merged(files[:2], excluded=["lm_head.weight"])
    found = check_lineage(lineage, Policy(require_merged="lm_head.weight"))
    assert rules(found) == [("merged", "lm_head.weight")]
    assert Policy(require_merged=regex.compile("mlp")).require_merged == (regex.compile("mlp"),)
    blocks = terge.layers("0-1")
    assert Policy(require_merged=blocks).require_merged == (blocks,)
    assert Policy(require_merged=["a", "b"]).require_merged == ("a", "b")
    assert Policy(forbid_skipped=NOT_FLOATING).forbid_skipped == (NOT_FLOATING,)
    assert check_lineage(_merged(files), Policy(forbid_skipped=NOT_FLOATING)) == check_lineage(
        _merged(files), Policy(forbid_skipped=(NOT_FLOATING,))
    )
    assert Policy(tied=("a", "b")).tied == (("a", "b"),)
    assert Policy(tied=[["a", "b"], ["c", "d"]]).tied == (("a", "b"), ("c", "d"))
    assert Policy(require_merged=None, forbid_skipped=None, tied=None).empty


@pytest.mark.parametrize(
    ("rules_", "error", "message"),
    [
        ({"require_merged": 5}, TypeError, "`require_merged` must be a str, a compiled pattern"),
        ({"require_merged": {"a": 1}}, TypeError, "a list of them; got dict."),
        ({"require_merged": b"head"}, TypeError, "pass 'head' instead"),
        ({"forbid_skipped": 5}, PolicyError, "forbid_skipped: give a list of them; got int."),
        ({"forbid_skipped": {NOT_FLOATING: 1}}, PolicyError, "give a list of them; got dict."),
        ({"tied": "ab"}, PolicyError, "tied: give a list of them; got str."),
        ({"tied": ("a",)}, PolicyError, "tied: 'a' must be a pair of tensor names."),
    ],
)
def test_rules_of_the_wrong_type_are_refused_by_name(rules_, error, message):
    with pytest.raises(error, match=regex.escape(message)):
        Policy(**rules_)
