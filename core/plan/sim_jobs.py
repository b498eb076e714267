"""The simulator's compute jobs: the cost model's time on the simulated compute unit, routes from a
routing model or a trace instead of a gate's matmul.

:class:`SimJobs` is the :class:`~klotski_tier.core.runtime.jobs.StepJobs` of a simulated run: the
engine's pipeline issues the same jobs in the same order, and each takes the time its
:class:`JobCosts` (the planner's :class:`~klotski_tier.core.plan.costmodel.CostModel`) gives it.
A :class:`SimBatch` carries what those times depend on (sequences, new tokens, cached tokens) and
the routes its tokens take this step. No tensor is made.

A batch of very many routed tokens (a prefill of 64 sequences of 512 tokens is 32768) is represented
by a sample of at most ``MAX_ROUTED_TOKENS`` of them, each standing for ``tokens_per_route`` real
ones: experts are selected, counted for the pipeline's order and learned by the prefetch policy
from the sample, and each expert's job takes the time of its real share of the tokens. A sample
of a thousand tokens misses only experts that would get a handful of a batch's tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from klotski_tier.core.plan.sim_hardware import SimHardware
from klotski_tier.core.runtime.activations import RESIDUAL_SLOTS
from klotski_tier.core.runtime.config import DEVICE_KV, DISK_KV, KV_SLOTS
from klotski_tier.core.runtime.jobs import RouteArray, StepJobs
from klotski_tier.core.runtime.residency import Lease

MAX_ROUTED_TOKENS = 1024
"""A batch's routed tokens simulated one by one up to this many; beyond, a sample of this many."""

FloatArray = npt.NDArray[np.float64]


class JobCosts(Protocol):
    """Seconds of each compute job (the cost model's methods)."""

    def embed_s(self, tokens: int) -> float: ...
    def attention_s(self, sequences: int, query_tokens: int, context_tokens: int) -> float: ...
    def gate_s(self, tokens: int) -> float: ...
    def gather_s(self, tokens: int) -> float: ...
    def expert_s(self, tokens: float) -> float: ...
    def combine_s(self, tokens: int) -> float: ...
    def head_s(self, sequences: int) -> float: ...
    def projection_s(self, sequences: int, query_tokens: int) -> float: ...
    def host_attention_s(self, sequences: int, context_tokens: int) -> float | None: ...


@dataclass(frozen=True)
class SimBatch:
    """One batch of a simulated step."""

    sequences: int
    query_tokens: int  # new tokens per sequence: the prompt in prefill, 1 in decode
    context_tokens: int  # tokens already cached per sequence
    routes: RouteArray  # [L, N, k] the routes of its routed tokens (a sample of them) in every layer
    tokens_per_route: float = 1.0  # real routed tokens each row of ``routes`` stands for

    @property
    def tokens(self) -> int:
        return self.sequences * self.query_tokens


@dataclass(frozen=True)
class SimRouting:
    """A batch's routes in one layer, as the pipeline reads them."""

    routes: RouteArray  # [N, k]
    tokens_per_route: float


@dataclass(frozen=True)
class SimTokens:
    """A layer's gathered tokens: how many selected each expert."""

    per_expert: FloatArray  # [E]


