"""Audit results as CI reads them: text for people, JSON for scripts, JUnit XML for CI systems.

``terge lineage show|diff|verify|check --format text|json|junit`` render through here. In JUnit
every tensor is a test case (a failure per problem, ``skipped`` for a tensor left as in the
base), so a CI system lists which tensors broke; what concerns the whole record (models, base,
dtypes, pins) is the case ``(lineage)``. XML is built with :mod:`xml.etree`, which escapes
markup; characters XML 1.0 cannot hold at all (control characters in a tensor's name) are
written as ``\\xNN`` escapes.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .audit import LineageDiff, summary
from .io.dtypes import dtype_name
from .lineage import SEPARATE, Lineage, ModelRecord
from .policy import Violation

FORMATS = ("text", "json", "junit")
"""The output formats of ``terge lineage`` (``--format``)."""
RECORD_CASE = "(lineage)"
"""The JUnit test case of what concerns the whole record, not one tensor."""


# --- JUnit ----------------------------------------------------------------------------------------


@dataclass
class Case:
    """One JUnit test case: a tensor (or the record), its failures, or why it was skipped."""

    name: str
    failures: list[str] = field(default_factory=list)
    skipped: str | None = None
    output: str = ""


_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: str) -> str:
    """``text`` with the characters XML 1.0 cannot hold written as ``\\xNN`` (or ``\\uNNNN``)."""
    return _NOT_XML.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


def junit(suite: str, cases: Sequence[Case]) -> str:
    """A JUnit XML report: one ``testsuite`` named ``suite`` holding ``cases``."""
    failures = sum(1 for case in cases if case.failures)
    skipped = sum(1 for case in cases if case.skipped is not None and not case.failures)
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0"}
    root = ET.Element("testsuites", {"name": "terge", **counts})
    node = ET.SubElement(root, "testsuite", {"name": suite, **counts, "skipped": str(skipped)})
    for case in cases:
        element = ET.SubElement(
            node, "testcase", {"name": xml_text(case.name), "classname": xml_text(suite)}
        )
        for failure in case.failures:
            first = failure.splitlines()[0] if failure else ""
            item = ET.SubElement(element, "failure", {"message": xml_text(first)})
            item.text = xml_text(failure)
        if case.skipped is not None and not case.failures:
            ET.SubElement(element, "skipped", {"message": xml_text(case.skipped)})
        if case.output:
            ET.SubElement(element, "system-out").text = xml_text(case.output)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, "unicode") + "\n"


def _json(record: Any) -> str:
    return json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _how(entry: Any) -> str:
    settings = getattr(entry, "settings", {})
    shown = ", ".join(f"{key}={value!r}" for key, value in settings.items())
    weights = ", ".join(f"{index}: {weight!r}" for index, weight in entry[1])
    return f"{entry[0]}{f' ({shown})' if shown else ''} of models {weights}"


def _cases(
    lineage: Lineage,
    problems: Mapping[str | None, list[str]],
    extra: Iterable[str] = (),
) -> list[Case]:
    """A case per tensor the lineage merged or left alone (and per name in ``extra``), failing
    with its ``problems``; the record's own problems (key ``None``) in :data:`RECORD_CASE`."""
    cases = [Case(RECORD_CASE, list(problems.get(None, [])))]
    seen = set()
    for name, entry in lineage.items():
        cases.append(Case(name, list(problems.get(name, [])), output=_how(entry)))
        seen.add(name)
    for name, reason in lineage.skipped.items():
        if name not in seen:
            skipped = f"left as in the base: {reason}"
            cases.append(Case(name, list(problems.get(name, [])), skipped=skipped))
            seen.add(name)
    for name in [*extra, *(n for n in problems if n is not None)]:
        if name not in seen:
            cases.append(Case(name, list(problems.get(name, []))))
            seen.add(name)
    return cases


# --- show -----------------------------------------------------------------------------------------


def _model_json(record: ModelRecord) -> dict[str, Any]:
    return {
        "index": record.index,
        "kind": record.kind,
        "path": record.path,
        "pinned": record.pinned,
        "files": None if record.files is None else dict(record.files),
        "revision": record.revision,
        "repo": record.repo,
        "requested_revision": record.requested_revision,
        "adapter": None if record.adapter is None else dict(record.adapter),
    }


