"""Lineage policies: the rules a merge must keep for CI to pass (``terge lineage check``).

A :class:`Policy` names what must hold of a lineage: tensors that must be merged, reasons for
which nothing may be left alone, the merged set equal to the base's floating tensors, dtypes
kept, pairs of tensors kept tied, every model pinned (file digests or a revision), weights and
settings within ranges. :func:`check_lineage` returns one :class:`Violation` per broken rule and
tensor; none means the merge passes.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import PolicyError
from .io import open_checkpoint
from .io.dtypes import dtype_name
from .lineage import NOT_A_TENSOR, NOT_FLOATING, REASONS, SEPARATE, TIED, Lineage, ModelRecord
from .methods import REGISTRY
from .patterns import PatternSet, is_pattern, pattern_repr
from .sources import strip_wrappers

RULES = ("merged", "skipped", "base", "dtypes", "tied", "pinned", "range")
"""The rules a violation may name, in the order :func:`check_lineage` checks them."""

WEIGHT = "weight"
"""The range key for every contribution's weight (any other key names a method's setting)."""


def known_settings() -> set[str]:
    """Every setting some registered method takes (and ``seed``): what a range may bound."""
    names = {"seed"}
    for info in REGISTRY.values():
        for parameter in inspect.signature(info.factory).parameters.values():
            names.add(parameter.name)
    return names


@dataclass(frozen=True)
class Violation:
    """One broken rule: which (one of ``RULES``), for which tensor (``None``: the whole
    record), and a message saying what was found and what the rule wanted."""

    rule: str
    name: str | None
    message: str

    def __str__(self) -> str:
        return self.message if self.name is None else f"{self.name}: {self.message}"


def _as_tuple(values: Any, argument: str) -> tuple[Any, ...]:
    """``values`` (any iterable but a string or a mapping) as a tuple, or a ``PolicyError``."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise PolicyError(f"{argument}: give a list of them; got {type(values).__name__}.")
    return tuple(values)


@dataclass(frozen=True)
class Policy:
    """What ``check_lineage`` enforces; every rule is off unless given.

    ``require_merged``: patterns (an exact name, a compiled regex, ``terge.layers(...)``) whose
    tensors must all be merged (a pattern matching no tensor is a violation too, so a typo
    cannot pass). ``forbid_skipped``: reasons (from ``terge.lineage.REASONS``) for which no
    tensor may be left alone and no model's tensor dropped. ``merged_is_base_floating``: the
    merged tensors are exactly the base's floating ones (tied aliases count as their first
    name). ``same_dtypes``: every tensor written in its base dtype. ``tied``: pairs of names
    that must stay one tensor. ``pinned``: every model (and a separate base) recorded with
    file digests or a revision. ``ranges``: ``{"weight" or a setting: (low, high)}``, inclusive.
    """

    require_merged: tuple[Any, ...] = ()
    forbid_skipped: tuple[str, ...] = ()
    merged_is_base_floating: bool = False
    same_dtypes: bool = False
    tied: tuple[tuple[str, str], ...] = ()
    pinned: bool = False
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # One pattern, reason or pair stands for a tuple of one (a string is not read letter
        # by letter); other iterables become tuples, so that a policy stays as it was made.
        required = () if self.require_merged is None else self.require_merged
        if is_pattern(required) or isinstance(required, (bytes, bytearray, memoryview)):
            required = (required,)  # bytes: for PatternSet's error saying how to fix them
        elif not isinstance(required, Iterable) or isinstance(required, Mapping):
            PatternSet(required, "require_merged")  # raises: names the type and the fix
        skipped = () if self.forbid_skipped is None else self.forbid_skipped
        skipped = (skipped,) if isinstance(skipped, str) else _as_tuple(skipped, "forbid_skipped")
        tied = _as_tuple(() if self.tied is None else self.tied, "tied")
        if len(tied) == 2 and all(isinstance(name, str) for name in tied):
            tied = (tied,)
        object.__setattr__(self, "require_merged", tuple(required))
        object.__setattr__(self, "forbid_skipped", skipped)
        object.__setattr__(self, "tied", tied)
        PatternSet(list(self.require_merged), "require_merged")  # type-checks every pattern
        for reason in self.forbid_skipped:
            if reason not in REASONS:
                raise PolicyError(
                    f"forbid_skipped: {reason!r} is not a reason terge leaves a tensor alone; "
                    f"give some of {', '.join(map(repr, REASONS))}."
                )
        for pair in self.tied:
            if len(pair) != 2 or not all(isinstance(n, str) and n for n in pair):
                raise PolicyError(f"tied: {pair!r} must be a pair of tensor names.")
        object.__setattr__(self, "tied", tuple(tuple(pair) for pair in self.tied))
        settings = known_settings()
        for key, bounds in self.ranges.items():
            if key != WEIGHT and key not in settings:
                raise PolicyError(
                    f"ranges: {key!r} is neither 'weight' nor a setting of any method "
                    f"({', '.join(sorted(settings))})."
                )
            ok = len(bounds) == 2 and all(_finite(b) for b in bounds) and bounds[0] <= bounds[1]
            if not ok:
                raise PolicyError(
                    f"ranges: {key!r} must be [low, high], two finite numbers with low <= high; "
                    f"got {list(bounds)!r}."
                )

    @property
    def empty(self) -> bool:
        """Whether the policy enforces nothing (a check that passes whatever the merge)."""
        return not (
            self.require_merged
            or self.forbid_skipped
            or self.merged_is_base_floating
            or self.same_dtypes
            or self.tied
            or self.pinned
            or self.ranges
        )

    @property
    def needs_base(self) -> bool:
        """Whether a rule reads the base's tensor names and dtypes."""
        return self.merged_is_base_floating or self.same_dtypes


