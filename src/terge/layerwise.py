"""Values that change across a model's transformer blocks: per-layer lists and gradients.

``by_layer([0, 0.5, 1])`` is a number that depends on which block a parameter belongs to. It is
accepted wherever ``merge()`` takes a weight (inside a ``weights`` list or map) and wherever a
method takes a numeric setting (``terge.methods.ties(density=by_layer([0.1, 0.5]))``). The block
index is read from the parameter's name (``layers.N.``, ``h.N.``, ``layer.N.``, ``blocks.N.``; see
``terge.layers.layer_index``) and the number of blocks from the models themselves.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from .errors import MergeArgumentError


class ByLayer:
    """A per-layer value: one entry per block, or anchors interpolated linearly across blocks.

    With exactly as many ``values`` as the model has blocks, block ``i`` gets ``values[i]``.
    Otherwise the values are anchors spread evenly from the first block to the last, and each
    block gets the linear interpolation at its position (``[0, 1]`` over 5 blocks gives
    0, 0.25, 0.5, 0.75, 1). Parameters outside the blocks (embeddings, final norm, head) get
    ``other``; by default, the mean of the blocks' values.
    """

    def __init__(self, values: Sequence[float], *, other: float | None = None) -> None:
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise MergeArgumentError(
                f"by_layer() needs a non-empty list of numbers (one per layer, or anchors to "
                f"interpolate); got {values!r}."
            )
        self.values = tuple(_number(v, "by_layer() values") for v in values)
        self.other = None if other is None else _number(other, "by_layer(other=...)")

    def at(self, layer: int | None, layers: int) -> float:
        """The value for block ``layer`` of ``layers`` (``None``: outside the blocks)."""
        if layer is None:
            if self.other is not None:
                return self.other
            return (
                math.fsum(self.at(i, layers) for i in range(layers)) / layers
                if layers
                else (math.fsum(self.values) / len(self.values))
            )
        if len(self.values) == layers or len(self.values) == 1:
            return self.values[min(layer, len(self.values) - 1)]
        if layers <= 1:
            return self.values[0]
        position = layer / (layers - 1) * (len(self.values) - 1)
        low = min(int(position), len(self.values) - 2)
        fraction = position - low
        return self.values[low] * (1 - fraction) + self.values[low + 1] * fraction

    def checked(self, check: Callable[[Any], float]) -> ByLayer:
        """Run a setting's own validation on every value this can take."""
        for value in self.values:
            check(value)
        if self.other is not None:
            check(self.other)
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByLayer) and (self.values, self.other) == (
            other.values,
            other.other,
        )

    def __hash__(self) -> int:
        return hash((self.values, self.other))

    def __repr__(self) -> str:
        other = "" if self.other is None else f", other={self.other!r}"
        return f"by_layer({list(self.values)!r}{other})"


def by_layer(values: Sequence[float], *, other: float | None = None) -> ByLayer:
    """A weight or setting that varies by transformer block; see :class:`ByLayer`.

    >>> import terge
    >>> gradient = terge.by_layer([0, 1])      # 0 at the first block, 1 at the last
    >>> [gradient.at(i, 5) for i in range(5)]
    [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    return ByLayer(values, other=other)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise MergeArgumentError(f"{where} must be finite real numbers; got {value!r}.")
    return float(value)


def count_layers(names: Any) -> int:
    """The number of blocks: one more than the largest block index among ``names`` (0 if none)."""
    from .layers import layer_index

    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0
