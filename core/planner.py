"""The constraint-sensitive planner: n, bs, K and placement from the machine, the model and its routing.

Per layer of a decode step, with per-batch attention time tA, routing time tG (plus one gather of
all n batches' tokens and a combine per batch, as the engine runs them), per-block transfer times
tIO_G, tIO_E, tIO_A from each block's home, the compute of the hot experts tc_hot and of the Q
cold ones (both from the routing model: they grow with the tokens each expert gets, n * bs * k / E
on average), every deadline of ARCHITECTURE.md section 2 point 6 must hold:

    (4) n*tA                                   >= tIO_G
    (5) n*(tA+tG) + gather                     >= tIO_G + K*tIO_E
    (6) n*(tA+tG) + gather + tc_hot            >= tIO_G + (K+1)*tIO_E        (only when Q > 0)
    (7) n*(tA+tG) + gather + tc_hot + tc_cold
        + n*combine                            >= tIO_G + (K+Q)*tIO_E + tIO_A

refined as the engine meets them (see :func:`deadlines`): cold loads cannot start before the first
gate has routed, and reads that share the drive arrive in groups.

A transfer time is the slowest stage a block passes (drive, decompression spread over the disk
threads, host-to-device copy): blocks stream back to back. Placement follows the engine: the
device keeps every weight when they all fit beside the KV cache and activations (then nothing
moves after the first step), else it streams each layer through LRU (no reuse across steps); the
host holds every block when its budget allows (blocks then come from RAM), else it stages a window
of layers from the drive.

:func:`make_plan` tries n = 1, 2, ... (up to the sequences, ``max_batches`` and memory: the KV cache
grows with n * bs) and K in 0..2k (in eight steps when 2k > 8); it keeps the smallest n that meets
every deadline in every layer and fits, with the best predicted throughput; if none does, the
candidate with the least bubble time per token, naming the missed deadline and by how much. Unless
bs is given, it does so for each bs in powers of two and keeps the best predicted decode throughput.
Predicted times come from a recurrence over the layers of two steps (the second is reported) in
the engine's order: one I/O channel carries, per layer, the cold experts requested after the first
gate, then the next layer's attention, gate and K hot experts requested at the end of the gate
phase; the compute waits for each (inter-layer bubbles) and drains experts as they arrive
(intra-layer bubbles). When the device holds fewer experts at once than a layer needs, cold loads
wait for releases.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from klotski_tier.core.costmodel import CostModel
from klotski_tier.core.errors import BudgetError, ConfigError
from klotski_tier.core.machine import Machine
from klotski_tier.core.routing_model import LayerLoads, RoutingModel
from klotski_tier.core.sizes import format_size
from klotski_tier.core.spec import ModelSpec
from klotski_tier.tiers.disk import DEFAULT_CHUNK_BYTES

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

MAX_BATCH_SIZE = 64  # largest bs tried when the request leaves it open
FINE_HOT_EXPERTS = 8  # K is tried one by one up to 2k when 2k is at most this; else in COARSE_HOT_STEPS
COARSE_HOT_STEPS = 8
SLACK_TOLERANCE_S = 1e-9  # a deadline met to within rounding is met
TYPICAL_ZSTD_RATIO = 1.4  # bf16 expert weights with byte shuffle (the demo packs at 1/0.683 = 1.46)
MEANINGS = {
    4: "the gate is ready before the gate phase",
    5: "the hot experts are ready before the expert phase",
    6: "the first cold expert is ready when the hot ones are done",
    7: "the last cold expert and the next layer's attention are ready in time to end the layer",
}
MAX_SPEEDUP = 1e6  # faster links than this are not advice
BISECTIONS = 20  # halvings of the speed-up interval: well under 0.1%
STEADY_STEPS = 2  # steps run by the recurrence; the last one is reported (the first fills the channel)


@dataclass(frozen=True)
class Placement:
    """Where the weights live while the plan runs."""

    device_resident: bool  # every weight stays in device memory after the first step
    home: str  # where blocks come from when they are loaded: "host" (RAM) or "disk"
    host_preload: bool  # read every block into host RAM before the first step
    host_window_layers: int  # home "disk": whole layers the host budget stages ahead of the device
    compressed: bool  # read from a compressed store (it pays off against the plain bytes)
    expert_reuse: float = 0.0  # expected share of used experts still in device memory from earlier steps

    def describe(self) -> str:
        device = (
            "every weight stays in device memory"
            if self.device_resident
            else "layers stream through device memory"
        )
        if self.home == "host":
            return f"{device}; host RAM holds the whole model"
        store = "a compressed store" if self.compressed else "the checkpoint"
        window = self.host_window_layers
        return f"{device}; blocks come from {store} on the drive, {window} layer(s) staged in RAM"


@dataclass(frozen=True)
class Io:
    """Per-block transfer time (its slowest stage) of each kind of block, 0 when resident."""

    attn: float
    gate: float
    expert: float
    embed: float
    head: float
    parallel: int = 1  # loads served at once (disk reads share the drive, so they arrive together)


@dataclass(frozen=True)
class StepShape:
    """One step of a batch group: its size and the time of each compute job."""

    batches: int
    batch_size: int
    tokens: int  # tokens routed to experts (all n batches)
    attention_s: float  # per batch
    gate_s: float  # per batch
    gather_s: float  # per layer
    combine_s: float  # per batch
    embed_s: float  # per batch
    head_s: float  # per batch

    @classmethod
    def decode(cls, cost: CostModel, batches: int, batch_size: int, context: int) -> StepShape:
        """A decode step: one new token per sequence after ``context`` cached ones."""
        return cls.of(cost, batches, batch_size, 1, context)

    @classmethod
    def prefill(cls, cost: CostModel, batches: int, batch_size: int, prompt: int) -> StepShape:
        return cls.of(cost, batches, batch_size, prompt, 0)

    @classmethod
    def of(cls, cost: CostModel, batches: int, batch_size: int, query: int, context: int) -> StepShape:
        per_batch = batch_size * query
        return cls(
            batches=batches,
            batch_size=batch_size,
            tokens=batches * per_batch,
            attention_s=cost.attention_s(batch_size, query, context),
            gate_s=cost.gate_s(per_batch),
            gather_s=cost.gather_s(batches * per_batch),
            combine_s=cost.combine_s(per_batch),
            embed_s=cost.embed_s(per_batch),
            head_s=cost.head_s(batch_size),
        )


@dataclass(frozen=True)
class LayerWork:
    """One layer's expected expert work with K hot experts (from the routing model)."""

    hot_s: float  # compute of the hot experts that get tokens
    cold: float  # Q: experts used that were not predicted hot
    cold_s: float
    distinct_max: int  # most experts the layer used in any draw


