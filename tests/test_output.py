"""output.write_merge(): the folder a merge is streamed into, tested without merge() around it."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader

import terge.output
from terge._version import __version__
from terge.digests import DigestRecorder, tensor_digest
from terge.errors import CheckpointError, MergeArgumentError, MetaTensorError
from terge.io import load, save
from terge.lineage import lineage_text
from terge.output import (
    LINEAGE_FILE,
    OUT_FORMATS,
    check_out_format,
    check_output,
    write_merge,
)
from terge.plan import Plan, Step
from terge.sources import FileSource, ModuleSource, Source, StateDictSource

from helpers import Tied, listing, plan_for

ABOVE_HALF_WAY = 1 + 2**-8 + 2**-40
"""Just above bfloat16's half-way point between 1 and 1 + 2^-7: rounded once it goes up; through
float32 (which drops the 2^-40) it lands on the half-way point and goes down to 1."""


def write(plan: Plan, sources: list[Source], out: Path, hook=None, **options) -> Path:
    """write_merge with merge()'s defaults."""
    settings = {
        "out": out,
        "out_dtype": None,
        "max_shard_size": "5GB",
        "overwrite": False,
        "dtype": torch.float64,
        "progress": False,
        "lineage": plan.lineage(),
        "hook": hook,
        **options,
    }
    return write_merge(plan, sources, sources[0], **settings)


def names_in(folder: Path) -> list[str]:
    """The tensor names a written (single-shard) folder holds."""
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return sorted(handle.keys())


def test_tied_names_are_written_once_under_the_first_and_recorded(tmp_path):
    torch.manual_seed(0)
    models = [Tied() for _ in range(2)]
    sources = [ModuleSource(m, buffers=False) for m in models]
    plan = plan_for(sources)
    lineage = plan.lineage()
    path = write(plan, sources, tmp_path / "out", lineage=lineage)
    assert path == tmp_path / "out"
    assert listing(path) == ["README.md", LINEAGE_FILE, "model.safetensors"]
    # the module's whole state dict (its buffers too, as save_pretrained writes), head once
    assert names_in(path) == [
        "embed.weight",
        "norm.bias",
        "norm.num_batches_tracked",
        "norm.running_mean",
        "norm.running_var",
        "norm.weight",
    ]
    assert lineage.tied == {"head.weight": "embed.weight"}
    written = load(path)
    mean = (models[0].embed.weight.double() + models[1].embed.weight.double()) / 2
    assert torch.equal(written["embed.weight"], mean.float())
    assert torch.equal(written["norm.running_var"], models[0].norm.running_var)
    assert written["norm.num_batches_tracked"].dtype == torch.int64
    assert (path / LINEAGE_FILE).read_text(encoding="utf-8") == lineage_text(lineage)


def test_the_shard_header_summarises_the_lineage(tmp_path):
    states = [{"a": torch.ones(2), "b": torch.ones(1), "n": torch.tensor([i])} for i in range(2)]
    sources = [StateDictSource(s) for s in states]
    path = write(plan_for(sources), sources, tmp_path / "out")
    with safe_open(path / "model.safetensors", "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["terge_lineage"]) == {
        "merged": {"arithmetic": 2},
        "skipped": {"not floating point": 1},
    }


def test_out_dtype_rounds_merged_and_copied_floats_once_and_keeps_integers(tmp_path):
    states = [
        {
            "merged": torch.full((3,), 1 + 2**-8 + 2**-39 * i, dtype=torch.float64),
            "steps": torch.tensor([7]),
        }
        for i in range(2)
    ]
    states[0]["copied"] = torch.full((2,), ABOVE_HALF_WAY, dtype=torch.float64)
    sources = [StateDictSource(s) for s in states]
    path = write(plan_for(sources), sources, tmp_path / "out", out_dtype=torch.bfloat16)
    written = load(path)
    # the mean of 1 + 2^-8 and 1 + 2^-8 + 2^-39 is ABOVE_HALF_WAY, exactly, in float64
    assert written["merged"].dtype == written["copied"].dtype == torch.bfloat16
    assert written["merged"].tolist() == [1 + 2**-7] * 3
    assert written["copied"].tolist() == [1 + 2**-7] * 2
    assert torch.tensor(ABOVE_HALF_WAY).float().bfloat16().item() == 1.0  # twice rounded: 1
    assert written["steps"].dtype == torch.int64 and written["steps"].tolist() == [7]


