"""Distributed checkpoints (torch.distributed.checkpoint) read and written without a process group:
which entry is the model, chunks stitched, laziness, hostile metadata, and the writer.

Checkpoints here are written in this one process (``dcp.save(..., no_dist=True)``, or chunk by
chunk by hand where several ranks' chunks are needed); tests/e2e/test_distributed_checkpoints.py
writes and loads them with FSDP2 on 2 gloo processes.
"""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import re
import subprocess
import sys
import warnings

import pytest
import torch

import terge
from terge.errors import CheckpointError, MergeArgumentError
from terge.io import TensorInfo, open_checkpoint, save
from terge.io.distributed import (
    DistributedCheckpoint,
    DistributedCheckpointWriter,
    is_distributed_checkpoint,
    model_entries,
)

dcp = pytest.importorskip("torch.distributed.checkpoint", reason="needs torch.distributed")
from torch.distributed.checkpoint import metadata as md  # noqa: E402
from torch.distributed.checkpoint.filesystem import _StorageInfo  # noqa: E402


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(11, 4, generator=generator),
        "layers.0.weight": torch.randn(4, 4, generator=generator).to(torch.bfloat16),
        "layers.0.bias": torch.randn(4, generator=generator),
        "head.weight": torch.randn(11, 4, generator=generator),
    }


def optimizer_state(model: dict[str, torch.Tensor]) -> dict:
    """An AdamW state_dict over ``model``'s tensors (integer keys, as optimizer.state_dict())."""
    parameters = [torch.nn.Parameter(t.float().clone()) for t in model.values()]
    optimizer = torch.optim.AdamW(parameters)
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    return optimizer.state_dict()


def dcp_save(state: dict, folder) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is unavailable ... single process"
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)


def dcp_load(state: dict, folder) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)


def chunked(folder, tensor: torch.Tensor, pieces, key: str = "w", saved=torch.clone) -> None:
    """A checkpoint of one tensor saved as ``pieces`` (offsets, sizes), as ranks would save it:
    each piece a torch.save record (of ``saved(piece)``) in the file of the rank that holds it."""
    folder.mkdir()
    storage, chunks = {}, []
    files: dict[str, io.BytesIO] = {}
    for rank, (offsets, sizes) in enumerate(pieces):
        region = tuple(slice(o, o + s) for o, s in zip(offsets, sizes))
        name = f"__{rank % 2}_0.distcp"
        stream = files.setdefault(name, io.BytesIO())
        begin = stream.tell()
        torch.save(saved(tensor[region]), stream)
        offsets = torch.Size(offsets)
        storage[md.MetadataIndex(key, offsets)] = _StorageInfo(name, begin, stream.tell() - begin)
        chunks.append(md.ChunkStorageMetadata(offsets=offsets, sizes=torch.Size(sizes)))
    for name, stream in files.items():
        (folder / name).write_bytes(stream.getvalue())
    properties = md.TensorProperties(dtype=tensor.dtype)
    metadata = md.Metadata(
        state_dict_metadata={key: md.TensorStorageMetadata(properties, tensor.shape, chunks)},
        storage_data=storage,
    )
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))


def tamper(folder, change) -> None:
    """Rewrite the folder's metadata with ``change(metadata)`` applied."""
    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata))


def storage_of(metadata, key: str):
    return next(index for index in metadata.storage_data if index.fqn == key)


# --------------------------------------------------------------------------------------------
# Which entry is the model
# --------------------------------------------------------------------------------------------


def test_the_fsdp2_tutorial_layout_gives_the_model_entry(tmp_path):
    model = model_state()
    dcp_save({"model": model, "optimizer": optimizer_state(model), "step": 3}, tmp_path / "c")
    assert is_distributed_checkpoint(tmp_path / "c")
    with open_checkpoint(tmp_path / "c") as reader:
        assert reader.entry == "model"
        assert reader.names() == list(model)
        for name, tensor in model.items():
            assert reader.info(name) == TensorInfo(tensor.shape, tensor.dtype)
            assert torch.equal(reader.get(name), tensor)


def test_torchtitans_layout_gives_the_top_level(tmp_path):
    """torchtitan saves the model's tensors at the top level beside the training state."""
    model = model_state()
    state = {
        **model,
        "optimizer": {
            "state": {"embed.weight": {"exp_avg": torch.ones(11, 4)}},
            "param_groups": [{"lr": 0.1}],
        },
        "lr_scheduler": {"last_epoch": 3},
        "dataloader": {"dp_rank_0": b"\x00"},
        "train_state": {"step": 3},
    }
    dcp_save(state, tmp_path / "c")
    with open_checkpoint(tmp_path / "c") as reader:
        assert (reader.entry, reader.names()) == ("", list(model))


def test_a_nested_app_state_gives_its_model_entry(tmp_path):
    """The DCP recipe's ``{"app": AppState}`` whose state_dict is {"model": ..., "optim": ...}."""
    model = model_state()
    dcp_save({"app": {"model": model, "optim": optimizer_state(model)}}, tmp_path / "c")
    with open_checkpoint(tmp_path / "c") as reader:
        assert (reader.entry, reader.names()) == ("app.model", list(model))


def test_a_flat_model_with_a_model_submodule_keeps_its_names(tmp_path):
    """A Hugging Face model's own ``model.`` prefix is no entry: lm_head sits beside it."""
    state = {"model.layers.0.weight": torch.ones(2, 2), "lm_head.weight": torch.ones(3, 2)}
    dcp_save(state, tmp_path / "c")
    with open_checkpoint(tmp_path / "c") as reader:
        assert (reader.entry, reader.names()) == ("", list(state))


