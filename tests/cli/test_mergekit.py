"""mergekit configs read as merge() arguments (terge.cli.mergekit), and ``terge merge --mergekit``;
against mergekit itself where it is importable."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import terge
from terge import MergeArgumentError
from terge.cli import main
from terge.cli.mergekit import TABLE, evaluate, from_mergekit

NAMES = [
    "model.embed_tokens.weight",
    *(
        f"model.layers.{i}.{part}.weight"
        for i in range(3)
        for part in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm")
    ),
    "model.norm.weight",
    "lm_head.weight",
]


def shape_of(name: str) -> tuple[int, ...]:
    return (4,) if "norm" in name else (4, 6)


def checkpoint(folder, seed: int, dtype=torch.float32) -> str:
    """A tiny Llama-named checkpoint folder: the base (seed 0) and models near it."""
    generator = torch.Generator().manual_seed(0)
    base = {n: torch.randn(shape_of(n), generator=generator, dtype=torch.float64) for n in NAMES}
    generator = torch.Generator().manual_seed(seed)
    state = {
        n: (
            t
            + (0.1 * torch.randn(t.shape, generator=generator, dtype=torch.float64) if seed else 0)
        )
        for n, t in base.items()
    }
    folder.mkdir()
    save_file({n: t.to(dtype).contiguous() for n, t in state.items()}, folder / "model.safetensors")
    return str(folder)


@pytest.fixture
def trio(tmp_path, monkeypatch):
    """base, m0, m1, m2 in the current folder (mergekit paths are relative to it)."""
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(["base", "m0", "m1", "m2"]):
        checkpoint(tmp_path / name, seed)
    return tmp_path


def config(text: str) -> dict:
    import yaml

    return yaml.safe_load(textwrap.dedent(text))


# --- settings: filters and gradients, as mergekit's evaluate_setting ----------------------------


def test_a_gradient_is_interpolated_as_mergekit_interpolates():
    for t in (0.0, 0.25, 0.5, 1 / 3, 2 / 3, 1.0):
        scaled = t * 3
        i0 = int(scaled)
        i1 = min(3, i0 + 1)
        values = [0.1, 0.7, 0.2, 0.9]
        expected = (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]
        assert evaluate("x", values, t) == expected  # the same operations, the same bits
    assert evaluate("x", [True, False], 0.6, bool) is True  # not numbers: picked, not blended
    assert evaluate("x", [True, False], 1.0, bool) is False
    assert evaluate("x", "1e-3", 0.0) == 0.001  # YAML's string numbers are numbers
    assert evaluate("x", [], 0.0) is None


def test_filters_take_the_first_match_by_substring():
    setting = [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": [0, 1]}]
    assert evaluate("model.layers.1.self_attn.q_proj.weight", setting, 0.5) == 0.5
    assert evaluate("model.layers.1.mlp.up_proj.weight", setting, 0.5) == 0.5
    assert evaluate("model.norm.weight", setting, 0.0) is None
    assert evaluate("model.norm.weight", [*setting, {"value": 2}], 0.0) == 2.0
    assert evaluate("anything", {"filter": "*", "value": 3}, 0.0) == 3.0


# --- the translation --------------------------------------------------------------------------------


def test_ties_translates_to_mergekits_definition_per_tensor(trio):
    options = from_mergekit(
        config("""
        models:
          - model: base
          - model: m0
            parameters: {weight: 1.0, density: [0.2, 0.8]}
          - model: m1
            parameters: {weight: 0.5}
        merge_method: ties
        base_model: base
        parameters: {density: 0.5, lambda: 0.9}
        dtype: bfloat16
        """)
    )
    assert options["models"] == [str(trio / n) for n in ("base", "m0", "m1")]
    assert options["base"] == 0 and options["normalize"] is False  # weights as given
    assert options["out_dtype"] == "bfloat16"
    first = options["method"]["model.layers.0.mlp.up_proj.weight"]
    assert first.name == "ties"
    assert first.settings == {
        "density": [0.2, 0.5],
        "scale": 0.9,
        "trim": "exact",
        "elect": "weighted",
    }
    middle = options["method"]["model.layers.1.mlp.up_proj.weight"]
    assert middle.settings["density"] == 0.5  # both 0.5: one value
    outside = options["method"]["lm_head.weight"]
    assert outside.settings["density"] == [0.2, 0.5]  # outside the blocks: the first value
    assert options["weights"]["lm_head.weight"] == [0.0, 1.0, 0.5]


def test_mergekits_defaults_per_method(trio):
    def settings(method: str, extra: str = "") -> tuple[dict, dict]:
        options = from_mergekit(
            config(f"""
            models:
              - model: m0
                parameters: {{weight: 1.0}}
              - model: m1
                parameters: {{weight: 1.0}}
            merge_method: {method}
            base_model: base
            {extra}
            """)
        )
        return dict(options["method"]["model.norm.weight"].settings), options

    dare, options = settings("dare_ties")  # normalize false, rescale true: L1
    assert dare == {
        "density": 1.0,
        "scale": 1.0,
        "rescale": "l1",
        "elect": "weighted",
        "disjoint_mean": False,
    }
    assert "out_dtype" not in options
    crumbs, options = settings("breadcrumbs")
    assert crumbs == {"density": 1.0, "gamma": 0.01, "scale": 1.0, "trim": "exact"}
    assert options["normalize"] is False
    _, options = settings("task_arithmetic", "parameters: {normalize: true}")
    assert options["normalize"] is True
    linear, options = settings("linear")
    assert linear == {} and options["base"] == str(trio / "base") and options["normalize"]
    stock, options = settings("model_stock", "parameters: {filter_wise: true}")
    assert stock == {"clamp": False, "filter_wise": True} and options["weights"] == {}


def test_the_other_shared_methods_translate_with_mergekits_settings(trio):
    def translated(text: str) -> dict:
        return from_mergekit(config(text))

    crumbs = translated("""
        models:
          - {model: m0, parameters: {weight: 1.0, density: 0.7, gamma: 0.1}}
          - {model: m1, parameters: {weight: -0.5, density: 0.4}}
        merge_method: breadcrumbs_ties
        base_model: base
        parameters: {rescale: true}
        """)
    method = crumbs["method"]["model.norm.weight"]
    assert method.name == "breadcrumbs_ties"
    assert method.settings == {
        "density": [0.7, 0.4],
        "gamma": [0.1, 0.01],
        "scale": 1.0,
        "trim": "exact",
        "rescale": "l1",
        "elect": "weighted",
        "disjoint_mean": False,  # mergekit's normalize: false by default
    }
    assert crumbs["weights"]["model.norm.weight"] == [0.0, 1.0, -0.5]
    assert crumbs["normalize"] is False

    sce_ = translated(
        "models: [m0, m1]\nmerge_method: sce\nbase_model: base\n"
        "parameters: {select_topk: 0.3, int8_mask: true}"
    )
    assert sce_["method"]["lm_head.weight"].settings == {
        "select_topk": 0.3,
        "scale": 1.0,
        "floor": 1e-6,
    }
    assert sce_["models"][0] == str(trio / "base") and sce_["weights"] == {}

    swap = translated(
        "models: [base, m0]\nmerge_method: nearswap\nbase_model: base\n"
        "parameters: {t: [0.001, 0.005]}"
    )
    assert swap["models"] == [str(trio / "base"), str(trio / "m0")] and swap["base"] == 0
    assert swap["method"]["model.layers.2.mlp.up_proj.weight"].settings == {"t": 0.005}

    multi = translated("""
        models: [{model: m0, parameters: {weight: 1}}, {model: m1, parameters: {weight: 3}}]
        merge_method: multislerp
        parameters: {normalize_weights: false, eps: 0.001}
        """)
    assert multi["method"]["lm_head.weight"].settings == {"task_vectors": False, "eps": 0.001}
    assert multi["weights"]["lm_head.weight"] == [1.0, 3.0] and multi["normalize"] is False
    based = translated("""
        models: [{model: m0, parameters: {weight: 1}}, {model: m1, parameters: {weight: 3}}]
        merge_method: multislerp
        base_model: base
        """)
    assert based["method"]["lm_head.weight"].settings == {"task_vectors": True, "eps": 1e-8}
    assert based["weights"]["lm_head.weight"] == [0.0, 1.0, 3.0]
    assert based["base"] == 0 and based["normalize"] is True

    nu = translated("""
        models: [{model: m0, parameters: {weight: 1}}, {model: m1, parameters: {weight: 3}}]
        merge_method: nuslerp
        parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
        """)
    assert nu["method"]["lm_head.weight"].settings == {
        "flatten": False,
        "row_wise": True,
        "task_vectors": False,
    }
    assert nu["weights"]["lm_head.weight"] == [1.0, 3.0]

    pruned = translated("""
        models:
          - {model: m0, parameters: {weight: 1.0, density: 0.5}}
          - {model: m1, parameters: {weight: 0.5}}
        merge_method: della
        base_model: base
        parameters: {lambda: 0.8}
        """)
    assert pruned["method"]["lm_head.weight"].settings == {
        "density": [0.5, 1.0],  # mergekit's default density 1 prunes nothing: epsilon 0
        "epsilon": [0.15, 0.0],
        "scale": 0.8,
        "rescale": "l1",
        "elect": "weighted",
    }
    assert pruned["weights"]["lm_head.weight"] == [0.0, 1.0, 0.5] and not pruned["normalize"]
    linear = translated("""
        models: [{model: m0, parameters: {weight: 1.0, density: 0.4, epsilon: 0.3}}]
        merge_method: della_linear
        base_model: base
        parameters: {rescale: false}
        """)
    assert linear["method"]["lm_head.weight"].name == "della_linear"
    assert linear["method"]["lm_head.weight"].settings == {
        "density": 0.4,
        "epsilon": 0.3,
        "scale": 1.0,
        "rescale": "none",
    }
    assert linear["normalize"] is False

    mean = translated(
        "models: [m0, m1, m2]\nmerge_method: karcher\nparameters: {max_iter: 20, tol: 1e-9}"
    )
    assert mean["method"]["lm_head.weight"].settings == {
        "max_iter": 20,
        "tol": 1e-9,
        "task_vectors": False,
    }
    assert mean["weights"] == {}  # equal weights, as mergekit's karcher


def test_slerp_takes_t_per_tensor_and_the_base_first(trio):
    options = from_mergekit(
        config("""
        models: [{model: m0}, {model: base}]
        merge_method: slerp
        base_model: base
        parameters:
          t: [{filter: mlp, value: [0, 1]}, {value: 0.25}]
        """)
    )
    assert options["models"] == [str(trio / "base"), str(trio / "m0")]
    assert options["normalize"] is False
    assert options["weights"]["model.layers.1.mlp.up_proj.weight"] == [0.5, 0.5]
    assert options["weights"]["model.layers.2.mlp.up_proj.weight"] == [0.0, 1.0]
    assert options["weights"]["lm_head.weight"] == [0.75, 0.25]
    assert options["method"]["lm_head.weight"].settings == {
        "threshold": 0.9995,
        "zero": "unnormalised",
    }


def test_a_ties_merge_through_the_config_is_mergekits_formula(trio):
    options = from_mergekit(
        config("""
        models:
          - model: m0
            parameters: {weight: 1.0}
          - model: m1
            parameters: {weight: -0.5}
        merge_method: ties
        base_model: base
        parameters: {normalize: false}
        """)
    )
    merged = terge.merge(**options)
    name = "model.layers.1.self_attn.q_proj.weight"
    base, a, b = (
        load_file(trio / m / "model.safetensors")[name].double() for m in ("base", "m0", "m1")
    )
    deltas = torch.stack([(a - base) * 1.0, (b - base) * -0.5])  # mergekit: w_i tau_i
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    expected = base + (deltas * (deltas.sign() == majority)).sum(0)
    assert torch.equal(merged[name], expected.float())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slices: []\nmerge_method: linear", "config slices: must be a non-empty list"),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\n"
            "tokenizer: {source: union, tokens: {}}",
            r"config tokenizer: only its source is read \(per-token overrides, \['tokens'\]",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\ntokenizer_source: m0",
            "config tokenizer_source: must be base, union or model:PATH, got 'm0'",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\n"
            "tokenizer_source: model:m1",
            "config tokenizer_source: 'model:m1' names no model of the merge",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\n"
            "tokenizer_source: base\ntokenizer: {source: base}",
            "config tokenizer: and tokenizer_source both say",
        ),
        ("models: [m0, m1]\nmerge_method: linear\nfoo: 1", "config foo: is not a mergekit key"),
        ("models: [m0, m1]\nmerge_method: ram", "merge_method: 'ram' has no terge translation"),
        (
            "models: [{model: m0, parameters: {weight: 1, density: 0.9}}]\n"
            "merge_method: della\nbase_model: base",
            r"config models\[0\].parameters.epsilon: density 0.9 \+/- epsilon 0.15 must lie in "
            r"\(0, 1\), as mergekit requires",
        ),
        (
            "models: [{model: m0, parameters: {weight: 1, density: 0}}]\n"
            "merge_method: della_linear\nbase_model: base",
            r"config models\[0\].parameters.density: is 0.0: mergekit prunes every entry there",
        ),
        ("models: [m0, m1]\nmerge_method: sce", "config base_model: sce needs a base_model"),
        (
            "models: [m0, m1, m2]\nmerge_method: nearswap\nbase_model: base\nparameters: {t: 1}",
            "config models: nearswap takes base_model and one other model, got 4",
        ),
        (
            "models: [m0]\nmerge_method: nearswap\nbase_model: base\nparameters: {t: 1e-7}",
            r"config parameters.t: is 1e-07; below 1e-6 mergekit clamps \|theta - base\| at "
            "1e-6, which terge's nearswap does not reproduce",
        ),
        (
            "models: [{model: m0, parameters: {weight: 1}}]\nmerge_method: nuslerp",
            "config models: nuslerp takes two models besides base_model, got 1",
        ),
        (
            "models: [m0, m1]\nmerge_method: karcher\nbase_model: base",
            "config base_model: karcher takes no base_model",
        ),
        (
            "models: [m0, m1]\nmerge_method: karcher\nparameters: {max_iter: 2.5}",
            "config parameters.max_iter: must be a whole number, got 2.5",
        ),
        ("models: [m0, m1]\nmerge_method: nuslerp", "the required parameter 'weight' is not set"),
        ("models: [m0, m1]\nmerge_method: linear", "the required parameter 'weight' is not set"),
        ("models: [a/b/c]\nmerge_method: linear", "'a/b/c' is no local file or folder, nor a Hub"),
        (
            "models: [{model: m0, parameters: {weight: 1, densty: 0.5}}]\nmerge_method: linear",
            r"models\[0\].parameters.densty: is no setting terge translates \(those of linear: "
            r"normalize, weight\)",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\ndtype: float8",
            "config dtype: must be one of float64",
        ),
        ("models: [m0, m1]\nmerge_method: ties", "config base_model: ties needs a base_model"),
        (
            "models: [{model: m0, parameters: {weight: x}}]\nmerge_method: linear",
            r"models\[0\].parameters.weight: must be a number, got 'x'",
        ),
    ],
)
def test_what_terge_cannot_honour_is_refused_naming_the_key(trio, text, message):
    with pytest.raises(MergeArgumentError, match=message):
        from_mergekit(config(text))


@pytest.mark.parametrize(
    ("text", "vocabulary"),
    [
        ("tokenizer_source: base", "base"),
        ("tokenizer_source: union", "union"),
        ("tokenizer_source: model:m1", 1),
        ("tokenizer_source: model:base/../m1", 1),  # the same folder, spelled otherwise
        ("tokenizer: {source: union}", "union"),
        ("", None),
    ],
)
def test_tokenizer_source_becomes_the_vocabulary(trio, text, vocabulary):
    """mergekit's tokenizer_source says where the output vocabulary comes from: terge aligns
    the vocabulary tensors by token (``vocabulary=``) as asked; without it nothing is aligned."""
    options = from_mergekit(
        config("models: [m0, m1]\nmerge_method: linear\nparameters: {weight: 1}\n" + text)
    )
    assert options.get("vocabulary") == vocabulary


def test_hub_ids_in_a_config_are_hub_models(trio):
    """A model that is no local path but reads as org/name is a Hub model (resolved when the
    merge opens it); a local folder of that name would win."""
    from terge.cli.mergekit import _path

    assert _path("org/name@v1", "models[0].model", trio) == "org/name@v1"
    (trio / "org" / "name").mkdir(parents=True)
    assert _path("org/name", "models[0].model", trio) == str(trio / "org" / "name")


def test_a_yaml_file_is_read_and_bad_yaml_refused(trio):
    (trio / "c.yml").write_text("models: [m0, m1]\nmerge_method: linear\nparameters: {weight: 1}")
    assert from_mergekit(trio / "c.yml")["models"] == [str(trio / "m0"), str(trio / "m1")]
    (trio / "configs").mkdir()  # relative paths start from the current folder, not the file's
    (trio / "configs" / "c.yml").write_text((trio / "c.yml").read_text())
    assert from_mergekit(trio / "configs" / "c.yml")["models"] == [
        str(trio / "m0"),
        str(trio / "m1"),
    ]
    (trio / "bad.yml").write_text("models: [m0\n")
    with pytest.raises(MergeArgumentError, match="is not valid YAML"):
        from_mergekit(trio / "bad.yml")
    assert terge.from_mergekit is from_mergekit


def test_every_translated_method_is_in_the_table_and_the_readme():
    assert set(TABLE) == {
        "linear",
        "task_arithmetic",
        "ties",
        "dare_ties",
        "dare_linear",
        "breadcrumbs",
        "slerp",
        "model_stock",
        "breadcrumbs_ties",
        "sce",
        "nearswap",
        "multislerp",
        "nuslerp",
        "karcher",
        "della",
        "della_linear",
    }
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## From mergekit") :]
    for name in TABLE:
        assert f"| `{name}` |" in section, name


def test_each_methods_own_normalize_rescale_and_lambda(trio):
    """The README table's per-method defaults and keys not covered above: normalize false for
    task_arithmetic and dare_linear, rescale true (L1) for dare_linear, lambda as the scale of
    task_arithmetic and dare_linear, and a config's own normalize kept (linear, dare_linear,
    breadcrumbs) or ignored where the weights go as given (dare_ties)."""

    def options(method: str, parameters: str = "{}") -> dict:
        return from_mergekit(
            config(f"""
            models:
              - model: m0
                parameters: {{weight: 1.0}}
              - model: m1
                parameters: {{weight: 1.0}}
            merge_method: {method}
            base_model: base
            parameters: {parameters}
            """)
        )

    def settings(found: dict) -> dict:
        return dict(found["method"]["model.norm.weight"].settings)

    assert options("task_arithmetic")["normalize"] is False
    assert settings(options("task_arithmetic", "{lambda: 0.5}")) == {"scale": 0.5}
    dare = options("dare_linear")
    assert dare["normalize"] is False
    assert settings(dare) == {"density": 1.0, "scale": 1.0, "rescale": "l1"}
    assert settings(options("dare_linear", "{lambda: 0.5}"))["scale"] == 0.5
    assert options("dare_linear", "{normalize: true}")["normalize"] is True
    assert options("breadcrumbs", "{normalize: true}")["normalize"] is True
    assert options("linear", "{normalize: false}")["normalize"] is False
    dare_ties = options("dare_ties", "{normalize: true}")
    assert dare_ties["normalize"] is False  # weights as given; normalize is the disjoint mean
    assert "disjoint_mean" not in settings(dare_ties)  # True: terge's default, not recorded
    stock = from_mergekit(config("models: [m0, m1]\nmerge_method: model_stock\nbase_model: base"))
    assert settings(stock) == {"clamp": False}  # filter_wise false where absent


def test_int8_mask_is_read_checked_and_changes_nothing(trio):
    """int8_mask is a key terge reads (the mask's dtype in mergekit): accepted, checked as a
    flag, and without effect on the settings."""
    text = "models: [m0]\nmerge_method: task_arithmetic\nbase_model: base\nparameters: "
    plain = from_mergekit(config(text + "{weight: 1}"))
    masked = from_mergekit(config(text + "{weight: 1, int8_mask: true}"))
    assert {n: (m.name, m.settings) for n, m in masked["method"].items()} == {
        n: (m.name, m.settings) for n, m in plain["method"].items()
    }
    assert masked["weights"] == plain["weights"]
    with pytest.raises(
        MergeArgumentError, match=r"config parameters.int8_mask: must be true or false, got 3"
    ):
        from_mergekit(config(text + "{weight: 1, int8_mask: 3}"))


def test_a_models_filtered_setting_that_matches_nothing_falls_back_to_the_global(trio):
    """mergekit reads a model's own parameters first, but a filtered value matching no filter
    for a tensor leaves it to the global parameters (not to a missing value)."""
    options = from_mergekit(
        config("""
        models:
          - model: m0
            parameters: {weight: [{filter: mlp, value: 3}]}
          - model: m1
        merge_method: linear
        parameters: {weight: 1}
        """)
    )
    assert options["weights"]["model.layers.0.mlp.up_proj.weight"] == [3.0, 1.0]
    assert options["weights"]["model.norm.weight"] == [1.0, 1.0]


def test_a_linear_base_model_among_the_models_is_its_index(trio):
    """A base_model that is one of a linear merge's models is that model (its index), not a
    separate base read a second time."""
    options = from_mergekit(
        config("models: [m0, m1]\nmerge_method: linear\nbase_model: m1\nparameters: {weight: 1}")
    )
    assert options["models"] == [str(trio / "m0"), str(trio / "m1")]
    assert options["base"] == 1


def test_out_dtype_wins_over_dtype_and_torch_names_are_read(trio):
    """mergekit's out_dtype, else its dtype, is the written dtype; torch.bfloat16 is bfloat16."""
    text = "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\n"
    assert from_mergekit(config(text + "dtype: float32\nout_dtype: bfloat16"))["out_dtype"] == (
        "bfloat16"
    )
    assert from_mergekit(config(text + "out_dtype: torch.float16"))["out_dtype"] == "float16"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\nmodules: {}",
            "config modules: per-module configurations are not supported yet",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\nchat_template: chatml",
            "config chat_template: chat templates are not written; remove chat_template.",
        ),
        ("models: [m0]", "config merge_method: must name a merge method, got None"),
        ("models: []\nmerge_method: linear", "config models: must be a non-empty list"),
        (
            "models: [m0]\nmerge_method: linear\nparameters: 3",
            "config parameters: must be a mapping of settings, got 3",
        ),
        (
            "models: [{model: m0, weight: 1}]\nmerge_method: linear",
            "config models[0].weight: is not a key of a model entry",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: [{value: 1, filtre: mlp}]}",
            "config parameters.weight: a filtered value has the unknown key 'filtre'",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: [1, {value: 2}]}",
            "config parameters.weight: a list mixing values and {filter, value} entries",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: [{filter: mlp}]}",
            "config parameters.weight: a list mixing values and {filter, value} entries: "
            "[{'filter': 'mlp'}]",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: .inf}",
            "config parameters.weight: must be a finite number, got inf",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: true}",
            "config parameters.weight: must be a number, got True",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: null}",
            "config parameters.weight: must be a value, a list or filtered values, got None",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1, normalize: 1}",
            "config parameters.normalize: must be true or false, got 1",
        ),
        (
            "models: [m0]\nmerge_method: linear\n"
            "parameters: {weight: 1, normalize: [{filter: mlp, value: false}, {value: true}]}",
            "config parameters.normalize: differs from tensor to tensor",
        ),
        (
            "models: [m0]\nmerge_method: slerp\nbase_model: base",
            "config parameters: the required parameter 't' is not set for",
        ),
        (
            "models: [m0, m1]\nmerge_method: slerp\nbase_model: base\nparameters: {t: 0.5}",
            "config models: slerp takes base_model and one other model, got 3",
        ),
        (
            "models: [m0]\nmerge_method: model_stock\nbase_model: base",
            "config models: model_stock needs at least two models besides base_model",
        ),
        (
            "models: [m0, m1]\nmerge_method: model_stock",
            "config base_model: model_stock needs a base_model",
        ),
        (
            "models: [m0]\nmerge_method: linear\nparameters: {weight: 1}\ntokenizer: {source: m0}",
            "config tokenizer.source: must be base, union or model:PATH, got 'm0'",
        ),
    ],
)
def test_each_refusal_names_its_key_and_its_reason(trio, text, message):
    """Every check of the reader fires on its own input, naming the key and why (the exact
    message, so another check failing first would not pass)."""
    with pytest.raises(MergeArgumentError, match=re.escape(message)):
        from_mergekit(config(text))


