"""``stack()``: a model whose transformer blocks are slices of other models' blocks.

Frankenmerges and depth up-scaling (DUS): the output's blocks are, in order, the blocks of each
slice, renumbered from 0; a slice is a range of one model's blocks (copied) or several ranges of
equal length merged block by block with (layer-wise) weights, as mergekit's ``slices:`` do. The
tensors outside the blocks (embeddings, final norm, head) come from one ``base`` model (the head
from ``head`` when given). Everything is planned and checked before a tensor is read: each merged
slice is planned by :func:`terge.plan.build_plan` over views of its sources renamed to the
slice's own block numbers (so a ``by_layer`` weight spreads over the slice, as a mergekit
gradient does), and executed by the same kernels as ``merge()``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import CheckpointError, MergeArgumentError, StackError
from .execute import execute
from .io import StreamingShardWriter, TensorInfo, parse_size
from .io.dtypes import dtype_name, floating_dtype
from .io.reading import allowed_roots, outside
from .kernels import ChunkBuffers, store_whole
from .layers import block_prefix, layer_index, layers, renumbered
from .layerwise import ByLayer, by_layer
from .lineage import Lineage, LineageEntry, ModelRecord, lineage_text
from .methods import resolve
from .modelcard import CARD_FILE, model_card
from .output import LINEAGE_FILE, folder_of, library_of
from .plan import Plan, build_plan, check_seed
from .sources import Entry, FileSource, Source, StateDictSource, as_source, on_disk

__all__ = ["Blocks", "StackError", "blocks", "stack"]

PASSTHROUGH = "passthrough"
"""How the lineage names a block copied from one model (mergekit's word)."""

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""``config.json`` keys holding the number of blocks (Llama and most: the first; GPT-2: the
second), updated to the output's depth when they hold the base's."""


@dataclass(frozen=True)
class Blocks:
    """Blocks ``start`` to ``stop - 1`` of ``model`` (Python's range, as mergekit's
    ``layer_range``), with the ``weight`` they have where a slice merges several sources: a
    number, a ``terge.by_layer`` value or a list of numbers (a gradient over the slice)."""

    model: Any
    start: int
    stop: int
    weight: float | ByLayer = 1.0

    def __len__(self) -> int:
        return self.stop - self.start


def blocks(
    model: Any, start: int, stop: int, *, weight: float | ByLayer | Sequence[float] = 1.0
) -> Blocks:
    """A slice of ``model``'s transformer blocks, ``start`` included, ``stop`` excluded.

    >>> import terge
    >>> terge.blocks("llama-32", 0, 24)            # blocks 0..23
    Blocks(model='llama-32', start=0, stop=24, weight=1.0)
    """
    for label, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise StackError(f"blocks() needs an int `{label}`; got {value!r}.")
    if not 0 <= start < stop:
        raise StackError(
            f"blocks({start}, {stop}) is empty or negative: give 0 <= start < stop (stop "
            "excluded, as in range())."
        )
    if isinstance(weight, Sequence) and not isinstance(weight, (str, bytes)):
        weight = by_layer(weight)
    elif not isinstance(weight, ByLayer):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise StackError(
                f"blocks(weight=...) must be a number, a list of numbers or terge.by_layer(...); "
                f"got {weight!r}."
            )
        if not math.isfinite(weight):
            raise StackError(f"blocks(weight=...) must be finite; got {weight!r}.")
        weight = float(weight)
    return Blocks(model, start, stop, weight)


def _as_blocks(item: Any, where: str) -> Blocks:
    if isinstance(item, Blocks):
        return blocks(item.model, item.start, item.stop, weight=item.weight)
    if isinstance(item, tuple) and len(item) in (3, 4):
        try:
            return blocks(*item[:3], weight=item[3] if len(item) == 4 else 1.0)
        except StackError as error:
            raise StackError(f"{where}: {error}") from None
    raise StackError(
        f"{where} is {type(item).__name__}; a slice is terge.blocks(model, start, stop), a tuple "
        "(model, start, stop[, weight]), or a list of those to merge block by block."
    )


# --- the models ---------------------------------------------------------------------------------


class _Models:
    """Every distinct model of a stack, opened once (a module as its state dict, so persistent
    buffers come too and tied names stay tied), each with its block stack checked."""

    def __init__(self, opened: contextlib.ExitStack) -> None:
        self.opened = opened
        self.models: list[Any] = []
        self.sources: list[Source] = []
        self.layers: list[int] = []
        self.prefixes: list[str | None] = []

    def index(self, model: Any, where: str) -> int:
        for i, known in enumerate(self.models):
            if known is model or (on_disk(model) and on_disk(known) and _same(model, known)):
                return i
        if isinstance(model, torch.nn.Module):
            source: Source = StateDictSource(model.state_dict(keep_vars=True), where=where)
        else:
            try:
                source = as_source(model, False, where)
            except MergeArgumentError as error:
                raise StackError(str(error)) from None
            except CheckpointError as error:  # named by where it was asked for
                raise StackError(f"{where}: {error}") from error
        self.opened.callback(source.close)
        prefixes = sorted({p for p in map(block_prefix, source.entries) if p is not None})
        if len(prefixes) > 1:
            raise StackError(
                f"{where} has more than one stack of blocks ({', '.join(map(repr, prefixes))}); "
                "stack() renumbers one stack (a decoder-only model's), so give such models "
                "apart or merge them with terge.merge()."
            )
        self.models.append(model)
        self.sources.append(source)
        indices = [i for i in map(layer_index, source.entries) if i is not None]
        self.layers.append(max(indices) + 1 if indices else 0)
        self.prefixes.append(prefixes[0] if prefixes else None)
        return len(self.models) - 1

    def record(self, index: int) -> ModelRecord:
        source = self.sources[index]
        kind = "module" if isinstance(self.models[index], torch.nn.Module) else source.kind
        path = source.spec if isinstance(source, FileSource) else None
        return ModelRecord(index, kind, path)


def _same(a: Any, b: Any) -> bool:
    from .io.training import as_spec

    first, second = as_spec(a), as_spec(b)
    return (first.path.resolve(), first.entry, first.prefix) == (
        second.path.resolve(),
        second.entry,
        second.prefix,
    )


class _BlockView(Source):
    """Blocks ``start`` to ``stop - 1`` of a source, renumbered from 0: what a merged slice's
    plan sees, so its names and ``by_layer`` positions are the slice's own."""

    def __init__(self, source: Source, start: int, stop: int) -> None:
        self.source = source
        self.inner: dict[str, str] = {}
        self.entries: dict[str, Entry] = {}
        for name, entry in source.entries.items():
            index = layer_index(name)
            if index is not None and start <= index < stop:
                local = renumbered(name, index - start)
                self.inner[local] = name
                self.entries[local] = entry._replace(name=local)
        self.others = ()
        self.rename = source.rename
        self.raw_names = {name: name for name in self.entries}
        self.canonical = dict(self.raw_names)

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self.inner[name])

    def structure(self) -> dict[str, torch.Size]:
        return {name: entry.shape for name, entry in self.entries.items()}


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class _Slice:
    """One slice as planned: its sources (model index, blocks), the first output block, and
    for a merged slice the plan over its views."""

    sources: list[tuple[int, Blocks]]
    first: int
    views: list[_BlockView]
    plan: Plan | None

    @property
    def length(self) -> int:
        return len(self.sources[0][1])

    def out_name(self, local: str) -> str:
        index = layer_index(local)
        assert index is not None  # views hold block tensors only
        return renumbered(local, self.first + index)


