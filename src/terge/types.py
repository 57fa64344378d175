"""The types of ``merge()``'s arguments, for annotating code that calls it.

``terge.merge(models, base, method, weights, included, excluded, ...)`` takes :data:`Model`\\ s,
a :data:`Methods`, a :data:`Weights` and :data:`Patterns`; a map's keys are :data:`Pattern`\\ s,
matched first-match-wins in insertion order. These are plain aliases (``Union``\\ s), usable at
runtime on every supported Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, TypeVar, Union

import torch

from .io.adapters import AdapterSpec
from .io.training import CheckpointSpec
from .layerwise import ByLayer
from .methods import Method
from .patterns import Pattern, Patterns

__all__ = [
    "CustomMethod",
    "Merged",
    "MethodLike",
    "Methods",
    "Model",
    "Models",
    "Pattern",
    "PatternMapping",
    "Patterns",
    "Weight",
    "WeightList",
    "Weights",
]

# Union[...] rather than ``|`` throughout: the aliases are evaluated at runtime on Python 3.10.
# ruff: noqa: UP007, UP045

V = TypeVar("V")

Model = Union[
    torch.nn.Module, Mapping[str, torch.Tensor], str, os.PathLike[str], CheckpointSpec, AdapterSpec
]
"""A model in memory (a module or a state dict), or the path of a checkpoint file or folder (a
``terge.checkpoint(...)`` spec for a training checkpoint's entry), or a PEFT adapter over its
base (its folder's path, or ``terge.adapter(path, base=...)``)."""

Models = Union[Sequence[Model], torch.nn.ModuleList, torch.nn.Sequential]
"""``merge()``'s ``models``: a list of them (an ``nn.ModuleList`` of models too)."""

PatternMapping = Mapping[Any, V]
"""A map from :data:`Pattern`\\ s to values, read first-match-wins. Its keys are typed ``Any``:
a mapping's key type is invariant (a ``dict[str, ...]`` is no ``Mapping[Pattern, ...]``), and a
union of key types defeats the inference of a dict mixing names and compiled patterns; terge
checks every key when called."""

CustomMethod = Callable[[list[torch.Tensor], list[float], Optional[torch.Tensor]], torch.Tensor]
"""A user's merge method ``f(tensors, weights, base) -> tensor``: the contributing models' float64
tensors, their weights, and the base's float64 tensor (the separate ``base=`` model's, or
``models[base]``'s, which is then also among ``tensors`` as the model it is). terge 0.1.1 passed
``None`` for the base."""

MethodLike = Union[str, Method, CustomMethod]
"""One merge method: a registered name (``'ties'``), a configured method from
``terge.methods`` (``terge.methods.ties(density=0.3)``), or a :data:`CustomMethod`."""

Methods = Union[MethodLike, PatternMapping[MethodLike]]
"""``merge()``'s ``method``: one method, or a map of patterns to methods."""

Weight = Union[float, ByLayer]
"""One model's weight: a number, or a per-layer value (``terge.by_layer([0, 1])``)."""

WeightList = Union[Sequence[Weight], torch.Tensor]
"""One weight per model, in the order of ``models``."""

Weights = Union[WeightList, PatternMapping[WeightList]]
"""``merge()``'s ``weights``: one list, or a map of patterns to lists (equal weights for the
parameters no pattern matches)."""

Merged = Any
"""What ``merge()`` builds: the merged ``nn.Module`` or state dict, or the output folder as a
``pathlib.Path`` with ``out=``; which one depends on the arguments, so it is not narrowed."""