def test_a_step_counter_beside_the_model_is_no_candidate(tmp_path):
    dcp_save({"model": model_state(), "step": torch.tensor(7)}, tmp_path / "c")
    assert open_checkpoint(tmp_path / "c").entry == "model"


def test_two_models_are_an_error_listing_both_and_entry_chooses(tmp_path):
    model, ema = model_state(0), model_state(1)
    dcp_save({"model": model, "ema": ema, "optimizer": optimizer_state(model)}, tmp_path / "c")
    message = (
        f"{tmp_path / 'c'} is a distributed checkpoint with several candidates for the model "
        "('model' (4 tensors), 'ema' (4 tensors)); choose the entry that holds the model with "
        f"terge.checkpoint('{tmp_path / 'c'}', entry='...') or the path '{tmp_path / 'c'}::entry=...'"
    )
    with pytest.raises(CheckpointError, match=re.escape(message)):
        open_checkpoint(tmp_path / "c")
    with open_checkpoint(tmp_path / "c", entry="ema") as reader:
        assert torch.equal(reader.get("head.weight"), ema["head.weight"])


def test_no_model_or_a_missing_entry_lists_what_there_is(tmp_path):
    dcp_save({"optimizer": optimizer_state(model_state()), "step": 3}, tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"no model tensors \('optimizer', 'step'\)"):
        open_checkpoint(tmp_path / "c")
    dcp_save({"model": model_state()}, tmp_path / "d")
    with pytest.raises(
        CheckpointError, match=r"no model tensors under the entry 'modle'; its cand"
    ):
        open_checkpoint(tmp_path / "d", entry="modle")


def test_prefix_keeps_and_strips(tmp_path):
    dcp_save({"state_dict": {"model.a": torch.ones(2), "model.b": torch.zeros(2)}}, tmp_path / "c")
    with open_checkpoint(tmp_path / "c", prefix="model.") as reader:
        assert (reader.entry, reader.names()) == ("state_dict", ["a", "b"])
    with pytest.raises(CheckpointError, match=r"starts with the prefix 'net\.'"):
        open_checkpoint(tmp_path / "c", prefix="net.")


def test_entry_is_refused_for_other_checkpoints(tmp_path):
    """entry= chooses inside a distributed checkpoint or one torch file, not a safetensors folder."""
    save({"w": torch.ones(2)}, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="choose the state dict inside one torch file"):
        open_checkpoint(tmp_path / "plain", entry="model")


def test_the_metadata_file_itself_names_its_folder(tmp_path):
    dcp_save({"model": model_state()}, tmp_path / "c")
    with open_checkpoint(tmp_path / "c" / ".metadata") as reader:
        assert reader.names() == list(model_state())


def test_model_entries_lists_the_candidates(tmp_path):
    dcp_save({"model": model_state(), "ema": model_state(1), "step": 3}, tmp_path / "c")
    metadata = pickle.loads((tmp_path / "c" / ".metadata").read_bytes())
    entries = model_entries(metadata)
    assert {entry: len(keys) for entry, keys in entries.items()} == {"model": 4, "ema": 4}


# --------------------------------------------------------------------------------------------
# Chunks, laziness, merging
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pieces",
    [
        [((0, 0), (6, 3)), ((0, 3), (6, 3)), ((6, 0), (5, 6)), ((11, 0), (0, 6))],
        [((6, 0), (5, 6)), ((0, 0), (6, 6)), ((11, 0), (0, 6))],  # FSDP's, in any order
    ],
)
def test_chunks_of_several_ranks_are_stitched(tmp_path, pieces):
    tensor = torch.arange(11 * 6, dtype=torch.float32).view(11, 6)
    chunked(tmp_path / "c", tensor, pieces)
    with open_checkpoint(tmp_path / "c") as reader:
        assert torch.equal(reader.get("w"), tensor)
        assert reader._opened[0].chunk_reads == len(pieces) - 1  # the empty chunk is not read


@pytest.mark.parametrize(
    "saved",
    [
        lambda piece: piece.t().contiguous().t(),  # strides kept by torch.save
        lambda piece: piece.flatten().repeat(2)[: piece.numel()].view(piece.shape),  # a view
        lambda piece: piece.to(torch.bfloat16),  # not what the metadata says: refused
    ],
    ids=["transposed", "view", "other dtype"],
)
def test_records_that_are_not_plain_are_loaded_by_torch(tmp_path, saved):
    tensor = torch.arange(11 * 6, dtype=torch.float32).view(11, 6)
    chunked(tmp_path / "c", tensor, [((0, 0), (6, 6)), ((6, 0), (5, 6))], saved=saved)
    with open_checkpoint(tmp_path / "c") as reader:
        if saved(tensor).dtype != tensor.dtype:
            with pytest.raises(CheckpointError, match=r"holds a torch.bfloat16 tensor of shape"):
                reader.get("w")
        else:
            assert torch.equal(reader.get("w"), tensor)


def test_opening_reads_no_chunk_and_get_reads_only_its_own(tmp_path):
    model = model_state()
    dcp_save({"model": model, "optimizer": optimizer_state(model)}, tmp_path / "c")
    checkpoint = DistributedCheckpoint(tmp_path / "c")
    assert checkpoint.chunk_reads == 0
    assert torch.equal(checkpoint.get("head.weight"), model["head.weight"])
    checkpoint.get("head.weight")  # the last tensor is kept: asking again reads nothing
    assert checkpoint.chunk_reads == 1
    checkpoint.close()
    with pytest.raises(CheckpointError, match="is closed"):
        checkpoint.get("head.weight")


