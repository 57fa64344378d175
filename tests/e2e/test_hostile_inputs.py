"""Files terge did not write: every bad one gets terge's own error naming the file and the field,
the command prints one line and exits 2, nothing hangs, and messages say what is really wrong
(issue #13, cases 7 and 14)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import terge
from terge import CheckpointError, LineageError, cli, load_lineage
from terge.audit import summary
from terge.errors import PatternTypeError, RecipeError
from terge.io import open_checkpoint, save
from terge.io.parsing import MAX_DEPTH

DEEP = 100_000
"""Deep enough to overflow any recursive parser's stack."""


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def finishes(call, seconds: float = 20.0):
    """``call()``'s error (or ``None``), failing the test if it does not return in time."""
    outcome: list[BaseException | None] = []

    def target():
        try:
            call()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"did not return within {seconds} s"
    return outcome[0]


@pytest.fixture
def lineage_file(tmp_path) -> Path:
    """A real lineage file of a two-model merge."""
    generator = torch.Generator().manual_seed(0)
    models = [{"a.weight": torch.randn(2, 2, generator=generator)} for _ in range(2)]
    for i, model in enumerate(models):
        save(model, tmp_path / f"m{i}")
    terge.merge([tmp_path / "m0", tmp_path / "m1"], out=tmp_path / "out", digests=True)
    return tmp_path / "out" / "lineage.json"


# --- case 7: deep nesting, wrong types, huge numbers, endless files ----------------------------


@pytest.mark.parametrize("depth", [DEEP, MAX_DEPTH + 5])
def test_a_deeply_nested_safetensors_header(tmp_path, depth):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(safetensors_bytes(f'{{"a": {nested(depth)}}}'.encode()))
    with pytest.raises(
        CheckpointError, match=r"deep\.safetensors: the safetensors header nests"
    ) as caught:
        open_checkpoint(path)
    assert caught.value.path == path


def test_a_deeply_nested_index(tmp_path):
    save({"a": torch.ones(2)}, tmp_path / "m", max_shard_size=1)
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        f'{{"weight_map": {nested(DEEP)}}}'
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: the index nests"):
        open_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("depth", [DEEP, MAX_DEPTH + 5])
def test_a_deeply_nested_lineage(tmp_path, depth):
    path = tmp_path / "deep.json"
    path.write_text(f'{{"schema": 1, "merged": {{}}, "extra": {nested(depth)}}}')
    with pytest.raises(
        LineageError, match=r"the lineage file .*deep\.json nests arrays or objects"
    ):
        load_lineage(path)


@pytest.mark.parametrize("depth", [DEEP, MAX_DEPTH + 5])
def test_a_deeply_nested_recipe(capsys, tmp_path, depth):
    path = tmp_path / "deep.toml"
    path.write_text(f"models = {nested(depth)}\n")
    with pytest.raises(RecipeError, match=r"recipe '.*deep\.toml' nests arrays or "):
        terge.cli.recipe.load_recipe(path)
    code, out, err = run(capsys, "merge", "--recipe", path)
    assert (code, out, err.count("\n")) == (2, "", 1)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, r"its dtype is \['F32'\]"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, r"its shape is \[True\]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, r"its data_offsets is \[0\]"),
        ({"dtype": "F32", "shape": [1], "data_offsets": "04"}, r"its data_offsets is '04'"),
        ({"dtype": "F32", "shape": [1]}, r"it has no 'data_offsets'"),
    ],
)
def test_a_header_field_of_the_wrong_type_is_named(tmp_path, entry, field):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes({"w": entry}, b"\0" * 4))
    with pytest.raises(
        CheckpointError, match=rf"the header entry of tensor 'w' is malformed: {field}"
    ):
        open_checkpoint(path)


def test_a_400_digit_weight_in_a_lineage(capsys, lineage_file):
    data = json.loads(lineage_file.read_text())
    data["merged"]["a.weight"]["contributions"][0][1] = int("9" * 400)
    lineage_file.write_text(json.dumps(data))
    with pytest.raises(
        LineageError, match=r'merged\["a.weight"\]\.contributions\[0\]\[1\] must be a finite number'
    ):
        load_lineage(lineage_file)
    for action in ("show", "verify"):
        argv = ["lineage", action, lineage_file] + (
            ["--merged", lineage_file.parent] * (action == "verify")
        )
        code, out, err = run(capsys, *argv)
        assert (code, out, err.count("\n")) == (2, "", 1)
        assert "must be a finite number" in err


