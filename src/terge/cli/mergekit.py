"""mergekit's YAML merge configurations, read as ``terge.merge()`` keyword arguments.

``from_mergekit(config)`` takes a mergekit configuration (a path to its YAML file, or the mapping
it holds) and returns the keyword arguments with which :func:`terge.merge` writes what mergekit
writes: ``terge.merge(**from_mergekit("config.yml"), out="merged")``, or
``terge merge --mergekit config.yml -o merged``.

Every tensor's settings are resolved here as mergekit resolves them (:func:`evaluate`): a model's
own ``parameters`` before the global ones, the first matching ``filter`` of a conditional list, a
gradient (a list of numbers) interpolated at ``t = layer / (layers - 1)`` inside the transformer
blocks and at ``t = 0`` outside them (the first value), mergekit's defaults where a setting is
absent (``density`` 1, ``gamma`` 0.01, ``lambda`` 1, ``normalize`` and ``rescale`` per method).
Each is then translated to terge's setting that reproduces mergekit's definition (:data:`TABLE`),
per tensor, so the lineage records what each tensor was merged with. Keys terge cannot honour yet
(``modules``, ``chat_template``, a ``tokenizer`` with ``tokens`` overrides) are refused by name,
as are unknown ones. A LoRA reference (``model+lora``, or ``{model: ..., lora: ...}``) is
``terge.adapter(lora, base=model)``: the model with the adapter merged in, in float64.
``tokenizer_source`` (``base``, ``union``, ``model:PATH``; or ``tokenizer: {source: ...}``)
becomes ``vocabulary=`` (rows aligned by token, the output folder's tokenizer that
vocabulary's), and Hub ids (``org/name``, ``org/name@revision``) are models as everywhere in
terge.

A ``slices:`` configuration (frankenmerges, depth up-scaling) converts to :func:`terge.stack`'s
keyword arguments instead (the result holds ``slices``): ``passthrough`` slices are copied blocks,
``linear`` slices of several sources are merged block by block with each source's ``weight`` (a
number, or a gradient over the slice's blocks). As mergekit does, the tensors before the blocks
(embeddings) come from the first slice's model and those after (final norm, head) from the last
slice's: ``terge.stack(**from_mergekit("dus.yml"), out="dus")``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import MergeArgumentError
from ..io import open_checkpoint
from ..io.adapters import AdapterSpec, is_adapter_folder
from ..io.hub import hub_reference
from ..layers import layer_index
from ..layerwise import count_layers
from ..methods import (
    Method,
    arithmetic,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    karcher,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from ..sources import strip_wrappers

__all__ = ["TABLE", "evaluate", "from_mergekit"]

KEYS = {
    "models",
    "base_model",
    "merge_method",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
}
"""The top-level keys read."""
NOT_YET = {
    "modules": "per-module configurations are not supported yet; list whole models under 'models'",
    "chat_template": "chat templates are not written; remove chat_template",
}
_DTYPES = ("float64", "float32", "float16", "bfloat16")

TABLE: Mapping[str, str] = {
    "linear": "arithmetic; weight -> weights; normalize (default true) -> normalize",
    "task_arithmetic": "task_arithmetic(scale=lambda); weight -> weights; normalize (default "
    "false) -> normalize",
    "ties": "ties(density, scale=lambda, trim='exact', elect='weighted', disjoint_mean="
    "normalize (default true), rescale='l1' if rescale else 'none'); weights as given",
    "dare_ties": "dare_ties(density, scale=lambda, elect='weighted', disjoint_mean=normalize "
    "(default false), rescale='l1' if rescale (default true) else 'none'); weights as given",
    "dare_linear": "dare_linear(density, scale=lambda, rescale='l1' if rescale (default true) "
    "else 'none'); normalize (default false) -> normalize",
    "breadcrumbs": "breadcrumbs(density, gamma (default 0.01), scale=lambda, trim='exact', "
    "rescale='l1' if rescale else 'none'); normalize (default false) -> normalize",
    "slerp": "slerp(threshold=0.9995, zero='unnormalised'); t -> weights [1 - t, t] "
    "of [base_model, the other model], as given",
    "model_stock": "model_stock(clamp=False, filter_wise=filter_wise)",
    "breadcrumbs_ties": "breadcrumbs_ties(density, gamma (default 0.01), scale=lambda, "
    "trim='exact', elect='weighted', disjoint_mean=normalize (default false), rescale='l1' if "
    "rescale else 'none'); weights as given",
    "sce": "sce(select_topk, floor=1e-6) (mergekit's weights: equal below a 1e-6 sum of mean "
    "squares, the divisor at least 1e-6); weights unused",
    "nearswap": "nearswap(t); base_model and one other model (t below 1e-6 is refused: "
    "mergekit clamps |theta - base| at 1e-6 there)",
    "multislerp": "multislerp(task_vectors=base_model given, eps (default 1e-8)); weight -> "
    "weights; normalize_weights (default true) -> normalize",
    "nuslerp": "nuslerp(flatten=nuslerp_flatten (default true), row_wise=nuslerp_row_wise, "
    "task_vectors=base_model given); weight -> weights",
    "karcher": "karcher(max_iter (default 10), tol (default 1e-5)); equal weights, as mergekit",
    "della": "della(density, epsilon (default 0.15), scale=lambda, elect='weighted', "
    "disjoint_mean=normalize (default true), rescale='l1' if rescale (default true) else "
    "'none'); a model of density 1 is not pruned (epsilon 0); weights as given; terge's draws",
    "della_linear": "della_linear(density, epsilon (default 0.15), scale=lambda, rescale='l1' "
    "if rescale (default true) else 'none'); normalize (default false) -> normalize; terge's "
    "draws",
}
"""mergekit's ``merge_method`` -> terge's method and settings."""

_TASK_VECTOR = {
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
}
_CONSENSUS = {"ties", "dare_ties", "breadcrumbs_ties", "della"}
_SPARSIFYING = _TASK_VECTOR - {"task_arithmetic"}
_BASE_REQUIRED = _TASK_VECTOR | {"slerp", "model_stock", "sce", "nearswap"}
"""Methods mergekit runs only with a base_model, listed first of the inputs."""
_BASE_OPTIONAL = {"multislerp", "nuslerp"}
"""Methods over task vectors when a base_model is given, over the models otherwise."""
_NORMALIZE = {"linear": True, "ties": True, "della": True}  # mergekit's; False elsewhere
_RESCALE = {"dare_ties": True, "dare_linear": True, "della": True, "della_linear": True}
_SHARED: dict[str, dict[str, type]] = {
    "linear": {"normalize": bool},
    "task_arithmetic": {"normalize": bool, "lambda": float, "int8_mask": bool},
    "slerp": {"t": float},
    "model_stock": {"filter_wise": bool},
    "sce": {"select_topk": float, "int8_mask": bool},
    "nearswap": {"t": float},
    "multislerp": {"normalize_weights": bool, "eps": float},
    "nuslerp": {"nuslerp_flatten": bool, "nuslerp_row_wise": bool},
    "karcher": {"max_iter": float, "tol": float},
}
"""Each method's settings that hold for the whole merge (read from the global parameters)."""
_PER_MODEL: dict[str, dict[str, type]] = {
    "linear": {"weight": float},
    "multislerp": {"weight": float},
    "nuslerp": {"weight": float},
}
"""Each method's settings per model (a model's own parameters, then the global ones)."""
for _name in _SPARSIFYING:
    _SHARED[_name] = {**_SHARED["task_arithmetic"], "rescale": bool}
