"""Training checkpoints read as models (terge.io.training): Lightning files written by the real
library, fairseq, timm and generic layouts built by hand, the spec and its text form, and every
error that asks the user to choose."""

from __future__ import annotations

import argparse
import ctypes
import fractions
import mmap
import os
import wsgiref.headers
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import terge
from terge.errors import CheckpointError
from terge.io import open_checkpoint
from terge.io.training import (
    CheckpointSpec,
    Selection,
    as_spec,
    checkpoint,
    parse_spec,
    refused_globals,
    resolved,
)

from helpers import lightning_run, states


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(4, 3, generator=generator),
        "encoder.bias": torch.randn(4, generator=generator),
        "head.weight": torch.randn(2, 4, generator=generator),
    }


def optimizer_state(model: dict[str, torch.Tensor]) -> dict:
    return {
        "state": {
            i: {"exp_avg": t * 2, "step": torch.tensor(3.0)} for i, t in enumerate(model.values())
        },
        "param_groups": [{"lr": 0.1, "params": list(range(len(model)))}],
    }


def read(path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as reader:
        return {name: reader.get(name) for name in reader.names()}


def assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(found) == list(expected)
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name


# --- layouts built by hand --------------------------------------------------------------------


def test_generic_training_checkpoint(tmp_path):
    model = tensors()
    torch.save(
        {"model": model, "optimizer": optimizer_state(model), "epoch": 3, "step": 300},
        tmp_path / "ckpt3.pt",
    )
    with open_checkpoint(tmp_path / "ckpt3.pt") as reader:
        assert reader.selection is not None and reader.selection.entry == ("model",)
        assert reader.selection.prefix == ""
    assert_same(read(tmp_path / "ckpt3.pt"), model)


def test_fairseq_layout(tmp_path):
    """fairseq's save_state: the model under "model", optimizer history and extra state beside."""
    model = tensors()
    torch.save(
        {
            "cfg": {"model": {"_name": "transformer"}, "optimization": {"lr": [0.1]}},
            "model": model,
            "criterion": {},
            "optimizer_history": [{"criterion_name": "CrossEntropy", "num_updates": 1000}],
            "task_state": {},
            "extra_state": {"epoch": 4, "val_loss": 2.5},
            "last_optimizer_state": optimizer_state(model),
        },
        tmp_path / "checkpoint4.pt",
    )
    assert_same(read(tmp_path / "checkpoint4.pt"), model)


def test_timm_layout_is_ambiguous_until_an_entry_is_named(tmp_path):
    """timm's CheckpointSaver keeps the EMA beside the weights: terge does not guess."""
    model, ema = tensors(0), tensors(1)
    torch.save(
        {
            "epoch": 9,
            "arch": "resnet50",
            "state_dict": model,
            "optimizer": optimizer_state(model),
            "state_dict_ema": ema,
            "metric": 71.5,
        },
        tmp_path / "checkpoint-9.pth.tar",
    )
    path = tmp_path / "checkpoint-9.pth"
    (tmp_path / "checkpoint-9.pth.tar").rename(path)
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-9.pth holds 2 model state dicts, 'state_dict' \(dict of 3 entries "
        r"\(3 tensors\)\), 'state_dict_ema' \(dict of 3 entries \(3 tensors\)\), and terge does not "
        r"guess which is the model; choose one with terge.checkpoint\('.*checkpoint-9.pth', "
        r"entry='state_dict'\) or the path '.*checkpoint-9.pth::state_dict' \(command line, recipes\)",
    ):
        open_checkpoint(path)
    assert_same(read(checkpoint(path, entry="state_dict_ema")), ema)
    assert_same(read(f"{path}::state_dict"), model)
    assert_same(read(f"{path}::entry=state_dict_ema"), ema)


def test_no_model_in_the_checkpoint(tmp_path):
    torch.save({"optimizer": optimizer_state(tensors()), "epoch": 1}, tmp_path / "opt.pt")
    with pytest.raises(
        CheckpointError,
        match=r"opt.pt holds no model state dict: .* \(it holds 'optimizer' \(dict of 2 entries "
        r"\(0 tensors\)\), 'epoch' \(int\)\)\. Save model.state_dict\(\) .* for a state dict "
        r"nested deeper, choose one with terge.checkpoint\(.*entry='outer/inner'\)",
    ):
        open_checkpoint(tmp_path / "opt.pt")


def test_scalar_only_mappings_are_no_model(tmp_path):
    """A mapping of scalars (metrics, a GradScaler's tensors) is not a candidate."""
    model = tensors()
    torch.save(
        {"model": model, "metrics": {"acc": torch.tensor(0.9), "loss": torch.tensor(0.1)}},
        tmp_path / "m.pt",
    )
    assert_same(read(tmp_path / "m.pt"), model)


def test_nested_entry(tmp_path):
    model, ema = tensors(0), tensors(1)
    torch.save({"weights": {"raw": model, "ema": ema}, "step": 7}, tmp_path / "nested.pt")
    with pytest.raises(CheckpointError, match=r"nested.pt holds no model state dict"):
        open_checkpoint(tmp_path / "nested.pt")
    assert_same(read(checkpoint(tmp_path / "nested.pt", entry="weights/ema")), ema)
    assert_same(read(checkpoint(tmp_path / "nested.pt", entry=["weights", "raw"])), model)
    assert_same(read(f"{tmp_path / 'nested.pt'}::entry=weights/raw"), model)


def test_missing_entry_lists_what_is_there(tmp_path):
    model = tensors()
    torch.save({"model": model, "ema": tensors(1), "epoch": 2}, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError,
        match=r"c.pt has no entry 'model_ema' \(entry='model_ema'\); the top level holds 'model' "
        r"\(dict of 3 entries \(3 tensors\)\), 'ema' \(.*\), 'epoch' \(int\); the model state "
        r"dicts there: 'model', 'ema'\.",
    ):
        open_checkpoint(checkpoint(tmp_path / "c.pt", entry="model_ema"))
    with pytest.raises(
        CheckpointError,
        match=r"c.pt: the entry 'epoch' is a int, not a state dict mapping str names to tensors",
    ):
        open_checkpoint(checkpoint(tmp_path / "c.pt", entry="epoch"))
    with pytest.raises(CheckpointError, match=r"has no entry 'model/x' .*; model holds 'encoder"):
        open_checkpoint(checkpoint(tmp_path / "c.pt", entry="model/x"))


def test_prefix(tmp_path):
    model = tensors()
    torch.save({"model": model}, tmp_path / "p.pt")
    found = read(checkpoint(tmp_path / "p.pt", prefix="encoder."))
    assert list(found) == ["weight", "bias"]
    assert torch.equal(found["weight"], model["encoder.weight"])
    with pytest.raises(
        CheckpointError,
        match=r"p.pt: no tensor name starts with the prefix 'decoder\.' \(and has more after it\); "
        r"the names start with 'encoder\.', 'head\.'\. Give one of those, or prefix=''",
    ):
        open_checkpoint(checkpoint(tmp_path / "p.pt", prefix="decoder."))
    torch.save(model, tmp_path / "plain.pt")  # a prefix applies to a plain state dict too
    assert list(read(checkpoint(tmp_path / "plain.pt", prefix="head."))) == ["weight"]
    assert_same(read(tmp_path / "plain.pt"), model)  # a plain state dict: nothing stripped


def test_generic_checkpoints_keep_their_names(tmp_path):
    """Only Lightning's attribute prefix is stripped by itself; a fairseq or generic model
    whose names all share a first part keeps them."""
    model = {"encoder.weight": torch.ones(2, 2), "encoder.bias": torch.ones(2)}
    torch.save({"model": model, "epoch": 1}, tmp_path / "g.pt")
    assert list(read(tmp_path / "g.pt")) == ["encoder.weight", "encoder.bias"]


def test_entry_and_prefix_need_a_torch_file(tmp_path):
    save_file(tensors(), tmp_path / "m.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"m.safetensors::entry=model: entry= and prefix= choose the state dict inside one "
        r"torch file \(.pt, .pth, .bin, .ckpt\); give that file's path",
    ):
        open_checkpoint(checkpoint(tmp_path / "m.safetensors", entry="model"))


# --- the spec and its text form -------------------------------------------------------------------


def test_spec_text_round_trip(tmp_path):
    spec = checkpoint(tmp_path / "a.ckpt", entry="state_dict", prefix="model.")
    assert str(spec) == f"{tmp_path / 'a.ckpt'}::entry=state_dict,prefix=model."
    assert parse_spec(str(spec)) == spec
    assert parse_spec(f"{tmp_path}/a.ckpt::prefix=") == CheckpointSpec(
        tmp_path / "a.ckpt", None, ""
    )
    assert parse_spec(f"{tmp_path}/a.ckpt::ema") == CheckpointSpec(tmp_path / "a.ckpt", ("ema",))
    assert parse_spec(str(tmp_path / "a.ckpt")) is None
    odd = tmp_path / "odd::name.pt"  # a path that exists as written is a path
    odd.touch()
    assert parse_spec(str(odd)) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a.pt::entry=x,entry=y", r"cannot read the options 'entry=x,entry=y' after '::'; write"),
        ("a.pt::layer=3", r"cannot read the options 'layer=3'"),
        ("a.pt::x,y", r"cannot read the options 'x,y'"),
        ("::model", r"no path before '::'"),
        ("a.pt::entry=a//b", r"`entry` must name an entry"),
    ],
)
def test_spec_text_errors(text, message):
    with pytest.raises(CheckpointError, match=message):
        parse_spec(text)


