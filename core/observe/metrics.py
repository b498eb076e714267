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
class LayerStats:
    """One layer's expert traffic, summed over every step of a run."""

    layer: int
    activated: int = 0  # distinct experts the gates selected, per step
    hits: int = 0  # ... of which were already resident on the device
    predicted: int = 0  # experts the prefetch policy named hot, per step
    predicted_used: int = 0  # ... of which the gates then selected

    @property
    def precision(self) -> float:
        """Share of the experts predicted hot that were used."""
        return self.predicted_used / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        """Share of the experts used that were predicted hot."""
        return self.predicted_used / self.activated if self.activated else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "precision": self.precision, "recall": self.recall}


INTER_LAYER = "inter_layer"  # waiting for attention, the gate or predicted-hot experts
INTRA_LAYER = "intra_layer"  # waiting for a cold expert inside the expert phase


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
    io_busy_s: float = 0.0  # time at least one disk read was in flight
    disk_bytes_read: int = 0  # bytes read from disk (checkpoint or packed store) by every path
    kv_bytes_in: int = 0  # KV cache copied from its home in host RAM into device slots
    kv_bytes_out: int = 0  # new KV entries copied back home
    activation_bytes_in: int = 0  # prefill residual streams copied from host RAM into device slots
    activation_bytes_out: int = 0  # ... and back home
    host_attention_s: float = 0.0  # decode attention on the host's cores ([kv] attention = "host")
    host_attention_bytes: int = 0  # its queries, new entries and outputs across the link
    expert_requests: int = 0  # (layer, expert) selections by the gates, per batch group step
    expert_hits: int = 0  # ... of which the expert was already resident on the device
    expert_in_flight: int = 0  # ... of which a prefetch had already started loading it
    tiers: dict[str, TierStats] = field(default_factory=dict)
    layers: list[LayerStats] = field(default_factory=list)
    wait_by_kind_s: dict[str, float] = field(default_factory=dict)  # block kind -> time compute waited
    bubbles_s: dict[str, float] = field(default_factory=lambda: {INTER_LAYER: 0.0, INTRA_LAYER: 0.0})

    def add_wait(self, kind: str, bubble: str, seconds: float) -> None:
        self.io_wait_s += seconds
        self.wait_by_kind_s[kind] = self.wait_by_kind_s.get(kind, 0.0) + seconds
        self.bubbles_s[bubble] += seconds

    def layer(self, index: int) -> LayerStats:
        while len(self.layers) <= index:
            self.layers.append(LayerStats(len(self.layers)))
        return self.layers[index]

    @property
    def prefetch_precision(self) -> float:
        predicted = sum(s.predicted for s in self.layers)
        return sum(s.predicted_used for s in self.layers) / predicted if predicted else 0.0

    @property
    def prefetch_recall(self) -> float:
        activated = sum(s.activated for s in self.layers)
        return sum(s.predicted_used for s in self.layers) / activated if activated else 0.0

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
        data["prefetch_precision"] = self.prefetch_precision
        data["prefetch_recall"] = self.prefetch_recall
        data["layers"] = [s.to_dict() for s in self.layers]
        return data
