"""The simulator: the engine's own pipeline and residency manager on simulated hardware, on a virtual
clock, for a machine we may not have.

A :class:`Simulator` is the engine minus the bytes. Its :class:`~klotski_tier.core.runtime.residency.
Residency` (the engine's, with its ledgers, eviction policy and read queue) moves blocks through
simulated drivers (:mod:`~klotski_tier.core.plan.sim_hardware`: a drive shared by reads, I/O
threads, a copy channel), and its :class:`~klotski_tier.core.runtime.pipeline.Pipeline` (the
engine's, with its prefetch policy) issues jobs that take the cost model's time on a simulated
compute unit (:mod:`~klotski_tier.core.plan.sim_jobs`), all on a
:class:`~klotski_tier.core.plan.virtual_clock.VirtualClockLoop`. Every scheduling rule, the
baselines' included (``schedule``, ``expert_order``, the prefetch and eviction policies), is the
engine's code; ``tests/core/plan/test_sim_engine_agree.py`` checks that a step of both gives the
same loads, evictions and jobs.

:func:`simulate_workload` runs the engine's ``generate``: groups of n batches of bs sequences, each
a prefill step and ``new_tokens - 1`` decode steps (decode steps past ``max_decode_steps`` counted
at the mean of those simulated); :func:`sweep` does it for several n.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from klotski_tier.core.errors import BudgetError, ConfigError
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
from klotski_tier.core.observe.events import EventLog
from klotski_tier.core.observe.metrics import INTER_LAYER, INTRA_LAYER, RunMetrics
from klotski_tier.core.plan.costmodel import CostModel, no_host_attention
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.plan_types import check_compression_ratio
from klotski_tier.core.plan.routing_model import ParametricRouting, RouteSampler
from klotski_tier.core.plan.sim_hardware import SimDevice, SimHardware, SimHost, SimSource
from klotski_tier.core.plan.sim_jobs import MAX_ROUTED_TOKENS, JobCosts, SimBatch, SimJobs
from klotski_tier.core.plan.virtual_clock import run_virtual
from klotski_tier.core.runtime.config import (
    COUNT_RANGES,
    DEVICE_KV,
    HOST_ACTIVATIONS,
    HOST_ATTENTION,
    HOST_KV,
    EngineOptions,
    check_count,
)
from klotski_tier.core.runtime.residency import Residency
from klotski_tier.core.runtime.run import make_ledgers, make_pipeline
from klotski_tier.core.units import format_size
from klotski_tier.policies.registry import make_prefetch
from klotski_tier.tiers.disk_defaults import DEFAULT_CHUNK_BYTES

logger = logging.getLogger(__name__)

DISK_TO_HOST = "disk->host"  # bytes read from the drive (into host RAM, or a CPU device's memory)
HOST_TO_DEVICE = "host->device"  # bytes copied host to device
_DEFAULTS = EngineOptions()


@dataclass(frozen=True)
class SimConfig:
    """What to simulate: model, machine, group shape, budgets, routing, and the engine's options."""

    spec: ModelSpec
    machine: Machine
    batches: int
    batch_size: int
    hot_experts: int | None = None  # K; None: the router's top-k, as the engine
    lookahead_layers: int = _DEFAULTS.lookahead_layers  # L: layers read ahead (staging beyond the next)
    stream_window: int = _DEFAULTS.stream_window  # the device's streaming window, in largest experts
    device_memory_bytes: int | None = None  # None: the machine's device memory
    host_memory_bytes: int | None = None  # None: the machine's host memory
    host_preload: bool = False  # every block in host RAM before the first step
    compression_ratio: float | None = None  # blocks read from a compressed store of this ratio
    routing: RouteSampler | None = None  # None: the parametric model with the demo's figures
    seed: int = 0
    read_chunk_bytes: int = DEFAULT_CHUNK_BYTES  # the disk tier reads a block in chunks of at most this
    eviction: str = _DEFAULTS.eviction  # the device and host tiers' eviction policy
    prefetch: str = _DEFAULTS.prefetch  # the prefetch policy (learning online from the simulated routes)
    schedule: str = _DEFAULTS.schedule  # "klotski" or "sequential", as the engine's [pipeline] keys
    expert_order: str = _DEFAULTS.expert_order
    kv_home: str = _DEFAULTS.kv_home  # "device", "host" (RAM) or "disk": away, streamed by the attention
    kv_attention: str = _DEFAULTS.kv_attention  # "device", or "host": decode attention over the cache in RAM
    activations_home: str = _DEFAULTS.activations_home  # "device", or "host": a prefill's residual streams
    kv_device_layers: int = (
        _DEFAULTS.kv_device_layers
    )  # with the cache away: its first layers kept on the device

    def __post_init__(self) -> None:
        check_count("batches", self.batches, *COUNT_RANGES["batches"])
        check_count("batch_size", self.batch_size, *COUNT_RANGES["batch_size"])
        check_compression_ratio(self.compression_ratio)

    @property
    def device_budget(self) -> int:
        given = self.device_memory_bytes
        return self.machine.device_memory_bytes if given is None else given

    @property
    def host_budget(self) -> int:
        given = self.host_memory_bytes
        return self.machine.host_memory_bytes if given is None else given

    @property
    def reads_into_device(self) -> bool:
        """As the engine: a CPU device with no host budget reads blocks straight into its memory."""
        return self.machine.device == "cpu" and self.host_budget == 0

    def engine_options(self) -> EngineOptions:
        """The engine options this run corresponds to (the ones the residency and pipeline read)."""
        return EngineOptions(
            batches=self.batches,
            batch_size=self.batch_size,
            hot_experts=self.hot_experts,
            lookahead_layers=self.lookahead_layers,
            stream_window=self.stream_window,
            device_memory_bytes=self.device_budget,
            host_memory_bytes=self.host_budget,
            host_preload=self.host_preload,
            disk_queue_depth=self.machine.io_threads,
            prefetch=self.prefetch,
            eviction=self.eviction,
            schedule=self.schedule,
            expert_order=self.expert_order,
            kv_home=self.kv_home,
            kv_attention=self.kv_attention,
            activations_home=self.activations_home,
            kv_device_layers=self.kv_device_layers,
        )


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


