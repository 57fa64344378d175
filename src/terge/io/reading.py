"""Lazy checkpoint reading.

:func:`open_checkpoint` takes a ``.safetensors`` file, a ``.bin``/``.pt``/``.pth`` file, an
``*.index.json`` file or a Hugging Face-style folder, checks every header and index up front (so a
bad download fails before anything is merged or written), and then reads one tensor at a time.
"""

from __future__ import annotations

import difflib
import math
import mmap
import os
import re
import stat
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import torch
from safetensors import safe_open

from ..errors import CheckpointError, TensorNotFoundError
from ..patterns import Patterns, PatternSet, selected
from .dtypes import SAFETENSORS_DTYPES
from .hub import locate
from .parsing import ParseProblem, decode_utf8, loads_json, read_capped
from .training import (
    STATE_FILES,
    CheckpointLike,
    CheckpointSpec,
    Selection,
    as_spec,
    checkpoint,
    refused_error,
    refused_globals,
    select,
)

if TYPE_CHECKING:
    from .distributed import DistributedCheckpoint

PathLike = Union[str, "os.PathLike[str]"]


class TensorInfo(NamedTuple):
    """A tensor's shape and dtype, known from headers without reading its data."""

    shape: torch.Size
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_MAX_SIZE = 2**63 - 1  # the largest size of a dimension torch can hold (an int64)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_FOLDER_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
"""The torch files a folder's weights may be in; ``.ckpt`` files are whole training checkpoints
(Lightning's), one per file: a folder of them is a run to choose from, not one model."""

_CORRUPT_FIX = "the file is truncated or corrupt: download or save it again"


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; {_CORRUPT_FIX}.", path)


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """Check a safetensors header against the file; its tensors in file order, and where each
    one's data starts in the file (for zero-copy reads).

    Done by hand (8-byte little-endian length, then JSON) so that a truncated or scribbled file
    is reported with what is wrong and where, rather than as a generic library error.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path} is not a regular file; give a .safetensors file.", path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"{size} bytes is too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise _corrupt(
                path,
                f"the safetensors header claims {length} bytes but only {size - 8} follow its "
                "8-byte length",
            )
        if length > _MAX_HEADER_BYTES:
            raise _corrupt(path, f"the safetensors header claims an implausible {length} bytes")
        raw = file.read(length)
    try:
        text = decode_utf8(raw, "the safetensors header")
    except ParseProblem as problem:  # not a truncation: bytes no safetensors writer writes
        raise CheckpointError(
            f"{path}: {problem}, as the safetensors format requires; the file was not written "
            "by a safetensors writer, or was overwritten since: save or download it again.",
            path,
        ) from None
    try:
        header = loads_json(text, "the safetensors header")
    except ParseProblem as problem:
        raise _corrupt(path, str(problem)) from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    entries: list[tuple[int, str, TensorInfo]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype_code, shape, begin, end = _header_entry(path, name, entry)
        dtype = SAFETENSORS_DTYPES.get(dtype_code)
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has safetensors dtype {dtype_code!r}, which this torch "
                f"{torch.__version__} cannot represent; upgrade torch or convert the file.",
                path,
            )
        if end > data_bytes:
            raise _corrupt(
                path,
                f"tensor {name!r} lies at data bytes {begin}-{end} but the file holds only "
                f"{data_bytes} bytes of data",
            )
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise _corrupt(
                path,
                f"tensor {name!r} of shape {list(shape)} and dtype {dtype_code} needs "
                f"{nbytes} bytes but its data offsets span {end - begin}",
            )
        info = TensorInfo(torch.Size(shape), dtype)
        entries.append((begin, name, info))
    entries.sort(key=lambda entry: entry[0])
    start = 8 + length
    return {name: info for _, name, info in entries}, {
        name: start + begin for begin, name, _ in entries
    }


def _short(value: Any) -> str:
    """``repr(value)``, cut to a length a one-line message can hold."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _header_entry(path: Path, name: str, entry: Any) -> tuple[str, list[int], int, int]:
    """A header entry's dtype code, shape and data offsets, each checked for its type; the
    field at fault is named."""

    def bad(field: str, wanted: str, value: Any) -> CheckpointError:
        return _corrupt(
            path,
            f"the header entry of tensor {_short(name)} is malformed: its {field} is "
            f"{_short(value)}, not {wanted}",
        )

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    if not isinstance(entry, dict):
        raise bad("value", "an object with dtype, shape and data_offsets", entry)
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise _corrupt(
                path, f"the header entry of tensor {_short(name)} is malformed: it has no {field!r}"
            )
    dtype_code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_code, str):
        raise bad("dtype", 'a dtype name such as "F32"', dtype_code)
    if not (isinstance(shape, list) and all(count(n) for n in shape)):
        raise bad("shape", "a list of sizes (ints >= 0)", shape)
    if any(n > _MAX_SIZE for n in shape):  # torch.Size holds it, but no tensor can take it
        raise bad("shape", f"a list of sizes torch can hold (at most {_MAX_SIZE})", shape)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(count, offsets))):
        raise bad("data_offsets", "[begin, end] (ints >= 0)", offsets)
    begin, end = offsets
    if begin > end:
        raise bad("data_offsets", "[begin, end] with begin <= end", offsets)
    return dtype_code, shape, begin, end


