"""Lineage policies as ``terge lineage check`` reads them: a TOML file and options.

A policy file holds the rules of :class:`terge.policy.Policy`, every key optional::

    require_merged = ["re:\\\\.mlp\\\\.", "layers:0-1"]   # patterns, as --include takes them
    forbid_skipped = ["shape mismatch", "held by one model"]
    merged_is_base_floating = true
    same_dtypes = true
    tied = [["lm_head.weight", "model.embed_tokens.weight"]]
    pinned = true

    [ranges]               # inclusive [low, high]: "weight", or a method's setting
    weight = [0.0, 1.0]
    density = [0.2, 0.8]

Options given on the command line add to the file's rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import PolicyError, TergeError
from ..io.parsing import ParseProblem, check_depth, decode_utf8, is_float_number, read_capped
from ..policy import Policy
from .recipe import parse_pattern, toml_module

POLICY_KEYS = (
    "require_merged",
    "forbid_skipped",
    "merged_is_base_floating",
    "same_dtypes",
    "tied",
    "pinned",
    "ranges",
)
MAX_POLICY_BYTES = 1 << 24
"""The largest policy file read (16 MiB; a policy is a few lines)."""


def load_policy(path: str | Path) -> dict[str, Any]:
    """The rules of a TOML policy file, as :class:`Policy`'s keyword arguments (checked)."""
    toml = toml_module(PolicyError, "policy")
    path = Path(path)
    what = f"the policy {str(path)!r}"
    try:
        raw = read_capped(path, MAX_POLICY_BYTES, regular=False)
        data = toml.loads(decode_utf8(raw, what))
        check_depth(data, what)
    except FileNotFoundError:
        raise PolicyError(f"{what} not found.") from None
    except IsADirectoryError:
        raise PolicyError(f"{what} is a folder; give a TOML file.") from None
    except OSError as error:
        raise PolicyError(f"cannot read {what}: {error.strerror or error}.") from None
    except ParseProblem as problem:
        raise PolicyError(f"{what}: {problem}; give a TOML file.") from None
    except RecursionError:  # tomllib recurses per nested array, before check_depth can look
        raise PolicyError(f"{what} nests arrays or tables too deeply to read.") from None
    except toml.TOMLDecodeError as error:
        raise PolicyError(f"{what} is not valid TOML: {error}.") from None
    return parse_policy(data, what)


def parse_policy(data: dict[str, Any], what: str) -> dict[str, Any]:
    """A policy table's rules, each checked; an unknown key names the known ones."""
    for key in data:
        if key not in POLICY_KEYS:
            raise PolicyError(
                f"{what}: unknown key {key!r}; a policy holds {', '.join(POLICY_KEYS)}."
            )
    rules: dict[str, Any] = {}
    if "require_merged" in data:
        texts = _strings(data["require_merged"], f"{what}: require_merged")
        rules["require_merged"] = tuple(pattern(text, f"{what}: require_merged") for text in texts)
    if "forbid_skipped" in data:
        rules["forbid_skipped"] = _strings(data["forbid_skipped"], f"{what}: forbid_skipped")
    for key in ("merged_is_base_floating", "same_dtypes", "pinned"):
        if key in data:
            if not isinstance(data[key], bool):
                raise PolicyError(f"{what}: {key} must be true or false; got {data[key]!r}.")
            rules[key] = data[key]
    if "tied" in data:
        pairs = data["tied"]
        ok = isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p)
            for p in pairs
        )
        if not ok:
            raise PolicyError(
                f"{what}: tied must be a list of name pairs, e.g. "
                f'[["lm_head.weight", "model.embed_tokens.weight"]]; got {pairs!r}.'
            )
        rules["tied"] = tuple((a, b) for a, b in pairs)
    if "ranges" in data:
        table = data["ranges"]
        if not isinstance(table, dict):
            raise PolicyError(f"{what}: ranges must be a table of [low, high]; got {table!r}.")
        rules["ranges"] = {
            key: bounds(value, f"{what}: ranges.{key}") for key, value in table.items()
        }
    return rules


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"{where} must be a list of strings; got {value!r}.")
    return tuple(value)


def pattern(text: str, where: str) -> Any:
    """A pattern string (``re:``, ``layers:``, an exact name) as ``--include`` takes it."""
    try:
        return parse_pattern(text, where)
    except TergeError as error:
        raise PolicyError(str(error)) from None


def bounds(value: Any, where: str) -> tuple[float, float]:
    """``[low, high]``: two finite numbers, low <= high."""
    ok = isinstance(value, list) and len(value) == 2
    ok = ok and all(is_float_number(v) for v in value)  # no bool, and 10**400 is no float
    if not ok or value[0] > value[1]:
        raise PolicyError(f"{where} must be [low, high], two finite numbers; got {value!r}.")
    return (float(value[0]), float(value[1]))


def parse_range(text: str) -> tuple[str, tuple[float, float]]:
    """``--range density=0.2:0.8`` as ``("density", (0.2, 0.8))``."""
    key, equals, span = text.partition("=")
    low, colon, high = span.partition(":")
    where = f"--range {text!r}"
    try:
        numbers = [float(low), float(high)]
    except ValueError:
        numbers = []
    if not (equals and colon and key.strip() and numbers):
        raise PolicyError(f"{where} must be KEY=LOW:HIGH, e.g. --range weight=0:1.")
    return key.strip(), bounds(numbers, where)


def make_policy(rules: dict[str, Any]) -> Policy:
    """The :class:`Policy` of checked rules (its own checks: reasons, settings)."""
    return Policy(**rules)
