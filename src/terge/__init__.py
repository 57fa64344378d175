"""terge: exact, memory-lean, fast merging of PyTorch models."""

from . import methods
from ._version import __version__
from .averaging import Average
from .errors import (
    AveragingError,
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

__all__ = [
    "Average",
    "AveragingError",
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
