"""Lineage records: 0.1.1's format, the audit record, stable JSON, digests, dry runs, bad files."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import terge
from terge import Lineage, LineageEntry, LineageError, load_lineage, save_lineage
from terge.io import load, save
from terge.lineage import ModelRecord, TensorDigests, lineage_text
from terge.sources import FileSource

from helpers import lineage_validator, snapshot, states


def saved(tmp_path: Path, models: list[dict]) -> list[Path]:
    paths = [tmp_path / f"model{i}" for i in range(len(models))]
    for path, model in zip(paths, models):
        save(model, path)
    return paths


def sha256(tensor: torch.Tensor) -> str:
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


# --- the record ---------------------------------------------------------------------------------


def test_a_lineage_equals_the_plain_dict_but_two_lineages_compare_their_records(linears):
    _, lineage = terge.merge(linears, lineage=True)
    plain = {name: tuple(entry) for name, entry in lineage.items()}
    assert lineage == plain and plain == lineage  # 0.1.1's equality
    assert not lineage != plain  # noqa: SIM202 (dict's own __ne__ would skip the record)
    other = copy.deepcopy(lineage)
    assert other == lineage
    assert not other != lineage  # noqa: SIM202
    other.models = (ModelRecord(0, "state_dict"), *other.models[1:])
    assert other != lineage and other == plain  # the record differs, the entries do not
    other = copy.deepcopy(lineage)
    other.skipped["x"] = "excluded"
    assert other != lineage
    _, reseeded = terge.merge(linears, method=terge.methods.dare_linear(), seed=1, lineage=True)
    _, seeded = terge.merge(linears, method=terge.methods.dare_linear(), seed=2, lineage=True)
    assert dict(reseeded) == dict(seeded) and reseeded != seeded  # only the seed differs


def test_the_record_names_models_base_dtypes_and_versions(tmp_path, linears):
    _, lineage = terge.merge(linears, lineage=True, dtype=torch.float32)
    assert lineage.models == tuple(ModelRecord(i, "module") for i in range(3))
    assert lineage.base == lineage.models[0]
    assert (lineage.dtype, lineage.out_dtype) == (torch.float32, None)
    assert lineage.terge_version == terge.__version__
    assert lineage.torch_version == str(torch.__version__)
    assert lineage.digests is None

    models = states()
    paths = saved(tmp_path, models)
    _, lineage = terge.merge([paths[0], models[1]], base=paths[2], lineage=True)
    assert lineage.models == (ModelRecord(0, "file", str(paths[0])), ModelRecord(1, "state_dict"))
    assert lineage.base == ModelRecord("separate", "file", str(paths[2]))
    _, lineage = terge.merge(models, base=-1, lineage=True)
    assert lineage.base == ModelRecord(2, "state_dict")


def test_custom_methods_and_kernel_coefficients_are_recorded(linears):
    _, lineage = terge.merge(linears, weights=[1, 2, 3], lineage=True)
    entry = lineage["weight"]
    assert (entry.coefficients, entry.divisor, entry.custom) == ((1.0, 2.0, 3.0), 6.0, False)
    _, scaled = terge.merge(linears, weights=[2, 4, 6], lineage=True)
    assert scaled == lineage  # the same merge, bit for bit, though the kernel's inputs differ
    assert scaled["weight"].coefficients == (2.0, 4.0, 6.0)

    def ties(tensors, weights, base):  # a user's function named like a registered method
        return tensors[0]

    _, lineage = terge.merge(linears, method=ties, lineage=True)
    assert lineage["weight"].custom and lineage["weight"].coefficients is None
    _, lineage = terge.merge(linears, method="ties", lineage=True)
    assert not lineage["weight"].custom


def test_entries_and_lineages_copy_and_pickle(linears):
    _, lineage = terge.merge(linears, method=terge.methods.ties(density=0.5), lineage=True)
    for clone in (copy.deepcopy(lineage), pickle.loads(pickle.dumps(lineage))):
        assert clone == lineage and type(clone) is Lineage
        assert clone["weight"].settings == {"density": 0.5, "scale": 1.0}
        assert isinstance(clone["weight"], LineageEntry)


# --- stable JSON ----------------------------------------------------------------------------------


def test_save_and_load_give_back_an_equal_lineage(tmp_path, tied_models):
    _, lineage = terge.merge(
        tied_models,
        method={"embed.weight": terge.methods.dare_ties(density=0.3), re.compile(".*"): "ties"},
        weights=[1, 2, 4],
        excluded=["norm.running_var"],
        buffers=True,
        seed=7,
        lineage=True,
        digests=True,
    )
    assert lineage.tied == {"head.weight": "embed.weight"}
    path = save_lineage(lineage, tmp_path / "l.json")
    loaded = load_lineage(path)
    assert loaded == lineage
    assert sorted(loaded) == sorted(lineage)  # a file lists them by name
    for name, entry in lineage.items():
        back = loaded[name]
        assert isinstance(back, LineageEntry) and back == entry
        assert all(type(pair) is tuple for pair in back[1])
        assert back.settings == entry.settings and back.coefficients == entry.coefficients
    assert loaded["embed.weight"].settings == {"density": 0.3, "scale": 1.0, "seed": 7}
    assert loaded.skipped == lineage.skipped and loaded.tied == lineage.tied
    assert loaded.digests == lineage.digests
    assert (loaded.dtype, loaded.models, loaded.base) == (
        lineage.dtype,
        lineage.models,
        lineage.base,
    )
    assert save_lineage(loaded, tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_the_same_merge_gives_the_same_bytes(tmp_path):
    models = states()
    texts = []
    for _ in range(2):
        _, lineage = terge.merge(models, method="dare_linear", seed=3, lineage=True, digests=True)
        texts.append(lineage_text(lineage))
    assert texts[0] == texts[1]
    _, unseeded = terge.merge(models, method="dare_linear", lineage=True)
    assert isinstance(unseeded["norm.bias"].settings["seed"], int)  # drawn, and recorded


def test_the_file_is_sorted_indented_exact_and_ends_with_a_newline(tmp_path, linears):
    _, lineage = terge.merge(linears, weights=[1, 1, 1], dtype=torch.float32, lineage=True)
    text = save_lineage(lineage, tmp_path / "l.json").read_text()
    assert text.endswith("}\n") and "\n  " in text
    record = json.loads(text)
    assert record["schema"] == 1
    assert list(record) == sorted(record)
    third = torch.tensor(1 / 3, dtype=torch.float32).item()
    assert record["merged"]["bias"]["contributions"] == [[0, third], [1, third], [2, third]]
    assert (
        '"contributions": [[0, 0.3333333432674408], [1, 0.3333333432674408], [2, 0.3333333432674408]]'
        in text
    )
    assert json.loads(text.replace("\n", "")) == record


def test_out_writes_its_lineage_json_with_the_same_writer(tmp_path):
    paths = saved(tmp_path, states())
    out, lineage = terge.merge(
        paths, out=tmp_path / "out", out_dtype="bfloat16", seed=0, lineage=True, digests=True
    )
    text = (out / "lineage.json").read_text()
    assert text == lineage_text(lineage)
    loaded = load_lineage(out)  # a folder means its lineage.json
    assert loaded == lineage and loaded.out_dtype == torch.bfloat16
    written = load(out)
    for name, digests in loaded.digests.items():
        assert digests.output == sha256(written[name]), name


# --- digests --------------------------------------------------------------------------------------


def test_digests_are_of_the_merged_and_the_source_tensors(tmp_path):
    models = states()
    merged, lineage = terge.merge(models, weights=[1, 2, 3], lineage=True, digests=True)
    assert (
        set(lineage.digests) == set(lineage) == {"layers.0.weight", "layers.1.weight", "norm.bias"}
    )
    for name, digests in lineage.digests.items():
        assert digests.output == sha256(merged[name])
        assert digests.models == {i: sha256(model[name]) for i, model in enumerate(models)}
        assert digests.base is None
    assert merged["layers.1.weight"].dtype == torch.bfloat16  # hashed in its own dtype


def test_digests_of_an_in_place_merge_hash_the_base_before_it_changes(linears):
    before = snapshot(linears[0])
    _, lineage = terge.merge(linears, inplace=True, lineage=True, digests=True)
    assert lineage.digests["weight"].models[0] == sha256(before["weight"])
    assert lineage.digests["weight"].output == sha256(linears[0].weight)


def test_digests_record_the_base_a_method_reads(linears):
    separate = torch.nn.Linear(5, 3)
    _, lineage = terge.merge(
        linears[:2], base=separate, method="task_arithmetic", lineage=True, digests=True
    )
    assert lineage.digests["bias"].base == sha256(separate.bias)
    assert set(lineage.digests["bias"].models) == {0, 1}
    _, lineage = terge.merge(linears, method="task_arithmetic", lineage=True, digests=True)
    assert lineage["bias"][1][0][0] == 1  # the base contributes no task vector...
    assert lineage.digests["bias"].models[0] == sha256(linears[0].bias)  # ...but is read
    assert lineage.digests["bias"].base is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"digests": True},
            "digests=True records digests in the lineage; pass lineage=True (or out=, whose "
            "lineage.json holds them).",
        ),
        (
            {"digests": True, "lineage": True, "dry_run": True},
            "digests=True hashes the merged tensors, which a dry run never computes; drop one.",
        ),
        ({"digests": 1, "lineage": True}, "`digests` must be True or False; got 1."),
        ({"dry_run": "yes"}, "`dry_run` must be True or False; got 'yes'."),
    ],
)
def test_bad_audit_arguments(linears, kwargs, message):
    with pytest.raises(terge.MergeArgumentError) as caught:
        terge.merge(linears, **kwargs)
    assert str(caught.value) == message


# --- dry runs -------------------------------------------------------------------------------------


def test_a_dry_run_returns_the_lineage_and_reads_no_tensor(tmp_path, monkeypatch):
    models = states()
    paths = saved(tmp_path, models)
    _, expected = terge.merge(paths, method="ties", seed=1, lineage=True)

    def never(self, name):
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(FileSource, "get", never)
    planned = terge.merge(paths, method="ties", seed=1, dry_run=True)  # lineage=False: still
    assert isinstance(planned, Lineage) and planned == expected
    planned = terge.merge(paths, method="ties", seed=1, lineage=True, dry_run=True)
    assert planned == expected
    planned = terge.merge(paths, out=tmp_path / "out", out_dtype="float16", dry_run=True)
    assert not (tmp_path / "out").exists()
    assert planned.out_dtype == torch.float16 and set(planned) == set(expected)


def test_an_in_place_dry_run_touches_no_tensor(linears):
    versions = {name: p._version for name, p in linears[0].named_parameters()}
    before = snapshot(linears[0])
    lineage = terge.merge(linears, inplace=True, weights=[1, 2, 3], dry_run=True)
    assert {name: p._version for name, p in linears[0].named_parameters()} == versions
    assert all(torch.equal(before[n], t) for n, t in linears[0].state_dict().items())
    assert lineage["weight"][1] == [(0, 1 / 6), (1, 2 / 6), (2, 3 / 6)]


def test_a_dry_run_still_validates(linears):
    with pytest.raises(terge.MergeArgumentError):
        terge.merge(linears, weights=[1, 2], dry_run=True)


# --- bad files ------------------------------------------------------------------------------------


def valid_record() -> dict:
    return {
        "schema": 1,
        "merged": {"w": {"method": "arithmetic", "contributions": [[0, 0.5], [1, 0.5]]}},
        "skipped": {"steps": "not floating point"},
        "tied": {},
        "unused": {},
        "models": [
            {"index": 0, "kind": "file", "path": "a"},
            {"index": 1, "kind": "file", "path": "b"},
        ],
        "base": {"index": 0, "kind": "file", "path": "a"},
        "dtype": "float64",
        "out_dtype": None,
    }


def with_(**changes) -> str:
    record = valid_record()
    for key, value in changes.items():
        if value is ...:
            del record[key]
        else:
            record[key] = value
    return json.dumps(record)


def merged_with(**fields) -> str:
    return with_(merged={"w": {"method": "arithmetic", "contributions": [[0, 1.0]], **fields}})


HEX = "0" * 64
CHOSEN = {
    "rule": "last 2 by global_step",
    "from": "runs/checkpoint-*",
    "candidates": [{"path": "a", "value": 1}, {"path": "b", "value": None}],
    "chosen": ["b", "a"],
}


def test_chosen_round_trips_and_is_written_only_where_there_is_one(tmp_path, linears):
    _, lineage = terge.merge(linears, lineage=True)
    assert lineage.chosen is None
    terge.save_lineage(lineage, tmp_path / "plain.json")
    assert '"chosen"' not in (tmp_path / "plain.json").read_text()  # other files keep their bytes
    assert load_lineage(tmp_path / "plain.json").chosen is None
    lineage.chosen = CHOSEN
    terge.save_lineage(lineage, tmp_path / "chosen.json")
    loaded = load_lineage(tmp_path / "chosen.json")
    assert loaded.chosen == CHOSEN and loaded == lineage
    loaded.chosen = {**CHOSEN, "chosen": ["a"]}
    assert loaded != lineage


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (with_(), None),
        (
            with_()[:40],
            "is not valid JSON (Expecting value: line 1 column 41 (char 40)); is it truncated?",
        ),
        ("", "is not valid JSON (Expecting value: line 1 column 1 (char 0)); is it truncated?"),
        ("[1, 2]", ": expected a JSON object, got list."),
        (
            with_().replace('"merged": {', '"merged": {"w": {}, ', 1),  # an edit hiding a record
            "gives the key 'w' twice in one object (JSON keys must be unique: readers disagree "
            "on which value counts).",
        ),
        (with_(schema=...), ': no "schema" field; it is not a terge lineage file.'),
        (
            with_(schema=2),
            f": schema 2 is not one this terge ({terge.__version__}) reads "
            "(schema 1); a newer terge may read it.",
        ),
        (with_(merged=[]), ": merged must be an object, got []."),
        (with_(merged=...), ": merged must be an object, got null."),
        (
            merged_with(contributions=[[0]]),
            ': merged["w"].contributions[0] must be [model_index, weight], got [0].',
        ),
        (
            merged_with(contributions=[[0, "half"]]),
            ': merged["w"].contributions[0][1] must be a number, got "half".',
        ),
        (
            merged_with(contributions=[[True, 1.0]]),
            ': merged["w"].contributions[0][0] must be a model index (an int >= 0), got true.',
        ),
        (
            merged_with(contributions=[[5, 1.0]]),
            ': merged["w"].contributions[0][0] is model 5, but the lineage records 2.',
        ),
        (merged_with(method=3), ': merged["w"].method must be a string, got 3.'),
        (merged_with(settings=[]), ': merged["w"].settings must be an object, got [].'),
        (
            merged_with(coefficients=[1, 2]),
            ': merged["w"].coefficients must be one number per contribution, got [1, 2].',
        ),
        (with_(skipped={"x": 1}), ': skipped["x"] must be a string, got 1.'),
        (
            with_(unused={"x": [0, "1"]}),
            ': unused["x"][1] must be a model index (an int >= 0), got "1".',
        ),
        (
            with_(dtype="float65"),
            ': dtype must be a floating dtype name such as "float64", or null, got "float65".',
        ),
        (
            with_(out_dtype="int8"),
            ': out_dtype must be a floating dtype name such as "float64", or null, got "int8".',
        ),
        (
            with_(models=[{"index": 0, "kind": "disk", "path": "a"}]),
            ': models[0].kind must be "module" or "state_dict" or "file" or "adapter", got "disk".',
        ),
        (
            with_(models=[{"index": 1, "kind": "file", "path": "a"}]),
            ": models[0].index is 1; it must be 0.",
        ),
        (
            with_(base={"index": "apart", "kind": "file", "path": None}),
            ': base.index must be a model index or "separate", got "apart".',
        ),
        (
            with_(base={"index": 4, "kind": "file", "path": None}),
            ": base.index is 4, but the lineage records 2 models.",
        ),
        (
            with_(digests={"w": {"output": "abc", "models": {}}}),
            ': digests["w"].output must be a SHA-256 digest (64 hex digits), got "abc".',
        ),
        (
            with_(digests={"w": {"output": HEX, "models": {"x": HEX}}}),
            ': digests["w"].models key must be a model index, got "x".',
        ),
        (
            with_(digests={"v": {"output": HEX, "models": {}}}),
            ': digests["v"] is for a tensor not merged.',
        ),
        (with_(terge_version=1), ": terge_version must be a string or null, got 1."),
        (with_(chosen=[]), ": chosen must be an object, got []."),
        (with_(chosen={**CHOSEN, "rule": 5}), ": chosen.rule must be a string, got 5."),
        (with_(chosen={**CHOSEN, "from": None}), ": chosen.from must be a string, got null."),
        (
            with_(chosen={**CHOSEN, "candidates": {}}),
            ": chosen.candidates must be a list, got {}.",
        ),
        (
            with_(chosen={**CHOSEN, "candidates": [{"path": "a", "value": "x"}]}),
            ': chosen.candidates[0].value must be a number, got "x".',
        ),
        (
            with_(chosen={**CHOSEN, "candidates": [{"value": 1}]}),
            ": chosen.candidates[0].path must be a string, got null.",
        ),
        (
            with_(chosen={**CHOSEN, "chosen": ["a", 2]}),
            ": chosen.chosen[1] must be a string, got 2.",
        ),
    ],
)
def test_a_bad_lineage_file_is_a_clear_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "l.json"
    path.write_text(text)
    if message is None:
        assert load_lineage(path)["w"] == ("arithmetic", [(0, 0.5), (1, 0.5)])
        return
    with pytest.raises(LineageError) as caught:
        load_lineage(path)
    assert (
        str(caught.value) == f"the lineage file {path}{' ' if message[0] != ':' else ''}{message}"
    )
    assert caught.value.path == path
    assert isinstance(caught.value, terge.TergeError) and isinstance(caught.value, ValueError)


def refusal(tmp_path: Path, text: str) -> str:
    """The message ``load_lineage`` refuses ``text`` with, less the file's name."""
    path = tmp_path / "l.json"
    path.write_text(text)
    with pytest.raises(LineageError) as caught:
        load_lineage(path)
    assert caught.value.path == path
    return str(caught.value).removeprefix(f"the lineage file {path}")