def test_a_yaml_file_that_is_no_mapping_is_refused(trio):
    (trio / "list.yml").write_text("- m0\n- m1\n")
    with pytest.raises(
        MergeArgumentError, match=r"must be a mapping \(models, merge_method, \.\.\.\)"
    ):
        from_mergekit(trio / "list.yml")


def test_rescale_and_per_model_gamma_of_ties_and_breadcrumbs(trio):
    """rescale (default false for ties and breadcrumbs) set true is L1 rescaling, and
    breadcrumbs' gamma is per model (a model's own, else the global one, else 0.01)."""
    text = """
        models:
          - {model: m0, parameters: {weight: 1.0, gamma: 0.2}}
          - {model: m1, parameters: {weight: 1.0}}
        merge_method: %s
        base_model: base
        parameters: {rescale: true}
        """
    ties_ = from_mergekit(config(text % "ties"))["method"]["model.norm.weight"]
    assert ties_.settings == {
        "density": 1.0,
        "scale": 1.0,
        "trim": "exact",
        "elect": "weighted",
        "rescale": "l1",
    }
    crumbs = from_mergekit(config(text % "breadcrumbs"))["method"]["model.norm.weight"]
    assert crumbs.settings == {
        "density": 1.0,
        "gamma": [0.2, 0.01],
        "scale": 1.0,
        "trim": "exact",
        "rescale": "l1",
    }
    crumbs = from_mergekit(config((text % "breadcrumbs").replace("rescale: true", "gamma: 0.3")))
    assert crumbs["method"]["model.norm.weight"].settings["gamma"] == [0.2, 0.3]


