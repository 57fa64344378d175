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

A distributed file merge (``merge(paths, out=..., distributed=True)`` on every process of a
``torchrun`` job) splits the output's shards between the ranks: every rank computes the same
layout from the plan, creates and fills the shards it owns (:func:`terge.io.writing.shard_owners`)
in the temporary folder rank 0's writer made, reading only what those shards need; rank 0 commits
(index, config, lineage, rename) once every rank has said it succeeded.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from ._version import __version__
from .digests import DigestRecorder
from .errors import CheckpointError, MergeArgumentError, MetaTensorError, ShardingError
from .execute import execute, output_shape, run_step
from .io import StreamingShardWriter, TensorInfo, parse_size
from .io.distributed import DistributedCheckpointPart, DistributedCheckpointWriter
from .io.dtypes import dtype_name
from .io.reading import allowed_roots, outside
from .io.writing import ShardedWriter, ShardFiles, shard_groups, shard_owners
from .kernels import ChunkBuffers, store_whole
from .lineage import Lineage, lineage_text
from .modelcard import CARD_FILE, model_card
from .plan import Plan, Step
from .sharding import is_dtensor, local, mesh_all_ok, rank
from .sources import (
    Entry,
    FileSource,
    ModuleSource,
    Source,
    canonical_names,
    checkpoint_of,
    entry_of,
    folders_read,
)
from .vocabulary import TOKENIZER_FILES

LINEAGE_FILE = "lineage.json"

OUT_FORMATS = ("safetensors", "dcp", "lora")
"""What ``merge(out=..., out_format=...)`` writes: a Hugging Face-style safetensors folder, a
distributed checkpoint (``torch.distributed.checkpoint``) that ``dcp.load`` loads, or a PEFT
LoRA adapter over the base (:mod:`terge.lora`)."""

T = TypeVar("T")


class _Layout:
    """What is written: each tensor's name, shape and output dtype; tied names (written once);
    the step computed into each written name; how to read a tensor that is copied."""

    def __init__(self, plan: Plan, base: Source, out_dtype: torch.dtype | None) -> None:
        entries, self.tensor_of = _base_tensors(base)
        aligned = {base.entries[s.name].key: s for s in plan.steps if s.rows is not None}
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
            shape = output_shape(aligned[entry.key], entry.shape) if entry.key in aligned else None
            self.tensors[name] = TensorInfo(shape or entry.shape, cast or entry.dtype)
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
    raw = {n: t for n, t in state.items() if isinstance(t, torch.Tensor)}
    # the buffers too: one whose name meets another's once renamed is refused, not dropped
    tensors = {name: raw[n] for name, n in canonical_names(raw, base.rename, "the base").items()}
    for name, tensor in tensors.items():
        if tensor.layout != torch.strided:
            raise CheckpointError(
                f"the base's tensor {name!r} is not dense ({tensor.layout}); safetensors stores "
                "dense tensors: convert it with .to_dense() first."
            )
    entries = {name: entry_of(name, t) for name, t in tensors.items()}
    return entries, tensors.__getitem__


def _config_with_dtype(
    folder: Path, dtype: torch.dtype | None, vocab_size: int | None = None
) -> str | None:
    """The base's ``config.json`` with its dtype set to ``dtype`` and its ``vocab_size`` to
    ``vocab_size`` (where given), or ``None`` if it names neither."""
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
    if dtype is None:
        keys = []
    for key in keys:
        config[key] = dtype_name(dtype)
    if vocab_size is not None and isinstance(config.get("vocab_size"), int):
        keys.append("vocab_size")
        config["vocab_size"] = vocab_size
    return json.dumps(config, indent=2) + "\n" if keys else None


def library_of(base: Source) -> str | None:
    """``"transformers"`` when the base folder's ``config.json`` names a model type or an
    architecture (transformers' ``from_pretrained`` loads the output), else ``None``."""
    folder = folder_of(base) if isinstance(base, FileSource) else None
    if folder is None:
        return None
    path = folder / "config.json"
    if not path.is_file() or outside(path, allowed_roots(folder)) is not None:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    known = isinstance(config, dict) and (
        isinstance(config.get("model_type"), str) or isinstance(config.get("architectures"), list)
    )
    return "transformers" if known else None


def _write_records(
    writer: Any, lineage: Lineage, base: Source, card: bool | str, dcp: bool = False
) -> None:
    """``lineage.json`` and, unless ``card`` is False, the ``README.md`` model card made from it
    (replacing a README copied from the base folder, which describes the base, not the merge);
    ``card`` as a str is the command that made the merge. The card does not name the folder, so
    the same merge writes the same bytes wherever it goes (and whichever rank writes it)."""
    writer.write_text(LINEAGE_FILE, lineage_text(lineage))
    if card is not False:
        command = card if isinstance(card, str) else None
        library = None if dcp else library_of(base)  # transformers cannot load a dcp folder
        text = model_card(lineage, command=command, library_name=library)
        writer.write_text(CARD_FILE, text)


