"""Lazy checkpoint reading, atomic sharded writing, save() and load()."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import terge.io.reading as reading
import terge.io.writing as writing
from terge.errors import (
    CheckpointError,
    PatternTypeError,
    SizeFormatError,
    TensorNotFoundError,
    TergeError,
)
from terge.io import (
    CheckpointReader,
    ShardedWriter,
    TensorInfo,
    load,
    open_checkpoint,
    parse_size,
    save,
)

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def make(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4), seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return torch.randint(0, 100, shape, generator=generator, dtype=torch.int64).to(dtype)


def tensors(count: int = 4, numel: int = 256) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors of ``numel * 4`` bytes each."""
    return {f"layers.{i}.weight": make(torch.float32, (numel,), seed=i) for i in range(count)}


def assert_same(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], ordered: bool = False
) -> None:
    """Same names (in the same order when ``ordered``), dtypes and values."""
    assert (list(actual) if ordered else sorted(actual)) == (
        list(expected) if ordered else sorted(expected)
    )
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype
        assert torch.equal(actual[name], tensor), name


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------
# parse_size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (123, 123),
        ("100", 100),
        ("500MB", 500 * 10**6),
        ("2GB", 2 * 10**9),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("2000MiB", 2000 * 2**20),
        ("2 gb", 2 * 10**9),
        (" 10kib ", 10 * 1024),
        ("1.5KiB", 1536),
        ("7B", 7),
        ("1TB", 10**12),
    ],
)
def test_parse_size_accepts_decimal_and_binary_units(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "abc", "5G", "-1GB", "0", "0.0001B", "1e9", 0, -5, True, 1.5])
def test_parse_size_rejects_with_the_value_and_the_accepted_forms(size):
    with pytest.raises(SizeFormatError, match=rf"{re.escape(repr(size))} is not a size.*'2GiB'"):
        parse_size(size)
    assert issubclass(SizeFormatError, ValueError)
    assert issubclass(SizeFormatError, TergeError)


# --------------------------------------------------------------------------------------------
# Round trips and layout
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


def test_one_shard_is_model_safetensors_without_index(tmp_path):
    state = tensors(3)
    with ShardedWriter(tmp_path / "out", metadata={"merged_by": "terge"}) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    assert listing(tmp_path / "out") == ["model.safetensors"]
    assert writer.files == [tmp_path / "out" / "model.safetensors"]
    assert writer.total_size == 3 * 256 * 4
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "merged_by": "terge"}
    assert_same(load(tmp_path / "out"), state)
    assert listing(tmp_path) == ["out"]  # no temporary folder left behind


