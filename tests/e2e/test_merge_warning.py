"""The warning that nothing was merged names the caller's line, not terge's."""

import warnings

import pytest
import torch

import terge


def test_nothing_merged_warns_at_the_callers_line():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        terge.merge([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])  # the line warned about
    (warning,) = caught
    assert warning.category is terge.NoParametersToMergeWarning
    assert (warning.filename, warning.lineno) == (__file__, 14)


def test_nothing_merged_is_an_error_under_the_projects_filter():
    with pytest.raises(terge.NoParametersToMergeWarning, match=r"^Of all the models"):
        terge.merge([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
