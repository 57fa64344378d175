"""The ``terge`` command, run in-process through ``terge.cli.main`` (and once as ``python -m``)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import regex
import torch

import terge
import terge.cli.commands as cli
from terge.cli.recipe import RECIPE_KEYS
from terge.io import load, save
from terge.lineage import Lineage, LineageEntry

pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def state_dicts() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "mlp.weight": torch.randn(4, 3, generator=generator),
            "attn.weight": torch.randn(3, 3, generator=generator),
            "norm.bias": torch.randn(3, generator=generator),
            "steps": torch.tensor([i]),
        }
        for i in range(3)
    ]


@pytest.fixture
def checkpoints(tmp_path, monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Three tiny checkpoint folders a, b, c in tmp_path, which is also the working folder."""
    monkeypatch.chdir(tmp_path)
    models = state_dicts()
    for name, model in zip("abc", models):
        save(model, tmp_path / name)
    return models


# --- help -----------------------------------------------------------------------------------------


def merge_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["merge"]


def test_merge_help_documents_every_option_with_an_example(capsys):
    code, out, err = run(capsys, "merge", "--help")
    assert (code, err) == (0, "")
    flat = " ".join(out.split())
    for action in merge_parser()._actions:
        if action.help == argparse.SUPPRESS or "-h" in action.option_strings:
            continue
        for option in action.option_strings:
            assert option in out, option
        assert "e.g." in action.help, action.dest
    for text in (
        "re:REGEX",
        "layers:SPEC",
        "ties:density=0.3,scale=0.8",
        "[[weights]]",
        "[[method]]",
    ):
        assert text in flat, text
    for option in (
        "--out",
        "--base",
        "--method",
        "--weights",
        "--include",
        "--exclude",
        "--dtype",
        "--out-dtype",
        "--max-shard-size",
        "--seed",
        "--lineage",
        "--overwrite",
        "--no-normalize",
        "--recipe",
        "--quiet",
    ):
        assert option in out, option


def test_top_level_help_shows_examples(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "terge merge a b c -o soup" in out
    assert "terge merge --recipe soup.toml" in out
    assert "[[method]]" in out
    assert "merge" in out


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert (code, out) == (0, f"terge {terge.__version__}\n")


def test_subcommands_are_a_registry(capsys, monkeypatch):
    def add_arguments(parser):
        parser.add_argument("--name")

    def hello(args):
        print(f"hello {args.name}")
        return 0

    commands = {
        **cli.COMMANDS,
        "hello": cli.Command("say hello", "Say hello.", add_arguments, hello),
    }
    monkeypatch.setattr(cli, "COMMANDS", commands)
    assert run(capsys, "hello", "--name", "x") == (0, "hello x\n", "")


# --- errors: one line, exit 2 ---------------------------------------------------------------------


def assert_one_error_line(code: int, out: str, err: str, expected_code: int = 2) -> str:
    assert code == expected_code
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("terge: error: "), err
    assert "Traceback" not in err
    return err[len("terge: error: ") : -1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND (see 'terge --help')"),
        (["merge"], "no models to merge: give MODEL paths, or a --recipe with 'models'."),
        (["merge", "a", "b"], "no output folder: give -o/--out OUT, or a --recipe with 'out'."),
        (
            ["merge", "a", "missing", "-o", "o"],
            "model 'missing' does not exist (no such file or folder).",
        ),
        (
            ["merge", "a", "b", "c", "-o", "o", "--weights", "1,x,3"],
            "--weights: '1,x,3' is not a comma-separated list of finite numbers, one per model; "
            "e.g. 1,2,3 (write --weights=-1,1 when the first is negative).",
        ),
        (
            ["merge", "a", "b", "c", "-o", "o", "--weights", "1,2"],
            "--weights gives 2 weights but there are 3 models; give exactly one per model, in order.",
        ),
        (
            ["merge", "a", "b", "c", "-o", "o", "--weights", "-1,1,1"],
            "argument --weights: expected one argument (see 'terge merge --help')",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--method", "soup"],
            "--method: unknown merge method 'soup'; the valid names are arithmetic, "
            "task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, slerp, model_stock, "
            "della, della_linear, sce, breadcrumbs_ties, magmax, consensus, pcb, nearswap, "
            "multislerp, nuslerp, karcher, tsv_m, iso_c, iso_cts, fisher, regmean.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--method", "ties:density=1.5"],
            "--method: ties: density must be in (0, 1], got 1.5.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--method", "dare_ties:gamma=0.1"],
            "--method: method 'dare_ties' has no setting 'gamma'; its settings are density, scale, rescale, elect, disjoint_mean.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--max-shard-size", "2XB"],
            "--max-shard-size: '2XB' is not a size: give a positive int of bytes, or a string such "
            "as '500MB', '2GB', '1.5GB' (KB/MB/GB/TB are powers of 1000) or '2GiB', '2000MiB' "
            "(KiB/MiB/GiB/TiB are powers of 1024); units are case-insensitive and may follow a space.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--dtype", "float16"],
            "argument --dtype: invalid choice: 'float16' (choose from ...",  # quoting varies
        ),
        (
            ["merge", "a", "b", "-o", "o", "--out-dtype", "int8"],
            "--out-dtype must name a floating torch dtype such as 'bfloat16', 'float16' or "
            "'float32'; got 'int8'.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--seed", "one"],
            "argument --seed: invalid int value: 'one' (see 'terge merge --help')",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--include", "re:mlp("],
            "--include: 'mlp(' is not a valid regular expression: missing ) at position 4.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--base", "5"],
            "the base index 5 is not an index into the 2 models; give -2 to 1, or a path.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--base", "nowhere"],
            "base model 'nowhere' does not exist (no such file or folder).",
        ),
        (
            ["merge", "a", "b", "-o", "c"],
            "the output 'c' already exists; pass --overwrite to replace it, or choose another path.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--lineage", "no/such/folder/l.json"],
            "the lineage file 'no/such/folder/l.json': its folder 'no/such/folder' does not exist.",
        ),
        (
            ["merge", "a", "b", "-o", "o", "--bogus"],
            "unrecognized arguments: --bogus (see 'terge --help')",
        ),
        (["merge", "--recipe", "nope.toml"], "recipe file 'nope.toml' not found."),
        (
            ["merge", "a", "b", "-o", "o", "--out-format", "dpc"],
            "--out-format must be one of 'safetensors', 'dcp', 'lora' (a safetensors folder, a "
            "torch.distributed.checkpoint folder, or a LoRA adapter over the base); got 'dpc' "
            "(did you mean 'dcp'?).",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, checkpoints, argv, message):
    got = assert_one_error_line(*run(capsys, *argv))
    if message.endswith("..."):  # argparse's wording differs between Python versions
        assert got.startswith(message[:-3]), got
    else:
        assert got == message


