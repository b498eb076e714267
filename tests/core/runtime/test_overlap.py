"""I/O overlaps compute for real, and the event loop keeps ticking while a read is slow.

The disk driver is wrapped so that each read takes a known extra time in its worker thread (a
slow drive), and the compute runner so that each job takes a comparable extra time (a slow
device). A run's wall time must then stay well below the sum of its I/O and compute times.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.registry import Registry
from klotski_tier.core.runtime import run as runtime
from klotski_tier.core.runtime.compute import ComputeRunner
from klotski_tier.tiers.base import TierDriver
from klotski_tier.tiers.device import CopyDone
from klotski_tier.tiers.disk import DiskDriver
from tests.checkpoints import make_checkpoint

T = TypeVar("T")

READ_DELAY_S = 0.02  # extra time of every disk read (a slow drive)
COMPUTE_DELAY_S = 0.02  # extra time of every compute job (~10 jobs per layer: comparable to its reads)
OVERLAP_TARGET = 0.75  # wall time must stay below this share of I/O time + compute time
PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [40, 41, 42, 43]]


class SlowDisk(DiskDriver):
    """Each read takes READ_DELAY_S longer, spent in the worker thread like a slow drive's latency."""

    in_progress = 0
    lock = threading.Lock()

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        with SlowDisk.lock:
            SlowDisk.in_progress += 1
        try:
            time.sleep(READ_DELAY_S)
            return super()._read_chunk(fd, file_offset, view)
        finally:
            with SlowDisk.lock:
                SlowDisk.in_progress -= 1


class SlowCompute(ComputeRunner):
    """Each compute job takes COMPUTE_DELAY_S longer, in the compute thread."""

    def _job(self, fn: Callable[..., T], args: tuple[Any, ...], ready: Sequence[CopyDone | None]) -> T:
        def slow(*inner: Any) -> T:
            time.sleep(COMPUTE_DELAY_S)
            return fn(*inner)

        return super()._job(slow, args, ready)


@pytest.fixture
def slow_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    drivers: Registry[type[TierDriver]] = Registry(
        "tier driver", "klotski_tier.tiers", {"disk": "klotski_tier.tiers.disk:DiskDriver"}
    )
    drivers.register("slow-disk", SlowDisk)  # a private registry: the global one stays as shipped
    monkeypatch.setattr(runtime, "TIER_DRIVERS", drivers)
    monkeypatch.setattr(runtime, "ComputeRunner", SlowCompute)
    directory = make_checkpoint(tmp_path / "ckpt", "mixtral", num_layers=4, num_experts=4)
    probe = Engine.load(directory, EngineOptions(batches=2, batch_size=2))
    device_min, host_min = probe.minimum_budgets(PROMPTS, max_new_tokens=3)
    options = EngineOptions(
        batches=2,
        batch_size=2,
        device_memory_bytes=device_min + 8 * probe.spec.expert_bytes,  # half the experts: they stream
        host_memory_bytes=host_min + 8 * probe.spec.expert_bytes,  # ... from disk, again and again
        disk_queue_depth=1,  # reads one at a time: their summed time is the drive's busy time
        disk_driver="slow-disk",
    )
    return Engine.load(directory, options)


def test_wall_time_is_well_below_io_plus_compute(slow_engine: Engine) -> None:
    result = slow_engine.generate(PROMPTS, max_new_tokens=3)
    metrics = result.metrics
    serial = metrics.io_busy_s + metrics.compute_s
    assert metrics.tiers["host"].transfers > 20, "the run should stream many blocks from disk"
    assert metrics.io_busy_s > 0.3 * serial and metrics.compute_s > 0.3 * serial, "I/O and compute comparable"
    assert metrics.wall_s < OVERLAP_TARGET * serial, (
        f"wall {metrics.wall_s:.2f} s vs I/O {metrics.io_busy_s:.2f} s + compute {metrics.compute_s:.2f} s"
    )


def test_event_loop_ticks_during_slow_reads(slow_engine: Engine) -> None:
    async def scenario() -> tuple[int, int]:
        ticks_during_reads = 0
        generating = asyncio.ensure_future(slow_engine.agenerate(PROMPTS, max_new_tokens=2))
        while not generating.done():
            await asyncio.sleep(0.001)
            ticks_during_reads += SlowDisk.in_progress > 0
        result = await generating
        return ticks_during_reads, result.metrics.tiers["host"].transfers

    ticks, reads = asyncio.run(scenario())
    assert ticks >= reads, f"the loop ticked {ticks} times during {reads} slow reads"