def test_merging_checkpoints_equals_merging_their_state_dicts(tmp_path):
    models = [model_state(i) for i in range(3)]
    for i, model in enumerate(models):
        dcp_save(
            {"model": model, "optimizer": optimizer_state(model), "step": i}, tmp_path / f"{i}"
        )
    paths = [tmp_path / f"{i}" for i in range(3)]
    for method in ("arithmetic", "ties"):
        merged = terge.merge(paths, method=method, seed=0)
        expected = terge.merge(models, method=method, seed=0)
        assert merged.keys() == expected.keys()
        for name in expected:
            assert torch.equal(merged[name], expected[name]), (method, name)


# --------------------------------------------------------------------------------------------
# Hostile and damaged folders
# --------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model = model_state()
    dcp_save({"model": model}, tmp_path / "c")
    return tmp_path / "c", model


def test_a_chunk_outside_the_folder_is_refused(saved, tmp_path):
    folder, _ = saved
    (tmp_path / "outside.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    for name in ("../outside.distcp", str(tmp_path / "outside.distcp"), "sub/__0_0.distcp"):

        def change(metadata, name=name):
            storage_of(metadata, "model.head.weight")
            for index, info in metadata.storage_data.items():
                if index.fqn == "model.head.weight":
                    info.relative_path = name

        tamper(folder, change)
        with pytest.raises(CheckpointError, match="which is not a file inside the checkpoint"):
            open_checkpoint(folder)


def test_a_link_out_of_the_folder_is_refused(saved, tmp_path):
    folder, _ = saved
    (tmp_path / "elsewhere.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    (folder / "__0_0.distcp").unlink()
    os.symlink(tmp_path / "elsewhere.distcp", folder / "__0_0.distcp")
    with pytest.raises(CheckpointError, match=r"resolves to .*outside the checkpoint folder"):
        open_checkpoint(folder)


def test_a_missing_rank_file_is_named(saved):
    folder, _ = saved
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"in __0_0.distcp, which does not exist"):
        open_checkpoint(folder)


def test_a_chunk_past_the_end_of_its_file_is_refused_on_opening(saved):
    folder, _ = saved
    size = (folder / "__0_0.distcp").stat().st_size

    def change(metadata):
        metadata.storage_data[storage_of(metadata, "model.head.weight")].length = size

    tamper(folder, change)
    with pytest.raises(CheckpointError, match=f"which holds only {size} bytes"):
        open_checkpoint(folder)


def test_a_wrong_offset_is_an_error_naming_the_chunk(saved):
    folder, _ = saved

    def change(metadata):
        where = metadata.storage_data[storage_of(metadata, "model.head.weight")]
        where.offset, where.length = where.offset + 1, where.length - 1

    tamper(folder, change)
    with open_checkpoint(folder) as reader:  # the metadata is plausible: found when read
        assert torch.equal(reader.get("embed.weight"), model_state()["embed.weight"])
        with pytest.raises(
            CheckpointError,
            match=r"chunk \(0, 0\) of tensor 'model.head.weight' \(bytes \d+-\d+ of "
            r"__0_0.distcp\) is not a tensor torch.load can read",
        ):
            reader.get("head.weight")


def test_a_record_of_another_tensor_is_an_error(saved):
    folder, _ = saved

    def change(metadata):  # head.weight's bytes are the bf16 layers.0.weight's record
        bias = metadata.storage_data[storage_of(metadata, "model.layers.0.weight")]
        head = metadata.storage_data[storage_of(metadata, "model.head.weight")]
        head.offset, head.length = bias.offset, bias.length

    tamper(folder, change)
    with pytest.raises(
        CheckpointError,
        match=r"holds a torch.bfloat16 tensor of shape \[4, 4\], but the metadata says "
        r"torch.float32 of shape \[11, 4\]",
    ):
        open_checkpoint(folder).get("head.weight")


@pytest.mark.parametrize(
    ("pieces", "problem"),
    [
        ([((0, 0), (6, 6)), ((6, 0), (7, 6))], "outside its shape"),
        ([((0, 0), (6, 6)), ((5, 0), (6, 6))], "overlap or leave part of the tensor out"),
        ([((0, 0), (6, 6))], "overlap or leave part of the tensor out"),
        (  # split along both dimensions: checked pair by pair
            [((0, 0), (6, 4)), ((0, 2), (6, 2)), ((6, 0), (6, 6))],
            "overlap or leave part of the tensor out",
        ),
    ],
)
def test_chunks_that_do_not_tile_the_tensor_are_refused(tmp_path, pieces, problem):
    chunked(tmp_path / "c", torch.zeros(13, 6), pieces)
    tamper(
        tmp_path / "c", lambda m: setattr(m.state_dict_metadata["w"], "size", torch.Size([12, 6]))
    )
    with pytest.raises(CheckpointError, match=re.escape(problem)):
        open_checkpoint(tmp_path / "c")


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_metadata_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(
        CheckpointError,
        match=r"metadata cannot be read \(it names posix.system, which is not one of torch's",
    ):
        open_checkpoint(tmp_path / "c")
    assert not (tmp_path / "pwned").exists()


def test_a_chunk_record_that_would_run_code_is_refused(tmp_path, monkeypatch):
    """A chunk's record is loaded with weights_only=True: a record that pickles a call is
    refused, and the call never runs."""
    monkeypatch.chdir(tmp_path)
    tensor = torch.arange(11 * 6, dtype=torch.float32).view(11, 6)
    chunked(tmp_path / "c", tensor, [((0, 0), (6, 6)), ((6, 0), (5, 6))], saved=lambda _: _Boom())
    refused = pytest.raises(CheckpointError, match=r"is not a tensor torch.load can read")
    with open_checkpoint(tmp_path / "c") as reader, refused:  # opening reads no record
        reader.get("w")
    assert not (tmp_path / "pwned").exists()


def test_a_metadata_link_out_of_the_folder_is_refused(saved, tmp_path):
    """The .metadata file itself must lie inside the folder: a link to one elsewhere (which
    could name any data) is refused before it is read."""
    folder, _ = saved
    (tmp_path / "elsewhere.metadata").write_bytes((folder / ".metadata").read_bytes())
    (folder / ".metadata").unlink()
    os.symlink(tmp_path / "elsewhere.metadata", folder / ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata is a link to .*outside the checkpoint"):
        open_checkpoint(folder)


def test_a_metadata_of_another_type_or_damaged_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(
        CheckpointError, match=r"holds a dict, not torch\.distributed\.checkpoint's"
    ):
        open_checkpoint(tmp_path / "c")
    (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps(md.Metadata({3: None})))
    with pytest.raises(CheckpointError, match=r"not torch\.distributed\.checkpoint's Metadata nam"):
        open_checkpoint(tmp_path / "c")
    (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps(md.Metadata({}))[:-9])
    with pytest.raises(CheckpointError, match="metadata cannot be read"):
        open_checkpoint(tmp_path / "c")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def test_the_writer_writes_what_dcp_save_writes(tmp_path):
    """Byte for byte: the same data file, and the same metadata but for the save's own id."""
    state = model_state()
    dcp_save({"model": state}, tmp_path / "dcp")
    layout = {name: TensorInfo(t.shape, t.dtype) for name, t in state.items()}
    with DistributedCheckpointWriter(tmp_path / "ours", layout, entry="model") as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    theirs, ours = (tmp_path / "dcp", tmp_path / "ours")
    assert (ours / "__0_0.distcp").read_bytes() == (theirs / "__0_0.distcp").read_bytes()
    a, b = (pickle.loads((folder / ".metadata").read_bytes()) for folder in (theirs, ours))
    assert a.state_dict_metadata == b.state_dict_metadata
    assert (a.planner_data, a.storage_data, a.version) == (
        b.planner_data,
        b.storage_data,
        b.version,
    )


def test_out_format_dcp_keeps_the_bases_entry_and_loads_back(tmp_path):
    models = [model_state(i) for i in range(3)]
    for i, model in enumerate(models):
        dcp_save({"model": model, "optimizer": optimizer_state(model)}, tmp_path / f"{i}")
    paths = [tmp_path / f"{i}" for i in range(3)]
    out, lineage = terge.merge(
        paths, out=tmp_path / "soup", out_format="dcp", lineage=True, digests=True
    )
    assert sorted(p.name for p in out.iterdir()) == [
        ".metadata",
        "README.md",
        "__0_0.distcp",
        "lineage.json",
    ]
    assert terge.load_lineage(out) == lineage
    expected = terge.merge(models)
    loaded = {"model": {name: torch.empty_like(t) for name, t in expected.items()}}
    dcp_load(loaded, out)
    for name, tensor in expected.items():
        assert torch.equal(loaded["model"][name], tensor), name
    assert open_checkpoint(out).entry == "model"


def test_out_format_dcp_from_memory_is_keyed_by_name_tied_names_included(tmp_path):
    from helpers import Tied

    torch.manual_seed(0)
    models = [Tied(), Tied()]
    out = terge.merge(models, out=tmp_path / "soup", out_format="dcp", out_dtype="bfloat16")
    fresh = Tied().to(torch.bfloat16)
    state = fresh.state_dict()
    dcp_load(state, out)  # every key, the tied head's too, is in the checkpoint
    expected = terge.merge(models)
    assert torch.equal(fresh.head.weight, expected.embed.weight.to(torch.bfloat16))
    assert fresh.head.weight.data_ptr() == fresh.embed.weight.data_ptr()
    metadata = pickle.loads((out / ".metadata").read_bytes())
    records = {k.fqn: v for k, v in metadata.storage_data.items()}
    assert records["head.weight"] == records["embed.weight"]  # stored once


def test_max_shard_size_splits_the_data_files(tmp_path):
    state = {f"w{i}": torch.randn(64, 64) for i in range(4)}  # 16 KiB each
    out = terge.merge(
        [state, state], out=tmp_path / "soup", out_format="dcp", max_shard_size="20KB"
    )
    assert sorted(p.name for p in out.glob("*.distcp")) == [f"__0_{i}.distcp" for i in range(4)]
    loaded = {name: torch.empty(64, 64) for name in state}
    dcp_load(loaded, out)
    assert all(torch.equal(loaded[name], state[name]) for name in state)


def test_a_failed_write_leaves_nothing(tmp_path):
    state = {f"w{i}": torch.randn(4) for i in range(3)}

    def failing(tensors, weights, base):
        raise RuntimeError("no")

    with pytest.raises(terge.MethodError):
        terge.merge(
            [state, state],
            method={"w2": failing, re.compile(".*"): "arithmetic"},
            out=tmp_path / "soup",
            out_format="dcp",
        )
    assert list(tmp_path.iterdir()) == []


def test_out_format_is_checked_before_anything(tmp_path):
    state = {"w": torch.ones(2)}
    with pytest.raises(
        MergeArgumentError, match=r"`out_format` must be one of 'safetensors', 'dcp'"
    ):
        terge.merge([state, state], out=tmp_path / "o", out_format="torch")
    with pytest.raises(MergeArgumentError, match="`out_format` says how `out` is written"):
        terge.merge([state, state], out_format="dcp")
    (tmp_path / "o").mkdir()
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        terge.merge([state, state], out=tmp_path / "o", out_format="dcp", dry_run=True)
    out = terge.merge([state, state], out=tmp_path / "o", out_format="dcp", overwrite=True)
    assert is_distributed_checkpoint(out)


def test_an_output_inside_an_input_checkpoint_is_refused(saved):
    folder, model = saved
    with pytest.raises(CheckpointError, match="is inside the input"):
        terge.merge([folder, model], out=folder / "soup", out_format="dcp")


def test_the_writer_refuses_what_its_layout_does_not_say(tmp_path):
    layout = {"w": TensorInfo(torch.Size([2]), torch.float32)}
    never = pytest.raises(CheckpointError, match="1 tensors of the layout were never written")
    with never, DistributedCheckpointWriter(tmp_path / "a", layout):
        pass
    wrong = pytest.raises(CheckpointError, match=r"is torch.float64 of shape \[2\], but the layout")
    with wrong, DistributedCheckpointWriter(tmp_path / "b", layout) as writer:
        writer.add("w", torch.ones(2, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="without a leading or trailing dot"):
        DistributedCheckpointWriter(tmp_path / "c", layout, entry="model.")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Found by mutation testing: what each check of the reader is for
# --------------------------------------------------------------------------------------------


def test_only_a_folder_with_a_metadata_file_or_that_file_is_a_distributed_checkpoint(tmp_path):
    (tmp_path / "c").mkdir()
    assert not is_distributed_checkpoint(tmp_path / "c")
    assert not is_distributed_checkpoint(tmp_path / "c" / ".metadata")  # missing
    (tmp_path / "c" / ".metadata").mkdir()
    assert not is_distributed_checkpoint(tmp_path / "c" / ".metadata")  # a folder
    assert not is_distributed_checkpoint(tmp_path / "c")


def test_a_metadata_pickle_naming_a_torch_function_is_refused(tmp_path, monkeypatch):
    """Only torch's dtypes and layouts are taken from the ``torch`` module: a pickle naming
    ``torch.save`` (which would write a file) is refused, and the call never runs."""

    class Save:
        def __reduce__(self):
            return (torch.save, ([1], "pwned"))

    monkeypatch.setattr(torch.save, "__module__", "torch")  # pickled as torch.save
    data = pickle.dumps(Save())
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".metadata").write_bytes(data)
    with pytest.raises(
        CheckpointError,
        match=r"metadata cannot be read \(it names torch\.save, which is not one of torch's",
    ):
        open_checkpoint(tmp_path / "c")
    assert not (tmp_path / "pwned").exists()


def test_a_metadata_that_is_not_a_plain_file_or_too_large_is_refused_unread(tmp_path):
    (tmp_path / "c" / ".metadata").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"\.metadata is not a plausible DCP metadata file"):
        DistributedCheckpoint(tmp_path / "c")
    (tmp_path / "c" / ".metadata").rmdir()
    with open(tmp_path / "c" / ".metadata", "wb") as file:  # sparse: no disk space taken
        file.truncate(2**31)  # the limit itself is read (and is no pickle)
    with pytest.raises(CheckpointError, match=r"metadata cannot be read \(invalid load key"):
        open_checkpoint(tmp_path / "c")
    with open(tmp_path / "c" / ".metadata", "wb") as file:
        file.truncate(2**31 + 1)
    with pytest.raises(CheckpointError, match=r"\.metadata is not a plausible DCP metadata file"):
        open_checkpoint(tmp_path / "c")


def test_an_empty_or_mistyped_metadata_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"metadata cannot be read \(Ran out of input\)"):
        open_checkpoint(tmp_path / "c")
    weight = md.TensorStorageMetadata(md.TensorProperties(), torch.Size([2]), [])
    fieldless = md.Metadata({})
    del fieldless.state_dict_metadata  # as a crafted pickle may leave it
    for metadata in (md.Metadata(None), md.Metadata({"": weight}), fieldless):
        (tmp_path / "c" / ".metadata").write_bytes(pickle.dumps(metadata))
        with pytest.raises(
            CheckpointError, match=r"holds a Metadata, not torch\.distributed\.checkpoint's Meta"
        ):
            open_checkpoint(tmp_path / "c")


