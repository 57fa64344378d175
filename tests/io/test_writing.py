"""Atomic sharded writing and save(): round trips, shard layout, ties, atomicity, refusals."""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import terge.io.writing as writing
from terge.errors import (
    CheckpointError,
    LineageError,
    SizeFormatError,
)
from terge.io import (
    ShardedWriter,
    load,
    open_checkpoint,
    save,
)

from helpers import assert_same, listing, make, tensors

# --------------------------------------------------------------------------------------------
# Round trips and layout
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Shards written by several processes (a distributed merge)
# --------------------------------------------------------------------------------------------


def _layout(sizes: list[int]) -> dict[str, writing.TensorInfo]:
    return {
        f"t{i}": writing.TensorInfo(torch.Size([n]), torch.float32) for i, n in enumerate(sizes)
    }


def test_shard_owners_balance_bytes_the_same_way_on_every_rank():
    layout = _layout([100, 100, 100, 300, 50, 50])
    groups = [[name] for name in layout]
    assert writing.shard_owners(groups, layout, 1) == [0] * 6
    # largest first to the least loaded rank, the lowest on a tie: 1400 bytes each
    assert writing.shard_owners(groups, layout, 2) == [1, 1, 1, 0, 0, 1]
    assert writing.shard_owners(groups, layout, 3) == [1, 2, 1, 0, 2, 2]
    assert writing.shard_owners(groups[:2], layout, 4) == [0, 1]  # more ranks than shards


def test_shards_filled_by_two_writers_are_one_writer_s_byte_for_byte(tmp_path):
    layout = _layout([64, 32, 64, 16, 48])
    values = {name: torch.randn(info.shape) for name, info in layout.items()}
    with writing.StreamingShardWriter(tmp_path / "one", layout, max_shard_size=300) as one:
        for name, value in values.items():
            one.destination(name).copy_(value)
    groups = writing.shard_groups(layout, 300)
    assert len(groups) == 4
    with writing.StreamingShardWriter(
        tmp_path / "two", layout, max_shard_size=300, owned=[0, 2]
    ) as two:
        other = writing.ShardFiles(two.temporary, layout, groups, [1, 3], two.metadata)
        for name, value in values.items():
            (other.destination(name) if name in other else two.destination(name)).copy_(value)
        other.finish(tmp_path / "two")
    assert listing(tmp_path / "two") == listing(tmp_path / "one")
    for path in (tmp_path / "one").iterdir():
        assert (tmp_path / "two" / path.name).read_bytes() == path.read_bytes()


def test_a_writer_refuses_a_tensor_of_another_process_s_shards(tmp_path):
    layout = _layout([64, 64])
    with (
        pytest.raises(CheckpointError, match="'t1' is not in this writer's shards"),
        writing.StreamingShardWriter(tmp_path / "out", layout, max_shard_size=256, owned=[0]) as w,
    ):
        w.destination("t1")
    assert not (tmp_path / "out").exists()


def test_shard_files_left_unwritten_are_refused_and_removed_on_failure(tmp_path):
    layout = _layout([64, 64])
    groups = writing.shard_groups(layout, 256)
    files = writing.ShardFiles(tmp_path, layout, groups, [1], {"format": "pt"})
    assert [p.name for p in files.paths] == ["model-00002.safetensors"]
    with pytest.raises(CheckpointError, match=r"1 tensors of the layout were never written \('t1'"):
        files.finish(tmp_path / "out")
    files.remove()
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Shard boundaries and streamed layouts
# --------------------------------------------------------------------------------------------


def test_a_shard_filled_exactly_to_max_shard_size_is_one_shard(tmp_path):
    state = tensors(2)  # 1024 bytes each
    save(state, tmp_path / "out", max_shard_size=2048)
    assert listing(tmp_path / "out") == ["model.safetensors"]
    save(state, tmp_path / "over", max_shard_size=2047)
    assert listing(tmp_path / "over") == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    layout = {name: writing.TensorInfo(t.shape, t.dtype) for name, t in state.items()}
    assert writing.shard_groups(layout, 2048) == [list(state)]
    assert writing.shard_groups(layout, 2047) == [[name] for name in state]


