"""A uniform view over the things terge merges: modules, state dicts, checkpoint files and PEFT
LoRA adapters (each with its base).

A source lists its tensors' names, shapes and dtypes, and hands out a tensor only when asked.
Tensors that are the same view of the same storage (tied weights) share an ``Entry.key``.

Names are canonical: the prefixes that wrappers add (DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``) are stripped, then a user's ``name_map`` is applied, so a wrapped model's tensors
match an unwrapped one's. ``raw_names`` keeps each canonical name's name in the model itself.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

import torch

from .errors import AdapterError, HubError, MergeArgumentError
from .io.adapters import Adapter, AdapterSpec, is_adapter_folder, resolve_base_path
from .io.hub import HubSnapshot, hub_reference, locate
from .io.training import CheckpointLike, CheckpointSpec, resolved
from .sharding import is_dtensor, sharding_of

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Name prefixes of wrappers, stripped (repeatedly) from every name: DDP and DataParallel's
``module.``, ``torch.compile``'s ``_orig_mod.``."""

NameMap = Callable[[str], str]


def strip_wrappers(name: str) -> str:
    """``name`` without the leading wrapper prefixes (``module.module._orig_mod.x`` -> ``x``)."""
    if not name.startswith(WRAPPER_PREFIXES):
        return name
    while True:
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name = name[len(prefix) :]
                break
        else:
            return name


def renamer(name_map: NameMap | None) -> NameMap:
    """The canonical name of a tensor: wrapper prefixes stripped, then ``name_map`` applied."""
    if name_map is None:
        return strip_wrappers
    if not callable(name_map):
        raise MergeArgumentError(
            f"`name_map` must be a function from a tensor's name to its canonical name (str -> "
            f"str), or None; got {type(name_map).__name__}."
        )

    def rename(name: str) -> str:
        stripped = strip_wrappers(name)
        try:
            mapped = name_map(stripped)
        except Exception as error:
            raise MergeArgumentError(
                f"`name_map` raised {type(error).__name__}: {error} for the name {stripped!r} "
                f"(from {name!r}); it must map every tensor name to a str."
            ) from error
        if not isinstance(mapped, str) or not mapped:
            raise MergeArgumentError(
                f"`name_map` returned {mapped!r} for the name {stripped!r} (from {name!r}); it "
                "must return a non-empty str."
            )
        return mapped

    return rename


def canonical_names(raw: Iterable[str], rename: NameMap, where: str) -> dict[str, str]:
    """Each canonical name -> the raw name it comes from; two raw names of one model that map to
    one canonical name are an error naming both."""
    names: dict[str, str] = {}
    for name in raw:
        canonical = rename(name)
        other = names.setdefault(canonical, name)
        if other != name:
            raise MergeArgumentError(
                f"{where} has two tensors, {other!r} and {name!r}, that both map to the name "
                f"{canonical!r} once wrapper prefixes ('module.', '_orig_mod.') are stripped and "
                "`name_map` is applied; pass a name_map that keeps them apart, or drop one of them."
            )
    return names


