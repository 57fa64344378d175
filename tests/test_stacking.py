"""terge.stack(): frankenmerges and depth up-scaling, checked against models assembled by hand.

Tiny Hugging Face models are saved to folders, stacked into new folders, loaded back with
``from_pretrained``, and their logits compared with a fresh model of the new depth whose blocks
were copied (or merged in float64) by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import terge
from terge.lineage import lineage_to_json, load_lineage

from .helpers import lineage_validator

transformers = pytest.importorskip("transformers", reason="the from_pretrained oracle")

TOKENS = torch.tensor([[1, 5, 2, 7, 3, 9, 4]])


def llama_config(layers: int = 4, hidden: int = 8) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=hidden,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=16,
    )


def gpt2_config(layers: int = 4) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        n_layer=layers,
        n_embd=8,
        n_head=2,
        vocab_size=16,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )


def qwen2_config(layers: int = 4) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )


def saved(folder, cls, config, seed):
    torch.manual_seed(seed)
    model = cls(config).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamas")
    a = saved(root / "a", transformers.LlamaForCausalLM, llama_config(), 0)
    b = saved(root / "b", transformers.LlamaForCausalLM, llama_config(), 1)
    return root, a, b


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def by_hand(cls, config, base, blocks_of, prefix):
    """A fresh model of the new depth: the base's other tensors, block i = blocks_of[i]."""
    model = cls(config).eval()
    state = {k: v for k, v in base.state_dict().items() if f"{prefix}." not in k}
    model.load_state_dict(state, strict=False)
    stack = model.get_submodule(prefix)
    for i, block in enumerate(blocks_of):
        stack[i].load_state_dict(block)
    return model


def test_depth_up_scaling_4_to_6_blocks_loads_and_equals_the_model_built_by_hand(llamas, tmp_path):
    root, a, _ = llamas
    out = terge.stack(
        [terge.blocks(root / "a", 0, 3), terge.blocks(root / "a", 1, 4)], out=tmp_path / "dus"
    )
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == 6
    layers = a.model.layers
    order = [0, 1, 2, 1, 2, 3]
    expected = by_hand(
        transformers.LlamaForCausalLM,
        llama_config(6),
        a,
        [layers[i].state_dict() for i in order],
        "model.layers",
    )
    assert torch.equal(logits(loaded), logits(expected))
    assert not torch.equal(logits(loaded), logits(a))  # the depth changed something
    record = load_lineage(out)
    assert [block["sources"] for block in record.stack["blocks"]] == [[[0, i, 1.0]] for i in order]
    assert record.stack["tensors"]["model.layers.3.mlp.up_proj.weight"] == [
        [0, "model.layers.1.mlp.up_proj.weight"]
    ]
    assert record.stack["tensors"]["lm_head.weight"] == [[0, "lm_head.weight"]]
    assert dict(record) == {}  # nothing computed: every block is a copy


def test_frankenmerge_of_two_models_takes_each_block_from_its_model(llamas, tmp_path):
    root, a, b = llamas
    out = terge.stack([(root / "a", 0, 2), (root / "b", 1, 4)], out=tmp_path / "franken")
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    blocks = [
        a.model.layers[0],
        a.model.layers[1],
        b.model.layers[1],
        b.model.layers[2],
        b.model.layers[3],
    ]
    expected = by_hand(
        transformers.LlamaForCausalLM,
        llama_config(5),
        a,
        [x.state_dict() for x in blocks],
        "model.layers",
    )
    assert torch.equal(logits(loaded), logits(expected))
    record = load_lineage(out)
    assert [m.path for m in record.models] == [str(root / "a"), str(root / "b")]
    assert record.stack["blocks"][2] == {"method": "passthrough", "sources": [[1, 1, 1.0]]}


def test_head_comes_from_the_head_model_when_given(llamas):
    root, a, b = llamas
    result = terge.stack([(root / "a", 0, 2), (root / "b", 2, 4)], head=root / "b")
    assert torch.equal(result["lm_head.weight"], b.lm_head.weight)
    assert torch.equal(result["model.norm.weight"], b.model.norm.weight)
    assert torch.equal(result["model.embed_tokens.weight"], a.model.embed_tokens.weight)


def test_merged_slice_with_layer_wise_weights_is_the_float64_mean_rounded_once(llamas, tmp_path):
    root, a, b = llamas
    gradient = [0.0, 0.25, 1.0]  # a's weight over the slice's 3 blocks; b's is 1 - that
    out = terge.stack(
        [
            terge.blocks(root / "a", 0, 1),
            [
                terge.blocks(root / "a", 1, 4, weight=gradient),
                terge.blocks(root / "b", 0, 3, weight=[1 - g for g in gradient]),
            ],
        ],
        out=tmp_path / "blend",
    )
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    blocks = [a.model.layers[0].state_dict()]
    for k, g in enumerate(gradient):
        x, y = a.model.layers[1 + k].state_dict(), b.model.layers[k].state_dict()
        blocks.append({n: ((g * x[n].double() + (1 - g) * y[n].double()) / 1.0).float() for n in x})
    expected = by_hand(transformers.LlamaForCausalLM, llama_config(4), a, blocks, "model.layers")
    assert torch.equal(logits(loaded), logits(expected))
    record = load_lineage(out)
    name = "model.layers.2.self_attn.q_proj.weight"  # the slice's second block: a.2 and b.1
    assert record[name] == ("arithmetic", [(0, 0.25), (1, 0.75)])
    assert record.stack["tensors"][name] == [
        [0, "model.layers.2.self_attn.q_proj.weight"],
        [1, "model.layers.1.self_attn.q_proj.weight"],
    ]
    assert record.stack["blocks"][2] == {
        "method": "arithmetic",
        "sources": [[0, 2, 0.25], [1, 1, 0.75]],
    }
    assert "model.layers.0.self_attn.q_proj.weight" not in record  # a copy