def test_model_stock_merges_the_base_first_and_others_after(trio):
    """model_stock's base_model is the first model (listed among the models or not) and the
    others follow in order; it sets its own weights."""
    options = from_mergekit(
        config("models: [m1, base, m0]\nmerge_method: model_stock\nbase_model: base")
    )
    assert options["models"] == [str(trio / n) for n in ("base", "m1", "m0")]
    assert options["base"] == 0 and options["weights"] == {}


def test_a_single_block_model_reads_gradients_at_t_1(trio):
    """mergekit's t is layer / (layers - 1), and 1 where there is one block (0 outside it)."""
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.norm.weight"]
    for k, name in enumerate(["one0", "one1"]):
        (trio / name).mkdir()
        save_file(
            {n: torch.full((2, 2), float(k)) for n in names}, trio / name / "model.safetensors"
        )
    options = from_mergekit(
        config("models: [one0, one1]\nmerge_method: linear\nparameters: {weight: [1, 3]}")
    )
    assert options["weights"] == {
        "model.embed_tokens.weight": [1.0, 1.0],
        "model.layers.0.mlp.up_proj.weight": [3.0, 3.0],
        "model.norm.weight": [1.0, 1.0],
    }


def test_slices_accept_a_base_model_and_ignore_it(trio):
    """base_model is a key of a slices config (passthrough and linear slices do not use it)."""
    slices = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "m0", "layer_range": [0, 2]}]},
            {"sources": [{"model": "m1", "layer_range": [1, 3]}]},
        ],
    }
    assert from_mergekit({**slices, "base_model": "base"}) == from_mergekit(slices)


