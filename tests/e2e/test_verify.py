"""`terge lineage verify` checks every field a lineage records, against the others and against
the tensors: an edit anywhere fails, naming the tensor (issue #13, case 11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import terge
from terge import LineageError, cli, load_lineage
from terge.audit import verify_lineage
from terge.io import save
from terge.lineage import LineageEntry
from terge.methods import REGISTRY
from terge.plan import Step, reads_base, step_from_entry

from helpers import states


@pytest.fixture
def folders(tmp_path, monkeypatch) -> list[Path]:
    """Checkpoint folders a, b, c (and a separate base p) in tmp_path, the working folder."""
    monkeypatch.chdir(tmp_path)
    for name, state in zip("abcp", states(4)):
        save(state, tmp_path / name)
    return [Path(name) for name in "abc"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def edit(path: str, change) -> None:
    """Apply ``change`` to the lineage file's JSON."""
    data = json.loads(Path(path).read_text())
    change(data)
    Path(path).write_text(json.dumps(data))


def rewrite(folder: str, change) -> None:
    """Apply ``change`` to the tensors of the folder's single shard."""
    path = Path(folder) / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def names(problems: list[tuple[str, str]]) -> list[str]:
    return sorted({name for name, _ in problems})


def test_edited_equal_weights_fail_verify(capsys, folders):
    terge.merge(folders[:2], out="m")

    def skew(data):
        for entry in data["merged"].values():
            entry["contributions"] = [[0, 0.1], [1, 0.9]]

    edit("m/lineage.json", skew)
    problems = verify_lineage(load_lineage("m"), "m")
    assert names(problems) == ["layers.0.weight", "layers.1.weight", "norm.bias"]
    assert problems[0] == (
        "layers.0.weight",
        "its weights [0.1, 0.9], coefficients [1.0, 1.0] and divisor 2.0 disagree (equal "
        "coefficients mean equal weights that sum to 1); the lineage was edited",
    )
    code, out, _ = run(capsys, "lineage", "verify", "m/lineage.json", "--merged", "m")
    assert code == 1
    assert "norm.bias: its weights [0.1, 0.9]" in out


def test_edited_unequal_weights_fail_verify(folders):
    terge.merge(folders[:2], weights=[1, 3], out="m")
    assert verify_lineage(load_lineage("m"), "m") == []
    edit(
        "m/lineage.json",
        lambda d: d["merged"]["norm.bias"].update(contributions=[[0, 0.75], [1, 0.25]]),
    )
    assert verify_lineage(load_lineage("m"), "m") == [
        (
            "norm.bias",
            "its weights [0.75, 0.25], coefficients [1.0, 3.0] and divisor 4.0 disagree (the "
            "divisor is the coefficients' sum and the weights are the coefficients over it); "
            "the lineage was edited",
        )
    ]


def test_an_edited_divisor_or_unnormalised_weight_fails_verify(folders):
    terge.merge(folders[:2], weights=[1, 3], out="m")
    edit("m/lineage.json", lambda d: d["merged"]["norm.bias"].update(divisor=8.0))
    assert "norm.bias" in names(verify_lineage(load_lineage("m"), "m"))
    terge.merge(folders[:2], weights=[1, -1], normalize=False, out="n")
    assert verify_lineage(load_lineage("n"), "n") == []
    edit(
        "n/lineage.json", lambda d: d["merged"]["norm.bias"].update(contributions=[[0, 1], [1, 1]])
    )
    problems = verify_lineage(load_lineage("n"), "n")
    assert problems == [
        (
            "norm.bias",
            "its weights [1.0, 1.0], coefficients [1.0, -1.0] and divisor None disagree (without "
            "a divisor, the weights are the coefficients); the lineage was edited",
        )
    ]


def test_float32_accumulation_with_unequal_weights_verifies(folders):
    terge.merge(folders, weights=[1, 3, 7], dtype=torch.float32, out="m")
    assert verify_lineage(load_lineage("m"), "m") == []
    terge.merge(folders, weights=[0.1, 0.1, 0.1], out="e")  # equal, inexact: 1/3 each
    assert verify_lineage(load_lineage("e"), "e") == []