def test_gpt2_frankenmerge_updates_n_layer_and_keeps_the_tied_head(tmp_path):
    a = saved(tmp_path / "a", transformers.GPT2LMHeadModel, gpt2_config(), 0)
    b = saved(tmp_path / "b", transformers.GPT2LMHeadModel, gpt2_config(), 1)
    out = terge.stack([(tmp_path / "a", 0, 3), (tmp_path / "b", 1, 4)], out=tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["n_layer"] == 6
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    blocks = [a.transformer.h[i] for i in range(3)] + [b.transformer.h[i] for i in range(1, 4)]
    expected = by_hand(
        transformers.GPT2LMHeadModel,
        gpt2_config(6),
        a,
        [x.state_dict() for x in blocks],
        "transformer.h",
    )
    expected.tie_weights()
    assert torch.equal(logits(loaded), logits(expected))


def test_per_layer_config_lists_are_resliced_with_the_blocks(tmp_path):
    model = saved(tmp_path / "q", transformers.Qwen2ForCausalLM, qwen2_config(), 0)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    out = terge.stack([(tmp_path / "q", 0, 3), (tmp_path / "q", 1, 4)], out=tmp_path / "out")
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(out).eval()
    order = [0, 1, 2, 1, 2, 3]
    types = [model.config.layer_types[i] for i in order]
    assert loaded.config.num_hidden_layers == 6
    assert loaded.config.layer_types == types
    config = qwen2_config(6)
    config.layer_types = types
    expected = by_hand(
        transformers.Qwen2ForCausalLM,
        config,
        model,
        [model.model.layers[i].state_dict() for i in order],
        "model.layers",
    )
    assert torch.equal(logits(loaded), logits(expected))


def test_in_memory_result_equals_the_folder_and_modules_are_accepted(llamas, tmp_path):
    root, a, _ = llamas
    slices = [terge.blocks(a, 2, 4), terge.blocks(a, 0, 2)]
    state, record = terge.stack(slices, lineage=True)
    out = terge.stack([(root / "a", 2, 4), (root / "a", 0, 2)], out=tmp_path / "o")
    written = terge.load(out)
    assert written.keys() == state.keys() - {"model.rotary_emb.inv_freq"}
    assert all(torch.equal(written[n], state[n]) for n in written)
    assert record.models[0].kind == "module"
    assert record == terge.stack(slices, dry_run=True)


def test_lineage_is_deterministic_and_valid_against_the_schema(llamas, tmp_path):
    root, _, _ = llamas
    slices = [
        [terge.blocks(root / "a", 0, 2, weight=0.3), terge.blocks(root / "b", 2, 4, weight=0.7)]
    ]
    first = terge.stack(slices, out=tmp_path / "1", seed=1)
    second = terge.stack(slices, out=tmp_path / "2", seed=1)
    assert (first / "lineage.json").read_text() == (second / "lineage.json").read_text()
    validator = lineage_validator()
    if validator is not None:
        validator.validate(lineage_to_json(load_lineage(first)))
    text = json.loads((first / "lineage.json").read_text())
    assert text["stack"]["blocks"][1] == {
        "method": "arithmetic",
        "sources": [[0, 1, 0.3], [1, 3, 0.7]],
    }


def test_dry_run_reads_and_writes_nothing_but_fails_like_the_real_call(llamas, tmp_path):
    root, _, _ = llamas
    (tmp_path / "taken").mkdir()
    record = terge.stack([(root / "a", 0, 4)], dry_run=True, out=tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert len(record.stack["blocks"]) == 4
    with pytest.raises(terge.CheckpointError, match="already exists"):
        terge.stack([(root / "a", 0, 4)], dry_run=True, out=tmp_path / "taken")


# --- errors, all raised before anything is written --------------------------------------------


def small(layers: int = 4, width: int = 2, prefix: str = "model.layers") -> dict[str, torch.Tensor]:
    state = {f"{prefix}.{i}.w": torch.full((width,), float(i)) for i in range(layers)}
    state["model.embed_tokens.weight"] = torch.zeros(3, width)
    return state


@pytest.mark.parametrize(
    ("slices", "match"),
    [
        (lambda m: [terge.blocks(m, 2, 6)], r"asks for blocks 2 to 5 .* which has 4 blocks"),
        (lambda m: [(m, 3, 3)], r"slices\[0\]: blocks\(3, 3\) is empty"),
        (lambda m: [(m, -1, 2)], r"blocks\(-1, 2\) is empty or negative"),
        (lambda m: [(m, 0, 1.5)], r"needs an int `stop`; got 1.5"),
        (lambda m: [(m, 0, True)], r"needs an int `stop`; got True"),
        (lambda m: (m, 0, 2), "takes a list of slices; got tuple"),
        (lambda m: [], "got no slices"),
        (lambda m: terge.blocks(m, 0, 2), "takes a list of slices"),
        (lambda m: [[]], r"slices\[0\] is an empty list"),
        (lambda m: ["model"], r"slices\[0\] is str; a slice is terge.blocks"),
        (lambda m: [[(m, 0, 2), (m, 0, 3)]], "merges ranges of different lengths"),
        (lambda m: [[(m, 0, 2), (small(width=3), 0, 2)]], r"different shapes: 'model.layers.0.w'"),
        (
            lambda m: [[(m, 0, 2), ({**small(), "model.layers.1.b": torch.ones(2)}, 0, 2)]],
            r"different structure: 'model.layers.1.b'",
        ),
        (
            lambda m: [(m, 0, 2), (small(width=3), 0, 2)],
            r"of shape \(3,\), but the base's blocks hold it as \(2,\)",
        ),
        (lambda m: [(m, 0, 2), (small(prefix="transformer.h"), 0, 2)], "under different names"),
        (
            lambda m: [({**m, "encoder.block.0.w": torch.ones(1)}, 0, 1)],
            "more than one stack of blocks",
        ),
        (lambda m: [(m, 0, 2, float("nan"))], "must be finite"),
        (lambda m: [(m, 0, 2, "heavy")], "must be a number"),
    ],
)
def test_bad_slices_are_refused_with_what_to_do(slices, match, tmp_path):
    with pytest.raises(terge.StackError, match=match):
        terge.stack(slices(small()), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused(tmp_path):
    m = small()
    with pytest.raises(terge.StackError, match="`out_dtype` sets the dtype written to `out`"):
        terge.stack([(m, 0, 2)], out_dtype="bfloat16")
    with pytest.raises(terge.StackError, match="`out_dtype` must be a floating-point"):
        terge.stack([(m, 0, 2)], out=tmp_path / "o", out_dtype="int8")
    with pytest.raises(terge.StackError, match="`dtype` must be a floating-point"):
        terge.stack([(m, 0, 2)], dtype=torch.int32)
    meta = {**m, "model.layers.1.w": torch.empty(2, device="meta")}
    with pytest.raises(
        terge.StackError, match=r"'model\.layers\.0\.w' would come from a tensor on the meta"
    ):
        terge.stack([(meta, 1, 2)])
    with pytest.raises(terge.StackError, match="`lineage` must be True or False"):
        terge.stack([(m, 0, 2)], lineage="yes")
    with pytest.raises(terge.UnknownMergeMethodError, match="unknown merge method 'no-such"):
        terge.stack([(m, 0, 2)], method="no-such-method")  # checked with no merged slice too


def test_out_inside_an_input_or_existing_is_refused_before_writing(llamas):
    root, _, _ = llamas
    with pytest.raises(terge.CheckpointError, match="is inside the input"):
        terge.stack([(root / "a", 0, 2)], out=root / "a" / "sub")
    with pytest.raises(terge.CheckpointError, match="already exists"):
        terge.stack([(root / "a", 0, 2)], out=root / "b")


def test_out_dtype_casts_once_and_updates_the_config(llamas, tmp_path):
    root, a, _ = llamas
    out = terge.stack([(root / "a", 0, 2)], out=tmp_path / "o", out_dtype=torch.bfloat16)
    written = terge.load(out)
    assert written["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(
        written["model.layers.1.mlp.up_proj.weight"],
        a.model.layers[1].mlp.up_proj.weight.detach().to(torch.bfloat16),
    )
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_lineage_verify_recomputes_every_tensor_of_a_stack(llamas, tmp_path):
    from safetensors.torch import load_file, save_file

    from terge.audit import verify_lineage

    root, _, _ = llamas
    slices = [
        (root / "a", 0, 2),
        [(root / "a", 1, 3, [0.2, 0.6]), (root / "b", 0, 2, 0.5), (root / "a", 2, 4)],
    ]
    out = terge.stack(slices, out=tmp_path / "o", head=root / "b", out_dtype="bfloat16")
    record = load_lineage(out)
    assert verify_lineage(record, out) == []
    name = "model.layers.3.mlp.up_proj.weight"  # merged from a.2, b.1 and a.3
    assert [m for m, _ in record[name][1]] == [0, 1, 0]  # a contributes twice
    state = load_file(out / "model.safetensors")
    state[name] = state[name].clone()
    state[name][0, 0] += 1
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"].clone()
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    found = dict(verify_lineage(record, out))
    assert found == {
        name: "the checkpoint's tensor differs from the recomputed one",
        "model.layers.0.mlp.up_proj.weight": "copied (copied), but the checkpoint's tensor is not "
        "the base's",
    }
    with pytest.raises(terge.LineageError, match="records 2 models but 1 paths were given"):
        verify_lineage(record, out, models=[root / "a"])


# --- the command line, recipes and mergekit configs ------------------------------------------


@pytest.fixture
def folders(tmp_path):
    """Two 4-block checkpoints with a config.json, as Hugging Face folders."""
    for k, name in enumerate("ab"):
        state = {n: t + 10 * k for n, t in small().items()}
        state["lm_head.weight"] = torch.full((3, 2), float(k))
        terge.save(state, tmp_path / name)
        config = {
            "num_hidden_layers": 4,
            "layer_types": ["x0", "x1", "x2", "x3"],
            "dtype": "float32",
        }
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    return tmp_path


def blocks_of(folder) -> list[float]:
    state = terge.load(folder)
    count = sum(1 for n in state if n.startswith("model.layers."))
    return [state[f"model.layers.{i}.w"][0].item() for i in range(count)]


def test_terge_stack_command_depth_up_scales_and_merges(folders, capsys):
    from terge.cli.commands import main

    a, b = folders / "a", folders / "b"
    assert main(["stack", f"{a}:0:3", f"{a}:1:4", "-o", str(folders / "dus")]) == 0
    assert (folders / "dus" / "README.md").is_file()
    bare = ["stack", f"{a}:0:3", "-o", str(folders / "bare"), "--no-model-card", "--quiet"]
    assert main(bare) == 0
    assert not (folders / "bare" / "README.md").exists()
    assert blocks_of(folders / "dus") == [0, 1, 2, 1, 2, 3]
    config = json.loads((folders / "dus" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == ["x0", "x1", "x2", "x1", "x2", "x3"]
    assert "6 blocks, 0 merged" in capsys.readouterr().out
    code = main(["stack", f"{a}:0:2@1+{b}:2:4@3", "-o", str(folders / "mix"), "--head", str(b)])
    assert code == 0
    assert blocks_of(folders / "mix") == [(0 + 3 * 12) / 4, (1 + 3 * 13) / 4]
    assert torch.equal(terge.load(folders / "mix")["lm_head.weight"], torch.ones(3, 2))


@pytest.mark.parametrize(
    ("slice_", "match"),
    [
        ("a:0", "cannot read the slice"),
        ("a:x:3", "cannot read the slice"),
        ("a:2:9", "asks for blocks 2 to 8"),
        ("a:3:1", r"blocks\(3, 1\) is empty"),
    ],
)
def test_terge_stack_command_refuses_bad_slices(folders, slice_, match, capsys, monkeypatch):
    from terge.cli.commands import main

    monkeypatch.chdir(folders)
    assert main(["stack", slice_, "-o", "out"]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (folders / "out").exists()


def test_recipe_slices_run_through_terge_merge(folders):
    from terge.cli.commands import main

    (folders / "dus.toml").write_text(
        """
out = "dus"
head = "b"
[[slices]]
model = "a"
layer_range = [0, 3]
[[slices]]
sources = [{model = "a", layer_range = [1, 3], weight = [1, 0]}, {model = "b", layer_range = [2, 4], weight = [0, 1]}]
"""
    )
    assert main(["merge", "--recipe", str(folders / "dus.toml"), "--quiet"]) == 0
    assert blocks_of(folders / "dus") == [0, 1, 2, 1, 13]
    record = load_lineage(folders / "dus")
    assert record.stack["head"] == 1
    assert record.stack["blocks"][4] == {
        "method": "arithmetic",
        "sources": [[0, 2, 0.0], [1, 3, 1.0]],
    }


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ('[[slices]]\nmodel = "a"\n', "has no 'layer_range'"),
        ('[[slices]]\nmodel = "a"\nlayer_range = [0]\n', r"layer_range must be \[START, STOP\]"),
        ('[[slices]]\nmodel = "a"\nlayer_range = [0, 2]\nrange = 1\n', "unknown key 'range'"),
        (
            'models = ["a"]\n[[slices]]\nmodel = "a"\nlayer_range = [0, 2]\n',
            "'models' cannot be given with slices",
        ),
        ("slices = []\n", "non-empty list of tables"),
        (
            'lineage = "l.json"\n[[slices]]\nmodel = "a"\nlayer_range = [0, 2]\n',
            "'lineage' cannot be given with slices: a stack writes its lineage to OUT/lineage.json",
        ),
    ],
)
def test_bad_recipe_slices_are_refused(folders, recipe, match, capsys):
    from terge.cli.commands import main

    (folders / "r.toml").write_text('out = "o"\n' + recipe)
    assert main(["merge", "--recipe", str(folders / "r.toml")]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_mergekit_passthrough_slices_convert_to_a_stack(folders, monkeypatch):
    from terge.cli.commands import main
    from terge.cli.mergekit import from_mergekit

    monkeypatch.chdir(folders)
    config = {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "b", "layer_range": [1, 4]}]},
        ],
    }
    options = from_mergekit(config)
    assert options["slices"] == [
        terge.blocks(str(folders / "a"), 0, 3),
        terge.blocks(str(folders / "b"), 1, 4),
    ]
    assert (options["base"], options["head"]) == (str(folders / "a"), str(folders / "b"))
    out = terge.stack(**options, out="franken")
    assert blocks_of(out) == [0, 1, 2, 11, 12, 13]
    assert torch.equal(terge.load(out)["lm_head.weight"], torch.ones(3, 2, dtype=torch.bfloat16))
    assert torch.equal(
        terge.load(out)["model.embed_tokens.weight"], torch.zeros(3, 2, dtype=torch.bfloat16)
    )
    yaml = pytest.importorskip("yaml", reason="reads the YAML form")
    (folders / "dus.yml").write_text(yaml.safe_dump({**config, "dtype": "float32"}))
    assert main(["merge", "--mergekit", "dus.yml", "-o", "cli", "--quiet"]) == 0
    assert blocks_of(folders / "cli") == [0, 1, 2, 11, 12, 13]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"merge_method": "slerp"}, "'slerp' over slices has no terge translation"),
        ({"parameters": {"scale": 0.5}}, "parameters.scale: is no setting"),
        (
            {
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 2]},
                            {"model": "b", "layer_range": [0, 2]},
                        ]
                    }
                ]
            },
            "passthrough takes one source per slice",
        ),
        ({"slices": [{"sources": [{"model": "a"}]}]}, r"layer_range: must be \[START, STOP\]"),
        (
            {"slices": [{"sources": [{"model": "a", "layer_range": [0, 2]}], "extra": 1}]},
            "is not a key of a slice",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {
                        "sources": [
                            {"model": "a", "layer_range": [0, 2]},
                            {"model": "b", "layer_range": [0, 2]},
                        ]
                    }
                ],
            },
            "first or last slice",
        ),
    ],
)
def test_mergekit_slices_that_do_not_convert_are_refused(folders, monkeypatch, change, match):
    from terge.cli.mergekit import from_mergekit

    monkeypatch.chdir(folders)
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]}],
    }
    with pytest.raises(terge.MergeArgumentError, match=match):
        from_mergekit({**config, **change})


