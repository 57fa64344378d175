"""Layer-wise merging: per-layer weights and settings, gradients, and block replacement."""

from __future__ import annotations

import re

import pytest
import torch

import terge
from terge import MergeArgumentError, by_layer, methods

LAYERS = 5


def model(seed: int, prefix: str = "model.layers") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(7, 4, generator=generator)}
    for i in range(LAYERS):
        state[f"{prefix}.{i}.mlp.weight"] = torch.randn(4, 4, generator=generator)
    state["lm_head.weight"] = torch.randn(7, 4, generator=generator)
    return state


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 1], [0.0, 0.25, 0.5, 0.75, 1.0]),
        ([0, 1, 0], [0.0, 0.5, 1.0, 0.5, 0.0]),
        ([0.3], [0.3] * 5),
        ([5, 4, 3, 2, 1], [5.0, 4.0, 3.0, 2.0, 1.0]),  # one per layer: taken as is
    ],
)
def test_by_layer_interpolates_anchors_or_takes_one_value_per_layer(values, expected):
    gradient = by_layer(values)
    assert [gradient.at(i, LAYERS) for i in range(LAYERS)] == expected


def test_outside_the_layers_by_layer_gives_other_or_the_mean_of_the_layers():
    assert by_layer([0, 1], other=0.9).at(None, LAYERS) == 0.9
    assert by_layer([0, 1]).at(None, LAYERS) == 0.5
    assert by_layer([1, 1, 4]).at(None, 3) == 2.0


def test_a_gradient_of_weights_is_applied_per_block_and_shown_in_the_lineage():
    a, b = model(0), model(1)
    merged, lineage = terge.merge(
        [a, b], weights=[by_layer([1, 0]), by_layer([0, 1])], lineage=True
    )
    for i, share in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        name = f"model.layers.{i}.mlp.weight"
        assert lineage[name][1] == [(0, 1 - share), (1, share)]
        expected = (1 - share) * a[name].double() + share * b[name].double()
        assert torch.equal(merged[name], expected.float()), name  # the same float64 sum
    assert lineage["model.embed_tokens.weight"][1] == [(0, 0.5), (1, 0.5)]
    assert lineage["lm_head.weight"][1] == [(0, 0.5), (1, 0.5)]


def test_layer_wise_weights_mix_with_plain_numbers_and_maps():
    a, b = model(0), model(1)
    weights = {re.compile(r"mlp"): [1, by_layer([0, 4], other=1)]}
    _, lineage = terge.merge([a, b], weights=weights, lineage=True)
    assert lineage["model.layers.0.mlp.weight"][1] == [(0, 1.0), (1, 0.0)]
    assert lineage["model.layers.4.mlp.weight"][1] == [(0, 0.2), (1, 0.8)]
    assert lineage["lm_head.weight"][1] == [(0, 0.5), (1, 0.5)]  # unmatched: equal weights


def test_method_settings_vary_by_layer():
    models = [model(0), model(1), model(2)]
    density = by_layer([0.25, 1.0])
    _, lineage = terge.merge(models, method=methods.ties(density=density), lineage=True)
    assert lineage["model.layers.0.mlp.weight"].settings == {"density": 0.25, "scale": 1.0}
    assert lineage["model.layers.2.mlp.weight"].settings == {"density": 0.625, "scale": 1.0}
    assert lineage["model.layers.4.mlp.weight"].settings == {"density": 1.0, "scale": 1.0}
    assert lineage["lm_head.weight"].settings["density"] == 0.625  # sixteenths: exact


def test_per_layer_settings_are_validated_like_plain_ones():
    with pytest.raises(MergeArgumentError, match=r"ties: density must be in \(0, 1\], got 1.5"):
        methods.ties(density=by_layer([0.5, 1.5]))
    with pytest.raises(MergeArgumentError, match=r"density \+ gamma must be at most 1"):
        methods.breadcrumbs(density=by_layer([0.2, 0.95]), gamma=0.1)