class Entry(NamedTuple):
    """What a source says about one tensor without reading it (a named tuple: one is made per
    tensor per model on every call, so it must be cheap to build)."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    key: Hashable
    """Identity of the underlying view: entries with equal keys are tied (one tensor, two names)."""
    sharding: Any = None
    """A DTensor's mesh and placements (``terge.sharding.Sharding``); ``None`` when not sharded."""

    @property
    def is_floating(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def view_key(tensor: torch.Tensor) -> Hashable:
    """A key equal for two tensors exactly when they are the same view of the same memory.

    ``data_ptr()`` is the view's first element (storage address plus offset), so with the shape,
    strides and dtype it tells views apart without building a storage object per tensor.
    """
    if type(tensor) not in _PLAIN_TYPES and is_dtensor(tensor):
        return ("dtensor", view_key(tensor.to_local()))
    return _key(tensor, tensor.shape, tensor.dtype, tensor.device)


def _key(
    tensor: torch.Tensor, shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> Hashable:
    """:func:`view_key` of a tensor that is not a DTensor, from the attributes already read."""
    if device.type == "meta" or tensor.numel() == 0:
        return ("object", id(tensor))
    try:
        return (device, tensor.data_ptr(), tuple(shape), tensor.stride(), dtype)
    except (RuntimeError, NotImplementedError):  # tensor subclasses without plain storage
        return ("object", id(tensor))


def entry_of(name: str, tensor: torch.Tensor) -> Entry:
    """What the plan needs to know of a tensor, read off it once (each attribute read once: an
    entry is made per tensor per model on every call)."""
    if type(tensor) not in _PLAIN_TYPES:
        return Entry(
            name, tensor.shape, tensor.dtype, tensor.device, view_key(tensor), sharding_of(tensor)
        )
    shape, dtype, device = tensor.shape, tensor.dtype, tensor.device
    return Entry(name, shape, dtype, device, _key(tensor, shape, dtype, device))


class Source:
    """Named tensors of one model; ``get`` returns the live tensor (never a copy).

    Every name is canonical (see the module's docstring): ``raw_names`` maps it back to the
    model's own name, ``canonical`` the other way.
    """

    kind = "tensors"

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        others: tuple[str, ...] = (),
        *,
        rename: NameMap = strip_wrappers,
        where: str = "a model",
    ) -> None:
        self.rename = rename
        """Gives a name of the model its canonical name (wrapper prefixes, ``name_map``)."""
        self.raw_names = canonical_names([*tensors, *others], rename, where)
        self.canonical = {raw: name for name, raw in self.raw_names.items()}
        self._tensors = {self.canonical[raw]: t for raw, t in tensors.items()}
        self.entries: dict[str, Entry] = {
            name: entry_of(name, t) for name, t in self._tensors.items()
        }
        self.others = tuple(self.canonical[raw] for raw in others)
        """Names of entries that are not tensors (kept from the base as they are)."""

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    @property
    def buffers(self) -> Mapping[str, bool]:
        """A module's buffers left out of the merge (``buffers=False``), each with whether it is
        floating point: its state dict holds them, so the lineage says why they are as the base
        has them."""
        return {}

    @functools.cached_property
    def unusual(self) -> bool:
        """Whether any tensor is on the meta device or sharded (the plan checks these names)."""
        return any(e.sharding is not None or e.is_meta for e in self.entries.values())

    def close(self) -> None:
        """Release what the source holds open (files); nothing for in-memory models."""

    def prefetch(self, name: str) -> int:
        """Start reading ``name`` from disk in the background, for a file that is read lazily;
        returns the bytes asked for (0: nothing to read ahead, as for in-memory models)."""
        return 0

    def holds(self, name: str, shape: torch.Size) -> bool:
        entry = self.entries.get(name)
        return entry is not None and entry.shape == shape

    def delta(self, name: str, base: Source) -> torch.Tensor | None:
        """The tensor minus ``base``'s, known exactly without subtracting (an adapter over that
        very base), in float64; ``None`` where it is not known (then subtract)."""
        return None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP, DataParallel and ``torch.compile`` wrappers (nested ones too)."""
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        compiled = type(module).__name__ == "OptimizedModule"
        inner = getattr(module, "_orig_mod", None) if compiled else None
        if isinstance(module, parallel):
            module = module.module
        elif isinstance(inner, torch.nn.Module):
            module = inner
        else:
            return module


class ModuleSource(Source):
    """A module's parameters (with ``buffers=True`` its buffers too), tied names included.

    ``wrapper`` is the module as given; ``module`` the one inside its DDP or ``torch.compile``
    wrappers, whose tensors are the wrapper's (so merging in place into either is the same).
    """

    kind = "module"

    def __init__(
        self,
        module: torch.nn.Module,
        buffers: bool,
        *,
        rename: NameMap = strip_wrappers,
        where: str = "a model",
    ) -> None:
        self.wrapper = module
        self.module = module = unwrap(module)
        tensors: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
        if buffers:
            for name, buffer in module.named_buffers(remove_duplicate=False):
                if buffer is not None:
                    tensors[name] = buffer
        self.merges_buffers = buffers
        super().__init__(tensors, rename=rename, where=where)

    @functools.cached_property
    def buffers(self) -> Mapping[str, bool]:
        """The persistent buffers, unless they are merged; found when the plan asks (only the
        base's are), not for every model."""
        if self.merges_buffers:
            return {}
        found = ((self.rename(name), b) for name, b in _persistent_buffers(self.module))
        return {name: b.is_floating_point() for name, b in found if name not in self.entries}


def _persistent_buffers(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers ``module.state_dict()`` holds (not the non-persistent ones), by name, read
    from the modules themselves: ``state_dict()`` would run its hooks (FSDP's gather)."""
    found = []
    for prefix, child in module.named_modules(remove_duplicate=False):
        for name, buffer in child._buffers.items():
            if buffer is not None and name not in child._non_persistent_buffers_set:
                found.append((f"{prefix}.{name}" if prefix else name, buffer))
    return found


class StateDictSource(Source):
    """A mapping of names to tensors; any non-tensor values are reported and kept from the base."""

    kind = "state_dict"

    def __init__(
        self,
        mapping: Mapping[str, Any],
        *,
        rename: NameMap = strip_wrappers,
        where: str = "a model",
    ) -> None:
        self.mapping = mapping
        tensors = {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}
        others = tuple(k for k in mapping if k not in tensors)
        for key in tensors:
            if not isinstance(key, str):
                raise MergeArgumentError(
                    f"a state dict has the key {key!r} of type {type(key).__name__}; tensor "
                    "names must be str."
                )
        super().__init__(tensors, tuple(str(k) for k in others), rename=rename, where=where)


class FileSource(Source):
    """A checkpoint on disk (file or folder): names, shapes and dtypes from its headers.

    Opening checks every header and index, so a broken file fails before anything is merged.
    ``get`` is a zero-copy view of the file's private memory map (see
    ``CheckpointReader.view``): a tensor's pages are read only when the merge touches them, and
    stay reclaimable page cache rather than process memory. A distributed checkpoint
    (``torch.distributed.checkpoint``) is the exception: its tensors are ``torch.save`` records,
    so ``get`` reads one whole tensor into memory, its ranks' chunks stitched. Each name is its own
    tensor: files hold no ties (``save_pretrained`` writes tied tensors once).
    """

    kind = "file"

    def __init__(
        self, path: CheckpointLike, *, rename: NameMap = strip_wrappers, where: str = ""
    ) -> None:
        from .io import open_checkpoint  # safetensors is imported only when used

        self.rename = rename
        self.reader = open_checkpoint(path)
        self.path = self.reader.path
        """The file or folder (a training checkpoint's file, its entry aside; a Hub model's
        snapshot folder in the local cache)."""
        self.hub = self.reader.hub
        """The Hub snapshot (repository, revision asked for, commit) of a Hub model, else None."""
        self.spec = (
            self.hub.pinned if self.hub is not None else resolved(self.path, self.reader.selection)
        )
        """What the lineage records: the path, and the entry and prefix read from a training
        checkpoint (``ckpt.pt::entry=model,prefix=``); for a Hub model ``org/name@<commit>``,
        the same weights on any machine (the cache folder is this machine's)."""
        try:
            self.raw_names = canonical_names(
                self.reader.names(), rename, where or f"the checkpoint {self.path}"
            )
        except BaseException:
            self.reader.close()
            raise
        self.canonical = {raw: name for name, raw in self.raw_names.items()}
        cpu = torch.device("cpu")
        self.entries = {}
        for name, raw in self.raw_names.items():
            info = self.reader.info(raw)
            self.entries[name] = Entry(name, info.shape, info.dtype, cpu, ("file", raw))
        self.others = ()

    def get(self, name: str) -> torch.Tensor:
        return self.reader.view(self.raw_names[name])

    def prefetch(self, name: str) -> int:
        raw = self.raw_names.get(name)
        return 0 if raw is None else self.reader.prefetch(raw)

    def close(self) -> None:
        self.reader.close()


class AdapterSource(Source):
    """A PEFT LoRA adapter over its base: the base's names, shapes and dtypes; ``get`` returns
    ``base + delta`` for the tensors the adapter changes, computed in float64 one tensor at a
    time and returned in float64 (so a merge rounds once, into the base's dtype), and the base's
    own tensor for the rest.

    Ties of the base are kept: a delta on one name of a tied group changes them all (as PEFT's
    ``merge_and_unload`` does); a tensor the adapter replaces whole (``modules_to_save``) gets
    a key of its own. Everything is checked against the base when the source is made.

    An adapted tensor of a CPU base that is not float64 itself is computed into one float64
    buffer the source keeps, sized for its largest adapted tensor: a merge allocates it once
    rather than once per tensor (freeing a large block per tensor makes glibc's heaps grow, see
    ``benchmarks/bench_files.py --only adapter``). Such a tensor is valid until the next ``get``
    of another name from this source; every consumer (a step, a copy) uses one name at a time,
    and reads or converts it (float64 into the base's dtype) before the next.
    """

    kind = "adapter"

    def __init__(
        self,
        spec: AdapterSpec | str | os.PathLike[str],
        buffers: bool,
        *,
        rename: NameMap = strip_wrappers,
        where: str = "a model",
    ) -> None:
        if not isinstance(spec, AdapterSpec):
            spec = AdapterSpec(Path(spec).expanduser())
        self.rename = rename
        self.adapter = Adapter(spec.folder, rename)
        self.folder = self.adapter.folder
        self.hub: HubSnapshot | None = None
        """The Hub snapshot the adapter was read from (``org/adapter@rev``), else ``None``."""
        try:
            given = spec.base
            if given is None:
                given = resolve_base_path(self.adapter.config.base_model_name_or_path, self.folder)
            if isinstance(given, AdapterSpec) or (is_path(given) and is_adapter_folder(given)):
                raise AdapterError(
                    f"{where}: the base of the adapter {self.folder} is itself an adapter "
                    f"({given}); merge that one into its base first (terge.merge([...], out=...)) "
                    "and pass the result as the base."
                )
            try:
                self.base = as_source(given, buffers, f"the base of {where}", rename)
            except HubError as error:
                if spec.base is not None:
                    raise
                raise AdapterError(
                    f"{where}: the adapter {self.folder} was trained on {given!r}, a Hub model "
                    f"that cannot be read here ({error}); fetch it, or pass the base yourself: "
                    f"terge.adapter({os.fspath(self.folder)!r}, base=model_or_path)."
                ) from error
        except BaseException:
            self.adapter.close()
            raise
        try:
            self._take_base_view()
        except BaseException:
            self.close()
            raise

    @property
    def buffers(self) -> Mapping[str, bool]:
        return self.base.buffers  # a module base's, left out as they would be without adapter

    def _take_base_view(self) -> None:
        base = self.base
        if base.unusual:
            raise AdapterError(
                f"the base of the adapter {self.folder} holds sharded (DTensor) or meta tensors; "
                "pass an unsharded base with real weights (a checkpoint path, or a state dict "
                "gathered on one rank)."
            )
        self.raw_names, self.canonical, self.others = base.raw_names, base.canonical, base.others
        self.adapter.check(
            {n: e.shape for n, e in base.entries.items()},
            {n: e.dtype for n, e in base.entries.items()},
        )
        tied: dict[Hashable, list[str]] = {}
        for name, entry in base.entries.items():
            tied.setdefault(entry.key, []).append(name)
        self.entries = dict(base.entries)
        self.scratch: torch.Tensor | None = None
        """The float64 buffer adapted tensors are computed into (made on the first ``get``)."""
        self.origin: dict[str, str] = {}
        """Each changed name -> the adapted name whose value it shows (itself, or the name of
        its tied group that the adapter changes)."""
        for name in sorted(self.adapter.changed):
            entry = base.entries[name]
            if name in self.adapter.whole:
                self.entries[name] = entry._replace(key=("adapter", self.folder, name))
                self.origin[name] = name
                continue
            for other in tied[entry.key]:
                if other in self.adapter.whole:
                    continue
                known = self.origin.setdefault(other, name)
                if known != name:
                    raise AdapterError(
                        f"the adapter {self.folder} changes both {known!r} and {name!r}, which "
                        "are one tied tensor in the base; untie them or adapt only one."
                    )

    def get(self, name: str) -> torch.Tensor:
        origin = self.origin.get(name)
        if origin is None:
            return self.base.get(name)
        base = self.base.get(origin).detach()
        entry = self.entries[origin]
        if base.device.type != "cpu" or entry.dtype == torch.float64:
            return self.adapter.adapted(origin, base)  # a fresh tensor: never a shared buffer
        if self.scratch is None:
            largest = max(self.entries[n].shape.numel() for n in self.origin)
            self.scratch = torch.empty(largest, dtype=torch.float64)
        out = self.scratch[: entry.shape.numel()].view(entry.shape)
        return self.adapter.adapted(origin, base, out)

    def delta(self, name: str, base: Source) -> torch.Tensor | None:
        origin = self.origin.get(name)
        if origin is None or not same_model(self.base, base):
            return None
        return self.adapter.pure_delta(origin)

    @functools.cached_property
    def unusual(self) -> bool:
        return False

    def close(self) -> None:
        self.scratch = None
        self.adapter.close()
        self.base.close()


def same_model(a: Source, b: Source) -> bool:
    """Whether two sources read the very same model (one object, one mapping or one file)."""
    if a is b:
        return True
    if isinstance(a, ModuleSource) and isinstance(b, ModuleSource):
        return a.module is b.module
    if isinstance(a, StateDictSource) and isinstance(b, StateDictSource):
        return a.mapping is b.mapping
    if isinstance(a, FileSource) and isinstance(b, FileSource):
        return bool(
            a.path.resolve() == b.path.resolve() and a.reader.selection == b.reader.selection
        )
    return False


def checkpoint_of(source: Source) -> FileSource | None:
    """The checkpoint on disk a source's tensors come from: itself, or an adapter's base."""
    if isinstance(source, AdapterSource):
        return checkpoint_of(source.base)
    return source if isinstance(source, FileSource) else None


def folders_read(source: Source) -> list[Path]:
    """The adapter folders a source reads besides its checkpoint (an output must not be there)."""
    return [source.folder] if isinstance(source, AdapterSource) else []


def is_path(model: object) -> TypeGuard[str | os.PathLike[str]]:
    """Whether ``model`` is a path (``str`` or ``os.PathLike``) rather than a model in memory."""
    return isinstance(model, (str, os.PathLike))


def on_disk(model: object) -> TypeGuard[CheckpointLike]:
    """Whether ``model`` names a checkpoint on disk: a path, or a ``terge.checkpoint`` spec."""
    return isinstance(model, (str, os.PathLike, CheckpointSpec))


def as_source(model: Any, buffers: bool, where: str, rename: NameMap = strip_wrappers) -> Source:
    """Wrap a module, a state dict or a checkpoint path; ``where`` names it in errors, ``rename``
    gives each tensor's canonical name."""
    if isinstance(model, torch.nn.Module):
        return ModuleSource(model, buffers, rename=rename, where=where)
    if isinstance(model, Mapping):
        return StateDictSource(model, rename=rename, where=where)
    if isinstance(model, AdapterSpec) or (is_path(model) and is_adapter_folder(model)):
        return AdapterSource(model, buffers, rename=rename, where=f"{where} ({model})")
    if is_path(model) and hub_reference(model) is not None:
        folder, snapshot = locate(model)  # an adapter on the Hub is an adapter too
        if is_adapter_folder(folder):
            source = AdapterSource(folder, buffers, rename=rename, where=f"{where} ({model})")
            source.hub = snapshot
            return source
    if on_disk(model):
        return FileSource(model, rename=rename, where=f"{where} ({model})")
    raise MergeArgumentError(
        f"{where} is a {type(model).__name__}; terge merges torch.nn.Module objects, state "
        "dicts (mappings of names to tensors), checkpoints (paths, str or os.PathLike, or "
        "terge.checkpoint(...)) and PEFT adapters (their folders, or terge.adapter(...))."
    )