def test_checkpoint_argument_errors():
    with pytest.raises(CheckpointError, match=r"takes the path of a checkpoint file"):
        checkpoint(3)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"`prefix` must be a str such as 'model.'"):
        checkpoint("a.pt", prefix=1)  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"`entry` must name an entry"):
        checkpoint("a.pt", entry=[1])  # type: ignore[list-item]


# --- weights-only loading -------------------------------------------------------------------------


def test_refused_globals_are_named_with_the_way_out(tmp_path):
    torch.save(
        {"model": tensors(), "args": argparse.Namespace(lr=0.1), "epoch": 3}, tmp_path / "t.pth"
    )
    with pytest.raises(
        CheckpointError,
        match=r"t.pth: torch.load\(weights_only=True\) refuses to unpickle argparse.Namespace, "
        r"which the checkpoint stores beside its tensors .* If you trust the file, allow it "
        r"before calling terge: torch.serialization.add_safe_globals\(\[Namespace\]\) \(from "
        r"argparse import Namespace\); or save the model's state dict alone",
    ):
        open_checkpoint(tmp_path / "t.pth")
    with torch.serialization.safe_globals([argparse.Namespace]):
        assert_same(read(tmp_path / "t.pth"), tensors())


# --- Lightning, written by Lightning -----------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_files(tmp_path_factory):
    pytest.importorskip("lightning", reason="Lightning checkpoints are written by Lightning")
    folder = tmp_path_factory.mktemp("lightning")
    network = lightning_run(folder, epochs=3, width=8)  # width: saved hyper-parameters
    return sorted(folder.glob("epoch=*.ckpt")), network


