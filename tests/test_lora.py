"""LoRA out: extract_lora and merge(out_format="lora"), checked against PEFT loading the adapter.

The models are tiny Llama and GPT-2 models built from configs in code. A fine-tune-like change
that is exactly low-rank must come back exactly (logits equal to float32 rounding); a full-rank
one within the truncation error the adapter reports, shrinking as the rank grows.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

import terge
from terge.errors import CheckpointError, LoraLeftOutWarning, MergeArgumentError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LLAMA = {
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
GPT2 = {"vocab_size": 64, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32}


def llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**GPT2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def tuned_copy(
    model: torch.nn.Module,
    make,
    rank: int | None,
    *,
    seed: int = 1,
    norms=False,
    biases=False,
    embeddings=False,
) -> torch.nn.Module:
    """A fine-tune-like copy of ``model``: every projection moved by a rank-``rank`` change
    (full rank with None); norms, biases and embeddings moved when asked."""
    tuned = make()
    tuned.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            is_embedding = any(k in name for k in ("embed", "wte", "wpe", "lm_head"))
            if p.dim() == 2 and (not is_embedding or embeddings):
                inner = min(p.shape) if rank is None else rank
                left = torch.randn(p.shape[0], inner, generator=generator)
                p += 0.3 * left @ torch.randn(inner, p.shape[1], generator=generator) / inner
            elif p.dim() == 1 and (
                (norms and ("norm" in name or "ln_" in name)) or (biases and name.endswith("bias"))
            ):
                p += 0.1 * torch.randn(p.shape, generator=generator)
    return tuned


def load_peft(make, base: torch.nn.Module, adapter) -> torch.nn.Module:
    """The base with the adapter loaded by PEFT, asserting PEFT warned of no missing or
    unexpected keys."""
    fresh = make()
    fresh.load_state_dict(base.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(fresh, str(adapter)).eval()
    keys = [str(w.message) for w in caught if re.search("missing|unexpected", str(w.message), re.I)]
    assert keys == []
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))


def logit_gap(a: torch.nn.Module, b: torch.nn.Module) -> float:
    with torch.no_grad():
        x = tokens()
        return float((a(x).logits - b(x).logits).abs().max())


# --- exact: an exactly low-rank change comes back exactly -----------------------------------------


@pytest.mark.parametrize("as_files", [False, True])
def test_llama_low_rank_change_is_exact_and_peft_loads_it(tmp_path, as_files):
    base = llama()
    tuned = tuned_copy(base, llama, rank=2, norms=True)
    if as_files:
        base.save_pretrained(tmp_path / "base")
        tuned.save_pretrained(tmp_path / "tuned")
        adapter = terge.extract_lora(tmp_path / "tuned", tmp_path / "base", tmp_path / "a", rank=2)
    else:
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=2)
    assert len(adapter.modules) == 14  # 7 projections in each of 2 blocks
    assert all(m.rank == 2 and m.error < 1e-6 for m in adapter.modules.values())
    assert sorted(adapter.modules_to_save) == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm",
        "model.layers.1.post_attention_layernorm",
        "model.norm",
    ]
    assert adapter.left_out == {}
    assert logit_gap(load_peft(llama, base, tmp_path / "a"), tuned) < 1e-5
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 2)
    assert config["fan_in_fan_out"] is False and config["lora_bias"] is False
    if as_files:
        assert config["base_model_name_or_path"] == str(tmp_path / "base")
    record = json.loads((tmp_path / "a" / "lora.json").read_text())
    assert record["modules"]["model.layers.0.mlp.up_proj"]["rank"] == 2
    assert record["modules"]["model.layers.0.mlp.up_proj"]["shape"] == [32, 16]


@pytest.mark.parametrize("as_files", [False, True])
def test_gpt2_conv1d_and_biases_are_exact(tmp_path, as_files):
    base = gpt2()
    tuned = tuned_copy(base, gpt2, rank=3, norms=True, biases=True)
    if as_files:  # no module says Conv1D: config.json's model_type does
        base.save_pretrained(tmp_path / "base")
        tuned.save_pretrained(tmp_path / "tuned")
        adapter = terge.extract_lora(tmp_path / "tuned", tmp_path / "base", tmp_path / "a", rank=3)
    else:
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=3)
    assert {m.layout for m in adapter.modules.values()} == {"conv1d"}
    assert adapter.biases == [
        f"transformer.h.{i}.{m}"
        for i in (0, 1)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["lora_bias"] is True
    record = json.loads((tmp_path / "a" / "lora.json").read_text())
    assert record["biases"] == adapter.biases
    assert {m["layout"] for m in record["modules"].values()} == {"conv1d"}
    assert logit_gap(load_peft(gpt2, base, tmp_path / "a"), tuned) < 1e-5


def test_a_conv1d_file_read_as_linear_is_not_exact(tmp_path):
    """fan_in_fan_out=False forced on GPT-2's files factors the transposed difference: the
    adapter then fails to load (shapes), which is why the layout is read from config.json."""
    base = gpt2()
    tuned = tuned_copy(base, gpt2, rank=3)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    adapter = terge.extract_lora(
        tmp_path / "tuned", tmp_path / "base", tmp_path / "a", rank=3, fan_in_fan_out=False
    )
    assert {m.layout for m in adapter.modules.values()} == {"linear"}
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_peft(gpt2, base, tmp_path / "a")


@pytest.mark.parametrize(
    "config",
    [
        "[1, 2]",
        "{not json",
        '{"model_type": 7}',
        '{"model_type": ["gpt2"]}',
        "deep",
        "big",
        "fifo",
        "link",
    ],
)
def test_a_strange_config_json_is_ignored(tmp_path, config):
    """The layout falls back to nn.Linear's; a pipe is never opened, a link out never read."""
    import os

    base = {"h.0.fc.weight": torch.zeros(3, 4)}
    terge.save(base, tmp_path / "base")
    terge.save({"h.0.fc.weight": torch.ones(3, 4)}, tmp_path / "tuned")
    target = tmp_path / "base" / "config.json"
    if config == "fifo":
        os.mkfifo(target)
    elif config == "deep":  # too deep for the json parser
        target.write_text("[" * 100_000)
    elif config == "big":  # over CONFIG_LIMIT: not read
        target.write_text(json.dumps({"model_type": "gpt2", "pad": " " * (1 << 20)}))
    elif config == "link":
        (tmp_path / "elsewhere.json").write_text('{"model_type": "gpt2"}')
        target.symlink_to(tmp_path / "elsewhere.json")
    else:
        target.write_text(config)
    adapter = terge.extract_lora(tmp_path / "tuned", tmp_path / "base", tmp_path / "a", rank=1)
    assert adapter.modules["h.0.fc"].layout == "linear"


