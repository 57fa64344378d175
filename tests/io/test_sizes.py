"""parse_size: the sizes `max_shard_size` and `--max-shard-size` accept."""

from __future__ import annotations

import re

import pytest

from terge.errors import (
    SizeFormatError,
    TergeError,
)
from terge.io import (
    parse_size,
)

# --------------------------------------------------------------------------------------------
# parse_size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (123, 123),
        ("100", 100),
        ("500MB", 500 * 10**6),
        ("2GB", 2 * 10**9),
        ("2GiB", 2 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("2000MiB", 2000 * 2**20),
        ("2 gb", 2 * 10**9),
        (" 10kib ", 10 * 1024),
        ("1.5KiB", 1536),
        ("7B", 7),
        ("1TB", 10**12),
    ],
)
def test_parse_size_accepts_decimal_and_binary_units(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "abc", "5G", "-1GB", "0", "0.0001B", "1e9", 0, -5, True, 1.5])
def test_parse_size_rejects_with_the_value_and_the_accepted_forms(size):
    with pytest.raises(SizeFormatError, match=rf"{re.escape(repr(size))} is not a size.*'2GiB'"):
        parse_size(size)
    assert issubclass(SizeFormatError, ValueError)
    assert issubclass(SizeFormatError, TergeError)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(".5GB", 500_000_000), ("4.1MB", 4_100_000), ("8.2GB", 8_200_000_000), ("0.3 mib", 314_572)],
)
def test_fractions_count_exactly_and_may_start_with_their_point(size, expected):
    """Exact decimal arithmetic: 4.1 x 10^6 in float64 is 4,099,999.999..., one byte short."""
    assert parse_size(size) == expected
