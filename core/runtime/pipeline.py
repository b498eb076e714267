"""The Klotski expert-aware multi-batch pipeline: one forward step of a batch group.

A batch group is ``n`` batches of up to ``bs`` sequences. Every weight block loaded for a
layer serves all ``n`` batches. For each layer ``l`` (ARCHITECTURE.md, section 2)::

    attention phase   acquire attn(l) (prefetched during layer l-1)
                      prefetch gate(l) and the K experts the prefetch policy predicts hot
                      attention(l, batch k) for k in 0..n-1
    gate phase        prefetch attn(l+1) (or the head after the last layer)
                      route(l, batch k) for each k; right after each gate, request every
                      selected expert that is neither resident nor in flight
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

Compute runs in the :class:`ComputeRunner`'s thread; this coroutine only orders work and
awaits readiness futures, so reads and copies proceed while the compute thread is busy.
Every await on a block is timed: it is time the compute waited for I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch
from torch import Tensor

from klotski_tier.core.model import ops
from klotski_tier.core.model.blocks import (
    BlockId,
    BlockLayout,
    BlockWeights,
    attn_block,
    embed_block,
    expert_block,
    gate_block,
    head_block,
)
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.metrics import INTER_LAYER, INTRA_LAYER, RunMetrics
from klotski_tier.core.runtime.compute import ComputeRunner
from klotski_tier.core.runtime.config import EXPERT_ORDERS, KLOTSKI, READY_FIRST, SCHEDULES, SEQUENTIAL
from klotski_tier.core.runtime.residency import Lease, Residency, State
from klotski_tier.policies.prefetch import PrefetchPolicy

if TYPE_CHECKING:
    from klotski_tier.core.observe.routing_trace import RoutingRecorder
    from klotski_tier.core.observe.timeline import Timeline

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Requests = dict[int, asyncio.Future[Lease]]  # expert id -> its lease, once the block is resident


@dataclass
class Batch:
    """Up to bs sequences that run attention together, with their KV cache."""

    k_cache: Tensor  # [L, B, Hkv, Tmax, D]
    v_cache: Tensor  # [L, B, Hkv, Tmax, D]
    # The current step (set by the engine before each forward):
    ids: Tensor  # [B, T] token ids, right-padded
    positions: Tensor  # [B, T] absolute position of each token
    token_mask: Tensor  # [B, T] True for tokens that go through the MoE (real and unfinished)
    key_lengths: Tensor  # [B] valid cache length after this step
    last_index: Tensor  # [B] index along T of the token whose logits are wanted
    hidden: Tensor | None = None  # [B, T, H] residual stream


@dataclass
class _Routing:
    """One batch's gate output for the current layer."""

    x: Tensor  # [N_b, H] post-attention-norm hidden states of the routed tokens
    topk_idx: Tensor  # [N_b, k] selected experts
    topk_w: Tensor  # [N_b, k] routing weights
    shared: Tensor | None  # [N_b, H] shared-expert output (Qwen2-MoE) or None
    routes: list[list[int]]  # topk_idx on the host, per token


class _Tokens(NamedTuple):
    """The routed tokens of all n batches together, and room for their expert outputs."""

    x: Tensor  # [N, H]
    topk_idx: Tensor  # [N, k]
    topk_w: Tensor  # [N, k]
    contributions: Tensor  # [N, k, H]


