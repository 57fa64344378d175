"""terge: exact, memory-lean, fast merging of PyTorch models."""

from typing import Any as _Any

from . import methods
from ._version import __version__
from .errors import (
    BaseIndexError,
    CheckpointError,
    LineageError,
    MergeArgumentError,
    MetaTensorError,
    MethodError,
    MethodNotApplicableError,
    MethodResultError,
    NoMergeMethodFoundForParameterError,
    NoParametersToMergeWarning,
    ParameterModelWeightsSumToZeroError,
    PatternTypeError,
    ShardingError,
    SizeFormatError,
    TensorNotFoundError,
    TergeError,
    UnknownMergeMethodError,
)
from .io import load, open_checkpoint, save
from .layers import layer_index, layers
from .layerwise import ByLayer, by_layer
from .lineage import Lineage, LineageEntry, load_lineage, save_lineage
from .merge import merge


def __getattr__(name: str) -> _Any:
    """``terge.from_mergekit``, imported on first use (it brings the command line's modules)."""
    if name == "from_mergekit":
        from .cli.mergekit import from_mergekit

        return from_mergekit
    raise AttributeError(f"module 'terge' has no attribute {name!r}")


__all__ = [
    "BaseIndexError",
    "ByLayer",
    "CheckpointError",
    "Lineage",
    "LineageEntry",
    "LineageError",
    "MergeArgumentError",
    "MetaTensorError",
    "MethodError",
    "MethodNotApplicableError",
    "MethodResultError",
    "NoMergeMethodFoundForParameterError",
    "NoParametersToMergeWarning",
    "ParameterModelWeightsSumToZeroError",
    "PatternTypeError",
    "ShardingError",
    "SizeFormatError",
    "TensorNotFoundError",
    "TergeError",
    "UnknownMergeMethodError",
    "__version__",
    "by_layer",
    "from_mergekit",
    "layer_index",
    "layers",
    "load",
    "load_lineage",
    "merge",
    "methods",
    "open_checkpoint",
    "save",
    "save_lineage",
]