def test_a_file_embedding_is_known_by_its_module_name(tmp_path):
    """Without a module to ask, an embedding is told by its module's last name."""
    base = {"model.embed_tokens.weight": torch.zeros(10, 4), "model.fc.weight": torch.zeros(3, 4)}
    terge.save(base, tmp_path / "base")
    terge.save({n: torch.eye(*t.shape) for n, t in base.items()}, tmp_path / "tuned")
    files = (tmp_path / "tuned", tmp_path / "base")
    whole = terge.extract_lora(*files, tmp_path / "a", rank=1)
    assert whole.modules_to_save == {"model.embed_tokens": ["model.embed_tokens.weight"]}
    assert {n: m.layout for n, m in whole.modules.items()} == {"model.fc": "linear"}
    factored = terge.extract_lora(*files, tmp_path / "b", rank=3, embeddings=True)
    assert factored.modules["model.embed_tokens"].layout == "embedding"


def test_a_2d_tensor_that_is_not_a_weight_is_never_factored(tmp_path):
    base = {"fc.weight": torch.zeros(3, 4), "fc.scales": torch.zeros(3, 4)}
    tuned = {"fc.weight": torch.ones(3, 4), "fc.scales": torch.ones(3, 4)}
    with pytest.warns(LoraLeftOutWarning):
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert adapter.modules["fc"].tensor == "fc.weight"
    assert adapter.left_out == {
        "fc.scales": "changed in the module 'fc', whose weight is factored: PEFT holds a module "
        "either as LoRA or whole, not both"
    }


def test_the_kind_of_module_comes_from_the_fine_tuned_module_when_the_base_is_a_dict(tmp_path):
    torch.manual_seed(0)
    tuned = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    base = {"0.weight": torch.zeros(10, 4)}
    adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=2, embeddings=True)
    assert list(adapter.modules) == ["0"] and adapter.modules["0"].layout == "embedding"


def test_embeddings_are_factored_when_asked_and_saved_whole_otherwise(tmp_path):
    base = llama()
    tuned = tuned_copy(base, llama, rank=2, embeddings=True)
    factored = terge.extract_lora(tuned, base, tmp_path / "a", rank=2, embeddings=True)
    assert factored.modules["model.embed_tokens"].layout == "embedding"
    assert factored.modules["lm_head"].layout == "linear"
    assert factored.modules_to_save == {}
    assert json.loads((tmp_path / "a" / "lora.json").read_text())["settings"]["embeddings"] is True
    assert logit_gap(load_peft(llama, base, tmp_path / "a"), tuned) < 1e-5
    whole = terge.extract_lora(tuned, base, tmp_path / "b", rank=2)
    assert "model.embed_tokens" not in whole.modules
    assert whole.modules_to_save == {"model.embed_tokens": ["model.embed_tokens.weight"]}
    assert logit_gap(load_peft(llama, base, tmp_path / "b"), tuned) < 1e-5


