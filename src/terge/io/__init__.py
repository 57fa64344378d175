"""Checkpoints on disk: reading them lazily, writing them atomically, and the names of sizes and
dtypes they use."""

from __future__ import annotations

from .reading import CheckpointReader, PathLike, TensorInfo, load, open_checkpoint
from .sizes import parse_size
from .writing import ShardedWriter, StreamingShardWriter, save

__all__ = [
    "CheckpointReader",
    "PathLike",
    "ShardedWriter",
    "StreamingShardWriter",
    "TensorInfo",
    "load",
    "open_checkpoint",
    "parse_size",
    "save",
]
