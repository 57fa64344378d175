"""PEFT adapter folders read by hand-made files: the arithmetic in closed form, and every way a
config, a weights file or a base can be wrong, each refused with its words before any tensor is
computed. (PEFT itself is the oracle in ``tests/e2e/test_adapter_merges.py``.)"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import terge
from terge.io.adapters import Adapter, read_config, resolve_base_path
from terge.sources import AdapterSource

P = "base_model.model."


def base_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lin.weight": torch.randn(4, 3, generator=g),
        "lin.bias": torch.randn(4, generator=g),
        "emb.weight": torch.randn(10, 3, generator=g),
        "head.weight": torch.randn(2, 3, generator=g),
    }


def factors(r: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{P}lin.lora_A.weight": torch.randn(r, 3, generator=g),
        f"{P}lin.lora_B.weight": torch.randn(4, r, generator=g),
    }


def write(folder: Path, tensors: dict[str, torch.Tensor] | None = None, **config: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": None}
    settings.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    save_file(factors() if tensors is None else tensors, folder / "adapter_model.safetensors")
    return folder


def merged(folder: Path, base: Any = None) -> dict[str, torch.Tensor]:
    return terge.merge([terge.adapter(folder, base=base_state() if base is None else base)])


def test_the_delta_is_scaling_b_a_in_float64_rounded_once(tmp_path):
    folder = write(tmp_path / "a")
    out = merged(folder)
    f = factors()
    a, b = f[f"{P}lin.lora_A.weight"].double(), f[f"{P}lin.lora_B.weight"].double()
    expected = (base_state()["lin.weight"].double() + 2.0 * (b @ a)).float()
    assert torch.equal(out["lin.weight"], expected)
    for name in ("lin.bias", "emb.weight", "head.weight"):
        assert torch.equal(out[name], base_state()[name])


def test_rslora_scales_by_the_square_root_of_the_rank(tmp_path):
    out = merged(write(tmp_path / "a", use_rslora=True))
    f = factors()
    a, b = f[f"{P}lin.lora_A.weight"].double(), f[f"{P}lin.lora_B.weight"].double()
    expected = (base_state()["lin.weight"].double() + (4 / math.sqrt(2)) * (b @ a)).float()
    assert torch.equal(out["lin.weight"], expected)


def test_patterns_match_at_a_dot_boundary_as_peft_matches_them(tmp_path):
    config = read_config(write(tmp_path / "a", rank_pattern={"lin": 3}, alpha_pattern={"in": 9}))
    assert config.rank_and_alpha("model.lin") == (3, 4.0)  # "in" is no whole name part
    assert config.rank_and_alpha("x.in") == (2, 9.0)
    assert config.rank_and_alpha("xlin") == (2, 4.0)


def test_an_embedding_delta_is_transposed(tmp_path):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(2, 10, generator=g), torch.randn(3, 2, generator=g)
    folder = write(tmp_path / "a", {f"{P}emb.lora_embedding_A": a, f"{P}emb.lora_embedding_B": b})
    expected = (base_state()["emb.weight"].double() + 2.0 * (b.double() @ a.double()).T).float()
    assert torch.equal(merged(folder)["emb.weight"], expected)


def test_fan_in_fan_out_transposes_the_delta(tmp_path):
    base = {"conv.weight": torch.randn(3, 4)}  # Conv1D: (in, out)
    tensors = {
        f"{P}conv.lora_A.weight": torch.randn(2, 3),
        f"{P}conv.lora_B.weight": torch.randn(4, 2),
    }
    folder = write(tmp_path / "a", tensors, fan_in_fan_out=True)
    a, b = (t.double() for t in tensors.values())
    expected = (base["conv.weight"].double() + 2.0 * (b @ a).T).float()
    assert torch.equal(terge.merge([terge.adapter(folder, base=base)])["conv.weight"], expected)
    plain = write(tmp_path / "b", tensors)
    with pytest.raises(terge.AdapterError, match=r"needs fan_in_fan_out=true"):
        terge.merge([terge.adapter(plain, base=base)])


def test_a_saved_whole_tensor_replaces_the_bases(tmp_path):
    head = torch.full((2, 3), 7.0)
    folder = write(tmp_path / "a", {**factors(), f"{P}head.modules_to_save.default.weight": head})
    assert torch.equal(merged(folder)["head.weight"], head)


def test_a_bfloat16_base_is_rounded_once_from_float64(tmp_path):
    folder = write(tmp_path / "a")
    base = {k: v.bfloat16() for k, v in base_state().items()}
    out = terge.merge([terge.adapter(folder, base=base)])
    f = factors()
    a, b = f[f"{P}lin.lora_A.weight"].double(), f[f"{P}lin.lora_B.weight"].double()
    expected = (base["lin.weight"].double() + 2.0 * (b @ a)).bfloat16()
    assert out["lin.weight"].dtype == torch.bfloat16
    assert torch.equal(out["lin.weight"], expected)


def test_the_base_named_in_the_config_is_read_from_its_path(tmp_path):
    base_file = tmp_path / "base.safetensors"
    save_file(base_state(), base_file)
    folder = write(tmp_path / "a", base_model_name_or_path=str(base_file))
    assert torch.equal(terge.merge([str(folder)])["lin.weight"], merged(folder)["lin.weight"])
    assert resolve_base_path(str(base_file), folder) == base_file


def test_the_source_computes_each_tensor_only_when_asked(tmp_path, monkeypatch):
    folder = write(tmp_path / "a")
    source = AdapterSource(terge.adapter(folder, base=base_state()), buffers=False)
    calls: list[str] = []
    original = Adapter._factors
    monkeypatch.setattr(Adapter, "_factors", lambda self, n: calls.append(n) or original(self, n))
    assert source.entries["lin.weight"].dtype == torch.float32  # the base's, for the output
    assert calls == []
    assert source.get("lin.weight").dtype == torch.float64  # rounded once, by the merge
    assert source.get("lin.bias") is source.base.get("lin.bias")
    assert calls == ["lin.weight"]
    source.close()


# --- errors: each names what is wrong and what to do ---------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"peft_type": "IA3"}, r"is a 'IA3' adapter; terge merges LoRA adapters"),
        ({"peft_type": None}, r"is a None adapter"),
        ({"r": 0}, r"r must be a positive int; got 0"),
        ({"r": "4"}, r"r must be a positive int; got '4'"),
        ({"r": True}, r"r must be a positive int; got True"),
        ({"lora_alpha": float("inf")}, r"lora_alpha must be a finite number; got inf"),
        ({"lora_alpha": True}, r"lora_alpha must be a finite number; got True"),
        ({"alpha_pattern": {"lin": False}}, r"alpha_pattern\['lin'\] must be a finite number"),
        ({"use_rslora": "yes"}, r"use_rslora must be true or false; got 'yes'"),
        ({"bias": "some"}, r"bias must be 'none', 'all' or 'lora_only'; got 'some'"),
        ({"layer_replication": [[0, 2]]}, r"sets layer_replication=.*duplicates layers"),
        ({"trainable_token_indices": [1]}, r"sets trainable_token_indices"),
        ({"rank_pattern": {"lin(": 2}}, r"rank_pattern key 'lin\(' is not a regular expression"),
        ({"rank_pattern": {"lin": 0}}, r"rank_pattern\['lin'\] must be a positive int; got 0"),
        ({"alpha_pattern": {"lin": "x"}}, r"alpha_pattern\['lin'\] must be a finite number"),
        ({"rank_pattern": {"x" * 1001: 2}}, r"1001 characters long"),
        ({"rank_pattern": ["lin"]}, r"rank_pattern must be an object"),
        ({"r": 3}, r"says r=3 for 'lin' .* has shape \(2, 3\)"),
        ({"rank_pattern": {"lin": 5}}, r"says r=5 for 'lin'"),
        ({"use_dora": True}, r"use_dora=true but has no lora_magnitude_vector for 'lin'"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(tmp_path, config, message):
    folder = write(tmp_path / "a", **config)
    with pytest.raises(terge.AdapterError, match=message):
        merged(folder)


def test_null_flags_read_as_false(tmp_path):
    """PEFT writes null for flags it leaves unset; they read as false (plain LoRA), not as a
    wrong type."""
    folder = write(tmp_path / "a", use_rslora=None, use_dora=None, fan_in_fan_out=None)
    config = read_config(folder)
    assert (config.use_rslora, config.use_dora, config.fan_in_fan_out) == (False, False, False)
    f = factors()
    a, b = f[f"{P}lin.lora_A.weight"].double(), f[f"{P}lin.lora_B.weight"].double()
    expected = (base_state()["lin.weight"].double() + 2.0 * (b @ a)).float()
    assert torch.equal(merged(folder)["lin.weight"], expected)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"{not json", r"is not readable JSON"),
        (b"[1, 2]", r"must hold a JSON object; got list"),
        (b"\xff\xfe", r"is not readable JSON"),
        (b" " * (1 << 20) + b"{}", r"an adapter config is a few kilobytes"),
        (b" " * ((1 << 20) - 1) + b"{}", r"is 1048577 bytes; an adapter config is a few kil"),
        (b" " * ((1 << 20) - 2) + b"{}", r"is a None adapter; terge merges LoRA adapters"),
    ],
)
def test_a_config_that_is_no_json_object_is_refused(tmp_path, text, message):
    folder = write(tmp_path / "a")
    (folder / "adapter_config.json").write_bytes(text)
    with pytest.raises(terge.AdapterError, match=message):
        merged(folder)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"lin.lora_A.weight": torch.ones(2, 3)}, r"not a PEFT tensor name"),
        ({f"{P}lin.lora_A.weight": torch.ones(2, 3)}, r"no lora_B: a LoRA module needs both"),
        ({f"{P}lin.lora_B.weight": torch.ones(4, 2)}, r"no lora_A"),
        ({f"{P}lin.lora_A.default.weight": torch.ones(2, 3)}, r"a LoRA tensor terge does not"),
        ({f"{P}lin.lora_E": torch.ones(2)}, r"a LoRA tensor terge does not know"),
        (
            {**factors(), f"{P}lin.lora_magnitude_vector": torch.ones(4)},
            r"DoRA magnitude for 'lin' but its config says use_dora=false",
        ),
        (
            {f"{P}x.lora_A.weight": torch.ones(2, 3), f"{P}x.lora_B.weight": torch.ones(4, 2)},
            r"adapts the module 'x', but the base has no tensor 'x.weight'",
        ),
        (
            {f"{P}lin.lora_A.weight": torch.ones(2, 5), f"{P}lin.lora_B.weight": torch.ones(4, 2)},
            r"should be \(out, in\) = \(4, 5\), but the base's 'lin.weight' is \(4, 3\)",
        ),
        (
            {f"{P}lin.lora_A.weight": torch.ones(2, 3), f"{P}lin.lora_B.weight": torch.ones(4, 3)},
            r"lora_B must be \(out_features, r\)",
        ),
        (
            {
                f"{P}lin.lora_A.weight": torch.ones(2, 3),
                f"{P}lin.lora_B.weight": torch.ones(4, 2, 1),
            },
            r"lin\.lora_B\.weight' has shape \(4, 2, 1\), but lora_A has 2 rows; lora_B must",
        ),
        (
            {
                f"{P}lin.lora_A.weight": torch.ones(2, 3, 1, 1),
                f"{P}lin.lora_B.weight": torch.ones(4, 2, 1, 1),
            },
            r"LoRA on convolutions is not merged",
        ),
        (
            {
                f"{P}lin.lora_A.weight": torch.ones(2, 3, dtype=torch.int32),
                f"{P}lin.lora_B.weight": torch.ones(4, 2),
            },
            r"is torch.int32, not floating point",
        ),
        (
            {**factors(), f"{P}nothing.weight": torch.ones(2)},
            r"the base has no tensor 'nothing.weight'",
        ),
        (
            {**factors(), f"{P}lin.base_layer.bias": torch.ones(5)},
            r"has shape \(5,\), but the base's 'lin.bias' is \(4,\)",
        ),
        (
            {**factors(), f"{P}head.weight": torch.ones(2, 3, dtype=torch.int64)},
            r"its 'base_model\.model\.head\.weight' is torch\.int64 but the base's 'head\.weight' "
            r"is torch\.float32; a saved tensor must keep its kind",
        ),
        (
            {
                f"{P}emb.lora_embedding_A": torch.ones(2, 10),
                f"{P}emb.lora_B.weight": torch.ones(3, 2),
            },
            r"mixes embedding and linear factors",
        ),
    ],
)
def test_weights_that_do_not_fit_are_refused_before_anything_is_computed(
    tmp_path, tensors, message, monkeypatch
):
    folder = write(tmp_path / "a", tensors)
    monkeypatch.setattr(Adapter, "_factors", lambda *a: pytest.fail("computed before checking"))
    with pytest.raises(terge.AdapterError, match=message):
        merged(folder)


def test_dora_on_an_embedding_is_refused(tmp_path):
    """PEFT's DoRA on an embedding rescales differently from a linear layer's rows; terge
    does not merge it and says so, rather than merging it as if it were linear."""
    tensors = {
        f"{P}emb.lora_embedding_A": torch.ones(2, 10),
        f"{P}emb.lora_embedding_B": torch.ones(3, 2),
        f"{P}emb.lora_magnitude_vector": torch.ones(3),
    }
    folder = write(tmp_path / "a", tensors, use_dora=True)
    with pytest.raises(
        terge.AdapterError,
        match=r"a uses DoRA on the embedding 'emb', which terge does not merge; merge it with",
    ):
        merged(folder)


def test_an_integer_base_tensor_is_refused(tmp_path):
    """A LoRA delta is added to a floating weight; an integer (quantised) base weight is
    refused by name rather than rounded."""
    base = {**base_state(), "lin.weight": torch.ones(4, 3, dtype=torch.int64)}
    with pytest.raises(
        terge.AdapterError, match=r"a: the base's 'lin.weight' is torch.int64, not floating\."
    ):
        merged(write(tmp_path / "a"), base)


@pytest.mark.parametrize(
    ("extra", "config", "message"),
    [
        (
            {f"{P}lin.lora_magnitude_vector": torch.ones(5)},
            {"use_dora": True},
            r"the DoRA magnitude 'base_model\.model\.lin\.lora_magnitude_vector' has shape "
            r"\(5,\), not \(4,\)\.",
        ),
        (
            {f"{P}lin.lora_B.bias": torch.ones(5)},
            {"lora_bias": True},
            r"'base_model\.model\.lin\.lora_B\.bias' \(lora_bias\) needs the base's 'lin\.bias' "
            r"of shape \(5,\), but the base has \(4,\)\.",
        ),
    ],
)
def test_a_magnitude_or_lora_bias_of_the_wrong_size_is_refused(tmp_path, extra, config, message):
    """DoRA's magnitude holds one norm per output row and a LoRA bias is added to the base's
    bias: either of another length is refused before anything is computed."""
    folder = write(tmp_path / "a", {**factors(), **extra}, **config)
    with pytest.raises(terge.AdapterError, match=message):
        merged(folder)


def test_an_adapter_without_weights_or_with_broken_weights_is_refused(tmp_path):
    folder = write(tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(terge.AdapterError, match=r"has adapter_config.json but no weights"):
        merged(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(terge.AdapterError, match=r"weights .* cannot be read"):
        merged(folder)


@pytest.mark.parametrize(
    ("named", "message"),
    [
        (None, r"does not say which model it adapts .* terge.adapter\("),
        (
            "meta-llama/Llama-3-8B",  # a Hub id, not in the (empty, offline) cache
            r"trained on 'meta-llama/Llama-3-8B', a Hub model that cannot be read here",
        ),
        ("no such base", r"trained on 'no such base', which is no file or folder here nor"),
        (7, r"base_model_name_or_path must be a str"),
    ],
)
def test_a_base_that_cannot_be_found_says_how_to_pass_it(tmp_path, monkeypatch, named, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    folder = write(tmp_path / "a", base_model_name_or_path=named)
    with pytest.raises(terge.AdapterError, match=message):
        terge.merge([str(folder)])
    with pytest.raises(terge.AdapterError, match=r"base=model_or_path"):
        terge.merge([terge.adapter(folder)])


def test_an_adapter_over_an_adapter_is_refused(tmp_path):
    inner = write(tmp_path / "inner")
    outer = write(tmp_path / "outer", base_model_name_or_path=str(inner))
    with pytest.raises(terge.AdapterError, match=r"is itself an adapter"):
        terge.merge([str(outer)])


def test_terge_adapter_wants_an_adapter_folder(tmp_path):
    with pytest.raises(terge.AdapterError, match=r"no adapter_config.json there"):
        terge.adapter(tmp_path)
    with pytest.raises(terge.AdapterError, match=r"path must be the adapter's folder"):
        terge.adapter(3)  # type: ignore[arg-type]


def test_two_changes_to_one_tied_tensor_are_refused(tmp_path):
    shared = torch.randn(4, 3)
    base = {"lin.weight": shared, "tied.weight": shared}
    tensors = {
        **factors(),
        f"{P}tied.lora_A.weight": torch.ones(2, 3),
        f"{P}tied.lora_B.weight": torch.ones(4, 2),
    }
    folder = write(tmp_path / "a", tensors)
    with pytest.raises(terge.AdapterError, match=r"changes both 'lin.weight' and 'tied.weight'"):
        terge.merge([terge.adapter(folder, base=base)])


def test_a_file_merge_of_an_adapter_refuses_to_write_into_the_adapter_folder(tmp_path):
    folder = write(tmp_path / "a")
    base_file = tmp_path / "base.safetensors"
    save_file(base_state(), base_file)
    with pytest.raises(terge.CheckpointError, match=r"inside"):
        terge.merge([terge.adapter(folder, base=str(base_file))], out=folder / "out")


def test_an_adapter_saved_as_bin_reads_like_safetensors(tmp_path):
    folder = write(tmp_path / "a")
    expected = merged(folder)["lin.weight"]
    (folder / "adapter_model.safetensors").unlink()
    torch.save(factors(), folder / "adapter_model.bin")
    assert torch.equal(merged(folder)["lin.weight"], expected)


def test_a_dry_run_of_an_adapter_merge_computes_nothing(tmp_path, monkeypatch):
    folder = write(tmp_path / "a")
    monkeypatch.setattr(Adapter, "_factors", lambda *a: pytest.fail("a dry run computed"))
    record = terge.merge([terge.adapter(folder, base=base_state())] * 2, dry_run=True)
    assert record.models[0].kind == "adapter"
    assert record.models[0].adapter == {
        "base": {"kind": "state_dict", "path": None},
        "r": [2],
        "lora_alpha": [4.0],
        "use_rslora": False,
        "use_dora": False,
        "modules": 1,
        "whole": 0,
    }


def test_adapted_tensors_reuse_one_float64_buffer_unless_the_base_is_float64(tmp_path):
    tensors = {
        **factors(),
        f"{P}head.lora_A.weight": torch.randn(2, 3),
        f"{P}head.lora_B.weight": torch.randn(2, 2),
    }
    folder = write(tmp_path / "a", tensors)
    source = AdapterSource(terge.adapter(folder, base=base_state()), buffers=False)
    first = source.get("lin.weight").clone()
    head = source.get("head.weight")
    assert source.scratch is not None and source.scratch.numel() == 12  # the largest, 4 x 3
    assert head.data_ptr() == source.scratch.data_ptr()  # allocated once, reused
    assert torch.equal(source.get("lin.weight"), first)  # recomputed, same values
    source.close()
    wide = {k: v.double() for k, v in base_state().items()}
    source = AdapterSource(terge.adapter(folder, base=wide), buffers=False)
    one, two = source.get("lin.weight"), source.get("head.weight")
    assert source.scratch is None and one.data_ptr() != two.data_ptr()  # fresh: the base's dtype
    assert torch.equal(one, first)  # a float32 base widened exactly: the same sums
    source.close()


def test_the_command_line_merges_adapter_folders(tmp_path, capsys):
    from terge.cli import main

    base_file = tmp_path / "base.safetensors"
    save_file(base_state(), base_file)
    folders = [
        write(tmp_path / name, factors(seed=seed), base_model_name_or_path=str(base_file))
        for name, seed in (("a", 1), ("b", 2))
    ]
    out = tmp_path / "soup"
    assert main(["merge", *map(str, folders), "-o", str(out), "-q"]) == 0
    written = terge.load(out)
    expected = terge.merge([str(f) for f in folders])
    assert all(torch.equal(written[n], expected[n]) for n in expected)
    lineage = terge.load_lineage(out / "lineage.json")
    assert [m.kind for m in lineage.models] == ["adapter", "adapter"]


def test_a_distributed_merge_refuses_adapters_before_any_talk(tmp_path):
    folder = write(tmp_path / "a")
    for model in (str(folder), terge.adapter(folder, base=base_state())):
        with pytest.raises(terge.MergeArgumentError, match=r"is the PEFT adapter .* base first"):
            terge.merge([model, model], out=tmp_path / "out", distributed=True)


def test_an_adapter_file_linked_out_of_its_folder_is_refused(tmp_path):
    """terge reads no file outside a checkpoint folder: a weights file that is a link to
    somewhere else is refused before it is opened."""
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc"]})
    )
    elsewhere = tmp_path / "secret.safetensors"
    save_file({"base_model.model.fc.lora_A.weight": torch.zeros(2, 3)}, elsewhere)
    (folder / "adapter_model.safetensors").symlink_to(elsewhere)
    with pytest.raises(terge.AdapterError, match=r"adapter_model.safetensors resolves to .*secret"):
        Adapter(folder)


def test_an_adapter_config_linked_out_of_its_folder_is_refused(tmp_path):
    """The config is a file of the folder too: a link to a config elsewhere is refused
    before it is read, like a linked weights file."""
    folder = write(tmp_path / "adapter")
    elsewhere = tmp_path / "secret.json"
    (folder / "adapter_config.json").replace(elsewhere)
    (folder / "adapter_config.json").symlink_to(elsewhere)
    with pytest.raises(
        terge.AdapterError,
        match=r"adapter: adapter_config\.json resolves to .*secret\.json, outside the adapter "
        r"folder; terge reads a folder's files only from inside it",
    ):
        Adapter(folder)


def test_a_backtracking_rank_pattern_is_stopped(monkeypatch):
    """rank_pattern keys are regular expressions from a file: one that backtracks without end
    is stopped by a timeout with a clear error, not left to hang the merge."""
    from terge.io import adapters

    monkeypatch.setattr(adapters, "PATTERN_TIMEOUT", 0.05)
    evil = "(a|aa)+c"  # exponential in the regex module's engine too
    with pytest.raises(terge.AdapterError, match=r"took over 0.05 s to match"):
        adapters._pattern_key({evil: 4}, "a" * 40)
