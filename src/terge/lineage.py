"""Lineage records: what each merged tensor is made of, in terge 0.1.1's format and more.

``Lineage`` is a ``dict`` ``{name: (method, [(model_index, weight), ...])}`` that compares equal to
the plain dict 0.1.1 returned; its entries are tuples with a ``settings`` attribute, and the
tensors left alone are listed, with their reason, in ``Lineage.skipped``. What an audit needs
besides (the models, the base, the dtypes, the versions, optional SHA-256 digests) are
attributes, saved and loaded with :func:`save_lineage` and :func:`load_lineage` as stable JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Union

import torch

from ._version import __version__
from .errors import LineageError
from .io.dtypes import dtype_name, floating_dtype
from .io.parsing import ParseProblem, is_float_number, loads_json, read_capped
from .io.training import as_spec

EXCLUDED = "excluded"
"""Not selected by ``included`` or selected by ``excluded``."""
ONE_MODEL = "held by one model"
"""No other model holds a tensor of that name."""
SHAPE_MISMATCH = "shape mismatch"
"""Other models hold the name, but with another shape."""
NOT_FLOATING = "not floating point"
"""Integer, boolean or complex tensors are never averaged; the base's are kept."""
TIED = "tied"
"""Another name of a tensor merged under its first name (see ``Lineage.tied``)."""
NOT_A_TENSOR = "not a tensor"
"""A state-dict value that is not a tensor, kept from the base."""
BUFFER = "buffer"
"""A module's floating-point buffer (BatchNorm's running statistics) with ``buffers=False``:
kept from the base (an integer buffer is ``NOT_FLOATING``, as with ``buffers=True``)."""

UNSUPPORTED_DTYPE = "unsupported floating dtype"
"""A floating dtype no kernel computes in exactly (float8, float4): the base's is kept, and a
model holding one does not contribute."""
NOT_DENSE = "not a dense tensor"
"""A sparse (or otherwise not strided) tensor: the base's is kept, and another model's does not
contribute."""
OTHERS_NOT_MERGEABLE = "other models' tensors not mergeable"
"""Other models hold the name and shape, but too few of their tensors can contribute (not
floating point, say); ``Lineage.dropped`` says which and why."""

REASONS = (
    EXCLUDED,
    ONE_MODEL,
    SHAPE_MISMATCH,
    NOT_FLOATING,
    TIED,
    NOT_A_TENSOR,
    BUFFER,
    UNSUPPORTED_DTYPE,
    NOT_DENSE,
    OTHERS_NOT_MERGEABLE,
)

SCHEMA = 1
"""The version of the lineage file format this terge writes and reads."""
KINDS = ("module", "state_dict", "file", "adapter")
"""What a model was: an ``nn.Module``, a state dict, a checkpoint read from disk, or a PEFT LoRA
adapter (its folder the path) over a base (``ModelRecord.adapter``)."""
ADAPTER_FLAGS = ("use_rslora", "use_dora")
ADAPTER_COUNTS = ("modules", "whole")
SEPARATE: Final = "separate"
"""The base's index when it was given apart from ``models``."""
MAX_LINEAGE_BYTES = 1 << 30
"""The largest lineage file :func:`load_lineage` reads (1 GiB: millions of tensors, digests too)."""
ModelIndex = Union[int, Literal["separate"]]  # noqa: UP007 (a runtime alias on Python 3.10)
"""A model's index in ``models``, or ``SEPARATE`` for a base given apart."""


@dataclass(frozen=True)
class ModelRecord:
    """Where a model came from: its index in ``models`` (``"separate"`` for a base given apart),
    its kind (one of ``KINDS``), and its path when it was read from disk.

    ``files`` pins a model read from disk: the SHA-256 of each file it was read from, by its
    name relative to ``path`` (``merge(..., digests=True)`` records them); ``revision`` is the
    Hub revision (a commit hash) it was resolved to, when known.

    A model read from the Hugging Face Hub records its repository (``repo``, ``org/name``), the
    revision asked for (``requested_revision``; ``None``: the default branch) and the commit it
    resolved to (``revision``); its ``path`` is then ``org/name@<commit>``, which reads the same
    weights on any machine (the cache folder it was read from is this machine's alone).
    """

    index: ModelIndex
    kind: str
    path: str | None = None
    files: Mapping[str, str] | None = field(default=None, hash=False)
    revision: str | None = None
    repo: str | None = None
    requested_revision: str | None = None
    adapter: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    """For an adapter: its base (``{"kind", "path"}``), the ranks ``r`` and ``lora_alpha``
    values of its modules, ``use_rslora``, ``use_dora``, and how many ``modules`` it adapts and
    ``whole`` tensors it replaces."""

    @property
    def pinned(self) -> bool:
        """Whether the record says exactly which weights these were: file digests or a revision."""
        return bool(self.files) or self.revision is not None

    def describe(self) -> str:
        """``models[1] (file a.safetensors)``: how messages name the model."""
        where = "base" if self.index == SEPARATE else f"models[{self.index}]"
        return f"{where} ({self.kind}{'' if self.path is None else ' ' + self.path})"


