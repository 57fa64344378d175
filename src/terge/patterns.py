"""Name patterns with terge 0.1.1's rules.

A ``str`` matches a name exactly; a compiled ``re.Pattern`` or ``regex.Pattern`` matches when its
``search`` finds it anywhere in the name; a list mixes both and matches when any member does.
A map is read first-match-wins in insertion order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeGuard, TypeVar, Union

import regex

from .errors import PatternTypeError

# Union[...] rather than ``|``: these aliases are evaluated at runtime on Python 3.10 too.
Pattern = Union[str, re.Pattern[str], regex.Pattern[str]]  # noqa: UP007
"""A parameter-name pattern: an exact name, or a compiled regular expression."""

Patterns = Union[Pattern, Iterable[Pattern]]  # noqa: UP007
"""One pattern, or several (a name matches when any of them matches)."""

V = TypeVar("V")

_COMPILED = (re.Pattern, regex.Pattern)


def is_pattern(value: object) -> TypeGuard[Pattern]:
    """Whether ``value`` is a single pattern (not a list of them)."""
    return isinstance(value, (str, *_COMPILED))


def _bytes_error(pattern: Any, argument: str) -> PatternTypeError:
    """Bytes (or a pattern compiled from bytes) for a name pattern: names are str."""
    compiled = isinstance(pattern, _COMPILED)
    shown = pattern.pattern if compiled else bytes(pattern)
    what = "a pattern compiled from bytes" if compiled else "a pattern of type bytes"
    try:
        text = repr(shown.decode("utf-8"))
        fix = f"pass re.compile({text}) instead" if compiled else f"pass {text} instead"
    except UnicodeDecodeError:
        fix = "decode it to str first"
    return PatternTypeError(
        f"`{argument}` got {what} ({pattern!r}); tensor names are str, so a pattern must be a "
        f"str or a re.compile(...) of a str: {fix}."
    )


def _is_bytes(pattern: Any) -> bool:
    """Whether ``pattern`` is bytes, or a regular expression compiled from bytes."""
    if isinstance(pattern, _COMPILED):
        return isinstance(pattern.pattern, bytes)
    return isinstance(pattern, (bytes, bytearray, memoryview))


def compile_pattern(pattern: Any, argument: str) -> Callable[[str], bool]:
    """Turn one pattern into a predicate on names; ``argument`` names it in errors."""
    if isinstance(pattern, str):
        return pattern.__eq__
    if _is_bytes(pattern):
        raise _bytes_error(pattern, argument)
    if isinstance(pattern, _COMPILED):
        return lambda name: pattern.search(name) is not None
    raise PatternTypeError(
        f"`{argument}` got a pattern of type {type(pattern).__name__} ({pattern!r}); a pattern "
        "must be a str (matches a name exactly) or a compiled re/regex pattern (matches with "
        "search). Wrap a regular expression in re.compile(...)."
    )


def pattern_repr(pattern: Any) -> str:
    """A short readable form of a pattern for messages and lineage."""
    if isinstance(pattern, _COMPILED):
        return f"re.compile({pattern.pattern!r})"
    return repr(pattern)


class PatternSet:
    """Patterns read as a set: a name matches when any of them matches."""

    def __init__(self, patterns: Patterns | None, argument: str) -> None:
        self.argument = argument
        if patterns is None:
            self._predicates: tuple[Callable[[str], bool], ...] | None = None
            return
        if _is_bytes(patterns):  # iterable, but of ints: say what it is
            raise _bytes_error(patterns, argument)
        if is_pattern(patterns):
            patterns = [patterns]
        elif isinstance(patterns, Mapping) or not isinstance(patterns, Iterable):
            raise PatternTypeError(
                f"`{argument}` must be a str, a compiled pattern or a list of them; got "
                f"{type(patterns).__name__}."
            )
        self._predicates = tuple(compile_pattern(p, argument) for p in patterns)

    @property
    def given(self) -> bool:
        """Whether any patterns were given at all (``None`` means 'no filter')."""
        return self._predicates is not None

    def __call__(self, name: str) -> bool:
        return self._predicates is not None and any(p(name) for p in self._predicates)


class PatternMap(Mapping[Any, V]):
    """A map from patterns to values, looked up first-match-wins in insertion order."""

    def __init__(self, mapping: Mapping[Any, V], argument: str) -> None:
        self.argument = argument
        self._items = [
            (key, compile_pattern(key, argument), value) for key, value in mapping.items()
        ]

    def match(self, name: str) -> tuple[Any, V] | None:
        """The first ``(pattern, value)`` whose pattern matches ``name``, or ``None``."""
        for key, predicate, value in self._items:
            if predicate(name):
                return key, value
        return None

    def __getitem__(self, key: Any) -> V:
        for k, _, value in self._items:
            if k is key or k == key:
                return value
        raise KeyError(key)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (key for key, _, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)


def selected(name: str, included: PatternSet, excluded: PatternSet) -> bool:
    """Whether ``name`` passes ``included`` (when given) and then escapes ``excluded``."""
    if included.given and not included(name):
        return False
    return not excluded(name)