def test_lightning_checkpoint(lightning_files):
    files, network = lightning_files
    assert len(files) == 3
    with open_checkpoint(files[-1]) as reader:
        assert reader.selection is not None
        assert (reader.selection.entry, reader.selection.prefix) == (("state_dict",), "model.")
        assert reader.names() == list(network.state_dict())  # the inner network's names
        for name, tensor in network.state_dict().items():
            assert torch.equal(reader.get(name), tensor), name
    with open_checkpoint(checkpoint(files[-1], prefix="")) as reader:  # as Lightning names them
        assert reader.names() == [f"model.{name}" for name in network.state_dict()]


def test_lightning_checkpoints_merge(lightning_files, tmp_path):
    """The mean of Lightning checkpoints is the mean of the networks' state dicts, and merges
    with a plain safetensors file of the network (same names); the lineage records the entry
    and prefix read, and verify reads them back."""
    files, network = lightning_files
    loaded = [torch.load(f, weights_only=True)["state_dict"] for f in files]
    merged, lineage = terge.merge([os.fspath(f) for f in files], lineage=True)
    for name in network.state_dict():
        if not loaded[0][f"model.{name}"].is_floating_point():
            continue
        mean = sum(s[f"model.{name}"].double() for s in loaded) / 3
        assert torch.equal(merged[name], mean.float()), name
    assert [m.path for m in lineage.models] == [
        f"{f}::entry=state_dict,prefix=model." for f in files
    ]
    terge.save(network.state_dict(), tmp_path / "net.safetensors")
    mixed = terge.merge([tmp_path / "net.safetensors", files[0]])
    assert set(mixed) == set(network.state_dict())
    out = terge.merge(files, out=tmp_path / "avg", digests=True)
    from terge.audit import verify_lineage

    assert verify_lineage(terge.load_lineage(out), out) == []


