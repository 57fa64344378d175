"""Reading JSON and TOML that terge did not write: safetensors headers, indexes, lineages, recipes.

Such a file may be truncated, scribbled on, hostile or not a file at all, so these helpers read
at most a given number of bytes, decode strictly, refuse numbers JSON should not hold (``NaN``,
``Infinity``, ``1e400``), and refuse nesting deeper than :data:`MAX_DEPTH` (which would otherwise
overflow the parser's or a later reader's stack). They raise :class:`ParseProblem`, which each
caller turns into its own error (:class:`~terge.CheckpointError`, :class:`~terge.LineageError`,
:class:`~terge.RecipeError`) naming the file.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

MAX_DEPTH = 64
"""The deepest nesting of arrays and objects (tables) accepted; terge's own files nest 4 deep."""


class ParseProblem(ValueError):
    """What is wrong with a file's content, as a phrase completing "the FILE ...": never raised
    out of terge (callers re-raise it as their own error, naming the file)."""


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_capped(path: Path, limit: int, *, regular: bool = True) -> bytes:
    """The bytes of ``path``, refusing more than ``limit`` of them (so a device such as
    ``/dev/urandom`` cannot make terge read forever) and, with ``regular``, anything but a
    regular file (a pipe could block forever). ``OSError`` is left to the caller."""
    if regular:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ParseProblem(f"is {_kind(mode)}, not a regular file")
    with open(path, "rb") as file:
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ParseProblem(f"is larger than {limit} bytes, more than such a file ever holds")
    return data


def decode_utf8(data: bytes, what: str) -> str:
    """``data`` as UTF-8 text, or a problem that says which byte is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = data[error.start : error.start + 1].hex()
        raise ParseProblem(
            f"{what} is not UTF-8 text (byte 0x{bad} at offset {error.start} cannot start or "
            "continue a UTF-8 character)"
        ) from None


class _NotFinite:
    """Where JSON held ``NaN``, ``Infinity`` or a float too large (``1e400``): a marker found
    after parsing, so that the error can name the field that held it."""

    def __init__(self, text: str) -> None:
        self.text = text if len(text) <= 24 else text[:21] + "..."


def loads_json(text: str, what: str = "its JSON") -> Any:
    """Parse ``text`` as strict JSON: finite numbers only, nested at most :data:`MAX_DEPTH` deep,
    and no key twice in one object (``json`` keeps the last silently, where another reader,
    a diff or a person may see the first: an edited lineage could hide a record that way)."""
    found: list[_NotFinite] = []
    repeated: list[str] = []

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        value = dict(pairs)
        if len(value) != len(pairs) and not repeated:
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    repeated.append(key)
                    break
                seen.add(key)
        return value

    def not_finite(text: str) -> _NotFinite:
        found.append(_NotFinite(text))
        return found[-1]

    def number(text: str) -> float | _NotFinite:
        value = float(text)
        return value if math.isfinite(value) else not_finite(text)

    try:
        value = json.loads(
            text, parse_constant=not_finite, parse_float=number, object_pairs_hook=unique
        )
    except RecursionError:
        raise ParseProblem(f"{what} nests arrays or objects too deeply to read") from None
    except ValueError as error:
        raise ParseProblem(f"{what} is not valid JSON ({error})") from None
    check_depth(value, what)
    if repeated:
        raise ParseProblem(
            f"{what} gives the key {repeated[0]!r} twice in one object (JSON keys must be "
            "unique: readers disagree on which value counts)"
        )
    marker = _first_marker(value) if found else None
    if found:
        where, mark = marker if marker is not None else ("a value", found[0])
        shown = mark.text
        raise ParseProblem(
            f"{what}: {where} is {shown}, which is not a finite number (JSON numbers must "
            "be finite)"
        )
    return value


def _first_marker(value: Any) -> tuple[str, _NotFinite] | None:
    """The field (``merged["a.weight"].contributions[0][1]``) holding the first non-finite
    number, found without recursion."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, where = stack.pop()
        if isinstance(item, _NotFinite):
            return where or "the value", item
        if isinstance(item, dict):
            stack.extend((child, _field(where, key)) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in reversed(list(enumerate(item))))
    return None


def _field(where: str, key: str) -> str:
    """``where.key``, or ``where["key"]`` for a key that is not an identifier (a tensor name)."""
    if key.isidentifier():
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key)}]"


def check_depth(value: Any, what: str) -> None:
    """Refuse ``value`` (parsed JSON or TOML) when it nests more than :data:`MAX_DEPTH` deep;
    iterative, so it cannot itself overflow the stack."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        if children and depth > MAX_DEPTH:
            raise ParseProblem(
                f"{what} nests arrays or objects more than {MAX_DEPTH} deep; no file terge "
                "reads does"
            )
        stack.extend((child, depth + 1) for child in children)


def is_float_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (not a bool) that is a finite float: a 400-digit
    integer is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False
