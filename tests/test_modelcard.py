"""The README.md model card of a merged folder: read back with huggingface_hub's own parser, and
its recipe run again to the same weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import terge
from terge.cli import commands as cli
from terge.cli.recipe import load_recipe, parse_recipe, toml_module
from terge.errors import RecipeError
from terge.lineage import EXCLUDED
from terge.modelcard import lineage_digest, model_card, recipe_from_lineage, stack_recipe

huggingface_hub = pytest.importorskip("huggingface_hub")
tomllib = toml_module(RecipeError, "a recipe")  # tomllib, or tomli on Python 3.10

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}


def folder(path: Path, seed: int, config: dict | None = CONFIG, readme: str | None = None) -> Path:
    generator = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors = {
        "embed.weight": torch.randn(6, 4, generator=generator),
        "layers.0.mlp.weight": torch.randn(4, 4, generator=generator),
        "layers.0.norm.weight": torch.randn(4, generator=generator),
    }
    save_file(tensors, path / "model.safetensors")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if readme is not None:
        (path / "README.md").write_text(readme)
    return path


@pytest.fixture
def models(tmp_path) -> list[Path]:
    return [folder(tmp_path / f"m{i}", i, readme="# the base's own card\n") for i in range(3)]


def card_of(out: Path) -> tuple[dict, str]:
    """The card's front matter (as the Hub reads it) and its body."""
    card = huggingface_hub.ModelCard.load(out / "README.md")
    return card.data.to_dict(), card.text


def test_the_card_follows_the_hubs_format(models, tmp_path):
    out = terge.merge(
        [str(m) for m in models],
        method=terge.methods.ties(density=0.5),
        weights=[1, 2, 3],
        out=tmp_path / "soup",
    )
    data, body = card_of(out)
    assert data["library_name"] == "transformers"
    assert data["tags"] == ["merge", "terge", "ties"]
    assert "base_model" not in data  # local folders are no Hub ids: named in the body instead
    assert "[paper](https://arxiv.org/abs/2306.01708)" in body
    assert "density=0.5" in body
    for model in models:
        assert f"`{model}`" in body
    assert "# the base's own card" not in body  # replaced: it described the base


def test_hub_models_are_the_base_model(tmp_path):
    lineage = terge.Lineage(
        models=[
            terge.lineage.ModelRecord(
                0, "file", "org/a@" + "1" * 40, None, "1" * 40, "org/a", "v1"
            ),
            terge.lineage.ModelRecord(1, "file", "local", None),
            terge.lineage.ModelRecord(2, "file", "org/b@" + "2" * 40, None, "2" * 40, "org/b"),
        ],
        base=terge.lineage.ModelRecord(
            "separate", "file", "org/c@" + "3" * 40, None, "3" * 40, "org/c"
        ),
    )
    text = model_card(lineage, library_name="transformers")
    data = huggingface_hub.ModelCard(text).data.to_dict()
    assert data["base_model"] == ["org/c", "org/a", "org/b"]
    assert data["base_model_relation"] == "merge"
    assert "| 0 | [org/a](https://huggingface.co/org/a) | `111111111111` (asked: `v1`) |" in text
    recipe = tomllib.loads(recipe_from_lineage(lineage)[0])
    assert recipe["models"] == ["hf://org/a@" + "1" * 40, "local", "hf://org/b@" + "2" * 40]
    assert recipe["base"] == "hf://org/c@" + "3" * 40


def test_the_card_names_the_lineage_by_its_digest(models, tmp_path):
    out = terge.merge([str(m) for m in models], out=tmp_path / "soup", digests=True)
    digest = hashlib.sha256((out / "lineage.json").read_bytes()).hexdigest()
    assert f"its SHA-256 is `{digest}`" in (out / "README.md").read_text()
    assert lineage_digest(terge.load_lineage(out / "lineage.json")) == digest