def test_lightning_with_saved_hyperparameters_reads_weights_only(lightning_files):
    """save_hyperparameters() stores plain values: Lightning's files load with weights_only."""
    files, _ = lightning_files
    assert torch.load(files[0], weights_only=True)["hyper_parameters"] == {"width": 8}


# --- lazy: only the chosen entry's bytes are read -------------------------------------------------


def _resident_pages(path: Path) -> int:
    """How many pages of ``path`` are in the page cache (mincore on a fresh map of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
    if address in (None, ctypes.c_void_p(-1).value):
        pytest.skip(f"mmap failed (errno {ctypes.get_errno()})")
    try:
        if libc.mincore(address, size, vector) != 0:
            pytest.skip(f"mincore failed (errno {ctypes.get_errno()})")
    finally:
        libc.munmap(address, size)
    return sum(v & 1 for v in vector)


def _evict(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise and mincore")
def test_only_the_models_bytes_are_read(tmp_path):
    """A checkpoint of a 64 KiB model beside 16 MiB of optimizer state: opening it and reading
    every model tensor pages in the model's bytes, never the optimizer's."""
    model = {f"layer{i}.weight": torch.randn(64, 64) for i in range(4)}
    optimizer = {
        "state": {i: {"exp_avg": torch.randn(1024, 1024)} for i in range(4)},
        "param_groups": [{"lr": 0.1, "params": [0, 1, 2, 3]}],
    }
    path = tmp_path / "big.pt"
    torch.save({"model": model, "optimizer": optimizer, "epoch": 1}, path)
    _evict(path)
    if _resident_pages(path) > 16:
        pytest.skip("the file system keeps the file cached (posix_fadvise cannot evict it)")
    with open_checkpoint(path) as reader:
        total = sum(float(reader.get(name).sum()) for name in reader.names())
    assert total == pytest.approx(sum(float(t.sum()) for t in model.values()), rel=1e-4)
    resident = _resident_pages(path) * mmap.PAGESIZE
    optimizer_bytes = 4 * 1024 * 1024 * 4
    assert resident < optimizer_bytes / 8, f"{resident} bytes of the file were read"


def test_state_dicts_still_read_as_before(tmp_path):
    """A plain state dict is read as it is: no entry, no prefix."""
    state = states(1)[0]
    torch.save(state, tmp_path / "plain.bin")
    with open_checkpoint(tmp_path / "plain.bin") as reader:
        assert reader.selection is None
    assert_same(read(tmp_path / "plain.bin"), state)


# --- accelerate's save_state, written by accelerate -----------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_accelerate_save_state_folder(tmp_path, safe):
    """A save_state folder reads as its (first) model; optimizer.bin, the RNG and sampler states
    are left alone."""
    accelerate = pytest.importorskip("accelerate", reason="save_state folders are accelerate's")
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True)
    model, other = torch.nn.Linear(4, 2), torch.nn.Linear(3, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model, other, optimizer = accelerator.prepare(model, other, optimizer)
    accelerator.save_state(tmp_path / "state", safe_serialization=safe)
    names = {p.name for p in (tmp_path / "state").iterdir()}
    assert "optimizer.bin" in names and any(n.startswith("random_states") for n in names)
    with open_checkpoint(tmp_path / "state") as reader:
        weights = "model.safetensors" if safe else "pytorch_model.bin"
        assert [p.name for p in reader.files] == [weights]
    found, expected = read(tmp_path / "state"), model.state_dict()
    assert sorted(found) == sorted(expected)
    assert all(torch.equal(found[name], expected[name]) for name in expected)


def test_lightning_weight_averaging_reads_the_average(tmp_path):
    """Lightning's WeightAveraging saves the average as state_dict and the training weights as
    current_model_state: by Lightning's definition the model is state_dict (what
    load_from_checkpoint loads); the training weights are one entry= away."""
    pytest.importorskip("lightning", reason="Lightning checkpoints are written by Lightning")
    from lightning.pytorch.callbacks import WeightAveraging

    network = lightning_run(tmp_path, epochs=2, callbacks=[WeightAveraging()])
    last = sorted(tmp_path.glob("epoch=1*.ckpt"))[-1]
    saved = torch.load(last, weights_only=True)
    assert {"state_dict", "current_model_state"} <= set(saved)
    with open_checkpoint(last) as reader:
        assert (reader.selection.entry, reader.selection.prefix) == (("state_dict",), "model.")
        average = {name: reader.get(name) for name in reader.names()}
    assert torch.equal(average["0.weight"], saved["state_dict"]["model.0.weight"])
    assert not torch.equal(average["0.weight"], saved["current_model_state"]["model.0.weight"])
    current = read(checkpoint(last, entry="current_model_state", prefix="model."))
    assert torch.equal(current["0.weight"], saved["current_model_state"]["model.0.weight"])
    assert set(network.state_dict()) == set(average)


def test_an_empty_entry_is_the_top_level(tmp_path):
    """entry="" names the top level (as torchtitan's distributed checkpoints keep the model): a
    plain state dict read with it is itself."""
    torch.save({"w": torch.ones(2)}, tmp_path / "a.pt")
    assert terge.checkpoint(tmp_path / "a.pt", entry="").entry == ()
    assert torch.equal(
        terge.load(terge.checkpoint(tmp_path / "a.pt", entry=""))["w"], torch.ones(2)
    )


# --- mutation audit: behaviour no test above pinned -----------------------------------------------


def test_a_home_relative_path_is_the_users_home(tmp_path, monkeypatch):
    """`~` is expanded wherever a checkpoint is named: terge.checkpoint, a plain path and the
    text form; a path that exists as written (after `~`) is a path, `::` or not."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert checkpoint("~/a.pt", entry="ema").path == tmp_path / "a.pt"
    assert as_spec("~/a.pt") == CheckpointSpec(tmp_path / "a.pt")
    assert as_spec("~/a.pt::ema") == CheckpointSpec(tmp_path / "a.pt", ("ema",))
    (tmp_path / "odd::name.pt").touch()
    assert parse_spec("~/odd::name.pt") is None


def test_spec_text_forms_read_back_as_written(tmp_path):
    """The options are after the last `::` (a folder may have `::` in its name), a space after
    the comma is allowed, and a nested or top-level entry round-trips through str()."""
    assert parse_spec(f"{tmp_path}/run::3/a.pt::entry=model") == CheckpointSpec(
        tmp_path / "run::3" / "a.pt", ("model",)
    )
    assert parse_spec("a.pt::entry=ema, prefix=model.") == CheckpointSpec(
        Path("a.pt"), ("ema",), "model."
    )
    nested, top = checkpoint("a.pt", entry="ema/model"), checkpoint("a.pt", entry="")
    assert (str(nested), str(top)) == ("a.pt::entry=ema/model", "a.pt::entry=")
    assert parse_spec(str(nested)) == nested and parse_spec(str(top)) == top


def test_an_option_without_a_value_is_refused():
    """`entry` among several options needs `=KEY`; it is not read as the top level."""
    with pytest.raises(CheckpointError, match=r"cannot read the options 'entry,prefix=model\.'"):
        parse_spec("a.pt::entry,prefix=model.")


def test_a_model_with_scalar_buffers_and_int_keyed_tensors_beside_it(tmp_path):
    """A state dict with scalars beside its weights (BatchNorm's num_batches_tracked) is a model;
    a mapping of int keys to tensors (no names) is not one."""
    model = {"bn.weight": torch.ones(4), "bn.num_batches_tracked": torch.tensor(5)}
    torch.save({"model": model, "by_index": {0: torch.ones(4, 3)}, "epoch": 1}, tmp_path / "b.pt")
    assert_same(read(tmp_path / "b.pt"), model)


def test_listings_describe_each_entry_and_stop_at_twelve(tmp_path):
    """Error listings give a tensor's shape and a list's length, and show 12 entries at most."""
    torch.save({"losses": [0.5, 0.25, 0.125], "mask": torch.zeros(2, 3)}, tmp_path / "l.pt")
    with pytest.raises(
        CheckpointError, match=r"\(it holds 'losses' \(list of 3\), 'mask' \(tensor\[2, 3\]\)\)\."
    ):
        open_checkpoint(tmp_path / "l.pt")
    for count, end in [(12, r"'k11' \(int\)\)\."), (13, r"'k11' \(int\), \.\.\.\)\.")]:
        torch.save({f"k{i}": i for i in range(count)}, tmp_path / f"{count}.pt")
        with pytest.raises(CheckpointError, match=r"\(it holds 'k0' \(int\), .*" + end):
            open_checkpoint(tmp_path / f"{count}.pt")


def test_entry_errors_say_what_is_where(tmp_path):
    """A path through something that is no mapping, or an empty one, and an entry that is not a
    state dict, each say what is there; an entry of a plain state dict is a tensor, no model."""
    torch.save({"model": tensors(), "extra": {}, "epoch": 2}, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError,
        match=r"has no entry 'epoch/x' \(entry='epoch/x'\); epoch holds int\.$",
    ):
        open_checkpoint(checkpoint(tmp_path / "c.pt", entry="epoch/x"))
    with pytest.raises(CheckpointError, match=r"has no entry 'extra/x' .*; extra holds nothing\.$"):
        open_checkpoint(checkpoint(tmp_path / "c.pt", entry="extra/x"))
    torch.save({"model": tensors(), "optimizer": optimizer_state(tensors())}, tmp_path / "o.pt")
    with pytest.raises(
        CheckpointError,
        match=r"o.pt: the entry 'optimizer' is a dict of 2 entries \(0 tensors\), not a state dict "
        r"mapping str names to tensors only, e.g. 'state' is a dict; name the entry",
    ):
        open_checkpoint(checkpoint(tmp_path / "o.pt", entry="optimizer"))
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"the entry 'w' is a tensor\[2\], not a state dict"):
        open_checkpoint(checkpoint(tmp_path / "plain.pt", entry="w"))