def test_tensors_each_larger_than_max_shard_size_get_one_shard_each_and_no_empty_one(tmp_path):
    state = tensors(3)
    with ShardedWriter(tmp_path / "out", max_shard_size=1) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert listing(tmp_path / "out") == [*shards, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == dict(zip(state, shards, strict=True))
    layout = {name: writing.TensorInfo(t.shape, t.dtype) for name, t in state.items()}
    assert writing.shard_groups(layout, 1) == [[name] for name in state]


def test_streamed_shards_align_every_tensor_for_its_dtype(tmp_path):
    layout = {
        "a": writing.TensorInfo(torch.Size([3]), torch.int8),
        "b": writing.TensorInfo(torch.Size([5]), torch.float16),
        "c": writing.TensorInfo(torch.Size([2]), torch.float64),
    }
    values = {
        "a": torch.tensor([1, -2, 3], dtype=torch.int8),
        "b": torch.arange(5, dtype=torch.float16),
        "c": torch.tensor([0.5, -1.5], dtype=torch.float64),
    }
    with writing.StreamingShardWriter(tmp_path / "out", layout) as writer:
        for name, value in values.items():
            writer.destination(name).copy_(value)
    raw = (tmp_path / "out" / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    assert size % 8 == 0
    header = json.loads(raw[8 : 8 + size])
    assert [name for name in header if name != "__metadata__"] == ["c", "b", "a"]  # largest first
    for name, value in values.items():
        begin, end = header[name]["data_offsets"]
        assert (8 + size + begin) % value.element_size() == 0
        assert raw[8 + size + begin : 8 + size + end] == value.numpy().tobytes()
    assert_same(load(tmp_path / "out"), values)


def test_a_streamed_empty_tensor_is_written(tmp_path):
    layout = {
        "empty": writing.TensorInfo(torch.Size([0, 4]), torch.float32),
        "w": writing.TensorInfo(torch.Size([2]), torch.float32),
    }
    with writing.StreamingShardWriter(tmp_path / "out", layout) as writer:
        writer.destination("empty").copy_(torch.empty(0, 4))
        writer.destination("w").copy_(torch.ones(2))
    assert_same(load(tmp_path / "out"), {"empty": torch.empty(0, 4), "w": torch.ones(2)})


def test_a_streaming_writer_refuses_a_dtype_safetensors_cannot_store(tmp_path):
    layout = {"z": writing.TensorInfo(torch.Size([2]), torch.complex128)}
    with pytest.raises(
        CheckpointError, match=r"tensor 'z' has dtype torch.complex128, which safetensors cannot"
    ):
        writing.StreamingShardWriter(tmp_path / "out", layout)
    assert listing(tmp_path) == []


def test_a_streaming_writer_hands_out_destinations_only_while_open(tmp_path):
    layout = _layout([4])
    writer = writing.StreamingShardWriter(tmp_path / "out", layout)
    with pytest.raises(CheckpointError, match=r"destination\(\) needs an open writer"):
        writer.destination("t0")
    with writer:
        writer.destination("t0").copy_(torch.ones(4))
    with pytest.raises(CheckpointError, match=r"destination\(\) needs an open writer"):
        writer.destination("t0")
    assert_same(load(tmp_path / "out"), {"t0": torch.ones(4)})


def test_a_streamed_tensor_never_written_is_refused_and_nothing_saved(tmp_path):
    layout = _layout([4, 4])

    def write() -> None:
        with writing.StreamingShardWriter(tmp_path / "out", layout) as writer:
            writer.destination("t0").copy_(torch.ones(4))

    with pytest.raises(CheckpointError, match=r"1 tensors of the layout were never written \('t1'"):
        write()
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------
# A full disk, or one without fallocate
# --------------------------------------------------------------------------------------------


def _fallocate_failing(code: int):
    def fallocate(fd: int, offset: int, size: int) -> None:
        raise OSError(code, os.strerror(code))

    return fallocate


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="posix_fallocate")
def test_a_full_disk_fails_before_computing_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(writing.os, "posix_fallocate", _fallocate_failing(errno.ENOSPC))
    layout = {"w": writing.TensorInfo(torch.Size([4, 4]), torch.float32)}
    with (
        pytest.raises(
            CheckpointError,
            match=(
                rf"^no space left on the disk for {re.escape(str(tmp_path / 'out'))}: its shard "
                r"model-00001\.safetensors needs 160 bytes, the whole output about 64; free "
            ),
        ) as raised,
        writing.StreamingShardWriter(tmp_path / "out", layout),
    ):
        pytest.fail("the block must not run")
    assert raised.value.path == tmp_path / "out"
    assert listing(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="posix_fallocate")
def test_a_full_disk_on_another_rank_s_shards_names_the_output(tmp_path, monkeypatch):
    layout = _layout([64, 64])
    groups = writing.shard_groups(layout, 256)
    monkeypatch.setattr(writing.os, "posix_fallocate", _fallocate_failing(errno.ENOSPC))
    hidden = tmp_path / ".out.tmp"
    hidden.mkdir()
    with pytest.raises(CheckpointError, match=r"disk for \S*out: its shard model-00002\.safe"):
        writing.ShardFiles(hidden, layout, groups, [1], {}, output=tmp_path / "out")


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="posix_fallocate")
def test_a_file_system_without_fallocate_still_gets_whole_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(writing.os, "posix_fallocate", _fallocate_failing(errno.EOPNOTSUPP))
    layout = {"w": writing.TensorInfo(torch.Size([4, 4]), torch.float32)}
    value = torch.arange(16, dtype=torch.float32).view(4, 4)
    with writing.StreamingShardWriter(tmp_path / "out", layout) as writer:
        writer.destination("w").copy_(value)
    assert_same(load(tmp_path / "out"), {"w": value})