def test_model_card_false_leaves_it_out(models, tmp_path):
    out = terge.merge([str(m) for m in models], out=tmp_path / "soup", model_card=False)
    assert (out / "README.md").read_text() == "# the base's own card\n"  # copied, as before
    bare = [folder(tmp_path / f"bare{i}", i, readme=None) for i in range(2)]
    out = terge.merge([str(m) for m in bare], out=tmp_path / "bare-soup", model_card=False)
    assert not (out / "README.md").exists()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1, r"`model_card` must be True \(write README.md\), False .* got int"),
        ("  ", r"`model_card` as a str is the command .* got an empty one"),
    ],
)
def test_bad_model_card_values_are_refused_before_writing(models, tmp_path, value, message):
    with pytest.raises(terge.MergeArgumentError, match=message):
        terge.merge([str(m) for m in models], out=tmp_path / "soup", model_card=value)
    assert not (tmp_path / "soup").exists()


def test_a_command_is_shown_as_given(models, tmp_path):
    out = terge.merge(
        [str(m) for m in models], out=tmp_path / "soup", model_card="terge merge a b -o soup"
    )
    assert "```sh\nterge merge a b -o soup\n```" in (out / "README.md").read_text()


def test_the_cards_recipe_redoes_the_merge(models, tmp_path, capsys):
    out = terge.merge(
        [str(m) for m in models],
        method=terge.methods.dare_ties(density=0.5),
        weights=[1, 2, 3],
        excluded="layers.0.norm.weight",
        out_dtype="bfloat16",
        seed=7,
        out=tmp_path / "soup",
    )
    lineage = terge.load_lineage(out / "lineage.json")
    recipe, complete = recipe_from_lineage(lineage)
    assert complete
    assert recipe in (out / "README.md").read_text()
    path = tmp_path / "again.toml"
    path.write_text(
        recipe.replace('out = "merged"', f"out = {json.dumps(str(tmp_path / 'again'))}")
    )
    assert load_recipe(path).seed == 7  # a valid recipe, its seed the merge's
    assert cli.main(["merge", "--recipe", str(path), "-q"]) == 0, capsys.readouterr()
    first = load_file(out / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert terge.load_lineage(tmp_path / "again" / "lineage.json") == lineage


def test_what_a_recipe_cannot_say_is_said(tmp_path):
    models = [torch.nn.Linear(2, 2) for _ in range(2)]
    _, lineage = terge.merge(models, method={"weight": "arithmetic", "bias": "slerp"}, lineage=True)
    recipe, complete = recipe_from_lineage(lineage)
    assert not complete
    assert '"<models[0]: in memory>"' in recipe
    assert "# the methods differ between tensors: see lineage.json" in recipe
    assert "A recipe from the lineage (incomplete: see its comments)" in model_card(lineage)


def test_the_card_is_deterministic_and_safe_in_markdown(tmp_path):
    lineage = terge.Lineage(
        models=[terge.lineage.ModelRecord(0, "file", "we|ird`name\nx", None)],
    )
    text = model_card(lineage, title="two\nlines")
    assert text == model_card(lineage, title="two\nlines")
    assert "# two lines\n" in text
    assert "| `we\\|ird'name x` |" in text


def test_the_command_line_writes_the_card_unless_told_not_to(models, tmp_path, capsys):
    argv = ["merge", *map(str, models), "-o", str(tmp_path / "a"), "-q"]
    assert cli.main(argv) == 0, capsys.readouterr()
    assert "```sh\nterge " + " ".join(argv) + "\n```" in (tmp_path / "a" / "README.md").read_text()
    argv = ["merge", *map(str, models), "-o", str(tmp_path / "b"), "-q", "--no-model-card"]
    assert cli.main(argv) == 0, capsys.readouterr()
    assert (tmp_path / "b" / "README.md").read_text() == "# the base's own card\n"


def test_a_distributed_checkpoint_gets_a_card_too(models, tmp_path):
    out = terge.merge([str(m) for m in models], out=tmp_path / "soup", out_format="dcp")
    data, _ = card_of(out)
    assert data["tags"] == ["merge", "terge", "arithmetic"]
    assert "library_name" not in data  # transformers cannot load a dcp folder


@pytest.mark.parametrize(
    ("options", "lines"),
    [
        (
            {"weights": [1, 1, -1], "normalize": False},
            ["normalize = false", "weights = [1.0, 1.0, -1.0]"],
        ),
        ({"weights": [0.2, 0.3, 0.5]}, ["weights = [0.2, 0.3, 0.5]"]),
        ({"weights": [2, 2, 2]}, ["weights = [1.0, 1.0, 1.0]"]),  # equal: only ratios matter
    ],
)
def test_the_recipe_says_the_weights_and_normalisation(models, tmp_path, capsys, options, lines):
    out = terge.merge([str(m) for m in models], out=tmp_path / "soup", **options)
    recipe, complete = recipe_from_lineage(terge.load_lineage(out / "lineage.json"))
    assert complete and all(line in recipe.splitlines() for line in lines), recipe
    path = tmp_path / "again.toml"
    path.write_text(recipe.replace('"merged"', json.dumps(str(tmp_path / "again"))))
    assert cli.main(["merge", "--recipe", str(path), "-q"]) == 0, capsys.readouterr()
    first = load_file(out / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_config_linking_out_of_the_base_folder_is_not_read(tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps(CONFIG))
    bases = [folder(tmp_path / f"m{i}", i, config=None) for i in range(2)]
    (bases[0] / "config.json").symlink_to(outside)
    with pytest.warns(UserWarning, match=r"did not copy 1 file"):
        out = terge.merge([str(m) for m in bases], out=tmp_path / "soup")
    data, _ = card_of(out)
    assert "library_name" not in data


def test_a_stacks_recipe_keeps_its_dtypes_and_seed(tmp_path, monkeypatch, capsys):
    """The card's [[slices]] recipe says the stack's dtype, out_dtype and seed: without them it
    redid a dare_ties stack with other random masks and wrote float32 instead of bfloat16."""
    monkeypatch.chdir(tmp_path)
    for k, name in enumerate("ab"):
        generator = torch.Generator().manual_seed(k)
        state = {f"model.layers.{i}.w": torch.randn(8, generator=generator) for i in range(4)}
        state["model.embed_tokens.weight"] = torch.randn(3, 8, generator=generator)
        terge.save(state, tmp_path / name)
    slices = [terge.blocks("a", 0, 2), [terge.blocks("a", 2, 4), terge.blocks("b", 2, 4)]]
    out = terge.stack(
        slices,
        method=terge.methods.dare_ties(density=0.5),
        seed=3,
        dtype=torch.float32,
        out_dtype="bfloat16",
        out="first",
    )
    recipe = (out / "README.md").read_text().split("```toml\n")[1].split("```")[0]
    assert recipe.splitlines()[3:7] == [
        'dtype = "float32"',
        'out_dtype = "bfloat16"',
        "seed = 3",
        'method = {name = "dare_ties", density = 0.5, scale = 1.0}',
    ]
    (tmp_path / "again.toml").write_text(recipe)
    assert cli.main(["merge", "--recipe", "again.toml", "--quiet"]) == 0, capsys.readouterr()
    first = load_file(out / "model.safetensors")
    again = load_file(tmp_path / "stacked" / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(first[k].dtype == torch.bfloat16 and torch.equal(first[k], again[k]) for k in first)


def test_a_command_with_backticks_stays_in_its_code_block():
    """A command holding a fence (a path with a newline and backticks in it) cannot end the
    card's code block and write Markdown of its own."""
    command = "terge merge 'a\n```\n# injected' ``b``"
    text = model_card(terge.Lineage(), command=command)
    assert f"Made with:\n\n````sh\n{command}\n````\n" in text
    assert "```sh\nterge merge x\n```\n" in model_card(terge.Lineage(), command="terge merge x")


def test_a_requested_revision_is_safe_in_the_table():
    record = terge.lineage.ModelRecord(0, "file", "p", None, "1" * 40, "org/a", "a|b`c")
    text = model_card(terge.Lineage(models=[record]))
    assert "| `111111111111` (asked: `a\\|b'c`) |" in text


def test_excluded_names_that_look_like_patterns_stay_names():
    """The recipe excludes a tensor named ``re:x`` by its name, not as the regex ``x``."""
    lineage = terge.Lineage(
        {},
        {"re:x": EXCLUDED, "layers:0": EXCLUDED, "name:n": EXCLUDED, "plain": EXCLUDED},
        models=[terge.lineage.ModelRecord(0, "file", "a", None)],
    )
    recipe, _ = recipe_from_lineage(lineage)
    assert 'exclude = ["name:layers:0", "name:name:n", "plain", "name:re:x"]' in recipe.splitlines()
    settings = parse_recipe(tomllib.loads(recipe), Path("."))
    assert settings.exclude == ("layers:0", "name:n", "plain", "re:x")


# --- found by a mutation audit of modelcard.py ---------------------------------------------------

Entry = terge.lineage.LineageEntry
Record = terge.lineage.ModelRecord


def test_the_whole_card_of_a_lineage():
    """Every part of a card, closed form: methods by count (then name), tags sorted, settings
    that all a method's tensors share, the excluded tensor, the dtypes, no base_model for
    local models."""
    lineage = terge.Lineage(
        {
            "a": Entry("ties", [(0, 1.0), (1, 2.0)], {"density": 0.3, "scale": 1.0}),
            "b": Entry("ties", [(0, 1.0), (1, 2.0)], {"density": 0.3, "scale": 2.0}),
            "c": Entry("slerp", [(0, 1.0), (1, 2.0)], {"t": 0.5}),
        },
        {"d": EXCLUDED, "e": terge.lineage.NOT_FLOATING},
        models=[Record(0, "file", "m0", None), Record(1, "file", "m1", None)],
        base=Record(0, "file", "m0", None),
        dtype=torch.float64,
        out_dtype=torch.bfloat16,
        terge_version="9.9",
        torch_version="2.0",
    )
    assert model_card(lineage) == "\n".join(
        [
            "---",
            "tags:",
            "- merge",
            "- terge",
            "- slerp",
            "- ties",
            "---",
            "",
            "# A merge of 2 models",
            "",
            "Merged with [terge](https://pypi.org/project/terge/) 9.9 (PyTorch 2.0), accumulating "
            "in float64, written in bfloat16.",
            "",
            "## Method",
            "",
            "- `ties` ([paper](https://arxiv.org/abs/2306.01708)): 2 tensors, with density=0.3",
            "- `slerp` ([paper](https://dl.acm.org/doi/10.1145/325165.325242)): 1 tensor, with "
            "t=0.5",
            "- 2 tensors kept as the base has them (see the lineage).",
            "",
            "## Models",
            "",
            "| | model | revision | weight |",
            "|---|---|---|---|",
            "| 0 (base) | `m0` |  | 1.0 |",
            "| 1 | `m1` |  | 2.0 |",
            "",
            "## Reproduce",
            "",
            "A recipe from the lineage (incomplete: see its comments):",
            "",
            "```toml",
            'models = ["m0", "m1"]',
            "base = 0",
            'out = "merged"',
            'dtype = "float64"',
            'out_dtype = "bfloat16"',
            'exclude = ["d"]',
            "weights = [1.0, 2.0]",
            "# the methods differ between tensors: see lineage.json",
            "```",
            "",
            "## Lineage",
            "",
            "`lineage.json` beside this card records every tensor's method, models and weights; "
            f"its SHA-256 is `{lineage_digest(lineage)}`. Check the weights against it with "
            "`terge lineage verify lineage.json --merged .` (run where the models' paths lead).",
            "",
        ]
    )


def test_a_card_of_nothing_merged():
    text = model_card(terge.Lineage(), title="x\x7fy")
    assert "\n# x y\n" in text
    assert "\n- No tensor was merged" not in text
    assert "\nNo tensor was merged: the folder holds the base's tensors unchanged.\n" in text
    assert "# A merge of 0 models\n" in model_card(terge.Lineage())


@pytest.mark.parametrize(
    ("entries", "note", "weights"),
    [
        ([Entry("arithmetic", [(0, 1.0), (1, 2.0)])] * 2, False, "weights = [1.0, 2.0]"),
        (
            [Entry("arithmetic", [(0, 1.0), (1, 2.0)]), Entry("arithmetic", [(0, 1.0), (1, 3.0)])],
            True,
            "# the weights differ between tensors: see lineage.json",
        ),
        (
            [
                Entry("arithmetic", [(0, 0.5), (1, 0.5)], coefficients=[1, 1], divisor=2.0),
                Entry("arithmetic", [(0, 1.0), (1, 1.0)], coefficients=[1, 1]),
            ],
            True,
            "# the weights differ between tensors: see lineage.json",
        ),
        (
            [Entry("mine", [(0, 1.0), (1, 2.0)], custom=True)] * 2,  # the same weights
            True,
            "# some tensors were made by a user's own method, whose weights are its own: see "
            "lineage.json",
        ),
    ],
)
def test_weights_that_vary_are_not_written_as_one(entries, note, weights):
    """Weights that differ between tensors, normalised for one and not another, or given to a
    user's own function cannot be one ``weights`` line: the card and recipe say so."""
    lineage = terge.Lineage(
        {f"t{i}": entry for i, entry in enumerate(entries)},
        models=[Record(0, "file", "a", None), Record(1, "file", "b", None)],
    )
    text = model_card(lineage)
    custom = entries[0].custom
    said = "The weights differ between tensors; the lineage records each tensor's."
    own = (
        "Some tensors were made by a user's own method, whose weights are its own; the lineage "
        "records each tensor's."
    )
    assert (said in text) is (note and not custom)  # not "differ" where they are the same
    assert (own in text) is custom
    recipe, complete = recipe_from_lineage(lineage)
    assert weights in recipe.splitlines()
    assert complete is not note
    assert ("- `mine` (a user's own function): 2 tensors" in text) is custom
    assert ("# a user's own method function cannot be written in a recipe" in recipe) is custom


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("transformers", "library_name: transformers"),
        ("org/name@v1.0", "library_name: org/name@v1.0"),
        ("Yes", 'library_name: "Yes"'),
        ("null", 'library_name: "null"'),
        ("@x", 'library_name: "@x"'),
        ("a:b", 'library_name: "a:b"'),
        ("", 'library_name: ""'),
        ("123", 'library_name: "123"'),  # a number
        ("1e5", 'library_name: "1e5"'),
        ("2024-01-01", 'library_name: "2024-01-01"'),  # a date
        ("on", 'library_name: "on"'),  # YAML 1.1's booleans
        ("Off", 'library_name: "Off"'),
        ("y", 'library_name: "y"'),
        ("01-ai/Yi", 'library_name: "01-ai/Yi"'),
    ],
)
def test_front_matter_strings_are_quoted_where_yaml_would_misread_them(name, line):
    text = model_card(terge.Lineage(), library_name=name)
    assert line in text.splitlines()
    assert huggingface_hub.ModelCard(text).data.to_dict()["library_name"] == name


def test_a_tag_is_listed_once():
    lineage = terge.Lineage({"w": Entry("terge", [(0, 1.0)], custom=True)})
    assert "tags:\n- merge\n- terge\n---\n" in model_card(lineage)


def test_models_in_memory_and_a_separate_base():
    lineage = terge.Lineage(
        models=[Record(0, "module", None, None), Record(1, "file", "b", None)],
        base=Record("separate", "module", None, None),
    )
    text = model_card(lineage)
    assert "| 0 | (in memory, a module) |  |  |\n| 1 | `b` |  |  |\n" in text
    assert "| base | (in memory, a module) |  | |\n" in text
    recipe, complete = recipe_from_lineage(lineage)
    assert recipe.splitlines()[:2] == [
        'models = ["<models[0]: in memory>", "b"]',
        'base = "<base: in memory>"',
    ]
    assert not complete
    files = [Record(0, "file", "a", None), Record(1, "file", "b", None)]
    lineage = terge.Lineage(models=files, base=Record("separate", "module", None, None))
    assert not recipe_from_lineage(lineage)[1]  # the base alone is in memory
    lineage = terge.Lineage(models=files, base=Record("separate", "file", "c", None))
    assert recipe_from_lineage(lineage) == (
        'models = ["a", "b"]\nbase = "c"\nout = "merged"\nweights = [1.0, 1.0]\n',
        True,
    )
    assert "| base | `c` |  | |\n" in model_card(lineage)


def test_a_complete_recipe_says_the_hub_models_are_pinned():
    record = Record(0, "file", "p", None, "1" * 40, "org/a")
    lead = "As a recipe (`terge merge --recipe recipe.toml`)"
    assert f"{lead}, the Hub models pinned to the commits they resolved to:" in model_card(
        terge.Lineage(models=[record])
    )
    assert f"{lead}:" in model_card(terge.Lineage(models=[Record(0, "file", "p", None)]))


def test_the_recipe_writes_each_kind_of_setting():
    settings = {"flag": True, "off": False, "n": 3, "x": 0.5, "s": "a b", "t": ([1], 2), "seed": 7}
    lineage = terge.Lineage(
        {"w": Entry("m", [(0, 1.0)], settings)}, models=[Record(0, "file", "a", None)]
    )
    lines = recipe_from_lineage(lineage)[0].splitlines()
    assert lines[2:] == [
        "seed = 7",
        "weights = [1.0]",
        'method = {name = "m", flag = true, n = 3, off = false, s = "a b", t = [[1], 2], x = 0.5}',
    ]


def test_a_model_in_memory_makes_the_recipe_incomplete():
    lineage = terge.Lineage(
        models=[Record(0, "module", None, None), Record(1, "file", "b", None)],
        base=Record(1, "file", "b", None),
    )
    recipe, complete = recipe_from_lineage(lineage)
    assert recipe.splitlines()[:2] == ['models = ["<models[0]: in memory>", "b"]', "base = 1"]
    assert not complete


def stacked(*blocks: tuple[str, list[list]]) -> terge.Lineage:
    lineage = terge.Lineage(models=[Record(0, "file", "a", None), Record(1, "file", "b", None)])
    lineage.stack = {
        "base": 0,
        "head": 1,
        "blocks": [{"method": method, "sources": sources} for method, sources in blocks],
    }
    return lineage


def test_a_stacks_runs_join_only_the_same_models_blocks_in_order():
    """Output blocks become one slice only while they come from the next blocks of the same
    models by the same method; two merging methods cannot be one recipe."""
    recipe, complete = stack_recipe(
        stacked(
            ("passthrough", [[0, 0, 1.0]]),
            ("passthrough", [[0, 1, 1.0]]),
            ("passthrough", [[1, 2, 1.0]]),
            ("arithmetic", [[1, 3, 1.0]]),
        )
    )
    assert complete
    assert recipe == "\n".join(
        [
            'base = "a"',
            'head = "b"',
            'out = "stacked"',
            'method = {name = "arithmetic"}',
            "",
            "[[slices]]",
            'model = "a"',
            "layer_range = [0, 2]",
            "",
            "[[slices]]",
            'model = "b"',
            "layer_range = [2, 3]",
            "",
            "[[slices]]",
            'sources = [{model = "b", layer_range = [3, 4], weight = 1.0}]',
            "",
        ]
    )
    recipe, complete = stack_recipe(
        stacked(("arithmetic", [[0, 0, 1.0]]), ("slerp", [[0, 1, 1.0]]))
    )
    assert not complete
    assert "# the merged slices use different methods: see lineage.json" in recipe.splitlines()

    lineage = stacked(("passthrough", [[0, 0, 1.0]]))
    lineage.models = (Record(0, "module", None, None), Record(1, "file", "b", None))
    recipe, complete = stack_recipe(lineage)
    assert 'model = "<models[0]: in memory>"' in recipe.splitlines()
    assert not complete


@pytest.mark.parametrize("where", ["base", "head", "slice"])
def test_a_stack_naming_a_model_the_lineage_lacks_is_incomplete(where):
    blocks = [("passthrough", [[5 if where == "slice" else 0, 0, 1.0]])]
    lineage = stacked(*blocks)
    if where != "slice":
        lineage.stack[where] = 5  # no record of a model 5: an edited lineage
    recipe, complete = stack_recipe(lineage)
    assert not complete
    assert '"?"' in recipe
