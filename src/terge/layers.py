"""Selecting transformer blocks (and the embeddings and head around them) by index.

``layers("0-5", embeddings=True)`` is a compiled pattern, usable wherever terge takes one
(``included``, ``excluded``, the keys of weight and method maps), that matches the embeddings and
blocks 0 to 5 of the usual Hugging Face layouts. :func:`layer_index` reads the block index back.

A *block segment* is a name segment ``layers``, ``layer``, ``h``, ``blocks`` or ``block``
followed by a segment of digits, as in ``model.layers.3.``, ``transformer.h.3.``,
``bert.encoder.layer.3.``, ``gpt_neox.layers.3.``, ``model.decoder.layers.3.`` (OPT) or
``blocks.3.`` (timm). Only the *first* block segment of a name counts, so T5's
``encoder.block.3.layer.1.`` is block 3, never block 1. An encoder-decoder model's encoder and
decoder blocks of the same index both match.
"""

from __future__ import annotations

from collections.abc import Iterable

import regex

from .errors import TergeError


class LayerSpecError(TergeError, ValueError):
    """A layer specification is not an index, a range or a string such as ``"0-5"``."""


BLOCK_KEYS = ("layers", "layer", "h", "blocks", "block")
"""Segments that, followed by a segment of digits, start a transformer block."""

EMBEDDING_SEGMENTS = (
    "embed",
    "embeds",
    "embedding",
    "embeddings",
    "wte",
    "wpe",
    "word_embeddings",
    "word_embeddings_layernorm",
    "embed_in",
    "embed_tokens",
    "embed_positions",
    "position_embeddings",
    "token_type_embeddings",
    "tok_embeddings",
    "patch_embed",
    "pos_embed",
    "cls_token",
    "project_in",
    "shared",
)
"""Segments that make a name part of the embeddings when no block segment precedes them.

GPT-2/GPT-J ``transformer.wte``/``wpe``, GPT-NeoX ``gpt_neox.embed_in``, Llama
``model.embed_tokens``, OPT ``model.decoder.embed_tokens``/``embed_positions``/``project_in``,
BERT ``bert.embeddings.*`` (word, position and token-type embeddings and their LayerNorm), BLOOM
``word_embeddings``/``word_embeddings_layernorm``, T5/BART ``shared``, Meta Llama
``tok_embeddings``, timm ``patch_embed``/``pos_embed``/``cls_token``.
"""

HEAD_SEGMENTS = (
    "lm_head",
    "embed_out",
    "output",
    "output_layer",
    "ln_f",
    "norm",
    "final_norm",
    "final_layer_norm",
    "final_layernorm",
    "project_out",
    "pooler",
    "cls",
    "classifier",
    "score",
    "qa_outputs",
    "head",
    "fc_norm",
)
"""Segments that make a name part of the head when no block segment precedes them.

Final norms (GPT-2/GPT-J ``transformer.ln_f``, Llama ``model.norm``, GPT-NeoX
``gpt_neox.final_layer_norm``, OPT ``model.decoder.final_layer_norm``, Phi ``final_layernorm``),
output projections (``lm_head``, GPT-NeoX ``embed_out``, Meta Llama ``output``, ChatGLM
``output_layer``, OPT ``project_out``) and task heads (BERT ``bert.pooler``/``cls``,
``classifier``, ``score``, ``qa_outputs``, timm ``head``/``fc_norm``). Inside a block these words
mean something else (``model.layers.3.norm`` is block 3's), hence the "no block before" rule.
"""


def _alternation(words: Iterable[str]) -> str:
    return "(?:" + "|".join(regex.escape(word) for word in words) + ")"


_KEY = _alternation(BLOCK_KEYS)
_PREFIX = rf"^(?:(?!{_KEY}\.\d+\.)[^.]+\.)*"
"""Any leading segments that do not start a block, so only the first block segment is read."""

