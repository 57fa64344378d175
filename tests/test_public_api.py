"""The public surface: what `import terge` offers, and partial loading through it."""

import torch

import terge


def test_every_public_name_exists():
    for name in terge.__all__:
        assert hasattr(terge, name), name


def test_embeddings_and_first_layers_load_without_the_rest(tmp_path):
    state = {
        "model.embed_tokens.weight": torch.zeros(3, 2),
        **{f"model.layers.{i}.mlp.weight": torch.full((2,), float(i)) for i in range(8)},
        "lm_head.weight": torch.ones(3, 2),
    }
    terge.save(state, tmp_path / "model", max_shard_size=40)
    part = terge.load(tmp_path / "model", included=terge.layers("0-5", embeddings=True))
    assert list(part) == ["model.embed_tokens.weight"] + [
        f"model.layers.{i}.mlp.weight" for i in range(6)
    ]
    assert all(torch.equal(part[name], state[name]) for name in part)
    head = terge.load(tmp_path / "model", included=terge.layers(head=True))
    assert list(head) == ["lm_head.weight"]
