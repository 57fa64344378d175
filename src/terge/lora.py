"""LoRA out: the difference of two models, or a merge over its base, as a PEFT LoRA adapter.

Every tensor the two models share is compared, one at a time, in float64. A changed 2-D weight
of a ``Linear`` (or GPT-2's ``Conv1D``, stored ``in x out``: ``fan_in_fan_out``), and with
``embeddings=True`` of an ``Embedding``, becomes ``lora_A``/``lora_B`` by truncated SVD
(:mod:`terge.lowrank`), with ``lora_alpha == r`` so that PEFT's scaling is 1. What a LoRA factor
cannot hold is kept exactly where PEFT can: the changed bias of a factored module as ``lora_B``'s
bias (``lora_bias=True``), any other changed module (a norm, an embedding without
``embeddings=True``) whole in ``modules_to_save``. What not even that can hold (a tensor only one
model has, an integer tensor, a change the patterns exclude) is listed in ``left_out`` with its
reason and named in a :class:`terge.errors.LoraLeftOutWarning`: nothing is dropped silently.

Everything that can be refused (ranks, shapes, the output folder) is refused from names and
shapes alone, before a tensor is read or a file written. Memory stays flat: a checkpoint is read
through its memory map one tensor at a time, and only the factors (``r * (in + out)`` numbers a
module) and the tensors saved whole are kept until the adapter is written, atomically.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .errors import LoraLeftOutWarning, MergeArgumentError
from .execute import execute
from .io.adapter_writing import (
    AdapterWriter,
    adapter_config,
    lora_bias_name,
    lora_names,
    saved_name,
)
from .io.dtypes import dtype_name, floating_dtype
from .io.reading import allowed_roots, outside
from .lowrank import check_energy, check_rank, factor
from .patterns import PatternMap, PatternSet, pattern_repr, selected
from .plan import Plan
from .sources import (
    FileSource,
    ModuleSource,
    NameMap,
    Source,
    as_source,
    checkpoint_of,
    folders_read,
    renamer,
)

REPORT_FILE = "lora.json"
"""The record beside the adapter: per module its rank and truncation error, and what was left
out and why."""

CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
"""``config.json`` model types whose projections are ``Conv1D`` (weights stored ``in x out``)."""

CONFIG_LIMIT = 1 << 20
"""The largest ``config.json`` read for its ``model_type`` (bytes); a larger one is ignored."""

EMBEDDING_NAMES = frozenset(
    {
        "embed_tokens",
        "embed_positions",
        "embeddings",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "shared",
        "embed_in",
    }
)
"""Module names that are embeddings in a checkpoint file, where no module says so."""

RankSpec = int | Mapping[Any, int] | None


@dataclass(frozen=True)
class Factored:
    """One module's difference as LoRA factors."""

    tensor: str
    """The weight's name (``model.layers.0.mlp.up_proj.weight``)."""
    layout: str
    """``linear``, ``conv1d`` (``in x out``) or ``embedding``."""
    shape: tuple[int, ...]
    rank: int
    error: float
    """``||D - B @ A||_F / ||D||_F``: the relative Frobenius error of the truncation."""
    energy: float
    """The share of ``||D||_F^2`` the kept singular values hold."""
    norm: float
    """``||D||_F``, the size of the difference itself."""

    def to_json(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "layout": self.layout,
            "shape": list(self.shape),
            "rank": self.rank,
            "error": self.error,
            "energy": self.energy,
            "norm": self.norm,
        }


