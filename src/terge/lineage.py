"""Lineage records: what each merged tensor is made of, in terge 0.1.1's format and more.

``Lineage`` is a ``dict`` ``{name: (method, [(model_index, weight), ...])}`` that compares equal to
the plain dict 0.1.1 returned; its entries are tuples with a ``settings`` attribute, and the
tensors left alone are listed, with their reason, in ``Lineage.skipped``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

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

REASONS = (EXCLUDED, ONE_MODEL, SHAPE_MISMATCH, NOT_FLOATING, TIED, NOT_A_TENSOR)


class LineageEntry(tuple):
    """``(method, [(model_index, weight), ...])`` with the method's settings in ``.settings``."""

    settings: dict[str, Any]

    def __new__(
        cls,
        method: str,
        contributions: list[tuple[int, float]],
        settings: Mapping[str, Any] | None = None,
    ) -> LineageEntry:
        entry = super().__new__(cls, (method, contributions))
        entry.settings = dict(settings or {})
        return entry

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
    """Merged tensors by name (0.1.1's format); ``skipped`` and ``tied`` say what was left alone."""

    def __init__(
        self,
        merged: Mapping[str, LineageEntry] | None = None,
        skipped: Mapping[str, str] | None = None,
        tied: Mapping[str, str] | None = None,
        unused: Mapping[str, list[int]] | None = None,
    ) -> None:
        super().__init__(merged or {})
        self.skipped: dict[str, str] = dict(skipped or {})
        """Tensors left as the base has them, with the reason (one of ``REASONS``)."""
        self.tied: dict[str, str] = dict(tied or {})
        """Alias name to the name it was merged under."""
        self.unused: dict[str, list[int]] = {k: list(v) for k, v in (unused or {}).items()}
        """Tensors of other models under names the base lacks (so they cannot be merged into
        it), with the indices of the models holding them: a renamed head shows up here."""

    def __repr__(self) -> str:
        return (
            f"Lineage({dict.__repr__(self)}, skipped={self.skipped!r}, tied={self.tied!r}, "
            f"unused={self.unused!r})"
        )


def _jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, dtypes as names, and anything else JSON lacks as its repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return repr(value)


def lineage_to_json(lineage: Lineage, **extra: Any) -> dict[str, Any]:
    """A lineage as a JSON-ready dict (``schema`` 1), with ``extra`` top-level fields.

    ``{"schema": 1, "merged": {name: {"method", "contributions": [[i, w], ...], "settings"}},
    "skipped": {name: reason}, "tied": {alias: name}, "unused": {name: [model, ...]}, **extra}``;
    written sorted by key.
    """
    merged = {
        name: {
            "method": entry[0],
            "contributions": [[index, weight] for index, weight in entry[1]],
            "settings": getattr(entry, "settings", {}),
        }
        for name, entry in lineage.items()
    }
    record = {
        **extra,
        "schema": 1,
        "merged": merged,
        "skipped": dict(lineage.skipped),
        "tied": dict(lineage.tied),
        "unused": dict(getattr(lineage, "unused", {})),
    }
    return _jsonable(record)
