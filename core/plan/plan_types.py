"""What the planner is asked (:class:`PlanRequest`) and what it answers: the candidates it tries
(:class:`Candidate`), the memory each uses per tier (:class:`TierUse`) and the chosen :class:`Plan`.
The search itself is :mod:`klotski_tier.core.plan.planner`, which re-exports these names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.pipeline_model import (
    SLACK_TOLERANCE_S,
    Deadline,
    Io,
    LayerWork,
    StepPrediction,
    StepShape,
)
from klotski_tier.core.plan.placement_model import Placement
from klotski_tier.core.plan.routing_model import RoutingModel
from klotski_tier.core.runtime.config import MAX_BATCH_SIZE, MAX_BATCHES, EngineOptions, check_count


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for; ``None`` fields are the planner's to choose (or the machine's figures)."""

    spec: ModelSpec
    machine: Machine
    routing: RoutingModel | None = None  # None: the parametric model with the demo's skew
    device_memory_bytes: int | None = None  # None: the machine's device memory
    host_memory_bytes: int | None = None  # None: the machine's host memory
    sequences: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 32
    batches: int | None = None  # fixed n
    batch_size: int | None = None  # fixed bs
    hot_experts: int | None = None  # fixed K
    host_preload: bool | None = None  # True: every block in host RAM; False: stream from the drive
    compression_ratio: float | None = None  # the ratio of a compressed store the run may read
    eviction: str | None = None  # fixed device eviction policy (modelled as LRU unless "sweep")
    lookahead_layers: int | None = None  # fixed L (layers read ahead); None: the planner's
    stream_window: int = EngineOptions.stream_window  # the device's streaming window (0: no cap)
    disk_queue_depth: int = EngineOptions.disk_queue_depth  # the engine's reads in flight from the drive
    kv_home: str | None = None  # fixed [kv] home; None: the device where the group's cache fits, else RAM
    kv_attention: str | None = None  # fixed [kv] attention; None: where the cost model prices it faster
    activations_home: str | None = None  # fixed [activations] home; None: where more tokens/s are predicted
    kv_device_layers: int | None = None  # fixed [kv] device_layers; None: the planner's
    max_batches: int = 64

    def __post_init__(self) -> None:
        counts = {
            "sequences": (self.sequences, MAX_SEQUENCES),
            "batches": (self.batches or 1, MAX_BATCHES),
            "max_batches": (self.max_batches, MAX_BATCHES),
            "batch_size": (self.batch_size or 1, MAX_BATCH_SIZE),
            "prompt_tokens": (self.prompt_tokens, None),
            "new_tokens": (self.new_tokens, None),
        }
        for name, (value, high) in counts.items():
            check_count(f"plan: {name}", value, 1, high)
        if self.hot_experts is not None and not 0 <= self.hot_experts <= self.spec.num_experts:
            raise ConfigError(
                f"plan: hot experts K must be in 0..{self.spec.num_experts}, got {self.hot_experts}"
            )
        if self.kv_device_layers is not None and self.kv_device_layers >= self.spec.num_layers:
            raise ConfigError(
                f"plan: --kv-device-layers {self.kv_device_layers} keeps every one of the model's "
                f"{self.spec.num_layers} layers' cache on the device; give at most "
                f"{self.spec.num_layers - 1}, or --kv-home device"
            )
        check_compression_ratio(self.compression_ratio)
        positions, context = self.prompt_tokens + self.new_tokens, self.spec.max_position_embeddings
        if positions > context:
            raise ConfigError(
                f"plan: a prompt of {self.prompt_tokens} tokens with {self.new_tokens} new tokens needs "
                f"{positions} positions but the model's context is {context}; lower --prompt-tokens or "
                "--max-new-tokens"
            )


MIN_COMPRESSION_RATIO = 0.5
MAX_COMPRESSION_RATIO = 100.0
"""A compressed store's ratio (raw / stored bytes) is plausible in this range: zstd never doubles a
block, and model weights do not shrink a hundredfold (bf16 weights: about 1.3)."""
MAX_SEQUENCES = MAX_BATCHES * MAX_BATCH_SIZE  # the most sequences a plan may be asked for


