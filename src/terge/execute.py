"""Walking the plan: make the destination tensors, then fill them one tensor at a time."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import signal
import threading
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from .errors import MergeArgumentError, MethodError, MethodResultError
from .io.readahead import Readahead
from .kernels import ChunkBuffers, fastloop, gpu_loop, linear_combine, store_whole
from .kernels.cpu import DTYPE_CODES, plain
from .kernels.primitives import chunk_for
from .plan import Plan, Step, derive_seed, is_registered
from .sharding import Layout, is_dtensor, layout_of, local
from .sources import AdapterSource, FileSource, ModuleSource, Source, StateDictSource


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
    if isinstance(base, (FileSource, AdapterSource)):
        return _load_file(base, plan)
    assert isinstance(base, StateDictSource)
    return _copy_state_dict(base, plan)


def _load_file(
    base: FileSource | AdapterSource, plan: Plan
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A state dict of the base checkpoint (or adapter, ``base + delta`` rounded once into the
    base's dtypes): fresh tensors to merge into, copies of the rest; tied names share one.

    The tensors left alone are read into memory, one at a time: a view of the file's memory map
    would die (SIGBUS) the moment the file is rewritten, and saving the result over its own
    input (``torch.save(m, "ckpt.bin")``) rewrites it. To keep memory flat for a large
    checkpoint, write with ``out=`` instead.
    """
    merged = {step.name: step for step in plan.steps}
    result: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    by_key: dict[Any, torch.Tensor] = {}
    for name, entry in base.entries.items():
        raw = base.raw_names[name]  # the result keeps the file's own names
        if entry.key in by_key:  # a tied name (a module's, under an adapter): one tensor
            result[raw] = by_key[entry.key]
        elif name in merged:
            shape = output_shape(merged[name], entry.shape)
            result[raw] = outputs[name] = torch.empty(shape, dtype=entry.dtype)
        else:
            value = base.get(name).detach()
            if value.dtype != entry.dtype:  # an adapter's float64 base + delta: round once
                result[raw] = value.to(entry.dtype)
            else:
                result[raw] = value.clone(memory_format=torch.contiguous_format)
        by_key[entry.key] = result[raw]
    return result, outputs


def output_shape(step: Step, shape: torch.Size) -> torch.Size:
    """A merged tensor's shape: the base's, but for a vocabulary tensor one row per token of
    the output vocabulary."""
    if step.rows is None:
        return shape
    return torch.Size((step.rows.rows, *shape[1:]))


def _fresh_like(original: torch.Tensor, step: Step | None = None) -> torch.Tensor:
    if step is not None and step.rows is not None and step.rows.rows != original.shape[0]:
        fresh = torch.empty(output_shape(step, original.shape), dtype=original.dtype)
    else:
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
        fresh = _fresh_like(base.get(step.name), step)
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
                by_view[key] = _clone(value)
            result[name] = by_view[key]
        else:
            result[name] = copy.deepcopy(value)
    metadata = getattr(base.mapping, "_metadata", None)
    if metadata is not None:
        with contextlib.suppress(AttributeError):  # plain dicts take no attributes
            result._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
    return result, outputs


