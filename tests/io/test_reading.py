"""Lazy checkpoint reading and load(): file layouts, laziness, and errors found at open time."""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import terge.io.reading as reading
from terge.errors import (
    CheckpointError,
    PatternTypeError,
    TensorNotFoundError,
    TergeError,
)
from terge.io import (
    CheckpointReader,
    TensorInfo,
    load,
    open_checkpoint,
    save,
)

from helpers import DTYPES, assert_same, make, tensors

# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype(tmp_path, dtype):
    state = {"matrix": make(dtype), "scalar": make(dtype, ()), "empty": make(dtype, (0, 3))}
    save(state, tmp_path / "out")
    with open_checkpoint(tmp_path / "out") as reader:
        for name, tensor in state.items():
            assert reader.info(name) == TensorInfo(tensor.shape, dtype)
            assert reader.info(name).nbytes == tensor.numel() * tensor.element_size()
            got = reader.get(name)
            assert got.dtype == dtype
            assert torch.equal(got, tensor)
    assert_same(load(tmp_path / "out", list(state)), state)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class CountingHandle:
    def __init__(self, handle, calls: list[str]) -> None:
        self._handle, self._calls = handle, calls

    def get_tensor(self, name: str) -> torch.Tensor:
        self._calls.append(name)
        return self._handle.get_tensor(name)

    def __exit__(self, *exc: object) -> None:
        self._handle.__exit__(*exc)


@pytest.fixture
def get_tensor_calls(monkeypatch) -> list[str]:
    calls: list[str] = []

    def counting_safe_open(*args, **kwargs):
        return CountingHandle(safe_open(*args, **kwargs), calls)

    monkeypatch.setattr(reading, "safe_open", counting_safe_open)
    return calls


def test_reading_is_lazy(tmp_path, get_tensor_calls):
    state = tensors(4)
    save(state, tmp_path / "out", max_shard_size=2048)
    with open_checkpoint(tmp_path / "out") as reader:
        assert len(reader) == 4
        assert "layers.3.weight" in reader
        assert [reader.info(n).shape for n in reader] == [torch.Size([256])] * 4
        assert get_tensor_calls == []
        assert torch.equal(reader.get("layers.2.weight"), state["layers.2.weight"])
        assert get_tensor_calls == ["layers.2.weight"]


def test_load_reads_only_the_selected_tensors(tmp_path, get_tensor_calls):
    state = tensors(4)
    save(state, tmp_path / "out", max_shard_size=1)
    got = load(tmp_path / "out", included=re.compile(r"\.[123]\."), excluded="layers.2.weight")
    assert list(got) == ["layers.1.weight", "layers.3.weight"]
    assert get_tensor_calls == ["layers.1.weight", "layers.3.weight"]
    assert list(load(tmp_path / "out", ["layers.0.weight", "missing"])) == ["layers.0.weight"]
    assert list(load(tmp_path / "out", excluded=re.compile("weight"))) == []


def test_load_checks_patterns_before_opening(tmp_path):
    with pytest.raises(PatternTypeError, match="`included` got a pattern of type int"):
        load(tmp_path / "missing", included=[5])


def test_load_to_a_device(tmp_path):
    save(tensors(1), tmp_path / "out")
    assert load(tmp_path / "out", device="meta")["layers.0.weight"].is_meta


def test_single_safetensors_file_names_in_file_order(tmp_path):
    state = {"b": torch.ones(2), "a": torch.ones(3, dtype=torch.float64), "c": torch.ones(1)}
    save_file(state, tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as handle:
        offsets = handle.offset_keys()
    with open_checkpoint(tmp_path / "w.safetensors") as reader:
        assert reader.names() == offsets
        assert reader.files == [tmp_path / "w.safetensors"]
        assert repr(reader).endswith("3 tensors, 1 files)")
    assert load(tmp_path / "w.safetensors").keys() == state.keys()


def test_unindexed_safetensors_shards_are_read_together(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"x": torch.ones(1)}, tmp_path / "m" / "b.safetensors")
    save_file({"y": torch.zeros(1)}, tmp_path / "m" / "a.safetensors")
    with open_checkpoint(tmp_path / "m") as reader:
        assert reader.names() == ["y", "x"]
        assert reader.files == [tmp_path / "m" / "a.safetensors", tmp_path / "m" / "b.safetensors"]


