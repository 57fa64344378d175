"""Lineage audits: reading a lineage back against the models and against another lineage.

:func:`diff_lineages` says what
changed between two lineages, :func:`verify_lineage` recomputes every merged tensor from the
models (one at a time) and checks it against a merged checkpoint, and :func:`summary` is the
readable account ``terge lineage show`` prints.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .digests import tensor_digest
from .errors import LineageError, TergeError
from .execute import run_step
from .io import CheckpointReader, open_checkpoint
from .io.adapters import AdapterSpec, is_adapter_folder
from .io.dtypes import dtype_name
from .io.hub import locate
from .io.training import CheckpointSpec, as_spec
from .kernels import ChunkBuffers, store_whole
from .lineage import (
    NOT_A_TENSOR,
    SEPARATE,
    TIED,
    Lineage,
    LineageEntry,
    ModelIndex,
    ModelRecord,
    TensorDigests,
)
from .methods import REGISTRY, Method
from .output import folder_of
from .plan import Step, aligned_step, reads_base, step_from_entry
from .sources import AdapterSource, FileSource, Source
from .vocabulary import (
    OutputVocabulary,
    checked_rows,
    config_rows,
    output_vocabulary,
    read_vocabulary,
)

# --- diff -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineageDiff:
    """What differs between two lineages: ``changes`` (the merge differs) and ``notes``
    (versions: worth a look, but the merge may be the same)."""

    changes: list[str]
    notes: list[str]
    per_tensor: Mapping[str, list[str]] = field(default_factory=dict, compare=False)
    """The changes by tensor name (every name either lineage merged or left alone, changed or
    not): what ``--format junit`` shows as one test case each."""
    record: list[str] = field(default_factory=list, compare=False)
    """The changes to the record as a whole: models, base, dtypes."""


def diff_lineages(old: Lineage, new: Lineage, atol: float = 0.0) -> LineageDiff:
    """Every difference between ``old`` and ``new``, one readable line each.

    A weight counts as changed when it moved by more than ``atol`` (default 0: exactly);
    everything else is compared exactly. Digests are compared where both lineages have them.
    """
    per_name: dict[str, list[str]] = {}
    for name in list(old) + [name for name in new if name not in old]:
        per_name[name] = _entry_changes(name, old, new, atol)
    for attribute in ("skipped", "tied", "unused", "dropped"):
        for name, line in _map_changes(attribute, old, new):
            per_name.setdefault(name, []).append(line)
    for name, line in _digest_changes(old, new):
        per_name.setdefault(name, []).append(line)
    record = _record_changes(old, new) + _stack_changes(old, new)
    for name, line in _stack_tensor_changes(old, new):
        per_name.setdefault(name, []).append(line)
    changes = record + [line for lines in per_name.values() for line in lines]
    for name in [*old.skipped, *new.skipped]:
        per_name.setdefault(name, [])
    notes = [
        f"{field} {getattr(old, field)} -> {getattr(new, field)}"
        for field in ("terge_version", "torch_version")
        if getattr(old, field) != getattr(new, field)
    ]
    if (old.digests is None) != (new.digests is None):
        which = "the old" if new.digests is None else "the new"
        notes.append(f"only {which} lineage has digests; they were not compared")
    for label, before, after in _pairs(old, new):
        if (before.files is None) != (after.files is None):
            which = "the old" if after.files is None else "the new"
            notes.append(f"only {which} lineage has {label}'s file digests; not compared")
        if (before.revision is None) != (after.revision is None):
            which = "the old" if after.revision is None else "the new"
            notes.append(f"only {which} lineage has {label}'s revision; not compared")
    return LineageDiff(changes, notes, per_name, record)


def _block_text(block: Mapping[str, Any] | None) -> str:
    """``passthrough models[0] block 3`` or ``arithmetic models[0] block 4 (0.5) + ...``."""
    if block is None:
        return "none"
    sources = block["sources"]
    if len(sources) == 1 and block["method"] == "passthrough":
        return f"models[{sources[0][0]}] block {sources[0][1]}"
    parts = " + ".join(f"models[{m}] block {b} ({w!r})" for m, b, w in sources)
    return f"{block['method']} of {parts}"


def _stack_changes(old: Lineage, new: Lineage) -> list[str]:
    """What differs between two stacks' ``lineage.stack``: being one, base, head, blocks."""
    before, after = old.stack, new.stack
    if before is None and after is None:
        return []
    if before is None or after is None:
        which = "new" if before is None else "old"
        return [f"~ stack: only the {which} lineage is a stacked model (terge.stack)"]
    changes = [
        f"~ stack {key}: models[{before.get(key)}] -> models[{after.get(key)}]"
        for key in ("base", "head")
        if before.get(key) != after.get(key)
    ]
    old_blocks, new_blocks = before["blocks"], after["blocks"]
    for i in range(max(len(old_blocks), len(new_blocks))):
        a = old_blocks[i] if i < len(old_blocks) else None
        b = new_blocks[i] if i < len(new_blocks) else None
        if a != b:
            sign = "+" if a is None else "-" if b is None else "~"
            changes.append(f"{sign} stack block {i}: {_block_text(a)} -> {_block_text(b)}")
    return changes


def _stack_tensor_changes(old: Lineage, new: Lineage) -> list[tuple[str, str]]:
    """Output tensors of two stacks whose sources (model, input name) differ."""
    if old.stack is None or new.stack is None:
        return []
    before, after = old.stack["tensors"], new.stack["tensors"]
    found = []
    for name in [*before, *(n for n in after if n not in before)]:
        a, b = before.get(name), after.get(name)
        if a != b:
            sign = "+" if a is None else "-" if b is None else "~"
            found.append((name, f"{sign} {name}: from {a} -> {b}"))
    return found


