"""Lazy checkpoint reading and load(): file layouts, laziness, and errors found at open time."""

from __future__ import annotations

import json
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


def test_index_naming_a_missing_shard(tmp_path):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    (tmp_path / "out" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors.index.json names shard 'model-00002-of-00002.safetensors' but "
        r".* does not exist; download the missing shard",
    ):
        open_checkpoint(tmp_path / "out")


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
    ],
)
def test_bad_index(tmp_path, text, message):
    save(tensors(2), tmp_path / "out", max_shard_size=1)
    (tmp_path / "out" / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "out")


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