def test_a_linear_base_model_not_among_the_models_is_merged_with_the_global_weight(trio):
    """mergekit adds a base_model that is not among a linear merge's models to the merged
    models (last), its weight the global one: (w0 m0 + w1 m1 + w base) / (w0 + w1 + w)."""
    text = """
        models:
          - {model: m0, parameters: {weight: 1.0}}
          - {model: m1, parameters: {weight: 3.0}}
        merge_method: linear
        base_model: base
        parameters: {weight: %s}
        """
    options = from_mergekit(config(text % "2.0"))
    assert options["models"] == [str(trio / n) for n in ("m0", "m1", "base")]
    assert options["base"] == 2 and options["normalize"] is True
    assert options["weights"]["model.norm.weight"] == [1.0, 3.0, 2.0]
    merged = terge.merge(**options)
    name = "model.layers.1.mlp.up_proj.weight"
    m0, m1, base = (
        load_file(trio / m / "model.safetensors")[name].double() for m in ("m0", "m1", "base")
    )
    assert torch.allclose(merged[name].double(), (m0 + 3 * m1 + 2 * base) / 6, atol=1e-6, rtol=0)
    with pytest.raises(
        MergeArgumentError,
        match=re.escape(
            "config base_model: the required parameter 'weight' is not set for 'lm_head.weight'"
        ),
    ):
        from_mergekit(config(text % "[{filter: mlp, value: 1.0}]"))


