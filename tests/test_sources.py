"""sources.py: the one view over modules, state dicts and files, with canonical names and ties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from terge.errors import AdapterError, MergeArgumentError, TergeError
from terge.io import reading, save
from terge.io.adapters import adapter
from terge.io.training import checkpoint
from terge.sources import (
    AdapterSource,
    FileSource,
    ModuleSource,
    StateDictSource,
    as_source,
    canonical_names,
    checkpoint_of,
    folders_read,
    renamer,
    same_model,
    strip_wrappers,
    view_key,
)

from helpers import Tied


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("weight", "weight"),
        ("module.weight", "weight"),
        ("module.module._orig_mod.layers.0.weight", "layers.0.weight"),
        ("_orig_mod.module.x", "x"),
        ("layers.module.weight", "layers.module.weight"),  # only leading prefixes
        ("module.", "module."),  # a prefix with nothing after it is a name
        ("module.module.", "module."),
    ],
)
def test_wrapper_prefixes_are_stripped_from_the_front_only(name, expected):
    assert strip_wrappers(name) == expected


def test_a_name_map_applies_after_the_prefixes_are_stripped():
    rename = renamer(lambda name: name.replace("transformer.", "model."))
    assert rename("module.transformer.h.0") == "model.h.0"
    assert renamer(None) is strip_wrappers


@pytest.mark.parametrize(
    ("name_map", "message"),
    [
        ("not callable", r"`name_map` must be a function .* got str"),
        (
            lambda name: 1 / 0,
            r"`name_map` raised ZeroDivisionError: .* for the name 'x' \(from 'module.x'\)",
        ),
        (lambda name: "", r"`name_map` returned '' for the name 'x' \(from 'module.x'\)"),
        (lambda name: None, r"`name_map` returned None"),
    ],
)
def test_a_bad_name_map_is_reported_with_the_name_it_failed_on(name_map, message):
    with pytest.raises(MergeArgumentError, match=message):
        renamer(name_map)("module.x")


def test_two_names_of_one_model_mapping_to_one_canonical_name_are_refused():
    with pytest.raises(
        MergeArgumentError, match=r"models\[2\] has two tensors, 'x' and 'module.x', .* name 'x'"
    ):
        canonical_names(["x", "module.x"], strip_wrappers, "models[2]")
    assert canonical_names(["module.a", "b"], strip_wrappers, "m") == {"a": "module.a", "b": "b"}


def test_view_keys_are_equal_exactly_for_the_same_view_of_the_same_memory():
    a = torch.zeros(4, 3)
    assert view_key(a) == view_key(a.view(4, 3))  # another object, the same view
    assert view_key(a) != view_key(a.t())  # same memory, other strides
    assert view_key(a) != view_key(a[1:])  # same storage, other offset
    assert view_key(a) != view_key(a.clone())
    assert view_key(torch.zeros(0)) != view_key(torch.zeros(0))  # empty: never tied
    meta = torch.empty(2, device="meta")
    assert view_key(meta) == view_key(meta) and view_key(meta) != view_key(meta.clone())


def test_a_module_source_lists_tied_names_with_one_key_and_buffers_on_request():
    model = Tied()
    source = ModuleSource(model, buffers=False)
    assert list(source.entries) == ["embed.weight", "norm.weight", "norm.bias", "head.weight"]
    assert source.entries["head.weight"].key == source.entries["embed.weight"].key
    assert source.get("head.weight") is model.head.weight
    with_buffers = ModuleSource(model, buffers=True)
    assert set(with_buffers.entries) - set(source.entries) == {
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    }


def test_a_wrapped_module_is_read_through_its_wrapper_under_canonical_names():
    inner = torch.nn.Linear(2, 2)
    wrapper = torch.nn.DataParallel(inner)
    source = ModuleSource(wrapper, buffers=False)
    assert source.module is inner and source.wrapper is wrapper
    assert list(source.entries) == ["weight", "bias"]
    assert source.raw_names == {"weight": "weight", "bias": "bias"}


def test_a_state_dict_source_keeps_non_tensors_aside_and_renames():
    state = {"module.w": torch.ones(2), "module.step": 3}
    source = StateDictSource(state)
    assert list(source.entries) == ["w"]
    assert source.others == ("step",)
    assert source.raw_names == {"w": "module.w", "step": "module.step"}
    assert source.get("w") is state["module.w"]
    assert source.holds("w", torch.Size([2])) and not source.holds("w", torch.Size([3]))
    with pytest.raises(
        MergeArgumentError, match=r"the key 3 of type int; tensor names must be str"
    ):
        StateDictSource({3: torch.ones(1)})


def test_a_file_source_reads_names_shapes_and_dtypes_from_the_header_only(tmp_path):
    save({"b": torch.ones(2, dtype=torch.bfloat16), "a": torch.zeros(3)}, tmp_path / "m")
    source = FileSource(tmp_path / "m")
    try:
        assert {n: (tuple(e.shape), e.dtype) for n, e in source.entries.items()} == {
            "a": ((3,), torch.float32),
            "b": ((2,), torch.bfloat16),
        }
        assert source.entries["a"].key != source.entries["b"].key  # files hold no ties
        assert source.path == tmp_path / "m"
        assert torch.equal(source.get("b"), torch.ones(2, dtype=torch.bfloat16))
    finally:
        source.close()


@pytest.mark.parametrize(
    ("model", "kind"),
    [(torch.nn.Linear(1, 1), ModuleSource), ({"w": torch.ones(1)}, StateDictSource)],
)
def test_as_source_wraps_each_kind_of_model(model, kind):
    assert type(as_source(model, False, "models[0]")) is kind


@pytest.mark.parametrize("model", [3, [torch.ones(1)], None])
def test_as_source_refuses_anything_else_naming_where_it_was(model):
    with pytest.raises(
        MergeArgumentError, match=rf"models\[1\] is a {type(model).__name__}; terge"
    ):
        as_source(model, False, "models[1]")


def test_a_file_source_records_the_entry_and_prefix_it_read(tmp_path):
    """A training checkpoint's source names the entry and prefix it read (what the lineage
    records, so that reading it back reads the same tensors); a plain state dict, its path."""
    model = {"w": torch.ones(2)}
    torch.save({"model": model, "epoch": 1}, tmp_path / "t.pt")
    torch.save(model, tmp_path / "p.pt")
    training, plain = FileSource(tmp_path / "t.pt"), FileSource(f"{tmp_path}/t.pt::prefix=")
    assert training.spec == f"{tmp_path / 't.pt'}::entry=model,prefix="
    assert plain.spec == training.spec and training.path == tmp_path / "t.pt"
    assert FileSource(tmp_path / "p.pt").spec == str(tmp_path / "p.pt")
    assert as_source(checkpoint(tmp_path / "t.pt", entry="model"), False, "m").entries.keys() == {
        "w"
    }
    for source in (training, plain):
        source.close()


# --------------------------------------------------------------------------------------------
# Audit: behaviour the tests above left open
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name_map", "message"),
    [
        (lambda name: 5, r"`name_map` returned 5 for the name 'x' \(from 'module.x'\)"),
        ({}.__getitem__, r"`name_map` raised KeyError: 'x' for the name 'x'"),
    ],
)
def test_a_name_map_that_returns_no_str_or_raises_anything_is_reported(name_map, message):
    with pytest.raises(MergeArgumentError, match=message):
        renamer(name_map)("module.x")


def test_a_module_source_lists_the_persistent_buffers_it_leaves_out_by_their_names():
    norm = torch.nn.BatchNorm1d(2)
    norm.register_buffer("scratch", torch.zeros(1), persistent=False)
    assert ModuleSource(norm, buffers=False).buffers == {
        "running_mean": True,
        "running_var": True,
        "num_batches_tracked": False,
    }
    assert ModuleSource(norm, buffers=True).buffers == {}  # merged: none left out


class OptimizedModule(torch.nn.Module):
    """What torch.compile returns, as unwrap() knows it: its class name and ``_orig_mod``
    (torch.compile itself takes seconds to import its compiler)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_a_compiled_module_is_read_through_its_wrapper():
    inner = torch.nn.Linear(2, 2)
    compiled = torch.nn.DataParallel(OptimizedModule(inner))
    source = ModuleSource(compiled, buffers=False)
    assert source.module is inner and source.wrapper is compiled
    assert list(source.entries) == ["weight", "bias"]


