"""Pictures of a merge: task-vector heatmaps (``terge inspect --plot``) and who contributed what
(``terge lineage show --plot``).

matplotlib is an optional extra (``pip install 'terge[plot]'``), imported only here, and drawn
without pyplot (a ``Figure`` on an Agg canvas): no window, no global state touched.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .errors import LineageError, MergeArgumentError, MissingDependencyError
from .inspection import OTHER, Inspection, block_of
from .lineage import Lineage


def _figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` on an Agg canvas; a clear error when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError(
            "drawing a picture needs matplotlib, an optional extra of terge: "
            "pip install 'terge[plot]'"
        ) from None
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def _draw(
    figure: Any,
    rows: list[Any],
    columns: list[str],
    values: list[list[float]],
    title: str,
    label: str,
    limits: tuple[float, float],
) -> None:
    axes = figure.add_subplot()
    image = axes.imshow(values, aspect="auto", cmap="coolwarm", vmin=limits[0], vmax=limits[1])
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), [str(row) for row in rows])
    axes.set_xlabel(label)
    axes.set_ylabel("block")
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()


def _size(rows: int, columns: int) -> tuple[float, float]:
    return (max(4.0, 1.0 + 0.8 * columns), max(3.0, 1.0 + 0.3 * rows))


def heatmap(
    inspection: Inspection, path: str | os.PathLike[str] | None = None, metric: str = "cosine"
) -> Any:
    """A heatmap of ``metric`` (``"cosine"`` or ``"conflicts"``) per block (rows) and model
    pair (columns); saved to ``path`` (PNG, PDF, SVG by its suffix) when given. Returns the
    matplotlib ``Figure``; its image holds the numbers (blocks x pairs)."""
    if not inspection.pairs:
        raise MergeArgumentError(
            "a heatmap compares model pairs, but only one model's task vector was measured; "
            "inspect two models or more besides the base."
        )
    rows, values = inspection.matrix(metric)
    columns = [f"{i}-{j}" for i, j in inspection.pairs]
    figure = _figure(*_size(len(rows), len(columns)))
    limits = (-1.0, 1.0) if metric == "cosine" else (0.0, 0.5)
    title = "cosine similarity of task vectors" if metric == "cosine" else "sign conflict rate"
    _draw(figure, rows, columns, values, title, "model pair", limits)
    if path is not None:
        figure.savefig(os.fspath(path))
    return figure


def contributions(lineage: Lineage) -> tuple[list[Any], list[list[float]]]:
    """Blocks x models: the mean weight each model had over the tensors merged in a block (0
    where it did not contribute), with the block labels (ints in order, then ``"other"``)."""
    count = len(lineage.models) or 1 + max(
        (index for entry in lineage.values() for index, _ in entry[1]), default=0
    )
    totals: dict[Any, list[float]] = {}
    tensors: dict[Any, int] = {}
    for name, entry in lineage.items():
        block = block_of(name)
        row = totals.setdefault(block, [0.0] * count)
        tensors[block] = tensors.get(block, 0) + 1
        for index, weight in entry[1]:
            if index < count:
                row[index] += weight
    order = sorted(totals, key=lambda b: (0, b) if isinstance(b, int) else (1, str(b)))
    return order, [[w / tensors[b] for w in totals[b]] for b in order]


def plot_lineage(lineage: Lineage, path: str | os.PathLike[str] | None = None) -> Any:
    """Which model contributed what, block by block: the mean weight per block (rows) and model
    (columns), saved to ``path`` when given. Returns the ``Figure``."""
    rows, values = contributions(lineage)
    if not rows:
        raise LineageError("the lineage merged no tensor, so there is nothing to draw.")
    columns = [f"models[{i}]" for i in range(len(values[0]))]
    figure = _figure(*_size(len(rows), len(columns)))
    peak = max((abs(v) for row in values for v in row if math.isfinite(v)), default=1.0) or 1.0
    _draw(figure, rows, columns, values, "mean weight per block", "model", (-peak, peak))
    if path is not None:
        figure.savefig(os.fspath(path))
    return figure


__all__ = ["OTHER", "contributions", "heatmap", "plot_lineage"]
