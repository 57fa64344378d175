"""Writing a merge of sharded models (DTensors) to disk: merged shard by shard on every rank,
gathered one tensor at a time, written by rank 0 alone.

A file holds whole tensors, so each merged tensor is gathered (``full_tensor()``, a collective
every rank joins) just before rank 0 writes it; no rank ever holds more than one whole tensor
besides rank 0's shard buffer. A failure on rank 0 (a full disk, an existing folder) is shared
with the other ranks through a flag reduced over the mesh, so every rank raises rather than
waiting for a collective that never comes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, ShardedWriter
from .errors import MetaTensorError
from .execute import run_step
from .kernels import ChunkBuffers, store_whole
from .lineage import Lineage, lineage_text
from .plan import Plan
from .sharding import is_dtensor, local, mesh_all_ok, rank
from .sources import ModuleSource, Source, view_key

LINEAGE_FILE = "lineage.json"


def _base_tensors(base: Source) -> dict[str, torch.Tensor]:
    """Every tensor the output holds, by canonical name: a module's whole state dict (buffers
    too, as ``save_pretrained`` writes), or the base's tensors."""
    if not isinstance(base, ModuleSource):
        return {name: base.get(name) for name in base.entries}
    state = base.module.state_dict(keep_vars=True)
    return {base.rename(name): t for name, t in state.items() if isinstance(t, torch.Tensor)}


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


def write_sharded_merge(
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
) -> Path:
    """Stream a merge with sharded parameters into a safetensors folder written by rank 0.

    Every rank must call it (the merge and the gathers are collectives); every rank returns the
    folder's path and updates ``lineage`` alike (tied names written once, as ``save_pretrained``
    does). The folder holds what :func:`terge.output.write_merge` writes for whole models.
    """
    tensors = _base_tensors(base)
    written: dict[Any, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in tensors.items():
        if tensor.is_meta:
            raise MetaTensorError(
                f"the base's tensor {name!r} is on the meta device and holds no data, so it "
                "cannot be written; load real weights into it or drop it from the base."
            )
        first = written.setdefault(view_key(tensor), name)
        if first != name:
            aliases[name] = first
    computed = {
        written[base.entries[step.name].key]: step
        for step in plan.steps
        if base.entries[step.name].key in written
    }
    lineage.tied.update(aliases)
    sharded = next(t for t in tensors.values() if is_dtensor(t))
    mesh, device = sharded.device_mesh, sharded.device

    writer: ShardedWriter | None = None
    failure: BaseException | None = None
    if rank() == 0:
        summary = {
            "merged": dict(Counter(entry[0] for entry in lineage.values())),
            "skipped": dict(Counter(lineage.skipped.values())),
        }
        from . import __version__

        try:
            writer = ShardedWriter(
                out,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                metadata={
                    "terge_version": __version__,
                    "terge_lineage": json.dumps(summary, sort_keys=True),
                },
            ).__enter__()
        except Exception as error:
            failure = error
    _agree(failure, mesh, device, out)

    buffers = ChunkBuffers(dtype)
    names = [name for name in tensors if name not in aliases]
    shown = tqdm(names, desc="Merging and writing", unit="tensors") if progress else names
    with torch.no_grad():
        for name in shown:
            tensor = tensors[name]
            cast = out_dtype if out_dtype is not None and tensor.dtype.is_floating_point else None
            step = computed.get(name)
            if step is not None:  # merged shard by shard, straight into the written dtype
                value = _fresh(tensor, cast or tensor.dtype)
                run_step(step, sources, base, value, buffers)
            else:
                value = tensor.detach()
            whole = value.full_tensor() if is_dtensor(value) else value
            if step is None and cast is not None and whole.dtype != cast:
                rounded = torch.empty(whole.shape, dtype=cast, device=whole.device)
                store_whole(rounded, whole, buffers)  # rounded once, as write_merge does
                whole = rounded
            if writer is not None and failure is None:
                try:
                    writer.add(name, whole)
                except Exception as error:  # keep joining the collectives; fail together below
                    failure = error
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
    return out


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
