"""A running average of a model as it trains: an EMA or an equal-weight (SWA) mean, exact,
resumable, shard by shard.

:class:`Average` keeps a *shadow* copy of a model's parameters and persistent buffers and folds
the model into it on :meth:`Average.update`:

- ``kind="ema"``: ``avg = decay * avg + (1 - decay) * x`` (``torch.optim.swa_utils``'
  ``get_ema_multi_avg_fn``, timm's ``ModelEmaV3``), with an optional warm-up of the decay;
- ``kind="equal"``: ``avg = (n * avg + x) / (n + 1)``, the mean of every model folded in so far
  (SWA, ``AveragedModel``'s default).

Each update is one linear combine per tensor through :mod:`terge.kernels`: products and sums in
float64, the result rounded once into the shadow's dtype (``shadow_dtype``, the model's by
default). Small CPU tensors go through the compiled loop many at a time
(:func:`terge.kernels.fastloop.combine_many`), so a model of thousands of small tensors pays no
Python call per tensor; large ones are split between threads; CUDA tensors run the fused GPU
loop; a DTensor (FSDP2's ``fully_shard``) is averaged in its local shard, never gathered.

The first update that counts (at step ``start_at``, then every ``every`` steps) copies the model;
later ones average. :meth:`Average.state_dict` holds the shadow and the counters, so a resumed
run's average equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import AveragingError
from .kernels import ChunkBuffers, gpu_loop, linear_combine
from .kernels import cpu as kernel_cpu
from .kernels import fastloop as fastloop_module
from .sharding import Sharding, local, sharding_of
from .sources import unwrap, view_key

__all__ = ["Average"]

KINDS = ("ema", "equal")
"""``ema``: exponential moving average; ``equal``: the mean of every model folded in (SWA)."""
BUFFER_MODES = ("average", "copy")
"""Floating-point buffers (BatchNorm statistics) averaged like parameters, or copied."""
WARMUPS = (None, "power", "tf")
"""The EMA decay's warm-up: none; timm's ``1 - (1 + n / gamma) ** -power``; TensorFlow's
``(1 + n) / (10 + n)``; ``n`` the number of updates averaged so far."""
FORMAT = "terge.Average/1"
"""The ``format`` entry of :meth:`Average.state_dict`."""

Slot = tuple[dict[str, Any], str]
"""Where a tensor lives in a module: its ``_parameters`` or ``_buffers`` dict and its key."""


@dataclass
class _Entry:
    """One distinct tensor of the model (tied names share one) and its shadow."""

    name: str
    aliases: list[str]
    shape: torch.Size
    parameter: bool
    averaged: bool
    """Folded into the average (parameters, floating buffers in ``average`` mode); else copied."""
    shadow: torch.Tensor
    """A plain tensor: the whole average, or this rank's shard of it for a DTensor."""
    sharding: Sharding | None
    slot: Slot | None = None


@dataclass
class _Plan:
    """How one update runs, worked out from the model's tensors and kept while their addresses
    stay the same (checked in one pass of ``data_ptr()`` calls)."""

    pointers: list[int]
    """The model tensors' addresses the plan was made for, in ``batched`` order."""
    batched: list[tuple[int, int, int, int, list[int], list[int]]]
    """``(first, stop, out_code, in_code, shadow addresses, lengths)`` per dtype pair:
    the ``batched`` entries ``first:stop``, through one compiled call."""
    parts: list[list[tuple[int, int]]]
    """Each batch's split between threads."""
    single: list[_Entry] = field(default_factory=list)
    """Averaged one by one (large, sharded, GPU or other-device tensors)."""
    copied: list[_Entry] = field(default_factory=list)
    """Copied from the model (integer buffers, buffers in ``copy`` mode) one by one: sharded,
    or on another device or in another dtype than their shadows."""
    copy_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = field(
        default_factory=lambda: ([], [])
    )
    """The other copied entries: their shadows and the model's tensors (kept: their addresses
    are checked with the batched ones'), copied in one ``_foreach_copy_``."""
    batched_entries: list[_Entry] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    """Where the batched entries' tensors live, to read their addresses quickly."""
    gpu: list[_GpuGroup] = field(default_factory=list)
    """GPU tensors batched by device and dtype pair, one Triton launch each."""


