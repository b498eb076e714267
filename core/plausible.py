"""The figures a real machine can have: the one rule for every rate, size, time and count that a file
declares or measures about a machine.

A machine profile (``klotski-tier bench``) and a hardware file (``--hardware-file``) are read into
dataclasses whose every numeric field carries its range in its type, ``Annotated[float, RATE]``;
the reader checks each value against it and refuses one outside in one line that names the field,
its value and the range. A figure outside is a typo, an edited or corrupt file: taken as it is, it
plans for a machine that cannot exist, or overflows the planner's arithmetic (a drive at 1e308 GB/s
makes every read take 0 s).

The bounds are a thousand times or more beyond today's hardware, so they refuse only the absurd:

- a drive, a link, a decoder or the host's memory: at most :data:`MAX_LINK_GBPS` (10 TB/s; PCIe 6.0
  x16 carries 121 GB/s, NVLink 5 1.8 TB/s, a server's DRAM ~600 GB/s);
- an accelerator's own memory bandwidth: at most :data:`MAX_MEMORY_BYTES_PER_S` (100 TB/s; HBM3e
  gives 8); its arithmetic: at most :data:`MAX_FLOPS_PER_S` (1 EFLOP/s; a B200 does 2.25 PFLOP/s);
- an accelerator's memory: at most :data:`MAX_DEVICE_MEMORY_BYTES` (1 PiB; the largest has 288 GB);
  a host's memory or any other size: at most :data:`~klotski_tier.core.units.MAX_SIZE_BYTES` (1 EiB);
- one compute job: at most :data:`MAX_JOB_S` (an hour); threads and queue depths: at most
  :data:`MAX_THREADS`; compute slowed by streaming I/O: at most :data:`MAX_IO_SLOWDOWN` times.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.units import EIB, GIB, KIB, MAX_SIZE_BYTES, MIB, PIB, TIB

MAX_LINK_GBPS = 10_000.0
"""10 TB/s: more than any drive, link, decoder or host memory moves (see the module docstring)."""
MAX_MEMORY_BYTES_PER_S = 100e12
"""100 TB/s: more than any accelerator streams from its own memory."""
MAX_FLOPS_PER_S = 1e18
"""1 EFLOP/s: more than any one accelerator computes."""
MAX_DEVICE_MEMORY_BYTES = PIB
"""1 PiB: more than any one accelerator (or a CPU device's host) holds."""
MAX_JOB_S = 3600.0
"""No job the bench times (one expert or one attention layer over a few tokens) takes an hour."""
MAX_THREADS = 65536
"""Threads, cores or queue depth: more than any machine has."""
MAX_COUNT = 2**31
"""Rounds, tokens: more than any measurement takes."""
MAX_IO_SLOWDOWN = 100.0
"""Compute a hundred times slower while the drive streams is no measurement."""
MAX_RATIO = 1e6
"""A compression ratio or a fraction of another rate: a million is no measurement."""


_WHOLE_SHOWN_BELOW = 1e12  # a whole number below this is shown with all its digits, a larger one as 1e+18


@dataclass(frozen=True)
class Plausible:
    """The values a figure can have: ``low <= value <= high``, or ``low < value`` where ``above_low``."""

    low: float
    high: float
    unit: str = ""  # "B" is shown as a binary size; any other unit follows the number
    above_low: bool = False

    def allows(self, value: float) -> bool:
        """Whether ``value`` is in range (NaN never is)."""
        above = value > self.low if self.above_low else value >= self.low
        return above and value <= self.high

    def show(self, value: float) -> str:
        """``value`` with its unit."""
        if self.unit == "B":
            return _binary_size(value)
        whole = float(value).is_integer() and abs(value) < _WHOLE_SHOWN_BELOW
        return f"{int(value) if whole else format(value, 'g')} {self.unit}".rstrip()

    def describe(self) -> str:
        """The range, e.g. ``0 GB/s < x <= 10000 GB/s``."""
        return f"{self.show(self.low)} {'<' if self.above_low else '<='} x <= {self.show(self.high)}"

    def check(self, value: float, field: str, hint: str, *, noun: str = "figure") -> None:
        """A one-line :class:`ConfigError` unless ``value`` is in range: ``<field> is <value>, not a
        plausible <noun> (<range>); <hint>``."""
        if not self.allows(value):
            shown = self.show(value)
            said = field.endswith(f"= {shown}")  # "io_threads = 1000000000" says it all; "= 2**51" does not
            raise ConfigError(f"{field}{'' if said else f' is {shown}'}, {implausible(self, noun)}; {hint}")


def implausible(bounds: Plausible, noun: str = "figure") -> str:
    """``not a plausible <noun> (<range>)``: how every message of this rule ends before its hint."""
    return f"not a plausible {noun} ({bounds.describe()})"


MIN_RATE_GBPS = 1e-3
"""1 MB/s: slower than any drive, link or decoder a model is run from; below it a simulated run of a
large model lasts centuries of virtual time (and once spun on the clock's rounding)."""
RATE_GBPS = Plausible(MIN_RATE_GBPS, MAX_LINK_GBPS, "GB/s")
"""A drive, link, decoder or host memory rate (decimal GB/s)."""
RATE_OR_UNMEASURED_GBPS = Plausible(0.0, MAX_LINK_GBPS, "GB/s")
"""A rate where 0 says "not measured"."""
MEMORY_RATE = Plausible(MIN_RATE_GBPS * 1e9, MAX_MEMORY_BYTES_PER_S, "B/s")
"""An accelerator streaming weights from its own memory (bytes per second)."""
MIN_FLOPS_PER_S = 1e9
"""1 GFLOP/s: less than any CPU core computes."""
FLOPS = Plausible(MIN_FLOPS_PER_S, MAX_FLOPS_PER_S, "FLOP/s")
DEVICE_MEMORY = Plausible(0, MAX_DEVICE_MEMORY_BYTES, "B")
HOST_MEMORY = Plausible(0, MAX_SIZE_BYTES, "B")
SIZE = Plausible(0, MAX_SIZE_BYTES, "B", above_low=True)
"""A file, block, sample or copy size."""
JOB_S = Plausible(0.0, MAX_JOB_S, "s", above_low=True)
"""One measured compute job."""
OVERHEAD_S = Plausible(0.0, MAX_JOB_S, "s")
"""A fixed cost per job or per sequence (0: none)."""
THREADS = Plausible(1, MAX_THREADS)
COUNT = Plausible(1, MAX_COUNT)
"""Rounds of a measurement."""
TOKENS = Plausible(0, MAX_COUNT)
"""Tokens of a compute job or a context (0: none)."""
RATIO = Plausible(0.0, MAX_RATIO, above_low=True)
IO_SLOWDOWN = Plausible(0.0, MAX_IO_SLOWDOWN)


@functools.cache
def plausible_fields(cls: type) -> dict[str, Plausible]:
    """The range each field of the dataclass ``cls`` declares in its type (``Annotated[T, RANGE]``,
    or ``Annotated[T, RANGE] | None``)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    ranges = {field.name: plausible_of(hints[field.name]) for field in dataclasses.fields(cls)}
    return {name: bounds for name, bounds in ranges.items() if bounds is not None}


def plausible_of(kind: Any) -> Plausible | None:
    """The range the type ``kind`` carries (``Annotated[T, RANGE]``, optionally ``| None``), if any."""
    if typing.get_origin(kind) is types.UnionType:
        found = [plausible_of(arg) for arg in typing.get_args(kind)]
        return next((bounds for bounds in found if bounds is not None), None)
    if typing.get_origin(kind) is Annotated:
        return next((meta for meta in kind.__metadata__ if isinstance(meta, Plausible)), None)
    return None


def _binary_size(nbytes: float) -> str:
    """``nbytes`` in the largest binary unit up to EiB that keeps the number at least 1."""
    for unit, scale in (("EiB", EIB), ("PiB", PIB), ("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"