def test_mergekit_linear_middle_slice_takes_weights_and_gradients(folders, monkeypatch):
    from terge.cli.mergekit import from_mergekit

    monkeypatch.chdir(folders)
    one = lambda m, r: {"sources": [{"model": m, "layer_range": r}]}  # noqa: E731
    options = from_mergekit(
        {
            "merge_method": "linear",
            "parameters": {"weight": 1.0},
            "slices": [
                one("a", [0, 1]),
                {
                    "sources": [
                        {"model": "a", "layer_range": [1, 3], "parameters": {"weight": [1, 0]}},
                        {"model": "b", "layer_range": [1, 3]},
                    ],
                },
                one("b", [3, 4]),
            ],
        }
    )
    out = terge.stack(**options, out="linear")
    assert blocks_of(out) == [0, (1 + 11) / 2, (0 + 12) / 1, 13]


def test_mergekit_slice_weights_take_the_sources_then_the_slices_then_the_global(
    folders, monkeypatch
):
    """A source's weight is its own, else its slice's, else the global parameters' (mergekit's
    order), and out_dtype wins over dtype for slices too."""
    from terge.cli.mergekit import from_mergekit

    monkeypatch.chdir(folders)
    a, b = str(folders / "a"), str(folders / "b")
    one = lambda m, r: {"sources": [{"model": m, "layer_range": r}]}  # noqa: E731
    options = from_mergekit(
        {
            "merge_method": "linear",
            "parameters": {"weight": 3.0},
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "slices": [
                one("a", [0, 1]),
                {
                    "parameters": {"weight": 2.0},
                    "sources": [
                        {"model": "a", "layer_range": [1, 2], "parameters": {"weight": 1.0}},
                        {"model": "b", "layer_range": [1, 2]},
                    ],
                },
                {
                    "sources": [
                        {"model": "a", "layer_range": [2, 3]},
                        {"model": "b", "layer_range": [2, 3]},
                    ]
                },
                one("b", [3, 4]),
            ],
        }
    )
    assert options["slices"][1] == [
        terge.blocks(a, 1, 2, weight=1.0),
        terge.blocks(b, 1, 2, weight=2.0),
    ]
    assert options["slices"][2] == [
        terge.blocks(a, 2, 3, weight=3.0),
        terge.blocks(b, 2, 3, weight=3.0),
    ]
    assert options["out_dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"foo": 1}, "config foo: is not a key of a slices config terge reads"),
        (
            {"chat_template": "chatml"},
            "config chat_template: chat templates are not written; remove chat_template.",
        ),
        (
            {"parameters": {"weight": 0.5}},
            "config parameters.weight: is no setting terge translates for passthrough slices "
            "(none)",
        ),
        (
            {"merge_method": "linear", "parameters": {"normalize": False}},
            "config parameters.normalize: must be true: terge.stack normalises the weights",
        ),
        ({"slices": [{"sources": []}]}, "config slices[0].sources: is empty"),
        (
            {"slices": [{"sources": [{"model": "a", "layer_range": [0, True]}]}]},
            "config slices[0].sources[0].layer_range: must be [START, STOP], two ints, got "
            "[0, True]",
        ),
        (
            {"slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "weight": 1}]}]},
            "config slices[0].sources[0].weight: is not a key of a slice source",
        ),
        (
            {"slices": [{"sources": [{"model": "a", "layer_range": [3, 3]}]}]},
            "config slices[0].sources[0]: blocks(3, 3) is empty",
        ),
        (
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [{"model": "a", "layer_range": [0, 2]}]},
                    {
                        "sources": [
                            {"model": "a", "layer_range": [2, 4]},
                            {"model": "b", "layer_range": [2, 4]},
                        ]
                    },
                ],
            },
            "config slices[1]: merges several sources in the first or last slice",
        ),
    ],
)
def test_mergekit_slices_refusals_name_the_key(folders, monkeypatch, change, message):
    """Each check of a slices config fires on its own input, naming the key (the last slice
    merged is refused as the first is; an empty block range is terge.blocks' error, as a
    config error)."""
    from terge.cli.mergekit import from_mergekit

    monkeypatch.chdir(folders)
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}]}],
    }
    with pytest.raises(terge.MergeArgumentError, match=re.escape(message)):
        from_mergekit({**config, **change})


