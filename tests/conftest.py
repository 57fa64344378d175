"""Shared fixtures: tiny models built in code, no downloads."""

from __future__ import annotations

import pytest
import torch


class Tied(torch.nn.Module):
    """An embedding tied to its output head, plus BatchNorm buffers, like a tiny LM."""

    def __init__(self, vocab: int = 11, width: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.norm = torch.nn.BatchNorm1d(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight


@pytest.fixture
def linears() -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(5, 3) for _ in range(3)]


@pytest.fixture
def tied_models() -> list[Tied]:
    torch.manual_seed(1)
    models = [Tied() for _ in range(3)]
    for model in models:
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2)
        model.norm.num_batches_tracked += 7
    return models


def snapshot(model: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    """A deep copy of every tensor, to prove later that nothing was modified."""
    items = model.state_dict(keep_vars=True) if isinstance(model, torch.nn.Module) else model
    return {k: v.detach().clone() for k, v in items.items()}


def assert_unchanged(model: torch.nn.Module | dict, before: dict[str, torch.Tensor]) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
