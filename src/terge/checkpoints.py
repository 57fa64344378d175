"""Lazy checkpoint reading and atomic, sharded safetensors writing.

Reading: :func:`open_checkpoint` takes a ``.safetensors`` file, a ``.bin``/``.pt``/``.pth`` file, an
``*.index.json`` file or a Hugging Face-style folder, checks every header and index up front (so a
bad download fails before anything is merged or written), and then reads one tensor at a time.

Writing: :class:`ShardedWriter` streams tensors into ``model-0000i-of-0000n.safetensors`` shards
plus ``model.safetensors.index.json`` (or a single ``model.safetensors``), in a temporary folder
beside the target that is renamed into place only when everything succeeded. :func:`save` and
:func:`load` are the one-call forms.
"""

from __future__ import annotations

import difflib
import json
import math
import mmap
import os
import re
import secrets
import shutil
import struct
import tempfile
import weakref
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CheckpointError, SizeFormatError, TensorNotFoundError
from .patterns import Patterns, PatternSet, selected

PathLike = Union[str, "os.PathLike[str]"]


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_SIZE_FORMS = (
    "a positive int of bytes, or a string such as '500MB', '2GB', '1.5GB' (KB/MB/GB/TB are "
    "powers of 1000) or '2GiB', '2000MiB' (KiB/MiB/GiB/TiB are powers of 1024); units are "
    "case-insensitive and may follow a space"
)


def _umask() -> int:
    """The process's umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"2GB"`` (10^9) or ``"2GiB"`` (2^30).

    Decimal and binary units are both accepted because Hugging Face writes "5GB" while disks and
    GPUs are sized in GiB; fractional values ("1.5GB") are rounded down to whole bytes.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size > 0:
            return size
    elif isinstance(size, str):
        match = _SIZE_RE.fullmatch(size)
        if match:
            unit = (match[2] or "b").lower()
            value = int(Fraction(match[1]) * _SIZE_UNITS[unit])
            if value > 0:
                return value
    raise SizeFormatError(f"{size!r} is not a size: give {_SIZE_FORMS}.")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


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


_SAFETENSORS_DTYPE_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
_SAFETENSORS_DTYPES = {
    code: getattr(torch, name)
    for code, name in _SAFETENSORS_DTYPE_NAMES.items()
    if hasattr(torch, name)
}
_MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_TRAINER_STATE_FILES = re.compile(
    r"(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)"
)
"""Files a Hugging Face Trainer leaves beside the weights; they hold no model tensors."""

_CORRUPT_FIX = "the file is truncated or corrupt: download or save it again"


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; {_CORRUPT_FIX}.", path)


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """Check a safetensors header against the file; its tensors in file order, and where each
    one's data starts in the file (for zero-copy reads).

    Done by hand (8-byte little-endian length, then JSON) so that a truncated or scribbled file
    is reported with what is wrong and where, rather than as a generic library error.
    """
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
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise _corrupt(path, f"the safetensors header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the safetensors header is not a JSON object")
    data_bytes = size - 8 - length
    entries: list[tuple[int, str, TensorInfo]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not (
                all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)) and begin <= end
            ):
                raise ValueError
        except (TypeError, KeyError, ValueError):
            raise _corrupt(
                path, f"the header entry of tensor {name!r} is malformed ({entry!r})"
            ) from None
        dtype = _SAFETENSORS_DTYPES.get(dtype_code)
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
        info = TensorInfo(torch.Size(shape), dtype)
        if end - begin != info.nbytes:
            raise _corrupt(
                path,
                f"tensor {name!r} of shape {list(shape)} and dtype {dtype_code} needs "
                f"{info.nbytes} bytes but its data offsets span {end - begin}",
            )
        entries.append((begin, name, info))
    entries.sort(key=lambda entry: entry[0])
    start = 8 + length
    return {name: info for _, name, info in entries}, {
        name: start + begin for begin, name, _ in entries
    }


class _SafetensorsFile:
    """One safetensors file, its header checked and a handle kept open for lazy reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.infos, self._offsets = _read_safetensors_header(path)
        self._map: mmap.mmap | None = None
        try:
            self._handle: Any = safe_open(str(path), framework="pt", device="cpu")
        except Exception as error:  # the library checks more than the header (coverage, ...)
            raise _corrupt(path, f"safetensors cannot open it ({error})") from None

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def view(self, name: str) -> torch.Tensor:
        """``name`` as a view of a private (copy-on-write) memory map of the file, no copy.

        Its pages stay file-backed, so reading a whole model costs page cache, not process
        memory. A misaligned tensor (or a dtype ``torch.frombuffer`` refuses) is read by copy.
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

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)
        # Views still hold the map (torch.frombuffer keeps a reference): closing it here would
        # leave them dangling, so it is only dropped and unmapped when the last view dies.
        self._map = None


class _TorchFile:
    """One ``torch.save`` file, memory-mapped so that only the tensors used are paged in."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # mmap needs the zip format of torch >= 1.6; the legacy format is loaded into memory.
        mmap = zipfile.is_zipfile(path)
        try:
            loaded = torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
        except Exception as error:
            first_line = next(iter(str(error).strip().splitlines()), "")
            raise CheckpointError(
                f"{path}: torch.load(weights_only=True) cannot read it ({type(error).__name__}: "
                f"{first_line}); the file is truncated or corrupt, or holds pickled objects "
                "other than tensors: save a state_dict of tensors (or safetensors) instead.",
                path,
            ) from None
        if not isinstance(loaded, Mapping):
            raise CheckpointError(
                f"{path} holds a {type(loaded).__name__}, not a state_dict mapping names to "
                "tensors; save model.state_dict() instead.",
                path,
            )
        for name, value in loaded.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"{path} maps {name!r} to a {type(value).__name__}; a checkpoint must map "
                    "str names to tensors only. Save the state_dict alone (for a training "
                    "checkpoint, its model state_dict).",
                    path,
                )
        self._tensors: dict[str, torch.Tensor] | None = dict(loaded)
        self.infos = {name: TensorInfo(t.shape, t.dtype) for name, t in loaded.items()}

    def get(self, name: str) -> torch.Tensor:
        assert self._tensors is not None
        return self._tensors[name]

    view = get  # already a view of the file's memory map (or, for legacy files, of memory)

    def close(self) -> None:
        self._tensors = None


