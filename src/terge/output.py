"""Writing a merge to disk: shards laid out from the plan, then computed straight into place.

The plan knows every output tensor's name, shape and dtype before any is computed, so each shard
is created at its final size with its safetensors header already written, and memory-mapped. The
kernels then write every merged tensor directly into its region of the map: nothing bigger than
their chunk buffers lives in process memory, and the written pages are file-backed page cache
that the operating system flushes and reclaims on its own. Peak memory does not grow with the
model.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .audit import DigestRecorder
from .checkpoints import _SAFETENSORS_DTYPES, CheckpointError, ShardedWriter, TensorInfo
from .errors import MetaTensorError
from .execute import execute
from .kernels import ChunkBuffers, store_whole
from .lineage import Lineage, lineage_text
from .plan import Plan
from .sources import Entry, FileSource, ModuleSource, Source, view_key

LINEAGE_FILE = "lineage.json"

_CODES = {dtype: code for code, dtype in _SAFETENSORS_DTYPES.items()}


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
            "dtype": _CODES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [begin, end],
        }
        begin = end
    raw = json.dumps({"__metadata__": dict(metadata), **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    offsets = {name: start + entry["data_offsets"][0] for name, entry in entries.items()}
    return struct.pack("<Q", len(raw)) + raw, offsets, begin


def _reserve(fd: int, size: int, path: Path) -> None:
    """Give the file its final size with its disk blocks allocated now.

    A full disk then fails here, as an error, before anything is computed: writing through a
    memory map into a sparse file would instead kill the process (SIGBUS) when space runs out.
    """
    os.ftruncate(fd, size)
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the size alone
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on the disk for {path} ({size:,} bytes); free some space or "
                "choose an output on another disk.",
                path,
            ) from None
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


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
    ) -> None:
        super().__init__(
            path,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            metadata=metadata,
            copy_files_from=copy_files_from,
            inputs=inputs,
        )
        for name, info in tensors.items():
            if info.dtype not in _CODES:
                raise CheckpointError(
                    f"tensor {name!r} has dtype {info.dtype}, which safetensors cannot store; "
                    "exclude it from the output or convert it first.",
                    self.path,
                )
        self.aliases = dict(aliases or {})
        self.total_size = sum(info.nbytes for info in tensors.values())
        self._layout = dict(tensors)
        self._slots: dict[str, tuple[int, int]] = {}
        self._maps: list[mmap.mmap] = []
        self._unwritten: set[str] = set(tensors)

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
        for number, names in enumerate(shard_groups(self._layout, self.max_shard_size), 1):
            file_name = f"model-{number:05d}.safetensors"
            header, offsets, data_size = shard_header(names, self._layout, self.metadata)
            with open(self._tmp / file_name, "wb+") as file:
                file.write(header)
                file.flush()
                _reserve(file.fileno(), len(header) + data_size, self._tmp / file_name)
                self._maps.append(mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_WRITE))
            self._shards.append((file_name, names))
            shard = len(self._maps) - 1
            self._slots.update((name, (shard, offset)) for name, offset in offsets.items())

    def destination(self, name: str) -> torch.Tensor:
        """The region of the shard that ``name`` is stored in, as a tensor to write into."""
        if self._state != "open":
            raise CheckpointError(
                "StreamingShardWriter.destination() needs an open writer: call it inside the "
                "`with` block.",
                self.path,
            )
        slot = self._slots.get(name)
        if slot is None:
            raise CheckpointError(f"{name!r} is not in the output's layout.", self.path)
        self._unwritten.discard(name)
        info = self._layout[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        shard, offset = slot
        flat = torch.frombuffer(
            self._maps[shard], dtype=info.dtype, count=info.numel, offset=offset
        )
        return flat.view(info.shape)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Copy ``tensor`` into its place (cast to the layout's dtype)."""
        with torch.no_grad():
            self.destination(name).copy_(tensor.detach())

    def _commit(self) -> None:
        if self._unwritten:
            missing = ", ".join(map(repr, sorted(self._unwritten)[:5]))
            raise CheckpointError(
                f"{len(self._unwritten)} tensors of the layout were never written ({missing}); "
                "the output would hold garbage, so nothing was saved.",
                self.path,
            )
        for mapped in self._maps:
            mapped.flush()
        self._release()
        super()._commit()

    def _discard(self) -> None:
        self._release()
        super()._discard()

    def _release(self) -> None:
        # A map is unmapped when its last view dies (torch.frombuffer holds a reference);
        # closing it while a view may live would leave that view dangling.
        self._maps = []


# ------------------------------------------------------------------------------------------------
# A merge, to disk
# ------------------------------------------------------------------------------------------------


