"""``merge()``: sources → plan → execute."""

from __future__ import annotations

import contextlib
import gc
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
from .errors import (
    BaseIndexError,
    MergeArgumentError,
    NoParametersToMergeWarning,
    ShardingError,
    VocabularyError,
    VocabularyMismatchWarning,
)
from .execute import destinations, execute
from .io import parse_size
from .io.adapters import AdapterSpec, is_adapter_folder
from .io.choose import Chosen
from .io.dtypes import floating_dtype
from .io.hub import hub_reference
from .io.training import CheckpointLike, as_spec
from .lineage import SEPARATE, Lineage, ModelIndex, ModelRecord, lineage_text
from .lora import (
    LoraSettings,
    check_adapter_target,
    check_merge_adapter,
    lora_settings,
    write_merge_adapter,
)
from .modelcard import CARD_FILE
from .modelcard import model_card as model_card_text
from .output import (
    LINEAGE_FILE,
    Ranks,
    check_out_format,
    check_output,
    file_ranks,
    folder_of,
    write_merge,
)
from .plan import Plan, build_plan, check_seed
from .sharding import rank
from .sources import (
    AdapterSource,
    FileSource,
    ModuleSource,
    NameMap,
    Source,
    as_source,
    is_path,
    on_disk,
    renamer,
)
from .types import Merged, Methods, Model, Models, Patterns, Weights
from .vocabulary import (
    OutputVocabulary,
    check_choice,
    checked_rows,
    config_rows,
    output_vocabulary,
    read_vocabulary,
    tokenizer_files,
)


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
    model_card: bool | str = ...,
    lora_rank: int | Mapping[Any, int] | None = ...,
    lora_energy: float | None = ...,
    lora_embeddings: bool = ...,
    vocabulary: str | int | None = ...,
    tokenizers: Sequence[Any] | None = ...,
    vocabulary_tensors: Patterns | None = ...,
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
    model_card: bool | str = ...,
    lora_rank: int | Mapping[Any, int] | None = ...,
    lora_energy: float | None = ...,
    lora_embeddings: bool = ...,
    vocabulary: str | int | None = ...,
    tokenizers: Sequence[Any] | None = ...,
    vocabulary_tensors: Patterns | None = ...,
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
    model_card: bool | str = ...,
    lora_rank: int | Mapping[Any, int] | None = ...,
    lora_energy: float | None = ...,
    lora_embeddings: bool = ...,
    vocabulary: str | int | None = ...,
    tokenizers: Sequence[Any] | None = ...,
    vocabulary_tensors: Patterns | None = ...,
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
    model_card: bool | str = ...,
    lora_rank: int | Mapping[Any, int] | None = ...,
    lora_energy: float | None = ...,
    lora_embeddings: bool = ...,
    vocabulary: str | int | None = ...,
    tokenizers: Sequence[Any] | None = ...,
    vocabulary_tensors: Patterns | None = ...,
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
    model_card: bool | str = ...,
    lora_rank: int | Mapping[Any, int] | None = ...,
    lora_energy: float | None = ...,
    lora_embeddings: bool = ...,
    vocabulary: str | int | None = ...,
    tokenizers: Sequence[Any] | None = ...,
    vocabulary_tensors: Patterns | None = ...,
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
    model_card: bool | str = True,
    lora_rank: int | Mapping[Any, int] | None = None,
    lora_energy: float | None = None,
    lora_embeddings: bool = False,
    vocabulary: str | int | None = None,
    tokenizers: Sequence[Any] | None = None,
    vocabulary_tensors: Patterns | None = None,
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
            Or ``"lora"``: the merge written as a PEFT LoRA adapter over the base
            (``adapter_model.safetensors``, ``adapter_config.json``, ``lora.json`` with every
            module's rank and relative truncation error, and ``lineage.json``) that
            ``PeftModel.from_pretrained(base_model, out)`` loads: each merged tensor is computed
            in turn and its difference from the base factored at once by truncated SVD in
            float64 (see :func:`terge.extract_lora`), so memory holds one merged tensor at a
            time. Needs ``lora_rank`` or ``lora_energy``.
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
            split the output's shards (or, with ``out_format="dcp"``, a distributed checkpoint's
            tensors) between the processes. Each rank reads only what its
            shards need and writes its own shard files; rank 0 writes the index, config and
            lineage, and the folder appears only when every rank succeeded (a failure on any
            rank fails all, leaving nothing). The files are those one process would write, byte
            for byte. A drawn seed is rank 0's. Every rank must call it; every rank returns.
        model_card: with ``out``, write a ``README.md`` model card into the folder, in the Hugging
            Face Hub's format (``terge.modelcard.model_card``): ``base_model`` (the Hub models),
            ``base_model_relation: merge``, ``library_name``, ``tags``, the method and its
            paper, the models with their revisions and weights, a recipe that redoes the merge
            and the SHA-256 of ``lineage.json``. It replaces a ``README.md`` copied from the
            base folder (that one describes the base). ``False`` leaves it out (a base's
            README is then copied as before); a ``str`` is shown in the card as the command
            that made the merge (``terge merge`` passes its command line).

    Hub models: wherever a path goes, ``org/name`` or ``org/name@revision`` (a branch, tag or
    commit hash) names a model on the Hugging Face Hub, fetched into (or, with
    ``HF_HUB_OFFLINE=1``, read from) the Hub's local cache; a local file or folder of that name
    wins, and ``hf://org/name`` forces the Hub. The lineage records each one's repository, the
    revision asked for and the commit it resolved to (see :mod:`terge.io.hub`).
        lora_rank: with ``out_format="lora"``, the rank of every factored module, or a map of
            patterns to ranks (first match wins), as ``terge.extract_lora``'s ``rank``.
        lora_energy: with ``out_format="lora"``, instead of a rank, the smallest rank keeping
            this share (in (0, 1]) of each difference's squared singular values.
        lora_embeddings: with ``out_format="lora"``, factor embeddings too (otherwise a changed
            embedding is saved whole in ``modules_to_save``).

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
    adapter = _lora_settings(out_format, lora_rank, lora_energy, lora_embeddings, out_dtype)
    _check_distributed(distributed, target, models, base, out_format)
    written_dtype = _out_dtype(out_dtype)
    seed = check_seed(seed)
    _check_audit(digests, dry_run, lineage, out)
    rename = renamer(name_map)
    card = _check_model_card(model_card)
    with contextlib.ExitStack() as opened:
        collection = opened.enter_context(_CollectionPaused())
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
        aligned = _vocabulary(
            vocabulary,
            tokenizers,
            vocabulary_tensors,
            sources,
            base_index,
            inplace,
            target,
            out_format,
            distributed,
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
            vocabulary=aligned[0] if aligned is not None else None,
            vocabulary_tensors=vocabulary_tensors,
        )
        if plan.rows_differ:
            _warn_rows_differ(plan.rows_differ)
        files = _vocabulary_output(plan, aligned, base_source, target)
        if plan.sharded or ranks is not None:
            if plan.sharded:
                _check_sharded(plan, drawn, digests)
            progress = progress and rank() == 0  # one bar, not one per rank
        record = None  # built only where it is returned or written: a soup loop never pays
        if lineage or dry_run or digests or target is not None:
            record = _lineage(plan, sources, base_source, base_index, dtype, written_dtype, digests)
            record.chosen = models.record() if isinstance(models, Chosen) else None
        if adapter is not None and digests:
            raise MergeArgumentError(
                "digests=True hashes the merged tensors as written, but out_format='lora' writes "
                "their factors; drop digests=True, or write safetensors."
            )
        if dry_run:
            assert record is not None  # a dry run returns its lineage
            if adapter is not None and target is not None:
                check_merge_adapter(plan, adapter, base_source)
                check_adapter_target(target, sources, base_source, overwrite)
            elif target is not None:  # fail exactly where the real call would
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
        if target is not None or any(not step.method.builtin for step in plan.steps):
            collection.resume()  # see _CollectionPaused
        if adapter is not None and target is not None:
            assert record is not None  # every out= writes its lineage.json
            result: Merged = write_merge_adapter(
                plan,
                sources,
                base_source,
                out=target,
                settings=adapter,
                overwrite=overwrite,
                dtype=dtype,
                lineage_text=lineage_text(record),
                lineage_file=LINEAGE_FILE,
                card=None
                if card is False
                else (
                    CARD_FILE,
                    model_card_text(
                        record,
                        command=card if isinstance(card, str) else None,
                        library_name="peft",
                    ),
                ),
            ).path
        elif target is not None:
            assert record is not None  # every out= writes its lineage.json
            result = write_merge(
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
                card=card,
                tokenizer_files=files,
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
                hold=True,
            )
            if hook is not None and record is not None:  # digests need a lineage (checked)
                record.digests = hook.digests
    if not plan.steps and not isinstance(base_source, AdapterSource):
        _warn_nothing_merged()  # an adapter alone is merged into its base: not nothing
    return (result, record) if lineage else result


