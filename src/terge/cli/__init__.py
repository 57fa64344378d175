"""The ``terge`` command: ``terge merge``, ``terge lineage``, recipes (:mod:`.recipe`)."""

from __future__ import annotations

from .commands import main

__all__ = ["main"]
