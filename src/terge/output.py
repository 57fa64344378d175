"""Writing a merge to disk: one writer for whole and sharded models.

The plan knows every output tensor's name, shape and dtype before any is computed, so each shard
is created at its final size with its safetensors header already written, and memory-mapped
(:class:`terge.io.StreamingShardWriter`). Whole tensors are then computed straight into their
region of the map: nothing bigger than the chunk buffers lives in process memory, and the written
pages are file-backed page cache that the operating system flushes and reclaims on its own.

Sharded parameters (DTensors) are merged shard by shard on every rank into a fresh DTensor, then
gathered one tensor at a time (``full_tensor()``, a collective every rank joins) and written by
rank 0 alone. A failure on rank 0 (a full disk, an existing folder) is shared with the other
ranks through a flag reduced over the mesh, so every rank raises rather than waiting for a
collective that never comes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._version import __version__
from .digests import DigestRecorder
from .errors import CheckpointError, MergeArgumentError, MetaTensorError, ShardingError
from .execute import execute, run_step
from .io import StreamingShardWriter, TensorInfo
from .io.distributed import DistributedCheckpointWriter
from .io.dtypes import dtype_name
from .io.reading import allowed_roots, outside
from .kernels import ChunkBuffers, store_whole
from .lineage import Lineage, lineage_text
from .plan import Plan, Step
from .sharding import is_dtensor, local, mesh_all_ok, rank
from .sources import Entry, FileSource, ModuleSource, Source, entry_of

LINEAGE_FILE = "lineage.json"

OUT_FORMATS = ("safetensors", "dcp")
"""What ``merge(out=..., out_format=...)`` writes: a Hugging Face-style safetensors folder, or a
distributed checkpoint (``torch.distributed.checkpoint``) that ``dcp.load`` loads."""


class _Layout:
    """What is written: each tensor's name, shape and output dtype; tied names (written once);
    the step computed into each written name; how to read a tensor that is copied."""

    def __init__(self, plan: Plan, base: Source, out_dtype: torch.dtype | None) -> None:
        entries, self.tensor_of = _base_tensors(base)
        written: dict[Any, str] = {}
        self.aliases: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in entries.items():
            first = written.setdefault(entry.key, name)
            if first != name:
                self.aliases[name] = first
                continue
            if entry.is_meta:
                raise MetaTensorError(
                    f"the base's tensor {name!r} is on the meta device and holds no data, so it "
                    "cannot be written; load real weights into it or drop it from the base."
                )
            cast = out_dtype if out_dtype is not None and entry.dtype.is_floating_point else None
            self.tensors[name] = TensorInfo(entry.shape, cast or entry.dtype)
        self.steps: dict[str, Step] = {
            written[key]: step
            for step in plan.steps
            if (key := base.entries[step.name].key) in written
        }


def _base_tensors(base: Source) -> tuple[dict[str, Entry], Callable[[str], torch.Tensor]]:
    """Every tensor the output holds, under its canonical name, and how to get one: the base's
    tensors, and for a module its whole state dict (buffers included, as ``save_pretrained``
    writes)."""
    if not isinstance(base, ModuleSource):
        return dict(base.entries), base.get
    state = base.module.state_dict(keep_vars=True)
    tensors = {base.rename(n): t for n, t in state.items() if isinstance(t, torch.Tensor)}
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided:
            raise CheckpointError(
                f"the base's tensor {name!r} is not dense ({tensor.layout}); safetensors stores "
                "dense tensors: convert it with .to_dense() first."
            )
    entries = {name: entry_of(name, t) for name, t in tensors.items()}
    return entries, tensors.__getitem__


def _config_with_dtype(folder: Path, dtype: torch.dtype) -> str | None:
    """The base's ``config.json`` with its dtype set to ``dtype``, or ``None`` if none is named."""
    path = folder / "config.json"
    if not path.is_file() or outside(path, allowed_roots(folder)) is not None:
        return None  # none, or a link out of the folder: the writer leaves it out, and says so
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None  # not ours to judge: it is copied as it is
    if not isinstance(config, dict):
        return None
    keys = [key for key in ("torch_dtype", "dtype") if isinstance(config.get(key), str)]
    for key in keys:
        config[key] = dtype_name(dtype)
    return json.dumps(config, indent=2) + "\n" if keys else None


def folder_of(source: FileSource) -> Path | None:
    """The checkpoint folder a file source reads from (a folder, or an index's parent)."""
    if source.path.is_dir():
        return source.path
    if source.path.name.endswith(".index.json"):
        return source.path.parent
    return None