def test_prefix_errors_and_a_prefix_on_a_plain_state_dict(tmp_path):
    """A prefix that is a whole name leaves nothing after it: refused; the names' first parts are
    listed sorted, or said to share none; a prefix read from a plain file is recorded."""
    torch.save({"z.w": torch.ones(2), "a.w": torch.ones(2), "b": torch.ones(1)}, tmp_path / "p.pt")
    with pytest.raises(
        CheckpointError,
        match=r"prefix 'z\.w' .*; the names start with 'a\.', 'z\.'\. Give one",
    ):
        open_checkpoint(checkpoint(tmp_path / "p.pt", prefix="z.w"))
    torch.save({f"m{i}.w": torch.ones(1) for i in range(12)}, tmp_path / "many.pt")
    with pytest.raises(
        CheckpointError,
        match=r"start with 'm0\.', 'm1\.', 'm10\.', 'm11\.', 'm2\.', 'm3\.', 'm4\.', 'm5\.', "
        r"'m6\.', 'm7\.'\. Give",
    ):
        open_checkpoint(checkpoint(tmp_path / "many.pt", prefix="x."))
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "n.pt")
    with pytest.raises(CheckpointError, match=r"the names start with no common prefix\. Give"):
        open_checkpoint(checkpoint(tmp_path / "n.pt", prefix="x."))
    with open_checkpoint(checkpoint(tmp_path / "p.pt", prefix="z.")) as reader:
        assert reader.names() == ["w"]
        assert reader.selection == Selection((), "z.")
        assert resolved(tmp_path / "p.pt", reader.selection) == f"{tmp_path / 'p.pt'}::prefix=z."