# --- truncated: a full-rank change within the reported error --------------------------------------


def test_a_single_linear_is_within_the_reported_truncation_error(tmp_path):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10))
    tuned = torch.nn.Sequential(torch.nn.Linear(12, 10))
    x = torch.randn(7, 12)
    for rank in (1, 3, 6, 10):
        adapter = terge.extract_lora(tuned, base, tmp_path / f"r{rank}", rank=rank)
        loaded = load_peft(lambda: torch.nn.Sequential(torch.nn.Linear(12, 10)), base, adapter.path)
        module = adapter.modules["0"]
        with torch.no_grad():
            gap = torch.linalg.norm(loaded(x) - tuned(x))
        # ||X (D - D_r)^T||_F <= ||D - D_r||_F ||X||_2 = error * ||D||_F * ||X||_2 (+ float32)
        bound = module.error * module.norm * torch.linalg.matrix_norm(x, 2)
        assert gap <= bound * (1 + 1e-4) + 1e-5
        assert module.rank == rank


def decaying_copy(model: torch.nn.Module, make, scale: float = 0.3) -> torch.nn.Module:
    """A copy whose projections move by a full-rank change with singular values
    ``scale * 0.7**i``: each rank kept removes a known share of the error."""
    tuned = make()
    tuned.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                k = min(p.shape)
                U, _ = torch.linalg.qr(torch.randn(p.shape[0], k, generator=generator))
                V, _ = torch.linalg.qr(torch.randn(p.shape[1], k, generator=generator))
                p += U @ torch.diag(scale * 0.7 ** torch.arange(k)) @ V.T
    return tuned


def test_llama_full_rank_change_is_within_the_reported_error_and_shrinks_with_rank(tmp_path):
    base = llama()
    tuned = decaying_copy(base, llama)
    with torch.no_grad():
        x = tokens()
        target, start = tuned(x).logits, base(x).logits
    gaps, errors = [], []
    for rank in (1, 2, 4, 8, 16):
        adapter = terge.extract_lora(tuned, base, tmp_path / f"r{rank}", rank=rank)
        with torch.no_grad():
            got = load_peft(llama, base, adapter.path)(x).logits
        # how much of the fine-tune's change of the logits the adapter misses
        gaps.append(float(torch.linalg.norm(got - target) / torch.linalg.norm(target - start)))
        errors.append(adapter.max_error)
    # every module has the spectrum 0.7**i, i < 16: the error is the root of the dropped share
    q = 0.49
    expected = [((q**r - q**16) / (1 - q**16)) ** 0.5 for r in (1, 2, 4, 8)]
    assert errors[:4] == pytest.approx(expected, rel=1e-3)
    assert errors[-1] < 1e-6
    assert gaps == sorted(gaps, reverse=True)
    for gap, error in zip(gaps, errors):  # the logits miss about what the weights miss
        assert gap <= 1.5 * error + 1e-5
    assert gaps[-1] < 1e-5


# --- ranks: per module, and by energy -------------------------------------------------------------


def test_a_map_of_ranks_sets_each_module_and_peft_builds_those_shapes(tmp_path):
    base = llama()
    tuned = tuned_copy(base, llama, rank=None)
    adapter = terge.extract_lora(
        tuned, base, tmp_path / "a", rank={re.compile(r"mlp\."): 6, re.compile("."): 2}
    )
    ranks = {name: m.rank for name, m in adapter.modules.items()}
    assert (
        ranks["model.layers.1.mlp.down_proj"] == 6 and ranks["model.layers.1.self_attn.q_proj"] == 2
    )
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 2  # 8 attention projections against 6 mlp ones
    assert config["rank_pattern"][re.escape("model.layers.0.mlp.up_proj")] == 6
    loaded = load_peft(llama, base, tmp_path / "a")
    layer = loaded.base_model.model.model.layers[0]
    assert layer.mlp.up_proj.lora_A["default"].weight.shape == (6, 16)
    assert layer.self_attn.q_proj.lora_A["default"].weight.shape == (2, 16)
    assert layer.mlp.up_proj.scaling["default"] == layer.self_attn.q_proj.scaling["default"] == 1


def test_energy_picks_each_modules_rank_from_its_spectrum(tmp_path):
    base = torch.nn.Sequential(torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6, bias=False))
    tuned = torch.nn.Sequential(
        torch.nn.Linear(6, 6, bias=False), torch.nn.Linear(6, 6, bias=False)
    )
    tuned.load_state_dict(base.state_dict())
    U, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    spectra = {"0": [8.0, 4.0, 3.0, 1.0, 0.5, 0.1], "1": [5.0, 5.0, 5.0, 5.0, 0.0, 0.0]}
    with torch.no_grad():
        for index, s in spectra.items():
            delta = U @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ V.T
            tuned[int(index)].weight += delta.float()
    adapter = terge.extract_lora(tuned, base, tmp_path / "a", energy=0.9)
    # squares 64, 16, 9, 1, .25, .01 (90.26): 80/90.26 < 0.9 <= 89/90.26 -> 3
    # squares 25 x 4: 0.25, 0.5, 0.75, 1.0 -> 4
    assert {n: m.rank for n, m in adapter.modules.items()} == {"0": 3, "1": 4}
    assert adapter.modules["0"].energy >= 0.9 and adapter.modules["1"].error < 1e-6


