"""Merge settings as text: the ``terge merge`` command line's values and TOML recipes.

Both read settings into one :class:`Settings`, so a recipe and the command line say the same
things the same way (command-line values override a recipe's, field by field).

**Patterns** (``--include``, ``--exclude``, a recipe's ``include``/``exclude`` and the ``pattern``
of its ``[[weights]]`` and ``[[method]]`` tables) are strings read by one rule:

* ``re:REGEX`` is a regular expression that matches a name when ``search`` finds it anywhere in
  it (``re:mlp`` matches ``layers.0.mlp.up.weight``; anchor with ``^``/``$``);
* ``layers:SPEC`` selects transformer blocks with :func:`terge.layers.layers`: ``layers:0-5``,
  ``layers:0-3,8``, and the words ``embeddings`` and ``head`` add those (``layers:0-5,embeddings``,
  ``layers:head``);
* ``name:NAME``, or any other string, is an exact tensor name (``name:`` is only needed for a
  name that itself starts with ``re:``, ``layers:`` or ``name:``).

**Methods** are ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE`` (``ties:density=0.3,scale=0.8`` is
``terge.methods.ties(density=0.3, scale=0.8)``); a recipe may also give a method as a table,
``{name = "ties", density = 0.3}``.

**A recipe** is a TOML file; see :data:`RECIPE_EXAMPLE` and :data:`RECIPE_KEYS`. Relative paths in
it resolve against the recipe's own folder, so a recipe can travel with its models.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import torch

from ..errors import RecipeError, TergeError
from ..io import parse_size
from ..io.hub import PREFIX, hub_shaped
from ..io.parsing import ParseProblem, check_depth, decode_utf8, read_capped
from ..layers import layers
from ..methods import REGISTRY, Method
from ..output import OUT_FORMATS

__all__ = [
    "RECIPE_EXAMPLE",
    "RECIPE_KEYS",
    "Settings",
    "load_recipe",
    "method_from",
    "method_settings",
    "parse_count",
    "parse_dtype",
    "parse_method",
    "parse_mode",
    "parse_out_format",
    "parse_pattern",
    "parse_recipe",
    "parse_slices",
    "parse_vocabulary",
    "parse_weights",
]


RECIPE_EXAMPLE = """\
models = ["base", "math", "code"]   # paths, relative to this file's folder
base = 0                            # an index into models, or a path
out = "merged"                      # the output folder (sharded safetensors)
out_dtype = "bfloat16"              # default: keep each tensor's dtype
max_shard_size = "2GB"
seed = 1
exclude = ['re:^lm_head\\.']         # 'literal' strings keep backslashes
lineage = "merged.lineage.json"     # also write the lineage here

[[weights]]                         # first match wins, in file order;
pattern = "re:mlp"                  # names no pattern matches weigh models equally
values = [1, 2, 3]                  # one per model
[[weights]]
pattern = "re:.*"
values = [1, 1, 1]