def _pairs(old: Lineage, new: Lineage) -> list[tuple[str, ModelRecord, ModelRecord]]:
    """The model records both lineages hold, by label (``models[0]``, ``base``)."""
    pairs = [(f"models[{i}]", a, b) for i, (a, b) in enumerate(zip(old.models, new.models))]
    if old.base is not None and new.base is not None and old.base.index == SEPARATE:
        pairs.append(("base", old.base, new.base))
    return pairs


def _model_text(record: ModelRecord | None) -> str:
    if record is None:
        return "not recorded"
    index = "separate" if record.index == SEPARATE else f"models[{record.index}]"
    return f"{index}, {record.kind}" + ("" if record.path is None else f" {record.path}")


def _record_changes(old: Lineage, new: Lineage) -> list[str]:
    changes = [
        f"~ {field}: {dtype_name(getattr(old, field))} -> {dtype_name(getattr(new, field))}"
        for field in ("dtype", "out_dtype")
        if getattr(old, field) != getattr(new, field)
    ]
    if _where(old.base) != _where(new.base):
        changes.append(f"~ base: {_model_text(old.base)} -> {_model_text(new.base)}")
    if old.base is not None and new.base is not None and old.base.index == SEPARATE:
        changes += _pin_changes("base", old.base, new.base)
    if old.vocabulary != new.vocabulary:
        changes.append(
            "~ vocabulary: "
            + (_vocabulary_text(old.vocabulary) if old.vocabulary else "not aligned")
            + " -> "
            + (_vocabulary_text(new.vocabulary) if new.vocabulary else "not aligned")
        )
    if old.chosen != new.chosen:
        changes.append(f"~ chosen: {_chosen_text(old.chosen)} -> {_chosen_text(new.chosen)}")
    for i in range(max(len(old.models), len(new.models))):
        before = old.models[i] if i < len(old.models) else None
        after = new.models[i] if i < len(new.models) else None
        if before is None:
            changes.append(f"+ models[{i}]: {_model_text(after)}")
        elif after is None:
            changes.append(f"- models[{i}]: {_model_text(before)}")
        else:
            if _where(before) != _where(after):
                changes.append(f"~ models[{i}]: {_model_text(before)} -> {_model_text(after)}")
            changes += _pin_changes(f"models[{i}]", before, after)
    return changes


def _where(record: ModelRecord | None) -> tuple[Any, ...] | None:
    """What a model record says of where the model came from (not its pins)."""
    return None if record is None else (record.index, record.kind, record.path)


def _pin_changes(label: str, old: ModelRecord, new: ModelRecord) -> list[str]:
    """Which input files changed (by digest, where both lineages have them) and the revision."""
    changes = []
    if old.revision != new.revision and old.revision is not None and new.revision is not None:
        changes.append(f"~ {label}: revision {old.revision} -> {new.revision}")
    if old.files is None or new.files is None:
        return changes
    for name in list(old.files) + [name for name in new.files if name not in old.files]:
        was, now = old.files.get(name), new.files.get(name)
        if was == now:
            continue
        if was is None:
            changes.append(f"+ {label}: file {name} added")
        elif now is None:
            changes.append(f"- {label}: file {name} gone")
        else:
            changes.append(f"~ {label}: file {name} changed (digest {was[:12]} -> {now[:12]})")
    return changes


def _chosen_text(chosen: Mapping[str, Any] | None) -> str:
    """``last 2 by global_step of runs/checkpoint-*: a, b``, or ``not chosen from a run``."""
    if chosen is None:
        return "not chosen from a run"
    return f"{chosen['rule']} of {chosen['from']}: {', '.join(chosen['chosen'])}"


def _how(entry: Any) -> str:
    """``ties (density=0.3, scale=1.0) of models 0: 0.5, 1: 0.5``."""
    settings = getattr(entry, "settings", {})
    shown = f" ({_settings_text(settings)})" if settings else ""
    weights = ", ".join(f"{index}: {weight!r}" for index, weight in entry[1])
    return f"{entry[0]}{shown} of models {weights}"


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in settings.items())


def _entry_changes(name: str, old: Lineage, new: Lineage, atol: float) -> list[str]:
    if name not in new:
        now = f"now {new.skipped[name]}" if name in new.skipped else "not in the new lineage"
        return [f"- {name}: no longer merged ({now}); was {_how(old[name])}"]
    if name not in old:
        was = f"was {old.skipped[name]}" if name in old.skipped else "not in the old lineage"
        return [f"+ {name}: now merged ({was}): {_how(new[name])}"]
    before, after = old[name], new[name]
    changes = []
    if before[0] != after[0]:
        changes.append(f"~ {name}: method {before[0]} -> {after[0]}")
    settings_old = getattr(before, "settings", {})
    settings_new = getattr(after, "settings", {})
    for key in list(settings_old) + [k for k in settings_new if k not in settings_old]:
        was, now = settings_old.get(key, "unset"), settings_new.get(key, "unset")
        if was != now:
            changes.append(f"~ {name}: setting {key} {was!r} -> {now!r}")
    contributors_old = [index for index, _ in before[1]]
    contributors_new = [index for index, _ in after[1]]
    if contributors_old != contributors_new:
        changes.append(f"~ {name}: contributors models {contributors_old} -> {contributors_new}")
        return changes
    for (index, was), (_, now) in zip(before[1], after[1]):
        if not abs(now - was) <= atol:
            changes.append(f"~ {name}: models[{index}] weight {was!r} -> {now!r}")
    return changes


def _map_changes(attribute: str, old: Lineage, new: Lineage) -> list[tuple[str, str]]:
    """Changes in ``skipped``, ``tied``, ``unused`` or ``dropped``; a tensor that moved between
    merged and skipped is reported once, by :func:`_entry_changes`."""
    before, after = getattr(old, attribute), getattr(new, attribute)
    moved = set(old) ^ set(new)
    changes = []
    for name in list(before) + [n for n in after if n not in before]:
        if attribute == "skipped" and name in moved:
            continue
        was, now = before.get(name), after.get(name)
        if was == now:
            continue
        if was is None:
            changes.append((name, f"+ {name}: {attribute} ({now})"))
        elif now is None:
            changes.append((name, f"- {name}: no longer {attribute} (was {was})"))
        else:
            changes.append((name, f"~ {name}: {attribute} {was} -> {now}"))
    return changes