def test_the_record_holds_the_settings_and_each_modules_numbers(tmp_path):
    """Two weights of known spectra: 4, 2, 1 at rank 2 (a map of ranks) and 3, 1 by energy
    0.5 (the names the map misses); a changed norm saved whole; all written as bfloat16."""
    f64 = torch.float64
    base = {"a.weight": torch.zeros(3, 4, dtype=f64), "b.weight": torch.zeros(3, 4, dtype=f64)}
    base["n.weight"] = torch.ones(4, dtype=f64)
    tuned = {name: t.clone() for name, t in base.items()}
    tuned["n.weight"] += 1
    tuned["a.weight"][[0, 1, 2], [0, 1, 2]] = torch.tensor([4.0, 2.0, 1.0], dtype=f64)
    tuned["b.weight"][[0, 1], [0, 1]] = torch.tensor([3.0, 1.0], dtype=f64)
    adapter = terge.extract_lora(
        tuned,
        base,
        tmp_path / "a",
        rank={re.compile("^a"): 2},
        energy=0.5,
        fan_in_fan_out=False,
        out_dtype="bfloat16",
        task_type="CAUSAL_LM",
    )
    record = json.loads((tmp_path / "a" / "lora.json").read_text())
    assert record["settings"] == {
        "rank": {"re.compile('^a')": 2},
        "energy": 0.5,
        "embeddings": False,
        "fan_in_fan_out": False,
        "out_dtype": "bfloat16",
        "task_type": "CAUSAL_LM",
        "svd_dtype": "float64",
        "finetuned": "state_dict",  # in the file as in the returned record
        "base": "state_dict",
    }
    assert record == adapter.to_json()
    assert record["modules"] == {
        "a": {
            "tensor": "a.weight",
            "layout": "linear",
            "shape": [3, 4],
            "rank": 2,
            "error": pytest.approx((1 / 21) ** 0.5),
            "energy": pytest.approx(20 / 21),
            "norm": pytest.approx(21**0.5),
        },
        "b": {
            "tensor": "b.weight",
            "layout": "linear",
            "shape": [3, 4],
            "rank": 1,
            "error": pytest.approx(0.1**0.5),
            "energy": pytest.approx(0.9),
            "norm": pytest.approx(10**0.5),
        },
    }
    assert record["max_error"] == adapter.max_error == pytest.approx(0.1**0.5)
    assert record["modules_to_save"] == {"n": ["n.weight"]}
    assert (record["biases"], record["left_out"], record["unchanged"]) == ([], {}, 0)
    assert adapter.settings["finetuned"] == adapter.settings["base"] == "state_dict"
    written = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert torch.equal(written["base_model.model.n.weight"], torch.full((4,), 2.0).bfloat16())
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"


def test_a_change_only_to_modules_saved_whole_is_refused_as_peft_cannot_load_it(tmp_path):
    """An adapter that factors no module makes PEFT raise NoMatchingPeftModuleError: refused
    before anything is written, with what to do instead."""
    base = {"fc.weight": torch.zeros(3, 4), "norm.weight": torch.ones(4)}
    tuned = {"fc.weight": torch.zeros(3, 4), "norm.weight": torch.full((4,), 2.0)}
    with pytest.raises(
        MergeArgumentError,
        match=r"^the models differ only in modules an adapter saves whole \('norm'\), and PEFT "
        r"cannot load an adapter that factors no module with LoRA \(it raises "
        r"NoMatchingPeftModuleError\), so none is written; factor a changed embedding with "
        r"embeddings=True, or save the difference as a checkpoint instead\.$",
    ):
        terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert list(tmp_path.iterdir()) == []


def test_peft_indeed_cannot_load_an_adapter_without_a_target(tmp_path):
    """What the refusal above guards against, checked against PEFT itself."""
    base = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    config = peft.LoraConfig(r=1, target_modules=[], modules_to_save=["1"])
    with pytest.raises(ValueError, match="No modules were targeted for adaptation"):
        peft.get_peft_model(base, config)


# --- merge(out_format="lora") ---------------------------------------------------------------------