[[method]]                          # first match wins; a merged tensor must match one
pattern = "re:attn"
name = "ties"
density = 0.3                       # the method's settings
[[method]]
pattern = "re:.*"
name = "task_arithmetic"
"""
"""A recipe using most keys, as ``terge merge --help`` shows it."""

RECIPE_KEYS: Mapping[str, str] = {
    "models": "list of model paths (files or Hugging Face-style folders; a training "
    "checkpoint's entry as PATH::ENTRY), or with last/best a glob or folder to choose from",
    "base": "index into models, or a path (default 0)",
    "out": "output folder",
    "method": 'method spec ("ties:density=0.3"), table, or [[method]] tables with a pattern',
    "weights": "list of numbers, one per model, or [[weights]] tables with pattern and values",
    "include": "pattern or list of patterns: merge only these tensors",
    "exclude": "pattern or list of patterns: never merge these tensors",
    "dtype": '"float64" (default) or "float32": the dtype the merge accumulates in',
    "out_dtype": 'dtype of the written floating tensors, e.g. "bfloat16"',
    "max_shard_size": 'largest shard, e.g. "2GB" or "500MiB" (default "5GB")',
    "out_format": '"safetensors" (default), "dcp" (a torch.distributed.checkpoint folder) or '
    '"lora" (a PEFT LoRA adapter over the base)',
    "lora_rank": 'with out_format = "lora": int, the rank of every factored module',
    "lora_energy": 'with out_format = "lora", instead of lora_rank: the share in (0, 1] of each '
    "difference's squared singular values to keep",
    "lora_embeddings": 'bool: with out_format = "lora", factor embeddings too',
    "seed": "int seeding random methods (dare_*)",
    "vocabulary": '"base", "union" or a model index: align embedding rows by token',
    "lineage": "also write the lineage JSON to this path (not inside an input)",
    "overwrite": "bool: replace out, and lineage, if they exist",
    "normalize": "bool: divide weights by their sum (default true)",
    "last": "int: merge the last N of the models' checkpoints (by the trainer's step, or name)",
    "best": "int: merge the best N of the models' checkpoints by metric",
    "metric": 'with best: the metric to rank by, e.g. "val_loss" or "eval_loss"',
    "mode": '"min" or "max": with best, whether lower or higher metric is better (default: '
    'the trainer\'s record, else "min" for a loss)',
    "slices": "[[slices]] tables: stack blocks instead of merging models (terge.stack): "
    "model and layer_range = [start, stop] (stop excluded), or sources = [{model, layer_range, "
    "weight}, ...] merged block by block",
    "head": "with slices: the model whose head (final norm, lm_head) the stack takes",
}
"""Every key a recipe may hold, with what it takes."""

_PATTERN_FORMS = (
    "'re:REGEX' (searched anywhere in the name), 'layers:0-5' (transformer blocks; add "
    "',embeddings' or ',head'), or an exact tensor name"
)
_ACCUMULATE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


# --- settings -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What ``terge merge`` does; ``None`` means "not given here" (a default or another source's).

    Values are already checked and converted: paths are ``Path``s, patterns are what
    ``terge.merge`` takes (``str`` or compiled), methods are ``Method``s.
    """

    models: tuple[Path, ...] | None = None
    base: int | Path | None = None
    out: Path | None = None
    method: Method | dict[Any, Method] | None = None
    weights: tuple[float, ...] | dict[Any, tuple[float, ...]] | None = None
    include: tuple[Any, ...] | None = None
    exclude: tuple[Any, ...] | None = None
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    max_shard_size: int | str | None = None
    out_format: str | None = None
    lora_rank: int | None = None
    lora_energy: float | None = None
    lora_embeddings: bool | None = None
    seed: int | None = None
    vocabulary: str | int | None = None
    lineage: Path | None = None
    overwrite: bool | None = None
    normalize: bool | None = None
    last: int | None = None
    best: int | None = None
    metric: str | None = None
    mode: str | None = None
    slices: tuple[Any, ...] | None = None
    """``terge.stack`` slices (``terge.blocks`` or lists of them), paths resolved."""
    head: Path | None = None

    def updated(self, other: Settings) -> Settings:
        """These settings with every value ``other`` gives replacing this one's."""
        changes = {
            f.name: getattr(other, f.name)
            for f in dataclasses.fields(other)
            if getattr(other, f.name) is not None
        }
        return dataclasses.replace(self, **changes)