LIGHTNING = {"pytorch-lightning_version": "2.5.0", "epoch": 3, "global_step": 30}


def test_lightning_rules_by_hand(tmp_path):
    """Lightning's prefix is stripped only from its state_dict, only when every name has it (a
    parameter of the LightningModule itself keeps all names as they are); a timm state_dict
    keeps its names; a file with Lightning's key but no state_dict is read by the general rule."""
    inner = {"model.w": torch.ones(2), "model.b": torch.zeros(2)}
    torch.save(
        {**LIGHTNING, "state_dict": inner, "current_model_state": inner}, tmp_path / "l.ckpt"
    )
    assert list(read(tmp_path / "l.ckpt")) == ["w", "b"]
    with open_checkpoint(checkpoint(tmp_path / "l.ckpt", entry="current_model_state")) as reader:
        assert reader.names() == ["model.w", "model.b"]
        assert reader.selection == Selection(("current_model_state",), "")
    torch.save({**LIGHTNING, "state_dict": {**inner, "scale": torch.ones(1)}}, tmp_path / "s.ckpt")
    assert list(read(tmp_path / "s.ckpt")) == ["model.w", "model.b", "scale"]
    torch.save({"epoch": 3, "state_dict": inner}, tmp_path / "timm.pth")
    assert list(read(tmp_path / "timm.pth")) == ["model.w", "model.b"]
    torch.save({**LIGHTNING, "state_dict": {}}, tmp_path / "e.ckpt")  # no parameters: no names
    assert read(tmp_path / "e.ckpt") == {}
    torch.save({**LIGHTNING, "model": inner}, tmp_path / "m.ckpt")
    with open_checkpoint(tmp_path / "m.ckpt") as reader:
        assert reader.selection == Selection(("model",), "")