def test_a_model_index_equal_to_the_model_count_is_refused(tmp_path):
    """Indices run 0 to count - 1: with two models recorded, model 2 is one past the end and
    must be refused as an index the lineage does not record (not only indices well past it)."""
    assert refusal(tmp_path, merged_with(contributions=[[2, 1.0]])) == (
        ': merged["w"].contributions[0][0] is model 2, but the lineage records 2.'
    )
    assert load_lineage_text(tmp_path, merged_with(contributions=[[1, 1.0]]))["w"][1] == [(1, 1.0)]


def test_a_model_dropped_twice_from_one_tensor_is_refused(tmp_path):
    """``dropped`` maps a tensor to [model, reason] pairs read into a dict by model: a model
    listed twice would silently lose one reason, so the file is refused, naming the pair."""
    text = with_(dropped={"w": [[0, "all zero"], [1, "all zero"], [0, "shape"]]})
    assert refusal(tmp_path, text) == (': dropped["w"][2][0] must be a model listed once, got 0.')
    text = with_(dropped={"w": [[0, "all zero"], [1, "shape"]]})
    assert load_lineage_text(tmp_path, text).dropped == {"w": {0: "all zero", 1: "shape"}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            merged_with(contributions=[[-1, 1.0]]),
            ': merged["w"].contributions[0][0] must be a model index (an int >= 0), got -1.',
        ),
        (
            merged_with(contributions=[[0, True]]),
            ': merged["w"].contributions[0][1] must be a number, got true.',
        ),
        (
            merged_with(coefficients=["x"]),
            ': merged["w"].coefficients[0] must be a number, got "x".',
        ),
        (merged_with(divisor="6"), ': merged["w"].divisor must be a number, got "6".'),
        (merged_with(custom="yes"), ': merged["w"].custom must be true or false, got "yes".'),
        (
            with_(dropped={"w": [[0, "all zero", "again"]]}),
            ': dropped["w"][0] must be a [model, reason] pair, got [0, "all zero", "again"].',
        ),
    ],
)
def test_each_field_of_an_entry_is_checked(tmp_path, text, message):
    """Every field of a merged entry is checked on its own: a negative model, a weight of
    ``true`` (a bool is not a number), a coefficient, the divisor, the ``custom`` flag and a
    drop that is not a pair are each refused, naming that field, not loaded as they are."""
    assert refusal(tmp_path, text) == message


