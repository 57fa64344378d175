"""``merge()``: sources → plan → execute."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import torch

from ._version import __version__
from .digests import DigestRecorder, source_files
from .errors import BaseIndexError, MergeArgumentError, NoParametersToMergeWarning, ShardingError
from .execute import destinations, execute
from .io import parse_size
from .io.adapters import AdapterSpec, is_adapter_folder
from .io.choose import Chosen
from .io.dtypes import floating_dtype
from .io.training import CheckpointLike, as_spec
from .lineage import SEPARATE, Lineage, ModelIndex, ModelRecord
from .output import Ranks, check_out_format, check_output, file_ranks, write_merge
from .plan import Plan, build_plan, check_seed
from .sharding import rank
from .sources import (
    AdapterSource,
    FileSource,
    NameMap,
    Source,
    as_source,
    is_path,
    on_disk,
    renamer,
)
from .types import Merged, Methods, Model, Models, Patterns, Weights


@overload
def merge(
    models: Models,
    base: Model | int = ...,
    method: Methods = ...,
    weights: Weights | None = ...,
    included: Patterns | None = ...,
    excluded: Patterns | None = ...,
    inplace: bool = ...,
    dtype: torch.dtype = ...,
    lineage: bool = ...,
    progress: bool = ...,
    *,
    normalize: bool = ...,
    buffers: bool = ...,
    seed: int | None = ...,
    out: str | os.PathLike[str] | None = ...,
    out_dtype: torch.dtype | str | None = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    out_format: str = ...,
    digests: bool = ...,
    dry_run: Literal[True],
    name_map: Callable[[str], str] | None = ...,
    distributed: bool = ...,
) -> Lineage: ...
@overload
def merge(
    models: Models,
    base: Model | int,
    method: Methods,
    weights: Weights | None,
    included: Patterns | None,
    excluded: Patterns | None,
    inplace: bool,
    dtype: torch.dtype,
    lineage: Literal[True],
    progress: bool = ...,
    *,
    normalize: bool = ...,
    buffers: bool = ...,
    seed: int | None = ...,
    out: str | os.PathLike[str] | None = ...,
    out_dtype: torch.dtype | str | None = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    out_format: str = ...,
    digests: bool = ...,
    dry_run: Literal[False] = ...,
    name_map: Callable[[str], str] | None = ...,
    distributed: bool = ...,
) -> tuple[Merged, Lineage]: ...
@overload
def merge(
    models: Models,
    base: Model | int = ...,
    method: Methods = ...,
    weights: Weights | None = ...,
    included: Patterns | None = ...,
    excluded: Patterns | None = ...,
    inplace: bool = ...,
    dtype: torch.dtype = ...,
    *,
    lineage: Literal[True],
    progress: bool = ...,
    normalize: bool = ...,
    buffers: bool = ...,
    seed: int | None = ...,
    out: str | os.PathLike[str] | None = ...,
    out_dtype: torch.dtype | str | None = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    out_format: str = ...,
    digests: bool = ...,
    dry_run: Literal[False] = ...,
    name_map: Callable[[str], str] | None = ...,
    distributed: bool = ...,
) -> tuple[Merged, Lineage]: ...
@overload
def merge(
    models: Models,
    base: Model | int = ...,
    method: Methods = ...,
    weights: Weights | None = ...,
    included: Patterns | None = ...,
    excluded: Patterns | None = ...,
    inplace: bool = ...,
    dtype: torch.dtype = ...,
    lineage: Literal[False] = ...,
    progress: bool = ...,
    *,
    normalize: bool = ...,
    buffers: bool = ...,
    seed: int | None = ...,
    out: str | os.PathLike[str] | None = ...,
    out_dtype: torch.dtype | str | None = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    out_format: str = ...,
    digests: bool = ...,
    dry_run: Literal[False] = ...,
    name_map: Callable[[str], str] | None = ...,
    distributed: bool = ...,
) -> Merged: ...
@overload
def merge(
    models: Models,
    base: Model | int = ...,
    method: Methods = ...,
    weights: Weights | None = ...,
    included: Patterns | None = ...,
    excluded: Patterns | None = ...,
    inplace: bool = ...,
    dtype: torch.dtype = ...,
    lineage: bool = ...,
    progress: bool = ...,
    *,
    normalize: bool = ...,
    buffers: bool = ...,
    seed: int | None = ...,
    out: str | os.PathLike[str] | None = ...,
    out_dtype: torch.dtype | str | None = ...,
    max_shard_size: int | str = ...,
    overwrite: bool = ...,
    out_format: str = ...,
    digests: bool = ...,
    dry_run: bool = ...,
    name_map: Callable[[str], str] | None = ...,
    distributed: bool = ...,
) -> Merged | tuple[Merged, Lineage] | Lineage: ...


def merge(
    models: Models,
    base: Model | int = 0,
    method: Methods = "arithmetic",
    weights: Weights | None = None,
    included: Patterns | None = None,
    excluded: Patterns | None = None,
    inplace: bool = False,
    dtype: torch.dtype = torch.float64,
    lineage: bool = False,
    progress: bool = False,
    *,
    normalize: bool = True,
    buffers: bool = False,
    seed: int | None = None,
    out: str | os.PathLike[str] | None = None,
    out_dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    out_format: str = "safetensors",
    digests: bool = False,
    dry_run: bool = False,
    name_map: Callable[[str], str] | None = None,
    distributed: bool = False,
) -> Merged | tuple[Merged, Lineage] | Lineage:
    """Merge PyTorch models (modules or state dicts) that share parameters by name and shape.

    Every tensor of ``base`` that at least two of ``models`` hold with the same name and shape is
    replaced by the merge of theirs: by default the weighted mean, accumulated in ``dtype`` and
    rounded once into the tensor's own dtype. Everything is validated before any tensor is touched.

    Args:
        models: the models to merge, ``nn.Module``s, state dicts and checkpoint paths mixed
            freely. A path (``str`` or ``os.PathLike``) names a ``.safetensors``, ``.bin``,
            ``.pt``, ``.pth`` or ``.ckpt`` file or a Hugging Face-style folder of (sharded)
            weights (a Trainer's ``checkpoint-N/`` and accelerate's ``save_state`` folders
            too); it is read lazily, only the tensors the merge uses, through a memory map. A
            training checkpoint (Lightning's ``.ckpt``, ``{"model": ..., "optimizer": ...}``)
            reads as the model state dict inside it; ``terge.checkpoint(path, entry=...,
            prefix=...)`` (or ``"path::entry=KEY"``) says which where it holds several. A
            ``terge.choose(...)`` result (the last or best N of a run) is recorded in
            ``lineage.chosen``.
            A folder with a ``.metadata`` file is a distributed checkpoint
            (``torch.distributed.checkpoint``, as FSDP2 and torchtitan save them): its model is
            read without a process group, one whole tensor at a time, the chunks of every rank
            stitched, optimizer state and the rest left unread.
        base: the model whose tensors are the defaults and, with ``inplace=True``, are written
            into: an index into ``models`` (default ``0``) or a separate module, state dict or
            path.
        method: a method name (``'arithmetic'``), a method from ``terge.methods``, a callable
            ``f(tensors, weights, base) -> tensor``, or a map of patterns to those
            (first match wins; a merged parameter that matches nothing is an error).
        weights: relative weights, one per model, or a map of patterns to such lists (first match
            wins; unmatched parameters weigh models equally). Normalised per parameter over the
            models that hold it, unless ``normalize=False``.
        included: a pattern or list of patterns: only matching parameters are merged. A ``str``
            matches a name exactly; a compiled ``re``/``regex`` pattern matches with ``search``.
        excluded: patterns of parameters not to merge, applied after ``included``.
        inplace: write into ``base``'s own tensors (Parameter objects keep their identity);
            otherwise ``base`` is copied once and no input is modified.
        dtype: the floating-point dtype the merge accumulates in.
        lineage: also return a ``Lineage``: ``{name: (method, [(model_index, weight), ...])}``,
            with the tensors left alone and why in ``.skipped``, and the models, base, dtypes
            and versions as attributes (``terge.save_lineage`` writes it as JSON).
        progress: show a tqdm progress bar over the parameters actually merged.
        normalize: divide each parameter's weights by their sum (``False`` uses them as given,
            so ``weights=[1, 1, -1]`` writes ``a + b - c``).
        buffers: merge floating-point buffers of modules (BatchNorm statistics) too; integer
            buffers are kept from the base. State dicts have no buffers: all their tensors count.
        seed: seeds random methods per parameter name, so results never depend on what else is
            merged; ``None`` draws a seed, recorded in the lineage.
        out: a folder to stream the merged model into instead of building it in memory:
            safetensors shards (``model-0000i-of-0000n.safetensors`` and
            ``model.safetensors.index.json``, or one ``model.safetensors``) holding every tensor
            of the base (tied ones once), the base folder's config and tokenizer files, and the
            lineage as ``lineage.json``. Merged tensors are computed straight into the shards,
            so memory stays flat however large the models. Written atomically: on any error,
            Ctrl-C or SIGTERM no folder is left (what a killed run leaves is removed by the next
            write beside it); links out of the base folder are not copied.
        out_dtype: with ``out``, the dtype floating tensors are written in (``torch.bfloat16``
            or ``'bfloat16'``); each is rounded once from the ``dtype`` accumulation, and
            ``config.json``'s ``torch_dtype`` is updated.
        max_shard_size: with ``out``, the most bytes per shard (an int, or ``'2GB'``, ``'2GiB'``).
        overwrite: with ``out``, replace an existing ``out`` (only once the merge succeeded).
        out_format: with ``out``, what is written: ``"safetensors"`` (the default, as above) or
            ``"dcp"``, a distributed checkpoint (``torch.distributed.checkpoint``) that
            ``dcp.load`` loads into a plain or FSDP2-sharded model, so a run can resume from its
            own soup. Its tensors are keyed as the base's were when the base is a distributed
            checkpoint (``model.`` for ``dcp.save({"model": ...})``), else by their names; each
            is computed into memory and appended at once, so memory holds one tensor at a time.
        digests: record in the lineage the SHA-256 of every merged tensor as written and of
            every tensor it was computed from (``lineage.digests``), and of every whole input
            file (``lineage.models[i].files``, read in 16 MiB chunks), for ``terge lineage
            diff``, ``verify`` and ``check``. Needs ``lineage=True`` or ``out``.
        dry_run: only plan: return the ``Lineage`` of what the call would do (whatever
            ``lineage`` says), reading names, shapes and dtypes but no tensor, and writing
            nothing. It raises what the real call would raise before computing, ``out``'s
            checks (already there, inside an input) included.
        name_map: a function giving each tensor name of every model its canonical name, by
            which tensors are matched and recorded in the lineage. It is applied after the
            built-in stripping of wrapper prefixes (DDP's ``module.``, ``torch.compile``'s
            ``_orig_mod.``), e.g. ``lambda n: n.replace("_checkpoint_wrapped_module.", "")``.
        distributed: with ``out`` and checkpoint paths, on every process of an initialised
            ``torch.distributed`` job (``torchrun``, any number of nodes sharing one filesystem):
            split the output's shards between the processes. Each rank reads only what its
            shards need and writes its own shard files; rank 0 writes the index, config and
            lineage, and the folder appears only when every rank succeeded (a failure on any
            rank fails all, leaving nothing). The files are those one process would write, byte
            for byte. A drawn seed is rank 0's. Every rank must call it; every rank returns.

    Sharded models: a parameter that is a DTensor (FSDP2's ``fully_shard``, or
    ``distribute_tensor``) in every model, on one device mesh with the same placements, is merged
    shard by shard on every rank, in place, without gathering; call ``merge`` on every rank.
    Whole-tensor statistics (TIES' threshold, SLERP's angle, Model Stock's cosines) are summed
    over the mesh. With ``out``, only rank 0 writes files.

    Returns:
        The merged model (the base itself when ``inplace``; a state dict when the base is one,
        or is a path: then every tensor is in memory, none a view of the file, so the result
        can be saved over its own inputs), or the output folder as a ``pathlib.Path`` when
        ``out`` is given; ``(result, lineage)`` when
        ``lineage=True``; the lineage alone with ``dry_run=True``.

    Example:
        >>> import torch, terge
        >>> models = [torch.nn.Linear(4, 2) for _ in range(3)]
        >>> soup, lineage = terge.merge(models, weights=[1, 1, 2], lineage=True)
        >>> lineage['bias']
        ('arithmetic', [(0, 0.25), (1, 0.25), (2, 0.5)])
    """
    inplace, lineage, progress, normalize, buffers, digests, dry_run, distributed = (
        check_flag("inplace", inplace),
        check_flag("lineage", lineage),
        check_flag("progress", progress),
        check_flag("normalize", normalize),
        check_flag("buffers", buffers),
        check_flag("digests", digests),
        check_flag("dry_run", dry_run),
        check_flag("distributed", distributed),
    )
    target = _check_output(out, out_dtype, max_shard_size, overwrite, inplace, out_format)
    _check_distributed(distributed, target, models, base, out_format)
    written_dtype = _out_dtype(out_dtype)
    seed = check_seed(seed)
    _check_audit(digests, dry_run, lineage, out)
    rename = renamer(name_map)
    with contextlib.ExitStack() as opened:
        ranks = opened.enter_context(file_ranks()) if distributed else None
        sources, base_index, base_source = _agreed(
            ranks, lambda: _sources(models, base, buffers, opened, rename)
        )
        if inplace and isinstance(base_source, AdapterSource):
            raise MergeArgumentError(
                f"inplace=True writes into the base's own tensors, but the base is the adapter "
                f"{base_source.folder} (base + delta), which terge never modifies; pass the "
                "adapter's base model as `base` to merge into it in place, out='folder' to "
                "write a checkpoint, or inplace=False for a state dict."
            )
        if inplace and isinstance(base_source, FileSource):
            raise MergeArgumentError(
                f"inplace=True writes into the base's own tensors, but the base is the "
                f"checkpoint {base_source.path}, which terge never modifies; pass out='folder' "
                "to write the merge as a new checkpoint, or inplace=False for a state dict."
            )
        drawn = seed is None
        seed = _drawn_seed(ranks) if seed is None else seed
        plan = build_plan(
            sources,
            base_source,
            base_index,
            method=method,
            weights=weights,
            included=included,
            excluded=excluded,
            dtype=dtype,
            normalize=normalize,
            seed=seed,
            inplace=inplace,
        )
        if plan.sharded or ranks is not None:
            if plan.sharded:
                _check_sharded(plan, drawn, digests)
            progress = progress and rank() == 0  # one bar, not one per rank
        record = None  # built only where it is returned or written: a soup loop never pays
        if lineage or dry_run or digests or target is not None:
            record = _lineage(plan, sources, base_source, base_index, dtype, written_dtype, digests)
            record.chosen = models.record() if isinstance(models, Chosen) else None
        if dry_run:
            assert record is not None  # a dry run returns its lineage
            if target is not None:  # fail exactly where the real call would
                check_output(
                    plan,
                    sources,
                    base_source,
                    out=target,
                    out_dtype=written_dtype,
                    max_shard_size=max_shard_size,
                    overwrite=overwrite,
                    lineage=record,
                    out_format=out_format,
                )
            return record
        hook = DigestRecorder(sources, base_source, base_index) if digests else None
        if target is not None:
            assert record is not None  # every out= writes its lineage.json
            result: Merged = write_merge(
                plan,
                sources,
                base_source,
                out=target,
                out_dtype=written_dtype,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                dtype=dtype,
                progress=progress,
                lineage=record,
                hook=hook,
                out_format=out_format,
                ranks=ranks,
            )
        else:
            result, outputs = destinations(base_source, plan, inplace)
            execute(
                plan.steps,
                sources,
                base_source,
                outputs.__getitem__,
                dtype,
                progress,
                hook,
                atomic=inplace,
            )
            if hook is not None and record is not None:  # digests need a lineage (checked)
                record.digests = hook.digests
    if not plan.steps and not isinstance(base_source, AdapterSource):
        _warn_nothing_merged()  # an adapter alone is merged into its base: not nothing
    return (result, record) if lineage else result


def _warn_nothing_merged() -> None:
    """Tell the caller of ``merge()`` (two frames up) that its result is the base unchanged."""
    warnings.warn(
        "Of all the models and desired parameters passed to `merge()`, none of them share "
        "any mergeable parameters with the same name and shape. This means that the models "
        "are either of totally different architectures, are of different sizes, have only "
        "unnamed parameters, or that whatever parameters they share were not included in "
        "your desired merge parameters. Returning the base model as it is.",
        NoParametersToMergeWarning,
        stacklevel=3,
    )


def _check_sharded(plan: Plan, drawn: bool, digests: bool) -> None:
    """What a merge of sharded parameters (DTensors) cannot do, refused before anything runs."""
    random = next((s for s in plan.steps if s.method.random), None)
    if drawn and random is not None:  # sharded or not: replicated tensors must stay equal too
        raise ShardingError(
            f"the parameter '{random.name}' of a sharded merge is merged with the random method "
            f"{random.method.name!r}, but seed=None would draw a different seed on each rank; "
            "pass seed=<int>, the same on every rank (it is recorded in the lineage)."
        )
    if digests:
        raise ShardingError(
            "digests=True hashes whole tensors, which no rank holds for sharded parameters "
            "(DTensors); drop digests=True, or merge unsharded checkpoints (paths) to audit."
        )


def _check_distributed(
    distributed: bool, target: Path | None, models: Any, base: Any, out_format: str
) -> None:
    """What ``distributed=True`` needs, refused the same way on every rank before any talk:
    checkpoint files that every rank reads (no rank holds the others' modules), an ``out`` in
    safetensors shards, a process group."""
    if not distributed:
        return
    if target is None:
        raise MergeArgumentError(
            "distributed=True splits the shards of the output folder between the processes; "
            "pass out='folder' too (an in-memory merge is not split)."
        )
    if out_format != "safetensors":
        raise MergeArgumentError(
            f"distributed=True splits safetensors shards between the processes, but "
            f"out_format={out_format!r}; merge on one process for a distributed checkpoint "
            "(drop distributed=True), or write safetensors."
        )
    given = list(enumerate(models)) if isinstance(models, (list, tuple)) else []
    for where, model in [(f"models[{i}]", m) for i, m in given] + [("base", base)]:
        if isinstance(model, AdapterSpec) or (is_path(model) and is_adapter_folder(model)):
            raise MergeArgumentError(
                f"distributed=True merges checkpoints, but {where} is the PEFT adapter "
                f"{model}; merge it into its base first (terge.merge([adapter], out='folder')) "
                "and pass that folder, or drop distributed=True."
            )
        if not (on_disk(model) or (where == "base" and isinstance(model, int))):
            raise MergeArgumentError(
                f"distributed=True merges checkpoint files that every rank reads from a shared "
                f"filesystem, but {where} is a {type(model).__name__} in this process's memory; "
                "save it first (terge.save) and pass its path, or drop distributed=True."
            )
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise MergeArgumentError(
            "distributed=True needs torch.distributed initialised on every process: launch "
            "with torchrun and call torch.distributed.init_process_group('gloo') first ('terge "
            "merge' under torchrun does it itself), or drop distributed=True."
        )


def _agreed(ranks: Ranks | None, call: Callable[[], Any]) -> Any:
    """``call()``, agreed between the ranks of a distributed merge: checkpoints that one node
    cannot open fail every rank, rather than leave the others waiting."""
    return call() if ranks is None else ranks.agree(call)


def _drawn_seed(ranks: Ranks | None) -> int:
    """A fresh seed: rank 0's on every rank of a distributed merge, so all compute alike."""
    seed = secrets.randbits(63)
    return seed if ranks is None else int(ranks.broadcast(seed))


def check_flag(name: str, value: Any) -> bool:
    """A flag as a ``bool``: ``True``/``False`` or a NumPy bool, never a truthy string or number
    (``normalize="no"`` would normalise)."""
    if isinstance(value, bool):
        return value
    numpy = sys.modules.get("numpy")  # never imported for this: a NumPy bool implies NumPy
    if numpy is not None and isinstance(value, numpy.bool_):
        return bool(value)
    raise MergeArgumentError(f"`{name}` must be True or False; got {value!r}.")


def _check_audit(digests: bool, dry_run: bool, lineage: bool, out: Any) -> None:
    """Digests need a lineage to go into, and tensors to hash."""
    if digests and dry_run:
        raise MergeArgumentError(
            "digests=True hashes the merged tensors, which a dry run never computes; drop one."
        )
    if digests and not lineage and out is None:
        raise MergeArgumentError(
            "digests=True records digests in the lineage; pass lineage=True (or out=, whose "
            "lineage.json holds them)."
        )


def _lineage(
    plan: Plan,
    sources: Sequence[Source],
    base: Source,
    base_index: int | None,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None,
    digests: bool = False,
) -> Lineage:
    """The plan's lineage, with what it records besides the plan: models, base, dtypes,
    versions; with ``digests``, the SHA-256 of every input file too."""

    def record(index: ModelIndex, source: Source) -> ModelRecord:
        files = source_files(source) if digests else None
        adapter = None
        if isinstance(source, AdapterSource):
            summary = source.adapter.summary()
            inner = source.base
            adapter = {"base": {"kind": inner.kind, "path": _path_of(inner)}} | {
                k: v for k, v in summary.items() if k != "folder"
            }
        return ModelRecord(index, source.kind, _path_of(source), files, adapter=adapter)

    models = tuple(record(i, s) for i, s in enumerate(sources))
    return plan.lineage(
        models=models,
        base=models[base_index] if base_index is not None else record(SEPARATE, base),
        dtype=dtype,
        out_dtype=out_dtype,
        terge_version=__version__,
        torch_version=str(torch.__version__),
    )


def _path_of(source: Source) -> str | None:
    if isinstance(source, AdapterSource):
        return str(source.folder)
    return source.spec if isinstance(source, FileSource) else None


def _out_dtype(out_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``out_dtype`` as a floating torch dtype (names like ``'bfloat16'`` accepted), or None."""
    if out_dtype is None:
        return None
    resolved = floating_dtype(out_dtype)
    if resolved is None:
        raise MergeArgumentError(
            f"`out_dtype` must be a floating-point torch.dtype or its name (torch.bfloat16, "
            f"'float16', 'float32'); got {out_dtype!r}."
        )
    return resolved


def _check_output(
    out: Any, out_dtype: Any, max_shard_size: Any, overwrite: Any, inplace: bool, out_format: Any
) -> Path | None:
    """The output folder, with its options checked; the target itself is checked once the plan
    is built (by the writer, before anything is computed)."""
    check_out_format(out_format)
    if out is None:
        if out_format != "safetensors":
            raise MergeArgumentError(
                f"`out_format` says how `out` is written; pass out='folder' too, or drop "
                f"out_format={out_format!r}."
            )
        if out_dtype is not None:
            raise MergeArgumentError(
                "`out_dtype` sets the dtype of the tensors written to `out`; pass out='folder' "
                "too, or cast the in-memory result yourself (model.to(dtype))."
            )
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise MergeArgumentError(
            f"`out` must be the path of the folder to write (str or os.PathLike); got "
            f"{type(out).__name__}."
        )
    if inplace:
        raise MergeArgumentError(
            "inplace=True writes into the base model and out= writes a new checkpoint; pass "
            "only one of them."
        )
    check_flag("overwrite", overwrite)
    _out_dtype(out_dtype)
    parse_size(max_shard_size)
    return Path(out).expanduser()


def _sources(
    models: Any, base: Any, buffers: bool, opened: contextlib.ExitStack, rename: NameMap
) -> tuple[list[Source], int | None, Source]:
    """Wrap every model, and find the base among them (an index) or wrap it separately.

    Checkpoint files are opened (and their headers checked) here; ``opened`` closes them.
    """
    if (on_disk(models) or isinstance(models, (torch.nn.Module, Mapping))) and not isinstance(
        models, (torch.nn.ModuleList, torch.nn.Sequential)
    ):
        kind = "path" if on_disk(models) else type(models).__name__
        raise MergeArgumentError(
            f"`models` must be a list of models; got a single {kind}. "
            "Wrap it in a list: merge([model_a, model_b])."
        )
    if isinstance(models, bytes) or not isinstance(
        models, (Sequence, torch.nn.ModuleList, torch.nn.Sequential)
    ):
        raise MergeArgumentError(
            f"`models` must be a list of models (nn.Module, state dict or checkpoint path); got "
            f"{type(models).__name__}."
        )
    models = list(models)
    if not models:
        raise MergeArgumentError("`models` is empty; pass at least one model to merge.")
    if isinstance(base, bool) or not (
        on_disk(base) or isinstance(base, (int, torch.nn.Module, Mapping, AdapterSpec))
    ):
        raise MergeArgumentError(
            f"`base` must be an index into `models` or a model (nn.Module, state dict or "
            f"checkpoint path); got {base!r}."
        )
    if on_disk(base) and not as_spec(base).path.exists():
        raise MergeArgumentError(
            f"`base` must be an index into `models` or a model (nn.Module, state dict or "
            f"checkpoint path); got {base!r}, which is no existing file or folder (an index "
            "is an int)."
        )
    if isinstance(base, int) and not -len(models) <= base < len(models):
        raise BaseIndexError(
            f"`base` is {base}, but there are only {len(models)} models; pass an index from "
            f"{-len(models)} to {len(models) - 1}, or a model."
        )
    sources = []
    for i, model in enumerate(models):
        sources.append(as_source(model, buffers, f"models[{i}]", rename))
        opened.callback(sources[-1].close)
    if isinstance(base, int):
        index = base % len(models)
        return sources, index, sources[index]
    for index, model in enumerate(models):
        if model is base or (on_disk(base) and on_disk(model) and _same_path(model, base)):
            return sources, index, sources[index]
    base_source = as_source(base, buffers, "base", rename)
    opened.callback(base_source.close)
    return sources, None, base_source


def _same_path(a: CheckpointLike, b: CheckpointLike) -> bool:
    """Whether two paths (or specs) name the same checkpoint (so a path ``base`` is that
    model): the same file, and the same entry and prefix asked for."""
    first, second = as_spec(a), as_spec(b)
    return (first.path.resolve(), first.entry, first.prefix) == (
        second.path.resolve(),
        second.entry,
        second.prefix,
    )
