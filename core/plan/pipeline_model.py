"""The step model of the planner: deadlines (4)-(7) and the step recurrence.

Per layer of a decode step, with per-batch attention time tA (with the KV cache away from the device,
the larger of it and the batch's KV copy time, the copies of batch k+1 running while batch k computes
and queued on the weights' channel where they share it; or with attention on the host's cores, the
larger of the device's projections and the host's attention), routing time tG (plus one gather of
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

Transfer times per block (:class:`Io`) come from :mod:`klotski_tier.core.plan.placement_model`, which
places the blocks as the engine does.

Predicted times come from a recurrence over the layers of two steps (the second is reported) in
the engine's order: one I/O channel carries, per layer, the cold experts requested after the first
gate, then the next layer's attention, gate and K hot experts requested at the end of the gate
phase; the compute waits for each (inter-layer bubbles) and drains experts as they arrive
(intra-layer bubbles). When the device holds fewer experts at once than a layer needs, cold loads
wait for releases. :mod:`klotski_tier.core.plan.planner` searches n, bs and K over this model.

I/O contention: on a machine whose compute slows while the drive streams (``io_compute_slowdown`` c
of :class:`klotski_tier.core.plan.machine.Machine`, carried by :class:`StepShape`), compute progresses at
1/(1+c) of its rate while the drive reads, so over a span where the drive reads for D seconds beside
compute, compute takes D*c/(1+c) seconds more. The channel's busy spans are the drive's reading spans
scaled by ``Io.drive_share`` (the share of a transfer's time that the drive reads: 0 for blocks from
host RAM and host-to-device copies), so compute runs at 1 - drive_share*c/(1+c) of its rate while the
channel is busy. With c = 0 or nothing read from the drive the recurrence is unchanged.
:mod:`klotski_tier.core.plan.sim_hardware` charges the same, read by read.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.routing_model import LayerLoads

FloatArray = npt.NDArray[np.float64]

SLACK_TOLERANCE_S = 1e-9  # a deadline met to within rounding is met
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
class Io:
    """Per-block transfer time (its slowest stage) of each kind of block, 0 when resident."""

    attn: float
    gate: float
    expert: float
    embed: float
    head: float
    parallel: int = 1  # loads served at once (disk reads share the drive, so they arrive together)
    # Share of the transfers' time that the drive reads (Transfer.drive_share): 0 from host RAM.
    drive_share: float = 0.0


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
    io_compute_slowdown: float = 0.0  # the machine's: compute runs at 1/(1+c) while the drive reads
    # Per batch, with the KV cache away from the device: its cache of a layer in and its new entries out
    # (attention on the device), or its attention on the host's cores (attention_s is then the device's
    # projections); and of those copies, the seconds that share the weights' I/O channel.
    kv_s: float = 0.0
    kv_channel_s: float = 0.0
    # Of the layers, the share whose cache is away from the device ([kv] device_layers keeps the others'
    # there), and a batch's attention in the others (over its cache in place); None: attention_s.
    kv_share: float = 1.0
    in_place_s: float | None = None

    @property
    def attention_phase_s(self) -> float:
        """A layer's attention over n batches: batch k+1's cache arrives while batch k computes (the
        first batch's during the layer before), so the slower of the two sets the pace."""
        away = max(self.attention_s, self.kv_s)
        if self.kv_share >= 1.0:
            return self.batches * away
        in_place = self.attention_s if self.in_place_s is None else self.in_place_s
        return self.batches * (self.kv_share * away + (1.0 - self.kv_share) * in_place)

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
            io_compute_slowdown=cost.machine.io_compute_slowdown,
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
    attention = shape.attention_phase_s
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
    lost: float = 0.0  # share of compute progress lost while the channel is busy (see the docstring)
    reading: deque[tuple[float, float]] = dataclasses.field(default_factory=deque)  # busy spans ahead

    @classmethod
    def of(cls, shape: StepShape, io: Io) -> _Run:
        slowdown = shape.io_compute_slowdown
        return cls(lost=io.drive_share * slowdown / (1.0 + slowdown))

    def load(self, seconds: float, issued: float) -> float:
        """Queue ``seconds`` of transfers issued at ``issued``; when they are done."""
        start = max(self.channel, issued)
        self.channel = start + seconds
        self.busy += seconds
        if self.lost > 0 and seconds > 0:
            if self.reading and self.reading[-1][1] >= start:  # back to back: one span
                start = self.reading.pop()[0]
            self.reading.append((start, self.channel))
        return self.channel

    def finish(self, seconds: float) -> float:
        """When ``seconds`` of compute started now would end, slowed while the channel is busy."""
        if not self.reading:
            return self.t + seconds
        t, left, rate = self.t, seconds, 1.0 - self.lost
        for start, end in self.reading:
            if end <= t:
                continue
            if left <= start - t:  # done before the span starts
                return t + left
            left -= max(0.0, start - t)
            t = max(t, start)
            if left <= (end - t) * rate:
                return t + left / rate
            left -= (end - t) * rate
            t = end
        return t + left

    def wait(self, ready: float, intra: bool = False) -> None:
        gap = max(0.0, ready - self.t)
        self.t += gap
        if intra:
            self.intra += gap
        else:
            self.inter += gap

    def run(self, seconds: float) -> None:
        if not self.reading:  # nothing read from the drive ahead: compute at its own pace
            self.t += seconds
            self.compute += seconds
            return
        end = self.finish(seconds)
        self.compute += end - self.t
        self.t = end
        while self.reading and self.reading[0][1] <= self.t:
            self.reading.popleft()

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
    run = _Run.of(shape, io)
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
        channel = n * shape.kv_channel_s * shape.kv_share  # averaged over the layers
        kv_ready = run.load(channel, run.t) if channel > 0 else 0.0
        run.run(shape.attention_phase_s)
        run.wait(kv_ready, intra=True)  # the cache's copies queued behind the weights' loads
        run.wait(gate_ready)
        first_gate = run.finish(shape.gate_s)
        slots = max(1, window - hot)
        per_cold = io.expert
        if w.cold > slots:  # loads wait for releases: each slot cycles load + compute
            per_cold = max(io.expert, (io.expert + w.cold_s / w.cold) / slots)
        cold_base = max(run.channel, first_gate)
        run.load(w.cold * per_cold, first_gate)  # queued first: they read during the gate phase
        queued = run.channel
        run.run(n * shape.gate_s + shape.gather_s)
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