def test_head_model_must_hold_the_bases_head_with_its_shapes():
    base = {**small(), "lm_head.weight": torch.zeros(3, 2)}
    with pytest.raises(terge.StackError, match="which the head model dict lacks"):
        terge.stack([(base, 0, 2)], head=small())
    wider = {**small(), "lm_head.weight": torch.zeros(5, 2)}
    with pytest.raises(terge.StackError, match=r"is \(5, 2\) in the head model but \(3, 2\)"):
        terge.stack([(base, 0, 2)], head=wider)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(terge.StackError, match="has no transformer blocks"):
        terge.stack([({"fc.weight": torch.ones(2)}, 0, 1)])


def test_per_layer_lists_come_from_each_blocks_own_model(folders):
    deep = {**small(8), "lm_head.weight": torch.ones(3, 2)}
    terge.save(deep, folders / "deep")
    types = [f"d{i}" for i in range(8)]
    (folders / "deep" / "config.json").write_text(
        json.dumps({"num_hidden_layers": 8, "layer_types": types})
    )
    out = terge.stack([(folders / "a", 0, 2), (folders / "deep", 6, 8)], out=folders / "o")
    config = json.loads((out / "config.json").read_text())
    assert config["layer_types"] == ["x0", "x1", "d6", "d7"]
    (folders / "deep" / "config.json").unlink()
    with pytest.raises(terge.StackError, match="'layer_types' has no entry for block 6"):
        terge.stack([(folders / "a", 0, 2), (folders / "deep", 6, 8)], out=folders / "p")
    assert not (folders / "p").exists()


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff"])
def test_an_unreadable_base_config_fails_before_writing(folders, text):
    (folders / "a" / "config.json").write_text(text, encoding="latin-1")
    with pytest.raises(terge.StackError, match=r"config\.json"):
        terge.stack([(folders / "a", 0, 2)], out=folders / "o", dry_run=True)
    with pytest.raises(terge.StackError, match="fix or remove it"):
        terge.stack([(folders / "a", 0, 2)], out=folders / "o")
    assert not (folders / "o").exists()


