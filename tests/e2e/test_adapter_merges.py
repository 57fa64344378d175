"""PEFT LoRA adapters merged as models, with PEFT's own ``merge_and_unload()`` as the oracle.

Tiny Llama (linear layers, embeddings, ``modules_to_save``) and GPT-2 (``Conv1D``, so
``fan_in_fan_out``) models are built from configs, adapted with ``get_peft_model`` with random,
non-zero ``lora_B`` (``init_lora_weights=False``) and saved; terge reads the saved folders. PEFT
computes ``B @ A`` in float32 and adds it to the float32 weight (two roundings); terge computes
``base + delta`` in float64 and rounds once, so the two agree to a few ulps, not bit for bit:
:data:`ULPS` is the allowance, and every test reports what it measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]'")
peft = pytest.importorskip("peft", minversion="0.10", reason="pip install -e '.[test]'")

import terge  # noqa: E402
import terge.audit  # noqa: E402
from terge.sources import AdapterSource  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ULPS = 2
"""The most float32 ulps (of the tensor's scale, see :func:`operand_ulps`) terge's result may
differ from PEFT's (measured on these models: 1.08 at most, DoRA's norms the largest)."""
EPS = 2.0**-23
"""A float32 ulp at 1: the ulp of any x is at most ``|x| * EPS``."""


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in float32 units in the last place between two float32 tensors."""
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    ia, ib = a.contiguous().view(torch.int32).long(), b.contiguous().view(torch.int32).long()
    # map the sign-magnitude bit patterns onto a line on which neighbours differ by one
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max()) if a.numel() else 0


def operand_ulps(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> float:
    """``|ours - theirs|`` at worst, in float32 ulps of the tensor's largest value.

    Where ``base + delta`` nearly cancels, the sum's own ulp is tiny, and PEFT's float32
    ``B @ A`` (rounded before it is added, its r products cancelling too) is off by many of
    them: the fair yardstick for PEFT's two roundings against terge's one is the scale of the
    tensor, not of each sum.
    """
    scale = max(float(base.double().abs().max()), float(ours.double().abs().max()))
    error = float((ours.double() - theirs.double()).abs().max())
    return error / (EPS * scale) if scale else error


def llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0
    )
    config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config)


def save_adapter(make: Callable[[], Any], base: Path, folder: Path, seed: int, **lora: Any) -> Path:
    """A PEFT adapter over ``make()`` (saved at ``base``) with random non-zero factors."""
    if not base.exists():
        make().save_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **lora)
    adapted = peft.get_peft_model(model, config)
    with torch.no_grad():  # what training would change besides A and B
        for name, p in adapted.named_parameters():
            if "lora_magnitude_vector" in name:  # magnitudes away from the base's norms
                p.mul_(1 + 0.1 * torch.rand_like(p))
            elif name.endswith("bias") and p.requires_grad:  # bias="all"/"lora_only", lora_bias
                p.add_(0.1 * torch.randn_like(p))
    adapted.save_pretrained(folder)
    config_file = folder / "adapter_config.json"  # name the base as a local path
    data = json.loads(config_file.read_text())
    data["base_model_name_or_path"] = str(base)
    config_file.write_text(json.dumps(data))
    return folder


def peft_merged(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of the adapter into its base: the oracle."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, folder).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def compare(
    ours: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], base: dict[str, torch.Tensor]
) -> float:
    """The largest difference in operand ulps over every tensor both hold."""
    worst = 0.0
    for name, expected in oracle.items():
        if name not in ours:  # a tied name save_pretrained writes once
            continue
        worst = max(worst, operand_ulps(ours[name].detach(), expected, base[name]))
    return worst


LLAMA_LORA = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "modules_to_save": ["lm_head"],
    "rank_pattern": {"layers.1.self_attn.q_proj": 2},
    "alpha_pattern": {"v_proj": 3},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


def case(work: Path, name: str, make: Callable[[], Any], seed: int, **lora: Any) -> Path:
    return save_adapter(make, work / f"{make.__name__}-base", work / name, seed, **lora)


