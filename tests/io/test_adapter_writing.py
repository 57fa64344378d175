"""The PEFT adapter folder writer: PEFT's names, its config, written whole or not at all."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from terge.errors import CheckpointError
from terge.io.adapter_writing import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterWriter,
    adapter_config,
    lora_bias_name,
    lora_names,
    saved_name,
)


def test_the_names_are_peft_s():
    assert lora_names("model.q", embedding=False) == (
        "base_model.model.model.q.lora_A.weight",
        "base_model.model.model.q.lora_B.weight",
    )
    assert lora_names("wte", embedding=True) == (
        "base_model.model.wte.lora_embedding_A",
        "base_model.model.wte.lora_embedding_B",
    )
    assert lora_bias_name("fc") == "base_model.model.fc.lora_B.bias"
    assert saved_name("model.norm.weight") == "base_model.model.model.norm.weight"


def test_the_config_takes_the_most_common_rank_and_patterns_the_rest():
    config = adapter_config(
        ranks={"a.q": 4, "a.k": 4, "b.up": 8, "b.down": 2},
        fan_in_fan_out=False,
        modules_to_save=["norm"],
        lora_bias=False,
        base_model_name_or_path="base",
        task_type="CAUSAL_LM",
    )
    assert (config["r"], config["lora_alpha"]) == (4, 4)
    assert config["rank_pattern"] == config["alpha_pattern"] == {r"b\.down": 2, r"b\.up": 8}
    assert config["target_modules"] == ["a.k", "a.q", "b.down", "b.up"]
    assert config["modules_to_save"] == ["norm"]
    # PEFT matches pattern keys as (.*\.)?(key)$: the escaped name matches that module alone
    assert re.match(rf"(.*\.)?({next(iter(config['rank_pattern']))})$", "b.down")
    assert not re.match(rf"(.*\.)?({next(iter(config['rank_pattern']))})$", "bxdown")


def test_the_config_in_full_is_plain_lora_of_scaling_one():
    """Every key, pinned: plain LoRA (no DoRA, rsLoRA, dropout or trained biases), loaded for
    inference, the base and task type as given, modules_to_save sorted."""
    config = adapter_config(
        ranks={"fc": 4},
        fan_in_fan_out=False,
        modules_to_save=["norm", "lm_head"],
        lora_bias=False,
        base_model_name_or_path="base",
        task_type="CAUSAL_LM",
    )
    assert config == {
        "alpha_pattern": {},
        "base_model_name_or_path": "base",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": 4,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "modules_to_save": ["lm_head", "norm"],
        "peft_type": "LORA",
        "r": 4,
        "rank_pattern": {},
        "target_modules": ["fc"],
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def test_without_factored_modules_r_is_peft_s_default():
    """An adapter of whole saved modules alone: r and lora_alpha are PEFT's default 8 (scaling
    1), with no target module and no pattern."""
    config = adapter_config(
        ranks={},
        fan_in_fan_out=False,
        modules_to_save=["norm"],
        lora_bias=False,
        base_model_name_or_path=None,
        task_type=None,
    )
    assert (config["r"], config["lora_alpha"]) == (8, 8)
    assert config["target_modules"] == [] and config["rank_pattern"] == {}


def test_a_tie_of_ranks_takes_the_smallest():
    config = adapter_config(
        ranks={"a": 8, "b": 2},
        fan_in_fan_out=True,
        modules_to_save=[],
        lora_bias=True,
        base_model_name_or_path=None,
        task_type=None,
    )
    assert config["r"] == 2 and config["rank_pattern"] == {"a": 8}
    assert config["modules_to_save"] is None
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is True
    assert config["base_model_name_or_path"] is None and config["task_type"] is None


def test_the_folder_holds_one_weights_file_and_the_config(tmp_path):
    """PEFT's two file names, literally; every factor in the one file (none flushed part-way),
    with the metadata given beside safetensors' format; ``files`` names both."""
    factors = {
        "base_model.model.fc.lora_A.weight": torch.ones(2, 5),
        "base_model.model.fc.lora_B.weight": torch.full((3, 2), 2.0),
    }
    with AdapterWriter(tmp_path / "a", metadata={"source": "terge"}) as writer:
        for name, tensor in factors.items():
            writer.add(name, tensor)
        writer.write_config({"r": 2})
    folder = tmp_path / "a"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (ADAPTER_CONFIG, ADAPTER_WEIGHTS) == ("adapter_config.json", "adapter_model.safetensors")
    assert writer.files == [folder / "adapter_model.safetensors", folder / "adapter_config.json"]
    assert json.loads((folder / ADAPTER_CONFIG).read_text()) == {"r": 2}
    loaded = load_file(folder / ADAPTER_WEIGHTS)
    assert loaded.keys() == factors.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in factors.items())
    with safe_open(folder / ADAPTER_WEIGHTS, "pt") as weights:
        assert weights.metadata() == {"format": "pt", "source": "terge"}


def test_the_config_file_is_written_as_peft_writes_it(tmp_path):
    """``json.dumps(indent=2, sort_keys=True)``, as ``PeftConfig.save_pretrained``, and a final
    newline: the same config gives the same bytes whatever the order of its keys."""
    with AdapterWriter(tmp_path / "a") as writer:
        writer.add("x", torch.ones(1))
        writer.write_config({"r": 2, "alpha_pattern": {"b": 1, "a": 3}})
    assert (tmp_path / "a" / ADAPTER_CONFIG).read_text() == (
        '{\n  "alpha_pattern": {\n    "a": 3,\n    "b": 1\n  },\n  "r": 2\n}\n'
    )


def test_a_failure_leaves_nothing_and_an_existing_folder_is_refused(tmp_path):
    def fail() -> None:
        with AdapterWriter(tmp_path / "a") as writer:
            writer.add("x", torch.ones(2))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        AdapterWriter(tmp_path / "a")


def test_overwrite_replaces_and_an_output_inside_an_input_is_refused(tmp_path):
    """``overwrite`` and ``inputs`` reach the atomic writer: the old folder is replaced whole,
    and an output inside a folder being read is refused before anything is written."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stale.txt").write_text("old")
    with AdapterWriter(tmp_path / "a", overwrite=True) as writer:
        writer.add("x", torch.ones(2))
        writer.write_config({"r": 1})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    with pytest.raises(CheckpointError, match=r"is inside the input .*choose an output folder"):
        AdapterWriter(tmp_path / "a" / "b", inputs=[tmp_path / "a"])
    assert not (tmp_path / "a" / "b").exists()