def test_a_merge_written_as_an_adapter_over_its_base(tmp_path):
    base = llama()
    a = tuned_copy(base, llama, rank=1, seed=1)
    b = tuned_copy(base, llama, rank=1, seed=2)
    expected = terge.merge([base, a, b], weights=[1, 1, 2])
    out = terge.merge(
        [base, a, b], weights=[1, 1, 2], out=tmp_path / "m", out_format="lora", lora_rank=2
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",  # the model card, as every out= folder has
        "adapter_config.json",
        "adapter_model.safetensors",
        "lineage.json",
        "lora.json",
    ]
    assert "library_name: peft" in (out / "README.md").read_text()
    bare = terge.merge(
        [base, a, b], out=tmp_path / "bare", out_format="lora", lora_rank=2, model_card=False
    )
    assert not (bare / "README.md").exists()
    assert logit_gap(load_peft(llama, base, out), expected) < 1e-5
    record = json.loads((out / "lora.json").read_text())
    assert record["max_error"] < 1e-6
    assert terge.load_lineage(out / "lineage.json")["lm_head.weight"][0] == "arithmetic"


def test_a_file_merge_as_an_adapter_and_its_dry_run(tmp_path):
    base = gpt2()
    for i in (1, 2):
        tuned_copy(base, gpt2, rank=1, seed=i, biases=True).save_pretrained(tmp_path / f"t{i}")
    base.save_pretrained(tmp_path / "base")
    paths = [tmp_path / "base", tmp_path / "t1", tmp_path / "t2"]
    with pytest.raises(MergeArgumentError, match=r"rank 17 exceeds .*'transformer\.h\.0"):
        terge.merge(paths, out=tmp_path / "m", out_format="lora", lora_rank=17, dry_run=True)
    assert not (tmp_path / "m").exists()
    terge.merge(paths, out=tmp_path / "m", out_format="lora", lora_rank=2)
    expected = terge.merge(paths)
    model = gpt2()
    model.load_state_dict(expected, strict=False)
    assert logit_gap(load_peft(gpt2, base, tmp_path / "m"), model) < 1e-5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lora_rank": 4}, r"`lora_rank` sets how a merge is written as a LoRA adapter"),
        ({"out_format": "lora"}, r"needs `lora_rank` .* or `lora_energy`"),
        ({"out_format": "lora", "lora_rank": 0}, r"`rank` must be a positive int"),
        ({"out_format": "lora", "lora_energy": 1.5}, r"`energy` must be in \(0, 1\]"),
        ({"out_format": "lora", "lora_rank": 2, "digests": True}, r"digests=True .* factors"),
    ],
)
def test_merge_refuses_bad_lora_options_before_writing(tmp_path, options, message):
    models = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
    with pytest.raises(MergeArgumentError, match=message):
        terge.merge(models, out=tmp_path / "m", **options)
    assert not (tmp_path / "m").exists()


# --- nothing dropped silently ---------------------------------------------------------------------


def test_what_the_adapter_cannot_hold_is_reported(tmp_path):
    base = llama()
    tuned = tuned_copy(base, llama, rank=2, norms=True)
    state = dict(tuned.state_dict())
    state["extra.weight"] = torch.ones(3)
    with pytest.warns(LoraLeftOutWarning, match=r"does not hold 2 difference\(s\).*left_out"):
        adapter = terge.extract_lora(
            state, base, tmp_path / "a", rank=2, excluded=re.compile("layers.1.mlp.up")
        )
    assert adapter.left_out == {
        "extra.weight": "only in the fine-tuned model (not in the base)",
        "model.layers.1.mlp.up_proj.weight": "changed, but excluded by the patterns",
    }
    record = json.loads((tmp_path / "a" / "lora.json").read_text())
    assert record["left_out"] == adapter.left_out
    assert record["unchanged"] == adapter.unchanged == 2  # the embedding and the head


def test_a_changed_integer_tensor_is_reported(tmp_path):
    base = {"fc.weight": torch.zeros(3, 4), "fc.steps": torch.tensor([1, 2])}
    tuned = {"fc.weight": torch.ones(3, 4), "fc.steps": torch.tensor([1, 3])}
    with pytest.warns(LoraLeftOutWarning, match="fc.steps: changed, but not floating point"):
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert list(adapter.left_out) == ["fc.steps"] and adapter.modules["fc"].error < 1e-12


def test_changed_buffers_of_a_module_are_saved_whole(tmp_path):
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.BatchNorm1d(6))

    base, tuned = make().eval(), make().eval()
    with torch.no_grad():
        tuned[0].weight += torch.outer(torch.ones(6), torch.arange(4.0))
        tuned[1].running_mean += 0.5
    adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert adapter.modules_to_save == {"1": ["1.running_mean"]}
    x = torch.randn(3, 4)
    with torch.no_grad():
        torch.testing.assert_close(load_peft(make, base, tmp_path / "a")(x), tuned(x))


def test_a_changed_bias_where_lora_bias_cannot_hold_it_is_reported(tmp_path):
    base = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 6))
    tuned = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 6))
    with pytest.warns(LoraLeftOutWarning, match="not supported together with factored embeddings"):
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=2, embeddings=True)
    assert list(adapter.left_out) == ["1.bias"]