def test_lineage_show_of_dev_urandom_returns_at_once():
    """In a subprocess: before the fix it read forever."""
    command = [sys.executable, "-m", "terge", "lineage", "show", "/dev/urandom"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        "terge: error: cannot read the lineage file /dev/urandom: it is a character device, not "
        "a regular file; give a lineage .json file.\n"
    )


def test_a_pipe_is_not_read_as_a_lineage(tmp_path):
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)  # no writer: opening it would block forever
    error = finishes(lambda: load_lineage(pipe))
    assert isinstance(error, LineageError)
    assert "it is a pipe, not a regular file" in str(error)


def test_a_pipe_is_not_read_as_a_checkpoint(tmp_path):
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)
    error = finishes(lambda: open_checkpoint(pipe))
    assert isinstance(error, CheckpointError)
    assert "is not a regular file" in str(error)


@pytest.mark.parametrize("name", ["pipe.bin", "pipe.pt", "pipe.ckpt"])
def test_a_pipe_is_not_read_as_a_torch_file(tmp_path, name):
    """A torch file that is a pipe is refused before it is opened, like a safetensors one:
    torch.load (and the zip check before it) would block forever on a pipe with no writer."""
    pipe = tmp_path / name
    os.mkfifo(pipe)
    error = finishes(lambda: open_checkpoint(pipe))
    assert isinstance(error, CheckpointError)
    assert str(error) == f"{pipe} is not a regular file; give a .bin, .pt, .pth or .ckpt file."


def test_a_device_is_not_read_as_a_torch_file(tmp_path):
    """A link to /dev/zero named like a torch file is refused, not read forever."""
    path = tmp_path / "zero.pt"
    path.symlink_to("/dev/zero")
    error = finishes(lambda: open_checkpoint(path))
    assert isinstance(error, CheckpointError)
    assert "zero.pt is not a regular file; give a .bin, .pt, .pth or .ckpt file." in str(error)


def test_a_pipe_is_not_read_as_an_index(tmp_path):
    """An *.index.json that is a pipe is refused before it is opened: opening a pipe with no
    writer would block forever."""
    pipe = tmp_path / "model.safetensors.index.json"
    os.mkfifo(pipe)
    error = finishes(lambda: open_checkpoint(pipe))
    assert isinstance(error, CheckpointError)
    assert f"the index {pipe} is a pipe, not a regular file; give a *.index.json file." in str(
        error
    )


def test_a_huge_recipe_is_refused_not_read_forever(monkeypatch, tmp_path):
    monkeypatch.setattr(terge.cli.recipe, "MAX_RECIPE_BYTES", 100)
    path = tmp_path / "big.toml"
    path.write_text("# " + "x" * 200 + "\n")
    with pytest.raises(RecipeError, match=r"recipe '.*big\.toml' is larger than 100 bytes"):
        terge.cli.recipe.load_recipe(path)


def test_a_recipe_from_an_endless_pipe_is_read_only_up_to_the_limit(monkeypatch, tmp_path):
    """Recipes may come from a pipe: terge reads at most the limit (and one byte) of it and
    closes it, so a writer that never stops is cut off (its writes fail) rather than read
    whole. The writer here stops by itself after 32 MiB, so that reading it all cannot hang."""
    monkeypatch.setattr(terge.cli.recipe, "MAX_RECIPE_BYTES", 100)
    pipe = tmp_path / "recipe.toml"
    os.mkfifo(pipe)
    total, chunk = 32 << 20, b"#" * (64 << 10)
    written: list[int] = []

    def writer():
        sent = 0
        try:
            with open(pipe, "wb") as file:
                while sent < total:
                    file.write(chunk)
                    sent += len(chunk)
        except BrokenPipeError:
            pass
        written.append(sent)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    error = finishes(lambda: terge.cli.recipe.load_recipe(pipe))
    thread.join(20)
    assert isinstance(error, RecipeError) and "is larger than 100 bytes" in str(error), error
    assert written and written[0] < total, "the whole pipe was read"


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_numbers_in_a_header_are_named(tmp_path, text):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(f'{{"w": {{"dtype": "F32", "shape": [{text}]}}}}'.encode()))
    with pytest.raises(CheckpointError, match=r"the safetensors header: w\.shape\[0\] is "):
        open_checkpoint(path)


