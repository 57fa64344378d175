"""Block selection by index on the parameter names of real model families."""

from __future__ import annotations

import re

import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

from terge.errors import TergeError
from terge.layers import LayerSpecError, block_prefix, layer_index, layers, renumbered
from terge.patterns import PatternMap, PatternSet, selected

INDICES = (0, 1, 2, 10, 11)  # 1 and 10/11 share a prefix: "1" must not select 10 or 11

# family: (embedding names, per-block templates, head names), as Hugging Face writes them.
FAMILIES: dict[str, tuple[list[str], list[str], list[str]]] = {
    "gpt2": (
        ["transformer.wte.weight", "transformer.wpe.weight"],
        [
            "transformer.h.{}.ln_1.weight",
            "transformer.h.{}.attn.bias",
            "transformer.h.{}.attn.c_attn.weight",
            "transformer.h.{}.attn.c_proj.bias",
            "transformer.h.{}.ln_2.bias",
            "transformer.h.{}.mlp.c_fc.weight",
            "transformer.h.{}.mlp.c_proj.weight",
        ],
        ["transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"],
    ),
    "gpt-neox": (
        ["gpt_neox.embed_in.weight"],
        [
            "gpt_neox.layers.{}.input_layernorm.weight",
            "gpt_neox.layers.{}.post_attention_layernorm.bias",
            "gpt_neox.layers.{}.attention.query_key_value.weight",
            "gpt_neox.layers.{}.attention.rotary_emb.inv_freq",
            "gpt_neox.layers.{}.attention.dense.weight",
            "gpt_neox.layers.{}.mlp.dense_h_to_4h.weight",
            "gpt_neox.layers.{}.mlp.dense_4h_to_h.bias",
        ],
        ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias", "embed_out.weight"],
    ),
    "llama": (
        ["model.embed_tokens.weight"],
        [
            "model.layers.{}.self_attn.q_proj.weight",
            "model.layers.{}.self_attn.k_proj.weight",
            "model.layers.{}.self_attn.v_proj.weight",
            "model.layers.{}.self_attn.o_proj.weight",
            "model.layers.{}.mlp.gate_proj.weight",
            "model.layers.{}.mlp.up_proj.weight",
            "model.layers.{}.mlp.down_proj.weight",
            "model.layers.{}.input_layernorm.weight",
            "model.layers.{}.post_attention_layernorm.weight",
        ],
        ["model.norm.weight", "lm_head.weight"],
    ),
    "opt": (
        [
            "model.decoder.embed_tokens.weight",
            "model.decoder.embed_positions.weight",
            "model.decoder.project_in.weight",
        ],
        [
            "model.decoder.layers.{}.self_attn.k_proj.weight",
            "model.decoder.layers.{}.self_attn.out_proj.bias",
            "model.decoder.layers.{}.self_attn_layer_norm.weight",
            "model.decoder.layers.{}.fc1.weight",
            "model.decoder.layers.{}.fc2.bias",
            "model.decoder.layers.{}.final_layer_norm.weight",  # a block's own, not the head's
        ],
        [
            "model.decoder.final_layer_norm.weight",
            "model.decoder.project_out.weight",
            "lm_head.weight",
        ],
    ),
    "bert": (
        [
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.embeddings.LayerNorm.bias",
            "bert.embeddings.position_ids",
        ],
        [
            "bert.encoder.layer.{}.attention.self.query.weight",
            "bert.encoder.layer.{}.attention.self.value.bias",
            "bert.encoder.layer.{}.attention.output.dense.weight",
            "bert.encoder.layer.{}.attention.output.LayerNorm.weight",
            "bert.encoder.layer.{}.intermediate.dense.weight",
            "bert.encoder.layer.{}.output.dense.weight",
            "bert.encoder.layer.{}.output.LayerNorm.bias",
        ],
        [
            "bert.pooler.dense.weight",
            "cls.predictions.bias",
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.decoder.weight",
            "cls.seq_relationship.weight",
        ],
    ),
    "gpt-j": (
        ["transformer.wte.weight"],
        [
            "transformer.h.{}.ln_1.weight",
            "transformer.h.{}.attn.q_proj.weight",
            "transformer.h.{}.attn.k_proj.weight",
            "transformer.h.{}.attn.v_proj.weight",
            "transformer.h.{}.attn.out_proj.weight",
            "transformer.h.{}.mlp.fc_in.weight",
            "transformer.h.{}.mlp.fc_out.bias",
        ],
        ["transformer.ln_f.weight", "lm_head.weight", "lm_head.bias"],
    ),
    "bloom": (
        [
            "transformer.word_embeddings.weight",
            "transformer.word_embeddings_layernorm.weight",
        ],
        [
            "transformer.h.{}.input_layernorm.weight",
            "transformer.h.{}.self_attention.query_key_value.weight",
            "transformer.h.{}.mlp.dense_4h_to_h.weight",
        ],
        ["transformer.ln_f.weight"],
    ),
    "t5": (
        ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"],
        [
            "encoder.block.{}.layer.0.SelfAttention.q.weight",
            "encoder.block.{}.layer.1.DenseReluDense.wi.weight",  # block {}, never block 1
            "encoder.block.{}.layer.1.layer_norm.weight",
            "decoder.block.{}.layer.2.DenseReluDense.wo.weight",
        ],
        ["encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight", "lm_head.weight"],
    ),
}