def test_a_changed_bias_of_a_factored_module_without_one_elsewhere_is_reported(tmp_path):
    base = {"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(3, 4), "b.bias": torch.zeros(3)}
    tuned = {"a.weight": torch.ones(3, 4), "b.weight": torch.ones(3, 4), "b.bias": torch.ones(3)}
    with pytest.warns(LoraLeftOutWarning, match="b.bias"):
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert adapter.left_out == {
        "b.bias": "a changed bias of a factored module: PEFT's lora_bias=True, which would hold "
        "it, needs every factored module to have a bias, and 'a' has none"
    }
    assert adapter.biases == []


def test_a_parameter_of_the_root_module_is_reported_not_factored(tmp_path):
    base = {"weight": torch.zeros(3, 4), "scale": torch.zeros(3), "fc.weight": torch.zeros(3, 4)}
    tuned = {name: torch.ones(t.shape) for name, t in base.items()}
    with pytest.warns(LoraLeftOutWarning, match="root module"):
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert list(adapter.modules) == ["fc"]
    why = (
        "a parameter of the root module, which PEFT cannot save (modules_to_save names submodules)"
    )
    assert adapter.left_out == {"scale": why, "weight": why}


def test_the_warning_names_five_differences_and_counts_the_rest(tmp_path):
    base = {"fc.weight": torch.zeros(3, 4), "only_base": torch.zeros(2)}
    tuned = {"fc.weight": torch.ones(3, 4)}
    for i in range(6):
        base[f"fc.s{i}"], tuned[f"fc.s{i}"] = torch.tensor([0]), torch.tensor([1])
    with pytest.warns(LoraLeftOutWarning) as caught:
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert adapter.left_out["only_base"] == "only in the base (not in the fine-tuned model)"
    said = str(caught[0].message)
    assert said.startswith("terge: the adapter does not hold 7 difference(s) between the models (")
    assert "fc.s4: changed, but not floating point" in said and "fc.s5" not in said
    assert said.endswith("; and 2 more); they are listed in lora.json under left_out.")
    assert caught[0].filename == __file__  # the caller's line, not terge's
    del base["only_base"], base["fc.s5"], tuned["fc.s5"]
    with pytest.warns(LoraLeftOutWarning, match=r"fc\.s4: [^;]*\); they are listed"):
        terge.extract_lora(tuned, base, tmp_path / "b", rank=1)


def test_a_merge_warns_its_caller_of_what_the_adapter_does_not_hold(tmp_path):
    base = {"scale": torch.zeros(3), "fc.weight": torch.zeros(3, 4)}
    tuned = {"scale": torch.ones(3), "fc.weight": torch.ones(3, 4)}
    with pytest.warns(LoraLeftOutWarning, match="scale: a parameter of the root module") as caught:
        terge.merge([base, tuned], out=tmp_path / "m", out_format="lora", lora_rank=1)
    assert caught[0].filename == __file__


def test_an_excluded_weight_is_not_held_to_the_rank(tmp_path):
    base = {"a.weight": torch.zeros(3, 4), "b.weight": torch.zeros(1, 4)}
    tuned = {"a.weight": torch.ones(3, 4), "b.weight": torch.ones(1, 4)}
    with pytest.warns(LoraLeftOutWarning):
        adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=2, excluded=["b.weight"])
    assert list(adapter.modules) == ["a"]
    assert adapter.left_out == {"b.weight": "changed, but excluded by the patterns"}


def test_a_tensor_equal_in_another_dtype_is_unchanged(tmp_path):
    base = {"a.weight": torch.ones(3, 4), "b.weight": torch.zeros(3, 4)}
    tuned = {"a.weight": torch.ones(3, 4, dtype=torch.float16), "b.weight": torch.ones(3, 4)}
    adapter = terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert list(adapter.modules) == ["b"] and adapter.unchanged == 1