# --- the command ------------------------------------------------------------------------------------


def test_terge_merge_mergekit_writes_the_merge_with_its_lineage(trio, capsys):
    (trio / "c.yml").write_text(
        "models:\n  - model: m0\n    parameters: {weight: 1.0, density: 0.5}\n"
        "  - model: m1\n    parameters: {weight: 0.5, density: 0.5}\n"
        "merge_method: ties\nbase_model: base\ndtype: float64\n"
    )
    assert main(["merge", "--mergekit", "c.yml", "-o", "out", "-q"]) == 0
    written = load_file(trio / "out" / "model.safetensors")
    options = from_mergekit(trio / "c.yml")
    assert options.pop("out_dtype") == "float64"
    expected = terge.merge(**options)
    assert all(written[n].dtype == torch.float64 for n in NAMES)  # mergekit's dtype
    assert all(torch.equal(written[n].float(), expected[n]) for n in NAMES)  # rounded once
    lineage = json.loads((trio / "out" / "lineage.json").read_text())
    assert lineage["merged"]["lm_head.weight"]["settings"]["trim"] == "exact"
    assert main(["merge", "--mergekit", "c.yml", "-o", "again", "m0"]) == 2
    assert "MODEL cannot be given with --mergekit" in capsys.readouterr().err


def test_the_command_line_s_own_settings_reach_a_mergekit_merge(trio, capsys):
    """--out-format, --lora-*, --vocabulary and --lineage were dropped silently with
    --mergekit (a safetensors folder written where an adapter was asked for)."""
    (trio / "c.yml").write_text(
        "models: [{model: m0, parameters: {weight: 1}}, {model: m1, parameters: {weight: 2}}]\n"
        "merge_method: linear\n"
    )
    argv = ["merge", "--mergekit", "c.yml", "-q", "--lineage", "l.json"]
    assert main([*argv, "-o", "ad", "--out-format", "lora", "--lora-rank", "1"]) == 0
    assert (trio / "ad" / "adapter_config.json").exists()
    assert json.loads((trio / "ad" / "lora.json").read_text())["settings"]["rank"] == 1
    assert (trio / "l.json").exists()
    for option in (["--last", "2"], ["--best", "2"], ["--metric", "loss"], ["--mode", "min"]):
        assert main(["merge", "--mergekit", "c.yml", "-o", "x", *option]) == 2
        assert f"{option[0]} cannot be given with --mergekit" in capsys.readouterr().err
    (trio / "t.yml").write_text((trio / "c.yml").read_text() + "tokenizer_source: base\n")
    assert main(["merge", "--mergekit", "t.yml", "-o", "x", "--vocabulary", "union"]) == 2
    assert (
        "--vocabulary cannot be given with --mergekit when the config has a tokenizer_source"
        in (capsys.readouterr().err)
    )