def folder_of(source: FileSource) -> Path | None:
    """The checkpoint folder a file source reads from (a folder, or an index's parent)."""
    if source.path.is_dir():
        return source.path
    if source.path.name.endswith(".index.json"):
        return source.path.parent
    return None


def inputs_of(sources: Sequence[Source], base: Source) -> list[Path]:
    """Every checkpoint and adapter folder the merge reads: the output must not be inside one."""
    paths: list[Path] = []
    for source in [*sources, base]:
        checkpoint = checkpoint_of(source)
        if checkpoint is not None:
            paths.append(folder_of(checkpoint) or checkpoint.path)
        paths += folders_read(source)
    return list(dict.fromkeys(paths))


def _writer(
    out: Path,
    layout: _Layout,
    lineage: Lineage,
    sources: Sequence[Source],
    base: Source,
    max_shard_size: int | str,
    overwrite: bool,
    owned: Iterable[int] | None = None,
    not_copied: Iterable[str] = (),
) -> StreamingShardWriter:
    """The output folder's writer: the layout, a summary of the lineage in every shard's header,
    the base folder's config and tokenizer files, and every input that the output must not touch;
    ``owned``, the shards it fills itself (the others are other ranks')."""
    summary = {
        "merged": dict(Counter(entry[0] for entry in lineage.values())),
        "skipped": dict(Counter(lineage.skipped.values())),
    }
    checkpoint = checkpoint_of(base)
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
        copy_files_from=folder_of(checkpoint) if checkpoint is not None else None,
        inputs=inputs_of(sources, base),
        owned=owned,
        not_copied=not_copied,
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
    ranks: Ranks | None = None,
    card: bool | str = True,
    tokenizer_files: Mapping[str, str] | None = None,
) -> Path:
    """Stream the merge described by ``plan`` into a safetensors folder at ``out``.

    Every tensor of the base is written once (tied names under the first): merged tensors
    computed in place, the others copied from the base, floats cast to ``out_dtype`` rounded
    once. The base folder's config and tokenizer files are copied (``config.json``'s dtype
    updated), and ``lineage`` (the plan's, with the tied names written once and, with a ``hook``,
    the digests of the tensors as written) as ``lineage.json``, with the ``README.md`` model
    card made from it unless ``card`` is False (see :func:`_write_records`). The target and the
    layout are checked before the first tensor is computed; on any error nothing is left
    behind. With sharded parameters every rank must call it, and every rank returns the folder's
    path; so too with ``ranks`` (a distributed file merge), where each rank writes the shards
    it owns.
    """
    layout = _Layout(plan, base, out_dtype)
    lineage.tied.update(layout.aliases)
    if out_format == "dcp":

        def writer_of() -> DistributedCheckpointWriter:
            return _distributed_writer(plan, out, layout, sources, base, max_shard_size, overwrite)

        if ranks is not None and ranks.world > 1:
            _write_dcp_distributed(
                writer_of,
                out,
                layout,
                sources,
                base,
                max_shard_size,
                ranks,
                dtype,
                progress,
                lineage,
                hook,
                card,
            )
            return out
        into = writer_of()
        _write_dcp(into, layout, sources, base, dtype, progress, lineage, hook, card)
        return into.path
    args = (out, layout, lineage, sources, base, max_shard_size, overwrite)
    if plan.sharded:
        _write_sharded(*args, dtype=dtype, progress=progress, card=card)
        return out
    if ranks is not None and ranks.world > 1:
        _write_distributed(*args, ranks, out_dtype, dtype, progress, hook, card)
        return out
    replaced = TOKENIZER_FILES if tokenizer_files is not None else ()
    with _writer(*args, not_copied=replaced) as writer:
        rows = plan.vocabulary.rows if plan.vocabulary is not None else None
        _write_config(writer, base, out_dtype, rows)
        for name, text in (tokenizer_files or {}).items():
            writer.write_text(name, text)
        _fill(layout, None, sources, base, writer.destination, dtype, progress, hook)
        if hook is not None:
            lineage.digests = hook.digests
        _write_records(writer, lineage, base, card)
    return writer.path


