"""Walking the plan: make the destination tensors, then fill them one tensor at a time."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .errors import MergeArgumentError, MethodResultError
from .kernels import ChunkBuffers, linear_combine, store_whole
from .plan import Plan, Step, derive_seed
from .sharding import Layout, is_dtensor, layout_of, local
from .sources import FileSource, ModuleSource, Source, StateDictSource


def destinations(base: Source, plan: Plan, inplace: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    """The object to return and, for each step, the tensor its result is written into.

    In place, that is the base's own tensor. Otherwise the base is copied once, with every tensor
    that will be merged replaced by a fresh empty one (no copy-then-overwrite), ties kept. A
    module inside a wrapper (DDP, ``torch.compile``) is returned wrapped in place, and copied
    without its wrapper.
    """
    if inplace:
        owner = base.wrapper if isinstance(base, ModuleSource) else base.mapping  # type: ignore[attr-defined]
        return owner, {step.name: base.get(step.name) for step in plan.steps}
    if isinstance(base, ModuleSource):
        return _copy_module(base, plan)
    if isinstance(base, FileSource):
        return _load_file(base, plan)
    assert isinstance(base, StateDictSource)
    return _copy_state_dict(base, plan)


def _load_file(base: FileSource, plan: Plan) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict of the base checkpoint: fresh tensors to merge into, copies of the rest.

    The tensors left alone are read into memory, one at a time: a view of the file's memory map
    would die (SIGBUS) the moment the file is rewritten, and saving the result over its own
    input (``torch.save(m, "ckpt.bin")``) rewrites it. To keep memory flat for a large
    checkpoint, write with ``out=`` instead.
    """
    merged = {step.name for step in plan.steps}
    result: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    for name, entry in base.entries.items():
        raw = base.raw_names[name]  # the result keeps the file's own names
        if name in merged:
            result[raw] = outputs[name] = torch.empty(entry.shape, dtype=entry.dtype)
        else:
            result[raw] = base.get(name).clone(memory_format=torch.contiguous_format)
    return result, outputs


def _fresh_like(original: torch.Tensor) -> torch.Tensor:
    fresh = torch.empty_like(original.detach(), memory_format=torch.preserve_format)
    if isinstance(original, torch.nn.Parameter):
        return torch.nn.Parameter(fresh, requires_grad=original.requires_grad)
    return fresh


def _copy_module(base: ModuleSource, plan: Plan) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    memo: dict[int, Any] = {}
    outputs: dict[str, torch.Tensor] = {}
    for step in plan.steps:
        original = base.get(step.name)
        fresh = _fresh_like(original)
        memo[id(original)] = fresh
        outputs[step.name] = fresh
        for (
            alias
        ) in step.aliases:  # a different object viewing the same memory: share the fresh one
            other = base.get(alias)
            if id(other) not in memo:
                memo[id(other)] = (
                    torch.nn.Parameter(fresh.data, requires_grad=other.requires_grad)
                    if isinstance(other, torch.nn.Parameter)
                    else fresh.data
                )
    memo[id(memo)] = [base.get(step.name) for step in plan.steps]  # keep ids stable while copying
    try:
        return copy.deepcopy(base.module, memo), outputs
    except (AssertionError, RuntimeError, TypeError) as error:
        if not any(is_dtensor(t) for t in base.module.parameters()):
            raise
        raise MergeArgumentError(
            f"the base module holds DTensors (FSDP2's fully_shard) and cannot be copied "
            f"({type(error).__name__}: {error}); merge into it with inplace=True, or pass its "
            "state dict (model.state_dict(), whose values are DTensors) as the base to get a "
            "merged state dict back, which model.load_state_dict() takes."
        ) from error


