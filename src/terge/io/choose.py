"""Choosing checkpoints from a run: the last N, or the best N by a metric.

``choose("runs/checkpoint-*", last=5)`` lists the candidates (a glob, a folder, or a list of
paths), orders them by what the trainer recorded, and returns the chosen paths as a
:class:`Chosen`: a tuple of paths, newest (or best) first, that ``terge.merge`` takes as its
``models`` and whose rule, candidates and choice go into the lineage (``lineage.chosen``).

**Candidates.** A glob's matches, a list's paths, or a run's folder: its Trainer
``checkpoint-N/`` folders if it has any, else its checkpoint files (``.ckpt``, ``.pt``,
``.pth``, ``.bin``, ``.safetensors``; not a trainer's ``optimizer.pt`` and such). Lightning's
``last.ckpt`` (a copy of the newest) is left out, and a file reached twice counts once.

**Last N.** Ordered by the trainer's own record where every candidate has one: the
``global_step`` of a Hugging Face ``trainer_state.json`` or of a Lightning ``.ckpt``; else the
first of ``step``, ``num_updates``, ``epoch`` that every torch checkpoint holds at its top level
(fairseq's ``optimizer_history[-1]["num_updates"]`` counts as ``num_updates``). Otherwise by
name, in natural order (``epoch=9`` before ``epoch=10``, ``checkpoint-500`` before
``checkpoint-1000``); a name without a number cannot be ordered and is an error.

**Best N by a metric.** Each candidate's value, from the first of: Lightning's
``ModelCheckpoint`` record (``best_k_models`` of the callback monitoring the metric, in any
candidate); the ``trainer_state.json`` ``log_history`` entry at the checkpoint's step (named as the
Trainer's ``metric_for_best_model``: ``loss`` means ``eval_loss``); a ``metric=value`` in the file's
name (Lightning's filename templates); a number at the checkpoint's top level or in fairseq's
``extra_state``. ``mode`` (``"min"``/``"max"``) defaults to the ``ModelCheckpoint``'s own mode,
else ``"min"`` for a metric whose name ends in ``loss`` (the Trainer's rule); otherwise it must be
given. A candidate without a value is an error that names it.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .parsing import ParseProblem, decode_utf8, read_capped
from .training import (
    LIGHTNING_VERSION,
    STATE_FILES,
    is_state_dict,
    refused_error,
    refused_globals,
)

TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
_LIGHTNING_LAST = re.compile(r"last(-v\d+)?\.ckpt")
"""Lightning's ``save_last`` copy (or link) of the newest checkpoint: left out of the
candidates, which would otherwise hold the newest twice."""
_HF_CHECKPOINT = re.compile(r"checkpoint-\d+")
_RECORD_KEYS = ("global_step", "step", "num_updates", "epoch")
_MAX_STATE_BYTES = 1 << 28


class Chosen(tuple):
    """The chosen checkpoints' paths, newest (or best) first, so that ``base=0`` (which keeps
    the tensors no average makes, such as integer counters) is the newest (the best).

    ``rule`` says how they were chosen (``"last 5 by global_step"``), ``source`` from what, and
    ``candidates`` every candidate as ``(path, value)`` in the order the rule ranked them (the
    value it ranked by; ``None`` when ranked by name). ``record()`` is what the lineage keeps.
    """

    rule: str
    source: str
    candidates: tuple[tuple[str, float | None], ...]

    def __new__(
        cls,
        chosen: Sequence[str],
        rule: str,
        source: str,
        candidates: Sequence[tuple[str, float | None]],
    ) -> Chosen:
        self = super().__new__(cls, chosen)
        self.rule, self.source, self.candidates = rule, source, tuple(candidates)
        return self

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle
        return (tuple(self), self.rule, self.source, self.candidates)

    def record(self) -> dict[str, Any]:
        """``{"rule", "from", "candidates": [{"path", "value"}], "chosen": [path, ...]}``."""
        return {
            "rule": self.rule,
            "from": self.source,
            "candidates": [{"path": path, "value": value} for path, value in self.candidates],
            "chosen": list(self),
        }

    def __repr__(self) -> str:
        return f"Chosen({list(self)!r}, rule={self.rule!r})"


# --- candidates -----------------------------------------------------------------------------------


def _is_checkpoint_file(path: Path) -> bool:
    return path.name.endswith(_CHECKPOINT_SUFFIXES) and not STATE_FILES.fullmatch(path.name)


def _folder_candidates(folder: Path) -> list[Path]:
    """A run's folder: its Trainer ``checkpoint-N/`` folders if it has any, else its checkpoint
    files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``, ``.safetensors``, not a trainer's state)."""
    entries = sorted(folder.iterdir())
    folders = [p for p in entries if p.is_dir() and _HF_CHECKPOINT.fullmatch(p.name)]
    return folders or [p for p in entries if p.is_file() and _is_checkpoint_file(p)]


