"""Byte sizes as people write them in config files and on the command line.

Owns ``parse_size`` (``"512MiB"``, ``"8 GB"``, ``"1.5GiB"``, ``4096`` -> bytes) and
``format_size`` (bytes -> ``"1.5 GiB"``).

Units: ``B``; decimal ``KB MB GB TB`` (powers of 1000); binary ``KiB MiB GiB TiB``
(powers of 1024). Units are case-insensitive and may be separated from the number by
spaces. Single-letter units (``k``, ``M``, ``G``) are refused on purpose: half the world
reads ``G`` as 1000^3 and the other half as 1024^3, and a memory limit that is off by
7% is the kind of bug nobody notices until a model does not fit.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["UNITS", "format_size", "parse_size"]

UNITS: dict[str, int] = {
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

_SIZE_RE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[a-zA-Z]*)\s*$")
_ALLOWED = "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"


def parse_size(value: int | str) -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative ``int`` or a string such as ``"4096"``, ``"512MiB"``,
    ``"8 GB"`` or ``"1.5 GiB"``. Fractions are allowed with a unit and rounded to the
    nearest byte. Raises ``ValueError`` naming what was wrong and what is allowed.
    """
    # bool is an int subclass; `max_memory = true` in a config is a mistake, not 1 byte.
    if isinstance(value, bool):
        raise ValueError(f"size must be a number of bytes or a string like '8GiB', not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"size must be a number of bytes or a string like '8GiB', "
            f"not {type(value).__name__} {value!r}"
        )
    text = value.strip()
    if text.startswith("-"):
        raise ValueError(f"size must not be negative, got {value!r}")
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            f"cannot read {value!r} as a size: write a number with an optional unit, "
            f"e.g. '4096', '512MiB' or '8 GB'"
        )
    unit = match["unit"].lower() or "b"
    if unit not in UNITS:
        hint = ""
        if unit in {"k", "m", "g", "t"}:
            upper = unit.upper()
            hint = f" ('{upper}' is ambiguous: write '{upper}iB' for 1024-based or '{upper}B' for 1000-based)"
        raise ValueError(f"unknown size unit {match['unit']!r} in {value!r}{hint}; use {_ALLOWED}")
    try:
        number = Decimal(match["num"])
    except InvalidOperation as exc:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"cannot read {value!r} as a size") from exc
    if unit == "b" and number != number.to_integral_value():
        raise ValueError(f"a size in bytes must be a whole number, got {value!r}")
    return int((number * UNITS[unit]).to_integral_value())


def format_size(n: int) -> str:
    """Format a byte count with binary units for humans: ``1610612736`` -> ``"1.5 GiB"``.

    At most one decimal place, trailing ``.0`` dropped; below 1 KiB it prints bytes.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise ValueError(f"size must be an int number of bytes, got {n!r}")
    sign = "-" if n < 0 else ""
    size = abs(n)
    if size < 1024:
        return f"{sign}{size} B"
    names = ("KiB", "MiB", "GiB", "TiB")
    index = min(len(names) - 1, (size.bit_length() - 1) // 10 - 1)
    text = f"{size / 1024 ** (index + 1):.1f}"
    # 1023.96 KiB rounds to "1024.0 KiB": promote so the output stays canonical.
    if text == "1024.0" and index + 1 < len(names):
        index += 1
        text = f"{size / 1024 ** (index + 1):.1f}"
    text = text.removesuffix(".0")
    return f"{sign}{text} {names[index]}"