def test_a_planner_data_that_contradicts_its_keys_is_ignored(saved):
    """Each key's path comes from ``planner_data`` only where the path spells the key: one that
    says the model's tensors are an optimizer's cannot hide them."""
    folder, model = saved

    def change(metadata):
        metadata.planner_data = {key: ("optimizer", key) for key in metadata.planner_data}

    tamper(folder, change)
    with open_checkpoint(folder) as reader:
        assert (reader.entry, reader.names()) == ("", [f"model.{name}" for name in model])


def test_training_state_is_told_apart_without_planner_data(tmp_path):
    """Without ``planner_data`` (or where it is no help) the keys' dotted parts say where an
    optimizer (a parent of ``param_groups``) and known training state lie; a module named
    ``state`` is no optimizer's."""
    weight = md.TensorStorageMetadata(md.TensorProperties(dtype=torch.float32), torch.Size([2]), [])
    metadata = md.Metadata(
        {
            "net.w": weight,
            "state.weight": weight,
            "opt.state.0.exp_avg": weight,
            "opt.param_groups.0.lr": md.BytesStorageMetadata(),
            "scaler.scale": weight,
        },
        planner_data=None,
    )
    assert model_entries(metadata) == {"": ["net.w", "state.weight"]}


@pytest.mark.parametrize("name", ["opt", "optimizer"])
def test_an_optimizer_under_any_name_is_training_state(tmp_path, name):
    """An optimizer is found by its ``param_groups``, whatever it is saved as; its tensors
    (a tensor learning rate in ``param_groups`` too) are never the model's."""
    model = model_state()
    optimizer = optimizer_state(model)
    optimizer["param_groups"][0]["lr"] = torch.tensor(0.1)
    dcp_save({"model": model, name: optimizer}, tmp_path / "c")
    with open_checkpoint(tmp_path / "c") as reader:
        assert (reader.entry, reader.names()) == ("model", list(model))
    dcp_save({**model, name: optimizer}, tmp_path / "top")
    with open_checkpoint(tmp_path / "top") as reader:
        assert (reader.entry, reader.names()) == ("", list(model))