def _copy_state_dict(
    base: StateDictSource, plan: Plan
) -> tuple[MutableMapping[str, Any], dict[str, torch.Tensor]]:
    outputs: dict[str, torch.Tensor] = {}
    by_view: dict[Any, torch.Tensor] = {}
    for step in plan.steps:
        fresh = _fresh_like(base.get(step.name))
        outputs[step.name] = fresh
        by_view[base.entries[step.name].key] = fresh
    try:
        result: MutableMapping[str, Any] = type(base.mapping)()  # type: ignore[assignment]
    except TypeError:
        result = {}
    for name, value in base.mapping.items():
        if isinstance(value, torch.Tensor):
            key = base.entries[base.canonical[name]].key
            if key not in by_view:
                by_view[key] = value.detach().clone(memory_format=torch.preserve_format)
            result[name] = by_view[key]
        else:
            result[name] = copy.deepcopy(value)
    metadata = getattr(base.mapping, "_metadata", None)
    if metadata is not None:
        with contextlib.suppress(AttributeError):  # plain dicts take no attributes
            result._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return result, outputs


class StepHook(Protocol):
    """Told about each step as it runs: ``before`` it reads its inputs (still unchanged when
    merging in place), ``after`` with the tensor it wrote (e.g. to record digests)."""

    def before(self, step: Step) -> None: ...

    def after(self, step: Step, written: torch.Tensor) -> None: ...


def execute(
    steps: Sequence[Step],
    sources: list[Source],
    base: Source,
    destination: Callable[[str], torch.Tensor],
    dtype: torch.dtype,
    progress: bool,
    hook: StepHook | None = None,
) -> None:
    """Compute every step into ``destination(step.name)``, one tensor at a time.

    The destination is asked for only when its step runs, so a file writer can hand out a view
    of its shard's memory map and nothing needs to be held for long.
    """
    buffers = ChunkBuffers(dtype)
    bar: Callable[..., Any] = tqdm if progress else _no_bar
    with (
        torch.no_grad(),
        bar(total=len(steps), desc="Merging the models' parameters", unit="parameters") as shown,
    ):
        for step in steps:
            if hook is not None:
                hook.before(step)
            written = destination(step.name)
            run_step(step, sources, base, written, buffers)
            if hook is not None:
                hook.after(step, written)
            shown.update(1)


def run_step(
    step: Step,
    sources: list[Source],
    base: Source,
    destination: torch.Tensor,
    buffers: ChunkBuffers,
) -> None:
    """Compute one step into ``destination`` (also how ``terge lineage verify`` recomputes).

    A sharded parameter (DTensors, checked alike by the plan) is computed on the local shards,
    written straight into the destination's own shard; methods sum their whole-tensor statistics
    over the other shards through the :class:`~terge.sharding.Layout` they are given.
    """
    inputs = [sources[i].get(step.name) for i in step.contributors]
    layout = layout_of(destination) if is_dtensor(destination) else None
    destination = local(destination)
    inputs = [local(t) for t in inputs]
    if step.method.streaming:
        linear_combine(destination, inputs, step.coefficients, buffers, step.divisor)
        return
    seed = derive_seed(step.seed or 0, step.name) if step.method.random else None
    if (
        layout is None
        and buffers.dtype == torch.float64
        and step.method.merge_into(
            destination,
            [t.detach() for t in inputs],
            list(step.weights),
            local(base.get(step.name)).detach() if step.uses_base else None,
            seed,
            scratch=buffers,
        )
    ):  # computed straight from the inputs as stored (whole CPU tensors, compiled loops)
        return
    device, dtype = destination.device, buffers.dtype
    tensors = [t.detach().to(device=device, dtype=dtype) for t in inputs]
    reference = (
        local(base.get(step.name)).detach().to(device=device, dtype=dtype)
        if step.uses_base
        else None
    )
    result = step.method(
        tensors, list(step.weights), reference, seed, layout or Layout.whole(destination.shape)
    )
    if not isinstance(result, torch.Tensor) or result.shape != destination.shape:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise MethodResultError(
            f"the merge method {step.method.name!r} returned {got} for the parameter "
            f"'{step.name}', which has shape {tuple(destination.shape)}; a method must return a "
            "tensor of the same shape as its inputs."
        )
    store_whole(destination, result.to(dtype), buffers)


class _no_bar:
    """A stand-in for tqdm when no progress bar is wanted."""

    def __init__(self, **_: Any) -> None:
        pass

    def __enter__(self) -> _no_bar:
        return self

    def __exit__(self, *_: Any) -> None:
        pass

    def update(self, _: int) -> None:
        pass
