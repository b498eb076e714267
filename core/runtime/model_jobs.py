"""The engine's compute jobs: the model's ops on real tensors, run in the compute thread.

:class:`ModelJobs` is the :class:`~klotski_tier.core.runtime.jobs.StepJobs` of a real run. Each job
hands one function to the :class:`~klotski_tier.core.runtime.compute.ComputeRunner` with the tensors
of the blocks it reads and their copies' readiness (a CUDA event the compute stream waits on); the
event loop never runs a kernel. A :class:`Batch` holds up to bs sequences' step inputs, residual
stream and KV cache.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor

from klotski_tier.core.model import ops
from klotski_tier.core.model.blocks import BlockWeights
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.runtime.activations import HostResiduals
from klotski_tier.core.runtime.compute import ComputeRunner
from klotski_tier.core.runtime.host_attention import HostAttention
from klotski_tier.core.runtime.jobs import RouteArray, StepJobs
from klotski_tier.core.runtime.kv import HostKv
from klotski_tier.core.runtime.residency import Lease

T = TypeVar("T")


@dataclass
class Batch:
    """Up to bs sequences that run attention together, with their KV cache."""

    k_cache: Tensor  # [L, B, Hkv, Tmax, D] on the device, or its last L - m layers at home (runtime/kv.py)
    v_cache: Tensor  # [L, B, Hkv, Tmax, D]
    # The current step (set by the engine before each forward):
    ids: Tensor  # [B, T] token ids, right-padded
    positions: Tensor  # [B, T] absolute position of each token
    token_mask: Tensor  # [B, T] True for tokens that go through the MoE (real and unfinished)
    key_lengths: Tensor  # [B] valid cache length after this step
    last_index: Tensor  # [B] index along T of the token whose logits are wanted
    hidden: Tensor | None = None  # [B, T, H] residual stream
    # Where this step's KV entries go, on the host (for a cache kept in host RAM, runtime/kv.py):
    kv_cached: int = 0  # positions 0 .. kv_cached hold entries of earlier steps (for some sequence)
    kv_written: tuple[int, int] = (0, 0)  # this step writes positions within [start, end)
    kv_slot: tuple[Tensor, Tensor] | None = None  # the device slot its attention uses this layer, if any
    kv_file: Path | None = None  # a KV cache on the drive: its file (k_cache, v_cache: its shapes)
    # With the cache at home: its first m layers kept on the device ([kv] device_layers), [m, B, Hkv, T, D]
    k_device: Tensor | None = None
    v_device: Tensor | None = None
    # Attention on the host (runtime/host_attention.py): q, k, v from the device, and the device buffer
    # the host's output comes back to ([B, Hq, T, D], [B, Hkv, T, D] x2, [B, Hq, T, D]).
    attention_parts: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    # A prefill's residual stream kept in host RAM between its jobs (runtime/activations.py): ``hidden``
    # is then its device slot while a job runs, None between them.
    residual_home: Tensor | None = None


@dataclass
class Routing:
    """One batch's gate output for the current layer."""

    x: Tensor | None  # [N_b, H] post-attention-norm hidden states of the routed tokens (None once gathered)
    topk_idx: Tensor  # [N_b, k] selected experts
    topk_w: Tensor  # [N_b, k] routing weights
    shared: Tensor | None  # [N_b, H] shared-expert output (Qwen2-MoE) or None
    routes: RouteArray  # [N_b, k] topk_idx on the host


class Tokens(NamedTuple):
    """The routed tokens of all n batches together, and room for their expert outputs."""

    x: Tensor  # [N, H]
    topk_idx: Tensor  # [N, k]
    topk_w: Tensor  # [N, k]
    contributions: Tensor  # [N, k, H]