def _finite(value: Any) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok and math.isfinite(value)


def check_lineage(
    lineage: Lineage,
    policy: Policy,
    *,
    base: str | os.PathLike[str] | None = None,
    merged: str | os.PathLike[str] | None = None,
) -> list[Violation]:
    """Every way ``lineage`` breaks ``policy``, one :class:`Violation` per rule and tensor.

    The base's tensor names and dtypes (for ``merged_is_base_floating`` and ``same_dtypes``)
    are read from the checkpoint's headers (no tensor data): ``base``, else the path the
    lineage records for it; a base that cannot be read (merged from memory) is judged by the
    lineage's own record (what it left alone, and ``out_dtype``). With ``merged`` (a merged
    checkpoint), ``same_dtypes`` compares its headers with the base's.
    """
    found: list[Violation] = []
    found += _merged_rule(lineage, policy)
    found += _skipped_rule(lineage, policy)
    if policy.needs_base:
        with contextlib.ExitStack() as stack:
            dtypes = _base_dtypes(lineage, base, stack)
            if policy.merged_is_base_floating:
                found += _base_rule(lineage, dtypes)
            if policy.same_dtypes:
                found += _dtypes_rule(lineage, dtypes, merged)
    found += _tied_rule(lineage, policy)
    if policy.pinned:
        found += _pinned_rule(lineage)
    found += _range_rule(lineage, policy)
    return found


def _alias_of_merged(lineage: Lineage, name: str) -> bool:
    return lineage.skipped.get(name) == TIED and lineage.tied.get(name) in lineage


def _why(lineage: Lineage, name: str) -> str:
    """Why a tensor was not merged: its reason, with the models dropped and theirs."""
    reason = lineage.skipped.get(name)
    if reason is None:
        return "not in the lineage (the base has no such tensor)"
    dropped = lineage.dropped.get(name, {})
    extra = "; ".join(f"models[{i}] dropped: {why}" for i, why in sorted(dropped.items()))
    return f"left as in the base ({reason}{'; ' + extra if extra else ''})"


def _merged_rule(lineage: Lineage, policy: Policy) -> list[Violation]:
    found = []
    names = [*lineage, *lineage.skipped]
    for pattern in policy.require_merged:
        matches = PatternSet([pattern], "require_merged")
        hits = [name for name in names if matches(name)]
        if not hits:
            found.append(
                Violation(
                    "merged",
                    None,
                    f"the pattern {pattern_repr(pattern)} must match merged tensors, but it "
                    "matches no tensor of the lineage",
                )
            )
        for name in hits:
            if name not in lineage and not _alias_of_merged(lineage, name):
                found.append(
                    Violation(
                        "merged",
                        name,
                        f"must be merged ({pattern_repr(pattern)}), but was {_why(lineage, name)}",
                    )
                )
    return found


def _skipped_rule(lineage: Lineage, policy: Policy) -> list[Violation]:
    forbidden = set(policy.forbid_skipped)
    found = [
        Violation("skipped", name, f"left as in the base ({reason}), which the policy forbids")
        for name, reason in lineage.skipped.items()
        if reason in forbidden
    ]
    for name, models in lineage.dropped.items():
        for index, reason in sorted(models.items()):
            if reason in forbidden:
                found.append(
                    Violation(
                        "skipped",
                        name,
                        f"models[{index}]'s tensor did not contribute ({reason}), which the "
                        "policy forbids",
                    )
                )
    return found