def test_a_models_own_state_submodule_is_kept(tmp_path):
    """A module named ``state`` is no optimizer's state: only a parent of ``param_groups`` is
    an optimizer."""
    model = {"state.weight": torch.ones(2, 2), "head.weight": torch.zeros(3, 2)}
    dcp_save({"model": model}, tmp_path / "c")
    with open_checkpoint(tmp_path / "c") as reader:
        assert (reader.entry, reader.names()) == ("model", list(model))


def test_a_model_is_a_group_with_a_floating_tensor_of_rank_one_or_more(tmp_path):
    """Integer buffers and non-tensor values beside the weights stay in (buffers) or out
    (non-tensors) of the model; a float scalar or an integer vector alone is no model."""
    model = {**model_state(), "norm.num_batches_tracked": torch.tensor(3), "epoch": 3}
    state = {"model": model, "loss_scale": torch.tensor(0.5), "positions": torch.arange(4)}
    dcp_save(state, tmp_path / "c")
    metadata = pickle.loads((tmp_path / "c" / ".metadata").read_bytes())
    tensors = [name for name in model if name != "epoch"]
    assert model_entries(metadata) == {"model": [f"model.{name}" for name in tensors]}
    with open_checkpoint(tmp_path / "c") as reader:
        assert (reader.entry, reader.names()) == ("model", tensors)