@dataclass(frozen=True)
class WorkTable:
    """Expected expert work of every layer at one token count, for every K at once: sums over the
    predictor's ranks, so the K hot experts are the first K columns."""

    hot_s: FloatArray  # [L, E + 1]: compute of the used experts among the first K ranks, K = 0..E
    used: FloatArray  # [L, E + 1]: experts among the first K ranks that get tokens
    distinct_max: list[int]  # [L]

    @classmethod
    def of(cls, loads: tuple[LayerLoads, ...], cost: CostModel) -> WorkTable:
        tokens = np.stack([load.ranked_tokens for load in loads])  # [L, draws, E]
        seconds = cost.expert_s_array(tokens).mean(axis=1)  # [L, E]
        used = (tokens > 0).mean(axis=1)  # [L, E]
        zero = np.zeros((len(loads), 1))
        distinct_max = (tokens > 0).sum(axis=2).max(axis=1)  # [L]
        return cls(np.hstack([zero, seconds.cumsum(axis=1)]), np.hstack([zero, used.cumsum(axis=1)]),
                   [int(d) for d in distinct_max])  # fmt: skip

    def work(self, hot: int) -> tuple[LayerWork, ...]:
        hot_s, used = self.hot_s[:, hot], self.used[:, hot]
        cold, cold_s = self.used[:, -1] - used, self.hot_s[:, -1] - hot_s
        rows = zip(hot_s.tolist(), cold.tolist(), cold_s.tolist(), self.distinct_max, strict=True)
        return tuple(LayerWork(h, max(c, 0.0), max(cs, 0.0), d) for h, c, cs, d in rows)


def layer_work(loads: tuple[LayerLoads, ...], hot: int, cost: CostModel) -> tuple[LayerWork, ...]:
    """Each layer's expected expert work with ``hot`` experts prefetched."""
    return WorkTable.of(loads, cost).work(hot)