def test_unused_models_of_a_tensor_must_be_a_list_of_indices(tmp_path):
    """``unused[name]`` is a list of model indices: a number or an object there (which
    iteration would read as something else) is refused naming the tensor."""
    assert refusal(tmp_path, with_(unused={"w": 5})) == (
        ': unused["w"] must be a list of model indices, got 5.'
    )
    assert refusal(tmp_path, with_(unused={"w": {"0": 1}})) == (
        ': unused["w"] must be a list of model indices, got {"0": 1}.'
    )


def test_models_must_be_a_list_and_each_path_a_string(tmp_path):
    """``models`` is a list (an object would read as no models at all, and every index would go
    unchecked), and each model's path is a string or null."""
    assert refusal(tmp_path, with_(models={})) == ": models must be a list, got {}."
    models = [{"index": 0, "kind": "file", "path": 5}]
    assert refusal(tmp_path, with_(models=models)) == (
        ": models[0].path must be a string or null, got 5."
    )


@pytest.mark.parametrize("key", ["\u0661", "0" * 19, "9" * 5000])
def test_a_digest_model_key_is_ascii_digits_and_not_too_long(tmp_path, key):
    """A key of ``digests[...].models`` is up to 18 ASCII digits: an Arabic-Indic one (which
    ``str.isdigit`` and ``int`` accept), 19 digits, or 5000 (past what ``int`` parses) are all
    refused as a LineageError naming the key."""
    text = with_(digests={"w": {"output": HEX, "models": {key: HEX}}})
    shown = json.dumps(key)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    assert refusal(tmp_path, text) == (
        f': digests["w"].models key must be a model index, got {shown}.'
    )