def _plan_slices(
    slices: Any, models: _Models, method: Any, dtype: torch.dtype, seed: int
) -> list[_Slice]:
    if isinstance(slices, (str, bytes, Blocks, tuple)) or not isinstance(slices, Sequence):
        raise StackError(
            f"stack() takes a list of slices; got {type(slices).__name__}. Write "
            "stack([terge.blocks(model, 0, 24), terge.blocks(model, 8, 32)])."
        )
    if not slices:
        raise StackError("stack() got no slices; give at least one terge.blocks(...).")
    planned: list[_Slice] = []
    first = 0
    for s, item in enumerate(slices):
        where = f"slices[{s}]"
        if isinstance(item, list):
            if not item:
                raise StackError(f"{where} is an empty list; give the blocks to merge.")
            parts = [_as_blocks(x, f"{where}[{i}]") for i, x in enumerate(item)]
        else:
            parts = [_as_blocks(item, where)]
        sources = []
        views = []
        for i, part in enumerate(parts):
            at = f"{where}[{i}]" if len(parts) > 1 else where
            index = models.index(part.model, f"{at} (model {_shown(part.model)})")
            count = models.layers[index]
            if count == 0:
                raise StackError(
                    f"{at}: {_shown(part.model)} has no transformer blocks (no tensor named "
                    "like 'model.layers.N.', 'transformer.h.N.', 'blocks.N.'); stack models "
                    "made of blocks."
                )
            if part.stop > count:
                raise StackError(
                    f"{at} asks for blocks {part.start} to {part.stop - 1} of {_shown(part.model)}"
                    f", which has {count} blocks (0 to {count - 1}); give a range inside it "
                    f"(stop at most {count})."
                )
            sources.append((index, part))
            views.append(_BlockView(models.sources[index], part.start, part.stop))
        _check_alike(views, sources, where)
        plan = None
        if len(parts) > 1:
            plan = build_plan(
                views,
                views[0],
                0,
                method=method,
                weights=[part.weight for part in parts],
                included=None,
                excluded=None,
                dtype=dtype,
                normalize=True,
                seed=seed,
            )
        planned.append(_Slice(sources, first, views, plan))
        first += len(parts[0])
    return planned