def test_a_long_non_finite_number_is_shown_cut_short(tmp_path):
    """A 400-digit float that overflows to inf is shown by its first 21 characters and "...",
    so one hostile number cannot make the error message thousands of characters long."""
    path = tmp_path / "x.safetensors"
    digits = "1" + "0" * 400 + ".0"
    path.write_bytes(
        safetensors_bytes(f'{{"w": {{"dtype": "F32", "shape": [{digits}]}}}}'.encode())
    )
    with pytest.raises(
        CheckpointError, match=r"w\.shape\[0\] is 100000000000000000000\.\.\., which is not "
    ) as caught:
        open_checkpoint(path)
    assert digits not in str(caught.value)


def test_the_first_non_finite_number_is_the_one_named(tmp_path):
    """With several non-finite numbers, the error names the first in file order (lists and
    objects alike), not whichever a traversal happens to reach first."""
    path = tmp_path / "x.safetensors"
    header = '{"w": {"shape": [1, NaN, Infinity]}, "v": {"shape": [-Infinity]}}'
    path.write_bytes(safetensors_bytes(header.encode()))
    with pytest.raises(
        CheckpointError, match=r"the safetensors header: w\.shape\[1\] is NaN, which is not a fin"
    ):
        open_checkpoint(path)


def test_a_non_finite_number_under_a_dotted_name_is_quoted(tmp_path):
    """A key that is not an identifier (a tensor name with dots) is shown as ["a.weight"], so
    the field named is not mistaken for a nested path."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(b'{"a.weight": {"dtype": "F32", "shape": [NaN]}}'))
    with pytest.raises(
        CheckpointError, match=r'the safetensors header: \["a\.weight"\]\.shape\[0\] is NaN'
    ):
        open_checkpoint(path)


@pytest.mark.parametrize(("depth", "refused"), [(MAX_DEPTH, False), (MAX_DEPTH + 1, True)])
def test_nesting_is_refused_just_past_max_depth(tmp_path, depth, refused):
    """Exactly MAX_DEPTH nested objects and arrays are read (and then refused for what they
    hold); one more is refused as too deep. Pins the bound, not just far-off cases."""
    path = tmp_path / "x.safetensors"
    inner = "[" * (depth - 1) + "0" + "]" * (depth - 1)  # the header object is one level
    path.write_bytes(safetensors_bytes(f'{{"w": {inner}}}'.encode()))
    wanted = (
        rf"the safetensors header nests arrays or objects more than {MAX_DEPTH} deep"
        if refused
        else r"the header entry of tensor 'w' is malformed: its value is \[\[\["
    )
    with pytest.raises(CheckpointError, match=wanted):
        open_checkpoint(path)


# --- fuzzing: only terge's errors, and no hang --------------------------------------------------

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def mutate(raw: bytes, edits: list[tuple[int, int]]) -> bytes:
    """``raw`` with each ``(position, byte)`` edit applied (positions wrap around)."""
    data = bytearray(raw)
    for position, byte in edits:
        data[position % len(data)] = byte
    return bytes(data)


def replace_somewhere(value, path: list[int], new):
    """``value`` (parsed JSON) with the item that ``path`` leads to replaced by ``new``."""
    if not path or not isinstance(value, (dict, list)) or not value:
        return new
    keys = list(value) if isinstance(value, dict) else list(range(len(value)))
    key = keys[path[0] % len(keys)]
    value[key] = replace_somewhere(value[key], path[1:], new)
    return value


def good_safetensors(tmp_path: Path) -> bytes:
    path = tmp_path / "good.safetensors"
    save_file(
        {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}, path
    )
    return path.read_bytes()


def opens_or_checkpoint_error(path: Path) -> None:
    """Open and read every tensor; any exception but a CheckpointError naming a file fails."""
    failure = None
    try:
        with open_checkpoint(path) as reader:
            for name in reader.names():
                reader.get(name)
    except CheckpointError as error:
        failure = error
    assert failure is None or failure.path is not None


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzz_random_bytes_as_safetensors(tmp_path, raw):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    opens_or_checkpoint_error(path)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6)
)
def test_fuzz_mutated_safetensors_files(tmp_path, edits):
    good = good_safetensors(tmp_path)
    path = tmp_path / "fuzz.safetensors"
    header_end = 8 + struct.unpack("<Q", good[:8])[0]
    path.write_bytes(mutate(good, [(p % header_end, b) for p, b in edits]))
    opens_or_checkpoint_error(path)


@FUZZ
@given(path_in=st.lists(st.integers(0, 5), max_size=3), value=json_values)
def test_fuzz_header_values(tmp_path, path_in, value):
    good = good_safetensors(tmp_path)
    length = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + length])
    header = replace_somewhere(header, path_in, value)
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(safetensors_bytes(json.dumps(header).encode(), good[8 + length :]))
    opens_or_checkpoint_error(path)


def loads_or_lineage_error(path: Path) -> None:
    """Load (and show) the file; any exception but a LineageError naming it fails."""
    try:
        lineage = load_lineage(path)
    except LineageError as error:
        failure = error
    else:
        summary(lineage)  # what loads can be shown
        failure = None
    assert failure is None or failure.path == path


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzz_random_bytes_as_lineage(tmp_path, raw):
    path = tmp_path / "fuzz.json"
    path.write_bytes(raw)
    loads_or_lineage_error(path)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), min_size=1, max_size=6)
)
def test_fuzz_mutated_lineage_files(lineage_file, edits):
    path = lineage_file.parent / "fuzz.json"
    path.write_bytes(mutate(lineage_file.read_bytes(), edits))
    loads_or_lineage_error(path)


@FUZZ
@given(path_in=st.lists(st.integers(0, 20), max_size=5), value=json_values)
def test_fuzz_lineage_values(lineage_file, path_in, value):
    data = replace_somewhere(json.loads(lineage_file.read_text()), path_in, value)
    path = lineage_file.parent / "fuzz.json"
    path.write_text(json.dumps(data))
    loads_or_lineage_error(path)


# --- case 14: messages that say what is really wrong --------------------------------------------


def test_a_file_name_that_is_not_utf8(tmp_path):
    path = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.safetensors"))
    save_file({"a": torch.ones(2)}, tmp_path / "plain.safetensors")
    os.replace(tmp_path / "plain.safetensors", path)
    with pytest.raises(CheckpointError, match=r"its name is not valid UTF-8") as caught:
        open_checkpoint(path)
    assert "truncated" not in str(caught.value)
    assert caught.value.path == path


def test_a_header_that_is_not_utf8(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_bytes(b'{"caf\xe9": 1}'))
    with pytest.raises(
        CheckpointError,
        match=r"x\.safetensors: the safetensors header is not UTF-8 text \(byte 0xe9 at offset 5 ",
    ) as caught:
        open_checkpoint(path)
    assert "truncated" not in str(caught.value)


@pytest.mark.parametrize("pattern", [b"x", [b"x"]])
def test_a_bytes_pattern_is_called_bytes(linears, pattern):
    with pytest.raises(
        PatternTypeError, match=r"`included` got a pattern of type bytes \(b'x'\).*pass 'x'"
    ):
        terge.merge(linears, included=pattern)


def test_a_pattern_compiled_from_bytes(linears):
    import re

    with pytest.raises(PatternTypeError, match=r"compiled from bytes.*pass re\.compile\('x'\)"):
        terge.merge(linears, excluded=re.compile(b"x"))


def test_a_recipe_that_is_not_utf8_names_the_file(capsys, tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b'models = ["caf\xe9"]\n')
    code, _, err = run(capsys, "merge", "--recipe", path)
    assert code == 2
    assert err == (
        f"terge: error: recipe {str(path)!r} is not UTF-8 text (byte 0xe9 at offset 14 cannot "
        "start or continue a UTF-8 character).\n"
    )


def test_merge_errors_name_options_not_keywords(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save({"w": torch.ones(2)}, "a")
    save({"w": torch.zeros(2)}, "b")
    code, _, err = run(capsys, "merge", "a", "b", "-o", "m", "--weights=1,-1")
    assert code == 2
    assert "pass --no-normalize to use the weights as given" in err
    assert "via the --include or --exclude arguments" in err
    assert "`" not in err and "normalize=False" not in err


def test_keyword_to_option_mapping():
    from terge.cli.commands import cli_message

    assert cli_message("x exists; pass overwrite=True to replace it") == (
        "x exists; pass --overwrite to replace it"
    )
    assert cli_message("`out_dtype` and `max_shard_size`, `models`, `inplace`") == (
        "--out-dtype and --max-shard-size, MODEL, `inplace`"
    )


def test_a_bad_checkpoint_under_terge_merge_is_one_line_and_exit_2(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(
        safetensors_bytes({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}})
    )
    save_file({"w": torch.ones(1)}, tmp_path / "good.safetensors")
    code, out, err = run(capsys, "merge", tmp_path / "good.safetensors", bad, "-o", tmp_path / "m")
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert f"terge: error: {bad}: the header entry of tensor 'w' is malformed: its dtype is" in err