@pytest.mark.parametrize(
    ("make", "lora"),
    [
        pytest.param(llama, LLAMA_LORA, id="llama-patterns-embedding-modules_to_save"),
        pytest.param(llama, {**LLAMA_LORA, "use_rslora": True}, id="llama-rslora"),
        pytest.param(
            gpt2,
            {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj"], "bias": "lora_only"},
            id="gpt2-conv1d-bias-lora_only",
        ),
        pytest.param(
            gpt2,
            {"r": 3, "lora_alpha": 5, "target_modules": ["c_fc"], "bias": "all"},
            id="gpt2-bias-all",
        ),
        pytest.param(
            llama,
            {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"], "use_dora": True},
            id="llama-dora",
        ),
        pytest.param(
            gpt2,
            {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "use_dora": True},
            id="gpt2-dora-fan_in_fan_out",
        ),
        pytest.param(
            gpt2,
            {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "lora_bias": True},
            id="gpt2-lora_bias",
        ),
    ],
)
def test_an_adapter_merged_alone_is_peft_merge_and_unload(work, make, lora, request):
    folder = case(work, request.node.callspec.id, make, seed=1, **lora)
    oracle = peft_merged(work / f"{make.__name__}-base", folder)
    if make is gpt2 and lora.get("bias") == "all":  # every bias was trained: they all differ
        base = make().state_dict()
        bias = "transformer.h.0.attn.c_attn.bias"
        assert not torch.equal(oracle[bias], base[bias])
    for given in (str(folder), terge.adapter(folder), terge.adapter(folder, base=make())):
        ours = terge.merge([given])
        assert set(oracle) >= set(ours)
        worst = compare(ours, oracle, make().state_dict())
        print(f"{request.node.callspec.id}: {worst:.2f} operand ulps from PEFT")
        assert worst <= ULPS
    base = make().state_dict()
    changed = [n for n in ours if not torch.equal(ours[n], base[n])]
    assert changed  # the adapter did something: a test that cannot fail is a defect


def test_every_adapted_tensor_is_base_plus_scaling_b_a_in_float64(work):
    """The closed form, from the saved factors, rounded once: bit for bit."""
    folder = case(work, "closed-form", llama, seed=2, **LLAMA_LORA)
    ours = terge.merge([str(folder)])
    base = llama().state_dict()
    from safetensors.torch import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    prefix = "base_model.model."
    for module, rank, alpha in [
        ("model.layers.0.self_attn.q_proj", 4, 8),
        ("model.layers.1.self_attn.q_proj", 2, 8),  # rank_pattern
        ("model.layers.1.self_attn.v_proj", 4, 3),  # alpha_pattern
    ]:
        a = saved[f"{prefix}{module}.lora_A.weight"].double()
        b = saved[f"{prefix}{module}.lora_B.weight"].double()
        assert a.shape[0] == rank
        expected = (base[f"{module}.weight"].double() + (b @ a) * (alpha / rank)).float()
        assert torch.equal(ours[f"{module}.weight"], expected)
    a = saved[f"{prefix}model.embed_tokens.lora_embedding_A"].double()
    b = saved[f"{prefix}model.embed_tokens.lora_embedding_B"].double()
    expected = (base["model.embed_tokens.weight"].double() + (b @ a).T * 2).float()
    assert torch.equal(ours["model.embed_tokens.weight"], expected)
    assert torch.equal(ours["lm_head.weight"], saved[f"{prefix}lm_head.weight"])  # whole


def test_a_soup_of_two_adapters_is_the_average_of_the_two_merged_models(work):
    first = case(work, "soup-a", llama, seed=3, **LLAMA_LORA)
    second = case(work, "soup-b", llama, seed=4, **LLAMA_LORA)
    soup = terge.merge([str(first), str(second)])
    one, two = peft_merged(work / "llama-base", first), peft_merged(work / "llama-base", second)
    base = llama().state_dict()
    for name, value in soup.items():
        expected = ((one[name].double() + two[name].double()) / 2).float()
        assert operand_ulps(value, expected, base[name]) <= ULPS, name


def test_a_random_method_over_adapter_deltas_draws_with_each_tensor_s_seed(work):
    """DARE over adapters' deltas (the delta path) draws each tensor's mask from the seed the
    plan derives for it, as over the same models merged in: the same masks, so the results
    agree to rounding (only how each task vector is formed differs)."""
    first = case(work, "dr-a", llama, seed=5, **LLAMA_LORA)
    second = case(work, "dr-b", llama, seed=6, **LLAMA_LORA)
    base_folder = work / "llama-base"
    method = terge.methods.dare_linear(density=0.5)
    merged = terge.merge([str(first), str(second)], base=str(base_folder), method=method, seed=9)
    whole = [peft_merged(base_folder, first), peft_merged(base_folder, second)]
    base = llama().state_dict()
    expected = terge.merge(whole, base=base, method=method, seed=9)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(merged[name], base[name])


def test_task_arithmetic_takes_each_adapters_delta_as_its_task_vector(work, monkeypatch):
    first = case(work, "ta-a", llama, seed=5, **LLAMA_LORA)
    second = case(work, "ta-b", llama, seed=6, **LLAMA_LORA)
    asked: list[str] = []
    original = AdapterSource.delta

    def spy(self: AdapterSource, name: str, base: Any) -> Any:
        found = original(self, name, base)
        if found is not None:
            asked.append(name)
        return found

    monkeypatch.setattr(AdapterSource, "delta", spy)
    base_folder = work / "llama-base"
    method = terge.methods.task_arithmetic(scale=0.5)
    merged = terge.merge([str(first), str(second)], base=str(base_folder), method=method)
    assert "model.layers.0.self_attn.q_proj.weight" in asked
    base = llama().state_dict()
    one, two = peft_merged(base_folder, first), peft_merged(base_folder, second)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        from safetensors.torch import load_file

        deltas = []
        for folder in (first, second):
            saved = load_file(folder / "adapter_model.safetensors")
            module = name[: -len(".weight")]
            a = saved[f"base_model.model.{module}.lora_A.weight"].double()
            b = saved[f"base_model.model.{module}.lora_B.weight"].double()
            deltas.append(b @ a * 2)
        exact = (base[name].double() + 0.5 * (deltas[0] + deltas[1]) / 2).float()
        assert ulps(merged[name], exact) <= 1, name  # the deltas, not (base + delta) - base
        tau_one, tau_two = (one[name].double() - base[name]), (two[name].double() - base[name])
        via_peft = (base[name].double() + 0.5 * (tau_one + tau_two) / 2).float()
        assert operand_ulps(merged[name], via_peft, base[name]) <= ULPS
    # a tensor no adapter changes is the base's, exactly
    untouched = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[untouched], base[untouched])


def test_ties_over_adapters_matches_ties_over_the_merged_models(work):
    first = case(work, "ties-a", llama, seed=7, **LLAMA_LORA)
    second = case(work, "ties-b", llama, seed=8, **LLAMA_LORA)
    base_folder = work / "llama-base"
    method = terge.methods.ties(density=0.5)
    ours = terge.merge([str(first), str(second)], base=str(base_folder), method=method)
    models = [peft_merged(base_folder, f) for f in (first, second)]
    reference = terge.merge(models, base=llama().state_dict(), method=method)
    base = llama().state_dict()
    worst = max(operand_ulps(ours[n], reference[n], base[n]) for n in ours)
    assert worst <= ULPS


def test_adapters_over_an_in_memory_base_module(work):
    model = llama()
    first = case(work, "mem-a", llama, seed=9, **LLAMA_LORA)
    merged, record = terge.merge(
        [terge.adapter(first, base=model)], base=model, method="task_arithmetic", lineage=True
    )
    oracle = peft_merged(work / "llama-base", first)
    assert isinstance(merged, torch.nn.Module)
    assert compare(merged.state_dict(), oracle, llama().state_dict()) <= ULPS
    assert record.models[0].kind == "adapter"
    assert record.models[0].adapter["base"] == {"kind": "module", "path": None}


def test_a_merge_of_adapters_written_to_a_folder_loads_and_keeps_memory_flat(work, tmp_path):
    first = case(work, "out-a", llama, seed=10, **LLAMA_LORA)
    second = case(work, "out-b", llama, seed=11, **LLAMA_LORA)
    out = tmp_path / "soup"
    terge.merge([str(first), str(second)], out=out, out_dtype="bfloat16")
    in_memory = terge.merge([str(first), str(second)])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    state = loaded.state_dict()
    for name, value in in_memory.items():
        # one rounding from float64 to bfloat16 against float32 then bfloat16: at most 1 ulp
        written, rounded = state[name].float(), value.bfloat16().float()
        torch.testing.assert_close(written, rounded, rtol=2**-7, atol=0)
    config = json.loads((out / "config.json").read_text())  # the base folder's, dtype updated
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    lineage = terge.load_lineage(out / "lineage.json")
    assert [m.kind for m in lineage.models] == ["adapter", "adapter"]
    summary = lineage.models[0].adapter
    assert summary["r"] == [2, 4] and summary["lora_alpha"] == [3.0, 8.0]
    assert summary["base"] == {"kind": "file", "path": str(work / "llama-base")}
    assert summary["modules"] == 7 and summary["whole"] == 2  # lm_head, saved embedding


def test_the_lineage_of_an_adapter_merge_passes_the_schema(work):
    from tests.helpers import lineage_validator

    first = case(work, "schema-a", gpt2, seed=12, r=2, lora_alpha=4, target_modules=["c_attn"])
    _, record = terge.merge([str(first), str(first)], lineage=True)
    text = terge.lineage.lineage_to_json(record)
    lineage_validator().validate(text)
    again = terge.lineage.lineage_from_json(json.loads(json.dumps(text)))
    assert again.models[0].adapter == record.models[0].adapter


def test_an_adapter_as_the_base_cannot_be_merged_into_in_place(work):
    first = case(work, "inplace-a", llama, seed=13, **LLAMA_LORA)
    with pytest.raises(
        terge.MergeArgumentError, match=r"the base is the adapter .* never modifies"
    ):
        terge.merge([str(first), llama()], inplace=True)


def test_gpt2_tied_embeddings_move_together_under_an_embedding_adapter(work):
    first = case(work, "tied", gpt2, seed=14, r=2, lora_alpha=4, target_modules=["wte"])
    model = gpt2()
    merged = terge.merge([terge.adapter(first, base=model)])
    oracle = peft_merged(work / "gpt2-base", first)
    wte = "transformer.wte.weight"
    assert operand_ulps(merged[wte], oracle[wte], model.state_dict()[wte]) <= ULPS
    assert torch.equal(merged["lm_head.weight"], merged["transformer.wte.weight"])
    assert merged["lm_head.weight"] is merged["transformer.wte.weight"]  # still one tensor
    assert not math.isnan(float(merged["lm_head.weight"].sum()))


def test_an_adapter_merge_verifies_against_its_lineage(work, tmp_path):
    first = case(work, "verify-a", llama, seed=15, **LLAMA_LORA)
    second = case(work, "verify-b", llama, seed=16, **LLAMA_LORA)
    out = tmp_path / "merged"
    method = terge.methods.task_arithmetic(scale=0.7)
    terge.merge([str(first), str(second)], base=str(work / "llama-base"), method=method, out=out)
    lineage = terge.load_lineage(out / "lineage.json")
    assert terge.audit.verify_lineage(lineage, out) == []
    # a changed adapter is found: the recomputed tensors no longer match
    from safetensors.torch import load_file, save_file

    weights = first / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key] * 2
    save_file(tensors, weights)
    problems = terge.audit.verify_lineage(lineage, out)
    assert [name for name, _ in problems] == ["model.layers.0.self_attn.q_proj.weight"]


def test_verify_reads_an_adapter_over_the_base_its_merge_used(work, tmp_path):
    """An adapter merged over another base than the one its config names (``terge.adapter(path,
    base=...)``) is read again over that base, as the lineage records it."""
    first = case(work, "verify-other-a", llama, seed=17, **LLAMA_LORA)
    second = case(work, "verify-other-b", llama, seed=18, **LLAMA_LORA)
    other = tmp_path / "other-base"
    llama(seed=9).save_pretrained(other)  # the same architecture, other weights
    out = tmp_path / "merged"
    models = [terge.adapter(first, base=other), terge.adapter(second, base=other)]
    terge.merge(models, out=out)
    lineage = terge.load_lineage(out / "lineage.json")
    assert [record.adapter["base"]["path"] for record in lineage.models] == [str(other)] * 2
    assert terge.audit.verify_lineage(lineage, out) == []