def _shown(model: Any) -> str:
    return repr(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else type(model).__name__


def _check_alike(views: list[_BlockView], sources: list[tuple[int, Blocks]], where: str) -> None:
    """A merged slice's sources: equally many blocks, each with the same tensors and shapes."""
    lengths = {len(part) for _, part in sources}
    if len(lengths) > 1:
        shown = ", ".join(f"{part.start}:{part.stop}" for _, part in sources)
        raise StackError(
            f"{where} merges ranges of different lengths ({shown}); every source of a merged "
            "slice must give as many blocks."
        )
    first = views[0].structure()
    for i, view in enumerate(views[1:], start=1):
        other = view.structure()
        if other == first:
            continue
        missing = sorted(set(first) - set(other))
        extra = sorted(set(other) - set(first))
        if missing or extra:
            name = (missing or extra)[0]
            holder = f"{where}[0]" if missing else f"{where}[{i}]"
            raise StackError(
                f"{where} merges blocks of different structure: {name!r} (numbered within the "
                f"slice) is held only by {holder}; merge blocks of one architecture."
            )
        name = next(n for n in first if first[n] != other[n])
        raise StackError(
            f"{where} merges blocks of different shapes: {name!r} (numbered within the slice) "
            f"is {tuple(first[name])} in {where}[0] but {tuple(other[name])} in {where}[{i}]."
        )


# --- the output ---------------------------------------------------------------------------------


@dataclass
class _Layout:
    """Every output tensor: where it is copied from (model, name) or which slice computes it."""

    copies: dict[str, tuple[int, str]]
    computed: dict[str, tuple[_Slice, str]]
    entries: dict[str, Entry]
    aliases: dict[str, str]
    block_sources: list[list[tuple[int, int, float]]]
    block_methods: list[str]
    from_blocks: list[tuple[int, int]]
    """Per output block, the (model, input block) whose per-layer config values it takes: a
    merged slice's first source's."""


def _layout(
    planned: list[_Slice], models: _Models, base: int, head: int, method_name: str
) -> _Layout:
    copies: dict[str, tuple[int, str]] = {}
    computed: dict[str, tuple[_Slice, str]] = {}
    entries: dict[str, Entry] = {}
    aliases: dict[str, str] = {}
    is_head = layers(head=True)
    written: dict[Any, str] = {}
    for model in dict.fromkeys((base, head)):
        source = models.sources[model]
        for name, entry in source.entries.items():
            if layer_index(name) is not None:
                continue
            heads = head != base and is_head.match(name) is not None
            if heads != (model == head and head != base):
                continue  # the base's head is replaced by the head model's, and vice versa
            first = written.setdefault((model, entry.key), name)
            if first != name:
                aliases[name] = first
                continue
            copies[name] = (model, name)
            entries[name] = entry
    if head != base:
        _check_head(models, base, head, is_head)
    prefixes = {models.prefixes[i] for s in planned for i, _ in s.sources}
    prefixes.add(models.prefixes[base])
    prefixes.discard(None)
    if len(prefixes) > 1:
        raise StackError(
            f"the slices' models keep their blocks under different names "
            f"({', '.join(map(repr, sorted(p for p in prefixes if p)))}); stack blocks of one "
            "architecture."
        )
    block_sources: list[list[tuple[int, int, float]]] = []
    block_methods: list[str] = []
    from_blocks: list[tuple[int, int]] = []
    for piece in planned:
        view = piece.views[0]
        model, part = piece.sources[0]
        steps = set() if piece.plan is None else {step.name for step in piece.plan.steps}
        for local, entry in view.entries.items():
            name = piece.out_name(local)
            if local not in steps:
                copies[name] = (model, view.inner[local])
            else:
                computed[name] = (piece, local)
            entries[name] = entry._replace(name=name)
        for offset in range(piece.length):
            block_sources.append(
                [
                    (i, blk.start + offset, _weight_at(blk.weight, offset, piece.length))
                    for i, blk in piece.sources
                ]
            )
            block_methods.append(PASSTHROUGH if piece.plan is None else method_name)
            from_blocks.append((model, part.start + offset))
    _check_shapes(entries, models, base, planned)
    for name, entry in entries.items():
        if entry.is_meta or entry.sharding is not None:
            what = "a tensor on the meta device" if entry.is_meta else "a sharded DTensor"
            raise StackError(
                f"the output's tensor {name!r} would come from {what}, which stack() "
                "cannot copy; load real weights, or save the model (terge.save) and stack paths."
            )
    return _Layout(copies, computed, entries, aliases, block_sources, block_methods, from_blocks)


def _check_head(models: _Models, base: int, head: int, is_head: Any) -> None:
    """The head model replaces every head tensor of the base, with the same shapes."""
    mine = models.sources[base].entries
    theirs = models.sources[head].entries
    for name, entry in mine.items():
        if layer_index(name) is not None or not is_head.match(name):
            continue
        other = theirs.get(name)
        if other is None:
            raise StackError(
                f"the base holds the head tensor {name!r}, which the head model "
                f"{_shown(models.models[head])} lacks; give a head model of the base's "
                "architecture, or drop head=."
            )
        if other.shape != entry.shape:
            raise StackError(
                f"the head tensor {name!r} is {tuple(other.shape)} in the head model but "
                f"{tuple(entry.shape)} in the base; the embeddings and head must agree "
                "(a vocabulary of another size): drop head=, or give a matching model."
            )


def _weight_at(weight: float | ByLayer, offset: int, length: int) -> float:
    return weight.at(offset, length) if isinstance(weight, ByLayer) else float(weight)


def _check_shapes(
    entries: Mapping[str, Entry], models: _Models, base: int, planned: list[_Slice]
) -> None:
    """Each output block holds the base's block tensors with the base's shapes, where the base's
    blocks all agree (a frankenmerge of models of other widths would not load)."""
    source = models.sources[base]
    shapes: dict[str, set[tuple[int, ...]]] = {}
    for name, entry in source.entries.items():
        index = layer_index(name)
        if index is not None:
            shapes.setdefault(renumbered(name, 0), set()).add(tuple(entry.shape))
    if not shapes or any(len(found) > 1 for found in shapes.values()):
        return  # no blocks, or blocks of several shapes: nothing one shape to hold them to
    for piece in planned:
        _, part = piece.sources[0]
        view = piece.views[0]
        for local, entry in view.entries.items():
            generic = renumbered(local, 0)
            wanted = shapes.get(generic)
            if wanted is not None and tuple(entry.shape) not in wanted:
                raise StackError(
                    f"block {part.start + (layer_index(local) or 0)} of {_shown(part.model)} "
                    f"holds {generic!r} of shape {tuple(entry.shape)}, but the base's blocks "
                    f"hold it as {next(iter(wanted))}: the stacked model would not load; stack "
                    "models of one width."
                )


def _read_config(source: Source) -> dict[str, Any] | None:
    """A model folder's ``config.json`` as a dict; ``None`` where there is none (or it is a
    link out of the folder, which the writer never copies). A file that is there but cannot
    be read is an error: its layer counts would be left wrong."""
    folder = folder_of(source) if isinstance(source, FileSource) else None
    if folder is None:
        return None
    path = folder / "config.json"
    if not path.is_file() or outside(path, allowed_roots(folder)) is not None:
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise StackError(
            f"cannot read {path} ({type(error).__name__}: {error}), whose layer counts the stack "
            "must update; fix or remove it."
        ) from None
    if not isinstance(config, dict):
        raise StackError(f"{path} is not a JSON object; fix or remove it.")
    return config


def _depth(config: Mapping[str, Any], blocks: int) -> int:
    """How many blocks a config describes (its layer count), else the tensors' count."""
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return blocks


def _config(
    models: _Models, base: int, layout: _Layout, out_dtype: torch.dtype | None
) -> str | None:
    """The base's ``config.json`` for the output's depth: layer counts set to the output's,
    every per-layer list (one entry per block, such as ``layer_types``) rebuilt block by block
    from the config of the model each block comes from (the base's where that model has none),
    the dtype updated."""
    config = _read_config(models.sources[base])
    if config is None:
        return None
    configs = {base: dict(config)}  # as read: the loop below rewrites config's values
    old = _depth(config, models.layers[base])
    new = len(layout.from_blocks)
    for key, value in list(config.items()):
        if key in LAYER_COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool):
            config[key] = new
        elif isinstance(value, list) and len(value) == old and old > 0:
            config[key] = [
                _per_layer(key, model, block, models, configs, base)
                for model, block in layout.from_blocks
            ]
    if out_dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if isinstance(config.get(key), str):
                config[key] = dtype_name(out_dtype)
    return json.dumps(config, indent=2) + "\n"