# --------------------------------------------------------------------------------------------
# Flushed to disk before the rename (a crash cannot be tested: the calls and their order are)
# --------------------------------------------------------------------------------------------


def _record_fsyncs(monkeypatch) -> list[str]:
    """Record, in order, each path os.fsync flushes and each rename (``rename <dest name>``)."""
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def rename(source: object, destination: object) -> None:
        events.append(f"rename {Path(destination).name}")
        real_rename(source, destination)

    monkeypatch.setattr(writing.os, "fsync", fsync)
    monkeypatch.setattr(writing.os, "rename", rename)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="/proc")
@pytest.mark.parametrize("streamed", [False, True])
def test_every_file_and_the_folder_are_flushed_before_the_rename_into_place(
    tmp_path, monkeypatch, streamed
):
    state = tensors(3)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    events = _record_fsyncs(monkeypatch)
    options = {"max_shard_size": 1, "copy_files_from": tmp_path / "base"}
    if streamed:
        layout = {name: writing.TensorInfo(t.shape, t.dtype) for name, t in state.items()}
        writer: ShardedWriter = writing.StreamingShardWriter(tmp_path / "out", layout, **options)
    else:
        writer = ShardedWriter(tmp_path / "out", **options)
    with writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        writer.write_text("notes.txt", "hello")
        temporary = str(writer.temporary)
    installed = events.index("rename out")
    before = events[:installed]
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for name in [*shards, "model.safetensors.index.json", "notes.txt"]:
        assert f"{temporary}/{name}" in before, (name, events)
    assert before[-1] == temporary, events  # the folder last, after its files
    if streamed:  # the shard files themselves, before they are renamed to their final names
        first_rename = next(i for i, e in enumerate(events) if e.startswith("rename "))
        flushed = events[:first_rename]
        assert [f"{temporary}/model-0000{i}.safetensors" for i in (1, 2, 3)] == flushed, events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="/proc")
