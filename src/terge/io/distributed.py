"""Distributed checkpoints (``torch.distributed.checkpoint``, "DCP"): read without a process group,
written so that ``torch.distributed.checkpoint.load`` loads them into a sharded (FSDP2) model.

A DCP folder holds a ``.metadata`` file (a pickle of torch's ``Metadata``: every tensor's shape,
dtype and chunks, and where each chunk's bytes lie) and ``__<rank>_<n>.distcp`` files in which
each chunk is one ``torch.save`` record. :class:`DistributedCheckpoint` reads the metadata through
a restricted unpickler (only torch's own metadata classes, ``torch.Size``, dtypes and paths may
appear in it: a crafted ``.metadata`` cannot run code), checks it up front, and then reads one
tensor at a time, stitching the chunks written by different ranks into the whole tensor. Only the
model's tensors are offered: optimizer state, schedulers, data loaders and counters saved beside
it are told apart by where ``dcp.save`` put them (see :func:`model_entries`).

:class:`DistributedCheckpointWriter` streams tensors into a new DCP folder, one ``torch.save``
record at a time (peak memory: one tensor), atomically as every terge writer.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import math
import os
import pathlib
import pickle
import stat
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

from ..errors import CheckpointError
from .reading import PathLike, TensorInfo, allowed_roots, outside
from .writing import ShardedWriter

METADATA_FILE = ".metadata"
"""The file that makes a folder a distributed checkpoint (``torch.distributed.checkpoint``)."""

DATA_SUFFIX = ".distcp"

_METADATA_LIMIT = 1 << 31
"""The largest ``.metadata`` read (2 GiB): far above what any real checkpoint needs."""

_CORRUPT_FIX = "the checkpoint is damaged or was not written by torch.distributed.checkpoint"

_TRAINING_STATE = frozenset(
    {
        "optimizer",
        "optimizers",
        "optim",
        "optim_state",
        "optimizer_state",
        "optimizer_states",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "schedulers",
        "dataloader",
        "dataloaders",
        "data_loader",
        "train_state",
        "trainer_state",
        "training_state",
        "rng",
        "rng_state",
        "rng_states",
        "scaler",
        "grad_scaler",
    }
)
"""Top-level entries of a training checkpoint that never hold the model (torchtitan's,
the FSDP2 tutorials', Lightning's and accelerate's names)."""


def is_distributed_checkpoint(path: PathLike) -> bool:
    """Whether ``path`` is a DCP folder (it holds ``.metadata``) or that ``.metadata`` file."""
    path = Path(path)
    if path.name == METADATA_FILE:
        return path.is_file()
    return path.is_dir() and (path / METADATA_FILE).is_file()


# -- the metadata, unpickled with care ------------------------------------------------------------

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}
"""The globals a ``.metadata`` pickle may name: torch's metadata dataclasses and what they hold
(``torch.Size``, dtypes and layouts, the checkpoint id's path). Nothing that runs code."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch's checkpoint ``Metadata`` and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout)):  # how dtypes and layouts pickle
            return value
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which is not one of torch's checkpoint metadata classes"
        )


def _read_metadata(folder: Path) -> Any:
    """The folder's ``Metadata``, unpickled with only torch's metadata classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata

    path = folder / METADATA_FILE
    roots = allowed_roots(folder)
    real = outside(path, roots)
    if real is not None:
        raise CheckpointError(
            f"{path} is a link to {real}, outside the checkpoint folder; copy the file into the "
            "folder.",
            path,
        )
    if not stat.S_ISREG(os.stat(path).st_mode) or path.stat().st_size > _METADATA_LIMIT:
        raise CheckpointError(f"{path} is not a plausible DCP metadata file; {_CORRUPT_FIX}.", path)
    try:
        with open(path, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except Exception as error:  # UnpicklingError, EOFError, a class's own error, ...
        raise CheckpointError(
            f"{path}: the distributed checkpoint's metadata cannot be read ({error}); "
            f"{_CORRUPT_FIX}: save it again with torch.distributed.checkpoint.save.",
            path,
        ) from None
    entries = getattr(metadata, "state_dict_metadata", None)  # a crafted pickle may leave it out
    if (
        not isinstance(metadata, Metadata)
        or not isinstance(entries, dict)
        or not all(isinstance(key, str) and key for key in entries)
    ):
        raise CheckpointError(
            f"{path} holds a {type(metadata).__name__}, not torch.distributed.checkpoint's "
            f"Metadata naming each entry by a str; {_CORRUPT_FIX}.",
            path,
        )
    return metadata


# -- which entry is the model ---------------------------------------------------------------------


def _entry_paths(metadata: Any) -> dict[str, tuple[str, ...]]:
    """Each key's place in the state dict that was saved, as a path of dict keys: what
    ``dcp.save`` recorded when it flattened the nested dicts (``planner_data``), else the key
    alone (a flat state dict)."""
    mapping = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    paths = {}
    for key in metadata.state_dict_metadata:
        path: Any = mapping.get(key)
        valid = isinstance(path, tuple) and path and ".".join(map(str, path)) == key
        paths[key] = tuple(map(str, path)) if valid else (key,)
    return paths


def _optimizer_prefixes(paths: Mapping[str, tuple[str, ...]]) -> set[tuple[str, ...]]:
    """Where optimizers were saved: every parent of a ``param_groups`` entry (an optimizer's
    ``state_dict()``, plain or as ``get_optimizer_state_dict`` gives it, holds one)."""
    prefixes = set()
    for key, path in paths.items():
        parts = path if len(path) > 1 else tuple(key.split("."))
        for i, part in enumerate(parts):
            if part == "param_groups":
                prefixes.add(parts[:i])
    return prefixes


def _is_training_state(key: str, path: tuple[str, ...], optimizers: set[tuple[str, ...]]) -> bool:
    """Whether a saved entry is training state, never the model: an optimizer's, or a known
    top-level entry (scheduler, data loader, counters, ...)."""
    if path[0] in _TRAINING_STATE or key.split(".", 1)[0] in _TRAINING_STATE:
        return True
    parts = path if len(path) > 1 else tuple(key.split("."))
    return any(
        parts[: len(p)] == p and len(parts) > len(p) and parts[len(p)] in ("state", "param_groups")
        for p in optimizers
    )


def model_entries(metadata: Any) -> dict[str, list[str]]:
    """The candidates for the model: each entry (the dotted path of dict keys it was saved under,
    ``""`` for the top level) -> its tensors' keys, training state left out.

    ``dcp.save({"model": sd, "optimizer": osd, "step": 3})`` (the FSDP2 tutorials) has one
    candidate, ``"model"``; torchtitan, which saves the model's tensors at the top level beside
    ``optimizer``, ``lr_scheduler``, ``dataloader`` and ``train_state``, has ``""``; a checkpoint
    that also keeps an EMA (``{"model": ..., "ema": ...}``) has two. A group without a floating
    tensor of rank 1 or more (a step counter) is no model and is left out.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    paths = _entry_paths(metadata)
    optimizers = _optimizer_prefixes(paths)
    entries: dict[str, list[str]] = {}
    for key, value in metadata.state_dict_metadata.items():
        if not isinstance(value, TensorStorageMetadata):
            continue
        path = paths[key]
        if _is_training_state(key, path, optimizers):
            continue
        entries.setdefault(".".join(path[:-1]), []).append(key)
    return {
        entry: keys
        for entry, keys in entries.items()
        if any(_plausible_weight(metadata.state_dict_metadata[key]) for key in keys)
    }


def _plausible_weight(value: Any) -> bool:
    properties = getattr(value, "properties", None)
    dtype = getattr(properties, "dtype", None)
    size = getattr(value, "size", ())
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point and len(size) >= 1


def _describe(entries: Mapping[str, Sequence[str]]) -> str:
    return ", ".join(
        f"{entry or '<top level>'!r} ({len(keys)} tensors)" for entry, keys in entries.items()
    )


def _choose(
    folder: Path, metadata: Any, entry: str | None, prefix: str | None
) -> tuple[str, dict[str, str]]:
    """The entry taken and its tensors: model name -> key in the checkpoint."""
    entries = model_entries(metadata)
    if entry is None:
        if len(entries) != 1:
            what = "no model tensors" if not entries else "several candidates for the model"
            listing = _describe(entries) if entries else _top_level(metadata)
            raise CheckpointError(
                f"{folder} is a distributed checkpoint with {what} ({listing}); choose the "
                f"entry that holds the model with terge.checkpoint({str(folder)!r}, "
                f"entry='...') or the path '{folder}::entry=...' (the dotted path it was saved "
                "under, '' for the top level).",
                folder,
            )
        entry = next(iter(entries))
    elif not isinstance(entry, str):
        raise CheckpointError(f"entry must be a str or None; got {entry!r}.", folder)
    keys = _entry_keys(metadata, entry)
    if not keys:
        raise CheckpointError(
            f"{folder} is a distributed checkpoint with no model tensors under the entry "
            f"{entry!r}; its candidates are {_describe(entries) or 'none'} (top-level entries: "
            f"{_top_level(metadata)}).",
            folder,
        )
    names = {key[len(entry) + 1 :] if entry else key: key for key in keys}
    if prefix:
        names = {name[len(prefix) :]: key for name, key in names.items() if name.startswith(prefix)}
        if not names:
            raise CheckpointError(
                f"no tensor of {folder}'s entry {entry!r} starts with the prefix {prefix!r}; "
                "check the prefix (or pass none).",
                folder,
            )
    return entry, names


def _entry_keys(metadata: Any, entry: str) -> list[str]:
    """The keys of the tensors under ``entry`` (all of them for ``""``), training state left
    out."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    paths = _entry_paths(metadata)
    optimizers = _optimizer_prefixes(paths)
    start = entry + "." if entry else ""
    return [
        key
        for key, value in metadata.state_dict_metadata.items()
        if isinstance(value, TensorStorageMetadata)
        and key.startswith(start)
        and len(key) > len(start)
        and not _is_training_state(key, paths[key], optimizers)
    ]


def _top_level(metadata: Any) -> str:
    names = list(dict.fromkeys(key.split(".", 1)[0] for key in metadata.state_dict_metadata))
    return ", ".join(map(repr, names[:12])) + (", ..." if len(names) > 12 else "") or "nothing"


# -- the chunks of one tensor ---------------------------------------------------------------------


class _Chunk(NamedTuple):
    """One rank's piece of a tensor and where its ``torch.save`` record lies."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    begin: int
    length: int
    transforms: tuple[str, ...]


class _Tensor(NamedTuple):
    key: str
    info: TensorInfo
    chunks: tuple[_Chunk, ...]


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_tensor(folder: Path, metadata: Any, key: str, files: dict[str, int]) -> _Tensor:
    """A tensor's metadata and chunks, every field checked: chunks inside the tensor and
    covering it exactly, each stored in a file of the folder, within that file."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    def bad(problem: str) -> CheckpointError:
        return CheckpointError(
            f"{folder}: the metadata of tensor {key!r} {problem}; {_CORRUPT_FIX}: save it again.",
            folder,
        )

    value = metadata.state_dict_metadata[key]
    dtype = getattr(getattr(value, "properties", None), "dtype", None)
    size, chunks = getattr(value, "size", None), getattr(value, "chunks", None)
    if not isinstance(dtype, torch.dtype):
        raise bad(f"gives the dtype {_shown(dtype)}")
    if not (isinstance(size, Sequence) and all(map(_count, size))):
        raise bad(f"gives the shape {_shown(size)}")
    if not isinstance(chunks, list) or not chunks:
        raise bad("lists no chunks")
    storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
    read: list[_Chunk] = []
    for number, chunk in enumerate(chunks):
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (
            isinstance(offsets, Sequence)
            and isinstance(sizes, Sequence)
            and len(offsets) == len(sizes) == len(size)
            and all(map(_count, [*offsets, *sizes]))
            and all(o + s <= n for o, s, n in zip(offsets, sizes, size))
        ):
            place = f"at {_shown(offsets)} of size {_shown(sizes)}"
            raise bad(f"has chunk {number} {place}, outside its shape")
        where = storage.get(MetadataIndex(key, offsets))
        file: Any = getattr(where, "relative_path", None)
        begin: Any = getattr(where, "offset", None)
        length: Any = getattr(where, "length", None)
        transforms: Any = getattr(where, "transform_descriptors", None) or ()
        if not (isinstance(file, str) and _count(begin) and _count(length)):
            raise bad(f"has chunk {number} stored nowhere (its storage entry is {_shown(where)})")
        if not (isinstance(transforms, Sequence) and all(isinstance(t, str) for t in transforms)):
            raise bad(f"has chunk {number} with transforms {_shown(transforms)}")
        file_size = files.get(file)
        if file_size is None:
            file_size = files[file] = _data_file_size(folder, file, key)
        if begin + length > file_size:
            raise bad(
                f"puts chunk {number} at bytes {begin}-{begin + length} of {file}, which holds "
                f"only {file_size} bytes (truncated?)"
            )
        read.append(_Chunk(tuple(offsets), tuple(sizes), file, begin, length, tuple(transforms)))
    if not _covers(tuple(size), read):
        raise bad("has chunks that overlap or leave part of the tensor out")
    return _Tensor(key, TensorInfo(torch.Size(size), dtype), tuple(read))


def _shown(value: Any) -> str:
    """``repr(value)``, or what ``value`` is where its repr fails (a metadata dataclass that a
    crafted pickle left a field out of)."""
    try:
        return repr(value)
    except Exception:
        return f"a {type(value).__name__} without all its fields"


def _covers(size: tuple[int, ...], chunks: Sequence[_Chunk]) -> bool:
    """Whether the chunks tile the tensor: their volumes add up to it and no two overlap.

    Chunks that split one dimension alone (FSDP's sharding) are checked by sorting them; others
    pair by pair, a block of pairs at a time (so thousands of chunks need little memory).
    """
    if sum(math.prod(c.sizes) for c in chunks) != math.prod(size):
        return False
    boxes = [c for c in chunks if math.prod(c.sizes)]
    if len(boxes) < 2:
        return True
    split = [d for d in range(len(size)) if any(c.sizes[d] != size[d] for c in boxes)]
    if len(split) == 1:  # whole along every other dimension: no gaps and no overlaps in order
        d = split[0]
        spans = sorted((c.offsets[d], c.offsets[d] + c.sizes[d]) for c in boxes)
        return all(end <= begin for (_, end), (begin, _) in itertools.pairwise(spans))
    starts = torch.tensor([c.offsets for c in boxes], dtype=torch.int64)
    ends = starts + torch.tensor([c.sizes for c in boxes], dtype=torch.int64)
    for first in range(0, len(boxes), 256):
        low = torch.maximum(starts[first : first + 256, None, :], starts[None, :, :])
        high = torch.minimum(ends[first : first + 256, None, :], ends[None, :, :])
        overlap = (low < high).all(dim=-1)
        rows = torch.arange(overlap.shape[0])
        overlap[rows, rows + first] = False  # a chunk meets itself
        if bool(overlap.any()):
            return False
    return True


def _data_file_size(folder: Path, name: str, key: str) -> int:
    """The size of a data file the metadata names, refused unless it is a plain file of the
    folder (never an absolute path, a ``..`` step, or a link out of it)."""
    pure = pathlib.PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name or len(pure.parts) != 1:
        raise CheckpointError(
            f"{folder}: the metadata stores tensor {key!r} in {name!r}, which is not a file "
            "inside the checkpoint folder; a distributed checkpoint names only its own files: "
            f"{_CORRUPT_FIX}.",
            folder,
        )
    path = folder / name
    real = outside(path, allowed_roots(folder))
    if real is not None:
        raise CheckpointError(
            f"{folder}: tensor {key!r} is stored in {name}, which resolves to {real}, outside "
            "the checkpoint folder; copy the file into the folder.",
            folder,
        )
    try:
        info = path.stat()
    except OSError:
        raise CheckpointError(
            f"{folder}: the metadata stores tensor {key!r} in {name}, which does not exist; the "
            "checkpoint is incomplete (a rank's file is missing): copy or save it again.",
            folder,
        ) from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file; {_CORRUPT_FIX}.", folder)
    return info.st_size


class _Window(io.RawIOBase):
    """Bytes ``begin`` to ``begin + length`` of an open file, as a seekable file of their own
    (what ``torch.load`` reads a chunk's record from)."""

    def __init__(self, file: IO[bytes], begin: int, length: int) -> None:
        super().__init__()
        self._file, self._begin, self._length, self._position = file, begin, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self._length - self._position))
        if count == 0:
            return 0
        self._file.seek(self._begin + self._position)
        got = self._file.readinto(view[:count])  # type: ignore[attr-defined]
        self._position += got
        return got


