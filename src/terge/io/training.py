"""Training checkpoints as models: the model state dict inside what a training job saves.

Training scripts save more than the model: ``{"model": ..., "optimizer": ..., "epoch": ...}``
(fairseq's ``model``, torchvision's and many scripts' too), Lightning's ``.ckpt``
(``state_dict``, its names prefixed by the LightningModule's attribute, ``model.``), timm's
``state_dict`` and ``state_dict_ema``. :func:`select` finds the model's state dict in what
``torch.load`` returned; a :class:`CheckpointSpec` (``terge.checkpoint(path, entry=...,
prefix=...)``, or the text ``"path::entry=state_dict_ema,prefix=model."``) says which entry and
prefix to take where the choice is not automatic.

The rules, in order:

* a mapping of ``str`` names to tensors is a plain state dict: taken as it is;
* a file Lightning wrote (it records ``pytorch-lightning_version``) holds its model in
  ``state_dict``, by Lightning's own definition (with ``WeightAveraging`` that is the average; the
  training weights are under ``current_model_state``): taken, and when every name there starts
  with one attribute (``model.``) that prefix is stripped, so the names are the inner module's;
* otherwise the *candidates* are the top-level entries that are plain state dicts (a mapping of
  ``str`` to tensors, not all of them scalars: ``{"acc": tensor(0.9)}`` is no model): exactly one
  is taken; none, or several (timm's ``state_dict`` and ``state_dict_ema``), is an error that lists
  them and says how to choose. Nothing else is guessed; a nested entry is named with ``/``
  (``entry="ema/model"``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from ..errors import CheckpointError

SEPARATOR = "::"
"""Between a checkpoint's path and its options in the text form: ``ckpt.pt::entry=model``."""
_OPTIONS = ("entry", "prefix")
STATE_FILES = re.compile(
    r"training_args\.bin|(optimizer|scheduler|scaler)(_\d+)?\.(pt|bin)|rng_state.*\.pth"
    r"|(sampler|dl_state_dict)(_\d+)?\.bin"
)
"""Files a Hugging Face Trainer (``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``training_args.bin``, ...) or accelerate's ``save_state`` (``optimizer.bin``,
``scheduler_1.bin``, ``sampler.bin``, ...) leaves beside the weights; they hold no model tensors."""
LIGHTNING_VERSION = "pytorch-lightning_version"
"""The key every checkpoint Lightning writes holds (``lightning`` and ``pytorch_lightning``)."""