def test_model_safetensors_is_read_alone_beside_other_safetensors(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"w": torch.ones(1)}, tmp_path / "m" / "model.safetensors")
    save_file({"lora_A": torch.ones(1)}, tmp_path / "m" / "adapter_model.safetensors")
    with open_checkpoint(tmp_path / "m") as reader:
        assert reader.files == [tmp_path / "m" / "model.safetensors"]
        assert reader.names() == ["w"]


def test_an_index_file_can_be_passed_directly(tmp_path):
    save(tensors(3), tmp_path / "out", max_shard_size=1)
    index = tmp_path / "out" / "model.safetensors.index.json"
    assert_same(load(index), tensors(3))


def test_model_safetensors_index_is_preferred_among_several(tmp_path):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    (tmp_path / "out" / "other.safetensors.index.json").write_text("{}")  # would fail if read
    assert list(load(tmp_path / "out")) == list(tensors(2))


def test_several_indexes_without_a_preferred_one_are_refused(tmp_path):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    index = tmp_path / "out" / "model.safetensors.index.json"
    index.rename(tmp_path / "out" / "a.safetensors.index.json")
    (tmp_path / "out" / "b.safetensors.index.json").write_text("{}")
    with pytest.raises(
        CheckpointError,
        match=r"several indexes \(a.safetensors.index.json, b.safetensors.index.json\) and none "
        r"is model.safetensors.index.json; pass the path of the index",
    ):
        open_checkpoint(tmp_path / "out")
    assert list(load(tmp_path / "out" / "a.safetensors.index.json")) == list(tensors(2))


def test_safetensors_are_preferred_over_bin_in_a_folder(tmp_path):
    save({"w": torch.ones(2)}, tmp_path / "out")
    torch.save(
        {"w": torch.zeros(2), "stale": torch.zeros(1)}, tmp_path / "out" / "pytorch_model.bin"
    )
    assert_same(load(tmp_path / "out"), {"w": torch.ones(2)})


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_torch_files_are_read_with_mmap(tmp_path, monkeypatch, suffix):
    state = {"b": make(torch.bfloat16), "a": make(torch.int64), "tied": None}
    state["tied"] = state["b"]
    torch.save(state, tmp_path / f"model{suffix}")
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    with open_checkpoint(tmp_path / f"model{suffix}") as reader:
        assert reader.names() == ["b", "a", "tied"]  # the state_dict's own order
        assert reader.info("a") == TensorInfo(torch.Size([3, 4]), torch.int64)
        assert torch.equal(reader.get("b"), state["b"])
    assert calls == [{"mmap": True, "weights_only": True, "map_location": "cpu"}]