# -- reading --------------------------------------------------------------------------------------


class DistributedCheckpoint:
    """The model in a DCP folder, read lazily: names, shapes and dtypes from the metadata, a
    tensor's chunks read and stitched only when it is asked for.

    ``entry`` chooses the part of the saved state dict that holds the model (a dotted path of
    the dict keys it was saved under; ``""`` the top level); ``None`` takes the only candidate
    (see :func:`model_entries`) and raises a ``CheckpointError`` listing them when there are
    several or none. ``prefix`` keeps only the names that start with it, without it. The
    metadata and every chunk's place are checked on opening; data files are opened on the first
    read. :attr:`chunk_reads` counts the chunk records read.
    """

    def __init__(
        self, path: PathLike, *, entry: str | None = None, prefix: str | None = None
    ) -> None:
        path = Path(path).expanduser()
        self.path = path.parent if path.name == METADATA_FILE else path
        metadata = _read_metadata(self.path)
        self.entry, names = _choose(self.path, metadata, entry, prefix)
        files: dict[str, int] = {}
        self._tensors = {
            name: _checked_tensor(self.path, metadata, key, files) for name, key in names.items()
        }
        self.infos: dict[str, TensorInfo] = {n: t.info for n, t in self._tensors.items()}
        self.files = [self.path / METADATA_FILE, *(self.path / name for name in sorted(files))]
        self.chunk_reads = 0
        self._handles: dict[str, IO[bytes]] = {}
        self._last: tuple[str, torch.Tensor] | None = None
        self._closed = False

    def key(self, name: str) -> str:
        """The key ``name`` has in the checkpoint (its entry's path, dotted, in front)."""
        return self._tensors[name].key

    def get(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, its chunks read and put in place (the last one read is
        kept, so asking again for it reads nothing). Do not modify it in place."""
        if self._closed:
            raise CheckpointError(f"the reader of {self.path} is closed.", self.path)
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        self._last = None  # let the previous tensor go before the next is read
        tensor = self._tensors[name]
        whole = torch.empty(tensor.info.shape, dtype=tensor.info.dtype)
        for chunk in tensor.chunks:
            if math.prod(chunk.sizes):
                region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
                self._read_chunk(tensor, chunk, whole[region])
        self._last = (name, whole)
        return whole

    view = get

    def _read_chunk(self, tensor: _Tensor, chunk: _Chunk, into: torch.Tensor) -> None:
        """Read one chunk's ``torch.save`` record into ``into`` (its region of the tensor).

        The record's pickle is loaded first with ``weights_only=True`` onto the meta device,
        which reads no tensor data and checks its shape and dtype against the metadata; a plain
        record (contiguous, this machine's byte order, no stream transforms) is then read from
        the file straight into place. Anything else is loaded whole by ``torch.load`` and copied.
        """
        where = f"chunk {chunk.offsets} of tensor {tensor.key!r} (bytes {chunk.begin}-"
        where += f"{chunk.begin + chunk.length} of {chunk.file})"
        handle = self._handles.get(chunk.file)
        if handle is None:
            handle = self._handles[chunk.file] = open(self.path / chunk.file, "rb")  # noqa: SIM115
        self.chunk_reads += 1
        if not chunk.transforms and _byteorder(handle, chunk) == sys.byteorder:
            # torch.load byteswaps a record of the other byte order even onto "meta": a segfault
            meta = self._load(handle, tensor, chunk, where, "meta")
            start = _plain_record(meta, chunk)
            if start is not None:
                _read_exactly(handle, chunk.begin + start, into, self.path, where)
                return
        into.copy_(self._load(handle, tensor, chunk, where, "cpu"))

    def _load(
        self, handle: IO[bytes], tensor: _Tensor, chunk: _Chunk, where: str, device: str
    ) -> torch.Tensor:
        """The chunk's record through ``torch.load(weights_only=True)`` onto ``device``,
        checked against the metadata's shape and dtype."""
        stream: IO[bytes] = io.BufferedReader(_Window(handle, chunk.begin, chunk.length))
        try:
            if chunk.transforms:
                stream = _untransformed(stream, chunk.transforms)
            loaded = torch.load(stream, map_location=device, weights_only=True)
        except Exception as error:
            first = next(iter(str(error).strip().splitlines()), "")
            raise CheckpointError(
                f"{self.path}: {where} is not a tensor torch.load can read "
                f"({type(error).__name__}: {first}); {_CORRUPT_FIX}: save it again.",
                self.path,
            ) from None
        if not isinstance(loaded, torch.Tensor) or (
            tuple(loaded.shape) != chunk.sizes or loaded.dtype != tensor.info.dtype
        ):
            got = (
                f"a {loaded.dtype} tensor of shape {list(loaded.shape)}"
                if isinstance(loaded, torch.Tensor)
                else f"a {type(loaded).__name__}"
            )
            raise CheckpointError(
                f"{self.path}: {where} holds {got}, but the metadata says "
                f"{tensor.info.dtype} of shape {list(chunk.sizes)}; {_CORRUPT_FIX}.",
                self.path,
            )
        return loaded

    def close(self) -> None:
        """Close the data files and drop the kept tensor."""
        self._closed = True
        self._last = None
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.close()


def _byteorder(handle: IO[bytes], chunk: _Chunk) -> str | None:
    """The byte order ``torch.load`` takes a record's tensor bytes to be in, as torch's own zip
    reader finds it; ``None`` where that reader cannot read the record."""
    from torch.serialization import LoadEndianness, get_default_load_endianness

    try:
        record = torch._C.PyTorchFileReader(
            io.BufferedReader(_Window(handle, chunk.begin, chunk.length))
        )
        if record.has_record("byteorder"):  # type: ignore[attr-defined]
            return bytes(record.get_record("byteorder")).decode()
    except Exception:
        return None
    default = get_default_load_endianness()  # what torch.load assumes without a byteorder
    return {None: "little", LoadEndianness.LITTLE: "little", LoadEndianness.BIG: "big"}.get(
        default, sys.byteorder
    )


def _plain_record(meta: torch.Tensor, chunk: _Chunk) -> int | None:
    """Where a record's tensor bytes start in it, when they can be read as they are: one
    contiguous storage holding exactly the tensor, inside the record (in this machine's byte
    order: see :func:`_byteorder`). ``None`` otherwise (``torch.load`` then reads it)."""
    storage = meta.untyped_storage()
    start = getattr(storage, "_checkpoint_offset", None)  # set by torch.load onto "meta"
    if not (
        isinstance(start, int)
        and meta.is_contiguous()
        and meta.storage_offset() == 0
        and storage.nbytes() == meta.numel() * meta.element_size()
        and 0 <= start <= chunk.length - storage.nbytes()
    ):
        return None
    return start


def _read_exactly(
    handle: IO[bytes], position: int, into: torch.Tensor, folder: Path, where: str
) -> None:
    """Fill ``into`` (contiguous or not) with the bytes at ``position`` of the file."""
    target = (
        into
        if into.is_contiguous()
        else torch.empty_like(into, memory_format=torch.contiguous_format)
    )
    if target.numel():
        buffer = (ctypes.c_char * target.nbytes).from_address(target.data_ptr())
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            handle.seek(position + done)
            got = handle.readinto(view[done:])  # type: ignore[attr-defined]
            if not got:
                raise CheckpointError(
                    f"{folder}: {where} ends before its tensor's bytes do (the file is "
                    f"truncated); {_CORRUPT_FIX}.",
                    folder,
                )
            done += got
    if target is not into:
        into.copy_(target)


def _untransformed(stream: IO[bytes], descriptors: Sequence[str]) -> IO[bytes]:
    """A chunk's record with the stream transforms it was saved through undone (compression,
    in torch's newer writers), as torch's own reader undoes them."""
    from torch.distributed.checkpoint.filesystem import _StorageReaderTransforms

    result = _StorageReaderTransforms().transform_load_stream(None, descriptors, stream)  # type: ignore[arg-type]
    if result.seekable():
        return result
    return io.BytesIO(result.read())


# -- writing --------------------------------------------------------------------------------------


class DistributedCheckpointPart:
    """One process's tensors of a distributed checkpoint being written: each appended whole, as
    one chunk, to this rank's data files (``__<rank>_<n>.distcp``) in ``folder`` (the writer's
    temporary folder), a new file where one would pass ``max_shard_size``. ``records`` says where
    each went, for the ``.metadata`` that :class:`DistributedCheckpointWriter` writes
    (:meth:`DistributedCheckpointWriter.adopt` takes another rank's part)."""

    def __init__(
        self, folder: Path, tensors: Mapping[str, TensorInfo], rank: int, max_shard_size: int
    ) -> None:
        self.folder = Path(folder)
        self.layout = dict(tensors)
        self.rank = rank
        self.max_shard_size = max_shard_size
        self.records: dict[str, tuple[str, int, int]] = {}
        self.files: list[str] = []
        self._data: IO[bytes] | None = None
        self._data_name = ""

    def add(self, name: str, tensor: torch.Tensor, where: Path) -> None:
        """Append ``tensor`` as ``name`` (its layout's shape and dtype, on any device)."""
        info = self.layout.get(name)
        if info is None:
            raise CheckpointError(f"{name!r} is not in the output's layout.", where)
        if name in self.records:
            raise CheckpointError(f"tensor {name!r} was already written to {where}.", where)
        data = tensor.detach()
        if data.shape != info.shape or data.dtype != info.dtype:
            raise CheckpointError(
                f"tensor {name!r} is {data.dtype} of shape {list(data.shape)}, but the layout "
                f"says {info.dtype} of shape {list(info.shape)}.",
                where,
            )
        data = data.to("cpu").contiguous()
        if data.untyped_storage().nbytes() != data.nbytes:  # torch.save writes whole storages
            data = data.clone()
        stream = self.stream(data.nbytes)
        begin = stream.tell()
        torch.save(data, stream)
        self.records[name] = (self._data_name, begin, stream.tell() - begin)

    def stream(self, nbytes: int = 0) -> IO[bytes]:
        """The data file to append ``nbytes`` of tensor data to: a new one when they would push
        the current one past ``max_shard_size`` (as safetensors shards are cut)."""
        current = self._data
        if current is not None and current.tell() and current.tell() + nbytes > self.max_shard_size:
            self.close()
        if self._data is None:
            self._data_name = f"__{self.rank}_{len(self.files)}{DATA_SUFFIX}"
            self._data = open(self.folder / self._data_name, "wb")  # noqa: SIM115
            self.files.append(self._data_name)
        return self._data

    def close(self) -> None:
        """Flush the open data file to disk and close it."""
        data, self._data = self._data, None
        if data is not None:
            data.flush()
            os.fsync(data.fileno())
            data.close()

    def remove(self) -> None:
        """Close and delete this part's files (a failed write)."""
        data, self._data = self._data, None
        if data is not None:
            data.close()
        for name in self.files:
            (self.folder / name).unlink(missing_ok=True)


class DistributedCheckpointWriter(ShardedWriter):
    """Streams tensors into a new distributed checkpoint folder that
    ``torch.distributed.checkpoint.load`` reads (into plain or FSDP2-sharded models), atomically.

    ::

        layout = {"w": TensorInfo(torch.Size([4, 4]), torch.float32)}
        with DistributedCheckpointWriter("out", layout, entry="model") as writer:
            writer.add("w", tensor)

    A tied name (``aliases``: alias -> name) gets its own key, stored in its tensor's record:
    the bytes are written once and ``dcp.load`` fills both parameters. Each tensor is written
    whole, as one chunk, the moment it is added (a ``torch.save`` record appended to
    ``__0_<n>.distcp``, a new file where it would pass ``max_shard_size``), so memory holds one
    tensor at most; ``.metadata`` is written last, as ``dcp.save`` writes it, with
    every tensor's key ``entry.name`` (``name`` alone for ``entry=""``): load it with
    ``dcp.load({"model": model.state_dict()}, ...)`` for ``entry="model"``. The temporary
    folder, ``overwrite``, the refusal of outputs overlapping ``inputs`` and the atomic rename
    are :class:`ShardedWriter`'s.
    """

    def __init__(
        self,
        path: PathLike,
        tensors: Mapping[str, TensorInfo],
        *,
        aliases: Mapping[str, str] | None = None,
        entry: str = "",
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        inputs: Iterable[PathLike] = (),
    ) -> None:
        super().__init__(path, max_shard_size=max_shard_size, overwrite=overwrite, inputs=inputs)
        if not isinstance(entry, str) or entry.startswith(".") or entry.endswith("."):
            raise CheckpointError(
                f"entry must be a str naming where the tensors go ('model', or '' for the top "
                f"level), without a leading or trailing dot; got {entry!r}.",
                self.path,
            )
        self.entry = entry
        self.aliases = dict(aliases or {})
        for alias, name in self.aliases.items():
            if name not in tensors or alias in tensors:
                raise CheckpointError(
                    f"the tied name {alias!r} must stand for a tensor of the layout ({name!r} is "
                    "not one) and must not be one itself.",
                    self.path,
                )
        self._layout = dict(tensors)
        self.total_size = sum(info.nbytes for info in tensors.values())
        self._records: dict[str, tuple[str, int, int]] = {}
        self._data_files: list[str] = []
        self._part: DistributedCheckpointPart | None = None

    def key(self, name: str) -> str:
        """The key ``name`` is saved under."""
        return f"{self.entry}.{name}" if self.entry else name

    @property
    def part(self) -> DistributedCheckpointPart:
        """This process's data files (rank 0's, ``__0_<n>.distcp``), in the temporary folder."""
        if self._state != "open" or self._tmp is None:
            raise CheckpointError(
                "DistributedCheckpointWriter.add() needs an open writer: call it inside the "
                "`with` block.",
                self.path,
            )
        if self._part is None:
            self._part = DistributedCheckpointPart(self._tmp, self._layout, 0, self.max_shard_size)
        return self._part

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write ``tensor`` now as ``name`` (its layout's shape and dtype, on any device)."""
        part = self.part
        if name in self._records:
            raise CheckpointError(f"tensor {name!r} was already written to {self.path}.", self.path)
        part.add(name, tensor, self.path)
        self._records[name] = part.records[name]

    def adopt(self, records: Mapping[str, tuple[str, int, int]], files: Sequence[str]) -> None:
        """Take another process's part (:class:`DistributedCheckpointPart`, written into this
        writer's temporary folder): its tensors' records and its data files."""
        for name, record in records.items():
            if name not in self._layout or name in self._records:
                raise CheckpointError(
                    f"another process wrote {name!r}, which is not in the layout or was written "
                    "already; nothing was saved.",
                    self.path,
                )
            self._records[name] = tuple(record)  # type: ignore[assignment]
        self._data_files += list(files)

    def _finish_weights(self, tmp: Path) -> list[str]:
        unwritten = [name for name in self._layout if name not in self._records]
        if unwritten:
            missing = ", ".join(map(repr, unwritten[:5]))
            raise CheckpointError(
                f"{len(unwritten)} tensors of the layout were never written ({missing}); the "
                "output would be incomplete, so nothing was saved.",
                self.path,
            )
        part = self._part
        if part is None or not part.files:
            part = self.part
            part.stream()  # dcp.save writes a data file even for an empty state dict
        part.close()
        self._data_files = [*part.files, *self._data_files]
        with open(tmp / METADATA_FILE, "wb") as file:
            pickle.dump(self._metadata(), file)
        return [*self._data_files, METADATA_FILE]

    def _metadata(self) -> Any:
        """The ``Metadata`` ``dcp.save`` would write for these tensors, whole, saved by one rank."""
        from torch.distributed.checkpoint import metadata as dcp
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        tensors: dict[str, Any] = {}
        storage: dict[Any, Any] = {}
        planner: dict[str, tuple[str, ...]] = {}
        for name in [*self._layout, *self.aliases]:
            info = self._layout[self.aliases.get(name, name)]
            key = self.key(name)
            origin = torch.Size([0] * len(info.shape))
            tensors[key] = dcp.TensorStorageMetadata(
                properties=dcp.TensorProperties(dtype=info.dtype),
                size=torch.Size(info.shape),
                chunks=[dcp.ChunkStorageMetadata(offsets=origin, sizes=torch.Size(info.shape))],
            )
            record = self._records[self.aliases.get(name, name)]
            storage[dcp.MetadataIndex(key, origin, index=0)] = _StorageInfo(*record)
            planner[key] = (*self.entry.split("."), name) if self.entry else (name,)
        return dcp.Metadata(
            state_dict_metadata=tensors,
            planner_data=planner,
            storage_data=storage,
            storage_meta=dcp.StorageMeta(checkpoint_id=self.path, save_id=str(uuid.uuid4())),
            version=_dcp_version(),
        )

    def _discard(self) -> None:
        if self._part is not None:
            self._part.remove()
        super()._discard()


def _dcp_version() -> str:
    """The format version this torch's ``dcp.save`` writes into ``.metadata``."""
    from torch.distributed.checkpoint import filesystem

    return str(getattr(filesystem, "CURRENT_DCP_VERSION", "1.0.0"))