class _SafetensorsFile:
    """One safetensors file, its header checked and a handle kept open for lazy reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.infos, self._offsets = _read_safetensors_header(path)
        self._map: mmap.mmap | None = None
        self._descriptor: int | None = None
        if not _utf8_name(path):
            raise CheckpointError(
                f"{path}: its name is not valid UTF-8 (it holds bytes no UTF-8 text has), and the "
                "safetensors library opens only files whose path is UTF-8; rename the file (or "
                "its folder).",
                path,
            )
        try:
            self._handle: Any = safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # the library checks more than the header (coverage, ...)
            raise _corrupt(path, f"safetensors cannot open it ({error})") from None

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def view(self, name: str) -> torch.Tensor:
        """``name`` as a view of a private (copy-on-write) memory map of the file, no copy.

        Its pages stay file-backed, so reading a whole model costs page cache, not process
        memory. A misaligned tensor (or a dtype ``torch.frombuffer`` refuses) is left to the
        safetensors library (which, since 0.8, also returns a view of its own map).
        """
        info, offset = self.infos[name], self._offsets[name]
        if info.numel == 0 or offset % info.dtype.itemsize:
            return self.get(name)
        if self._map is None:
            with open(self.path, "rb") as file:  # the map outlives the descriptor
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
        try:
            flat = torch.frombuffer(self._map, dtype=info.dtype, count=info.numel, offset=offset)
        except (TypeError, ValueError, RuntimeError):
            return self.get(name)
        return flat.view(info.shape)

    def prefetch(self, name: str) -> int:
        """Ask the kernel to start reading ``name``'s bytes from disk now (``posix_fadvise``
        ``WILLNEED``: it queues the reads and returns), so that a merge computing another tensor
        meanwhile finds these in the page cache: the disk sees long sequential requests instead
        of one page fault at a time. Returns the bytes asked for (0 where nothing was)."""
        info, offset = self.infos[name], self._offsets[name]
        size = info.numel * info.dtype.itemsize
        if size == 0 or not hasattr(os, "posix_fadvise"):
            return 0
        try:
            if self._descriptor is None:
                self._descriptor = os.open(self.path, os.O_RDONLY)
            os.posix_fadvise(self._descriptor, offset, size, os.POSIX_FADV_WILLNEED)
        except OSError:  # only a hint: a closed or vanished file is read as it is touched
            return 0
        return size

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)
        descriptor, self._descriptor = self._descriptor, None
        if descriptor is not None:
            os.close(descriptor)
        # Views still hold the map (torch.frombuffer keeps a reference): closing it here would
        # leave them dangling, so it is only dropped and unmapped when the last view dies.
        self._map = None


class _TorchFile:
    """One ``torch.save`` file, memory-mapped so that only the tensors used are paged in.

    A training checkpoint's model state dict is found in it (see :mod:`terge.io.training`);
    ``selection`` says which entry and prefix that was (``None``: a plain state dict). The other
    entries' tensors (the optimizer's) are views of the map too, never touched, so never read.
    """

    def __init__(self, path: Path, spec: CheckpointSpec | None = None) -> None:
        self.path = path
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe would block torch.load forever
            raise CheckpointError(
                f"{path} is not a regular file; give a .bin, .pt, .pth or .ckpt file.", path
            )
        # mmap needs the zip format of torch >= 1.6; the legacy format is loaded into memory.
        mmap = zipfile.is_zipfile(path)
        try:
            loaded = torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
        except Exception as error:
            refused = refused_globals(path, error)
            if refused:
                raise refused_error(path, refused) from None
            # torch's weights-only errors open with boilerplate: the cause follows this marker
            _, marker, cause = str(error).partition("WeightsUnpickler error:")
            lines = (cause if marker else str(error)).splitlines()
            first_line = next((line.strip() for line in lines if line.strip()), "")
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) cannot read it ({type(error).__name__}: "
                f"{first_line}); the file is truncated or corrupt, or holds pickled objects "
                "other than tensors: save a state_dict of tensors (or safetensors) instead.",
                path,
            ) from None
        entry, prefix = (None, None) if spec is None else (spec.entry, spec.prefix)
        tensors, self.selection = select(loaded, path, entry, prefix)
        self._tensors: dict[str, torch.Tensor] | None = tensors
        self.infos = {name: TensorInfo(t.shape, t.dtype) for name, t in tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        assert self._tensors is not None
        return self._tensors[name]

    view = get  # already a view of the file's memory map (or, for legacy files, of memory)

    def close(self) -> None:
        self._tensors = None


_File = Union[_SafetensorsFile, _TorchFile, "DistributedCheckpoint"]


def _utf8_name(path: Path) -> bool:
    """Whether ``path`` is UTF-8 text (a name with other bytes decodes to lone surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _open_file(path: Path, spec: CheckpointSpec | None = None) -> _File:
    if path.name.endswith(".safetensors"):
        return _SafetensorsFile(path)
    if path.suffix in _TORCH_SUFFIXES:
        return _TorchFile(path, spec)
    raise CheckpointError(
        f"{path}: unknown checkpoint file suffix {path.suffix!r}; terge reads .safetensors, "
        ".bin, .pt, .pth and .ckpt files, *.index.json indexes and folders of them. Rename the "
        "file if it is one of these.",
        path,
    )


_HUB_REPO = re.compile(r"(models|datasets|spaces)--.+")
"""A Hugging Face Hub cache folder of one repository (``models--org--name``)."""


def allowed_roots(folder: PathLike) -> tuple[Path, ...]:
    """Where the files of a checkpoint folder may really lie, links followed: in the folder.

    A Hugging Face Hub cache snapshot (``models--org--name/snapshots/<revision>/``) is a folder
    of links into its repository's ``blobs/``, so there the repository's cache folder counts too.
    """
    real = Path(folder).expanduser().resolve()
    snapshots = real.parent
    if snapshots.name == "snapshots" and _HUB_REPO.fullmatch(snapshots.parent.name):
        return real, snapshots.parent
    return (real,)


def outside(path: Path, roots: tuple[Path, ...]) -> Path | None:
    """Where ``path`` really lies (links followed) when that is outside every root, else None.

    A path that cannot be resolved (a link loop) counts as outside: it is not known to be in.
    """
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a link loop, before Python 3.13
        return path
    if any(real.is_relative_to(root) for root in roots):
        return None
    return real


def _check_inside(path: Path, roots: tuple[Path, ...], what: str, source: Path) -> None:
    """Refuse a file of a checkpoint folder (``what`` says which) that lies outside it."""
    real = outside(path, roots)
    if real is not None:
        raise CheckpointError(
            f"{source}: {what} resolves to {real}, outside the checkpoint folder {roots[0]}; "
            "terge reads a folder's files only from inside it (a Hub cache snapshot may also "
            "point into its repository's blobs/): copy the file into the folder, or pass the "
            "file's own path.",
            source,
        )


def _pick_index(folder: Path, indexes: list[Path], preferred: str) -> Path:
    for index in indexes:
        if index.name == preferred:
            return index
    if len(indexes) == 1:
        return indexes[0]
    names = ", ".join(index.name for index in indexes)
    raise CheckpointError(
        f"{folder} holds several indexes ({names}) and none is {preferred}; pass the path of "
        "the index to read.",
        folder,
    )


def _folder_layout(folder: Path) -> tuple[Path | None, list[Path]]:
    """The index or unindexed shard files a folder's weights are in (safetensors first).

    The one chosen must lie inside the folder (see :func:`allowed_roots`): a link out of it is
    refused, not followed.
    """
    index, shards = _pick_layout(folder)
    roots = allowed_roots(folder)
    for path in [index] if index is not None else shards:
        _check_inside(path, roots, f"{path.name} is a link that", folder)
    return index, shards


def _pick_layout(folder: Path) -> tuple[Path | None, list[Path]]:
    """The index or unindexed shard files a folder's weights are in (safetensors first)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    torch_files = [
        p
        for p in files
        if p.name.endswith(_FOLDER_TORCH_SUFFIXES) and not STATE_FILES.fullmatch(p.name)
    ]
    for suffix, preferred, single, tensor_files in (
        (
            ".safetensors.index.json",
            "model.safetensors.index.json",
            "model.safetensors",
            safetensors,
        ),
        (".bin.index.json", "pytorch_model.bin.index.json", "pytorch_model.bin", torch_files),
    ):
        indexes = [p for p in files if p.name.endswith(suffix)]
        if indexes:
            return _pick_index(folder, indexes, preferred), []
        for path in tensor_files:  # as transformers does; ignores e.g. adapter_model.safetensors
            if path.name == single:
                return None, [path]
        if tensor_files:
            return None, tensor_files
    names = [p.name for p in files]
    listing = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") or "nothing"
    run = any(name.endswith(".ckpt") for name in names) or any(
        p.is_dir() and p.name.startswith("checkpoint-") for p in folder.iterdir()
    )
    hint = (
        "; it is a run's folder of checkpoints: merge some of them with "
        "terge.choose(folder, last=N) (terge merge FOLDER --last N), or pass their paths"
        if run
        else "; pass the folder or file that holds the weights"
    )
    raise CheckpointError(
        f"{folder} holds no tensor files (no *.safetensors, *.bin, *.pt or *.pth, nor an "
        f"index; it holds {listing}){hint}.",
        folder,
    )


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = read_capped(index, _MAX_HEADER_BYTES)
    except OSError as error:
        raise CheckpointError(
            f"cannot read the index {index}: {error.strerror or error}.", index
        ) from None
    except ParseProblem as problem:
        raise CheckpointError(
            f"the index {index} {problem}; give a *.index.json file.", index
        ) from None
    try:
        data = loads_json(decode_utf8(raw, "the index"), "the index")
    except ParseProblem as problem:
        raise CheckpointError(
            f"{index}: {problem}; it is not a checkpoint index (or was damaged): download or "
            "save it again.",
            index,
        ) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _corrupt(index, 'the index has no "weight_map" object mapping names to shard files')
    if not weight_map:
        raise _corrupt(index, 'the index\'s "weight_map" is empty: it maps no tensor to a shard')
    return weight_map


def _file_name(name: str) -> bool:
    """Whether ``name`` can name a file at all: no NUL, and encodable for the file system (a
    JSON index can hold an unpaired surrogate such as ``\\ud800``)."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return "\0" not in name


def _check_shard_name(index: Path, shard_name: str, roots: tuple[Path, ...]) -> None:
    """An index may name only files inside its own folder: never an absolute path, a ``..``
    step, or a link whose target lies outside (a crafted index could read any file)."""
    pure = Path(shard_name)
    if not _file_name(shard_name):
        raise CheckpointError(
            f"{index} names shard {shard_name!r}, which no file can be named (it holds a NUL "
            "character or an unpaired surrogate); fix the index, or download the checkpoint "
            "again.",
            index,
        )
    if (
        pure.is_absolute()
        or pure.drive
        or ".." in pure.parts
        or "\\" in shard_name
        or not pure.parts  # "" or ".": the folder itself
    ):
        raise CheckpointError(
            f"{index} names shard {shard_name!r}, which is not a file inside the index's folder "
            f"{index.parent}; an index may only name its own shards (by file name): fix the "
            "index, or download the checkpoint again.",
            index,
        )
    _check_inside(index.parent / shard_name, roots, f"shard {shard_name!r} of the index", index)


class CheckpointReader:
    """A checkpoint opened for lazy reading: names and shapes now, tensor data on :meth:`get`.

    Every header, index and shard is checked when the reader is made, so a broken checkpoint
    fails before any merging or writing starts. Use it as a context manager (or call
    :meth:`close`) to release the open files.
    """

    def __init__(
        self, path: CheckpointLike, *, entry: str | None = None, prefix: str | None = None
    ) -> None:
        located, self.hub = locate(path)
        """The Hub snapshot a Hub reference (``org/name@revision``) resolved to, else ``None``."""
        self.spec = as_spec(located)
        if entry is not None or prefix is not None:
            self.spec = checkpoint(self.spec.path, entry=entry, prefix=prefix)
        """The file and, for a training or distributed checkpoint, the entry and prefix asked
        for."""
        self.path = self.spec.path
        self.entry: str | None = None
        """For a distributed checkpoint, the entry (a dotted path) its model was read from."""
        self.selection: Selection | None = None
        """For a training checkpoint, the entry and prefix read (see :mod:`terge.io.training`)."""
        self.files: list[Path] = []
        self._opened: list[_File] = []
        self._where: dict[str, _File] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        path = self.path
        if not path.exists():
            raise CheckpointError(
                f"{path} does not exist; pass the path of a checkpoint file or folder.", path
            )
        from .distributed import DistributedCheckpoint, is_distributed_checkpoint

        if is_distributed_checkpoint(path):  # torch.distributed.checkpoint's folder
            entry = None if self.spec.entry is None else ".".join(self.spec.entry)
            distributed = DistributedCheckpoint(path, entry=entry, prefix=self.spec.prefix)
            self._opened.append(distributed)
            self.files.extend(distributed.files)
            self._where = dict.fromkeys(distributed.infos, distributed)
            self.entry = distributed.entry
            return
        if path.is_dir():
            index, shards = _folder_layout(path)
        elif path.name.endswith(".index.json"):
            index, shards = path, []
        else:
            index, shards = None, [path]
        chooses = self.spec.entry is not None or self.spec.prefix is not None
        if chooses and (
            index is not None or shards != [path] or path.suffix not in _TORCH_SUFFIXES
        ):
            raise CheckpointError(
                f"{self.spec}: entry= and prefix= choose the state dict inside one torch file "
                "(.pt, .pth, .bin, .ckpt); give that file's path, or drop them for a "
                "folder or an index.",
                path,
            )
        if index is not None:
            self._open_indexed(index)
            return
        for shard in shards:
            opened = self._add_file(shard, self.spec)
            if isinstance(opened, _TorchFile):
                self.selection = opened.selection
            for name in opened.infos:
                other = self._where.get(name)
                if other is not None:
                    raise CheckpointError(
                        f"tensor {name!r} is in both {other.path} and {shard} and no index says "
                        f"which to use; remove the stray file or read one of them alone.",
                        shard,
                    )
                self._where[name] = opened

    def _add_file(self, path: Path, spec: CheckpointSpec | None = None) -> _File:
        opened = _open_file(path, spec)
        self._opened.append(opened)
        self.files.append(path)
        return opened

    def _open_indexed(self, index: Path) -> None:
        weight_map = _read_index(index)
        shard_names = list(dict.fromkeys(weight_map.values()))
        roots = allowed_roots(index.parent)
        for shard_name in shard_names:  # all confined and present before any is opened
            _check_shard_name(index, shard_name, roots)
            shard = index.parent / shard_name
            if not shard.is_file():
                raise CheckpointError(
                    f"{index} names shard {shard_name!r} but {shard} does not exist; download "
                    "the missing shard (or fix the index).",
                    index,
                )
        shards = {name: self._add_file(index.parent / name) for name in shard_names}
        for name, shard_name in weight_map.items():
            opened = shards[shard_name]
            if name not in opened.infos:
                raise CheckpointError(
                    f"{index} puts tensor {name!r} in {shard_name} but that shard holds no such "
                    "tensor; the index and shards disagree (a partial download or a mix of "
                    "revisions?): download the checkpoint again.",
                    index,
                )
            self._where[name] = opened

    # -- queries -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Tensor names in index order, else shard-then-file order (deterministic)."""
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def _file(self, name: str) -> _File:
        opened = self._where.get(name)
        if opened is None:
            close = difflib.get_close_matches(name, self._where, n=3)
            hint = f"; close names: {', '.join(map(repr, close))}" if close else ""
            raise TensorNotFoundError(f"{self.path} holds no tensor {name!r}{hint}.", self.path)
        return opened

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of ``name``, from the header: no tensor data is read."""
        return self._file(name).infos[name]

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read ``name`` alone (and move it to ``device``).

        Do not modify the result in place: a CPU tensor may be a view of the reader's memory
        map (a torch file's, and a safetensors file's since safetensors 0.8), shared with later
        reads of the same (or a tied) name; the file itself never changes.
        """
        return self._open_file_of(name).get(name).to(device)

    def view(self, name: str) -> torch.Tensor:
        """``name`` without copying it: a CPU view of the file's private memory map.

        Pages are read from disk (and stay reclaimable page cache) only as they are touched, so
        a merge can stream through checkpoints larger than memory. Writing into the view never
        changes the file (the map is copy-on-write), but is seen by later views of ``name``.
        """
        return self._open_file_of(name).view(name)

    def prefetch(self, name: str) -> int:
        """Start reading ``name``'s bytes from disk in the background where its file allows
        (safetensors); returns the bytes asked for, 0 where nothing was (torch and distributed
        checkpoints are read as they are touched)."""
        opened = self._where.get(name)
        if opened is None or not self._opened or not isinstance(opened, _SafetensorsFile):
            return 0
        return opened.prefetch(name)

    def _open_file_of(self, name: str) -> _File:
        opened = self._file(name)
        if not self._opened:
            raise CheckpointError(f"the reader of {self.path} is closed.", self.path)
        return opened

    def close(self) -> None:
        """Release the open shard handles; the reader can no longer :meth:`get`."""
        opened, self._opened = self._opened, []
        for file in opened:
            file.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors, {len(self.files)} files)"


