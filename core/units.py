"""Units, in one place: binary sizes (KiB, MiB, GiB), decimal gigabytes for bandwidths, alignment, and
human byte sizes ("512MiB", "8GiB", "1.5GB", "4096") parsed and printed."""

from __future__ import annotations

import re

from klotski_tier.core.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB

GB = 1e9
"""Decimal gigabyte: bandwidths are decimal GB/s, as drives and links are rated."""

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": KIB,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": MIB,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": GIB,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024 * GIB,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes in ``text``: an int, or a number with an optional unit (KiB, MiB, GiB, KB, MB, GB ...)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{what} must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(f"{what} {text!r} is not a size; write a number with a unit such as 512MiB or 8GiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit that keeps the number at least 1 (e.g. ``"1.50 GiB"``)."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def align_up(value: int, alignment: int) -> int:
    """The smallest multiple of ``alignment`` that is at least ``value``."""
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    """The largest multiple of ``alignment`` that is at most ``value``."""
    return value // alignment * alignment