def _digest_changes(old: Lineage, new: Lineage) -> list[tuple[str, str]]:
    if old.digests is None or new.digests is None:
        return []
    changes = []
    for name, before in old.digests.items():
        after = new.digests.get(name)
        if after is None:
            continue
        if before.output != after.output:
            changes.append((name, f"~ {name}: the merged tensor changed (output digest differs)"))
        for index in sorted(set(before.models) & set(after.models)):
            if before.models[index] != after.models[index]:
                changes.append(
                    (name, f"~ {name}: models[{index}]'s tensor changed (digest differs)")
                )
        if before.base is not None and after.base is not None and before.base != after.base:
            changes.append((name, f"~ {name}: the base's tensor changed (digest differs)"))
    return changes


# --- verify ---------------------------------------------------------------------------------------


def verify_lineage(
    lineage: Lineage,
    merged: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]] | None = None,
    base: str | os.PathLike[str] | None = None,
    *,
    source: str | os.PathLike[str] | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
) -> list[tuple[str, str]]:
    """Recompute every merged tensor as ``lineage`` says and compare it with ``merged``'s.

    The models are read from the paths the lineage records, or from ``models`` (one per model,
    in index order) and ``base`` (a separate base); only the models the merge read, and the base,
    are opened. Tensors are recomputed one at a time with terge's own methods and kernels, so
    memory stays at about one tensor. Every field of an entry is checked against the others
    (weights against the coefficients and divisor the kernel used, digests against the
    contributors) and against the tensors; the tensors left as in the base are compared with the
    base's (cast as the merge cast them), and tensors the checkpoint holds that the lineage does
    not account for are named. Returns ``(name, problem)`` for each tensor that does not match,
    bit for bit (and where digests are recorded, for each model whose tensor is not the one
    merged); empty when all match. Raises :class:`LineageError` (naming ``source``, the lineage
    file) when the lineage cannot be checked: models not found, tensors the checkpoint or a
    model lacks, settings that configure no method.

    ``rtol`` and ``atol`` (default 0: bit for bit) let a recomputed tensor differ from the
    checkpoint's by ``|written - recomputed| <= atol + rtol * |recomputed|`` elementwise (NaNs
    where both have them): for a checkpoint merged on another platform or by other kernels. The
    recorded digests and the tensors left as in the base are still compared exactly.
    """
    for label, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e308:
            raise LineageError(f"`{label}` must be a finite number >= 0; got {value!r}.")
    if getattr(lineage, "stack", None) is not None:
        return _verify_stack(lineage, merged, models, source, float(rtol), float(atol))
    check = _Checker(lineage, source, float(rtol), float(atol))
    paths, base_path = check.model_paths(models, base)
    with contextlib.ExitStack() as opened:
        reader = opened.enter_context(open_checkpoint(merged))
        check.names_in(reader, merged)
        sources: dict[int, Source] = {}
        records = lineage.models
        for index, path in paths.items():
            sources[index] = reopened(path, records[index] if index < len(records) else None)
            opened.callback(sources[index].close)
        base_source: Source | None = None
        if base_path is not None:
            base_source = reopened(base_path, lineage.base)
            opened.callback(base_source.close)
        elif isinstance(check.base_index, int) and check.base_index in sources:
            base_source = sources[check.base_index]
        buffers = ChunkBuffers(lineage.dtype or torch.float64)
        check.align(sources)
        problems: list[tuple[str, str]] = []
        for name, entry in lineage.items():
            found = check.tensor(name, entry, reader, sources, base_source, buffers)
            problems += [(name, problem) for problem in found]
        problems += check.left_alone(reader, base_source, buffers)
        problems += check.unaccounted(reader)
        return problems


def _verify_stack(
    lineage: Lineage,
    merged: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]] | None,
    source: str | os.PathLike[str] | None,
    rtol: float,
    atol: float,
) -> list[tuple[str, str]]:
    """``verify_lineage`` for a stacked model (``lineage.stack``): every output tensor is
    recomputed from the input tensors it records (``stack.tensors``): a copy is its source cast
    as written, a merged one is recomputed as its ``merged`` entry says, over its sources in
    order (so one model may contribute two blocks to one tensor)."""
    assert lineage.stack is not None  # the caller checked
    check = _Checker(lineage, source, rtol, atol)
    tensors: Mapping[str, list[list[Any]]] = lineage.stack["tensors"]
    needed = sorted({model for pairs in tensors.values() for model, _ in pairs})
    records = lineage.models
    if models is not None and len(models) != len(records):
        raise check.fail(
            f"it records {len(records)} models but {len(models)} paths were given; give one "
            "path per model, in index order."
        )
    problems: list[tuple[str, str]] = []
    with contextlib.ExitStack() as opened:
        reader = opened.enter_context(open_checkpoint(merged))
        check.names_in(reader, merged)
        sources: dict[int, FileSource] = {}
        for index in needed:
            given = None if models is None else models[index]
            record = records[index] if index < len(records) else None
            sources[index] = FileSource(check.path_of(record, given, "--models"))
            opened.callback(sources[index].close)
        buffers = ChunkBuffers(lineage.dtype or torch.float64)
        for name, pairs in tensors.items():
            if name not in reader:
                problems.append((name, "the stack wrote it, but the checkpoint lacks it"))
                continue
            for model, inner in pairs:
                if inner not in sources[model].entries:
                    raise check.fail(
                        f"{name!r} comes from {inner!r} of models[{model}], which "
                        f"{sources[model].path} lacks; are these the models that were stacked?"
                    )
            views: dict[int, Source] = {
                k: _Renamed(sources[model], name, inner, f"models[{model}]")
                for k, (model, inner) in enumerate(pairs)
            }
            entry = lineage.get(name)
            if entry is None:
                problem = check.copied(name, "copied", reader, views[0], buffers)
                if problem is not None:
                    problems.append((name, problem.replace("left as in the base", "copied")))
                continue
            named = [index for index, _ in entry[1]]
            inputs = [model for model, _ in pairs]
            method = check.methods[name]
            # a method that reads the base (the first source) merges the other sources
            offset = int(method is not None and reads_base(method) and named == inputs[1:])
            if named != inputs[offset:]:
                problems.append((name, "its merged entry and stack.tensors name other models"))
                continue
            local = LineageEntry(
                entry[0],
                [(offset + k, weight) for k, (_, weight) in enumerate(entry[1])],
                getattr(entry, "settings", {}),
                coefficients=getattr(entry, "coefficients", None),
                divisor=getattr(entry, "divisor", None),
                custom=getattr(entry, "custom", False),
            )
            check.base_index = 0  # a merged slice's base is its first source
            problems += [
                (name, p) for p in check.tensor(name, local, reader, views, views[0], buffers)
            ]
        for name, first in lineage.tied.items():  # a tied name held must hold its first name's
            if name in reader and first in reader and not _same(reader, name, first):
                problems.append((name, f"tied to {first!r}, but holds another tensor"))
        known = set(tensors) | set(lineage.tied)
        problems += [
            (name, "the checkpoint holds it, but the stack's lineage does not account for it")
            for name in reader.names()
            if name not in known
        ]
    return problems


