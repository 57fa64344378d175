"""Audit results as text, JSON and JUnit: every tensor a test case, markup escaped."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import torch

import terge
from terge.audit import LineageDiff, diff_lineages
from terge.lineage import SEPARATE, LineageEntry, ModelRecord
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
    record = json.loads(render_verify(problems, lineage, "m", "json"))
    assert (record["ok"], record["tensors"], record["merged"]) == (False, 2, "m")  # all checked
    assert record["problems"] == [{"name": "layers.0.weight", "problem": problems[0][1]}]
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


def test_junit_counts_each_case_once_and_a_failure_s_message_is_its_first_line():
    """A case with failures counts as failed, not also skipped, and writes no <skipped>; both
    counts are on testsuites and testsuite; classname is the suite; tabs are kept as they are."""
    cases = [
        Case("fails", failures=["first line\nsecond line", "other"]),
        Case("skipped", skipped="why"),
        Case("both", failures=["bad"], skipped="why"),
        Case("fine", output="a\tb"),
        Case("plain"),
    ]
    root = ET.fromstring(junit("suite", cases))
    (suite,) = root
    for node in (root, suite):
        assert (node.get("tests"), node.get("failures"), node.get("errors")) == ("5", "2", "0")
    assert suite.get("skipped") == "1"
    assert [case.get("classname") for case in suite] == ["suite"] * 5
    by_name = {case.get("name"): case for case in suite}
    first, second = by_name["fails"]
    assert (first.get("message"), first.text) == ("first line", "first line\nsecond line")
    assert (second.get("message"), second.text) == ("other", "other")
    assert [child.tag for child in by_name["both"]] == ["failure"]
    assert by_name["skipped"].find("skipped").get("message") == "why"
    assert [child.tag for child in by_name["fine"]] == ["system-out"]
    assert by_name["fine"][0].text == "a\tb"


def test_show_json_records_a_separate_base_digests_unused_tensors_and_a_stack():
    files = {"base.safetensors": "ab" * 32}
    base = ModelRecord(SEPARATE, "file", "base", files=files)
    lineage = terge.Lineage(
        {
            "w": LineageEntry("arithmetic", [(0, 0.5), (1, 0.5)]),
            "v": LineageEntry("arithmetic", [(0, 1.0)]),
        },
        {"s": "not floating point", "t": "not floating point"},
        unused={"extra.weight": [1]},
        models=[ModelRecord(0, "file", "a"), ModelRecord(1, "file", "b")],
        base=base,
    )
    lineage.digests = {"w": {}, "v": {}}
    lineage.stack = {"blocks": [{}, {}, {}]}
    text = render_show(lineage, "f", "json")
    record = json.loads(text)
    assert list(record) == sorted(record)  # keys sorted: the same record prints the same
    assert record["base"] == "separate"
    assert record["separate_base"] == {
        "index": "separate",
        "kind": "file",
        "path": "base",
        "pinned": True,
        "files": files,
        "revision": None,
        "repo": None,
        "requested_revision": None,
        "adapter": None,
    }
    assert (record["chosen"], record["vocabulary"], record["dropped"]) == (None, None, {})
    assert (record["by_method"], record["by_reason"]) == (
        {"arithmetic": 2},
        {"not floating point": 2},
    )
    assert (record["unused"], record["digests"], record["stacked_blocks"]) == (1, 2, 3)
    lineage.base, lineage.digests, lineage.stack = lineage.models[1], None, None
    record = json.loads(render_show(lineage, "f", "json"))
    assert (record["base"], record["separate_base"], record["digests"]) == (1, None, None)
    assert "stacked_blocks" not in record
    cases = _cases(render_show(lineage, "f", "junit"))
    assert cases["w"].find("system-out").text == "arithmetic of models 0: 0.5, 1: 0.5"


def test_show_json_holds_what_the_text_shows_of_choice_vocabulary_drops_and_adapters():
    adapter = {"base": {"kind": "file", "path": "base"}, "r": {"q": 2}, "lora_alpha": {"q": 4}}
    lineage = terge.Lineage(
        {"w": LineageEntry("arithmetic", [(0, 0.5), (1, 0.5)])},
        models=[ModelRecord(0, "file", "a"), ModelRecord(1, "adapter", "b", adapter=adapter)],
        dropped={"w": {1: "shape mismatch", 0: "not floating point"}},
    )
    lineage.chosen = {"rule": "last 2", "from": "runs/*", "candidates": [], "chosen": []}
    lineage.vocabulary = {"source": "union", "size": 10}
    record = json.loads(render_show(lineage, "f", "json"))
    assert record["chosen"] == lineage.chosen
    assert record["vocabulary"] == {"source": "union", "size": 10}
    assert record["dropped"] == {"w": [[0, "not floating point"], [1, "shape mismatch"]]}
    assert record["models"][1]["adapter"] == adapter
    assert record["models"][0]["adapter"] is None


def test_diff_shows_notes_counts_one_change_and_lists_only_changed_tensors():
    lineage = _lineage()
    change = "~ layers.0.weight: setting density 0.2 -> 0.3"
    note = "only the old lineage has digests; they were not compared"
    found = LineageDiff([change], [note], {"layers.0.weight": [change], "steps": []}, [])
    text = render_diff(found, "a", "b", lineage, "text")
    assert text == f"{change}\nnote: {note}\nterge: a and b differ (1 change)\n"
    record = json.loads(render_diff(found, "a", "b", lineage, "json"))
    assert record["tensors"] == {"layers.0.weight": [change]} and record["notes"] == [note]
    cases = _cases(render_diff(found, "a", "b", lineage, "junit"))
    assert cases[RECORD_CASE].find("failure") is None
    assert cases[RECORD_CASE].find("system-out").text == f"note: {note}"
    assert cases["layers.0.weight"].find("failure").text == change
    same = LineageDiff([], [], {}, [])
    assert json.loads(render_diff(same, "a", "b", lineage, "json"))["differ"] is False


def test_verify_counts_tensors_not_problems_and_names_the_checkpoint():
    lineage = _lineage()
    problems = [("layers.0.weight", "p1"), ("layers.0.weight", "p2")]
    text = render_verify(problems, lineage, "m", "text")
    assert text == (
        "layers.0.weight: p1\nlayers.0.weight: p2\nterge: 1 of 2 merged tensors do not match\n"
    )
    assert json.loads(render_verify(problems, lineage, "m", "json")) == {
        "merged": "m",
        "ok": False,
        "tensors": 2,
        "problems": [
            {"name": "layers.0.weight", "problem": "p1"},
            {"name": "layers.0.weight", "problem": "p2"},
        ],
    }
    cases = _cases(render_verify(problems, lineage, "m", "junit"))
    assert [f.text for f in cases["layers.0.weight"].findall("failure")] == ["p1", "p2"]
    assert render_verify([], lineage, "m", "text") == "terge: all 2 merged tensors match m\n"
    one = terge.Lineage({"w": LineageEntry("arithmetic", [(0, 1.0)])})
    assert render_verify([], one, "m", "text") == "terge: all 1 merged tensor match m\n"
    assert (
        render_verify([], terge.Lineage(), "m", "text") == "terge: all 0 merged tensors match m\n"
    )


def test_check_names_each_violations_rule_and_tensor_in_each_format():
    lineage = _lineage()
    violations = [Violation("range", "layers.0.weight", "density 0.2 is outside [0.3, 1.0]")]
    assert render_check(violations, lineage, "text") == (
        "layers.0.weight: density 0.2 is outside [0.3, 1.0] [range]\n"
        "terge: the lineage breaks the policy (1 violation)\n"
    )
    assert json.loads(render_check(violations, lineage, "json")) == {
        "ok": False,
        "violations": [
            {
                "rule": "range",
                "name": "layers.0.weight",
                "message": "density 0.2 is outside [0.3, 1.0]",
            }
        ],
    }
    cases = _cases(render_check(violations, lineage, "junit"))
    failure = cases["layers.0.weight"].find("failure")
    assert failure.text == "[range] density 0.2 is outside [0.3, 1.0]"
    assert render_check([], lineage, "text") == (
        "terge: the lineage keeps the policy (2 tensors merged, 1 left alone)\n"
    )
    assert json.loads(render_check([], lineage, "json")) == {"ok": True, "violations": []}
    left = [Violation("skipped", "steps", "left alone (not floating point)")]
    cases = _cases(render_check(left, lineage, "junit"))  # a tensor left alone fails too
    assert [child.tag for child in cases["steps"]] == ["failure"]
    both = terge.Lineage({"w": LineageEntry("arithmetic", [(0, 1.0)])}, {"w": "shape mismatch"})
    (suite,) = ET.fromstring(render_show(both, "f", "junit"))
    assert [case.get("name") for case in suite] == [RECORD_CASE, "w"]  # one case per name