def _write_config(
    writer: StreamingShardWriter,
    base: Source,
    out_dtype: torch.dtype | None,
    vocab_size: int | None = None,
) -> None:
    """The base folder's ``config.json`` with its dtype set to ``out_dtype`` (when one is named)
    and its ``vocab_size`` to the output vocabulary's (when aligned)."""
    checkpoint = checkpoint_of(base)
    folder = folder_of(checkpoint) if checkpoint is not None else None
    if folder is not None and (out_dtype is not None or vocab_size is not None):
        config = _config_with_dtype(folder, out_dtype, vocab_size)
        if config is not None:
            writer.write_text("config.json", config)


def _fill(
    layout: _Layout,
    names: Container[str] | None,
    sources: list[Source],
    base: Source,
    destination: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    progress: bool,
    hook: DigestRecorder | None,
) -> None:
    """Compute every merged tensor among ``names`` (all with None) into its place, then copy the
    base's other tensors there, each float rounded once if cast."""
    steps = [step for name, step in layout.steps.items() if names is None or name in names]
    place = {step.name: name for name, step in layout.steps.items()}
    execute(steps, sources, base, lambda name: destination(place[name]), dtype, progress, hook)
    buffers = ChunkBuffers(dtype)
    with torch.no_grad():
        for name in layout.tensors:
            if name not in layout.steps and (names is None or name in names):
                store_whole(destination(name), layout.tensor_of(name).detach(), buffers)


# --- a distributed file merge: each rank writes its own shards ----------------------------------


@dataclass(frozen=True)
class Ranks:
    """The processes of a distributed file merge, and the gloo group they agree through."""

    rank: int
    world: int
    group: Any

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, on every rank (in rank order)."""
        import torch.distributed as dist

        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def agree(self, call: Callable[[], T]) -> T:
        """``call()``'s result once it succeeded on every rank; where it failed on any, every
        rank raises (that one its own error) rather than wait for it in a later collective."""
        try:
            result = call()
        except Exception as error:
            self.gather(_said(error))
            raise
        failed = [(who, said) for who, said in enumerate(self.gather(None)) if said is not None]
        if failed:
            raise _failed_elsewhere(self, *failed[0], None)
        return result


AGREE_TIMEOUT = timedelta(hours=24)
"""How long a rank waits for the others at the end: the slowest rank's shards may take hours
for a very large merge (``torchrun`` stops every rank as soon as one dies)."""


@contextlib.contextmanager
def file_ranks() -> Iterator[Ranks]:
    """Every process of the default group, with a gloo group of their own: small Python objects
    travel on the CPU whatever the default backend (NCCL included), with a timeout that waits
    for the slowest rank. Every rank must enter it."""
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=AGREE_TIMEOUT)
    try:
        yield Ranks(dist.get_rank(), dist.get_world_size(), group)
    finally:
        dist.destroy_process_group(group)


def _write_distributed(
    out: Path,
    layout: _Layout,
    lineage: Lineage,
    sources: list[Source],
    base: Source,
    max_shard_size: int | str,
    overwrite: bool,
    ranks: Ranks,
    out_dtype: torch.dtype | None,
    dtype: torch.dtype,
    progress: bool,
    hook: DigestRecorder | None,
    card: bool | str = True,
) -> None:
    """Each rank computes the shards it owns into rank 0's temporary folder; rank 0 renames the
    folder into place once every rank succeeded, and removes it when any failed."""
    groups = shard_groups(layout.tensors, parse_size(max_shard_size))
    owners = shard_owners(groups, layout.tensors, ranks.world)
    owned = [number for number, owner in enumerate(owners) if owner == ranks.rank]
    names = {name for number in owned for name in groups[number]}
    writer: StreamingShardWriter | None = None
    failure: Exception | None = None
    if ranks.rank == 0:
        try:
            writer = _writer(out, layout, lineage, sources, base, max_shard_size, overwrite, owned)
            writer.__enter__()
            _write_config(writer, base, out_dtype)
        except Exception as error:
            if writer is not None:
                writer.__exit__(type(error), error, None)
            writer, failure = None, error
    said = _said(failure)
    started = (str(writer.temporary), dict(writer.metadata)) if writer is not None else said
    started = ranks.broadcast(started)
    if not isinstance(started, tuple):
        raise failure or CheckpointError(
            f"rank 0 could not start writing {out} ({started}); nothing was written.", out
        )
    if writer is not None:
        failure = _write_own(writer, layout, names, sources, base, dtype, progress, hook)
    else:
        try:  # a full disk fails here, before anything is computed
            files = ShardFiles(
                Path(started[0]), layout.tensors, groups, owned, started[1], output=Path(out)
            )
        except Exception as error:
            failure = error  # what was created goes with rank 0's folder
        else:
            failure = _write_own(files, layout, names, sources, base, dtype, progress, hook, out)
    results = ranks.gather((_said(failure), hook.digests if hook is not None else None))
    failed = [(rank, said) for rank, (said, _) in enumerate(results) if said is not None]
    if not failed and hook is not None:
        lineage.digests = {k: v for _, part in results for k, v in (part or {}).items()}
    if writer is not None:
        failure = _commit(writer, lineage, failure, failed, base, card)
    committed = ranks.broadcast(_said(failure) if writer is not None else None)
    if failure is not None:
        raise failure
    if failed or committed is not None:
        raise _failed_elsewhere(ranks, *(failed[0] if failed else (0, committed)), out)


def _failed_elsewhere(ranks: Ranks, who: int, said: str, out: Path | None) -> CheckpointError:
    """The error of the ranks that did not fail themselves."""
    where = f"nothing was written to {out}" if out is not None else "nothing was written"
    return CheckpointError(
        f"rank {who} of {ranks.world} failed ({said}); every rank stopped and {where}.", out
    )


def _write_own(
    writer: StreamingShardWriter | ShardFiles,
    layout: _Layout,
    names: set[str],
    sources: list[Source],
    base: Source,
    dtype: torch.dtype,
    progress: bool,
    hook: DigestRecorder | None,
    out: Path | None = None,
) -> Exception | None:
    """Compute this rank's shards (flushed to disk when they are another rank's files to
    rename); an error is returned, not raised, so that every rank reaches the agreement."""
    try:
        _fill(layout, names, sources, base, _placer(writer), dtype, progress, hook)
        if isinstance(writer, ShardFiles):
            assert out is not None
            writer.finish(out)
    except Exception as error:
        return error
    except BaseException as error:  # Ctrl-C, SIGTERM: nothing of this rank's is left
        if isinstance(writer, ShardFiles):
            writer.remove()
        else:
            writer.__exit__(type(error), error, None)
        raise
    return None


def _placer(writer: StreamingShardWriter | ShardFiles) -> Callable[[str], torch.Tensor]:
    """Where each of this rank's tensors goes in its shard files."""
    if isinstance(writer, StreamingShardWriter):
        return writer.destination

    def destination(name: str) -> torch.Tensor:
        found = writer.destination(name)
        assert found is not None  # _fill asks only for names of this rank's shards
        return found

    return destination