class _Renamed(Source):
    """One tensor of a source under another name: an output tensor's input, for recomputing."""

    def __init__(self, source: Source, name: str, inner: str, label: str) -> None:
        self.source, self.inner = source, inner
        found = source.entries.get(inner)
        self.entries = {} if found is None else {name: found._replace(name=name)}
        self.others = ()
        self.path = getattr(source, "path", None)
        self.label = label
        """What an error calls the model (``models[i]``: its index among the stack's models,
        not its place in this tensor's slice)."""

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self.inner)


_CLOSE_CHUNK = 1 << 22
"""Values compared at a time by ``verify_lineage``'s tolerances (32 MiB of float64 each)."""

_TOLERANCE_ULPS = 2
"""How far (in units of the accumulation dtype's epsilon, times the model count) equal weights
may be from exactly 1/n: the original weights are not recorded, only that they were equal."""


def reopened(path: CheckpointSpec, record: ModelRecord | None) -> Source:
    """A model read again from disk: a checkpoint, or an adapter folder over the base its
    record names (else the base its own config names)."""
    if not is_adapter_folder(path.path):
        return FileSource(path)
    summary = record.adapter if record is not None else None
    base = summary["base"].get("path") if summary else None
    return AdapterSource(AdapterSpec(path.path, base), buffers=False)


ANGLE_ORDER_SINCE = "0.2.0"
"""The terge release from which SLERP's and Model Stock's dot products are summed in the order
``terge.kernels.statistics`` defines; merges by earlier builds can differ by the cosine's last
places (more where the products cancel), so the output in its last places here and there."""


def _angle_hint(entry: Any) -> str:
    """Why a SLERP or Model Stock tensor may differ without being wrong, and what to do."""
    settings = getattr(entry, "settings", {})
    mergekit = settings.get("zero") == "unnormalised" or settings.get("clamp") is False
    if entry[0] not in ("slerp", "model_stock") or mergekit or settings.get("filter_wise"):
        return ""
    return (
        f" ({entry[0]}'s angle is summed in a fixed order since terge {ANGLE_ORDER_SINCE}; a merge "
        "by an earlier build can differ from it in the last places of some values: check with "
        "--rtol, e.g. 1e-2 for bfloat16, 1e-6 for float32, 1e-9 for float64)"
    )