VOCABULARY = {
    "source": "base",
    "rows": 4,
    "tensors": {"w": [{"models": [0, 1], "weights": [0.5, 0.5], "rows": [[0, 4]]}]},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, None),
        (
            {"source": "other"},
            ": vocabulary.source must be 'base', 'union' or a model index, got \"other\".",
        ),
        ({"rows": 0}, ": vocabulary.rows must be a positive row count, got 0."),
        ({"rows": True}, ": vocabulary.rows must be a positive row count, got true."),
        (
            {"tensors": {"w": [{"models": [0], "weights": [1.0], "rows": [[0, 5]]}]}},
            ': vocabulary.tensors["w"][0].rows must be [start, stop) row ranges, got [0, 5].',
        ),
        ({"normalize": "yes"}, ': vocabulary.normalize must be true or false, got "yes".'),
        ({"added": {"x": 1}}, ': vocabulary.added must be model indices as keys, got "x".'),
    ],
)
def test_each_field_of_the_vocabulary_is_checked(tmp_path, change, message):
    """``vocabulary``'s source, row count (positive, not a bool), row ranges (within the rows),
    ``normalize`` flag and ``added`` keys are each checked, naming the field."""
    text = with_(vocabulary={**VOCABULARY, **change})
    if message is None:
        assert load_lineage_text(tmp_path, text).vocabulary["rows"] == 4
    else:
        assert refusal(tmp_path, text) == message