@dataclass(frozen=True)
class Deadline:
    """One deadline in its worst layer: compute side >= I/O side."""

    number: int
    meaning: str
    compute_s: float
    io_s: float
    layer: int

    @property
    def slack_s(self) -> float:
        return self.compute_s - self.io_s

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "slack_s": self.slack_s, "met": self.slack_s >= -SLACK_TOLERANCE_S}


def deadlines(shape: StepShape, hot: int, work: tuple[LayerWork, ...], io: Io) -> tuple[Deadline, ...]:
    """(4)-(7) as the engine meets them, each in the layer where its slack is least.

    The engine requests cold experts after the first gate, so their loads start once that gate has
    run and the hot loads are done. Reads sharing the drive (``io.parallel`` > 1) arrive in groups:
    the first cold expert of (6) comes with the first group, and (7) needs the last cold one early
    enough to be computed (and the batches combined) before the layer ends, although it shares the
    drive with the next layer's prefetches.
    """
    n, e = shape.batches, io.expert
    worst: dict[int, Deadline] = {}
    attention = n * shape.attention_s
    gated = attention + n * shape.gate_s + shape.gather_s
    routed = attention + shape.gate_s  # the first gate is done: cold experts are known
    combine = n * shape.combine_s
    share = min(io.attn + io.gate + hot * e, (io.parallel - 1) * e)
    for layer, w in enumerate(work):
        first = min(float(io.parallel), max(w.cold, 1.0)) if w.cold > 0 else 0.0
        end = max(io.attn, share + w.cold_s / w.cold + combine if w.cold > 0 and e > 0 else 0.0)
        rows = [
            (4, attention, io.gate, 0.0, 0.0),
            (5, gated, io.gate, float(hot), 0.0),
            (6, gated + w.hot_s, io.gate, hot + first, first) if w.cold > 0 else (6, gated, 0.0, 0.0, 0.0),
            (7, gated + w.hot_s + w.cold_s + combine, io.gate + end, hot + w.cold, w.cold),
        ]
        for number, compute, fixed, experts, cold in rows:
            # the later of the loads queued behind the hot ones and those that await the first gate
            io_s = max(fixed + experts * e, routed + fixed - io.gate + cold * e if cold > 0 else 0.0)
            deadline = Deadline(number, MEANINGS[number], compute, io_s, layer)
            if number not in worst or deadline.slack_s < worst[number].slack_s:
                worst[number] = deadline
    return tuple(worst[number] for number in sorted(worst))


def speedup_to_meet(shape: StepShape, hot: int, work: tuple[LayerWork, ...], io: Io) -> float:
    """How many times faster every transfer must be for (4)-(7) to hold (inf beyond a million)."""
    names = ("attn", "gate", "expert", "embed", "head")

    def met(factor: float) -> bool:
        faster = dataclasses.replace(io, **{name: getattr(io, name) / factor for name in names})
        return all(d.slack_s >= -SLACK_TOLERANCE_S for d in deadlines(shape, hot, work, faster))

    return least_factor(met)


def least_factor(met: Callable[[float], bool]) -> float:
    """The least factor >= 1 for which ``met`` holds (``met`` monotone), inf beyond a million."""
    low, high = 1.0, 2.0
    while not met(high):
        low, high = high, high * 2
        if high > MAX_SPEEDUP:
            return math.inf
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        low, high = (low, middle) if met(middle) else (middle, high)
    return high


@dataclass(frozen=True)
class StepPrediction:
    """One predicted step: its time split into compute and the two kinds of bubble."""

    tokens: int  # tokens the step produces (decode) or reads (prefill)
    step_s: float
    compute_s: float
    inter_layer_s: float
    intra_layer_s: float
    io_busy_s: float  # time the I/O channel was busy

    @property
    def bubble_s(self) -> float:
        return self.inter_layer_s + self.intra_layer_s

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s if self.step_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bubble_s": self.bubble_s, "tokens_per_s": self.tokens_per_s}


