"""Vocabularies that differ: tokens read with ``tokenizers``, an output vocabulary, row tables.

Models whose embedding and LM-head rows differ because their tokenizers differ (added tokens,
resized embeddings, other vocabularies) are aligned by token string: every output row is a token
of the output vocabulary (the base's, the union, or a named model's), and for each model the
table here says which of its rows holds that token (-1: it lacks it). The plan groups rows by the
set of models holding them; the executor merges each group.

``tokenizers`` is imported only when a merge asks for a vocabulary (``pip install 'terge[llm]'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MissingDependencyError, VocabularyError
from .io.reading import allowed_roots, outside

CHOICES = ("base", "union")
"""The named output vocabularies; an int names a model's."""

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (
    TOKENIZER_FILE,
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""A folder's tokenizer files: replaced as one set when the output vocabulary is not the base's
(a base's ``vocab.json`` beside a union's ``tokenizer.json`` would contradict it)."""

MAX_TOKENIZER_BYTES = 1 << 30
"""The largest ``tokenizer.json`` read (1 GiB; real ones are a few MiB)."""

_EDITABLE_MODELS = ("BPE", "WordLevel", "WordPiece")
"""Tokenizer models whose vocabulary is a token -> id map that a union can extend."""


def check_choice(vocabulary: Any, count: int) -> str | int | None:
    """``vocabulary`` checked: ``None``, ``"base"``, ``"union"`` or a model index (normalised)."""
    if vocabulary is None or vocabulary in CHOICES:
        return vocabulary
    if isinstance(vocabulary, int) and not isinstance(vocabulary, bool):
        if -count <= vocabulary < count:
            return vocabulary % count
        raise VocabularyError(
            f"`vocabulary` is {vocabulary}, but there are only {count} models; pass an index from "
            f"{-count} to {count - 1}, 'base' or 'union'."
        )
    raise VocabularyError(
        f"`vocabulary` must be 'base', 'union', a model index or None (no alignment, as in terge "
        f"0.1.1); got {vocabulary!r}."
    )


def _tokenizers_module() -> Any:
    try:
        import tokenizers
    except ImportError as error:
        raise MissingDependencyError(
            "merge(..., vocabulary=...) reads tokenizers with the `tokenizers` library, which is "
            "not installed: pip install 'terge[llm]'."
        ) from error
    return tokenizers


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """One model's tokens (string -> id), from its tokenizer; ``rows`` is how many rows its
    vocabulary tensors have (``config.json``'s ``vocab_size``, else the tokenizer's size)."""

    tokens: Mapping[str, int]
    size: int
    rows: int
    tokenizer: Any
    """The ``tokenizers.Tokenizer``, kept only where asked (the output's owner): a large
    vocabulary's takes tens of MiB, freed before any tensor is merged."""
    origin: str | None
    """The ``tokenizer.json`` read, or ``None`` for a ``tokenizers.Tokenizer`` given."""
    folder: Path | None = None
    """The folder whose tokenizer files go with it (its ``tokenizer_config.json``)."""
    added: Mapping[str, Any] = field(default_factory=dict)
    """The added tokens (``tokenizers.AddedToken``: special, lstrip, ...) by content."""


def read_vocabulary(
    given: Any, folder: Path | None, config_rows: int | None, where: str, keep: bool = True
) -> Vocabulary:
    """A model's vocabulary: from ``given`` (a ``tokenizers.Tokenizer``, a ``tokenizer.json``
    path or a folder holding one) or else from ``folder``, the model's checkpoint folder;
    ``keep``: keep the tokenizer itself (else only its tokens)."""
    tokenizers = _tokenizers_module()
    origin: str | None = None
    if isinstance(given, tokenizers.Tokenizer):
        tokenizer = given
        given_folder = None
    else:
        if given is None:
            if folder is None:
                raise VocabularyError(
                    f"{where} has no folder to read a tokenizer from (it is in memory, or a "
                    f"single weights file); pass tokenizers=[...] with a tokenizers.Tokenizer, a "
                    f"{TOKENIZER_FILE} path or a folder for it."
                )
            path, given_folder = folder / TOKENIZER_FILE, folder
        elif isinstance(given, (str, os.PathLike)):
            path = Path(given).expanduser()
            given_folder = path if path.is_dir() else path.parent
            path = path / TOKENIZER_FILE if path.is_dir() else path
        else:
            raise VocabularyError(
                f"the tokenizer given for {where} is a {type(given).__name__}; pass a "
                f"tokenizers.Tokenizer, the path of a {TOKENIZER_FILE}, a folder holding one, or "
                "None (read from the model's folder)."
            )
        tokenizer = _load(path, given_folder, where)
        origin = str(path)
        folder = given_folder
    tokens = dict(tokenizer.get_vocab(with_added_tokens=True))
    size = max(tokens.values(), default=-1) + 1
    if size > 2 * len(tokens) + 1024:  # tables of `size` rows are made: no absurd ids
        raise VocabularyError(
            f"{where}'s tokenizer gives ids up to {size - 1} to only {len(tokens)} tokens; its "
            "ids are not a vocabulary's (is the tokenizer.json damaged?)."
        )
    rows = size if config_rows is None else config_rows
    if rows < 1:
        raise VocabularyError(f"{where}'s vocabulary is empty ({rows} rows); is it a tokenizer?")
    added = {t.content: t for t in tokenizer.get_added_tokens_decoder().values()}
    return Vocabulary(tokens, size, rows, tokenizer if keep else None, origin, folder, added)


def config_rows(folder: Path | None) -> int | None:
    """``vocab_size`` from a checkpoint folder's ``config.json``, if it names a positive one."""
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    size = config.get("vocab_size") if isinstance(config, dict) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def checked_rows(entries: Mapping[str, Any], rows: int | None, where: str) -> int | None:
    """A model's ``vocab_size``, which one of its tensors (``entries``) must have as its row
    count: tables of that many rows are made, so a config cannot ask for absurd ones."""
    if rows is None or any(e.shape and e.shape[0] == rows for e in entries.values()):
        return rows
    raise VocabularyError(
        f"{where}'s config says vocab_size {rows}, but none of its tensors has {rows} rows; "
        "fix config.json, or pass vocabulary_tensors=[...] and a matching vocab_size."
    )


def _load(path: Path, folder: Path, where: str) -> Any:
    """``tokenizer.json`` read with ``tokenizers``, after checking it is there and inside its
    folder; a folder of only ``vocab.json``/``merges.txt`` or ``tokenizer.model`` is named."""
    tokenizers = _tokenizers_module()
    if not path.is_file():
        others = sorted(n for n in TOKENIZER_FILES[2:] if (folder / n).is_file())
        hint = (
            f" It holds {', '.join(others)}, a slow tokenizer's files: convert them once with "
            "transformers (AutoTokenizer.from_pretrained(folder).save_pretrained(folder) writes "
            f"{TOKENIZER_FILE})."
            if others
            else ""
        )
        raise VocabularyError(
            f"{where}: no {TOKENIZER_FILE} at {path}; vocabularies are read from a fast "
            f"tokenizer's {TOKENIZER_FILE}.{hint} Or pass tokenizers=[...] for it."
        )
    real = outside(path, allowed_roots(folder))
    if real is not None:
        raise VocabularyError(
            f"{where}: {path} is a link to {real}, outside its folder; terge does not read files "
            "that links lead out of a checkpoint to. Pass the tokenizer's real path in "
            "tokenizers=[...] if you trust it."
        )
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise VocabularyError(
            f"{where}: {path} is {path.stat().st_size} bytes, more than the {MAX_TOKENIZER_BYTES} "
            "a tokenizer is read up to; is it a tokenizer?"
        )
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust parser raises plain Exceptions
        raise VocabularyError(
            f"{where}: {path} cannot be read as a tokenizer ({error}); is it a tokenizers "
            f"{TOKENIZER_FILE}?"
        ) from None


@dataclass(frozen=True, eq=False)
class OutputVocabulary:
    """The output's tokens, and per model the row holding each output row's token (-1: none)."""

    source: str | int
    """``"base"``, ``"union"`` or a model index, as asked."""
    owner: int
    """The model whose tokenizer the output starts from (the base's for base and union)."""
    tokens: Mapping[str, int]
    rows: int
    """The output vocabulary tensors' row count."""
    index: tuple[torch.Tensor, ...]
    """Per model, an int64 tensor of ``rows``: its row for each output row, -1 where it lacks
    the token. The owner's rows that hold no token (a resized embedding's padding) map to
    themselves, so they are copied from it."""
    model_rows: tuple[int, ...] = ()
    """Per model, its vocabulary tensors' row count (``config.json``'s ``vocab_size``)."""
    added: tuple[tuple[int, str], ...] = ()
    """The tokens a union added to the base's, with the model each came from."""

    @property
    def identity(self) -> bool:
        """Whether every model holds every output row at the same index (nothing to align)."""
        expected = torch.arange(self.rows)
        return all(
            index.shape == expected.shape and bool(torch.equal(index, expected))
            for index in self.index
        )


def output_vocabulary(
    vocabularies: Sequence[Vocabulary], base: int, source: str | int
) -> OutputVocabulary:
    """The output vocabulary ``source`` names, and every model's row for each of its rows."""
    owner = base if source in CHOICES else int(source)
    kept = vocabularies[owner]
    tokens = dict(kept.tokens)
    added: list[tuple[int, str]] = []
    rows = kept.rows
    if source == "union":
        next_id = kept.size  # a resized base's padding rows are not tokens: new ones go here
        for number, vocabulary in enumerate(vocabularies):
            if number == owner:
                continue
            for token, _ in sorted(vocabulary.tokens.items(), key=lambda item: item[1]):
                if token not in tokens:
                    tokens[token] = next_id
                    added.append((number, token))
                    next_id += 1
        rows = next_id if added else kept.rows
    out_ids = torch.tensor(list(tokens.values()), dtype=torch.int64)  # one pass, as ints
    if kept.size > kept.rows:  # a union's new ids are past it: its own must fit its rows
        raise VocabularyError(
            f"models[{owner}]'s tokenizer has {kept.size} ids but its vocabulary tensors have "
            f"{kept.rows} rows (config.json's vocab_size); the embedding is smaller than its "
            "tokenizer. Resize it (model.resize_token_embeddings(len(tokenizer))) first."
        )
    index = []
    for number, vocabulary in enumerate(vocabularies):
        table = torch.full((rows,), -1, dtype=torch.int64)
        own = vocabulary.tokens
        outs, theirs = [], []
        for token, out in tokens.items():
            their = own.get(token)
            if their is not None:
                outs.append(out)
                theirs.append(their)
        if outs:
            table[torch.tensor(outs, dtype=torch.int64)] = torch.tensor(theirs, dtype=torch.int64)
        if number == owner:  # rows without a token (padding) are the owner's own
            holes = torch.ones(rows, dtype=torch.bool)
            holes[out_ids] = False
            holes[kept.rows :] = False
            table[holes] = torch.arange(rows)[holes]
        index.append(table)
    model_rows = tuple(v.rows for v in vocabularies)
    return OutputVocabulary(source, owner, tokens, rows, tuple(index), model_rows, tuple(added))


def row_ranges(rows: torch.Tensor) -> list[list[int]]:
    """Sorted row indices as ``[start, stop)`` runs: the lineage's compact form."""
    if rows.numel() == 0:
        return []
    rows = torch.sort(rows).values
    breaks = torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1
    starts = torch.cat([rows[:1], rows[breaks]]).tolist()
    stops = torch.cat([rows[breaks - 1] + 1, rows[-1:] + 1]).tolist()
    return [[a, b] for a, b in zip(starts, stops)]


# --- the output folder's tokenizer files ---------------------------------------------------------


def tokenizer_files(
    output: OutputVocabulary, vocabularies: Sequence[Vocabulary]
) -> dict[str, str] | None:
    """The tokenizer files of the output folder (name -> text) when its vocabulary is not the
    base's as it is (``None``: the base folder's files are copied as they are)."""
    if output.source == "base" or (output.source == "union" and not output.added):
        return None
    owner = vocabularies[output.owner]
    tokenizer = _union(output, vocabularies) if output.source == "union" else owner.tokenizer
    files = {TOKENIZER_FILE: tokenizer.to_str()}
    for name in (TOKENIZER_CONFIG, "special_tokens_map.json"):
        text = _read_text(owner.folder, name)
        if text is not None and name == TOKENIZER_CONFIG:
            text = _tokenizer_config(text, tokenizer, owner.folder)
        if text is not None:
            files[name] = text
    return files


def _read_text(folder: Path | None, name: str) -> str | None:
    if folder is None:
        return None
    path = folder / name
    if not path.is_file() or outside(path, allowed_roots(folder)) is not None:
        return None
    return path.read_text(encoding="utf-8")


def _union(output: OutputVocabulary, vocabularies: Sequence[Vocabulary]) -> Any:
    """The base's tokenizer with every other model's tokens at their union ids: another
    model's added tokens stay added tokens (their flags kept: special, lstrip, ...), its other
    tokens join the vocabulary of the tokenizer's model (which no merge produces, so the base's
    text encodes as before). Built as ``tokenizer.json`` and read back with ``tokenizers``;
    every id is checked.

    ``tokenizers`` numbers an added token missing from the model's vocabulary after that
    vocabulary, whatever id the file gives it; so where the model's vocabulary is a map, every
    added token is entered in it at its id too, which pins every id.
    """
    tokenizers = _tokenizers_module()
    base = vocabularies[output.owner]
    data = json.loads(base.tokenizer.to_str())
    model = data.get("model", {})
    editable = model.get("type") in _EDITABLE_MODELS and isinstance(model.get("vocab"), dict)
    entries = data.setdefault("added_tokens", [])
    if editable:
        for entry in entries:
            model["vocab"].setdefault(entry["content"], entry["id"])
    added_of = [v.added for v in vocabularies]
    for index, token in output.added:
        new_id = output.tokens[token]
        flags = added_of[index].get(token)
        if flags is not None:
            entries.append(
                {
                    "id": new_id,
                    "content": token,
                    "single_word": flags.single_word,
                    "lstrip": flags.lstrip,
                    "rstrip": flags.rstrip,
                    "normalized": flags.normalized,
                    "special": flags.special,
                }
            )
        elif not editable:
            raise VocabularyError(
                f"vocabulary='union' would add models[{index}]'s token {token!r} to the base's "
                f"tokenizer, whose model is {model.get('type')!r}; a union extends only BPE, "
                "WordLevel and WordPiece vocabularies (and any tokenizer's added tokens). Use "
                "vocabulary='base' or a model's index."
            )
        if editable:
            model["vocab"][token] = new_id
    union = tokenizers.Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    wrong = [t for t, i in output.tokens.items() if union.token_to_id(t) != i]
    if wrong:
        raise VocabularyError(
            f"the union tokenizer built from the base's does not give {len(wrong)} tokens their "
            f"ids (first {wrong[0]!r}); its tokenizer.json is unusual. Use vocabulary='base' or "
            "a model's index."
        )
    return union


def _tokenizer_config(text: str, tokenizer: Any, folder: Path | None) -> str:
    """``tokenizer_config.json`` with its ``added_tokens_decoder`` (transformers' record of the
    added tokens) matching ``tokenizer``."""
    try:
        config = json.loads(text)
    except (ValueError, RecursionError):
        config = None
    if not isinstance(config, dict):
        raise VocabularyError(
            f"{folder}/{TOKENIZER_CONFIG} is not a JSON object, so it cannot be updated for the "
            "output vocabulary; fix or remove it."
        )
    config["added_tokens_decoder"] = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    return json.dumps(config, indent=2, ensure_ascii=False) + "\n"