@dataclass(frozen=True)
class TensorDigests:
    """SHA-256 (hex) of a merged tensor as written, and of the tensors it was computed from:
    per model index, and ``base`` for a separate base the method read."""

    output: str
    models: Mapping[int, str] = field(default_factory=dict)
    base: str | None = None


class LineageEntry(tuple):
    """``(method, [(model_index, weight), ...])`` with the method's settings in ``.settings``.

    ``coefficients`` and ``divisor`` are what the streaming kernel used (the weights as given and
    their sum), recorded so that an audit recomputes the tensor bit for bit; ``custom`` marks a
    user's own function, which terge cannot recompute.
    """

    settings: dict[str, Any]
    coefficients: tuple[float, ...] | None
    divisor: float | None
    custom: bool

    def __new__(
        cls,
        method: str,
        contributions: list[tuple[int, float]],
        settings: Mapping[str, Any] | None = None,
        *,
        coefficients: Sequence[float] | None = None,
        divisor: float | None = None,
        custom: bool = False,
    ) -> LineageEntry:
        entry = super().__new__(cls, (method, contributions))
        entry.settings = dict(settings or {})
        entry.coefficients = None if coefficients is None else tuple(coefficients)
        entry.divisor = divisor
        entry.custom = custom
        return entry

    def __getnewargs__(self) -> tuple[Any, ...]:  # copy and pickle: the rest is in __dict__
        return (self[0], self[1])

    @property
    def method(self) -> str:
        return self[0]

    @property
    def contributions(self) -> list[tuple[int, float]]:
        return self[1]

    def __repr__(self) -> str:
        if not self.settings:
            return tuple.__repr__(self)
        return f"LineageEntry({self[0]!r}, {self[1]!r}, settings={self.settings!r})"


class Lineage(dict):
    """Merged tensors by name (0.1.1's format); ``skipped`` and ``tied`` say what was left alone.

    A ``Lineage`` equals a plain dict of its merged entries (as in 0.1.1); two ``Lineage``\\ s are
    equal only when their whole records are: settings, what was left alone, models, base,
    dtypes, versions and digests too (all but the kernel's ``coefficients`` and ``divisor``,
    which equivalent weights such as ``[1, 2]`` and ``[2, 4]`` write differently).
    """

    __hash__ = None

    def __init__(
        self,
        merged: Mapping[str, LineageEntry] | None = None,
        skipped: Mapping[str, str] | None = None,
        tied: Mapping[str, str] | None = None,
        unused: Mapping[str, list[int]] | None = None,
        *,
        models: Sequence[ModelRecord] = (),
        base: ModelRecord | None = None,
        dtype: torch.dtype | None = None,
        out_dtype: torch.dtype | None = None,
        terge_version: str | None = None,
        torch_version: str | None = None,
        digests: Mapping[str, TensorDigests] | None = None,
        dropped: Mapping[str, Mapping[int, str]] | None = None,
        chosen: Mapping[str, Any] | None = None,
        vocabulary: Mapping[str, Any] | None = None,
        stack: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(merged or {})
        self.skipped: dict[str, str] = dict(skipped or {})
        """Tensors left as the base has them, with the reason (one of ``REASONS``)."""
        self.tied: dict[str, str] = dict(tied or {})
        """Alias name to the name it was merged under."""
        self.unused: dict[str, list[int]] = {k: list(v) for k, v in (unused or {}).items()}
        """Tensors of other models under names the base lacks (so they cannot be merged into
        it), with the indices of the models holding them: a renamed head shows up here."""
        self.models: tuple[ModelRecord, ...] = tuple(models)
        """Each model: index, kind and (read from disk) path."""
        self.base: ModelRecord | None = base
        """The base: one of ``models``, or a record with index ``"separate"``."""
        self.dtype = dtype
        """The dtype the merge accumulated in."""
        self.out_dtype = out_dtype
        """The dtype floating tensors were written in; ``None``: each tensor's own."""
        self.terge_version = terge_version
        self.torch_version = torch_version
        self.digests: dict[str, TensorDigests] | None = None if digests is None else dict(digests)
        """SHA-256 digests per merged tensor (``merge(..., digests=True)``), else ``None``."""
        self.dropped: dict[str, dict[int, str]] = {
            name: dict(models) for name, models in (dropped or {}).items()
        }
        """Per tensor, the models that hold it but did not contribute, with the reason (their
        tensor is not floating point, is float8, is sparse, ...): ``{name: {model: reason}}``."""
        self.chosen: dict[str, Any] | None = None if chosen is None else dict(chosen)
        """How the models were chosen from a run (``merge(terge.choose(...))``), else ``None``:
        ``{"rule": "last 5 by global_step", "from": "runs/checkpoint-*", "candidates":
        [{"path", "value"}, ...] (ranked by the rule), "chosen": [path, ...]}``."""
        self.vocabulary: dict[str, Any] | None = None if vocabulary is None else dict(vocabulary)
        """How vocabulary tensors were aligned by token (``merge(..., vocabulary=...)``), else
        ``None``: ``{"source": "base" | "union" | model index, "rows": output row count,
        "added": {model: tokens a union took from it}, "tensors": {name: [{"models": [...],
        "weights": [...], "rows": [[start, stop], ...], "copied"?: true}, ...]}}``: per tensor,
        the groups of output rows held by the same models."""
        self.stack: dict[str, Any] | None = None if stack is None else dict(stack)
        """A stacked model's (``terge.stack``) sources, else ``None``: ``{"base": model,
        "head": model, "blocks": [{"method", "sources": [[model, input_block, weight], ...]}]
        (one per output block), "tensors": {output_name: [[model, input_name], ...]}}``."""

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Lineage):
            return _comparable(self) == _comparable(other)
        return dict.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __repr__(self) -> str:
        return (
            f"Lineage({dict.__repr__(self)}, skipped={self.skipped!r}, tied={self.tied!r}, "
            f"unused={self.unused!r})"
        )