def test_an_entry_is_a_whole_dotted_part_and_a_str(tmp_path):
    model, ema = model_state(0), model_state(1)
    dcp_save({"model": model, "model_ema": ema}, tmp_path / "c")
    with open_checkpoint(tmp_path / "c", entry="model") as reader:
        assert reader.names() == list(model)
        assert torch.equal(reader.get("head.weight"), model["head.weight"])
    with pytest.raises(CheckpointError, match=r"entry must be a str or None; got 3\."):
        DistributedCheckpoint(tmp_path / "c", entry=3)


def test_the_top_level_listing_stops_at_twelve_names(tmp_path):
    dcp_save({f"n{i:02}": i for i in range(13)}, tmp_path / "c")
    listing = ", ".join(f"'n{i:02}'" for i in range(12))
    with pytest.raises(CheckpointError, match=re.escape(f"no model tensors ({listing}, ...)")):
        open_checkpoint(tmp_path / "c")


def _chunk_of(metadata, key: str = "model.head.weight"):
    return metadata.state_dict_metadata[key].chunks[0]


def _where(metadata, key: str = "model.head.weight"):
    return metadata.storage_data[storage_of(metadata, key)]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda m: setattr(m.state_dict_metadata["model.head.weight"].properties, "dtype", "f4"),
            "gives the dtype 'f4'",
        ),
        (
            lambda m: setattr(m.state_dict_metadata["model.head.weight"], "size", [11, -4]),
            "gives the shape [11, -4]",
        ),
        (
            lambda m: setattr(m.state_dict_metadata["model.head.weight"], "chunks", []),
            "lists no chunks",
        ),
        (
            lambda m: setattr(
                m.state_dict_metadata["model.head.weight"],
                "chunks",
                [md.ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([11]))],
            ),
            "has chunk 0 at torch.Size([0]) of size torch.Size([11]), outside its shape",
        ),
        (
            lambda m: setattr(_chunk_of(m), "offsets", (False, False)),
            "has chunk 0 at (False, False) of size torch.Size([11, 4]), outside its shape",
        ),
        (
            lambda m: m.storage_data.pop(storage_of(m, "model.head.weight")),
            "has chunk 0 stored nowhere (its storage entry is None)",
        ),
        (
            lambda m: setattr(_where(m), "relative_path", None),
            "has chunk 0 stored nowhere (its storage entry is a _StorageInfo without all its fields)",
        ),
        (lambda m: setattr(_where(m), "length", -1), "has chunk 0 stored nowhere"),
        (lambda m: setattr(_where(m), "offset", -1), "has chunk 0 stored nowhere"),
        (
            lambda m: setattr(_where(m), "transform_descriptors", [3]),
            "has chunk 0 with transforms [3]",
        ),
    ],
    ids=[
        "dtype",
        "shape",
        "no chunks",
        "chunk of another rank",
        "bool offsets",
        "no storage",
        "no file",
        "negative length",
        "negative offset",
        "transforms",
    ],
)
def test_a_damaged_tensor_metadata_is_refused_on_opening_naming_the_field(saved, change, problem):
    folder, _ = saved
    tamper(folder, change)
    message = f"{folder}: the metadata of tensor 'model.head.weight' {problem}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        open_checkpoint(folder)


def test_a_chunk_one_byte_past_the_end_of_its_file_is_refused(saved):
    folder, _ = saved
    size = (folder / "__0_0.distcp").stat().st_size
    begin = _where(pickle.loads((folder / ".metadata").read_bytes())).offset

    def change(metadata):
        _where(metadata).length = size - begin + 1

    tamper(folder, change)
    with pytest.raises(
        CheckpointError,
        match=re.escape(f"puts chunk 0 at bytes {begin}-{size + 1} of __0_0.distcp, which holds "),
    ):
        open_checkpoint(folder)