def checkpoint_folders(tmp_path: Path, config: dict | None) -> list[Path]:
    """Two float32 checkpoint folders, the first with ``config`` and a tokenizer file."""
    folders = []
    for i in range(2):
        folder = tmp_path / f"model{i}"
        save({"w": torch.full((2,), float(i))}, folder)
        folders.append(folder)
    if config is not None:
        (folders[0] / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (folders[0] / "tokenizer.json").write_text('{"vocab": 1}', encoding="utf-8")
    return folders


def test_out_dtype_updates_the_configs_dtype_and_copies_the_rest(tmp_path):
    config = {"torch_dtype": "float32", "dtype": "float32", "hidden_size": 4}
    sources = [FileSource(f) for f in checkpoint_folders(tmp_path, config)]
    path = write(plan_for(sources), sources, tmp_path / "out", out_dtype=torch.bfloat16)
    assert listing(path) == [
        "README.md",
        "config.json",
        LINEAGE_FILE,
        "model.safetensors",
        "tokenizer.json",
    ]
    written = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert written == {"torch_dtype": "bfloat16", "dtype": "bfloat16", "hidden_size": 4}
    assert (path / "tokenizer.json").read_text(encoding="utf-8") == '{"vocab": 1}'
    assert load(path)["w"].tolist() == [0.5, 0.5]


@pytest.mark.parametrize(
    ("config", "out_dtype"),
    [
        ({"torch_dtype": "float32"}, None),  # no new dtype: the config as it is
        ({"hidden_size": 4}, torch.bfloat16),  # no dtype in it: left alone
    ],
)
def test_a_config_is_copied_byte_for_byte_when_its_dtype_need_not_change(
    tmp_path, config, out_dtype
):
    folders = checkpoint_folders(tmp_path, config)
    sources = [FileSource(f) for f in folders]
    path = write(plan_for(sources), sources, tmp_path / "out", out_dtype=out_dtype)
    assert (path / "config.json").read_bytes() == (folders[0] / "config.json").read_bytes()


class FailOnSecond:
    """A hook whose ``after`` raises on the second step, to fail a write half way through."""

    def __init__(self) -> None:
        self.before_calls: list[str] = []
        self.after_calls = 0
        self.digests: dict = {}

    def before(self, step: Step) -> None:
        self.before_calls.append(step.name)

    def after(self, step: Step, written: torch.Tensor) -> None:
        self.after_calls += 1
        if self.after_calls == 2:
            raise RuntimeError("disk full")


def test_an_error_half_way_leaves_nothing_behind(tmp_path):
    states = [{"a": torch.ones(2), "b": torch.ones(3)} for _ in range(2)]
    sources = [StateDictSource(s) for s in states]
    hook = FailOnSecond()
    with pytest.raises(RuntimeError, match="disk full"):
        write(plan_for(sources), sources, tmp_path / "out", hook=hook)
    assert hook.before_calls == ["a", "b"]
    assert listing(tmp_path) == []  # no target, no temporary folder


def test_an_existing_target_is_refused_before_any_tensor_is_computed(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    states = [{"a": torch.ones(2)} for _ in range(2)]
    sources = [StateDictSource(s) for s in states]
    hook = FailOnSecond()
    with pytest.raises(CheckpointError, match=r"already exists"):
        write(plan_for(sources), sources, tmp_path / "out", hook=hook)
    assert hook.before_calls == []
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == ["keep.txt"]


def test_a_meta_tensor_in_the_base_is_refused_before_writing_naming_it(tmp_path):
    states = [{"a": torch.ones(2), "ghost": torch.empty(2, device="meta")}, {"a": torch.ones(2)}]
    sources = [StateDictSource(s) for s in states]
    with pytest.raises(MetaTensorError, match=r"the base's tensor 'ghost' is on the meta device"):
        write(plan_for(sources), sources, tmp_path / "out")
    assert listing(tmp_path) == []


def test_the_shard_header_names_the_terge_version(tmp_path):
    sources = [StateDictSource({"a": torch.ones(2)}) for _ in range(2)]
    path = write(plan_for(sources), sources, tmp_path / "out")
    with safe_open(path / "model.safetensors", "pt") as handle:
        assert handle.metadata()["terge_version"] == __version__


class SharedBuffer(torch.nn.Module):
    """A weight, and one buffer registered under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        shared = torch.arange(3.0)
        self.register_buffer("first", shared)
        self.register_buffer("second", shared)


def test_a_buffer_under_two_names_is_written_once_and_recorded_as_tied(tmp_path):
    sources = [ModuleSource(SharedBuffer(), buffers=False) for _ in range(2)]
    plan = plan_for(sources)
    lineage = plan.lineage()
    path = write(plan, sources, tmp_path / "out", lineage=lineage)
    assert names_in(path) == ["first", "weight"]
    assert lineage.tied == {"second": "first"}
    assert json.loads((path / LINEAGE_FILE).read_text(encoding="utf-8"))["tied"] == {
        "second": "first"
    }


class SparseBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.register_buffer("mask", torch.eye(2).to_sparse())


def test_a_sparse_tensor_in_the_base_is_refused_before_writing_naming_it(tmp_path):
    sources = [ModuleSource(SparseBuffer(), buffers=False) for _ in range(2)]
    message = r"the base's tensor 'mask' is not dense \(torch.sparse_coo\).*\.to_dense\(\) first"
    with pytest.raises(CheckpointError, match=message):
        write(plan_for(sources), sources, tmp_path / "out")
    assert listing(tmp_path) == []


class WithExtraState(torch.nn.Module):
    """A module whose state dict holds an object that is not a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))

    def get_extra_state(self) -> dict:
        return {"step": 3}

    def set_extra_state(self, state: dict) -> None:
        pass