def _per_layer(
    key: str, model: int, block: int, models: _Models, configs: dict[int, Any], base: int
) -> Any:
    """Block ``block`` of ``model``'s entry in the per-layer list ``key``."""
    if model not in configs:
        configs[model] = _read_config(models.sources[model])
    own = configs[model]
    for config in (own, configs[base]) if own is not None else (configs[base],):
        values = config.get(key)
        depth = _depth(config, models.layers[model if config is own else base])
        if isinstance(values, list) and len(values) == depth and block < depth:
            return values[block]
    raise StackError(
        f"config.json's per-layer list {key!r} has no entry for block {block} of "
        f"{_shown(models.models[model])}: that model's folder has no config.json with "
        f"{key!r} and the base's list is shorter; give base= the deeper model, or add its "
        "config.json."
    )


# --- stack() ------------------------------------------------------------------------------------


def stack(
    slices: Sequence[Any],
    *,
    base: Any = None,
    head: Any = None,
    method: Any = "arithmetic",
    out: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float64,
    out_dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    seed: int | None = None,
    lineage: bool = False,
    dry_run: bool = False,
    model_card: bool | str = True,
) -> Any:
    """Build a model whose blocks are slices of other models' blocks.

    Args:
        slices: the output's blocks, in order. Each is ``terge.blocks(model, start, stop)``
            (or the tuple ``(model, start, stop)``): blocks ``start`` to ``stop - 1`` of
            ``model`` (a module, state dict or checkpoint path), copied; or a list of those, of
            equal length, merged block by block with ``method`` and each source's ``weight``
            (a number, a list of numbers or ``terge.by_layer``: spread over the slice's blocks).
            Blocks are renumbered from 0 in the output.
        base: the model whose tensors outside the blocks (embeddings, final norm, head) and
            ``config.json`` and tokenizer files the output takes; by default the first slice's
            first model.
        head: a model whose head (final norm, ``lm_head``) replaces the base's, as mergekit
            takes it from the last slice's model; by default the base.
        method: how merged slices combine their sources (any ``merge()`` method).
        out: a folder to stream the output into (safetensors, written atomically, memory flat,
            ``config.json`` with the new depth and per-layer lists, ``lineage.json``); else a
            state dict is returned.
        dtype: the accumulation dtype of merged slices; ``out_dtype``: the written floats' dtype.
        max_shard_size, overwrite: as ``merge()``'s, with ``out``.
        seed: seeds random methods; ``None`` draws one (recorded).
        lineage: also return the ``Lineage`` (``lineage.stack`` records each output block's and
            tensor's sources); ``dry_run``: return the lineage only, reading and writing nothing.
        model_card: with ``out``, a ``README.md`` model card as ``merge()`` writes one (its
            recipe a ``[[slices]]`` recipe that redoes the stack); ``False`` leaves it out, a
            ``str`` is shown as the command that made it.

    Returns:
        The output folder's path (with ``out``), else a state dict; ``(result, lineage)`` with
        ``lineage=True``; the lineage alone with ``dry_run=True``.

    Example (depth up-scaling a 4-block model to 6 blocks):
        >>> import torch, terge
        >>> model = {f"layers.{i}.w": torch.full((2,), float(i)) for i in range(4)}
        >>> model["embed.weight"] = torch.zeros(3, 2)
        >>> up = terge.stack([terge.blocks(model, 0, 3), terge.blocks(model, 1, 4)])
        >>> [up[f"layers.{i}.w"][0].item() for i in range(6)]
        [0.0, 1.0, 2.0, 1.0, 2.0, 3.0]
    """
    for label, flag in (("overwrite", overwrite), ("lineage", lineage), ("dry_run", dry_run)):
        if not isinstance(flag, bool):
            raise StackError(f"`{label}` must be True or False; got {flag!r}.")
    if not isinstance(model_card, (bool, str)) or model_card == "":
        raise StackError(
            f"`model_card` must be True, False or the command that made the stack; got "
            f"{model_card!r}."
        )
    target = _target(out, out_dtype, max_shard_size)
    written_dtype = None if out_dtype is None else floating_dtype(out_dtype)
    resolve(method)  # a bad method or dtype fails even where no slice is merged
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise StackError(
            f"`dtype` must be a floating-point torch.dtype to accumulate in (torch.float64 by "
            f"default, or torch.float32); got {dtype!r}."
        )
    seed = check_seed(seed)
    if seed is None:
        import secrets

        seed = secrets.randbits(63)
    with contextlib.ExitStack() as opened:
        models = _Models(opened)
        planned = _plan_slices(slices, models, method, dtype, seed)
        base_index = (
            planned[0].sources[0][0]
            if base is None
            else models.index(base, f"base ({_shown(base)})")
        )
        head_index = base_index if head is None else models.index(head, f"head ({_shown(head)})")
        method_name = _method_name(planned, method)
        layout = _layout(planned, models, base_index, head_index, method_name)
        record = _lineage(layout, planned, models, base_index, head_index, dtype, written_dtype)
        config = None if target is None else _config(models, base_index, layout, written_dtype)
        if dry_run:
            if target is not None:
                _writer(
                    target, layout, models, base_index, written_dtype, max_shard_size, overwrite
                )
            return record
        result: Any
        if target is not None:
            result = _write(
                target,
                layout,
                models,
                base_index,
                written_dtype,
                max_shard_size,
                overwrite,
                dtype,
                record,
                config,
                None if model_card is False else _card(record, models, base_index, model_card),
            )
        else:
            result = _in_memory(layout, models, dtype)
    return (result, record) if lineage else result


