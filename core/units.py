"""Units, in one place: binary sizes (KiB, MiB, GiB), decimal gigabytes for bandwidths, alignment, and
human byte sizes ("512MiB", "8GiB", "1.5GB", "4096") parsed and printed."""

from __future__ import annotations

import re

from klotski_tier.core.errors import ConfigError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB
PIB = 1024 * TIB
EIB = 1024 * PIB

MAX_SIZE_BYTES = EIB
"""The largest size any option or file may give (1 EiB): beyond every machine's memory and drive, and
well inside a signed 64-bit byte count, so a size that large is a typo, not a budget."""

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
    "tib": TIB,
    "p": 1000**5,
    "pb": 1000**5,
    "pib": PIB,
    "e": 1000**6,
    "eb": 1000**6,
    "eib": EIB,
}
_MAX_SIZE_DIGITS = 20  # a whole number longer than this is over MAX_SIZE_BYTES in any unit
_SHOWN_CHARS = 40  # of a size too large, the first characters the error shows
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Bytes in ``text``: an int, or a number with an optional unit (KiB ... EiB, KB ... EB), at most
    :data:`MAX_SIZE_BYTES`."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"{what} must not be negative, got {text}")
        return _at_most_max(text, text, what)
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{what} {text!r} is not a size; write a number with a unit such as 512MiB or 8GiB "
            "(units B, KB/KiB, MB/MiB, GB/GiB, TB/TiB, PB/PiB, EB/EiB)"
        )
    whole, _, fraction = match.group(1).partition(".")
    if len(whole.lstrip("0")) > _MAX_SIZE_DIGITS:
        return _at_most_max(MAX_SIZE_BYTES + 1, text, what)
    scale = _UNITS[unit]  # exact for whole numbers of any length; a fraction rounds down to a byte
    nbytes = int(whole) * scale + (int(float(f"0.{fraction}") * scale) if fraction else 0)
    return _at_most_max(nbytes, text, what)


def _at_most_max(nbytes: int, text: str | int, what: str) -> int:
    if nbytes > MAX_SIZE_BYTES:
        shown = repr(text) if len(str(text)) <= _SHOWN_CHARS else f"'{str(text)[:_SHOWN_CHARS]}...'"
        raise ConfigError(
            f"{what} {shown} is more than 1 EiB, the largest size accepted; give a size this machine "
            "could have, such as 8GiB"
        )
    return nbytes


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