def test_a_mergekit_stack_refuses_what_it_has_no_use_for(trio, capsys):
    (trio / "s.yml").write_text(
        "slices:\n  - sources: [{model: m0, layer_range: [0, 2]}]\n"
        "  - sources: [{model: m1, layer_range: [1, 3]}]\nmerge_method: passthrough\n"
    )
    assert main(["merge", "--mergekit", "s.yml", "-o", "s", "-q"]) == 0  # the stack itself
    for option, key in (
        (["--lineage", "l.json"], "lineage"),
        (["--vocabulary", "union"], "vocabulary"),
        (["--lora-rank", "2"], "lora_rank"),
    ):
        assert main(["merge", "--mergekit", "s.yml", "-o", "t", *option]) == 2
        assert f"{key!r} cannot be given with slices" in capsys.readouterr().err
    assert main(["merge", "--mergekit", "s.yml", "-o", "t", "--out-format", "lora"]) == 2
    assert "a stack is written as safetensors; drop out_format" in capsys.readouterr().err
    assert not (trio / "t").exists()


def test_a_refused_config_writes_nothing(trio, capsys):
    """The whole config is read and checked before the output folder is made."""
    (trio / "c.yml").write_text(
        "models: [m0, m1]\nmerge_method: linear\nparameters: {weight: 1}\nmodules: {}\n"
    )
    assert main(["merge", "--mergekit", "c.yml", "-o", "out"]) == 2
    assert "config modules: per-module configurations" in capsys.readouterr().err
    assert not (trio / "out").exists()


