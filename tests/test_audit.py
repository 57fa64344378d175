"""Lineage audits: digests, diffs, verification against checkpoints, and `terge lineage`."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import terge
import terge.digests
from terge import LineageError, cli, load_lineage, save_lineage
from terge.audit import diff_lineages, summary, tensor_digest, verify_lineage
from terge.io import save
from terge.lineage import ModelRecord, TensorDigests

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


def tamper(folder: Path, name: str) -> None:
    """Change one element of ``name`` in the folder's single shard."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, path, metadata={"format": "pt"})


# --- digests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(5, 7),
        torch.randn(5, 7).to(torch.bfloat16),
        torch.randn(5, 7, dtype=torch.float64).t(),  # not contiguous
        torch.tensor(2.5, dtype=torch.float16),
        torch.zeros(0, 3),
        torch.tensor([True, False]),
        torch.nn.Parameter(torch.randn(3)),
    ],
)
def test_a_digest_is_the_sha256_of_the_tensors_bytes(tensor):
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert tensor_digest(tensor) == hashlib.sha256(raw).hexdigest()


def test_digests_are_hashed_in_chunks(monkeypatch):
    tensor = torch.randn(1000)
    whole = tensor_digest(tensor)
    monkeypatch.setattr(terge.digests, "DIGEST_CHUNK", 24)
    assert tensor_digest(tensor) == whole


# --- diff -----------------------------------------------------------------------------------------


@pytest.fixture
def golden() -> terge.Lineage:
    _, lineage = terge.merge(
        states(),
        method={"norm.bias": terge.methods.dare_linear(density=0.5), re.compile(".*"): "ties"},
        weights=[1, 2, 3],
        seed=0,
        lineage=True,
        digests=True,
    )
    return lineage


def changes(old, new, **kwargs) -> list[str]:
    found = diff_lineages(old, new, **kwargs)
    return found.changes


def test_equal_lineages_have_no_differences(golden):
    assert diff_lineages(golden, copy.deepcopy(golden)) == terge.audit.LineageDiff([], [])


def test_diff_names_each_change(golden):
    new = copy.deepcopy(golden)
    new["norm.bias"] = terge.LineageEntry("arithmetic", [(0, 0.25), (1, 0.75)])
    new["layers.0.weight"].settings["density"] = 0.3
    del new["layers.1.weight"]
    new.skipped["layers.1.weight"] = "excluded"
    new.skipped["steps"] = "excluded"
    new.tied["x"] = "norm.bias"
    new.dtype = torch.float32
    new.models = (*new.models[:2], ModelRecord(2, "file", "c"))
    new.digests["layers.0.weight"] = TensorDigests("0" * 64, {1: "1" * 64})
    assert changes(golden, new) == [
        "~ dtype: float64 -> float32",
        "~ models[2]: models[2], state_dict -> models[2], file c",
        "~ layers.0.weight: setting density 0.2 -> 0.3",
        "~ layers.0.weight: the merged tensor changed (output digest differs)",
        "~ layers.0.weight: models[1]'s tensor changed (digest differs)",
        "- layers.1.weight: no longer merged (now excluded); was ties (density=0.2, scale=1.0) "
        "of models 1: 0.4, 2: 0.6",
        "~ norm.bias: method dare_linear -> arithmetic",
        "~ norm.bias: setting density 0.5 -> 'unset'",
        "~ norm.bias: setting scale 1.0 -> 'unset'",
        "~ norm.bias: setting seed 0 -> 'unset'",
        "~ norm.bias: contributors models [1, 2] -> [0, 1]",
        "~ steps: skipped not floating point -> excluded",
        "+ x: tied (norm.bias)",
    ]


def test_a_weight_changes_beyond_the_tolerance_only(golden):
    new = copy.deepcopy(golden)
    (first, weight), _ = new["norm.bias"][1]
    new["norm.bias"][1][0] = (first, weight + 1e-9)
    expected = [f"~ norm.bias: models[1] weight {weight!r} -> {weight + 1e-9!r}"]
    assert changes(golden, new) == expected
    assert changes(golden, new, atol=1e-6) == []


def test_versions_are_notes_not_changes(golden):
    new = copy.deepcopy(golden)
    new.torch_version = "9.9"
    new.digests = None
    found = diff_lineages(golden, new)
    assert found.changes == []
    assert found.notes == [
        f"torch_version {golden.torch_version} -> 9.9",
        "only the old lineage has digests; they were not compared",
    ]