def expected_names(family: str) -> dict[str, str | int]:
    embeddings, templates, head = FAMILIES[family]
    names: dict[str, str | int] = dict.fromkeys(embeddings, "embeddings")
    for index in INDICES:
        names.update(dict.fromkeys((t.format(index) for t in templates), index))
    names.update(dict.fromkeys(head, "head"))
    return names


def matching(pattern: regex.Pattern[str], family: str) -> set[str]:
    return {name for name in expected_names(family) if pattern.search(name)}


def kinds(family: str, *wanted: str | int) -> set[str]:
    return {name for name, kind in expected_names(family).items() if kind in wanted}


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_index_reads_the_first_block_segment(family):
    for name, kind in expected_names(family).items():
        assert layer_index(name) == (kind if isinstance(kind, int) else None), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("index", INDICES)
def test_one_block_selects_exactly_that_block(family, index):
    assert matching(layers(index), family) == kinds(family, index)


@pytest.mark.parametrize("family", FAMILIES)
def test_embeddings_and_head_select_exactly_those_parts(family):
    assert matching(layers(embeddings=True), family) == kinds(family, "embeddings")
    assert matching(layers(head=True), family) == kinds(family, "head")
    both = layers("0-1", embeddings=True, head=True)
    assert matching(both, family) == kinds(family, "embeddings", "head", 0, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_name_is_embeddings_a_block_or_head(family):
    everything = layers(INDICES, embeddings=True, head=True)
    assert matching(everything, family) == set(expected_names(family))


def test_embeddings_and_blocks_zero_to_five_in_one_expression():
    pattern = layers("0-5", embeddings=True)
    chosen = [
        n for n in ("model.embed_tokens.weight", *probe_names(range(12))) if pattern.search(n)
    ]
    assert chosen == ["model.embed_tokens.weight", *probe_names(range(6))]


def probe_names(indices) -> list[str]:
    return [f"model.layers.{i}.mlp.up_proj.weight" for i in indices]


@pytest.mark.parametrize(
    "spec",
    [
        ("0-5",),
        ("0 - 5",),
        (range(0, 6),),
        (0, 1, 2, 3, 4, 5),
        ([5, 4, 3, 2, 1, 0],),
        ("0-2", 3, range(4, 6)),
        ("0-3, 2-5",),
        ("0-1 2 3,4-5",),
    ],
)
def test_spellings_of_the_same_blocks_give_the_same_pattern(spec):
    assert layers(*spec).pattern == layers(range(6)).pattern
    chosen = [layer_index(n) for n in probe_names(range(12)) if layers(*spec).search(n)]
    assert chosen == list(range(6))


def test_string_ranges_are_inclusive_and_python_ranges_are_not():
    assert layers("2-4").pattern == layers(2, 3, 4).pattern
    assert layers(range(2, 4)).pattern == layers(2, 3).pattern
    assert layers("0-3, 8, 10-11").pattern == layers(0, 1, 2, 3, 8, 10, 11).pattern


def test_the_exact_pattern():
    block = r"(?:layers|layer|h|blocks|block)"
    prefix = rf"^(?:(?!{block}\.\d+\.)[^.]+\.)*"
    assert layers("3", 7).pattern == rf"{prefix}(?:{block}\.(?:3|7)\.)"
    assert layers(0, head=True).pattern.startswith(rf"{prefix}(?:{block}\.(?:0)\.|(?:lm_head|")


def test_the_pattern_works_wherever_terge_takes_one():
    pattern = layers("0-1", embeddings=True)
    assert isinstance(pattern, regex.Pattern)
    included, excluded = PatternSet(pattern, "included"), PatternSet(layers(1), "excluded")
    assert selected("model.layers.0.mlp.up_proj.weight", included, excluded)
    assert not selected("model.layers.1.mlp.up_proj.weight", included, excluded)
    assert selected("model.embed_tokens.weight", included, excluded)
    weights = PatternMap({layers("0-9"): 0.3, re.compile("."): 0.5}, "weights")
    assert weights.match("model.layers.9.mlp.up_proj.weight")[1] == 0.3
    assert weights.match("model.layers.10.mlp.up_proj.weight")[1] == 0.5


@given(st.sets(st.integers(0, 200), min_size=1), st.integers(0, 250))
def test_a_block_matches_exactly_when_its_index_is_selected(indices, index):
    name = f"model.layers.{index}.self_attn.q_proj.weight"
    assert (layers(indices).search(name) is not None) == (index in indices)
    assert layer_index(name) == index


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ((), r"layers\(\) was given nothing to select; give block indices as ints"),
        ((-1,), r"the negative index -1; give"),
        ((True,), r"the bool True; give"),
        ((1.5,), r"a float \(1.5\); give"),
        (([],), r"the empty \[\]; give"),
        ((range(3, 3),), r"the empty range\(3, 3\); give"),
        (("",), r"cannot read ''; give"),
        (("x",), r"cannot read 'x'; give"),
        (("1-",), r"cannot read '1-'; give"),
        (("5-3",), r"the range '5-3' in '5-3', whose end comes before its start; write '3-5'"),
        (("0-2, 9-4",), r"the range '9-4' in '0-2, 9-4'"),
        (("b 0-5 e",), r"llm_sepweight part specs .* write layers\(range\(0, 5\), embeddings=True"),
        (([1, "x"],), r"cannot read 'x'"),
    ],
)
def test_bad_specs_are_refused_with_the_accepted_forms(spec, message):
    with pytest.raises(LayerSpecError, match=message):
        layers(*spec)


def test_layer_spec_error_is_a_terge_value_error():
    assert issubclass(LayerSpecError, TergeError)
    assert issubclass(LayerSpecError, ValueError)


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("fc_norm.weight", True),  # timm's ViT
        ("head.weight", True),
        ("score", True),  # a top-level parameter: the name ends at the head segment
        ("lm_head", True),
        ("blocks.0.norm1.weight", False),
        ("scores.weight", False),
    ],
)
def test_head_segments_end_at_a_dot_or_at_the_end_of_the_name(name, head):
    assert bool(layers(head=True).search(name)) is head


@pytest.mark.parametrize("name", ["model.layers.3", "layers.3", "h.0"])
def test_digits_that_end_a_name_are_no_block(name):
    """A block segment is followed by more of the name: a tensor called ``layers.3`` (a list of
    parameters, say) is outside the blocks, and neither renumbered nor given a stack."""
    assert layer_index(name) is None
    assert block_prefix(name) is None
    assert renumbered(name, 7) == name
    assert block_prefix(name + ".weight") is not None


def test_part_specs_are_recognised_in_capitals_too():
    with pytest.raises(LayerSpecError, match=r"llm_sepweight part specs such as 'b 0-5 e'"):
        layers("B 0-5 E")