def test_what_is_not_a_tensor_in_a_modules_state_is_not_written(tmp_path):
    sources = [ModuleSource(WithExtraState(), buffers=False) for _ in range(2)]
    path = write(plan_for(sources), sources, tmp_path / "out")
    assert names_in(path) == ["weight"]


def test_a_rewritten_config_is_indented_json_ending_in_a_newline(tmp_path):
    sources = [FileSource(f) for f in checkpoint_folders(tmp_path, {"torch_dtype": "float32"})]
    path = write(plan_for(sources), sources, tmp_path / "out", out_dtype=torch.float16)
    expected = json.dumps({"torch_dtype": "float16"}, indent=2) + "\n"
    assert (path / "config.json").read_text(encoding="utf-8") == expected


@pytest.mark.parametrize(
    "raw",
    [
        b'{"torch_dtype": null, "hidden_size": 4}',  # no dtype named
        b'{"torch_dtype": ',  # not JSON
        b'["torch_dtype", "float32"]',  # not an object
        b'{"torch_dtype": "\xff"}',  # not UTF-8
    ],
)
def test_a_config_that_names_no_dtype_is_copied_as_it_is_and_names_no_library(tmp_path, raw):
    folders = checkpoint_folders(tmp_path, None)
    (folders[0] / "config.json").write_bytes(raw)
    sources = [FileSource(f) for f in folders]
    path = write(plan_for(sources), sources, tmp_path / "out", out_dtype=torch.bfloat16)
    assert (path / "config.json").read_bytes() == raw
    assert "library_name" not in (path / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("config", "library"),
    [
        ({"model_type": "llama"}, "library_name: transformers\n"),
        ({"architectures": ["LlamaForCausalLM"]}, "library_name: transformers\n"),
        ({"model_type": 3, "architectures": "Llama"}, None),
        ({"hidden_size": 4}, None),
    ],
)
def test_the_card_names_transformers_when_the_config_names_a_model_type_or_architecture(
    tmp_path, config, library
):
    sources = [FileSource(f) for f in checkpoint_folders(tmp_path, config)]
    path = write(plan_for(sources), sources, tmp_path / "out")
    card = (path / "README.md").read_text(encoding="utf-8")
    assert ("library_name" in card) == (library is not None)
    assert library is None or library in card


