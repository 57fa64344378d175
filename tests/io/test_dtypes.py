"""io/dtypes.py: the one parser of "a floating dtype or its name", and safetensors' dtype codes."""

from __future__ import annotations

import pytest
import torch

from terge.io.dtypes import SAFETENSORS_CODES, SAFETENSORS_DTYPES, dtype_name, floating_dtype


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.bfloat16, torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("half", torch.float16),  # torch's own alias
        ("float64", torch.float64),
        (torch.int8, None),
        ("int64", None),
        ("bf16", None),
        ("", None),
        (None, None),
        (16, None),
    ],
)
def test_floating_dtype_accepts_floating_dtypes_and_their_names_only(value, expected):
    assert floating_dtype(value) is expected


def test_dtype_names_are_torchs_without_the_prefix():
    assert dtype_name(torch.bfloat16) == "bfloat16"
    assert dtype_name(None) is None
    for dtype in (torch.float16, torch.float32, torch.float64):
        assert floating_dtype(dtype_name(dtype)) is dtype


def test_safetensors_codes_and_dtypes_are_inverse_maps():
    assert SAFETENSORS_DTYPES["BF16"] is torch.bfloat16
    assert SAFETENSORS_CODES[torch.float32] == "F32"
    assert {
        SAFETENSORS_DTYPES[code]: code for code in SAFETENSORS_CODES.values()
    } == SAFETENSORS_CODES


def test_every_code_means_what_safetensors_means_by_it():
    """safetensors' own table (its torch module's) is the oracle for every code it knows; the
    newer F8_E8M0 (MX scales) is torch's float8_e8m0fnu where this torch has it."""
    import safetensors.torch

    theirs = safetensors.torch._TYPES
    assert {code: SAFETENSORS_DTYPES.get(code) for code in theirs} == theirs
    if hasattr(torch, "float8_e8m0fnu"):
        assert SAFETENSORS_DTYPES["F8_E8M0"] is torch.float8_e8m0fnu