def test_legacy_torch_files_are_read_without_mmap(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    assert_same(load(tmp_path / "old.bin"), {"w": torch.ones(2)})


def test_sharded_bin_folder_with_index(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save({"a": torch.ones(1)}, tmp_path / "m" / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(1)}, tmp_path / "m" / "pytorch_model-00002-of-00002.bin")
    index = {
        "metadata": {"total_size": 8},
        "weight_map": {
            "b": "pytorch_model-00002-of-00002.bin",
            "a": "pytorch_model-00001-of-00002.bin",
        },
    }
    (tmp_path / "m" / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (tmp_path / "m" / "training_args.bin").write_bytes(b"not read")
    assert_same(load(tmp_path / "m"), {"b": torch.zeros(1), "a": torch.ones(1)}, ordered=True)


def test_unindexed_bin_folder_skips_trainer_state_files(tmp_path):
    (tmp_path / "m").mkdir()
    torch.save({"w": torch.ones(1)}, tmp_path / "m" / "pytorch_model.bin")
    for name in ["training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state_0.pth"]:
        (tmp_path / "m" / name).write_bytes(b"pickled objects, not tensors")
    with open_checkpoint(tmp_path / "m") as reader:
        assert reader.files == [tmp_path / "m" / "pytorch_model.bin"]


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth"])
def test_a_folder_reads_its_unindexed_torch_files(tmp_path, suffix):
    torch.save({"b": torch.zeros(1)}, tmp_path / f"second{suffix}")
    torch.save({"a": torch.ones(1)}, tmp_path / f"first{suffix}")
    with open_checkpoint(tmp_path) as reader:
        assert reader.files == [tmp_path / f"first{suffix}", tmp_path / f"second{suffix}"]
        assert reader.names() == ["a", "b"]


def test_a_lone_index_is_read_whatever_its_name(tmp_path):
    """model.safetensors.index.json is preferred only among several: a folder's one index is read
    whatever its name (diffusers' diffusion_pytorch_model.safetensors.index.json)."""
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    index = tmp_path / "out" / "model.safetensors.index.json"
    index.rename(tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json")
    assert_same(load(tmp_path / "out"), tensors(2), ordered=True)


def test_the_preferred_index_is_known_by_its_whole_name(tmp_path):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    index = tmp_path / "out" / "model.safetensors.index.json"
    index.rename(tmp_path / "out" / "a.safetensors.index.json")
    (tmp_path / "out" / "tiny_model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"several indexes \(a.safetensors.index.json, tiny_"):
        open_checkpoint(tmp_path / "out")


def bin_shards(folder, index_name="pytorch_model.bin.index.json"):
    """A folder of two .bin shards and their index: a is 1, b is 0."""
    folder.mkdir(exist_ok=True)
    torch.save({"a": torch.ones(1)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(1)}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_pytorch_model_bin_index_is_preferred_among_several(tmp_path):
    bin_shards(tmp_path)
    (tmp_path / "other.bin.index.json").write_text("{}")  # would fail if read
    assert_same(load(tmp_path), {"a": torch.ones(1), "b": torch.zeros(1)}, ordered=True)


def test_safetensors_files_are_preferred_over_a_bin_index(tmp_path):
    """Without a safetensors index, model.safetensors still comes before every torch layout,
    an index of .bin shards included."""
    bin_shards(tmp_path)
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path) as reader:
        assert reader.files == [tmp_path / "model.safetensors"]


def test_other_frameworks_indexes_are_not_torch_indexes(tmp_path):
    """A Hub repository often holds sharded Flax or TensorFlow weights beside one
    pytorch_model.bin: their *.index.json are not a torch index."""
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    for name in ["flax_model.msgpack.index.json", "tf_model.h5.index.json"]:
        weight_map = {"w": name.replace(".index.json", "")}
        (tmp_path / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_checkpoint(tmp_path) as reader:
        assert reader.files == [tmp_path / "pytorch_model.bin"]


def test_subfolders_and_partial_files_are_not_shards(tmp_path):
    """Only the folder's own files ending in .safetensors are its shards: not a subfolder named
    like one, nor a download in progress (b.safetensors.incomplete)."""
    save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "b.safetensors.incomplete")
    (tmp_path / "old.safetensors").mkdir()
    with open_checkpoint(tmp_path) as reader:
        assert reader.files == [tmp_path / "a.safetensors"]
        assert reader.names() == ["a"]


def test_only_the_exact_names_of_state_files_are_skipped(tmp_path):
    """A torch file whose name merely contains (feature_scaler.pt) or extends (scaler.pth) the
    name of a Trainer's or accelerate's state file is read as weights like any other."""
    torch.save({"a": torch.ones(1)}, tmp_path / "feature_scaler.pt")
    torch.save({"b": torch.ones(1)}, tmp_path / "scaler.pth")
    (tmp_path / "scaler.pt").write_bytes(b"pickled objects, not tensors")
    with open_checkpoint(tmp_path) as reader:
        assert reader.files == [tmp_path / "feature_scaler.pt", tmp_path / "scaler.pth"]


def test_reader_lookup_and_close(tmp_path):
    save({"model.layers.0.weight": torch.ones(1)}, tmp_path / "out")
    reader = open_checkpoint(tmp_path / "out")
    assert isinstance(reader, CheckpointReader)
    with pytest.raises(
        TensorNotFoundError, match=r"holds no tensor 'model.layer.0.weight'; close names: "
    ) as info:
        reader.get("model.layer.0.weight")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, CheckpointError)
    with pytest.raises(KeyError):
        reader.info("nothing")
    reader.close()
    with pytest.raises(CheckpointError, match=r"the reader of .* is closed"):
        reader.get("model.layers.0.weight")
    reader.close()  # twice is fine


# --------------------------------------------------------------------------------------------
# Errors at open time
# --------------------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(2, 2)}, path)
    return path


def header_of(path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length])


def with_header(path, header: dict | bytes, data: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def data_of(path) -> bytes:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8 + length :]


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope does not exist; pass the path of a") as info:
        open_checkpoint(tmp_path / "nope")
    assert info.value.path == tmp_path / "nope"
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, TergeError)


def test_folder_without_tensor_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "training_args.bin").write_text("")
    with pytest.raises(
        CheckpointError,
        match=r"holds no tensor files \(no \*.safetensors, \*.bin, \*.pt or \*.pth, nor an index; "
        r"it holds config.json, training_args.bin\)",
    ):
        open_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="it holds nothing"):
        open_checkpoint(tmp_path / "empty")


