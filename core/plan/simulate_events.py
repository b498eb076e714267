"""The simulator's event core: the residency manager, the tier drivers and the pipeline in simulated time.

It replays :class:`klotski_tier.core.runtime.pipeline.Pipeline`'s order with simulated time instead of
compute and I/O: per layer the attention phase (n batches; the gate and K predicted hot experts
of layer 0 wanted once its attention weights are acquired), the gate phase (after each batch's
gate, every expert it selected that is not requested yet is requested), the next layer's
attention, gate and hot experts wanted once the layer has routed, then the expert phase (a
resident expert with the most tokens first, else the first to arrive; each released after its
computation), a combine per batch. Blocks move as :class:`klotski_tier.core.runtime.residency.Residency`
moves them: a device load leases the block's host copy (reading it from the drive first: its
chunks of at most ``read_chunk_bytes`` queue in the disk pool, ``io_threads`` of them at a time
sharing the drive's bandwidth; a compressed block is decoded in the thread of its last chunk), then
copies it on the single copy channel. Demand loads wait for
room (evicting unleased resident blocks in the order of the engine's eviction policy: the same
policy object, ``SimConfig.eviction``, told of every landing and every lease); a prefetch starts only if room
is there now and no demand load is waiting, else it waits in the wanted queue, pumped after each
release. The hot experts come from the correlation prefetch policy (learning online, as the
engine's default), routes from a :class:`RouteSampler` (a trace, a table or the parametric model).

I/O contention: on a machine whose compute slows while the drive streams (``io_compute_slowdown``
c of its :class:`Machine`), a compute job progresses at 1/(1+c) of its rate while any read of the
disk pool is in progress, and at its full rate otherwise (decoding, copies, host-resident blocks
do not count), so a job beside D seconds of drive reading takes D*c/(1+c) seconds more. The I/O
events of the job's span are run as it goes to know when the drive reads. With c = 0 a job takes
its time and nothing else changes. :mod:`klotski_tier.core.plan.pipeline_model` charges the same.

Its public names are re-exported by :mod:`klotski_tier.core.plan.simulate`, which drives it.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klotski_tier.core.model.blocks import (
    BlockId,
    attn_block,
    embed_block,
    expert_block,
    gate_block,
    head_block,
)
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.routing_model import HotPredictor, IntArray, RouteSampler
from klotski_tier.core.runtime.config import EngineOptions
from klotski_tier.core.units import GB
from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.policies.registry import make_eviction
from klotski_tier.tiers.disk_defaults import DEFAULT_CHUNK_BYTES

DEFAULT_EVICTION = EngineOptions.eviction  # the engine's default policy

logger = logging.getLogger(__name__)

DISK_TO_HOST = "disk->host"
HOST_TO_DEVICE = "host->device"
READ_DONE_BYTES = 1.0  # a read with less left is done (float rounding of shared-bandwidth progress)


@dataclass(frozen=True)
class SimConfig:
    """What to simulate: model, machine, group shape, budgets, routing."""

    spec: ModelSpec
    machine: Machine
    batches: int
    batch_size: int
    hot_experts: int | None = None  # K; None: the router's top-k, as the engine
    device_memory_bytes: int | None = None  # None: the machine's device memory
    host_memory_bytes: int | None = None  # None: the machine's host memory
    host_preload: bool = False  # every block in host RAM before the first step
    compression_ratio: float | None = None  # blocks read from a compressed store of this ratio
    routing: RouteSampler | None = None  # None: the parametric model with the demo's figures
    seed: int = 0
    read_chunk_bytes: int = DEFAULT_CHUNK_BYTES  # the disk tier reads a block in chunks of at most this
    eviction: str = DEFAULT_EVICTION  # the device tier's eviction policy (a name in the registry)


@dataclass
class StepStats:
    """One simulated step (or a sum of steps)."""

    tokens: int = 0
    step_s: float = 0.0
    compute_s: float = 0.0
    inter_layer_s: float = 0.0
    intra_layer_s: float = 0.0
    bytes_moved: dict[str, int] = field(default_factory=lambda: {DISK_TO_HOST: 0, HOST_TO_DEVICE: 0})
    peak_device_bytes: int = 0
    peak_host_bytes: int = 0

    def add(self, other: StepStats, times: float = 1.0) -> None:
        """Add ``times`` steps like ``other``."""
        self.tokens += round(other.tokens * times)
        for name in ("step_s", "compute_s", "inter_layer_s", "intra_layer_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name) * times)
        for pair, nbytes in other.bytes_moved.items():
            self.bytes_moved[pair] += round(nbytes * times)
        self.peak_device_bytes = max(self.peak_device_bytes, other.peak_device_bytes)
        self.peak_host_bytes = max(self.peak_host_bytes, other.peak_host_bytes)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s if self.step_s > 0 else 0.0


@dataclass(eq=False)
class _Entry:
    block: BlockId
    nbytes: int
    ready_s: float | None = None  # None while in flight
    leases: int = 0
    waiters: list[_Entry] = field(default_factory=list)  # device loads waiting for this host copy
    chunks_left: int = 0  # reads of this block still running or queued in the disk pool


class _Ledger:
    """One memory tier: entries, byte budget, the eviction policy's order of resident blocks (the
    engine's own policy object), demand loads waiting for room."""

    def __init__(self, capacity: int, fixed: int, eviction: str = DEFAULT_EVICTION) -> None:
        self.capacity, self.used, self.peak = capacity - fixed, 0, 0
        self.fixed = fixed
        self.entries: dict[BlockId, _Entry] = {}
        self.eviction: EvictionPolicy[BlockId] = make_eviction(eviction)
        self.waiting: deque[_Entry] = deque()

    def make_room(self, nbytes: int) -> bool:
        room, victims = self.capacity - self.used, []
        for block in self.eviction.victims():
            if room >= nbytes:
                break
            if self.entries[block].leases == 0:
                victims.append(block)
                room += self.entries[block].nbytes
        if room < nbytes:
            return False
        for block in victims:
            self.used -= self.entries.pop(block).nbytes
            self.eviction.on_remove(block)
        return True

    def resident(self, block: BlockId, nbytes: int) -> None:
        self.eviction.on_insert(block, nbytes)

    def use(self, block: BlockId) -> None:
        """A lease of ``block`` (a use, as the engine counts each lease) if it is resident."""
        if block in self.eviction:
            self.eviction.on_access(block)

    def take(self, nbytes: int) -> None:
        self.used += nbytes
        self.peak = max(self.peak, self.used + self.fixed)


