"""sources.py: the one view over modules, state dicts and files, with canonical names and ties."""

from __future__ import annotations

import pytest
import torch

from terge.errors import MergeArgumentError
from terge.io import save
from terge.io.training import checkpoint
from terge.sources import (
    FileSource,
    ModuleSource,
    StateDictSource,
    as_source,
    canonical_names,
    renamer,
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
