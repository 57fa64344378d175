"""terge: exact, memory-lean, fast merging of PyTorch models."""

from typing import Any as _Any

from . import methods
from ._version import __version__
from .averaging import Average
from .errors import (
    AdapterError,
    AveragingError,
    BaseIndexError,
    CheckpointError,
    HubError,
    LineageError,
    LoraLeftOutWarning,
    MergeArgumentError,
    MetaTensorError,
    MethodError,
    MethodNotApplicableError,
    MethodResultError,
    MissingDependencyError,
    NoMergeMethodFoundForParameterError,
    NoParametersToMergeWarning,
    ParameterModelWeightsSumToZeroError,
    PatternTypeError,
    PolicyError,
    ShardingError,
    SizeFormatError,
    StackError,
    TensorNotFoundError,
    TergeError,
    UnknownMergeMethodError,
    VocabularyError,
    VocabularyMismatchWarning,
)
from .inspection import Inspection, inspect
from .io import load, open_checkpoint, save
from .io.adapters import AdapterSpec, adapter
from .io.choose import Chosen, choose
from .io.training import CheckpointSpec, checkpoint
from .layers import layer_index, layers
from .layerwise import ByLayer, by_layer
from .lineage import Lineage, LineageEntry, load_lineage, save_lineage
from .lora import LoraAdapter, extract_lora
from .merge import merge
from .policy import Policy, Violation, check_lineage
from .stacking import Blocks, blocks, stack


def __getattr__(name: str) -> _Any:
    """``terge.from_mergekit``, imported on first use (it brings the command line's modules)."""
    if name == "from_mergekit":
        from .cli.mergekit import from_mergekit

        return from_mergekit
    raise AttributeError(f"module 'terge' has no attribute {name!r}")


__all__ = [
    "AdapterError",
    "AdapterSpec",
    "Average",
    "AveragingError",
    "BaseIndexError",
    "Blocks",
    "ByLayer",
    "CheckpointError",
    "CheckpointSpec",
    "Chosen",
    "HubError",
    "Inspection",
    "Lineage",
    "LineageEntry",
    "LineageError",
    "LoraAdapter",
    "LoraLeftOutWarning",
    "MergeArgumentError",
    "MetaTensorError",
    "MethodError",
    "MethodNotApplicableError",
    "MethodResultError",
    "MissingDependencyError",
    "NoMergeMethodFoundForParameterError",
    "NoParametersToMergeWarning",
    "ParameterModelWeightsSumToZeroError",
    "PatternTypeError",
    "Policy",
    "PolicyError",
    "ShardingError",
    "SizeFormatError",
    "StackError",
    "TensorNotFoundError",
    "TergeError",
    "UnknownMergeMethodError",
    "Violation",
    "VocabularyError",
    "VocabularyMismatchWarning",
    "__version__",
    "adapter",
    "blocks",
    "by_layer",
    "check_lineage",
    "checkpoint",
    "choose",
    "extract_lora",
    "from_mergekit",
    "inspect",
    "layer_index",
    "layers",
    "load",
    "load_lineage",
    "merge",
    "methods",
    "open_checkpoint",
    "save",
    "save_lineage",
    "stack",
]
