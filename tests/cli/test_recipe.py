"""TOML recipes and the setting strings shared with the command line (terge.recipe)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import regex
import torch

import terge
from terge.cli.recipe import (
    RECIPE_EXAMPLE,
    RECIPE_KEYS,
    RecipeError,
    Settings,
    load_recipe,
    parse_method,
    parse_pattern,
    parse_recipe,
    parse_weights,
)

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")


def write(tmp_path: Path, text: str, name: str = "recipe.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def recipe(tmp_path: Path, text: str) -> Settings:
    return load_recipe(write(tmp_path, text))


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(RecipeError) as caught:
        recipe(tmp_path, text)
    return str(caught.value)


# --- patterns, methods, weights -------------------------------------------------------------------


def test_pattern_forms():
    mlp = parse_pattern("re:mlp", "x")
    assert isinstance(mlp, regex.Pattern)
    assert mlp.search("model.layers.0.mlp.up.weight")
    assert parse_pattern("lm_head.weight", "x") == "lm_head.weight"
    assert parse_pattern("name:re:odd", "x") == "re:odd"
    blocks = parse_pattern("layers:0-1,embeddings", "x")
    assert blocks.search("model.layers.1.mlp.weight")
    assert not blocks.search("model.layers.2.mlp.weight")
    assert blocks.search("model.embed_tokens.weight")
    head = parse_pattern("layers:head", "x")
    assert head.search("lm_head.weight")
    assert not head.search("model.layers.0.mlp.weight")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("re:(", "--include: '(' is not a valid regular expression: missing ) at position 1."),
        ("re:", "--include: 're:' needs a regular expression after it, e.g. 're:mlp'."),
        ("", "--include: a pattern cannot be empty; give 're:REGEX'"),
        ("layers:5-3", "--include: 'layers:5-3': layers() got the range '5-3'"),
    ],
)
def test_bad_patterns(text, message):
    with pytest.raises(RecipeError) as caught:
        parse_pattern(text, "--include")
    assert str(caught.value).startswith(message)


def test_method_specs():
    method = parse_method("ties:density=0.3,scale=0.8", "--method")
    assert (method.name, dict(method.settings)) == ("ties", {"density": 0.3, "scale": 0.8})
    assert parse_method("ties : density = 0.5", "--method").settings["density"] == 0.5
    assert parse_method("arithmetic", "--method").name == "arithmetic"
    assert parse_method("task_arithmetic:scale=-1", "--method").settings == {"scale": -1.0}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "tie",
            "--method: unknown merge method 'tie' (did you mean 'ties'?); the valid names are "
            "arithmetic, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, slerp, "
            "model_stock, della, della_linear, sce, breadcrumbs_ties, magmax, consensus, pcb, "
            "nearswap, multislerp, nuslerp, karcher, tsv_m, iso_c, iso_cts, fisher, regmean.",
        ),
        (
            "fisher",
            "--method: method 'fisher' needs fishers (per-model statistics, tensors), which a "
            "command line or recipe cannot give; merge in Python with "
            "terge.methods.fisher(fishers=[...]).",
        ),
        (
            "nuslerp:flatten=false,row_wise=true",
            None,
        ),
        (
            "ties:dens=0.3",
            "--method: method 'ties' has no setting 'dens' (did you mean 'density'?); its "
            "settings are density, scale, trim, rescale, elect, disjoint_mean.",
        ),
        (
            "arithmetic:t=0.3",
            "--method: method 'arithmetic' has no setting 't'; it takes no settings.",
        ),
        (
            "slerp:t=0.3",
            "--method: method 'slerp' has no setting 't'; its settings are threshold, zero.",
        ),
        ("ties:density=2", "--method: ties: density must be in (0, 1], got 2."),
        ("ties:density=x", "--method: ties: density must be a real number, got 'x' (str)."),
        (
            "ties:density",
            "--method: cannot read 'ties:density': settings are KEY=VALUE pairs separated by "
            "commas, e.g. 'ties:density=0.3,scale=0.8'.",
        ),
        (
            "ties:density=0.3,density=0.4",
            "--method: 'ties:density=0.3,density=0.4' sets 'density' twice.",
        ),
    ],
)
def test_bad_method_specs(spec, message):
    if message is None:  # the newer methods' string and flag settings parse
        assert parse_method(spec, "--method").settings == {
            "flatten": False,
            "row_wise": True,
            "task_vectors": False,
        }
        return
    with pytest.raises(RecipeError) as caught:
        parse_method(spec, "--method")
    assert str(caught.value) == message


def test_weights_strings():
    assert parse_weights("1,2,3", "--weights") == (1.0, 2.0, 3.0)
    assert parse_weights("-1, 0.5", "--weights") == (-1.0, 0.5)
    for bad in ("1,x", "", "1,,2", "1,nan", "inf"):
        with pytest.raises(RecipeError, match="is not a comma-separated list of finite numbers"):
            parse_weights(bad, "--weights")


# --- recipes --------------------------------------------------------------------------------------


def test_every_key(tmp_path):
    (tmp_path / "sub" / "b").mkdir(parents=True)  # a local folder: not the Hub model sub/b
    settings = recipe(
        tmp_path,
        """
        models = ["a", "sub/b", "/abs/c"]
        base = "a"
        out = "merged"
        method = "ties:density=0.3"
        weights = [1, 2, 3.5]
        include = "re:weight"
        exclude = ["re:^lm_head", "norm.bias"]
        dtype = "float32"
        out_dtype = "bfloat16"
        max_shard_size = "2GB"
        out_format = "dcp"
        seed = 7
        lineage = "out/lineage.json"
        overwrite = true
        normalize = false
        """,
    )
    assert settings.models == (tmp_path / "a", tmp_path / "sub/b", Path("/abs/c"))
    assert settings.base == tmp_path / "a"
    assert settings.out == tmp_path / "merged"
    assert settings.lineage == tmp_path / "out/lineage.json"
    assert settings.method.name == "ties"
    assert settings.method.settings == {"density": 0.3, "scale": 1.0}
    assert settings.weights == (1.0, 2.0, 3.5)
    assert [p.pattern for p in settings.include] == ["weight"]
    assert settings.exclude[0].pattern == "^lm_head"
    assert settings.exclude[1] == "norm.bias"
    assert settings.dtype is torch.float32
    assert settings.out_dtype is torch.bfloat16
    assert settings.max_shard_size == "2GB"
    assert settings.out_format == "dcp"
    assert settings.seed == 7
    assert settings.overwrite is True
    assert settings.normalize is False
    assert set(Settings.__dataclass_fields__) == set(RECIPE_KEYS)


def test_empty_recipe_gives_nothing(tmp_path):
    assert recipe(tmp_path, "") == Settings()


def test_base_index_and_int_shard_size(tmp_path):
    settings = recipe(tmp_path, "base = -1\nmax_shard_size = 1000000")
    assert settings.base == -1
    assert settings.max_shard_size == 1000000


def test_relative_paths_follow_the_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    write(tmp_path / "recipes", 'models = ["../a", "b"]\nout = "o"', "r.toml")
    monkeypatch.chdir(tmp_path)
    settings = load_recipe("recipes/r.toml")
    assert settings.models == (Path("recipes/../a"), Path("recipes/b"))
    assert settings.out == Path("recipes/o")


def test_the_help_example_parses(tmp_path):
    settings = recipe(tmp_path, RECIPE_EXAMPLE)
    assert len(settings.models) == 3
    assert list(settings.weights.values()) == [(1.0, 2.0, 3.0), (1.0, 1.0, 1.0)]
    assert [m.name for m in settings.method.values()] == ["ties", "task_arithmetic"]
    assert settings.exclude[0].search("lm_head.weight")


def test_pattern_tables_keep_file_order_and_first_match_wins(tmp_path):
    settings = recipe(
        tmp_path,
        """
        [[weights]]
        pattern = "re:mlp"
        values = [1, 0, 0]
        [[weights]]
        pattern = "attn.weight"
        values = [0, 1, 0]
        [[weights]]
        pattern = "re:.*"
        values = [0, 0, 1]

        [[method]]
        pattern = "re:attn"
        name = "ties"
        density = 0.5
        scale = 2
        [[method]]
        pattern = "re:.*"
        name = "arithmetic"
        """,
    )
    keys = list(settings.weights)
    assert [getattr(k, "pattern", k) for k in keys] == ["mlp", "attn.weight", ".*"]
    ties, arithmetic = settings.method.values()
    assert ties.settings == {"density": 0.5, "scale": 2.0}
    assert arithmetic.name == "arithmetic"

    torch.manual_seed(0)
    models = [
        {"mlp.weight": torch.randn(3), "attn.weight": torch.randn(3), "norm": torch.randn(3)}
        for _ in range(3)
    ]
    merged, lineage = terge.merge(
        models, weights=settings.weights, method=settings.method, lineage=True
    )
    assert torch.equal(merged["mlp.weight"], models[0]["mlp.weight"])  # re:mlp, weights 1,0,0
    assert torch.equal(merged["norm"], models[2]["norm"])  # re:.*, weights 0,0,1
    assert lineage["attn.weight"][0] == "ties"
    assert lineage["mlp.weight"][0] == "arithmetic"


def test_single_method_table_and_inline_table(tmp_path):
    settings = recipe(tmp_path, '[method]\nname = "dare_linear"\ndensity = 0.9')
    assert (settings.method.name, settings.method.settings["density"]) == ("dare_linear", 0.9)
    settings = recipe(tmp_path, 'method = {name = "breadcrumbs", gamma = 0.05}')
    assert settings.method.settings["gamma"] == 0.05


def test_updated_overrides_only_given_values():
    recipe_ = Settings(models=(Path("a"),), seed=1, overwrite=True)
    cli = Settings(seed=2, overwrite=False)
    assert recipe_.updated(cli) == Settings(models=(Path("a"),), seed=2, overwrite=False)


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_key_names_it_and_lists_the_valid_ones(tmp_path):
    message = error(tmp_path, 'modles = ["a"]')
    assert message == (
        f"{tmp_path / 'recipe.toml'}: unknown key 'modles' (did you mean 'models'?); the valid "
        "keys are models, base, out, method, weights, include, exclude, dtype, out_dtype, "
        "max_shard_size, out_format, lora_rank, lora_energy, lora_embeddings, seed, vocabulary, "
        "lineage, overwrite, normalize, last, best, metric, mode, slices, head."
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models = 3", "'models' must be a non-empty list of paths; got 3 (int)."),
        ("models = []", "'models' must be a non-empty list of paths; got [] (list)."),
        ('models = ["a", 1]', "'models'[1] must be a path (a non-empty string); got 1 (int)."),
        ("base = 1.5", "'base' must be an index into models or a path; got 1.5 (float)."),
        ("out = true", "'out' must be a path (a non-empty string); got True (bool)."),
        ('seed = "1"', "'seed' must be an integer; got '1' (str)."),
        ("seed = true", "'seed' must be an integer; got True (bool)."),
        ('overwrite = "yes"', "'overwrite' must be true or false; got 'yes' (str)."),
        (
            'weights = [1, "2"]',
            "'weights' must be a list of numbers, one per model; got [1, '2'] (list).",
        ),
        (
            "weights = 1",
            "'weights' must be a non-empty list of numbers, one per model; got 1 (int).",
        ),
        (
            "include = 3",
            "'include' must be a pattern string or a non-empty list of them; got 3 (int).",
        ),
        (
            "exclude = [3]",
            "'exclude'[0] must be a pattern string, 're:REGEX' (searched anywhere in the name), "
            "'layers:0-5' (transformer blocks; add ',embeddings' or ',head'), or an exact tensor "
            "name; got 3 (int).",
        ),
        ('dtype = "float16"', "'dtype' must be one of 'float64', 'float32'; got 'float16'."),
        (
            'out_dtype = "int8"',
            "'out_dtype' must name a floating torch dtype such as 'bfloat16', 'float16' or "
            "'float32'; got 'int8'.",
        ),
        ('max_shard_size = "big"', "'max_shard_size': 'big' is not a size: give a positive int"),
        (
            "out_format = 1",
            "'out_format' must be one of 'safetensors', 'dcp', 'lora' (a safetensors folder",
        ),
        ("method = 3", "'method' must be a method spec string (\"ties:density=0.3\"), a table"),
        ('method = "nope"', "'method': unknown merge method 'nope'; the valid names are"),
        ("method = {density = 0.3}", "'method': missing key 'name' (the method's name)."),
        (
            '[method]\npattern = "re:x"\nname = "ties"',
            "'method': a single [method] table applies to every tensor and takes no 'pattern'",
        ),
    ],
)
def test_wrong_types(tmp_path, text, message):
    assert error(tmp_path, text).startswith(f"{tmp_path / 'recipe.toml'}: {message}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[weights]]\npattern = "re:x"\nvalues = [1]\nvalue = 2',
            "[[weights]] #1 (pattern 're:x'): unknown key 'value' (did you mean 'values'?); the "
            "valid keys are pattern, values.",
        ),
        ("[[weights]]\nvalues = [1]", "[[weights]] #1: missing key 'pattern'."),
        ('[[weights]]\npattern = "x"', "[[weights]] #1 (pattern 'x'): missing key 'values'."),
        (
            '[[weights]]\npattern = "x"\nvalues = [true]',
            "[[weights]] #1 (pattern 'x'): 'values' must be a list of numbers, one per model; "
            "got [True] (list).",
        ),
        (
            '[[weights]]\npattern = "re:x"\nvalues = [1]\n[[weights]]\npattern = "re:x"\nvalues = [2]',
            "[[weights]] #2: the pattern 're:x' is already used by an earlier table, so this one "
            "would never match; remove one.",
        ),
        (
            '[[weights]]\npattern = "re:("\nvalues = [1]',
            "[[weights]] #1: 'pattern': '(' is not a valid regular expression",
        ),
        (
            '[[method]]\npattern = "re:attn"\nname = "ties"\ndensty = 0.3',
            "[[method]] #1 (pattern 're:attn'): method 'ties' has no setting 'densty' (did you "
            "mean 'density'?); its settings are density, scale, trim, rescale, elect, "
            "disjoint_mean.",
        ),
        (
            '[[method]]\npattern = "re:attn"\nname = "ties"\ndensity = 0',
            "[[method]] #1 (pattern 're:attn'): ties: density must be in (0, 1], got 0.",
        ),
        (
            '[[method]]\npattern = "re:attn"',
            "[[method]] #1 (pattern 're:attn'): missing key 'name' (the method's name).",
        ),
        ('[[method]]\nname = "ties"', "[[method]] #1: missing key 'pattern'."),
    ],
)
def test_table_errors(tmp_path, text, message):
    assert error(tmp_path, text).startswith(f"{tmp_path / 'recipe.toml'}: {message}")


def test_missing_folder_and_malformed_files(tmp_path):
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "nope.toml")
    assert str(caught.value) == f"recipe file {str(tmp_path / 'nope.toml')!r} not found."
    with pytest.raises(RecipeError, match="is a folder; give a TOML file"):
        load_recipe(tmp_path)
    message = error(tmp_path, 'models = ["a"\nout = 1')
    assert message.startswith(f"{tmp_path / 'recipe.toml'}: not valid TOML: ")
    assert "line" in message


def test_without_tomllib_or_tomli(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(RecipeError) as caught:
        recipe(tmp_path, "seed = 1")
    assert str(caught.value) == (
        "reading a TOML recipe needs Python 3.11 or later (for tomllib), or the tomli package on "
        "Python 3.10: pip install tomli."
    )


def test_parse_recipe_takes_parsed_toml():
    settings = parse_recipe({"models": ["x"], "seed": 3}, Path("/r"), "r.toml")
    assert settings == Settings(models=(Path("/r/x"),), seed=3)
    with pytest.raises(RecipeError, match=r"^r.toml: 'seed' must be an integer"):
        parse_recipe({"seed": 1.5}, Path("/r"), "r.toml")


def test_choosing_keys(tmp_path):
    settings = recipe(
        tmp_path,
        """
        models = ["runs/checkpoint-*"]
        best = 3
        metric = "eval_loss"
        mode = "min"
        """,
    )
    assert settings.models == (tmp_path / "runs/checkpoint-*",)
    assert (settings.best, settings.metric, settings.mode, settings.last) == (
        3,
        "eval_loss",
        "min",
        None,
    )
    assert recipe(tmp_path, "last = 5").last == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("last = 0", r"'last' must be a number of checkpoints \(an int >= 1\); got 0"),
        ("best = true", r"'best' must be a number of checkpoints"),
        ('mode = "up"', r"'mode' must be 'min' or 'max'; got 'up'"),
        ("metric = 3", r"'metric' must be a metric's name such as \"val_loss\"; got 3"),
    ],
)
def test_bad_choosing_keys(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        recipe(tmp_path, text)


def test_hub_models_in_a_recipe(tmp_path):
    """``org/name`` is a Hub model unless a file or folder of that name lies beside the recipe;
    ``hf://`` is the Hub always (read back by terge.io.hub from the Path's ``hf:/``)."""
    (tmp_path / "org" / "local").mkdir(parents=True)
    settings = recipe(
        tmp_path,
        """
        models = ["org/local", "org/remote@v1", "hf://org/local", "plain"]
        base = "hf://org/base@main"
        out = "merged"
        """,
    )
    assert settings.models == (
        tmp_path / "org/local",
        Path("hf://org/remote@v1"),
        Path("hf://org/local"),
        tmp_path / "plain",
    )
    assert settings.base == Path("hf://org/base@main")
    from terge.io.hub import HubReference, hub_reference

    assert [hub_reference(p) for p in settings.models[1:3]] == [
        HubReference("org/remote", "v1"),
        HubReference("org/local"),
    ]


