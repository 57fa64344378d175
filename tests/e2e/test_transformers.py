"""Merging real Hugging Face Transformers models, built tiny from configs (no downloads).

Every architecture is checked end to end: the merged model runs and its logits match a fresh model
loaded with a weighted mean computed here independently; one-hot weights reproduce a model
exactly; tied embeddings stay tied; a merge of ``save_pretrained`` folders written with ``out=``
loads with ``from_pretrained`` and matches the in-memory merge; and layer-wise weights
(``terge.by_layer``, ``terge.layers``) act per block on the architectures' real parameter names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# The floor of the [test] extra (pyproject.toml): older versions skip, naming the version found.
transformers = pytest.importorskip(
    "transformers",
    minversion="4.40",
    reason="transformers is not installed (pip install -e '.[test]')",
)

import terge  # noqa: E402

LAYERS = 4
VOCAB = 96
WEIGHTS = [1, 2, 5]
IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


@dataclass(frozen=True)
class Arch:
    name: str
    model: str
    """The model class, in ``transformers``."""
    auto: str
    """The Auto class that loads it back."""
    config: Callable[[], Any]
    block: str
    """The regex of a block's name prefix, its index captured: the architecture's real layout."""
    tied: bool
    """Whether the output embeddings are tied to the input embeddings."""


ARCHS = [
    Arch(
        "gpt2",
        "GPT2LMHeadModel",
        "AutoModelForCausalLM",
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=LAYERS,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
        ),
        r"transformer\.h\.(\d+)\.",
        tied=True,
    ),
    Arch(
        "gpt_neox",
        "GPTNeoXForCausalLM",
        "AutoModelForCausalLM",
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
        ),
        r"gpt_neox\.layers\.(\d+)\.",
        tied=False,
    ),
    Arch(
        "gptj",
        "GPTJForCausalLM",
        "AutoModelForCausalLM",
        lambda: transformers.GPTJConfig(
            vocab_size=VOCAB,
            n_positions=32,
            n_embd=32,
            n_layer=LAYERS,
            n_head=4,
            rotary_dim=4,
            bos_token_id=0,
            eos_token_id=0,
        ),
        r"transformer\.h\.(\d+)\.",
        tied=False,
    ),
    Arch(
        "opt",  # word_embed_proj_dim != hidden_size: project_in / project_out as in OPT-350m
        "OPTForCausalLM",
        "AutoModelForCausalLM",
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=32,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
        ),
        r"model\.decoder\.layers\.(\d+)\.",
        tied=True,
    ),
    Arch(
        "llama",
        "LlamaForCausalLM",
        "AutoModelForCausalLM",
        lambda: transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
        ),
        r"model\.layers\.(\d+)\.",
        tied=False,
    ),
    Arch(
        "llama_tied",
        "LlamaForCausalLM",
        "AutoModelForCausalLM",
        lambda: transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            tie_word_embeddings=True,
        ),
        r"model\.layers\.(\d+)\.",
        tied=True,
    ),
    Arch(
        "bert",
        "BertForMaskedLM",
        "AutoModelForMaskedLM",
        lambda: transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=32,
        ),
        r"bert\.encoder\.layer\.(\d+)\.",
        tied=True,
    ),
]

BY_NAME = {arch.name: arch for arch in ARCHS}


def only(*names: str) -> pytest.MarkDecorator:
    """Run a test on these architectures only (their models are shared with the other tests)."""
    return pytest.mark.parametrize(
        "arch", [BY_NAME[name] for name in names], indirect=True, ids=names
    )


def build(arch: Arch, seed: int) -> torch.nn.Module:
    """A tiny model whose every parameter (norms and biases too) differs from seed to seed."""
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model)(arch.config()).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # tied parameters once: they stay tied
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def fresh(arch: Arch, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = getattr(transformers, arch.model)(arch.config()).eval()
    model.load_state_dict(state)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def block_of(arch: Arch, name: str) -> int | None:
    match = re.match(arch.block, name)
    return int(match[1]) if match else None


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names sharing one Parameter object, for every parameter with more than one name."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return sorted(names for names in groups.values() if len(names) > 1)


def assert_tied_like(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    assert tied_groups(model) == tied_groups(reference)
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert (embeddings.data_ptr() == head.data_ptr()) == reference.config.tie_word_embeddings


def weighted_mean(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict:
    """The float64 weighted mean of every floating tensor, rounded to its dtype; others: base's."""
    expected = {}
    for name, tensor in states[0].items():
        if not tensor.is_floating_point():
            expected[name] = tensor
            continue
        total = sum(w * state[name].double() for w, state in zip(weights, states))
        expected[name] = (total / sum(weights)).to(tensor.dtype)
    return expected