STACK = {
    "base": 0,
    "blocks": [{"method": "passthrough", "sources": [[0, 0, 1.0]]}],
    "tensors": {"x": [[1, "x"]]},
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({}, None),
        (
            {"blocks": [{"method": "passthrough", "sources": [[0, -1, 1.0]]}]},
            ": stack.blocks[0].sources[0][1] must be a block index, got -1.",
        ),
        (
            {"blocks": [{"method": "passthrough", "sources": []}]},
            ": stack.blocks[0].sources must be a non-empty list of [model, block, weight], got [].",
        ),
        (
            {"tensors": {"x": [[1, "x", "y"]]}},
            ': stack.tensors["x"][0] must be [model, input_name], got [1, "x", "y"].',
        ),
    ],
)
def test_each_field_of_a_stack_is_checked(tmp_path, change, message):
    """A stack block's source names a block index >= 0, a block has at least one source, and a
    stacked tensor's source is exactly [model, input_name]; each is refused, naming the field."""
    text = with_(stack={**STACK, **change})
    if message is None:
        assert load_lineage_text(tmp_path, text).stack["blocks"][0]["sources"] == [[0, 0, 1.0]]
    else:
        assert refusal(tmp_path, text) == message


ADAPTER = {"base": {"kind": "file", "path": "b"}, "r": [4], "lora_alpha": [8.0]}
ADAPTER |= {"use_rslora": False, "use_dora": False, "modules": 2, "whole": 0}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (None, None, None),
        ("r", [0], "models[0].adapter.r must be a list of positive ints, got [0]."),
        ("r", [True], "models[0].adapter.r must be a list of positive ints, got [true]."),
        ("use_dora", "no", 'models[0].adapter.use_dora must be a bool, got "no".'),
        ("whole", -1, "models[0].adapter.whole must be an int >= 0, got -1."),
        ("modules", 1.5, "models[0].adapter.modules must be an int >= 0, got 1.5."),
    ],
)
def test_each_field_of_an_adapter_record_is_checked(field, value, message):
    """An adapter model's ranks are positive ints, its flags bools and its counts ints >= 0:
    a rank of 0 or ``true``, a flag of "no", a count of -1 or 1.5 are refused, naming the field."""
    model = ModelRecord(0, "adapter", "a", None, None, None, None, ADAPTER)
    record = terge.lineage.lineage_to_json(terge.Lineage(models=(model,)))
    if field is None:
        assert terge.lineage.lineage_from_json(record).models[0].adapter == ADAPTER
        return
    record["models"][0]["adapter"][field] = value
    with pytest.raises(LineageError) as caught:
        terge.lineage.lineage_from_json(record)
    assert str(caught.value) == f"lineage: {message}"


