"""Sizes such as ``"5GB"`` or ``"2GiB"``, as Hugging Face and disks write them."""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import SizeFormatError

_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_SIZE_FORMS = (
    "a positive int of bytes, or a string such as '500MB', '2GB', '1.5GB' (KB/MB/GB/TB are "
    "powers of 1000) or '2GiB', '2000MiB' (KiB/MiB/GiB/TiB are powers of 1024); units are "
    "case-insensitive and may follow a space"
)


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string like ``"2GB"`` (10^9) or ``"2GiB"`` (2^30).

    Decimal and binary units are both accepted because Hugging Face writes "5GB" while disks and
    GPUs are sized in GiB; fractional values ("1.5GB") are rounded down to whole bytes.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size > 0:
            return size
    elif isinstance(size, str):
        match = _SIZE_RE.fullmatch(size)
        if match:
            unit = (match[2] or "b").lower()
            value = int(Fraction(match[1]) * _SIZE_UNITS[unit])
            if value > 0:
                return value
    raise SizeFormatError(f"{size!r} is not a size: give {_SIZE_FORMS}.")
