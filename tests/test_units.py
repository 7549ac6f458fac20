"""One size formatter, in the binary units the size options mean (16M is 16 MiB)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popsicle_py.units import format_size, parse_size


@pytest.mark.parametrize(("n", "shown"), [
    (None, "?"), (0, "0 B"), (511, "511 B"), (1023, "1023 B"), (1024, "1 KiB"),
    (1536, "1.5 KiB"), (2**20 - 1, "1.0 MiB"), (16 * 2**20, "16 MiB"), (10**9, "953.7 MiB"),
    (3 * 2**29, "1.5 GiB"), (128 * 2**30, "128 GiB"), (10**12, "931.3 GiB"),
    (10**15, "909.5 TiB"), (2**50, "1 PiB"), (10**18, "888.2 PiB"), (2**60, "1 EiB"),
])
def test_format_size(n: int | None, shown: str) -> None:
    assert format_size(n) == shown


@given(st.integers(min_value=0, max_value=2**63))
def test_what_is_printed_reads_back_as_about_the_same_size(n: int) -> None:
    """Every printed size is valid input, within the rounding of one decimal."""
    shown = format_size(n)
    assert re.fullmatch(r"\d+(\.\d)? (B|[KMGTPE]iB)", shown), shown
    number, unit = shown.split()
    value = float(number) * parse_size(f"1{unit}")
    assert abs(value - n) <= parse_size(f"1{unit}") * 0.05 + 0.5, (n, shown)
    if "." not in number:
        assert parse_size(shown.replace(" ", "")) == n
    assert float(number) < 1024 or unit == "EiB"


def test_input_suffixes_match_the_output_units() -> None:
    assert parse_size("16M") == parse_size("16MiB") == 16 * 2**20
    assert parse_size("1PiB") == 2**50 and parse_size("1PB") == 10**15