def open_checkpoint(
    path: CheckpointLike, *, entry: str | None = None, prefix: str | None = None
) -> CheckpointReader:
    """Open a checkpoint file, index or folder for lazy reading (see :class:`CheckpointReader`).

    A folder with a ``.metadata`` file is a distributed checkpoint (``torch.distributed.
    checkpoint``; see :class:`terge.io.distributed.DistributedCheckpoint`): ``entry`` names the
    part of it that holds the model (``None``: the only candidate), ``prefix`` a name prefix to
    keep and strip.

    A folder is read from its ``*.safetensors.index.json`` (``model.safetensors.index.json``
    preferred), else its ``model.safetensors``, else all its ``*.safetensors`` files as unindexed
    shards; failing those, the same with ``*.bin.index.json`` (``pytorch_model.bin.index.json``
    preferred), ``pytorch_model.bin``, and all its ``*.bin``/``*.pt``/``*.pth`` files except a
    Trainer's or accelerate's state files (``training_args.bin``, ``optimizer.pt``,
    ``optimizer.bin``, ...), so a Trainer's ``checkpoint-N/`` folder or a ``save_state`` folder
    reads as its model. Subfolders are not searched.

    A torch file that is a training checkpoint (``.ckpt``, ``{"model": ..., "optimizer": ...}``)
    reads as the model state dict inside it; ``path`` may be a ``terge.checkpoint(...)`` spec, or
    ``PATH::entry=KEY,prefix=PREFIX`` text, saying which (see :mod:`terge.io.training`).

    ``path`` may name a Hugging Face Hub model, ``org/name`` or ``org/name@revision`` (a local
    file or folder of that name wins; ``hf://org/name`` forces the Hub): its files are fetched
    into, or offline found in, the Hub's cache (see :mod:`terge.io.hub`); ``reader.hub`` says
    which commit was read.
    """
    return CheckpointReader(path, entry=entry, prefix=prefix)


def load(
    path: CheckpointLike,
    included: Patterns | None = None,
    excluded: Patterns | None = None,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint that pass ``included``/``excluded``; no other is read.

    Patterns follow terge's rules (a ``str`` is an exact name, a compiled pattern is searched).
    """
    include, exclude = PatternSet(included, "included"), PatternSet(excluded, "excluded")
    with open_checkpoint(path) as reader:
        return {
            name: reader.get(name, device)
            for name in reader.names()
            if selected(name, include, exclude)
        }