@dataclass
class _Run:
    """The recurrence's state: the compute clock, the I/O channel, and what each was doing."""

    t: float = 0.0
    channel: float = 0.0  # when the I/O channel is free
    busy: float = 0.0
    compute: float = 0.0
    inter: float = 0.0
    intra: float = 0.0

    def load(self, seconds: float, issued: float) -> float:
        """Queue ``seconds`` of transfers issued at ``issued``; when they are done."""
        self.channel = max(self.channel, issued) + seconds
        self.busy += seconds
        return self.channel

    def wait(self, ready: float, intra: bool = False) -> None:
        gap = max(0.0, ready - self.t)
        self.t += gap
        if intra:
            self.intra += gap
        else:
            self.inter += gap

    def run(self, seconds: float) -> None:
        self.t += seconds
        self.compute += seconds

    def drain(
        self,
        base: float,
        count: float,
        per_io: float,
        total_s: float,
        *,
        intra: bool,
        parallel: int,
        tail: float,
    ) -> None:
        """Compute ``count`` experts (``total_s`` in all) as they arrive: loads issued from ``base``, each
        ``per_io`` apart; ``parallel`` of them share the link, so the first ones arrive together and
        the last ones share it with ``tail`` seconds of loads queued after them."""
        if total_s <= 0:
            return
        first = base + min(float(parallel), max(count, 1.0)) * per_io
        last = base + count * per_io + (min(tail, (parallel - 1) * per_io) if parallel > 1 else 0.0)
        if count <= 1:
            self.wait(max(first, last), intra)
        else:
            self.wait(max(self.t, first, last + total_s / count - total_s), intra)
        self.run(total_s)


def predict_step(
    shape: StepShape, hot: int, work: tuple[LayerWork, ...], io: Io, window: int
) -> StepPrediction:
    """The steady step time (see the module docstring); ``window``: experts the device holds at once."""
    run = _Run()
    ready = (run.load(io.embed, 0.0), run.load(io.attn, 0.0))
    before = (0.0, 0.0, 0.0, 0.0, 0.0)
    for _ in range(STEADY_STEPS):
        before = (run.t, run.compute, run.inter, run.intra, run.busy)
        ready = _step(run, shape, hot, work, io, window, ready)
    after = (run.t, run.compute, run.inter, run.intra, run.busy)
    step, compute, inter, intra, busy = (now - then for now, then in zip(after, before, strict=True))
    return StepPrediction(shape.tokens, step, compute, inter, intra, busy)


def _step(run: _Run, shape: StepShape, hot: int, work: tuple[LayerWork, ...], io: Io, window: int,
          ready: tuple[float, float]) -> tuple[float, float]:  # fmt: skip
    n = shape.batches
    embed_ready, attn_ready = ready
    run.wait(embed_ready)
    run.run(n * shape.embed_s)
    gate_ready = hot_base = head_ready = 0.0
    for layer, w in enumerate(work):
        run.wait(attn_ready)
        if layer == 0:  # nothing predicted layer 0 during the previous layer
            gate_ready = hot_base = run.load(io.gate, run.t)
            run.load(hot * io.expert, run.t)
        run.run(n * shape.attention_s)
        run.wait(gate_ready)
        first_gate = run.t + shape.gate_s
        run.run(n * shape.gate_s + shape.gather_s)
        slots = max(1, window - hot)
        per_cold = io.expert
        if w.cold > slots:  # loads wait for releases: each slot cycles load + compute
            per_cold = max(io.expert, (io.expert + w.cold_s / w.cold) / slots)
        cold_base = max(run.channel, first_gate)
        run.load(w.cold * per_cold, first_gate)
        queued = run.channel
        if layer + 1 < len(work):
            attn_ready, gate_ready = run.load(io.attn, run.t), run.load(io.gate, run.t)
            next_hot = gate_ready
            run.load(hot * io.expert, run.t)
        else:
            head_ready = run.load(io.head, run.t)
            ready = (run.load(io.embed, run.t), run.load(io.attn, run.t))
        tail = run.channel - queued  # the next layer's loads, sharing the drive with the last cold ones
        run.drain(hot_base, hot, io.expert, w.hot_s, intra=False, parallel=io.parallel, tail=0.0)
        run.drain(cold_base, w.cold, per_cold, w.cold_s, intra=True, parallel=io.parallel, tail=tail)
        run.run(n * shape.combine_s)
        hot_base = next_hot if layer + 1 < len(work) else 0.0
    run.wait(head_ready)
    run.run(n * shape.head_s)
    return ready