class _CollectionPaused:
    """Python's cyclic garbage collector paused while a merge plans and merges in memory, and
    resumed after (unless it was off before). A merge makes a few small objects per tensor per
    model, and every 700 new objects start a collection; some of those walk every object of the
    process (a large model's modules and tensors): 5,000 tensors of three models took 220-240 ms
    with the collector on, two calls in three, and 150 ms with it paused. Reference counting
    still frees what the merge drops; the few cycles it makes wait for the next collection.
    It is resumed before the tensors are computed (:meth:`resume`) where what runs then is not
    all terge's own: a merge written to files (the writing goes tensor by tensor) and a merge
    with a user's method (which may leave a cycle holding a tensor), so that nothing they drop
    waits for the end."""

    def __enter__(self) -> _CollectionPaused:
        self.enabled = gc.isenabled()
        gc.disable()
        return self

    def resume(self) -> None:
        if self.enabled:
            gc.enable()

    def __exit__(self, *exc_info: object) -> None:
        self.resume()


def _lora_settings(
    out_format: str, rank: Any, energy: Any, embeddings: Any, out_dtype: Any
) -> LoraSettings | None:
    """The settings of ``out_format="lora"``; the ``lora_*`` knobs are refused without it."""
    if out_format != "lora":
        given = [
            name
            for name, value, default in (
                ("lora_rank", rank, None),
                ("lora_energy", energy, None),
                ("lora_embeddings", embeddings, False),
            )
            if value is not default
        ]
        if given:
            raise MergeArgumentError(
                f"`{given[0]}` sets how a merge is written as a LoRA adapter; set `out_format` "
                f"to 'lora' (with `out`) too, or drop `{given[0]}`."
            )
        return None
    if rank is None and energy is None:
        raise MergeArgumentError(
            "`out_format` 'lora' needs `lora_rank` (an int, or a map of patterns to ints) or "
            "`lora_energy` (a share in (0, 1] of the squared singular values to keep)."
        )
    return lora_settings(rank, energy, embeddings, None, out_dtype)