def test_the_record_is_deterministic(tmp_path):
    base = llama()
    tuned = tuned_copy(base, llama, rank=2, norms=True)
    terge.extract_lora(tuned, base, tmp_path / "a", rank=2)
    terge.extract_lora(tuned, base, tmp_path / "b", rank=2)
    for name in ("lora.json", "adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# --- errors, all before anything is written -------------------------------------------------------


def two_linears():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.nn.Sequential(torch.nn.Linear(4, 3))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, r"pass `rank` .* or `energy`"),
        ({"rank": 0}, r"`rank` must be a positive int .* got 0"),
        ({"rank": -2}, r"`rank` must be a positive int"),
        ({"rank": 2.5}, r"`rank` must be a positive int"),
        ({"rank": 4}, r"rank 4 exceeds the smaller dimension of '0\.weight' \(3, 4\)"),
        ({"rank": {"0.weight": 0}}, r"the rank of the pattern '0\.weight' must be a positive"),
        ({"rank": {"nope": 1}}, r"no pattern of `rank` matches the weight '0\.weight'"),
        ({"energy": 0}, r"`energy` must be in \(0, 1\]"),
        ({"energy": 1.2}, r"`energy` must be in \(0, 1\]"),
        ({"energy": "all"}, r"`energy` must be a number"),
        ({"rank": 1, "energy": 0.5}, r"either rank=1 or energy=0\.5, not both"),
        ({"rank": 1, "embeddings": "yes"}, r"`embeddings` must be True or False"),
        ({"rank": 1, "out_dtype": "int8"}, r"`out_dtype` must be a floating-point"),
        ({"rank": 1, "task_type": 3}, r"`task_type` must be a PEFT task type"),
        ({"rank": 1, "fan_in_fan_out": "auto"}, r"`fan_in_fan_out` must be True, False or None"),
        ({"rank": 1, "overwrite": 1}, r"`overwrite` must be True or False"),
    ],
)
def test_bad_settings_are_refused_before_writing(tmp_path, options, message):
    tuned, base = two_linears()
    with pytest.raises(MergeArgumentError, match=message):
        terge.extract_lora(tuned, base, tmp_path / "a", **options)
    assert not (tmp_path / "a").exists()


def test_a_shape_mismatch_is_refused(tmp_path):
    base = {"fc.weight": torch.zeros(3, 4)}
    with pytest.raises(
        MergeArgumentError,
        match=r"'fc\.weight' is \(4, 4\) in the fine-tuned .* \(3, 4\) in the base",
    ):
        terge.extract_lora({"fc.weight": torch.ones(4, 4)}, base, tmp_path / "a", rank=1)
    assert not (tmp_path / "a").exists()


def test_an_existing_output_is_refused_and_replaced_only_with_overwrite(tmp_path):
    tuned, base = two_linears()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists; pass overwrite=True"):
        terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert (tmp_path / "a" / "keep").read_text() == "mine"
    terge.extract_lora(tuned, base, tmp_path / "a", rank=1, overwrite=True)
    assert not (tmp_path / "a" / "keep").exists()


def test_an_output_inside_an_input_is_refused(tmp_path):
    tuned, base = two_linears()
    terge.save(base, tmp_path / "base")
    with pytest.raises(CheckpointError, match="is inside the input"):
        terge.extract_lora(tuned, tmp_path / "base", tmp_path / "base" / "adapter", rank=1)
    assert not (tmp_path / "base" / "adapter").exists()


def test_an_output_inside_an_adapter_being_read_is_refused(tmp_path):
    """A merge written as an adapter, or an extraction, reads an adapter folder as a model:
    its output may not go inside that folder (nor the adapter's base), and nothing is written."""
    tuned, base = two_linears()
    tuned_adapter = terge.extract_lora(tuned, base, tmp_path / "lora", rank=1).path
    inside = tmp_path / "lora" / "out"
    adapter = terge.adapter(tuned_adapter, base=base)
    for call in (
        lambda: terge.merge([adapter, base], out=inside, out_format="lora", lora_rank=1),
        lambda: terge.merge(
            [adapter, base], out=inside, out_format="lora", lora_rank=1, dry_run=True
        ),
        lambda: terge.extract_lora(adapter, base, inside, rank=1),
    ):
        with pytest.raises(CheckpointError, match="is inside the input"):
            call()
        assert not inside.exists()


def test_identical_models_write_nothing(tmp_path):
    _, base = two_linears()
    with pytest.raises(MergeArgumentError, match="do not differ in any tensor"):
        terge.extract_lora(base, base, tmp_path / "a", rank=1)
    assert not (tmp_path / "a").exists()


def test_a_failure_mid_way_leaves_no_folder(tmp_path, monkeypatch):
    base = llama()
    tuned = tuned_copy(base, llama, rank=2)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected")
        return original(*args, **kwargs)

    import terge.lora

    original = terge.lora.factor
    monkeypatch.setattr(terge.lora, "factor", failing)
    with pytest.raises(RuntimeError, match="injected"):
        terge.extract_lora(tuned, base, tmp_path / "a", rank=2)
    assert list(tmp_path.iterdir()) == []