def _target(out: Any, out_dtype: Any, max_shard_size: Any) -> Path | None:
    if out_dtype is not None and floating_dtype(out_dtype) is None:
        raise StackError(
            f"`out_dtype` must be a floating-point torch.dtype or its name ('bfloat16'); got "
            f"{out_dtype!r}."
        )
    if out is None:
        if out_dtype is not None:
            raise StackError("`out_dtype` sets the dtype written to `out`; pass out='folder' too.")
        return None
    if not isinstance(out, (str, os.PathLike)):
        raise StackError(f"`out` must be a folder path (str or os.PathLike); got {out!r}.")
    parse_size(max_shard_size)
    return Path(out).expanduser()


def _method_name(planned: list[_Slice], method: Any) -> str:
    for piece in planned:
        if piece.plan is not None and piece.plan.steps:
            return piece.plan.steps[0].method.name
    return method if isinstance(method, str) else getattr(method, "name", "custom")


def _lineage(
    layout: _Layout,
    planned: list[_Slice],
    models: _Models,
    base: int,
    head: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype | None,
) -> Lineage:
    """The stack's lineage: merged tensors as ``merge()`` records them (model indices global),
    and ``stack``: each output block's sources and each output tensor's (model, input name)."""
    merged: dict[str, LineageEntry] = {}
    skipped: dict[str, str] = {}
    for piece in planned:
        if piece.plan is None:
            continue
        for local, reason in piece.plan.skipped.items():
            skipped[piece.out_name(local)] = reason
        for step in piece.plan.steps:
            entry = step.lineage_entry()
            merged[piece.out_name(step.name)] = LineageEntry(
                entry.method,
                [(piece.sources[i][0], weight) for i, weight in entry.contributions],
                entry.settings,
                coefficients=entry.coefficients,
                divisor=entry.divisor,
                custom=entry.custom,
            )
    tensors: dict[str, list[list[Any]]] = {}
    for name, (model, inner) in layout.copies.items():
        tensors[name] = [[model, inner]]
    for name, (piece, local) in layout.computed.items():
        tensors[name] = [[i, view.inner[local]] for (i, _), view in zip(piece.sources, piece.views)]
    record = Lineage(
        merged,
        skipped,
        dict(layout.aliases),
        models=[models.record(i) for i in range(len(models.models))],
        base=models.record(base),
        dtype=dtype,
        out_dtype=out_dtype,
        terge_version=__version__,
        torch_version=str(torch.__version__),
    )
    record.stack = {
        "base": base,
        "head": head,
        "blocks": [
            {"method": how, "sources": [list(s) for s in sources]}
            for how, sources in zip(layout.block_methods, layout.block_sources)
        ],
        "tensors": dict(sorted(tensors.items())),
    }
    return record


