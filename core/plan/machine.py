"""A machine as the planner and the simulator see it: memory budgets, link speeds, compute rates.

Each figure's type carries the range a real machine's can have (:mod:`klotski_tier.core.plausible`);
a hardware file is checked against it when read. The planner itself may scale a machine past it
(how much faster would a link need to be), so a :class:`Machine` does not enforce it.

One frozen :class:`Machine` describes this machine (built from the ``klotski-tier bench`` profile)
or one we do not have (a built-in hardware entry, or a user's TOML file). Bandwidths are decimal
GB/s, as drives and links are rated; times are seconds.

Compute follows a roofline with a fixed cost per job: running ``flops`` of matmul over
``weight_bytes`` of weights takes ``job_overhead_s + max(flops / flops_per_s, weight_bytes /
weight_bytes_per_s)``. Decoding a few tokens is bound by reading the weights, prefill and large
batch groups by arithmetic; the overhead is what a kernel launch (or, on a CPU device, the hand-off
to the compute thread) costs whatever the size.

I/O contention: where the device computes in host memory (a CPU device), a drive streaming into that
memory slows the compute down (the DMA and the block checksums compete for memory bandwidth and
caches; the reading threads themselves use ~5% of a core). ``io_compute_slowdown`` = c says that
compute progresses at 1/(1+c) of its rate alone while the drive reads at full speed, so over a span
where the drive reads for D seconds beside compute, compute needs D*c/(1+c) seconds more. Measured
by ``klotski-tier bench`` (:mod:`klotski_tier.core.bench.contention`); 0 is "no slowdown" (a GPU
computes in its own memory) or "not measured" (a profile from an older bench).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.plausible import (
    DEVICE_MEMORY,
    FLOPS,
    HOST_MEMORY,
    IO_SLOWDOWN,
    MEMORY_RATE,
    OVERHEAD_S,
    RATE_GBPS,
    THREADS,
)
from klotski_tier.core.units import GB


@dataclass(frozen=True)
class ComputeRates:
    """How fast the device runs the model's matmuls (see the module docstring)."""

    flops_per_s: Annotated[float, FLOPS]  # sustained dense matmul rate in the model's dtype
    weight_bytes_per_s: Annotated[float, MEMORY_RATE]  # rate a matmul streams its weights from device memory
    job_overhead_s: Annotated[float, OVERHEAD_S]  # fixed cost of one compute job
    # Attention jobs only (their many small ops): a fixed cost per job on top of job_overhead_s, and
    # one per sequence of the batch (the engine attends one sequence at a time).
    attention_overhead_s: Annotated[float, OVERHEAD_S] = 0.0
    sequence_overhead_s: Annotated[float, OVERHEAD_S] = 0.0

    def __post_init__(self) -> None:
        overheads = (self.job_overhead_s, self.attention_overhead_s, self.sequence_overhead_s)
        if min(self.flops_per_s, self.weight_bytes_per_s) <= 0 or min(overheads) < 0:
            raise ConfigError(
                "compute rates must be positive (flops_per_s, weight_bytes_per_s) and the overheads "
                f"(job_overhead_s, attention_overhead_s, sequence_overhead_s) not negative, got {self}"
            )

    def seconds(self, flops: float, weight_bytes: float) -> float:
        """Time of one job doing ``flops`` over ``weight_bytes`` of weights."""
        return self.job_overhead_s + max(flops / self.flops_per_s, weight_bytes / self.weight_bytes_per_s)


@dataclass(frozen=True)
class Machine:
    """A machine's figures and where they come from."""

    name: str
    source: str  # where the figures come from: a profile path, a datasheet, a measurement
    device: str  # "cuda" or "cpu" (a CPU device computes in host memory: no host-to-device link)
    device_memory_bytes: Annotated[int, DEVICE_MEMORY]
    host_memory_bytes: Annotated[int, HOST_MEMORY]
    disk_read_gbps: Annotated[float, RATE_GBPS]  # the engine's best cold read path from the weights' drive
    host_to_device_gbps: Annotated[float, RATE_GBPS] | None  # pinned copies; None: the device is the host
    compute: ComputeRates
    zstd_decompress_gbps: Annotated[float, RATE_GBPS]  # one thread decoding the packed store's codec
    io_threads: Annotated[int, THREADS]  # threads that read and decode at once (the disk tier's queue depth)
    # Compute runs at 1/(1 + this) of its rate while the drive streams (see the module docstring).
    io_compute_slowdown: Annotated[float, IO_SLOWDOWN] = 0.0
    # The host's cores reading a KV cache in decode attention ([kv] attention = "host"), sustained;
    # None: not known (the planner then keeps attention on the device).
    host_attention_gbps: Annotated[float, RATE_GBPS] | None = None

    def __post_init__(self) -> None:
        if min(self.device_memory_bytes, self.host_memory_bytes) < 0:
            raise ConfigError(f"machine {self.name!r}: memory sizes must not be negative")
        rates = (
            self.disk_read_gbps,
            self.zstd_decompress_gbps,
            self.host_to_device_gbps or 1.0,
            self.host_attention_gbps or 1.0,
        )
        if min(rates) <= 0 or self.io_threads < 1:
            raise ConfigError(
                f"machine {self.name!r}: bandwidths must be positive and io_threads at least 1; "
                "fix the hardware entry"
            )
        if not _non_negative(self.io_compute_slowdown):
            raise ConfigError(
                f"machine {self.name!r}: io_compute_slowdown must be a finite number >= 0, "
                f"got {self.io_compute_slowdown!r}; fix the hardware entry"
            )
        if self.device not in ("cuda", "cpu"):
            raise ConfigError(f"machine {self.name!r}: device must be 'cuda' or 'cpu', got {self.device!r}")

    @property
    def io_compute_rate(self) -> float:
        """Compute progress per second while the drive reads at full speed (1 when unaffected)."""
        return 1.0 / (1.0 + self.io_compute_slowdown)

    def disk_seconds(self, nbytes: int) -> float:
        """Time to read ``nbytes`` from the drive at its sustained rate."""
        return nbytes / (self.disk_read_gbps * GB)

    def host_attention_seconds(self, nbytes: int) -> float | None:
        """Time for the host's cores to read ``nbytes`` of KV cache in attention (None: not known)."""
        if self.host_attention_gbps is None:
            return None
        return nbytes / (self.host_attention_gbps * GB)

    def host_to_device_seconds(self, nbytes: int) -> float:
        """Time to copy ``nbytes`` host to device (0 where the device is the host)."""
        if self.host_to_device_gbps is None:
            return 0.0
        return nbytes / (self.host_to_device_gbps * GB)


def _non_negative(value: object) -> bool:
    """Whether ``value`` is a finite real number >= 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and value >= 0