for _name in _TASK_VECTOR:
    _PER_MODEL[_name] = {"weight": float}
for _name in _SPARSIFYING:
    _PER_MODEL[_name] = {"weight": float, "density": float}
for _name in ("breadcrumbs", "breadcrumbs_ties"):
    _PER_MODEL[_name] = {**_PER_MODEL[_name], "gamma": float}
for _name in ("della", "della_linear"):
    _PER_MODEL[_name] = {**_PER_MODEL[_name], "epsilon": float}
_DEFAULTS: dict[str, Any] = {
    "lambda": 1.0,
    "int8_mask": False,
    "density": 1.0,
    "gamma": 0.01,
    "filter_wise": False,
}
_REQUIRED = {"weight", "t"}


def _fail(where: str, problem: str) -> MergeArgumentError:
    return MergeArgumentError(f"mergekit config {where}: {problem}")


# --- mergekit's settings: filters and gradients ---------------------------------------------------


def _validated(value: Any, kind: type, where: str) -> Any:
    """A scalar as mergekit's parameter validation reads it: numbers (or numeric strings such as
    YAML's ``1e-3``) for a number, ``true``/``false`` for a flag."""
    if kind is bool:
        if not isinstance(value, bool):
            raise _fail(where, f"must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _fail(where, f"must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise _fail(where, f"must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise _fail(where, f"must be a finite number, got {value!r}")
    return number


def evaluate(name: str, setting: Any, t: float, kind: type = float, where: str = "") -> Any:
    """One setting for the tensor ``name`` at block position ``t`` (0 outside the blocks), as
    mergekit's ``evaluate_setting``: a scalar; a gradient (numbers interpolated linearly at
    ``t``; other values picked); or conditional ``{filter, value}`` entries, the first whose
    ``filter`` is absent, ``*``, or a substring of ``name``. ``None`` where no entry matches."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validated(setting, kind, where)
    if not isinstance(setting, list):
        raise _fail(where, f"must be a value, a list or filtered values, got {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [_validated(e, kind, where) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        fraction = scaled - i0
        return _validated((1 - fraction) * values[i0] + fraction * values[i1], kind, where)
    for condition in setting:
        if not isinstance(condition, Mapping) or "value" not in condition:
            raise _fail(where, f"a list mixing values and {{filter, value}} entries: {setting!r}")
        unknown = set(condition) - {"filter", "value"}
        if unknown:
            raise _fail(where, f"a filtered value has the unknown key {sorted(unknown)[0]!r}")
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or (name and str(pattern) in name):
            return evaluate(name, condition["value"], t, kind, where)
    return None


def _resolve(
    key: str,
    kind: type,
    scopes: Sequence[tuple[str, Mapping[str, Any] | None]],
    name: str,
    t: float,
    default: Any,
) -> Any:
    """A setting from the first scope that sets it for this tensor, else its default."""
    for where, scope in scopes:
        if scope is not None and key in scope:
            value = evaluate(name, scope[key], t, kind, f"{where}.{key}")
            if value is not None:
                return value
    if key in _REQUIRED:
        raise _fail(scopes[0][0], f"the required parameter {key!r} is not set for '{name}'")
    return default


# --- the configuration ----------------------------------------------------------------------------


def _load(config: Any) -> tuple[dict[str, Any], Path]:
    """The configuration as a mapping, and the folder its relative model paths start from."""
    if isinstance(config, Mapping):
        return dict(config), Path.cwd()
    if not isinstance(config, (str, os.PathLike)):
        raise MergeArgumentError(
            f"from_mergekit() takes the path of a mergekit YAML config or its mapping; got "
            f"{type(config).__name__}."
        )
    path = Path(config).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise MergeArgumentError(
            f"cannot read the mergekit config {str(path)!r}: {error.strerror or error}."
        ) from None
    try:
        import yaml  # type: ignore[import-untyped]  # only for mergekit configs (PyYAML)
    except ImportError:
        raise MergeArgumentError(
            "reading a mergekit YAML config needs PyYAML: pip install 'terge[mergekit]' (or "
            "pass the config as a mapping)."
        ) from None

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise MergeArgumentError(
            f"the mergekit config {str(path)!r} is not valid YAML: {_one_line(error)}"
        ) from None
    if not isinstance(loaded, Mapping):
        raise MergeArgumentError(
            f"the mergekit config {str(path)!r} must be a mapping (models, merge_method, ...)."
        )
    return dict(loaded), Path.cwd()


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _path(reference: Any, where: str, root: Path) -> str:
    """A model reference as a local path or a Hub id (``org/name[@revision]``: a local path of
    that name wins, as everywhere in terge); LoRA references are :func:`_model`'s."""
    if isinstance(reference, Mapping) and set(reference) <= {"model", "lora"}:
        if reference.get("lora") is not None:
            raise _fail(where, "a LoRA reference (model+lora) is not taken here")
        reference = reference.get("model")
        if isinstance(reference, Mapping):
            reference = reference.get("path")
    if not isinstance(reference, (str, os.PathLike)):
        raise _fail(where, f"must be the path of a local checkpoint, got {reference!r}")
    text = os.fspath(reference)
    if "+" in text and not (root / text).expanduser().exists():
        raise _fail(where, f"a LoRA reference (model+lora) is not taken here: {text!r}")
    path = (root / text).expanduser()
    if not path.exists():
        if hub_reference(text) is not None:
            return text
        raise _fail(
            where,
            f"{text!r} is no local file or folder, nor a Hub id (org/name or org/name@revision)",
        )
    return os.fspath(path)


def _model(reference: Any, where: str, root: Path) -> str | AdapterSpec:
    """A model of ``models`` or ``base_model``: a path or Hub id, or a LoRA reference
    (``model+lora``, or ``{model: ..., lora: ...}``) as ``terge.adapter(lora, base=model)``,
    the adapter a local PEFT folder over its model (a path or a Hub id)."""
    lora = None
    if isinstance(reference, Mapping) and set(reference) <= {"model", "lora"}:
        lora = reference.get("lora")
        reference = reference.get("model")
        if isinstance(reference, Mapping):
            reference = reference.get("path")
        if isinstance(lora, Mapping):
            lora = lora.get("path")
    elif isinstance(reference, (str, os.PathLike)):
        text = os.fspath(reference)
        if "+" in text and not (root / text).expanduser().exists():
            reference, lora = text.split("+", 1)
    model = _path(reference, where, root)
    if lora is None:
        return model
    if not isinstance(lora, (str, os.PathLike)):
        raise _fail(where, f"its LoRA must be the path of a PEFT adapter folder, got {lora!r}")
    folder = (root / os.fspath(lora)).expanduser()
    if not is_adapter_folder(folder):
        raise _fail(
            where,
            f"its LoRA {os.fspath(lora)!r} is no local PEFT adapter folder (adapter_config.json); "
            "a LoRA on the Hub: download it first (hf download ORG/NAME --local-dir DIR)",
        )
    return AdapterSpec(folder, model)


def _key(model: str | AdapterSpec) -> Any:
    """What tells two models of a config apart: the resolved path (and an adapter's base)."""
    if isinstance(model, AdapterSpec):
        return ("adapter", model.folder.resolve(), _key(model.base))
    return Path(model).resolve()


def _vocabulary(
    loaded: Mapping[str, Any], models: Sequence[str | AdapterSpec], root: Path
) -> str | int | None:
    """mergekit's ``tokenizer_source`` (or ``tokenizer: {source: ...}``) as ``vocabulary=``:
    ``base`` and ``union`` as they are, ``model:PATH`` the index of that model in ``models``."""
    source = loaded.get("tokenizer_source")
    where = "tokenizer_source"
    if loaded.get("tokenizer") is not None:
        tokenizer = loaded["tokenizer"]
        if source is not None:
            raise _fail(
                "tokenizer", "and tokenizer_source both say where the vocabulary comes from"
            )
        if not isinstance(tokenizer, Mapping) or set(tokenizer) - {"source"}:
            extra = sorted(set(tokenizer) - {"source"}) if isinstance(tokenizer, Mapping) else []
            raise _fail(
                "tokenizer",
                f"only its source is read (per-token overrides, {extra or tokenizer!r}, are not "
                "supported); write tokenizer: {source: base | union | model:PATH}",
            )
        source, where = tokenizer.get("source"), "tokenizer.source"
    if source is None:
        return None
    if source in ("base", "union"):
        return str(source)
    if isinstance(source, str) and source.startswith("model:"):
        named = _path(source[len("model:") :], where, root)
        for index, model in enumerate(models):
            if _key(model) == _key(named):
                return index
        raise _fail(where, f"{source!r} names no model of the merge")
    raise _fail(where, f"must be base, union or model:PATH, got {source!r}")


def _dtype(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    if text not in _DTYPES:
        raise _fail(key, f"must be one of {', '.join(_DTYPES)}, got {value!r}")
    return text


def _check_keys(config: Mapping[str, Any], method: str) -> None:
    for key in config:
        if key in NOT_YET:
            raise _fail(key, NOT_YET[key] + ".")
        if key not in KEYS:
            raise _fail(
                key, f"is not a mergekit key terge reads (it reads {', '.join(sorted(KEYS))})"
            )
    if method not in TABLE:
        raise _fail(
            "merge_method",
            f"{method!r} has no terge translation yet; supported: {', '.join(TABLE)}",
        )


def _check_parameters(scope: Any, where: str, method: str) -> Mapping[str, Any] | None:
    """A ``parameters`` mapping whose keys are settings of some method: one the method does not
    take is ignored, as mergekit ignores it (a config may serve several methods); a name no
    method takes (a typo) is refused."""
    if scope is None:
        return None
    if not isinstance(scope, Mapping):
        raise _fail(where, f"must be a mapping of settings, got {scope!r}")
    known = {key for table in (_SHARED, _PER_MODEL) for keys in table.values() for key in keys}
    for key in scope:
        if key not in known:
            own = {**_SHARED.get(method, {}), **_PER_MODEL.get(method, {})}
            raise _fail(
                f"{where}.{key}",
                f"is no setting terge translates (those of {method}: {', '.join(own) or 'none'})",
            )
    return scope


def from_mergekit(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """The ``terge.merge()`` keyword arguments that reproduce a mergekit configuration.

    ``config`` is the path of mergekit's YAML file or its mapping (model paths relative to the
    current folder). The result holds ``models``, ``base``, ``method`` and ``weights`` (maps of
    every tensor name of the base checkpoint to its method and weights, resolved as mergekit
    resolves them), ``normalize``, and ``out_dtype`` (mergekit's ``out_dtype``, else its
    ``dtype``); add ``out=`` (and ``seed=`` for DARE: its draws are terge's, not mergekit's).
    terge accumulates in float64 whatever mergekit's ``dtype``, so where mergekit computes in
    float32 the results agree to float32 rounding, and where it computes in float64 the
    deterministic methods agree bit for bit. See :data:`TABLE` for each method's translation.
    """
    loaded, root = _load(config)
    method_name = loaded.get("merge_method")
    if not isinstance(method_name, str):
        raise _fail("merge_method", f"must name a merge method, got {method_name!r}")
    if "slices" in loaded:
        return _from_slices(loaded, method_name, root)
    _check_keys(loaded, method_name)
    entries = loaded.get("models")
    if not isinstance(entries, list) or not entries:
        raise _fail("models", "must be a non-empty list of {model: PATH, parameters: {...}}")
    globals_ = _check_parameters(loaded.get("parameters"), "parameters", method_name)
    paths: list[str | AdapterSpec] = []
    own: list[Mapping[str, Any] | None] = []
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if isinstance(entry, (str, os.PathLike)):
            entry = {"model": entry}
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise _fail(where, "must be {model: PATH, parameters: {...}}")
        unknown = set(entry) - {"model", "parameters"}
        if unknown:
            raise _fail(f"{where}.{sorted(unknown)[0]}", "is not a key of a model entry")
        paths.append(_model(entry["model"], f"{where}.model", root))
        own.append(_check_parameters(entry.get("parameters"), f"{where}.parameters", method_name))

    base_path = None
    if loaded.get("base_model") is not None:
        base_path = _model(loaded["base_model"], "base_model", root)
    needs_base = method_name in _BASE_REQUIRED
    if needs_base and base_path is None:
        raise _fail("base_model", f"{method_name} needs a base_model")
    if method_name in _BASE_OPTIONAL and base_path is not None:
        needs_base = True  # mergekit then interpolates the task vectors over it
    if method_name == "karcher" and base_path is not None:
        raise _fail(
            "base_model",
            "karcher takes no base_model (mergekit ignores it); list every model under models",
        )

    resolved = [_key(p) for p in paths]
    base_at = (
        None
        if base_path is None
        else next((i for i, p in enumerate(resolved) if p == _key(base_path)), None)
    )
    if needs_base:  # the base first, then the other models: mergekit's non-base inputs
        others = [i for i in range(len(paths)) if i != base_at]
        order = others
        assert base_path is not None  # needs_base: checked above
        models = [base_path, *(paths[i] for i in others)]
        base: Any = 0
    else:
        order = list(range(len(paths)))
        models = list(paths)
        base = 0 if base_path is None else (base_at if base_at is not None else base_path)
        if base_path is not None and base_at is None and globals_ and "weight" in globals_:
            # mergekit merges a base_model missing from the models too, last, with the global
            # weight (without one it has no weight and mergekit fails; terge leaves it out)
            order.append(len(paths))
            paths.append(base_path)
            own.append(None)
            models.append(base_path)
            base = len(models) - 1
    if method_name == "slerp" and len(order) != 1:
        raise _fail("models", f"slerp takes base_model and one other model, got {len(order) + 1}")
    if method_name == "model_stock" and len(order) < 2:
        raise _fail("models", "model_stock needs at least two models besides base_model")
    if method_name == "nearswap" and len(order) != 1:
        raise _fail(
            "models", f"nearswap takes base_model and one other model, got {len(order) + 1}"
        )
    if method_name == "nuslerp" and len(order) != 2:
        raise _fail("models", f"nuslerp takes two models besides base_model, got {len(order)}")

    names = _tensor_names(models[base] if isinstance(base, int) else base)
    layers = count_layers(names)
    normalize_default = _NORMALIZE.get(method_name, False)
    methods: dict[str, Method] = {}
    weights: dict[str, list[float]] = {}
    made: dict[tuple[Any, ...], Method] = {}
    merge_normalize: bool | None = None
    global_scope = [("parameters", globals_)]
    for name in names:
        index = layer_index(name)
        t = 0.0 if index is None else (index / (layers - 1) if layers > 1 else 1.0)

        def shared(key: str, kind: type, default: Any, name: str = name, t: float = t) -> Any:
            return _resolve(key, kind, global_scope, name, t, default)

        def per_model(key: str, kind: type, default: Any, name: str = name, t: float = t) -> list:
            return [
                _resolve(
                    key,
                    kind,
                    [
                        ("base_model" if i == len(entries) else f"models[{i}].parameters", own[i]),
                        *global_scope,
                    ],
                    name,
                    t,
                    default,
                )
                for i in order
            ]

        method, vector, normalize = _translate(
            method_name, shared, per_model, normalize_default, base_path is not None
        )
        key = (method.name, tuple(sorted((k, repr(v)) for k, v in method.settings.items())))
        methods[name] = made.setdefault(key, method)
        over_base = method_name in _TASK_VECTOR or (method_name in _BASE_OPTIONAL and needs_base)
        if vector and over_base:
            vector = [0.0, *vector]  # the base's own weight is unused: it contributes no vector
        if vector:  # (model_stock sets its own)
            weights[name] = vector
        if normalize is not None:
            if merge_normalize is None:
                merge_normalize = normalize
            elif merge_normalize != normalize:
                raise _fail(
                    "parameters.normalize",
                    "differs from tensor to tensor, which terge cannot apply (normalize is one "
                    "setting for the whole merge)",
                )
    result: dict[str, Any] = {
        "models": models,
        "base": base,
        "method": methods,
        "weights": weights,
        "normalize": True if merge_normalize is None else merge_normalize,
    }
    vocabulary = _vocabulary(loaded, models, root)
    if vocabulary is not None:
        result["vocabulary"] = vocabulary
    out_dtype = _dtype(loaded, "out_dtype") or _dtype(loaded, "dtype")
    if out_dtype is not None:
        result["out_dtype"] = out_dtype
    return result


def _tensor_names(model: str | AdapterSpec) -> list[str]:
    """The canonical tensor names of the checkpoint that supplies the merge's defaults (an
    adapter's: its base's)."""
    path = model.base if isinstance(model, AdapterSpec) else model
    with open_checkpoint(path) as reader:
        return [strip_wrappers(name) for name in reader.names()]


Resolver = Callable[[str, type, Any], Any]


def _rescale(shared: Resolver, method: str) -> str:
    return "l1" if shared("rescale", bool, _RESCALE.get(method, False)) else "none"


def _one(values: list[float]) -> float | list[float]:
    """Per-model values, or one value where every model has the same."""
    return values[0] if len(set(values)) == 1 else values


def _translate(
    method: str, shared: Resolver, per_model: Resolver, normalize_default: bool, based: bool
) -> tuple[Method, list[float], bool | None]:
    """One tensor's method, its models' weights (the base excluded), and the ``normalize`` of
    the merge it needs (``None``: any). ``based``: a base_model is given."""
    translated = _translate_other(method, shared, per_model, based)
    if translated is not None:
        return translated
    if method == "slerp":
        t = shared("t", float, None)
        return slerp(threshold=0.9995, zero="unnormalised"), [1 - t, t], False
    if method == "model_stock":
        return model_stock(clamp=False, filter_wise=shared("filter_wise", bool, False)), [], None
    weight = per_model("weight", float, None)
    normalize = shared("normalize", bool, normalize_default)
    if method == "linear":
        return arithmetic(), weight, normalize
    scale = shared("lambda", float, 1.0)
    shared("int8_mask", bool, False)  # the mask's dtype: no effect on the values
    if method == "task_arithmetic":
        return task_arithmetic(scale=scale), weight, normalize
    density = _one(per_model("density", float, 1.0))
    rescale = _rescale(shared, method)
    if method == "ties":
        configured = ties(
            density=density,
            scale=scale,
            trim="exact",
            elect="weighted",
            disjoint_mean=normalize,
            rescale=rescale,
        )
        return configured, weight, False
    if method == "dare_ties":
        configured = dare_ties(
            density=density, scale=scale, elect="weighted", disjoint_mean=normalize, rescale=rescale
        )
        return configured, weight, False
    if method == "dare_linear":
        return dare_linear(density=density, scale=scale, rescale=rescale), weight, normalize
    if method in ("della", "della_linear"):
        densities, epsilons = _della_settings(per_model)
        if method == "della":
            configured = della(
                density=densities,
                epsilon=epsilons,
                scale=scale,
                rescale=rescale,
                elect="weighted",
                disjoint_mean=normalize,
            )
            return configured, weight, False
        configured = della_linear(density=densities, epsilon=epsilons, scale=scale, rescale=rescale)
        return configured, weight, normalize
    gamma = _one(per_model("gamma", float, 0.01))
    if method == "breadcrumbs_ties":
        configured = breadcrumbs_ties(
            density=density,
            gamma=gamma,
            scale=scale,
            trim="exact",
            rescale=rescale,
            elect="weighted",
            disjoint_mean=normalize,
        )
        return configured, weight, False
    configured = breadcrumbs(
        density=density, gamma=gamma, scale=scale, trim="exact", rescale=rescale
    )
    return configured, weight, normalize


def _della_settings(per_model: Resolver) -> tuple[Any, Any]:
    """Each model's (density, epsilon) as mergekit's ``della_magprune`` reads them: a density of
    1 or more prunes nothing (terge: density 1, epsilon 0, every entry kept), otherwise
    ``density +/- epsilon`` must lie in (0, 1), as mergekit requires."""
    densities, epsilons = [], []
    for i, (d, e) in enumerate(
        zip(per_model("density", float, 1.0), per_model("epsilon", float, 0.15), strict=True)
    ):
        if d >= 1:
            d, e = 1.0, 0.0
        elif d <= 0:
            raise _fail(
                f"models[{i}].parameters.density",
                f"is {d!r}: mergekit prunes every entry there; leave the model out instead",
            )
        elif not (d - e > 0 and d + e < 1):
            raise _fail(
                f"models[{i}].parameters.epsilon",
                f"density {d!r} +/- epsilon {e!r} must lie in (0, 1), as mergekit requires",
            )
        densities.append(d)
        epsilons.append(e)
    return _one(densities), _one(epsilons)


def _translate_other(
    method: str, shared: Resolver, per_model: Resolver, based: bool
) -> tuple[Method, list[float], bool | None] | None:
    """The methods outside mergekit's task-arithmetic family, or ``None`` for those."""
    if method == "sce":
        shared("int8_mask", bool, False)  # the mask's dtype: no effect on the values
        return sce(select_topk=shared("select_topk", float, 1.0), floor=1e-6), [], None
    if method == "nearswap":
        t = shared("t", float, None)
        if t < 1e-6:
            raise _fail(
                "parameters.t",
                f"is {t!r}; below 1e-6 mergekit clamps |theta - base| at 1e-6, which terge's "
                "nearswap does not reproduce",
            )
        return nearswap(t=t), [], None
    if method == "multislerp":
        configured = multislerp(task_vectors=based, eps=shared("eps", float, 1e-8))
        normalize = shared("normalize_weights", bool, True)
        return configured, per_model("weight", float, None), normalize
    if method == "nuslerp":
        configured = nuslerp(
            flatten=shared("nuslerp_flatten", bool, True),
            row_wise=shared("nuslerp_row_wise", bool, False),
            task_vectors=based,
        )
        return configured, per_model("weight", float, None), None
    if method == "karcher":
        max_iter = shared("max_iter", float, 10)
        if max_iter != int(max_iter):
            raise _fail("parameters.max_iter", f"must be a whole number, got {max_iter!r}")
        configured = karcher(max_iter=int(max_iter), tol=shared("tol", float, 1e-5))
        return configured, [], None
    return None


# --- slices: terge.stack --------------------------------------------------------------------------

SLICE_KEYS = {"slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype"}
"""The top-level keys of a ``slices:`` configuration terge reads."""
SLICE_METHODS = ("passthrough", "linear")


def _from_slices(loaded: Mapping[str, Any], method_name: str, root: Path) -> dict[str, Any]:
    """``terge.stack()`` keyword arguments for a mergekit ``slices:`` configuration."""
    from ..stacking import StackError, blocks

    for key in loaded:
        if key in NOT_YET:
            raise _fail(key, NOT_YET[key] + ".")
        if key not in SLICE_KEYS:
            raise _fail(
                key,
                f"is not a key of a slices config terge reads ({', '.join(sorted(SLICE_KEYS))})",
            )
    if method_name not in SLICE_METHODS:
        raise _fail(
            "merge_method",
            f"{method_name!r} over slices has no terge translation yet; slices convert with "
            f"{' or '.join(SLICE_METHODS)}",
        )
    entries = loaded.get("slices")
    if not isinstance(entries, list) or not entries:
        raise _fail("slices", "must be a non-empty list of {sources: [{model, layer_range}]}")
    globals_ = _slice_parameters(loaded.get("parameters"), "parameters", method_name)
    slices: list[Any] = []
    for i, entry in enumerate(entries):
        where = f"slices[{i}]"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("sources"), list):
            raise _fail(where, "must be {sources: [{model: PATH, layer_range: [START, STOP]}]}")
        unknown = set(entry) - {"sources", "parameters"}
        if unknown:
            raise _fail(f"{where}.{sorted(unknown)[0]}", "is not a key of a slice")
        own = _slice_parameters(entry.get("parameters"), f"{where}.parameters", method_name)
        sources = entry["sources"]
        if not sources:
            raise _fail(f"{where}.sources", "is empty")
        if method_name == "passthrough" and len(sources) != 1:
            raise _fail(
                f"{where}.sources", f"passthrough takes one source per slice, got {len(sources)}"
            )
        parts = []
        for j, source in enumerate(sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(source, Mapping) or "model" not in source:
                raise _fail(at, "must be {model: PATH, layer_range: [START, STOP]}")
            unknown = set(source) - {"model", "layer_range", "parameters"}
            if unknown:
                raise _fail(f"{at}.{sorted(unknown)[0]}", "is not a key of a slice source")
            span: Any = source.get("layer_range")
            ok = isinstance(span, list) and len(span) == 2
            if not ok or any(isinstance(x, bool) or not isinstance(x, int) for x in span):
                raise _fail(f"{at}.layer_range", f"must be [START, STOP], two ints, got {span!r}")
            scopes = [
                (
                    f"{at}.parameters",
                    _slice_parameters(source.get("parameters"), f"{at}.parameters", method_name),
                ),
                (f"{where}.parameters", own),
                ("parameters", globals_),
            ]
            weight = _slice_weight(scopes)
            try:
                parts.append(
                    blocks(_path(source["model"], f"{at}.model", root), *span, weight=weight)
                )
            except StackError as error:
                raise _fail(at, str(error)) from None
        if len(parts) > 1 and i in (0, len(entries) - 1):
            raise _fail(
                where,
                "merges several sources in the first or last slice, where mergekit also merges "
                "the embeddings or the head; terge.stack takes those from one model: make the "
                "first and last slices single-source (passthrough-like)",
            )
        slices.append(parts if len(parts) > 1 else parts[0])
    first, last = slices[0], slices[-1]
    result: dict[str, Any] = {
        "slices": slices,
        "base": first.model,
        "head": last.model,
        "method": "arithmetic",
    }
    out_dtype = _dtype(loaded, "out_dtype") or _dtype(loaded, "dtype")
    if out_dtype is not None:
        result["out_dtype"] = out_dtype
    return result


def _slice_parameters(scope: Any, where: str, method: str) -> Mapping[str, Any] | None:
    if scope is None:
        return None
    if not isinstance(scope, Mapping):
        raise _fail(where, f"must be a mapping of settings, got {scope!r}")
    allowed = {"weight", "normalize"} if method == "linear" else set()
    for key, value in scope.items():
        if key not in allowed:
            raise _fail(
                f"{where}.{key}",
                f"is no setting terge translates for {method} slices "
                f"({', '.join(sorted(allowed)) or 'none'})",
            )
        if key == "normalize" and value is not True:
            raise _fail(f"{where}.normalize", "must be true: terge.stack normalises the weights")
    return scope


def _slice_weight(scopes: Sequence[tuple[str, Mapping[str, Any] | None]]) -> Any:
    """A source's weight: its own, its slice's, then the global one (default 1); a list is a
    gradient over the slice's blocks."""
    for where, scope in scopes:
        if scope is None or "weight" not in scope:
            continue
        value = scope["weight"]
        if (
            isinstance(value, list)
            and value
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            return [float(v) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(
            f"{where}.weight",
            f"must be a number or a gradient (a list of numbers), got {value!r} (filtered "
            "weights are not translated for slices)",
        )
    return 1.0
