"""Atomic, sharded safetensors writing.

Everything is written into a hidden temporary folder beside the target that is renamed into place
only when everything succeeded. :class:`ShardedWriter` streams tensors in, buffering up to a shard;
:class:`StreamingShardWriter` lays every shard out up front and hands out each tensor's region of
the file to compute into (how ``merge(out=)`` keeps memory flat). :func:`save` is the one-call
form.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from .dtypes import SAFETENSORS_CODES, floating_dtype
from .reading import PathLike, TensorInfo, allowed_roots, outside
from .sizes import parse_size


def _umask() -> int:
    """The process's umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def overlap(target: PathLike, inputs: Iterable[PathLike]) -> tuple[str, PathLike] | None:
    """How ``target`` meets the first input it meets (``"is"``, ``"is inside"`` or
    ``"contains"``) and that input, or None when it is apart from every one.

    Links are followed: an output reached through a link into an input is inside it. An index
    (``*.index.json``) stands for its folder, whose shards it reads.
    """
    resolved = _resolve(target)
    for given in inputs:
        source = _resolve(given)
        if source.name.endswith(".index.json"):
            source = source.parent
        if resolved == source or source in resolved.parents:
            return ("is" if resolved == source else "is inside"), given
        if resolved in source.parents:
            return "contains", given
    return None


def _check_target(target: Path, inputs: Iterable[PathLike], overwrite: bool) -> None:
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise CheckpointError(
            f"{target} already exists; pass overwrite=True to replace it, or choose another path.",
            target,
        )
    met = overlap(target, inputs)
    if met is not None:
        relation, given = met
        raise CheckpointError(
            f"the output {target} {relation} the input {given}; writing there could destroy "
            "weights still being read: choose an output folder apart from every input.",
            target,
        )


def check_file_apart(
    path: PathLike,
    inputs: Iterable[PathLike],
    *,
    what: str = "the file",
    error: type[Exception] = CheckpointError,
) -> None:
    """Refuse to write the file ``path`` over an input, or into an input's folder (an index's
    folder included), where it would destroy weights still in use."""
    met = overlap(path, inputs)
    if met is None or met[0] == "contains":  # a file cannot hold an input
        return
    relation, given = met
    raise error(
        f"{what} {path} {relation} the input {given}; writing it there would destroy weights "
        "being read: choose a path outside every input.",
        path,
    )


def write_text_atomic(
    path: PathLike,
    text: str,
    *,
    overwrite: bool = False,
    error: type[Exception] = CheckpointError,
) -> Path:
    """Write a small text file whole or not at all, never clobbering one unless asked.

    The text goes to a temporary file in the same folder, is flushed to disk, gets the
    permissions any new file gets (0666 less the umask) and is then renamed over ``path``; a
    crash leaves the old file or the new one, never half of one. Without ``overwrite`` an
    existing ``path`` is refused (``error(message, path)``), even one that appears meanwhile.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise error(f"{target} is a folder; give the path of a file to write.", target)
    if not overwrite and (target.exists() or target.is_symlink()):
        raise error(f"{target} already exists; {_REPLACE_HINT}", target)
    clean_leftovers(target.parent)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-{_owner_tag()}-", dir=target.parent)
    temporary = Path(name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        temporary.chmod(0o666 & ~_umask())  # mkstemp's files are private (0600)
        if overwrite or not _link_new(temporary, target, error):
            os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync(target.parent)
    return target


_REPLACE_HINT = "pass overwrite=True (--overwrite) to replace it, or choose another path."


def _link_new(temporary: Path, target: Path, error: type[Exception]) -> bool:
    """Give ``temporary`` the name ``target`` only if no such file exists, atomically (a hard
    link never replaces); False where links are unsupported (then a rename does it)."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        message = f"{target} appeared while it was being written; {_REPLACE_HINT}"
        raise error(message, target) from None
    except OSError:  # e.g. FAT or some network file systems: no hard links
        return False
    return True