def test_a_folder_without_weights_lists_at_most_ten_names(tmp_path):
    names = [f"f{i:02}.txt" for i in range(11)]
    for name in names:
        (tmp_path / name).write_text("")
    listing = re.escape(f"it holds {', '.join(names[:10])}, ...); pass the folder or file")
    with pytest.raises(CheckpointError, match=listing):
        open_checkpoint(tmp_path)
    (tmp_path / names[-1]).unlink()
    listing = re.escape(f"it holds {', '.join(names[:10])}); pass the folder or file")
    with pytest.raises(CheckpointError, match=listing):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("layout", "listing"),
    [
        (["checkpoint-500/model.safetensors", "checkpoint-1000/model.safetensors"], "nothing"),
        (["hparams.yaml", "last.ckpt"], "hparams.yaml, last.ckpt"),
    ],
)
def test_a_runs_folder_is_told_to_choose(tmp_path, layout, listing):
    """A Trainer's output_dir (checkpoint-N/ subfolders, which are not listed: only files are)
    or a folder with a Lightning .ckpt among other files is a run: choose from it."""
    for name in layout:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(
        CheckpointError,
        match=rf"it holds {re.escape(listing)}\); it is a run's folder of checkpoints: merge some",
    ):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("layout", [["checkpoint-notes.txt"], ["checkpoints/epoch=1.ckpt"]])
def test_a_folder_without_checkpoint_n_subfolders_is_no_run(tmp_path, layout):
    """Only checkpoint-N subfolders (and .ckpt files in the folder itself) make a run's folder:
    not a file named checkpoint-..., nor Lightning's checkpoints/ (subfolders are not searched,
    by open_checkpoint or by choose)."""
    for name in layout:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    with pytest.raises(
        CheckpointError, match=r"\); pass the folder or file that holds the weights\.$"
    ):
        open_checkpoint(tmp_path)


def test_unknown_suffix(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(
        CheckpointError, match=r"unknown checkpoint file suffix '.npz'; terge reads"
    ):
        open_checkpoint(tmp_path / "weights.npz")


def test_truncated_safetensors_data(good_file):
    good_file.write_bytes(good_file.read_bytes()[:-5])
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: tensor 'b' lies at data bytes 16-32 but the file holds only 27 "
        r"bytes of data; the file is truncated or corrupt: download or save it again",
    ):
        open_checkpoint(good_file)


def test_truncated_safetensors_header(good_file):
    good_file.write_bytes(good_file.read_bytes()[:40])
    with pytest.raises(
        CheckpointError, match=r"header claims \d+ bytes but only 32 follow its 8-byte length"
    ):
        open_checkpoint(good_file)


def test_header_length_one_byte_past_the_end(good_file):
    """A length that claims just one byte more than the file holds is a truncation, caught at
    the exact bound (the header JSON itself may still parse)."""
    raw = json.dumps(header_of(good_file)).encode()
    good_file.write_bytes(struct.pack("<Q", len(raw) + 1) + raw)
    with pytest.raises(
        CheckpointError,
        match=rf"header claims {len(raw) + 1} bytes but only {len(raw)} follow its 8-byte length",
    ):
        open_checkpoint(good_file)


def test_header_over_the_size_limit(good_file, monkeypatch):
    """A header longer than the limit the safetensors library enforces is refused before it
    is read (a scribbled length must not make terge read and parse 100 MB of JSON)."""
    (length,) = struct.unpack("<Q", good_file.read_bytes()[:8])
    monkeypatch.setattr(reading, "_MAX_HEADER_BYTES", length - 1)
    with pytest.raises(
        CheckpointError, match=rf"the safetensors header claims an implausible {length} bytes"
    ):
        open_checkpoint(good_file)