def test_every_shard_map_is_flushed_before_its_file_and_the_rename(tmp_path, monkeypatch):
    events = _record_fsyncs(monkeypatch)

    class Mapped(mmap.mmap):
        def flush(self, *args: object) -> None:
            events.append("flush map")
            super().flush(*args)

    monkeypatch.setattr(writing.mmap, "mmap", Mapped)
    layout = _layout([4, 4])
    with writing.StreamingShardWriter(tmp_path / "out", layout, max_shard_size=16) as writer:
        for name in layout:
            writer.destination(name).copy_(torch.full((4,), 2.0))
    events[:] = [e if e.startswith(("flush ", "rename ")) else Path(e).name for e in events]
    assert events[:4] == [
        "flush map",
        "flush map",
        "model-00001.safetensors",
        "model-00002.safetensors",
    ], events
    assert_same(load(tmp_path / "out"), {name: torch.full((4,), 2.0) for name in layout})


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="/proc")
def test_a_text_file_s_folder_is_flushed_after_the_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def link(source: object, destination: object, **kwargs: object) -> None:
        events.append("named")
        real_link(source, destination, **kwargs)

    monkeypatch.setattr(writing.os, "fsync", fsync)
    monkeypatch.setattr(writing.os, "link", link)
    writing.write_text_atomic(tmp_path / "l.json", "{}\n")
    assert events[-2:] == ["named", str(tmp_path)], events
    assert (tmp_path / "l.json").read_text() == "{}\n"


# --------------------------------------------------------------------------------------------
# Text files, write_text() and files
# --------------------------------------------------------------------------------------------