@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint file and which model state dict in it to read (``terge.checkpoint``).

    ``entry``: the keys leading to the state dict (``("state_dict_ema",)``; ``None``: found
    automatically). ``prefix``: only names starting with it are read, with it stripped
    (``"model."``); ``""`` strips nothing; ``None``: automatic (Lightning's attribute prefix).
    ``str(spec)`` is the text form, ``path::entry=...,prefix=...``, which terge reads wherever a
    path goes (the command line, recipes, lineage files).
    """

    path: Path
    entry: tuple[str, ...] | None = None
    prefix: str | None = None

    def __str__(self) -> str:
        options = []
        if self.entry is not None:
            options.append(f"entry={'/'.join(self.entry)}")
        if self.prefix is not None:
            options.append(f"prefix={self.prefix}")
        text = os.fspath(self.path)
        return text + (SEPARATOR + ",".join(options) if options else "")


CheckpointLike = Union[str, "os.PathLike[str]", CheckpointSpec]


def checkpoint(
    path: str | os.PathLike[str],
    *,
    entry: str | Sequence[str] | None = None,
    prefix: str | None = None,
) -> CheckpointSpec:
    """Name the model state dict to read from a training checkpoint, wherever a path goes.

    ``terge.merge([terge.checkpoint("a.pth", entry="state_dict_ema"), ...])``. ``entry`` is a
    top-level key (``"state_dict_ema"``), a ``/``-separated path of keys (``"ema/model"``), or a
    sequence of keys; ``prefix`` keeps only the names starting with it and strips it (``""``: keep
    names as they are). Left out, each is found as the module :mod:`terge.io.training` says.
    """
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, CheckpointSpec):
        raise CheckpointError(
            f"terge.checkpoint() takes the path of a checkpoint file (str or os.PathLike); got "
            f"{type(path).__name__}."
        )
    keys: tuple[str, ...] | None
    if entry is None:
        keys = None
    elif isinstance(entry, str):
        keys = tuple(entry.split("/")) if entry else ()  # "": the top level
    elif isinstance(entry, Sequence) and all(isinstance(key, str) for key in entry):
        keys = tuple(entry)
    else:
        keys = ("",)  # refused below
    if keys is not None and not all(keys):
        raise CheckpointError(
            f"`entry` must name an entry of the checkpoint: a key such as 'state_dict_ema', keys "
            f"separated by '/' ('ema/model'), or a list of keys; got {entry!r}.",
            path,
        )
    if prefix is not None and not isinstance(prefix, str):
        raise CheckpointError(
            f"`prefix` must be a str such as 'model.' (or '' to keep names as they are); got "
            f"{prefix!r}.",
            path,
        )
    return CheckpointSpec(Path(path).expanduser(), keys, prefix)


def parse_spec(text: str) -> CheckpointSpec | None:
    """``PATH::OPTIONS`` as a spec (``None`` for a plain path).

    OPTIONS is ``entry=KEYS``, ``prefix=PREFIX`` or both, separated by a comma, or a bare entry
    (``ckpt.pth::state_dict_ema``). A path that exists as written is a path, ``::`` or not.
    """
    if SEPARATOR not in text or Path(text).expanduser().exists():
        return None
    path, _, rest = text.rpartition(SEPARATOR)
    if not path:
        raise CheckpointError(f"{text!r}: no path before {SEPARATOR!r}; write PATH::entry=KEY.")
    options: dict[str, str] = {}
    items = rest.split(",")
    if len(items) == 1 and "=" not in rest:
        options["entry"] = rest
    else:
        for item in items:
            key, equals, value = item.partition("=")
            key = key.strip()
            if not equals or key not in _OPTIONS or key in options:
                raise CheckpointError(
                    f"{text!r}: cannot read the options {rest!r} after {SEPARATOR!r}; write "
                    "PATH::ENTRY, or PATH::entry=KEY[/KEY...],prefix=PREFIX (each at most once), "
                    "e.g. 'ckpt.pth::entry=state_dict_ema' or 'epoch=3.ckpt::prefix=model.'.",
                    path,
                )
            options[key] = value
    return checkpoint(path, entry=options.get("entry"), prefix=options.get("prefix"))


def as_spec(model: CheckpointLike) -> CheckpointSpec:
    """Any checkpoint reference (a spec, a path, or ``PATH::OPTIONS`` text) as a spec."""
    if isinstance(model, CheckpointSpec):
        return model
    parsed = parse_spec(os.fspath(model))
    return parsed if parsed is not None else CheckpointSpec(Path(model).expanduser())


# --- finding the state dict ---------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What was read from a training checkpoint: the entry's keys and the prefix stripped."""

    entry: tuple[str, ...]
    prefix: str


def _describe(value: Any) -> str:
    """A short description of an entry, for listings: ``dict of 12 tensors``, ``int``."""
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    if isinstance(value, Mapping):
        tensors = sum(isinstance(item, torch.Tensor) for item in value.values())
        return f"{type(value).__name__} of {len(value)} entries ({tensors} tensors)"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def is_state_dict(value: Any) -> bool:
    """Whether ``value`` maps ``str`` names to tensors only (an empty mapping counts)."""
    return isinstance(value, Mapping) and all(
        isinstance(name, str) and isinstance(item, torch.Tensor) for name, item in value.items()
    )


def is_candidate(value: Any) -> bool:
    """Whether an entry may hold a model: a state dict with a tensor that is not a scalar."""
    return is_state_dict(value) and bool(value) and any(t.dim() > 0 for t in value.values())


def _how_to_choose(path: Path, names: Sequence[str]) -> str:
    example = names[0] if names else "KEY"
    return (
        f"choose one with terge.checkpoint({str(path)!r}, entry={example!r}) or the path "
        f"'{path}{SEPARATOR}{example}' (command line, recipes)"
    )


def _listing(loaded: Mapping[Any, Any]) -> str:
    shown = [f"{key!r} ({_describe(value)})" for key, value in list(loaded.items())[:12]]
    return ", ".join(shown) + (", ..." if len(loaded) > 12 else "")


def _automatic_entry(loaded: Mapping[Any, Any], path: Path) -> tuple[str, ...]:
    """The entry holding the model, where the file says so unambiguously (see the module)."""
    if LIGHTNING_VERSION in loaded and is_state_dict(loaded.get("state_dict")):
        return ("state_dict",)
    candidates = [key for key, value in loaded.items() if is_candidate(value)]
    if len(candidates) == 1:
        return (candidates[0],)
    if not candidates:
        raise CheckpointError(
            f"{path} holds no model state dict: neither is it a mapping of str names to tensors, "
            f"nor is any of its entries one (it holds {_listing(loaded) or 'nothing'}). Save "
            "model.state_dict() (or safetensors); for a state dict nested deeper, "
            + _how_to_choose(path, ["outer/inner"])
            + ".",
            path,
        )
    listed = ", ".join(f"{key!r} ({_describe(loaded[key])})" for key in candidates)
    raise CheckpointError(
        f"{path} holds {len(candidates)} model state dicts, {listed}, and terge does not guess "
        f"which is the model; {_how_to_choose(path, candidates)}.",
        path,
    )


def _entry(loaded: Mapping[Any, Any], keys: tuple[str, ...], path: Path) -> Mapping[str, Any]:
    """The state dict at ``keys``; a missing key or a value that is not one lists what is."""
    value: Any = loaded
    for depth, key in enumerate(keys):
        where = "/".join(keys[: depth + 1])
        if not isinstance(value, Mapping) or key not in value:
            inside = "/".join(keys[:depth]) or "the top level"
            available = _listing(value) if isinstance(value, Mapping) else _describe(value)
            candidates = (
                [k for k, v in value.items() if is_candidate(v)]
                if isinstance(value, Mapping)
                else []
            )
            hint = f"; the model state dicts there: {', '.join(map(repr, candidates))}"
            raise CheckpointError(
                f"{path} has no entry {where!r} (entry={'/'.join(keys)!r}); {inside} holds "
                f"{available or 'nothing'}{hint if candidates else ''}.",
                path,
            )
        value = value[key]
    if not is_state_dict(value):
        bad = (
            next((k for k, v in value.items() if not isinstance(v, torch.Tensor)), None)
            if isinstance(value, Mapping)
            else None
        )
        detail = f", e.g. {bad!r} is a {type(value[bad]).__name__}" if bad is not None else ""
        raise CheckpointError(
            f"{path}: the entry {'/'.join(keys)!r}{' (the top level)' if not keys else ''} is a "
            f"{_describe(value)}, not a state dict "
            f"mapping str names to tensors only{detail}; name the entry that holds the model's "
            "state dict.",
            path,
        )
    return value


def _common_attribute(names: Sequence[str]) -> str:
    """``"model."`` when every name starts with that one attribute (and has more after it)."""
    firsts = {name.partition(".")[0] for name in names if "." in name}
    if len(firsts) != 1 or not all("." in name for name in names):
        return ""
    return firsts.pop() + "."


def _strip(state: Mapping[str, torch.Tensor], prefix: str, path: Path) -> dict[str, torch.Tensor]:
    if not prefix:
        return dict(state)
    kept = {name[len(prefix) :]: t for name, t in state.items() if name.startswith(prefix)}
    if not kept or "" in kept:
        heads = sorted({name.partition(".")[0] + "." for name in state if "." in name})
        raise CheckpointError(
            f"{path}: no tensor name starts with the prefix {prefix!r} (and has more after it); "
            f"the names start with {', '.join(map(repr, heads[:10])) or 'no common prefix'}. "
            "Give one of those, or prefix='' to keep the names as they are.",
            path,
        )
    return kept


def select(
    loaded: Any, path: Path, entry: tuple[str, ...] | None, prefix: str | None
) -> tuple[dict[str, torch.Tensor], Selection | None]:
    """The model's tensors in what ``torch.load`` returned, and what was selected (``None``:
    the file is a plain state dict, read as it is)."""
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(loaded).__name__}, not a state_dict mapping names to "
            "tensors; save model.state_dict() instead.",
            path,
        )
    if entry is None and is_state_dict(loaded):
        return _strip(loaded, prefix or "", path), None if not prefix else Selection((), prefix)
    keys = entry if entry is not None else _automatic_entry(loaded, path)
    state = _entry(loaded, keys, path)  # entry=(): the top level, checked like any entry
    if prefix is None:
        lightning = keys == ("state_dict",) and LIGHTNING_VERSION in loaded
        prefix = _common_attribute(list(state)) if lightning else ""
    return _strip(state, prefix, path), Selection(keys, prefix)