# -- the temporary folders of runs that never finished -------------------------------------------

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
"""This machine, in the names of temporary folders (pids mean nothing across machines)."""

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-\w+")
"""A writer's temporary folder (``.{name}.tmp-{host}-{pid}-XXXX``) or the previous output it
moves aside while replacing it (``.{name}.old-...``)."""


def _owner_tag() -> str:
    return f"{_HOST}-{os.getpid()}"


def _running(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (when unsure, it does)."""
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


def clean_leftovers(parent: Path) -> list[Path]:
    """Remove what earlier writers killed mid-way (SIGKILL, a power cut) left in ``parent``.

    A temporary folder (or file) whose process no longer runs on this machine is removed; a previous
    output moved aside (``.old-``) is removed when its output was installed, else put back.
    Each is named in a warning. Those of live processes, or of other machines (whose processes
    cannot be seen from here), are left alone. Returns what was removed or put back.
    """
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    done = []
    for entry in entries:
        found = _LEFTOVER.fullmatch(entry.name)
        if found is None or found["host"] != _HOST or _running(int(found["pid"])):
            continue
        if entry.is_symlink():
            continue
        target = parent / found["name"]
        try:
            if found["kind"] == "old" and not (target.exists() or target.is_symlink()):
                os.rename(entry, target)
                what = f"put back {target}, which it had moved to {entry.name} to replace it"
            else:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:  # a small file written by write_text_atomic
                    entry.unlink()
                what = f"removed its leftover {entry}"
        except OSError as error:
            warnings.warn(
                f"terge: an earlier run (process {found['pid']}, no longer running) left {entry} "
                f"and it could not be cleaned up ({error.strerror or error}); remove it by hand.",
                stacklevel=3,
            )
            continue
        warnings.warn(
            f"terge: an earlier run (process {found['pid']}) was stopped while writing; {what}.",
            stacklevel=3,
        )
        done.append(entry)
    return done


class _SigtermAsExit:
    """While a writer is open, SIGTERM raises ``SystemExit`` as SIGINT raises
    KeyboardInterrupt, so its temporary folder is removed rather than left behind.

    Only in the main thread (where signal handlers live), and only over the default handler:
    an ignored SIGTERM or a program's own handler is left as it is. While the output is being
    renamed into place, the signal waits until the rename is done.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self.holding = False
        self._pending: int | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                return
            self._previous = signal.SIG_DFL  # first: a signal may come as soon as it is set
            signal.signal(signal.SIGTERM, self._handle)
        except (ValueError, OSError):  # no signals here (an embedded interpreter)
            self._previous = None

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.holding:
            self._pending = signum
            return
        raise SystemExit(128 + signum)

    def restore(self) -> None:
        """Put the previous handler back; a SIGTERM held meanwhile exits now."""
        if self._previous is None:
            return
        signal.signal(signal.SIGTERM, self._previous)
        self._previous = None
        pending, self._pending, self.holding = self._pending, None, False
        if pending is not None:
            raise SystemExit(128 + pending)


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
    written to a hidden temporary folder beside ``path`` (``.{name}.tmp-{host}-{pid}-XXXX``) that
    is renamed into place when the ``with`` block ends without error; an exception,
    KeyboardInterrupt or SIGTERM (raised as ``SystemExit`` while the writer is open, in the main
    thread, unless the program handles SIGTERM itself) removes it and leaves ``path`` untouched.
    What a run killed outright (SIGKILL) leaves is removed, with a warning, by the next writer
    in the same folder once that process is gone. One shard is written as ``model.safetensors`` with
    no index, as ``save_pretrained`` does; several as ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``.

    ``inputs`` are the checkpoints being read: an output equal to, inside or around one of them is
    refused, since replacing it would destroy weights still in use. ``copy_files_from`` copies
    the top-level non-weight files of a folder (config, tokenizer, generation config, ...) into
    the output; a file that is a link to somewhere outside that folder (or, for a Hugging Face
    Hub cache snapshot, outside its repository's cache folder) is not copied but named in a
    warning and in :attr:`left_out`. ``metadata`` goes into every shard's header beside
    ``{"format": "pt"}``. ``dtype`` casts floating tensors as they are added.

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
        not_copied: Iterable[str] = (),
    ) -> None:
        self.path = Path(path).expanduser()
        self.not_copied = frozenset(not_copied)
        """Names of ``copy_files_from`` left out (files the caller writes a new set of)."""
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
        self.left_out: dict[str, str] = {}
        """Files of ``copy_files_from`` not copied because they lie outside it -> where they
        really lie."""
        self.written_texts: list[str] = []
        """Files written with :meth:`write_text` (lineage, an updated config, ...)."""
        self.total_size = 0
        """Bytes of tensor data written (tied duplicates counted once), as in the index."""
        self._tmp: Path | None = None
        self._sigterm = _SigtermAsExit()
        self._state = "new"
        self._names: set[str] = set()
        self._seen: dict[tuple[Any, ...], tuple[weakref.ref[torch.Tensor], str]] = {}
        self._shards: list[tuple[str, list[str]]] = []
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._buffer_storages: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def temporary(self) -> Path:
        """The hidden folder the output is written into until it is renamed into place."""
        if self._tmp is None:
            raise CheckpointError("the writer is not open: enter it first.", self.path)
        return self._tmp

    def __enter__(self) -> ShardedWriter:
        if self._state != "new":
            raise CheckpointError("a ShardedWriter can be entered only once.", self.path)
        _check_target(self.path, self.inputs, self.overwrite)  # again: time may have passed
        parent = self.path.parent
        parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(parent)
        self._sigterm.install()
        try:
            self._tmp = Path(
                tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-{_owner_tag()}-", dir=parent)
            )
            # mkdtemp makes the folder private (0700) and the rename keeps that: give the
            # finished folder the permissions any new folder gets (0777 less the umask).
            self._tmp.chmod(0o777 & ~_umask())
            self._state = "open"
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
        self._sigterm.restore()

    def _copy_files(self) -> None:
        source = self.copy_files_from
        if source is None:
            return
        assert self._tmp is not None
        roots = allowed_roots(source)
        for entry in sorted(source.iterdir()):
            name = entry.name
            if name.startswith(".") or name.endswith(_NOT_COPIED_SUFFIXES) or not entry.is_file():
                continue
            if name in self.not_copied:
                continue
            real = outside(entry, roots)
            if real is not None:  # a link out of the folder: never copy what it points at
                self.left_out[name] = str(real)
                continue
            # Copied from where the link leads (Hub cache snapshots link into ../../blobs).
            shutil.copy2(entry.resolve(), self._tmp / name)
            self.copied.append(name)
        if self.left_out:
            listing = ", ".join(f"{name} -> {real}" for name, real in self.left_out.items())
            warnings.warn(
                f"terge: did not copy {len(self.left_out)} file(s) of {source} into {self.path} "
                f"because they are links to outside that folder ({listing}); copy them by hand "
                "if you trust them.",
                stacklevel=3,
            )

    def _discard(self) -> None:
        self._sigterm.holding = True  # a SIGTERM now waits until the folder is gone
        try:
            self._state = "failed"
            self._buffer, self._buffer_storages = {}, set()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
        finally:
            self._sigterm.restore()

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
        written = self._finish_weights(tmp)
        for name in [*written, *self.written_texts]:
            _fsync(tmp / name)
        _fsync(tmp)
        self._install(tmp)
        self._state = "done"
        self._tmp = None
        self.files = [self.path / name for name in [*written, *self.copied, *self.written_texts]]

    def _finish_weights(self, tmp: Path) -> list[str]:
        """Write what is still buffered and give the weight files their final names (and an
        index); the names, for the commit to flush and install. A writer of another format
        overrides this alone, and keeps the atomic commit."""
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
        return written

    def _install(self, tmp: Path) -> None:
        """Rename ``tmp`` to the target, moving an existing target away first (overwrite).

        Another process may create or replace the target meanwhile (two runs writing one
        output): that is a CheckpointError, never a raw OSError, and what was moved away is
        put back or removed, never left behind.
        """
        self._sigterm.holding = True  # a SIGTERM waits until the target is whole again
        target = self.path
        if not (target.exists() or target.is_symlink()):
            self._rename_into_place(tmp)
            return
        if not self.overwrite:
            raise self._appeared()
        old = target.with_name(f".{target.name}.old-{_owner_tag()}-{secrets.token_hex(4)}")
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another run moved it away first: nothing of ours to keep
            self._rename_into_place(tmp)
            return
        except OSError as error:
            raise CheckpointError(
                f"cannot move the existing {target} aside to replace it "
                f"({error.strerror or error}); check its permissions, or choose another path.",
                target,
            ) from error
        except BaseException:  # Ctrl-C lands as the rename returns: it may be done already
            _put_back(old, target)
            raise
        try:
            self._rename_into_place(tmp)
        except BaseException:
            _put_back(old, target)
            raise
        _remove(old)

    def _rename_into_place(self, tmp: Path) -> None:
        try:
            os.rename(tmp, self.path)
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise self._appeared() from error
            raise CheckpointError(
                f"cannot rename the finished output into place at {self.path} "
                f"({error.strerror or error}); nothing was written there.",
                self.path,
            ) from error

    def _appeared(self) -> CheckpointError:
        return CheckpointError(
            f"{self.path} appeared while it was being written (another run writing the same "
            "output?); pass overwrite=True to replace it, or choose another path.",
            self.path,
        )


def _put_back(old: Path, target: Path) -> None:
    """Return the previous output moved aside to ``old`` to ``target``, if it was moved; if
    another run installed its own output there meanwhile, ours is obsolete and removed."""
    if not (old.exists() or old.is_symlink()):
        return
    try:
        os.rename(old, target)
    except OSError:
        _remove(old)


def _remove(path: Path) -> None:
    """Remove a file, link or folder tree, as far as possible."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def shard_groups(tensors: Mapping[str, TensorInfo], max_shard_size: int) -> list[list[str]]:
    """Names per shard, in order; as :class:`ShardedWriter`, a shard is closed when the next
    tensor would push it past ``max_shard_size`` (a larger tensor gets a shard of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, info in tensors.items():
        if groups[-1] and size + info.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += info.nbytes
    return groups


def shard_header(
    names: Sequence[str], tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]
) -> tuple[bytes, dict[str, int], int]:
    """A shard's header bytes, each tensor's offset in the file, and the data size.

    Tensors are stored largest element first (stable otherwise, so a one-dtype model keeps its
    order): with the header padded to 8 bytes, every tensor is then aligned for its dtype and
    can be mapped in place.
    """
    order = sorted(names, key=lambda name: -tensors[name].dtype.itemsize)
    entries: dict[str, Any] = {}
    begin = 0
    for name in order:
        info = tensors[name]
        end = begin + info.nbytes
        entries[name] = {
            "dtype": SAFETENSORS_CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [begin, end],
        }
        begin = end
    raw = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    offsets = {name: start + entry["data_offsets"][0] for name, entry in entries.items()}
    return struct.pack("<Q", len(raw)) + raw, offsets, begin


def _reserve(fd: int, size: int, path: Path, output: Path, total: int) -> None:
    """Give the file its final size with its disk blocks allocated now.

    A full disk then fails here, as an error, before anything is computed: writing through a
    memory map into a sparse file would instead kill the process (SIGBUS) when space runs out.
    The error names the output the user asked for (``path`` is in its hidden temporary folder,
    gone once the error is raised) and how many bytes it holds.
    """
    os.ftruncate(fd, size)
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the size alone
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on the disk for {output}: its shard {path.name} needs "
                f"{size:,} bytes, the whole output about {total:,}; free some space or choose "
                "an output on another disk.",
                output,
            ) from None
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def shard_owners(
    groups: Sequence[Sequence[str]], tensors: Mapping[str, TensorInfo], world: int
) -> list[int]:
    """The rank that creates and fills each shard of a distributed write: the largest shard
    first, each to the rank with the fewest bytes so far (the lowest on a tie). A function of
    the layout alone, so every rank computes the same owners without talking to the others."""
    sizes = [sum(tensors[name].nbytes for name in group) for group in groups]
    owners = [0] * len(groups)
    load = [0] * max(world, 1)
    for number in sorted(range(len(groups)), key=lambda n: (-sizes[n], n)):
        owner = min(range(len(load)), key=lambda r: (load[r], r))
        owners[number] = owner
        load[owner] += sizes[number]
    return owners