def _reader(layout: _Layout, models: _Models) -> Callable[[str], torch.Tensor]:
    def read(name: str) -> torch.Tensor:
        model, inner = layout.copies[name]
        return models.sources[model].get(inner).detach()

    return read


def _in_memory(layout: _Layout, models: _Models, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    read = _reader(layout, models)
    result: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, entry in layout.entries.items():
            if name in layout.copies:
                result[name] = read(name).clone()
            else:
                result[name] = torch.empty(entry.shape, dtype=entry.dtype)
        _compute(layout, result.__getitem__, dtype)
    for alias, name in layout.aliases.items():
        result[alias] = result[name]
    return result


def _compute(
    layout: _Layout, destination: Callable[[str], torch.Tensor], dtype: torch.dtype
) -> None:
    """Run every merged slice's steps, each tensor straight into its output place."""
    pieces: dict[int, _Slice] = {id(piece): piece for piece, _ in layout.computed.values()}
    for piece in pieces.values():
        assert piece.plan is not None  # only merged slices compute
        views: list[Source] = list(piece.views)
        execute(piece.plan.steps, views, piece.views[0], _placed(piece, destination), dtype, False)


def _placed(
    piece: _Slice, destination: Callable[[str], torch.Tensor]
) -> Callable[[str], torch.Tensor]:
    """Where a merged slice's step (named within the slice) is written: its output name."""
    return lambda local: destination(piece.out_name(local))


def _writer(
    target: Path,
    layout: _Layout,
    models: _Models,
    base: int,
    out_dtype: torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
) -> StreamingShardWriter:
    tensors = {}
    for name, entry in layout.entries.items():
        cast = out_dtype if out_dtype is not None and entry.dtype.is_floating_point else None
        tensors[name] = TensorInfo(entry.shape, cast or entry.dtype)
    files = [s for s in models.sources if isinstance(s, FileSource)]
    source = models.sources[base]
    return StreamingShardWriter(
        target,
        tensors,
        aliases=layout.aliases,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        metadata={"terge_version": __version__, "terge_stack": str(len(layout.block_sources))},
        copy_files_from=folder_of(source) if isinstance(source, FileSource) else None,
        inputs=[folder_of(s) or s.path for s in files],
    )


def _write(
    target: Path,
    layout: _Layout,
    models: _Models,
    base: int,
    out_dtype: torch.dtype | None,
    max_shard_size: int | str,
    overwrite: bool,
    dtype: torch.dtype,
    record: Lineage,
    config: str | None,
    card: str | None = None,
) -> Path:
    """Stream the stack into ``target``: copies one tensor at a time, merged slices computed
    into their shard regions, the base's config re-sliced, the lineage beside them."""
    read = _reader(layout, models)
    buffers = ChunkBuffers(dtype)
    with _writer(target, layout, models, base, out_dtype, max_shard_size, overwrite) as writer:
        if config is not None:
            writer.write_text("config.json", config)
        with torch.no_grad():
            for name in layout.copies:
                store_whole(writer.destination(name), read(name), buffers)
        _compute(layout, writer.destination, dtype)
        writer.write_text(LINEAGE_FILE, lineage_text(record))
        if card is not None:
            writer.write_text(CARD_FILE, card)
    return writer.path


def _card(record: Lineage, models: _Models, base: int, command: bool | str) -> str:
    """The stack's model card (see :func:`terge.modelcard.model_card`)."""
    blocks = len((record.stack or {}).get("blocks", []))
    return model_card(
        record,
        command=command if isinstance(command, str) else None,
        library_name=library_of(models.sources[base]),
        title=f"A stack of {blocks} block{'' if blocks == 1 else 's'} from "
        f"{len(record.models)} model{'' if len(record.models) == 1 else 's'}",
    )