def _vocabulary(
    choice: Any,
    given: Any,
    patterns: Any,
    sources: Sequence[Source],
    base_index: int | None,
    inplace: bool,
    target: Path | None,
    out_format: str,
    distributed: bool,
) -> tuple[OutputVocabulary, dict[str, str] | None] | None:
    """The output vocabulary, from every model's tokenizer, and with ``out`` the tokenizer
    files of the output folder (``None``: the base's are copied), when a vocabulary is asked
    for; what cannot be aligned is refused here, before anything is read or written."""
    choice = check_choice(choice, len(sources))
    if choice is None:
        if given is not None or patterns is not None:
            raise VocabularyError(
                "`tokenizers` and `vocabulary_tensors` say how to align vocabularies, which "
                "happens only with vocabulary='base', 'union' or a model index; pass one."
            )
        return None
    for flag, what in (
        (
            base_index is None,
            "a base given apart from `models` (pass it in `models` and base=<its index>)",
        ),
        (inplace, "inplace=True (pass inplace=False, or out=)"),
        (distributed, "distributed=True"),
        (target is not None and out_format != "safetensors", f"out_format={out_format!r}"),
    ):
        if flag:
            raise VocabularyError(f"vocabulary={choice!r} cannot be used with {what}.")
    if given is not None and (
        isinstance(given, (str, bytes))
        or not isinstance(given, Sequence)
        or len(given) != len(sources)
    ):
        raise VocabularyError(
            f"`tokenizers` must be a list with one entry per model ({len(sources)}): a "
            "tokenizers.Tokenizer, a tokenizer.json path, a folder, or None; got "
            f"{given!r:.80}."
        )
    if choice == base_index:  # the base's own vocabulary, named by its index
        choice = "base"
    vocabularies = []
    owner = choice if isinstance(choice, int) else base_index
    for index, source in enumerate(sources):
        folder = folder_of(source) if isinstance(source, FileSource) else None
        vocabularies.append(
            read_vocabulary(
                given[index] if given is not None else None,
                folder,
                checked_rows(source.entries, _config_rows(source, folder), f"models[{index}]"),
                f"models[{index}]",
                keep=index == owner,
            )
        )
    assert base_index is not None
    output = output_vocabulary(vocabularies, base_index, choice)
    # The output folder's tokenizer files are made now, so that the models' tokenizers (tens
    # of MiB for large vocabularies) are freed before any tensor is merged.
    files = tokenizer_files(output, vocabularies) if target is not None else None
    return output, files


