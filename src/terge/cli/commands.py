"""The ``terge`` command.

``terge merge MODEL... -o OUT`` merges checkpoints into a sharded safetensors folder, with every
setting of :func:`terge.merge` as an option or in a TOML recipe (see :mod:`terge.recipe`).

Subcommands live in :data:`COMMANDS`, a map of name to :class:`Command`; adding one is adding an
entry (its ``add_arguments`` may itself add sub-subcommands). ``main(argv)`` returns the exit code:
0 on success, 1 when the merge failed (reading or writing files, memory), 2 when the command line,
the recipe or the input models are at fault (every error terge diagnoses itself), 130 when
interrupted. Errors are one line on stderr, ``terge: error: ...``, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from .._version import __version__
from ..audit import diff_lineages, verify_lineage
from ..errors import LineageError, TergeError, UsageError
from ..io.choose import Chosen, choose
from ..io.hub import hub_reference
from ..io.training import as_spec
from ..io.writing import check_file_apart, write_text_atomic
from ..lineage import REASONS, lineage_schema_text, load_lineage, save_lineage
from ..merge import merge
from ..methods import REGISTRY
from ..output import LINEAGE_FILE
from ..report import FORMATS, render_check, render_diff, render_show, render_verify
from .policyfile import load_policy, make_policy, parse_range, pattern
from .recipe import (
    RECIPE_EXAMPLE,
    RECIPE_KEYS,
    Settings,
    load_recipe,
    method_settings,
    parse_method,
    parse_out_dtype,
    parse_out_format,
    parse_pattern,
    parse_shard_size,
    parse_vocabulary,
    parse_weights,
)
from .stacking import STACK_DESCRIPTION, STACK_EPILOG, add_stack_arguments, run_stack
from .stacking import run_stack_settings as _stack_as

__all__ = ["COMMANDS", "Command", "UsageError", "build_parser", "main"]

PROG = "terge"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (one line from ``main``), not printed + exited."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


@dataclass(frozen=True)
class Command:
    """A subcommand: its help, its options, and what it does (returns the exit code)."""

    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    epilog: str = ""


# --- terge merge ----------------------------------------------------------------------------------


def _indent(text: str, prefix: str = "  ") -> str:
    return textwrap.indent(text, prefix)


def _methods_list() -> str:
    parts = []
    for name in REGISTRY:
        settings = method_settings(name)
        parts.append(f"{name} ({', '.join(settings)})" if settings else name)
    return ", ".join(parts)


MERGE_DESCRIPTION = """\
Merge checkpoints that share tensors by name and shape, and write the result as a folder of
sharded safetensors (atomically, with lineage.json beside it). A MODEL is a .safetensors, .bin,
.pt, .pth or .ckpt file or a Hugging Face-style folder (a Trainer's checkpoint-N/ too); a
training checkpoint (Lightning's .ckpt, {"model": ..., "optimizer": ...}) is read as the model
state dict inside it, and PATH::ENTRY (or PATH::entry=KEY,prefix=PREFIX) says which where it
holds several. With --last N or --best N, the MODELs are a glob or folder of a run's
checkpoints to choose from. By default the tensors are averaged with equal weights; the base
(the first model unless --base says otherwise) provides every tensor that is not merged.
Patterns, method specs and recipes are explained after the options.
"""

MERGE_EPILOG = f"""\
patterns (--include, --exclude, and the patterns of a recipe):
  re:REGEX      a regular expression, matching a name when found anywhere in it:
                re:mlp matches model.layers.0.mlp.up_proj.weight; anchor with ^ and $
  layers:SPEC   transformer blocks, inclusive ranges: layers:0-5, layers:0-3,8;
                add embeddings or head: layers:0-5,embeddings  layers:head
  NAME          anything else is an exact tensor name: lm_head.weight
                (prefix name: for a name that starts with re:, layers: or name:)

methods (--method NAME or NAME:KEY=VALUE,KEY=VALUE), with their settings:
{_indent(textwrap.fill(_methods_list(), 92))}
  e.g. --method ties:density=0.3,scale=0.8 is terge.methods.ties(density=0.3, scale=0.8)

recipes (--recipe FILE, TOML) hold the same settings, plus per-pattern weights and methods;
options given on the command line override the recipe's, and its relative paths are relative to
its own folder:

{_indent(RECIPE_EXAMPLE)}
recipe keys:
{_indent(chr(10).join(f"{key:<15} {meaning}" for key, meaning in RECIPE_KEYS.items()))}

examples:
  terge merge a b c -o soup
  terge merge base.safetensors math code -o merged --method ties:density=0.3 --seed 0
  terge merge a b -o merged --weights 3,1 --exclude 're:^lm_head\\.' --out-dtype bfloat16
  terge merge --recipe recipe.toml --out other --overwrite
  terge merge 'runs/checkpoint-*' --last 5 -o avg
  terge merge lightning_logs/ckpts --best 3 --metric val_loss -o soup
  terge merge 'a.pth::state_dict_ema' 'b.pth::state_dict_ema' -o ema-soup
  terge merge runs/step-1000 runs/step-2000 runs/step-3000 -o soup --out-format dcp
  terge merge --mergekit config.yml -o merged     # a mergekit YAML config, as mergekit merges

several processes, on one node or many sharing one filesystem (torchrun): each writes its share
of the output's shards, and the folder appears only when all succeeded, the same bytes as one
process writes:
  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
    -m terge merge a b c -o /shared/soup --max-shard-size 2GB

exit status: 0 merged; 1 the merge failed (reading or writing files, out of memory); 2 bad
command line, recipe or input models; 130 interrupted.
"""


def _merge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL",
        help="checkpoints to merge: .safetensors/.bin files, Hugging Face-style folders or "
        "torch.distributed.checkpoint folders, e.g. "
        "'terge merge a.safetensors b.safetensors c -o soup' (may come from --recipe instead)",
    )
    parser.add_argument(
        "-o",
        "--out",
        metavar="OUT",
        help="the output folder, written atomically, e.g. -o merged (required, here or in the "
        "recipe)",
    )
    parser.add_argument(
        "--base",
        metavar="INDEX_OR_PATH",
        help="the base model: an index into the models (default 0, the first; -1 the last) or a "
        "path to a separate reference model, e.g. --base 1 or --base pretrained/ (write ./0 for "
        "a path named 0)",
    )
    parser.add_argument(
        "--method",
        metavar="NAME_OR_SPEC",
        help="the merge method, NAME or NAME:KEY=VALUE,..., e.g. --method task_arithmetic or "
        f"--method ties:density=0.3,scale=0.8 (default arithmetic). Methods: {_methods_list()}",
    )
    parser.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help="relative weights, one per model, normalised per tensor, e.g. --weights 1,2,3 "
        "(default equal; write --weights=-1,1,1 when the first is negative)",
    )
    parser.add_argument(
        "--include",
        action="append",
        metavar="PATTERN",
        help="merge only tensors matching PATTERN (repeatable), e.g. --include 're:\\.mlp\\.' "
        "--include layers:0-5 --include lm_head.weight",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="never merge tensors matching PATTERN (repeatable, applied after --include), "
        "e.g. --exclude 're:norm' --exclude model.embed_tokens.weight",
    )
    parser.add_argument(
        "--dtype",
        choices=("float64", "float32"),
        help="the dtype the merge accumulates in, e.g. --dtype float32 (default float64: exact)",
    )
    parser.add_argument(
        "--out-dtype",
        metavar="DTYPE",
        help="cast the written floating tensors, e.g. --out-dtype bfloat16 (float32, float16, "
        "...; default: keep each tensor's dtype)",
    )
    parser.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="the largest shard file, e.g. --max-shard-size 2GB or 500MiB (default 5GB)",
    )
    parser.add_argument(
        "--model-card",
        action=argparse.BooleanOptionalAction,
        help="write OUT/README.md, a Hugging Face model card (base_model, tags, method, "
        "models, this command, a recipe, the lineage's SHA-256) replacing a README copied from "
        "the base; --no-model-card leaves it out, e.g. --no-model-card (default --model-card)",
    )
    parser.add_argument(
        "--out-format",
        metavar="FORMAT",
        help="write OUT as safetensors (default), as a torch.distributed.checkpoint folder "
        "that dcp.load loads into an FSDP2 model, or as a PEFT LoRA adapter over the base, "
        "e.g. --out-format dcp, --out-format lora --lora-rank 16",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        metavar="R",
        help="with --out-format lora: the rank of every factored module, e.g. --lora-rank 16",
    )
    parser.add_argument(
        "--lora-energy",
        type=float,
        metavar="E",
        help="with --out-format lora, instead of a rank: keep the smallest rank holding this "
        "share of each difference's squared singular values, e.g. --lora-energy 0.9",
    )
    parser.add_argument(
        "--lora-embeddings",
        action="store_true",
        default=None,
        help="with --out-format lora: factor embeddings too (else a changed one is saved "
        "whole), e.g. --out-format lora --lora-rank 16 --lora-embeddings",
    )
    parser.add_argument(
        "--vocabulary",
        metavar="VOCAB",
        help="align embedding and LM-head rows by token when the models' tokenizers differ: "
        "base, union or a model index, e.g. --vocabulary union (read from each folder's "
        "tokenizer.json; default: no alignment)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed for random methods (dare_*), per tensor, e.g. --seed 0 (default: drawn and "
        "recorded in the lineage)",
    )
    parser.add_argument(
        "--lineage",
        metavar="FILE",
        help="also write the lineage (how each tensor was made) as JSON to FILE, e.g. --lineage "
        "soup.lineage.json (OUT/lineage.json is always written)",
    )
    parser.add_argument(
        "--digests",
        action="store_true",
        help="record in the lineage the SHA-256 of every merged tensor, of the tensors it "
        "was made from, and of every input file, for 'terge lineage diff', 'verify' and "
        "'check --pinned', e.g. --digests",
    )
    parser.add_argument(
        "--overwrite",
        action=argparse.BooleanOptionalAction,
        help="replace OUT, and the --lineage FILE, if they exist, e.g. --overwrite (default: "
        "refuse)",
    )
    parser.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        help="divide each tensor's weights by their sum; --no-normalize uses them as given, "
        "e.g. --no-normalize --weights=1,1,-1 writes a + b - c (default --normalize)",
    )
    parser.add_argument(
        "--last",
        type=_positive,
        metavar="N",
        help="merge the last N checkpoints of the MODELs (a glob or a run's folder), by the "
        "trainer's step (trainer_state.json, a .ckpt's global_step) or else the names in "
        "natural order, e.g. 'runs/checkpoint-*' --last 5",
    )
    parser.add_argument(
        "--best",
        type=_positive,
        metavar="N",
        help="merge the best N checkpoints of the MODELs by --metric, as the trainer recorded "
        "it (Lightning's ModelCheckpoint, trainer_state.json) or the names hold it "
        "(val_loss=0.31), e.g. --best 3 --metric val_loss",
    )
    parser.add_argument(
        "--metric",
        metavar="NAME",
        help="with --best, the metric to rank by, e.g. --metric eval_loss (default: the one a "
        "Lightning ModelCheckpoint monitors)",
    )
    parser.add_argument(
        "--mode",
        choices=("min", "max"),
        help="with --best, whether a lower or a higher metric is better, e.g. --mode max "
        "(default: the ModelCheckpoint's mode, else min for a metric named ...loss)",
    )
    parser.add_argument(
        "--recipe",
        metavar="FILE",
        help="read settings from a TOML recipe (see below); options given here override it, "
        "e.g. "
        "--recipe soup.toml",
    )
    parser.add_argument(
        "--mergekit",
        metavar="FILE",
        help="merge as a mergekit YAML config says (models, base_model, merge_method, "
        "parameters, dtype, out_dtype), writing what mergekit writes; instead of MODEL, "
        "--recipe and the merge settings, e.g. --mergekit config.yml",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="print nothing but errors: no progress bar, warnings or summary, e.g. -q",
    )


def _positive(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a number of checkpoints >= 1, got {text!r}")
    return int(text)


def _base_value(text: str) -> int | Path:
    return int(text) if re.fullmatch(r"[+-]?\d+", text.strip()) else Path(text).expanduser()


def _settings_from_args(args: argparse.Namespace) -> Settings:
    """The settings the command line gives (``None`` where it gives none)."""

    def patterns(texts: list[str] | None, option: str) -> tuple[Any, ...] | None:
        if texts is None:
            return None
        return tuple(parse_pattern(text, option) for text in texts)

    return Settings(
        models=tuple(Path(m).expanduser() for m in args.models) or None,
        base=None if args.base is None else _base_value(args.base),
        out=None if args.out is None else Path(args.out).expanduser(),
        method=None if args.method is None else parse_method(args.method, "--method"),
        weights=None if args.weights is None else parse_weights(args.weights, "--weights"),
        include=patterns(args.include, "--include"),
        exclude=patterns(args.exclude, "--exclude"),
        dtype=None if args.dtype is None else getattr(torch, args.dtype),
        out_dtype=None
        if args.out_dtype is None
        else parse_out_dtype(args.out_dtype, "--out-dtype"),
        max_shard_size=(
            None
            if args.max_shard_size is None
            else parse_shard_size(args.max_shard_size, "--max-shard-size")
        ),
        out_format=None
        if args.out_format is None
        else parse_out_format(args.out_format, "--out-format"),
        seed=args.seed,
        vocabulary=None
        if args.vocabulary is None
        else parse_vocabulary(args.vocabulary, "--vocabulary"),
        lineage=None if args.lineage is None else Path(args.lineage).expanduser(),
        overwrite=args.overwrite,
        normalize=args.normalize,
        last=args.last,
        best=args.best,
        metric=args.metric,
        mode=args.mode,
        lora_rank=getattr(args, "lora_rank", None),
        lora_energy=getattr(args, "lora_energy", None),
        lora_embeddings=getattr(args, "lora_embeddings", None),
    )


def _text(pattern: Any) -> str:
    """A pattern as it would be written: ``re:REGEX`` or the exact name."""
    return pattern if isinstance(pattern, str) else f"re:{pattern.pattern}"


def _choose(settings: Settings) -> tuple[Settings, Chosen | None]:
    """With --last/--best, the checkpoints chosen from the MODELs (a glob, a run's folder, or
    paths), which become the models; the choice goes into the lineage."""
    if settings.last is None and settings.best is None:
        if settings.metric is not None or settings.mode is not None:
            raise UsageError(
                "--metric and --mode rank the checkpoints that --best N chooses; add --best N."
            )
        return settings, None
    if not settings.models:
        raise UsageError("no checkpoints to choose from: give a glob or a run's folder as MODEL.")
    sources = settings.models
    chosen = choose(
        os.fspath(sources[0]) if len(sources) == 1 else [os.fspath(p) for p in sources],
        last=settings.last,
        best=settings.best,
        metric=settings.metric,
        mode=settings.mode,
    )
    return dataclasses.replace(settings, models=tuple(Path(p) for p in chosen)), chosen


def _check(settings: Settings) -> tuple[list[Path], int | Path, Path]:
    """Check what can be checked before merging; returns (models, base, out)."""
    if not settings.models:
        raise UsageError("no models to merge: give MODEL paths, or a --recipe with 'models'.")
    if settings.out is None:
        raise UsageError("no output folder: give -o/--out OUT, or a --recipe with 'out'.")
    models = list(settings.models)
    for path in models:
        if hub_reference(path) is None and not as_spec(path).path.exists():
            raise UsageError(f"model {str(path)!r} does not exist (no such file or folder).")
    base: int | Path = 0 if settings.base is None else settings.base
    if isinstance(base, int):
        if not -len(models) <= base < len(models):
            raise UsageError(
                f"the base index {base} is not an index into the {len(models)} models; give "
                f"{-len(models)} to {len(models) - 1}, or a path."
            )
    elif hub_reference(base) is None and not as_spec(base).path.exists():
        raise UsageError(f"base model {str(base)!r} does not exist (no such file or folder).")
    else:  # a path that is one of the models is that model
        resolved = [path.resolve() for path in models]
        if base.resolve() in resolved:
            base = resolved.index(base.resolve())
    weights = settings.weights
    vectors = weights.items() if isinstance(weights, dict) else [(None, weights)]
    for key, vector in vectors:
        if vector is not None and len(vector) != len(models):
            where = "--weights" if key is None else f"the [[weights]] of pattern {_text(key)!r}"
            raise UsageError(
                f"{where} gives {len(vector)} weights but there are {len(models)} models; give "
                "exactly one per model, in order."
            )
    if (settings.out.exists() or settings.out.is_symlink()) and not settings.overwrite:
        raise UsageError(
            f"the output {str(settings.out)!r} already exists; pass --overwrite to replace it, or "
            "choose another path."
        )
    if settings.lineage is not None:
        inputs = [*models, *([base] if isinstance(base, Path) else [])]
        _check_lineage_path(settings, [as_spec(path).path for path in inputs])
    return models, base, settings.out


def _check_lineage_path(settings: Settings, inputs: list[Path]) -> None:
    """``--lineage FILE`` (or a recipe's ``lineage``) is refused before anything is merged where
    it cannot or must not be written: over an input or inside an input's folder, over OUT, or
    over an existing file without ``--overwrite``."""
    target = settings.lineage
    assert target is not None and settings.out is not None
    folder = target.parent
    if target.is_dir():
        raise UsageError(f"the lineage file {str(target)!r} is a folder; give a file path.")
    if not folder.is_dir():
        raise UsageError(
            f"the lineage file {str(target)!r}: its folder {str(folder)!r} does not exist."
        )
    check_file_apart(target, inputs, what="the lineage file (--lineage)", error=LineageError)
    if target.resolve() == settings.out.resolve():
        raise UsageError(
            f"the lineage file {str(target)!r} is the output folder; give another file path "
            f"(OUT/{LINEAGE_FILE} is written anyway)."
        )
    is_out_lineage = target.resolve() == (settings.out / LINEAGE_FILE).resolve()
    exists = target.exists() or target.is_symlink()
    if exists and not settings.overwrite and not is_out_lineage:
        raise UsageError(
            f"the lineage file {str(target)!r} already exists; pass --overwrite to replace it "
            "(and OUT), or choose another path."
        )


def write_lineage(target: Path, out: Path, lineage: Any, overwrite: bool = False) -> None:
    """Write the lineage to ``target``, atomically: a copy of ``OUT/lineage.json`` (the full
    record, with the models, base and settings), or, failing that, the lineage itself."""
    written = out / LINEAGE_FILE
    if written.is_file():
        if target.resolve() != written.resolve():
            text = written.read_text(encoding="utf-8")
            write_text_atomic(target, text, overwrite=overwrite, error=LineageError)
        return
    save_lineage(lineage, target, overwrite=overwrite)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


MERGE_OPTIONS: dict[str, str] = {
    "models": "MODEL",
    "base": "--base",
    "out": "-o/--out",
    "method": "--method",
    "weights": "--weights",
    "included": "--include",
    "excluded": "--exclude",
    "dtype": "--dtype",
    "out_dtype": "--out-dtype",
    "max_shard_size": "--max-shard-size",
    "out_format": "--out-format",
    "lora_rank": "--lora-rank",
    "lora_energy": "--lora-energy",
    "lora_embeddings": "--lora-embeddings",
    "seed": "--seed",
    "vocabulary": "--vocabulary",
    "overwrite": "--overwrite",
    "normalize": "--normalize",
    "digests": "--digests",
    "model_card": "--model-card",
    "lineage": "--lineage",
    "last": "--last",
    "best": "--best",
    "metric": "--metric",
    "mode": "--mode",
}
"""Each ``terge.merge()`` keyword that ``terge merge`` sets, and the option (or argument) that sets
it: library errors name keywords, and the command's errors must name its options instead."""

_SWITCHES = {"normalize=False": "--no-normalize", "model_card=False": "--no-model-card"}
"""Keyword values an option spells otherwise (``overwrite=True`` is ``--overwrite``)."""

_KEYWORD = re.compile(
    r"`(?P<quoted>[a-z_]+)(?:\[(?P<key>[^`]*)\])?(?P<value>=(?:True|False))?`"
    r"|\b(?P<bare>[a-z_]+)=(?P<flag>True|False)\b"
)


def _option_for(match: re.Match[str]) -> str:
    """The CLI option for one keyword mention (``overwrite=True``, ```weights```, ...)."""
    name = match["quoted"] or match["bare"]
    option = MERGE_OPTIONS.get(name)
    if option is None:
        return match[0]
    value = match["value"] or (f"={match['flag']}" if match["bare"] else "")
    if value:
        return _SWITCHES.get(f"{name}{value}", option)
    key = match["key"]
    return option if key is None else f"{option} (the entry for pattern {key})"


def cli_message(message: str) -> str:
    """A library message as ``terge merge`` says it: keywords (``overwrite=True``, ```weights```,
    ```merge()```) as the options that set them (``--overwrite``, ``--weights``, 'terge merge')."""
    return _KEYWORD.sub(_option_for, message.replace("`merge()`", "'terge merge'"))


def _merge_error(error: TergeError) -> TergeError:
    """``error`` with its message in the command's words (see :func:`cli_message`)."""
    if error.args and isinstance(error.args[0], str):
        error.args = (cli_message(error.args[0]), *error.args[1:])
    return error


def _run_merge(args: argparse.Namespace) -> int:
    """``terge merge``, its errors naming options rather than ``merge()``'s keywords."""
    try:
        return run_merge(args)
    except TergeError as error:
        _merge_error(error)
        raise


def _merge_options(
    settings: Settings, base: int | Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The keyword arguments of ``merge()`` that the command line or the recipe gave (``base``
    as checked); ``merge()``'s own defaults stand for the rest, so they live in one place."""
    weights: Any = settings.weights
    if isinstance(weights, dict):
        weights = {pattern: list(vector) for pattern, vector in weights.items()}
    elif weights is not None:
        weights = list(weights)
    given = {
        "base": None if settings.base is None else base,
        "method": settings.method,
        "weights": weights,
        "included": None if settings.include is None else list(settings.include),
        "excluded": None if settings.exclude is None else list(settings.exclude),
        "dtype": settings.dtype,
        "progress": True if sys.stderr.isatty() and not args.quiet else None,
        "normalize": settings.normalize,
        "seed": settings.seed,
        "vocabulary": settings.vocabulary,
        "out_dtype": settings.out_dtype,
        "max_shard_size": settings.max_shard_size,
        "out_format": settings.out_format,
        "overwrite": settings.overwrite,
        "digests": True if args.digests else None,
        "model_card": False if args.model_card is False else _command_line(args),
        "lora_rank": settings.lora_rank,
        "lora_energy": settings.lora_energy,
        "lora_embeddings": settings.lora_embeddings,
    }
    if isinstance(given["base"], Path):
        given["base"] = os.fspath(given["base"])
    return {name: value for name, value in given.items() if value is not None}


def _command_line(args: argparse.Namespace) -> str | None:
    """``terge merge ...`` as it was typed (quoted for a POSIX shell), for the model card."""
    argv = getattr(args, "argv", None)
    return None if argv is None else shlex.join([PROG, *argv])


_NOT_WITH_MERGEKIT = {
    "models": "MODEL",
    "recipe": "--recipe",
    "base": "--base",
    "method": "--method",
    "weights": "--weights",
    "include": "--include",
    "exclude": "--exclude",
    "dtype": "--dtype",
    "out_dtype": "--out-dtype",
    "normalize": "--normalize",
    "last": "--last",
    "best": "--best",
    "metric": "--metric",
    "mode": "--mode",
}
"""What a mergekit config decides (its models are the models): giving it besides --mergekit is
refused."""


def _mergekit_settings(args: argparse.Namespace) -> tuple[Settings, dict[str, Any]]:
    """The settings of ``--mergekit FILE`` (models, base, method, weights...) and the merge()
    keywords that carry them."""
    from .mergekit import from_mergekit

    for key, option in _NOT_WITH_MERGEKIT.items():
        if getattr(args, key, None) not in (None, []):
            raise UsageError(
                f"{option} cannot be given with --mergekit: the mergekit config decides it."
            )
    options = from_mergekit(Path(args.mergekit).expanduser())
    given = _settings_from_args(args)
    # what the command line adds to the config; a stack refuses what it has no use for
    added = Settings(
        out=given.out,
        max_shard_size=given.max_shard_size,
        seed=given.seed,
        overwrite=given.overwrite,
        lineage=given.lineage,
        vocabulary=given.vocabulary,
        out_format=given.out_format,
        lora_rank=given.lora_rank,
        lora_energy=given.lora_energy,
        lora_embeddings=given.lora_embeddings,
    )
    if "slices" in options:  # a stack: the slices, base and head are in the options
        return added, options
    if given.vocabulary is not None and "vocabulary" in options:
        raise UsageError(
            "--vocabulary cannot be given with --mergekit when the config has a "
            "tokenizer_source: the config decides it."
        )
    settings = dataclasses.replace(
        added,
        models=tuple(Path(m) for m in options.pop("models")),
        base=options["base"] if isinstance(options["base"], int) else Path(options["base"]),
    )
    return settings, options


def run_merge(args: argparse.Namespace) -> int:
    """``terge merge``: read the settings, check them, merge, write, summarise."""
    if args.mergekit is not None:
        settings, mergekit_options = _mergekit_settings(args)
        if "slices" in mergekit_options:
            return _stack_as(settings, quiet=args.quiet, options=mergekit_options)
        models, base, out = _check(settings)
        options = {**_merge_options(settings, base, args), **mergekit_options}
        return _run(args, settings, [os.fspath(model) for model in models], out, options)
    settings = _settings_from_args(args)
    if args.recipe is not None:
        settings = load_recipe(args.recipe).updated(settings)
    if settings.slices is not None:  # a recipe's [[slices]]: terge.stack
        return _stack_as(settings, quiet=args.quiet)
    settings, chosen = _choose(settings)
    models, base, out = _check(settings)
    options = _merge_options(settings, base, args)
    if chosen is not None and not args.quiet:
        _say(f"chose {_count(len(chosen), 'checkpoint')}, {chosen.rule}: {', '.join(chosen)}")
    return _run(args, settings, chosen or [os.fspath(model) for model in models], out, options)


def _run(
    args: argparse.Namespace,
    settings: Settings,
    models: Sequence[str] | Chosen,
    out: Path,
    options: dict[str, Any],
) -> int:
    """Merge ``models`` with ``options``, write the lineage where asked, and summarise."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, _torchrun() as rank:
        warnings.simplefilter("always")
        if rank is not None:
            options["distributed"] = True
        path, lineage = merge(
            models,
            out=os.fspath(out),
            lineage=True,
            **options,
        )
    if rank:  # another process of a torchrun job: rank 0 writes and tells
        return EXIT_OK
    if settings.lineage is not None:
        write_lineage(settings.lineage, Path(path), lineage, bool(settings.overwrite))
    if not args.quiet:
        for warning in caught:
            _say(f"warning: {_one_line(warning.message)}")
        elapsed = time.perf_counter() - start
        print(
            f"{PROG}: wrote {path} ({_count(len(lineage), 'tensor')} merged, "
            f"{len(lineage.skipped)} left as in the base) in {elapsed:.1f}s"
        )
    return EXIT_OK


_TORCHRUN_ENVIRONMENT = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""What ``torchrun`` sets for every process, and ``init_process_group`` reads."""


@contextlib.contextmanager
def _torchrun() -> Iterator[int | None]:
    """This process's rank when ``terge merge`` runs under ``torchrun`` with several processes
    (``WORLD_SIZE`` > 1 and the rest of ``init_process_group``'s environment set), joining them
    in a gloo group for the merge; None otherwise. Every process then writes the output shards
    it owns (``merge(..., distributed=True)``)."""
    launched = all(os.environ.get(key) for key in _TORCHRUN_ENVIRONMENT)
    if not launched or int(os.environ["WORLD_SIZE"]) <= 1 or not torch.distributed.is_available():
        yield None
        return
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo")
    try:
        yield dist.get_rank()
    finally:
        if started:
            dist.destroy_process_group()


# --- terge lineage ----------------------------------------------------------------------------

LINEAGE_DESCRIPTION = """\
Audit lineage files: the JSON record of how every tensor of a merge was made, written by
'terge merge' as OUT/lineage.json (and to --lineage FILE). A FILE may also be a merged folder,
meaning its lineage.json.
"""

LINEAGE_EPILOG = """\
a CI job that fails when a merge drifts:
  terge merge base math code -o merged --method ties --seed 0 --digests --lineage new.json
  terge lineage diff golden.json new.json      # exit 1, listing what changed
  terge lineage verify new.json --merged merged # exit 1, naming tensors that do not match
  terge lineage check new.json --policy policy.toml --format junit > check.xml
                                                # exit 1, naming each violation

exit status: 0 agree (diff), all match (verify) or the policy is kept (check); 1 they differ,
a tensor does not match or a rule is broken; 2 bad input (a malformed lineage file or policy,
a missing checkpoint or tensor).
"""


def _format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="text",
        help="text for people (default), json for scripts, junit for CI systems (every tensor "
        "a test case), e.g. --format junit > report.xml",
    )


def _lineage_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(
        dest="lineage_action", metavar="ACTION", title="actions", required=True
    )
    show = actions.add_parser(
        "show",
        help="summarise a lineage file",
        description="Summarise a lineage file: models, dtypes, how many tensors each method "
        "and each weight pattern made, what was left alone and why, and the versions.",
    )
    show.add_argument("file", metavar="FILE", help="the lineage file, e.g. merged/lineage.json")
    _format_argument(show)
    show.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw which model contributed what, block by block, as a picture (needs "
        "pip install 'terge[plot]'), e.g. --plot lineage.png",
    )
    diff = actions.add_parser(
        "diff",
        help="compare two lineage files (exit 1 when they differ)",
        description="List what differs between two lineage files: tensors merged or no longer "
        "merged, methods, settings, contributors and weights, what was left alone and why, "
        "models, dtypes, and digests where both have them. Exit 0 when they agree, 1 when they "
        "differ, 2 on bad input.",
    )
    diff.add_argument("old", metavar="OLD", help="the reference lineage, e.g. golden.json")
    diff.add_argument("new", metavar="NEW", help="the lineage to check, e.g. new.json")
    diff.add_argument(
        "--atol",
        type=_tolerance,
        default=0.0,
        metavar="X",
        help="how far a weight may move before it counts as changed, e.g. --atol 1e-12 "
        "(default 0: exactly)",
    )
    _format_argument(diff)
    verify = actions.add_parser(
        "verify",
        help="recompute a merge and check it against its checkpoint (exit 1 on a mismatch)",
        description="Recompute every merged tensor from the models as the lineage says "
        "(method, settings, seed, contributors, weights), one tensor at a time, and check it "
        "against the merged checkpoint bit for bit; with digests recorded, also check that the "
        "models and the checkpoint hold the very tensors that were merged. The models are read "
        "from the paths the lineage records (relative to the current folder) unless --models "
        "gives them. Exit 0 when all match, 1 naming each tensor that does not, 2 on bad input.",
    )
    verify.add_argument("file", metavar="FILE", help="the lineage file, e.g. golden.json")
    verify.add_argument(
        "--merged",
        required=True,
        metavar="OUT",
        help="the merged checkpoint (folder or file), e.g. --merged merged",
    )
    verify.add_argument(
        "--models",
        nargs="+",
        metavar="PATH",
        help="the models' checkpoints in index order, instead of the recorded paths, e.g. "
        "--models base math code",
    )
    verify.add_argument(
        "--base",
        metavar="PATH",
        help="a separate base's checkpoint, instead of the recorded path, e.g. --base pretrained",
    )
    verify.add_argument(
        "--rtol",
        type=_tolerance,
        default=0.0,
        metavar="X",
        help="relative tolerance per value, for a checkpoint merged on another platform, e.g. "
        "--rtol 1e-6 (default 0: bit for bit)",
    )
    verify.add_argument(
        "--atol",
        type=_tolerance,
        default=0.0,
        metavar="X",
        help="absolute tolerance per value: |written - recomputed| <= atol + rtol x "
        "|recomputed|, e.g. --atol 1e-8 (default 0: bit for bit)",
    )
    _format_argument(verify)
    _check_arguments(actions)
    actions.add_parser(
        "schema",
        help="print the JSON schema of lineage files",
        description="Print the JSON Schema (draft 2020-12) that every lineage file this terge "
        "writes follows, e.g. terge lineage schema > lineage.schema.json",
    )


def _check_arguments(actions: Any) -> None:
    check = actions.add_parser(
        "check",
        help="check a lineage against a policy (exit 1 naming each violation)",
        description="Check a lineage against rules: tensors that must be merged, reasons for "
        "which nothing may be left alone, the merged set equal to the base's floating tensors, "
        "dtypes kept, tensors kept tied, every model pinned (file digests or a revision), "
        "weights and settings within ranges. Rules come from --policy FILE (TOML) and the "
        "options below, which add to it. Exit 0 when every rule holds, 1 naming each "
        "violation, 2 on bad input.",
        epilog=_POLICY_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("file", metavar="FILE", help="the lineage file, e.g. merged/lineage.json")
    check.add_argument("--policy", metavar="TOML", help="the rules, e.g. --policy policy.toml")
    check.add_argument(
        "--require-merged",
        action="append",
        metavar="PATTERN",
        help="tensors matching PATTERN must be merged (repeatable), e.g. --require-merged "
        "'re:\\.mlp\\.' --require-merged layers:0-5",
    )
    check.add_argument(
        "--forbid-skipped",
        action="append",
        metavar="REASON",
        choices=REASONS,
        help=f"no tensor may be left alone for REASON (repeatable), one of: {', '.join(REASONS)}",
    )
    check.add_argument(
        "--merged-is-base-floating",
        action="store_true",
        help="the merged tensors must be exactly the base's floating tensors",
    )
    check.add_argument(
        "--same-dtypes",
        action="store_true",
        help="every tensor must be written in the base's dtype (with --merged: as the "
        "checkpoint holds it)",
    )
    check.add_argument(
        "--tied",
        action="append",
        metavar="NAME=NAME",
        help="the two names must stay one tensor (repeatable), e.g. --tied "
        "lm_head.weight=model.embed_tokens.weight",
    )
    check.add_argument(
        "--pinned",
        action="store_true",
        help="every model must be pinned: file digests (merge with --digests) or a revision",
    )
    check.add_argument(
        "--range",
        action="append",
        metavar="KEY=LOW:HIGH",
        help="weights (KEY weight) or a method's setting must lie in [LOW, HIGH] (repeatable), "
        "e.g. --range weight=0:1 --range density=0.2:0.8",
    )
    check.add_argument(
        "--base",
        metavar="PATH",
        help="the base's checkpoint, for --merged-is-base-floating and --same-dtypes (default: "
        "the recorded path), e.g. --base pretrained",
    )
    check.add_argument(
        "--merged",
        metavar="OUT",
        help="the merged checkpoint, whose dtypes --same-dtypes checks, e.g. --merged merged",
    )
    _format_argument(check)


_POLICY_EXAMPLE = """\
a policy file (every key optional):
  require_merged = ["re:\\\\.mlp\\\\.", "layers:0-1"]
  forbid_skipped = ["shape mismatch", "held by one model"]
  merged_is_base_floating = true
  same_dtypes = true
  tied = [["lm_head.weight", "model.embed_tokens.weight"]]
  pinned = true

  [ranges]
  weight = [0.0, 1.0]
  density = [0.2, 0.8]
"""


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def run_lineage(args: argparse.Namespace) -> int:
    """``terge lineage show|diff|verify``."""
    return LINEAGE_ACTIONS[args.lineage_action](args)


def _lineage_show(args: argparse.Namespace) -> int:
    lineage = load_lineage(args.file)
    if args.plot is not None:
        from ..plots import plot_lineage  # matplotlib only here

        plot_lineage(lineage, args.plot)
    print(render_show(lineage, args.file, args.format), end="")
    return EXIT_OK


def _lineage_diff(args: argparse.Namespace) -> int:
    old, new = load_lineage(args.old), load_lineage(args.new)
    found = diff_lineages(old, new, args.atol)
    print(render_diff(found, args.old, args.new, new, args.format), end="")
    return EXIT_FAILED if found.changes else EXIT_OK


def _lineage_verify(args: argparse.Namespace) -> int:
    lineage = load_lineage(args.file)
    problems = verify_lineage(
        lineage,
        args.merged,
        args.models,
        args.base,
        source=args.file,
        rtol=args.rtol,
        atol=args.atol,
    )
    print(render_verify(problems, lineage, args.merged, args.format), end="")
    return EXIT_FAILED if problems else EXIT_OK


def _lineage_check(args: argparse.Namespace) -> int:
    from ..policy import check_lineage

    rules = {} if args.policy is None else load_policy(args.policy)
    if args.require_merged:
        texts = [pattern(text, "--require-merged") for text in args.require_merged]
        rules["require_merged"] = (*rules.get("require_merged", ()), *texts)
    if args.forbid_skipped:
        rules["forbid_skipped"] = (*rules.get("forbid_skipped", ()), *args.forbid_skipped)
    for flag in ("merged_is_base_floating", "same_dtypes", "pinned"):
        if getattr(args, flag):
            rules[flag] = True
    for text in args.tied or ():
        first, equals, second = text.partition("=")
        if not (equals and first and second):
            raise UsageError(f"--tied {text!r} must be NAME=NAME, e.g. --tied a.weight=b.weight.")
        rules["tied"] = (*rules.get("tied", ()), (first, second))
    for text in args.range or ():
        key, bounds = parse_range(text)
        rules["ranges"] = {**rules.get("ranges", {}), key: bounds}
    policy = make_policy(rules)
    if policy.empty:
        raise UsageError(
            "no rules to check: give --policy FILE or rule options (--require-merged, "
            "--pinned, ...; see 'terge lineage check --help')."
        )
    lineage = load_lineage(args.file)
    violations = check_lineage(lineage, policy, base=args.base, merged=args.merged)
    print(render_check(violations, lineage, args.format), end="")
    return EXIT_FAILED if violations else EXIT_OK


def _lineage_schema(args: argparse.Namespace) -> int:
    print(lineage_schema_text(), end="")
    return EXIT_OK


LINEAGE_ACTIONS: dict[str, Callable[[argparse.Namespace], int]] = {
    "show": _lineage_show,
    "diff": _lineage_diff,
    "verify": _lineage_verify,
    "check": _lineage_check,
    "schema": _lineage_schema,
}


# --- terge extract-lora -------------------------------------------------------------------------

EXTRACT_DESCRIPTION = """\
Write the difference of a fine-tuned checkpoint and its base as a PEFT LoRA adapter folder
(adapter_model.safetensors, adapter_config.json, and lora.json with every module's rank and
relative truncation error), which PeftModel.from_pretrained(base_model, ADAPTER) loads. Each
changed weight is factored by truncated SVD in float64, one tensor at a time; changed biases of
factored modules go into lora_B's bias, other changed modules (norms) are saved whole, and
anything else is listed under left_out in lora.json and warned about.
"""

EXTRACT_EPILOG = """\
examples:
  terge extract-lora finetuned --base pretrained -o adapter --rank 16
  terge extract-lora finetuned --base pretrained -o adapter --energy 0.9
  terge extract-lora finetuned --base pretrained -o adapter --rank 8 --rank-pattern re:mlp=32
"""


def _extract_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("finetuned", metavar="FINETUNED", help="the fine-tuned checkpoint")
    parser.add_argument(
        "--base", required=True, metavar="BASE", help="the checkpoint the adapter goes over"
    )
    parser.add_argument(
        "-o", "--out", required=True, metavar="ADAPTER", help="the adapter folder to write"
    )
    parser.add_argument("--rank", type=int, metavar="R", help="the rank of every module")
    parser.add_argument(
        "--energy",
        type=float,
        metavar="E",
        help="instead of --rank: the smallest rank keeping this share of the squared singular "
        "values, in (0, 1], e.g. --energy 0.9 (with --rank-pattern: for the names it misses)",
    )
    parser.add_argument(
        "--rank-pattern",
        action="append",
        metavar="PATTERN=R",
        help="the rank of the weights a pattern matches (first match wins), e.g. "
        "--rank-pattern re:mlp=32; repeat it for several",
    )
    parser.add_argument(
        "--embeddings", action="store_true", help="factor embeddings too (else saved whole)"
    )
    parser.add_argument(
        "--include", action="append", metavar="PATTERN", help="consider only matching tensors"
    )
    parser.add_argument(
        "--exclude", action="append", metavar="PATTERN", help="never consider matching tensors"
    )
    parser.add_argument(
        "--fan-in-fan-out",
        action="store_true",
        default=None,
        help="the 2-D weights are stored in x out (GPT-2's Conv1D; default: read config.json)",
    )
    parser.add_argument("--out-dtype", metavar="DTYPE", help="the dtype of the factors")
    parser.add_argument("--task-type", metavar="TYPE", help="PEFT's task_type, e.g. CAUSAL_LM")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing ADAPTER")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def _rank_patterns(texts: list[str] | None, energy: float | None, rank: int | None) -> Any:
    """``--rank``/``--rank-pattern`` as ``extract_lora``'s ``rank``."""
    if not texts:
        return rank
    ranks: dict[Any, int] = {}
    for text in texts:
        pattern_text, separator, value = text.rpartition("=")
        if not separator or not pattern_text or not value.strip().isdigit():
            raise UsageError(
                f"--rank-pattern takes PATTERN=R with R a positive int, e.g. re:mlp=32; got "
                f"{text!r}."
            )
        ranks[parse_pattern(pattern_text, "--rank-pattern")] = int(value)
    if rank is not None:  # --rank is the rank of the rest
        ranks[re.compile(".")] = rank
    return ranks


def run_extract(args: argparse.Namespace) -> int:
    """``terge extract-lora``: factor, write, summarise."""
    from ..lora import extract_lora

    for what, given in (("FINETUNED", args.finetuned), ("--base", args.base)):
        if not as_spec(given).path.exists():
            raise UsageError(f"{what} {given!r} does not exist (no such file or folder).")

    def patterns(texts: list[str] | None, option: str) -> list[Any] | None:
        return None if texts is None else [parse_pattern(text, option) for text in texts]

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = extract_lora(
            args.finetuned,
            args.base,
            Path(args.out).expanduser(),
            rank=_rank_patterns(args.rank_pattern, args.energy, args.rank),
            energy=args.energy,
            embeddings=args.embeddings,
            included=patterns(args.include, "--include"),
            excluded=patterns(args.exclude, "--exclude"),
            fan_in_fan_out=args.fan_in_fan_out,
            out_dtype=None
            if args.out_dtype is None
            else parse_out_dtype(args.out_dtype, "--out-dtype"),
            task_type=args.task_type,
            overwrite=args.overwrite,
        )
    if not args.quiet:
        for warning in caught:
            _say(f"warning: {_one_line(warning.message)}")
        ranks = sorted({module.rank for module in adapter.modules.values()})
        shown = f"{ranks[0]}" if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        print(
            f"{PROG}: wrote {adapter.path} ({_count(len(adapter.modules), 'module')} at rank "
            f"{shown if ranks else '-'}, largest relative truncation error "
            f"{adapter.max_error:.3g}; {len(adapter.modules_to_save)} saved whole, "
            f"{len(adapter.left_out)} left out) in {time.perf_counter() - start:.1f}s"
        )
    return EXIT_OK


# --- terge inspect --------------------------------------------------------------------------------

INSPECT_DESCRIPTION = """\
Measure the task vectors (model - base) of checkpoints before merging them, one tensor at a time:
per block and per tensor kind (attention q/k/v/o, mlp, norm, embed, head), each model's
task-vector norm, the cosine similarity and the rate of sign conflicts of every pair, and the
share of entries TIES would keep at --density (kept by the trim and agreeing with the elected
sign; DARE keeps --density of them on average, rescaled by 1/density).
"""

INSPECT_EPILOG = """\
examples:
  terge inspect math code --base pretrained
  terge inspect base math code --density 0.3 --format json > inspect.json
  terge inspect math code --base pretrained --plot cosines.png   (pip install 'terge[plot]')
"""


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "models", nargs="+", metavar="MODEL", help="checkpoints: .safetensors/.bin or folders"
    )
    parser.add_argument(
        "--base",
        metavar="INDEX_OR_PATH",
        default="0",
        help="the base: an index into the models (default 0, the first, which is then not "
        "measured) or a separate checkpoint, e.g. --base pretrained",
    )
    parser.add_argument(
        "--density",
        type=float,
        default=0.2,
        metavar="D",
        help="the density TIES and DARE are judged at, in (0, 1], e.g. --density 0.3 (default 0.2)",
    )
    parser.add_argument(
        "--include", action="append", metavar="PATTERN", help="measure only matching tensors"
    )
    parser.add_argument(
        "--exclude", action="append", metavar="PATTERN", help="never measure matching tensors"
    )
    parser.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="a table for the terminal (default) or JSON",
    )
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw a heatmap per block and model pair (needs pip install 'terge[plot]'), "
        "e.g. --plot cosines.png",
    )
    parser.add_argument(
        "--metric",
        choices=("cosine", "conflicts"),
        default="cosine",
        help="what --plot draws: cosine similarity (default) or sign-conflict rate",
    )


def run_inspect(args: argparse.Namespace) -> int:
    """``terge inspect``: measure, print, and draw when asked."""
    from ..inspection import inspect

    models = [Path(model).expanduser() for model in args.models]
    for path in models:
        if hub_reference(path) is None and not path.exists():
            raise UsageError(f"model {str(path)!r} does not exist (no such file or folder).")
    base = _base_value(args.base)
    if isinstance(base, Path) and hub_reference(base) is None and not base.exists():
        raise UsageError(f"base model {str(base)!r} does not exist (no such file or folder).")

    def patterns(texts: list[str] | None, option: str) -> list[Any] | None:
        return None if texts is None else [parse_pattern(text, option) for text in texts]

    report = inspect(
        [os.fspath(model) for model in models],
        base if isinstance(base, int) else os.fspath(base),
        density=args.density,
        included=patterns(args.include, "--include"),
        excluded=patterns(args.exclude, "--exclude"),
    )
    if args.plot is not None:
        from ..plots import heatmap  # matplotlib only here

        heatmap(report, args.plot, args.metric)
    if args.format == "json":
        print(json.dumps(report.to_json(), indent=2, sort_keys=True, allow_nan=False))
    else:
        print(report.table(), end="")
    return EXIT_OK


COMMANDS: dict[str, Command] = {
    "merge": Command(
        help="merge checkpoints into a sharded safetensors folder",
        description=MERGE_DESCRIPTION,
        epilog=MERGE_EPILOG,
        add_arguments=_merge_arguments,
        run=_run_merge,
    ),
    "lineage": Command(
        help="show, diff, verify and check lineage files (for CI)",
        description=LINEAGE_DESCRIPTION,
        epilog=LINEAGE_EPILOG,
        add_arguments=_lineage_arguments,
        run=run_lineage,
    ),
    "stack": Command(
        help="build a model from slices of models' blocks (depth up-scaling, frankenmerges)",
        description=STACK_DESCRIPTION,
        epilog=STACK_EPILOG,
        add_arguments=add_stack_arguments,
        run=run_stack,
    ),
    "inspect": Command(
        help="measure task vectors before merging: norms, cosines, sign conflicts",
        description=INSPECT_DESCRIPTION,
        epilog=INSPECT_EPILOG,
        add_arguments=_inspect_arguments,
        run=run_inspect,
    ),
    "extract-lora": Command(
        help="write a fine-tuned checkpoint's difference from its base as a PEFT LoRA adapter",
        description=EXTRACT_DESCRIPTION,
        epilog=EXTRACT_EPILOG,
        add_arguments=_extract_arguments,
        run=run_extract,
    ),
}
"""Every subcommand, by name, in the order ``terge --help`` lists them."""


# --- the command ----------------------------------------------------------------------------------

DESCRIPTION = """\
terge: exact, memory-lean merging of PyTorch checkpoints (model soups, task arithmetic, TIES,
DARE, SLERP, ...), with a lineage record of how every tensor was made.
"""

EPILOG = f"""\
examples:
  terge merge a b c -o soup
      the uniform average of three checkpoints, into the folder soup/
  terge merge base math code -o merged --method ties:density=0.3 --weights 1,1,2
      TIES task vectors of math and code over base (model 0), code weighing double
  terge merge --recipe soup.toml
      every setting from a TOML recipe, such as:

{_indent(RECIPE_EXAMPLE, "    ")}
run 'terge merge --help' for every option, pattern and method.
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``terge`` parser with every subcommand of :data:`COMMANDS`."""
    parser = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(metavar="COMMAND", title="commands", required=True)
    for name, command in COMMANDS.items():
        subparser = subparsers.add_parser(
            name,
            help=command.help,
            description=command.description,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(subparser)
        subparser.set_defaults(run=command.run)
    return parser


def _one_line(message: object) -> str:
    text = " ".join(str(message).splitlines()).strip()
    return text


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``terge`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv  # the model card shows the command that made a merge
        return args.run(args)
    except SystemExit as exit_:  # --help, --version
        return _exit_code(exit_.code)
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED
    except TergeError as error:  # the command line, the recipe or the models are at fault
        _say(f"error: {_one_line(error) or type(error).__name__}")
        return EXIT_USAGE
    except (OSError, ValueError, MemoryError, torch.cuda.OutOfMemoryError) as error:
        _say(f"error: {_one_line(error) or type(error).__name__}")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