class Pipeline:
    """Runs forward steps of a batch group through the layers in the Klotski order (or a baseline's)."""

    def __init__(
        self,
        spec: ModelSpec,
        residency: Residency,
        compute: ComputeRunner,
        prefetch: PrefetchPolicy,
        metrics: RunMetrics,
        *,
        hot_experts: int,
        schedule: str = KLOTSKI,
        expert_order: str = READY_FIRST,
        layouts: Mapping[BlockId, BlockLayout] | None = None,
        recorder: RoutingRecorder | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        assert schedule in SCHEDULES and expert_order in EXPERT_ORDERS, (schedule, expert_order)
        self.spec = spec
        self.res = residency
        self.compute = compute
        self.prefetch = prefetch
        self.metrics = metrics
        self.hot_experts = hot_experts
        self.recorder = recorder
        self.timeline = timeline
        self._layouts = layouts
        self._ahead = schedule == KLOTSKI  # prefetch the next blocks while computing
        self._sequential = schedule == SEQUENTIAL
        self._at_gate = self._ahead and expert_order == READY_FIRST  # fetch experts right after each gate
        self._step = 0  # forward steps so far in this run
        self._wanted: list[BlockId] = []  # prefetches that found no room yet, most urgent first
        self._predicted: dict[int, set[int]] = {}  # layer -> experts predicted hot for this step

    async def forward(self, batches: Sequence[Batch]) -> list[Tensor]:
        """One step (prefill or decode) of every batch; the logits [B, V] at each ``last_index``."""
        self.prefetch.begin_step(self._step)
        if self.recorder is not None:
            self.recorder.begin_step()
        self._step += 1
        self._predicted.clear()
        if self._ahead:
            self._want([embed_block(), attn_block(0)])
        await self._embed(batches)
        previous: list[list[int]] | None = None
        for layer in range(self.spec.num_layers):
            previous = await self._layer(layer, batches, previous)
        return await self._head(batches)

    async def _head(self, batches: Sequence[Batch]) -> list[Tensor]:
        head = await self._acquire(head_block())
        logits = [await self._run(_last_logits, batch, head, self.spec) for batch in batches]
        await self._release(head)
        return logits

    async def _embed(self, batches: Sequence[Batch]) -> None:
        embed = await self._acquire(embed_block())
        for batch in batches:
            batch.hidden = await self._run(ops.embed, batch.ids, embed)  # [B, T, H]
        await self._release(embed)

    async def _layer(
        self, layer: int, batches: Sequence[Batch], previous: list[list[int]] | None
    ) -> list[list[int]]:
        await self._attention_phase(layer, batches, previous)
        routings, requests = await self._gate_phase(layer, batches)
        routes = [route for routing in routings for route in routing.routes]
        if self._ahead:
            self._want_next(layer, routes)
        await self._expert_phase(layer, batches, routings, requests)
        self._count_layer(layer, routes)
        self.prefetch.observe(layer, routes)
        if self.recorder is not None:
            self.recorder.record(layer, routes)
        return routes

    def _count_layer(self, layer: int, routes: list[list[int]]) -> None:
        used = {expert for route in routes for expert in route}
        predicted = self._predicted.get(layer, set())
        stats = self.metrics.layer(layer)
        stats.activated += len(used)
        stats.predicted += len(predicted)
        stats.predicted_used += len(used & predicted)

    async def _attention_phase(
        self, layer: int, batches: Sequence[Batch], previous: list[list[int]] | None
    ) -> None:
        self._wanted = [b for b in self._wanted if b.layer < 0 or b.layer >= layer]  # drop stale wishes
        attn = await self._acquire(attn_block(layer))
        if previous is None and self._ahead:  # layer 0: nothing predicted it during the previous layer
            self._want(self._moe_blocks(layer, previous))
        for batch in batches:
            batch.hidden = await self._run(
                _attention, batch, attn, self.spec, layer, label=f"L{layer} attention"
            )
        await self._release(attn)

    def _moe_blocks(self, layer: int, previous: list[list[int]] | None) -> list[BlockId]:
        """The gate of ``layer`` and the K experts the prefetch policy predicts hot there."""
        hot = self.prefetch.predict(layer, self.hot_experts, previous)
        self._predicted[layer] = set(hot)
        return [gate_block(layer), *(expert_block(layer, e) for e in hot)]

    def _want_next(self, layer: int, routes: list[list[int]]) -> None:
        """Once layer ``layer`` has routed: the next attention, gate and predicted hot experts
        (or, after the last layer, the head and the next step's first blocks), queued behind the
        demand loads of this layer's experts; wishes for its experts no token selected are dropped."""
        used = {expert for route in routes for expert in route}  # other wishes of this layer are moot now
        self._wanted = [b for b in self._wanted if b.layer != layer or b.expert < 0 or b.expert in used]
        if layer + 1 < self.spec.num_layers:
            self._want([attn_block(layer + 1), *self._moe_blocks(layer + 1, routes)])
        else:
            self._want([head_block(), embed_block(), attn_block(0)])

    def _want(self, blocks: Sequence[BlockId]) -> None:
        self._wanted.extend(b for b in blocks if b not in self._wanted)
        self._pump()

    def _pump(self) -> None:
        """Start wanted prefetches in order while the device has room for them."""
        while self._wanted and self.res.prefetch(self._wanted[0]):
            self._wanted.pop(0)

    async def _gate_phase(self, layer: int, batches: Sequence[Batch]) -> tuple[list[_Routing], _Requests]:
        gate = await self._acquire(gate_block(layer))
        routings: list[_Routing] = []
        requests: _Requests = {}
        for batch in batches:
            routing = await self._run(_route, batch, gate, self.spec, label=f"L{layer} gate")
            routings.append(routing)
            if self._at_gate:
                for expert in _selected([routing]):
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
        self, layer: int, batches: Sequence[Batch], routings: list[_Routing], requests: _Requests
    ) -> None:
        tokens = await self._run(_gather_tokens, routings)
        if self._at_gate:  # Klotski's order: resident first, most tokens first, then as loads finish
            counts = Counter(e for routing in routings for route in routing.routes for e in route)
            while requests:  # consumed here, so no released lease outlives its computation
                expert = await self._next_expert(layer, requests, counts)
                await self._compute_expert(layer, tokens, expert, requests.pop(expert).result())
        else:
            await self._experts_in_waves(layer, tokens, self._waves(layer, _selected(routings)))
        start = 0
        for batch, routing in zip(batches, routings, strict=True):
            end = start + routing.x.shape[0]
            await self._run(
                _combine, batch, routing, tokens.contributions[start:end], label=f"L{layer} combine"
            )
            start = end

    def _waves(self, layer: int, experts: list[int]) -> list[list[int]]:
        """Experts loaded together, then computed: one by one, or (sequential) as many as fit."""
        if not self._sequential:
            return [[expert] for expert in experts]
        assert self._layouts is not None, "the sequential schedule sizes its waves from the block layouts"
        sizes = [self._layouts[expert_block(layer, e)].nbytes for e in experts]
        return expert_waves(experts, sizes, self.res.device.capacity_bytes - self.res.device.fixed_bytes)

    async def _experts_in_waves(self, layer: int, tokens: _Tokens, waves: list[list[int]]) -> None:
        """Each wave: request its experts, wait for all of them, compute them in order. The wait
        before the layer's first expert is an inter-layer bubble, later ones intra-layer."""
        bubble = INTER_LAYER
        for wave in waves:
            leases = {expert: self._request_expert(layer, expert) for expert in wave}
            await self._timed_wait(asyncio.wait(leases.values()), "expert", bubble, f"L{layer} wave {wave}")
            for expert in wave:
                await self._compute_expert(layer, tokens, expert, leases.pop(expert).result())
            bubble = INTRA_LAYER

    async def _compute_expert(self, layer: int, tokens: _Tokens, expert: int, lease: Lease) -> None:
        """Run ``expert`` over its tokens of all n batches, then release its lease at once."""
        x, topk_idx, topk_w, out = tokens
        await self._run(_expert, x, topk_idx, topk_w, expert, lease, out, label=f"L{layer} expert {expert}")
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
        started = time.perf_counter()
        result = await waiter
        ended = time.perf_counter()
        self.metrics.add_wait(kind, bubble, ended - started)
        if self.timeline is not None:
            label = "inter-layer bubble" if bubble == INTER_LAYER else "intra-layer bubble"
            self.timeline.span("bubbles", label, started, ended, waiting_for=what)
        return result

    async def _run(self, fn: Callable[..., T], *args: object, label: str = "") -> T:
        """``fn`` in the compute thread, with each Lease argument replaced by its block's tensors."""
        leases = [a for a in args if isinstance(a, Lease)]
        unpacked = [a.weights if isinstance(a, Lease) else a for a in args]
        ready = [lease.copy_done for lease in leases]
        return await self.compute.run(fn, *unpacked, ready=ready, label=label)


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