def load_lineage_text(tmp_path: Path, text: str) -> Lineage:
    path = tmp_path / "ok.json"
    path.write_text(text)
    return load_lineage(path)


def test_a_missing_or_binary_lineage_file(tmp_path):
    with pytest.raises(
        LineageError,
        match=r"^cannot read the lineage file .*nope\.json: No such file or directory\.$",
    ):
        load_lineage(tmp_path / "nope.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(
        LineageError, match=r"^cannot read the lineage file .*bin\.json: 'utf-8' codec"
    ):
        load_lineage(tmp_path / "bin.json")


def test_digest_records_round_trip_with_integer_model_keys(tmp_path):
    lineage = Lineage(
        {"w": LineageEntry("arithmetic", [(0, 0.5), (1, 0.5)])},
        digests={"w": TensorDigests(HEX, {1: "1" * 64, 0: "2" * 64})},
    )
    path = save_lineage(lineage, tmp_path / "l.json")
    assert list(json.loads(path.read_text())["digests"]["w"]["models"]) == ["0", "1"]
    assert load_lineage(path).digests == {"w": TensorDigests(HEX, {0: "2" * 64, 1: "1" * 64})}


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=4),
    st.dictionaries(
        st.text(max_size=8),
        st.floats(allow_nan=False, allow_infinity=False) | st.integers(),
        max_size=3,
    ),
    st.text(min_size=1, max_size=12),
)
def test_any_weights_settings_and_names_round_trip_exactly(tmp_path_factory, weights, knobs, name):
    lineage = Lineage(
        {name: LineageEntry("arithmetic", list(enumerate(weights)), knobs)},
        {f"{name}.skipped": "excluded"},
        dtype=torch.float64,
    )
    path = save_lineage(lineage, tmp_path_factory.mktemp("l") / "l.json")
    loaded = load_lineage(path)
    assert loaded == lineage
    assert [(i, w) for i, w in loaded[name][1]] == list(enumerate(weights))
    assert all(type(w) is float for _, w in loaded[name][1])
    assert loaded[name].settings == knobs