class _Checker:
    """What ``verify_lineage`` needs to know about the lineage, checked as it is needed."""

    def __init__(
        self,
        lineage: Lineage,
        source: str | os.PathLike[str] | None,
        rtol: float = 0.0,
        atol: float = 0.0,
    ) -> None:
        self.lineage = lineage
        self.rtol, self.atol = rtol, atol
        self.source = None if source is None else Path(source)
        self.base_index = None if lineage.base is None else lineage.base.index
        self.methods = {name: self.method(name, entry) for name, entry in lineage.items()}
        vocabulary = lineage.vocabulary or {}
        self.aligned: Mapping[str, Any] = vocabulary.get("tensors", {})
        """The tensors aligned by token, with their recorded row groups."""
        self.vocabulary: OutputVocabulary | str | None = None
        """The output vocabulary rebuilt from the models' tokenizers, or why it could not be."""

    def fail(self, message: str) -> LineageError:
        where = "lineage" if self.source is None else f"the lineage file {self.source}"
        return LineageError(f"{where}: {message}", self.source)

    def method(self, name: str, entry: Any) -> Method | None:
        """The registry's method as the entry configures it; ``None`` for a custom one."""
        info = REGISTRY.get(entry[0])
        if getattr(entry, "custom", False) or info is None:
            return None
        settings = dict(getattr(entry, "settings", {}))
        settings.pop("seed", None)
        try:
            method = info.factory(**settings)
        except (TypeError, ValueError, TergeError) as error:
            raise self.fail(
                f"the settings of {name!r} ({_settings_text(settings)}) do not configure "
                f"{entry[0]}: {error}"
            ) from None
        if method.random and not isinstance(entry.settings.get("seed"), int):
            raise self.fail(f"{name!r} was merged by {entry[0]}, which is random, but no seed.")
        return method

    def align(self, sources: Mapping[int, Source]) -> None:
        """Rebuild the output vocabulary from every model's tokenizer (read again from its
        folder), where the lineage aligned tensors by token."""
        if not self.aligned:
            return
        record = self.lineage.vocabulary or {}
        try:
            vocabularies = []
            for index in range(len(self.lineage.models)):
                source = sources[index]
                folder = folder_of(source) if isinstance(source, FileSource) else None
                where = f"models[{index}]"
                rows = checked_rows(source.entries, config_rows(folder), where)
                vocabularies.append(read_vocabulary(None, folder, rows, where, keep=False))
            if not isinstance(self.base_index, int):
                raise TergeError("the base was given apart from the models")
            output = output_vocabulary(vocabularies, self.base_index, record["source"])
        except (TergeError, KeyError) as error:
            self.vocabulary = f"its vocabulary cannot be rebuilt ({error})"
            return
        if output.rows != record.get("rows"):
            self.vocabulary = (
                f"the models' tokenizers now make {output.rows} rows, not the "
                f"{record.get('rows')} recorded"
            )
            return
        self.vocabulary = output

    def aligned_step(
        self,
        name: str,
        entry: Any,
        method: Method,
        sources: Mapping[int, Source],
        base: Source | None,
    ) -> Step | str:
        """The row step of an aligned tensor, rebuilt, or why it cannot be."""
        output = self.vocabulary
        if not isinstance(output, OutputVocabulary):
            return output or "its vocabulary was not rebuilt"
        if base is None or not isinstance(self.base_index, int) or name not in base.entries:
            return "the base cannot be read, so its rows cannot be aligned again"
        count = len(self.lineage.models)
        given = getattr(entry, "coefficients", None)
        values = list(given) if given is not None else [w for _, w in entry[1]]
        vector = torch.zeros(count, dtype=self.lineage.dtype or torch.float64)
        for (index, _), value in zip(entry[1], values):
            vector[index] = value
        settings = getattr(entry, "settings", {})
        try:
            step = aligned_step(
                name,
                base.entries[name],
                [sources[i] for i in range(count)],
                self.base_index,
                output,
                lambda: method,
                vector,
                bool((self.lineage.vocabulary or {}).get("normalize", True)),
                settings.get("seed") if method.random else None,
            )
        except TergeError as error:
            return f"its rows cannot be aligned again ({error})"
        assert step.rows is not None
        recorded = json.loads(json.dumps([group.record() for group in step.rows.groups]))
        if recorded != self.aligned[name]:
            return "its row groups, rebuilt from the tokenizers, differ from the recorded ones"
        return step

    def needed(self) -> set[ModelIndex]:
        """The models the merge read: contributors, and the base where a method read it."""
        needed: set[ModelIndex] = set()
        for name, entry in self.lineage.items():
            needed.update(index for index, _ in entry[1])
            method = self.methods[name]
            if method is not None and reads_base(method):
                if self.base_index is None:
                    raise self.fail(f"{name!r} was merged with a base, but no base is recorded.")
                needed.add(self.base_index)
        return needed

    def model_paths(
        self,
        models: Sequence[str | os.PathLike[str]] | None,
        base: str | os.PathLike[str] | None,
    ) -> tuple[dict[int, CheckpointSpec], CheckpointSpec | None]:
        """Where to read each model the merge read, and the base (also when only the tensors
        left alone need it, if it can be read: given, or read from disk by the merge)."""
        records = self.lineage.models
        if models is not None and records and len(models) != len(records):
            raise self.fail(
                f"it records {len(records)} models but {len(models)} paths were given; give "
                "one path per model, in index order."
            )
        needed = self.needed()
        if self.aligned:  # every model's vocabulary makes the output's
            needed.update(range(len(records)))
        if (
            self.base_index is not None
            and self.base_index not in needed
            and self.base_readable(models, base)
        ):
            needed.add(self.base_index)
        paths: dict[int, CheckpointSpec] = {}
        base_path = None
        for index in sorted(needed, key=str):
            if index == SEPARATE:
                base_path = self.path_of(self.lineage.base, base, "--base")
            elif models is not None:
                if index >= len(models):
                    raise self.fail(f"models[{index}] contributed but only {len(models)} given.")
                paths[index] = as_spec(models[index])
            else:
                record = records[index] if index < len(records) else None
                paths[index] = self.path_of(record, None, "--models")
        return paths, base_path

    def base_readable(
        self,
        models: Sequence[str | os.PathLike[str]] | None,
        base: str | os.PathLike[str] | None,
    ) -> bool:
        """Whether the base can be read: given, or recorded with a path (a model in memory
        cannot be read again, and is then not compared)."""
        if self.base_index == SEPARATE:
            return base is not None or (
                self.lineage.base is not None and bool(self.lineage.base.path)
            )
        if models is not None:
            return isinstance(self.base_index, int) and self.base_index < len(models)
        records = self.lineage.models
        index = self.base_index
        return isinstance(index, int) and index < len(records) and records[index].path is not None

    def path_of(
        self, record: ModelRecord | None, given: str | os.PathLike[str] | None, option: str
    ) -> CheckpointSpec:
        """The checkpoint a model was read from (a training checkpoint's entry and prefix
        too: ``ckpt.pt::entry=model,prefix=``), as given or as recorded."""
        if given is not None:
            return as_spec(given)
        if record is None:
            raise self.fail(f"it does not record where the models were read from; give {option}.")
        if record.path is None:
            raise self.fail(
                f"{record.describe()} was not read from disk, so it cannot be read again; give "
                f"its checkpoint with {option}."
            )
        # a Hub model (org/name@<commit>) is read from the Hub's cache, fetched if need be
        path = as_spec(locate(record.path)[0] if record.repo is not None else record.path)
        if not path.path.exists():
            raise self.fail(
                f"{record.describe()} was read from {record.path!r}, which does not exist from "
                f"here ({Path.cwd()}); the paths a lineage records are as the merge was given "
                f"them, relative to the folder it ran in: run verify from that folder, or give the "
                f"checkpoints with {option}"
                + (" (and a separate base with --base)." if option == "--models" else ".")
            )
        return path

    def names_in(self, reader: CheckpointReader, merged: str | os.PathLike[str]) -> None:
        missing = [name for name in self.lineage if name not in reader]
        if missing:
            shown = ", ".join(map(repr, missing[:5])) + (", ..." if len(missing) > 5 else "")
            raise self.fail(
                f"it names {len(missing)} merged tensors that the checkpoint {merged} lacks "
                f"({shown}); is it the right checkpoint?"
            )

    def tensor(
        self,
        name: str,
        entry: Any,
        reader: CheckpointReader,
        sources: Mapping[int, Source],
        base: Source | None,
        buffers: ChunkBuffers,
    ) -> list[str]:
        """The problems with one merged tensor (none: it is what the lineage says)."""
        info = reader.info(name)
        method = self.methods[name]
        problems = [] if method is None else self.recorded(entry, method)
        expected = self.written_dtype(name, base)
        if expected is not None and info.dtype != expected:
            problems.append(
                f"the checkpoint holds {dtype_name(info.dtype)}, not {dtype_name(expected)}"
            )
        digests = (self.lineage.digests or {}).get(name)
        written = tensor_digest(reader.view(name))
        if digests is not None:
            problems += self.digests_recorded(entry, method, digests)
            problems += self.sources_changed(name, digests, sources, base)
            if written != digests.output:
                problems.append("the checkpoint's tensor is not the one merged (digest differs)")
        if method is None:
            return [*problems, f"made by the custom method {entry[0]!r}; cannot be recomputed"]
        coefficients = getattr(entry, "coefficients", None)
        if coefficients is not None and len(coefficients) != len(entry[1]):
            return problems  # named by recorded(): no weighing to recompute with
        if name in self.aligned:
            rebuilt = self.aligned_step(name, entry, method, sources, base)
            if isinstance(rebuilt, str):
                return [*problems, f"aligned by token (vocabulary=...): {rebuilt}"]
            step = rebuilt
        else:
            step = self.step(name, entry, method, info.shape, sources, base)
        result = torch.empty(info.shape, dtype=info.dtype)
        with torch.no_grad():
            run_step(step, sources, base, result, buffers)  # type: ignore[arg-type]
        if self.rtol or self.atol:
            problem = self.close(reader.view(name), result)
            return problems + ([] if problem is None else [problem])
        recomputed = tensor_digest(result)
        del result
        if recomputed != written:
            problems.append(
                "the checkpoint's tensor differs from the recomputed one" + _angle_hint(entry)
            )
        elif digests is not None and recomputed != digests.output:
            problems.append("recomputing gives another tensor than the one recorded")
        return problems

    def close(self, written: torch.Tensor, recomputed: torch.Tensor) -> str | None:
        """Whether ``written`` is within ``rtol``/``atol`` of ``recomputed`` (compared in
        float64, a chunk at a time); the problem when it is not."""
        flat_w, flat_r = written.reshape(-1), recomputed.reshape(-1)
        worst, count = 0.0, 0
        for start in range(0, flat_r.numel(), _CLOSE_CHUNK):
            a = flat_w[start : start + _CLOSE_CHUNK].to(torch.float64)
            b = flat_r[start : start + _CLOSE_CHUNK].to(torch.float64)
            near = torch.isclose(a, b, rtol=self.rtol, atol=self.atol, equal_nan=True)
            if not bool(near.all()):
                far = ~near
                count += int(far.sum())
                gap = (a[far] - b[far]).abs().nan_to_num(nan=float("inf"))
                worst = max(worst, float(gap.max()))
        if count == 0:
            return None
        return (
            f"{count} of {flat_r.numel()} values differ from the recomputed ones by more than "
            f"atol={self.atol!r} + rtol={self.rtol!r} x |value| (largest difference {worst:.3g})"
        )

    def written_dtype(self, name: str, base: Source | None) -> torch.dtype | None:
        """The dtype the merge wrote ``name`` in: ``out_dtype`` for a floating tensor, else the
        base's (``None`` when neither is known)."""
        entry = None if base is None else base.entries.get(name)
        out_dtype = self.lineage.out_dtype
        if out_dtype is not None and (entry is None or entry.dtype.is_floating_point):
            return out_dtype
        return None if entry is None else entry.dtype

    def recorded(self, entry: Any, method: Method) -> list[str]:
        """Problems among an entry's own fields: each model once, a seed only for a random
        method, and the weights, coefficients and divisor one consistent weighing."""
        problems = []
        indices = [index for index, _ in entry[1]]
        if len(set(indices)) != len(indices):
            problems.append(f"its contributions name a model twice ({indices})")
        settings = getattr(entry, "settings", {})
        if "seed" in settings and not method.random:
            problems.append(f"it records a seed, but {entry[0]} is not random")
        coefficients = getattr(entry, "coefficients", None)
        divisor = getattr(entry, "divisor", None)
        if not (method.streaming or method.ratios or method.divides):  # given as given
            if coefficients is not None or divisor is not None:
                problems.append(
                    f"it records coefficients or a divisor, which {entry[0]} does not use"
                )
            return problems
        if coefficients is None:
            if divisor is not None:
                problems.append("it records a divisor but no coefficients")
            return problems
        weights = [float(weight) for _, weight in entry[1]]
        problem = _weighing_problem(
            weights, [float(c) for c in coefficients], divisor, self.lineage.dtype
        )
        return problems + ([problem] if problem else [])

    def digests_recorded(
        self, entry: Any, method: Method | None, digests: TensorDigests
    ) -> list[str]:
        """Whether the digests are recorded for the models the entry says were read."""
        wanted = {index for index, _ in entry[1]}
        separate = False
        if method is not None and reads_base(method):
            if isinstance(self.base_index, int):
                wanted.add(self.base_index)
            separate = self.base_index == SEPARATE
        problems = []
        if method is not None and set(digests.models) != wanted:
            problems.append(
                f"its digests are of models {sorted(digests.models)}, but the merge read models "
                f"{sorted(wanted)}"
            )
        if method is not None and (digests.base is not None) != separate:
            problems.append(
                "its digests record a separate base, which the merge did not read"
                if digests.base is not None
                else "its digests lack the separate base the merge read"
            )
        return problems

    def sources_changed(
        self, name: str, digests: TensorDigests, sources: Mapping[int, Source], base: Source | None
    ) -> list[str]:
        """The models (and the separate base) whose tensor is not the one merged. One that lacks
        the tensor is not hashed: where the merge read it, :meth:`step` refuses it as bad input."""
        problems = []
        for index, digest in digests.models.items():
            source = sources.get(index)
            if source is None or name not in source.entries:
                continue
            if tensor_digest(source.get(name)) != digest:
                problems.append(f"models[{index}]'s tensor is not the one merged (digest differs)")
        recorded = digests.base
        if recorded is None or base is None or name not in base.entries:
            return problems
        if tensor_digest(base.get(name)) != recorded:
            problems.append("the base's tensor is not the one merged (digest differs)")
        return problems

    def step(
        self,
        name: str,
        entry: Any,
        method: Method,
        shape: torch.Size,
        sources: Mapping[int, Source],
        base: Source | None,
    ) -> Step:
        step = step_from_entry(name, entry, method)
        holders: list[tuple[ModelIndex, Source]] = [(i, sources[i]) for i in step.contributors]
        if step.uses_base and base is not None and self.base_index is not None:
            holders.append((self.base_index, base))
        for index, source in holders:
            if not source.holds(name, shape):
                label = getattr(source, "label", f"models[{index}]")
                where = "the base" if index == SEPARATE else label
                has = source.entries.get(name)
                found = "no such tensor" if has is None else f"shape {tuple(has.shape)}"
                raise self.fail(
                    f"{name!r} (shape {tuple(shape)} in the checkpoint) was merged from "
                    f"{where}, but {getattr(source, 'path', where)} has {found}; are these the "
                    "models that were merged?"
                )
        return step

    def left_alone(
        self, reader: CheckpointReader, base: Source | None, buffers: ChunkBuffers
    ) -> list[tuple[str, str]]:
        """Problems with the tensors the lineage says were left as in the base: each must be
        the base's tensor, cast as the merge cast it (not compared when the base cannot be
        read); a tied name the checkpoint holds must hold what its first name holds."""
        problems = []
        for name, reason in self.lineage.skipped.items():
            if name in self.lineage:
                problems.append((name, f"the lineage both merged it and left it alone ({reason})"))
            elif reason == TIED:
                first = self.lineage.tied.get(name)
                if first is None:
                    problems.append((name, "left alone as tied, but tied to no name"))
                elif name in reader and first in reader and not _same(reader, name, first):
                    problems.append((name, f"tied to {first!r}, but holds another tensor"))
            elif reason != NOT_A_TENSOR and base is not None:
                problem = self.copied(name, reason, reader, base, buffers)
                if problem is not None:
                    problems.append((name, problem))
        return problems

    def copied(
        self,
        name: str,
        reason: str,
        reader: CheckpointReader,
        base: Source,
        buffers: ChunkBuffers,
    ) -> str | None:
        """The problem with one tensor left as in the base, if any."""
        if name not in reader:
            return f"left as in the base ({reason}), but the checkpoint lacks it"
        if name not in base.entries:
            return f"left as in the base ({reason}), but the base has no such tensor"
        original = base.get(name)
        info = reader.info(name)
        if info.shape != original.shape:
            return (
                f"left as in the base ({reason}), but the checkpoint's shape "
                f"{tuple(info.shape)} is not the base's {tuple(original.shape)}"
            )
        expected = self.written_dtype(name, base)
        if info.dtype != expected:
            return f"the checkpoint holds {dtype_name(info.dtype)}, not {dtype_name(expected)}"
        if original.dtype != info.dtype:  # cast as the merge cast it: rounded once
            cast = torch.empty(info.shape, dtype=info.dtype)
            with torch.no_grad():
                store_whole(cast, original.detach(), buffers)
            original = cast
        if tensor_digest(original) != tensor_digest(reader.view(name)):
            return f"left as in the base ({reason}), but the checkpoint's tensor is not the base's"
        return None

    def unaccounted(self, reader: CheckpointReader) -> list[tuple[str, str]]:
        """Tensors the checkpoint holds that the lineage neither merged nor left alone."""
        known = set(self.lineage) | set(self.lineage.skipped)
        return [
            (name, "the checkpoint holds it, but the lineage neither merged it nor left it alone")
            for name in reader.names()
            if name not in known
        ]