def test_refused_globals_all_listed_or_the_first_of_an_old_file(tmp_path):
    """Every global a zip file's pickle needs is listed (allow "them"); a legacy-format file,
    which torch cannot list, names the one its error names; other errors name none."""
    objects = {"args": argparse.Namespace(lr=0.1), "ratio": fractions.Fraction(1, 3)}
    torch.save({"model": tensors(), **objects}, tmp_path / "two.pth")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path / "two.pth")
    listed = str(info.value).split("refuses to unpickle ")[1].split(", which")[0]
    assert sorted(listed.split(", ")) == ["argparse.Namespace", "fractions.Fraction"]
    assert "allow them before calling terge" in str(info.value)
    assert refused_globals(tmp_path / "two.pth", RuntimeError("disk read failed")) == []
    legacy = tmp_path / "legacy.pth"
    torch.save({"model": tensors(), **objects}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"refuses to unpickle argparse\.Namespace, which"):
        open_checkpoint(legacy)


def test_training_state_files_beside_the_weights_are_left_alone(tmp_path):
    """In a folder whose weights have no transformers name (weights.pt), the state files a
    Trainer or accelerate's save_state leaves beside them (numbered ones too, a GradScaler's,
    the samplers', every rng_state*.pth) are never read as weights."""
    torch.save({"w": torch.ones(1)}, tmp_path / "weights.pt")
    names = [
        "training_args.bin",
        "optimizer.pt",
        "optimizer_1.bin",
        "optimizer_10.bin",
        "scheduler_1.bin",
        "scaler.pt",
        "sampler.bin",
        "sampler_1.bin",
        "dl_state_dict.bin",
        "dl_state_dict_1.bin",
        "rng_state.pth",
        "rng_state_7.pth",
        "rng_state_0_1.pth",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"pickled objects, not tensors")
    with open_checkpoint(tmp_path) as reader:
        assert reader.files == [tmp_path / "weights.pt"]
        assert reader.names() == ["w"]


def test_a_refused_class_in_a_package_is_imported_from_its_module(tmp_path):
    """The way out imports a class from its own module, however deep (omegaconf.dictconfig's
    DictConfig in a Hydra run's checkpoint; wsgiref.headers.Headers here)."""
    torch.save({"model": tensors(), "headers": wsgiref.headers.Headers([])}, tmp_path / "h.pt")
    with pytest.raises(
        CheckpointError,
        match=r"add_safe_globals\(\[Headers\]\) \(from wsgiref\.headers import Headers\);",
    ):
        open_checkpoint(tmp_path / "h.pt")


def test_an_empty_entry_is_checked_like_any_entry(tmp_path):
    """entry="" on a training checkpoint (not a plain state dict) is refused with what is there,
    not read as tensors."""
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 1}, tmp_path / "t.pt")
    with pytest.raises(
        CheckpointError,
        match=r"t.pt: the entry '' \(the top level\) is a dict of 2 entries \(0 tensors\), not a "
        r"state dict mapping str names to tensors only, e.g. 'model' is a dict",
    ):
        open_checkpoint(checkpoint(tmp_path / "t.pt", entry=""))