def test_a_non_finite_setting_is_refused_when_written(tmp_path):
    """What save_lineage writes, load_lineage reads: a custom method's infinite setting is
    refused at writing time, naming it, instead of a file that no longer loads."""

    def capped(tensors, weights, base, cap):
        return sum(w * t for w, t in zip(weights, tensors))

    method = terge.methods.Method("capped", capped, settings={"cap": float("inf")})
    _, lineage = terge.merge(
        [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)], method=method, lineage=True
    )
    with pytest.raises(
        terge.LineageError, match=r"non-finite number in inf; lineage files hold finite"
    ):
        terge.save_lineage(lineage, tmp_path / "l.json")
    assert not (tmp_path / "l.json").exists()


# --- pins and the schema --------------------------------------------------------------------------


def test_file_digests_and_revisions_round_trip(tmp_path):
    files = {
        "model-00001-of-00002.safetensors": "a" * 64,
        "model-00002-of-00002.safetensors": "b" * 64,
    }
    lineage = terge.Lineage(
        {"w": terge.LineageEntry("arithmetic", [(0, 0.5), (1, 0.5)])},
        models=(ModelRecord(0, "file", "m0", files), ModelRecord(1, "file", "m1", revision="abc")),
    )
    lineage.base = lineage.models[0]
    path = terge.save_lineage(lineage, tmp_path / "l.json")
    loaded = terge.load_lineage(path)
    assert loaded == lineage
    assert loaded.models[0].files == files and loaded.models[0].pinned
    assert loaded.models[1].revision == "abc" and loaded.models[1].pinned
    assert not ModelRecord(2, "file", "m2").pinned
    record = json.loads(path.read_text())
    assert "files" not in record["models"][1] and "revision" not in record["models"][0]