def test_a_config_linked_from_outside_the_base_folder_is_neither_read_nor_copied(tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text('{"torch_dtype": "float32", "model_type": "secret"}', encoding="utf-8")
    folders = checkpoint_folders(tmp_path, None)
    (folders[0] / "config.json").symlink_to(elsewhere)
    sources = [FileSource(f) for f in folders]
    with pytest.warns(UserWarning, match=r"did not copy 1 file\(s\).*config.json ->"):
        path = write(plan_for(sources), sources, tmp_path / "out", out_dtype=torch.bfloat16)
    assert "config.json" not in listing(path)
    assert "library_name" not in (path / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("out_format", ["safetensors", "dcp"])
def test_card_false_writes_no_card_and_a_command_is_shown_in_it(tmp_path, out_format):
    sources = [StateDictSource({"a": torch.ones(2)}) for _ in range(2)]
    plan = plan_for(sources)
    path = write(plan, sources, tmp_path / "none", card=False, out_format=out_format)
    assert "README.md" not in listing(path) and LINEAGE_FILE in listing(path)
    command = "terge merge a b --out made-by-this-command"
    path = write(plan, sources, tmp_path / "card", card=command, out_format=out_format)
    assert command in (path / "README.md").read_text(encoding="utf-8")


def sharded_folder(tmp_path: Path, name: str) -> Path:
    """A float32 checkpoint saved as two shards and an index, with a config and a tokenizer."""
    folder = tmp_path / name
    save({"a": torch.ones(64), "b": torch.zeros(64)}, folder, max_shard_size=300)
    (folder / "config.json").write_text('{"torch_dtype": "float32"}', encoding="utf-8")
    (folder / "tokenizer.json").write_text('{"vocab": 1}', encoding="utf-8")
    return folder


def test_a_base_read_through_its_index_has_its_folders_files_copied(tmp_path):
    folders = [sharded_folder(tmp_path, f"model{i}") for i in range(2)]
    index = folders[0] / "model.safetensors.index.json"
    assert index.is_file()
    sources = [FileSource(index), FileSource(folders[1])]
    path = write(plan_for(sources), sources, tmp_path / "out", out_dtype=torch.bfloat16)
    assert "tokenizer.json" in listing(path)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert config == {"torch_dtype": "bfloat16"}


def test_an_output_inside_an_input_read_through_its_index_is_refused(tmp_path):
    folders = [sharded_folder(tmp_path, f"model{i}") for i in range(2)]
    sources = [FileSource(folders[0]), FileSource(folders[1] / "model.safetensors.index.json")]
    before = listing(folders[1])
    message = f"is inside the input {re.escape(str(folders[1]))}; writing there"
    with pytest.raises(CheckpointError, match=message):
        write(plan_for(sources), sources, folders[1] / "out")
    assert listing(folders[1]) == before


def test_given_tokenizer_files_replace_every_tokenizer_file_of_the_base(tmp_path):
    folders = checkpoint_folders(tmp_path, None)
    (folders[0] / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    sources = [FileSource(f) for f in folders]
    path = write(
        plan_for(sources), sources, tmp_path / "out", tokenizer_files={"tokenizer.json": "new"}
    )
    assert listing(path) == ["README.md", LINEAGE_FILE, "model.safetensors", "tokenizer.json"]
    assert (path / "tokenizer.json").read_text(encoding="utf-8") == "new"


@pytest.mark.parametrize("out_format", ["safetensors", "dcp"])
def test_a_digest_hook_records_every_merged_tensor_as_written(tmp_path, out_format):
    states = [{"a": torch.full((2,), float(i)), "n": torch.tensor([i])} for i in range(2)]
    sources = [StateDictSource(s) for s in states]
    plan = plan_for(sources)
    lineage = plan.lineage()
    hook = DigestRecorder(sources, sources[0], 0)
    path = write(plan, sources, tmp_path / "out", hook=hook, lineage=lineage, out_format=out_format)
    assert list(lineage.digests) == ["a"]
    assert lineage.digests["a"].output == tensor_digest(torch.full((2,), 0.5))
    assert (path / LINEAGE_FILE).read_text(encoding="utf-8") == lineage_text(lineage)


def dcp_keys(folder: Path) -> dict:
    """Each key of a distributed checkpoint, with its dtype."""
    metadata = FileSystemReader(str(folder)).read_metadata()
    return {k: v.properties.dtype for k, v in metadata.state_dict_metadata.items()}


def test_a_dcp_output_casts_copied_floats_and_keeps_tied_names(tmp_path):
    torch.manual_seed(0)
    sources = [ModuleSource(Tied(), buffers=False) for _ in range(2)]
    path = write(
        plan_for(sources), sources, tmp_path / "out", out_format="dcp", out_dtype=torch.float16
    )
    keys = dcp_keys(path)
    assert keys["embed.weight"] == keys["head.weight"] == torch.float16  # merged, and tied
    assert keys["norm.running_var"] == torch.float16  # copied from the base, cast
    assert keys["norm.num_batches_tracked"] == torch.int64
    written = load(path)
    assert torch.equal(written["norm.running_var"], torch.ones(4, dtype=torch.float16))


def test_a_dcp_output_of_a_dcp_base_keeps_its_entry_and_its_card_names_no_library(tmp_path):
    folders = []
    for i in range(2):
        folders.append(tmp_path / f"c{i}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is unavailable ..."
            dcp.save(
                {"model": {"w": torch.full((2,), float(i))}},
                checkpoint_id=str(folders[-1]),
                no_dist=True,
            )
    (folders[0] / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    sources = [FileSource(f) for f in folders]
    path = write(plan_for(sources), sources, tmp_path / "out", out_format="dcp")
    assert list(dcp_keys(path)) == ["model.w"]
    assert "library_name" not in (path / "README.md").read_text(encoding="utf-8")


def test_check_output_fails_where_the_write_would_and_writes_nothing(tmp_path):
    states = [{"a": torch.ones(2), "ghost": torch.empty(2, device="meta")}, {"a": torch.ones(2)}]
    sources = [StateDictSource(s) for s in states]
    plan = plan_for(sources)
    settings = {"out_dtype": None, "max_shard_size": "5GB", "overwrite": False}
    for out_format in ("safetensors", "dcp"):
        with pytest.raises(MetaTensorError, match=r"the base's tensor 'ghost'"):
            check_output(
                plan,
                sources,
                sources[0],
                out=tmp_path / "new",
                lineage=plan.lineage(),
                out_format=out_format,
                **settings,
            )
    (tmp_path / "out").mkdir()
    sources = [StateDictSource({"a": torch.ones(2)}) for _ in range(2)]
    plan = plan_for(sources)
    for out_format in ("safetensors", "dcp"):
        with pytest.raises(CheckpointError, match=r"already exists; pass overwrite=True"):
            check_output(
                plan,
                sources,
                sources[0],
                out=tmp_path / "out",
                lineage=plan.lineage(),
                out_format=out_format,
                **settings,
            )
        check_output(
            plan,
            sources,
            sources[0],
            out=tmp_path / "new",
            lineage=plan.lineage(),
            out_format=out_format,
            **settings,
        )
    assert listing(tmp_path) == ["out"]
    assert listing(tmp_path / "out") == []


def test_check_out_format_names_the_formats_it_takes():
    assert [check_out_format(f) for f in OUT_FORMATS] == ["safetensors", "dcp", "lora"]
    message = r"`out_format` must be one of 'safetensors', 'dcp', 'lora' .*; got 'zip'\."
    with pytest.raises(MergeArgumentError, match=message):
        check_out_format("zip")


@pytest.fixture
def one_rank():
    """A process group of this process alone, for DTensors on a one-rank CPU mesh."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded_linear(mesh, value: float) -> torch.nn.Module:
    from torch.distributed.tensor import Shard, distribute_tensor

    model = torch.nn.Linear(2, 4, bias=False)
    weight = distribute_tensor(torch.full((4, 2), value), mesh, [Shard(0)])
    model.weight = torch.nn.Parameter(weight)
    return model


def test_sharded_parameters_are_gathered_and_written(tmp_path, one_rank):
    sources = [ModuleSource(sharded_linear(one_rank, float(i)), buffers=False) for i in range(2)]
    plan = plan_for(sources)
    assert plan.sharded
    path = write(plan, sources, tmp_path / "out")
    assert listing(path) == ["README.md", LINEAGE_FILE, "model.safetensors"]
    assert torch.equal(load(path)["weight"], torch.full((4, 2), 0.5))


def test_a_sharded_merge_whose_records_fail_leaves_nothing_behind(tmp_path, one_rank, monkeypatch):
    def full_disk(lineage):
        raise OSError("disk full")

    monkeypatch.setattr(terge.output, "lineage_text", full_disk)
    sources = [ModuleSource(sharded_linear(one_rank, float(i)), buffers=False) for i in range(2)]
    with pytest.raises(OSError, match="disk full"):
        write(plan_for(sources), sources, tmp_path / "out")
    assert listing(tmp_path) == []  # no target, no temporary folder


def test_a_sharded_merge_rounds_once_into_out_dtype(tmp_path, one_rank):
    # the mean, 1 + 2^-8 + 2^-24, is above bfloat16's half-way point: rounded once it goes up;
    # through float32 it lands on the half-way point and goes down to 1
    values = [1 + 2**-8, 1 + 2**-8 + 2**-23]
    sources = [ModuleSource(sharded_linear(one_rank, v), buffers=False) for v in values]
    path = write(plan_for(sources), sources, tmp_path / "out", out_dtype=torch.bfloat16)
    written = load(path)["weight"]
    assert written.dtype == torch.bfloat16
    assert written.unique().tolist() == [1 + 2**-7]


def test_a_sharded_merge_refuses_an_existing_target_before_computing_anything(
    tmp_path, one_rank, monkeypatch
):
    computed = []
    monkeypatch.setattr(terge.output, "run_step", lambda step, *args: computed.append(step))
    (tmp_path / "out").mkdir()
    sources = [ModuleSource(sharded_linear(one_rank, float(i)), buffers=False) for i in range(2)]
    with pytest.raises(CheckpointError, match=r"already exists; pass overwrite=True"):
        write(plan_for(sources), sources, tmp_path / "out")
    assert computed == []
    assert listing(tmp_path) == ["out"]


def test_a_sharded_merge_stops_writing_at_the_first_failure_and_raises_it(
    tmp_path, one_rank, monkeypatch
):
    stored = []

    def full_disk(into, tensor, buffers):
        stored.append(tensor.shape)
        raise OSError(f"disk full after {len(stored)} tensor(s)")

    monkeypatch.setattr(terge.output, "store_whole", full_disk)
    models = [sharded_linear(one_rank, float(i)) for i in range(2)]
    for model in models:
        model.register_buffer("steps", torch.tensor([1]))  # copied, after the weight
    sources = [ModuleSource(m, buffers=False) for m in models]
    with pytest.raises(OSError, match=r"disk full after 1 tensor\(s\)"):
        write(plan_for(sources), sources, tmp_path / "out")
    assert len(stored) == 1
    assert listing(tmp_path) == []


class Exchange:
    """What the ranks of an in-process distributed write (one thread each) hand each other."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=10)
        self.slots: list = [None] * world


@dataclass(frozen=True)
class ThreadRanks:
    """:class:`terge.output.Ranks` for ranks that are threads of this process."""

    rank: int
    world: int
    exchange: Exchange

    def gather(self, value):
        self.exchange.slots[self.rank] = value
        self.exchange.barrier.wait()
        values = list(self.exchange.slots)
        self.exchange.barrier.wait()
        return values

    def broadcast(self, value):
        return self.gather(value)[0]


def write_on_ranks(world: int, write_on) -> list:
    """``write_on(ranks)`` on ``world`` ranks, rank 0 on this thread: each one's result or error."""
    exchange = Exchange(world)
    results: list = [None] * world

    def run(rank: int) -> None:
        try:
            results[rank] = write_on(ThreadRanks(rank, world, exchange))
        except Exception as error:
            results[rank] = error

    others = [threading.Thread(target=run, args=(r,)) for r in range(1, world)]
    for thread in others:
        thread.start()
    run(0)
    for thread in others:
        thread.join()
    return results


def four_tensor_folders(tmp_path: Path) -> list[Path]:
    """Two float32 checkpoint folders of four 256-byte tensors, the first with a config."""
    folders = []
    for i in range(2):
        folders.append(save({n: torch.full((64,), float(i)) for n in "abcd"}, tmp_path / f"m{i}"))
    (folders[0] / "config.json").write_text('{"torch_dtype": "float32"}', encoding="utf-8")
    return folders


@pytest.mark.parametrize("out_format", ["safetensors", "dcp"])
def test_a_distributed_file_merge_writes_every_ranks_part_into_one_output(tmp_path, out_format):
    folders = four_tensor_folders(tmp_path / "in")

    def write_on(ranks):  # each rank reads the models itself
        sources = [FileSource(f) for f in folders]
        plan = plan_for(sources)
        lineage = plan.lineage()
        hook = DigestRecorder(sources, sources[0], 0)
        options = {"max_shard_size": 300, "out_dtype": torch.bfloat16, "out_format": out_format}
        path = write(
            plan, sources, tmp_path / "out", hook=hook, lineage=lineage, ranks=ranks, **options
        )
        return path, sorted(lineage.digests)

    results = write_on_ranks(2, write_on)
    assert results == [(tmp_path / "out", ["a", "b", "c", "d"])] * 2  # every rank, every digest
    assert listing(tmp_path) == ["in", "out"]
    written = load(tmp_path / "out")
    assert sorted(written) == ["a", "b", "c", "d"]
    half = torch.full((64,), 0.5, dtype=torch.bfloat16)
    assert all(torch.equal(t, half) for t in written.values())
    if out_format == "safetensors":  # the config's dtype updated
        config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
        assert config == {"torch_dtype": "bfloat16"}


def test_a_failure_on_one_rank_stops_every_rank_and_leaves_nothing(tmp_path):
    states = [{n: torch.full((64,), float(i)) for n in "abcd"} for i in range(2)]
    sources = [StateDictSource(s) for s in states]
    plan = plan_for(sources)

    def write_on(ranks):
        hook = FailOnSecond() if ranks.rank == 1 else None
        return write(plan, sources, tmp_path / "out", max_shard_size=300, ranks=ranks, hook=hook)

    results = write_on_ranks(2, write_on)
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "disk full"
    assert isinstance(results[0], CheckpointError)
    assert str(results[0]).startswith(
        "rank 1 of 2 failed (RuntimeError: disk full); every rank stopped and nothing was "
        f"written to {tmp_path / 'out'}."
    )
    assert listing(tmp_path) == []


def test_a_failure_on_one_rank_of_a_dcp_merge_stops_every_rank_and_leaves_nothing(tmp_path):
    states = [{n: torch.full((64,), float(i)) for n in "abcd"} for i in range(2)]
    sources = [StateDictSource(s) for s in states]
    plan = plan_for(sources)

    def write_on(ranks):
        hook = FailOnSecond() if ranks.rank == 1 else DigestRecorder(sources, sources[0], 0)
        return write(plan, sources, tmp_path / "out", out_format="dcp", ranks=ranks, hook=hook)

    results = write_on_ranks(2, write_on)
    assert isinstance(results[1], RuntimeError) and str(results[1]) == "disk full"
    assert isinstance(results[0], CheckpointError)
    assert str(results[0]).startswith(
        "rank 1 of 2 failed (RuntimeError: disk full); every rank stopped and nothing was "
        f"written to {tmp_path / 'out'}."
    )
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    ("config", "written"),
    [
        (
            {"torch_dtype": "float32", "vocab_size": 5, "hidden_size": 4},
            {"torch_dtype": "float32", "vocab_size": 7, "hidden_size": 4},
        ),
        ({"torch_dtype": "float32", "vocab_size": "5"}, None),  # no number: left as it is
    ],
)
def test_the_configs_vocab_size_becomes_the_output_vocabularys(tmp_path, config, written):
    folders = checkpoint_folders(tmp_path, config)
    sources = [FileSource(f) for f in folders]
    plan = plan_for(sources)
    aligned = dataclasses.replace(plan, vocabulary=SimpleNamespace(rows=7))
    settings = {"out_dtype": None, "max_shard_size": "5GB", "overwrite": False}
    path = write_merge(
        aligned,
        sources,
        sources[0],
        out=tmp_path / "out",
        dtype=torch.float64,
        progress=False,
        lineage=plan.lineage(),
        **settings,
    )
    if written is None:
        assert (path / "config.json").read_bytes() == (folders[0] / "config.json").read_bytes()
    else:
        assert json.loads((path / "config.json").read_text(encoding="utf-8")) == written


@pytest.mark.parametrize("out_format", ["safetensors", "dcp"])
def test_a_failure_of_rank_0s_commit_stops_every_rank_and_leaves_nothing(
    tmp_path, monkeypatch, out_format
):
    def full_disk(lineage):
        raise OSError("disk full")

    monkeypatch.setattr(terge.output, "lineage_text", full_disk)  # rank 0 writes the records
    states = [{n: torch.full((64,), float(i)) for n in "abcd"} for i in range(2)]
    sources = [StateDictSource(s) for s in states]
    plan = plan_for(sources)

    def write_on(ranks):
        options = {"max_shard_size": 300, "out_format": out_format}
        return write(plan, sources, tmp_path / "out", ranks=ranks, **options)

    results = write_on_ranks(2, write_on)
    assert isinstance(results[0], OSError) and str(results[0]) == "disk full"
    assert isinstance(results[1], CheckpointError)
    assert str(results[1]).startswith(
        "rank 0 of 2 failed (OSError: disk full); every rank stopped and nothing was "
        f"written to {tmp_path / 'out'}."
    )
    assert listing(tmp_path) == []


class WrappedWithABuffer(torch.nn.Module):
    """A compiled model's wrapper ('_orig_mod.') with a buffer of its own named as a weight."""

    def __init__(self) -> None:
        super().__init__()
        self._orig_mod = torch.nn.Linear(2, 2, bias=False)
        self.register_buffer("weight", torch.zeros(3))


def test_a_buffer_whose_name_meets_a_weights_is_refused_not_dropped(tmp_path):
    sources = [ModuleSource(WrappedWithABuffer(), buffers=False) for _ in range(2)]
    message = (
        r"the base has two tensors, 'weight' and '_orig_mod.weight', that both map to the name "
        r"'weight' once wrapper prefixes \('module.', '_orig_mod.'\) are stripped"
    )
    with pytest.raises(MergeArgumentError, match=message):
        write(plan_for(sources), sources, tmp_path / "out")
    assert listing(tmp_path) == []
