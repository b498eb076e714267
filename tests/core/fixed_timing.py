"""Drivers and jobs slowed to fixed durations, for tests that compare schedules by their event logs.

:class:`FixedReadDisk` and :class:`FixedJobRunner` slow the engine's disk driver and compute runner;
:class:`FixedCosts` gives the simulator's jobs the same durations and :func:`fixed_hardware` its
drive. :func:`simulate_steps` runs steps of the engine's pipeline in the simulator with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from klotski_tier.core.model.blocks import BlockId
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.events import EventLog
from klotski_tier.core.plan.sim_hardware import SimHardware
from klotski_tier.core.plan.sim_jobs import SimBatch
from klotski_tier.core.plan.simulate import Simulator
from klotski_tier.core.plan.virtual_clock import run_virtual
from klotski_tier.core.runtime.compute import ComputeRunner
from klotski_tier.core.runtime.config import EngineOptions
from klotski_tier.core.units import GIB
from klotski_tier.tiers.base import CopyDone
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.ranges import FileRange

T = TypeVar("T")


class FixedReadDisk(DiskDriver):
    """Every block read takes ``read_s`` more (slept in the driver's thread) than its real read."""

    read_s: ClassVar[float] = 0.003

    async def read_into(self, pieces: Sequence[FileRange], dst: torch.Tensor) -> None:
        await self.run_blocking(lambda: time.sleep(self.read_s))
        await super().read_into(pieces, dst)


class FixedJobRunner(ComputeRunner):
    """Every compute job takes ``job_s``: its real work, then a sleep for the rest, in the compute thread."""

    job_s: ClassVar[float] = 0.05

    def _job(self, fn: Callable[..., T], args: tuple[Any, ...], ready: Sequence[CopyDone | None]) -> T:
        started = time.perf_counter()
        result = super()._job(fn, args, ready)
        time.sleep(max(0.0, self.job_s - (time.perf_counter() - started)))
        return result


class FixedCosts:
    """Every simulated job takes ``job_s``."""

    def __init__(self, job_s: float) -> None:
        self.job_s = job_s

    def embed_s(self, tokens: int) -> float:
        return self.job_s

    def attention_s(self, sequences: int, query_tokens: int, context_tokens: int) -> float:
        return self.job_s

    def gate_s(self, tokens: int) -> float:
        return self.job_s

    def gather_s(self, tokens: int) -> float:
        return self.job_s

    def expert_s(self, tokens: float) -> float:
        return self.job_s

    def combine_s(self, tokens: int) -> float:
        return self.job_s

    def head_s(self, sequences: int) -> float:
        return self.job_s


def fixed_hardware(read_s: float) -> SimHardware:
    """One I/O thread reading any block in ``read_s``; no copies (a CPU device reading into its memory)."""
    return SimHardware(read_seconds=lambda _: read_s, copy_seconds=lambda _: 0.0, chunk_bytes=GIB)


def simulate_steps(
    spec: ModelSpec,
    sizes: Mapping[BlockId, int],
    options: EngineOptions,
    steps: Sequence[Sequence[SimBatch]],
    *,
    read_s: float,
    job_s: float,
    fixed_device_bytes: int = 0,
) -> EventLog:
    """``steps`` (each a list of batches) through the engine's pipeline in the simulator; its event log."""

    async def run() -> EventLog:
        hardware, costs = fixed_hardware(read_s), FixedCosts(job_s)
        sim = Simulator(spec, sizes, options, hardware, costs, fixed_device_bytes=fixed_device_bytes,
                        reads_into_device=True, events=True)  # fmt: skip
        for batches in steps:
            await sim.step(batches)
        await sim.aclose()
        assert sim.events is not None
        return sim.events

    return run_virtual(run())


def split_batches(
    routes: npt.NDArray[np.int64], batches: int, sequences: int, query: int, context: int
) -> list[SimBatch]:
    """One step's routes [L, T, k] (batch after batch, every token routed) as ``batches`` SimBatches."""
    tokens = sequences * query
    slices = [routes[:, b * tokens : (b + 1) * tokens] for b in range(batches)]  # [L, tokens, k] each
    return [SimBatch(sequences, query, context, mine) for mine in slices]
