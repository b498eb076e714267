"""One run's machinery, wired together: tier drivers, ledgers, residency, compute, pipeline.

:class:`Runtime` is an async context manager. Building it starts nothing (drivers start their
threads on first use); leaving it cancels outstanding loads, waits until no driver thread touches
a buffer, and shuts every executor down. :func:`check_budgets` refuses, before any byte moves,
budgets that cannot hold the minimum working set, and says what that minimum is.
:func:`make_ledgers` and :func:`make_pipeline` build the tiers' ledgers (the device's with its
streaming window) and the pipeline from the options, for the engine and the simulator alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import torch

from klotski_tier.core.errors import BudgetError, ConfigError
from klotski_tier.core.model.blocks import BlockId, BlockKind, BlockLayout
from klotski_tier.core.model.layouts import largest_block_bytes, total_block_bytes
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.events import EventLog
from klotski_tier.core.observe.metrics import RunMetrics, TierStats
from klotski_tier.core.observe.routing_trace import RoutingRecorder, TraceMeta
from klotski_tier.core.observe.timeline import Timeline
from klotski_tier.core.paths import default_cache_dir
from klotski_tier.core.runtime.activations import HostResiduals
from klotski_tier.core.runtime.budgets import DERIVED, Budgets
from klotski_tier.core.runtime.compute import ComputeRunner
from klotski_tier.core.runtime.config import (
    DEVICE_ACTIVATIONS,
    HOST_ACTIVATIONS,
    HOST_ATTENTION,
    KLOTSKI,
    EngineOptions,
)
from klotski_tier.core.runtime.host_attention import HostAttention
from klotski_tier.core.runtime.jobs import BatchT, LogitsT, RoutingT, StepJobs, TokensT
from klotski_tier.core.runtime.kv import DEVICE_KV, DISK_KV, HOST_KV, DiskKv, HostKv
from klotski_tier.core.runtime.ledger import TierLedger
from klotski_tier.core.runtime.model_jobs import ModelJobs
from klotski_tier.core.runtime.pipeline import Pipeline
from klotski_tier.core.runtime.residency import DEVICE, HOST, Residency
from klotski_tier.core.runtime.sequences import (
    GenSequence,
    group_activation_bytes,
    host_residual_bytes,
    kv_cache_bytes,
    kv_device_bytes,
)
from klotski_tier.core.store.block_source import BlockSource
from klotski_tier.core.store.files import ModelFiles
from klotski_tier.core.units import format_size
from klotski_tier.policies.prefetch import PrefetchPolicy
from klotski_tier.policies.registry import make_eviction, make_prefetch
from klotski_tier.tiers.device import DeviceDriver, resolve_device
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.host import HostDriver
from klotski_tier.tiers.registry import TIER_DRIVERS

logger = logging.getLogger(__name__)

KV_SCRATCH = "kv-scratch"  # under the cache directory: each run's KV files, in a directory of its own

UNLIMITED_BYTES = 1 << 62
"""Budget of a tier the user did not limit."""


def fixed_device_bytes(
    files: ModelFiles,
    groups: Sequence[Sequence[GenSequence]],
    batch_size: int,
    kv_home: str = DEVICE_KV,
    activations_home: str = DEVICE_ACTIVATIONS,
    kv_device_layers: int = 0,
) -> int:
    """Device bytes held outside weight blocks by the largest group: KV cache (all of it, or the two
    slots it streams through from host RAM: runtime/kv.py) and activations (runtime/activations.py)."""
    worst = 0
    for group in groups:
        parts = _batches_of(group, batch_size)
        kv = kv_device_bytes(parts, files.spec, kv_home, kv_device_layers)
        activations = group_activation_bytes(parts, files.spec, activations_home)
        worst = max(worst, kv + activations)
    return worst


def minimum_budgets(
    files: ModelFiles, options: EngineOptions, groups: Sequence[Sequence[GenSequence]]
) -> tuple[int, int, int]:
    """(device minimum, host minimum, device bytes outside weights) for these batch groups.

    The pipeline needs, on the device, the KV cache and activations of a batch group plus the
    largest single block (one block leased at a time is enough to make progress); on the host,
    room to stage the largest block on its way from disk.
    """
    block = largest_block_bytes(files.layouts)
    fixed = fixed_device_bytes(
        files, groups, options.batch_size, options.kv_home, options.activations_home, options.kv_device_layers
    )
    kv = host_kv_bytes(files, groups, options)
    if reads_into_device(options):  # a CPU device without a host tier: host RAM is the device's pool
        return fixed + kv + block, 0, fixed + kv
    return fixed + block, block + kv, fixed


def host_kv_bytes(files: ModelFiles, groups: Sequence[Sequence[GenSequence]], options: EngineOptions) -> int:
    """Host RAM the largest group keeps there outside weights: its KV cache where it lives there
    ([kv] home = "host") and its prefill's residual streams where they wait there ([activations] home =
    "host"), counted against the host budget (on a CPU device without a host tier, against the
    device's, the same memory)."""
    spec, worst = files.spec, 0
    for group in groups:
        parts = _batches_of(group, options.batch_size)
        kv = 0
        if options.kv_home == HOST_KV:  # but its first layers', on the device
            at_home = spec.num_layers - options.kv_device_layers
            kv = sum(kv_cache_bytes(part, spec) for part in parts) * at_home // spec.num_layers
        worst = max(worst, kv + host_residual_bytes(parts, spec, options.activations_home))
    return worst


def _batches_of(group: Sequence[GenSequence], batch_size: int) -> list[Sequence[GenSequence]]:
    """A group's sequences cut into its batches, as the engine runs them."""
    return [group[i : i + batch_size] for i in range(0, len(group), batch_size)]


def reads_into_device(options: EngineOptions) -> bool:
    """Whether blocks skip the host tier: a CPU device (its memory is host memory) with a host budget
    of zero reads every block from disk straight into its device buffer."""
    return options.host_memory_bytes == 0 and resolve_device(options.device).type == "cpu"


def check_budgets(
    files: ModelFiles,
    options: EngineOptions,
    groups: Sequence[Sequence[GenSequence]],
    budgets: Budgets | None = None,
) -> None:
    """Raise :class:`BudgetError`, before any byte moves, when a budget is below its minimum;
    ``budgets`` says which were derived from the memory limit (the error then names it)."""
    device_min, host_min, fixed = minimum_budgets(files, options, groups)
    if options.device_memory_bytes is not None and options.device_memory_bytes < device_min:
        detail = f"KV cache and activations {format_size(fixed)} + " if fixed else ""
        if budgets is not None and budgets.device_source == DERIVED:
            raise BudgetError(
                f"{budgets.limit.describe()}: that leaves {format_size(options.device_memory_bytes)} for the "
                f"device after {format_size(budgets.reserve_bytes)} kept for the runtime, below the minimum "
                f"working set {_exact(device_min)}: {detail}largest block {format_size(device_min - fixed)}; "
                "raise the memory limit or lower --batches/--batch-size"
            )
        raise BudgetError(
            f"device memory budget {format_size(options.device_memory_bytes)} is below the minimum "
            "working set "
            f"{_exact(device_min)}: {detail}largest block {format_size(device_min - fixed)}; "
            "raise --device-memory or lower --batches/--batch-size"
        )
    if options.host_memory_bytes is not None and options.host_memory_bytes < host_min:
        kv = host_kv_bytes(files, options=options, groups=groups)
        if kv:
            raise BudgetError(
                f"host memory budget {format_size(options.host_memory_bytes)} is below the minimum working "
                f"set {_exact(host_min)}: the KV cache and activations kept in host RAM {format_size(kv)}"
                f"{'' if host_min == kv else ' and room to stage the largest block'}; raise --host-memory or "
                'keep them on the device ([kv] home = "device", [activations] home = "device")'
            )
        raise BudgetError(
            f"host memory budget {format_size(options.host_memory_bytes)} is below the minimum working set "
            f"{_exact(host_min)} to stage the largest block; raise --host-memory (0 is allowed with a CPU "
            "device: blocks are then read straight into device memory)"
        )


def hot_experts(spec: ModelSpec, options: EngineOptions) -> int:
    """K, the experts prefetched per layer: the option ("all": every expert), else the router's top-k."""
    if options.hot_experts is None:
        return spec.top_k
    if isinstance(options.hot_experts, str):  # ALL_EXPERTS
        return spec.num_experts
    return options.hot_experts


def make_ledger(
    name: str, budget: int | None, options: EngineOptions, metrics: RunMetrics, window: int | None = None
) -> TierLedger:
    """The ledger of tier ``name`` with byte budget ``budget`` (None: unlimited), evicting by the options'
    policy, its traffic counted in ``metrics.tiers[name]``; ``window``: its streaming window in bytes."""
    capacity = UNLIMITED_BYTES if budget is None else budget
    stats = TierStats(name, capacity)
    metrics.tiers[name] = stats
    eviction = make_eviction(options.eviction, **options.eviction_options)
    return TierLedger(name, capacity, eviction, stats, window_bytes=window)


def make_ledgers(
    options: EngineOptions, layouts: Mapping[BlockId, BlockLayout], metrics: RunMetrics
) -> tuple[TierLedger, TierLedger]:
    """(host, device) ledgers of a run, the engine's or the simulator's: the options' budgets, and the
    device's streaming window."""
    host = make_ledger(HOST, options.host_memory_bytes, options, metrics)
    window = stream_window_bytes(options, layouts)
    return host, make_ledger(DEVICE, options.device_memory_bytes, options, metrics, window)


def stream_window_bytes(options: EngineOptions, layouts: Mapping[BlockId, BlockLayout]) -> int | None:
    """The device's streaming window (``[pipeline] stream_window`` largest experts), where blocks come
    from the drive; None: no cap. None too where host RAM holds the whole model (preloaded, or a host
    budget that holds it): what the device keeps then saves copies from RAM, not reads, and is worth
    less than the copies a full window would overlap with compute; and under the sequential baseline,
    whose waves wait for every block of a wave at once."""
    if options.stream_window == 0 or options.schedule != KLOTSKI:
        return None
    host = options.host_memory_bytes
    if options.host_preload or host is None or host >= total_block_bytes(layouts):
        return None
    experts = [layout.nbytes for block, layout in layouts.items() if block.kind is BlockKind.EXPERT]
    return options.stream_window * max(experts or [layout.nbytes for layout in layouts.values()])


def make_pipeline(
    spec: ModelSpec,
    layouts: Mapping[BlockId, BlockLayout],
    residency: Residency,
    jobs: StepJobs[BatchT, RoutingT, TokensT, LogitsT],
    prefetch: PrefetchPolicy,
    metrics: RunMetrics,
    options: EngineOptions,
    **observers: Any,
) -> Pipeline[BatchT, RoutingT, TokensT, LogitsT]:
    """The pipeline the options ask for (schedule, expert order, K); ``observers`` are the pipeline's
    recorder, timeline, events and clock."""
    return Pipeline(
        spec,
        residency,
        jobs,
        prefetch,
        metrics,
        hot_experts=hot_experts(spec, options),
        lookahead_layers=options.lookahead_layers,
        schedule=options.schedule,
        expert_order=options.expert_order,
        layouts=layouts,
        **observers,
    )


def check_options(files: ModelFiles, options: EngineOptions) -> None:
    """Check what depends on the model, and resolve every plugin name now, so that a typo fails
    at load, not mid-run."""
    if hot_experts(files.spec, options) > files.spec.num_experts:
        raise ConfigError(
            f"hot_experts K={options.hot_experts} exceeds the model's {files.spec.num_experts} experts per "
            f"layer; choose K between 0 and {files.spec.num_experts}"
        )
    check_plugins(options)
    if options.host_preload and options.host_memory_bytes is not None:
        total = total_block_bytes(files.layouts)
        if options.host_memory_bytes < total:
            raise BudgetError(
                f"host.preload needs the whole model in host memory ({_exact(total)}) but the host budget is "
                f"{format_size(options.host_memory_bytes)}; raise --host-memory or turn preload off"
            )


def check_plugins(options: EngineOptions) -> None:
    """Resolve every plugin the options name and build the policies with their options, as a run does:
    an unknown name, option or value fails here, not mid-run (``config show`` checks the same)."""
    make_prefetch(options.prefetch, **options.prefetch_options)
    make_eviction(options.eviction, **options.eviction_options)
    _disk_driver(options.disk_driver)


def _disk_driver(name: str) -> type[DiskDriver]:
    driver = TIER_DRIVERS.get(name)
    if not (isinstance(driver, type) and issubclass(driver, DiskDriver)):
        raise ConfigError(f"tier driver {name!r} cannot serve as the disk tier; it must subclass DiskDriver")
    return driver


def _exact(nbytes: int) -> str:
    return f"{format_size(nbytes)} ({nbytes} bytes)"


class Runtime:
    """Drivers, residency, compute and pipeline for one ``generate`` call."""

    def __init__(
        self,
        files: ModelFiles,
        options: EngineOptions,
        prefetch: PrefetchPolicy,
        *,
        record_routing: bool = False,
        timeline: bool = False,
        events: bool = False,
    ) -> None:
        self.files = files
        self.options = options
        self.metrics = RunMetrics()
        self.timeline = Timeline() if timeline else None
        self.events = EventLog(time.perf_counter) if events else None
        self.recorder = RoutingRecorder(TraceMeta.of(files.spec)) if record_routing else None
        # A packed store's blocks and a checkpoint's block reads (layouts.py) are 4 KiB-aligned ranges.
        self.disk = _disk_driver(options.disk_driver)(
            queue_depth=options.disk_queue_depth, direct=options.disk_direct
        )
        self.device_driver = DeviceDriver(options.device)
        self.host_driver = HostDriver(pin=self.device_driver.device.type == "cuda")  # a GPU reads them
        self.device: torch.device = self.device_driver.device
        self.compute = ComputeRunner(self.device_driver, self.timeline)
        if options.kv_device_layers >= files.spec.num_layers:
            raise ConfigError(
                f"kv_device_layers = {options.kv_device_layers} keeps every one of the model's "
                f'{files.spec.num_layers} layers\' cache on the device: set [kv] home = "device" instead'
            )
        self.kv: HostKv | None = None  # None: the KV cache lives on the device
        if options.kv_home == HOST_KV:
            self.kv = HostKv(self.device_driver, files.spec, self.timeline)
        elif options.kv_home == DISK_KV:
            scratch = default_cache_dir() / KV_SCRATCH
            self.kv = DiskKv(self.device_driver, files.spec, scratch, self.timeline)
        self.residuals: HostResiduals | None = None  # a prefill's residual streams in host RAM
        if options.activations_home == HOST_ACTIVATIONS:
            self.residuals = HostResiduals(self.device_driver, files.spec, self.timeline)
        self.host_attention: HostAttention | None = None  # decode attention on the host's cores
        if options.kv_attention == HOST_ATTENTION:
            self.host_attention = HostAttention(self.device_driver, files.spec, self.timeline)
        host_ledger, device_ledger = make_ledgers(options, files.layouts, self.metrics)
        self.residency = Residency(
            files.layouts,
            source=BlockSource(files.layouts, self.disk, files.store),
            host=self.host_driver,
            device=self.device_driver,
            host_ledger=host_ledger,
            device_ledger=device_ledger,
            timeline=self.timeline,
            disk_to_device=reads_into_device(options),
            disk_slots=options.disk_queue_depth,  # one block per read the driver keeps in flight
            events=self.events,
        )
        self.pipeline = make_pipeline(
            files.spec,
            files.layouts,
            self.residency,
            ModelJobs(
                files.spec,
                self.compute,
                self.kv,
                self.host_attention,
                self.residuals,
                options.kv_device_layers,
            ),
            prefetch,
            self.metrics,
            options,
            recorder=self.recorder,
            timeline=self.timeline,
            events=self.events,
        )

    async def preload_host(self, progress: Callable[[str, int, int], None] | None = None) -> None:
        """Read every block into host RAM (``host.preload``), so that steps only copy host to device."""
        blocks = sorted(self.files.layouts)
        for done, block in enumerate(blocks, 1):
            await self.residency.stage_in_host(block)
            if progress:
                progress("preload", done, len(blocks))

    async def reserve(self, groups: Sequence[Sequence[GenSequence]]) -> None:
        """Count the KV cache and activations of the largest group against the device budget; on CUDA
        with a device budget, reserve the rest of it for the weights (an arena, so that the budget is
        memory actually held, not bytes a caching allocator may round up and fragment)."""
        ledger = self.residency.device
        _, _, ledger.fixed_bytes = minimum_budgets(self.files, self.options, groups)
        kv = host_kv_bytes(self.files, groups, self.options)  # 0 unless the KV cache lives in host RAM
        self.residency.host.fixed_bytes = 0 if reads_into_device(self.options) else kv
        if self.kv is not None:
            bs = self.options.batch_size
            positions = max(len(s.prompt) + s.max_new_tokens for group in groups for s in group)
            self.kv.reserve(min(bs, max(len(group) for group in groups)), positions)
        if self.residuals is not None:
            prompt = max(len(s.prompt) for group in groups for s in group)
            self.residuals.reserve(min(self.options.batch_size, max(len(group) for group in groups)), prompt)
        if self.device.type == "cuda" and self.options.device_memory_bytes is not None:
            await self.device_driver.reserve(ledger.capacity_bytes - ledger.fixed_bytes)

    def finish(self) -> RunMetrics:
        self.metrics.compute_s = self.compute.busy_s
        self.metrics.io_busy_s = self.disk.busy_s
        self.metrics.disk_bytes_read = self.disk.bytes_read
        if self.kv is not None:
            self.metrics.kv_bytes_in, self.metrics.kv_bytes_out = self.kv.bytes_in, self.kv.bytes_out
        if self.residuals is not None:
            self.metrics.activation_bytes_in = self.residuals.bytes_in
            self.metrics.activation_bytes_out = self.residuals.bytes_out
        if self.host_attention is not None:
            self.metrics.host_attention_s = self.host_attention.busy_s
            self.metrics.host_attention_bytes = self.host_attention.bytes_in + self.host_attention.bytes_out
        return self.metrics

    async def __aenter__(self) -> Runtime:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.residency.aclose()
        finally:
            self.compute.close()
            if self.host_attention is not None:
                self.host_attention.close()
            if self.residuals is not None:
                await self.residuals.drain_quietly()
            if self.kv is not None:
                await self.kv.drain_quietly()
                await self.kv.aclose()  # a cache on the drive: its files go
            await self.disk.aclose()
            await self.host_driver.aclose()
            await self.device_driver.aclose()