@pytest.fixture(scope="module", params=ARCHS, ids=lambda arch: arch.name)
def arch(request: pytest.FixtureRequest) -> Arch:
    return request.param


@pytest.fixture(scope="module")
def instances(arch: Arch) -> list[torch.nn.Module]:
    models = [build(arch, seed) for seed in range(3)]
    assert arch.tied == models[0].config.tie_word_embeddings
    return models


@pytest.fixture(scope="module")
def mean_merge(instances: list[torch.nn.Module]) -> tuple[torch.nn.Module, terge.Lineage]:
    return terge.merge(instances, weights=WEIGHTS, lineage=True)


@pytest.fixture(scope="module")
def folders(
    arch: Arch, instances: list[torch.nn.Module], tmp_path_factory: pytest.TempPathFactory
) -> list[Path]:
    root = tmp_path_factory.mktemp(arch.name)
    paths = []
    for i, model in enumerate(instances):
        model.save_pretrained(root / f"m{i}")  # safetensors
        paths.append(root / f"m{i}")
    return paths


# ------------------------------------------------------------------------------------------------
# Weighted means in memory
# ------------------------------------------------------------------------------------------------


def test_merged_model_runs_and_matches_the_independent_weighted_mean(arch, instances, mean_merge):
    merged, lineage = mean_merge
    assert type(merged) is type(instances[0])
    expected = weighted_mean([model.state_dict() for model in instances], WEIGHTS)
    for name, tensor in merged.state_dict().items():  # the same float64 sums, rounded once
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(logits(merged), logits(fresh(arch, expected)))
    shares = [w / sum(WEIGHTS) for w in WEIGHTS]
    for name, _ in merged.named_parameters():
        method, contributions = lineage[name]
        assert method == "arithmetic"
        assert [i for i, _ in contributions] == [0, 1, 2]
        assert [w for _, w in contributions] == shares  # eighths: exact


def test_equal_weights_by_default(arch, instances):
    merged = terge.merge(instances)
    expected = weighted_mean([model.state_dict() for model in instances], [1, 1, 1])
    assert torch.equal(logits(merged), logits(fresh(arch, expected)))


@pytest.mark.parametrize("chosen", [0, 1])
def test_one_hot_weights_reproduce_that_model_exactly(arch, instances, chosen):
    weights = [0, 0, 0]
    weights[chosen] = 1
    merged = terge.merge(instances, weights=weights)
    assert torch.equal(logits(merged), logits(instances[chosen]))
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, instances[chosen].state_dict()[name]), name


def test_tied_weights_stay_tied(arch, instances, mean_merge):
    merged, lineage = mean_merge
    assert_tied_like(merged, instances[0])
    if arch.name == "gpt2":
        assert merged.lm_head.weight is merged.transformer.wte.weight
    aliases = {alias for names in tied_groups(instances[0]) for alias in names[1:]}
    assert set(lineage.tied) == aliases
    assert all(lineage.skipped[alias] == "tied" for alias in aliases)
    assert bool(aliases) == arch.tied


def test_in_place_into_a_model_keeps_its_parameters_and_ties(arch, instances, mean_merge):
    base = build(arch, 0)
    parameters = dict(base.named_parameters(remove_duplicate=False))
    terge.merge([base, *instances[1:]], weights=WEIGHTS, inplace=True)
    assert torch.equal(logits(base), logits(mean_merge[0]))
    for name, parameter in base.named_parameters(remove_duplicate=False):
        assert parameter is parameters[name], name
    assert_tied_like(base, instances[0])


def test_inputs_are_left_untouched(arch, instances):
    before = [{k: v.clone() for k, v in model.state_dict().items()} for model in instances]
    terge.merge(instances, weights=WEIGHTS)
    for model, state in zip(instances, before):
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, state[name]), name