def _writer(
    out: Path,
    layout: _Layout,
    lineage: Lineage,
    sources: Sequence[Source],
    base: Source,
    max_shard_size: int | str,
    overwrite: bool,
) -> StreamingShardWriter:
    """The output folder's writer: the layout, a summary of the lineage in every shard's header,
    the base folder's config and tokenizer files, and every input that the output must not touch.
    """
    summary = {
        "merged": dict(Counter(entry[0] for entry in lineage.values())),
        "skipped": dict(Counter(lineage.skipped.values())),
    }
    files = [s for s in sources if isinstance(s, FileSource)]
    if isinstance(base, FileSource) and all(base is not s for s in files):
        files.append(base)
    return StreamingShardWriter(
        out,
        layout.tensors,
        aliases=layout.aliases,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        metadata={
            "terge_version": __version__,
            "terge_lineage": json.dumps(summary, sort_keys=True),
        },
        copy_files_from=folder_of(base) if isinstance(base, FileSource) else None,
        inputs=[folder_of(s) or s.path for s in files],
    )


def check_output(
    plan: Plan,
    sources: list[Source],
    base: Source,
    *,
    out: Path,
    out_dtype: torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
    lineage: Lineage,
    out_format: str = "safetensors",
) -> None:
    """Everything :func:`write_merge` checks before it writes, writing nothing: the layout and
    the target (an existing ``out``, an ``out`` inside an input), so that a dry run fails where
    the real call would, with the same error."""
    layout = _Layout(plan, base, out_dtype)
    if out_format == "dcp":
        _distributed_writer(plan, out, layout, sources, base, max_shard_size, overwrite)
        return
    _writer(out, layout, lineage, sources, base, max_shard_size, overwrite)  # never entered


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
    out_format: str = "safetensors",
) -> Path:
    """Stream the merge described by ``plan`` into a safetensors folder at ``out``.

    Every tensor of the base is written once (tied names under the first): merged tensors
    computed in place, the others copied from the base, floats cast to ``out_dtype`` rounded
    once. The base folder's config and tokenizer files are copied (``config.json``'s dtype
    updated), and ``lineage`` (the plan's, with the tied names written once and, with a ``hook``,
    the digests of the tensors as written) as ``lineage.json``. The target and the layout are
    checked before the first tensor is computed; on any error nothing is left behind. With
    sharded parameters every rank must call it, and every rank returns the folder's path.
    """
    layout = _Layout(plan, base, out_dtype)
    lineage.tied.update(layout.aliases)
    if out_format == "dcp":
        into = _distributed_writer(plan, out, layout, sources, base, max_shard_size, overwrite)
        _write_distributed(into, layout, sources, base, dtype, progress, lineage, hook)
        return into.path
    args = (out, layout, lineage, sources, base, max_shard_size, overwrite)
    if plan.sharded:
        _write_sharded(*args, dtype=dtype, progress=progress)
        return out
    with _writer(*args) as writer:
        folder = folder_of(base) if isinstance(base, FileSource) else None
        if folder is not None and out_dtype is not None:
            config = _config_with_dtype(folder, out_dtype)
            if config is not None:
                writer.write_text("config.json", config)
        steps = list(layout.steps.values())
        place = {step.name: name for name, step in layout.steps.items()}
        execute(
            steps,
            sources,
            base,
            lambda name: writer.destination(place[name]),
            dtype,
            progress,
            hook,
        )
        buffers = ChunkBuffers(dtype)
        with torch.no_grad():
            for name in layout.tensors:
                if name not in layout.steps:  # copied, each float rounded once if cast
                    tensor = layout.tensor_of(name).detach()
                    store_whole(writer.destination(name), tensor, buffers)
        if hook is not None:
            lineage.digests = hook.digests
        writer.write_text(LINEAGE_FILE, lineage_text(lineage))
    return writer.path


def check_out_format(out_format: Any) -> str:
    """``out_format`` checked: one of :data:`OUT_FORMATS`."""
    if out_format not in OUT_FORMATS:
        raise MergeArgumentError(
            f"`out_format` must be one of {', '.join(map(repr, OUT_FORMATS))} (a safetensors "
            f"folder, or a torch.distributed.checkpoint folder); got {out_format!r}."
        )
    return str(out_format)


def _distributed_writer(
    plan: Plan,
    out: Path,
    layout: _Layout,
    sources: Sequence[Source],
    base: Source,
    max_shard_size: int | str,
    overwrite: bool,
) -> DistributedCheckpointWriter:
    """The writer of a distributed checkpoint: the base's tensors under the entry the base was
    read from when it is a distributed checkpoint itself (``model.`` for ``dcp.save({"model":
    ...})``), so the run that wrote it loads the soup as it loads its own checkpoints."""
    if plan.sharded:
        raise ShardingError(
            "out_format='dcp' writes a merge computed on one process, but these models are "
            "sharded (DTensors): merge them in place (inplace=True) on every rank and save the "
            "model with torch.distributed.checkpoint.save, or merge their distributed "
            "checkpoints by path."
        )
    files = [s for s in sources if isinstance(s, FileSource)]
    if isinstance(base, FileSource) and all(base is not s for s in files):
        files.append(base)
    entry = base.reader.entry if isinstance(base, FileSource) else None
    return DistributedCheckpointWriter(
        out,
        layout.tensors,
        aliases=layout.aliases,
        entry=entry or "",
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        inputs=[folder_of(s) or s.path for s in files],
    )


