"""PEFT LoRA adapters: their config and tensors, checked against a base, and each adapted tensor
computed in float64 from the base's.

A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``)
stands for ``base + delta``. Its file names tensors ``base_model.model.<module>.<part>``:

* ``lora_A.weight`` (r x in) and ``lora_B.weight`` (out x r): ``delta = scaling * B @ A`` on
  ``<module>.weight`` (transposed with ``fan_in_fan_out``, GPT-2's ``Conv1D``);
* ``lora_embedding_A`` (r x vocab) and ``lora_embedding_B`` (dim x r): ``(B @ A)^T``;
* ``lora_B.bias`` (``lora_bias=True``): ``scaling * bias`` added to ``<module>.bias``;
* ``lora_magnitude_vector`` (DoRA): the merged weight's rows rescaled to these norms, as PEFT's
  ``merge_and_unload`` does;
* anything else (``modules_to_save``, ``bias="all"``/``"lora_only"``, a saved
  ``base_layer.weight``): a whole tensor that replaces the base's.

``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), with the
module's own ``r`` and ``alpha`` from ``rank_pattern`` and ``alpha_pattern`` where they match.
Nothing here is read before :meth:`Adapter.check` has compared every tensor's shape with the
base's; the adapter's tensors are small and read one module at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch

from ..errors import AdapterError, CheckpointError
from .hub import hub_reference
from .reading import CheckpointReader, allowed_roots, open_checkpoint, outside

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20
"""An ``adapter_config.json`` is a few kilobytes; a larger one is refused before parsing."""
MAX_PATTERN_LENGTH = 1000
"""``rank_pattern``/``alpha_pattern`` keys are regular expressions (as PEFT reads them); longer
ones are refused rather than run."""

REFUSED_OPTIONS = {
    "use_dora": None,  # handled: DoRA is merged exactly (see module docstring)
    "layer_replication": "it duplicates layers, so the merged model has another architecture",
    "trainable_token_indices": "it trains single token embeddings (a TrainableTokens delta)",
    "target_parameters": "it adapts bare nn.Parameters (MoE experts), not modules",
    "use_qalora": "QA-LoRA pools the inputs of quantised layers",
    "alora_invocation_tokens": "an activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routes between several adapters at inference",
    "use_bdlora": "BD-LoRA shares block-diagonal factors",
    "kasa_config": "KaSA is a different update rule",
    "velora_config": "VeLoRA is a different update rule",
    "monteclora_config": "MonteCLoRA is a different update rule",
}
"""LoRA variants that change what the adapter means; each refused when set (DoRA is merged)."""


def is_adapter_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding a PEFT ``adapter_config.json``."""
    folder = Path(path).expanduser()
    return folder.is_dir() and (folder / CONFIG_NAME).is_file()


def resolve_base_path(named: Any, folder: Path) -> Path | str:
    """The base an adapter's config names (``base_model_name_or_path``): a local path, or a Hub
    id (``org/name``, as PEFT writes it) that is no local path, returned as given for the
    checkpoint reader to resolve (:mod:`terge.io.hub`: fetched, or offline from the cache).

    The one place this is decided: an absolute path, or one relative to the current directory
    (as PEFT and transformers read it), wins over a Hub id; anything else is an error saying how
    to give the base (``terge.adapter(path, base=...)``).
    """
    fix = (
        f"pass the base yourself: terge.adapter({os.fspath(folder)!r}, base=model_or_path) "
        "(a module, a state dict or a checkpoint path)"
    )
    if not named:
        raise AdapterError(
            f"the adapter {folder} does not say which model it adapts (its {CONFIG_NAME} has no "
            f"base_model_name_or_path); {fix}."
        )
    if not isinstance(named, str):
        raise AdapterError(
            f"the adapter {folder}'s base_model_name_or_path must be a str; got {named!r}; {fix}."
        )
    path = Path(named).expanduser()
    if path.exists():
        return path
    if hub_reference(named) is not None:  # org/name: read from the Hub (its cache offline)
        return named
    raise AdapterError(
        f"the adapter {folder} was trained on {named!r}, which is no file or folder here nor a "
        f"Hub id (org/name); {fix}."
    )