_INDEX = regex.compile(rf"{_PREFIX}{_KEY}\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The index of the block ``name`` belongs to, or ``None`` outside blocks.

    ``layer_index("model.layers.12.mlp.up_proj.weight") == 12``;
    ``layer_index("model.embed_tokens.weight") is None``.
    """
    match = _INDEX.match(name)
    return int(match[1]) if match else None


_ITEM = r"(\d+)(?:\s*-\s*(\d+))?"
_SPEC_STRING = regex.compile(rf"\s*{_ITEM}(?:\s*[,\s]\s*{_ITEM})*\s*")
_SPEC_FORMS = (
    "give block indices as ints (5), ranges (range(0, 6): 0 to 5, end excluded as in Python), "
    "lists of ints, or strings of inclusive ranges such as '5', '0-5' (0 to 5, both included) "
    "or '0-3, 8, 10-11'; pass embeddings=True / head=True to add the embeddings / head"
)


def _indices(item: object) -> list[int]:
    if isinstance(item, bool):
        raise LayerSpecError(f"layers() got the bool {item!r}; {_SPEC_FORMS}.")
    if isinstance(item, int):
        if item < 0:
            raise LayerSpecError(f"layers() got the negative index {item}; {_SPEC_FORMS}.")
        return [item]
    if isinstance(item, str):
        if not _SPEC_STRING.fullmatch(item):
            hint = ""
            if regex.search(r"(?i)(?:^|[\s,])[bme](?:$|[\s,])", item):
                hint = (
                    " (llm_sepweight part specs such as 'b 0-5 e' are not read here, since their "
                    "ranges exclude the end: write layers(range(0, 5), embeddings=True, "
                    "head=True) for 'b 0-5 e')"
                )
            raise LayerSpecError(f"layers() cannot read {item!r}{hint}; {_SPEC_FORMS}.")
        found: list[int] = []
        for match in regex.finditer(_ITEM, item):
            start, end = int(match[1]), int(match[2] if match[2] is not None else match[1])
            if end < start:
                raise LayerSpecError(
                    f"layers() got the range {match[0]!r} in {item!r}, whose end comes before its "
                    f"start; write '{end}-{start}'."
                )
            found.extend(range(start, end + 1))
        return found
    if isinstance(item, Iterable):  # range, list, tuple, set
        found = [index for member in item for index in _indices(member)]
        if not found:
            raise LayerSpecError(f"layers() got the empty {item!r}; {_SPEC_FORMS}.")
        return found
    raise LayerSpecError(f"layers() got a {type(item).__name__} ({item!r}); {_SPEC_FORMS}.")


def layers(
    *spec: int | str | Iterable[int], embeddings: bool = False, head: bool = False
) -> regex.Pattern[str]:
    """A pattern matching blocks ``spec`` (plus the embeddings and/or head when asked).

    ``layers("0-5", embeddings=True)`` matches the embeddings and blocks 0, 1, ..., 5;
    ``layers(range(0, 6))`` and ``layers(0, 1, 2, 3, 4, 5)`` match the same blocks. Strings hold
    *inclusive* ranges ("0-5" is six blocks), ``range`` objects keep Python's exclusive end.

    The pattern, for ``layers("0-1", embeddings=True, head=True)``, is exactly::

        ^(?:(?!(?:layers|layer|h|blocks|block)\\.\\d+\\.)[^.]+\\.)*
        (?:(?:layers|layer|h|blocks|block)\\.(?:0|1)\\.
          |(?:EMBEDDING_SEGMENTS joined by |)(?:\\.|$)
          |(?:HEAD_SEGMENTS joined by |)(?:\\.|$))

    (on one line, without spaces): leading segments that do not start a block, then a block
    segment with a selected index, or an embedding segment, or a head segment. So a name
    matches only by its first block segment, and embedding or head words inside a block (such
    as Llama's ``model.layers.3.input_layernorm`` or BERT's ``...layer.3.output``) never count.
    See :data:`EMBEDDING_SEGMENTS` and :data:`HEAD_SEGMENTS` for the exact words.
    """
    indices = sorted({index for item in spec for index in _indices(item)})
    if not indices and not embeddings and not head:
        raise LayerSpecError(f"layers() was given nothing to select; {_SPEC_FORMS}.")
    branches = []
    if indices:
        branches.append(rf"{_KEY}\.(?:{'|'.join(map(str, indices))})\.")
    if embeddings:
        branches.append(rf"{_alternation(EMBEDDING_SEGMENTS)}(?:\.|$)")
    if head:
        branches.append(rf"{_alternation(HEAD_SEGMENTS)}(?:\.|$)")
    return regex.compile(rf"{_PREFIX}(?:{'|'.join(branches)})")


def _block_segment(name: str) -> int | None:
    """The position (in ``name.split(".")``) of the digits of ``name``'s first block segment."""
    parts = name.split(".")
    for position in range(len(parts) - 2):  # a block segment is followed by more of the name
        if parts[position] in BLOCK_KEYS and parts[position + 1].isdigit():
            return position + 1
    return None


def block_prefix(name: str) -> str | None:
    """The name of the block stack ``name`` belongs to, or ``None`` outside blocks.

    ``block_prefix("model.layers.3.mlp.up_proj.weight") == "model.layers"``; an
    encoder-decoder model has two stacks (``encoder.block`` and ``decoder.block``).
    """
    position = _block_segment(name)
    return None if position is None else ".".join(name.split(".")[:position])


def renumbered(name: str, index: int) -> str:
    """``name`` moved to block ``index`` (its first block segment's digits replaced).

    ``renumbered("model.layers.3.mlp.up_proj.weight", 7) == "model.layers.7.mlp.up_proj.weight"``;
    a name outside the blocks is returned as it is.
    """
    position = _block_segment(name)
    if position is None:
        return name
    parts = name.split(".")
    parts[position] = str(index)
    return ".".join(parts)