def test_names_follow_data_order_not_header_order(tmp_path):
    """A header may list its tensors in any order (JSON objects are unordered); names() follows
    where each tensor's data lies in the file, so the order does not depend on the writer."""
    path = tmp_path / "w.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    with_header(path, header, struct.pack("<2f", 2.0, 1.0))
    with open_checkpoint(path) as reader:
        assert reader.names() == ["b", "a"]
        assert reader.get("a").tolist() == [1.0]


def test_a_view_holds_what_get_reads(tmp_path):
    """view() maps the file where each tensor's data lies (past the 8-byte length and the
    header): the same values as get(), for every dtype width, and an empty tensor too."""
    state = {
        "a": torch.arange(6.0).reshape(2, 3),
        "b": torch.arange(-2, 2, dtype=torch.int64),
        "c": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "e": torch.ones(0, 3),
    }
    path = tmp_path / "w.safetensors"
    save_file(state, path)
    with open_checkpoint(path) as reader:
        for name, tensor in state.items():
            view = reader.view(name)
            assert (view.dtype, view.shape) == (tensor.dtype, tensor.shape)
            assert torch.equal(view, tensor)


def test_a_misaligned_tensor_is_viewed_with_its_values(tmp_path):
    """A float32 tensor whose data starts at an odd byte is read by the library instead of
    viewed in terge's map, with the right values."""
    path = tmp_path / "w.safetensors"
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, so b starts at an odd byte
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\7" + struct.pack("<2f", 1.5, -2.0))
    with open_checkpoint(path) as reader:
        assert reader.view("b").tolist() == [1.5, -2.0]
        assert reader.view("a").tolist() == [7]


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="no /proc")


def held(path) -> tuple[int, int]:
    """How many of this process's file descriptors and memory maps are of ``path``."""
    real = os.path.realpath(path)
    descriptors = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # listdir's own descriptor, closed by now
            descriptors += os.path.realpath(f"/proc/self/fd/{fd}") == real
    with open("/proc/self/maps") as maps:
        mapped = sum(line.rstrip().endswith(real) for line in maps)
    return descriptors, mapped


