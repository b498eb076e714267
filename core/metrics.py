"""What a run reports: throughput, bytes moved per tier, expert hits, I/O waits, peak memory.

Counters are plain dataclasses filled by the residency manager and the pipeline; the CLI
and the Python API read them through :meth:`RunMetrics.to_dict`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TierStats:
    """Traffic into one memory tier and its peak occupancy against its budget."""

    name: str
    budget_bytes: int
    bytes_in: int = 0  # bytes moved into this tier (disk -> host, host -> device)
    transfers: int = 0
    transfer_s: float = 0.0  # summed duration of the moves (they overlap, so this can exceed wall time)
    peak_bytes: int = 0
    evictions: int = 0

    def add_transfer(self, nbytes: int, seconds: float) -> None:
        self.bytes_in += nbytes
        self.transfers += 1
        self.transfer_s += seconds

    def observe_peak(self, used_bytes: int) -> None:
        self.peak_bytes = max(self.peak_bytes, used_bytes)


@dataclass
class RunMetrics:
    """Everything one ``generate`` call measured."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    wall_s: float = 0.0
    compute_s: float = 0.0  # time the compute executor was busy
    io_wait_s: float = 0.0  # time the pipeline waited for a block with no compute running
    io_busy_s: float = 0.0  # summed duration of disk reads
    expert_requests: int = 0  # (layer, expert) selections by the gates, per batch group step
    expert_hits: int = 0  # ... of which the expert was already resident on the device
    expert_in_flight: int = 0  # ... of which a prefetch had already started loading it
    tiers: dict[str, TierStats] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def expert_hit_rate(self) -> float:
        return self.expert_hits / self.expert_requests if self.expert_requests else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        data["expert_hit_rate"] = self.expert_hit_rate
        return data