@dataclass
class LoraAdapter:
    """What :func:`extract_lora` (or ``merge(out_format="lora")``) wrote, and how exact it is."""

    path: Path | None
    modules: dict[str, Factored] = field(default_factory=dict)
    """Each factored module's name -> its rank and truncation error."""
    biases: list[str] = field(default_factory=list)
    """Factored modules whose bias changed, held exactly as ``lora_B``'s bias."""
    modules_to_save: dict[str, list[str]] = field(default_factory=dict)
    """Modules saved whole (PEFT's ``modules_to_save``) -> the changed tensors that made them."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Every difference the adapter does not hold -> why."""
    unchanged: int = 0
    """Tensors equal in both models (nothing to hold)."""
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        """The largest relative truncation error of any module (0 when none was factored)."""
        return max((m.error for m in self.modules.values()), default=0.0)

    def to_json(self) -> dict[str, Any]:
        """The record written as ``lora.json`` (deterministic: sorted keys, no timestamps)."""
        return {
            "format": "terge-lora/1",
            "terge_version": __version__,
            "torch_version": str(torch.__version__),
            "settings": self.settings,
            "modules": {name: m.to_json() for name, m in sorted(self.modules.items())},
            "biases": sorted(self.biases),
            "modules_to_save": {k: sorted(v) for k, v in sorted(self.modules_to_save.items())},
            "left_out": dict(sorted(self.left_out.items())),
            "unchanged": self.unchanged,
            "max_error": self.max_error,
        }


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (not Linux, or another libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


def give_back_memory() -> None:
    """Return freed heap pages to the system after each SVD.

    An SVD's float64 workspace is freed at once, but glibc keeps it when a small, long-lived
    allocation (the factors just kept) lands above it in the heap; after the next SVD the same
    happens again, so without this the resident memory of an extraction grows by a workspace per
    layer (measured: 337 MiB for the SVDs alone, 749 MiB for the extraction of GPT-2 small).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """How differences are factored: a rank (one, or a map of patterns to ranks) or an energy
    threshold, embeddings or not, the layout of 2-D weights in files, the output dtype."""

    rank: RankSpec
    energy: float | None
    embeddings: bool
    fan_in_fan_out: bool | None
    out_dtype: torch.dtype | None
    task_type: str | None
    ranks: PatternMap[int] | None = None

    def rank_of(self, name: str) -> tuple[int | None, float | None]:
        """``(rank, None)`` or ``(None, energy)`` for the weight ``name``."""
        if isinstance(self.rank, int):
            return self.rank, None
        if self.ranks is not None:
            found = self.ranks.match(name)
            if found is not None:
                return found[1], None
        if self.energy is not None:
            return None, self.energy
        raise MergeArgumentError(
            f"no pattern of `rank` matches the weight {name!r}, and no `energy` is given for "
            "the rest; add a pattern for it (re.compile('.') matches every name) or pass energy=."
        )

    def to_json(self) -> dict[str, Any]:
        rank: Any = self.rank
        if self.ranks is not None:
            rank = {pattern_repr(k): v for k, v in zip(self.ranks, self.ranks.values())}
        return {
            "rank": rank,
            "energy": self.energy,
            "embeddings": self.embeddings,
            "fan_in_fan_out": self.fan_in_fan_out,
            "out_dtype": None if self.out_dtype is None else dtype_name(self.out_dtype),
            "task_type": self.task_type,
            "svd_dtype": "float64",
        }


def lora_settings(
    rank: Any = None,
    energy: Any = None,
    embeddings: Any = False,
    fan_in_fan_out: Any = None,
    out_dtype: Any = None,
    task_type: Any = None,
) -> LoraSettings:
    """The settings checked: exactly one of an int ``rank`` and ``energy`` (a map of ranks may
    come with an energy for the names it does not match)."""
    ranks = None
    if rank is None and energy is None:
        raise MergeArgumentError(
            "pass `rank` (an int, or a map of patterns to ints) or `energy` (a share in (0, 1] "
            "of the squared singular values to keep) to say how much of each difference to keep."
        )
    if isinstance(rank, Mapping):
        ranks = PatternMap(dict(rank), "rank")
        for key, value in zip(ranks, ranks.values()):
            check_rank(value, f"the rank of the pattern {pattern_repr(key)}")
    elif rank is not None:
        check_rank(rank)
        if energy is not None:
            raise MergeArgumentError(
                f"pass either rank={rank!r} or energy={energy!r}, not both (a map of patterns "
                "to ranks may come with an energy for the names it does not match)."
            )
    if energy is not None:
        energy = check_energy(energy)
    for flag, value in (("embeddings", embeddings),):
        if not isinstance(value, bool):
            raise MergeArgumentError(f"`{flag}` must be True or False; got {value!r}.")
    if fan_in_fan_out is not None and not isinstance(fan_in_fan_out, bool):
        raise MergeArgumentError(
            f"`fan_in_fan_out` must be True, False or None (read from the model); got "
            f"{fan_in_fan_out!r}."
        )
    dtype = None
    if out_dtype is not None:
        dtype = floating_dtype(out_dtype)
        if dtype is None:
            raise MergeArgumentError(
                f"`out_dtype` must be a floating-point torch.dtype or its name ('float32', "
                f"'bfloat16'); got {out_dtype!r}."
            )
    if task_type is not None and not isinstance(task_type, str):
        raise MergeArgumentError(
            f"`task_type` must be a PEFT task type such as 'CAUSAL_LM', or None; got {task_type!r}."
        )
    return LoraSettings(rank, energy, embeddings, fan_in_fan_out, dtype, task_type, ranks)


# --- what kind of module holds each tensor -------------------------------------------------------


def module_of(name: str) -> tuple[str, str]:
    """``("model.layers.0.mlp.up_proj", "weight")`` for ``model.layers.0.mlp.up_proj.weight``."""
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _module_kinds(source: Source) -> Callable[[str], str] | None:
    """For a module: the kind of the module holding a (canonical) tensor name."""
    if not isinstance(source, ModuleSource):
        return None
    root = source.module

    def kind(name: str) -> str:
        raw = source.raw_names.get(name, name)
        module_name, _ = module_of(raw)
        try:
            module = root.get_submodule(module_name) if module_name else root
        except AttributeError:
            return "other"
        if isinstance(module, torch.nn.Embedding):
            return "embedding"
        if isinstance(module, torch.nn.Linear):
            return "linear"
        if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D (GPT-2)
            return "conv1d"
        return "other"

    return kind


def _config_model_type(source: Source) -> str | None:
    """``model_type`` of the ``config.json`` beside a checkpoint, if there is one."""
    if not isinstance(source, FileSource):
        return None
    folder = source.path if source.path.is_dir() else source.path.parent
    path = folder / "config.json"
    # a file terge did not write: a plain file inside the folder, of a config's size, or ignored
    if not path.is_file() or outside(path, allowed_roots(folder)) is not None:
        return None
    try:
        if path.stat().st_size > CONFIG_LIMIT:
            return None
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    value = config.get("model_type") if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def kinds_of(
    finetuned: Source, base: Source, settings: LoraSettings
) -> Callable[[str, torch.Size], str]:
    """The kind of module holding each tensor: from a module where either model is one, else
    from names (embeddings) and ``fan_in_fan_out`` (given, or read from ``config.json``)."""
    from_module = _module_kinds(base) or _module_kinds(finetuned)
    conv1d = settings.fan_in_fan_out
    if conv1d is None:
        types = {_config_model_type(base), _config_model_type(finetuned)}
        conv1d = bool(types & CONV1D_MODEL_TYPES)

    def kind(name: str, shape: torch.Size) -> str:
        module, leaf = module_of(name)
        # a weight of the root module has no module name for PEFT to target: never factored
        if len(shape) != 2 or leaf != "weight" or not module:
            return "other"
        if from_module is not None:
            return from_module(name)
        if module.rpartition(".")[2] in EMBEDDING_NAMES:
            return "embedding"
        return "conv1d" if conv1d else "linear"

    return kind


# --- the plan of an extraction: everything refused before anything is read -----------------------


@dataclass(frozen=True)
class Target:
    """A weight to factor: its kind, and the rank or energy that says how much to keep."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int | None
    energy: float | None


def plan_targets(
    names: list[str],
    shape_of: Callable[[str], torch.Size],
    kind_of: Callable[[str, torch.Size], str],
    settings: LoraSettings,
    chosen: Callable[[str], bool],
) -> dict[str, Target]:
    """Every weight that will be factored if it changed, with its rank checked against its
    shape (a rank above the smaller dimension is an error naming the weight)."""
    targets = {}
    for name in names:
        shape = shape_of(name)
        kind = kind_of(name, shape)
        if not chosen(name) or kind == "other":
            continue
        if kind == "embedding" and not settings.embeddings:
            continue
        rank, energy = settings.rank_of(name)
        if rank is not None and rank > min(shape):
            raise MergeArgumentError(
                f"rank {rank} exceeds the smaller dimension of {name!r} {tuple(shape)}, whose "
                f"difference has at most rank {min(shape)}; pass a rank of at most {min(shape)} "
                "for it (a map of patterns to ranks sets one per module) or use energy=."
            )
        targets[name] = Target(name, kind, tuple(shape), rank, energy)
    return targets


# --- the collector: each difference, once computed, into factors or whole tensors ---------------


class _Collector:
    """Takes each tensor's difference as it is computed and keeps only what the adapter holds."""

    def __init__(self, targets: dict[str, Target], settings: LoraSettings, base: Source) -> None:
        self.targets = targets
        self.settings = settings
        self.base = base
        self.record = LoraAdapter(path=None, settings=settings.to_json())
        self.tensors: dict[str, torch.Tensor] = {}
        """The adapter's tensors, by PEFT name."""
        self.changed: dict[str, torch.Tensor] = {}
        """Changed tensors that are not factored: their new values, until placed."""

    def dtype(self, name: str) -> torch.dtype:
        return self.settings.out_dtype or self.base.entries[name].dtype

    def add(self, name: str, delta: torch.Tensor, new: Callable[[], torch.Tensor]) -> None:
        """``delta`` (float64) is ``new() - base``; ``new()`` is the tensor in the new model."""
        if not bool(delta.any()):
            self.record.unchanged += 1
            return
        target = self.targets.get(name)
        if target is None:
            self.changed[name] = new().detach().to("cpu", copy=True)
            return
        if not bool(torch.isfinite(delta).all()):
            raise MergeArgumentError(
                f"the difference of {name!r} is not finite (the models hold NaN or infinite "
                "values in it), so no LoRA factors can hold it; check both models for NaN or "
                "infinite values, or leave the tensor out (excluded=)."
            )
        module, _ = module_of(name)
        # PEFT computes B @ A for a Linear (out x in), (B @ A)^T for Conv1D and embeddings
        matrix = delta if target.kind == "linear" else delta.T
        found = factor(matrix, rank=target.rank, energy=target.energy)
        dtype = self.dtype(name)
        name_a, name_b = lora_names(module, target.kind == "embedding")
        self.tensors[name_a] = found.A.to(dtype)
        self.tensors[name_b] = found.B.to(dtype)
        self.record.modules[module] = Factored(
            name, target.kind, target.shape, found.rank, found.error, found.energy, found.norm
        )
        del found, matrix, delta
        give_back_memory()

    def finish(self) -> None:
        """Place the changed tensors that were not factored: biases of factored modules as
        ``lora_B``'s bias when PEFT can hold them, other modules whole, the rest left out."""
        factored = self.record.modules
        biases = {n: t for n, t in self.changed.items() if self._bias_of_factored(n)}
        if biases:
            why = self._no_lora_bias()
            if why is None:
                for module in factored:
                    bias_name = f"{module}.bias"
                    zero = torch.zeros(self.base.entries[bias_name].shape, dtype=torch.float64)
                    value = self.changed.pop(bias_name, None)
                    delta = zero if value is None else value.double() - self._base(bias_name)
                    self.tensors[lora_bias_name(module)] = delta.to(self.dtype(bias_name))
                self.record.biases = sorted(module_of(n)[0] for n in biases)
            else:
                for name in biases:
                    del self.changed[name]
                    self.record.left_out[name] = why
        for name in sorted(self.changed):
            module, _ = module_of(name)
            if not module:
                self.record.left_out[name] = (
                    "a parameter of the root module, which PEFT cannot save (modules_to_save "
                    "names submodules)"
                )
            elif module in factored:
                self.record.left_out[name] = (
                    f"changed in the module {module!r}, whose weight is factored: PEFT holds "
                    "a module either as LoRA or whole, not both"
                )
            else:
                self.record.modules_to_save.setdefault(module, []).append(name)
        for module in self.record.modules_to_save:
            prefix = f"{module}."
            for name in self.base.entries:
                if name.startswith(prefix) and "." not in name[len(prefix) :]:
                    value = self.changed.get(name)
                    tensor = self._base_tensor(name) if value is None else value
                    if tensor.is_floating_point():
                        tensor = tensor.to(self.dtype(name))
                    self.tensors[saved_name(name)] = tensor.contiguous()
        self.changed.clear()

    def _bias_of_factored(self, name: str) -> bool:
        module, leaf = module_of(name)
        return leaf == "bias" and module in self.record.modules

    def _no_lora_bias(self) -> str | None:
        """Why PEFT's ``lora_bias=True`` cannot hold the changed biases, or None."""
        modules = self.record.modules
        if any(m.layout == "embedding" for m in modules.values()):
            return (
                "a changed bias of a factored module: PEFT's lora_bias=True, which would hold "
                "it, is not supported together with factored embeddings (embeddings=True)"
            )
        missing = sorted(m for m in modules if f"{m}.bias" not in self.base.entries)
        if missing:
            return (
                "a changed bias of a factored module: PEFT's lora_bias=True, which would hold "
                f"it, needs every factored module to have a bias, and {missing[0]!r} has none"
            )
        return None

    def _base(self, name: str) -> torch.Tensor:
        return self.base.get(name).detach().to("cpu", torch.float64)

    def _base_tensor(self, name: str) -> torch.Tensor:
        return self.base.get(name).detach().to("cpu", copy=True)

    def config(self, base_path: str | None) -> dict[str, Any]:
        modules = self.record.modules
        return adapter_config(
            ranks={m: f.rank for m, f in modules.items()},
            fan_in_fan_out=any(m.layout == "conv1d" for m in modules.values()),
            modules_to_save=list(self.record.modules_to_save),
            lora_bias=bool(self.record.biases),
            base_model_name_or_path=base_path,
            task_type=self.settings.task_type,
        )


def _write(
    collector: _Collector, writer: AdapterWriter, base_path: str | None, extra: dict[str, str]
) -> LoraAdapter:
    """Fill the open ``writer`` with the adapter, its config and ``lora.json``."""
    record = collector.record
    if not record.modules and not record.modules_to_save:
        raise MergeArgumentError(
            "the models do not differ in any tensor the adapter could hold "
            f"({record.unchanged} unchanged, {len(record.left_out)} left out); nothing to write."
        )
    if not record.modules:  # PEFT raises NoMatchingPeftModuleError for no target module
        whole = ", ".join(repr(m) for m in sorted(record.modules_to_save)[:5])
        raise MergeArgumentError(
            f"the models differ only in modules an adapter saves whole ({whole}), and PEFT "
            "cannot load an adapter that factors no module with LoRA (it raises "
            "NoMatchingPeftModuleError), so none is written; factor a changed embedding with "
            "embeddings=True, or save the difference as a checkpoint instead."
        )
    for name, tensor in collector.tensors.items():
        writer.add(name, tensor)
    writer.write_config(collector.config(base_path))
    writer.write_text(REPORT_FILE, json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")
    for file_name, text in extra.items():
        writer.write_text(file_name, text)
    return record


def _warn_left_out(record: LoraAdapter, stacklevel: int) -> None:
    """Warn of what the adapter does not hold, at the frame ``stacklevel`` up (the user's call)."""
    if not record.left_out:
        return
    shown = "; ".join(f"{n}: {why}" for n, why in sorted(record.left_out.items())[:5])
    more = len(record.left_out) - 5
    warnings.warn(
        f"terge: the adapter does not hold {len(record.left_out)} difference(s) between the "
        f"models ({shown}{f'; and {more} more' if more > 0 else ''}); they are listed in "
        f"{REPORT_FILE} under left_out.",
        LoraLeftOutWarning,
        stacklevel=stacklevel,
    )


# --- extract_lora --------------------------------------------------------------------------------


def extract_lora(
    finetuned: Any,
    base: Any,
    out: str | os.PathLike[str],
    *,
    rank: RankSpec = None,
    energy: float | None = None,
    embeddings: bool = False,
    included: Any = None,
    excluded: Any = None,
    fan_in_fan_out: bool | None = None,
    out_dtype: torch.dtype | str | None = None,
    task_type: str | None = None,
    overwrite: bool = False,
    name_map: NameMap | None = None,
) -> LoraAdapter:
    """Write ``finetuned - base`` as a PEFT LoRA adapter folder at ``out``.

    Each changed 2-D weight of a ``Linear``/``Conv1D`` (and with ``embeddings=True`` of an
    ``Embedding``) is factored by truncated SVD in float64 as ``lora_B @ lora_A`` with
    ``lora_alpha == r`` (scaling 1): ``B = U sqrt(S)``, ``A = sqrt(S) V^T``. Changed biases of
    factored modules go in ``lora_B``'s bias (``lora_bias=True``); other changed modules (norms,
    embeddings without ``embeddings=True``) are saved whole in ``modules_to_save``; anything else
    is listed in ``left_out`` and warned about. ``PeftModel.from_pretrained(base_model, out)``
    loads the folder.

    Args:
        finetuned: the fine-tuned model: an ``nn.Module``, a state dict, or a checkpoint path
            (read lazily, one tensor at a time).
        base: the model the adapter goes over, in the same forms.
        out: the adapter folder to write (atomically; refused if it exists, unless
            ``overwrite``, or if it is inside an input).
        rank: the rank of every factored module (an int), or a map of patterns to ranks
            matched against the weight's name (``{re.compile("mlp"): 32,
            re.compile("."): 8}``, first match wins). A rank above a weight's smaller
            dimension is an error.
        energy: instead of a rank, the smallest rank keeping this share (in (0, 1]) of the
            squared singular values; with a map of ranks, for the names it does not match.
        embeddings: factor embeddings too (``lora_embedding_A``/``_B``); otherwise a changed
            embedding is saved whole.
        included, excluded: patterns of tensor names to consider (terge's rules: a ``str`` is a
            name, a compiled regex is searched); a change outside them is left out, and said.
        fan_in_fan_out: whether the 2-D weights of a checkpoint file are stored ``in x out``
            (GPT-2's ``Conv1D``); ``None`` reads it from a module's types or ``config.json``.
        out_dtype: the dtype the factors are written in (default: each base tensor's own).
        task_type: PEFT's ``task_type`` for ``adapter_config.json`` (e.g. ``"CAUSAL_LM"``).
        overwrite: replace an existing ``out``.
        name_map: a function giving each tensor its canonical name (as in ``terge.merge``).

    Returns:
        A :class:`LoraAdapter`: per module its rank and relative truncation error (also written
        as ``lora.json`` beside the adapter), what is saved whole, and what was left out.

    Example:
        >>> import torch, terge, tempfile, os
        >>> base = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> tuned = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> tuned.load_state_dict(base.state_dict())
        <All keys matched successfully>
        >>> with torch.no_grad():
        ...     tuned[0].weight += torch.outer(torch.ones(8), torch.arange(8.0))
        >>> adapter = terge.extract_lora(tuned, base, os.path.join(tempfile.mkdtemp(), "a"), rank=1)
        >>> adapter.modules["0"].rank, adapter.modules["0"].error < 1e-6  # float32 rounding
        (1, True)
    """
    settings = lora_settings(rank, energy, embeddings, fan_in_fan_out, out_dtype, task_type)
    if not isinstance(out, (str, os.PathLike)):
        raise MergeArgumentError(
            f"`out` must be the path of the adapter folder to write (str or os.PathLike); got "
            f"{type(out).__name__}."
        )
    if not isinstance(overwrite, bool):
        raise MergeArgumentError(f"`overwrite` must be True or False; got {overwrite!r}.")
    chosen_in, chosen_out = PatternSet(included, "included"), PatternSet(excluded, "excluded")
    rename = renamer(name_map)
    with contextlib.ExitStack() as opened:
        tuned = _source(finetuned, "finetuned", rename)
        opened.callback(tuned.close)
        base_source = _source(base, "base", rename)
        opened.callback(base_source.close)
        shared = _shared_names(tuned, base_source)
        targets = plan_targets(
            shared,
            lambda n: base_source.entries[n].shape,
            kinds_of(tuned, base_source, settings),
            settings,
            lambda n: selected(n, chosen_in, chosen_out),
        )
        collector = _Collector(targets, settings, base_source)
        for name in sorted(set(tuned.entries) - set(base_source.entries)):
            collector.record.left_out[name] = "only in the fine-tuned model (not in the base)"
        for name in sorted(set(base_source.entries) - set(tuned.entries)):
            collector.record.left_out[name] = "only in the base (not in the fine-tuned model)"
        base_path = base_source.spec if isinstance(base_source, FileSource) else None
        inputs = _inputs([tuned, base_source])
        with AdapterWriter(out, overwrite=overwrite, inputs=inputs) as writer:
            for name in shared:
                new, old = tuned.get(name), base_source.get(name)
                if new.dtype == old.dtype and torch.equal(new.detach(), old.detach()):
                    collector.record.unchanged += 1  # compared as stored: no float64 copy
                    continue
                if not base_source.entries[name].is_floating:
                    collector.record.left_out[name] = (
                        "changed, but not floating point (an adapter holds float differences)"
                    )
                    continue
                if not selected(name, chosen_in, chosen_out):
                    collector.record.left_out[name] = "changed, but excluded by the patterns"
                    continue
                with torch.no_grad():
                    delta = _delta(new, old)
                del new, old
                collector.add(name, delta, lambda n=name: tuned.get(n))  # type: ignore[misc]
                del delta
            collector.finish()
            collector.record.settings["finetuned"] = _described(tuned)  # in lora.json too
            collector.record.settings["base"] = _described(base_source)
            record = _write(collector, writer, base_path, {})
        record.path = writer.path
    _warn_left_out(record, 3)  # the caller of extract_lora
    return record


def _source(model: Any, where: str, rename: NameMap) -> Source:
    """A model as a source of what its checkpoint would hold: a module's state dict, buffers
    included (changed BatchNorm statistics are a difference like any other), non-persistent
    buffers (rotary tables) not, so a module and its saved file compare alike."""
    source = as_source(model, True, where, rename)
    if isinstance(source, ModuleSource):
        kept = {source.canonical[raw] for raw in source.module.state_dict(keep_vars=True)}
        source.entries = {name: e for name, e in source.entries.items() if name in kept}
    return source


def _described(source: Source) -> str:
    return source.spec if isinstance(source, FileSource) else source.kind


def _delta(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new - old`` in float64 on the CPU, in one float64 tensor (the subtraction promotes
    ``old`` element by element rather than copying it)."""
    delta = new.detach().to("cpu", torch.float64, copy=True)
    return delta.sub_(old.detach().to("cpu"))


def _shared_names(tuned: Source, base: Source) -> list[str]:
    """The names both models hold, in the base's order; a shape that differs is an error."""
    shared = []
    for name, entry in base.entries.items():
        other = tuned.entries.get(name)
        if other is None:
            continue
        if other.shape != entry.shape:
            raise MergeArgumentError(
                f"the tensor {name!r} is {tuple(other.shape)} in the fine-tuned model but "
                f"{tuple(entry.shape)} in the base; an adapter holds differences of tensors "
                "of one shape: are these two checkpoints of the same architecture?"
            )
        shared.append(name)
    return shared


# --- a merge written as an adapter over its base -------------------------------------------------


def check_merge_adapter(plan: Plan, settings: LoraSettings, base: Source) -> dict[str, Target]:
    """What ``merge(out_format="lora")`` refuses before computing: sharded plans, and ranks
    that do not fit the merged weights."""
    if plan.sharded:
        raise MergeArgumentError(
            "out_format='lora' factors whole tensors, which no rank of a sharded merge holds; "
            "merge unsharded checkpoints (paths), or write safetensors."
        )
    names = [step.name for step in plan.steps]
    return plan_targets(
        names,
        lambda n: base.entries[n].shape,
        kinds_of(base, base, settings),
        settings,
        lambda n: True,
    )


def _inputs(sources: list[Source]) -> list[Path]:
    """Every checkpoint and adapter folder the sources read (the output must not lie in one)."""
    paths = [c.path for c in map(checkpoint_of, sources) if c is not None]
    return list(dict.fromkeys([*paths, *(f for s in sources for f in folders_read(s))]))


def check_adapter_target(out: Path, sources: list[Source], base: Source, overwrite: bool) -> None:
    """Refuse ``out`` as :class:`AdapterWriter` would (it exists, or lies in an input), writing
    nothing: a dry run fails where the real call would."""
    AdapterWriter(out, overwrite=overwrite, inputs=_inputs([*sources, base]))  # never entered


def write_merge_adapter(
    plan: Plan,
    sources: list[Source],
    base: Source,
    *,
    out: Path,
    settings: LoraSettings,
    overwrite: bool,
    dtype: torch.dtype,
    lineage_text: str,
    lineage_file: str,
    card: tuple[str, str] | None = None,
) -> LoraAdapter:
    """Compute each merged tensor of ``plan`` in turn and factor its difference from the base
    straight away (memory holds one merged tensor at a time); write the adapter at ``out``,
    with the lineage and, given as ``(file name, text)``, its model card."""
    targets = check_merge_adapter(plan, settings, base)
    collector = _Collector(targets, settings, base)
    inputs = _inputs([*sources, base])
    base_path = base.spec if isinstance(base, FileSource) else None
    with AdapterWriter(out, overwrite=overwrite, inputs=inputs) as writer:
        for step in plan.steps:
            # the merged tensor as a safetensors output would hold it: rounded once into the
            # base tensor's dtype (the kernels write into a destination of the inputs' dtype)
            entry = base.entries[step.name]
            merged = torch.empty(entry.shape, dtype=entry.dtype)
            execute([step], sources, base, lambda _, m=merged: m, dtype, False)  # type: ignore[misc]
            with torch.no_grad():
                delta = _delta(merged, base.get(step.name))
            collector.add(step.name, delta, lambda m=merged: m)  # type: ignore[misc]
            del merged, delta
        collector.finish()
        files = {lineage_file: lineage_text}
        if card is not None:
            files[card[0]] = card[1]
        record = _write(collector, writer, base_path, files)
    record.path = writer.path
    _warn_left_out(record, 4)  # the caller of merge()
    return record