class ModelJobs(StepJobs[Batch, Routing, Tokens, Tensor]):
    """Runs each job of a step in the compute thread, after the copies of the blocks it reads."""

    def __init__(
        self,
        spec: ModelSpec,
        runner: ComputeRunner,
        kv: HostKv | None = None,
        host_attention: HostAttention | None = None,
        residuals: HostResiduals | None = None,
        device_layers: int = 0,
    ) -> None:
        self.spec = spec
        self.runner = runner
        self.kv = kv  # None: every batch's KV cache is on the device
        self.device_layers = device_layers if kv is not None else spec.num_layers  # layers cached there
        self.host_attention = host_attention  # decode attention on the host, over the cache in RAM
        self.residuals = residuals  # None: residual streams stay on the device

    def _away(self, batch: Batch) -> bool:
        """Whether the batch's residual stream waits in host RAM between its jobs: a prefill's."""
        return self.residuals is not None and batch.kv_cached == 0

    def residual_fetch(self, index: int, batch: Batch, fresh: bool = False) -> Awaitable[None] | None:
        if not self._away(batch):
            return None
        return asyncio.ensure_future(self._residual_fetch(index, batch, fresh))

    async def _residual_fetch(self, index: int, batch: Batch, fresh: bool) -> None:
        assert self.residuals is not None
        if fresh:  # the embedding writes it: a slot, and a home to go to
            shape = (*batch.ids.shape, self.spec.hidden_size)
            await self.residuals.claim(index)
            batch.hidden = self.residuals.slot(index, shape)
            batch.residual_home = self.residuals.home(shape)
            return
        assert batch.residual_home is not None, "a residual stream must be made before it is fetched"
        batch.hidden = await self.residuals.fetch(index, batch.residual_home)

    def residual_done(self, index: int, batch: Batch, changed: bool) -> None:
        if not self._away(batch):
            return
        assert self.residuals is not None and batch.residual_home is not None
        if changed:
            self.residuals.store(index, batch.residual_home)
        batch.hidden = None  # the slot is the next batch's

    async def residual_drain(self) -> None:
        if self.residuals is not None:
            await self.residuals.drain()

    def attends_at_home(self, batch: Batch, layer: int) -> bool:
        at_home = layer >= self.device_layers  # its cache of this layer is in host RAM
        return self.host_attention is not None and at_home and batch.kv_cached > 0  # decode: a cache to read

    def _at_home(self, layer: int) -> int | None:
        """Where ``layer``'s cache is in a batch's caches at home (None: on the device)."""
        return layer - self.device_layers if layer >= self.device_layers else None

    async def project(self, layer: int, batch: Batch, weights: Lease) -> None:
        batch.attention_parts = await self._run(
            _project, weights, batch, weights.weights, self.spec, label=f"L{layer} project"
        )

    def attend_at_home(self, layer: int, index: int, batch: Batch) -> Awaitable[None]:
        home = self._at_home(layer)
        assert self.host_attention is not None and batch.attention_parts is not None and home is not None
        caches = (batch.k_cache[home], batch.v_cache[home])
        return asyncio.ensure_future(
            self.host_attention.attend(
                layer, index, caches, batch.attention_parts, batch.positions, batch.key_lengths
            )
        )

    async def attention_output(self, layer: int, batch: Batch, weights: Lease) -> None:
        batch.hidden = await self._run(
            _attention_output, weights, batch, weights.weights, label=f"L{layer} attention output"
        )

    def kv_fetch(self, layer: int, index: int, batch: Batch) -> Awaitable[None] | None:
        home = self._at_home(layer)
        if self.kv is None or home is None or self.attends_at_home(batch, layer):
            return None
        caches = (batch.k_cache, batch.v_cache)
        batch.kv_slot = self.kv.slot(index, batch.k_cache)  # [B, Hkv, Tmax, D] x2 on the device
        return asyncio.ensure_future(self.kv.fetch(home, index, caches, batch.kv_cached, batch.kv_file))

    def kv_store(self, layer: int, index: int, batch: Batch) -> None:
        home = self._at_home(layer)
        if self.kv is not None and home is not None and not self.attends_at_home(batch, layer):
            self.kv.store(home, index, (batch.k_cache, batch.v_cache), batch.kv_written, batch.kv_file)

    async def kv_drain(self) -> None:
        if self.kv is not None:
            await self.kv.drain()

    async def embed(self, batch: Batch, embedding: Lease) -> None:
        if self._away(batch):  # into its slot
            await self._run(_embed_into, embedding, batch, embedding.weights, label="embed")
            return
        batch.hidden = await self._run(ops.embed, embedding, batch.ids, embedding.weights, label="embed")

    async def attention(self, layer: int, batch: Batch, weights: Lease) -> None:
        fn = _attention_in_place if self._away(batch) else _attention
        caches = self._device_caches(layer, batch)
        batch.hidden = await self._run(
            fn, weights, batch, weights.weights, self.spec, caches, label=f"L{layer} attention"
        )

    def _device_caches(self, layer: int, batch: Batch) -> tuple[Tensor, Tensor]:
        """The k and v ``[B, Hkv, Tmax, D]`` the attention of ``layer`` reads and writes on the device:
        its slot where the cache is at home, else the layer's own cache on the device."""
        if self.kv is None:
            return batch.k_cache[layer], batch.v_cache[layer]
        if self._at_home(layer) is not None:
            assert batch.kv_slot is not None, "a cache at home is attended in its slot"
            return batch.kv_slot
        assert batch.k_device is not None and batch.v_device is not None
        return batch.k_device[layer], batch.v_device[layer]

    async def route(self, layer: int, batch: Batch, gate: Lease) -> Routing:
        return await self._run(_route, gate, batch, gate.weights, self.spec, label=f"L{layer} gate")

    async def gather(self, layer: int, routings: Sequence[Routing]) -> Tokens:
        return await self._run(_gather_tokens, None, routings, label=f"L{layer} gather")

    async def expert(self, layer: int, tokens: Tokens, expert: int, weights: Lease) -> None:
        x, topk_idx, topk_w, out = tokens
        label = f"L{layer} expert {expert}"
        await self._run(_expert, weights, x, topk_idx, topk_w, expert, weights.weights, out, label=label)

    async def combine(self, layer: int, batch: Batch, routing: Routing, tokens: Tokens, first: int) -> None:
        mine = tokens.contributions[first : first + len(routing.routes)]  # [N_b, k, H]
        await self._run(_combine, None, batch, routing, mine, label=f"L{layer} combine")

    async def head(self, batch: Batch, head: Lease) -> Tensor:
        return await self._run(_last_logits, head, batch, head.weights, self.spec, label="head")

    async def _run(self, fn: Callable[..., T], lease: Lease | None, *args: object, label: str) -> T:
        """``fn(*args)`` in the compute thread, once ``lease``'s block (if any) is readable there."""
        ready = [] if lease is None else [lease.copy_done]
        return await self.runner.run(fn, *args, ready=ready, label=label)