def test_lineage_show_and_diff_speak_of_the_stack(folders, capsys):
    from terge.cli.commands import main

    a, b = folders / "a", folders / "b"
    one = terge.stack([(a, 0, 3), (a, 1, 4)], out=folders / "one")
    two = terge.stack([(a, 0, 3), [(a, 1, 4), (b, 1, 4)]], out=folders / "two")
    assert main(["lineage", "show", str(one)]) == 0
    shown = capsys.readouterr().out
    assert "stacked: 6 blocks (0 merged), embeddings from models[0], head from models[0]" in shown
    assert "  blocks 0-2: models[0] blocks 0-2\n  blocks 3-5: models[0] blocks 1-3\n" in shown
    assert main(["lineage", "diff", str(one), str(one)]) == 0
    capsys.readouterr()
    assert main(["lineage", "diff", str(one), str(two)]) == 1
    changes = capsys.readouterr().out
    assert (
        "~ stack block 3: models[0] block 1 -> arithmetic of models[0] block 1 (1.0) + "
        "models[1] block 1 (1.0)" in changes
    )
    assert (
        "~ model.layers.3.w: from [[0, 'model.layers.1.w']] -> [[0, 'model.layers.1.w'], [1, 'model.layers.1.w']]"
        in changes
    )
    three = terge.stack([(a, 0, 3), (a, 0, 3)], out=folders / "three")  # no merged tensor at all
    assert main(["lineage", "diff", str(one), str(three)]) == 1
    assert "~ stack block 3: models[0] block 1 -> models[0] block 0" in capsys.readouterr().out


# --- invariants and hostile lineages ---------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    ranges=st.lists(
        st.tuples(st.integers(0, 5), st.integers(1, 6)).filter(lambda r: r[0] < r[1]),
        min_size=1,
        max_size=5,
    )
)
def test_output_block_i_is_the_input_block_the_slices_put_there(ranges):
    model = small(6)
    result, record = terge.stack([(model, a, b) for a, b in ranges], lineage=True)
    order = [i for a, b in ranges for i in range(a, b)]
    assert [result[f"model.layers.{i}.w"][0].item() for i in range(len(order))] == order
    assert sum(n.startswith("model.layers.") for n in result) == len(order)
    assert torch.equal(result["model.embed_tokens.weight"], model["model.embed_tokens.weight"])
    assert [block["sources"][0][1] for block in record.stack["blocks"]] == order