def test_a_seed_on_a_method_that_is_not_random_and_doubled_models_fail(folders):
    terge.merge(folders[:2], out="m")

    def change(data):
        data["merged"]["norm.bias"]["settings"]["seed"] = 4
        data["merged"]["layers.0.weight"]["contributions"] = [[0, 0.5], [0, 0.5]]

    edit("m/lineage.json", change)
    problems = verify_lineage(load_lineage("m"), "m")
    assert ("norm.bias", "it records a seed, but arithmetic is not random") in problems
    assert ("layers.0.weight", "its contributions name a model twice ([0, 0])") in problems


def test_coefficients_on_a_method_that_does_not_use_them_fail(folders):
    terge.merge(folders, method="magmax", seed=0, out="m")
    edit(
        "m/lineage.json",
        lambda d: d["merged"]["norm.bias"].update(coefficients=[1, 1], divisor=2),
    )
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "it records coefficients or a divisor, which magmax does not use")
    ]


def test_digests_must_name_the_models_read(folders):
    terge.merge(folders, method="task_arithmetic", out="m", digests=True)
    assert verify_lineage(load_lineage("m"), "m") == []
    edit("m/lineage.json", lambda d: d["digests"]["norm.bias"]["models"].pop("0"))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "its digests are of models [1, 2], but the merge read models [0, 1, 2]")
    ]


def test_digests_must_name_the_separate_base_read(folders):
    """Task arithmetic over a separate base reads that base: digests that drop its digest, or
    a plain merge's digests that add one, do not describe the models read."""
    terge.merge(folders[:2], base="p", method="task_arithmetic", out="m", digests=True)
    assert verify_lineage(load_lineage("m"), "m") == []
    edit("m/lineage.json", lambda d: d["digests"]["norm.bias"].pop("base"))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "its digests lack the separate base the merge read")
    ]
    terge.merge(folders[:2], method="task_arithmetic", out="n", digests=True)
    assert verify_lineage(load_lineage("n"), "n") == []
    edit("n/lineage.json", lambda d: d["digests"]["norm.bias"].update(base="0" * 64))
    assert ("norm.bias", "its digests record a separate base, which the merge did not read") in (
        verify_lineage(load_lineage("n"), "n")
    )


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e400", "9" * 400])
def test_a_non_finite_weight_does_not_load(folders, text):
    terge.merge(folders[:2], out="m")
    raw = Path("m/lineage.json").read_text()
    data = json.loads(raw)
    data["merged"]["norm.bias"]["contributions"][0][1] = "WEIGHT"
    Path("m/lineage.json").write_text(json.dumps(data).replace('"WEIGHT"', text))
    with pytest.raises(
        LineageError, match=r'merged\["norm.bias"\]\.contributions\[0\]\[1\]'
    ) as caught:
        load_lineage("m")
    assert "finite" in str(caught.value)
    assert caught.value.path == Path("m/lineage.json")


# --- tensors left as in the base --------------------------------------------------------------


def test_a_tensor_copied_from_the_base_is_verified(capsys, folders):
    terge.merge(folders, out="m", excluded="norm.bias")
    assert verify_lineage(load_lineage("m"), "m") == []

    def change(tensors):
        tensors["steps"] = torch.tensor([5])
        tensors["norm.bias"] = tensors["norm.bias"] + 1

    rewrite("m", change)
    assert verify_lineage(load_lineage("m"), "m") == [
        (
            "norm.bias",
            "left as in the base (excluded), but the checkpoint's tensor is not the base's",
        ),
        (
            "steps",
            "left as in the base (not floating point), but the checkpoint's tensor is not the "
            "base's",
        ),
    ]
    code, out, _ = run(capsys, "lineage", "verify", "m", "--merged", "m")
    assert code == 1
    assert "steps: left as in the base" in out


