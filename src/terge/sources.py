"""A uniform view over the things terge merges: modules, state dicts and checkpoint files.

A source lists its tensors' names, shapes and dtypes, and hands out a tensor only when asked.
Tensors that are the same view of the same storage (tied weights) share an ``Entry.key``.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import MergeArgumentError


@dataclass(frozen=True)
class Entry:
    """What a source says about one tensor without reading it."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    key: Hashable
    """Identity of the underlying view: entries with equal keys are tied (one tensor, two names)."""

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"


def view_key(tensor: torch.Tensor) -> Hashable:
    """A key equal for two tensors exactly when they are the same view of the same memory."""
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return ("object", id(tensor))
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
        return ("object", id(tensor))
    return (
        tensor.device,
        pointer,
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


class Source:
    """Named tensors of one model; ``get`` returns the live tensor (never a copy)."""

    kind = "tensors"

    def __init__(self, tensors: Mapping[str, torch.Tensor], others: tuple[str, ...] = ()) -> None:
        self._tensors = dict(tensors)
        self.entries: dict[str, Entry] = {
            name: Entry(name, t.shape, t.dtype, t.device, view_key(t))
            for name, t in self._tensors.items()
        }
        self.others = others
        """Names of entries that are not tensors (kept from the base as they are)."""

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    @property
    def label(self) -> str:
        """How the lineage names this model: its kind, or a file's path."""
        return self.kind

    def close(self) -> None:
        """Release what the source holds open (files); nothing for in-memory models."""

    def holds(self, name: str, shape: torch.Size) -> bool:
        entry = self.entries.get(name)
        return entry is not None and entry.shape == shape


class ModuleSource(Source):
    """A module's parameters (with ``buffers=True`` its buffers too), tied names included."""

    kind = "module"

    def __init__(self, module: torch.nn.Module, buffers: bool) -> None:
        self.module = module
        tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        if buffers:
            for name, buffer in module.named_buffers(remove_duplicate=False):
                if buffer is not None:
                    tensors[name] = buffer
        super().__init__(tensors)


class StateDictSource(Source):
    """A mapping of names to tensors; any non-tensor values are reported and kept from the base."""

    kind = "state_dict"

    def __init__(self, mapping: Mapping[str, Any]) -> None:
        self.mapping = mapping
        tensors = {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}
        others = tuple(k for k in mapping if k not in tensors)
        for key in tensors:
            if not isinstance(key, str):
                raise MergeArgumentError(
                    f"a state dict has the key {key!r} of type {type(key).__name__}; tensor "
                    "names must be str."
                )
        super().__init__(tensors, others)


class FileSource(Source):
    """A checkpoint on disk (file or folder): names, shapes and dtypes from its headers.

    Opening checks every header and index, so a broken file fails before anything is merged.
    ``get`` is a zero-copy view of the file's private memory map (see
    ``CheckpointReader.view``): a tensor's pages are read only when the merge touches them, and
    stay reclaimable page cache rather than process memory. Each name is its own tensor: files
    hold no ties (``save_pretrained`` writes tied tensors once).
    """

    kind = "file"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from .checkpoints import open_checkpoint  # safetensors is imported only when used

        self.path = Path(path).expanduser()
        self.reader = open_checkpoint(self.path)
        cpu = torch.device("cpu")
        self.entries = {}
        for name in self.reader.names():
            info = self.reader.info(name)
            self.entries[name] = Entry(name, info.shape, info.dtype, cpu, ("file", name))
        self.others = ()

    def get(self, name: str) -> torch.Tensor:
        return self.reader.view(name)

    @property
    def label(self) -> str:
        return str(self.path)

    def close(self) -> None:
        self.reader.close()


def is_path(model: Any) -> bool:
    """Whether ``model`` names a checkpoint on disk rather than being a model in memory."""
    return isinstance(model, (str, os.PathLike))


def as_source(model: Any, buffers: bool, where: str) -> Source:
    """Wrap a module, a state dict or a checkpoint path; ``where`` names it in errors."""
    if isinstance(model, torch.nn.Module):
        return ModuleSource(model, buffers)
    if isinstance(model, Mapping):
        return StateDictSource(model)
    if is_path(model):
        return FileSource(model)
    raise MergeArgumentError(
        f"{where} is a {type(model).__name__}; terge merges torch.nn.Module objects, state "
        "dicts (mappings of names to tensors) and checkpoint paths (str or os.PathLike)."
    )
