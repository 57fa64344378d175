"""Digests of what a merge read and wrote: the hook execution calls around each tensor.

``merge(..., digests=True)`` records, through :class:`DigestRecorder`, the SHA-256 of every merged
tensor as written and of every tensor it was computed from; ``terge lineage diff`` and ``verify``
(:mod:`terge.audit`) compare them.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .lineage import TensorDigests
from .plan import Step
from .sources import FileSource, Source

DIGEST_CHUNK = 1 << 24
"""Bytes hashed (and, for a tensor on an accelerator, copied to the CPU) at a time."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's bytes as stored: its dtype, row-major, little-endian.

    Computed chunk by chunk: a tensor on an accelerator is copied to the CPU 16 MiB at a time,
    and a non-contiguous one is made contiguous (on its device) first.
    """
    flat = tensor.detach().reshape(-1)
    digest = hashlib.sha256()
    if flat.numel() == 0:
        return digest.hexdigest()
    raw = flat.view(torch.uint8)
    unit = flat.element_size() // (2 if flat.dtype.is_complex else 1)
    for start in range(0, raw.numel(), DIGEST_CHUNK):
        piece = raw[start : start + DIGEST_CHUNK]
        if piece.device.type != "cpu":
            piece = piece.cpu()
        if sys.byteorder == "big" and unit > 1:  # hash the little-endian bytes everywhere
            piece = piece.view(-1, unit).flip(1).reshape(-1)
        digest.update(piece.numpy().data)
    return digest.hexdigest()


def file_digest(path: str | os.PathLike[str], chunk: int = DIGEST_CHUNK) -> str:
    """SHA-256 (hex) of a whole file, read ``chunk`` bytes at a time (memory stays flat)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def source_files(source: Source) -> dict[str, str] | None:
    """SHA-256 of every file a checkpoint on disk is read from, by its name relative to the
    checkpoint's folder (a single file: its name); ``None`` for a model in memory."""
    if not isinstance(source, FileSource):
        return None
    root = source.path if source.path.is_dir() else source.path.parent
    files = {}
    for path in source.reader.files:
        try:
            name = Path(path).relative_to(root).as_posix()
        except ValueError:  # an index naming a shard elsewhere (allowed roots): its full path
            name = Path(path).as_posix()
        files[name] = file_digest(path)
    return dict(sorted(files.items()))


class DigestRecorder:
    """A step hook (see :func:`terge.execute.execute`) that records each step's digests.

    The inputs are hashed before the step runs, so an in-place merge hashes the base as it was.
    """

    def __init__(self, sources: Sequence[Source], base: Source, base_index: int | None) -> None:
        self.sources = sources
        self.base = base
        self.base_index = base_index
        self.digests: dict[str, TensorDigests] = {}
        self._inputs: tuple[dict[int, str], str | None] = ({}, None)

    def before(self, step: Step) -> None:
        models = {i: tensor_digest(self.sources[i].get(step.name)) for i in step.contributors}
        base = None
        if step.uses_base:
            if self.base_index is None:
                base = tensor_digest(self.base.get(step.name))
            elif self.base_index not in models:
                models[self.base_index] = tensor_digest(self.base.get(step.name))
        self._inputs = (dict(sorted(models.items())), base)

    def after(self, step: Step, written: torch.Tensor) -> None:
        models, base = self._inputs
        self.digests[step.name] = TensorDigests(tensor_digest(written), models, base)