def test_the_whole_model_as_one_slice_is_the_model(llamas):
    root, a, _ = llamas
    state = terge.stack([(root / "a", 0, 4)])
    assert state.keys() == {k for k in a.state_dict() if "rotary" not in k}
    assert all(torch.equal(state[k], a.state_dict()[k]) for k in state)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(stack=[]), "stack must be an object"),
        (lambda s: s["stack"]["blocks"][0]["sources"][0].__setitem__(0, 7), "is model 7, but"),
        (lambda s: s["stack"]["blocks"][0]["sources"][0].__setitem__(2, "x"), "must be a number"),
        (lambda s: s["stack"]["blocks"][0]["sources"][0].__setitem__(1, -1), "a block index"),
        (lambda s: s["stack"]["blocks"][0].__setitem__("sources", []), "a non-empty list"),
        (lambda s: s["stack"].__setitem__("tensors", {"w": [[0]]}), r"\[model, input_name\]"),
        (lambda s: s["stack"].pop("blocks"), "stack.blocks must be a list"),
    ],
)
def test_a_tampered_stack_lineage_is_refused_naming_the_field(tmp_path, change, match):
    out = terge.stack([(small(), 0, 2)], lineage=True)[1]
    record = lineage_to_json(out)
    change(record)
    path = tmp_path / "lineage.json"
    path.write_text(json.dumps(record))
    with pytest.raises(terge.LineageError, match=match):
        load_lineage(path)


def test_lineages_without_a_stack_load_and_write_as_before(tmp_path):
    _, record = terge.merge([small(), small()], lineage=True)
    assert record.stack is None
    assert "stack" not in lineage_to_json(record)
    terge.save_lineage(record, tmp_path / "l.json")
    assert load_lineage(tmp_path / "l.json") == record


def test_terge_stack_dry_run_writes_nothing(folders, capsys):
    from terge.cli.commands import main

    assert main(["stack", f"{folders / 'a'}:0:3", "-o", str(folders / "o"), "--dry-run"]) == 0
    assert "would write" in capsys.readouterr().out
    assert not (folders / "o").exists()


def test_a_failure_while_writing_leaves_no_folder(folders):
    calls = []

    def failing(tensors, weights, base):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return tensors[0]

    slices = [(folders / "a", 0, 1), [(folders / "a", 1, 4), (folders / "b", 1, 4)]]
    with pytest.raises(terge.MethodError, match="disk on fire"):
        terge.stack(slices, method=failing, out=folders / "o")
    assert len(calls) == 2  # the first merged tensor was written before the failure
    assert not (folders / "o").exists()
    assert [p.name for p in folders.iterdir() if p.name.startswith(".o")] == []


def test_the_model_card_recipe_redoes_the_stack(folders, monkeypatch):
    """A stack's folder gets a model card whose [[slices]] recipe, run through
    ``terge merge --recipe``, writes the same tensors and the same stack lineage."""
    import tomllib
    from safetensors.torch import load_file

    from terge.cli.commands import main

    monkeypatch.chdir(folders)
    slices = [
        terge.blocks("a", 0, 2),
        [terge.blocks("a", 2, 4, weight=[1, 0.25]), terge.blocks("b", 1, 3, weight=[0, 0.75])],
        terge.blocks("b", 1, 4),
    ]
    out = terge.stack(slices, head="b", out="first")
    card = (out / "README.md").read_text()
    assert "# A stack of 7 blocks from 2 models" in card
    recipe = card.split("```toml\n")[1].split("```")[0]
    assert tomllib.loads(recipe)["slices"][1]["sources"][0]["weight"] == [1.0, 0.25]
    (folders / "again.toml").write_text(recipe)
    assert main(["merge", "--recipe", "again.toml", "--quiet"]) == 0
    first, again = (
        load_file(out / "model.safetensors"),
        load_file(folders / "stacked/model.safetensors"),
    )
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert load_lineage(out).stack == load_lineage(folders / "stacked").stack
    assert not (terge.stack(slices, out="bare", model_card=False) / "README.md").exists()
    with pytest.raises(terge.StackError, match="`model_card` must be True, False or the command"):
        terge.stack(slices, out="never", model_card=3)


# --- found by a mutation audit of stacking.py --------------------------------------------------


def test_a_range_one_past_the_last_block_is_refused_naming_the_bounds():
    message = (
        "slices[0] asks for blocks 2 to 4 of dict, which has 4 blocks (0 to 3); give a range "
        "inside it (stop at most 4)."
    )
    with pytest.raises(terge.StackError, match=re.escape(message)):
        terge.stack([(small(), 2, 5)])


def test_a_structure_mismatch_names_the_missing_tensor_and_the_slice_that_holds_it():
    other = {**small(), "model.layers.0.b": torch.ones(2)}
    del other["model.layers.1.w"]  # missing from slices[0][1], and it holds an extra one
    message = "'model.layers.1.w' (numbered within the slice) is held only by slices[0][0]"
    with pytest.raises(terge.StackError, match=re.escape(message)):
        terge.stack([[(small(), 0, 2), (other, 0, 2)]])
    extra = {**small(), "model.layers.0.b": torch.ones(2)}
    message = "'model.layers.0.b' (numbered within the slice) is held only by slices[0][1]"
    with pytest.raises(terge.StackError, match=re.escape(message)):
        terge.stack([[(small(), 0, 2), (extra, 0, 2)]])