def test_a_copied_tensor_cast_to_out_dtype_is_verified(folders):
    terge.merge(folders, out="m", excluded="norm.bias", out_dtype="bfloat16")
    assert verify_lineage(load_lineage("m"), "m") == []
    rewrite("m", lambda t: t.update({"norm.bias": t["norm.bias"].float()}))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "the checkpoint holds float32, not bfloat16")
    ]


def test_a_separate_base_is_read_for_the_tensors_it_left(folders):
    terge.merge(folders[:2], base="p", out="m")
    lineage = load_lineage("m")
    assert lineage.skipped == {"steps": "not floating point"}
    assert verify_lineage(lineage, "m") == []
    rewrite("m", lambda t: t.update({"steps": torch.tensor([0])}))  # a's, not p's
    assert names(verify_lineage(lineage, "m")) == ["steps"]


def test_a_merged_tensor_edited_in_place_fails_verify(capsys, folders):
    """Every merged tensor is recomputed and compared bit for bit: one element changed (same
    dtype, same shape, no digests to give it away) is named."""
    terge.merge(folders, out="m")
    assert verify_lineage(load_lineage("m"), "m") == []

    def nudge(tensors):
        weight = tensors["layers.0.weight"].clone()
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))
        tensors["layers.0.weight"] = weight

    rewrite("m", nudge)
    problems = verify_lineage(load_lineage("m"), "m")
    assert names(problems) == ["layers.0.weight"]
    assert "differs from the recomputed one" in problems[0][1]
    code, out, _ = run(capsys, "lineage", "verify", "m", "--merged", "m")
    assert code == 1 and "layers.0.weight" in out


def test_a_merged_dtype_changed_after_the_merge_fails(folders):
    terge.merge(folders, out="m")
    rewrite("m", lambda t: t.update({"norm.bias": t["norm.bias"].to(torch.float64)}))
    assert ("norm.bias", "the checkpoint holds float64, not float32") in verify_lineage(
        load_lineage("m"), "m"
    )


def test_tensors_the_lineage_does_not_account_for_are_named(folders):
    terge.merge(folders, out="m")
    rewrite("m", lambda t: t.update({"backdoor": torch.ones(2)}))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("backdoor", "the checkpoint holds it, but the lineage neither merged it nor left it alone")
    ]


def test_a_name_both_merged_and_left_alone_fails(folders):
    terge.merge(folders, out="m")
    edit("m/lineage.json", lambda d: d["skipped"].update({"norm.bias": "excluded"}))
    assert ("norm.bias", "the lineage both merged it and left it alone (excluded)") in (
        verify_lineage(load_lineage("m"), "m")
    )


# --- one Step, built by plan.py -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "coefficients", "divisor", "seed"),
    [
        ("arithmetic", (1.0, 3.0), 4.0, None),
        ("arithmetic", (1.0, -1.0), None, None),
        ("task_arithmetic", (1.0, 1.0), 2.0, None),
        ("dare_ties", (0.25, 0.75), None, 7),
        ("slerp", (0.25, 0.75), None, None),
    ],
)
def test_step_from_entry_inverts_lineage_entry(method, coefficients, divisor, seed):
    configured = REGISTRY[method].factory()
    weights = coefficients if divisor is None else tuple(c / divisor for c in coefficients)
    step = Step(
        name="w",
        method=configured,
        contributors=(1, 2),
        weights=weights,
        uses_base=reads_base(configured),
        seed=seed,
        coefficients=coefficients if configured.streaming else weights,
        divisor=divisor if configured.streaming else None,
    )
    assert step_from_entry("w", step.lineage_entry(), configured) == step