def test_a_bare_layer_has_nothing_an_adapter_can_hold(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(MergeArgumentError, match=r"\(0 unchanged, 2 left out\); nothing to write"):
        terge.extract_lora(torch.nn.Linear(4, 3), torch.nn.Linear(4, 3), tmp_path / "a", rank=1)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_difference_that_is_not_finite_is_refused(tmp_path, value):
    tuned = {"fc.weight": torch.ones(3, 4)}
    tuned["fc.weight"][1, 2] = value
    with pytest.raises(
        MergeArgumentError, match=r"the difference of 'fc\.weight' is not finite .* \(excluded=\)"
    ):
        terge.extract_lora(tuned, {"fc.weight": torch.zeros(3, 4)}, tmp_path / "a", rank=1)
    assert list(tmp_path.iterdir()) == []


def test_the_models_are_not_modified(tmp_path):
    tuned, base = two_linears()
    tuned, base = tuned.double(), base.double()
    before = {n: t.clone() for n, t in tuned.state_dict().items()}
    terge.extract_lora(tuned, base, tmp_path / "a", rank=1)
    assert all(torch.equal(t, before[n]) for n, t in tuned.state_dict().items())


def test_both_checkpoints_are_closed_after_success_and_failure(tmp_path, monkeypatch):
    from terge.sources import FileSource

    tuned, base = two_linears()
    terge.save(tuned, tmp_path / "tuned")
    terge.save(base, tmp_path / "base")
    closed = []
    original = FileSource.close

    def close(self):
        closed.append(self.path.name)
        original(self)

    monkeypatch.setattr(FileSource, "close", close)
    adapter = terge.extract_lora(tmp_path / "tuned", tmp_path / "base", tmp_path / "a", rank=1)
    assert sorted(closed) == ["base", "tuned"]
    assert adapter.settings["base"] == str(tmp_path / "base")
    closed.clear()
    with pytest.raises(MergeArgumentError, match="do not differ"):
        terge.extract_lora(tmp_path / "base", tmp_path / "base", tmp_path / "b", rank=1)
    assert closed == ["base", "base"]


def test_bad_out_is_refused(tmp_path):
    tuned, base = two_linears()
    with pytest.raises(MergeArgumentError, match=r"`out` must be the path"):
        terge.extract_lora(tuned, base, 3, rank=1)  # type: ignore[arg-type]


def test_a_name_map_still_finds_each_weights_module(tmp_path):
    tuned, base = two_linears()
    adapter = terge.extract_lora(
        tuned, base, tmp_path / "a", rank=1, name_map=lambda n: n.replace("0.", "fc.", 1)
    )
    assert {n: m.layout for n, m in adapter.modules.items()} == {"fc": "linear"}
    assert adapter.biases == ["fc"]


# --- the command ----------------------------------------------------------------------------------


def test_the_command_writes_an_adapter_and_refuses_bad_ranks(tmp_path, capsys):
    from terge.cli import main

    base = llama()
    tuned = tuned_copy(base, llama, rank=2)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    argv = ["extract-lora", str(tmp_path / "tuned"), "--base", str(tmp_path / "base")]
    assert (
        main([*argv, "-o", str(tmp_path / "a"), "--rank", "2", "--rank-pattern", "re:mlp=3"]) == 0
    )
    said = capsys.readouterr().out
    assert "14 modules at rank 2-3" in said and "largest relative truncation error" in said
    assert load_peft(llama, base, tmp_path / "a") is not None
    assert main([*argv, "-o", str(tmp_path / "b"), "--rank", "99"]) == 2
    assert "rank 99 exceeds the smaller dimension" in capsys.readouterr().err
    assert main([*argv, "-o", str(tmp_path / "b"), "--rank-pattern", "mlp"]) == 2
    assert "--rank-pattern takes PATTERN=R" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_terge_merge_writes_an_adapter(tmp_path, capsys):
    from terge.cli import main

    base = llama()
    tuned_copy(base, llama, rank=1).save_pretrained(tmp_path / "t")
    base.save_pretrained(tmp_path / "base")
    folders = [str(tmp_path / "base"), str(tmp_path / "t")]
    assert (
        main(
            [
                "merge",
                *folders,
                "-o",
                str(tmp_path / "m"),
                "--out-format",
                "lora",
                "--lora-energy",
                "0.999",
            ]
        )
        == 0
    )
    assert (tmp_path / "m" / "adapter_config.json").is_file()
    assert main(["merge", *folders, "-o", str(tmp_path / "n"), "--lora-rank", "2"]) == 2
    assert "--lora-rank sets how a merge is written" in capsys.readouterr().err


def test_a_recipe_writes_an_adapter_and_checks_its_lora_keys(tmp_path, capsys):
    from terge.cli import main

    base = llama()
    tuned_copy(base, llama, rank=1).save_pretrained(tmp_path / "t")
    base.save_pretrained(tmp_path / "base")
    recipe = tmp_path / "soup.toml"
    recipe.write_text(
        'models = ["base", "t"]\nout = "m"\nout_format = "lora"\nlora_rank = 2\n'
        "lora_embeddings = false\n"
    )
    assert main(["merge", "--recipe", str(recipe)]) == 0
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["r"] == 2
    recipe.write_text('models = ["base", "t"]\nout = "n"\nout_format = "lora"\nlora_rank = "2"\n')
    assert main(["merge", "--recipe", str(recipe)]) == 2
    assert "'lora_rank' must be a positive integer; got '2' (str)" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()
