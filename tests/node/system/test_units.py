"""Tests for node.units: size parsing and formatting."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.system.units import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("0", 0),
        ("12B", 12),
        ("1 b", 1),
        ("512MiB", 512 * 1024**2),
        ("512mib", 512 * 1024**2),
        ("8GB", 8 * 1000**3),
        ("8 gb", 8 * 1000**3),
        ("1.5 GiB", 1536 * 1024**2),
        ("1.5GiB", 1536 * 1024**2),
        ("  2 KiB  ", 2048),
        ("64KB", 64_000),
        ("2TiB", 2 * 1024**4),
        ("3 TB", 3 * 1000**4),
        (".5 MiB", 512 * 1024),
        ("1.", 1),
    ],
)
def test_parse_size_accepts(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "negative"),
        ("-5MiB", "negative"),
        (True, "not True"),
        (False, "not False"),
        (1.5, "not float"),
        (None, "not NoneType"),
        ("", "cannot read"),
        ("abc", "cannot read"),
        ("MiB", "cannot read"),
        ("1,5GiB", "cannot read"),
        ("1 XB", "unknown size unit 'XB'"),
        ("64k", "'K' is ambiguous"),
        ("2G", "'G' is ambiguous"),
        ("1.5", "whole number"),
        ("1.5B", "whole number"),
        ("1e3", "cannot read"),
    ],
)
def test_parse_size_rejects_with_clear_message(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_size(value)  # type: ignore[arg-type]


def test_unknown_unit_message_lists_allowed_units() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("5 parsecs")
    assert "KiB" in str(info.value) and "GB" in str(info.value)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (1024**2 - 1, "1 MiB"),
        (512 * 1024**2, "512 MiB"),
        (1536 * 1024**2, "1.5 GiB"),
        (5 * 1024**4, "5 TiB"),
        (3 * 1024**5, "3072 TiB"),
        (-2048, "-2 KiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


def test_format_size_rejects_non_int() -> None:
    with pytest.raises(ValueError, match="int number of bytes"):
        format_size(1.5)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=2**50))
def test_format_then_parse_is_close(n: int) -> None:
    # format_size rounds to one decimal place, so the round trip is within 5% + 1 byte.
    back = parse_size(format_size(n).replace(" ", ""))
    assert abs(back - n) <= n * 0.05 + 1