def _base_dtypes(
    lineage: Lineage, base: str | os.PathLike[str] | None, stack: contextlib.ExitStack
) -> dict[str, torch.dtype] | None:
    """The base's tensors' dtypes by canonical name, from its headers; ``None`` when the base
    cannot be read (not given, and merged from memory or from a path not found here)."""
    path: Path | None = None
    if base is not None:
        path = Path(base).expanduser()
    elif lineage.base is not None and lineage.base.path is not None:
        path = Path(lineage.base.path)
        if not path.exists():
            return None
    if path is None:
        return None
    reader = stack.enter_context(open_checkpoint(path))
    return {strip_wrappers(name): reader.info(name).dtype for name in reader.names()}


def _base_rule(lineage: Lineage, dtypes: Mapping[str, torch.dtype] | None) -> list[Violation]:
    rule = "base"
    if dtypes is None:  # judged by the lineage: the floating tensors it left alone
        return [
            Violation(rule, name, f"a floating tensor of the base, but {_why(lineage, name)}")
            for name, reason in lineage.skipped.items()
            if reason not in (NOT_FLOATING, NOT_A_TENSOR, TIED)
        ]
    found = []
    for name, dtype in dtypes.items():
        merged = name in lineage or _alias_of_merged(lineage, name)
        if dtype.is_floating_point and not merged:
            found.append(
                Violation(rule, name, f"a floating tensor of the base, but {_why(lineage, name)}")
            )
    for name in lineage:
        if name not in dtypes:
            found.append(Violation(rule, name, "merged, but the base has no such tensor"))
        elif not dtypes[name].is_floating_point:
            found.append(
                Violation(rule, name, f"merged, but the base holds {dtype_name(dtypes[name])}")
            )
    return found


def _dtypes_rule(
    lineage: Lineage,
    dtypes: Mapping[str, torch.dtype] | None,
    merged: str | os.PathLike[str] | None,
) -> list[Violation]:
    rule = "dtypes"
    out = lineage.out_dtype
    if merged is not None and dtypes is not None:
        with open_checkpoint(merged) as reader:
            written = {strip_wrappers(n): reader.info(n).dtype for n in reader.names()}
        return [
            Violation(
                rule,
                name,
                f"written as {dtype_name(dtype)}, but the base holds {dtype_name(dtypes[name])}",
            )
            for name, dtype in written.items()
            if name in dtypes and dtype != dtypes[name]
        ]
    if out is None:
        return []
    if dtypes is None:
        return [
            Violation(
                rule,
                None,
                f"the floating tensors were written as {dtype_name(out)} (out_dtype); the "
                "base's dtypes cannot be read here to tell which changed: give --base",
            )
        ]
    return [
        Violation(rule, name, f"written as {dtype_name(out)}, but the base holds {dtype_name(d)}")
        for name, d in dtypes.items()
        if d.is_floating_point and d != out
    ]


def _tied_rule(lineage: Lineage, policy: Policy) -> list[Violation]:
    found = []
    for first, second in policy.tied:
        one = lineage.tied.get(first, first)
        other = lineage.tied.get(second, second)
        if one != other:
            found.append(
                Violation(
                    "tied",
                    first,
                    f"must be tied to {second!r}, but they are two tensors ({first!r}: "
                    f"{_state(lineage, first)}; {second!r}: {_state(lineage, second)})",
                )
            )
    return found


def _state(lineage: Lineage, name: str) -> str:
    if name in lineage:
        return f"merged by {lineage[name][0]}"
    if name in lineage.tied:
        return f"tied to {lineage.tied[name]!r}"
    return _why(lineage, name)


def _records(lineage: Lineage) -> Iterable[tuple[str, ModelRecord]]:
    for record in lineage.models:
        yield f"models[{record.index}]", record
    if lineage.base is not None and lineage.base.index == SEPARATE:
        yield "the base", lineage.base


def _pinned_rule(lineage: Lineage) -> list[Violation]:
    if not lineage.models:
        return [Violation("pinned", None, "the lineage records no models, so none is pinned")]
    found = []
    for label, record in _records(lineage):
        if not record.pinned:
            where = "read from memory" if record.path is None else f"read from {record.path}"
            found.append(
                Violation(
                    "pinned",
                    None,
                    f"{label} ({record.kind}, {where}) is not pinned: no file digests and no "
                    "revision; merge from files with digests=True (--digests)",
                )
            )
    return found


def _range_rule(lineage: Lineage, policy: Policy) -> list[Violation]:
    found = []
    for name, entry in lineage.items():
        for key, (low, high) in policy.ranges.items():
            values: Sequence[tuple[str, Any]]
            if key == WEIGHT:
                values = [(f"models[{i}]'s weight", w) for i, w in entry[1]]
            elif key in getattr(entry, "settings", {}):
                values = [(f"the setting {key}", entry.settings[key])]
            else:
                continue
            for what, value in values:
                if not _finite(value) or not low <= value <= high:
                    found.append(
                        Violation(
                            "range", name, f"{what} is {value!r}, outside [{low!r}, {high!r}]"
                        )
                    )
    return found
