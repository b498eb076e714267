"""The simulated machine under the engine's residency manager: a drive, its I/O threads, one copy
channel and one compute unit, in virtual time (:mod:`~klotski_tier.core.plan.virtual_clock`).

:class:`SimHardware` models what the engine's tier drivers and compute thread take time for:

- the drive: a block's read is cut into chunks of at most ``chunk_bytes`` (as the disk driver cuts
  it); ``io_threads`` threads take chunks first come, first served; the chunks being read share the
  drive's bandwidth equally (``read_seconds(nbytes)`` is a read alone). A compressed block is
  decoded in the thread of its last chunk, which holds the thread but not the drive;
- the copy channel: host-to-device copies one at a time, in order (one copy stream);
- the host's attention thread (decode attention over a KV cache in host RAM): one job at a time;
- compute: one job at a time (the compute thread). On a machine whose compute slows while the drive
  streams (``io_compute_slowdown`` c), a job progresses at 1/(1+c) of its rate while any chunk is
  being read and at its full rate otherwise, so a job beside D seconds of reading takes
  D*c/(1+c) seconds more. The step model (:mod:`~klotski_tier.core.plan.pipeline_model`) charges
  the same.

The drive and the compute unit are one fluid model: every change (a read starts or ends, a job
starts or ends) brings both up to the present and sets one timer for the next change.

:class:`SimSource`, :class:`SimHost` and :class:`SimDevice` are the three driver protocols of the
residency manager on top of it. Their buffers are ``meta`` tensors: shapes without storage, so a
simulated run of a model of hundreds of GB allocates nothing.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from klotski_tier.core.model.blocks import BlockId
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.units import GB
from klotski_tier.tiers.base import CopyDone
from klotski_tier.tiers.disk_defaults import DEFAULT_CHUNK_BYTES

DONE_S = 1e-12
"""Work (seconds at full rate) below which a read or a job counts as finished: float rounding of the
shared-bandwidth progress."""
CLOCK_ULPS = 64
"""A read or job this many units in the last place of the clock from its end is done (see _on_timer)."""

META = torch.device("meta")


@dataclass(eq=False)
class _Read:
    """One chunk of a block: ``left`` seconds of drive time alone, then ``decode_s`` in its thread."""

    left: float
    decode_s: float
    block: _BlockRead


@dataclass(eq=False)
class _BlockRead:
    chunks_left: int
    done: asyncio.Future[None]


@dataclass(eq=False)
class _Job:
    left: float  # seconds of work at the full rate
    done: asyncio.Future[None]


@dataclass
class SimHardware:
    """A drive with its I/O threads, a copy channel and a compute unit, in virtual time."""

    read_seconds: Callable[[int], float]  # a read of that many bytes alone on the drive
    copy_seconds: Callable[[int], float]  # a host-to-device copy of that many bytes
    io_threads: int = 1
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    io_compute_slowdown: float = 0.0
    compute_busy_s: float = 0.0  # virtual seconds the compute unit was busy
    drive_busy_s: float = 0.0  # virtual seconds at least one chunk was being read
    _queue: deque[_Read] = field(default_factory=deque)  # chunks waiting for a thread
    _reading: list[_Read] = field(default_factory=list)  # chunks on the drive
    _decoding: int = 0  # threads decoding a chunk
    _job: _Job | None = None
    _since: float = 0.0  # the model is up to date until this time
    _timer: asyncio.TimerHandle | None = None
    _copy_free_s: float = 0.0  # when the copy channel is next free
    _host_free_s: float = 0.0  # when the host's attention thread is next free

    @classmethod
    def for_machine(
        cls, machine: Machine, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, io_threads: int | None = None
    ) -> SimHardware:
        """``machine``'s drive, copy link and compute contention (``io_threads`` defaults to its own)."""
        return cls(
            read_seconds=machine.disk_seconds,
            copy_seconds=machine.host_to_device_seconds,
            io_threads=machine.io_threads if io_threads is None else io_threads,
            chunk_bytes=chunk_bytes,
            io_compute_slowdown=machine.io_compute_slowdown,
        )

    # ---- the drive ---------------------------------------------------------------------------

    async def read(self, nbytes: int, decode_s: float = 0.0) -> None:
        """Read ``nbytes`` in chunks through the I/O threads; the last chunk's thread then decodes for
        ``decode_s``. Returns when every chunk is done."""
        loop = asyncio.get_running_loop()
        chunks = max(1, math.ceil(nbytes / self.chunk_bytes))
        block = _BlockRead(chunks, loop.create_future())
        self._update()
        for index in range(chunks):
            size = min(self.chunk_bytes, nbytes - index * self.chunk_bytes)
            last = index == chunks - 1
            self._queue.append(_Read(self.read_seconds(max(size, 0)), decode_s if last else 0.0, block))
        self._start_reads()
        self._reschedule()
        await block.done

    def _start_reads(self) -> None:
        while self._queue and len(self._reading) + self._decoding < self.io_threads:
            self._reading.append(self._queue.popleft())

    def _read_done(self, read: _Read) -> None:
        if read.decode_s > 0:
            self._decoding += 1
            asyncio.get_running_loop().call_later(read.decode_s, self._decoded, read)
            return
        self._chunk_done(read)

    def _decoded(self, read: _Read) -> None:
        self._update()
        self._decoding -= 1
        self._chunk_done(read)
        self._start_reads()
        self._reschedule()

    @staticmethod
    def _chunk_done(read: _Read) -> None:
        read.block.chunks_left -= 1
        if read.block.chunks_left == 0:
            read.block.done.set_result(None)

    # ---- the copy channel --------------------------------------------------------------------

    async def copy(self, nbytes: int) -> tuple[float, float]:
        """One host-to-device copy after those queued before it; its (start, end) times."""
        now = asyncio.get_running_loop().time()
        start = max(now, self._copy_free_s)
        end = self._copy_free_s = start + self.copy_seconds(nbytes)
        await asyncio.sleep(end - now)
        return start, end

    async def host_compute(self, seconds: float) -> None:
        """One job on the host's cores (decode attention over a cache in host RAM), after those queued
        before it: the host's attention thread, beside the device's compute unit."""
        now = asyncio.get_running_loop().time()
        end = self._host_free_s = max(now, self._host_free_s) + seconds
        await asyncio.sleep(end - now)

    # ---- compute -----------------------------------------------------------------------------

    async def compute(self, seconds: float) -> None:
        """One job of ``seconds`` alone (slower beside drive reads); one job at a time."""
        if seconds <= 0:
            return
        assert self._job is None, "the compute unit runs one job at a time"
        self._update()
        job = self._job = _Job(seconds, asyncio.get_running_loop().create_future())
        self._reschedule()
        await job.done

    def _compute_rate(self) -> float:
        return 1.0 / (1.0 + self.io_compute_slowdown) if self._reading else 1.0

    # ---- the fluid model ---------------------------------------------------------------------

    def _update(self) -> None:
        """Bring reads and the job up to the present."""
        now = asyncio.get_running_loop().time()
        elapsed = now - self._since
        self._since = now
        if elapsed <= 0:
            return
        if self._job is not None:
            self._job.left -= elapsed * self._compute_rate()
            self.compute_busy_s += elapsed
        if self._reading:
            share = elapsed / len(self._reading)  # the drive's time, split evenly
            for read in self._reading:
                read.left -= share
            self.drive_busy_s += elapsed

    def _reschedule(self) -> None:
        """One timer for the next change: the first read or the job to finish."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waits = []
        if self._reading:
            waits.append(min(read.left for read in self._reading) * len(self._reading))
        if self._job is not None:
            waits.append(self._job.left / self._compute_rate())
        if waits:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(self._since + max(0.0, min(waits)), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._update()
        # done within the clock's own rounding too: far into a run (a slow drive's simulated days) a
        # timer cannot land closer to the end than a few ulps of the time, and the loop would spin on
        # a remainder no timer can reach
        done_s = max(DONE_S, CLOCK_ULPS * math.ulp(self._since))
        for read in [r for r in self._reading if r.left <= done_s]:
            self._reading.remove(read)
            self._read_done(read)
        job = self._job
        if job is not None and job.left <= done_s:
            self._job = None
            job.done.set_result(None)
        self._start_reads()
        self._reschedule()


class SimSource:
    """The residency manager's :class:`~klotski_tier.core.runtime.residency.BlockReader` on simulated
    hardware: a block read from a store compressed ``compression_ratio`` times is that much smaller on
    the drive and decoded at ``decode_gbps`` in its last chunk's thread."""

    def __init__(
        self,
        hardware: SimHardware,
        sizes: Mapping[BlockId, int],
        *,
        compression_ratio: float | None = None,
        decode_gbps: float = 1.0,
    ) -> None:
        self._hardware = hardware
        self._sizes = sizes
        self._ratio = compression_ratio
        self._decode_gbps = decode_gbps
        self.bytes_read = 0  # raw bytes of the blocks read (before decoding)

    def buffer_bytes(self, block: BlockId) -> int:
        return self._sizes[block]

    async def read(self, block: BlockId, dst: torch.Tensor) -> None:
        nbytes = self._sizes[block]
        stored = math.ceil(nbytes / (self._ratio or 1.0))
        decode_s = nbytes / (self._decode_gbps * GB) if self._ratio else 0.0
        await self._hardware.read(stored, decode_s)
        self.bytes_read += nbytes


class SimHost:
    """Host buffers without storage (the residency manager's ``HostBuffers``)."""

    async def aallocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=META)  # [nbytes] shape only


class SimDevice:
    """Device buffers without storage and copies on the simulated copy channel (``DeviceBuffers``)."""

    def __init__(self, hardware: SimHardware) -> None:
        self._hardware = hardware
        self.bytes_copied = 0

    async def aplace(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=META)  # [nbytes] shape only

    def release(self, buffer: torch.Tensor) -> None:
        """Nothing to give back: a meta tensor holds no memory."""

    async def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> CopyDone:
        nbytes = src.numel()
        start, end = await self._hardware.copy(nbytes)
        self.bytes_copied += nbytes
        return CopyDone(None, start, end)