def check_compression_ratio(ratio: float | None, what: str = "compression ratio") -> None:
    """A :class:`ConfigError` unless ``ratio`` is None (no compressed store) or a plausible ratio."""
    if ratio is None or MIN_COMPRESSION_RATIO <= ratio <= MAX_COMPRESSION_RATIO:  # nan fails both
        return
    raise ConfigError(
        f"{what} {ratio:g} is not a compressed store's ratio (raw / stored bytes); give one in "
        f"{MIN_COMPRESSION_RATIO:g}..{MAX_COMPRESSION_RATIO:g}, e.g. 1.3 for zstd over bf16 weights"
    )


@dataclass(frozen=True)
class TierUse:
    """One tier under a plan: the bytes it needs to run without memory stalls (and what they are),
    and its peak (LRU caching fills the budget up to the whole model), against the budget."""

    tier: str
    needed_bytes: int
    peak_bytes: int
    budget_bytes: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.budget_bytes


class SweepPoint(NamedTuple):
    """The prediction for one n of a plan's sweep."""

    batches: int
    decode_tokens_per_s: float
    bubble_s: float  # per decode step
    eviction: str  # the device's eviction policy the planner chose at this n


@dataclass(frozen=True)
class Candidate:
    """One (n, bs, K) the planner tried: its worst deadline and its predicted decode step."""

    batches: int
    batch_size: int
    hot_experts: int
    placement: Placement
    deadlines: tuple[Deadline, ...]
    decode: StepPrediction
    device: TierUse
    host: TierUse
    shape: StepShape
    work: tuple[LayerWork, ...]
    io: Io
    drive_bytes: int = 0  # predicted bytes read from the drive per decode step (steady state)
    unheld_bytes: int = 0  # what the device and host RAM cannot hold of the blocks the steps touch
    # With a prefill's residuals in host RAM: their copies, taken as unhidden, per token the group generates
    prefill_copy_s_per_token: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """What the planner ranks by: decode tokens/s, less what a prefill's residual copies cost a token."""
        speed = self.decode.tokens_per_s
        if speed <= 0 or not self.prefill_copy_s_per_token:
            return speed
        return 1.0 / (1.0 / speed + self.prefill_copy_s_per_token)

    @property
    def fits(self) -> bool:
        return self.device.fits and self.host.fits

    @property
    def binding(self) -> Deadline:
        return min(self.deadlines, key=lambda d: d.slack_s)

    @property
    def meets_deadlines(self) -> bool:
        return self.binding.slack_s >= -SLACK_TOLERANCE_S


@dataclass(frozen=True)
class Plan:
    """The chosen plan, its predictions and why (see the module docstring)."""

    batches: int
    batch_size: int
    hot_experts: int
    placement: Placement
    deadlines: tuple[Deadline, ...]
    binding: Deadline  # the deadline with the least slack (negative: missed by that much)
    feasible: bool  # every deadline met in every layer, within every budget
    decode: StepPrediction
    prefill: StepPrediction
    memory: tuple[TierUse, TierUse]  # device, host
    memory_cap_batches: int  # the largest n whose working set fits at this bs and K
    why: str
    advice: tuple[str, ...]
    sweep: tuple[SweepPoint, ...]  # every n tried at the chosen bs and K
    drive_bytes: int = 0  # predicted bytes read from the drive per decode step (steady state)
    unheld_bytes: int = 0  # what the device and host RAM cannot hold of the blocks the steps touch

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode.tokens_per_s

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill.tokens_per_s

    def engine_options(self) -> dict[str, Any]:
        """The EngineOptions fields this plan sets."""
        return {
            "batches": self.batches,
            "batch_size": self.batch_size,
            "hot_experts": self.hot_experts,
            "host_preload": self.placement.host_preload,
            "eviction": self.placement.eviction,
            "lookahead_layers": self.placement.lookahead_layers,
            "kv_home": self.placement.kv_home,
            "kv_attention": self.placement.kv_attention,
            "activations_home": self.placement.activations_home,
            "kv_device_layers": self.placement.kv_device_layers,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, each deadline with its slack, tokens/s of both phases."""
        data = asdict(self)
        data["deadlines"] = [d.to_dict() for d in self.deadlines]
        data["binding"] = self.binding.to_dict()
        data["decode"] = self.decode.to_dict()
        data["prefill"] = self.prefill.to_dict()
        data["memory"] = [{**asdict(m), "fits": m.fits} for m in self.memory]
        data["placement"] = {**asdict(self.placement), "description": self.placement.describe()}
        return data