def test_a_text_file_is_written_by_rename_where_hard_links_are_unsupported(tmp_path, monkeypatch):
    def no_links(source: object, destination: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(writing.os, "link", no_links)
    assert writing.write_text_atomic(tmp_path / "l.json", "new\n") == tmp_path / "l.json"
    assert listing(tmp_path) == ["l.json"]
    assert (tmp_path / "l.json").read_text() == "new\n"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_text_file_over_a_folder_is_refused(tmp_path, overwrite):
    (tmp_path / "l.json").mkdir()
    with pytest.raises(LineageError, match=r"l\.json is a folder; give the path of a file"):
        writing.write_text_atomic(tmp_path / "l.json", "x", overwrite=overwrite, error=LineageError)
    assert listing(tmp_path) == ["l.json"]
    assert listing(tmp_path / "l.json") == []


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_a_dangling_link_at_the_target_is_not_replaced_unasked(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    (tmp_path / "l.json").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"out already exists; pass overwrite=True"):
        ShardedWriter(tmp_path / "out")
    with pytest.raises(LineageError, match=r"l\.json already exists; pass overwrite=True"):
        writing.write_text_atomic(tmp_path / "l.json", "x", error=LineageError)
    assert listing(tmp_path) == ["l.json", "out"]
    assert (tmp_path / "out").is_symlink() and (tmp_path / "l.json").is_symlink()


@pytest.mark.parametrize("name", ["", ".hidden", "sub/x.json", "../x.json", "model.safetensors"])
def test_write_text_takes_plain_non_weight_names_only(tmp_path, name):
    with ShardedWriter(tmp_path / "out") as writer:
        with pytest.raises(CheckpointError, match=rf"a plain file name .*; got {name!r}"):
            writer.write_text(name, "x")
        writer.add("w", torch.ones(1))
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == ["model.safetensors"]


def test_files_lists_copies_and_a_rewritten_copy_once(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("old")
    (tmp_path / "base" / "vocab.txt").write_text("v")
    with ShardedWriter(tmp_path / "out", copy_files_from=tmp_path / "base") as writer:
        writer.add("w", torch.ones(1))
        writer.write_text("config.json", "new")
        writer.write_text("lineage.json", "{}")
    out = tmp_path / "out"
    assert writer.files == [
        out / "model.safetensors",
        out / "config.json",
        out / "vocab.txt",
        out / "lineage.json",
    ]
    assert (out / "config.json").read_text() == "new"


def test_not_copied_names_are_left_for_the_caller_to_write(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("old")
    (tmp_path / "base" / "vocab.txt").write_text("v")
    options = {"copy_files_from": tmp_path / "base", "not_copied": ["config.json"]}
    with ShardedWriter(tmp_path / "out", **options) as writer:
        writer.add("w", torch.ones(1))
    assert writer.copied == ["vocab.txt"]
    assert listing(tmp_path / "out") == ["model.safetensors", "vocab.txt"]


# --------------------------------------------------------------------------------------------
# Inputs: an index stands for its folder; a file may lie above an input
# --------------------------------------------------------------------------------------------


def test_an_output_in_the_folder_of_an_index_input_is_refused(tmp_path):
    save(tensors(2), tmp_path / "in", max_shard_size=1)
    index = tmp_path / "in" / "model.safetensors.index.json"
    with pytest.raises(
        CheckpointError, match=r"the output .*in/merged is inside the input .*index\.json"
    ):
        ShardedWriter(tmp_path / "in" / "merged", inputs=[index])
    with pytest.raises(LineageError, match=r"the lineage file .*in/l\.json is inside the input"):
        writing.check_file_apart(
            tmp_path / "in" / "l.json", [index], what="the lineage file", error=LineageError
        )
    assert "merged" not in listing(tmp_path / "in")


def test_a_file_may_lie_beside_or_above_an_input_but_not_over_or_in_one(tmp_path):
    model = tmp_path / "a" / "model.safetensors"
    for path in (tmp_path / "l.json", tmp_path / "a"):  # apart, and above (a file holds none)
        writing.check_file_apart(path, [model])
    with pytest.raises(CheckpointError, match=r"the file .*model\.safetensors is the input "):
        writing.check_file_apart(model, [model])
    with pytest.raises(CheckpointError, match=r"the file .*a/l\.json is inside the input .*/a; "):
        writing.check_file_apart(tmp_path / "a" / "l.json", [tmp_path / "a"])


# --------------------------------------------------------------------------------------------
# Racing and failing installs, leftovers
# --------------------------------------------------------------------------------------------


def test_a_target_made_after_the_writer_is_refused_on_entering(tmp_path):
    writer = ShardedWriter(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("theirs")
    with pytest.raises(CheckpointError, match=r"out already exists; pass overwrite=True"), writer:
        pytest.fail("the block must not run")
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == ["keep.txt"]


def test_a_target_appearing_during_the_write_is_kept_without_overwrite(tmp_path):
    def write() -> None:
        with ShardedWriter(tmp_path / "out") as writer:
            writer.add("w", torch.ones(2))
            save({"w": torch.zeros(2)}, tmp_path / "out")  # another run, meanwhile

    with pytest.raises(CheckpointError, match="out appeared while it was being written"):
        write()
    assert listing(tmp_path) == ["out"]
    assert_same(load(tmp_path / "out"), {"w": torch.zeros(2)})


def test_a_file_appearing_at_the_target_during_the_rename_is_kept(tmp_path, monkeypatch):
    target = tmp_path / "out"
    real_rename = os.rename

    def racing_rename(source: object, destination: object) -> None:
        if Path(destination) == target:
            target.write_text("the other run's\n")  # between our check and our rename
        real_rename(source, destination)

    monkeypatch.setattr(writing.os, "rename", racing_rename)

    def write() -> None:
        with ShardedWriter(target) as writer:
            writer.add("w", torch.ones(2))

    with pytest.raises(CheckpointError, match="out appeared while it was being written"):
        write()
    assert listing(tmp_path) == ["out"]
    assert target.read_text() == "the other run's\n"


def test_a_failed_rename_into_place_puts_the_old_output_back(tmp_path, monkeypatch):
    save({"old": torch.ones(2)}, tmp_path / "out")
    real_rename = os.rename

    def rename(source: object, destination: object) -> None:
        if ".tmp-" in Path(source).name:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_rename(source, destination)

    monkeypatch.setattr(writing.os, "rename", rename)
    with (
        pytest.raises(
            CheckpointError,
            match=r"cannot rename the finished output into place at .*out \(Invalid cross-device "
            r"link\); nothing was written there",
        ),
        ShardedWriter(tmp_path / "out", overwrite=True) as writer,
    ):
        writer.add("new", torch.zeros(2))
    assert listing(tmp_path) == ["out"]
    assert_same(load(tmp_path / "out"), {"old": torch.ones(2)})


def test_an_output_moved_away_by_another_run_meanwhile_is_simply_replaced(tmp_path, monkeypatch):
    save({"old": torch.ones(2)}, tmp_path / "out")
    real_rename = os.rename

    def rename(source: object, destination: object) -> None:
        if Path(source) == tmp_path / "out" and ".old-" in Path(destination).name:
            real_rename(tmp_path / "out", tmp_path / "theirs")  # another run, just before us
        real_rename(source, destination)

    monkeypatch.setattr(writing.os, "rename", rename)
    save({"new": torch.zeros(2)}, tmp_path / "out", overwrite=True)
    assert listing(tmp_path) == ["out", "theirs"]
    assert_same(load(tmp_path / "out"), {"new": torch.zeros(2)})
    assert_same(load(tmp_path / "theirs"), {"old": torch.ones(2)})


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_overwriting_a_link_to_a_folder_replaces_the_link_not_what_it_points_at(tmp_path):
    save({"theirs": torch.ones(2)}, tmp_path / "elsewhere")
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    save({"new": torch.zeros(2)}, tmp_path / "out", overwrite=True)
    assert listing(tmp_path) == ["elsewhere", "out"]
    assert not (tmp_path / "out").is_symlink()
    assert_same(load(tmp_path / "out"), {"new": torch.zeros(2)})
    assert_same(load(tmp_path / "elsewhere"), {"theirs": torch.ones(2)})


def test_the_output_moved_aside_is_named_for_clean_leftovers(tmp_path, monkeypatch):
    """While an output is replaced, the old one is moved to a name that clean_leftovers puts
    back should the process be killed before the new one is in place."""
    save({"old": torch.ones(2)}, tmp_path / "out")
    aside: list[str] = []
    real_rename = os.rename

    def rename(source: object, destination: object) -> None:
        if Path(source) == tmp_path / "out":
            aside.append(Path(destination).name)
        real_rename(source, destination)

    monkeypatch.setattr(writing.os, "rename", rename)
    save({"new": torch.zeros(2)}, tmp_path / "out", overwrite=True)
    (name,) = aside
    found = writing._LEFTOVER.fullmatch(name)
    assert found is not None, name
    assert (found["name"], found["kind"], found["host"], found["pid"]) == (
        "out",
        "old",
        writing._HOST,
        str(os.getpid()),
    )
    assert listing(tmp_path) == ["out"]


def test_an_output_moved_aside_whose_target_was_installed_is_removed(tmp_path, monkeypatch):
    save({"new": torch.zeros(2)}, tmp_path / "out")
    old = tmp_path / f".out.old-{writing._HOST}-999999-1234abcd"
    save({"old": torch.ones(2)}, old)
    monkeypatch.setattr(writing, "_running", lambda pid: pid != 999999)
    with pytest.warns(UserWarning, match=r"process 999999\) was stopped .*removed its leftover"):
        assert writing.clean_leftovers(tmp_path) == [old]
    assert listing(tmp_path) == ["out"]
    assert_same(load(tmp_path / "out"), {"new": torch.zeros(2)})


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_a_link_named_like_a_leftover_is_left_alone(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    link = tmp_path / f".out.tmp-{writing._HOST}-999999-abc123"
    link.symlink_to(tmp_path / "data")
    monkeypatch.setattr(writing, "_running", lambda pid: pid != 999999)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert writing.clean_leftovers(tmp_path) == []
    assert link.is_symlink() and (tmp_path / "data").is_dir()


def test_a_process_that_cannot_be_signalled_counts_as_running(monkeypatch):
    def kill(pid: int, signum: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(writing.os, "kill", kill)
    assert writing._running(os.getpid() + 1)