# --- single values --------------------------------------------------------------------------------


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_pattern(text: Any, where: str) -> Any:
    """A pattern string (see the module's docstring) as ``terge.merge`` takes it."""
    if not isinstance(text, str):
        raise RecipeError(
            f"{where} must be a pattern string, {_PATTERN_FORMS}; got {text!r} "
            f"({type(text).__name__})."
        )
    if text.startswith("re:"):
        expression = text[3:]
        if not expression:
            raise RecipeError(f"{where}: 're:' needs a regular expression after it, e.g. 're:mlp'.")
        try:
            return regex.compile(expression)
        except regex.error as error:
            raise RecipeError(
                f"{where}: {expression!r} is not a valid regular expression: {error}."
            ) from None
    if text.startswith("layers:"):
        words = [word.strip() for word in text[7:].split(",")]
        flags = {"embeddings", "head"}
        spec = ",".join(word for word in words if word not in flags)
        try:
            return layers(
                *([spec] if spec else []),
                embeddings="embeddings" in words,
                head="head" in words,
            )
        except TergeError as error:
            raise RecipeError(f"{where}: {text!r}: {error}") from None
    if text.startswith("name:"):
        text = text[5:]
    if not text:
        raise RecipeError(f"{where}: a pattern cannot be empty; give {_PATTERN_FORMS}.")
    return text


def _setting_value(text: str) -> Any:
    """A method setting's value from text: an int, a float, true/false, or the text itself."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    return text


def method_settings(name: str) -> list[str]:
    return [
        parameter.name
        for parameter in inspect.signature(REGISTRY[name].factory).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]


def method_from(name: Any, settings: Mapping[str, Any], where: str) -> Method:
    """The registry's method ``name`` configured with ``settings`` (checked by its factory)."""
    if not isinstance(name, str):
        raise RecipeError(f"{where}: the method name must be a string; got {name!r}.")
    if name not in REGISTRY:
        raise RecipeError(
            f"{where}: unknown merge method {name!r}{_did_you_mean(name, REGISTRY)}; the valid "
            f"names are {', '.join(REGISTRY)}."
        )
    needed = [
        parameter.name
        for parameter in inspect.signature(REGISTRY[name].factory).parameters.values()
        if parameter.default is inspect.Parameter.empty
    ]
    if needed:
        raise RecipeError(
            f"{where}: method {name!r} needs {', '.join(needed)} (per-model statistics, tensors), "
            f"which a command line or recipe cannot give; merge in Python with "
            f"terge.methods.{name}({needed[0]}=[...])."
        )
    valid = method_settings(name)
    for key in settings:
        if key not in valid:
            takes = f"its settings are {', '.join(valid)}" if valid else "it takes no settings"
            raise RecipeError(
                f"{where}: method {name!r} has no setting {key!r}{_did_you_mean(key, valid)}; "
                f"{takes}."
            )
    try:
        return REGISTRY[name].factory(**settings)
    except TergeError as error:
        raise RecipeError(f"{where}: {error}") from None


def parse_method(spec: Any, where: str) -> Method:
    """``"NAME"`` or ``"NAME:KEY=VALUE,..."`` as a configured method."""
    if not isinstance(spec, str):
        raise RecipeError(f"{where} must be a method spec string; got {spec!r}.")
    name, _, rest = spec.partition(":")
    name = name.strip()
    settings: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, equals, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not equals or not key or not value:
                raise RecipeError(
                    f"{where}: cannot read {spec!r}: settings are KEY=VALUE pairs separated by "
                    "commas, e.g. 'ties:density=0.3,scale=0.8'."
                )
            if key in settings:
                raise RecipeError(f"{where}: {spec!r} sets {key!r} twice.")
            settings[key] = _setting_value(value)
    return method_from(name, settings, where)


def parse_weights(text: str, where: str) -> tuple[float, ...]:
    """``"1,2,3"`` as weights."""
    try:
        values = tuple(float(item) for item in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(value) for value in values):
        raise RecipeError(
            f"{where}: {text!r} is not a comma-separated list of finite numbers, one per model; "
            "e.g. 1,2,3 (write --weights=-1,1 when the first is negative)."
        )
    return values


def parse_dtype(text: Any, where: str) -> torch.dtype:
    """The accumulation dtype: ``"float64"`` or ``"float32"``."""
    if not isinstance(text, str) or text not in _ACCUMULATE_DTYPES:
        raise RecipeError(
            f"{where} must be one of {', '.join(map(repr, _ACCUMULATE_DTYPES))}; got {text!r}."
        )
    return _ACCUMULATE_DTYPES[text]