def _same(reader: CheckpointReader, name: str, other: str) -> bool:
    """Whether two names of the checkpoint hold the same bytes."""
    return tensor_digest(reader.view(name)) == tensor_digest(reader.view(other))


def _weighing_problem(
    weights: list[float],
    coefficients: list[float],
    divisor: float | None,
    dtype: torch.dtype | None,
) -> str | None:
    """Whether the recorded weights follow from the coefficients and divisor the kernel used,
    as :func:`terge.plan` weighs them: as given (no divisor), equal (all coefficients 1, the
    divisor their count), or the coefficients over their sum in the accumulation dtype."""
    dtype = dtype or torch.float64
    shown = f"weights {weights}, coefficients {coefficients} and divisor {divisor!r}"
    if len(coefficients) != len(weights):
        return f"its {shown} do not pair up (one coefficient per contribution)"
    if divisor is None:
        ok = weights == coefficients
        why = "without a divisor, the weights are the coefficients"
    elif all(c == 1.0 for c in coefficients) and divisor == len(coefficients):
        count = len(coefficients)
        tolerance = _TOLERANCE_ULPS * count * torch.finfo(dtype).eps
        ok = len(set(weights)) == 1 and abs(weights[0] * count - 1) <= tolerance
        why = "equal coefficients mean equal weights that sum to 1"
    else:
        vector = torch.tensor(coefficients, dtype=dtype)
        total = vector.sum()
        ok = total.item() == divisor and (vector / total).tolist() == weights
        why = "the divisor is the coefficients' sum and the weights are the coefficients over it"
    if ok:
        return None
    return f"its {shown} disagree ({why}); the lineage was edited"