class ShardFiles:
    """Some shard files of an output folder, each created at its final size with its header
    and memory-mapped, for their tensors to be computed into.

    :class:`StreamingShardWriter` holds one for all its shards; in a distributed write each
    rank holds one for the shards it owns (:func:`shard_owners`), in the temporary folder that
    rank 0's writer created, and the files are independent, so each rank fills its own.
    ``numbers`` are indices into ``groups``; shard ``i`` is the file ``model-{i+1:05d}``, renamed
    by the writer when it commits. ``output``: the folder the user asked for, which a full
    disk's error names (the shards are in a hidden temporary folder beside it).
    """

    def __init__(
        self,
        folder: Path,
        tensors: Mapping[str, TensorInfo],
        groups: Sequence[Sequence[str]],
        numbers: Iterable[int],
        metadata: Mapping[str, str],
        *,
        output: Path | None = None,
    ) -> None:
        self.folder = folder
        self.paths: list[Path] = []
        self._layout = tensors
        self._slots: dict[str, tuple[mmap.mmap, int]] = {}
        self.unwritten: set[str] = set()
        total = sum(info.nbytes for info in tensors.values())
        for number in numbers:
            path = folder / shard_file(number)
            header, offsets, data_size = shard_header(groups[number], tensors, metadata)
            with open(path, "wb+") as file:
                self.paths.append(path)
                file.write(header)
                file.flush()
                _reserve(file.fileno(), len(header) + data_size, path, output or folder, total)
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_WRITE)
            self._slots.update((name, (mapped, offset)) for name, offset in offsets.items())
            self.unwritten.update(groups[number])

    def __contains__(self, name: str) -> bool:
        return name in self._slots

    def destination(self, name: str) -> torch.Tensor | None:
        """The region of its shard that ``name`` is stored in, or None if not in these shards."""
        slot = self._slots.get(name)
        if slot is None:
            return None
        self.unwritten.discard(name)
        info = self._layout[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        mapped, offset = slot
        return torch.frombuffer(mapped, dtype=info.dtype, count=info.numel, offset=offset).view(
            info.shape
        )

    def finish(self, target: Path) -> None:
        """Flush every map and the files to disk (before another process renames them), and
        release the maps; refuse if a tensor was never written."""
        if self.unwritten:
            missing = ", ".join(map(repr, sorted(self.unwritten)[:5]))
            raise CheckpointError(
                f"{len(self.unwritten)} tensors of the layout were never written ({missing}); "
                "the output would hold garbage, so nothing was saved.",
                target,
            )
        for mapped in {id(m): m for m, _ in self._slots.values()}.values():
            mapped.flush()
        self.release()
        for path in self.paths:
            _fsync(path)

    def release(self) -> None:
        """Drop the maps (each is unmapped when its last view dies: closing it while a view may
        live would leave that view dangling)."""
        self._slots = {}

    def remove(self) -> None:
        """Delete these files (a failed rank's part of a distributed write)."""
        self.release()
        for path in self.paths:
            path.unlink(missing_ok=True)


def shard_file(number: int) -> str:
    """The temporary name of shard ``number`` (0-based) until the writer commits."""
    return f"model-{number + 1:05d}.safetensors"


class StreamingShardWriter(ShardedWriter):
    """A :class:`ShardedWriter` whose tensors are laid out up front and written in place.

    ::

        layout = {"w": TensorInfo(torch.Size([4, 4]), torch.float32)}
        with StreamingShardWriter("out", layout, max_shard_size="2GB") as writer:
            writer.destination("w").copy_(tensor)

    Entering creates every shard at its final size with its header and memory-maps it;
    :meth:`destination` is a tensor's region of that map, to be filled before the block ends.
    The atomic commit, ``overwrite``, the refusal of outputs overlapping ``inputs``, and
    ``copy_files_from`` are :class:`ShardedWriter`'s. ``aliases`` (tied names, not written)
    are reported in :attr:`aliases`.

    ``owned`` (a distributed write): the shards this writer creates and fills itself; the others
    are created and filled in :attr:`temporary` by other processes (:class:`ShardFiles`), which
    must have finished, flushed, before the block ends, when all of them are renamed into place.
    """

    def __init__(
        self,
        path: str | Path,
        tensors: Mapping[str, TensorInfo],
        *,
        aliases: Mapping[str, str] | None = None,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
        copy_files_from: str | Path | None = None,
        inputs: Iterable[str | Path] = (),
        owned: Iterable[int] | None = None,
        not_copied: Iterable[str] = (),
    ) -> None:
        super().__init__(
            path,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            metadata=metadata,
            copy_files_from=copy_files_from,
            inputs=inputs,
            not_copied=not_copied,
        )
        for name, info in tensors.items():
            if info.dtype not in SAFETENSORS_CODES:
                raise CheckpointError(
                    f"tensor {name!r} has dtype {info.dtype}, which safetensors cannot store; "
                    "exclude it from the output or convert it first.",
                    self.path,
                )
        self.aliases = dict(aliases or {})
        self.total_size = sum(info.nbytes for info in tensors.values())
        self._layout = dict(tensors)
        self.groups = shard_groups(self._layout, self.max_shard_size)
        """The names in each shard, in order (as every rank of a distributed write computes)."""
        self._owned = list(range(len(self.groups))) if owned is None else sorted(set(owned))
        self._files: ShardFiles | None = None

    def __enter__(self) -> StreamingShardWriter:
        super().__enter__()
        try:
            self._allocate()
        except BaseException:
            self._discard()
            raise
        return self

    def _allocate(self) -> None:
        assert self._tmp is not None
        self._files = ShardFiles(
            self._tmp, self._layout, self.groups, self._owned, self.metadata, output=self.path
        )
        self._shards = [(shard_file(n), names) for n, names in enumerate(self.groups)]

    def destination(self, name: str) -> torch.Tensor:
        """The region of the shard that ``name`` is stored in, as a tensor to write into."""
        if self._state != "open" or self._files is None:
            raise CheckpointError(
                "StreamingShardWriter.destination() needs an open writer: call it inside the "
                "`with` block.",
                self.path,
            )
        found = self._files.destination(name)
        if found is None:
            where = "the output's layout" if name not in self._layout else "this writer's shards"
            raise CheckpointError(f"{name!r} is not in {where}.", self.path)
        return found

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Copy ``tensor`` into its place (cast to the layout's dtype)."""
        with torch.no_grad():
            self.destination(name).copy_(tensor.detach())

    def _commit(self) -> None:
        assert self._files is not None
        self._files.finish(self.path)
        super()._commit()

    def _discard(self) -> None:
        if self._files is not None:
            self._files.release()
        super()._discard()


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