@dataclass(frozen=True)
class AdapterConfig:
    """What terge uses of ``adapter_config.json``, checked."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    bias: str = "none"
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    base_model_name_or_path: Any = None

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """The module's ``r`` and ``lora_alpha``, patterns matched as PEFT matches them."""
        rank, alpha = self.r, self.lora_alpha
        key = _pattern_key(self.rank_pattern, module)
        if key is not None:
            rank = self.rank_pattern[key]
        key = _pattern_key(self.alpha_pattern, module)
        if key is not None:
            alpha = self.alpha_pattern[key]
        return rank, alpha

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


PATTERN_TIMEOUT = 1.0
"""Seconds one ``rank_pattern``/``alpha_pattern`` key may take to match one module's name: the
keys are regular expressions from a file, and a hostile one can backtrack for ever."""


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first pattern matching the module's name at a dot boundary (PEFT's
    ``get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", module)``), each match bounded by
    :data:`PATTERN_TIMEOUT` (the ``regex`` module's timeout)."""
    for key in patterns:
        try:
            found = regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_TIMEOUT)
        except TimeoutError:
            raise AdapterError(
                f"the adapter's pattern {key!r} took over {PATTERN_TIMEOUT} s to match the "
                f"module name {module!r} (a regular expression that backtracks without end); "
                "write the pattern as the module's plain name."
            ) from None
        if found:
            return key
    return None


def _check_inside(path: Path, roots: tuple[Path, ...], folder: Path) -> None:
    """Refuse an adapter file that is a link out of its folder (terge reads no file outside a
    checkpoint it was given)."""
    real = outside(path, roots)
    if real is not None:
        raise AdapterError(
            f"the adapter {folder}: {path.name} resolves to {real}, outside the adapter folder; "
            "terge reads a folder's files only from inside it: copy the file into the folder."
        )


def read_config(folder: Path) -> AdapterConfig:
    """``adapter_config.json`` parsed and checked: a LoRA adapter terge can merge, or a clear
    error naming the field, its value and what is allowed."""
    path = folder / CONFIG_NAME
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterError(
                f"{path} is {size} bytes; an adapter config is a few kilobytes (at most "
                f"{MAX_CONFIG_BYTES}), so this is not one."
            )
        raw = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        if isinstance(error, AdapterError):
            raise
        raise AdapterError(f"{path} is not readable JSON ({error}).") from error
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} must hold a JSON object; got {type(raw).__name__}.")

    def bad(key: str, wanted: str) -> AdapterError:
        return AdapterError(f"{path}: {key} must be {wanted}; got {raw.get(key)!r}.")

    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{path} is a {peft_type!r} adapter; terge merges LoRA adapters (peft_type "
            "'LORA') only. Merge it with PEFT's merge_and_unload() and pass the saved model."
        )
    for key, why in REFUSED_OPTIONS.items():
        if why is not None and raw.get(key) not in (None, False, {}, []):
            raise AdapterError(
                f"{path} sets {key}={raw[key]!r}, which terge cannot merge ({why}); merge it "
                "with PEFT's merge_and_unload() and pass the saved model."
            )
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad("r", "a positive int")
    alpha = raw.get("lora_alpha", 8)
    if not _finite(alpha):
        raise bad("lora_alpha", "a finite number")
    flags = {}
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        value = raw.get(key, False)
        if value is None:
            value = False
        if not isinstance(value, bool):
            raise bad(key, "true or false")
        flags[key] = value
    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise bad("bias", "'none', 'all' or 'lora_only'")
    rank_pattern = _patterns(path, raw, "rank_pattern", _positive_int, "a positive int")
    alpha_pattern = _patterns(path, raw, "alpha_pattern", _finite, "a finite number")
    base = raw.get("base_model_name_or_path")
    return AdapterConfig(
        r=r,
        lora_alpha=float(alpha),
        bias=bias,
        rank_pattern=rank_pattern,
        alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
        base_model_name_or_path=base,  # checked only where it is used (resolve_base_path)
        **flags,
    )


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _patterns(
    path: Path, raw: Mapping[str, Any], key: str, valid: Callable[[Any], bool], wanted: str
) -> dict[str, Any]:
    patterns = raw.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"{path}: {key} must be an object; got {patterns!r}.")
    for pattern, value in patterns.items():
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise AdapterError(
                f"{path}: a {key} key is {len(pattern)} characters long (at most "
                f"{MAX_PATTERN_LENGTH}); name the modules with shorter patterns."
            )
        try:
            regex.compile(pattern)
        except regex.error as error:
            raise AdapterError(
                f"{path}: the {key} key {pattern!r} is not a regular expression ({error})."
            ) from error
        if not valid(value):
            raise AdapterError(f"{path}: {key}[{pattern!r}] must be {wanted}; got {value!r}.")
    return dict(patterns)


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: where its factors are in the adapter file, and how they combine."""

    module: str
    """The module's name in the base model (PEFT's, e.g. ``model.layers.0.self_attn.q_proj``)."""
    a: str
    b: str
    embedding: bool
    rank: int
    alpha: float
    scaling: float
    magnitude: str | None = None
    """DoRA's magnitude vector (one norm per output row)."""
    bias: str | None = None
    """``lora_bias``: ``lora_B.bias``, added (scaled) to the module's bias."""