def block_sizes_of(cost: CostModel) -> dict[BlockId, int]:
    """Every block of ``cost``'s model and its bytes, in model order."""
    sizes, spec = cost.sizes, cost.spec
    blocks = {embed_block(): sizes.embed}
    for layer in range(spec.num_layers):
        blocks |= {attn_block(layer): sizes.attn, gate_block(layer): sizes.gate}
        blocks |= {expert_block(layer, e): sizes.expert for e in range(spec.num_experts)}
    return blocks | {head_block(): sizes.head}


class Simulator:
    """The engine's residency manager and pipeline over simulated drivers and jobs; build it inside the
    virtual loop (:func:`~klotski_tier.core.plan.virtual_clock.run_virtual`)."""

    def __init__(
        self,
        spec: ModelSpec,
        sizes: Mapping[BlockId, int],
        options: EngineOptions,
        hardware: SimHardware,
        costs: JobCosts,
        *,
        fixed_device_bytes: int,
        reads_into_device: bool,
        compression_ratio: float | None = None,
        decode_gbps: float = 1.0,
        events: bool = False,
        host_kv_bytes: int = 0,
    ) -> None:
        clock = asyncio.get_running_loop().time
        self.spec, self.hardware, self.metrics = spec, hardware, RunMetrics()
        self.events = EventLog(clock) if events else None
        self.layouts = {block: BlockLayout(block, (), (), nbytes) for block, nbytes in sizes.items()}
        self.source = SimSource(hardware, sizes, compression_ratio=compression_ratio, decode_gbps=decode_gbps)
        self.device = SimDevice(hardware)
        host_ledger, device_ledger = make_ledgers(options, self.layouts, self.metrics)
        self.residency = Residency(
            self.layouts,
            source=self.source,
            host=SimHost(),
            device=self.device,
            host_ledger=host_ledger,
            device_ledger=device_ledger,
            disk_to_device=reads_into_device,
            disk_slots=options.disk_queue_depth,
            events=self.events,
            clock=clock,
        )
        self.residency.device.fixed_bytes = fixed_device_bytes
        self.residency.host.fixed_bytes = host_kv_bytes  # a KV cache in host RAM takes its room
        self.prefetch = make_prefetch(options.prefetch, **options.prefetch_options)
        self.pipeline = make_pipeline(
            spec,
            self.layouts,
            self.residency,
            SimJobs(
                hardware,
                costs,
                spec.num_experts,
                _kv_token_bytes(spec, options.kv_home),
                kv_home=options.kv_home,
                host_attention=options.kv_attention == HOST_ATTENTION,
                residual_token_bytes=_residual_token_bytes(spec, options.activations_home),
                device_layers=options.kv_device_layers,
            ),
            self.prefetch,
            self.metrics,
            options,
            events=self.events,
            clock=clock,
        )
        self._clock = clock

    @classmethod
    def for_config(
        cls, config: SimConfig, cost: CostModel, fixed_device_bytes: int, host_kv_bytes: int = 0
    ) -> Simulator:
        """The simulator of ``config``'s machine, budgets and options, with ``cost``'s job times."""
        machine = config.machine
        hardware = SimHardware.for_machine(machine, chunk_bytes=config.read_chunk_bytes)
        return cls(
            config.spec,
            block_sizes_of(cost),
            config.engine_options(),
            hardware,
            cost,
            fixed_device_bytes=fixed_device_bytes,
            reads_into_device=config.reads_into_device,
            compression_ratio=config.compression_ratio,
            decode_gbps=machine.zstd_decompress_gbps,
            host_kv_bytes=host_kv_bytes,
        )

    async def preload(self) -> None:
        """Every block into host RAM (``host.preload``), as the engine does before its first step."""
        total = sum(layout.nbytes for layout in self.layouts.values())
        if total > self.residency.host.capacity_bytes:
            raise BudgetError(
                f"host.preload needs the whole model in host memory ({format_size(total)}) but the host "
                f"budget is {format_size(self.residency.host.capacity_bytes)}; raise --host-memory"
            )
        for block in self.layouts:
            await self.residency.stage_in_host(block)

    async def step(self, batches: Sequence[SimBatch]) -> StepStats:
        """One forward step of ``batches``; what it took."""
        device, host = self.residency.device, self.residency.host
        device.stats.peak_bytes, host.stats.peak_bytes = (
            device.used_bytes + device.fixed_bytes,
            host.used_bytes,
        )
        start, busy = self._clock(), self.hardware.compute_busy_s
        read, copied = self.source.bytes_read, self.device.bytes_copied
        bubbles = dict(self.metrics.bubbles_s)
        await self.pipeline.forward(batches)
        return StepStats(
            tokens=sum(batch.tokens for batch in batches),
            step_s=self._clock() - start,
            compute_s=self.hardware.compute_busy_s - busy,
            inter_layer_s=self.metrics.bubbles_s[INTER_LAYER] - bubbles[INTER_LAYER],
            intra_layer_s=self.metrics.bubbles_s[INTRA_LAYER] - bubbles[INTRA_LAYER],
            bytes_moved={
                DISK_TO_HOST: self.source.bytes_read - read,
                HOST_TO_DEVICE: self.device.bytes_copied - copied,
            },
            peak_device_bytes=device.stats.peak_bytes,
            peak_host_bytes=host.stats.peak_bytes,
        )

    async def aclose(self) -> None:
        await self.residency.aclose()