# ------------------------------------------------------------------------------------------------
# Through files: save_pretrained folders in, a from_pretrained folder out
# ------------------------------------------------------------------------------------------------


def test_folders_merged_with_out_load_with_from_pretrained(
    arch, instances, folders, mean_merge, tmp_path
):
    out = terge.merge([str(folder) for folder in folders], weights=WEIGHTS, out=tmp_path / "m")
    assert out == tmp_path / "m"
    loaded = getattr(transformers, arch.auto).from_pretrained(out).eval()
    assert type(loaded) is type(instances[0])
    assert loaded.dtype == torch.float32
    merged, _ = mean_merge
    assert torch.equal(logits(loaded), logits(merged))
    assert_tied_like(loaded, instances[0])
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, merged.state_dict()[name]), name
    # The checkpoint holds the tensors save_pretrained writes, the config and the lineage.
    from safetensors import safe_open

    with (
        safe_open(out / "model.safetensors", "pt") as written,
        safe_open(folders[0] / "model.safetensors", "pt") as saved,
    ):
        names = set(saved.keys())
        assert set(written.keys()) == names
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (folders[0] / "config.json").read_text()
    )
    record = json.loads((out / "lineage.json").read_text())
    assert set(record["merged"]) == names  # the file's names (GPT-NeoX: embed_out, not lm_head)
    shares = [w / sum(WEIGHTS) for w in WEIGHTS]
    for entry in record["merged"].values():
        assert [i for i, _ in entry["contributions"]] == [0, 1, 2]
        assert [w for _, w in entry["contributions"]] == shares  # eighths: exact


def test_modules_and_folders_mixed_with_out(arch, instances, folders, mean_merge, tmp_path):
    models = [str(folders[0]), instances[1], folders[2]]
    if arch.name == "gpt_neox":
        # transformers 5 saves GPTNeoXForCausalLM's lm_head.weight as embed_out.weight, so the
        # module's head shares no name with the folders'. terge matches by name and cannot merge
        # it, but it must say so rather than drop it silently.
        _, lineage = terge.merge(models, weights=WEIGHTS, out=tmp_path / "m", lineage=True)
        assert lineage.unused == {"lm_head.weight": [1]}
        assert [i for i, _ in lineage["embed_out.weight"][1]] == [0, 2]
        record = json.loads((tmp_path / "m" / "lineage.json").read_text())
        assert record["unused"] == {"lm_head.weight": [1]}
        return
    out = terge.merge(models, weights=WEIGHTS, out=tmp_path / "m")
    loaded = getattr(transformers, arch.auto).from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(mean_merge[0]))
    assert_tied_like(loaded, instances[0])


def test_modules_merged_with_out_load_once_the_config_is_saved(
    arch, instances, mean_merge, tmp_path
):
    out = terge.merge(instances, weights=WEIGHTS, out=tmp_path / "m")
    instances[0].config.save_pretrained(out)
    loaded = getattr(transformers, arch.auto).from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(mean_merge[0]))
    assert_tied_like(loaded, instances[0])