# --- show -----------------------------------------------------------------------------------------

SHOWN_GROUPS = 8
"""Groups listed per section of :func:`summary` (the most common first)."""
SHOWN_NAMES = 3
"""Example names per group."""


def summary(lineage: Lineage, title: str = "lineage") -> str:
    """A readable account of a lineage: models, dtypes, how many tensors each method and each
    weight pattern made, what was left alone and why, and the versions."""
    versions = f"terge {lineage.terge_version or '?'}, torch {lineage.torch_version or '?'}"
    lines = [f"{title}: written by {versions}"]
    lines += _models_lines(lineage)
    if lineage.chosen is not None:
        ranked = len(lineage.chosen["candidates"])
        lines.append(
            f"chosen: {lineage.chosen['rule']}, of {_count(ranked, 'candidate')} in "
            f"{lineage.chosen['from']}"
        )
    written = dtype_name(lineage.out_dtype) or "each tensor's own dtype"
    lines.append(f"accumulated in {dtype_name(lineage.dtype) or '?'}, written in {written}")
    lines.append(f"merged: {_count(len(lineage), 'tensor')}")
    by_method = _groups(lineage, lambda entry: _method_text(entry))
    lines += _group_lines(by_method, "by method")
    by_weights = _groups(lineage, lambda entry: _weights_text(entry[1]))
    lines += _group_lines(by_weights, "by weights")
    if lineage.vocabulary is not None:
        lines.append("vocabulary: " + _vocabulary_text(lineage.vocabulary))
    lines.append(f"left alone: {_count(len(lineage.skipped), 'tensor')}")
    by_reason: dict[str, list[str]] = {}
    for name, reason in lineage.skipped.items():
        by_reason.setdefault(reason, []).append(name)
    lines += _group_lines(by_reason, "by reason")
    if lineage.tied:
        pairs = [f"{alias} -> {name}" for alias, name in lineage.tied.items()]
        lines.append(f"tied: {_examples(pairs)}")
    if lineage.unused:
        lines.append(
            f"unused: {_count(len(lineage.unused), 'tensor')} other models hold under names the "
            f"base lacks, e.g. {_examples(list(lineage.unused))}"
        )
    if lineage.stack is not None:
        lines += _stack_lines(lineage.stack)
    digests = lineage.digests
    lines.append(
        "digests: not recorded"
        if digests is None
        else f"digests: recorded for {_count(len(digests), 'tensor')}"
    )
    return "\n".join(lines) + "\n"