def test_a_newly_merged_tensor(golden):
    new = copy.deepcopy(golden)
    new["steps"] = terge.LineageEntry("arithmetic", [(0, 0.5), (1, 0.5)])
    del new.skipped["steps"]
    assert changes(golden, new) == [
        "+ steps: now merged (was not floating point): arithmetic of models 0: 0.5, 1: 0.5"
    ]


def test_the_record_s_out_dtype_base_vocabulary_and_chosen_are_compared(golden):
    """Each field of the record as a whole is compared on its own: the output dtype, where the
    base came from, the vocabulary alignment and the run checkpoints were chosen from."""
    new = copy.deepcopy(golden)
    new.out_dtype = torch.float16
    assert changes(golden, new) == ["~ out_dtype: None -> float16"]
    new = copy.deepcopy(golden)
    new.base = ModelRecord(1, "state_dict")
    assert changes(golden, new) == ["~ base: models[0], state_dict -> models[1], state_dict"]
    new = copy.deepcopy(golden)
    new.vocabulary = {"source": "union", "rows": 9, "normalize": True, "added": {1: 2}}
    assert changes(golden, new) == [
        "~ vocabulary: not aligned -> union, 9 rows (models[1] added 2 tokens)"
    ]
    new = copy.deepcopy(golden)
    new.chosen = {"rule": "last 1 by step", "from": "runs/*", "candidates": [], "chosen": ["r"]}
    assert changes(golden, new) == [
        "~ chosen: not chosen from a run -> last 1 by step of runs/*: r"
    ]


def test_a_model_added_or_gone_is_a_change(golden):
    """A model only the new lineage records is an addition, one only the old records is gone."""
    new = copy.deepcopy(golden)
    new.models = (*golden.models, ModelRecord(3, "file", "d"))
    assert changes(golden, new) == ["+ models[3]: models[3], file d"]
    assert changes(new, golden) == ["- models[3]: models[3], file d"]


def test_an_input_file_added_or_gone_and_a_separate_base_s_pins_are_changes(golden):
    """Input files are compared over both lineages' names (a file only the new one lists is
    added, one only the old lists is gone), and a separate base's pins are compared as a
    model's are."""
    files = {"a.safetensors": "0" * 64}
    old = copy.deepcopy(golden)
    old.models = (ModelRecord(0, "file", "a", files), *golden.models[1:])
    new = copy.deepcopy(golden)
    more = {**files, "b.safetensors": "1" * 64}
    new.models = (ModelRecord(0, "file", "a", more), *golden.models[1:])
    assert changes(old, new) == ["+ models[0]: file b.safetensors added"]
    assert changes(new, old) == ["- models[0]: file b.safetensors gone"]
    old, new = copy.deepcopy(golden), copy.deepcopy(golden)
    old.base = ModelRecord("separate", "file", "p", files, "r1")
    new.base = ModelRecord("separate", "file", "p", {"a.safetensors": "1" * 64}, "r2")
    assert changes(old, new) == [
        "~ base: revision r1 -> r2",
        "~ base: file a.safetensors changed (digest 000000000000 -> 111111111111)",
    ]


def test_a_change_in_dropped_is_a_change(golden):
    """``dropped`` (models left out of one tensor's merge, and why) is compared like ``skipped``:
    a model newly dropped from a tensor changes the merge."""
    new = copy.deepcopy(golden)
    new.dropped["norm.bias"] = {1: "all zero"}
    assert changes(golden, new) == ["+ norm.bias: dropped ({1: 'all zero'})"]


def test_a_stack_s_base_and_head_and_being_a_stack_are_compared():
    """Two stacks' base and head models are compared (each its own line), and a lineage that
    is a stack against one that is not is a change, not silence."""
    blocks = [{"method": "passthrough", "sources": [[0, 0, 1.0]]}]
    stack = {"base": 0, "head": 0, "blocks": blocks, "tensors": {}}
    old = terge.Lineage(models=(ModelRecord(0, "file", "a"), ModelRecord(1, "file", "b")))
    old.stack = stack
    new = copy.deepcopy(old)
    new.stack = {**stack, "base": 1, "head": 1}
    assert changes(old, new) == [
        "~ stack base: models[0] -> models[1]",
        "~ stack head: models[0] -> models[1]",
    ]
    new.stack = None
    assert changes(old, new) == ["~ stack: only the old lineage is a stacked model (terge.stack)"]
    assert changes(new, old) == ["~ stack: only the new lineage is a stacked model (terge.stack)"]


