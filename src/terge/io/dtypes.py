"""Dtype names: safetensors' codes, and the one parser of "a dtype or its name"."""

from __future__ import annotations

import torch

_CODE_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}
SAFETENSORS_DTYPES = {
    code: getattr(torch, name) for code, name in _CODE_NAMES.items() if hasattr(torch, name)
}
"""safetensors' dtype codes (``"BF16"``) and the torch dtypes they stand for (where this torch has
them)."""
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


def floating_dtype(value: object) -> torch.dtype | None:
    """``value`` as a floating torch dtype (a name like ``'bfloat16'`` accepted), else ``None``.

    Every option that takes a dtype (``merge(dtype=, out_dtype=)``, ``save(dtype=)``, recipes,
    lineage files) parses it here and raises its own error, naming the option, on ``None``.
    """
    if isinstance(value, str):
        value = getattr(torch, value.removeprefix("torch."), None)
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    return None


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` as ``'bfloat16'`` (``None`` stays ``None``)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")