def _commit(
    writer: ShardedWriter,
    lineage: Lineage,
    failure: Exception | None,
    failed: list[Any],
    base: Source,
    card: bool | str,
    dcp: bool = False,
) -> Exception | None:
    """On rank 0: rename the folder into place when every rank succeeded (the lineage written
    first), else remove it; the error that stops the merge, if any."""
    if failure is not None or failed:
        error = failure or CheckpointError("another rank failed", writer.path)
        writer.__exit__(type(error), error, None)
        return failure
    try:
        _write_records(writer, lineage, base, card, dcp=dcp)
    except Exception as error:
        writer.__exit__(type(error), error, None)
        return error
    try:
        writer.__exit__(None, None, None)  # a failed commit removes the folder itself
    except Exception as error:
        return error
    return None


def _said(error: BaseException | None) -> str | None:
    """An error as the other ranks are told it (None: no error)."""
    return None if error is None else f"{type(error).__name__}: {error}"


def check_out_format(out_format: Any) -> str:
    """``out_format`` checked: one of :data:`OUT_FORMATS`."""
    if out_format not in OUT_FORMATS:
        raise MergeArgumentError(
            f"`out_format` must be one of {', '.join(map(repr, OUT_FORMATS))} (a safetensors "
            f"folder, a torch.distributed.checkpoint folder, or a PEFT LoRA adapter over the "
            f"base); got {out_format!r}."
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
    entry = base.reader.entry if isinstance(base, FileSource) else None
    return DistributedCheckpointWriter(
        out,
        layout.tensors,
        aliases=layout.aliases,
        entry=entry or "",
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        inputs=inputs_of(sources, base),
    )


def _write_dcp(
    writer: DistributedCheckpointWriter,
    layout: _Layout,
    sources: list[Source],
    base: Source,
    dtype: torch.dtype,
    progress: bool,
    lineage: Lineage,
    hook: DigestRecorder | None,
    card: bool | str = True,
) -> None:
    """Compute each tensor into a fresh one and append it to the checkpoint at once, so memory
    holds one output tensor (and its inputs) at a time; tied names share one record."""
    with writer, torch.no_grad():
        _add_dcp(writer.add, layout, list(layout.tensors), sources, base, dtype, progress, hook)
        if hook is not None:
            lineage.digests = hook.digests
        _write_records(writer, lineage, base, card, dcp=True)


def _add_dcp(
    add: Callable[[str, torch.Tensor], None],
    layout: _Layout,
    names: list[str],
    sources: list[Source],
    base: Source,
    dtype: torch.dtype,
    progress: bool,
    hook: DigestRecorder | None,
) -> None:
    """Compute (or copy) each of ``names`` into a fresh tensor and hand it to ``add`` at once."""
    buffers = ChunkBuffers(dtype)
    shown = tqdm(names, desc="Merging and writing", unit="tensors") if progress else names
    with torch.no_grad():
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
            add(name, value)
            del value


def _write_dcp_distributed(
    writer_of: Callable[[], DistributedCheckpointWriter],
    out: Path,
    layout: _Layout,
    sources: list[Source],
    base: Source,
    max_shard_size: int | str,
    ranks: Ranks,
    dtype: torch.dtype,
    progress: bool,
    lineage: Lineage,
    hook: DigestRecorder | None,
    card: bool | str,
) -> None:
    """A distributed checkpoint written by every rank: the tensors shared out by bytes (as the
    safetensors shards are), each rank appending its own to its own data files
    (``__<rank>_<n>.distcp``) in rank 0's temporary folder; rank 0 writes ``.metadata`` (every
    rank's records), the lineage and the card, and renames the folder into place once every rank
    succeeded, removing it when any failed."""
    groups = [[name] for name in layout.tensors]
    owners = shard_owners(groups, layout.tensors, ranks.world)
    names = [group[0] for group, owner in zip(groups, owners, strict=True) if owner == ranks.rank]
    writer: DistributedCheckpointWriter | None = None
    failure: Exception | None = None
    if ranks.rank == 0:
        try:
            writer = writer_of()
            writer.__enter__()
        except Exception as error:
            if writer is not None:
                writer.__exit__(type(error), error, None)
            writer, failure = None, error
    said = _said(failure)
    started = ranks.broadcast(("open", str(writer.temporary)) if writer is not None else said)
    if not isinstance(started, tuple):
        raise failure or CheckpointError(
            f"rank 0 could not start writing {out} ({started}); nothing was written.", out
        )
    size = parse_size(max_shard_size)
    part = (
        writer.part
        if writer is not None
        else DistributedCheckpointPart(Path(started[1]), layout.tensors, ranks.rank, size)
    )
    try:
        add = writer.add if writer is not None else (lambda n, t: part.add(n, t, out))
        _add_dcp(add, layout, names, sources, base, dtype, progress, hook)
        if writer is None:
            part.close()
    except Exception as error:
        failure = error
        if writer is None:
            part.remove()
    except BaseException:  # Ctrl-C, SIGTERM: nothing of this rank's is left
        if writer is None:
            part.remove()
        else:
            writer.__exit__(RuntimeError, None, None)
        raise
    shared = (part.records, part.files) if writer is None and failure is None else ({}, [])
    results = ranks.gather((_said(failure), hook.digests if hook is not None else None, shared))
    failed = [(rank, said) for rank, (said, _, _) in enumerate(results) if said is not None]
    if not failed and hook is not None:  # every rank returns the whole lineage
        lineage.digests = {k: v for _, digests, _ in results for k, v in (digests or {}).items()}
    if writer is not None:
        if not failed and failure is None:
            try:
                for _, _, (records, files) in results[1:]:
                    writer.adopt(records, files)
            except Exception as error:
                failure = error
        failure = _commit(writer, lineage, failure, failed, base, card, dcp=True)
    committed = ranks.broadcast(_said(failure) if writer is not None else None)
    if failure is not None:
        raise failure
    if failed or committed is not None:
        raise _failed_elsewhere(ranks, *(failed[0] if failed else (0, committed)), out)


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
    card: bool | str = True,
) -> None:
    """Merge sharded parameters shard by shard, gather each tensor, and write it on rank 0."""
    sharded = next(t for n in layout.tensors if is_dtensor(t := layout.tensor_of(n)))
    mesh, device = sharded.device_mesh, sharded.device
    writer: StreamingShardWriter | None = None
    failure: Exception | None = None
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
    if writer is not None:  # a failure to write the records removes the folder too
        failure = _commit(writer, lineage, failure, [], base, card)
    _agree(failure, mesh, device, out)


def _merge_sharded(
    layout: _Layout,
    sources: Sequence[Source],
    base: Source,
    writer: StreamingShardWriter | None,
    failure: Exception | None,
    dtype: torch.dtype,
    progress: bool,
) -> Exception | None:
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
