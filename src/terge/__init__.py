"""terge: exact, memory-lean, fast merging of PyTorch models."""

from . import methods
from .errors import (
    BaseIndexError,
    MergeArgumentError,
    MetaTensorError,
    MethodNotApplicableError,
    MethodResultError,
    NoMergeMethodFoundForParameterError,
    NoParametersToMergeWarning,
    ParameterModelWeightsSumToZeroError,
    PatternTypeError,
    TergeError,
    UnknownMergeMethodError,
)
from .lineage import Lineage, LineageEntry
from .merge import merge

__version__ = "0.2.0.dev0"

__all__ = [
    "BaseIndexError",
    "Lineage",
    "LineageEntry",
    "MergeArgumentError",
    "MetaTensorError",
    "MethodNotApplicableError",
    "MethodResultError",
    "NoMergeMethodFoundForParameterError",
    "NoParametersToMergeWarning",
    "ParameterModelWeightsSumToZeroError",
    "PatternTypeError",
    "TergeError",
    "UnknownMergeMethodError",
    "__version__",
    "merge",
    "methods",
]