# --- against mergekit itself (opt-in: where mergekit is importable) ---------------------------------

ORACLE_CONFIGS = {
    "ties": """
        models:
          - model: base
          - model: m0
            parameters: {weight: 1.0, density: [0.3, 0.7]}
          - model: m1
            parameters: {weight: [0.5, 1.0], density: 0.5}
          - model: m2
            parameters:
              weight: [{filter: self_attn, value: -0.5}, {value: 0.25}]
              density: 0.6
        merge_method: ties
        base_model: base
        """,
    "linear": """
        models:
          - {model: m0, parameters: {weight: 1.0}}
          - {model: m1, parameters: {weight: [1.0, 3.0]}}
          - {model: m2, parameters: {weight: 0.5}}
        merge_method: linear
        """,
    "task_arithmetic": """
        models:
          - {model: m0, parameters: {weight: 0.7}}
          - {model: m1, parameters: {weight: [0.2, 0.9]}}
        merge_method: task_arithmetic
        base_model: base
        parameters: {lambda: 0.8}
        """,
    "breadcrumbs": """
        models:
          - {model: m0, parameters: {weight: 1.0, density: 0.9, gamma: 0.2}}
          - {model: m1, parameters: {weight: 0.5, density: [0.3, 0.6]}}
        merge_method: breadcrumbs
        base_model: base
        parameters: {rescale: true}
        """,
    "slerp": """
        models: [{model: base}, {model: m0}]
        merge_method: slerp
        base_model: base
        parameters:
          t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {value: 0.5}]
        """,
    "model_stock": """
        models: [{model: m0}, {model: m1}, {model: m2}]
        merge_method: model_stock
        base_model: base
        """,
    "model_stock_filter_wise": """
        models: [{model: m0}, {model: m1}, {model: m2}]
        merge_method: model_stock
        base_model: base
        parameters: {filter_wise: true}
        """,
}
ORACLE_CONFIGS["breadcrumbs_ties"] = """
    models:
      - {model: m0, parameters: {weight: 1.0, density: 0.7, gamma: 0.1}}
      - {model: m1, parameters: {weight: -0.5, density: [0.3, 0.6]}}
      - {model: m2, parameters: {weight: 0.8, density: 0.5}}
    merge_method: breadcrumbs_ties
    base_model: base
    parameters: {lambda: 0.9}
    """
ORACLE_CONFIGS["breadcrumbs_ties_normalized"] = """
    models:
      - {model: m0, parameters: {weight: 1.0, density: 0.7}}
      - {model: m1, parameters: {weight: 0.5, density: 0.4}}
    merge_method: breadcrumbs_ties
    base_model: base
    parameters: {normalize: true, rescale: true}
    """
ORACLE_CONFIGS["della_unpruned"] = """
    models:
      - {model: m0, parameters: {weight: 1.0}}
      - {model: m1, parameters: {weight: -0.5}}
      - {model: m2, parameters: {weight: [0.8, 0.2]}}
    merge_method: della
    base_model: base
    """
ORACLE_CONFIGS["della_linear_unpruned"] = """
    models: [{model: m0, parameters: {weight: 1.0}}, {model: m1, parameters: {weight: 0.5}}]
    merge_method: della_linear
    base_model: base
    parameters: {lambda: 0.7}
    """
