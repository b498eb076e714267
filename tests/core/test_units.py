"""Human sizes: every unit up to EiB, and nothing beyond 1 EiB (a typo, not a budget)."""

from __future__ import annotations

import pytest

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.units import EIB, MAX_SIZE_BYTES, PIB, parse_size


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("4096", 4096), ("1.5GB", 1_500_000_000), ("512MiB", 512 * 2**20), ("1PiB", PIB),
     ("999PB", 999 * 10**15), ("1EiB", EIB), ("1EB", 10**18), ("0.5KiB", 512)],
)  # fmt: skip
def test_sizes_up_to_an_exbibyte(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize(
    "text", ["1152921504606846977", "2EiB", "1025PiB", str(2**64 + 1), "1" + "0" * 5000, 2**64 + 1]
)
def test_a_size_beyond_an_exbibyte_is_refused_in_one_line(text: str | int) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_size(text, what="--device-memory")
    message = str(caught.value)
    assert message.startswith("--device-memory ") and "more than 1 EiB, the largest size accepted" in message
    assert "\n" not in message and len(message) < 200
    assert parse_size(MAX_SIZE_BYTES) == MAX_SIZE_BYTES


def test_an_unknown_unit_names_the_units() -> None:
    with pytest.raises(ConfigError, match=r"units B, KB/KiB, .* PB/PiB, EB/EiB"):
        parse_size("1ZiB", what="--device-memory")
