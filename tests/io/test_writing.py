"""Atomic sharded writing and save(): round trips, shard layout, ties, atomicity, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import terge.io.writing as writing
from terge.errors import (
    CheckpointError,
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