def step_batches(
    sampler: RouteSampler, rng: np.random.Generator, sizes: Sequence[int], query_tokens: int, context: int
) -> list[SimBatch]:
    """Batches of ``sizes`` sequences for one step, their routes drawn from ``sampler`` (a sample of at
    most ``MAX_ROUTED_TOKENS`` per batch)."""
    samples = [min(size * query_tokens, MAX_ROUTED_TOKENS) for size in sizes]
    routes = sampler.sample(sum(samples), rng)  # [L, T, k]
    batches, first = [], 0
    for size, sample in zip(sizes, samples, strict=True):
        mine = routes[:, first : first + sample]  # [L, sample, k]
        batches.append(SimBatch(size, query_tokens, context, mine, size * query_tokens / sample))
        first += sample
    return batches


@dataclass(frozen=True)
class WorkloadResult:
    """A simulated ``generate``: prefill and decode totals (decode extrapolated past ``max_decode_steps``)."""

    batches: int
    batch_size: int
    hot_experts: int
    prefill: StepStats
    decode: StepStats

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill.tokens_per_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(
            prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s
        )
        return data


def _residual_token_bytes(spec: ModelSpec, home: str) -> int | None:
    """A residual stream's bytes per token where a prefill's wait in host RAM; None on the device."""
    return spec.hidden_size * spec.dtype.itemsize if home == HOST_ACTIVATIONS else None


def _kv_token_bytes(spec: ModelSpec, kv_home: str) -> int | None:
    """One layer's KV bytes per cached token where the cache lives away from the device (its copies
    priced on the host-to-device channel, also for a cache on the drive); None on the device."""
    return spec.kv_bytes_per_token() // spec.num_layers if kv_home != DEVICE_KV else None