def test_the_files_read_are_the_metadata_and_every_data_file_named(tmp_path):
    """What the lineage's digests hash: every rank's data file the model's chunks lie in."""
    tensor = torch.arange(11 * 6, dtype=torch.float32).view(11, 6)
    chunked(tmp_path / "c", tensor, [((0, 0), (6, 6)), ((6, 0), (5, 6))])
    checkpoint = DistributedCheckpoint(tmp_path / "c")
    folder = tmp_path / "c"
    assert checkpoint.files == [
        folder / ".metadata",
        folder / "__0_0.distcp",
        folder / "__1_0.distcp",
    ]


def test_hundreds_of_chunks_split_both_ways_are_checked_block_by_block(tmp_path):
    """More than one block of 256 chunks, split along both dimensions: each chunk meets itself
    in its own block only, and an overlap in the last block is found."""
    tensor = torch.arange(17 * 17, dtype=torch.float32).view(17, 17)
    pieces = [((i, j), (1, 1)) for i in range(17) for j in range(17)]  # 289 chunks
    chunked(tmp_path / "c", tensor, pieces)
    with open_checkpoint(tmp_path / "c") as reader:
        assert reader.info("w") == TensorInfo(torch.Size([17, 17]), torch.float32)
    removed = {(14, 16), (15, 15), (15, 16), (16, 16)}
    overlapping = [piece for piece in pieces if piece[0] not in removed]
    overlapping += [((15, 15), (1, 2)), ((14, 16), (2, 1))]  # both on (15, 16), none on (16, 16)
    chunked(tmp_path / "d", tensor, overlapping)
    with pytest.raises(CheckpointError, match="has chunks that overlap or leave part of the"):
        open_checkpoint(tmp_path / "d")


