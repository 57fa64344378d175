"""output.write_merge(): the folder a merge is streamed into, tested without merge() around it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from terge.errors import CheckpointError, MetaTensorError
from terge.io import load, save
from terge.lineage import lineage_text
from terge.output import LINEAGE_FILE, write_merge
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