_File = _SafetensorsFile | _TorchFile


def _open_file(path: Path) -> _File:
    if path.name.endswith(".safetensors"):
        return _SafetensorsFile(path)
    if path.suffix in _TORCH_SUFFIXES:
        return _TorchFile(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint file suffix {path.suffix!r}; terge reads .safetensors, "
        ".bin, .pt and .pth files, *.index.json indexes and folders of them. Rename the file if "
        "it is one of these.",
        path,
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
    """The index or unindexed shard files a folder's weights are in (safetensors first)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    safetensors = [p for p in files if p.name.endswith(".safetensors")]
    torch_files = [
        p
        for p in files
        if p.name.endswith(_TORCH_SUFFIXES) and not _TRAINER_STATE_FILES.fullmatch(p.name)
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
    raise CheckpointError(
        f"{folder} holds no tensor files (no *.safetensors, *.bin, *.pt or *.pth, nor an "
        f"index; it holds {listing}); pass the folder or file that holds the weights.",
        folder,
    )


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise _corrupt(index, f"the index is not valid JSON ({error})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise _corrupt(index, 'the index has no "weight_map" object mapping names to shard files')
    return weight_map


class CheckpointReader:
    """A checkpoint opened for lazy reading: names and shapes now, tensor data on :meth:`get`.

    Every header, index and shard is checked when the reader is made, so a broken checkpoint
    fails before any merging or writing starts. Use it as a context manager (or call
    :meth:`close`) to release the open files.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path).expanduser()
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
        if path.is_dir():
            index, shards = _folder_layout(path)
        elif path.name.endswith(".index.json"):
            index, shards = path, []
        else:
            index, shards = None, [path]
        if index is not None:
            self._open_indexed(index)
            return
        for shard in shards:
            opened = self._add_file(shard)
            for name in opened.infos:
                other = self._where.get(name)
                if other is not None:
                    raise CheckpointError(
                        f"tensor {name!r} is in both {other.path} and {shard} and no index says "
                        f"which to use; remove the stray file or read one of them alone.",
                        shard,
                    )
                self._where[name] = opened

    def _add_file(self, path: Path) -> _File:
        opened = _open_file(path)
        self._opened.append(opened)
        self.files.append(path)
        return opened

    def _open_indexed(self, index: Path) -> None:
        weight_map = _read_index(index)
        shard_names = list(dict.fromkeys(weight_map.values()))
        for shard_name in shard_names:  # all present before any is opened
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

        Do not modify the result in place: a CPU tensor from a torch file is a view of the
        reader's memory map, shared with later reads of the same (or a tied) name.
        """
        return self._open_file_of(name).get(name).to(device)

    def view(self, name: str) -> torch.Tensor:
        """``name`` without copying it: a CPU view of the file's private memory map.

        Pages are read from disk (and stay reclaimable page cache) only as they are touched, so
        a merge can stream through checkpoints larger than memory. Writing into the view never
        changes the file (the map is copy-on-write), but is seen by later views of ``name``.
        """
        return self._open_file_of(name).view(name)

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


def open_checkpoint(path: PathLike) -> CheckpointReader:
    """Open a checkpoint file, index or folder for lazy reading (see :class:`CheckpointReader`).

    A folder is read from its ``*.safetensors.index.json`` (``model.safetensors.index.json``
    preferred), else its ``model.safetensors``, else all its ``*.safetensors`` files as unindexed
    shards; failing those, the same with ``*.bin.index.json`` (``pytorch_model.bin.index.json``
    preferred), ``pytorch_model.bin``, and all its ``*.bin``/``*.pt``/``*.pth`` files except a
    Trainer's state files (``training_args.bin``, ``optimizer.pt``, ...). Subfolders are not
    searched.
    """
    return CheckpointReader(path)


def load(
    path: PathLike,
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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_NOT_COPIED_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".index.json",
)
"""Weights (of any framework) and indexes: copying them beside new weights would contradict them."""


def _resolve(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _check_target(target: Path, inputs: Iterable[PathLike], overwrite: bool) -> None:
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise CheckpointError(
            f"{target} already exists; pass overwrite=True to replace it, or choose another path.",
            target,
        )
    resolved = _resolve(target)
    for given in inputs:
        source = _resolve(given)
        if resolved == source or source in resolved.parents:
            relation = "is" if resolved == source else "is inside"
        elif resolved in source.parents:
            relation = "contains"
        else:
            continue
        raise CheckpointError(
            f"the output {target} {relation} the input {given}; writing there could destroy "
            "weights still being read: choose an output folder apart from every input.",
            target,
        )


def floating_dtype(value: object) -> torch.dtype | None:
    """``value`` as a floating torch dtype (a name like ``'bfloat16'`` accepted), else ``None``."""
    resolved = getattr(torch, value, None) if isinstance(value, str) else value
    if isinstance(resolved, torch.dtype) and resolved.is_floating_point:
        return resolved
    return None


def _resolve_dtype(dtype: torch.dtype | str | None, target: Path) -> torch.dtype | None:
    if dtype is None:
        return None
    resolved = floating_dtype(dtype)
    if resolved is None:
        raise CheckpointError(
            f"dtype {dtype!r} is not a floating torch dtype; pass e.g. torch.bfloat16, "
            "torch.float16, 'bfloat16' or 'float32' (it casts floating tensors only).",
            target,
        )
    return resolved


def _fsync(path: Path) -> None:
    """Flush ``path`` to disk so the final rename never exposes half-written files."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. folders on Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardedWriter:
    """Streams tensors into a Hugging Face-style safetensors folder, atomically.

    ::

        with ShardedWriter("out", max_shard_size="2GB", copy_files_from="base") as writer:
            for name, tensor in tensors:
                writer.add(name, tensor)

    Tensors are buffered until the next would push the shard past ``max_shard_size`` (a tensor
    larger than that gets a shard of its own), so peak memory is about one shard. Everything is
    written to a hidden temporary folder beside ``path`` (``.{name}.tmp-XXXX``) that is renamed
    into place when the ``with`` block ends without error; an exception or KeyboardInterrupt
    removes it and leaves ``path`` untouched. One shard is written as ``model.safetensors`` with
    no index, as ``save_pretrained`` does; several as ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``.

    ``inputs`` are the checkpoints being read: an output equal to, inside or around one of them is
    refused, since replacing it would destroy weights still in use. ``copy_files_from`` copies
    the top-level non-weight files of a folder (config, tokenizer, generation config, ...) into
    the output. ``metadata`` goes into every shard's header beside ``{"format": "pt"}``.
    ``dtype`` casts floating tensors as they are added.

    A tensor that is the very same view of the same memory as one added before (tied weights,
    such as an input embedding shared with the LM head) is written once under the first name;
    :attr:`aliases` maps each skipped name to the kept one.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
        copy_files_from: PathLike | None = None,
        inputs: Iterable[PathLike] = (),
        dtype: torch.dtype | str | None = None,
    ) -> None:
        self.path = Path(path).expanduser()
        self.max_shard_size = parse_size(max_shard_size)
        self.overwrite = overwrite
        self.inputs = [Path(p) for p in inputs]
        self.dtype = _resolve_dtype(dtype, self.path)
        if metadata is not None and not (
            isinstance(metadata, Mapping)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise CheckpointError(
                f"metadata must map str to str (safetensors headers hold text only); got "
                f"{metadata!r}. Convert values with str() or json.dumps().",
                self.path,
            )
        self.metadata = {"format": "pt", **(metadata or {})}
        self.copy_files_from = Path(copy_files_from) if copy_files_from is not None else None
        if self.copy_files_from is not None and not self.copy_files_from.is_dir():
            raise CheckpointError(
                f"copy_files_from={str(self.copy_files_from)!r} is not a folder; pass the folder "
                "holding config.json and the tokenizer files.",
                self.copy_files_from,
            )
        _check_target(self.path, self.inputs, overwrite)

        self.aliases: dict[str, str] = {}
        """Each name skipped as tied to an earlier tensor -> the name it was written under."""
        self.files: list[Path] = []
        """The files written (shards, index, copies), at their final paths once committed."""
        self.copied: list[str] = []
        self.written_texts: list[str] = []
        """Files written with :meth:`write_text` (lineage, an updated config, ...)."""
        self.total_size = 0
        """Bytes of tensor data written (tied duplicates counted once), as in the index."""
        self._tmp: Path | None = None
        self._state = "new"
        self._names: set[str] = set()
        self._seen: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], str]] = {}
        self._shards: list[tuple[str, list[str]]] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> ShardedWriter:
        if self._state != "new":
            raise CheckpointError("a ShardedWriter can be entered only once.", self.path)
        _check_target(self.path, self.inputs, self.overwrite)  # again: time may have passed
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=parent))
        # mkdtemp makes the folder private (0700) and the rename keeps that: give the finished
        # folder the permissions any new folder gets here (0777 less the umask, usually 0755).
        self._tmp.chmod(0o777 & ~_umask())
        self._state = "open"
        try:
            self._copy_files()
        except BaseException:
            self._discard()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._discard()
            return
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise

    def _copy_files(self) -> None:
        source = self.copy_files_from
        if source is None:
            return
        assert self._tmp is not None
        for entry in sorted(source.iterdir()):
            name = entry.name
            if name.startswith(".") or name.endswith(_NOT_COPIED_SUFFIXES) or not entry.is_file():
                continue
            shutil.copy2(entry, self._tmp / name)  # follows symlinks (Hub cache snapshots)
            self.copied.append(name)

    def _discard(self) -> None:
        self._state = "failed"
        self._buffer, self._buffer_storages = {}, set()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- adding ------------------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; a full shard is written to disk first.

        A CPU tensor is kept by reference until its shard is written (no copy): do not modify
        it in place before the ``with`` block ends.
        """
        if self._state != "open":
            raise CheckpointError(
                "ShardedWriter.add() needs an open writer: use `with ShardedWriter(...) as "
                "writer:` and add inside the block.",
                self.path,
            )
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"tensor names must be non-empty str; got {name!r}.", self.path)
        if name in self._names:
            raise CheckpointError(
                f"tensor {name!r} was already added to {self.path}; names must be unique.",
                self.path,
            )
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor; only tensors can "
                "be saved.",
                self.path,
            )
        if tensor.is_meta or tensor.layout != torch.strided:
            kind = "on the meta device (it holds no data)" if tensor.is_meta else "not dense"
            raise CheckpointError(
                f"tensor {name!r} is {kind}; safetensors stores dense tensors with data: "
                "materialise it (e.g. .to_dense() or load real weights) first.",
                self.path,
            )
        self._names.add(name)
        if tensor.numel():
            key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
            seen = self._seen.get(key)
            # The weak reference proves the first tensor still lives, so the address is not a
            # freed one reused by an unrelated tensor of the same shape.
            if seen is not None and seen[0]() is not None:
                self.aliases[name] = seen[1]
                return
            self._seen[key] = (weakref.ref(tensor), name)
        data = tensor.detach()
        if self.dtype is not None and data.is_floating_point():
            data = data.to(self.dtype)
        data = data.to("cpu").contiguous()
        if data.numel():
            storage = data.untyped_storage().data_ptr()
            if storage in self._buffer_storages:  # safetensors refuses shared memory in a file
                data = data.clone()
                storage = data.untyped_storage().data_ptr()
            self._buffer_storages.add(storage)
        nbytes = data.numel() * data.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_size:
            self._flush()
        self._buffer[name] = data
        self._buffer_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        assert self._tmp is not None
        file_name = f"model-{len(self._shards) + 1:05d}.safetensors"
        save_file(self._buffer, self._tmp / file_name, metadata=self.metadata)
        self._shards.append((file_name, list(self._buffer)))
        self._buffer, self._buffer_bytes, self._buffer_storages = {}, 0, set()

    def write_text(self, name: str, text: str) -> None:
        """Write a small text file (``lineage.json``, an edited ``config.json``) into the output.

        It lands in the temporary folder, so it appears with the weights or not at all; a file
        of that name copied by ``copy_files_from`` is replaced.
        """
        if self._state != "open":
            raise CheckpointError(
                "ShardedWriter.write_text() needs an open writer: call it inside the `with` block.",
                self.path,
            )
        plain = bool(name) and Path(name).name == name and not name.startswith(".")
        if not plain or name.endswith(_NOT_COPIED_SUFFIXES):
            raise CheckpointError(
                f"write_text() takes a plain file name that is not a weight or index file; "
                f"got {name!r}.",
                self.path,
            )
        assert self._tmp is not None
        (self._tmp / name).write_text(text, encoding="utf-8")
        if name not in self.copied and name not in self.written_texts:
            self.written_texts.append(name)

    # -- committing --------------------------------------------------------------------------

    def _commit(self) -> None:
        assert self._tmp is not None
        tmp = self._tmp
        if self._buffer or not self._shards:
            self._flush()
        count = len(self._shards)
        written: list[str] = []
        if count == 1:
            (tmp / self._shards[0][0]).rename(tmp / "model.safetensors")
            written.append("model.safetensors")
        else:
            weight_map: dict[str, str] = {}
            for number, (file_name, names) in enumerate(self._shards, start=1):
                final = f"model-{number:05d}-of-{count:05d}.safetensors"
                (tmp / file_name).rename(tmp / final)
                written.append(final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
            written.append("model.safetensors.index.json")
        for name in [*written, *self.written_texts]:
            _fsync(tmp / name)
        _fsync(tmp)
        self._install(tmp)
        self._state = "done"
        self._tmp = None
        self.files = [self.path / name for name in [*written, *self.copied, *self.written_texts]]

    def _install(self, tmp: Path) -> None:
        """Rename ``tmp`` to the target, moving an existing target away first (overwrite)."""
        target = self.path
        if not (target.exists() or target.is_symlink()):
            os.rename(tmp, target)
            return
        if not self.overwrite:
            raise CheckpointError(
                f"{target} appeared while it was being written; pass overwrite=True to replace "
                "it, or choose another path.",
                target,
            )
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def save(
    state_dict_or_module: torch.nn.Module | Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    copy_files_from: PathLike | None = None,
) -> Path:
    """Write a module's state_dict (or a mapping of tensors) as sharded safetensors at ``path``.

    The folder is what ``save_pretrained`` writes (tied tensors stored once), written atomically
    by :class:`ShardedWriter`; ``dtype`` casts floating tensors. Returns ``path``.
    """
    if isinstance(state_dict_or_module, torch.nn.Module):
        tensors: Mapping[Any, Any] = state_dict_or_module.state_dict()
    elif isinstance(state_dict_or_module, Mapping):
        tensors = state_dict_or_module
    else:
        raise CheckpointError(
            f"save() takes a torch.nn.Module or a mapping of names to tensors; got "
            f"{type(state_dict_or_module).__name__}.",
            path,
        )
    for name, value in tensors.items():  # check everything before writing anything
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"save() got {name!r} -> {type(value).__name__}; every entry must map a str to "
                "a torch.Tensor.",
                path,
            )
    with ShardedWriter(
        path,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        metadata=metadata,
        copy_files_from=copy_files_from,
        dtype=dtype,
    ) as writer:
        for name, value in tensors.items():
            writer.add(name, value)
    return writer.path
