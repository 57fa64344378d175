"""Model cards: the ``README.md`` a merged folder carries, in the Hugging Face Hub's format.

:func:`model_card` turns a lineage into a card: YAML front matter the Hub reads (``base_model``,
``base_model_relation: merge``, ``library_name``, ``tags``), then what a reader needs: the method
and its paper, the models with their revisions and weights, how to reproduce the merge (the
command that made it, and a recipe generated from the lineage), and the SHA-256 of the
``lineage.json`` written beside it. Everything comes from the lineage, so the same merge gives
the same card, byte for byte, on any machine.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from ._version import __version__
from .lineage import EXCLUDED, SEPARATE, Lineage, ModelRecord, lineage_text
from .methods import REGISTRY

CARD_FILE = "README.md"
TERGE_URL = "https://pypi.org/project/terge/"
HUB_URL = "https://huggingface.co"


def lineage_digest(lineage: Lineage) -> str:
    """SHA-256 (hex) of the lineage's file text (``lineage.json`` as terge writes it)."""
    return hashlib.sha256(lineage_text(lineage).encode("utf-8")).hexdigest()


def model_card(
    lineage: Lineage,
    *,
    command: str | None = None,
    library_name: str | None = None,
    title: str | None = None,
) -> str:
    """The ``README.md`` model card of a merge, from its lineage.

    ``base_model`` lists the models read from the Hub (``org/name``), base first; models from
    local files or memory are named in the card's table only, since the Hub accepts only Hub ids
    there (without any, ``base_model`` and ``base_model_relation`` are left out). ``command`` is
    how the merge was made (``terge merge ...``), shown as given; a recipe for ``terge merge
    --recipe`` is generated from the lineage, pinned to the commits the Hub models resolved to.
    ``library_name`` (``"transformers"`` when the base folder's ``config.json`` names an
    architecture) goes into the front matter when given.

    Example:
        >>> import torch, terge
        >>> from terge.modelcard import model_card
        >>> _, lineage = terge.merge([torch.nn.Linear(2, 2)] * 2, lineage=True)
        >>> model_card(lineage).splitlines()[1:5]
        ['tags:', '- merge', '- terge', '- arithmetic']
    """
    methods = _methods(lineage)
    hub_ids = _hub_ids(lineage)
    lines = ["---"]
    if hub_ids:  # the Hub refuses a card whose base_model is not a Hub id
        lines += ["base_model:", *(f"- {_yaml(repo)}" for repo in hub_ids)]
        lines.append("base_model_relation: merge")
    if library_name is not None:
        lines.append(f"library_name: {_yaml(library_name)}")
    tags = ["merge", "terge", *sorted(methods)]
    lines += ["tags:", *(f"- {_yaml(tag)}" for tag in dict.fromkeys(tags))]
    lines += ["---", ""]
    lines.append(f"# {_plain(title) or 'A merge of ' + _count(len(lineage.models), 'model')}")
    lines += [
        "",
        f"Merged with [terge]({TERGE_URL}) {lineage.terge_version or __version__} "
        f"(PyTorch {lineage.torch_version or 'unknown'}), accumulating in "
        f"{_dtype(lineage.dtype)}"
        + ("" if lineage.out_dtype is None else f", written in {_dtype(lineage.out_dtype)}")
        + ".",
        "",
        "## Method",
        "",
        *_method_lines(methods, lineage),
        "",
        "## Models",
        "",
        *_model_table(lineage),
        "",
        "## Reproduce",
        "",
        *_reproduce(lineage, command),
        "## Lineage",
        "",
        f"`lineage.json` beside this card records every tensor's method, models and weights; its "
        f"SHA-256 is `{lineage_digest(lineage)}`. Check the weights against it with "
        "`terge lineage verify lineage.json --merged .` (run where the models' paths lead).",
        "",
    ]
    return "\n".join(lines)


_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n"}
"""Plain words YAML 1.1 (the Hub's parser) reads as booleans or null."""


def _yaml(text: str) -> str:
    """A YAML scalar: plain where that is unambiguous, else a JSON (double-quoted) string."""
    plain = text[:1].isascii() and text[:1].isalpha()  # not a number or a date (2024-01-01)
    plain = plain and all(c.isalnum() or c in "-_./@" for c in text)
    return text if plain and text.lower() not in _YAML_WORDS else json.dumps(text)


