"""terge: exact, memory-lean, fast merging of PyTorch models."""

from . import methods
from .checkpoints import load, open_checkpoint, save
from .errors import (
    BaseIndexError,
    CheckpointError,
    LineageError,
    MergeArgumentError,
    MetaTensorError,
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
from .layers import layer_index, layers
from .layerwise import ByLayer, by_layer
from .lineage import Lineage, LineageEntry, load_lineage, save_lineage
from .merge import merge

__version__ = "0.2.0.dev0"

__all__ = [
    "BaseIndexError",
    "ByLayer",
    "CheckpointError",
    "Lineage",
    "LineageEntry",
    "LineageError",
    "MergeArgumentError",
    "MetaTensorError",
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
