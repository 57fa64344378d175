"""The PEFT adapter folder writer: PEFT's names, its config, written whole or not at all."""

from __future__ import annotations

import json
import re

import pytest
import torch
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


def test_the_folder_holds_one_weights_file_and_the_config(tmp_path):
    factors = {"base_model.model.fc.lora_A.weight": torch.ones(2, 5)}
    with AdapterWriter(tmp_path / "a") as writer:
        for name, tensor in factors.items():
            writer.add(name, tensor)
        writer.write_config({"r": 2})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    assert json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text()) == {"r": 2}
    assert torch.equal(
        load_file(tmp_path / "a" / ADAPTER_WEIGHTS)[next(iter(factors))], torch.ones(2, 5)
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
    with pytest.raises(CheckpointError, match="already exists"):
        AdapterWriter(tmp_path / "a")