SCHEMA_FILE = "lineage.schema.json"
"""The JSON Schema of lineage files, shipped in the package (``terge lineage schema`` prints it)."""


def lineage_schema_text() -> str:
    """The JSON Schema (draft 2020-12) every lineage file this terge writes follows, as text."""
    from importlib.resources import files

    return (files(__package__) / SCHEMA_FILE).read_text(encoding="utf-8")


def lineage_schema() -> dict[str, Any]:
    """The lineage files' JSON Schema as a dict, for ``jsonschema.validate(record, schema)``."""
    schema: dict[str, Any] = json.loads(lineage_schema_text())
    return schema


# --- to JSON ------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, dtypes as names, and anything else JSON lacks as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return repr(value)


def _entry_json(entry: Any) -> dict[str, Any]:
    data = {
        "method": entry[0],
        "contributions": [[index, weight] for index, weight in entry[1]],
        "settings": getattr(entry, "settings", {}),
    }
    coefficients = getattr(entry, "coefficients", None)
    if coefficients is not None:
        data["coefficients"] = list(coefficients)
        data["divisor"] = getattr(entry, "divisor", None)
    if getattr(entry, "custom", False):
        data["custom"] = True
    return data


def _model_json(record: ModelRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    data: dict[str, Any] = {"index": record.index, "kind": record.kind, "path": record.path}
    if record.files is not None:  # optional fields: a lineage without them reads as before
        data["files"] = dict(sorted(record.files.items()))
    if record.revision is not None:
        data["revision"] = record.revision
    if record.repo is not None:  # a Hub model: where it came from, and what was asked for
        data["repo"] = record.repo
        data["requested_revision"] = record.requested_revision
    if record.adapter is not None:
        data["adapter"] = dict(record.adapter)
    return data


def _digests_json(digests: TensorDigests) -> dict[str, Any]:
    return {
        "output": digests.output,
        "models": {str(index): digest for index, digest in sorted(digests.models.items())},
        "base": digests.base,
    }


def lineage_to_json(lineage: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A lineage as a JSON-ready dict (``schema`` 1), with ``extra`` top-level fields.

    ``{"schema": 1, "merged": {name: {"method", "contributions": [[i, w], ...], "settings"}},
    "skipped": {name: reason}, "tied": {alias: name}, "unused": {name: [model, ...]},
    "dropped": {name: [[model, reason], ...]},
    "models": [{"index", "kind", "path", "files"?, "revision"?, "repo"?,
    "requested_revision"?}], "base", "dtype", "out_dtype",
    "terge_version", "torch_version", "digests", **extra}``, and ``"chosen"`` where the models
    were chosen from a run; written sorted by key (see :func:`save_lineage`).
    """
    digests = getattr(lineage, "digests", None)
    chosen = getattr(lineage, "chosen", None)
    if chosen is not None:  # only where there is one: other lineages keep their bytes
        extra = {"chosen": chosen, **extra}
    vocabulary = getattr(lineage, "vocabulary", None)
    if vocabulary is not None:
        extra = {"vocabulary": vocabulary, **extra}
    stack = getattr(lineage, "stack", None)
    if stack is not None:  # likewise
        extra = {"stack": stack, **extra}
    record = {
        "schema": SCHEMA,
        "merged": {name: _entry_json(entry) for name, entry in lineage.items()},
        "skipped": dict(getattr(lineage, "skipped", {})),
        "tied": dict(getattr(lineage, "tied", {})),
        "unused": dict(getattr(lineage, "unused", {})),
        "dropped": {
            name: [[index, reason] for index, reason in sorted(models.items())]
            for name, models in getattr(lineage, "dropped", {}).items()
        },
        "models": [_model_json(model) for model in getattr(lineage, "models", ())],
        "base": _model_json(getattr(lineage, "base", None)),
        "dtype": getattr(lineage, "dtype", None),
        "out_dtype": getattr(lineage, "out_dtype", None),
        "terge_version": getattr(lineage, "terge_version", None),
        "torch_version": getattr(lineage, "torch_version", None),
        "digests": None
        if digests is None
        else {name: _digests_json(d) for name, d in digests.items()},
        **extra,
    }
    return _jsonable(record)


def _comparable(lineage: Lineage) -> dict[str, Any]:
    """The record two lineages must share to be equal: all of it but the kernel's coefficients
    and divisor (weights ``[1, 2]`` and ``[2, 4]`` are the same merge, bit for bit)."""
    record = lineage_to_json(lineage)
    for entry in record["merged"].values():
        entry.pop("coefficients", None)
        entry.pop("divisor", None)
    return record


def lineage_text(lineage: Mapping[str, Any]) -> str:
    """The lineage file's text: sorted keys, two-space indents, exact floats (Python's ``repr``),
    a final newline.

    The same lineage always gives the same text, so files can be stored, diffed and compared.
    """
    return _dumps(lineage_to_json(lineage), "") + "\n"


def _dumps(value: Any, indent: str) -> str:
    """JSON with sorted keys, objects one key per line, and lists without objects on one line
    (``[[0, 0.5], [1, 0.5]]``), so a changed weight is a changed line."""
    if isinstance(value, dict) and value:
        inner = indent + "  "
        items = [f"{inner}{json.dumps(key)}: {_dumps(value[key], inner)}" for key in sorted(value)]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(_has_object(item) for item in value):
        inner = indent + "  "
        items = [f"{inner}{_dumps(item, inner)}" for item in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except ValueError:  # NaN or infinity: a file load_lineage would refuse
        raise LineageError(
            f"the lineage holds the non-finite number in {value!r}; lineage files hold finite "
            "numbers only: give the method finite settings."
        ) from None


def _has_object(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and any(_has_object(item) for item in value)


def save_lineage(
    lineage: Mapping[str, Any], path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``lineage`` to ``path`` as stable JSON (see :func:`lineage_text`), atomically.

    The file appears whole or not at all, with the permissions any new file gets. An existing
    ``path`` is refused unless ``overwrite=True``, and so, always, is a path that is one of the
    models the lineage records or lies inside one's folder (it would destroy its weights):
    :class:`~terge.LineageError`, raised before anything is written.
    ``load_lineage(path)`` gives back an equal ``Lineage``.
    """
    from .io.writing import check_file_apart, write_text_atomic

    if not isinstance(overwrite, bool):
        raise LineageError(f"`overwrite` must be True or False; got {overwrite!r}.", path)
    target = Path(path).expanduser()
    records = [*getattr(lineage, "models", ()), getattr(lineage, "base", None)]
    inputs = [
        as_spec(r.path).path for r in records if isinstance(r, ModelRecord) and r.path is not None
    ]
    check_file_apart(target, inputs, what="the lineage file", error=LineageError)
    text = lineage_text(lineage)
    return write_text_atomic(target, text, overwrite=overwrite, error=LineageError)


# --- from JSON ----------------------------------------------------------------------------------


def load_lineage(path: str | os.PathLike[str]) -> Lineage:
    """Read a lineage file written by :func:`save_lineage` (or ``merge(out=...)``'s
    ``lineage.json``; a folder means its ``lineage.json``).

    Raises :class:`~terge.LineageError`, naming the file (and the field), when it is unreadable,
    not a regular file, larger than :data:`MAX_LINEAGE_BYTES`, not UTF-8, not JSON (truncated),
    nested too deeply, of an unknown schema, or holds a value of the wrong type or a number that
    is not finite (``NaN``, ``Infinity``, ``1e400``, a 400-digit integer).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "lineage.json"
    try:
        raw = read_capped(path, MAX_LINEAGE_BYTES)
    except OSError as error:
        reason = error.strerror or error
        raise LineageError(f"cannot read the lineage file {path}: {reason}.", path) from None
    except ParseProblem as problem:
        raise LineageError(
            f"cannot read the lineage file {path}: it {problem}; give a lineage .json file.", path
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise LineageError(
            f"cannot read the lineage file {path}: {error}; it is not UTF-8 text, so not a "
            "lineage file.",
            path,
        ) from None
    try:
        data = loads_json(text, f"the lineage file {path}")
    except ParseProblem as problem:
        truncated = "; is it truncated?" if "not valid JSON" in str(problem) else "."
        raise LineageError(f"{problem}{truncated}", path) from None
    return lineage_from_json(data, path)


def lineage_from_json(data: Any, path: str | os.PathLike[str] | None = None) -> Lineage:
    """The ``Lineage`` a JSON record (as :func:`lineage_to_json` makes) describes, checked."""
    return _Reader(path).lineage(data)


_HEX64 = re.compile(r"[0-9a-f]{64}")
_INDEX_KEY = re.compile(r"[0-9]{1,18}")


class _Reader:
    """Checks a lineage record field by field; every error names the file and the field."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = None if path is None else Path(path)
        self.count: int | None = None
        """How many models the record names (indices are checked against it), once known."""

    def fail(self, message: str) -> LineageError:
        where = "lineage" if self.path is None else f"the lineage file {self.path}"
        return LineageError(f"{where}: {message}", self.path)

    def expect(self, ok: bool, where: str, wanted: str, value: Any) -> None:
        if not ok:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise self.fail(f"{where} must be {wanted}, got {shown}.")

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        self.expect(isinstance(value, dict), where, "an object", value)
        return value

    def string(self, value: Any, where: str, optional: bool = False) -> str | None:
        ok = isinstance(value, str) or (optional and value is None)
        self.expect(ok, where, "a string" + (" or null" if optional else ""), value)
        return value

    def index(self, value: Any, where: str) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        self.expect(ok, where, "a model index (an int >= 0)", value)
        if self.count is not None and value >= self.count:
            raise self.fail(f"{where} is model {value}, but the lineage records {self.count}.")
        return value

    def number(self, value: Any, where: str) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        self.expect(ok, where, "a number", value)
        self.expect(is_float_number(value), where, "a finite number", value)
        return value

    def dtype(self, value: Any, where: str) -> torch.dtype | None:
        if value is None:
            return None
        dtype = floating_dtype(value) if isinstance(value, str) else None
        self.expect(
            dtype is not None, where, 'a floating dtype name such as "float64", or null', value
        )
        return dtype

    def lineage(self, data: Any) -> Lineage:
        if not isinstance(data, dict):
            raise self.fail(f"expected a JSON object, got {type(data).__name__}.")
        if "schema" not in data:
            raise self.fail('no "schema" field; it is not a terge lineage file.')
        if data["schema"] != SCHEMA:
            raise self.fail(
                f"schema {json.dumps(data['schema'])} is not one this terge ({__version__}) "
                f"reads (schema {SCHEMA}); a newer terge may read it."
            )
        models = self.models(data.get("models"))
        self.count = len(models) or None
        unused = self.mapping(data.get("unused", {}), "unused")
        lineage = Lineage(
            {
                name: self.entry(entry, f"merged[{json.dumps(name)}]")
                for name, entry in self.mapping(data.get("merged"), "merged").items()
            },
            self.names(data.get("skipped", {}), "skipped"),
            self.names(data.get("tied", {}), "tied"),
            {
                name: self.indices(value, f"unused[{json.dumps(name)}]")
                for name, value in unused.items()
            },
            models=models,
            base=self.base(data.get("base")),
            dtype=self.dtype(data.get("dtype"), "dtype"),
            out_dtype=self.dtype(data.get("out_dtype"), "out_dtype"),
            terge_version=self.string(data.get("terge_version"), "terge_version", True),
            torch_version=self.string(data.get("torch_version"), "torch_version", True),
            digests=self.digests(data.get("digests")),
            dropped={
                name: self.drops(value, f"dropped[{json.dumps(name)}]")
                for name, value in self.mapping(data.get("dropped", {}), "dropped").items()
            },
            chosen=self.chosen(data.get("chosen")),
            vocabulary=self.vocabulary(data.get("vocabulary")),
            stack=self.stack(data.get("stack")),
        )
        stray = [name for name in lineage.digests or {} if name not in lineage]
        if stray:
            raise self.fail(f"digests[{json.dumps(stray[0])}] is for a tensor not merged.")
        return lineage

    def vocabulary(self, value: Any) -> dict[str, Any] | None:
        """``vocabulary``: its source, row count, added tokens and per tensor its row groups."""
        if value is None:
            return None
        record = self.mapping(value, "vocabulary")
        source = record.get("source")
        ok = source in ("base", "union") or (isinstance(source, int) and source >= 0)
        self.expect(ok, "vocabulary.source", "'base', 'union' or a model index", source)
        rows = record.get("rows")
        ok = isinstance(rows, int) and not isinstance(rows, bool) and rows > 0
        self.expect(ok, "vocabulary.rows", "a positive row count", rows)
        added = self.mapping(record.get("added", {}), "vocabulary.added")
        for key, count in added.items():
            self.expect(key.isdigit(), "vocabulary.added", "model indices as keys", key)
            self.expect(isinstance(count, int), f"vocabulary.added[{key}]", "a count", count)
        tensors = self.mapping(record.get("tensors", {}), "vocabulary.tensors")
        for name, groups in tensors.items():
            where = f"vocabulary.tensors[{json.dumps(name)}]"
            self.expect(isinstance(groups, list), where, "a list of row groups", groups)
            for i, group in enumerate(groups):
                group = self.mapping(group, f"{where}[{i}]")
                self.indices(group.get("models"), f"{where}[{i}].models")
                weights: Any = group.get("weights")
                self.expect(isinstance(weights, list), f"{where}[{i}].weights", "a list", weights)
                for weight in weights:
                    self.number(weight, f"{where}[{i}].weights")
                spans: Any = group.get("rows")
                self.expect(isinstance(spans, list), f"{where}[{i}].rows", "a list", spans)
                for span in spans:
                    ok = (
                        isinstance(span, list)
                        and len(span) == 2
                        and all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                        and 0 <= span[0] < span[1] <= rows
                    )
                    self.expect(ok, f"{where}[{i}].rows", "[start, stop) row ranges", span)
        normalize = record.get("normalize", True)
        self.expect(isinstance(normalize, bool), "vocabulary.normalize", "true or false", normalize)
        return {
            "source": source,
            "rows": rows,
            "normalize": normalize,
            "added": dict(added),
            "tensors": dict(tensors),
        }

    def chosen(self, value: Any) -> dict[str, Any] | None:
        """``chosen``: the rule, the source, the ranked candidates and the chosen paths."""
        if value is None:
            return None
        record = self.mapping(value, "chosen")
        for key in ("rule", "from"):
            self.string(record.get(key), f"chosen.{key}")
        candidates: Any = record.get("candidates")  # checked on the next line
        self.expect(isinstance(candidates, list), "chosen.candidates", "a list", candidates)
        for i, item in enumerate(candidates):
            candidate = self.mapping(item, f"chosen.candidates[{i}]")
            self.string(candidate.get("path"), f"chosen.candidates[{i}].path")
            if candidate.get("value") is not None:
                self.number(candidate["value"], f"chosen.candidates[{i}].value")
        paths: Any = record.get("chosen")
        self.expect(isinstance(paths, list), "chosen.chosen", "a list of paths", paths)
        for i, path in enumerate(paths):
            self.string(path, f"chosen.chosen[{i}]")
        return {
            "rule": record["rule"],
            "from": record["from"],
            "candidates": [{"path": c["path"], "value": c.get("value")} for c in candidates],
            "chosen": list(paths),
        }

    def stack(self, value: Any) -> dict[str, Any] | None:
        """``stack``: a stacked model's base, head, blocks and tensors, with valid indices."""
        if value is None:
            return None
        record = self.mapping(value, "stack")
        base = self.index(record.get("base"), "stack.base")
        head = self.index(record.get("head", base), "stack.head")
        blocks: Any = record.get("blocks")  # checked on the next line
        self.expect(isinstance(blocks, list), "stack.blocks", "a list", blocks)
        read_blocks = []
        for i, item in enumerate(blocks):
            block = self.mapping(item, f"stack.blocks[{i}]")
            method = self.string(block.get("method"), f"stack.blocks[{i}].method")
            sources: Any = block.get("sources")
            where = f"stack.blocks[{i}].sources"
            ok = isinstance(sources, list) and bool(sources)
            self.expect(ok, where, "a non-empty list of [model, block, weight]", sources)
            read = []
            for j, source in enumerate(sources):
                ok = isinstance(source, list) and len(source) == 3
                self.expect(ok, f"{where}[{j}]", "[model, block, weight]", source)
                block_index = source[1]
                ok = isinstance(block_index, int) and not isinstance(block_index, bool)
                self.expect(ok and block_index >= 0, f"{where}[{j}][1]", "a block index", source[1])
                read.append(
                    [
                        self.index(source[0], f"{where}[{j}][0]"),
                        block_index,
                        self.number(source[2], f"{where}[{j}][2]"),
                    ]
                )
            read_blocks.append({"method": method, "sources": read})
        tensors = {}
        for name, item in self.mapping(record.get("tensors", {}), "stack.tensors").items():
            where = f"stack.tensors[{json.dumps(name)}]"
            ok = isinstance(item, list) and bool(item)
            self.expect(ok, where, "a non-empty list of [model, input_name]", item)
            pairs = []
            for j, pair in enumerate(item):
                ok = isinstance(pair, list) and len(pair) == 2
                self.expect(ok, f"{where}[{j}]", "[model, input_name]", pair)
                pairs.append(
                    [
                        self.index(pair[0], f"{where}[{j}][0]"),
                        self.string(pair[1], f"{where}[{j}][1]"),
                    ]
                )
            tensors[name] = pairs
        return {"base": base, "head": head, "blocks": read_blocks, "tensors": tensors}

    def names(self, value: Any, where: str) -> dict[str, str]:
        mapping = self.mapping(value, where)
        for name, text in mapping.items():
            self.string(text, f"{where}[{json.dumps(name)}]")
        return dict(mapping)

    def drops(self, value: Any, where: str) -> dict[int, str]:
        self.expect(isinstance(value, list), where, "a list of [model, reason] pairs", value)
        drops: dict[int, str] = {}
        for i, pair in enumerate(value):
            ok = isinstance(pair, list) and len(pair) == 2
            self.expect(ok, f"{where}[{i}]", "a [model, reason] pair", pair)
            index = self.index(pair[0], f"{where}[{i}][0]")
            reason = self.string(pair[1], f"{where}[{i}][1]")
            self.expect(index not in drops, f"{where}[{i}][0]", "a model listed once", pair[0])
            drops[index] = reason or ""
        return drops

    def indices(self, value: Any, where: str) -> list[int]:
        self.expect(isinstance(value, list), where, "a list of model indices", value)
        return [self.index(item, f"{where}[{i}]") for i, item in enumerate(value)]

    def entry(self, value: Any, where: str) -> LineageEntry:
        entry = self.mapping(value, where)
        method = self.string(entry.get("method"), f"{where}.method")
        pairs: Any = entry.get("contributions")  # checked on the next line
        self.expect(isinstance(pairs, list), f"{where}.contributions", "a list", pairs)
        contributions = [
            self.pair(pair, f"{where}.contributions[{i}]") for i, pair in enumerate(pairs)
        ]
        settings = self.mapping(entry.get("settings", {}), f"{where}.settings")
        coefficients = entry.get("coefficients")
        if coefficients is not None:
            ok = isinstance(coefficients, list) and len(coefficients) == len(contributions)
            self.expect(ok, f"{where}.coefficients", "one number per contribution", coefficients)
            for i, number in enumerate(coefficients):
                self.number(number, f"{where}.coefficients[{i}]")
        divisor = entry.get("divisor")
        if divisor is not None:
            self.number(divisor, f"{where}.divisor")
        custom = entry.get("custom", False)
        self.expect(isinstance(custom, bool), f"{where}.custom", "true or false", custom)
        return LineageEntry(
            method,  # type: ignore[arg-type]
            contributions,
            settings,
            coefficients=coefficients,
            divisor=divisor,
            custom=custom,
        )

    def pair(self, value: Any, where: str) -> tuple[int, float]:
        ok = isinstance(value, list) and len(value) == 2
        self.expect(ok, where, "[model_index, weight]", value)
        return (self.index(value[0], f"{where}[0]"), self.number(value[1], f"{where}[1]"))

    def model(self, value: Any, where: str, separate: bool = False) -> ModelRecord:
        record = self.mapping(value, where)
        index = record.get("index")
        if not (separate and index == SEPARATE):
            ok = isinstance(index, int) and not isinstance(index, bool) and index >= 0
            wanted = 'a model index or "separate"' if separate else "a model index"
            self.expect(ok, f"{where}.index", wanted, index)
        kind = record.get("kind")
        self.expect(kind in KINDS, f"{where}.kind", " or ".join(map(json.dumps, KINDS)), kind)
        path = self.string(record.get("path"), f"{where}.path", optional=True)
        files = None
        if record.get("files") is not None:
            files = {
                name: self.digest(digest, f"{where}.files[{json.dumps(name)}]")
                for name, digest in self.mapping(record["files"], f"{where}.files").items()
            }
        revision = self.string(record.get("revision"), f"{where}.revision", optional=True)
        repo = self.string(record.get("repo"), f"{where}.repo", optional=True)
        requested = self.string(
            record.get("requested_revision"), f"{where}.requested_revision", optional=True
        )
        adapter = None
        if record.get("adapter") is not None:
            adapter = self.adapter(record["adapter"], f"{where}.adapter")
        return ModelRecord(
            index,  # type: ignore[arg-type]
            kind,  # type: ignore[arg-type]
            path,
            files,
            revision,
            repo,
            requested,
            adapter,
        )

    def adapter(self, value: Any, where: str) -> dict[str, Any]:
        data = self.mapping(value, where)
        base = self.mapping(data.get("base"), f"{where}.base")
        self.expect(base.get("kind") in KINDS[:3], f"{where}.base.kind", "a model kind", base)
        self.string(base.get("path"), f"{where}.base.path", optional=True)
        ranks = data.get("r")
        ok = isinstance(ranks, list) and all(
            isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks
        )
        self.expect(ok, f"{where}.r", "a list of positive ints", ranks)
        alphas: Any = data.get("lora_alpha")
        self.expect(isinstance(alphas, list), f"{where}.lora_alpha", "a list", alphas)
        for i, alpha in enumerate(alphas):
            self.number(alpha, f"{where}.lora_alpha[{i}]")
        for flag in ADAPTER_FLAGS:
            value = data.get(flag)
            self.expect(isinstance(value, bool), f"{where}.{flag}", "a bool", value)
        for count in ADAPTER_COUNTS:
            value = data.get(count)
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            self.expect(ok, f"{where}.{count}", "an int >= 0", value)
        return {"base": {"kind": base["kind"], "path": base.get("path")}} | {
            key: data[key] for key in ("r", "lora_alpha", *ADAPTER_FLAGS, *ADAPTER_COUNTS)
        }

    def models(self, value: Any) -> tuple[ModelRecord, ...]:
        if value is None:
            return ()
        self.expect(isinstance(value, list), "models", "a list", value)
        records = tuple(self.model(item, f"models[{i}]") for i, item in enumerate(value))
        for i, record in enumerate(records):
            if record.index != i:
                raise self.fail(f"models[{i}].index is {record.index}; it must be {i}.")
        return records

    def base(self, value: Any) -> ModelRecord | None:
        if value is None:
            return None
        record = self.model(value, "base", separate=True)
        if record.index != SEPARATE and self.count is not None and record.index >= self.count:
            raise self.fail(
                f"base.index is {record.index}, but the lineage records {self.count} models."
            )
        return record

    def digest(self, value: Any, where: str) -> str:
        ok = isinstance(value, str) and _HEX64.fullmatch(value) is not None
        self.expect(ok, where, "a SHA-256 digest (64 hex digits)", value)
        return value

    def digests(self, value: Any) -> dict[str, TensorDigests] | None:
        if value is None:
            return None
        result = {}
        for name, item in self.mapping(value, "digests").items():
            where = f"digests[{json.dumps(name)}]"
            record = self.mapping(item, where)
            models = {}
            for key, digest in self.mapping(record.get("models", {}), f"{where}.models").items():
                ok = _INDEX_KEY.fullmatch(key) is not None
                self.expect(ok, f"{where}.models key", "a model index", key)
                index = self.index(int(key), f"{where}.models key")
                models[index] = self.digest(digest, f"{where}.models[{json.dumps(key)}]")
            base = record.get("base")
            result[name] = TensorDigests(
                self.digest(record.get("output"), f"{where}.output"),
                models,
                None if base is None else self.digest(base, f"{where}.base"),
            )
        return result