def test_an_entry_written_before_methods_divided_recomputes_as_it_was_computed():
    """Task arithmetic's lineages from before it divided its sum once record no coefficients:
    they recompute with the recorded (normalised) weights, as they were written."""
    configured = REGISTRY["task_arithmetic"].factory()
    entry = LineageEntry("task_arithmetic", [(0, 1 / 3), (1, 2 / 3)], {"scale": 1.0})
    step = step_from_entry("w", entry, configured)
    assert step.method_divisor is None and step.method_weights == (1 / 3, 2 / 3)
    recorded = step.lineage_entry()
    assert recorded.coefficients == (1 / 3, 2 / 3) and recorded.divisor is None


# --- run from another folder ----------------------------------------------------------------------


def test_verify_from_another_folder_suggests_models(capsys, folders, tmp_path, monkeypatch):
    terge.merge(folders, out="m")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run(capsys, "lineage", "verify", "../m/lineage.json", "--merged", "../m")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert "models[0] (file a) was read from 'a', which does not exist from here" in err
    assert "relative to the folder it ran in" in err
    assert "--models" in err
    code, out, _ = run(
        capsys,
        "lineage",
        "verify",
        "../m/lineage.json",
        "--merged",
        "../m",
        "--models",
        "../a",
        "../b",
        "../c",
    )
    assert code == 0, out


# --- fields only verify reads: a custom mark, a missing seed or base, digests of the output -------


def test_an_entry_marked_custom_is_not_recomputed_by_the_method_of_its_name(folders):
    """A user's function may share a built-in's name: ``custom`` says terge cannot recompute
    it, whatever it is called."""
    terge.merge(folders, out="m")
    edit("m/lineage.json", lambda d: d["merged"]["norm.bias"].update(custom=True))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "made by the custom method 'arithmetic'; cannot be recomputed")
    ]


def test_a_random_method_without_its_seed_or_a_base_method_without_a_base_is_bad_input(folders):
    terge.merge(folders, method="dare_ties", seed=3, out="m")
    edit("m/lineage.json", lambda d: d["merged"]["norm.bias"]["settings"].pop("seed"))
    with pytest.raises(LineageError) as caught:
        verify_lineage(load_lineage("m"), "m")
    assert (
        str(caught.value)
        == "lineage: 'norm.bias' was merged by dare_ties, which is random, but no seed."
    )
    terge.merge(folders, method="task_arithmetic", out="n")
    edit("n/lineage.json", lambda d: d.update(base=None))
    with pytest.raises(LineageError) as caught:
        verify_lineage(load_lineage("n"), "n")
    assert str(caught.value) == (
        "lineage: 'layers.0.weight' was merged with a base, but no base is recorded."
    )


def test_an_edited_output_digest_fails_both_comparisons(folders):
    """The checkpoint is the one merged, but the lineage's digest of it was edited: the
    checkpoint does not match the digest, and neither does the recomputed tensor."""
    terge.merge(folders, out="m", digests=True)
    edit("m/lineage.json", lambda d: d["digests"]["norm.bias"].update(output="0" * 64))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "the checkpoint's tensor is not the one merged (digest differs)"),
        ("norm.bias", "recomputing gives another tensor than the one recorded"),
    ]


def test_every_changed_model_and_a_changed_separate_base_are_named(folders):
    terge.merge(folders[:2], base="p", method="task_arithmetic", out="m", digests=True)
    rewrite("a", lambda t: t.update({"norm.bias": t["norm.bias"] + 1}))
    rewrite("b", lambda t: t.update({"norm.bias": t["norm.bias"] + 1}))
    rewrite("p", lambda t: t.update({"norm.bias": t["norm.bias"] + 1}))
    problems = verify_lineage(load_lineage("m"), "m")
    assert problems[:3] == [
        ("norm.bias", "models[0]'s tensor is not the one merged (digest differs)"),
        ("norm.bias", "models[1]'s tensor is not the one merged (digest differs)"),
        ("norm.bias", "the base's tensor is not the one merged (digest differs)"),
    ]
    assert names(problems) == ["norm.bias"]


# --- the weighing: every way an edit can make it inconsistent -------------------------------------


