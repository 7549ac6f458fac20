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


def test_sizes_are_exact_not_rounded_through_a_float() -> None:
    assert parse_size("9007199254740993") == 2**53 + 1
    assert parse_size("1.5K") == 1536 and parse_size("0.0009765625K") == 1
    assert parse_size("8EiB") == 2**63  # the largest size taken


@pytest.mark.parametrize("text", ["9" * 400, "9" * 5000, "99999999999999999999999E",
                                  str(2**63 + 1), "8.5EiB", "9.3EB"])
def test_a_size_above_2_63_is_refused_in_one_short_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"^too large: '.*' \(at most 8 EiB\)$") as caught:
        parse_size(text)
    assert len(str(caught.value)) < 100


@pytest.mark.parametrize("text", ["0.5", "1." + "0" * 5000 + "1", "1.1B"])
def test_a_fraction_of_a_byte_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"^not a whole number of bytes") as caught:
        parse_size(text)
    assert len(str(caught.value)) < 100