def test_recipe_weights_of_the_wrong_length(capsys, checkpoints):
    Path("r.toml").write_text(
        'models = ["a", "b"]\n[[weights]]\npattern = "re:mlp"\nvalues = [1]\n'
    )
    assert assert_one_error_line(*run(capsys, "merge", "--recipe", "r.toml", "-o", "o")) == (
        "the [[weights]] of pattern 're:mlp' gives 1 weights but there are 2 models; give exactly "
        "one per model, in order."
    )


def test_malformed_recipe(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("r.toml").write_text('models = ["a"\n')
    message = assert_one_error_line(*run(capsys, "merge", "--recipe", "r.toml"))
    assert message.startswith("r.toml: not valid TOML: ")
    Path("r.toml").write_text('models = ["a"]\nseeds = 1\n')
    message = assert_one_error_line(*run(capsys, "merge", "--recipe", "r.toml"))
    assert message.startswith("r.toml: unknown key 'seeds' (did you mean 'seed'?); the valid keys")


def test_python_dash_m_terge_prints_no_traceback(tmp_path):
    env = dict(os.environ)
    src = str(Path(terge.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "terge", "merge", "missing", "other", "-o", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert (
        result.stderr == "terge: error: model 'missing' does not exist (no such file or folder).\n"
    )


# --- what reaches terge.merge (a stand-in, so no file is written) ---------------------------------


class FakeMerge:
    """Records merge()'s arguments and returns what merge(out=..., lineage=True) returns."""

    def __init__(self, error: BaseException | None = None, warn: str | None = None) -> None:
        self.calls: list[tuple[tuple, dict]] = []
        self.error = error
        self.warn = warn

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        if self.warn is not None:
            import warnings

            warnings.warn(self.warn, terge.NoParametersToMergeWarning, stacklevel=2)
        lineage = Lineage(
            {"w": LineageEntry("arithmetic", [(0, 0.25), (1, 0.75)])},
            {"steps": "not floating point"},
        )
        return Path(kwargs["out"]), lineage


@pytest.fixture
def fake(monkeypatch, checkpoints) -> FakeMerge:
    fake = FakeMerge()
    monkeypatch.setattr(cli, "merge", fake)
    return fake


def test_defaults_reach_merge(capsys, fake):
    """Only what the command line gives reaches merge(): its own defaults live in merge.py."""
    code, out, err = run(capsys, "merge", "a", "b", "c", "-o", "out")
    assert (code, err) == (0, "")
    assert out.startswith("terge: wrote out (1 tensor merged, 1 left as in the base) in ")
    ((args, kwargs),) = fake.calls
    assert args == (["a", "b", "c"],)
    # lineage=True: the command prints a summary from it; no progress: stderr is no terminal;
    # model_card: the command as typed, for OUT/README.md
    assert kwargs == {"out": "out", "lineage": True, "model_card": "terge merge a b c -o out"}


def test_every_option_reaches_merge(capsys, fake):
    code, out, _ = run(
        capsys,
        *("merge", "a", "b", "c", "-o", "out", "--base", "b", "--method", "ties:density=0.3"),
        *("--weights", "1,2,3", "--include", "re:weight", "--include", "norm.bias"),
        *("--exclude", "layers:head", "--dtype", "float32", "--out-dtype", "bfloat16"),
        *("--max-shard-size", "2GB", "--seed", "4", "--no-normalize", "--overwrite", "-q"),
        *("--digests", "--out-format", "dcp"),
    )
    assert (code, out) == (0, "")
    ((_, kwargs),) = fake.calls
    assert kwargs["base"] == 1  # the path of a model is that model
    assert (kwargs["method"].name, kwargs["method"].settings["density"]) == ("ties", 0.3)
    assert kwargs["weights"] == [1.0, 2.0, 3.0]
    assert [getattr(p, "pattern", p) for p in kwargs["included"]] == ["weight", "norm.bias"]
    assert isinstance(kwargs["excluded"][0], regex.Pattern)
    assert kwargs["dtype"] is torch.float32
    assert kwargs["out_dtype"] is torch.bfloat16
    assert kwargs["max_shard_size"] == "2GB"
    assert (kwargs["seed"], kwargs["normalize"], kwargs["overwrite"]) == (4, False, True)
    assert kwargs["digests"] is True
    assert kwargs["out_format"] == "dcp"
    assert set(kwargs) == {
        *("out", "lineage", "base", "method", "weights", "included", "excluded", "dtype"),
        *("out_dtype", "max_shard_size", "seed", "normalize", "overwrite", "digests"),
        *("out_format", "model_card"),
    }


@pytest.mark.parametrize(
    ("options", "given"),
    [
        (["--base", "0"], {"base": 0}),
        (["--base", "-1"], {"base": -1}),
        (["--method", "arithmetic"], {"method": "arithmetic"}),
        (["--dtype", "float64"], {"dtype": torch.float64}),
        (["--normalize"], {"normalize": True}),
        (["--no-overwrite"], {"overwrite": False}),
        (["--max-shard-size", "5GB"], {"max_shard_size": "5GB"}),
        (["--seed", "0"], {"seed": 0}),
        (["--vocabulary", "union"], {"vocabulary": "union"}),
        (["--vocabulary", "1"], {"vocabulary": 1}),
    ],
)
def test_an_option_given_reaches_merge_even_as_the_default(capsys, fake, options, given):
    assert run(capsys, "merge", "a", "b", "-o", "out", "-q", *options)[0] == 0
    ((_, kwargs),) = fake.calls
    kwargs.pop("out"), kwargs.pop("lineage")
    assert kwargs.pop("model_card") == "terge merge a b -o out -q " + " ".join(options)
    if "method" in kwargs:
        kwargs["method"] = kwargs["method"].name
    assert kwargs == given


def test_progress_reaches_merge_only_on_a_terminal(capsys, fake, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert run(capsys, "merge", "a", "b", "-o", "out")[0] == 0
    assert run(capsys, "merge", "a", "b", "-o", "out", "-q")[0] == 0
    assert [kwargs.get("progress") for _, kwargs in fake.calls] == [True, None]


def test_help_states_merges_own_defaults():
    """The defaults live in merge(); the help and the recipe keys only describe them."""
    defaults = {n: p.default for n, p in inspect.signature(terge.merge).parameters.items()}
    shown = " ".join(merge_parser().format_help().split())
    accumulate = str(defaults["dtype"]).removeprefix("torch.")
    assert f"(default {defaults['base']}, the first;" in shown
    assert f"(default {defaults['method']})" in shown
    assert f"(default {accumulate}: exact)" in shown
    assert f"(default {defaults['max_shard_size']})" in shown
    assert "(default --normalize)" in shown and defaults["normalize"] is True
    assert "(default: refuse)" in shown and defaults["overwrite"] is False
    assert f"(default {defaults['base']})" in RECIPE_KEYS["base"]
    assert f'"{accumulate}" (default)' in RECIPE_KEYS["dtype"]
    assert f'(default "{defaults["max_shard_size"]}")' in RECIPE_KEYS["max_shard_size"]
    assert "(default true)" in RECIPE_KEYS["normalize"]


def test_a_separate_base_path(capsys, fake, tmp_path):
    save({"w": torch.zeros(1)}, tmp_path / "pretrained")
    assert run(capsys, "merge", "a", "b", "-o", "out", "--base", "pretrained", "-q")[0] == 0
    assert fake.calls[0][1]["base"] == "pretrained"


def test_command_line_overrides_the_recipe(capsys, fake, tmp_path):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.toml").write_text(
        'models = ["../a", "../b"]\nout = "../merged"\nseed = 1\nmethod = "task_arithmetic"\n'
        "overwrite = true\n"
        '[[weights]]\npattern = "re:mlp"\nvalues = [1, 3]\n'
    )
    assert run(capsys, "merge", "--recipe", "recipes/r.toml", "-q")[0] == 0
    assert (
        run(
            capsys,
            "merge",
            "--recipe",
            "recipes/r.toml",
            "--seed",
            "2",
            "--no-overwrite",
            "c",
            "a",
            "-o",
            "x",
            "-q",
        )[0]
        == 0
    )
    (args1, from_recipe), (args2, overridden) = fake.calls
    assert args1 == ([os.path.join("recipes", "..", "a"), os.path.join("recipes", "..", "b")],)
    assert from_recipe["out"] == os.path.join("recipes", "..", "merged")
    assert (from_recipe["seed"], from_recipe["overwrite"]) == (1, True)
    assert from_recipe["method"].name == "task_arithmetic"
    assert [(k.pattern, v) for k, v in from_recipe["weights"].items()] == [("mlp", [1.0, 3.0])]
    assert args2 == (["c", "a"],)
    assert (overridden["out"], overridden["seed"], overridden["overwrite"]) == ("x", 2, False)
    assert overridden["method"].name == "task_arithmetic"  # not overridden: kept


def test_lineage_file_and_warnings(capsys, fake, tmp_path):
    fake.warn = "nothing\nshared"
    code, out, err = run(capsys, "merge", "a", "b", "-o", "out", "--lineage", "l.json")
    assert code == 0
    assert err == "terge: warning: nothing shared\n"
    assert out.startswith("terge: wrote out ")
    record = json.loads((tmp_path / "l.json").read_text())
    assert record["merged"]["w"]["contributions"] == [[0, 0.25], [1, 0.75]]
    assert record["skipped"] == {"steps": "not floating point"}


def test_quiet_prints_nothing(capsys, fake):
    fake.warn = "nothing shared"
    assert run(capsys, "merge", "a", "b", "-o", "out", "--quiet") == (0, "", "")


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (terge.MergeArgumentError("`weights` is bad."), 2, "--weights is bad."),  # as an option
        (OSError(28, "No space left on device"), 1, "[Errno 28] No space left on device"),
        (MemoryError(), 1, "MemoryError"),
        (KeyboardInterrupt(), 130, None),
    ],
)
def test_failures_during_the_merge(capsys, fake, error, code, message):
    fake.error = error
    got_code, out, err = run(capsys, "merge", "a", "b", "-o", "out")
    if message is None:
        assert (got_code, out, err) == (130, "", "terge: interrupted\n")
    else:
        assert assert_one_error_line(got_code, out, err, code) == message


# --- end to end -------------------------------------------------------------------------------


def assert_same_tensors(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    written = load(folder)
    assert written.keys() == expected.keys()
    for name, tensor in expected.items():
        assert written[name].dtype == tensor.dtype, name
        assert torch.equal(written[name], tensor), name


def test_end_to_end_matches_merge_in_memory(capsys, checkpoints, tmp_path):
    code, out, err = run(
        capsys, "merge", "a", "b", "c", "-o", "out", "--weights", "1,2,3", "--lineage", "l.json"
    )
    assert (code, err) == (0, "")
    assert out.startswith("terge: wrote ")
    assert "(3 tensors merged, 1 left as in the base)" in out
    expected = terge.merge(checkpoints, weights=[1, 2, 3])
    assert_same_tensors(tmp_path / "out", expected)
    assert (tmp_path / "l.json").read_bytes() == (tmp_path / "out" / "lineage.json").read_bytes()
    record = json.loads((tmp_path / "l.json").read_text())
    assert record["merged"]["mlp.weight"]["contributions"] == [[0, 1 / 6], [1, 2 / 6], [2, 3 / 6]]


def test_out_format_dcp_writes_a_distributed_checkpoint(capsys, checkpoints, tmp_path):
    pytest.importorskip("torch.distributed.checkpoint", reason="needs torch.distributed")
    from terge.io.distributed import is_distributed_checkpoint

    code, out, err = run(capsys, "merge", "a", "b", "c", "-o", "soup", "--out-format", "dcp")
    assert (code, err) == (0, "")
    assert out.startswith("terge: wrote ")
    assert is_distributed_checkpoint(tmp_path / "soup")
    assert_same_tensors(tmp_path / "soup", terge.merge(checkpoints))
    Path("r.toml").write_text('models = ["soup", "a"]\nout = "again"\nout_format = "dcp"\n')
    assert run(capsys, "merge", "--recipe", "r.toml", "-q")[:2] == (0, "")
    assert is_distributed_checkpoint(tmp_path / "again")


def test_recipe_equals_the_command_line(capsys, checkpoints, tmp_path):
    (tmp_path / "r.toml").write_text(
        'models = ["a", "b", "c"]\nout = "from_recipe"\nweights = [1, 2, 3]\n'
        'method = "ties:density=0.5"\ninclude = "re:weight"\nout_dtype = "float16"\nseed = 3\n'
    )
    assert run(capsys, "merge", "--recipe", "r.toml", "-q")[0] == 0
    argv = ["a", "b", "c", "-o", "from_cli", "--weights", "1,2,3", "--method", "ties:density=0.5"]
    argv += ["--include", "re:weight", "--out-dtype", "float16", "--seed", "3", "-q"]
    assert run(capsys, "merge", *argv)[0] == 0
    assert_same_tensors(tmp_path / "from_cli", load(tmp_path / "from_recipe"))
    assert load(tmp_path / "from_cli")["mlp.weight"].dtype == torch.float16


def test_recipe_with_pattern_tables_matches_merge_in_memory(capsys, checkpoints, tmp_path):
    (tmp_path / "r.toml").write_text(
        'models = ["a", "b", "c"]\nout = "merged"\nseed = 0\n'
        '[[weights]]\npattern = "re:mlp"\nvalues = [1, 2, 3]\n'
        '[[method]]\npattern = "re:attn"\nname = "ties"\ndensity = 0.5\n'
        '[[method]]\npattern = "re:.*"\nname = "arithmetic"\n'
    )
    assert run(capsys, "merge", "--recipe", "r.toml", "-q")[0] == 0
    expected = terge.merge(
        checkpoints,
        weights={regex.compile("mlp"): [1, 2, 3]},
        method={
            regex.compile("attn"): terge.methods.ties(density=0.5),
            regex.compile(".*"): "arithmetic",
        },
        seed=0,
    )
    assert_same_tensors(tmp_path / "merged", expected)


def test_a_method_that_cannot_apply_fails_cleanly(capsys, checkpoints, tmp_path):
    message = assert_one_error_line(
        *run(capsys, "merge", "a", "b", "c", "-o", "out", "--method", "slerp")
    )
    assert message.startswith("the merge method 'slerp' needs exactly 2 contributing models")
    assert not (tmp_path / "out").exists()


# --- terge lineage check, schema, --format, show --plot; terge inspect ----------------------------


def test_check_exits_1_naming_each_violation(capsys, checkpoints):
    assert run(capsys, "merge", "a", "b", "c", "-o", "m", "-q")[0] == 0
    code, out, _ = run(
        capsys, "lineage", "check", "m", "--pinned", "--forbid-skipped", "not floating point"
    )
    assert code == 1
    lines = out.splitlines()
    assert (
        lines[0]
        == "steps: left as in the base (not floating point), which the policy forbids [skipped]"
    )
    assert lines[1:4] == [
        f"models[{i}] (file, read from {name}) is not pinned: no file digests and no revision; "
        "merge from files with digests=True (--digests) [pinned]"
        for i, name in enumerate("abc")
    ]
    assert lines[-1] == "terge: the lineage breaks the policy (4 violations)"


def test_check_passes_a_merge_that_keeps_the_policy(capsys, checkpoints, tmp_path):
    assert (
        run(
            capsys,
            "merge",
            "a",
            "b",
            "c",
            "-o",
            "m",
            "-q",
            "--digests",
            "--method",
            "ties",
            "--seed",
            "0",
        )[0]
        == 0
    )
    (tmp_path / "policy.toml").write_text(
        'require_merged = ["re:weight$", "norm.bias"]\n'
        'forbid_skipped = ["shape mismatch"]\n'
        "merged_is_base_floating = true\nsame_dtypes = true\npinned = true\n"
        "[ranges]\nweight = [0.0, 1.0]\ndensity = [0.1, 0.5]\n"
    )
    code, out, _ = run(capsys, "lineage", "check", "m", "--policy", "policy.toml", "--merged", "m")
    assert code == 0, out
    assert out == "terge: the lineage keeps the policy (3 tensors merged, 1 left alone)\n"
    code, out, _ = run(
        capsys, "lineage", "check", "m", "--policy", "policy.toml", "--range", "density=0.3:1"
    )
    assert code == 1 and out.count("[range]") == 3  # an option adds to (here: overrides) the file


def test_check_options_add_to_the_policy_files_rules(capsys, checkpoints, tmp_path):
    """Each rule option adds to the file's rule of that kind: the file's pattern, reason, tied
    pair and range are still checked when an option of the same kind is given."""
    assert run(capsys, "merge", "a", "b", "c", "-o", "m", "-q")[0] == 0
    (tmp_path / "policy.toml").write_text(
        'require_merged = ["no.such.tensor"]\nforbid_skipped = ["not floating point"]\n'
        'tied = [["attn.weight", "mlp.weight"]]\n[ranges]\nweight = [0.5, 1.0]\n'
    )
    code, out, _ = run(
        capsys,
        "lineage",
        "check",
        "m",
        "--policy",
        "policy.toml",
        "--require-merged",
        "attn.weight",
        "--forbid-skipped",
        "shape mismatch",
        "--tied",
        "norm.bias=norm.bias",
        "--range",
        "density=0:1",
    )
    assert code == 1
    for rule in ("[merged]", "[skipped]", "[tied]", "[range]"):
        assert rule in out, rule


@pytest.mark.parametrize("flag", ["--merged-is-base-floating", "--same-dtypes"])
def test_check_each_flag_is_a_rule(capsys, checkpoints, flag):
    """--merged-is-base-floating and --same-dtypes alone are policies (not "no rules")."""
    assert run(capsys, "merge", "a", "b", "c", "-o", "m", "-q")[0] == 0
    code, out, err = run(capsys, "lineage", "check", "m", flag)
    assert (code, err) == (0, "")
    assert out.startswith("terge: the lineage keeps the policy")


def test_check_tied_needs_two_names(capsys, checkpoints):
    assert run(capsys, "merge", "a", "b", "-o", "m", "-q")[0] == 0
    code, _, err = run(capsys, "lineage", "check", "m", "--tied", "a.weight=")
    assert code == 2 and "--tied 'a.weight=' must be NAME=NAME" in err


# --- training checkpoints and choosing ------------------------------------------------------------


def training_run(folder: Path, steps=(100, 200, 300, 400)) -> list[dict[str, torch.Tensor]]:
    """fairseq-style training checkpoints ckpt_<step>.pt with a val_loss in extra_state."""
    folder.mkdir()
    models = []
    for step in steps:
        model = {"w": torch.full((2, 2), float(step)), "b": torch.full((2,), float(step))}
        state = {
            "model": model,
            "optimizer": {"state": {}, "param_groups": []},
            "num_updates": step,
            "extra_state": {"val_loss": abs(250 - step) / 100},
        }
        torch.save(state, folder / f"ckpt_{step}.pt")
        models.append(model)
    return models


def test_merge_the_last_n(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    training_run(tmp_path / "run")
    code, _out, err = run(capsys, "merge", "run/ckpt_*.pt", "--last", "2", "-o", "avg")
    assert code == 0, err
    assert (
        "terge: chose 2 checkpoints, last 2 by num_updates: run/ckpt_400.pt, run/ckpt_300.pt" in err
    )
    assert torch.equal(load("avg")["w"], torch.full((2, 2), 350.0))
    lineage = terge.load_lineage("avg")
    assert lineage.chosen["rule"] == "last 2 by num_updates"
    assert lineage.chosen["from"] == "run/ckpt_*.pt"
    assert lineage.chosen["chosen"] == ["run/ckpt_400.pt", "run/ckpt_300.pt"]
    assert [c["value"] for c in lineage.chosen["candidates"]] == [100, 200, 300, 400]
    assert [m.path for m in lineage.models] == [
        "run/ckpt_400.pt::entry=model,prefix=",
        "run/ckpt_300.pt::entry=model,prefix=",
    ]
    code, out, err = run(capsys, "lineage", "show", "avg")
    assert "chosen: last 2 by num_updates, of 4 candidates in run/ckpt_*.pt" in out
    code, out, err = run(capsys, "lineage", "verify", "avg/lineage.json", "--merged", "avg")
    assert code == 0, out + err


def test_merge_the_best_n(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    training_run(tmp_path / "run")
    code, _out, err = run(
        capsys, "merge", "run", "--best", "2", "--metric", "val_loss", "-o", "soup", "-q"
    )
    assert code == 0, err
    assert err == ""
    assert torch.equal(load("soup")["w"], torch.full((2, 2), 250.0))  # steps 200 and 300
    assert terge.load_lineage("soup").chosen["rule"] == "best 2 by val_loss (min, from checkpoint)"
    code, _out, err = run(
        capsys,
        "merge",
        "run",
        "--best",
        "1",
        "--metric",
        "val_loss",
        "--mode",
        "max",
        "-o",
        "worst",
    )
    assert code == 0, err
    assert torch.equal(load("worst")["w"], torch.full((2, 2), 100.0))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--policy", "missing.toml"], "the policy 'missing.toml' not found"),
        (["--policy", "bad.toml"], "unknown key 'pinnned'"),
        ([], "no rules to check"),
        (["--range", "weight"], "must be KEY=LOW:HIGH"),
        (["--range", "densty=0:1"], "'densty' is neither 'weight' nor a setting"),
        (["--tied", "a.weight"], "must be NAME=NAME"),
        (["--require-merged", "re:("], "is not a valid regular expression"),
        (["--forbid-skipped", "odd"], "invalid choice: 'odd'"),
    ],
)
def test_check_bad_input_is_one_line_and_exit_2(capsys, checkpoints, tmp_path, argv, message):
    assert run(capsys, "merge", "a", "b", "-o", "m", "-q")[0] == 0
    (tmp_path / "bad.toml").write_text("pinnned = true\n")
    code, out, err = run(capsys, "lineage", "check", "m", *argv)
    assert code == 2 and out == ""
    assert err.startswith("terge: error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("action", ["show", "diff", "verify", "check"])
def test_every_lineage_action_writes_junit_and_json(capsys, checkpoints, action):
    import xml.etree.ElementTree as ET

    assert run(capsys, "merge", "a", "b", "c", "-o", "m", "-q")[0] == 0
    given = {
        "show": ["m"],
        "diff": ["m", "m"],
        "verify": ["m", "--merged", "m"],
        "check": ["m", "--pinned"],
    }[action]
    code, out, _ = run(capsys, "lineage", action, *given, "--format", "junit")
    assert code == (1 if action == "check" else 0)
    suite = ET.fromstring(out)[0]
    assert suite.get("name") == f"terge.lineage.{action}"
    names = [case.get("name") for case in suite]
    assert names == ["(lineage)", "attn.weight", "mlp.weight", "norm.bias", "steps"]
    code, out, _ = run(capsys, "lineage", action, *given, "--format", "json")
    assert isinstance(json.loads(out), dict)


def test_schema_prints_the_packaged_schema(capsys):
    code, out, _ = run(capsys, "lineage", "schema")
    assert code == 0
    assert json.loads(out) == terge.lineage.lineage_schema()


def test_show_plot_draws_the_contributions(capsys, checkpoints, tmp_path):
    image = pytest.importorskip("matplotlib.image", reason="the plot extra is not installed")
    assert run(capsys, "merge", "a", "b", "c", "-o", "m", "-q")[0] == 0
    code, out, _ = run(capsys, "lineage", "show", "m", "--plot", "p.png")
    assert code == 0 and out.startswith("m: written by")
    assert image.imread(tmp_path / "p.png").ndim == 3


def test_a_missing_plot_extra_is_one_line(capsys, checkpoints, monkeypatch):
    assert run(capsys, "merge", "a", "b", "c", "-o", "m", "-q")[0] == 0
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    code, _, err = run(capsys, "lineage", "show", "m", "--plot", "p.png")
    assert code == 2
    assert (
        err
        == "terge: error: drawing a picture needs matplotlib, an optional extra of terge: pip install 'terge[plot]'\n"
    )


def test_inspect_prints_a_table_json_and_a_heatmap(capsys, checkpoints, tmp_path):
    code, out, _ = run(capsys, "inspect", "a", "b", "c")
    assert code == 0
    assert out.splitlines()[0] == "models: 0: b, 1: c"
    assert "cos01" in out and "left out: 1 tensors\n  steps: not floating point\n" in out
    code, out, _ = run(
        capsys, "inspect", "b", "c", "--base", "a", "--density", "0.5", "--format", "json"
    )
    record = json.loads(out)
    direct = terge.inspect(checkpoints[1:], base=checkpoints[0], density=0.5).to_json()
    assert record["total"]["norms"] == pytest.approx(direct["total"]["norms"], rel=1e-12)
    assert record["total"]["sign_conflicts"] == direct["total"]["sign_conflicts"]
    assert record["total"]["ties_kept"] == direct["total"]["ties_kept"]
    assert record["models"] == ["b", "c"] and record["density"] == 0.5
    if pytest.importorskip("matplotlib.image", reason="the plot extra is not installed"):
        code, _, _ = run(
            capsys, "inspect", "a", "b", "c", "--plot", "h.png", "--metric", "conflicts"
        )
        assert code == 0 and (tmp_path / "h.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a", "nope"], "model 'nope' does not exist"),
        (["a", "b", "--base", "nope"], "base model 'nope' does not exist"),
        (["a", "b", "--density", "0"], "`density` must be a number in (0, 1]"),
        (["a", "b", "--base", "7"], "`base` is 7"),
    ],
)
def test_inspect_bad_input_is_exit_2(capsys, checkpoints, argv, message):
    code, _, err = run(capsys, "inspect", *argv)
    assert code == 2 and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--last", "0"], r"argument --last: must be a number of checkpoints >= 1, got '0'"),
        (["--metric", "val_loss"], r"--metric and --mode rank the checkpoints that --best N"),
        (["--last", "2", "--best", "2"], r"choose\(\) takes one of last=N and best=N"),
        (["--best", "2", "--metric", "bleu"], r"records no value of 'bleu'"),
        (["--best", "2", "--metric", "val_loss", "--weights", "1,2,3"], r"--weights gives 3"),
    ],
)
def test_choosing_errors(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    training_run(tmp_path / "run")
    code, _out, err = run(capsys, "merge", "run", "-o", "x", *argv)
    assert code == 2
    assert regex.search(message, err), err


def test_entry_syntax_on_the_command_line(tmp_path, capsys, monkeypatch):
    """timm-style checkpoints hold two state dicts: PATH::ENTRY picks one; without it, the
    error lists them."""
    monkeypatch.chdir(tmp_path)
    for i in (1, 2):
        model = {"w": torch.full((2,), float(i))}
        torch.save(
            {"state_dict": model, "state_dict_ema": {"w": model["w"] * 10}, "epoch": i},
            tmp_path / f"e{i}.pth",
        )
    code, _out, err = run(capsys, "merge", "e1.pth", "e2.pth", "-o", "x")
    assert code == 2
    assert "e1.pth holds 2 model state dicts, 'state_dict' (" in err
    assert "or the path 'e1.pth::state_dict' (command line, recipes)" in err
    code, _out, err = run(
        capsys, "merge", "e1.pth::state_dict_ema", "e2.pth::entry=state_dict_ema", "-o", "ema"
    )
    assert code == 0, err
    assert torch.equal(load("ema")["w"], torch.full((2,), 15.0))
    code, _out, err = run(capsys, "merge", "nope.pth::state_dict", "e2.pth", "-o", "y")
    assert code == 2
    assert "model 'nope.pth::state_dict' does not exist" in err


def test_the_lineage_file_may_not_overwrite_a_training_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    training_run(tmp_path / "run", steps=(1, 2))
    code, _out, err = run(
        capsys,
        "merge",
        "run/ckpt_1.pt::model",
        "run/ckpt_2.pt",
        "-o",
        "x",
        "--lineage",
        "run/ckpt_1.pt",
        "--overwrite",
    )
    assert code == 2
    assert "the lineage file (--lineage) run/ckpt_1.pt is the input run/ckpt_1.pt" in err


def test_a_world_size_without_the_rest_of_torchrun_s_environment_merges_alone(
    tmp_path, monkeypatch
):
    for i in range(2):
        save({"w": torch.full((4,), float(i))}, tmp_path / f"m{i}")
    monkeypatch.setenv("WORLD_SIZE", "2")  # set by some other launcher: no process group to join
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    argv = ["merge", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(tmp_path / "out")]
    assert cli.main([*argv, "-q"]) == 0
    assert torch.equal(load(tmp_path / "out")["w"], torch.full((4,), 0.5))
    assert not torch.distributed.is_initialized()