def test_a_divisor_without_coefficients_or_on_a_method_that_does_not_divide_fails(folders):
    terge.merge(folders[:2], weights=[1, 3], out="m")
    edit("m/lineage.json", lambda d: d["merged"]["norm.bias"].pop("coefficients"))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "it records a divisor but no coefficients"),
        ("norm.bias", "the checkpoint's tensor differs from the recomputed one"),
    ]
    terge.merge(folders, method="magmax", seed=0, out="n")
    edit("n/lineage.json", lambda d: d["merged"]["norm.bias"].update(divisor=2))
    assert verify_lineage(load_lineage("n"), "n") == [
        ("norm.bias", "it records coefficients or a divisor, which magmax does not use")
    ]


@pytest.mark.parametrize(
    ("weights", "shown"),
    [
        ([0.5 + 1e-13, 0.5 + 1e-13], "[0.5000000000001, 0.5000000000001]"),  # beyond rounding
        ([1 / 3, 1 / 3, 0.5], "[0.3333333333333333, 0.3333333333333333, 0.5]"),  # not equal
    ],
)
def test_equal_weights_must_be_equal_and_sum_to_one_within_rounding(folders, weights, shown):
    terge.merge(folders[: len(weights)], out="m")
    contributions = [[i, w] for i, w in enumerate(weights)]
    edit("m/lineage.json", lambda d: d["merged"]["norm.bias"].update(contributions=contributions))
    ones = ", ".join(["1.0"] * len(weights))
    assert verify_lineage(load_lineage("m"), "m") == [
        (
            "norm.bias",
            f"its weights {shown}, coefficients [{ones}] and divisor {float(len(weights))} "
            "disagree (equal coefficients mean equal weights that sum to 1); the lineage was "
            "edited",
        )
    ]


def test_equal_float32_weights_verify(folders):
    """1/3 rounded to float32 is not 1/3: equal weights are checked within the accumulation
    dtype's rounding."""
    terge.merge(folders, dtype=torch.float32, out="m")
    lineage = load_lineage("m")
    assert lineage["norm.bias"][1][0][1] == torch.tensor(1 / 3, dtype=torch.float32).item()
    assert verify_lineage(lineage, "m") == []


def test_equal_coefficients_over_another_divisor_fail(folders):
    terge.merge(folders[:2], out="m")
    edit("m/lineage.json", lambda d: d["merged"]["norm.bias"].update(divisor=8.0))
    assert verify_lineage(load_lineage("m"), "m") == [
        (
            "norm.bias",
            "its weights [0.5, 0.5], coefficients [1.0, 1.0] and divisor 8.0 disagree (the "
            "divisor is the coefficients' sum and the weights are the coefficients over it); the "
            "lineage was edited",
        ),
        ("norm.bias", "the checkpoint's tensor differs from the recomputed one"),
    ]


# --- tied names and tensors left as in the base ---------------------------------------------------


def test_a_tied_name_must_hold_its_first_name_s_tensor(folders):
    terge.merge(folders, out="m")
    edit(
        "m/lineage.json",
        lambda d: (d["skipped"].update(alias="tied"), d["tied"].update(alias="norm.bias")),
    )
    rewrite("m", lambda t: t.update(alias=t["norm.bias"].clone()))
    assert verify_lineage(load_lineage("m"), "m") == []
    rewrite("m", lambda t: t.update(alias=t["norm.bias"] + 1))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("alias", "tied to 'norm.bias', but holds another tensor")
    ]
    edit("m/lineage.json", lambda d: d["tied"].pop("alias"))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("alias", "left alone as tied, but tied to no name")
    ]


def test_a_tensor_left_as_in_the_base_must_be_in_the_checkpoint_and_the_base_alike(folders):
    terge.merge(folders, out="m", excluded="norm.bias")
    state = states()[0]
    del state["norm.bias"]
    save(state, "a2")
    assert verify_lineage(load_lineage("m"), "m", models=["a2", *folders[1:]]) == [
        ("norm.bias", "left as in the base (excluded), but the base has no such tensor")
    ]
    state["norm.bias"] = torch.zeros(4)
    save(state, "a3")
    assert verify_lineage(load_lineage("m"), "m", models=["a3", *folders[1:]]) == [
        (
            "norm.bias",
            "left as in the base (excluded), but the checkpoint's shape (3,) is not the base's "
            "(4,)",
        )
    ]
    rewrite("m", lambda t: t.pop("norm.bias"))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "left as in the base (excluded), but the checkpoint lacks it")
    ]