_TWO = "models: [{model: m0, parameters: {weight: 1.0}}, {model: m1, parameters: {weight: 3.0}}]\n"
ORACLE_CLOSE = {
    "sce": "models: [{model: m0}, {model: m1}, {model: m2}]\nmerge_method: sce\nbase_model: base\n",
    "sce_select": "models: [{model: m0}, {model: m1}, {model: m2}]\nmerge_method: sce\nbase_model: base\n"
    "parameters: {select_topk: 0.5}\n",
    "nearswap": "models: [{model: base}, {model: m0}]\nmerge_method: nearswap\nbase_model: base\n"
    "parameters: {t: [0.001, 0.05]}\n",
    "multislerp": "models: [{model: m0, parameters: {weight: 1.0}}, {model: m1, parameters: "
    "{weight: 2.0}}, {model: m2, parameters: {weight: 0.5}}]\nmerge_method: multislerp\n",
    "multislerp_base": "models: [{model: m0, parameters: {weight: 1.0}}, {model: m1, "
    "parameters: {weight: [2.0, 0.5]}}]\nmerge_method: multislerp\nbase_model: base\n",
    "multislerp_unnormalized": _TWO + "merge_method: multislerp\n"
    "parameters: {normalize_weights: false}\n",
    "nuslerp": _TWO + "merge_method: nuslerp\n",
    "nuslerp_vectors": _TWO + "merge_method: nuslerp\nparameters: {nuslerp_flatten: false}\n",
    "nuslerp_row_wise": _TWO + "merge_method: nuslerp\n"
    "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
    "nuslerp_base": _TWO + "merge_method: nuslerp\nbase_model: base\n",
    "karcher": "models: [{model: m0}, {model: m1}, {model: m2}]\nmerge_method: karcher\nparameters: {max_iter: 20, tol: 1e-9}\n",
}
"""mergekit configs terge reproduces to float64 rounding (a few ulps; the same operations in
another order), not bit for bit."""


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny Llama (3 blocks) and three fine-tunes, as Hugging Face folders mergekit reads."""
    pytest.importorskip("mergekit", reason="the mergekit oracle is not installed")
    transformers = pytest.importorskip("transformers", reason="builds the Llama checkpoints")
    folder = tmp_path_factory.mktemp("llamas")
    config_ = transformers.LlamaConfig(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config_)
    base.save_pretrained(folder / "base")
    for k in range(3):
        model = transformers.LlamaForCausalLM(config_)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
        model.save_pretrained(folder / f"m{k}")
    return folder


def run_mergekit(configuration: dict, out) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(copy_tokenizer=False, write_model_card=False, lazy_unpickle=False)
    run_merge(MergeConfiguration.model_validate(configuration), str(out), options=options)
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize("method", list(ORACLE_CONFIGS))
def test_float64_merges_equal_mergekits_bit_for_bit(llamas, method, monkeypatch):
    monkeypatch.chdir(llamas)
    configuration = {**config(ORACLE_CONFIGS[method]), "dtype": "float64"}
    expected = run_mergekit(configuration, llamas / f"mk-{method}")
    merged = terge.merge(**from_mergekit(configuration), out=f"terge-{method}")
    got = load_file(merged / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected), method


@pytest.mark.parametrize("method", list(ORACLE_CLOSE))
def test_float64_merges_equal_mergekits_to_float64_rounding(llamas, method, monkeypatch):
    monkeypatch.chdir(llamas)
    configuration = {**config(ORACLE_CLOSE[method]), "dtype": "float64"}
    expected = run_mergekit(configuration, llamas / f"mk-{method}")
    merged = terge.merge(**from_mergekit(configuration), out=f"terge-{method}")
    got = load_file(merged / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["ties", "slerp", "model_stock_filter_wise"])
def test_float32_merges_are_mergekits_float64_results_rounded_once(llamas, method, monkeypatch):
    """Where mergekit computes in float32, terge writes mergekit's float64 result rounded once
    (mergekit's own float32 result is further off: it rounds every operation)."""
    monkeypatch.chdir(llamas)
    configuration = config(ORACLE_CONFIGS[method])
    exact = run_mergekit({**configuration, "dtype": "float64"}, llamas / f"mk64-{method}")
    merged = terge.merge(
        **from_mergekit({**configuration, "dtype": "float32"}), out=f"t32-{method}"
    )
    got = load_file(merged / "model.safetensors")
    assert all(torch.equal(got[n], exact[n].float()) for n in exact), method
    assert os.path.isdir(merged)


def lora_folder(folder, generator_seed: int = 9):
    """A rank-2 PEFT LoRA on q_proj of layer 0 (4 x 6), lora_alpha 4 (scaling 2)."""
    generator = torch.Generator().manual_seed(generator_seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    factors = {
        f"{prefix}.lora_A.weight": torch.randn(2, 6, generator=generator),
        f"{prefix}.lora_B.weight": torch.randn(4, 2, generator=generator),
    }
    folder.mkdir()
    save_file(factors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return factors


@pytest.mark.parametrize("form", ["m0+lora", "{model: m0, lora: lora}"])
def test_lora_references_are_adapters_over_their_model(trio, form):
    """mergekit's ``model+lora`` (or ``{model, lora}``) is the model with the LoRA merged in:
    terge.adapter(lora, base=model), base + 2 * B @ A on the adapted tensor, in float64."""
    factors = lora_folder(trio / "lora")
    options = from_mergekit(
        config(
            f"models:\n  - model: {form}\n    parameters: {{weight: 1}}\n  - model: m1\n"
            "    parameters: {weight: 1}\nmerge_method: linear"
        )
    )
    adapter = options["models"][0]
    assert isinstance(adapter, terge.AdapterSpec)
    assert (adapter.folder, adapter.base) == (trio / "lora", str(trio / "m0"))
    merged = terge.merge(**options)
    name = "model.layers.0.self_attn.q_proj.weight"
    m0, m1 = (load_file(trio / m / "model.safetensors")[name].double() for m in ("m0", "m1"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = factors[f"{prefix}.lora_A.weight"].double(), factors[f"{prefix}.lora_B.weight"].double()
    expected = ((m0 + 2 * (b @ a)) + m1) / 2
    assert torch.equal(merged[name], expected.float())


def test_a_lora_reference_that_is_no_adapter_folder_is_refused(trio):
    with pytest.raises(MergeArgumentError, match=r"its LoRA 'm1' is no local PEFT adapter folder"):
        from_mergekit(config("models: [m0+m1]\nmerge_method: linear\nparameters: {weight: 1}"))