class EventSimulator:
    """The residency manager, the tier drivers and the pipeline of one run, in simulated time."""

    def __init__(self, config: SimConfig, cost: CostModel, fixed_bytes: int) -> None:
        self.config, self.cost, self.spec = config, cost, config.spec
        machine = config.machine
        self.hot = self.spec.top_k if config.hot_experts is None else config.hot_experts
        device = (
            machine.device_memory_bytes if config.device_memory_bytes is None else config.device_memory_bytes
        )
        host = machine.host_memory_bytes if config.host_memory_bytes is None else config.host_memory_bytes
        self.device, self.host = _Ledger(device, fixed_bytes, config.eviction), _Ledger(host, 0)
        # as the engine (runtime.reads_into_device): a CPU device with no host budget reads into its buffers
        self.into_device = machine.device == "cpu" and host == 0
        self.t = 0.0  # the compute clock; I/O has advanced to self.io_t <= self.t
        self.io_t = 0.0
        self.reads: list[list[Any]] = []  # [remaining bytes, decode_s, entry] reading, sharing the drive
        self.decoding: list[tuple[float, int, _Entry]] = []  # heap of (done at, tie, entry)
        self.disk_queue: deque[tuple[float, float, _Entry]] = deque()  # (bytes to read, decode_s, entry)
        self.copy_queue: deque[_Entry] = deque()
        self.copying: tuple[float, _Entry] | None = None
        self.wanted: list[BlockId] = []
        self.stats = StepStats()
        self.predictor = HotPredictor(self.spec.num_layers, self.spec.num_experts)
        self.predicted: dict[int, set[int]] = {}
        self._tie = 0
        self._granting = False
        if config.host_preload:
            for block, nbytes in all_blocks(cost):
                self.host.entries[block] = _Entry(block, nbytes, ready_s=0.0)
                self.host.resident(block, nbytes)
                self.host.take(nbytes)

    # ---- I/O: the disk pool, the copy channel, in simulated time -----------------------------

    def _next_io_event(self) -> float:
        times = [self.decoding[0][0]] if self.decoding else []
        if self.reads:
            rate = self.config.machine.disk_read_gbps * GB / len(self.reads)
            times.append(self.io_t + min(r[0] for r in self.reads) / rate)
        if self.copying:
            times.append(self.copying[0])
        return min(times, default=math.inf)

    def _advance(self, until: float) -> None:
        """Run the I/O events up to ``until``."""
        while (event := self._next_io_event()) <= until:
            self._progress_reads(event)
            self._complete(event)
        self._progress_reads(until)

    def _progress_reads(self, now: float) -> None:
        if self.reads and now > self.io_t:
            done = (now - self.io_t) * self.config.machine.disk_read_gbps * GB / len(self.reads)
            for read in self.reads:
                read[0] -= done
        self.io_t = max(self.io_t, now)

    def _complete(self, now: float) -> None:
        for read in [r for r in self.reads if r[0] <= READ_DONE_BYTES]:
            self.reads.remove(read)
            self._tie += 1
            heapq.heappush(self.decoding, (now + read[1], self._tie, read[2]))
        while self.decoding and self.decoding[0][0] <= now:
            entry = heapq.heappop(self.decoding)[2]
            entry.chunks_left -= 1
            if entry.chunks_left == 0:
                self._read_done(entry, now)
        if self.copying and self.copying[0] <= now:
            self._device_ready(self.copying[1], now)
        self._start_io(now)

    def _start_io(self, now: float) -> None:
        while self.disk_queue and len(self.reads) + len(self.decoding) < self.config.machine.io_threads:
            nbytes, decode_s, entry = self.disk_queue.popleft()
            self.reads.append([nbytes, decode_s, entry])
        if self.copying is None and self.copy_queue:
            entry = self.copy_queue.popleft()
            self.copying = (now + self.config.machine.host_to_device_seconds(entry.nbytes), entry)

    def _read_done(self, entry: _Entry, now: float) -> None:
        if self.into_device:
            self.stats.bytes_moved[DISK_TO_HOST] += entry.nbytes
            self._landed(entry, now)
        else:
            self._host_ready(entry, now)

    def _host_ready(self, entry: _Entry, now: float) -> None:
        entry.ready_s = now
        self.host.resident(entry.block, entry.nbytes)
        self.stats.bytes_moved[DISK_TO_HOST] += entry.nbytes
        self.copy_queue.extend(entry.waiters)
        entry.waiters.clear()

    def _device_ready(self, entry: _Entry, now: float) -> None:
        self.copying = None
        self.stats.bytes_moved[HOST_TO_DEVICE] += entry.nbytes
        self.host.entries[entry.block].leases -= 1
        self._landed(entry, now)

    def _landed(self, entry: _Entry, now: float) -> None:
        """``entry`` is resident in device memory."""
        entry.ready_s = now
        self.device.resident(entry.block, entry.nbytes)
        if entry.leases:  # a demand load: used as soon as it lands
            self.device.use(entry.block)
        self._grant()

    # ---- residency: requests, prefetches, releases -------------------------------------------

    def request(self, block: BlockId) -> _Entry:
        """A demand load: leased now, loaded once there is room."""
        self._advance(self.t)
        entry = self.device.entries.get(block)
        if entry is None:
            entry = self.device.entries[block] = _Entry(block, self.cost_bytes(block))
            self.device.waiting.append(entry)
            self._grant()
        else:
            self.device.use(block)
        entry.leases += 1
        return entry

    def prefetch(self, block: BlockId) -> bool:
        self._advance(self.t)
        if block in self.device.entries:
            return True
        nbytes = self.cost_bytes(block)
        if self.device.waiting or not self.device.make_room(nbytes):
            return False
        self.device.take(nbytes)
        self._load_device(self.device.entries.setdefault(block, _Entry(block, nbytes)))
        return True

    def release(self, entry: _Entry) -> None:
        self._advance(self.t)
        entry.leases -= 1
        self._grant()
        self._pump()

    def _grant(self) -> None:
        """Demand loads waiting for room, in order, take it as soon as it is there (both tiers)."""
        if self._granting:  # called again from a load it started: the running pass goes on
            return
        self._granting = True
        while any(self._grant_one(ledger, start) for ledger, start in self._starts()):
            pass
        self._granting = False

    def _starts(self) -> list[tuple[_Ledger, Callable[[_Entry], None]]]:
        return [(self.host, self._read_host), (self.device, self._load_device)]

    @staticmethod
    def _grant_one(ledger: _Ledger, start: Callable[[_Entry], None]) -> bool:
        """The first waiting load that fits (evicting for it only) gets its room and starts."""
        for entry in ledger.waiting:
            if ledger.make_room(entry.nbytes):
                ledger.waiting.remove(entry)
                ledger.take(entry.nbytes)
                start(entry)
                return True
        return False

    def _load_device(self, entry: _Entry) -> None:
        if self.into_device:  # straight from the drive into the device buffer: no host copy
            self._read_host(entry)
            return
        host = self.host.entries.get(entry.block)
        if host is None:
            host = self.host.entries[entry.block] = _Entry(entry.block, entry.nbytes)
            self.host.waiting.append(host)
        host.leases += 1
        self.host.use(host.block)
        if host.ready_s is None:
            host.waiters.append(entry)
        else:
            self.copy_queue.append(entry)
        self._grant()
        self._start_io(self.io_t)

    def _read_host(self, entry: _Entry) -> None:
        """Queue the block's reads in the disk pool, one per chunk as the disk tier cuts them; a
        compressed block is decoded in the thread of its last chunk."""
        ratio, machine = self.config.compression_ratio, self.config.machine
        stored = entry.nbytes / (ratio or 1.0)
        chunks = max(1, math.ceil(stored / self.config.read_chunk_bytes))
        entry.chunks_left = chunks
        for index in range(chunks):
            last = index == chunks - 1
            decode_s = entry.nbytes / (machine.zstd_decompress_gbps * GB) if ratio and last else 0.0
            self.disk_queue.append((stored / chunks, decode_s, entry))
        self._start_io(self.io_t)

    def cost_bytes(self, block: BlockId) -> int:
        sizes = self.cost.sizes
        return {"embed": sizes.embed, "head": sizes.head, "attn": sizes.attn, "gate": sizes.gate}.get(
            block.kind.value, sizes.expert
        )

    # ---- the pipeline -------------------------------------------------------------------------

    def _want(self, blocks: Sequence[BlockId]) -> None:
        self.wanted.extend(b for b in blocks if b not in self.wanted)
        self._pump()

    def _pump(self) -> None:
        while self.wanted and self.prefetch(self.wanted[0]):
            self.wanted.pop(0)

    def _compute(self, seconds: float) -> None:
        """A job of ``seconds`` alone: slower while the drive reads (see the module docstring)."""
        slowdown = self.config.machine.io_compute_slowdown
        if slowdown <= 0:
            self.t += seconds
            self.stats.compute_s += seconds
            return
        start, left = self.t, seconds
        while left > 0:
            self._advance(self.t)
            rate = 1.0 / (1.0 + slowdown) if self.reads else 1.0
            event = self._next_io_event()
            if self.t + left / rate <= event:
                self.t += left / rate
                break
            left -= (event - self.t) * rate
            self.t = event
        self.stats.compute_s += self.t - start

    def _wait(self, entries: Sequence[_Entry], intra: bool) -> None:
        """Until one of ``entries`` is resident: a bubble."""
        self._advance(self.t)
        while all(e.ready_s is None for e in entries):
            event = self._next_io_event()
            assert event < math.inf, "simulation stalled: a load waits for room no release will make"
            self._advance(event)
        ready = min(e.ready_s for e in entries if e.ready_s is not None)
        gap = max(0.0, ready - self.t)
        self.t += gap
        if intra:
            self.stats.intra_layer_s += gap
        else:
            self.stats.inter_layer_s += gap

    def _acquire(self, block: BlockId) -> _Entry:
        entry = self.request(block)
        self._wait([entry], intra=False)
        return entry

    def step(self, routes: IntArray, sizes: list[int], query_tokens: int, context: int) -> StepStats:
        """One forward step of batches of ``sizes`` sequences; ``routes`` [L, T, k] of all their tokens."""
        self.stats, start = StepStats(tokens=sum(sizes) * query_tokens), self.t
        self.device.peak, self.host.peak = self.device.used + self.device.fixed, self.host.used
        self.predicted.clear()
        self._want([embed_block(), attn_block(0)])
        self._run_phase(embed_block(), [self.cost.embed_s(s * query_tokens) for s in sizes])
        previous: IntArray | None = None
        for layer in range(self.spec.num_layers):
            self._layer(layer, routes, sizes, query_tokens, context, previous)
            previous = routes[layer]
        self._run_phase(head_block(), [self.cost.head_s(s) for s in sizes])
        self._advance(self.t)
        self.stats.step_s = self.t - start
        self.stats.peak_device_bytes, self.stats.peak_host_bytes = self.device.peak, self.host.peak
        return self.stats

    def _run_phase(self, block: BlockId, jobs: list[float]) -> None:
        entry = self._acquire(block)
        for seconds in jobs:
            self._compute(seconds)
        self._advance(self.t)
        self.release(entry)

    def _layer(self, layer: int, routes: IntArray, sizes: list[int], qt: int, context: int,
               previous: IntArray | None) -> None:  # fmt: skip
        self.wanted = [b for b in self.wanted if b.layer < 0 or b.layer >= layer]
        attn = self._acquire(attn_block(layer))
        if previous is None:
            self._want(self._moe_blocks(layer, None))
        for size in sizes:
            self._compute(self.cost.attention_s(size, qt, context))
        self._advance(self.t)
        self.release(attn)
        requests = self._gate_phase(layer, routes[layer], sizes, qt)
        self._want_next(layer, routes[layer])
        self._expert_phase(layer, routes[layer], requests)
        for size in sizes:
            self._compute(self.cost.combine_s(size * qt))
        self.predictor.observe_layer(layer, routes[layer], previous)

    def _moe_blocks(self, layer: int, previous: IntArray | None) -> list[BlockId]:
        hot = self.predictor.predict(layer, self.hot, previous)
        self.predicted[layer] = set(hot)
        return [gate_block(layer), *(expert_block(layer, e) for e in hot)]

    def _want_next(self, layer: int, routes: IntArray) -> None:
        if layer + 1 < self.spec.num_layers:
            self._want([attn_block(layer + 1), *self._moe_blocks(layer + 1, routes)])
        else:
            self._want([head_block(), embed_block(), attn_block(0)])

    def _gate_phase(self, layer: int, routes: IntArray, sizes: list[int], qt: int) -> dict[int, _Entry]:
        gate = self._acquire(gate_block(layer))
        requests: dict[int, _Entry] = {}
        start = 0
        for size in sizes:
            self._compute(self.cost.gate_s(size * qt))
            self._advance(self.t)
            for expert in np.unique(routes[start : start + size * qt]).tolist():
                if expert not in requests:
                    requests[expert] = self.request(expert_block(layer, expert))
            start += size * qt
        self.release(gate)
        return requests

    def _expert_phase(self, layer: int, routes: IntArray, requests: dict[int, _Entry]) -> None:
        counts = np.bincount(routes.ravel(), minlength=self.spec.num_experts)  # [E] tokens per expert
        self._compute(self.cost.gather_s(len(routes)))
        while requests:
            self._advance(self.t)
            ready = [e for e, entry in requests.items() if entry.ready_s is not None]
            if not ready:
                hot = any(e in self.predicted.get(layer, ()) for e in requests)
                self._wait(list(requests.values()), intra=not hot)
                ready = [e for e, entry in requests.items() if entry.ready_s is not None]
            expert = max(ready, key=lambda e: (counts[e], -e))
            self._compute(self.cost.expert_s(float(counts[expert])))
            self._advance(self.t)
            self.release(requests.pop(expert))


def all_blocks(cost: CostModel) -> list[tuple[BlockId, int]]:
    sizes, spec = cost.sizes, cost.spec
    blocks = [(embed_block(), sizes.embed), (head_block(), sizes.head)]
    for layer in range(spec.num_layers):
        blocks += [(attn_block(layer), sizes.attn), (gate_block(layer), sizes.gate)]
        blocks += [(expert_block(layer, e), sizes.expert) for e in range(spec.num_experts)]
    return blocks