def test_a_setting_only_the_new_lineage_has_is_a_change(golden):
    """Settings are compared over both lineages' keys: one the new entry adds (that the old
    lacked) is a change from 'unset', as one it drops is a change to 'unset'."""
    new = copy.deepcopy(golden)
    new["layers.0.weight"].settings["lambda"] = 2.0
    assert changes(golden, new) == ["~ layers.0.weight: setting lambda 'unset' -> 2.0"]
    assert changes(new, golden) == ["~ layers.0.weight: setting lambda 2.0 -> 'unset'"]


def test_a_change_in_unused_is_a_change(golden):
    """``unused`` (tensors a model has that the merge did not read) is compared like ``skipped``
    and ``tied``: a tensor newly unused, no longer unused or unused in other models is a change."""
    old = copy.deepcopy(golden)
    old.unused["extra"] = [1]
    new = copy.deepcopy(old)
    new.unused["extra"] = [1, 2]
    new.unused["more"] = [0]
    assert changes(old, new) == ["~ extra: unused [1] -> [1, 2]", "+ more: unused ([0])"]
    assert changes(new, golden) == [
        "- extra: no longer unused (was [1, 2])",
        "- more: no longer unused (was [0])",
    ]


def test_a_changed_separate_base_tensor_is_a_change(golden):
    """A separate base's digest is compared where both lineages recorded one: the base's tensor
    changing changes the merge even when every model's tensor is the same."""
    old = copy.deepcopy(golden)
    digest = old.digests["norm.bias"]
    old.digests["norm.bias"] = TensorDigests(digest.output, digest.models, "0" * 64)
    new = copy.deepcopy(old)
    new.digests["norm.bias"] = TensorDigests(digest.output, digest.models, "1" * 64)
    assert changes(old, new) == ["~ norm.bias: the base's tensor changed (digest differs)"]
    new.digests["norm.bias"] = TensorDigests(digest.output, digest.models)
    assert changes(old, new) == []  # only one lineage has the base's digest: not compared


# --- verify ---------------------------------------------------------------------------------------