def candidates_of(source: str | os.PathLike[str] | Sequence[Any]) -> tuple[str, list[Path]]:
    """What ``source`` names (as text, for the lineage) and its candidates: a list of paths, a
    folder (see :func:`_folder_candidates`) or a glob. Lightning's ``last.ckpt`` is left out
    where other candidates remain, and each file counts once (links followed)."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir():
            found = _folder_candidates(path)
        elif path.exists():
            found = [path]
        else:
            found = [Path(p) for p in sorted(glob.glob(os.path.expanduser(text)))]
            found = [p for p in found if p.is_dir() or _is_checkpoint_file(p)]
    elif isinstance(source, Sequence) and not isinstance(source, bytes):
        text = ", ".join(map(os.fspath, source))
        found = [Path(os.fspath(p)).expanduser() for p in source]
        missing = [p for p in found if not p.exists()]
        if missing:
            raise CheckpointError(f"{missing[0]} does not exist; choose among existing paths.")
    else:
        raise CheckpointError(
            f"choose() takes a glob ('runs/checkpoint-*'), a folder or a list of paths; got "
            f"{type(source).__name__}."
        )
    kept = [p for p in found if not _LIGHTNING_LAST.fullmatch(p.name)] or found
    unique: dict[Path, Path] = {}
    for path in kept:
        unique.setdefault(path.resolve(), path)
    if not unique:
        raise CheckpointError(
            f"{text!r} names no checkpoint: no file or folder matches it (a glob such as "
            "'runs/checkpoint-*', a run's folder, or checkpoint paths).",
            text,
        )
    return text, list(unique.values())


# --- what the trainer recorded --------------------------------------------------------------------


@dataclass
class _Record:
    """What one candidate's trainer recorded: its top-level numbers and its metric sources."""

    path: Path
    numbers: dict[str, float]
    log: list[Mapping[str, Any]]
    monitors: dict[str, tuple[str, dict[str, float]]]
    """Lightning's ModelCheckpoint records: monitor -> (mode, {file name: score})."""


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _trainer_state(folder: Path) -> dict[str, Any] | None:
    path = folder / TRAINER_STATE
    if not path.is_file():
        return None
    try:  # json, not terge's strict reader: a Trainer logs NaN (a diverged loss) as NaN
        data = json.loads(decode_utf8(read_capped(path, _MAX_STATE_BYTES), TRAINER_STATE))
    except (OSError, ParseProblem, ValueError, RecursionError) as problem:
        raise CheckpointError(f"cannot read {path}: {problem}.", path) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; it is no trainer state.", path)
    return data


def _loaded(path: Path) -> Any:
    """A torch checkpoint's objects, memory-mapped: no tensor data is read."""
    try:
        return torch.load(
            path, mmap=zipfile.is_zipfile(path), weights_only=True, map_location="cpu"
        )
    except Exception as error:
        refused = refused_globals(path, error)
        if refused:
            raise refused_error(path, refused) from None
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) cannot read it ({type(error).__name__}); "
            "the file is truncated or corrupt.",
            path,
        ) from None


_MODE = re.compile(r"'mode': '(min|max)'")


def _monitors(callbacks: Any) -> dict[str, tuple[str, dict[str, float]]]:
    """Lightning's ModelCheckpoint states in a ``.ckpt``'s ``callbacks`` entry."""
    found: dict[str, tuple[str, dict[str, float]]] = {}
    if not isinstance(callbacks, Mapping):
        return found
    for key, state in callbacks.items():
        if not (isinstance(key, str) and key.startswith("ModelCheckpoint")):
            continue
        if not isinstance(state, Mapping) or not isinstance(state.get("monitor"), str):
            continue
        mode = _MODE.search(key)
        scores = {}
        for file, score in (state.get("best_k_models") or {}).items():
            value = _number(score)
            if isinstance(file, str) and value is not None:
                scores[Path(file).name] = value
        found[state["monitor"]] = (mode.group(1) if mode else "", scores)
    return found


