"""The pictures: they open, and hold the numbers' shape (blocks x pairs, blocks x models)."""

from __future__ import annotations

import sys

import pytest
import regex
import torch

import terge
from terge.errors import LineageError, MergeArgumentError, MissingDependencyError
from terge.inspection import OTHER
from terge.plots import contributions, heatmap, plot_lineage


def _states(count: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)] + ["lm_head.weight"]
    return [{n: torch.randn(3, 2, generator=generator) for n in names} for _ in range(count)]


def test_a_missing_matplotlib_says_how_to_install_it(monkeypatch, tmp_path):
    base, *models = _states()
    report = terge.inspect(models, base=base)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'terge\[plot\]'"):
        heatmap(report, tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()
    assert issubclass(MissingDependencyError, ImportError)


@pytest.mark.parametrize("metric", ["cosine", "conflicts"])
def test_the_heatmap_opens_and_holds_blocks_by_pairs(tmp_path, metric):
    image_module = pytest.importorskip("matplotlib.image", reason="the plot extra is not installed")
    base, *models = _states()
    report = terge.inspect(models, base=base)
    figure = heatmap(report, tmp_path / "h.png", metric)
    picture = image_module.imread(tmp_path / "h.png")
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.shape[1] > 100
    data = figure.axes[0].images[0].get_array()
    assert data.shape == (4, 3)  # blocks 0, 1, 2 and "other" x pairs 0-1, 0-2, 1-2
    labels, rows = report.matrix(metric)
    assert labels == [0, 1, 2, OTHER]
    assert data.tolist() == rows
    if metric == "cosine":
        assert data[0, 0] == pytest.approx(report.groups("block")[0].cosine(0, 1))


def test_one_model_has_no_pairs_to_draw():
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    base, model = _states(2)
    with pytest.raises(MergeArgumentError, match="only one model's task vector"):
        heatmap(terge.inspect([model], base=base))


def test_the_lineage_picture_holds_blocks_by_models(tmp_path):
    image_module = pytest.importorskip("matplotlib.image", reason="the plot extra is not installed")
    states = _states(3)
    _, lineage = terge.merge(
        states,
        weights={regex.compile(r"layers\.0\."): [1.0, 1.0, 2.0]},
        lineage=True,
    )
    figure = plot_lineage(lineage, tmp_path / "l.png")
    assert image_module.imread(tmp_path / "l.png").ndim == 3
    data = figure.axes[0].images[0].get_array()
    assert data.shape == (4, 3)  # blocks 0, 1, 2, "other" x models 0, 1, 2
    assert data[0].tolist() == [0.25, 0.25, 0.5]
    assert data[1].tolist() == pytest.approx([1 / 3] * 3)
    rows, values = contributions(lineage)
    assert rows == [0, 1, 2, OTHER] and values == data.tolist()


def test_a_lineage_with_nothing_merged_has_nothing_to_draw():
    pytest.importorskip("matplotlib", reason="the plot extra is not installed")
    with pytest.raises(LineageError, match="merged no tensor"):
        plot_lineage(terge.Lineage())