LORA_PARTS = {
    "lora_A.weight": "a",
    "lora_B.weight": "b",
    "lora_embedding_A": "a",
    "lora_embedding_B": "b",
    "lora_B.bias": "bias",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
}
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+(?=\.)")


def _split(key: str) -> tuple[str, str | None]:
    """``(module, part)`` for a LoRA factor's key, ``(tensor name, None)`` for a whole tensor
    (``base_layer.`` and ``modules_to_save.<adapter>.`` taken out of its name)."""
    for part in LORA_PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    name = _MODULES_TO_SAVE.sub("", key).replace(".base_layer.", ".")
    return name, None


class Adapter:
    """An adapter folder, opened: its config, its modules and whole tensors, its file.

    ``rename`` gives a module's tensor its name in the base's source (wrapper prefixes,
    ``name_map``). Close it when done (:meth:`close`).
    """

    def __init__(
        self, folder: str | os.PathLike[str], rename: Callable[[str], str] = lambda n: n
    ) -> None:
        self.folder = Path(folder).expanduser()
        if not is_adapter_folder(self.folder):
            raise AdapterError(f"{self.folder} is no PEFT adapter folder: it has no {CONFIG_NAME}.")
        roots = allowed_roots(self.folder)
        _check_inside(self.folder / CONFIG_NAME, roots, self.folder)
        self.config = read_config(self.folder)
        weights = [self.folder / n for n in WEIGHT_NAMES if (self.folder / n).is_file()]
        if not weights:
            raise AdapterError(
                f"the adapter {self.folder} has {CONFIG_NAME} but no weights: it needs "
                f"{' or '.join(WEIGHT_NAMES)} beside it."
            )
        self.file = weights[0]
        _check_inside(self.file, roots, self.folder)
        try:
            self.reader: CheckpointReader = open_checkpoint(self.file)
        except CheckpointError as error:
            raise AdapterError(
                f"the adapter's weights {self.file} cannot be read: {error}"
            ) from error
        try:
            self.modules, self.whole = self._parse(rename)
        except BaseException:
            self.reader.close()
            raise

    def _parse(self, rename: Callable[[str], str]) -> tuple[dict[str, LoraModule], dict[str, str]]:
        """Each adapted tensor's name in the base -> its module; each whole tensor's name in
        the base -> its key in the file. Every key is understood, or the adapter is refused."""
        parts: dict[str, dict[str, str]] = {}
        whole: dict[str, str] = {}
        for key in self.reader.names():
            if not key.startswith(PREFIX):
                raise AdapterError(
                    f"the adapter {self.file} holds {key!r}, which is not a PEFT tensor name "
                    f"(they start with {PREFIX!r}); was it saved by PEFT's save_pretrained()?"
                )
            module, part = _split(key[len(PREFIX) :])
            if part is None and re.search(r"(^|\.)lora_", module):
                raise AdapterError(
                    f"the adapter {self.file} holds {key!r}, a LoRA tensor terge does not know "
                    "(saved under an adapter name, or from a newer LoRA variant); save it with "
                    "PEFT's save_pretrained(), or merge it with PEFT's merge_and_unload()."
                )
            if part is None:
                name = rename(module)
                if whole.setdefault(name, key) != key:
                    raise AdapterError(
                        f"the adapter {self.file} holds two whole tensors for {name!r}: "
                        f"{whole[name]!r} and {key!r}."
                    )
                continue
            parts.setdefault(module, {})[part] = key
        modules: dict[str, LoraModule] = {}
        for module, found in sorted(parts.items()):
            kinds = {LORA_PARTS[p]: p for p in found}
            if "a" not in kinds or "b" not in kinds:
                missing = "lora_A" if "a" not in kinds else "lora_B"
                raise AdapterError(
                    f"the adapter {self.file} has {sorted(found)} for the module {module!r} "
                    f"but no {missing}: a LoRA module needs both factors."
                )
            embedding = kinds["a"].startswith("lora_embedding")
            if embedding != kinds["b"].startswith("lora_embedding"):
                raise AdapterError(
                    f"the adapter {self.file} mixes embedding and linear factors for "
                    f"{module!r}: {sorted(found.values())}."
                )
            if "magnitude" in kinds and not self.config.use_dora:
                raise AdapterError(
                    f"the adapter {self.file} holds a DoRA magnitude for {module!r} but its "
                    f"config says use_dora=false; the adapter is inconsistent."
                )
            if self.config.use_dora and "magnitude" not in kinds:
                raise AdapterError(
                    f"the adapter {self.folder} says use_dora=true but has no "
                    f"lora_magnitude_vector for {module!r}."
                )
            if embedding and "magnitude" in kinds:
                raise AdapterError(
                    f"the adapter {self.folder} uses DoRA on the embedding {module!r}, which "
                    "terge does not merge; merge it with PEFT's merge_and_unload()."
                )
            rank, alpha = self.config.rank_and_alpha(module)
            a, b = found[kinds["a"]], found[kinds["b"]]
            rows = self.reader.info(a).shape
            if len(rows) != 2 or rows[0] != rank:
                raise AdapterError(
                    f"the adapter {self.folder} says r={rank} for {module!r} (r, rank_pattern) "
                    f"but its {a!r} has shape {tuple(rows)}, not ({rank}, in_features); the "
                    f"config does not match the weights (LoRA on convolutions is not merged)."
                )
            modules[rename(module + ".weight")] = LoraModule(
                module=module,
                a=a,
                b=b,
                embedding=embedding,
                rank=rank,
                alpha=alpha,
                scaling=self.config.scaling(rank, alpha),
                magnitude=found.get(kinds.get("magnitude", ""), None),
                bias=found.get("lora_B.bias"),
            )
        return modules, whole

    def biases(self) -> dict[str, LoraModule]:
        """``lora_bias``: each adapted bias's name in the base -> its module."""
        return {
            name[: -len("weight")] + "bias": m
            for name, m in self.modules.items()
            if m.bias is not None
        }

    def check(self, shapes: Mapping[str, torch.Size], dtypes: Mapping[str, torch.dtype]) -> None:
        """Every tensor the adapter changes exists in the base with a shape that fits, and is
        floating point; else an error naming the tensor, both shapes and the likely cause."""
        where = f"the adapter {self.folder}"
        for name, m in self.modules.items():
            if name not in shapes:
                raise AdapterError(
                    f"{where} adapts the module {m.module!r}, but the base has no tensor "
                    f"{name!r}; is it the base the adapter was trained on?"
                )
            a, b = self.reader.info(m.a), self.reader.info(m.b)
            if len(b.shape) != 2 or b.shape[1] != m.rank:
                raise AdapterError(
                    f"{where}: {m.b!r} has shape {tuple(b.shape)}, but lora_A has {m.rank} rows; "
                    "lora_B must be (out_features, r)."
                )
            for info, key in ((a, m.a), (b, m.b)):
                if not info.dtype.is_floating_point:
                    raise AdapterError(f"{where}: {key!r} is {info.dtype}, not floating point.")
            out, inputs = b.shape[0], a.shape[1]
            if m.embedding:
                wanted, how = (inputs, out), "(num_embeddings, embedding_dim)"
            elif self.config.fan_in_fan_out:
                wanted, how = (inputs, out), "(in, out) with fan_in_fan_out"
            else:
                wanted, how = (out, inputs), "(out, in)"
            actual = tuple(shapes[name])
            if actual != wanted:
                hint = (
                    " (a Conv1D layer, as in GPT-2, needs fan_in_fan_out=true)"
                    if actual == wanted[::-1]
                    else ""
                )
                raise AdapterError(
                    f"{where}: the module {m.module!r} has lora_A {tuple(a.shape)} and lora_B "
                    f"{tuple(b.shape)}, so its weight should be {how} = {wanted}, but the "
                    f"base's {name!r} is {actual}{hint}; is it the base the adapter was "
                    "trained on?"
                )
            if not dtypes[name].is_floating_point:
                raise AdapterError(f"{where}: the base's {name!r} is {dtypes[name]}, not floating.")
            if m.magnitude is not None:
                size = tuple(self.reader.info(m.magnitude).shape)
                if size != (out,):
                    raise AdapterError(
                        f"{where}: the DoRA magnitude {m.magnitude!r} has shape {size}, not "
                        f"({out},)."
                    )
        for name, m in self.biases().items():
            size = tuple(self.reader.info(m.bias).shape)  # type: ignore[arg-type]
            if name not in shapes or tuple(shapes[name]) != size:
                raise AdapterError(
                    f"{where}: {m.bias!r} (lora_bias) needs the base's {name!r} of shape "
                    f"{size}, but the base has {tuple(shapes[name]) if name in shapes else 'none'}."
                )
        for name, key in self.whole.items():
            info = self.reader.info(key)
            if name not in shapes:
                raise AdapterError(
                    f"{where} holds the whole tensor {key!r} (modules_to_save, a bias or a saved "
                    f"base layer), but the base has no tensor {name!r}; is it the base the "
                    "adapter was trained on?"
                )
            if tuple(shapes[name]) != tuple(info.shape):
                raise AdapterError(
                    f"{where}: its {key!r} has shape {tuple(info.shape)}, but the base's "
                    f"{name!r} is {tuple(shapes[name])}."
                )
            if info.dtype.is_floating_point != dtypes[name].is_floating_point:
                raise AdapterError(
                    f"{where}: its {key!r} is {info.dtype} but the base's {name!r} is "
                    f"{dtypes[name]}; a saved tensor must keep its kind."
                )

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(x, y, scaling)`` with ``delta = scaling * x @ y`` in the base tensor's layout:
        ``B @ A``, or ``A^T @ B^T`` where the layout is transposed (embeddings,
        ``fan_in_fan_out``), which BLAS reads without copying."""
        m = self.modules[name]
        a = self.reader.get(m.a).to(torch.float64)
        b = self.reader.get(m.b).to(torch.float64)
        if m.embedding or self.config.fan_in_fan_out:
            return a.T, b.T, m.scaling
        return b, a, m.scaling

    def delta(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` for the tensor ``name``, float64, in the base tensor's layout."""
        x, y, scaling = self._factors(name)
        return torch.mm(x, y).mul_(scaling)

    @property
    def changed(self) -> frozenset[str]:
        """The names of the base tensors the adapter changes."""
        return frozenset(self.modules) | frozenset(self.biases()) | frozenset(self.whole)

    def adapted(
        self, name: str, base: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The base tensor ``name`` (``base``) as the adapter makes it, in float64: replaced
        whole, plus its delta (or DoRA's rescaled sum), plus a LoRA bias; computed into ``out``
        (float64, the tensor's shape) when given, else into a fresh tensor."""
        start = self.reader.get(self.whole[name]) if name in self.whole else base
        value = start.to(torch.float64, copy=True) if out is None else out.copy_(start)
        m = self.modules.get(name)
        if m is not None:  # one fused pass: value += scaling * x @ y, no delta tensor
            x, y, scaling = self._factors(name)
            value.addmm_(x.to(value.device), y.to(value.device), alpha=scaling)
            if m.magnitude is not None:  # DoRA: each output row rescaled to its magnitude
                magnitude = self.reader.get(m.magnitude).to(torch.float64)
                rows = value.T if self.config.fan_in_fan_out else value
                rows *= (magnitude / torch.linalg.vector_norm(rows, dim=1)).unsqueeze(1)
        bias = self.biases().get(name)
        if bias is not None:
            assert bias.bias is not None  # in biases() only modules with a bias
            value += self.reader.get(bias.bias).to(value.device, torch.float64) * bias.scaling
        return value

    def pure_delta(self, name: str) -> torch.Tensor | None:
        """What the adapter adds to the base tensor ``name``, independent of the base's value
        (plain LoRA and a LoRA bias); ``None`` where it is not a pure sum (DoRA, replaced)."""
        if name in self.whole:
            return None
        m = self.modules.get(name)
        bias = self.biases().get(name)
        if m is not None:
            return None if m.magnitude is not None else self.delta(name)
        if bias is not None and bias.bias is not None:
            return self.reader.get(bias.bias).to(torch.float64) * bias.scaling
        return None

    def summary(self) -> dict[str, Any]:
        """What the lineage records: the folder, the ranks and alphas used, the variant."""
        ranks = sorted({m.rank for m in self.modules.values()})
        alphas = sorted({m.alpha for m in self.modules.values()})
        return {
            "folder": os.fspath(self.folder),
            "r": ranks,
            "lora_alpha": alphas,
            "use_rslora": self.config.use_rslora,
            "use_dora": self.config.use_dora,
            "modules": len(self.modules),
            "whole": len(self.whole),
        }

    def close(self) -> None:
        self.reader.close()


@dataclass(frozen=True)
class AdapterSpec:
    """A PEFT adapter folder and the model it adapts (``terge.adapter``); ``base=None`` takes the
    base its config names (``base_model_name_or_path``, a local path)."""

    folder: Path
    base: Any = None

    def __str__(self) -> str:
        return os.fspath(self.folder)


def adapter(path: str | os.PathLike[str], base: Any = None) -> AdapterSpec:
    """A PEFT LoRA adapter as a model to merge: ``base + delta``.

    ``path`` is the folder PEFT's ``save_pretrained`` wrote (``adapter_config.json`` and
    ``adapter_model.safetensors`` or ``.bin``); ``base`` the model it adapts, a module, a state
    dict or a checkpoint path (``None``: the local path its config names). Pass the result
    wherever ``terge.merge`` takes a model; a bare adapter folder path works too when its config
    names its base.

    Example:
        >>> import terge
        >>> soup = terge.merge([terge.adapter("lora-a", base=model),
        ...                     terge.adapter("lora-b", base=model)])  # doctest: +SKIP
    """
    if not isinstance(path, (str, os.PathLike)):
        raise AdapterError(
            f"terge.adapter(path, base=...): path must be the adapter's folder (str or "
            f"os.PathLike); got {type(path).__name__}."
        )
    folder = Path(path).expanduser()
    if not is_adapter_folder(folder):
        raise AdapterError(
            f"terge.adapter({os.fspath(path)!r}): no {CONFIG_NAME} there; pass the folder PEFT's "
            "save_pretrained() wrote."
        )
    return AdapterSpec(folder, base)