# --- found by a mutation audit of recipe.py -------------------------------------------------------


def test_pattern_text_is_read_as_written():
    """A regular expression keeps its spaces; ``layers:`` words may have spaces around them."""
    assert parse_pattern("re: x", "x").pattern == " x"
    spaced = parse_pattern("layers: 0-1 , embeddings ", "x")
    assert spaced.search("model.layers.1.mlp.weight")
    assert spaced.search("model.embed_tokens.weight")
    assert not spaced.search("model.layers.2.mlp.weight")


def test_method_spec_edges():
    assert parse_method("ties:  ", "--method").settings == {"density": 0.2, "scale": 1.0}
    with pytest.raises(RecipeError, match=r"^--method: cannot read 'ties:density=': settings are"):
        parse_method("ties:density=", "--method")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("weights = [1, nan]", "'weights' holds nan; weights must be finite numbers."),
        ("weights = [inf]", "'weights' holds inf; weights must be finite numbers."),
        (
            '[method]\nname = "ties"\nseed = 1',
            "'method': method 'ties' has no setting 'seed'; its settings are density, scale, "
            "trim, rescale, elect, disjoint_mean.",
        ),
        (
            "method = []",
            "'method' must be a method spec string (\"ties:density=0.3\"), a table or [[method]] "
            "tables; got [] (list).",
        ),
        (
            'weights = [1, {pattern = "x", values = [1]}]',
            "'weights'[0] must be a table; got 1 (int).",
        ),
        (
            "include = []",
            "'include' must be a pattern string or a non-empty list of them; got [] (list).",
        ),
        ("lora_rank = 0", "'lora_rank' must be a positive integer; got 0 (int)."),
        ("lora_rank = true", "'lora_rank' must be a positive integer; got True (bool)."),
        ("lora_energy = true", "'lora_energy' must be a number in (0, 1]; got True (bool)."),
        ('lora_embeddings = "yes"', "'lora_embeddings' must be true or false; got 'yes' (str)."),
        ('metric = ""', "'metric' must be a metric's name such as \"val_loss\"; got '' (str)."),
        (
            "vocabulary = true",
            "'vocabulary' must be 'base', 'union' or a model index (aligning embedding rows by "
            "token); got True.",
        ),
    ],
)
def test_more_wrong_values(tmp_path, text, message):
    assert error(tmp_path, text) == f"{tmp_path / 'recipe.toml'}: {message}"


