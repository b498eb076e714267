"""The compute jobs of a forward step, as the pipeline orders them: the seam between scheduling and
computing.

The :class:`~klotski_tier.core.runtime.pipeline.Pipeline` decides what runs when and which blocks it
needs; a :class:`StepJobs` does the work of each job. The engine's jobs
(:class:`~klotski_tier.core.runtime.model_jobs.ModelJobs`) run the model's ops in the compute thread;
the simulator's (:class:`~klotski_tier.core.plan.sim_jobs.SimJobs`) take the cost model's time on a
virtual clock and return routes from a routing model. The same pipeline drives both, so every
scheduling rule exists once.

A job receives the :class:`~klotski_tier.core.runtime.residency.Lease` of each block it reads. The
only thing the pipeline reads back is each batch's routing (:class:`Routed`): which experts its
tokens selected. Everything else a job
returns (the gathered tokens of a layer, a batch's logits) is opaque to the pipeline and handed to
the jobs that use it.

Job order for one layer (see the pipeline's docstring for when each is issued)::

    kv_fetch(layer, batch)       per batch, one ahead: its KV cache where attention reads it
    attention(layer, batch)      per batch, then kv_store: the entries it wrote back home
    route(layer, batch)          per batch -> its routing
    gather(layer, routings)      once: the routed tokens of all n batches
    expert(layer, tokens, e)     per expert selected
    combine(layer, batch, ...)   per batch: its tokens' expert outputs into its residual stream
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from klotski_tier.core.runtime.residency import Lease

RouteArray = npt.NDArray[np.int64]
"""Routes of some tokens in one layer: ``[N, k]`` expert ids, a token's first choice in column 0."""


class Routed(Protocol):
    """A batch's gate output as the pipeline sees it: the experts its routed tokens selected."""

    @property
    def routes(self) -> RouteArray: ...


BatchT = TypeVar("BatchT")
RoutingT = TypeVar("RoutingT", bound=Routed)
TokensT = TypeVar("TokensT")
LogitsT = TypeVar("LogitsT")


class StepJobs(ABC, Generic[BatchT, RoutingT, TokensT, LogitsT]):
    """Does each compute job of a forward step; the pipeline awaits one job at a time."""

    @abstractmethod
    async def embed(self, batch: BatchT, embedding: Lease) -> None:
        """The batch's token embeddings into its residual stream."""

    @abstractmethod
    async def attention(self, layer: int, batch: BatchT, weights: Lease) -> None:
        """Attention of ``layer`` for the batch (its KV cache updated)."""

    def kv_fetch(self, layer: int, index: int, batch: BatchT) -> Awaitable[None] | None:
        """Start bringing batch ``index``'s KV cache of ``layer`` where its attention reads it; an
        awaitable for its arrival, or None where it is there already (the default: the device)."""
        return None

    def kv_store(self, layer: int, index: int, batch: BatchT) -> None:
        """After batch ``index``'s attention of ``layer``: start taking the entries it wrote home."""

    async def kv_drain(self) -> None:
        """Wait until every KV entry written is home (the end of a step)."""

    def residual_fetch(self, index: int, batch: BatchT, fresh: bool = False) -> Awaitable[None] | None:
        """Start bringing batch ``index``'s residual stream where its next job reads it, when it waits in
        host RAM between jobs (runtime/activations.py); ``fresh``: its embedding makes it (only room is
        needed). An awaitable for its arrival, or None where it stays on the device (the default)."""
        return None

    def residual_done(self, index: int, batch: BatchT, changed: bool) -> None:
        """After a job of batch ``index`` that read its residual stream (``changed``: and wrote it): start
        taking it home, where it waits in host RAM between jobs."""

    async def residual_drain(self) -> None:
        """Wait until every residual stream written is home (the end of a step)."""

    def attends_at_home(self, batch: BatchT, layer: int) -> bool:
        """Whether the batch's attention of ``layer`` this step runs where its KV cache lives, off the device
        (runtime/host_attention.py): then :meth:`project`, :meth:`attend_at_home` and
        :meth:`attention_output` replace :meth:`attention`."""
        return False

    async def project(self, layer: int, batch: BatchT, weights: Lease) -> None:
        """On the device: the input norm and q/k/v projections of ``layer`` for the batch."""
        raise NotImplementedError("these jobs attend on the device only")

    def attend_at_home(self, layer: int, index: int, batch: BatchT) -> Awaitable[None]:
        """Start batch ``index``'s attention over its cache where it lives (after :meth:`project`); an
        awaitable for its output's arrival on the device."""
        raise NotImplementedError("these jobs attend on the device only")

    async def attention_output(self, layer: int, batch: BatchT, weights: Lease) -> None:
        """On the device: the output projection and residual, once :meth:`attend_at_home` is done."""
        raise NotImplementedError("these jobs attend on the device only")

    @abstractmethod
    async def route(self, layer: int, batch: BatchT, gate: Lease) -> RoutingT:
        """The gate of ``layer`` (and a shared expert, if any) over the batch's routed tokens."""

    @abstractmethod
    async def gather(self, layer: int, routings: Sequence[RoutingT]) -> TokensT:
        """The routed tokens of all batches together, with room for their expert outputs."""

    @abstractmethod
    async def expert(self, layer: int, tokens: TokensT, expert: int, weights: Lease) -> None:
        """Expert ``expert`` over every gathered token that selected it."""

    @abstractmethod
    async def combine(
        self, layer: int, batch: BatchT, routing: RoutingT, tokens: TokensT, first: int
    ) -> None:
        """The batch's expert outputs (its routed tokens start at row ``first`` of ``tokens``) into its
        residual stream."""

    @abstractmethod
    async def head(self, batch: BatchT, head: Lease) -> LogitsT:
        """Final norm and LM head at each sequence's last position."""
