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