def placement_for(
    cost: CostModel,
    fixed: int,
    device_budget: int,
    host_budget: int,
    preload: bool | None,
    ratio: float | None,
) -> Placement:
    """The engine's placement for these budgets (see the module docstring)."""
    sizes = cost.sizes
    resident = fixed + sizes.total <= device_budget
    if preload and host_budget < sizes.total:
        raise BudgetError(
            f"host preload needs the whole model in host memory ({format_size(sizes.total)}) but the host "
            f"budget is {format_size(host_budget)}; raise the host memory or turn preload off"
        )
    home = "host" if preload or (preload is None and host_budget >= sizes.total) else "disk"
    compressed = False
    if home == "disk" and ratio:
        plain, packed = cost.transfer(sizes.expert, "disk"), cost.transfer(sizes.expert, "disk", ratio)
        compressed = packed.bottleneck_s < plain.bottleneck_s
    window = host_budget // sizes.layer if home == "disk" else sizes.num_layers
    return Placement(resident, home, home == "host", min(window, sizes.num_layers), compressed)


def io_times(
    cost: CostModel,
    placement: Placement,
    ratio: float | None,
    *,
    steady: bool,
    misses: tuple[float, float] = (1, 1),
) -> Io:
    """Expected transfer time per block: none once every weight is resident (``steady``), else its
    time from the placement's home times the chance that it must be loaded (``misses``: of the blocks
    every step uses, and of the experts; see :func:`lru_misses`)."""
    if steady and placement.device_resident:
        return Io(0.0, 0.0, 0.0, 0.0, 0.0)
    sizes, home = cost.sizes, placement.home
    ratio = ratio if placement.compressed else None
    always, experts = misses

    def seconds(nbytes: int, miss: float = always) -> float:
        return cost.transfer(nbytes, home, ratio).bottleneck_s * miss

    return Io(
        attn=seconds(sizes.attn),
        gate=seconds(sizes.gate),
        expert=seconds(sizes.expert, experts),
        embed=seconds(sizes.embed),
        head=seconds(sizes.head),
        parallel=_blocks_at_once(cost, ratio) if home == "disk" else 1,
    )


def lru_misses(cost: CostModel, loads: tuple[LayerLoads, ...], capacity: int) -> tuple[float, float]:
    """The chance that a block a step uses is not resident from earlier steps: for the blocks every
    step uses, and for the experts (weighted by use). Steps route independently; with LRU a block
    survives j* steps where j* steps touch ``capacity`` bytes (Che's approximation); one step touches
    its blocks in layer order, so with less room than one step touches, nothing survives."""
    sizes = cost.sizes
    usage = np.stack([load.usage for load in loads])  # [L, E]
    always = sizes.embed + sizes.head + sizes.num_layers * (sizes.attn + sizes.gate)

    def touched(steps: float) -> float:
        return always + sizes.expert * float((1.0 - (1.0 - usage) ** steps).sum())

    if capacity < touched(1.0):
        return 1.0, 1.0
    if capacity >= always + sizes.expert * float((usage > 0).sum()):
        return 0.0, 0.0
    low, high = 1.0, 2.0
    while touched(high) < capacity:
        low, high = high, 2 * high
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if touched(middle) < capacity else (low, middle)
    return 0.0, float((usage * (1.0 - usage) ** low).sum() / max(float(usage.sum()), 1e-300))


def _blocks_at_once(cost: CostModel, ratio: float | None) -> int:
    """Experts read at once: the disk pool's threads take one chunk of at most DEFAULT_CHUNK_BYTES each."""
    chunks = math.ceil(cost.sizes.expert / (ratio or 1.0) / DEFAULT_CHUNK_BYTES)
    return max(1, math.ceil(cost.machine.io_threads / chunks))


def weights_working_set(cost: CostModel, placement: Placement, hot: int, work: tuple[LayerWork, ...]) -> int:
    """Device bytes of weights the plan needs at once: all of them when resident, else one layer's used
    experts (leased until computed) plus the next layer's attention, gate and K hot experts."""
    sizes = cost.sizes
    if placement.device_resident:
        return sizes.total
    used = max((w.distinct_max for w in work), default=0)
    return sizes.attn + sizes.gate + (hot + used) * sizes.expert


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
    max_batches: int = 64

    def __post_init__(self) -> None:
        counts = (self.sequences, self.prompt_tokens, self.new_tokens, self.max_batches)
        if min(counts) < 1 or min(self.batches or 1, self.batch_size or 1) < 1:
            raise ConfigError("plan: sequences, prompt and new tokens, batches and batch size must be >= 1")
        if self.hot_experts is not None and not 0 <= self.hot_experts <= self.spec.num_experts:
            raise ConfigError(
                f"plan: hot experts K must be in 0..{self.spec.num_experts}, got {self.hot_experts}"
            )
        if self.compression_ratio is not None and self.compression_ratio <= 0:
            raise ConfigError(f"plan: compression ratio must be positive, got {self.compression_ratio}")


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
    sweep: tuple[tuple[int, float, float], ...]  # (n, predicted decode tokens/s, bubble s per step)

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