def _config_rows(source: Source, folder: Path | None) -> int | None:
    """A model's ``vocab_size``: a module's ``.config``, else its folder's ``config.json``."""
    if isinstance(source, ModuleSource):
        size = getattr(getattr(source.module, "config", None), "vocab_size", None)
        return size if isinstance(size, int) and not isinstance(size, bool) else None
    return config_rows(folder)


def _vocabulary_output(
    plan: Plan,
    aligned: tuple[OutputVocabulary, dict[str, str] | None] | None,
    base: Source,
    target: Path | None,
) -> dict[str, str] | None:
    """The tokenizer files an aligned output folder gets; an in-memory result whose rows no
    tokenizer the caller holds describes (a union), or that a module cannot take, is refused."""
    if aligned is None or plan.vocabulary is None:
        return None
    output, files = aligned
    if target is None:
        if output.source == "union":
            raise VocabularyError(
                "vocabulary='union' makes a tokenizer that only an output folder holds; pass "
                "out='folder' (its tokenizer.json matches the merged rows)."
            )
        resized = [
            s.name
            for s in plan.steps
            if s.rows is not None and s.rows.rows != base.entries[s.name].shape[0]
        ]
        if resized and isinstance(base, ModuleSource):
            raise VocabularyError(
                f"vocabulary={output.source!r} gives '{resized[0]}' {output.rows} rows, but the "
                "base module's has another count and a module cannot be resized here; pass "
                "out='folder', or a state dict as the base."
            )
        return None
    return files


def _warn_rows_differ(names: Sequence[str]) -> None:
    """Tell the caller of ``merge()`` (two frames up) which tensors' rows differ."""
    shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
    warnings.warn(
        f"terge: {len(names)} tensor(s) ({shown}) have rows that differ between the models (the "
        "vocabularies differ?) and were left as the base has them; pass vocabulary='base', "
        "'union' or a model index to align them by token.",
        VocabularyMismatchWarning,
        stacklevel=3,
    )


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
    safetensors shards or a distributed checkpoint, a process group."""
    if not distributed:
        return
    if target is None:
        raise MergeArgumentError(
            "distributed=True splits the shards of the output folder between the processes; "
            "pass out='folder' too (an in-memory merge is not split)."
        )
    if out_format not in ("safetensors", "dcp"):
        raise MergeArgumentError(
            f"distributed=True splits the output's files between the processes (safetensors "
            f"shards, or a distributed checkpoint's data files), but out_format={out_format!r}; "
            "merge on one process for it (drop distributed=True)."
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


def _check_model_card(model_card: Any) -> bool | str:
    """``model_card``: a flag, or the (non-empty, one-screen) command that made the merge."""
    if isinstance(model_card, str):
        if not model_card.strip() or len(model_card) > 100_000:
            raise MergeArgumentError(
                "`model_card` as a str is the command that made the merge, shown in the card; "
                f"got {'an empty one' if not model_card.strip() else 'over 100000 characters'}. "
                "Pass True (a card with a generated recipe) or False (no card)."
            )
        return model_card
    if isinstance(model_card, bool):
        return model_card
    raise MergeArgumentError(
        f"`model_card` must be True (write README.md), False (leave it out) or the command that "
        f"made the merge (a str); got {type(model_card).__name__}."
    )


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
        hub = source.hub if isinstance(source, (FileSource, AdapterSource)) else None
        adapter = None
        if isinstance(source, AdapterSource):
            summary = source.adapter.summary()
            inner = source.base
            adapter = {"base": {"kind": inner.kind, "path": _path_of(inner)}} | {
                k: v for k, v in summary.items() if k != "folder"
            }
        return ModelRecord(
            index,
            source.kind,
            _path_of(source),
            files,
            revision=None if hub is None else hub.commit,
            repo=None if hub is None else hub.repo_id,
            requested_revision=None if hub is None else hub.revision,
            adapter=adapter,
        )

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
        return str(source.folder) if source.hub is None else source.hub.pinned
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
    if on_disk(base) and hub_reference(base) is None and not as_spec(base).path.exists():
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
