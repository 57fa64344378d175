import re

import pytest
import regex

from terge.errors import PatternTypeError
from terge.patterns import PatternMap, PatternSet, compile_pattern, pattern_repr, selected


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("bias", "bias", True),
        ("bias", "0.bias", False),  # a str matches the whole name exactly
        ("b.as", "bias", False),  # ... and is not a regex
        (re.compile(r"bias"), "0.bias", True),  # compiled patterns use search
        (re.compile(r"^bias"), "0.bias", False),
        (regex.compile(r"layers\.\d+\."), "model.layers.12.mlp", True),
        (regex.compile(r"\p{L}+\.weight$"), "emb.weight", True),  # regex-only syntax
    ],
)
def test_pattern_rules_match_terge_0_1_1(pattern, name, expected):
    assert compile_pattern(pattern, "included")(name) is expected


def test_pattern_set_mixes_strings_and_patterns():
    patterns = PatternSet(["a.weight", re.compile(r"bias$")], "included")
    assert patterns("a.weight")
    assert patterns("b.bias")
    assert not patterns("b.weight")


def test_pattern_set_none_means_no_filter():
    assert not PatternSet(None, "excluded").given
    assert selected("x", PatternSet(None, "included"), PatternSet(None, "excluded"))


def test_excluded_applies_after_included():
    included = PatternSet(re.compile("weight"), "included")
    excluded = PatternSet("a.weight", "excluded")
    assert selected("b.weight", included, excluded)
    assert not selected("a.weight", included, excluded)
    assert not selected("a.bias", included, excluded)


def test_pattern_map_is_first_match_wins_in_insertion_order():
    mapping = PatternMap({re.compile("weight"): 1, "a.weight": 2, re.compile(".*"): 3}, "weights")
    assert mapping.match("a.weight") == (re.compile("weight"), 1)
    assert mapping.match("a.bias")[1] == 3
    assert PatternMap({"x": 1}, "weights").match("y") is None
    assert list(mapping) == [re.compile("weight"), "a.weight", re.compile(".*")]
    assert mapping["a.weight"] == 2
    assert len(mapping) == 3


@pytest.mark.parametrize("bad", [3, 1.5, b"bias", None])
def test_wrong_pattern_types_are_refused_with_the_argument_named(bad):
    with pytest.raises(PatternTypeError, match=r"`excluded` got a pattern of type .*re\.compile"):
        PatternSet([bad], "excluded")


def test_a_mapping_is_not_a_pattern_list():
    with pytest.raises(PatternTypeError, match=r"`included` must be a str, a compiled pattern"):
        PatternSet({"a": 1}, "included")


def test_pattern_type_error_is_a_type_error():
    with pytest.raises(TypeError):
        compile_pattern(1, "included")


def test_pattern_repr():
    assert pattern_repr(re.compile("a.b")) == "re.compile('a.b')"
    assert pattern_repr("a.b") == "'a.b'"


def _bytes_message(argument: str, what: str, shown: str, fix: str) -> str:
    return (
        f"`{argument}` got {what} ({shown}); tensor names are str, so a pattern must be a str or "
        f"a re.compile(...) of a str: {fix}."
    )


@pytest.mark.parametrize(
    ("patterns", "what", "fix"),
    [
        (b"bias", "a pattern of type bytes", "pass 'bias' instead"),  # bytes itself: no list
        ([bytearray(b"bias")], "a pattern of type bytes", "pass 'bias' instead"),
        ([memoryview(b"bias")], "a pattern of type bytes", "pass 'bias' instead"),
        ([b"\xff"], "a pattern of type bytes", "decode it to str first"),
        (re.compile(b"bias"), "a pattern compiled from bytes", "pass re.compile('bias') instead"),
        (
            [regex.compile(b"bias")],
            "a pattern compiled from bytes",
            "pass re.compile('bias') instead",
        ),
    ],
)
def test_bytes_patterns_are_refused_saying_how_to_fix_them(patterns, what, fix):
    """Bytes in any form (and patterns compiled from bytes, which would only fail when matched)
    are refused when the set is made, with the str to pass instead."""
    shown = patterns if isinstance(patterns, (bytes, re.Pattern)) else patterns[0]
    message = _bytes_message("excluded", what, repr(shown), fix)
    with pytest.raises(PatternTypeError, match=regex.escape(message)):
        PatternSet(patterns, "excluded")


def test_an_empty_list_is_given_and_matches_nothing():
    """As in terge 0.1.1 (which tested `is not None`): `included=[]` merges nothing and
    `excluded=[]` excludes nothing; only None means 'no filter'."""
    assert PatternSet([], "included").given
    assert not selected("w", PatternSet([], "included"), PatternSet(None, "excluded"))
    assert selected("w", PatternSet(None, "included"), PatternSet([], "excluded"))


def test_pattern_map_looks_keys_up_by_equality():
    """A map is a Mapping: a key equal to one given (not the same object) finds its value."""
    mapping = PatternMap({"a.weight": 2, re.compile("bias"): 3}, "weights")
    key = "".join(["a.", "weight"])  # built at run time: equal, not identical
    assert mapping[key] == 2 and key in mapping and mapping.get(key) == 2
    assert mapping.get("b.weight") is None
    with pytest.raises(KeyError):
        mapping["b.weight"]


@pytest.mark.parametrize(("patterns", "name"), [(5, "int"), ({"a": 1}, "dict"), (1.5, "float")])
def test_a_set_of_the_wrong_type_names_its_type(patterns, name):
    message = f"`included` must be a str, a compiled pattern or a list of them; got {name}."
    with pytest.raises(PatternTypeError, match=regex.escape(message)):
        PatternSet(patterns, "included")


def test_pattern_repr_shows_regex_patterns_as_compiled_patterns():
    """Both kinds of compiled pattern read the same in messages and lineage files."""
    assert pattern_repr(regex.compile(r"layers\.0\.")) == "re.compile('layers\\\\.0\\\\.')"