def _base_tensors(base: Source) -> tuple[dict[str, Entry], Callable[[str], torch.Tensor]]:
    """Every tensor the output holds, and how to get one: the base's tensors, and for a module
    its whole state dict (buffers included, as ``save_pretrained`` writes)."""
    if not isinstance(base, ModuleSource):
        return dict(base.entries), base.get
    state = base.module.state_dict(keep_vars=True)
    tensors = {name: t for name, t in state.items() if isinstance(t, torch.Tensor)}
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided:
            raise CheckpointError(
                f"the base's tensor {name!r} is not dense ({tensor.layout}); safetensors stores "
                "dense tensors: convert it with .to_dense() first."
            )
    entries = {
        name: Entry(name, t.shape, t.dtype, t.device, view_key(t)) for name, t in tensors.items()
    }
    return entries, tensors.__getitem__


def _config_with_dtype(folder: Path, dtype: torch.dtype) -> str | None:
    """The base's ``config.json`` with its dtype set to ``dtype``, or ``None`` if none is named."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None  # not ours to judge: it is copied as it is
    if not isinstance(config, dict):
        return None
    keys = [key for key in ("torch_dtype", "dtype") if isinstance(config.get(key), str)]
    for key in keys:
        config[key] = str(dtype).removeprefix("torch.")
    return json.dumps(config, indent=2) + "\n" if keys else None


def _folder_of(source: FileSource) -> Path | None:
    """The checkpoint folder a file source reads from (a folder, or an index's parent)."""
    if source.path.is_dir():
        return source.path
    if source.path.name.endswith(".index.json"):
        return source.path.parent
    return None


def _lay_out(
    plan: Plan, base: Source, out_dtype: torch.dtype | None
) -> tuple[dict[str, TensorInfo], dict[str, str], dict[str, str], Callable[[str], torch.Tensor]]:
    """What is written: each tensor's output dtype, tied names (not written), each step's
    output name (a tie's first name), and how to read a tensor that is copied."""
    entries, tensor_of = _base_tensors(base)
    written: dict[Any, str] = {}
    aliases: dict[str, str] = {}
    layout: dict[str, TensorInfo] = {}
    for name, entry in entries.items():
        first = written.setdefault(entry.key, name)
        if first != name:
            aliases[name] = first
            continue
        if entry.is_meta:
            raise MetaTensorError(
                f"the base's tensor {name!r} is on the meta device and holds no data, so it "
                "cannot be written; load real weights into it or drop it from the base."
            )
        cast = out_dtype if out_dtype is not None and entry.dtype.is_floating_point else None
        layout[name] = TensorInfo(entry.shape, cast or entry.dtype)
    place = {
        step.name: written[key]
        for step in plan.steps
        if (key := base.entries[step.name].key) in written
    }
    return layout, aliases, place, tensor_of


def write_merge(
    plan: Plan,
    sources: list[Source],
    base: Source,
    *,
    out: Path,
    out_dtype: torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
    dtype: torch.dtype,
    progress: bool,
    lineage: Lineage,
    hook: DigestRecorder | None = None,
) -> Path:
    """Stream the merge described by ``plan`` into a safetensors folder at ``out``.

    Every tensor of the base is written once (tied names under the first): merged tensors
    computed in place, the others copied from the base, floats cast to ``out_dtype`` rounded
    once. The base folder's config and tokenizer files are copied (``config.json``'s dtype
    updated), and ``lineage`` (the plan's, with the tied names written once and, with a ``hook``,
    the digests of the tensors as written) as ``lineage.json``. The target and every layout is
    checked before the first tensor is computed; on any error nothing is left behind.
    """
    layout, aliases, place, tensor_of = _lay_out(plan, base, out_dtype)
    steps = [step for step in plan.steps if step.name in place]

    lineage.tied.update(aliases)
    summary = {
        "merged": dict(Counter(entry[0] for entry in lineage.values())),
        "skipped": dict(Counter(lineage.skipped.values())),
    }
    from . import __version__

    files = [s for s in sources if isinstance(s, FileSource)]
    if isinstance(base, FileSource) and all(base is not s for s in files):
        files.append(base)
    folder = _folder_of(base) if isinstance(base, FileSource) else None
    writer = StreamingShardWriter(
        out,
        layout,
        aliases=aliases,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        metadata={
            "terge_version": __version__,
            "terge_lineage": json.dumps(summary, sort_keys=True),
        },
        copy_files_from=folder,
        inputs=[_folder_of(s) or s.path for s in files],
    )
    with writer:
        if folder is not None and out_dtype is not None:
            config = _config_with_dtype(folder, out_dtype)
            if config is not None:
                writer.write_text("config.json", config)
        execute(
            steps,
            sources,
            base,
            lambda name: writer.destination(place[name]),
            dtype,
            progress,
            hook,
        )
        computed = set(place.values())
        buffers = ChunkBuffers(dtype)
        with torch.no_grad():
            for name in layout:
                if name not in computed:  # copied, each float rounded once if cast
                    store_whole(writer.destination(name), tensor_of(name).detach(), buffers)
        if hook is not None:
            lineage.digests = hook.digests
        writer.write_text(LINEAGE_FILE, lineage_text(lineage))
    return writer.path