def _record(path: Path) -> _Record:
    if path.is_dir():
        state = _trainer_state(path) or {}
        numbers = {
            k: v for k in ("global_step", "epoch") if (v := _number(state.get(k))) is not None
        }
        log = [e for e in state.get("log_history") or [] if isinstance(e, Mapping)]
        return _Record(path, numbers, log, {})
    if path.name.endswith(".safetensors"):
        return _Record(path, {}, [], {})
    loaded = _loaded(path)
    if not isinstance(loaded, Mapping) or is_state_dict(loaded):  # a model's tensors, no record
        return _Record(path, {}, [], {})
    numbers = _numbers(loaded)
    history = loaded.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], Mapping):
        updates = _number(history[-1].get("num_updates"))
        if updates is not None:
            numbers.setdefault("num_updates", updates)
    extra = loaded.get("extra_state")
    if isinstance(extra, Mapping):
        numbers = {**_numbers(extra), **numbers}
    monitors = _monitors(loaded.get("callbacks")) if LIGHTNING_VERSION in loaded else {}
    return _Record(path, numbers, [], monitors)


def _numbers(mapping: Mapping[Any, Any]) -> dict[str, float]:
    """The entries of ``mapping`` that are numbers (or scalar tensors), by name."""
    found = {}
    for key, value in mapping.items():
        number = _number(value)
        if isinstance(key, str) and number is not None:
            found[key] = number
    return found


# --- ordering -------------------------------------------------------------------------------------


def natural_key(name: str) -> tuple[Any, ...]:
    """``epoch=9`` before ``epoch=10``: digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def _by_record(records: list[_Record]) -> tuple[str, list[tuple[Path, float | None]]] | None:
    for key in _RECORD_KEYS:
        if all(key in r.numbers for r in records):
            ranked = sorted(records, key=lambda r: (r.numbers[key], natural_key(r.path.name)))
            return key, [(r.path, r.numbers[key]) for r in ranked]
    return None


def _last(records: list[_Record], count: int) -> tuple[str, list[tuple[Path, float | None]]]:
    by_record = _by_record(records)
    if by_record is not None:
        key, ranked = by_record
        return f"last {count} by {key}", ranked
    unnumbered = [r.path.name for r in records if not re.search(r"\d", r.path.name)]
    if unnumbered:
        raise CheckpointError(
            f"cannot order {', '.join(map(repr, unnumbered[:5]))}: no trainer record of a step "
            "or epoch (trainer_state.json's global_step, a .ckpt's global_step, a checkpoint's "
            "step/num_updates/epoch) and no number in the name; leave it out (a narrower glob) "
            "or choose by --best/best= instead.",
            records[0].path,
        )
    by_name = sorted(records, key=lambda r: natural_key(r.path.name))
    return f"last {count} by name (natural order)", [(r.path, None) for r in by_name]


def _name_value(name: str, metric: str) -> float | None:
    found = re.search(rf"(?:^|[^\w.]){re.escape(metric)}=(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", name)
    if found is None:
        return None
    return float(found.group(1).rstrip("."))


def _log_value(record: _Record, metric: str) -> float | None:
    """The metric logged at the checkpoint's step; named as the Trainer names it for
    ``metric_for_best_model`` (``loss`` is ``eval_loss``: an evaluation, never the training
    loss logged at the same step)."""
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    step = record.numbers.get("global_step")
    for entry in reversed(record.log):
        value = _number(entry.get(key))
        if value is not None and (step is None or entry.get("step") == step):
            return value
    return None


def _metric_of(
    record: _Record, metric: str, scores: Mapping[str, float]
) -> tuple[float | None, str]:
    """One candidate's value of ``metric``, and where it was found."""
    if record.path.name in scores:
        return scores[record.path.name], "ModelCheckpoint"
    value = _log_value(record, metric)
    if value is not None:
        return value, TRAINER_STATE
    value = _name_value(record.path.name, metric)
    if value is not None:
        return value, "name"
    value = record.numbers.get(metric)
    return (value, "checkpoint") if value is not None else (None, "")