class SimJobs(StepJobs[SimBatch, SimRouting, SimTokens, None]):
    """Each job takes its cost on the simulated compute unit."""

    def __init__(
        self,
        hardware: SimHardware,
        costs: JobCosts,
        num_experts: int,
        kv_token_bytes: int | None = None,
        *,
        kv_home: str = DEVICE_KV,
        host_attention: bool = False,
        residual_token_bytes: int | None = None,
        device_layers: int = 0,
    ) -> None:
        self._hardware = hardware
        self._costs = costs
        self._num_experts = num_experts
        # A KV cache away from the device (runtime/kv.py): one layer's bytes per cached token; its copies
        # take the host-to-device channel, in two slots as the engine's; from and to the drive, the
        # drive too (a write priced as a read of its size).
        self._kv_token_bytes = kv_token_bytes
        self._kv_on_drive = kv_home == DISK_KV
        self._host_attention = host_attention  # decode attention on the host (runtime/host_attention.py)
        self._device_layers = (
            device_layers  # the first layers' cache stays on the device ([kv] device_layers)
        )
        self._stored: list[asyncio.Future[None] | None] = [None] * KV_SLOTS
        # A prefill's residual streams in host RAM between jobs (runtime/activations.py): bytes per token;
        # their copies take the host-to-device channel, in two slots as the engine's.
        self._residual_token_bytes = residual_token_bytes
        self._residual_stored: list[asyncio.Future[None] | None] = [None] * RESIDUAL_SLOTS

    def residual_fetch(self, index: int, batch: SimBatch, fresh: bool = False) -> Awaitable[None] | None:
        if self._residual_token_bytes is None or batch.context_tokens > 0:
            return None
        nbytes = 0 if fresh else batch.tokens * self._residual_token_bytes
        return asyncio.ensure_future(self._residual_fetch(index % RESIDUAL_SLOTS, nbytes))

    async def _residual_fetch(self, slot: int, nbytes: int) -> None:
        stored = self._residual_stored[slot]
        if stored is not None:
            await stored
        if nbytes:
            await self._hardware.copy(nbytes)

    def residual_done(self, index: int, batch: SimBatch, changed: bool) -> None:
        if self._residual_token_bytes is not None and batch.context_tokens == 0 and changed:
            nbytes = batch.tokens * self._residual_token_bytes
            self._residual_stored[index % RESIDUAL_SLOTS] = asyncio.ensure_future(self._copy(nbytes))

    async def residual_drain(self) -> None:
        for stored in self._residual_stored:
            if stored is not None:
                await stored

    def attends_at_home(self, batch: SimBatch, layer: int) -> bool:
        return self._host_attention and layer >= self._device_layers and batch.context_tokens > 0

    async def project(self, layer: int, batch: SimBatch, weights: Lease) -> None:
        await self._hardware.compute(self._costs.projection_s(batch.sequences, batch.query_tokens))

    def attend_at_home(self, layer: int, index: int, batch: SimBatch) -> Awaitable[None]:
        seconds = self._costs.host_attention_s(batch.sequences, batch.context_tokens)
        assert seconds is not None, "the planner places attention on the host only where it is priced"
        return asyncio.ensure_future(self._hardware.host_compute(seconds))

    async def attention_output(self, layer: int, batch: SimBatch, weights: Lease) -> None:
        """Its time is in :meth:`project`'s (the cost model prices both projections together)."""

    def kv_fetch(self, layer: int, index: int, batch: SimBatch) -> Awaitable[None] | None:
        if self._kv_token_bytes is None or layer < self._device_layers or self.attends_at_home(batch, layer):
            return None
        nbytes = batch.sequences * batch.context_tokens * self._kv_token_bytes
        return asyncio.ensure_future(self._kv_fetch(index % KV_SLOTS, nbytes))

    async def _kv_fetch(self, slot: int, nbytes: int) -> None:
        stored = self._stored[slot]
        if stored is not None:
            await stored
        if nbytes:
            if self._kv_on_drive:
                await self._hardware.read(nbytes)
            await self._hardware.copy(nbytes)

    def kv_store(self, layer: int, index: int, batch: SimBatch) -> None:
        if (
            self._kv_token_bytes is not None
            and layer >= self._device_layers
            and not self.attends_at_home(batch, layer)
        ):
            nbytes = batch.sequences * batch.query_tokens * self._kv_token_bytes
            self._stored[index % KV_SLOTS] = asyncio.ensure_future(self._kv_store(nbytes))

    async def _kv_store(self, nbytes: int) -> None:
        await self._hardware.copy(nbytes)
        if self._kv_on_drive:
            await self._hardware.read(nbytes)

    async def _copy(self, nbytes: int) -> None:
        await self._hardware.copy(nbytes)

    async def kv_drain(self) -> None:
        for stored in self._stored:
            if stored is not None:
                await stored

    async def embed(self, batch: SimBatch, embedding: Lease) -> None:
        await self._hardware.compute(self._costs.embed_s(batch.tokens))

    async def attention(self, layer: int, batch: SimBatch, weights: Lease) -> None:
        seconds = self._costs.attention_s(batch.sequences, batch.query_tokens, batch.context_tokens)
        await self._hardware.compute(seconds)

    async def route(self, layer: int, batch: SimBatch, gate: Lease) -> SimRouting:
        await self._hardware.compute(self._costs.gate_s(batch.tokens))
        return SimRouting(batch.routes[layer], batch.tokens_per_route)

    async def gather(self, layer: int, routings: Sequence[SimRouting]) -> SimTokens:
        per_expert = np.zeros(self._num_experts)  # [E]
        for routing in routings:
            counts = np.bincount(routing.routes.ravel(), minlength=self._num_experts)  # [E]
            per_expert += counts * routing.tokens_per_route
        tokens = round(sum(len(r.routes) * r.tokens_per_route for r in routings))
        await self._hardware.compute(self._costs.gather_s(tokens))
        return SimTokens(per_expert)

    async def expert(self, layer: int, tokens: SimTokens, expert: int, weights: Lease) -> None:
        await self._hardware.compute(self._costs.expert_s(float(tokens.per_expert[expert])))

    async def combine(
        self, layer: int, batch: SimBatch, routing: SimRouting, tokens: SimTokens, first: int
    ) -> None:
        await self._hardware.compute(self._costs.combine_s(batch.tokens))

    async def head(self, batch: SimBatch, head: Lease) -> None:
        await self._hardware.compute(self._costs.head_s(batch.sequences))
