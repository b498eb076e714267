"""The Klotski expert-aware multi-batch pipeline: one forward step of a batch group.

A batch group is ``n`` batches of up to ``bs`` sequences. Every weight block loaded for a
layer serves all ``n`` batches. For each layer ``l`` (ARCHITECTURE.md, section 2)::

    attention phase   acquire attn(l) (prefetched during layer l-1)
                      prefetch gate(l) and the K experts the prefetch policy predicts hot
                      attention(l, batch k) for k in 0..n-1; with the KV cache in host RAM, batch
                      k+1's cache of l arrives while batch k computes, and batch k's new entries
                      go home behind it (runtime/kv.py); with decode attention on the host, the
                      device projects batch k+1 and finishes batch k-1 while batch k attends over
                      its cache in host RAM (runtime/host_attention.py)
    gate phase        route(l, batch k) for each k; right after each gate, request every
                      selected expert that is neither resident nor in flight
                      once every batch has routed: prefetch attn(l+1), gate(l+1) and the hot experts
                      of l+1 (after the last layer: the head and the next step's first blocks);
                      with a look-ahead of L layers, stage layers l+2 .. l+L too (their attention,
                      gate and the experts the policy predicts there): into host RAM, or on a CPU
                      device without a host tier into the device, behind every nearer read
    expert phase      experts over the tokens of all n batches: those already resident first,
                      most tokens first, then the others in the order their loads finish;
                      each expert's lease is released right after its only computation
                      combine per batch; record the routes with the prefetch policy

Baselines (:mod:`~klotski_tier.core.runtime.presets`) change the order, never the tokens. With
``expert_order="index"`` nothing is fetched at the gate; the selected experts run in id order,
each requested when its turn comes (resident or in flight if the prefetch policy brought it).
``schedule="sequential"`` loads nothing ahead, so no read or copy overlaps compute: load attention,
compute; load the gate, route; then the selected experts in id order, in waves of as many as the
device budget holds: load a whole wave, then compute it.

This is the one place these rules live. The pipeline only orders work and awaits readiness
futures; the jobs themselves are a :class:`~klotski_tier.core.runtime.jobs.StepJobs`: the model's
ops in the compute thread for the engine, cost-model time on a virtual clock for the simulator
(:mod:`klotski_tier.core.plan.simulate`). Every await on a block is timed: it is time the compute
waited for I/O, an inter-layer or an intra-layer bubble.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from klotski_tier.core.model.blocks import (
    BlockId,
    BlockLayout,
    attn_block,
    embed_block,
    expert_block,
    gate_block,
    head_block,
)
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.events import JOB, WAIT, WANT, EventLog
from klotski_tier.core.observe.metrics import INTER_LAYER, INTRA_LAYER, RunMetrics
from klotski_tier.core.runtime.config import EXPERT_ORDERS, KLOTSKI, READY_FIRST, SCHEDULES, SEQUENTIAL
from klotski_tier.core.runtime.jobs import BatchT, LogitsT, RouteArray, RoutingT, StepJobs, TokensT
from klotski_tier.core.runtime.ledger import State
from klotski_tier.core.runtime.residency import Lease, Residency
from klotski_tier.policies.prefetch import PrefetchPolicy

if TYPE_CHECKING:
    from klotski_tier.core.observe.routing_trace import RoutingRecorder
    from klotski_tier.core.observe.timeline import Timeline

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Requests = dict[int, asyncio.Future[Lease]]  # expert id -> its lease, once the block is resident


class Pipeline(Generic[BatchT, RoutingT, TokensT, LogitsT]):
    """Runs forward steps of a batch group through the layers in the Klotski order (or a baseline's)."""

    def __init__(
        self,
        spec: ModelSpec,
        residency: Residency,
        jobs: StepJobs[BatchT, RoutingT, TokensT, LogitsT],
        prefetch: PrefetchPolicy,
        metrics: RunMetrics,
        *,
        hot_experts: int,
        lookahead_layers: int = 1,
        schedule: str = KLOTSKI,
        expert_order: str = READY_FIRST,
        layouts: Mapping[BlockId, BlockLayout] | None = None,
        recorder: RoutingRecorder | None = None,
        timeline: Timeline | None = None,
        events: EventLog | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        assert schedule in SCHEDULES and expert_order in EXPERT_ORDERS, (schedule, expert_order)
        assert lookahead_layers >= 1, f"the look-ahead is at least the next layer, got {lookahead_layers}"
        self.spec = spec
        self.res = residency
        self.jobs = jobs
        self.prefetch = prefetch
        self.metrics = metrics
        self.hot_experts = hot_experts
        self.lookahead_layers = lookahead_layers
        self.recorder = recorder
        self.timeline = timeline
        self.events = events
        self._clock = clock
        self._layouts = layouts
        self._ahead = schedule == KLOTSKI  # prefetch the next blocks while computing
        self._sequential = schedule == SEQUENTIAL
        self._at_gate = self._ahead and expert_order == READY_FIRST  # fetch experts right after each gate
        self._step = 0  # forward steps so far in this run
        self._wanted: list[BlockId] = []  # prefetches that found no room yet, most urgent first
        self._staging: list[BlockId] = []  # blocks of layers beyond the next to stage, nearest first
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted hot for this step
        self._kv_ahead: Awaitable[None] | None = None  # the next layer's first batch's KV cache, coming

    async def forward(self, batches: Sequence[BatchT]) -> list[LogitsT]:
        """One step (prefill or decode) of every batch; each batch's logits at its ``last_index``."""
        self.prefetch.begin_step(self._step)
        if self.recorder is not None:
            self.recorder.begin_step()
        self._step += 1
        self._predicted.clear()
        if self._ahead:
            self._want([embed_block(), attn_block(0)])
        await self._embed(batches)
        previous: RouteArray | None = None
        for layer in range(self.spec.num_layers):
            previous = await self._layer(layer, batches, previous)
        logits = await self._head(batches)
        await self.jobs.kv_drain()
        await self.jobs.residual_drain()
        return logits

    async def _head(self, batches: Sequence[BatchT]) -> list[LogitsT]:
        head = await self._acquire(head_block())
        logits = []
        residual = self._residual(0, batches)
        for index, batch in enumerate(batches):
            residual = await self._with_residual(residual, index, batches, "head")
            self._job(f"head b{index}")
            logits.append(await self.jobs.head(batch, head))
            self.jobs.residual_done(index, batch, changed=False)
        await self._release(head)
        return logits

    async def _embed(self, batches: Sequence[BatchT]) -> None:
        embed = await self._acquire(embed_block())
        residual = self._residual(0, batches, fresh=True)
        for index, batch in enumerate(batches):
            residual = await self._with_residual(residual, index, batches, "embed", fresh=True)
            self._job(f"embed b{index}")
            await self.jobs.embed(batch, embed)
            self.jobs.residual_done(index, batch, changed=True)
        await self._release(embed)

    def _residual(self, index: int, batches: Sequence[BatchT], fresh: bool = False) -> Awaitable[None] | None:
        """Start bringing batch ``index``'s residual stream to the device where it waits in host RAM
        between jobs (runtime/activations.py); None where there is nothing to bring."""
        if index >= len(batches):
            return None
        return self.jobs.residual_fetch(index, batches[index], fresh)

    async def _with_residual(
        self,
        coming: Awaitable[None] | None,
        index: int,
        batches: Sequence[BatchT],
        what: str,
        fresh: bool = False,
    ) -> Awaitable[None] | None:
        """Wait for batch ``index``'s residual stream (``coming``), then start bringing the next one's,
        which arrives while this batch computes; returns that."""
        if coming is not None:
            await self._timed_wait(coming, "activations", INTRA_LAYER, f"{what} b{index} residual")
        return self._residual(index + 1, batches, fresh)

    async def _layer(self, layer: int, batches: Sequence[BatchT], previous: RouteArray | None) -> RouteArray:
        await self._attention_phase(layer, batches, previous)
        routings, requests = await self._gate_phase(layer, batches)
        routes = _all_routes(routings, self.spec.top_k)  # [N, k] every routed token of the group
        if self._ahead:
            self._want_next(layer, routes)
        await self._expert_phase(layer, batches, routings, requests)
        self.res.passed(layer)
        self._count_layer(layer, routes)
        self.prefetch.observe(layer, routes)
        if self.recorder is not None:
            self.recorder.record(layer, routes)
        return routes

    def _count_layer(self, layer: int, routes: RouteArray) -> None:
        used = _used(routes)
        predicted = self._predicted.get(layer, set())
        stats = self.metrics.layer(layer)
        stats.activated += len(used)
        stats.predicted += len(predicted)
        stats.predicted_used += len(used & predicted)

    async def _attention_phase(
        self, layer: int, batches: Sequence[BatchT], previous: RouteArray | None
    ) -> None:
        self._wanted = [b for b in self._wanted if b.layer < 0 or b.layer >= layer]  # drop stale wishes
        self._staging = [b for b in self._staging if b.layer > layer]
        self.res.horizon = layer
        attn = await self._acquire(attn_block(layer))
        if previous is None and self._ahead:  # layer 0: nothing predicted it during the previous layer
            self._want(self._moe_blocks(layer, previous))
        if batches and self.jobs.attends_at_home(batches[0], layer):
            await self._attention_at_home(layer, batches, attn)
            await self._release(attn)
            return
        fetch, self._kv_ahead = self._kv_ahead or self._kv_fetch(layer, 0, batches), None
        residual = self._residual(0, batches)
        for index, batch in enumerate(batches):
            if fetch is not None:
                bubble = INTER_LAYER if index == 0 else INTRA_LAYER
                await self._timed_wait(fetch, "kv", bubble, f"L{layer} kv b{index}")
            fetch = self._kv_fetch(layer, index + 1, batches)  # arrives while this batch computes
            residual = await self._with_residual(residual, index, batches, f"L{layer} attention")
            self._job(f"L{layer} attention b{index}")
            await self.jobs.attention(layer, batch, attn)
            self.jobs.kv_store(layer, index, batch)
            self.jobs.residual_done(index, batch, changed=True)
        await self._release(attn)
        if layer + 1 < self.spec.num_layers:  # the next layer's first cache, during this layer's experts
            self._kv_ahead = self._kv_fetch(layer + 1, 0, batches)

    async def _attention_at_home(self, layer: int, batches: Sequence[BatchT], attn: Lease) -> None:
        """Attention where the KV cache lives (runtime/host_attention.py): batch k's attention over its
        cache runs at home while the device projects batch k+1 and finishes batch k-1."""
        pending: tuple[int, BatchT, Awaitable[None]] | None = None
        for index, batch in enumerate(batches):
            self._job(f"L{layer} project b{index}")
            await self.jobs.project(layer, batch, attn)
            if pending is not None:
                await self._finish_at_home(layer, *pending, attn)
            pending = (index, batch, self.jobs.attend_at_home(layer, index, batch))
        if pending is not None:
            await self._finish_at_home(layer, *pending, attn)

    async def _finish_at_home(
        self, layer: int, index: int, batch: BatchT, attended: Awaitable[None], attn: Lease
    ) -> None:
        await self._timed_wait(attended, "kv", INTRA_LAYER, f"L{layer} attention at home b{index}")
        self._job(f"L{layer} attention output b{index}")
        await self.jobs.attention_output(layer, batch, attn)

    def _kv_fetch(self, layer: int, index: int, batches: Sequence[BatchT]) -> Awaitable[None] | None:
        """Start bringing batch ``index``'s KV cache of ``layer`` where attention reads it (if needed)."""
        if index >= len(batches):
            return None
        fetch = self.jobs.kv_fetch(layer, index, batches[index])
        if fetch is not None and self.events is not None:
            self.events.record(WANT, f"L{layer} kv b{index}")
        return fetch

    def _moe_blocks(self, layer: int, previous: RouteArray | None) -> list[BlockId]:
        """The gate of ``layer`` and the K experts the prefetch policy predicts hot there."""
        hot = self.prefetch.predict(layer, self.hot_experts, previous)
        self._predicted[layer] = set(hot)
        return [gate_block(layer), *(expert_block(layer, e) for e in hot)]

    def _want_next(self, layer: int, routes: RouteArray) -> None:
        """Once layer ``layer`` has routed: the next attention, gate and predicted hot experts
        (or, after the last layer, the head and the next step's first blocks), queued behind the
        demand loads of this layer's experts; wishes for its experts no token selected are dropped."""
        used = _used(routes)  # other wishes of this layer are moot now
        self._wanted = [b for b in self._wanted if b.layer != layer or b.expert < 0 or b.expert in used]
        if layer + 1 < self.spec.num_layers:
            self._want([attn_block(layer + 1), *self._moe_blocks(layer + 1, routes)])
        else:
            self._want([head_block(), embed_block(), attn_block(0)])
        self._stage_ahead(layer)

    def _stage_ahead(self, layer: int) -> None:
        """Wish layers ``layer + 2`` .. ``layer + L`` staged (within this step): their attention, gate
        and the experts the prefetch policy predicts there without routes yet."""
        last = min(layer + self.lookahead_layers, self.spec.num_layers - 1)
        for ahead in range(layer + 2, last + 1):
            hot = self.prefetch.predict(ahead, self.hot_experts, None)
            for block in (attn_block(ahead), gate_block(ahead), *(expert_block(ahead, e) for e in hot)):
                if block not in self._staging:
                    self._staging.append(block)
        self._pump()

    def _want(self, blocks: Sequence[BlockId]) -> None:
        for block in blocks:
            if block not in self._wanted:
                self._wanted.append(block)
                if self.events is not None:
                    self.events.record(WANT, str(block))
        self._pump()

    def _pump(self) -> None:
        """Start wanted prefetches in order while the device has room for them, then the staging of
        layers further ahead while the tier they go to has room."""
        while self._wanted and self.res.prefetch(self._wanted[0]):
            self._wanted.pop(0)
        while self._staging and self.res.stage(self._staging[0]):
            self._staging.pop(0)

    async def _gate_phase(self, layer: int, batches: Sequence[BatchT]) -> tuple[list[RoutingT], _Requests]:
        gate = await self._acquire(gate_block(layer))
        routings: list[RoutingT] = []
        requests: _Requests = {}
        residual = self._residual(0, batches)
        for index, batch in enumerate(batches):
            residual = await self._with_residual(residual, index, batches, f"L{layer} gate")
            self._job(f"L{layer} gate b{index}")
            routing = await self.jobs.route(layer, batch, gate)
            self.jobs.residual_done(index, batch, changed=False)
            routings.append(routing)
            if self._at_gate:
                for expert in sorted(_used(routing.routes)):
                    if expert not in requests:
                        requests[expert] = self._request_expert(layer, expert)
        await self._release(gate)
        return routings, requests

    def _request_expert(self, layer: int, expert: int) -> asyncio.Future[Lease]:
        block = expert_block(layer, expert)
        state = self.res.state(block)
        hit = state in (State.RESIDENT, State.LEASED)
        self.metrics.expert_requests += 1
        self.metrics.expert_hits += hit
        self.metrics.expert_in_flight += state is State.IN_FLIGHT
        self.metrics.layer(layer).hits += hit
        return self.res.request(block)

    async def _expert_phase(
        self, layer: int, batches: Sequence[BatchT], routings: list[RoutingT], requests: _Requests
    ) -> None:
        self._job(f"L{layer} gather")
        tokens = await self.jobs.gather(layer, routings)
        if self._at_gate:  # Klotski's order: resident first, most tokens first, then as loads finish
            counts = _token_counts(routings, self.spec.num_experts)
            while requests:  # consumed here, so no released lease outlives its computation
                expert = await self._next_expert(layer, requests, counts)
                await self._compute_expert(layer, tokens, expert, requests.pop(expert).result())
        else:
            selected = sorted(_used(_all_routes(routings, self.spec.top_k)))
            await self._experts_in_waves(layer, tokens, self._waves(layer, selected))
        first = 0
        residual = self._residual(0, batches)
        for index, (batch, routing) in enumerate(zip(batches, routings, strict=True)):
            residual = await self._with_residual(residual, index, batches, f"L{layer} combine")
            self._job(f"L{layer} combine b{index}")
            await self.jobs.combine(layer, batch, routing, tokens, first)
            self.jobs.residual_done(index, batch, changed=True)
            first += len(routing.routes)

    def _waves(self, layer: int, experts: list[int]) -> list[list[int]]:
        """Experts loaded together, then computed: one by one, or (sequential) as many as fit."""
        if not self._sequential:
            return [[expert] for expert in experts]
        assert self._layouts is not None, "the sequential schedule sizes its waves from the block layouts"
        sizes = [self._layouts[expert_block(layer, e)].nbytes for e in experts]
        return expert_waves(experts, sizes, self.res.device.capacity_bytes - self.res.device.fixed_bytes)

    async def _experts_in_waves(self, layer: int, tokens: TokensT, waves: list[list[int]]) -> None:
        """Each wave: request its experts, wait for all of them, compute them in order. The wait
        before the layer's first expert is an inter-layer bubble, later ones intra-layer."""
        bubble = INTER_LAYER
        for wave in waves:
            leases = {expert: self._request_expert(layer, expert) for expert in wave}
            await self._timed_wait(asyncio.wait(leases.values()), "expert", bubble, f"L{layer} wave {wave}")
            for expert in wave:
                await self._compute_expert(layer, tokens, expert, leases.pop(expert).result())
            bubble = INTRA_LAYER

    async def _compute_expert(self, layer: int, tokens: TokensT, expert: int, lease: Lease) -> None:
        """Run ``expert`` over its tokens of all n batches, then release its lease at once."""
        self._job(f"L{layer} expert {expert}")
        await self.jobs.expert(layer, tokens, expert, lease)
        await self._release(lease)

    async def _next_expert(self, layer: int, pending: _Requests, counts: Mapping[int, int]) -> int:
        """The resident expert with the most tokens; if none is resident yet, the first to arrive."""
        ready = [e for e, fut in pending.items() if fut.done()]
        if not ready:
            hot = any(e in self._predicted.get(layer, ()) for e in pending)
            waiter = asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            await self._timed_wait(waiter, "expert", INTER_LAYER if hot else INTRA_LAYER, f"L{layer} experts")
            ready = [e for e, fut in pending.items() if fut.done()]
        return max(ready, key=lambda e: (counts[e], -e))

    async def _release(self, lease: Lease) -> None:
        await self.res.release(lease)
        self._pump()

    async def _acquire(self, block: BlockId) -> Lease:
        future = self.res.request(block)
        if not future.done():
            await self._timed_wait(asyncio.wait([future]), block.kind.value, INTER_LAYER, str(block))
        return future.result()

    async def _timed_wait(self, waiter: Awaitable[T], kind: str, bubble: str, what: str) -> T:
        """Await ``waiter``: the compute has nothing to do meanwhile, a bubble of that kind."""
        if self.events is not None:
            self.events.record(WAIT, what, detail=bubble)
        started = self._clock()
        result = await waiter
        ended = self._clock()
        self.metrics.add_wait(kind, bubble, ended - started)
        if self.timeline is not None:
            label = "inter-layer bubble" if bubble == INTER_LAYER else "intra-layer bubble"
            self.timeline.span("bubbles", label, started, ended, waiting_for=what)
        return result

    def _job(self, label: str) -> None:
        if self.events is not None:
            self.events.record(JOB, label)


def expert_waves(experts: Sequence[int], sizes: Sequence[int], room_bytes: int) -> list[list[int]]:
    """``experts`` in order, cut into consecutive waves whose ``sizes`` (bytes) sum to at most
    ``room_bytes``; an expert larger than the room alone still gets a wave of its own."""
    waves: list[list[int]] = []
    used = 0  # bytes of the current wave
    for expert, nbytes in zip(experts, sizes, strict=True):
        if not waves or used + nbytes > room_bytes:
            waves.append([])
            used = 0
        waves[-1].append(expert)
        used += nbytes
    return waves


def _used(routes: RouteArray) -> set[int]:
    """The experts ``routes`` select."""
    return set(np.flatnonzero(np.bincount(np.asarray(routes).ravel())).tolist())


def _all_routes(routings: Sequence[RoutingT], top_k: int) -> RouteArray:
    """The routes of every batch's routed tokens, batch after batch: [N, k]."""
    if not routings:
        return np.empty((0, top_k), dtype=np.int64)
    return np.concatenate([np.asarray(r.routes, dtype=np.int64).reshape(-1, top_k) for r in routings])


def _token_counts(routings: Sequence[RoutingT], num_experts: int) -> dict[int, int]:
    """Tokens of all batches that selected each expert."""
    counts = np.zeros(num_experts, dtype=np.int64)  # [E]
    for routing in routings:
        counts += np.bincount(np.asarray(routing.routes).ravel(), minlength=num_experts)
    return {e: int(c) for e, c in enumerate(counts)}