def _clone(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a tensor left alone, strides kept (a sparse one, which has none, as it is)."""
    try:
        return tensor.detach().clone(memory_format=torch.preserve_format)
    except RuntimeError:
        if tensor.layout == torch.strided:
            raise
        return tensor.detach().clone()


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
    *,
    atomic: bool = False,
    hold: bool = False,
) -> None:
    """Compute every step into ``destination(step.name)``, one tensor at a time.

    The destination is asked for only when its step runs, so a file writer can hand out a view
    of its shard's memory map and nothing needs to be held for long.

    ``atomic`` (merging in place, into tensors the caller keeps): a user's method that fails
    leaves every destination as it was. Those steps are computed first into temporaries; then
    everything is written, with SIGINT held until the writes end. The plan refused what the
    built-in kernels cannot take, but they can still run out of memory while writing: such an
    error is raised as itself, with a note saying which tensors may be merged already and
    which are untouched (:func:`_note_partly_written`). Holding every result until the end
    would make it all or nothing, at the cost of a copy of the model.

    ``hold``: every destination stays valid until the end (a merge in memory), so small linear
    steps on the CPU may be held back and computed many to one call (:class:`_HeldSteps`).
    """
    buffers = ChunkBuffers(dtype)
    batched = _HeldSteps.for_merge(sources, dtype, hold) if hook is None else None
    bar: Callable[..., Any] = tqdm if progress else _no_bar
    shown_as = {"total": len(steps), "desc": "Merging the models' parameters", "unit": "parameters"}
    with torch.no_grad(), _read_ahead(steps, sources, base) as readahead:
        ready = _computed_ahead(steps, sources, base, destination, buffers) if atomic else {}
        with _interrupts_held() if atomic else contextlib.nullcontext(), bar(**shown_as) as shown:
            index = 0
            try:
                for index, step in enumerate(steps):  # index: read after a failure too
                    if readahead is not None:
                        readahead.reached(index)
                    if hook is not None:
                        hook.before(step)
                    written = destination(step.name)
                    result = ready.pop(step.name, None)
                    if result is not None:
                        local(written).copy_(local(result))
                    elif batched is None or not batched.add(step, sources, written):
                        if batched is not None:
                            batched.flush()  # in order: a later step may read what it writes
                        run_step(step, sources, base, written, buffers)
                    if hook is not None:
                        hook.after(step, written)
                    shown.update(1)
                if batched is not None:
                    index = len(steps)
                    batched.flush()
            except Exception as error:
                if atomic:
                    _note_partly_written(error, [step.name for step in steps], index)
                raise
            finally:
                if atomic:  # the caller's tensors: tell autograd they changed
                    _bump_versions([destination(step.name) for step in steps], steps)


def _note_partly_written(error: Exception, names: list[str], index: int) -> None:
    """Add a note to an error raised while writing in place (``names[index]`` was being
    computed; ``index == len(names)``: the small tensors held to the end): what may be merged
    already, and what is untouched, so that the caller knows the base is partly merged."""

    def listed(some: list[str]) -> str:
        shown = [repr(name) for name in some]
        return ", ".join(shown if len(shown) <= 4 else [*shown[:3], "...", shown[-1]])

    if index >= len(names):
        state = f"while writing the small tensors it held to the end; any of the {index} may"
        state += " hold merged values"
    else:
        name, after = repr(names[index]), len(names) - index - 1
        state = f"at {name} (tensor {index + 1} of {len(names)}); "
        if index:
            state += f"the {index} before it ({listed(names[:index])}) may hold merged values, "
        state += f"{name} may be partly written, and the {after} after it are untouched"
    text = (
        f"terge: the in-place merge stopped {state}. The base is partly merged: reload it, or "
        "merge with inplace=False where a failure must leave it as it was."
    )
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:  # Python 3.10: kept where 3.11's traceback would show it
        error.__notes__ = [*getattr(error, "__notes__", []), text]  # type: ignore[attr-defined]


class _HeldSteps:
    """Linear steps held back and computed together: on a CUDA GPU one Triton launch per group
    of steps that share dtypes and coefficients instead of one per tensor (each costs tens of
    microseconds of Python, more than a small tensor's kernel); on the CPU, with ``cpu``, one
    call of the compiled loop per group (``_fastloop.combine_many``, as ``Average`` uses)
    instead of one call and thread split per tensor. Everything held is computed before any
    other step runs, and at the end; on a GPU a group is launched once it holds :data:`STEPS`
    steps or :data:`ELEMENTS` elements, so the GPU starts while the later steps are prepared.
    The same loops' arithmetic, so the same bits.

    ``cpu`` only where every destination stays valid until the end (a merge in memory): a
    file writer's destination may be a shard's memory map that is closed once its tensors are
    written."""

    STEPS = 32
    ELEMENTS = 1 << 27
    ALONE = 1 << 24
    """Tensors of this many elements or more get a launch of their own: their kernel outlasts
    a launch's Python, and the one-tensor kernel moves large tensors faster (on an H200, three
    7B-shaped bf16 models: 90% of the copy bandwidth one by one, 63% in one launch)."""
    CPU_STEPS = 1024
    CPU_ALONE = 1 << 22
    """On the CPU, tensors from this size run alone, split between the threads by elements."""

    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu and fastloop.available()  # asked once: it reads the environment
        self.loop: Any = None  # the Triton loop, imported with the first GPU step
        self.groups: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[list[torch.Tensor]]]]
        self.groups = {}
        self.elements = 0
        self.writes: set[int] = set()
        self.reads: set[int] = set()
        """Addresses the held steps write and read: a step that reads what one of them writes,
        or writes what one reads (one tensor shared by two models under different names), waits
        for them, since one call computes its tensors in no set order."""

    @classmethod
    def for_merge(cls, sources: list[Source], dtype: torch.dtype, cpu: bool) -> _HeldSteps | None:
        """A batcher where the compiled or Triton loop can run (float64 accumulation, no
        adapter's exact deltas to take instead); else ``None``."""
        if dtype != torch.float64 or any(isinstance(s, AdapterSource) for s in sources):
            return None
        return cls(cpu)

    def add(self, step: Step, sources: list[Source], written: torch.Tensor) -> bool:
        """Hold ``step`` back if one call can compute it; ``False`` (nothing held) if not."""
        if step.rows is not None or step.sharded or not step.method.streaming:
            return False
        if is_dtensor(written) or not written.is_contiguous():
            return False
        # contiguous tensors as they are: a call needs only their addresses and lengths
        if written.is_cuda:
            if self.loop is None:
                self.loop = gpu_loop()  # Triton is imported only once a GPU tensor is merged
                if self.loop is None:
                    return False
            inputs = [sources[i].get(step.name) for i in step.contributors]
            if not self.loop.batchable(written, inputs):
                return False
            reads = self._ordered(written, inputs)
            if written.numel() >= self.ALONE:
                self.loop.combine(written.view(-1), inputs, step.coefficients, step.divisor)
                return True  # after every held step it depends on (see _ordered)
            limits = (self.STEPS, self.ELEMENTS)
        elif self.cpu and 0 < written.numel() < self.CPU_ALONE:
            inputs = [sources[i].get(step.name) for i in step.contributors]
            if len(inputs) > fastloop.MAX_INPUTS or not all(map(plain, (written, *inputs))):
                return False
            reads = self._ordered(written, inputs)
            limits = (self.CPU_STEPS, self.ELEMENTS)
        else:
            return False
        self.writes.add(written.data_ptr())
        self.reads.update(reads)
        key = (
            written.device,
            written.dtype,
            tuple(t.dtype for t in inputs),
            tuple(step.coefficients),
            step.divisor,
        )
        targets, inputs_of = self.groups.setdefault(key, ([], []))
        targets.append(written)
        inputs_of.append(inputs)
        self.elements += written.numel()
        if len(targets) >= limits[0] or self.elements >= limits[1]:
            self.flush()
        return True

    def _ordered(self, written: torch.Tensor, inputs: list[torch.Tensor]) -> list[int]:
        """Compute what is held first if this step reads what a held step writes or writes what
        one reads; return the addresses it reads (its own destination aside: a step may write
        where it reads, element by element)."""
        target = written.data_ptr()
        reads = [a for a in map(torch.Tensor.data_ptr, inputs) if a != target]
        if target in self.reads or not self.writes.isdisjoint(reads):
            self.flush()
        return reads

    def flush(self) -> None:
        """Compute every held step, in the order the groups were started."""
        for (device, dtype, _, coefficients, divisor), (targets, inputs_of) in self.groups.items():
            if device.type == "cuda":
                tables = self.loop.batch(targets, inputs_of)
                self.loop.combine_many(tables, coefficients, divisor)
            else:
                fastloop.combine_many(
                    DTYPE_CODES[dtype],
                    [t.data_ptr() for t in targets],
                    [t.numel() for t in targets],
                    [DTYPE_CODES[t.dtype] for t in inputs_of[0]],
                    [
                        [inputs[i].data_ptr() for inputs in inputs_of]
                        for i in range(len(inputs_of[0]))
                    ],
                    coefficients,
                    divisor,
                )
        self.groups.clear()
        self.elements = 0
        self.writes.clear()
        self.reads.clear()


@contextlib.contextmanager
def _read_ahead(
    steps: Sequence[Step], sources: list[Source], base: Source
) -> Iterator[Readahead | None]:
    """A :class:`~terge.io.readahead.Readahead` over the steps' inputs where any is read lazily
    from a file (the disk then streams while the CPU computes); ``None`` in memory."""
    if not any(isinstance(source, FileSource) for source in (*sources, base)):
        yield None
        return

    def job(step: Step) -> int:
        asked = sum(sources[i].prefetch(step.name) for i in step.contributors)
        if step.uses_base and all(sources[i] is not base for i in step.contributors):
            asked += base.prefetch(step.name)
        return asked

    with Readahead([functools.partial(job, step) for step in steps]) as readahead:
        yield readahead


def _bump_versions(tensors: list[torch.Tensor], steps: Sequence[Step]) -> None:
    """Tell autograd that the tensors were changed in place, as ``copy_`` does: the compiled
    and Triton loops write through raw pointers and bump no version counter, so a graph that
    saved a tensor would silently use its merged values in ``backward()`` instead of raising.
    One call for all of them (bumping a tensor ``copy_`` already bumped is harmless)."""
    if any(step.sharded for step in steps):
        tensors += [local(t) for t in tensors if is_dtensor(t)]
    try:
        torch.autograd.graph.increment_version(tensors)
    except (AttributeError, TypeError):  # an older torch: one tensor at a time
        for tensor in tensors:
            torch._C._increment_version(tensor)


def _computed_ahead(
    steps: Sequence[Step],
    sources: list[Source],
    base: Source,
    destination: Callable[[str], torch.Tensor],
    buffers: ChunkBuffers,
) -> dict[str, torch.Tensor]:
    """The results of the steps whose method is a user's own (which may raise, or return the
    wrong shape), each in a fresh tensor like its destination, before anything is written."""
    ready: dict[str, torch.Tensor] = {}
    for step in steps:
        if not step.method.streaming and not (step.method.builtin and is_registered(step.method)):
            target = destination(step.name)
            fresh = torch.empty_like(target, memory_format=torch.preserve_format)
            run_step(step, sources, base, fresh, buffers)
            ready[step.name] = fresh
    return ready


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) while the base is written in place, then deliver it.

    A signal that arrives meanwhile is recorded; once the block ends the previous handler is
    restored and called with it (Python's raises ``KeyboardInterrupt``), so the interrupt still
    surfaces, after the last write. Only the main thread receives signals; elsewhere, or where
    Python does not own the handler, nothing is held.
    """
    previous = signal.getsignal(signal.SIGINT) if _main_thread() else None
    if previous is None:
        yield
        return
    received: list[Any] = []
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, received[0])
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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
    if step.rows is not None:
        _run_rows(step, sources, base, destination, buffers)
        return
    if step.method.task_vectors and step.uses_base and not step.sharded:
        deltas = [sources[i].delta(step.name, base) for i in step.contributors]
        if any(delta is not None for delta in deltas):
            _run_on_deltas(step, deltas, sources, base, destination, buffers)
            return
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
            list(step.method_weights),
            local(base.get(step.name)).detach() if step.uses_base else None,
            seed,
            scratch=buffers,
            divisor=step.method_divisor,
        )
    ):  # computed straight from the inputs as stored (whole CPU tensors, compiled loops)
        return
    device, dtype = destination.device, buffers.dtype
    stored = local(base.get(step.name)).detach() if step.uses_base else None
    unit = None if layout is not None else _by_chunks(step, destination, inputs, stored)
    if unit is not None:
        _run_chunks(step, inputs, stored, seed, destination, buffers, unit)
        return
    tensors = [t.detach().to(device=device, dtype=dtype) for t in inputs]
    reference = None if stored is None else stored.to(device=device, dtype=dtype)
    result = _called(step, tensors, reference, seed, layout or Layout.whole(destination.shape))
    _check_result(step, result, destination)
    store_whole(destination, result.to(dtype), buffers)


ELEMENTWISE_CHUNK = 1 << 16
"""Elements per chunk of a built-in element-wise method (512 KiB per float64 input): the
inputs are widened to float64 a chunk at a time, so the method runs in cache and its memory is a
few chunks, not a float64 copy of every model's tensor."""


def _by_chunks(
    step: Step,
    destination: torch.Tensor,
    inputs: list[torch.Tensor],
    stored: torch.Tensor | None,
) -> int | None:
    """How many elements of the flattened tensors make one unit of a step run chunk by chunk:
    1 for a built-in method whose entries each depend on the same entry alone and draw nothing
    (a random draw is keyed by position in the whole tensor), a row's for one whose rows depend
    on the same rows alone (:attr:`Method.rowwise`, told where each block of rows lies); over
    contiguous tensors of one shape larger than one chunk. ``None``: run on the whole tensors."""
    method = step.method
    tensors = [destination, *inputs, *([] if stored is None else [stored])]
    if not (
        method.builtin
        and destination.numel() > chunk_for(destination.device, ELEMENTWISE_CHUNK)
        and all(t.is_contiguous() and t.shape == destination.shape for t in tensors)
    ):
        return None
    if method.elementwise and not method.random:
        return 1
    if method.rowwise and destination.dim() >= 2 and destination.shape[0] > 1:
        return destination.numel() // destination.shape[0]
    return None


def _run_chunks(
    step: Step,
    inputs: list[torch.Tensor],
    stored: torch.Tensor | None,
    seed: int | None,
    destination: torch.Tensor,
    buffers: ChunkBuffers,
    unit: int,
) -> None:
    """The method over consecutive chunks of the flattened tensors (whole rows of ``unit``
    elements), each widened to the accumulation dtype and rounded once into its place, its
    :class:`Layout` saying where it lies in the whole: the same entries as on the whole."""
    dtype = buffers.dtype
    shape = tuple(destination.shape)
    flat = destination.view(-1)
    sources = [t.detach().reshape(-1) for t in inputs]
    reference = None if stored is None else stored.reshape(-1)
    step_size = max(1, chunk_for(flat.device, ELEMENTWISE_CHUNK) // unit) * unit
    for start in range(0, flat.numel(), step_size):
        stop = min(start + step_size, flat.numel())
        part = flat[start:stop]
        tensors = [x[start:stop].to(device=flat.device, dtype=dtype) for x in sources]
        base = None if reference is None else reference[start:stop].to(flat.device, dtype)
        if unit == 1:
            layout = Layout.whole(part.shape)
        else:  # a block of whole rows, shaped as the rows are
            local = ((stop - start) // unit, *shape[1:])
            tensors = [t.view(local) for t in tensors]
            base = None if base is None else base.view(local)
            layout = Layout(shape, local, (start // unit, *([0] * (len(shape) - 1))))
        result = _called(step, tensors, base, seed, layout)
        _check_result(step, result, part.view(tensors[0].shape))
        store_whole(part, result.reshape(-1).to(dtype), buffers)


def _run_on_deltas(
    step: Step,
    deltas: list[torch.Tensor | None],
    sources: list[Source],
    base: Source,
    destination: torch.Tensor,
    buffers: ChunkBuffers,
) -> None:
    """A task-vector step where some contributors are adapters over this very base: their
    deltas are the task vectors themselves (no ``(base + delta) - base``), the others' are
    subtracted; the method runs on the task vectors over a zero base, and the base is added
    once at the end (every task-vector method is ``base + f(task vectors)``)."""
    device, dtype = destination.device, buffers.dtype
    reference = base.get(step.name).detach().to(device=device, dtype=dtype)
    taus = [
        delta.to(device=device, dtype=dtype)
        if delta is not None
        else sources[i].get(step.name).detach().to(device=device, dtype=dtype) - reference
        for i, delta in zip(step.contributors, deltas)
    ]
    seed = derive_seed(step.seed or 0, step.name) if step.method.random else None
    zero = torch.zeros_like(reference)
    result = _called(step, taus, zero, seed, Layout.whole(destination.shape))
    _check_result(step, result, destination)
    store_whole(destination, result.to(dtype).add_(reference), buffers)


def _called(
    step: Step,
    tensors: list[torch.Tensor],
    reference: torch.Tensor | None,
    seed: int | None,
    layout: Layout,
) -> Any:
    """The step's method called on whole tensors; a user's method's error wrapped in context."""
    try:
        return step.method(
            tensors,
            list(step.method_weights),
            reference,
            seed,
            layout,
            name=step.name,
            contributors=step.contributors,
            divisor=step.method_divisor,
        )
    except Exception as error:
        if step.method.builtin:
            raise
        raise MethodError(
            f"the merge method {step.method.name!r} raised {type(error).__name__}: {error} while "
            f"merging the parameter '{step.name}' of models {list(step.contributors)}"
            f"{' with the base' if step.uses_base else ''} (the original error is chained as "
            "its cause)."
        ) from error


def _check_result(step: Step, result: Any, destination: torch.Tensor) -> None:
    """A method's result must be a real tensor of the destination's shape."""
    if not isinstance(result, torch.Tensor) or result.shape != destination.shape:
        got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        raise MethodResultError(
            f"the merge method {step.method.name!r} returned {got} for the parameter "
            f"'{step.name}', which has shape {tuple(destination.shape)}; a method must return a "
            "tensor of the same shape as its inputs."
        )
    if result.is_complex():
        raise MethodResultError(
            f"the merge method {step.method.name!r} returned a {result.dtype} tensor for the "
            f"parameter '{step.name}'; a method must return real numbers."
        )


ROW_CHUNK_ELEMENTS = 1 << 18
"""Elements of one chunk of rows that a linear method merges at a time (2 MiB in float64):
each model's rows are gathered into memory of their own, so the chunk bounds that memory."""


def _run_rows(
    step: Step,
    sources: list[Source],
    base: Source,
    destination: torch.Tensor,
    buffers: ChunkBuffers,
) -> None:
    """Compute a vocabulary tensor group by group: each group's rows gathered from the models
    holding them, merged (a linear method chunk by chunk, others over the whole group) and
    scattered into the output rows; a row one model holds is copied, rounded once. Rows that
    lie in one run (the usual case: the tokens every model has, at the same ids) are read and
    written as views, with no gathering."""
    assert step.rows is not None
    name = step.name
    width = max(1, destination[0].numel()) if destination.shape[0] else 1
    for group in step.rows.groups:
        linear = group.copied or step.method.streaming
        size = max(1, ROW_CHUNK_ELEMENTS // width) if linear else group.out_rows.numel()
        for start in range(0, group.out_rows.numel(), size):
            out_rows = group.out_rows[start : start + size]
            picked = [rows[start : start + size] for rows in group.rows]
            into = _rows_of(destination, out_rows, gather=False)
            if group.copied:
                rows = _rows_of(sources[group.models[0]].get(name), picked[0])
                if into is None:
                    destination.index_copy_(0, out_rows, rows.to(destination.dtype))
                else:
                    into.copy_(rows)
                continue
            views: list[Source] = list(sources)
            for model, rows in zip(group.models, picked):
                views[model] = Source({name: _rows_of(sources[model].get(name), rows)})
            reference = base
            if group.base_rows is not None:
                base_rows = group.base_rows[start : start + size]
                reference = Source({name: _rows_of(base.get(name), base_rows)})
            part = dataclasses.replace(
                step,
                contributors=group.models,
                weights=group.weights,
                coefficients=group.coefficients,
                divisor=group.divisor,
                rows=None,
            )
            if into is not None:
                run_step(part, views, reference, into, buffers)
                continue
            merged = torch.empty(
                (out_rows.numel(), *destination.shape[1:]), dtype=destination.dtype
            )
            run_step(part, views, reference, merged, buffers)
            destination.index_copy_(0, out_rows, merged)


def _rows_of(tensor: torch.Tensor, rows: torch.Tensor, gather: bool = True) -> Any:
    """``tensor``'s ``rows``: a view where they are one ascending run, else (``gather``) a
    gathered copy, or ``None``."""
    count = rows.numel()
    first = int(rows[0]) if count else 0
    if count and int(rows[-1]) - first + 1 == count and bool((rows.diff() == 1).all()):
        return tensor.narrow(0, first, count)
    return tensor.index_select(0, rows) if gather else None


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