def _vocabulary_text(vocabulary: Mapping[str, Any]) -> str:
    """``union, 50417 rows (models[1] added 64 tokens); aligned by token: ...``."""
    source = vocabulary["source"]
    source = source if isinstance(source, str) else f"models[{source}]'s"
    added = [f"models[{i}] added {n}" for i, n in sorted(vocabulary.get("added", {}).items())]
    aligned = list(vocabulary.get("tensors", {}))
    return (
        f"{source}, {vocabulary['rows']} rows"
        + (f" ({', '.join(added)} tokens)" if added else "")
        + (f"; aligned by token: {_examples(aligned)}" if aligned else "")
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _stack_lines(stack: Mapping[str, Any]) -> list[str]:
    """A stack's blocks, runs of consecutive copied blocks of one model on one line."""
    blocks = stack["blocks"]
    merged = sum(block["method"] != "passthrough" for block in blocks)
    lines = [
        f"stacked: {_count(len(blocks), 'block')} ({merged} merged), embeddings from "
        f"models[{stack['base']}], head from models[{stack.get('head', stack['base'])}]"
    ]
    i = 0
    while i < len(blocks):
        block = blocks[i]
        j = i + 1
        if block["method"] == "passthrough":
            model, first = block["sources"][0][0], block["sources"][0][1]
            while (
                j < len(blocks)
                and blocks[j]["method"] == "passthrough"
                and blocks[j]["sources"][0][:2] == [model, first + j - i]
            ):
                j += 1
            span = f"{i}" if j == i + 1 else f"{i}-{j - 1}"
            source = f"{first}" if j == i + 1 else f"{first}-{first + j - i - 1}"
            lines.append(f"  blocks {span}: models[{model}] blocks {source}")
        else:
            lines.append(f"  block {i}: {_block_text(block)}")
        i = j
    return lines


def _models_lines(lineage: Lineage) -> list[str]:
    if not lineage.models:
        return ["models: not recorded"]
    lines = ["models:"]
    for record in lineage.models:
        where = "(in memory)" if record.path is None else record.path
        mark = "  (base)" if record == lineage.base else ""
        lines.append(f"  {record.index:>3}  {record.kind:<10}  {where}{mark}")
    if lineage.base is not None and lineage.base.index == SEPARATE:
        where = "(in memory)" if lineage.base.path is None else lineage.base.path
        lines.append(f"  base {lineage.base.kind:<10}  {where}  (separate)")
    return lines


def _method_text(entry: Any) -> str:
    settings = getattr(entry, "settings", {})
    return f"{entry[0]} ({_settings_text(settings)})" if settings else str(entry[0])


def _weights_text(contributions: Sequence[tuple[int, float]]) -> str:
    return "models " + ", ".join(f"{index}: {weight!r}" for index, weight in contributions)


def _groups(lineage: Lineage, key: Any) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name, entry in lineage.items():
        groups.setdefault(key(entry), []).append(name)
    return groups


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN_NAMES])
    return shown + (f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else "")


def _group_lines(groups: Mapping[str, list[str]], heading: str) -> list[str]:
    if not groups:
        return []
    ordered = sorted(groups.items(), key=lambda item: -len(item[1]))  # stable: first seen first
    width = len(str(len(ordered[0][1])))
    lines = [f"  {heading}:"]
    for text, names in ordered[:SHOWN_GROUPS]:
        lines.append(f"    {len(names):>{width}}  {text}  e.g. {_examples(names)}")
    if len(ordered) > SHOWN_GROUPS:
        lines.append(f"    ... and {len(ordered) - SHOWN_GROUPS} more groups")
    return lines