# ---- the functions the compute thread runs ---------------------------------------------------


def _attention(batch: Batch, w: BlockWeights, spec: ModelSpec, caches: tuple[Tensor, Tensor]) -> Tensor:
    assert batch.hidden is not None
    k, v = caches
    return ops.attention(batch.hidden, w, spec, k, v, batch.positions, batch.key_lengths)


def _project(batch: Batch, w: BlockWeights, spec: ModelSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v of the batch, and a device buffer for the output the host sends back."""
    assert batch.hidden is not None
    q, k, v = ops.project(batch.hidden, w, spec, batch.positions)
    return q, k, v, torch.empty_like(q)


def _attention_output(batch: Batch, w: BlockWeights) -> Tensor:
    assert batch.hidden is not None and batch.attention_parts is not None
    out = batch.attention_parts[3]
    batch.attention_parts = None
    return ops.attention_output(batch.hidden, out, w)


def _embed_into(batch: Batch, w: BlockWeights) -> None:
    assert batch.hidden is not None
    ops.embed_into(batch.ids, w, batch.hidden)


def _attention_in_place(
    batch: Batch, w: BlockWeights, spec: ModelSpec, caches: tuple[Tensor, Tensor]
) -> Tensor:
    """The attention sublayer, its result written over the residual stream in its slot."""
    assert batch.hidden is not None
    return batch.hidden.copy_(_attention(batch, w, spec, caches))


def _route(batch: Batch, w: BlockWeights, spec: ModelSpec) -> Routing:
    assert batch.hidden is not None
    h = batch.hidden[batch.token_mask]  # [N_b, H]
    x, topk_idx, topk_w = ops.route(h, w, spec)
    shared = ops.shared_expert(x, w, spec)
    return Routing(x, topk_idx, topk_w, shared, topk_idx.cpu().numpy().astype("int64", copy=False))


def _gather_tokens(routings: Sequence[Routing]) -> Tokens:
    """The routed tokens of all n batches together, and zeroed room for their expert outputs."""
    x = torch.cat([r.x for r in routings if r.x is not None])  # [N, H]
    for routing in routings:  # the gathered copy is the one the experts read: one copy held, not two
        routing.x = None
    topk_idx = torch.cat([r.topk_idx for r in routings])  # [N, k]
    topk_w = torch.cat([r.topk_w for r in routings])  # [N, k]
    dtype = ops.contribution_dtype(x.dtype, topk_w.dtype)
    contributions = torch.zeros((*topk_idx.shape, x.shape[-1]), dtype=dtype, device=x.device)  # [N, k, H]
    return Tokens(x, topk_idx, topk_w, contributions)


def _expert(
    x: Tensor, topk_idx: Tensor, topk_w: Tensor, expert: int, w: BlockWeights, contributions: Tensor
) -> None:
    tokens, slots = torch.nonzero(topk_idx == expert, as_tuple=True)  # [M], [M]
    contributions[tokens, slots] = ops.expert(x[tokens], w, topk_w[tokens, slots])  # [M, H]


def _combine(batch: Batch, routing: Routing, contributions: Tensor) -> None:
    assert batch.hidden is not None
    h = batch.hidden[batch.token_mask]  # [N_b, H]
    batch.hidden[batch.token_mask] = ops.combine(h, contributions, routing.shared)


def _last_logits(batch: Batch, w: BlockWeights, spec: ModelSpec) -> Tensor:
    assert batch.hidden is not None
    rows = torch.arange(batch.hidden.shape[0], device=batch.hidden.device)
    last = batch.hidden[rows, batch.last_index]  # [B, H]
    return ops.head(last, w, spec).float().cpu()  # [B, V] on the host, for the sampler on the event loop