@needs_proc
def test_close_releases_every_descriptor_and_map(tmp_path):
    """After get, view, prefetch and close (and the view's end), nothing holds the file."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4)}, path)
    reader = open_checkpoint(path)
    reader.get("a")
    view = reader.view("a")
    reader.prefetch("a")
    reader.close()
    del view
    assert held(path) == (0, 0)


@needs_proc
def test_a_failed_open_releases_the_shards_opened_before(tmp_path):
    """A folder whose second shard is broken fails to open, and the first shard, opened
    already, is released, though the error (and its traceback) is still held."""
    save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    (tmp_path / "b.safetensors").write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match=r"b\.safetensors: 2 bytes is too short") as info:
        open_checkpoint(tmp_path)
    assert info.value is not None
    assert held(tmp_path / "a.safetensors") == (0, 0)


def test_a_long_tensor_name_is_cut_in_the_error(good_file):
    """A hostile 100-character tensor name is shown cut to 80 characters ending in "...", so
    the error stays one readable line."""
    name = "x" * 100
    with_header(good_file, {name: "F32"}, b"")
    with pytest.raises(
        CheckpointError, match=rf"the header entry of tensor '{'x' * 76}\.\.\. is malformed: its"
    ) as info:
        open_checkpoint(good_file)
    assert name not in str(info.value)


def test_safetensors_file_too_short(good_file):
    good_file.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="2 bytes is too short for a safetensors file"):
        open_checkpoint(good_file)


def test_scribbled_header_length(good_file):
    good_file.write_bytes(b"\xff" * 8 + good_file.read_bytes()[8:])
    with pytest.raises(CheckpointError, match=r"header claims 18446744073709551615 bytes"):
        open_checkpoint(good_file)


def test_scribbled_header_json(good_file):
    raw = bytearray(good_file.read_bytes())
    raw[8:12] = b"#!@$"
    good_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"the safetensors header is not valid JSON \("):
        open_checkpoint(good_file)


def test_a_header_naming_a_tensor_twice_is_refused(good_file):
    entry = b'{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    with_header(good_file, b'{"w": ' + entry + b', "w": ' + entry + b"}", b"\0" * 4)
    with pytest.raises(
        CheckpointError, match=r"the safetensors header gives the key 'w' twice in one object"
    ):
        open_checkpoint(good_file)


def test_header_not_an_object(good_file):
    with_header(good_file, b"[1, 2]", b"")
    with pytest.raises(CheckpointError, match="header is not a JSON object"):
        open_checkpoint(good_file)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [4]},
        {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]},
        {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]},
        {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]},
        "F32",
    ],
)
def test_malformed_header_entry(good_file, entry):
    header = header_of(good_file)
    data = data_of(good_file)
    header["a"] = entry
    with_header(good_file, header, data)
    with pytest.raises(CheckpointError, match="the header entry of tensor 'a' is malformed"):
        open_checkpoint(good_file)


def test_offsets_one_apart_backwards(good_file):
    """data_offsets [1, 0] (begin just past end) is malformed at the exact bound, not reported
    as a size mismatch of -1 bytes."""
    with_header(good_file, {"e": {"dtype": "F32", "shape": [0], "data_offsets": [1, 0]}}, b"\0")
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'e' is malformed: its data_offsets is \[1, 0\], not \[begin, end\] with "
        r"begin <= end",
    ):
        open_checkpoint(good_file)


@pytest.mark.parametrize("offsets", [[-1, 3], [True, 4], [0, "4"], [0.0, 4], [0, 4, 8]])
def test_data_offsets_that_are_not_counts(good_file, offsets):
    """Each data offset must be an int >= 0: a negative, bool, string or float one is named,
    and so are offsets that are not a pair."""
    with_header(good_file, {"e": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}, b"")
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'e' is malformed: its data_offsets is .*, not \[begin, end\] \(ints >= 0\)",
    ):
        open_checkpoint(good_file)


@pytest.mark.parametrize(("size", "refused"), [(2**63 - 1, False), (2**63, True)])
def test_a_dimension_torch_cannot_hold_is_refused(good_file, size, refused):
    """An empty tensor's other dimensions are unchecked by its (zero) byte count: one past
    int64 is refused at open, not left to crash get() with torch's overflow traceback."""
    entry = {"dtype": "F32", "shape": [0, size], "data_offsets": [0, 0]}
    with_header(good_file, {"e": entry}, b"")
    if not refused:
        with open_checkpoint(good_file) as reader:
            assert reader.info("e").numel == 0
        return
    with pytest.raises(
        CheckpointError,
        match=rf"tensor 'e' is malformed: its shape is \[0, {size}\], not a list of sizes torch "
        rf"can hold \(at most {size - 1}\)",
    ):
        open_checkpoint(good_file)


def test_offsets_disagreeing_with_shape(good_file):
    header = header_of(good_file)
    data = data_of(good_file)
    header["a"]["shape"] = [3]
    with_header(good_file, header, data)
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'a' of shape \[3\] and dtype F32 needs 12 bytes but its data offsets "
        r"span 16; the file is truncated or corrupt",
    ):
        open_checkpoint(good_file)


def test_unknown_safetensors_dtype(good_file):
    header = header_of(good_file)
    data = data_of(good_file)
    header["a"]["dtype"] = "F128"
    with_header(good_file, header, data)
    with pytest.raises(
        CheckpointError, match=r"tensor 'a' has safetensors dtype 'F128', which this torch"
    ):
        open_checkpoint(good_file)


def test_errors_the_library_finds_are_reported_too(good_file):
    good_file.write_bytes(good_file.read_bytes() + b"trailing junk")
    with pytest.raises(CheckpointError, match="safetensors cannot open it"):
        open_checkpoint(good_file)


@pytest.mark.parametrize(
    ("repo", "middle", "allowed"),
    [
        ("models--org--name", "snapshots", True),
        ("plain", "snapshots", False),
        ("models--org--name", "refs", False),
    ],
)
def test_only_a_hub_cache_snapshot_may_link_into_its_repository(tmp_path, repo, middle, allowed):
    """A folder's files may be links out of it only in a Hub cache snapshot
    (models--org--name/snapshots/REV/ linking into ../../blobs/): any other folder two levels
    down, or another subfolder of a Hub repository, gets no such exception."""
    blobs, folder = tmp_path / repo / "blobs", tmp_path / repo / middle / "rev"
    blobs.mkdir(parents=True)
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(2)}, blobs / "f00d")
    (folder / "model.safetensors").symlink_to("../../blobs/f00d")
    if allowed:
        with open_checkpoint(folder) as reader:
            assert reader.names() == ["w"]
        return
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors is a link that resolves to .*blobs/f00d, outside the "
        rf"checkpoint folder .*{middle}/rev; terge reads",
    ):
        open_checkpoint(folder)