class Tied(torch.nn.Module):
    """Two blocks, with the head tied to the embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(3, 2)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))
        self.head = torch.nn.Linear(2, 3, bias=False)
        self.head.weight = self.embed.weight


def test_a_tied_head_stays_one_tensor_in_memory_and_in_the_lineage():
    model = Tied()
    result, record = terge.stack([(model, 1, 2)], lineage=True)
    assert result.keys() == {"embed.weight", "head.weight", "layers.0.weight", "layers.0.bias"}
    assert result["head.weight"] is result["embed.weight"]
    assert torch.equal(result["embed.weight"], model.embed.weight.detach())
    assert torch.equal(result["layers.0.weight"], model.layers[1].weight.detach())
    assert record.tied == {"head.weight": "embed.weight"}


def test_a_base_keeping_its_blocks_under_another_name_is_refused():
    with pytest.raises(
        terge.StackError, match=r"under different names \('model.layers', 'transformer.h'\)"
    ):
        terge.stack([(small(), 0, 2)], base=small(prefix="transformer.h"))


def with_ints(shift: int) -> dict[str, torch.Tensor]:
    state = {n: t + shift for n, t in small().items()}
    for i in range(4):
        state[f"model.layers.{i}.n"] = torch.tensor([i + shift])
    return state


def test_a_merged_slices_unmergeable_tensors_are_the_first_sources_renumbered():
    a, b = with_ints(0), with_ints(10)
    result, record = terge.stack([(a, 0, 1), [(a, 2, 4), (b, 0, 2)]], lineage=True)
    assert [result[f"model.layers.{i}.n"].item() for i in range(3)] == [0, 2, 3]
    assert [result[f"model.layers.{i}.w"][0].item() for i in range(3)] == [0, 6, 7]
    assert record.skipped == {
        "model.layers.1.n": "not floating point",
        "model.layers.2.n": "not floating point",
    }
    assert record.stack["tensors"]["model.layers.2.n"] == [[0, "model.layers.3.n"]]


def test_an_explicit_base_gives_the_embeddings_config_and_files(folders):
    (folders / "a" / "tokenizer.json").write_text('{"from": "a"}')
    (folders / "b" / "tokenizer.json").write_text('{"from": "b"}')
    out = terge.stack([(folders / "a", 1, 3)], base=folders / "b", out=folders / "o")
    assert (out / "tokenizer.json").read_text() == '{"from": "b"}'
    state = terge.load(out)
    assert torch.equal(state["model.embed_tokens.weight"], torch.full((3, 2), 10.0))
    assert torch.equal(state["lm_head.weight"], torch.ones(3, 2))
    assert blocks_of(out) == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["layer_types"]) == (2, ["x1", "x2"])
    record = load_lineage(out)
    assert (record.stack["base"], record.stack["head"], record.base.path) == (
        1,
        1,
        str(folders / "b"),
    )


def test_blocks_built_directly_are_checked_as_blocks_checks_them():
    with pytest.raises(terge.StackError, match=r"blocks\(3, 1\) is empty or negative"):
        terge.stack([terge.Blocks(small(), 3, 1)])


def test_a_width_mismatch_names_the_input_block_it_comes_from():
    message = "block 1 of dict holds 'model.layers.0.w' of shape (3,), but the base's blocks"
    with pytest.raises(terge.StackError, match=re.escape(message)):
        terge.stack([(small(), 0, 2), (small(width=3), 1, 3)])


def test_a_base_whose_blocks_differ_in_shape_holds_no_slice_to_one_shape():
    base = {**small(), "model.layers.3.w": torch.zeros(3)}  # blocks of widths 2 and 3
    result = terge.stack([(small(width=4), 0, 2)], base=base)
    assert [tuple(result[f"model.layers.{i}.w"].shape) for i in range(2)] == [(4,), (4,)]
    assert torch.equal(result["model.embed_tokens.weight"], torch.zeros(3, 2))


def test_a_block_just_past_the_bases_per_layer_list_is_refused(folders):
    terge.save(small(6), folders / "deep")  # six blocks, and no config.json
    (folders / "deep" / "config.json").unlink(missing_ok=True)
    with pytest.raises(terge.StackError, match="'layer_types' has no entry for block 4 of"):
        terge.stack([(folders / "a", 0, 2), (folders / "deep", 4, 6)], out=folders / "o")
    assert not (folders / "o").exists()


def test_the_per_layer_lists_follow_the_configs_depth_not_the_tensors(folders):
    """A checkpoint with a block its config does not count (DeepSeek-V3's multi-token
    prediction layer): the per-layer lists are those of the config's depth, so still resliced."""
    state = terge.load(folders / "a")
    config = (folders / "a" / "config.json").read_text()
    terge.save({**state, "model.layers.4.w": torch.full((2,), 4.0)}, folders / "a", overwrite=True)
    (folders / "a" / "config.json").write_text(config)  # still num_hidden_layers 4
    out = terge.stack([(folders / "a", 1, 3)], out=folders / "o")
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["layer_types"]) == (2, ["x1", "x2"])


def test_a_base_config_without_a_layer_count_lends_its_list_by_its_own_depth(folders):
    (folders / "a" / "config.json").write_text(
        json.dumps({"layer_types": ["x0", "x1", "x2", "x3"]})
    )
    terge.save(small(8), folders / "deep")  # eight blocks, and no config.json
    (folders / "deep" / "config.json").unlink(missing_ok=True)
    out = terge.stack([(folders / "a", 0, 2), (folders / "deep", 2, 4)], out=folders / "o")
    config = json.loads((out / "config.json").read_text())
    assert config == {"layer_types": ["x0", "x1", "x2", "x3"]}


def test_a_block_held_as_a_dtensor_is_refused_before_anything_is_read():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = small()
        mesh = init_device_mesh("cpu", (1,))
        model["model.layers.1.w"] = distribute_tensor(
            model["model.layers.1.w"], mesh, [Replicate()]
        )
        message = "'model.layers.0.w' would come from a sharded DTensor, which stack() cannot copy"
        with pytest.raises(terge.StackError, match=re.escape(message)):
            terge.stack([(model, 1, 2)])
    finally:
        dist.destroy_process_group()


# --- the command line's slices and options, as terge.stack receives them --------------------