def test_a_value_that_is_not_a_tensor_is_left_alone_without_a_tensor_to_compare(folders):
    models = states()
    for state in models:
        state["config"] = {"layers": 2}
    terge.merge(models, out="m")
    lineage = load_lineage("m")
    assert lineage.skipped["config"] == "not a tensor"
    assert verify_lineage(lineage, "m", models=folders) == []


def test_out_dtype_is_checked_where_the_base_cannot_be_read(folders):
    """A separate base in memory is not read again: a merged tensor is still expected in
    out_dtype."""
    terge.merge(folders, base=states(4)[3], out="m", out_dtype="bfloat16")
    rewrite("m", lambda t: t.update({"norm.bias": t["norm.bias"].float()}))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "the checkpoint holds float32, not bfloat16"),
        ("norm.bias", "the checkpoint's tensor differs from the recomputed one"),
    ]


# --- bad input ------------------------------------------------------------------------------------


def test_more_than_five_missing_names_are_abridged(folders):
    terge.merge(folders, out="m")
    edit(
        "m/lineage.json",
        lambda d: d["merged"].update({f"x{i}": d["merged"]["norm.bias"] for i in range(3)}),
    )
    save({"other": torch.zeros(2)}, "wrong")
    with pytest.raises(LineageError) as caught:
        verify_lineage(load_lineage("m"), "wrong")
    assert str(caught.value) == (
        "lineage: it names 6 merged tensors that the checkpoint wrong lacks ('layers.0.weight', "
        "'layers.1.weight', 'norm.bias', 'x0', 'x1', ...); is it the right checkpoint?"
    )


def test_models_given_for_a_lineage_that_records_none_must_cover_the_contributors(folders):
    terge.merge(folders[:2], out="m")
    edit("m/lineage.json", lambda d: d.update(models=[]))
    with pytest.raises(LineageError) as caught:
        verify_lineage(load_lineage("m"), "m", models=folders[:1])
    assert str(caught.value) == "lineage: models[1] contributed but only 1 given."
    assert verify_lineage(load_lineage("m"), "m", models=folders[:2]) == []


def test_a_model_or_separate_base_lacking_a_tensor_is_bad_input_with_digests_too(capsys, folders):
    """The recorded digests are compared only once the tensor is known to be there: a model
    that lacks it is bad input (exit 2), as without digests, not a KeyError."""
    terge.merge(folders[:2], base="p", method="task_arithmetic", out="m", digests=True)
    for folder in ("b", "p"):
        state = dict(zip("abcp", states(4)))[folder]
        del state["norm.bias"]
        save(state, f"{folder}2")
    with pytest.raises(LineageError) as caught:
        verify_lineage(load_lineage("m"), "m", models=["a", "b2"], base="p")
    assert str(caught.value) == (
        "lineage: 'norm.bias' (shape (3,) in the checkpoint) was merged from models[1], but b2 "
        "has no such tensor; are these the models that were merged?"
    )
    with pytest.raises(LineageError) as caught:
        verify_lineage(load_lineage("m"), "m", base="p2")
    assert str(caught.value) == (
        "lineage: 'norm.bias' (shape (3,) in the checkpoint) was merged from the base, but p2 "
        "has no such tensor; are these the models that were merged?"
    )
    argv = ["lineage", "verify", "m", "--merged", "m", "--models", "a", "b2", "--base", "p"]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err == (
        "terge: error: the lineage file m: 'norm.bias' (shape (3,) in the checkpoint) was merged "
        "from models[1], but b2 has no such tensor; are these the models that were merged?\n"
    )