def _selected(routings: Sequence[_Routing]) -> list[int]:
    """The experts any token of ``routings`` selected, in id order."""
    return sorted({expert for routing in routings for route in routing.routes for expert in route})


# ---- the jobs the compute thread runs ------------------------------------------------------


def _attention(batch: Batch, w: BlockWeights, spec: ModelSpec, layer: int) -> Tensor:
    assert batch.hidden is not None
    return ops.attention(
        batch.hidden, w, spec, batch.k_cache[layer], batch.v_cache[layer], batch.positions, batch.key_lengths
    )


def _route(batch: Batch, w: BlockWeights, spec: ModelSpec) -> _Routing:
    assert batch.hidden is not None
    h = batch.hidden[batch.token_mask]  # [N_b, H]
    x, topk_idx, topk_w = ops.route(h, w, spec)
    shared = ops.shared_expert(x, w, spec)
    return _Routing(x, topk_idx, topk_w, shared, topk_idx.cpu().tolist())


def _gather_tokens(routings: list[_Routing]) -> _Tokens:
    """The routed tokens of all n batches together, and zeroed room for their expert outputs."""
    x = torch.cat([r.x for r in routings])  # [N, H]
    topk_idx = torch.cat([r.topk_idx for r in routings])  # [N, k]
    topk_w = torch.cat([r.topk_w for r in routings])  # [N, k]
    dtype = ops.contribution_dtype(x.dtype, topk_w.dtype)
    contributions = torch.zeros((*topk_idx.shape, x.shape[-1]), dtype=dtype, device=x.device)  # [N, k, H]
    return _Tokens(x, topk_idx, topk_w, contributions)


def _expert(
    x: Tensor, topk_idx: Tensor, topk_w: Tensor, expert: int, w: BlockWeights, contributions: Tensor
) -> None:
    tokens, slots = torch.nonzero(topk_idx == expert, as_tuple=True)  # [M], [M]
    contributions[tokens, slots] = ops.expert(x[tokens], w, topk_w[tokens, slots])  # [M, H]


def _combine(batch: Batch, routing: _Routing, contributions: Tensor) -> None:
    assert batch.hidden is not None
    h = batch.hidden[batch.token_mask]  # [N_b, H]
    batch.hidden[batch.token_mask] = ops.combine(h, contributions, routing.shared)


def _last_logits(batch: Batch, w: BlockWeights, spec: ModelSpec) -> Tensor:
    assert batch.hidden is not None
    rows = torch.arange(batch.hidden.shape[0], device=batch.hidden.device)
    last = batch.hidden[rows, batch.last_index]  # [B, H]
    return ops.head(last, w, spec).float()  # [B, V]
