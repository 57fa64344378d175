"""Policy files and options as `terge lineage check` reads them."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import regex

from terge.cli.policyfile import bounds, load_policy, make_policy, parse_policy, parse_range
from terge.errors import PolicyError

pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")


def test_a_full_policy_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        'require_merged = ["re:\\\\.mlp\\\\.", "layers:0-1", "lm_head.weight"]\n'
        'forbid_skipped = ["shape mismatch"]\n'
        "merged_is_base_floating = true\nsame_dtypes = false\n"
        'tied = [["lm_head.weight", "model.embed_tokens.weight"]]\npinned = true\n'
        "[ranges]\nweight = [0, 1]\ndensity = [0.2, 0.8]\n"
    )
    rules = load_policy(path)
    mlp, blocks, head = rules["require_merged"]
    assert isinstance(mlp, regex.Pattern) and mlp.pattern == "\\.mlp\\."
    assert blocks.search("model.layers.1.x") and not blocks.search("model.layers.2.x")
    assert head == "lm_head.weight"
    assert rules["tied"] == (("lm_head.weight", "model.embed_tokens.weight"),)
    assert rules["ranges"] == {"weight": (0.0, 1.0), "density": (0.2, 0.8)}
    policy = make_policy(rules)
    assert policy.pinned and not policy.same_dtypes and not policy.empty


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"pinnned": True}, "unknown key 'pinnned'; a policy holds require_merged"),
        ({"pinned": "yes"}, "pinned must be true or false"),
        ({"require_merged": "mlp"}, "require_merged must be a list of strings"),
        ({"require_merged": ["re:"]}, "'re:' needs a regular expression"),
        ({"tied": [["a"]]}, "tied must be a list of name pairs"),
        ({"ranges": [1, 2]}, "ranges must be a table"),
        ({"ranges": {"weight": [2, 1]}}, r"ranges.weight must be \[low, high\]"),
        ({"ranges": {"weight": [0, float("nan")]}}, r"ranges.weight must be \[low, high\]"),
    ],
)
def test_bad_policies_name_the_key(data, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(data, "the policy 'p.toml'")


def test_bad_files(tmp_path):
    (tmp_path / "p.toml").write_text("pinned = \n")
    with pytest.raises(PolicyError, match="is not valid TOML"):
        load_policy(tmp_path / "p.toml")
    with pytest.raises(PolicyError, match="is a folder"):
        load_policy(tmp_path)


def test_ranges_on_the_command_line():
    assert parse_range("density=0.2:0.8") == ("density", (0.2, 0.8))
    assert parse_range(" weight = -1:1") == ("weight", (-1.0, 1.0))
    for text in ("density", "density=0.2", "=0:1", "density=a:b"):  # not KEY=LOW:HIGH
        with pytest.raises(PolicyError, match=r"must be KEY=LOW:HIGH, e\.g\. --range weight=0:1"):
            parse_range(text)
    for text in ("density=1:0", "density=0:inf", "density=nan:1"):  # the bounds themselves
        with pytest.raises(PolicyError, match=r"must be \[low, high\], two finite numbers"):
            parse_range(text)
    assert bounds([1, 1], "x") == (1.0, 1.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tied": [["a", 1]]}, "tied must be a list of name pairs"),
        ({"tied": "a=b"}, "tied must be a list of name pairs"),
        ({"tied": 1}, "tied must be a list of name pairs"),
        (
            {"require_merged": ["mlp", 1]},
            "require_merged must be a list of strings; got ['mlp', 1]",
        ),
        ({"forbid_skipped": "tied"}, "forbid_skipped must be a list of strings; got 'tied'"),
        ({"ranges": {"weight": [0, 1, 2]}}, "ranges.weight must be [low, high]"),
        ({"ranges": {"weight": [False, 1]}}, "ranges.weight must be [low, high]"),
    ],
)
def test_each_malformed_rule_is_refused_by_its_check(data, message):
    """Names that are no strings, a tied value that is no list, a forbid_skipped string (not a
    list of reasons), three bounds and a bool bound: each refused naming its key."""
    with pytest.raises(PolicyError, match=regex.escape(message)):
        parse_policy(data, "the policy 'p.toml'")


def test_files_that_cannot_be_read_as_a_policy_say_why(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(b"pinned = true # caf\xe9\n")
    with pytest.raises(PolicyError, match=r"'.*latin1\.toml': the policy .* is not UTF-8 text"):
        load_policy(tmp_path / "latin1.toml")
    (tmp_path / "deep.toml").write_text("tied = " + "[" * 70 + "]" * 70 + "\n")
    with pytest.raises(PolicyError, match="nests arrays or objects more than 64 deep"):
        load_policy(tmp_path / "deep.toml")
    (tmp_path / "file").write_text("")
    with pytest.raises(PolicyError, match=r"cannot read the policy '.*p\.toml': Not a directory"):
        load_policy(tmp_path / "file" / "p.toml")
    with pytest.raises(PolicyError, match=r"the policy '.*missing\.toml' not found\.$"):
        load_policy(tmp_path / "missing.toml")


def test_a_policy_is_read_from_a_pipe(tmp_path):
    """--policy <(...) works: a pipe is read (up to the cap), not refused as no regular file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("pinned = true\n"))
    writer.start()
    try:
        assert load_policy(fifo) == {"pinned": True}
    finally:  # a refused pipe is never opened: open it here so the writer can finish
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join()
        os.close(reader)


def test_each_flag_keeps_its_value_and_ranges_are_floats():
    rules = parse_policy({"same_dtypes": False, "pinned": True, "ranges": {"weight": [0, 2]}}, "p")
    assert rules == {"same_dtypes": False, "pinned": True, "ranges": {"weight": (0.0, 2.0)}}
    assert all(type(b) is float for b in rules["ranges"]["weight"])


def test_a_bound_too_large_for_a_float_or_a_file_nested_past_the_parser_is_a_policy_error(
    tmp_path,
):
    """Both were tracebacks (OverflowError, RecursionError) instead of an error naming the file."""
    (tmp_path / "big.toml").write_text("[ranges]\nweight = [0, 1" + "0" * 400 + "]\n")
    with pytest.raises(PolicyError, match=r"ranges\.weight must be \[low, high\], two finite"):
        load_policy(tmp_path / "big.toml")
    (tmp_path / "deep.toml").write_text("tied = " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(PolicyError, match=r"'.*deep\.toml' nests arrays or tables too deeply"):
        load_policy(tmp_path / "deep.toml")