def summary_record(lineage: Lineage) -> dict[str, Any]:
    """What ``show`` says, as JSON: models, dtypes, tensors per method and per reason."""
    by_method: dict[str, int] = {}
    for entry in lineage.values():
        by_method[entry[0]] = by_method.get(entry[0], 0) + 1
    by_reason: dict[str, int] = {}
    for reason in lineage.skipped.values():
        by_reason[reason] = by_reason.get(reason, 0) + 1
    base = lineage.base
    return {
        "models": [_model_json(record) for record in lineage.models],
        "base": None if base is None else ("separate" if base.index == SEPARATE else base.index),
        "separate_base": None if base is None or base.index != SEPARATE else _model_json(base),
        "dtype": dtype_name(lineage.dtype),
        "out_dtype": dtype_name(lineage.out_dtype),
        "merged": len(lineage),
        "by_method": by_method,
        "skipped": len(lineage.skipped),
        "by_reason": by_reason,
        "tied": dict(lineage.tied),
        "unused": len(lineage.unused),
        "digests": None if lineage.digests is None else len(lineage.digests),
        "chosen": None if lineage.chosen is None else dict(lineage.chosen),
        "vocabulary": None if lineage.vocabulary is None else dict(lineage.vocabulary),
        "dropped": {
            name: [[model, why] for model, why in sorted(models.items())]
            for name, models in lineage.dropped.items()
        },
        "terge_version": lineage.terge_version,
        "torch_version": lineage.torch_version,
        **({} if lineage.stack is None else {"stacked_blocks": len(lineage.stack["blocks"])}),
    }


def render_show(lineage: Lineage, title: str, format: str) -> str:
    """``terge lineage show``: the summary, its JSON record, or every tensor as a test case."""
    if format == "json":
        return _json({"file": title, **summary_record(lineage)})
    if format == "junit":
        return junit("terge.lineage.show", _cases(lineage, {}))
    return summary(lineage, title)


# --- diff -----------------------------------------------------------------------------------------


def render_diff(found: LineageDiff, old: str, new: str, lineage: Lineage, format: str) -> str:
    """``terge lineage diff``: the changes line by line, as JSON, or a case per tensor."""
    if format == "json":
        return _json(
            {
                "old": old,
                "new": new,
                "differ": bool(found.changes),
                "changes": found.changes,
                "record": found.record,
                "tensors": {name: lines for name, lines in found.per_tensor.items() if lines},
                "notes": found.notes,
            }
        )
    if format == "junit":
        problems: dict[str | None, list[str]] = {None: list(found.record)}
        problems.update({name: list(lines) for name, lines in found.per_tensor.items()})
        cases = _cases(lineage, problems, found.per_tensor)
        cases[0].output = "\n".join(f"note: {note}" for note in found.notes)
        return junit("terge.lineage.diff", cases)
    lines = [*found.changes, *(f"note: {note}" for note in found.notes)]
    if found.changes:
        count = len(found.changes)
        lines.append(f"terge: {old} and {new} differ ({count} change{'' if count == 1 else 's'})")
    else:
        lines.append(
            f"terge: the lineages agree ({_count(len(lineage), 'tensor')} merged, "
            f"{len(lineage.skipped)} left alone)"
        )
    return "\n".join(lines) + "\n"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


# --- verify ---------------------------------------------------------------------------------------


def render_verify(
    problems: Sequence[tuple[str, str]], lineage: Lineage, merged: str, format: str
) -> str:
    """``terge lineage verify``: the tensors that do not match, as JSON, or a case per tensor."""
    if format == "json":
        return _json(
            {
                "merged": merged,
                "ok": not problems,
                "tensors": len(lineage),
                "problems": [{"name": name, "problem": problem} for name, problem in problems],
            }
        )
    if format == "junit":
        by_name: dict[str | None, list[str]] = {}
        for name, problem in problems:
            by_name.setdefault(name, []).append(problem)
        return junit("terge.lineage.verify", _cases(lineage, by_name))
    lines = [f"{name}: {problem}" for name, problem in problems]
    failed = len({name for name, _ in problems})
    if problems:
        lines.append(f"terge: {failed} of {_count(len(lineage), 'merged tensor')} do not match")
    else:
        lines.append(f"terge: all {_count(len(lineage), 'merged tensor')} match {merged}")
    return "\n".join(lines) + "\n"


# --- check ----------------------------------------------------------------------------------------


def render_check(violations: Sequence[Violation], lineage: Lineage, format: str) -> str:
    """``terge lineage check``: each violation (rule and tensor), as JSON, or a case per
    tensor."""
    if format == "json":
        return _json(
            {
                "ok": not violations,
                "violations": [
                    {"rule": v.rule, "name": v.name, "message": v.message} for v in violations
                ],
            }
        )
    if format == "junit":
        by_name: dict[str | None, list[str]] = {}
        for violation in violations:
            text = f"[{violation.rule}] {violation.message}"
            by_name.setdefault(violation.name, []).append(text)
        return junit("terge.lineage.check", _cases(lineage, by_name))
    lines = [f"{violation} [{violation.rule}]" for violation in violations]
    if violations:
        lines.append(
            f"terge: the lineage breaks the policy ({_count(len(violations), 'violation')})"
        )
    else:
        lines.append(
            f"terge: the lineage keeps the policy ({_count(len(lineage), 'tensor')} merged, "
            f"{len(lineage.skipped)} left alone)"
        )
    return "\n".join(lines) + "\n"