def test_a_command_line_slice_reads_weights_gradients_home_and_colons_in_paths(
    monkeypatch, tmp_path
):
    from terge.cli.stacking import parse_slice

    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_slice("a:0:2") == terge.blocks(Path("a"), 0, 2)
    assert parse_slice("a:0:2@0.5") == terge.blocks(Path("a"), 0, 2, weight=0.5)
    assert parse_slice("a:0:2@0,1") == terge.blocks(Path("a"), 0, 2, weight=[0.0, 1.0])
    assert parse_slice("~/m:1:3") == terge.blocks(tmp_path / "m", 1, 3)
    assert parse_slice("c:/x:y:0:2") == terge.blocks(Path("c:/x:y"), 0, 2)  # ':' in the path
    assert parse_slice("a@1:0:2") == terge.blocks(Path("a@1"), 0, 2)  # '@' in the path
    assert parse_slice("a:0:2@1+b:2:4@3") == [
        terge.blocks(Path("a"), 0, 2, weight=1.0),
        terge.blocks(Path("b"), 2, 4, weight=3.0),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "a slice must be PATH:START:STOP; got ''."),
        ("a:0", "cannot read the slice 'a:0': give PATH:START:STOP (blocks START to STOP - 1)"),
        ("a:0:2@", "cannot read the slice 'a:0:2@'"),
        ("a:1:x", "cannot read the slice 'a:1:x'"),
        ("a:0:\u00b2", "cannot read the slice 'a:0:\u00b2'"),  # a digit int() cannot read
        ("a:0:2+", "cannot read the slice 'a:0:2+'"),
        ("a:3:1", "the slice 'a:3:1': blocks(3, 1) is empty or negative"),
        ("a:0:2@1,x", "cannot read the slice 'a:0:2@1,x'"),
    ],
)
def test_a_command_line_slice_it_cannot_read_is_refused_naming_it(text, message):
    from terge.cli.stacking import parse_slice
    from terge.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(message)):
        parse_slice(text)


@pytest.fixture
def fake_stack(monkeypatch):
    """terge.cli.stacking's stack() replaced: records its keywords, returns a 2-block record."""
    from types import SimpleNamespace

    import terge.cli.stacking as cli_stacking

    calls = []

    def fake(slices, **kwargs):
        calls.append({"slices": slices, **kwargs})
        record = SimpleNamespace(
            stack={"blocks": [{"method": "passthrough"}, {"method": "arithmetic"}]}
        )
        return record if kwargs.get("dry_run") else (kwargs["out"], record)

    monkeypatch.setattr(cli_stacking, "stack", fake)
    return calls


def test_terge_stack_passes_each_option_to_stack(fake_stack, capsys):
    from terge.cli.commands import main
    from terge.cli.recipe import parse_method

    argv = ["stack", "a:0:2", "-o", "o", "--base", "b", "--head", "c", "--method", "slerp"]
    argv += ["--out-dtype", "bfloat16", "--max-shard-size", "2GB", "--seed", "3", "--overwrite"]
    assert main(argv) == 0
    (call,) = fake_stack
    assert call == {
        "slices": [terge.blocks(Path("a"), 0, 2)],
        "out": "o",
        "lineage": True,
        "base": Path("b"),
        "head": Path("c"),
        "method": parse_method("slerp", "--method"),
        "out_dtype": torch.bfloat16,
        "max_shard_size": "2GB",
        "seed": 3,
        "overwrite": True,
    }
    assert re.fullmatch(
        r"terge: wrote o \(2 blocks, 1 merged\) in \d+\.\ds\n", capsys.readouterr().out
    )
    assert main(["stack", "a:0:2", "-o", "o", "--quiet", "--no-model-card"]) == 0
    assert fake_stack[-1] == {
        "slices": [terge.blocks(Path("a"), 0, 2)],
        "out": "o",
        "lineage": True,
        "model_card": False,
    }
    assert capsys.readouterr().out == ""


def test_terge_stack_dry_run_asks_stack_for_a_dry_run(fake_stack, capsys):
    from terge.cli.commands import main

    assert main(["stack", "a:0:2", "-o", "o", "--dry-run"]) == 0
    assert fake_stack[-1]["dry_run"] is True and "lineage" not in fake_stack[-1]
    assert capsys.readouterr().out == "terge: would write o (2 blocks)\n"
    assert main(["stack", "a:0:2", "-o", "o", "--dry-run", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_slices_from_a_recipe_take_its_dtype_and_a_config_s_options_win(fake_stack):
    from terge.cli.recipe import Settings
    from terge.cli.stacking import run_stack_settings

    slices = (terge.blocks(Path("a"), 0, 2),)
    settings = Settings(slices=slices, out=Path("o"), dtype=torch.float32)
    assert run_stack_settings(settings, quiet=True) == 0
    assert fake_stack[-1]["dtype"] == torch.float32
    other = [terge.blocks("b", 1, 3)]
    options = {"slices": other, "head": "c"}
    assert run_stack_settings(settings, quiet=True, options=options) == 0
    assert (fake_stack[-1]["slices"], fake_stack[-1]["head"]) == (other, "c")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"weights": (1.0,)}, "'weights' cannot be given with slices: a stack takes its blocks"),
        ({"out_format": "dcp"}, "a stack is written as safetensors; drop out_format."),
        ({"base": 0}, "with slices, base must be a path (the model giving the embeddings)."),
        ({"method": {"re:x": None}}, "with slices, method is one method for every merged slice."),
        ({"out": None}, "no output folder: give -o/--out OUT, or a recipe with 'out'."),
        ({"lineage": Path("l.json")}, "'lineage' cannot be given with slices: a stack writes"),
        ({"vocabulary": "union"}, "'vocabulary' cannot be given with slices"),
        (
            {"lora_rank": 8},
            "'lora_rank' cannot be given with slices: a stack is written as a whole",
        ),
        ({"lora_energy": 0.9}, "'lora_energy' cannot be given with slices"),
        ({"lora_embeddings": True}, "'lora_embeddings' cannot be given with slices"),
        ({"metric": "loss"}, "'metric' cannot be given with slices: it ranks the checkpoints"),
        ({"mode": "max"}, "'mode' cannot be given with slices"),
    ],
)
def test_settings_a_stack_cannot_take_are_refused_before_stacking(fake_stack, given, message):
    from terge.cli.recipe import Settings
    from terge.cli.stacking import run_stack_settings
    from terge.errors import UsageError

    settings = Settings(**{"slices": (terge.blocks(Path("a"), 0, 2),), "out": Path("o"), **given})
    with pytest.raises(UsageError, match=re.escape(message)):
        run_stack_settings(settings)
    assert fake_stack == []