def test_shards_by_size_with_index_and_total_size(tmp_path):
    state = tensors(5)  # 1024 bytes each
    with ShardedWriter(tmp_path / "out", max_shard_size=2100, metadata={"k": "v"}) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert listing(tmp_path / "out") == [*shards, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 5 * 1024}
    assert index["weight_map"] == {
        "layers.0.weight": shards[0],
        "layers.1.weight": shards[0],
        "layers.2.weight": shards[1],
        "layers.3.weight": shards[1],
        "layers.4.weight": shards[2],
    }
    for shard in shards:
        with safe_open(str(tmp_path / "out" / shard), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt", "k": "v"}
            assert sum(handle.get_tensor(k).nbytes for k in handle.keys()) <= 2100  # noqa: SIM118
    with open_checkpoint(tmp_path / "out") as reader:
        assert reader.names() == list(state)  # index order is add order
        assert reader.files == [tmp_path / "out" / shard for shard in shards]
    assert_same(load(tmp_path / "out"), state, ordered=True)


def test_a_tensor_larger_than_the_shard_size_gets_a_shard_of_its_own(tmp_path):
    state = {"small": make(torch.float32, (10,)), "big": make(torch.float32, (1000,))}
    state["small2"] = make(torch.float32, (10,), seed=1)
    save(state, tmp_path / "out", max_shard_size="1KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert index["weight_map"]["big"] == "model-00002-of-00003.safetensors"
    assert_same(load(tmp_path / "out"), state)


def test_non_contiguous_and_storage_sharing_views_are_written_whole(tmp_path):
    base = make(torch.float32, (4, 6))
    state = {
        "transposed": base.t(),
        "flat": base.view(-1),  # same memory, other shape: not a tie
        "full": base,
        "row": base[1],
    }
    save(state, tmp_path / "out")
    assert_same(load(tmp_path / "out"), {k: v.contiguous() for k, v in state.items()})


def test_empty_writer_writes_an_empty_checkpoint(tmp_path):
    with ShardedWriter(tmp_path / "out"):
        pass
    assert listing(tmp_path / "out") == ["model.safetensors"]
    assert load(tmp_path / "out") == {}


def test_save_casts_floating_tensors_only(tmp_path):
    state = {"w": make(torch.float32), "steps": make(torch.int64), "mask": make(torch.bool)}
    save(state, tmp_path / "out", dtype="bfloat16")
    got = load(tmp_path / "out")
    assert got["w"].dtype == torch.bfloat16
    assert torch.equal(got["w"], state["w"].to(torch.bfloat16))
    assert torch.equal(got["steps"], state["steps"])
    assert torch.equal(got["mask"], state["mask"])


def test_save_creates_missing_parents_and_returns_the_path(tmp_path):
    assert save(tensors(1), tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert listing(tmp_path / "a" / "b") == ["model.safetensors"]


# --------------------------------------------------------------------------------------------
# Tied tensors
# --------------------------------------------------------------------------------------------


class TiedModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.embed.weight


def test_tied_tensors_are_written_once_under_the_first_name(tmp_path):
    model = TiedModel()
    with ShardedWriter(tmp_path / "out") as writer:
        for name, tensor in model.state_dict().items():
            writer.add(name, tensor)
    assert writer.aliases == {"lm_head.weight": "embed.weight"}
    assert writer.total_size == (40 + 16 + 4) * 4
    got = load(tmp_path / "out")
    assert sorted(got) == ["body.bias", "body.weight", "embed.weight"]
    assert torch.equal(got["embed.weight"], model.embed.weight)


def test_tied_tensors_stay_tied_through_a_cast(tmp_path):
    save(TiedModel(), tmp_path / "out", dtype=torch.float16)
    got = load(tmp_path / "out")
    assert "lm_head.weight" not in got
    assert got["embed.weight"].dtype == torch.float16


def test_equal_but_separate_tensors_are_not_tied(tmp_path):
    shared = torch.ones(8)
    state = {"a": shared, "b": torch.ones(8), "c": shared.clone()}
    with ShardedWriter(tmp_path / "out") as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    assert writer.aliases == {}
    assert_same(load(tmp_path / "out"), state)


def test_a_freed_tensor_whose_address_is_reused_is_not_taken_for_a_tie(tmp_path):
    # Each tensor is dropped once its shard is written; the allocator may hand its address to
    # the next tensor of the same shape, which must still be written.
    with ShardedWriter(tmp_path / "out", max_shard_size=1) as writer:
        for i in range(12):
            writer.add(f"t{i}", torch.full((64,), float(i)))
    assert writer.aliases == {}
    got = load(tmp_path / "out")
    assert [float(t[0]) for t in got.values()] == [float(i) for i in range(12)]


# --------------------------------------------------------------------------------------------
# Atomicity, overwrite and refusals
# --------------------------------------------------------------------------------------------


class Boom(Exception):
    pass


def write_then_fail(path, error: type[BaseException], **options) -> None:
    with ShardedWriter(path, **options) as writer:
        for name, tensor in tensors(3).items():
            writer.add(name, tensor)
        assert [p.name.startswith(f".{path.name}.tmp-") for p in path.parent.iterdir()].count(
            True
        ) == 1
        raise error


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_an_error_inside_the_block_leaves_no_target_and_no_temporary_folder(tmp_path, error):
    with pytest.raises(error):
        write_then_fail(tmp_path / "out", error, max_shard_size=1)  # shards already on disk
    assert listing(tmp_path) == []


def test_an_error_while_committing_cleans_up(tmp_path, monkeypatch):
    def failing_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(writing, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"), ShardedWriter(tmp_path / "out") as writer:
        writer.add("a", torch.ones(2))
    assert listing(tmp_path) == []


def test_an_existing_target_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match=r"out already exists; pass overwrite=True") as info:
        ShardedWriter(tmp_path / "out")
    assert info.value.path == tmp_path / "out"
    with pytest.raises(CheckpointError, match="already exists"):
        save(tensors(1), tmp_path / "out")
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == ["keep.txt"]


def test_overwrite_replaces_the_target_at_the_end(tmp_path):
    save(tensors(4), tmp_path / "out", max_shard_size=1)
    with ShardedWriter(tmp_path / "out", overwrite=True) as writer:
        writer.add("new", torch.zeros(3))
        assert (tmp_path / "out" / "model.safetensors.index.json").exists()  # old one untouched
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == ["model.safetensors"]
    assert_same(load(tmp_path / "out"), {"new": torch.zeros(3)})


def test_overwrite_replaces_a_file(tmp_path):
    (tmp_path / "out").write_text("not a checkpoint")
    save(tensors(1), tmp_path / "out", overwrite=True)
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == ["model.safetensors"]


def test_a_failed_overwrite_keeps_the_old_target(tmp_path):
    save({"old": torch.ones(2)}, tmp_path / "out")
    with pytest.raises(Boom):
        write_then_fail(tmp_path / "out", Boom, overwrite=True)
    assert listing(tmp_path) == ["out"]
    assert_same(load(tmp_path / "out"), {"old": torch.ones(2)})


@pytest.mark.parametrize(
    ("target", "given", "relation"),
    [
        ("in", "in", "is"),
        ("in/merged", "in", "is inside"),
        ("in", "in/sub", "contains"),
        ("in/../in/x", "in", "is inside"),
    ],
)
def test_an_output_overlapping_an_input_is_refused(tmp_path, target, given, relation):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    with pytest.raises(
        CheckpointError, match=rf"the output .*{relation} the input .*choose an output folder"
    ):
        ShardedWriter(tmp_path / target, overwrite=True, inputs=[tmp_path / given])
    assert listing(tmp_path / "in") == ["sub"]


def test_an_output_beside_the_inputs_is_accepted(tmp_path):
    (tmp_path / "in").mkdir()
    with ShardedWriter(tmp_path / "inner", inputs=[tmp_path / "in"]) as writer:
        writer.add("a", torch.ones(1))
    assert listing(tmp_path) == ["in", "inner"]


def test_writer_usage_errors(tmp_path):
    writer = ShardedWriter(tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"add\(\) needs an open writer: use `with"):
        writer.add("a", torch.ones(1))
    with writer:
        writer.add("a", torch.ones(1))
        with pytest.raises(CheckpointError, match="tensor 'a' was already added"):
            writer.add("a", torch.ones(1))
        with pytest.raises(CheckpointError, match=r"'b' is a list, not a torch.Tensor"):
            writer.add("b", [1.0])
        with pytest.raises(CheckpointError, match="non-empty str; got 3"):
            writer.add(3, torch.ones(1))
        with pytest.raises(CheckpointError, match="'m' is on the meta device"):
            writer.add("m", torch.empty(2, device="meta"))
        with pytest.raises(CheckpointError, match="'s' is not dense"):
            writer.add("s", torch.eye(2).to_sparse())
    with pytest.raises(CheckpointError, match="entered only once"), writer:
        pass
    with pytest.raises(CheckpointError, match="add\\(\\) needs an open writer"):
        writer.add("late", torch.ones(1))
    assert list(load(tmp_path / "out")) == ["a"]


def test_writer_argument_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"metadata must map str to str.*\{'step': 3\}"):
        ShardedWriter(tmp_path / "out", metadata={"step": 3})
    with pytest.raises(CheckpointError, match=r"copy_files_from='.*nowhere' is not a folder"):
        ShardedWriter(tmp_path / "out", copy_files_from=tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="dtype 'int8' is not a floating torch dtype"):
        ShardedWriter(tmp_path / "out", dtype="int8")
    with pytest.raises(CheckpointError, match="dtype 'float17' is not a floating torch dtype"):
        save(tensors(1), tmp_path / "out", dtype="float17")
    with pytest.raises(SizeFormatError, match="'5 gigs' is not a size"):
        ShardedWriter(tmp_path / "out", max_shard_size="5 gigs")
    with pytest.raises(CheckpointError, match=r"save\(\) got 'step' -> int"):
        save({"w": torch.ones(1), "step": 3}, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"save\(\) takes a torch.nn.Module or a mapping"):
        save([torch.ones(1)], tmp_path / "out")
    assert listing(tmp_path) == []


def test_copy_files_from_copies_non_tensor_files_only(tmp_path):
    source = tmp_path / "base"
    source.mkdir()
    for name in ["config.json", "generation_config.json", "tokenizer.json", "vocab.txt"]:
        (source / name).write_text(name)
    for name in [
        "model.safetensors",
        "pytorch_model.bin",
        "optimizer.pt",
        "rng_state.pth",
        "tf_model.h5",
        "model.safetensors.index.json",
        ".gitattributes",
    ]:
        (source / name).write_text("x")
    (source / "sub").mkdir()
    (source / "linked.json").symlink_to(source / "config.json")  # as in the Hub cache
    with ShardedWriter(tmp_path / "out", copy_files_from=source) as writer:
        writer.add("a", torch.ones(1))
    expected = ["config.json", "generation_config.json", "linked.json", "tokenizer.json"]
    expected.append("vocab.txt")
    assert writer.copied == expected
    assert listing(tmp_path / "out") == sorted([*expected, "model.safetensors"])
    assert (tmp_path / "out" / "linked.json").read_text() == "config.json"
    assert not (tmp_path / "out" / "linked.json").is_symlink()


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
    torch.save({"model": {"w": torch.ones(1)}, "step": 3}, tmp_path / "train.pt")
    with pytest.raises(CheckpointError, match=r"train.pt maps 'model' to a dict; a checkpoint"):
        open_checkpoint(tmp_path / "train.pt")


def test_an_error_in_one_shard_fails_the_whole_open(tmp_path):
    save(tensors(3), tmp_path / "out", max_shard_size=1)
    shard = tmp_path / "out" / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"model-00003-of-00003.safetensors: tensor"):
        load(tmp_path / "out", included="layers.0.weight")


def test_written_folders_get_ordinary_permissions_not_mkdtemps_private_ones(tmp_path):
    import os
    import stat

    from terge.io import save

    mask = os.umask(0o022)
    try:
        save({"x": torch.zeros(2)}, tmp_path / "out")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