@only("llama", "gpt2")
def test_sharded_folders_in_and_out(arch, instances, mean_merge, tmp_path):
    folders = []
    for i, model in enumerate(instances):
        model.save_pretrained(tmp_path / f"m{i}", max_shard_size="20KB")
        folders.append(tmp_path / f"m{i}")
    assert (folders[0] / "model.safetensors.index.json").is_file()
    out = terge.merge(folders, weights=WEIGHTS, out=tmp_path / "out", max_shard_size="30KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = getattr(transformers, arch.auto).from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(mean_merge[0]))
    assert_tied_like(loaded, instances[0])


@only("llama")
def test_out_dtype_writes_a_bfloat16_checkpoint_rounded_once(arch, instances, folders, tmp_path):
    out = terge.merge(folders, weights=WEIGHTS, out=tmp_path / "m", out_dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = getattr(transformers, arch.auto).from_pretrained(out, dtype="auto")
    assert loaded.dtype == torch.bfloat16
    states = [model.state_dict() for model in instances]
    for name, tensor in loaded.state_dict().items():
        exact = sum(w * state[name].double() for w, state in zip(WEIGHTS, states)) / sum(WEIGHTS)
        assert tensor.dtype == torch.bfloat16
        # Rounded once: at least as close to the float64 mean as torch's own conversion.
        error = (tensor.double() - exact).abs()
        assert bool((error <= (exact.to(torch.bfloat16).double() - exact).abs()).all()), name
    logits(loaded)


# ------------------------------------------------------------------------------------------------
# Layer-wise merges on the real parameter names
# ------------------------------------------------------------------------------------------------


def test_block_indices_are_read_from_the_real_names(arch, instances):
    names = list(instances[0].state_dict())
    blocks = {block_of(arch, name) for name in names} - {None}
    assert blocks == set(range(LAYERS))
    for name in names:
        assert terge.layer_index(name) == block_of(arch, name), name
    everything = [
        terge.layers(range(LAYERS)),
        terge.layers(embeddings=True),
        terge.layers(head=True),
    ]
    for name in names:  # every name is a block's, the embeddings' or the head's
        assert any(pattern.search(name) for pattern in everything), name


def test_a_gradient_interpolates_block_by_block(arch, instances):
    a, b = instances[:2]
    gradient = [terge.by_layer([1, 0]), terge.by_layer([0, 1])]
    merged, lineage = terge.merge([a, b], weights=gradient, lineage=True)
    sa, sb, sm = a.state_dict(), b.state_dict(), merged.state_dict()
    shares = {}
    for name, _ in merged.named_parameters():
        block = block_of(arch, name)
        share = 0.5 if block is None else block / (LAYERS - 1)  # outside: the layers' mean
        shares[block] = share
        assert [i for i, _ in lineage[name][1]] == [0, 1]
        # by_layer interpolates thirds in its own order of operations (and the merge divides
        # by the weights' sum, 1 up to rounding): equal to block / 3 up to float64 rounding,
        # which may move a float32 entry by an ulp.
        assert [w for _, w in lineage[name][1]] == pytest.approx([1 - share, share], rel=1e-15)
        expected = (1 - share) * sa[name].double() + share * sb[name].double()
        torch.testing.assert_close(sm[name], expected.float(), rtol=1e-6, atol=1e-7, msg=name)
    assert shares == {None: 0.5, 0: 0.0, 1: 1 / 3, 2: 2 / 3, 3: 1.0}
    assert_tied_like(merged, a)
    logits(merged)


def test_a_gradient_with_other_sets_embeddings_and_head(arch, instances):
    a, b = instances[:2]
    weights = [terge.by_layer([1, 0], other=1), terge.by_layer([0, 1], other=0)]
    merged = terge.merge([a, b], weights=weights)
    sa, sm = a.state_dict(), merged.state_dict()
    for name in sm:
        if block_of(arch, name) is None or block_of(arch, name) == 0:
            assert torch.equal(sm[name], sa[name]), name


def test_a_block_merge_takes_blocks_from_the_second_model(arch, instances):
    a, b = instances[:2]
    weights = {terge.layers("1-2"): [0, 1], re.compile(".*"): [1, 0]}
    merged, lineage = terge.merge([a, b], weights=weights, lineage=True)
    sa, sb = a.state_dict(), b.state_dict()
    spliced = {n: (sb if block_of(arch, n) in (1, 2) else sa)[n] for n in sa}
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, spliced[name]), name
    for name, _ in merged.named_parameters():
        expected = [(0, 0.0), (1, 1.0)] if block_of(arch, name) in (1, 2) else [(0, 1.0), (1, 0.0)]
        assert lineage[name][1] == expected, name
    assert_tied_like(merged, a)
    assert torch.equal(logits(merged), logits(fresh(arch, spliced)))


@only("llama", "gpt2")
def test_layer_wise_merges_through_folders_match_memory(arch, instances, folders, tmp_path):
    for i, weights in enumerate(
        [
            [terge.by_layer([1, 0]), terge.by_layer([0, 1])],
            {terge.layers("1-2"): [0, 1], re.compile(".*"): [1, 0]},
        ]
    ):
        in_memory = terge.merge(instances[:2], weights=weights)
        out = terge.merge(folders[:2], weights=weights, out=tmp_path / f"m{i}")
        loaded = getattr(transformers, arch.auto).from_pretrained(out).eval()
        assert torch.equal(logits(loaded), logits(in_memory))
        assert_tied_like(loaded, instances[0])