@dataclass
class _Context:
    request: PlanRequest
    cost: CostModel
    routing: RoutingModel
    device_budget: int
    host_budget: int
    tables: dict[int, WorkTable] = field(default_factory=dict)

    def work_table(self, tokens: int) -> WorkTable:
        if tokens not in self.tables:
            self.tables[tokens] = WorkTable.of(self.routing.loads(tokens), self.cost)
        return self.tables[tokens]


def make_plan(request: PlanRequest) -> Plan:
    """The plan for ``request``; :class:`BudgetError` when no plan can run within its budgets."""
    ctx = _context(request)
    sizes = [request.batch_size] if request.batch_size else _batch_sizes(request.sequences)
    _check_minimum(ctx, min(sizes))
    chosen: list[tuple[Candidate, list[Candidate]]] = []
    for bs in sizes:
        tried = [c for n in _batch_counts(request, bs) for c in _candidates(ctx, n, bs)]
        if tried:
            chosen.append((_choose(tried), tried))
    best, tried = max(
        chosen, key=lambda pair: (pair[0].fits, pair[0].decode.tokens_per_s, -pair[0].batch_size)
    )
    logger.info("plan: n=%d bs=%d K=%d", best.batches, best.batch_size, best.hot_experts)
    return _plan(ctx, best, [c for c in tried if c.batch_size == best.batch_size])


def _context(request: PlanRequest) -> _Context:
    routing = request.routing or RoutingModel.default_for(request.spec)
    routing.check_model(request.spec)
    machine = request.machine
    device = (
        machine.device_memory_bytes if request.device_memory_bytes is None else request.device_memory_bytes
    )
    host = machine.host_memory_bytes if request.host_memory_bytes is None else request.host_memory_bytes
    return _Context(request, CostModel(request.spec, machine), routing, device, host)


def _check_minimum(ctx: _Context, batch_size: int) -> None:
    """The engine's own floor (runtime.minimum_budgets) for the smallest group this request allows."""
    req, sizes = ctx.request, ctx.cost.sizes
    batches = req.batches or 1
    fixed = ctx.cost.fixed_device_bytes(batches, batch_size, req.prompt_tokens, req.new_tokens)
    if ctx.device_budget < fixed + sizes.largest:
        raise BudgetError(
            f"device memory budget {format_size(ctx.device_budget)} is below the minimum working set "
            f"{format_size(fixed + sizes.largest)} (KV cache and activations of {batches} batch(es) of "
            f"{batch_size} + the largest block); raise the device memory or shorten the sequences"
        )
    if ctx.host_budget < sizes.largest:
        raise BudgetError(
            f"host memory budget {format_size(ctx.host_budget)} cannot stage the largest block "
            f"({format_size(sizes.largest)}); raise the host memory"
        )


def _batch_sizes(sequences: int) -> list[int]:
    sizes = [1 << i for i in range(int(math.log2(MAX_BATCH_SIZE)) + 1) if 1 << i < sequences]
    return [*sizes, min(sequences, MAX_BATCH_SIZE)]


def _batch_counts(request: PlanRequest, batch_size: int) -> range:
    if request.batches is not None:
        return range(request.batches, request.batches + 1)
    return range(1, min(request.max_batches, math.ceil(request.sequences / batch_size)) + 1)


def _hot_counts(ctx: _Context) -> list[int]:
    spec = ctx.request.spec
    if ctx.request.hot_experts is not None:
        return [ctx.request.hot_experts]
    most = min(spec.num_experts, 2 * spec.top_k)
    if most <= FINE_HOT_EXPERTS:
        return list(range(most + 1))
    return sorted({round(most * step / COARSE_HOT_STEPS) for step in range(COARSE_HOT_STEPS + 1)})