METHODS = [
    "arithmetic",
    "task_arithmetic",
    terge.methods.ties(density=0.5),
    terge.methods.dare_ties(density=0.5),
    "breadcrumbs",
    "model_stock",
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("digests", [False, True])
def test_a_merge_written_to_a_folder_verifies(folders, method, digests):
    terge.merge(folders, method=method, weights=[1, 2, 4], seed=3, out="m", digests=digests)
    assert verify_lineage(load_lineage("m"), "m") == []


def test_cast_output_slerp_and_a_separate_base_verify(folders):
    terge.merge(folders[:2], method="slerp", weights=[1, 3], out="m", out_dtype="bfloat16")
    assert verify_lineage(load_lineage("m"), "m") == []
    terge.merge(folders[:2], base="p", method="ties", out="t", seed=1, digests=True)
    lineage = load_lineage("t")
    assert lineage.base == ModelRecord("separate", "file", "p", lineage.base.files)
    assert lineage.base.files is not None
    assert list(lineage.base.files) == ["model.safetensors"]  # digests=True pins the files too
    assert verify_lineage(lineage, "t") == []


def test_float32_accumulation_and_per_layer_settings_verify(folders):
    method = terge.methods.ties(density=terge.by_layer([0.3, 0.9]))
    terge.merge(folders, method=method, dtype=torch.float32, weights=[1, 3, 7], out="m", seed=0)
    lineage = load_lineage("m")
    assert lineage.dtype == torch.float32
    assert lineage["layers.0.weight"].settings["density"] == 0.3
    assert lineage["layers.1.weight"].settings["density"] == 0.9
    assert verify_lineage(lineage, "m") == []


def test_an_in_memory_merge_saved_later_verifies(folders, tmp_path):
    merged, lineage = terge.merge(folders, weights=[3, 1, 1], lineage=True, digests=True)
    save(merged, "saved")
    assert verify_lineage(lineage, "saved") == []


def test_a_tampered_checkpoint_is_named(folders):
    _, lineage = terge.merge(folders, out="m", lineage=True)
    tamper(Path("m"), "norm.bias")
    assert verify_lineage(lineage, "m") == [
        ("norm.bias", "the checkpoint's tensor differs from the recomputed one")
    ]


def test_with_digests_a_changed_model_and_a_tampered_checkpoint_are_told_apart(folders):
    _, lineage = terge.merge(folders, out="m", lineage=True, digests=True)
    tamper(Path("b"), "layers.0.weight")
    tamper(Path("m"), "norm.bias")
    assert verify_lineage(lineage, "m") == [
        ("layers.0.weight", "models[1]'s tensor is not the one merged (digest differs)"),
        ("layers.0.weight", "the checkpoint's tensor differs from the recomputed one"),
        ("norm.bias", "the checkpoint's tensor is not the one merged (digest differs)"),
        ("norm.bias", "the checkpoint's tensor differs from the recomputed one"),
    ]


def test_models_can_be_given_instead_of_the_recorded_paths(folders):
    models = states()
    merged, lineage = terge.merge(models, weights=[3, 1, 1], lineage=True)  # no paths
    save(merged, "m")
    with pytest.raises(LineageError) as caught:
        verify_lineage(lineage, "m", source="l.json")
    assert str(caught.value) == (
        "the lineage file l.json: models[0] (state_dict) was not read from disk, so it cannot "
        "be read again; give its checkpoint with --models."
    )
    assert verify_lineage(lineage, "m", models=folders) == []
    swapped = verify_lineage(lineage, "m", models=[folders[1], folders[0], folders[2]])
    assert [name for name, _ in swapped] == [  # "steps" is left as in the base, now b's
        "layers.0.weight",
        "layers.1.weight",
        "norm.bias",
        "steps",
    ]
    with pytest.raises(LineageError, match="records 3 models but 2 paths were given"):
        verify_lineage(lineage, "m", models=folders[:2])


def test_a_custom_method_cannot_be_recomputed(folders):
    def first(tensors, weights, base):
        return tensors[0]

    _, lineage = terge.merge(folders, method=first, out="m", lineage=True)
    problems = verify_lineage(lineage, "m")
    assert problems[0] == (
        "layers.0.weight",
        f"made by the custom method {first.__qualname__!r}; cannot be recomputed",
    )


def test_names_the_checkpoint_or_a_model_lacks_are_bad_input(folders):
    _, lineage = terge.merge(folders, out="m", lineage=True)
    save({"other": torch.zeros(2)}, "wrong")
    with pytest.raises(LineageError) as caught:
        verify_lineage(lineage, "wrong", source="l.json")
    assert str(caught.value) == (
        "the lineage file l.json: it names 3 merged tensors that the checkpoint wrong lacks "
        "('layers.0.weight', 'norm.bias', 'layers.1.weight'); is it the right checkpoint?"
    )
    state = states()[1]
    del state["norm.bias"]
    save(state, "b", overwrite=True)
    with pytest.raises(LineageError) as caught:
        verify_lineage(lineage, "m")
    assert str(caught.value) == (
        "lineage: 'norm.bias' (shape (3,) in the checkpoint) was merged from models[1], but b "
        "has no such tensor; are these the models that were merged?"
    )


def test_settings_that_configure_no_method_are_bad_input(folders):
    _, lineage = terge.merge(folders, method="ties", out="m", lineage=True)
    lineage["norm.bias"].settings["density"] = 2.0
    with pytest.raises(LineageError) as caught:
        verify_lineage(lineage, "m")
    assert str(caught.value) == (
        "lineage: the settings of 'norm.bias' (density=2.0, scale=1.0) do not configure ties: "
        "ties: density must be in (0, 1], got 2.0."
    )


def test_verification_reads_one_tensor_at_a_time(folders, monkeypatch):
    _, lineage = terge.merge(folders, method="ties", out="m", lineage=True)
    live: list[int] = []
    peak = []
    original = terge.audit.run_step

    def counted(step, sources, base, destination, buffers):
        live.append(1)
        peak.append(len(live))
        original(step, sources, base, destination, buffers)
        live.pop()

    monkeypatch.setattr(terge.audit, "run_step", counted)
    assert verify_lineage(lineage, "m") == []
    assert peak == [1, 1, 1]


# --- show -----------------------------------------------------------------------------------------


def test_show_summarises_methods_weights_and_what_was_left_alone(golden):
    text = summary(golden, "golden.json")
    assert text.splitlines()[0] == (
        f"golden.json: written by terge {terge.__version__}, torch {torch.__version__}"
    )
    for line in (
        "    0  state_dict  (in memory)  (base)",
        "accumulated in float64, written in each tensor's own dtype",
        "merged: 3 tensors",
        "    2  ties (density=0.2, scale=1.0)  e.g. layers.0.weight, layers.1.weight",
        "    1  dare_linear (density=0.5, scale=1.0, seed=0)  e.g. norm.bias",
        "    3  models 1: 0.4, 2: 0.6  e.g. layers.0.weight, layers.1.weight, norm.bias",
        "left alone: 1 tensor",
        "    1  not floating point  e.g. steps",
        "digests: recorded for 3 tensors",
    ):
        assert line in text.splitlines(), line


# --- the command ----------------------------------------------------------------------------------


def test_the_ci_recipe_end_to_end(capsys, folders):
    merge = ["merge", "a", "b", "c", "-o", "m", "--method", "ties:density=0.5", "--seed", "0"]
    assert run(capsys, *merge, "--digests", "--lineage", "golden.json")[0] == 0
    assert run(capsys, *merge, "-o", "m2", "--digests", "--lineage", "new.json")[0] == 0
    assert Path("golden.json").read_bytes() == Path("new.json").read_bytes()  # same merge
    code, out, err = run(capsys, "lineage", "diff", "golden.json", "new.json")
    assert (code, err) == (0, "")
    assert out == "terge: the lineages agree (3 tensors merged, 1 left alone)\n"
    assert run(capsys, "lineage", "verify", "golden.json", "--merged", "m") == (
        0,
        "terge: all 3 merged tensors match m\n",
        "",
    )

    # A weight changes: the diff exits 1 and names it.
    weights = ["--weights", "1,1,2", "--overwrite", "--digests", "--lineage", "new.json"]
    assert run(capsys, *merge, "-o", "m2", *weights)[0] == 0
    code, out, err = run(capsys, "lineage", "diff", "golden.json", "new.json")
    assert (code, err) == (1, "")
    assert "~ norm.bias: models[2] weight 0.5 -> 0.6666666666666666\n" in out
    assert "~ layers.0.weight: the merged tensor changed (output digest differs)\n" in out
    assert out.endswith("terge: golden.json and new.json differ (8 changes)\n")

    # A tensor of the merged checkpoint is tampered with: verify exits 1 and names it.
    tamper(Path("m"), "layers.0.weight")
    code, out, err = run(capsys, "lineage", "verify", "golden.json", "--merged", "m")
    assert (code, err) == (1, "")
    assert out == (
        "layers.0.weight: the checkpoint's tensor is not the one merged (digest differs)\n"
        "layers.0.weight: the checkpoint's tensor differs from the recomputed one\n"
        "terge: 1 of 3 merged tensors do not match\n"
    )
    code, out, _ = run(capsys, "lineage", "show", "m")  # a folder: its lineage.json
    assert code == 0 and "digests: recorded for 3 tensors" in out


def test_verify_takes_models_and_a_base(capsys, folders):
    merged, lineage = terge.merge(
        states()[:2], base=states(4)[3], method="ties", seed=0, lineage=True
    )
    save(merged, "m")
    save_lineage(lineage, "l.json")
    argv = ["lineage", "verify", "l.json", "--merged", "m"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err == (
        "terge: error: the lineage file l.json: models[0] (state_dict) was not read from disk, "
        "so it cannot be read again; give its checkpoint with --models.\n"
    )
    code, _, err = run(capsys, *argv, "--models", "a", "b")
    assert code == 2
    assert err == (
        "terge: error: the lineage file l.json: base (state_dict) was not read from disk, so it "
        "cannot be read again; give its checkpoint with --base.\n"
    )
    assert run(capsys, *argv, "--models", "a", "b", "--base", "p")[0] == 0
    assert run(capsys, *argv, "--models", "a", "b", "--base", "c")[0] == 1


def test_diff_tolerance(capsys, folders):
    terge.merge(folders, out="m", lineage=True)
    lineage = load_lineage("m")
    save_lineage(lineage, "old.json")
    (index, weight), *_ = lineage["norm.bias"][1]
    lineage["norm.bias"][1][0] = (index, weight + 1e-12)
    save_lineage(lineage, "new.json")
    assert run(capsys, "lineage", "diff", "old.json", "new.json")[0] == 1
    assert run(capsys, "lineage", "diff", "old.json", "new.json", "--atol", "1e-9")[0] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["lineage", "show", "nope.json"],
            "cannot read the lineage file nope.json: No such file or directory.",
        ),
        (
            ["lineage", "diff", "truncated.json", "good.json"],
            "the lineage file truncated.json is not valid JSON (Expecting ',' delimiter: line 1 "
            "column 14 (char 13)); is it truncated?",
        ),
        (
            ["lineage", "diff", "good.json", "future.json"],
            f"the lineage file future.json: schema 2 is not one this terge "
            f"({terge.__version__}) reads (schema 1); a newer terge may read it.",
        ),
        (
            ["lineage", "verify", "typed.json", "--merged", "m"],
            'the lineage file typed.json: merged["w"].contributions must be a list, got "all".',
        ),
        (
            ["lineage", "verify", "good.json", "--merged", "nowhere"],
            "nowhere does not exist; pass the path of a checkpoint file or folder.",
        ),
        (
            ["lineage", "verify", "good.json", "--merged", "a"],
            "the lineage file good.json: it names 1 merged tensors that the checkpoint a lacks "
            "('w'); is it the right checkpoint?",
        ),
        (
            ["lineage", "diff", "good.json", "good.json", "--atol", "-1"],
            "argument --atol: must be a finite number >= 0, got '-1' (see 'terge lineage diff "
            "--help')",
        ),
        (
            ["lineage"],
            "the following arguments are required: ACTION (see 'terge lineage --help')",
        ),
        (
            ["lineage", "verify", "good.json"],
            "the following arguments are required: --merged (see 'terge lineage verify --help')",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, folders, argv, message):
    good = {
        "schema": 1,
        "merged": {"w": {"method": "arithmetic", "contributions": [[0, 1.0]]}},
        "models": [{"index": 0, "kind": "file", "path": "a"}],
    }
    Path("good.json").write_text(json.dumps(good))
    Path("truncated.json").write_text('{"schema": 1 "merged"')
    Path("future.json").write_text(json.dumps({**good, "schema": 2}))
    typed = {**good, "merged": {"w": {"method": "arithmetic", "contributions": "all"}}}
    Path("typed.json").write_text(json.dumps(typed))
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err == f"terge: error: {message}\n"


def test_merge_digests_option_reaches_merge(capsys, folders):
    assert run(capsys, "merge", "a", "b", "-o", "m", "--digests", "-q")[0] == 0
    assert load_lineage("m").digests is not None
    assert run(capsys, "merge", "a", "b", "-o", "n", "-q")[0] == 0
    assert load_lineage("n").digests is None


# --- file digests, revisions and tolerances -------------------------------------------------------


def test_diff_says_which_input_file_changed(folders):
    terge.merge(folders, out="m1", digests=True)
    old = load_lineage("m1")
    assert [sorted(record.files) for record in old.models] == [["model.safetensors"]] * 3
    tamper(folders[1], "layers.0.weight")
    terge.merge(folders, out="m2", digests=True)
    new = load_lineage("m2")
    found = diff_lineages(old, new)
    before, after = (
        old.models[1].files["model.safetensors"],
        new.models[1].files["model.safetensors"],
    )
    assert (
        f"~ models[1]: file model.safetensors changed (digest {before[:12]} -> {after[:12]})"
        in found.changes
    )
    assert not any(line.startswith("~ models[0]") for line in found.changes)
    assert "~ layers.0.weight: models[1]'s tensor changed (digest differs)" in found.changes


def test_diff_compares_revisions_and_notes_what_one_side_lacks(folders):
    terge.merge(folders, out="m", digests=True)
    old = load_lineage("m")
    new = copy.deepcopy(old)
    old.models = (ModelRecord(0, "file", "a", old.models[0].files, "r1"), *old.models[1:])
    new.models = (ModelRecord(0, "file", "a", new.models[0].files, "r2"), *new.models[1:])
    assert diff_lineages(old, new).changes == ["~ models[0]: revision r1 -> r2"]
    new.models = (ModelRecord(0, "file", "a"), *new.models[1:])
    found = diff_lineages(old, new)
    assert found.changes == []
    assert "only the old lineage has models[0]'s file digests; not compared" in found.notes
    assert "only the old lineage has models[0]'s revision; not compared" in found.notes


def nudge(folder: Path, name: str, by: float) -> None:
    """Move every element of ``name`` in the folder's shard by ``by`` (relative)."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = tensors[name] * (1 + by)
    save_file(tensors, path, metadata={"format": "pt"})


def test_verify_within_a_tolerance(folders):
    terge.merge(folders, method="ties", out="m", seed=0)
    lineage = load_lineage("m")
    name = next(iter(lineage))
    nudge(Path("m"), name, 1e-6)  # as another platform's rounding might
    assert [n for n, _ in verify_lineage(lineage, "m")] == [name]  # bit for bit: differs
    assert verify_lineage(lineage, "m", rtol=1e-5) == []
    assert verify_lineage(lineage, "m", atol=1e-3) == []
    (problem,) = verify_lineage(lineage, "m", rtol=1e-8)
    assert re.fullmatch(
        rf"{re.escape(name)}: \d+ of \d+ values differ from the recomputed ones by more than "
        r"atol=0.0 \+ rtol=1e-08 x \|value\| \(largest difference .*\)",
        f"{problem[0]}: {problem[1]}",
    )
    with pytest.raises(LineageError, match=r"`rtol` must be a finite number >= 0; got -1"):
        verify_lineage(lineage, "m", rtol=-1)


def test_verify_tolerance_on_the_command_line(capsys, folders):
    terge.merge(folders, out="m")
    lineage = load_lineage("m")
    name = next(iter(lineage))
    nudge(Path("m"), name, 1e-6)
    code, out, _ = run(capsys, "lineage", "verify", "m", "--merged", "m")
    assert code == 1 and out.startswith(f"{name}: the checkpoint's tensor differs")
    code, out, _ = run(capsys, "lineage", "verify", "m", "--merged", "m", "--rtol", "1e-5")
    assert code == 0, out
    code, _, err = run(capsys, "lineage", "verify", "m", "--merged", "m", "--atol", "-1")
    assert code == 2 and "--atol: must be a finite number >= 0" in err


NEWER = [
    "della",
    "della_linear",
    "sce",
    "breadcrumbs_ties",
    "magmax",
    "consensus",
    "pcb",
    "multislerp",
    "karcher",
    "tsv_m",
    "iso_c",
    "iso_cts",
    terge.methods.nuslerp(flatten=False, task_vectors=True),
]


@pytest.mark.parametrize("method", NEWER)
def test_the_newer_methods_verify(folders, method):
    # Their settings (strings and flags too) recompute every tensor bit for bit.
    count = 2 if not isinstance(method, str) else 3
    terge.merge(folders[:count], base="p", method=method, seed=5, out="m")
    assert verify_lineage(load_lineage("m"), "m") == []


MERGEKIT_OPTIONS = [  # the settings terge.from_mergekit gives the newer methods
    terge.methods.della(
        density=[0.5, 1.0],
        epsilon=[0.15, 0.0],
        rescale="l1",
        elect="weighted",
        disjoint_mean=False,
    ),
    terge.methods.della_linear(density=0.6, epsilon=0.2, rescale="none"),
    terge.methods.sce(floor=1e-6),
    terge.methods.multislerp(task_vectors=True, eps=1e-8),
    terge.methods.breadcrumbs_ties(density=[0.7, 0.4], trim="exact", elect="weighted"),
]


@pytest.mark.parametrize("method", MERGEKIT_OPTIONS, ids=lambda m: m.name)
def test_the_newer_methods_with_mergekit_s_options_are_recorded_as_built_in_and_verify(
    folders, method
):
    terge.merge(folders[:2], base="p", method=method, seed=5, out="m")
    lineage = load_lineage("m")
    assert not any(entry.custom for entry in lineage.values())
    assert verify_lineage(lineage, "m") == []


def test_nearswap_verifies(folders):
    terge.merge(folders[:1], base="p", method=terge.methods.nearswap(t=0.5), out="m")
    assert verify_lineage(load_lineage("m"), "m") == []


def rewrite(folder: str, change) -> None:
    """Apply ``change`` to the tensors of the folder's single shard."""
    path = Path(folder) / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("value", [float("inf"), float("nan"), True, "0"])
@pytest.mark.parametrize("label", ["rtol", "atol"])
def test_a_tolerance_must_be_a_finite_number(folders, label, value):
    terge.merge(folders, out="m")
    with pytest.raises(LineageError) as caught:
        verify_lineage(load_lineage("m"), "m", **{label: value})
    assert str(caught.value) == f"`{label}` must be a finite number >= 0; got {value!r}."


def test_a_tolerance_passes_nans_in_both_and_names_one_only_the_checkpoint_has(folders):
    state = states()[0]
    state["norm.bias"][1] = float("nan")
    save(state, "a", overwrite=True)
    terge.merge(folders, out="m")
    lineage = load_lineage("m")
    assert verify_lineage(lineage, "m", rtol=1e-6) == []  # NaN where the recomputation has it

    def change(tensors):
        tensors["norm.bias"] = tensors["norm.bias"].clone()
        tensors["norm.bias"][0] = float("nan")

    rewrite("m", change)
    assert verify_lineage(lineage, "m", rtol=1e-6) == [
        (
            "norm.bias",
            "1 of 3 values differ from the recomputed ones by more than atol=0.0 + rtol=1e-06 x "
            "|value| (largest difference inf)",
        )
    ]


def test_a_tolerance_counts_every_chunk_and_keeps_the_largest_difference(folders, monkeypatch):
    terge.merge(folders, out="m")

    def change(tensors):
        weight = tensors["layers.0.weight"] + 1e-3  # 12 values, all off by about 1e-3
        weight[0, 0] += 1  # the largest difference, in the first chunk
        tensors["layers.0.weight"] = weight

    rewrite("m", change)
    monkeypatch.setattr(terge.audit, "_CLOSE_CHUNK", 5)
    ((name, problem),) = verify_lineage(load_lineage("m"), "m", atol=1e-4)
    assert name == "layers.0.weight"
    assert problem == (
        "12 of 12 values differ from the recomputed ones by more than atol=0.0001 + rtol=0.0 x "
        "|value| (largest difference 1)"
    )


def test_rtol_is_relative_to_the_recomputed_value(folders):
    """``|written - recomputed| <= rtol * |recomputed|``: a value doubled is 100% off, which
    rtol=0.5 does not allow (relative to the written value, it would be 50%)."""
    terge.merge(folders, out="m")
    rewrite("m", lambda t: t.update({"norm.bias": t["norm.bias"] * 2}))
    assert verify_lineage(load_lineage("m"), "m", rtol=0.5) == [
        (
            "norm.bias",
            "3 of 3 values differ from the recomputed ones by more than atol=0.0 + rtol=0.5 x "
            "|value| (largest difference "
            f"{load_file('m/model.safetensors')['norm.bias'].abs().max().item() / 2:.3g})",
        )
    ]


def test_a_tolerance_still_compares_the_digests_exactly(folders):
    terge.merge(folders, out="m", digests=True)
    nudge(Path("m"), "norm.bias", 1e-6)
    assert verify_lineage(load_lineage("m"), "m", rtol=1e-5) == [
        ("norm.bias", "the checkpoint's tensor is not the one merged (digest differs)")
    ]


def test_an_in_memory_entry_whose_coefficients_do_not_pair_up_is_named_not_recomputed(folders):
    """The lineage loader refuses such a file; a ``Lineage`` built or edited in Python reaches
    verify as it is, and gets the problem rather than an error from the kernel."""
    terge.merge(folders[:2], out="m")
    lineage = load_lineage("m")
    entry = lineage["norm.bias"]
    lineage["norm.bias"] = terge.LineageEntry(
        entry[0], entry[1], coefficients=(1.0, 1.0, 1.0), divisor=3.0
    )
    assert verify_lineage(lineage, "m") == [
        (
            "norm.bias",
            "its weights [0.5, 0.5], coefficients [1.0, 1.0, 1.0] and divisor 3.0 do not pair "
            "up (one coefficient per contribution)",
        )
    ]