def _write_distributed(
    writer: DistributedCheckpointWriter,
    layout: _Layout,
    sources: list[Source],
    base: Source,
    dtype: torch.dtype,
    progress: bool,
    lineage: Lineage,
    hook: DigestRecorder | None,
) -> None:
    """Compute each tensor into a fresh one and append it to the checkpoint at once, so memory
    holds one output tensor (and its inputs) at a time; tied names share one record."""
    buffers = ChunkBuffers(dtype)
    names = list(layout.tensors)
    shown = tqdm(names, desc="Merging and writing", unit="tensors") if progress else names
    with writer, torch.no_grad():
        for name in shown:
            info = layout.tensors[name]
            step = layout.steps.get(name)
            if step is not None:
                value = torch.empty(info.shape, dtype=info.dtype)
                if hook is not None:
                    hook.before(step)
                run_step(step, sources, base, value, buffers)
                if hook is not None:
                    hook.after(step, value)
            else:  # copied, each float rounded once if cast
                value = layout.tensor_of(name).detach()
                if value.dtype != info.dtype:
                    cast = torch.empty(info.shape, dtype=info.dtype)
                    store_whole(cast, value, buffers)
                    value = cast
            writer.add(name, value)
            del value
        if hook is not None:
            lineage.digests = hook.digests
        writer.write_text(LINEAGE_FILE, lineage_text(lineage))


def _fresh(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor to merge into: for a DTensor, a DTensor of the same layout and dtype."""
    if not is_dtensor(like):
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    from torch.distributed.tensor import DTensor

    shard = torch.empty(local(like).shape, dtype=dtype, device=like.device)
    return DTensor.from_local(
        shard,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=like.shape,
        stride=like.stride(),
    )


def _write_sharded(
    out: Path,
    layout: _Layout,
    lineage: Lineage,
    sources: Sequence[Source],
    base: Source,
    max_shard_size: int | str,
    overwrite: bool,
    *,
    dtype: torch.dtype,
    progress: bool,
) -> None:
    """Merge sharded parameters shard by shard, gather each tensor, and write it on rank 0."""
    sharded = next(t for n in layout.tensors if is_dtensor(t := layout.tensor_of(n)))
    mesh, device = sharded.device_mesh, sharded.device
    writer: StreamingShardWriter | None = None
    failure: BaseException | None = None
    if rank() == 0:
        try:
            writer = _writer(out, layout, lineage, sources, base, max_shard_size, overwrite)
            writer.__enter__()
        except Exception as error:
            writer, failure = None, error
    _agree(failure, mesh, device, out)

    try:
        failure = _merge_sharded(layout, sources, base, writer, failure, dtype, progress)
    except BaseException as error:  # Ctrl-C, SIGTERM: the temporary folder goes too
        if writer is not None:
            writer.__exit__(type(error), error, None)
        raise
    if writer is not None:
        try:
            if failure is None:
                writer.write_text(LINEAGE_FILE, lineage_text(lineage))
                writer.__exit__(None, None, None)
            else:
                writer.__exit__(type(failure), failure, None)
        except Exception as error:
            failure = failure or error
    _agree(failure, mesh, device, out)


def _merge_sharded(
    layout: _Layout,
    sources: Sequence[Source],
    base: Source,
    writer: StreamingShardWriter | None,
    failure: BaseException | None,
    dtype: torch.dtype,
    progress: bool,
) -> BaseException | None:
    """Merge and gather every tensor on every rank, and write it on rank 0; the first write
    failure is kept (and returned), not raised, so that every rank joins every collective."""
    buffers = ChunkBuffers(dtype)
    names = list(layout.tensors)
    shown = tqdm(names, desc="Merging and writing", unit="tensors") if progress else names
    with torch.no_grad():
        for name in shown:
            tensor = layout.tensor_of(name)
            step = layout.steps.get(name)
            if step is not None:  # merged shard by shard, straight into the written dtype
                value = _fresh(tensor, layout.tensors[name].dtype)
                run_step(step, list(sources), base, value, buffers)
            else:
                value = tensor.detach()
            whole = value.full_tensor() if is_dtensor(value) else value
            if writer is not None and failure is None:
                try:  # copied floats cast here are rounded once, as for whole models
                    store_whole(writer.destination(name), whole, buffers)
                except Exception as error:  # keep joining the collectives; fail together below
                    failure = error
    return failure


def _agree(failure: BaseException | None, mesh: Any, device: torch.device, out: Path) -> None:
    """Raise on every rank when any rank failed (rank 0 raises its own error)."""
    if mesh_all_ok(failure is None, mesh, device):
        return
    if failure is not None:
        raise failure
    raise CheckpointError(
        f"rank 0 could not write the merge to {out} (its error says why); nothing was written.",
        out,
    )