def resolved(path: Path, selection: Selection | None) -> str:
    """How a lineage records what was read: the path, with the entry and prefix taken from a
    training checkpoint (``epoch=3.ckpt::entry=state_dict,prefix=model.``), so that reading it
    back reads the same tensors whatever the automatic rules."""
    if selection is None:
        return os.fspath(path)
    return str(CheckpointSpec(path, selection.entry or None, selection.prefix))


# --- what weights-only loading refuses ----------------------------------------------------------

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def refused_globals(path: Path, error: BaseException) -> list[str]:
    """The globals (``argparse.Namespace``) a weights-only load refuses in ``path``: all of them
    where torch can list them, else the one its error names; empty for other errors."""
    message = str(error)
    if "Weights only load failed" not in message:
        return []
    lister = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if lister is not None:
        try:
            found = sorted(lister(os.fspath(path)))  # torch's is a set's order
        except Exception:  # not a zip file, or unreadable: the error's own name below
            found = []
        if found:
            return found
    return _GLOBAL.findall(message)[:1]


def refused_error(path: Path, names: Sequence[str]) -> CheckpointError:
    """Why ``path`` cannot be read with ``weights_only=True``, and the two ways out."""
    listed = ", ".join(names)
    module, _, name = names[0].rpartition(".")
    return CheckpointError(
        f"{path}: torch.load(weights_only=True) refuses to unpickle {listed}, which the "
        "checkpoint stores beside its tensors (weights-only loading builds no other objects, so "
        "that a file cannot run code). If you trust the file, allow "
        f"{'it' if len(names) == 1 else 'them'} before calling terge: "
        f"torch.serialization.add_safe_globals([{name}]) (from {module} import {name}); or "
        "save the model's state dict alone: torch.save(torch.load(path, weights_only=False)"
        "['state_dict'], 'model.pt') (the entry that holds the model).",
        path,
    )