def simulate_workload(
    config: SimConfig,
    *,
    sequences: int,
    prompt_tokens: int,
    new_tokens: int,
    max_decode_steps: int | None = None,
) -> WorkloadResult:
    """Simulate ``generate`` of ``sequences`` prompts of ``prompt_tokens`` tokens, ``new_tokens`` each.

    Groups of ``batches * batch_size`` sequences run one after the other on one simulator (blocks
    stay where the previous group left them). Simulated are the first group (from a cold start), the
    second (as every later full group: it starts where a group ended) and a smaller last group;
    the full groups in between are counted as the second. Decode steps past ``max_decode_steps`` of
    a group are counted at the mean of those simulated.
    """
    return run_virtual(_workload(config, sequences, prompt_tokens, new_tokens, max_decode_steps))


async def _workload(
    config: SimConfig, sequences: int, prompt_tokens: int, new_tokens: int, max_decode_steps: int | None
) -> WorkloadResult:
    cost = CostModel(config.spec, config.machine)
    group = (config.batches, config.batch_size, prompt_tokens, new_tokens)
    fixed = cost.fixed_device_bytes(
        *group,
        kv_home=config.kv_home,
        activations_home=config.activations_home,
        kv_device_layers=config.kv_device_layers,
    )
    host_kv = 0
    if config.kv_home == HOST_KV:  # but its first layers', kept on the device
        layers = config.spec.num_layers
        whole = config.batches * cost.kv_cache_bytes(config.batch_size, prompt_tokens, new_tokens)
        host_kv = whole * (layers - config.kv_device_layers) // layers
    if config.activations_home == HOST_ACTIVATIONS:
        host_kv += config.batches * cost.residual_bytes(config.batch_size, prompt_tokens)
    if host_kv and host_kv >= config.host_budget:
        raise BudgetError(
            f"the KV cache and activations of n={config.batches} batches of {config.batch_size} kept in host "
            f"RAM ({format_size(host_kv)}) do not fit the host budget {format_size(config.host_budget)}; "
            "lower n or bs, or raise --host-memory"
        )
    if config.kv_attention == HOST_ATTENTION and (
        config.machine.device == "cpu" or cost.host_attention_s(1, 1) is None
    ):
        raise ConfigError(no_host_attention(config.machine.name, config.machine.device))
    sim = Simulator.for_config(config, cost, fixed, host_kv)
    sampler = config.routing or ParametricRouting.for_spec(config.spec, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    prefill, decode = StepStats(), StepStats()
    try:
        if config.host_preload:
            await sim.preload()
        for count, times in group_plan(sequences, config.batches * config.batch_size):
            sizes = [min(config.batch_size, count - i) for i in range(0, count, config.batch_size)]
            prefill.add(await sim.step(step_batches(sampler, rng, sizes, prompt_tokens, 0)), times)
            steps = new_tokens - 1
            simulated = steps if max_decode_steps is None else min(steps, max_decode_steps)
            for index in range(simulated):
                stats = await sim.step(step_batches(sampler, rng, sizes, 1, prompt_tokens + index))
                decode.add(dataclasses.replace(stats, tokens=0), times * steps / simulated)
            decode.tokens += round(times * steps * count)  # every sequence runs to new_tokens: no EOS
    finally:
        await sim.aclose()
    hot = sim.pipeline.hot_experts
    return WorkloadResult(config.batches, config.batch_size, hot, prefill, decode)


def group_plan(sequences: int, group: int) -> list[tuple[int, int]]:
    """The groups to simulate, as ``(sequences in it, groups it stands for)``: the first, the second for
    itself and every later full group, a smaller last group."""
    full, rest = divmod(sequences, group)
    plan = [(group, 1)] if full else []
    if full > 1:
        plan.append((group, full - 1))
    return plan + ([(rest, 1)] if rest else [])


def sweep(
    config: SimConfig,
    batches: Sequence[int],
    *,
    sequences: int | Callable[[int], int],
    prompt_tokens: int,
    new_tokens: int,
    max_decode_steps: int | None = None,
) -> list[WorkloadResult]:
    """:func:`simulate_workload` for each n in ``batches`` (``sequences`` may depend on n)."""
    results = []
    for n in batches:
        count = sequences(n) if callable(sequences) else sequences
        run = dataclasses.replace(config, batches=n)
        result = simulate_workload(
            run,
            sequences=count,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            max_decode_steps=max_decode_steps,
        )
        results.append(result)
    return results
