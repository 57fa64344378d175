"""merge() with checkpoints on disk: paths as models, out= streaming, exactness, safety, memory."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import terge
from terge import CheckpointError, MergeArgumentError, SizeFormatError, methods
from terge.io import load, open_checkpoint, save
from terge.kernels import store_rounded
from terge.sources import FileSource

from helpers import Tied

SRC = Path(terge.__file__).resolve().parent.parent


def state_dicts(count: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict]:
    """Small models as state dicts: floats of a few shapes, and an integer buffer."""
    generator = torch.Generator().manual_seed(seed)
    models = []
    for _ in range(count):
        models.append(
            {
                "embed.weight": torch.randn(11, 4, generator=generator, dtype=dtype),
                "layers.0.weight": torch.randn(3, 4, generator=generator, dtype=dtype),
                "layers.0.bias": torch.randn(3, generator=generator, dtype=dtype),
                "layers.1.weight": torch.randn(5, 3, generator=generator, dtype=dtype),
                "norm.weight": torch.randn(5, generator=generator).half(),
                "steps": torch.tensor([7]),
            }
        )
    return models


def write(state: dict, path: Path, form: str) -> Path:
    """Save ``state`` in one of the checkpoint forms terge reads; returns the path to pass."""
    if form == "safetensors":
        path = path.with_suffix(".safetensors")
        save_file(state, path)
    elif form == "indexed":
        save(state, path, max_shard_size=100)
    elif form == "unindexed":
        path.mkdir()
        names = list(state)
        save_file({n: state[n] for n in names[:3]}, path / "part-a.safetensors")
        save_file({n: state[n] for n in names[3:]}, path / "part-b.safetensors")
    elif form == "bin":
        path = path.with_suffix(".bin")
        torch.save(state, path)
    elif form == "bin-indexed":
        path.mkdir()
        names = list(state)
        pieces = {"a.bin": names[:2], "b.bin": names[2:]}
        for file_name, part in pieces.items():
            torch.save({n: state[n] for n in part}, path / file_name)
        weight_map = {n: f for f, part in pieces.items() for n in part}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        raise AssertionError(form)
    return path


def saved(tmp_path: Path, models: list[dict], form: str = "indexed") -> list[Path]:
    return [write(m, tmp_path / f"model{i}", form) for i, m in enumerate(models)]


def assert_same(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def same_merge(a: terge.Lineage, b: terge.Lineage) -> bool:
    """Equal lineages but for where the models were read from (memory or files)."""

    def plan(lineage: terge.Lineage) -> dict:
        record = terge.lineage.lineage_to_json(lineage)
        return {k: v for k, v in record.items() if k not in ("models", "base")}

    return plan(a) == plan(b)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, str]]:
    """Every (path, name) a file source hands out."""
    calls: list[tuple[str, str]] = []
    original = FileSource.get

    def recording(self, name):
        calls.append((self.path.name, name))
        return original(self, name)

    monkeypatch.setattr(FileSource, "get", recording)
    return calls


# --- paths are models ---------------------------------------------------------------------------


METHODS = [
    pytest.param("arithmetic", id="arithmetic"),
    pytest.param(methods.ties(density=0.5), id="ties"),
    pytest.param(methods.dare_linear(density=0.5), id="dare"),
]


@pytest.mark.parametrize("form", ["safetensors", "indexed", "unindexed", "bin", "bin-indexed"])
@pytest.mark.parametrize("method", METHODS)
def test_files_merge_exactly_as_the_same_models_in_memory(tmp_path, form, method):
    models = state_dicts()
    paths = saved(tmp_path, models, form)
    kwargs = {"method": method, "weights": [1, 2, 4], "seed": 3, "lineage": True}
    expected, expected_lineage = terge.merge(models, **kwargs)

    in_memory, lineage = terge.merge(paths, **kwargs)
    assert_same(in_memory, expected)
    with open_checkpoint(paths[0]) as reader:
        assert list(in_memory) == reader.names()  # the base's order
    assert same_merge(lineage, expected_lineage) and lineage.skipped == expected_lineage.skipped

    out, lineage = terge.merge(paths, out=tmp_path / "out", **kwargs)
    assert out == tmp_path / "out" and isinstance(out, Path)
    assert_same(load(out), expected)
    assert same_merge(lineage, expected_lineage)


def test_paths_modules_and_state_dicts_mix(tmp_path):
    torch.manual_seed(0)
    modules = [Tied() for _ in range(3)]
    untied = [{name: t.clone() for name, t in m.state_dict().items()} for m in modules[:2]]
    paths = saved(tmp_path, untied, "safetensors")
    expected = terge.merge(modules).state_dict()

    # A path base gives a state dict; the module's tied head is a separate name in the file.
    merged = terge.merge([os.fspath(paths[0]), modules[1], modules[2].state_dict()])
    assert_same(merged, expected)
    # A module base gives a module; a path is read like any other contributor.
    merged = terge.merge([modules[0], paths[1], modules[2].state_dict()])
    assert isinstance(merged, Tied)
    assert_same(merged.state_dict(), expected)
    assert merged.head.weight is merged.embed.weight


def test_a_path_base_equal_to_a_model_is_that_model(tmp_path):
    models = state_dicts(2)
    paths = saved(tmp_path, models)
    _, lineage = terge.merge(paths, base=str(paths[1]), method="task_arithmetic", lineage=True)
    _, expected = terge.merge(models, base=1, method="task_arithmetic", lineage=True)
    assert same_merge(lineage, expected) and lineage.base.index == expected.base.index == 1


def test_a_separate_path_base_supplies_the_defaults(tmp_path):
    models = state_dicts(3)
    paths = saved(tmp_path, models)
    merged, lineage = terge.merge(paths[:2], base=paths[2], lineage=True)
    expected, expected_lineage = terge.merge(models[:2], base=models[2], lineage=True)
    assert_same(merged, expected)
    assert same_merge(lineage, expected_lineage)
    assert lineage.base == terge.lineage.ModelRecord("separate", "file", str(paths[2]))


def test_tensors_of_a_path_base_left_alone_are_copy_on_write_views(tmp_path):
    models = state_dicts()
    paths = saved(tmp_path, models, "safetensors")
    merged = terge.merge(paths, excluded="layers.1.weight")
    merged["layers.1.weight"].add_(1)
    assert torch.equal(load(paths[0])["layers.1.weight"], models[0]["layers.1.weight"])


def test_a_misaligned_safetensors_tensor_is_read_by_copy(tmp_path):
    """safetensors files from other writers may not align tensors; they still read right."""
    values = torch.tensor([1.5, -2.25])
    header = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(
        struct.pack("<Q", len(raw)) + raw + bytes([1, 2, 3]) + values.numpy().tobytes()
    )
    with open_checkpoint(path) as reader:
        assert torch.equal(reader.view("b"), values)
        assert torch.equal(reader.view("a"), torch.tensor([1, 2, 3], dtype=torch.uint8))


# --- only what the plan needs is read -------------------------------------------------------------


@pytest.mark.parametrize("out", [False, True])
def test_unselected_tensors_of_other_models_are_never_read(tmp_path, reads, out):
    paths = saved(tmp_path, state_dicts())
    terge.merge(
        paths,
        included=re.compile(r"^layers\."),
        excluded="layers.1.weight",
        out=tmp_path / "out" if out else None,
    )
    others = {name for file, name in reads if file != "model0"}
    assert others == {"layers.0.weight", "layers.0.bias"}


# --- out= ----------------------------------------------------------------------------------------


def test_out_writes_shards_of_the_requested_size_with_an_index(tmp_path):
    models = state_dicts()
    paths = saved(tmp_path, models)
    out = terge.merge(paths, out=tmp_path / "out", max_shard_size=100)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in range(1, 4)]
    assert listing(out) == ["README.md", "lineage.json", *shards, "model.safetensors.index.json"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    # 176 bytes (alone: larger than a shard), then 48 + 12, then 60 + 10 + 8, in the base's order
    assert index["weight_map"] == {
        "embed.weight": shards[0],
        "layers.0.weight": shards[1],
        "layers.0.bias": shards[1],
        "layers.1.weight": shards[2],
        "norm.weight": shards[2],
        "steps": shards[2],
    }
    assert list(index["weight_map"]) == list(models[0])
    assert index["metadata"]["total_size"] == 176 + 48 + 12 + 60 + 10 + 8
    for shard in shards:
        held = [n for n, f in index["weight_map"].items() if f == shard]
        assert sorted(load_file(out / shard)) == sorted(held)
    with open_checkpoint(out) as reader:
        assert reader.names() == list(models[0])
    assert_same(load(out), terge.merge(models))


def test_one_shard_is_model_safetensors_without_an_index(tmp_path):
    paths = saved(tmp_path, state_dicts())
    out = terge.merge(paths, out=str(tmp_path / "out"))
    assert listing(out) == ["README.md", "lineage.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as file:
        metadata = file.metadata()
    assert metadata["format"] == "pt"
    assert metadata["terge_version"] == terge.__version__
    assert json.loads(metadata["terge_lineage"]) == {
        "merged": {"arithmetic": 5},
        "skipped": {"not floating point": 1},
    }


def test_max_shard_size_accepts_sizes_like_2kb(tmp_path):
    paths = saved(tmp_path, [{"w": torch.zeros(400)}, {"w": torch.ones(400)}])
    out = terge.merge(paths, out=tmp_path / "out", max_shard_size="1KB")
    assert listing(out) == [
        "README.md",
        "lineage.json",
        "model.safetensors",
    ]  # one tensor: one shard
    assert torch.equal(load(out)["w"], torch.full((400,), 0.5))


def test_out_dtype_rounds_once_from_the_float64_accumulation(tmp_path):
    # 1 + 2**-8 + 2**-30 lies just above a bfloat16 half-way point: rounding through float32
    # lands on the half-way point and ties to even (1.0); the correctly rounded value is above.
    tricky = 1 + 2**-8 + 2**-30
    models = state_dicts(3, dtype=torch.float64)
    for model in models:
        model["tricky"] = torch.tensor([tricky, -tricky], dtype=torch.float64)
    models[0]["only_base"] = torch.tensor([tricky], dtype=torch.float64)
    paths = saved(tmp_path, models)
    out = terge.merge(paths, out=tmp_path / "out", out_dtype=torch.bfloat16)

    written = load(out)
    exact = terge.merge(models)  # float64 models: the float64 accumulation, unrounded
    for name, value in exact.items():
        if not value.is_floating_point():
            assert torch.equal(written[name], value)
            continue
        expected = torch.empty_like(value, dtype=torch.bfloat16)
        store_rounded(expected.view(-1), value.view(-1), torch.empty(value.numel()))
        assert written[name].dtype == torch.bfloat16, name
        assert torch.equal(written[name], expected), name
    correct = torch.tensor([1 + 2**-7, -(1 + 2**-7)], dtype=torch.bfloat16)
    assert torch.equal(written["tricky"], correct)
    assert torch.equal(written["only_base"], correct[:1])


def test_out_dtype_by_name_and_config_files_copied_with_the_dtype_updated(tmp_path):
    paths = saved(tmp_path, state_dicts())
    config = {"model_type": "tiny", "torch_dtype": "float32", "hidden_size": 4}
    (paths[0] / "config.json").write_text(json.dumps(config))
    (paths[0] / "generation_config.json").write_text("{}")
    (paths[0] / "tokenizer.json").write_text('{"vocab": {}}')
    (paths[0] / "optimizer.pt").write_bytes(b"not weights")

    out = terge.merge(paths, out=tmp_path / "out", out_dtype="bfloat16")
    assert listing(out) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "lineage.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert json.loads((out / "config.json").read_text()) == {**config, "torch_dtype": "bfloat16"}
    assert (out / "tokenizer.json").read_text() == '{"vocab": {}}'
    out = terge.merge(paths, out=tmp_path / "same-dtype")
    assert json.loads((out / "config.json").read_text()) == config


def test_tied_tensors_are_written_once_and_the_alias_recorded(tmp_path, tied_models):
    out, lineage = terge.merge(tied_models, out=tmp_path / "out", lineage=True)
    written = load(out)
    expected = terge.merge(tied_models).state_dict()
    del expected["head.weight"]
    assert_same(written, expected)  # buffers (not merged) are copied from the base
    assert lineage.tied == {"head.weight": "embed.weight"}
    record = json.loads((out / "lineage.json").read_text())
    assert record["tied"] == {"head.weight": "embed.weight"}
    assert record["skipped"]["head.weight"] == "tied"


def test_lineage_json_records_the_plan_and_the_inputs(tmp_path):
    models = state_dicts()
    paths = saved(tmp_path, models)
    out, lineage = terge.merge(
        [paths[0], models[1], paths[2]],
        method=methods.dare_linear(density=0.5),
        seed=5,
        out=tmp_path / "out",
        out_dtype=torch.float16,
        lineage=True,
    )
    text = (out / "lineage.json").read_text()
    record = json.loads(text)
    assert list(record) == sorted(record)
    assert record["schema"] == 1
    assert record["models"] == [
        {"index": 0, "kind": "file", "path": str(paths[0])},
        {"index": 1, "kind": "state_dict", "path": None},
        {"index": 2, "kind": "file", "path": str(paths[2])},
    ]
    assert record["base"] == record["models"][0]
    assert record["dtype"] == "float64"
    assert record["out_dtype"] == "float16"
    assert record["terge_version"] == terge.__version__
    assert record["skipped"] == {"steps": "not floating point"}
    assert record["tied"] == {}
    assert set(record["merged"]) == set(lineage)
    entry = record["merged"]["layers.0.weight"]
    assert entry["method"] == "dare_linear"
    assert entry["contributions"] == [[i, w] for i, w in lineage["layers.0.weight"][1]]
    assert entry["settings"] == {**lineage["layers.0.weight"].settings}
    assert entry["settings"]["seed"] == 5


# --- safety --------------------------------------------------------------------------------------


def third_call_fails():
    calls = []

    def failing(tensors, weights, base):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom on the third tensor")
        return sum(w * t for w, t in zip(weights, tensors))

    return failing


def test_an_error_while_merging_leaves_no_output_and_no_temporary_folder(tmp_path):
    paths = saved(tmp_path, state_dicts())
    before = listing(tmp_path)
    with pytest.raises(RuntimeError, match="boom on the third tensor"):
        terge.merge(paths, method=third_call_fails(), out=tmp_path / "out")
    assert listing(tmp_path) == before


def test_an_error_while_overwriting_keeps_the_old_output(tmp_path):
    paths = saved(tmp_path, state_dicts())
    out = terge.merge(paths, out=tmp_path / "out")
    old = load(out)
    with pytest.raises(RuntimeError, match="boom"):
        terge.merge(paths, method=third_call_fails(), out=out, overwrite=True)
    assert_same(load(out), old)
    assert listing(tmp_path) == ["model0", "model1", "model2", "out"]


def test_an_existing_target_is_refused_before_anything_is_read(tmp_path, reads):
    paths = saved(tmp_path, state_dicts())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(
        CheckpointError, match=r"out already exists; pass overwrite=True to replace"
    ):
        terge.merge(paths, out=tmp_path / "out")
    assert reads == []
    assert listing(tmp_path / "out") == ["keep.txt"]

    out = terge.merge(paths, out=tmp_path / "out", overwrite=True)
    assert listing(out) == ["README.md", "lineage.json", "model.safetensors"]


@pytest.mark.parametrize("inside", ["model1/merged", "model2"])
def test_an_output_in_an_input_folder_is_refused_before_anything_is_written(
    tmp_path, reads, inside
):
    paths = saved(tmp_path, state_dicts())
    before = {p: listing(p) for p in paths}
    with pytest.raises(CheckpointError, match=r"is (inside )?the input .*model[12]"):
        terge.merge(paths, out=tmp_path / inside, overwrite=True)
    assert reads == []
    assert {p: listing(p) for p in paths} == before


def test_inplace_with_a_file_base_is_refused_naming_the_path(tmp_path, linears):
    (path,) = saved(tmp_path, [linears[0].state_dict()], "safetensors")
    with pytest.raises(MergeArgumentError, match=rf"checkpoint {re.escape(str(path))}.*out="):
        terge.merge([path, linears[1]], inplace=True)


def test_a_corrupt_input_is_named_before_any_output_is_written(tmp_path):
    paths = saved(tmp_path, state_dicts(), "safetensors")
    paths[2].write_bytes(paths[2].read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(paths[2]))}: .*truncated"):
        terge.merge(paths, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"out_dtype": torch.bfloat16}, MergeArgumentError, r"pass out='folder' too"),
        ({"out": 3}, MergeArgumentError, r"`out` must be the path"),
        ({"out": "x", "inplace": True}, MergeArgumentError, r"pass only one of them"),
        ({"out": "x", "out_dtype": torch.int8}, MergeArgumentError, r"`out_dtype` must be"),
        ({"out": "x", "out_dtype": "float33"}, MergeArgumentError, r"`out_dtype` must be"),
        ({"out": "x", "max_shard_size": "5 parsecs"}, SizeFormatError, r"is not a size"),
        ({"base": "no/such/folder"}, MergeArgumentError, r"no existing file or folder"),
    ],
)
def test_bad_output_arguments_are_refused_up_front(tmp_path, monkeypatch, kwargs, error, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        terge.merge(state_dicts(2), **kwargs)
    assert listing(tmp_path) == []


def test_a_single_path_must_be_wrapped_in_a_list(tmp_path):
    with pytest.raises(MergeArgumentError, match=r"got a single path\. Wrap it in a list"):
        terge.merge(str(tmp_path))


def test_a_missing_model_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.safetensors does not exist"):
        terge.merge([tmp_path / "nothing.safetensors"])


# --- memory --------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent(
    """
    import sys, threading, time
    import torch
    import terge

    def rss_anon():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    paths, out = sys.argv[1:4], sys.argv[4]
    # A first tiny merge pays the one-time costs (lazy imports, torch's dispatch caches).
    terge.merge([{"w": torch.ones(1 << 17)}] * 2, out=out + "-warm-up")
    start = peak = rss_anon()
    done = threading.Event()

    def sample():
        global peak
        while not done.is_set():
            peak = max(peak, rss_anon())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    terge.merge(paths, out=out, max_shard_size="16MB")
    done.set()
    sampler.join()
    print(max(peak, rss_anon()) - start)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_merging_to_files_keeps_anonymous_memory_flat(tmp_path):
    """3 x 40 MB of float32 merged to out=: the peak growth of non-file-backed memory must stay
    far below one tensor (the inputs are memory-mapped, the output written into mapped shards)."""
    generator = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        state = {
            f"layer.{j}.weight": torch.randn(1000, 2500, generator=generator) for j in range(4)
        }
        paths.append(save(state, tmp_path / f"model{i}", max_shard_size="16MB"))
        del state
    model_bytes = 4 * 1000 * 2500 * 4
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, *map(str, paths), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        },
        check=False,
    )
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1])
    # About 5 MiB is measured (allocator caches, whatever the model size); holding any one
    # merged tensor (10 MB), let alone a shard or a model, in process memory fails this.
    assert growth < model_bytes / 4, f"anonymous memory grew by {growth / 2**20:.1f} MiB"
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
