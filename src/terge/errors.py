"""The exceptions and warnings terge raises.

Every terge error derives from :class:`TergeError`, and also from the built-in exception that
terge 0.1.1 raised in the same situation (``ValueError``, ``ZeroDivisionError``, ``IndexError``,
``KeyError``, ``TypeError``), so code written against 0.1.1 keeps catching what it caught.
"""

from __future__ import annotations

import os
from pathlib import Path


class TergeError(Exception):
    """Base class of every error terge raises on purpose."""


class NoParametersToMergeWarning(UserWarning):
    """Warned when no parameter is shared by two or more models, so nothing was merged."""


class NoMergeMethodFoundForParameterError(TergeError, ValueError):
    """A method map has no entry matching a parameter that would be merged."""


class ParameterModelWeightsSumToZeroError(TergeError, ZeroDivisionError):
    """The weights of the models holding a parameter sum to zero, so they cannot be normalised."""


class MergeArgumentError(TergeError, ValueError):
    """An argument of ``merge()`` is malformed (empty models, bad weights, bad dtype, ...)."""


class ShardingError(MergeArgumentError):
    """A sharded parameter (a DTensor) cannot be merged shard by shard as asked: models sharded
    differently, a DTensor merged with a plain tensor, or a method that needs whole tensors."""


class BaseIndexError(TergeError, IndexError):
    """``base`` is an index that does not point into ``models``."""


class PatternTypeError(TergeError, TypeError):
    """A name pattern is neither a ``str`` nor a compiled ``re``/``regex`` pattern."""


class UnknownMergeMethodError(TergeError, ValueError, KeyError):
    """A method name is not in the registry (a ``KeyError`` too, as in terge 0.1.1)."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it as written.
        return str(self.args[0]) if self.args else ""


class MethodNotApplicableError(TergeError, ValueError):
    """A merge method cannot apply to a parameter (e.g. SLERP of three tensors)."""


class MetaTensorError(TergeError, ValueError):
    """A tensor to be merged lives on the ``meta`` device and so holds no data."""


class MethodResultError(TergeError, ValueError):
    """A merge method (usually a user's own) returned something other than a same-shape tensor."""


class CheckpointError(TergeError, ValueError):
    """A checkpoint cannot be read or written as asked; ``path`` is the file or folder at fault."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class AdapterError(TergeError, ValueError):
    """A PEFT adapter cannot be merged as given: its config or weights are broken or use a variant
    terge does not merge, or they do not fit the base they are said to adapt."""


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor name is not in the checkpoint (a ``KeyError`` too, as for a missing dict key)."""

    def __str__(self) -> str:  # KeyError would repr() the message; show it as written.
        return str(self.args[0]) if self.args else ""


class SizeFormatError(TergeError, ValueError):
    """A size is neither a positive int of bytes nor a string such as ``"5GB"`` or ``"2GiB"``."""


class LineageError(TergeError, ValueError):
    """A lineage file cannot be read or does not fit what it is checked against; ``path`` is the
    file at fault (``None`` for a lineage in memory)."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


class MethodError(TergeError, RuntimeError):
    """A merge method (usually a user's own) raised while merging a tensor; the original error
    is chained as ``__cause__``."""


class RecipeError(TergeError, ValueError):
    """A setting on the command line or in a recipe cannot be read."""


class UsageError(TergeError, ValueError):
    """The command line is malformed (argparse's errors, and the CLI's own checks)."""


class PolicyError(TergeError, ValueError):
    """A lineage policy (``terge lineage check``) cannot be read: an unknown rule, a bad range."""


class MissingDependencyError(TergeError, ImportError):
    """An optional library a feature needs is not installed (the message says what to install)."""


class AveragingError(TergeError, ValueError):
    """A running average (:class:`terge.Average`) cannot be made, updated or restored as asked:
    a bad setting, a model whose tensors no longer match the average, or a state dict of another
    average."""


class HubError(CheckpointError):
    """A Hugging Face Hub reference (``org/name@revision``) cannot be resolved: an unknown
    repository or revision, or one not in the local cache while offline (the message says
    which revisions are cached and how to fetch the one asked for)."""


class LoraLeftOutWarning(UserWarning):
    """A difference between two models that an extracted LoRA adapter does not hold (listed in
    the adapter's ``lora.json`` under ``left_out``, with the reason)."""


class VocabularyError(MergeArgumentError):
    """Vocabularies cannot be aligned as asked (``merge(..., vocabulary=...)``): a tokenizer that
    cannot be found or read, a tensor whose rows cannot be matched to tokens, a method that needs
    the base's row for a token the base lacks."""


class VocabularyMismatchWarning(UserWarning):
    """Tensors whose rows differ between the models (embeddings of vocabularies that differ) were
    left as the base has them; ``vocabulary=`` aligns them by token."""


class StackError(TergeError, ValueError):
    """A ``terge.stack()`` call that cannot be done: a bad slice or range, merged blocks of
    different structure or shape, a head or config that does not fit; raised before anything is
    written."""