def _candidates(ctx: _Context, n: int, bs: int) -> list[Candidate]:
    """Every K at (n, bs); none when even the engine's floor does not fit this group."""
    req, cost = ctx.request, ctx.cost
    fixed = cost.fixed_device_bytes(n, bs, req.prompt_tokens, req.new_tokens)
    if fixed + cost.sizes.largest > ctx.device_budget:
        return []
    placement = placement_for(
        cost, fixed, ctx.device_budget, ctx.host_budget, req.host_preload, req.compression_ratio
    )
    shape = StepShape.decode(cost, n, bs, req.prompt_tokens + req.new_tokens // 2)
    loads = ctx.routing.loads(shape.tokens)
    in_use = (
        cost.sizes.attn
        + cost.sizes.gate
        + (req.spec.top_k + max(load.distinct_max() for load in loads)) * cost.sizes.expert
    )
    misses = lru_misses(cost, loads, ctx.device_budget - fixed - in_use)  # a layer's blocks are always held
    placement = dataclasses.replace(placement, expert_reuse=1.0 - misses[1])
    io = io_times(cost, placement, req.compression_ratio, steady=True, misses=misses)
    return [_candidate(ctx, shape, k, placement, io, fixed) for k in _hot_counts(ctx)]


def _candidate(
    ctx: _Context, shape: StepShape, hot: int, placement: Placement, io: Io, fixed: int
) -> Candidate:
    cost, req = ctx.cost, ctx.request
    work = ctx.work_table(shape.tokens).work(hot)
    weights = weights_working_set(cost, placement, hot, work)
    window = (ctx.device_budget - fixed) // cost.sizes.expert
    decode = predict_step(shape, hot, work, io, window)
    kv = shape.batches * cost.kv_cache_bytes(shape.batch_size, req.prompt_tokens, req.new_tokens)
    total = cost.sizes.total
    parts = {"KV cache": kv, "activations": fixed - kv, "weights": weights}
    device = TierUse(
        "device", fixed + weights, min(fixed + total, ctx.device_budget), ctx.device_budget, parts
    )
    # from the drive, the host holds each block from its read until its copy: io_threads reads and a copy
    staging = total if placement.home == "host" else (cost.machine.io_threads + 1) * cost.sizes.largest
    host = TierUse("host", staging, min(total, ctx.host_budget), ctx.host_budget, {"weights": staging})
    found = deadlines(shape, hot, work, io)
    return Candidate(
        shape.batches, shape.batch_size, hot, placement, found, decode, device, host, shape, work, io
    )


def _choose(tried: list[Candidate]) -> Candidate:
    """Smallest feasible n (best K there); else least bubble per token among those that fit; else best."""
    feasible = [c for c in tried if c.fits and c.meets_deadlines]
    if feasible:
        n = min(c.batches for c in feasible)
        return max((c for c in feasible if c.batches == n), key=lambda c: c.decode.tokens_per_s)
    fitting = [c for c in tried if c.fits] or tried
    return min(
        fitting, key=lambda c: (c.decode.bubble_s / c.decode.tokens, -c.decode.tokens_per_s, c.batches)
    )


def _plan(ctx: _Context, best: Candidate, tried: list[Candidate]) -> Plan:
    req, cost = ctx.request, ctx.cost
    shape = StepShape.prefill(cost, best.batches, best.batch_size, req.prompt_tokens)
    work = ctx.work_table(shape.tokens).work(best.hot_experts)
    fixed = best.device.parts["KV cache"] + best.device.parts["activations"]
    io = io_times(cost, best.placement, req.compression_ratio, steady=False)
    prefill = predict_step(
        shape, best.hot_experts, work, io, (ctx.device_budget - fixed) // cost.sizes.expert
    )
    same_k = [c for c in tried if c.hot_experts == best.hot_experts]
    cap = max((c.batches for c in same_k if c.fits), default=best.batches)
    sweep = tuple((c.batches, c.decode.tokens_per_s, c.decode.bubble_s) for c in same_k)
    feasible = best.fits and best.meets_deadlines
    return Plan(
        batches=best.batches,
        batch_size=best.batch_size,
        hot_experts=best.hot_experts,
        placement=best.placement,
        deadlines=best.deadlines,
        binding=best.binding,
        feasible=feasible,
        decode=best.decode,
        prefill=prefill,
        memory=(best.device, best.host),
        memory_cap_batches=cap,
        why=_why(ctx, best, cap, feasible),
        advice=tuple(_advice(ctx, best, cap, feasible)),
        sweep=sweep,
    )


def _why(ctx: _Context, best: Candidate, cap: int, feasible: bool) -> str:
    n, binding = best.batches, best.binding
    if best.placement.device_resident and feasible:
        return f"every weight fits in device memory, so nothing moves after the first step: n={n} is enough"
    if feasible:
        return (
            f"n={n} is the smallest number of batches whose loads hide behind compute in every layer; the "
            f"tightest deadline is ({binding.number}) {binding.meaning}, "
            f"with {binding.slack_s * 1e3:.2f} ms to spare"
        )
    req = ctx.request
    top = _batch_counts(req, best.batch_size).stop - 1
    limit = f"device memory holds the KV cache of at most n={cap}"
    if cap >= top:
        limit = f"{req.sequences} sequences in batches of {best.batch_size} allow n <= {top}"
    return (
        f"no n hides every load ({limit}): deadline ({binding.number}), {binding.meaning}, is missed by "
        f"{-binding.slack_s * 1e3:.2f} ms in layer {binding.layer}; n={n} has the least bubble time per token"
    )


def _advice(ctx: _Context, best: Candidate, cap: int, feasible: bool) -> list[str]:
    """Plain-words changes that would relax the binding deadline."""
    if feasible:
        return []
    advice: list[str] = []
    cost, req, placement = ctx.cost, ctx.request, best.placement
    link = _binding_link(cost, placement, req.compression_ratio)
    link_field = {"drive": "disk_read_gbps", "host-to-device link": "host_to_device_gbps"}.get(link)
    if link_field is not None:
        gbps = getattr(cost.machine, link_field)
        factor = _link_speedup(ctx, best, link_field)
        if math.isfinite(factor):
            advice.append(
                f"a faster {link}: at {gbps * factor:.2f} GB/s instead of {gbps:.2f} every deadline would "
                f"be met with n={best.batches}"
            )
        else:
            advice.append(
                f"a faster {link} alone is not enough: even without its {gbps:.2f} GB/s limit, the other "
                "stages (host-to-device copies, decompression) or the compute of n batches miss a deadline"
            )
    if cap == best.batches and req.batches is None and cap < _batch_counts(req, best.batch_size).stop - 1:
        extra = cost.fixed_device_bytes(1, best.batch_size, req.prompt_tokens, req.new_tokens)
        advice.append(
            f"more device memory: each further batch of {best.batch_size} needs {format_size(extra)} of KV "
            "cache and activations, and more batches share every load"
        )
    if cap >= _batch_counts(req, best.batch_size).stop - 1 and req.batches is None:
        advice.append(
            f"more sequences at once: {req.sequences} in batches of {best.batch_size} make at most "
            f"{best.batches} batches; more batches would share every load"
        )
    if placement.home == "disk":
        missing = format_size(max(cost.sizes.total - ctx.host_budget, 0))
        advice.append(
            f"more host memory: {missing} more holds the whole model in RAM (host.preload), so experts "
            "come over the host link instead of from the drive"
        )
    if placement.home == "disk" and not placement.compressed and link == "drive":
        ratio = req.compression_ratio or TYPICAL_ZSTD_RATIO
        advice.append(
            f"compression: a zstd store (`klotski-tier pack --compress zstd`, ratio ~{ratio:.2f}) reads "
            f"{1 / ratio:.0%} of the bytes from the drive, if the disk threads decode fast enough"
        )
    return advice


def _binding_link(cost: CostModel, placement: Placement, ratio: float | None) -> str:
    """The slowest stage experts pass on their way to the device."""
    expert = cost.transfer(cost.sizes.expert, placement.home, ratio if placement.compressed else None)
    if expert.copy_s >= max(expert.disk_s, expert.decode_s / expert.io_threads):
        return "host-to-device link"
    return "drive" if expert.disk_s >= expert.decode_s / expert.io_threads else "decompression"


def _link_speedup(ctx: _Context, best: Candidate, link_field: str) -> float:
    """How many times faster the machine's ``link_field`` link must be for every deadline of ``best``."""
    req, machine = ctx.request, ctx.cost.machine

    def met(factor: float) -> bool:
        faster = dataclasses.replace(machine, **{link_field: getattr(machine, link_field) * factor})
        io = io_times(CostModel(req.spec, faster), best.placement, req.compression_ratio, steady=True)
        return all(
            d.slack_s >= -SLACK_TOLERANCE_S for d in deadlines(best.shape, best.hot_experts, best.work, io)
        )

    return least_factor(met)