def _monitored(records: list[_Record], metric: str | None) -> tuple[str | None, str, dict]:
    """The metric (Lightning's one monitor when none is given), its recorded mode, and every
    candidate's Lightning score by file name."""
    monitors = {name for r in records for name in r.monitors}
    if metric is None:
        if len(monitors) != 1:
            seen = f"; the checkpoints monitor {', '.join(sorted(monitors))}" if monitors else ""
            raise CheckpointError(
                "best= needs the metric to rank by: pass metric= (--metric), e.g. "
                f"metric='eval_loss'{seen}.",
                records[0].path,
            )
        metric = monitors.pop()
    mode, scores = "", {}
    for record in records:  # newer records know more; later candidates win
        if metric in record.monitors:
            mode, found = record.monitors[metric]
            scores.update(found)
    return metric, mode, scores


def _best(
    records: list[_Record], count: int, metric: str | None, mode: str | None
) -> tuple[str, list[tuple[Path, float | None]]]:
    metric, recorded_mode, scores = _monitored(records, metric)
    assert metric is not None
    values = {}
    sources = set()
    for record in records:
        value, where = _metric_of(record, metric, scores)
        if value is None:
            raise CheckpointError(
                f"{record.path} records no value of {metric!r} (not in a ModelCheckpoint's "
                f"best_k_models, {TRAINER_STATE}'s log_history at its step, its name as "
                f"{metric}=VALUE, nor its top-level numbers: "
                f"{', '.join(sorted(record.numbers)) or 'none'}); check the metric's name, or "
                "leave the checkpoint out.",
                record.path,
            )
        values[record.path] = value
        sources.add(where)
    if mode is None:
        mode = recorded_mode or ("min" if metric.endswith("loss") else None)
        if mode is None:
            raise CheckpointError(
                f"is a higher {metric!r} better or a lower one? Pass mode='max' or mode='min' "
                "(--mode); only a metric whose name ends in 'loss' is taken as lower-is-better.",
                records[0].path,
            )
    ranked = sorted(
        records,
        key=lambda r: (
            -values[r.path] if mode == "max" else values[r.path],
            natural_key(r.path.name),
        ),
    )
    where = " and ".join(sorted(sources))
    rule = f"best {count} by {metric} ({mode}, from {where})"
    return rule, [(r.path, values[r.path]) for r in ranked]


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(
            f"`{name}` must be a number of checkpoints (an int >= 1); got {value!r}."
        )
    return value


def choose(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    last: int | None = None,
    best: int | None = None,
    metric: str | None = None,
    mode: str | None = None,
) -> Chosen:
    """The ``last`` N checkpoints of a run, or the ``best`` N by ``metric``: see the module.

    ``source`` is a glob (``"runs/checkpoint-*"``, ``"ckpts/*.ckpt"``), a run's folder or a list
    of paths. Returns a :class:`Chosen` (the paths, newest or best first) that ``terge.merge``
    takes as ``models`` and records in ``lineage.chosen``; fewer candidates than asked for are
    all chosen.
    """
    if (last is None) == (best is None):
        raise CheckpointError("choose() takes one of last=N and best=N.")
    if best is None and (metric is not None or mode is not None):
        raise CheckpointError("metric= and mode= rank the best checkpoints; pass best=N too.")
    if mode is not None and mode not in ("min", "max"):
        raise CheckpointError(f"`mode` must be 'min' or 'max'; got {mode!r}.")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise CheckpointError(
            f"`metric` must be a metric's name such as 'val_loss'; got {metric!r}."
        )
    text, paths = candidates_of(source)
    records = [_record(path) for path in paths]
    if last is not None:
        count = _count(last, "last")
        rule, ranked = _last(records, count)
        chosen = [path for path, _ in ranked[::-1][:count]]
    else:
        count = _count(best, "best")
        rule, ranked = _best(records, count, metric, mode)
        chosen = [path for path, _ in ranked[:count]]
    return Chosen(
        [os.fspath(p) for p in chosen],
        rule,
        text,
        [(os.fspath(path), value) for path, value in ranked],
    )