def test_a_record_without_pins_is_written_as_before():
    text = terge.lineage.lineage_text(terge.Lineage(models=(ModelRecord(0, "module"),)))
    assert '"files"' not in text and '"revision"' not in text


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("files", {"a": "xyz"}, r'models\[0\].files\["a"\] must be a SHA-256 digest'),
        ("files", ["a"], r"models\[0\].files must be an object"),
        ("revision", 7, r"models\[0\].revision must be a string or null"),
    ],
)
def test_bad_pins_are_named(field, value, message):
    record = terge.lineage.lineage_to_json(terge.Lineage(models=(ModelRecord(0, "file", "a"),)))
    record["models"][0][field] = value
    with pytest.raises(terge.LineageError, match=message):
        terge.lineage.lineage_from_json(record)


def test_the_schema_ships_in_the_package_and_describes_every_field():
    from importlib.resources import files

    text = (files("terge") / "lineage.schema.json").read_text(encoding="utf-8")
    assert terge.lineage.lineage_schema_text() == text
    schema = terge.lineage.lineage_schema()
    assert schema["properties"]["schema"] == {"const": terge.lineage.SCHEMA}
    written = terge.lineage.lineage_to_json(terge.Lineage())
    assert set(written) <= set(schema["properties"])  # every field the writer writes
    adapter = {"base": {"kind": "file", "path": "b"}, "r": [4], "lora_alpha": [8.0]}
    adapter |= {"use_rslora": False, "use_dora": False, "modules": 2, "whole": 0}
    model = terge.lineage.lineage_to_json(
        terge.Lineage(
            models=(ModelRecord(0, "adapter", "a", {"f": "0" * 64}, "r", "o/a", "v1", adapter),)
        )
    )["models"][0]
    assert set(model) == set(schema["$defs"]["model"]["properties"])


def test_the_schema_accepts_what_is_written_and_rejects_typos(tied_models):
    validator = lineage_validator()
    if validator is None:
        pytest.skip("jsonschema is not installed (pip install 'terge[test]')")
    _, lineage = terge.merge(tied_models, lineage=True, digests=True)
    lineage.dropped = {"norm.weight": {1: "not floating point"}}
    record = terge.lineage.lineage_to_json(lineage)
    validator.validate(record)
    record["skiped"] = {}
    assert [e.validator for e in validator.iter_errors(record)] == ["additionalProperties"]
    del record["skiped"]
    record["dropped"]["norm.weight"] = [[1]]
    assert list(validator.iter_errors(record))
    del record["dropped"]
    record["merged"][next(iter(record["merged"]))]["metod"] = "x"
    assert list(validator.iter_errors(record))


def test_every_lineage_the_tests_write_goes_through_the_schema():
    if lineage_validator() is None:
        pytest.skip("jsonschema is not installed (pip install 'terge[test]')")
    assert terge.lineage.lineage_to_json.__name__ == "checked"  # conftest's session hook
    lineage = terge.Lineage({"w": terge.LineageEntry("arithmetic", [(0, 1.0)])})
    lineage.models = (ModelRecord(0, "file", "a", {"f": "not a digest"}),)  # the reader refuses
    with pytest.raises(Exception, match="does not match"):  # jsonschema.ValidationError
        lineage_text(lineage)