def test_a_shard_that_is_a_link_loop_is_refused(tmp_path):
    """A shard named by an index that is a link loop cannot be resolved, so it is not known to
    lie inside the folder: it is refused as outside, not reported as missing."""
    folder = tmp_path / "m"
    folder.mkdir()
    index = {"metadata": {}, "weight_map": {"w": "loop.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "loop.safetensors").symlink_to("loop.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"index\.json: shard 'loop\.safetensors' of the index resolves to .*loop\.safe"
        r"tensors, outside the checkpoint folder",
    ):
        open_checkpoint(folder)


def test_a_folder_index_that_links_out_is_refused(tmp_path):
    """The index a folder is read from must lie in it, like its shards: a link out is refused
    before the index is read."""
    save(tensors(2), tmp_path / "elsewhere", max_shard_size=1)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").symlink_to(
        tmp_path / "elsewhere" / "model.safetensors.index.json"
    )
    with pytest.raises(
        CheckpointError,
        match=r"m: model\.safetensors\.index\.json is a link that resolves to .*elsewhere/model"
        r"\.safetensors\.index\.json, outside the checkpoint folder",
    ):
        open_checkpoint(tmp_path / "m")


def test_every_unindexed_shard_that_links_out_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"a": torch.ones(1)}, tmp_path / "m" / "a.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "secret.safetensors")
    (tmp_path / "m" / "b.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"b\.safetensors is a link that resolves to .*secret\.safetensors, outside the "
        r"checkpoint folder",
    ):
        open_checkpoint(tmp_path / "m")


def test_entry_on_a_folder_named_like_a_torch_file_is_refused(tmp_path):
    """entry= chooses inside one torch file: a folder whose name ends in .pt is still a
    folder, so it is refused, not applied to each file in it."""
    folder = tmp_path / "run.pt"
    folder.mkdir()
    torch.save({"w": torch.ones(2)}, folder / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError,
        match=r"run\.pt::entry=model: entry= and prefix= choose the state dict inside one torch "
        r"file \(.pt, .pth, .bin, .ckpt\); give that file's path, or drop them for a folder",
    ):
        open_checkpoint(folder, entry="model")


def test_index_naming_a_missing_shard(tmp_path):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    (tmp_path / "out" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors.index.json names shard 'model-00002-of-00002.safetensors' but "
        r".* does not exist; download the missing shard",
    ):
        open_checkpoint(tmp_path / "out")


def test_index_naming_a_folder_as_a_shard(tmp_path):
    """A shard the index names must be a file: a folder of that name counts as missing, and
    is refused before any shard is opened."""
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    shard = tmp_path / "out" / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(
        CheckpointError,
        match=r"names shard 'model-00002-of-00002.safetensors' but .*model-00002-of-00002"
        r"\.safetensors does not exist; download the missing shard",
    ):
        open_checkpoint(tmp_path / "out")