@pytest.mark.parametrize("name", ["..", "..\\outside.distcp", "", "."])
def test_a_data_file_name_that_is_not_a_file_of_the_folder_is_refused(saved, tmp_path, name):
    folder, _ = saved
    (tmp_path / "outside.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
    tamper(folder, lambda metadata: setattr(_where(metadata), "relative_path", name))
    message = f"stores tensor 'model.head.weight' in {name!r}, which is not a file inside the"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        open_checkpoint(folder)


def test_a_data_file_that_is_a_folder_is_refused(saved):
    folder, _ = saved
    (folder / "__1_0.distcp").mkdir()
    tamper(folder, lambda metadata: setattr(_where(metadata), "relative_path", "__1_0.distcp"))
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp is not a regular file; the check"):
        open_checkpoint(folder)


def test_a_link_to_a_data_file_inside_the_folder_is_read(saved):
    """Links are followed: one that stays inside the folder is read as its file."""
    folder, model = saved
    os.symlink("__0_0.distcp", folder / "__1_0.distcp")
    tamper(folder, lambda metadata: setattr(_where(metadata), "relative_path", "__1_0.distcp"))
    with open_checkpoint(folder) as reader:
        assert torch.equal(reader.get("head.weight"), model["head.weight"])


@pytest.mark.parametrize(
    "saved", [lambda piece: piece[:1], lambda piece: piece.t().contiguous()], ids=["rows", "t"]
)
def test_a_record_of_another_shape_is_an_error(tmp_path, saved):
    """A record's shape must be the chunk's, not merely hold as many bytes or fewer: it is
    never read past or copied by broadcasting."""
    tensor = torch.arange(12 * 4, dtype=torch.float32).view(12, 4)
    chunked(tmp_path / "c", tensor, [((0, 0), (6, 4)), ((6, 0), (6, 4))], saved=saved)
    shape = list(saved(tensor[:6]).shape)
    message = f"holds a torch.float32 tensor of shape {shape}, but the metadata says torch.float32"
    refused = pytest.raises(CheckpointError, match=re.escape(f"{message} of shape [6, 4]"))
    with open_checkpoint(tmp_path / "c") as reader, refused:
        reader.get("w")


BIG_ENDIAN_DTYPES = [torch.float32, torch.bfloat16, torch.int16, torch.uint8]


def test_a_record_saved_on_a_big_endian_machine_is_read_by_torch(tmp_path, monkeypatch):
    """Its bytes are swapped: torch.load swaps them back on the CPU. Neither read as they are
    nor loaded onto "meta" first (torch swaps even the bytes of a meta tensor: a segfault, so
    the folders are read in a child process, where a crash fails this test rather than ending
    the test run)."""
    for number, dtype in enumerate(BIG_ENDIAN_DTYPES):
        tensor = torch.arange(11 * 6).view(11, 6).to(dtype)

        def big_endian(piece, dtype=dtype):  # the bytes a big-endian machine writes, so marked
            swapped = piece.contiguous().view(torch.uint8).view(*piece.shape, -1).flip(-1)
            return swapped.contiguous().view(dtype).view(piece.shape)

        monkeypatch.setattr(sys, "byteorder", "big")
        chunked(
            tmp_path / f"c{number}", tensor, [((0, 0), (6, 6)), ((6, 0), (5, 6))], saved=big_endian
        )
        monkeypatch.undo()
    reads = f"""
import sys, torch
from terge.io import open_checkpoint
for number, dtype in enumerate([{", ".join(map(str, BIG_ENDIAN_DTYPES))}]):
    expected = torch.arange(11 * 6).view(11, 6).to(dtype)
    with open_checkpoint(sys.argv[1] + f"/c{{number}}", entry="") as reader:  # integers: no model
        assert torch.equal(reader.get("w"), expected), dtype
print("read")
"""
    done = subprocess.run(
        [sys.executable, "-c", reads, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout.strip()) == (0, "read"), done.stderr[-2000:]


def test_an_empty_chunk_anywhere_is_no_overlap(tmp_path):
    tensor = torch.arange(11 * 6, dtype=torch.float32).view(11, 6)
    chunked(tmp_path / "c", tensor, [((0, 0), (6, 6)), ((3, 0), (0, 6)), ((6, 0), (5, 6))])
    with open_checkpoint(tmp_path / "c") as reader:
        assert torch.equal(reader.get("w"), tensor)


def test_a_window_reads_its_bytes_of_the_file_and_nothing_around_them():
    """What ``torch.load`` reads a chunk's record from: bytes 3-8 of the file, seekable, no
    byte before or after them."""
    from terge.io.distributed import _Window

    window = _Window(io.BytesIO(b"0123456789abc"), 3, 5)
    assert window.read() == b"34567"
    assert window.seek(-2, io.SEEK_END) == 3
    assert window.read(10) == b"67"
    assert window.seek(-9) == 0  # before the window: its start
    assert window.read(2) == b"34"
    assert (window.seek(1, io.SEEK_CUR), window.read()) == (3, b"67")


def test_the_writer_refuses_a_bad_entry_or_tied_name(tmp_path):
    layout = {"w": TensorInfo(torch.Size([2]), torch.float32)}
    for entry in (".model", "model.", 3):
        with pytest.raises(
            CheckpointError, match=f"without a leading or trailing dot; got {entry!r}"
        ):
            DistributedCheckpointWriter(tmp_path / "a", layout, entry=entry)
    for aliases in ({"w": "w"}, {"v": "u"}):
        with pytest.raises(CheckpointError, match="must stand for a tensor of the layout"):
            DistributedCheckpointWriter(tmp_path / "a", layout, aliases=aliases)
    assert list(tmp_path.iterdir()) == []


def test_the_writer_writes_a_nested_entry_as_dcp_save_does(tmp_path):
    state = {"w": torch.ones(2, 3), "b": torch.zeros(3)}
    dcp_save({"app": {"model": state}}, tmp_path / "dcp")
    layout = {name: TensorInfo(t.shape, t.dtype) for name, t in state.items()}
    with DistributedCheckpointWriter(tmp_path / "ours", layout, entry="app.model") as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
    a, b = (pickle.loads((tmp_path / f / ".metadata").read_bytes()) for f in ("dcp", "ours"))
    assert (
        b.planner_data
        == a.planner_data
        == {"app.model.w": ("app", "model", "w"), "app.model.b": ("app", "model", "b")}
    )
    with open_checkpoint(tmp_path / "ours") as reader:
        assert (reader.entry, reader.names()) == ("app.model", ["w", "b"])


def test_the_writer_saves_a_view_without_the_rest_of_its_storage(tmp_path):
    base = torch.arange(4096, dtype=torch.float32)  # 16 KiB
    layout = {"w": TensorInfo(torch.Size([4]), torch.float32)}
    with DistributedCheckpointWriter(tmp_path / "out", layout) as writer:
        writer.add("w", base[8:12])
    assert (tmp_path / "out" / "__0_0.distcp").stat().st_size < 4096
    with open_checkpoint(tmp_path / "out") as reader:
        assert torch.equal(reader.get("w"), base[8:12])


def test_the_writer_adopts_only_unwritten_tensors_of_its_layout(tmp_path):
    layout = {"w": TensorInfo(torch.Size([2]), torch.float32)}
    refused = pytest.raises(CheckpointError, match="another process wrote 'x', which is not in")
    with refused, DistributedCheckpointWriter(tmp_path / "a", layout) as writer:
        writer.adopt({"x": ("__1_0.distcp", 0, 8)}, ["__1_0.distcp"])
    refused = pytest.raises(CheckpointError, match="another process wrote 'w', which is not in")
    with refused, DistributedCheckpointWriter(tmp_path / "a", layout) as writer:
        writer.add("w", torch.ones(2))
        writer.adopt({"w": ("__1_0.distcp", 0, 8)}, ["__1_0.distcp"])
    assert list(tmp_path.iterdir()) == []


def test_a_tensor_is_written_once_whoever_wrote_it(tmp_path):
    from terge.io.distributed import DistributedCheckpointPart

    layout = {"w": TensorInfo(torch.Size([2]), torch.float32)}
    again = pytest.raises(CheckpointError, match="tensor 'w' was already written to")
    with again, DistributedCheckpointWriter(tmp_path / "a", layout) as writer:
        writer.adopt({"w": ("__1_0.distcp", 0, 8)}, ["__1_0.distcp"])
        writer.add("w", torch.ones(2))
    (tmp_path / "part").mkdir()
    part = DistributedCheckpointPart(tmp_path / "part", layout, 1, 1 << 30)
    part.add("w", torch.ones(2), tmp_path / "a")
    with pytest.raises(CheckpointError, match="tensor 'w' was already written to"):
        part.add("w", torch.zeros(2), tmp_path / "a")
    part.close()
    assert part.files == ["__1_0.distcp"]


def test_a_file_that_ends_before_the_bytes_asked_for_is_an_error(tmp_path):
    from terge.io.distributed import _read_exactly

    into = torch.empty(4, dtype=torch.int32)
    with pytest.raises(
        CheckpointError,
        match=r"^/f: chunk 0 ends before its tensor's bytes do \(the file is truncated\)",
    ):
        _read_exactly(io.BytesIO(bytes(range(20))), 8, into, pathlib.Path("/f"), "chunk 0")
    _read_exactly(io.BytesIO(bytes(range(20))), 4, into, pathlib.Path("/f"), "chunk 0")
    assert into.tolist() == torch.frombuffer(bytearray(range(4, 20)), dtype=torch.int32).tolist()
