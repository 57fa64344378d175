"""Shared fixtures: tiny models built in code, no downloads."""

from __future__ import annotations

import pytest
import torch

from helpers import Tied, assert_unchanged, snapshot

# Re-exported for tests written before tests/helpers.py; new tests import from helpers.
__all__ = ["Tied", "assert_unchanged", "snapshot"]


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