@pytest.mark.parametrize(
    "shard", ["..\\b\\model.safetensors", "../b/model.safetensors", "/abs/model.safetensors"]
)
def test_index_naming_a_shard_outside_its_folder(tmp_path, shard):
    """An index names its shards by file name: a Windows-style path with backslashes, a ..
    step or an absolute path is refused as it is written, whatever lies there."""
    save({"w": torch.ones(2)}, tmp_path / "b")
    folder = tmp_path / "a"
    folder.mkdir()
    index = {"metadata": {}, "weight_map": {"w": shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=rf"names shard {re.escape(repr(shard))}, which is not a file inside the index's "
        r"folder .*; an index may only name its own shards",
    ):
        open_checkpoint(folder)


@pytest.mark.parametrize("shard", ["", "."])
def test_index_naming_its_own_folder_as_a_shard(tmp_path, shard):
    """A shard name that is empty or "." names the index's folder itself: refused as no file
    inside it, not reported as a folder that "does not exist"."""
    index = {"metadata": {}, "weight_map": {"w": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=rf"names shard {re.escape(repr(shard))}, which is not a file inside the index's "
        r"folder .*; an index may only name its own shards",
    ):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "shard", ["a\0b.safetensors", "\ud800.safetensors"], ids=["NUL", "surrogate"]
)
def test_index_naming_a_shard_no_file_can_be_named(tmp_path, shard):
    """A JSON index can hold a NUL or an unpaired surrogate (\\u0000, \\ud800), which no path
    can: the index is named as at fault, not a ValueError raised from deep in pathlib."""
    index = {"metadata": {}, "weight_map": {"w": shard}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors\.index\.json names shard {re.escape(repr(shard))}, which no "
        r"file can be named \(it holds a NUL character or an unpaired surrogate\); fix the index",
    ) as info:
        open_checkpoint(tmp_path)
    assert info.value.path == tmp_path / "model.safetensors.index.json"


def test_index_disagreeing_with_its_shards(tmp_path):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    index_path = tmp_path / "out" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["layers.1.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=r"puts tensor 'layers.1.weight' in model-00001-of-00002.safetensors but that shard "
        r"holds no such tensor; the index and shards disagree",
    ) as info:
        open_checkpoint(tmp_path / "out")
    assert info.value.path == index_path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"the index is not valid JSON"),
        ('{"metadata": {}}', r'the index has no "weight_map" object'),
        ('{"weight_map": {"a": 1}}', r'the index has no "weight_map" object'),
        ("[]", r'the index has no "weight_map" object'),
        ('{"weight_map": {}}', r'the index\'s "weight_map" is empty: it maps no tensor to a shard'),
        (
            '{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}',
            r"the index gives the key 'w' twice in one object",
        ),
    ],
)
def test_bad_index(tmp_path, text, message):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    (tmp_path / "out" / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "out")


def test_an_index_that_is_not_utf8_names_the_byte(tmp_path):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    index = tmp_path / "out" / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"caf\xe9": "x.safetensors"}}')
    with pytest.raises(
        CheckpointError,
        match=r"index\.json: the index is not UTF-8 text \(byte 0xe9 at offset 20 cannot start "
        r"or continue a UTF-8 character\); it is not a checkpoint index \(or was damaged\)",
    ) as info:
        open_checkpoint(tmp_path / "out")
    assert info.value.path == index


def test_duplicated_names_across_unindexed_shards(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({"x": torch.ones(1), "y": torch.ones(1)}, tmp_path / "m" / "a.safetensors")
    save_file({"y": torch.zeros(1)}, tmp_path / "m" / "b.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"tensor 'y' is in both .*a.safetensors and .*b.safetensors and no index says which",
    ):
        open_checkpoint(tmp_path / "m")


def test_corrupt_torch_file(tmp_path):
    torch.save({"w": torch.ones(100)}, tmp_path / "model.bin")
    (tmp_path / "model.bin").write_bytes((tmp_path / "model.bin").read_bytes()[:100])
    with pytest.raises(
        CheckpointError, match=r"model.bin: torch.load\(weights_only=True\) cannot read it \("
    ):
        open_checkpoint(tmp_path / "model.bin")


def test_a_weights_only_refusal_names_its_cause_on_one_line(tmp_path):
    """torch's weights-only error is many lines opening with advice to load with
    weights_only=False: the message shows the cause it gives, on one line."""
    (tmp_path / "model.pt").write_bytes(b"\x82\x01.")  # pickle's EXT1, which torch refuses
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path / "model.pt")
    assert str(info.value) == (
        f"{tmp_path / 'model.pt'}: torch.load(weights_only=True) cannot read it (UnpicklingError: "
        "Unsupported operand 130); the file is truncated or corrupt, or holds pickled objects "
        "other than tensors: save a state_dict of tensors (or safetensors) instead."
    )


def test_torch_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list.pt holds a list, not a state_dict"):
        open_checkpoint(tmp_path / "list.pt")
    torch.save({"w": torch.ones(1), "step": 3}, tmp_path / "mixed.pt")
    with pytest.raises(
        CheckpointError,
        match=r"mixed.pt holds no model state dict: .* \(it holds 'w' \(tensor\[1\]\), 'step' \(int\)\)",
    ):
        open_checkpoint(tmp_path / "mixed.pt")


def test_an_error_in_one_shard_fails_the_whole_open(tmp_path):
    save(tensors(3), tmp_path / "out", max_shard_size=1)
    shard = tmp_path / "out" / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003.safetensors: tensor"):
        load(tmp_path / "out", included="layers.0.weight")