def parse_out_dtype(text: Any, where: str) -> torch.dtype:
    """A floating dtype name for the written tensors (``"bfloat16"``, ``"float16"``, ...)."""
    dtype = getattr(torch, text, None) if isinstance(text, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RecipeError(
            f"{where} must name a floating torch dtype such as 'bfloat16', 'float16' or "
            f"'float32'; got {text!r}."
        )
    return dtype


def parse_shard_size(value: Any, where: str) -> int | str:
    """A size such as ``"2GB"`` (checked by :func:`terge.io.parse_size`)."""
    try:
        parse_size(value)
    except TergeError as error:
        raise RecipeError(f"{where}: {error}") from None
    return value


def parse_vocabulary(value: Any, where: str) -> str | int:
    """The output vocabulary: ``"base"``, ``"union"`` or a model index (a digit string too)."""
    if isinstance(value, str) and value.isdecimal():  # not isdigit: int() refuses '²'
        return int(value)
    if value in ("base", "union") or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    hint = _did_you_mean(value, ("base", "union")) if isinstance(value, str) else ""
    raise RecipeError(
        f"{where} must be 'base', 'union' or a model index (aligning embedding rows by "
        f"token); got {value!r}{hint}."
    )


def parse_out_format(value: Any, where: str) -> str:
    """What the output is written as: ``"safetensors"``, ``"dcp"`` or ``"lora"``."""
    if value not in OUT_FORMATS:
        raise RecipeError(
            f"{where} must be one of {', '.join(map(repr, OUT_FORMATS))} (a safetensors folder, "
            f"a torch.distributed.checkpoint folder, or a LoRA adapter over the base); got "
            f"{value!r}"
            f"{_did_you_mean(value, OUT_FORMATS) if isinstance(value, str) else ''}."
        )
    return str(value)


# --- recipes --------------------------------------------------------------------------------------


def _toml() -> Any:
    return toml_module(RecipeError, "recipe")


def toml_module(error: type[TergeError], what: str) -> Any:
    """``tomllib`` (Python 3.11+) or ``tomli``; ``error`` says how to get one, reading ``what``."""
    for name in ("tomllib", "tomli"):  # tomli: Python 3.10
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    raise error(
        f"reading a TOML {what} needs Python 3.11 or later (for tomllib), or the tomli "
        "package on Python 3.10: pip install tomli."
    )


MAX_RECIPE_BYTES = 1 << 24
"""The largest recipe read (16 MiB; a recipe is a few lines): ``/dev/urandom`` is refused."""


def load_recipe(path: str | Path) -> Settings:
    """Read a TOML recipe; relative paths in it resolve against its folder.

    A pipe (``--recipe <(...)``) is read too, up to :data:`MAX_RECIPE_BYTES`; every error names
    the file.
    """
    toml = _toml()
    path = Path(path)
    try:
        raw = read_capped(path, MAX_RECIPE_BYTES, regular=False)
    except FileNotFoundError:
        raise RecipeError(f"recipe file {str(path)!r} not found.") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {str(path)!r} is a folder; give a TOML file.") from None
    except OSError as error:
        raise RecipeError(f"cannot read recipe {str(path)!r}: {error.strerror or error}.") from None
    except ParseProblem as problem:
        raise RecipeError(f"recipe {str(path)!r} {problem}; give a TOML file.") from None
    what = f"recipe {str(path)!r}"
    try:
        data = toml.loads(decode_utf8(raw, what))
        check_depth(data, what)
    except ParseProblem as problem:
        raise RecipeError(f"{problem}.") from None
    except RecursionError:
        raise RecipeError(f"{what} nests arrays or tables too deeply to read.") from None
    except toml.TOMLDecodeError as error:
        raise RecipeError(f"{path}: not valid TOML: {error}.") from None
    return parse_recipe(data, path.parent, str(path))


def _type_error(where: str, expected: str, value: Any) -> RecipeError:
    return RecipeError(f"{where} must be {expected}; got {value!r} ({type(value).__name__}).")


def _path(value: Any, folder: Path, where: str, hub: bool = False) -> Path:
    """A path relative to the recipe's folder; with ``hub``, a Hub model (``org/name@rev``) that
    no file beside the recipe shadows stays a Hub reference (``hf://``: the Hub, always)."""
    if not isinstance(value, str) or not value:
        raise _type_error(where, "a path (a non-empty string)", value)
    local = folder / Path(value).expanduser()
    if hub and hub_shaped(value) and (value.startswith(PREFIX) or not local.exists()):
        return Path(PREFIX + value.removeprefix(PREFIX))  # read back by terge.io.hub
    return local


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(where, "true or false", value)
    return value


def _numbers(value: Any, where: str) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise _type_error(where, "a non-empty list of numbers, one per model", value)
    for item in value:
        if isinstance(item, bool) or not isinstance(item, numbers.Real):
            raise _type_error(where, "a list of numbers, one per model", value)
        if not math.isfinite(item):
            raise RecipeError(f"{where} holds {item!r}; weights must be finite numbers.")
    return tuple(float(item) for item in value)


def _tables(value: list, where: str) -> list[Mapping[str, Any]]:
    for index, table in enumerate(value):
        if not isinstance(table, Mapping):
            raise _type_error(f"{where}[{index}]", "a table", table)
    return value


def _check_keys(table: Mapping[str, Any], valid: list[str], where: str) -> None:
    for key in table:
        if key not in valid:
            raise RecipeError(
                f"{where}: unknown key {key!r}{_did_you_mean(key, valid)}; the valid keys are "
                f"{', '.join(valid)}."
            )
    for key in valid:
        if key not in table:
            raise RecipeError(f"{where}: missing key {key!r}.")


def _patterned(tables: list[Mapping[str, Any]], where: str) -> list[tuple[str, Any]]:
    """``(where, pattern)`` for each table, refusing repeated patterns (one would be dead): the
    same text, or texts that read as the same pattern (``x`` and ``name:x``), which would also
    share one key of the dict the tables become."""
    seen: set[str] = set()
    patterns: dict[Any, str] = {}  # each pattern as read -> the text that gave it
    found = []
    for index, table in enumerate(tables):
        here = f"{where} #{index + 1}"
        if "pattern" not in table:
            raise RecipeError(f"{here}: missing key 'pattern'.")
        text = table["pattern"]
        pattern = parse_pattern(text, f"{here}: 'pattern'")
        if text in seen or pattern in patterns:
            earlier = patterns.get(pattern, text)
            same = "" if earlier == text else f" as {earlier!r}"
            raise RecipeError(
                f"{here}: the pattern {text!r} is already used by an earlier table{same}, so this "
                "one would never match; remove one."
            )
        seen.add(text)
        patterns[pattern] = text
        found.append((f"{here} (pattern {text!r})", pattern))
    return found


def _method_value(value: Any, source: str) -> Method | dict[Any, Method]:
    where = f"{source}: 'method'"
    if isinstance(value, str):
        return parse_method(value, where)
    if isinstance(value, Mapping):  # [method] or method = {name = ..., ...}
        if "pattern" in value:
            raise RecipeError(
                f"{where}: a single [method] table applies to every tensor and takes no "
                "'pattern'; write [[method]] tables (double brackets) to choose by pattern."
            )
        if "name" not in value:
            raise RecipeError(f"{where}: missing key 'name' (the method's name).")
        settings = {k: v for k, v in value.items() if k != "name"}
        return method_from(value["name"], settings, where)
    if isinstance(value, list) and value:
        tables = _tables(value, where)
        methods: dict[Any, Method] = {}
        for table, (here, pattern) in zip(tables, _patterned(tables, f"{source}: [[method]]")):
            if "name" not in table:
                raise RecipeError(f"{here}: missing key 'name' (the method's name).")
            settings = {k: v for k, v in table.items() if k not in ("pattern", "name")}
            methods[pattern] = method_from(table["name"], settings, here)
        return methods
    raise _type_error(
        where, 'a method spec string ("ties:density=0.3"), a table or [[method]] tables', value
    )


def _weights_value(value: Any, source: str) -> tuple[float, ...] | dict[Any, tuple[float, ...]]:
    where = f"{source}: 'weights'"
    if isinstance(value, list) and value and any(isinstance(v, Mapping) for v in value):
        tables = _tables(value, where)
        weights: dict[Any, tuple[float, ...]] = {}
        for table, (here, pattern) in zip(tables, _patterned(tables, f"{source}: [[weights]]")):
            _check_keys(table, ["pattern", "values"], here)
            weights[pattern] = _numbers(table["values"], f"{here}: 'values'")
        return weights
    return _numbers(value, where)


def _patterns(value: Any, where: str) -> tuple[Any, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _type_error(where, "a pattern string or a non-empty list of them", value)
    return tuple(parse_pattern(item, f"{where}[{i}]") for i, item in enumerate(items))


def parse_recipe(data: Mapping[str, Any], folder: Path, source: str = "recipe") -> Settings:
    """Settings from a recipe's parsed TOML; ``folder`` anchors its relative paths and ``source``
    (the file's name) begins every error message."""
    for key in data:
        if key not in RECIPE_KEYS:
            raise RecipeError(
                f"{source}: unknown key {key!r}{_did_you_mean(key, RECIPE_KEYS)}; the valid keys "
                f"are {', '.join(RECIPE_KEYS)}."
            )

    def where(key: str) -> str:
        return f"{source}: {key!r}"

    found: dict[str, Any] = {}
    if "models" in data:
        models = data["models"]
        if not isinstance(models, list) or not models:
            raise _type_error(where("models"), "a non-empty list of paths", models)
        found["models"] = tuple(
            _path(m, folder, f"{where('models')}[{i}]", hub=True) for i, m in enumerate(models)
        )
    if "base" in data:
        base = data["base"]
        if isinstance(base, int) and not isinstance(base, bool):
            found["base"] = base
        elif isinstance(base, str):
            found["base"] = _path(base, folder, where("base"), hub=True)
        else:
            raise _type_error(where("base"), "an index into models or a path", base)
    for key in ("out", "lineage"):
        if key in data:
            found[key] = _path(data[key], folder, where(key))
    if "method" in data:
        found["method"] = _method_value(data["method"], source)
    if "weights" in data:
        found["weights"] = _weights_value(data["weights"], source)
    for key in ("include", "exclude"):
        if key in data:
            found[key] = _patterns(data[key], where(key))
    if "dtype" in data:
        found["dtype"] = parse_dtype(data["dtype"], where("dtype"))
    if "out_dtype" in data:
        found["out_dtype"] = parse_out_dtype(data["out_dtype"], where("out_dtype"))
    if "max_shard_size" in data:
        found["max_shard_size"] = parse_shard_size(data["max_shard_size"], where("max_shard_size"))
    if "out_format" in data:
        found["out_format"] = parse_out_format(data["out_format"], where("out_format"))
    if "vocabulary" in data:
        found["vocabulary"] = parse_vocabulary(data["vocabulary"], where("vocabulary"))
    if "lora_rank" in data:
        rank = data["lora_rank"]
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise _type_error(where("lora_rank"), "a positive integer", rank)
        found["lora_rank"] = rank
    if "lora_energy" in data:
        energy = data["lora_energy"]
        if isinstance(energy, bool) or not isinstance(energy, (int, float)):
            raise _type_error(where("lora_energy"), "a number in (0, 1]", energy)
        found["lora_energy"] = float(energy)
    if "lora_embeddings" in data:
        found["lora_embeddings"] = _bool(data["lora_embeddings"], where("lora_embeddings"))
    if "seed" in data:
        seed = data["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _type_error(where("seed"), "an integer", seed)
        found["seed"] = seed
    for key in ("overwrite", "normalize"):
        if key in data:
            found[key] = _bool(data[key], where(key))
    for key in ("last", "best"):
        if key in data:
            found[key] = parse_count(data[key], where(key))
    if "metric" in data:
        metric = data["metric"]
        if not isinstance(metric, str) or not metric:
            raise _type_error(where("metric"), 'a metric\'s name such as "val_loss"', metric)
        found["metric"] = metric
    if "mode" in data:
        found["mode"] = parse_mode(data["mode"], where("mode"))
    if "slices" in data:
        found["slices"] = parse_slices(data["slices"], folder, where("slices"))
    if "head" in data:
        found["head"] = _path(data["head"], folder, where("head"))
    return Settings(**found)


_SLICE_FORMS = (
    "{model = PATH, layer_range = [START, STOP]} (blocks START to STOP - 1) or {sources = "
    "[{model = PATH, layer_range = [START, STOP], weight = W}, ...]} (merged block by block)"
)


def parse_slices(value: Any, folder: Path, where: str) -> tuple[Any, ...]:
    """``[[slices]]`` tables as ``terge.stack`` slices: mergekit's ``slices:`` one to one."""
    if not isinstance(value, list) or not value:
        raise _type_error(where, f"a non-empty list of tables, each {_SLICE_FORMS}", value)
    slices: list[Any] = []
    for i, table in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(table, Mapping):
            raise _type_error(at, f"a table, {_SLICE_FORMS}", table)
        if "sources" in table:
            _unknown_keys(table, ["sources"], at)
            sources = table["sources"]
            if not isinstance(sources, list) or not sources:
                raise _type_error(f"{at}.sources", "a non-empty list of tables", sources)
            slices.append(
                [
                    _slice_source(item, folder, f"{at}.sources[{j}]")
                    for j, item in enumerate(sources)
                ]
            )
        else:
            slices.append(_slice_source(table, folder, at))
    return tuple(slices)


def _unknown_keys(table: Mapping[str, Any], valid: list[str], where: str) -> None:
    for key in table:
        if key not in valid:
            raise RecipeError(
                f"{where}: unknown key {key!r}{_did_you_mean(key, valid)}; the valid keys are "
                f"{', '.join(valid)}."
            )


def _slice_source(table: Any, folder: Path, where: str) -> Any:
    from ..stacking import StackError, blocks

    if not isinstance(table, Mapping):
        raise _type_error(where, f"a table, {_SLICE_FORMS}", table)
    _unknown_keys(table, ["model", "layer_range", "weight"], where)
    for key in ("model", "layer_range"):
        if key not in table:
            raise RecipeError(f"{where} has no {key!r}; give {_SLICE_FORMS}.")
    span = table["layer_range"]
    ok = isinstance(span, list) and len(span) == 2
    if not ok or any(isinstance(x, bool) or not isinstance(x, int) for x in span):
        raise _type_error(f"{where}.layer_range", "[START, STOP], two ints (STOP excluded)", span)
    weight = table.get("weight", 1.0)
    if isinstance(weight, list):
        weight = list(_numbers(weight, f"{where}.weight"))
    try:
        return blocks(_path(table["model"], folder, f"{where}.model"), *span, weight=weight)
    except StackError as error:
        raise RecipeError(f"{where}: {error}") from None


def parse_count(value: Any, where: str) -> int:
    """How many checkpoints ``last``/``best`` choose: an int >= 1."""
    if isinstance(value, str) and value.strip().isdecimal():  # not isdigit: int() refuses '²'
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RecipeError(f"{where} must be a number of checkpoints (an int >= 1); got {value!r}.")
    return value


def parse_mode(value: Any, where: str) -> str:
    """``"min"`` or ``"max"``: whether a lower or a higher metric is better."""
    if value not in ("min", "max"):
        raise RecipeError(f"{where} must be 'min' or 'max'; got {value!r}.")
    return value
