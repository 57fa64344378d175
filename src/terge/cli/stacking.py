"""``terge stack``: a model from slices of other models' blocks (see :func:`terge.stack`).

A slice on the command line is ``PATH:START:STOP`` (blocks START to STOP - 1, as Python's
``range`` and mergekit's ``layer_range``), optionally ``@WEIGHT`` (a number, or numbers joined by
commas: a gradient over the slice's blocks); sources joined by ``+`` are merged block by block.
Recipes say the same with ``[[slices]]`` tables (``terge merge --recipe``), and mergekit
``slices:`` configs convert (``terge merge --mergekit``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..stacking import Blocks, StackError, blocks, stack
from .recipe import Settings, parse_method, parse_out_dtype, parse_shard_size

__all__ = ["STACK_DESCRIPTION", "STACK_EPILOG", "add_stack_arguments", "parse_slice", "run_stack"]

STACK_DESCRIPTION = """\
Build a model whose transformer blocks are slices of other models' blocks: depth up-scaling,
frankenmerges. Blocks are renumbered from 0; config.json's num_hidden_layers (GPT-2: n_layer) and
per-layer lists (layer_types) follow; the embeddings, final norm and head, config and tokenizer
files come from --base (default: the first slice's model), the head from --head if given.
"""

STACK_EPILOG = """\
slices:
  PATH:START:STOP            blocks START..STOP-1 of PATH, copied (stop excluded, as range())
  A:0:8@0.3+B:4:12@0.7       blocks merged one by one, A's weight 0.3, B's 0.7 (--method)
  A:0:8@0,1+B:0:8@1,0        weights as gradients over the slice's blocks

examples:
  terge stack llama:0:24 llama:8:32 -o llama-dus          # 32 blocks -> 48 (depth up-scaling)
  terge stack a:0:16 b:16:32 -o franken --head b            # a's first half, b's second
"""


def parse_slice(text: str) -> Blocks | list[Blocks]:
    """One command-line slice (see the module's docstring)."""
    if not isinstance(text, str) or not text:
        raise UsageError(f"a slice must be PATH:START:STOP; got {text!r}.")
    parts = [_source(part, text) for part in text.split("+")]
    return parts[0] if len(parts) == 1 else parts


def _source(part: str, whole: str) -> Blocks:
    weight: Any = 1.0
    head, at, tail = part.rpartition("@")
    if at and tail:
        numbers = _numbers(tail)
        if numbers is not None:
            part, weight = head, numbers if len(numbers) > 1 else numbers[0]
    path, _, span = part.partition(":") if part.count(":") < 2 else _split(part)
    start, _, stop = span.partition(":")
    if not (path and start.isdecimal() and stop.isdecimal()):  # not isdigit: int() refuses '²'
        raise UsageError(
            f"cannot read the slice {whole!r}: give PATH:START:STOP (blocks START to STOP - 1), "
            "optionally @WEIGHT, sources joined by '+'; e.g. llama:0:24 or a:0:8@0.3+b:0:8@0.7."
        )
    try:
        return blocks(Path(path).expanduser(), int(start), int(stop), weight=weight)
    except StackError as error:
        raise UsageError(f"the slice {whole!r}: {error}") from None


def _split(part: str) -> tuple[str, str, str]:
    path, start, stop = part.rsplit(":", 2)
    return path, ":", f"{start}:{stop}"


def _numbers(text: str) -> list[float] | None:
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slices", nargs="+", metavar="SLICE", help="PATH:START:STOP[@W][+...]")
    parser.add_argument("-o", "--out", required=True, type=Path, help="the output folder")
    parser.add_argument("--base", type=Path, help="the model giving embeddings, head and config")
    parser.add_argument("--head", type=Path, help="the model giving the final norm and head")
    parser.add_argument(
        "--method", help="how '+'-joined sources merge (default arithmetic), e.g. slerp"
    )
    parser.add_argument("--out-dtype", help="dtype of the written floats, e.g. bfloat16")
    parser.add_argument("--max-shard-size", help='largest shard, e.g. "2GB" (default 5GB)')
    parser.add_argument("--seed", type=int, help="seeds random methods")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--dry-run", action="store_true", help="check and print, write nothing")
    parser.add_argument("--quiet", action="store_true", help="print nothing on success")
    parser.add_argument(
        "--no-model-card",
        dest="model_card",
        action="store_false",
        help="write no OUT/README.md model card (by default one with a [[slices]] recipe)",
    )


def run_stack(args: argparse.Namespace) -> int:
    """``terge stack``: parse the slices and options, stack, summarise."""
    settings = Settings(
        slices=tuple(parse_slice(text) for text in args.slices),
        out=args.out,
        base=args.base,
        head=args.head,
        method=None if args.method is None else parse_method(args.method, "--method"),
        out_dtype=None
        if args.out_dtype is None
        else parse_out_dtype(args.out_dtype, "--out-dtype"),
        max_shard_size=None
        if args.max_shard_size is None
        else parse_shard_size(args.max_shard_size, "--max-shard-size"),
        seed=args.seed,
        overwrite=args.overwrite or None,
    )
    options = {} if args.model_card else {"model_card": False}
    return run_stack_settings(settings, quiet=args.quiet, dry_run=args.dry_run, options=options)


_NOT_WITH_SLICES = ("models", "weights", "include", "exclude", "normalize", "last", "best")
_NOT_FOR_A_STACK = {
    "lineage": "a stack writes its lineage to OUT/lineage.json",
    "vocabulary": "a stack aligns no vocabularies (its embeddings are the base's)",
    "lora_rank": "a stack is written as a whole model, not a LoRA adapter",
    "lora_energy": "a stack is written as a whole model, not a LoRA adapter",
    "lora_embeddings": "a stack is written as a whole model, not a LoRA adapter",
    "metric": "it ranks the checkpoints that best N chooses, and a stack takes no best",
    "mode": "it ranks the checkpoints that best N chooses, and a stack takes no best",
}
"""Settings of a merge that a stack has no use for: refused, not dropped silently."""


def run_stack_settings(
    settings: Settings, *, quiet: bool = False, dry_run: bool = False, options: Any = None
) -> int:
    """Stack as ``settings`` say (a recipe's ``[[slices]]``, the command line, or a mergekit
    ``slices:`` config's ``options``)."""
    for key in _NOT_WITH_SLICES:
        if getattr(settings, key) is not None:
            raise UsageError(
                f"{key!r} cannot be given with slices: a stack takes its blocks from the slices "
                "(give each source's weight in its slice)."
            )
    for key, why in _NOT_FOR_A_STACK.items():
        if getattr(settings, key) is not None:
            raise UsageError(f"{key!r} cannot be given with slices: {why}; drop it.")
    if settings.out_format not in (None, "safetensors"):
        raise UsageError("a stack is written as safetensors; drop out_format.")
    if isinstance(settings.base, int):
        raise UsageError("with slices, base must be a path (the model giving the embeddings).")
    if isinstance(settings.method, dict):
        raise UsageError("with slices, method is one method for every merged slice.")
    if settings.out is None:
        raise UsageError("no output folder: give -o/--out OUT, or a recipe with 'out'.")
    given: dict[str, Any] = {
        "base": settings.base,
        "head": settings.head,
        "method": settings.method,
        "dtype": settings.dtype,
        "out_dtype": settings.out_dtype,
        "max_shard_size": settings.max_shard_size,
        "overwrite": settings.overwrite,
        "seed": settings.seed,
    }
    kwargs = {key: value for key, value in given.items() if value is not None}
    kwargs.update(options or {})
    slices = list(kwargs.pop("slices", settings.slices) or ())
    start = time.perf_counter()
    if dry_run:
        record = stack(slices, out=os.fspath(settings.out), dry_run=True, **kwargs)
        if not quiet:
            print(f"terge: would write {settings.out} ({len(record.stack['blocks'])} blocks)")
        return 0
    path, record = stack(slices, out=os.fspath(settings.out), lineage=True, **kwargs)
    if not quiet:
        blocks_ = len(record.stack["blocks"])
        merged = sum(block["method"] != "passthrough" for block in record.stack["blocks"])
        print(
            f"terge: wrote {path} ({blocks_} blocks, {merged} merged) in "
            f"{time.perf_counter() - start:.1f}s",
            file=sys.stdout,
        )
    return 0