@dataclass
class _GpuGroup:
    """GPU entries sharing a device and dtype pair, averaged in one launch of the Triton loop
    (one launch per tensor costs tens of microseconds of Python each)."""

    loop: Any
    """The Triton loop module."""
    shadows: list[torch.Tensor]
    data: list[torch.Tensor]
    tables: dict[bool, Any] = field(default_factory=dict)
    """The launch tables with and without the shadow as an input, made on first use."""

    def run(self, coefficients: list[float], divisor: float | None, with_shadow: bool) -> None:
        loop = self.loop
        tables = self.tables.get(with_shadow)
        if tables is None:
            sources = [[s, d] if with_shadow else [d] for s, d in zip(self.shadows, self.data)]
            tables = self.tables[with_shadow] = loop.batch(self.shadows, sources)
        loop.combine_many(tables, coefficients, divisor)


def _named_tensors(model: torch.nn.Module) -> Iterator[tuple[str, Slot, torch.Tensor, bool]]:
    """``(name, slot, tensor, is_parameter)`` for every parameter and persistent buffer, a tied
    tensor under each of its names."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for key, tensor in module._parameters.items():
            if tensor is not None:
                yield dot + key, (module._parameters, key), tensor, True
        skipped = module._non_persistent_buffers_set
        for key, tensor in module._buffers.items():
            if tensor is not None and key not in skipped:
                yield dot + key, (module._buffers, key), tensor, False


class Average:
    """A running average of ``model``'s parameters and persistent buffers, updated in place.

    ``kind``: ``"ema"`` (``decay``, optionally warmed up: ``warmup="power"`` is timm's
    ``ModelEmaV3`` with ``warmup_gamma``/``warmup_power``, ``warmup="tf"`` TensorFlow's
    ``min(decay, (1 + n) / (10 + n))``; the result is kept at or above ``min_decay``) or
    ``"equal"`` (the mean of every model folded in). :meth:`update` counts steps; it folds the
    model in at step ``start_at`` and every ``every`` steps after (timm's ``update_after_step``,
    Lightning's ``update_starting_at_step``/``update_every_n_steps``); the first that does copies
    it.

    ``buffers``: floating-point buffers (BatchNorm's running statistics) are ``"average"``-d like
    parameters (timm, ``AveragedModel(use_buffers=True)``) or ``"copy"``-ed from the model at each
    update (timm's ``exclude_buffers``; recompute them with :meth:`update_bn`). Integer buffers
    (``num_batches_tracked``) are always copied.

    ``shadow_dtype`` keeps the average in another floating dtype than the model's: a bfloat16
    average loses every update smaller than half its last bit (with ``decay=0.999`` that is most
    of them), so train in bfloat16 with ``shadow_dtype=torch.float32``. ``device`` keeps it on
    another device (``"cpu"`` for a model on a GPU, as timm allows): each update reads the model
    across. A sharded model (FSDP2, DTensors) keeps each rank's shard of the average with the rank.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kind: str = "ema",
        *,
        decay: float = 0.999,
        warmup: str | None = None,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        min_decay: float = 0.0,
        start_at: int = 0,
        every: int = 1,
        buffers: str = "average",
        shadow_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise AveragingError(
                f"Average needs the torch.nn.Module that trains, got {type(model).__name__}."
            )
        _check_settings(kind, decay, warmup, warmup_gamma, warmup_power, min_decay, start_at, every)
        if buffers not in BUFFER_MODES:
            raise AveragingError(
                f"buffers={buffers!r} is not one of {BUFFER_MODES}: 'average' folds floating "
                "buffers (BatchNorm statistics) into the average, 'copy' copies them."
            )
        if shadow_dtype is not None and (
            not isinstance(shadow_dtype, torch.dtype) or not shadow_dtype.is_floating_point
        ):
            raise AveragingError(
                f"shadow_dtype={shadow_dtype!r} is not a floating torch dtype; pass e.g. "
                "torch.float32 or torch.float64, or None to keep each tensor's own dtype."
            )
        self.kind = kind
        self.decay = float(decay)
        self.warmup = warmup
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.min_decay = float(min_decay)
        self.start_at = int(start_at)
        self.every = int(every)
        self.buffers = buffers
        self.shadow_dtype = shadow_dtype
        self.device = torch.device(device) if device is not None else None
        self.step = 0
        """Calls of :meth:`update` so far (skipped ones included)."""
        self.count = 0
        """Models folded into the average so far (the first one copied)."""
        self._scratch = ChunkBuffers(torch.float64)
        self._entries = self._make_entries(unwrap(model))
        self._bound: weakref.ref[torch.nn.Module] | None = None
        self._plan: _Plan | None = None
        self._bind(model)

    # --- settings --------------------------------------------------------------------------------

    def decay_at(self, count: int) -> float:
        """The EMA decay of the update that folds in the model after ``count`` already averaged
        (0 copies: the first model is the average)."""
        if count <= 0:
            return 0.0
        if self.warmup == "power":
            decay = 1 - (1 + count / self.warmup_gamma) ** -self.warmup_power
        elif self.warmup == "tf":
            decay = (1 + count) / (10 + count)
        else:
            return max(self.decay, self.min_decay)
        return max(min(decay, self.decay), self.min_decay)

    def will_update(self, step: int | None = None) -> bool:
        """Whether :meth:`update` at ``step`` (the next one by default) folds the model in."""
        step = self.step if step is None else step
        return step >= self.start_at and (step - self.start_at) % self.every == 0

    # --- the model's tensors ---------------------------------------------------------------------

    def _make_entries(self, model: torch.nn.Module) -> list[_Entry]:
        """One entry per distinct tensor, its shadow a fresh copy of the model's (local) tensor."""
        entries: list[_Entry] = []
        by_view: dict[Any, _Entry] = {}
        for name, _, tensor, is_parameter in _named_tensors(model):
            key = view_key(tensor)
            seen = by_view.get(key)
            if seen is not None:
                seen.aliases.append(name)
                continue
            floating = tensor.dtype.is_floating_point
            averaged = floating and (is_parameter or self.buffers == "average")
            if tensor.dtype.is_complex and (is_parameter or self.buffers == "average"):
                raise AveragingError(
                    f"the model's tensor '{name}' is {tensor.dtype}; Average averages real "
                    "floating-point tensors only. Hold it as a real tensor with a last dimension "
                    "of 2 (torch.view_as_real) to average it."
                )
            data = local(tensor.detach())
            if data.device.type == "meta":
                raise AveragingError(
                    f"the model's tensor '{name}' is on the meta device and holds no values; "
                    "create the Average after the model's weights are loaded (to_empty() and "
                    "initialisation, or load_state_dict())."
                )
            dtype = self.shadow_dtype if floating and self.shadow_dtype is not None else data.dtype
            shadow = torch.empty(
                data.shape, dtype=dtype, device=self.device or data.device
            ).contiguous()
            entry = _Entry(
                name, [], tensor.shape, is_parameter, averaged, shadow, sharding_of(tensor)
            )
            self._write(entry.shadow, data)
            by_view[key] = entry
            entries.append(entry)
        if not entries:
            raise AveragingError(
                f"the model ({type(model).__name__}) has no parameters or persistent buffers to "
                "average."
            )
        return entries

    def _bind(self, model: torch.nn.Module) -> None:
        """Find where each entry's tensor lives in ``model`` (checked against the average)."""
        inner = unwrap(model)
        if self._bound is not None and self._bound() is inner:
            return
        found: dict[str, tuple[Slot, torch.Tensor]] = {}
        for name, slot, tensor, _ in _named_tensors(inner):
            found.setdefault(name, (slot, tensor))
        names = [n for e in self._entries for n in (e.name, *e.aliases)]
        missing = [n for n in names if n not in found]
        extra = [n for n in found if n not in set(names)]
        if missing or extra:
            raise AveragingError(
                f"the model ({type(inner).__name__}) does not hold the tensors this average was "
                f"made of: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, not in "
                f"the average {extra[:5]}{' ...' if len(extra) > 5 else ''}. Pass the model the "
                "Average was created from (or one of the same architecture)."
            )
        for entry in self._entries:
            slot, tensor = found[entry.name]
            self._check_tensor(entry, tensor)
            entry.slot = slot
        self._bound = weakref.ref(inner)
        self._plan = None

    def _check_tensor(self, entry: _Entry, tensor: torch.Tensor) -> torch.Tensor:
        """The model's tensor for ``entry``, local shard for a DTensor, checked to fit the shadow
        (its shape, its sharding) before anything is written."""
        sharding = sharding_of(tensor)
        data = local(tensor.detach())
        if tuple(tensor.shape) != tuple(entry.shape) or data.shape != entry.shadow.shape:
            raise AveragingError(
                f"the model's tensor '{entry.name}' has shape {tuple(tensor.shape)} (local "
                f"{tuple(data.shape)}), but the average holds {tuple(entry.shape)} (local "
                f"{tuple(entry.shadow.shape)}); create the Average from the model as it trains "
                "(after fully_shard, if it is sharded), and pass that model to update()."
            )
        if (sharding is None) != (entry.sharding is None) or (
            sharding is not None
            and entry.sharding is not None
            and tuple(sharding.placements) != tuple(entry.sharding.placements)
        ):
            raise AveragingError(
                f"the model's tensor '{entry.name}' is sharded as {sharding} but the average as "
                f"{entry.sharding}; create the Average after the model is sharded (fully_shard), "
                "from the model that trains."
            )
        if entry.averaged and not (data.dtype.is_floating_point or data.dtype.is_complex):
            raise AveragingError(
                f"the model's tensor '{entry.name}' is now {data.dtype}, but the average holds "
                "floating values for it; keep the model's dtypes, or create a new Average."
            )
        return data

    def _tensor(self, entry: _Entry) -> torch.Tensor:
        assert entry.slot is not None  # bound in __init__ and by every update()
        owner, key = entry.slot
        tensor = owner.get(key)
        if tensor is None:
            raise AveragingError(
                f"the model's tensor '{entry.name}' was removed (set to None); pass the model the "
                "Average was created from."
            )
        return tensor

    # --- updating --------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> bool:
        """Count a step and, when it is due (``start_at``, ``every``), fold ``model`` into the
        average in place; return whether it did. The first fold copies the model."""
        if not self.will_update():
            self.step += 1
            return False
        self._bind(model)
        if self.count == 0:
            coefficients, divisor, with_shadow = [1.0], None, False
        elif self.kind == "ema":
            decay = self.decay_at(self.count)
            coefficients, divisor, with_shadow = [decay, 1.0 - decay], None, True
        else:
            n = float(self.count)
            coefficients, divisor, with_shadow = [n, 1.0], n + 1.0, True
        plan = self._current_plan()
        self._run(plan, coefficients, divisor, with_shadow)
        self.step += 1
        self.count += 1
        return True

    def _current_plan(self) -> _Plan:
        """The cached plan while the model's batched and copied tensors keep their addresses;
        else a new one, every tensor checked (before anything is written)."""
        plan = self._plan
        if plan is not None:
            try:
                pointers = [owner[key].data_ptr() for owner, key in plan.slots]
            except (AttributeError, KeyError, RuntimeError, NotImplementedError):
                pointers = None  # a tensor removed or now a DTensor: plan again (and say why)
            if pointers == plan.pointers:
                return plan
        plan = self._plan = self._make_plan()
        return plan

    def _make_plan(self) -> _Plan:
        batchable = fastloop_module.available()
        groups: dict[tuple[int, int], list[tuple[_Entry, torch.Tensor]]] = {}
        gpu_groups: dict[tuple[Any, ...], list[tuple[_Entry, torch.Tensor]]] = {}
        single: list[_Entry] = []
        copied: list[_Entry] = []
        copy_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        copy_slots: list[Slot] = []
        checked = [(e, self._check_tensor(e, self._tensor(e))) for e in self._entries]
        # Triton is imported only for a model on a GPU (a CPU average never pays for it)
        loop = gpu_loop() if any(data.is_cuda for _, data in checked) else None
        # Batched tensors are shared out between the threads whole, one call for all: a tensor
        # is batched unless it is large enough to unbalance the threads (then it is split).
        total = sum(data.numel() for entry, data in checked if entry.averaged)
        largest = max(kernel_cpu.PER_THREAD, total // (4 * max(1, torch.get_num_threads())))
        for entry, data in checked:
            if not entry.averaged:
                if (
                    entry.sharding is None
                    and data.device == entry.shadow.device
                    and data.dtype == entry.shadow.dtype
                    and entry.slot is not None
                ):
                    copy_pairs[0].append(entry.shadow)
                    copy_pairs[1].append(data)
                    copy_slots.append(entry.slot)
                else:
                    copied.append(entry)
            elif (
                batchable
                and entry.sharding is None
                and data.numel() < largest
                and data.numel() > 0
                and kernel_cpu.plain(data)
                and kernel_cpu.plain(entry.shadow)
            ):
                codes = kernel_cpu.DTYPE_CODES
                key = (codes[entry.shadow.dtype], codes[data.dtype])
                groups.setdefault(key, []).append((entry, data))
            elif (
                loop is not None
                and entry.sharding is None
                and data.is_cuda
                and loop.batchable(entry.shadow, [entry.shadow, data])
            ):
                pair = (data.device, entry.shadow.dtype, data.dtype)
                gpu_groups.setdefault(pair, []).append((entry, data))
            else:
                single.append(entry)
        batched: list[tuple[int, int, int, int, list[int], list[int]]] = []
        parts: list[list[tuple[int, int]]] = []
        batched_entries: list[_Entry] = []
        pointers: list[int] = []
        for (out_code, in_code), members in groups.items():
            first = len(batched_entries)
            batched_entries += [entry for entry, _ in members]
            pointers += [data.data_ptr() for _, data in members]
            lengths = [data.numel() for _, data in members]
            outs = [entry.shadow.data_ptr() for entry, _ in members]
            batched.append((first, len(batched_entries), out_code, in_code, outs, lengths))
            parts.append(fastloop_module.partition(lengths))
        gpu: list[_GpuGroup] = []
        for members in gpu_groups.values():
            batched_entries += [entry for entry, _ in members]
            pointers += [data.data_ptr() for _, data in members]
            shadows = [entry.shadow for entry, _ in members]
            gpu.append(_GpuGroup(loop, shadows, [d for _, d in members]))
        slots = [entry.slot for entry in batched_entries if entry.slot is not None]
        # the copied tensors' addresses are checked after the batched ones'
        pointers += [data.data_ptr() for data in copy_pairs[1]]
        slots += copy_slots
        return _Plan(
            pointers, batched, parts, single, copied, copy_pairs, batched_entries, slots, gpu
        )

    def _run(
        self, plan: _Plan, coefficients: list[float], divisor: float | None, with_shadow: bool
    ) -> None:
        for (first, stop, out_code, in_code, outs, lengths), part in zip(plan.batched, plan.parts):
            models = plan.pointers[first:stop]
            if with_shadow:
                inputs, codes = [outs, models], [out_code, in_code]
            else:
                inputs, codes = [models], [in_code]
            fastloop_module.combine_many(
                out_code, outs, lengths, codes, inputs, coefficients, divisor, part
            )
        for group in plan.gpu:
            group.run(coefficients, divisor, with_shadow)
        for entry in plan.single:
            data = local(self._tensor(entry).detach())
            if data.device != entry.shadow.device:
                data = data.to(entry.shadow.device)
            sources = [entry.shadow, data] if with_shadow else [data]
            linear_combine(entry.shadow, sources, coefficients, self._scratch, divisor)
        if plan.copy_pairs[0]:
            torch._foreach_copy_(*plan.copy_pairs)
        self._copy([e.shadow for e in plan.copied], [self._tensor(e) for e in plan.copied])

    @staticmethod
    def _copy(destinations: list[torch.Tensor], tensors: Iterable[torch.Tensor]) -> None:
        """Copy each tensor (its local shard) into its destination, in one call for those that
        share a device and dtype with theirs."""
        together: list[tuple[torch.Tensor, torch.Tensor]] = []
        for destination, tensor in zip(destinations, tensors):
            source = local(tensor.detach())
            if destination.device == source.device and destination.dtype == source.dtype:
                together.append((destination, source))
            else:
                destination.copy_(source)
        if together:
            torch._foreach_copy_([d for d, _ in together], [s for _, s in together])

    def _write(self, destination: torch.Tensor, value: torch.Tensor) -> None:
        """``destination = value`` rounded once (float64 to bfloat16 included)."""
        if not (destination.dtype.is_floating_point and value.dtype.is_floating_point):
            destination.copy_(value)
            return
        if value.device != destination.device:
            value = value.to(destination.device)
        linear_combine(destination, [value], [1.0], self._scratch)

    # --- using the average -----------------------------------------------------------------------

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Write the average into ``model``'s own tensors (rounded once into their dtypes)."""
        self._bind(model)
        for entry in self._entries:
            self._check_tensor(entry, self._tensor(entry))
        for entry in self._entries:
            self._write(local(self._tensor(entry).detach()), entry.shadow)

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Within the block the model holds the average; its own weights come back after, bit
        for bit, even if the block raises. Costs a copy of the model's tensors (on their device)
        while it lasts."""
        self._bind(model)
        with torch.no_grad():
            saved = [local(self._tensor(e).detach()).clone() for e in self._entries]
            self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for entry, values in zip(self._entries, saved):
                    local(self._tensor(entry).detach()).copy_(values)

    @torch.no_grad()
    def update_bn(
        self,
        loader: Iterable[Any],
        model: torch.nn.Module,
        device: torch.device | str | None = None,
    ) -> None:
        """Recompute the average's BatchNorm statistics: run ``loader`` through ``model``
        holding the averaged weights (``torch.optim.swa_utils.update_bn``) and keep the
        statistics it finds in the average; the model's own weights and buffers come back."""
        from torch.optim.swa_utils import update_bn

        with self.swapped_into(model):
            update_bn(loader, model, torch.device(device) if device is not None else None)
            for entry in self._entries:
                if not entry.parameter:
                    self._write(entry.shadow, local(self._tensor(entry).detach()))

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights named as ``model.state_dict()`` names them (tied names too), in
        the model's dtypes, rounded once: what to save as the EMA model. A sharded model's are
        DTensors like its own."""
        result: dict[str, torch.Tensor] = {}
        for entry in self._entries:
            tensor = self._tensor(entry)
            data = local(tensor.detach())
            value = torch.empty_like(data, memory_format=torch.contiguous_format)
            self._write(value, entry.shadow)
            out = self._as_sharded(value, entry, tensor)
            for name in (entry.name, *entry.aliases):
                result[name] = out
        return result

    @staticmethod
    def _as_sharded(value: torch.Tensor, entry: _Entry, like: torch.Tensor | None) -> torch.Tensor:
        """``value`` as a DTensor placed like the model's tensor, when that is sharded and on the
        same kind of device; else the plain (local) tensor."""
        if entry.sharding is None or value.device.type != entry.sharding.mesh.device_type:
            return value
        from torch.distributed.tensor import DTensor

        stride = like.stride() if like is not None else None
        return DTensor.from_local(
            value,
            entry.sharding.mesh,
            entry.sharding.placements,
            run_check=False,
            shape=entry.shape,
            stride=stride,
        )

    # --- saving and restoring --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The shadow (its own tensors, not copies: save it before the next update) and the
        counters and settings: :meth:`load_state_dict` resumes exactly where this left off. A
        sharded model's shadow entries are DTensors (``torch.distributed.checkpoint`` saves them)
        or, kept on another device, each rank's local shard."""
        return {
            "format": FORMAT,
            "kind": self.kind,
            "step": self.step,
            "count": self.count,
            "settings": {
                "decay": self.decay,
                "warmup": self.warmup,
                "warmup_gamma": self.warmup_gamma,
                "warmup_power": self.warmup_power,
                "min_decay": self.min_decay,
                "start_at": self.start_at,
                "every": self.every,
                "buffers": self.buffers,
            },
            "shadow": {
                e.name: self._as_sharded(
                    e.shadow, e, self._tensor(e) if e.slot and e.sharding is not None else None
                )
                for e in self._entries
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore an average saved by :meth:`state_dict` (its counters, settings and shadow,
        copied into this average's tensors); everything is checked before anything changes."""
        if not isinstance(state, Mapping) or state.get("format") != FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise AveragingError(
                f"the state given to Average.load_state_dict has format {got!r}, not {FORMAT!r}; "
                "pass what Average.state_dict() returned."
            )
        if state.get("kind") != self.kind:
            raise AveragingError(
                f"the saved average is kind={state.get('kind')!r} but this one "
                f"kind={self.kind!r}; create the Average with kind={state.get('kind')!r} to "
                "resume it."
            )
        shadow = state.get("shadow")
        if not isinstance(shadow, Mapping):
            raise AveragingError(
                f"the saved average's shadow is {type(shadow).__name__}, not a mapping of "
                "tensors; pass what Average.state_dict() returned."
            )
        names = [e.name for e in self._entries]
        if set(shadow) != set(names):
            missing = sorted(set(names) - set(shadow))[:5]
            extra = sorted(set(shadow) - set(names))[:5]
            raise AveragingError(
                f"the saved average does not hold this model's tensors: missing {missing}, "
                f"unexpected {extra}; load the state of an average of the same model."
            )
        values = {}
        for entry in self._entries:
            if not isinstance(shadow[entry.name], torch.Tensor):
                raise AveragingError(
                    f"the saved average's '{entry.name}' is {type(shadow[entry.name]).__name__}, "
                    "not a tensor; pass what Average.state_dict() returned."
                )
            value = local(shadow[entry.name])
            if tuple(value.shape) != tuple(entry.shadow.shape):
                raise AveragingError(
                    f"the saved average's '{entry.name}' has shape {tuple(value.shape)}, this "
                    f"average's {tuple(entry.shadow.shape)} (a shard of a sharded model is saved "
                    "and loaded by its own rank)."
                )
            values[entry.name] = value
        settings = dict(state.get("settings", {}))
        if settings.get("buffers", self.buffers) != self.buffers:
            raise AveragingError(
                f"the saved average has buffers={settings['buffers']!r} but this one "
                f"buffers={self.buffers!r}; create the Average with buffers="
                f"{settings['buffers']!r} to resume it."
            )
        keys = (
            "decay",
            "warmup",
            "warmup_gamma",
            "warmup_power",
            "min_decay",
            "start_at",
            "every",
        )
        saved = {key: settings.get(key, getattr(self, key)) for key in keys}
        step: Any = state.get("step")
        count: Any = state.get("count")
        try:
            _check_settings(self.kind, *saved.values())
            if not (_is_int(step) and _is_int(count) and 0 <= count <= step):
                raise AveragingError(
                    f"step={step!r} and count={count!r} must be whole numbers, count at most step."
                )
        except AveragingError as error:
            raise AveragingError(
                f"the saved average does not hold valid settings: {error} Pass what "
                "Average.state_dict() returned."
            ) from None
        for entry in self._entries:
            value = values[entry.name]
            if value.dtype == entry.shadow.dtype:
                entry.shadow.copy_(value)
            else:
                self._write(entry.shadow, value)
        for key, value in saved.items():
            setattr(self, key, value if key in ("warmup", "start_at", "every") else float(value))
        self.step = int(step)
        self.count = int(count)
        self._plan = None

    def __repr__(self) -> str:
        what = f"decay={self.decay}" if self.kind == "ema" else "equal weights"
        return (
            f"Average({self.kind}, {what}, step={self.step}, count={self.count}, "
            f"{len(self._entries)} tensors)"
        )


def _check_settings(
    kind: str,
    decay: float,
    warmup: str | None,
    gamma: float,
    power: float,
    min_decay: float,
    start_at: int,
    every: int,
) -> None:
    """Raise :class:`AveragingError` for a setting out of range, naming it and its range."""
    if kind not in KINDS:
        raise AveragingError(
            f"kind={kind!r} is not one of {KINDS}: 'ema' for an exponential moving average, "
            "'equal' for the mean of every update (SWA)."
        )
    checks: list[tuple[bool, str]] = [
        (
            isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0 and not math.isnan(decay),
            f"decay={decay!r} must be a number between 0 and 1 (e.g. 0.999)",
        ),
        (warmup in WARMUPS, f"warmup={warmup!r} must be one of {WARMUPS}"),
        (
            isinstance(gamma, (int, float)) and gamma > 0,
            f"warmup_gamma={gamma!r} must be positive",
        ),
        (
            isinstance(power, (int, float)) and power > 0,
            f"warmup_power={power!r} must be positive",
        ),
        (
            isinstance(min_decay, (int, float)) and 0.0 <= min_decay <= 1.0,
            f"min_decay={min_decay!r} must be between 0 and 1",
        ),
        (
            _is_int(start_at) and start_at >= 0,
            f"start_at={start_at!r} must be a step number, 0 or more",
        ),
        (_is_int(every) and every >= 1, f"every={every!r} must be a whole number, 1 or more"),
    ]
    for ok, message in checks:
        if not ok:
            raise AveragingError(message + ".")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