def test_whole_blocks_from_another_model_in_one_expression():
    a, b = model(0), model(1)
    merged, lineage = terge.merge(
        [a, b], weights={terge.layers("1-3"): [0, 1], re.compile(".*"): [1, 0]}, lineage=True
    )
    assert lineage["model.layers.2.mlp.weight"][1] == [(0, 0.0), (1, 1.0)]
    for i in range(LAYERS):
        name = f"model.layers.{i}.mlp.weight"
        source = b if 1 <= i <= 3 else a
        assert torch.equal(merged[name], source[name]), name
    assert torch.equal(merged["lm_head.weight"], a["lm_head.weight"])


def test_layer_count_comes_from_the_models_and_gpt2_names_work():
    a, b = model(0, prefix="transformer.h"), model(1, prefix="transformer.h")
    _, lineage = terge.merge([a, b], weights=[by_layer([1, 0]), by_layer([0, 1])], lineage=True)
    assert lineage["transformer.h.4.mlp.weight"][1] == [(0, 0.0), (1, 1.0)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: by_layer([]), r"by_layer\(\) needs a non-empty list"),
        (lambda: by_layer("01"), r"by_layer\(\) needs a non-empty list"),
        (lambda: by_layer([0, float("nan")]), r"by_layer\(\) values must be finite real numbers"),
        (lambda: by_layer([0, 1], other="x"), r"by_layer\(other=...\) must be finite"),
        (
            lambda: terge.merge([model(0), model(1)], weights=[by_layer([1])]),
            r"has 1 weights but there are 2 models",
        ),
        (
            lambda: terge.merge([model(0), model(1)], weights=[by_layer([1]), float("inf")]),
            r"not finite",
        ),
    ],
)
def test_bad_layer_wise_input_is_refused(call, message):
    with pytest.raises(MergeArgumentError, match=message):
        call()


def test_outside_the_blocks_an_other_of_zero_is_zero_and_the_mean_is_of_every_block():
    """``other=0`` is a value, not "unset"; the default is the mean of the blocks' own values
    (interpolated: 0, 0.5, 1, 1, 1 for anchors [0, 1, 1] over five blocks), not of the anchors;
    with no blocks at all, the anchors' mean."""
    assert by_layer([1, 3], other=0).at(None, LAYERS) == 0.0
    assert by_layer([0, 1, 1]).at(None, LAYERS) == 0.7
    assert by_layer([1, 2]).at(None, 0) == 1.5


def test_one_block_takes_the_first_anchor_and_anchors_interpolate_as_documented():
    """A model of one block is at the start of the gradient. Between anchors ``a`` and ``b`` at
    fraction ``f`` the value is ``a (1 - f) + b f``, rounded as written (``a + (b - a) f``
    rounds otherwise: 0.5 at f = 2/3 here)."""
    assert by_layer([0.2, 0.8]).at(0, 1) == 0.2
    gradient = by_layer([0.1, 0.7])
    assert gradient.at(2, 4) == 0.1 * (1 - 2 / 3) + 0.7 * (2 / 3) == 0.49999999999999994


def test_other_is_validated_compared_and_shown():
    with pytest.raises(MergeArgumentError, match=r"ties: density must be in \(0, 1\], got 1\.5\."):
        methods.ties(density=by_layer([0.3], other=1.5))
    assert by_layer([1], other=2) != by_layer([1], other=3)
    assert by_layer([1], other=2) == by_layer([1.0], other=2.0)
    assert repr(by_layer([1, 2], other=0.5)) == "by_layer([1.0, 2.0], other=0.5)"
    with pytest.raises(MergeArgumentError, match=r"by_layer\(\) values must be finite real"):
        by_layer([True, 0])


def test_the_block_count_is_one_past_the_largest_index():
    """Blocks 0 and 2 make three (block 1 holds nothing to merge, say); no block names, none."""
    from terge.layerwise import count_layers

    assert count_layers(["model.layers.0.w", "model.layers.2.w", "lm_head.weight"]) == 3
    assert count_layers(["model.embed_tokens.weight", "lm_head.weight"]) == 0