def test_values_of_the_right_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    settings = recipe(
        tmp_path,
        """
        models = ["~/m"]
        vocabulary = "1"
        lora_rank = 1
        lora_energy = 1
        lora_embeddings = true
        head = "h"
        slices = [{model = "a", layer_range = [0, 2]}]
        """,
    )
    assert settings.models == (tmp_path / "home" / "m",)
    assert settings.vocabulary == 1
    assert (settings.lora_rank, settings.lora_embeddings) == (1, True)
    assert settings.lora_energy == 1.0 and isinstance(settings.lora_energy, float)
    assert settings.head == tmp_path / "h"


def test_deeply_nested_recipes_are_refused(tmp_path):
    path = tmp_path / "recipe.toml"
    for depth, message in [
        (200, "nests arrays or objects more than 64 deep; no file terge reads does."),
        (100_000, "nests arrays or tables too deeply to read."),
    ]:
        path.write_text("a = " + "[" * depth + "]" * depth)
        with pytest.raises(RecipeError) as caught:
            load_recipe(path)
        assert str(caught.value) == f"recipe {str(path)!r} {message}"


def test_slices(tmp_path):
    settings = recipe(
        tmp_path,
        """
        [[slices]]
        model = "a"
        layer_range = [0, 2]
        [[slices]]
        sources = [{model = "a", layer_range = [2, 4], weight = [1, 0.5]}, {model = "b", layer_range = [1, 3]}]
        """,
    )
    a, b = tmp_path / "a", tmp_path / "b"
    first, (second, third) = settings.slices
    assert first == terge.blocks(a, 0, 2)
    assert second == terge.blocks(a, 2, 4, weight=[1.0, 0.5])
    assert third == terge.blocks(b, 1, 3)
    assert third.weight == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'slices = [{sources = [{model = "a", layer_range = [0, 1]}], model = "b"}]',
            "'slices'[0]: unknown key 'model'; the valid keys are sources.",
        ),
        (
            "slices = [{sources = []}]",
            "'slices'[0].sources must be a non-empty list of tables; got [] (list).",
        ),
        (
            'slices = [{model = "a", layer_range = [0, 1, 2]}]',
            "'slices'[0].layer_range must be [START, STOP], two ints (STOP excluded); got "
            "[0, 1, 2] (list).",
        ),
        (
            'slices = [{model = "a", layer_range = [true, 2]}]',
            "'slices'[0].layer_range must be [START, STOP], two ints (STOP excluded); got "
            "[True, 2] (list).",
        ),
        (
            'slices = [{model = "a", layer_range = [0, 2], weight = []}]',
            "'slices'[0].weight must be a non-empty list of numbers, one per model; got [] (list).",
        ),
        (
            'slices = [{model = "a", layer_range = [3, 1]}]',
            "'slices'[0]: blocks(3, 1) is empty or negative: give 0 <= start < stop (stop "
            "excluded, as in range()).",
        ),
    ],
)
def test_bad_slices(tmp_path, text, message):
    assert error(tmp_path, text) == f"{tmp_path / 'recipe.toml'}: {message}"


