"""Shared fixtures: tiny models built in code, no downloads."""

from __future__ import annotations

import signal

import pytest
import torch

import terge.lineage

from helpers import Tied, assert_unchanged, lineage_validator, snapshot

# Re-exported for tests written before tests/helpers.py; new tests import from helpers.
__all__ = ["Tied", "assert_unchanged", "snapshot"]


@pytest.fixture(autouse=True, scope="session")
def _lineages_follow_the_schema():
    """Every lineage any test writes or compares is validated against the shipped JSON schema
    (where jsonschema is installed): ``lineage_to_json`` is what every writer goes through."""
    validator = lineage_validator()
    if validator is None:
        yield
        return
    original = terge.lineage.lineage_to_json

    def checked(lineage, **extra):
        record = original(lineage, **extra)
        validator.validate(record)
        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(terge.lineage, "lineage_to_json", checked)
        yield


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


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, whatever the suite inherited: a shell runs a
    command put in the background (``pytest &``) with SIGINT ignored, and Python then installs
    no handler, so a test of terge's Ctrl-C handling would see no KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