def test_a_file_source_that_fails_while_opening_closes_its_file(tmp_path, monkeypatch):
    save({"x": torch.ones(1), "module.x": torch.ones(1)}, tmp_path / "m")
    closed = []
    close = reading.CheckpointReader.close
    monkeypatch.setattr(
        reading.CheckpointReader, "close", lambda self: (closed.append(self), close(self))
    )
    with pytest.raises(MergeArgumentError, match=r"two tensors, '(module\.)?x' and"):
        FileSource(tmp_path / "m")
    assert len(closed) == 1


def test_the_same_model_is_one_object_one_mapping_or_one_file_and_entry(tmp_path):
    state = {"w": torch.ones(1)}
    assert same_model(StateDictSource(state), StateDictSource(state))
    assert not same_model(StateDictSource(state), StateDictSource(dict(state)))
    linear = torch.nn.Linear(1, 1)
    assert same_model(ModuleSource(linear, False), ModuleSource(linear, True))
    assert not same_model(ModuleSource(linear, False), ModuleSource(torch.nn.Linear(1, 1), False))
    assert not same_model(ModuleSource(linear, False), StateDictSource(linear.state_dict()))
    torch.save({"a": state, "b": state}, tmp_path / "t.pt")
    a, b = (FileSource(checkpoint(tmp_path / "t.pt", entry=e)) for e in "ab")
    again = FileSource(f"{tmp_path}/./t.pt::entry=a")
    try:
        assert same_model(a, again) and not same_model(a, b)
    finally:
        for source in (a, b, again):
            source.close()