def test_tables_whose_patterns_read_the_same_are_refused(tmp_path):
    """``x`` and ``name:x``, or ``layers:0-1`` and ``layers: 0-1``, are one pattern: the later
    table silently replaced the earlier one's values (and took its place in the order)."""
    message = error(
        tmp_path,
        '[[weights]]\npattern = "x"\nvalues = [1, 0]\n[[weights]]\npattern = "re:.*"\n'
        'values = [1, 1]\n[[weights]]\npattern = "name:x"\nvalues = [0, 1]',
    )
    assert message == (
        f"{tmp_path / 'recipe.toml'}: [[weights]] #3: the pattern 'name:x' is already used by an "
        "earlier table as 'x', so this one would never match; remove one."
    )
    message = error(
        tmp_path,
        '[[method]]\npattern = "layers:0-1"\nname = "ties"\n'
        '[[method]]\npattern = "layers: 0-1"\nname = "arithmetic"',
    )
    assert message == (
        f"{tmp_path / 'recipe.toml'}: [[method]] #2: the pattern 'layers: 0-1' is already used by "
        "an earlier table as 'layers:0-1', so this one would never match; remove one."
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dtype = []", "'dtype' must be one of 'float64', 'float32'; got []."),
        ("dtype = {a = 1}", "'dtype' must be one of 'float64', 'float32'; got {'a': 1}."),
        ('last = "²"', "'last' must be a number of checkpoints (an int >= 1); got '²'."),
        (
            'vocabulary = "²"',
            "'vocabulary' must be 'base', 'union' or a model index (aligning embedding rows by "
            "token); got '²'.",
        ),
    ],
)
def test_odd_values_get_an_error_not_a_traceback(tmp_path, text, message):
    """An unhashable dtype raised TypeError; a digit int() cannot read raised ValueError."""
    assert error(tmp_path, text) == f"{tmp_path / 'recipe.toml'}: {message}"
    assert recipe(tmp_path, 'last = " 3 "\nvocabulary = "2"') == Settings(last=3, vocabulary=2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base = true", "'base' must be an index into models or a path; got True (bool)."),
        ('method = ["ties"]', "'method'[0] must be a table; got 'ties' (str)."),
    ],
)
def test_wrong_types_found_by_the_audit(tmp_path, text, message):
    assert error(tmp_path, text) == f"{tmp_path / 'recipe.toml'}: {message}"
    assert recipe(tmp_path, 'best = "3"').best == 3  # a count may be a digit string


def test_unreadable_recipes(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(RecipeError) as caught:
        load_recipe(tmp_path / "file" / "r.toml")
    assert str(caught.value) == (
        f"cannot read recipe {str(tmp_path / 'file' / 'r.toml')!r}: Not a directory."
    )
    path = write(tmp_path, "seed = 1  # eleven bytes and more")
    monkeypatch.setattr("terge.cli.recipe.MAX_RECIPE_BYTES", 10)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert str(caught.value) == (
        f"recipe {str(path)!r} is larger than 10 bytes, more than such a file ever holds; give a "
        "TOML file."
    )
