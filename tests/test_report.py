"""Audit results as text, JSON and JUnit: every tensor a test case, markup escaped."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import torch

import terge
from terge.audit import diff_lineages
from terge.lineage import LineageEntry
from terge.policy import Violation
from terge.report import (
    RECORD_CASE,
    Case,
    junit,
    render_check,
    render_diff,
    render_show,
    render_verify,
    xml_text,
)

AWKWARD = "a<b>&\"c'\x00\x1b.weight"
"""A tensor name with markup, quotes and characters XML 1.0 cannot hold."""


def _lineage():
    return terge.Lineage(
        {
            AWKWARD: LineageEntry("arithmetic", [(0, 0.5), (1, 0.5)]),
            "layers.0.weight": LineageEntry("ties", [(1, 1.0)], {"density": 0.2}),
        },
        {"steps": "not floating point"},
    )


def _cases(text: str) -> dict[str, ET.Element]:
    root = ET.fromstring(text)
    assert root.tag == "testsuites"
    (suite,) = root
    assert int(suite.get("tests")) == len(suite)
    return {case.get("name"): case for case in suite}


def test_junit_escapes_markup_and_characters_xml_cannot_hold():
    text = junit("s", [Case(AWKWARD, failures=['<x> & "y"\x07']), Case("ok", output="\x01")])
    cases = _cases(text)
    assert set(cases) == {"a<b>&\"c'\\x00\\x1b.weight", "ok"}
    (failure,) = cases["a<b>&\"c'\\x00\\x1b.weight"]
    assert failure.tag == "failure" and failure.text == '<x> & "y"\\x07'
    assert cases["ok"].find("system-out").text == "\\x01"
    assert xml_text("é\ud800") == "é\\ud800"


def test_show_in_each_format():
    lineage = _lineage()
    assert render_show(lineage, "f", "text").startswith("f: written by")
    record = json.loads(render_show(lineage, "f", "json"))
    assert record["merged"] == 2 and record["by_method"] == {"arithmetic": 1, "ties": 1}
    assert record["by_reason"] == {"not floating point": 1}
    cases = _cases(render_show(lineage, "f", "junit"))
    assert list(cases) == [RECORD_CASE, xml_text(AWKWARD), "layers.0.weight", "steps"]
    assert (
        cases["steps"].find("skipped").get("message") == "left as in the base: not floating point"
    )
    assert "ties (density=0.2)" in cases["layers.0.weight"].find("system-out").text


def test_diff_in_each_format():
    old, new = _lineage(), _lineage()
    new["layers.0.weight"] = LineageEntry("ties", [(1, 1.0)], {"density": 0.3})
    new.dtype = torch.float32
    found = diff_lineages(old, new)
    text = render_diff(found, "old.json", "new.json", new, "text")
    assert text.splitlines()[-1] == "terge: old.json and new.json differ (2 changes)"
    record = json.loads(render_diff(found, "old.json", "new.json", new, "json"))
    assert record["differ"] is True
    assert record["record"] == ["~ dtype: None -> float32"]
    assert record["tensors"] == {
        "layers.0.weight": ["~ layers.0.weight: setting density 0.2 -> 0.3"]
    }
    cases = _cases(render_diff(found, "old.json", "new.json", new, "junit"))
    assert cases[RECORD_CASE].find("failure").text == "~ dtype: None -> float32"
    assert cases["layers.0.weight"].find("failure") is not None
    assert cases[xml_text(AWKWARD)].find("failure") is None
    same = render_diff(diff_lineages(old, old), "a", "b", old, "text")
    assert same == "terge: the lineages agree (2 tensors merged, 1 left alone)\n"


def test_verify_and_check_in_each_format():
    lineage = _lineage()
    problems = [("layers.0.weight", "the checkpoint's tensor differs from the recomputed one")]
    assert render_verify(problems, lineage, "m", "text").endswith(
        "terge: 1 of 2 merged tensors do not match\n"
    )
    assert json.loads(render_verify([], lineage, "m", "json"))["ok"] is True
    cases = _cases(render_verify(problems, lineage, "m", "junit"))
    assert cases["layers.0.weight"].find("failure").get("message").startswith("the checkpoint's")
    violations = [
        Violation("pinned", None, "models[0] is not pinned"),
        Violation("range", "layers.0.weight", "the setting density is 0.2, outside [0.3, 1.0]"),
        Violation("base", "gone.weight", "a floating tensor of the base, but not in the lineage"),
    ]
    text = render_check(violations, lineage, "text")
    assert "layers.0.weight: the setting density is 0.2, outside [0.3, 1.0] [range]" in text
    assert text.splitlines()[-1] == "terge: the lineage breaks the policy (3 violations)"
    record = json.loads(render_check(violations, lineage, "json"))
    assert record["ok"] is False and record["violations"][0]["rule"] == "pinned"
    cases = _cases(render_check(violations, lineage, "junit"))
    assert cases[RECORD_CASE].find("failure").text == "[pinned] models[0] is not pinned"
    assert "gone.weight" in cases  # a name only a violation knows is a case too
    assert cases["steps"].find("skipped") is not None