def lora_folder(folder: Path) -> Path:
    """A rank-1 PEFT LoRA adapter of ``lin`` (4, 3), its base given by the caller."""
    folder.mkdir()
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "base_model_name_or_path": None}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    factors = {
        "base_model.model.lin.lora_A.weight": torch.ones(1, 3),
        "base_model.model.lin.lora_B.weight": torch.ones(4, 1),
    }
    save_file(factors, folder / "adapter_model.safetensors")
    return folder


@pytest.fixture
def closed(monkeypatch) -> list[str]:
    """The names of the checkpoints closed, in order (an adapter's weights file among them)."""
    log: list[str] = []
    close = reading.CheckpointReader.close
    monkeypatch.setattr(
        reading.CheckpointReader, "close", lambda self: (log.append(self.path.name), close(self))
    )
    return log


def test_an_adapter_source_reads_its_base_file_and_closes_both(tmp_path, closed):
    save({"lin.weight": torch.zeros(4, 3)}, tmp_path / "base")
    source = AdapterSource(adapter(lora_folder(tmp_path / "a"), base=tmp_path / "base"), False)
    assert checkpoint_of(source) is source.base and source.base.path == tmp_path / "base"
    assert folders_read(source) == [tmp_path / "a"]
    assert torch.equal(source.get("lin.weight"), torch.ones(4, 3, dtype=torch.float64))
    source.close()
    assert closed == ["adapter_model.safetensors", "base"]


def test_an_adapter_source_that_fails_closes_what_it_opened(tmp_path, closed):
    folder = lora_folder(tmp_path / "a")
    save({"lin.weight": torch.zeros(5, 3)}, tmp_path / "wide")
    with pytest.raises(AdapterError, match=r"lin"):  # the adapter does not fit this base
        AdapterSource(adapter(folder, base=tmp_path / "wide"), False)
    assert sorted(closed) == ["adapter_model.safetensors", "wide"]
    closed.clear()
    with pytest.raises(TergeError):  # no base there
        AdapterSource(adapter(folder, base=tmp_path / "missing"), False)
    assert closed[-1] == "adapter_model.safetensors"  # after the base's own reader, if any