def _plain(text: str | None) -> str:
    """Text safe on one Markdown line: control characters (a newline in a folder's name)
    become spaces."""
    return "" if text is None else "".join(" " if ord(c) < 32 or c == "\x7f" else c for c in text)


def _code(text: str) -> str:
    """Inline code that a table cell holds whole: backticks and pipes cannot end it early."""
    return "`" + _plain(text).replace("`", "'").replace("|", "\\|") + "`"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _dtype(dtype: Any) -> str:
    return "an unknown dtype" if dtype is None else str(dtype).removeprefix("torch.")


def _methods(lineage: Lineage) -> dict[str, int]:
    """Each method's name -> how many tensors it merged, most first."""
    counts: dict[str, int] = {}
    for entry in lineage.values():
        counts[entry[0]] = counts.get(entry[0], 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _hub_ids(lineage: Lineage) -> list[str]:
    """The Hub repositories of the models, the base first, each once."""
    records = [lineage.base, *lineage.models]
    return list(dict.fromkeys(r.repo for r in records if r is not None and r.repo is not None))


def _method_lines(methods: Mapping[str, int], lineage: Lineage) -> list[str]:
    if not methods:
        return ["No tensor was merged: the folder holds the base's tensors unchanged."]
    lines = []
    for name, count in methods.items():
        info = REGISTRY.get(name)
        paper = f" ([paper]({info.paper}))" if info is not None and info.paper else ""
        settings = _settings_of(lineage, name)
        shown = ", ".join(f"{key}={value!r}" for key, value in settings.items())
        custom = any(e[0] == name and getattr(e, "custom", False) for e in lineage.values())
        kind = " (a user's own function)" if custom else ""
        lines.append(
            f"- `{name}`{kind}{paper}: {_count(count, 'tensor')}"
            + (f", with {shown}" if shown else "")
        )
    skipped = len(lineage.skipped)
    if skipped:
        lines.append(f"- {_count(skipped, 'tensor')} kept as the base has them (see the lineage).")
    return lines


def _settings_of(lineage: Lineage, method: str) -> dict[str, Any]:
    """The settings every tensor merged with ``method`` shares (one that varies is left out)."""
    shared: dict[str, Any] | None = None
    for entry in lineage.values():
        if entry[0] != method:
            continue
        settings = dict(getattr(entry, "settings", {}))
        shared = (
            settings
            if shared is None
            else {k: v for k, v in shared.items() if settings.get(k, object()) == v}
        )
    return shared or {}


def _weights(lineage: Lineage) -> tuple[dict[int, float] | None, bool | None]:
    """Each model's weight, when one per model holds for every merged tensor, and whether the
    weights were normalised (``None``: the lineage does not say); ``(None, None)`` when they vary.

    Where the kernel recorded them, the weights are its coefficients (the weights as given; equal
    ones as 1s) and a divisor means normalised; a method given normalised weights records those.
    """
    given: dict[int, float] = {}
    normalize: bool | None = None
    for entry in lineage.values():
        if getattr(entry, "custom", False):
            return None, None
        coefficients = getattr(entry, "coefficients", None)
        if coefficients is None:
            pairs = [(index, weight) for index, weight in entry[1]]
            said = None
        else:
            pairs = [(index, weight) for (index, _), weight in zip(entry[1], coefficients)]
            said = getattr(entry, "divisor", None) is not None
        for index, weight in pairs:
            if given.setdefault(index, weight) != weight:
                return None, None
        if said is not None:
            if normalize is not None and normalize != said:
                return None, None
            normalize = said
    return given, normalize


def _label(record: ModelRecord | None) -> str:
    """How the card names a model: its Hub repository linked, its path, or ``(in memory)``."""
    if record is None:
        return "(unknown)"
    if record.repo is not None:
        return f"[{record.repo}]({HUB_URL}/{record.repo})"
    return _code(record.path) if record.path is not None else f"(in memory, a {record.kind})"


def _revision(record: ModelRecord | None) -> str:
    if record is None or record.revision is None:
        return ""
    asked = record.requested_revision
    return f"`{record.revision[:12]}`" + ("" if asked is None else f" (asked: {_code(asked)})")


_WEIGHTS_VARY = "the weights differ between tensors"
_WEIGHTS_OF_OWN = "some tensors were made by a user's own method, whose weights are its own"


def _model_table(lineage: Lineage) -> list[str]:
    weights, _ = _weights(lineage)
    base = lineage.base
    rows = ["| | model | revision | weight |", "|---|---|---|---|"]
    for record in lineage.models:
        is_base = base is not None and base.index == record.index
        role = f"{record.index}" + (" (base)" if is_base else "")
        weight = "" if weights is None else _number(weights.get(int(record.index)))
        rows.append(f"| {role} | {_label(record)} | {_revision(record)} | {weight} |")
    if base is not None and base.index == SEPARATE:
        rows.append(f"| base | {_label(base)} | {_revision(base)} | |")
    if weights is None and lineage:
        custom = any(getattr(e, "custom", False) for e in lineage.values())
        said = (_WEIGHTS_OF_OWN if custom else _WEIGHTS_VARY).capitalize()
        rows += ["", f"{said}; the lineage records each tensor's."]
    return rows


def _number(value: float | None) -> str:
    return "" if value is None else repr(value)


def _reproduce(lineage: Lineage, command: str | None) -> list[str]:
    lines = []
    if command is not None:
        # a fence longer than any run of backticks in the command, which cannot end it early
        fence = "`" * max([3, *(len(run) + 1 for run in re.findall("`+", command))])
        lines += ["Made with:", "", f"{fence}sh", command, fence, ""]
    stacked = getattr(lineage, "stack", None) is not None
    recipe, complete = (stack_recipe if stacked else recipe_from_lineage)(lineage)
    pinned = any(r.repo is not None for r in [lineage.base, *lineage.models] if r is not None)
    lead = (
        "As a recipe (`terge merge --recipe recipe.toml`)"
        + (", the Hub models pinned to the commits they resolved to" if pinned else "")
        if complete
        else "A recipe from the lineage (incomplete: see its comments)"
    )
    return [*lines, lead + ":", "", "```toml", recipe.rstrip("\n"), "```", ""]


def recipe_from_lineage(lineage: Lineage) -> tuple[str, bool]:
    """A ``terge merge --recipe`` TOML recipe that redoes the merge a lineage records, and
    whether it is complete (models in memory, a user's own function, or methods and weights
    that differ between tensors cannot be written as one recipe: comments say so).

    Hub models are named ``hf://org/name@<commit>``; local paths as the merge was given them.
    """
    complete = True
    lines = []
    models = []
    for record in lineage.models:
        if record.path is None:
            complete = False
            models.append(json.dumps(f"<models[{record.index}]: in memory>"))
        else:
            models.append(json.dumps(_recipe_path(record)))
    lines.append(f"models = [{', '.join(models)}]")
    base = lineage.base
    if base is not None and base.index == SEPARATE:
        if base.path is None:
            complete = False
            lines.append('base = "<base: in memory>"')
        else:
            lines.append(f"base = {json.dumps(_recipe_path(base))}")
    elif base is not None:
        lines.append(f"base = {base.index}")
    lines.append('out = "merged"')
    lines += _dtype_lines(lineage)
    methods = {(e[0], _frozen(getattr(e, "settings", {}))) for e in lineage.values()}
    seeds = {dict(s).get("seed") for _, s in methods} - {None}
    if len(seeds) == 1:
        lines.append(f"seed = {seeds.pop()}")
    weights, normalize = _weights(lineage)
    if normalize is False:
        lines.append("normalize = false")
    excluded = sorted(name for name, why in lineage.skipped.items() if why == EXCLUDED)
    if excluded:
        lines.append(f"exclude = [{', '.join(json.dumps(_exact(name)) for name in excluded)}]")
    if weights is not None and lineage.models:
        values = [weights.get(i, 1.0) for i in range(len(lineage.models))]
        lines.append(f"weights = [{', '.join(_toml_number(v) for v in values)}]")
    custom = any(getattr(e, "custom", False) for e in lineage.values())
    if weights is None and lineage:
        complete = False
        lines.append(f"# {_WEIGHTS_OF_OWN if custom else _WEIGHTS_VARY}: see lineage.json")
    if custom:
        complete = False
        lines.append("# a user's own method function cannot be written in a recipe")
    elif len(methods) == 1:
        name, settings = methods.pop()
        table = [f"name = {json.dumps(name)}"] + [
            f"{key} = {_toml_value(value)}" for key, value in settings if key != "seed"
        ]
        lines.append(f"method = {{{', '.join(table)}}}")
    elif methods:
        complete = False
        lines.append("# the methods differ between tensors: see lineage.json")
    return "\n".join(lines) + "\n", complete


def stack_recipe(lineage: Lineage) -> tuple[str, bool]:
    """A ``terge merge --recipe`` TOML recipe with ``[[slices]]`` that redoes the stack a
    lineage records (``lineage.stack``), and whether it is complete: runs of output blocks taken
    from consecutive blocks of the same models become one slice each."""
    stack = lineage.stack or {}
    complete = True
    paths: dict[int, str] = {}
    for record in lineage.models:
        if record.path is None:
            complete = False
            paths[record.index] = f"<models[{record.index}]: in memory>"  # type: ignore[index]
        else:
            paths[record.index] = _recipe_path(record)  # type: ignore[index]
    runs: list[tuple[str, list[list[Any]]]] = []  # (method, [[model, first, weights...], ...])
    for block in stack.get("blocks", []):
        method, sources = block["method"], block["sources"]
        if runs:
            last_method, last = runs[-1]
            follows = last_method == method and len(last) == len(sources)
            follows = follows and all(
                run[0] == model and run[1] + len(run) - 2 == first
                for run, (model, first, _) in zip(last, sources)
            )
            if follows:
                for run, (_, _, weight) in zip(last, sources):
                    run.append(weight)
                continue
        runs.append((method, [[model, first, weight] for model, first, weight in sources]))
    unknown: set[Any] = set()  # a model index the lineage has no record of: no path to give

    def path_of(index: Any) -> str:
        if index not in paths:
            unknown.add(index)
        return json.dumps(paths.get(index, "?"))

    lines = []
    for name in ("base", "head"):
        if stack.get(name) is not None:
            lines.append(f"{name} = {path_of(stack[name])}")
    lines.append('out = "stacked"')
    lines += _dtype_lines(lineage)
    merged = sorted({method for method, _ in runs if method != "passthrough"})
    if len(merged) > 1:
        complete = False
        lines.append("# the merged slices use different methods: see lineage.json")
    elif merged:
        settings = {
            key: value
            for entry in lineage.values()
            if entry[0] == merged[0]
            for key, value in getattr(entry, "settings", {}).items()
            if key != "seed"
        }
        seeds = {
            getattr(entry, "settings", {}).get("seed")
            for entry in lineage.values()
            if entry[0] == merged[0]
        } - {None}
        if len(seeds) == 1:
            lines.append(f"seed = {seeds.pop()}")
        table = [f"name = {json.dumps(merged[0])}"]
        table += [f"{key} = {_toml_value(value)}" for key, value in sorted(settings.items())]
        lines.append(f"method = {{{', '.join(table)}}}")
    for method, sources in runs:
        lines += ["", "[[slices]]"]
        parts = []
        for model, first, *weights in sources:
            part = f"model = {path_of(model)}, layer_range = [{first}, "
            part += f"{first + len(weights)}]"
            if method != "passthrough":
                values = [_toml_number(w) for w in weights]
                part += ", weight = " + (
                    values[0] if len(set(values)) == 1 else f"[{', '.join(values)}]"
                )
            parts.append(part)
        if method == "passthrough":
            lines.append(parts[0].replace(", layer_range", "\nlayer_range"))
        else:
            lines.append("sources = [" + ", ".join("{" + part + "}" for part in parts) + "]")
    return "\n".join(lines) + "\n", complete and not unknown


def _dtype_lines(lineage: Lineage) -> list[str]:
    """The recipe's ``dtype`` and ``out_dtype`` lines: the dtypes the lineage records."""
    lines = []
    if lineage.dtype is not None:
        lines.append(f'dtype = "{_dtype(lineage.dtype)}"')
    if lineage.out_dtype is not None:
        lines.append(f'out_dtype = "{_dtype(lineage.out_dtype)}"')
    return lines


def _recipe_path(record: ModelRecord) -> str:
    if record.repo is not None and record.revision is not None:
        return f"hf://{record.repo}@{record.revision}"
    return str(record.path)


def _exact(name: str) -> str:
    """A tensor's name as a recipe pattern: ``name:`` before one a pattern's prefix begins."""
    return f"name:{name}" if name.startswith(("re:", "layers:", "name:")) else name


def _frozen(settings: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, _hashable(v)) for k, v in settings.items()))


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _toml_number(value: float) -> str:
    if isinstance(value, bool) or not math.isfinite(value):
        return json.dumps(str(value))
    return repr(value) if isinstance(value, float) else str(value)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _toml_number(value)
    if isinstance(value, tuple):
        return f"[{', '.join(_toml_value(v) for v in value)}]"
    return json.dumps(str(value))