# --- stacks ---------------------------------------------------------------------------------------


def blocks(*names: str) -> dict[str, torch.Tensor]:
    """Folders of 3 blocks (with a config.json) under ``names``; the last one's tensors."""
    for k, name in enumerate(names):
        generator = torch.Generator().manual_seed(k)
        state = {f"model.layers.{i}.w": torch.randn(3, generator=generator) for i in range(3)}
        state["model.embed_tokens.weight"] = torch.randn(2, 3, generator=generator)
        save(state, name)
        (Path(name) / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    return state


def stacked(folders) -> dict[str, torch.Tensor]:
    """Stack s: blocks 0-1 of x, then x's block 2 averaged with y's block 0; y's tensors."""
    del folders  # the working folder
    state = blocks("x", "y")
    terge.stack([("x", 0, 2), [("x", 2, 3), ("y", 0, 1)]], out="s")
    assert verify_lineage(load_lineage("s"), "s") == []
    return state


def test_a_stack_s_missing_unaccounted_or_reassigned_tensors_are_named(folders):
    stacked(folders)
    rewrite("s", lambda t: (t.pop("model.layers.0.w"), t.update(extra=torch.ones(2))))
    edit(
        "s/lineage.json",
        lambda d: d["merged"]["model.layers.2.w"].update(contributions=[[1, 0.5], [0, 0.5]]),
    )
    assert verify_lineage(load_lineage("s"), "s") == [
        ("model.layers.0.w", "the stack wrote it, but the checkpoint lacks it"),
        ("model.layers.2.w", "its merged entry and stack.tensors name other models"),
        ("extra", "the checkpoint holds it, but the stack's lineage does not account for it"),
    ]


def test_a_stack_input_that_lacks_a_tensor_is_bad_input(folders):
    state = stacked(folders)
    del state["model.layers.0.w"]
    save(state, "y2")
    with pytest.raises(LineageError) as caught:
        verify_lineage(load_lineage("s"), "s", models=["x", "y2"])
    assert str(caught.value) == (
        "lineage: 'model.layers.2.w' comes from 'model.layers.0.w' of models[1], which y2 "
        "lacks; are these the models that were stacked?"
    )


# --- what a difference says -----------------------------------------------------------------------

ANGLE_HINT = (
    " ({method}'s angle is summed in a fixed order since terge 0.2.0; a merge by an earlier build "
    "can differ from it in the last places of some values: check with --rtol, e.g. 1e-2 for "
    "bfloat16, 1e-6 for float32, 1e-9 for float64)"
)


@pytest.mark.parametrize(
    ("method", "count", "hinted"),
    [
        (terge.methods.slerp(), 2, True),
        (terge.methods.model_stock(), 3, True),
        (terge.methods.slerp(zero="unnormalised"), 2, False),  # mergekit's: no fixed-order sum
        (terge.methods.model_stock(clamp=False), 3, False),
        (terge.methods.model_stock(filter_wise=True), 3, False),
        ("arithmetic", 3, False),
    ],
)
def test_a_difference_hints_at_the_angle_s_order_only_where_it_is_summed(
    folders, method, count, hinted
):
    terge.merge(folders[:count], method=method, out="m")
    rewrite("m", lambda t: t.update({"norm.bias": t["norm.bias"] + 1}))
    name = load_lineage("m")["norm.bias"][0]
    assert verify_lineage(load_lineage("m"), "m") == [
        (
            "norm.bias",
            "the checkpoint's tensor differs from the recomputed one"
            + (ANGLE_HINT.format(method=name) if hinted else ""),
        )
    ]


def test_a_tied_name_a_stack_s_checkpoint_holds_must_hold_its_first_name_s_tensor(folders):
    stacked(folders)
    edit(
        "s/lineage.json",
        lambda d: d["tied"].update({"lm_head.weight": "model.embed_tokens.weight"}),
    )
    rewrite("s", lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    assert verify_lineage(load_lineage("s"), "s") == []
    rewrite("s", lambda t: t.update({"lm_head.weight": torch.zeros(2, 3)}))
    assert verify_lineage(load_lineage("s"), "s") == [
        ("lm_head.weight", "tied to 'model.embed_tokens.weight', but holds another tensor")
    ]


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_a_stack_merged_by_a_method_that_reads_the_base_verifies(folders, method):
    """Such a method merges a slice's other sources over its first: the entry names those, and
    stack.tensors every source."""
    del folders  # the working folder
    blocks("x", "y", "z")
    slices = [("x", 0, 2), [("x", 2, 3), ("y", 0, 1), ("z", 1, 2)]]
    terge.stack(slices, out="s", method=method, seed=0)
    lineage = load_lineage("s")
    assert [model for model, _ in lineage["model.layers.2.w"][1]] == [1, 2]
    assert verify_lineage(lineage, "s") == []
    rewrite("s", lambda t: t.update({"model.layers.2.w": t["model.layers.2.w"] + 1}))
    assert verify_lineage(lineage, "s") == [
        ("model.layers.2.w", "the checkpoint's tensor differs from the recomputed one")
    ]


def test_digests_of_a_model_that_lacks_the_tensor_are_named_not_a_key_error(folders):
    """c lacks norm.bias, so it was merged from a and b; digests edited to add c's are of
    models the merge did not read (verify does not look for the tensor in c)."""
    state = states()[2]
    del state["norm.bias"]
    save(state, "c", overwrite=True)
    terge.merge(folders, out="m", digests=True)
    assert [index for index, _ in load_lineage("m")["norm.bias"][1]] == [0, 1]
    edit("m/lineage.json", lambda d: d["digests"]["norm.bias"]["models"].update({"2": "0" * 64}))
    assert verify_lineage(load_lineage("m"), "m") == [
        ("norm.bias", "its digests are of models [0, 1, 2], but the merge read models [0, 1]")
    ]


def test_a_stack_s_base_of_another_shape_is_bad_input(folders):
    del folders  # the working folder
    state = blocks("x", "y", "z")
    terge.stack([("y", 0, 2), [("x", 2, 3), ("y", 0, 1), ("z", 1, 2)]], out="s", method="ties")
    state["model.layers.2.w"] = torch.zeros(4)
    save(state, "x2")
    with pytest.raises(
        LineageError,
        match=r"'model\.layers\.2\.w' \(shape \(3,\) in the checkpoint\) was merged from "
        r"models\[1\], but x2 has shape \(4,\); are these the models that were merged\?",
    ):
        verify_lineage(load_lineage("s"), "s", models=["y", "x2", "z"])


@pytest.mark.parametrize("buffers", [False, True])
def test_a_merge_of_modules_with_batchnorm_verifies_against_their_saved_states(tmp_path, buffers):
    """The merge of modules writes their state dicts' names, buffers included. With
    ``buffers=False`` the lineage lists the buffers as left alone (``buffer``), so verify finds
    them as the base has them, rather than naming them as unaccounted for; a tampered one is
    still named."""
    torch.manual_seed(0)
    modules = [torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)) for _ in "ab"]
    paths = []
    for i, module in enumerate(modules):
        module[1].running_mean.normal_()
        module[1].num_batches_tracked += i + 1
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, paths[i])
    terge.merge(modules, out=tmp_path / "m", buffers=buffers)
    lineage = load_lineage(tmp_path / "m" / "lineage.json")
    assert ("1.running_mean" in lineage) is buffers
    assert verify_lineage(lineage, tmp_path / "m", models=paths) == []
    rewrite_at = tmp_path / "m" / "model.safetensors"
    tensors = load_file(rewrite_at)
    tensors["1.running_var"] = tensors["1.running_var"] + 1
    save_file(tensors, rewrite_at, metadata={"format": "pt"})
    assert names(verify_lineage(lineage, tmp_path / "m", models=paths)) == ["1.running_var"]
