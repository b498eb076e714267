"""The device tier: buffers where compute runs, filled from host memory.

On CUDA a copy is enqueued on the driver's own copy stream (never the compute stream), an
event is recorded after it, and the driver's single worker thread waits on that event, so the
event loop never blocks; the compute stream then waits on the event (:meth:`wait_ready`)
instead of synchronizing the device. Without CUDA the "device" is the CPU: the copy runs in
the same single worker thread and :meth:`wait_ready` is a no-op.

Buffers. :meth:`reserve` sets aside the weight budget once, as an :class:`~klotski_tier.tiers.arena.
Arena` (the runtime does so on CUDA when the device budget is set): :meth:`aplace` then places a
block in it, or answers ``None`` when no free region holds it, and :meth:`release` gives a block's
region back once the kernels queued on :attr:`compute_stream` so far are done (an event, polled).
Without an arena :meth:`aplace` allocates a fresh buffer (a CUDA one in the driver's thread) and
:meth:`release` marks it used on the compute stream (``record_stream``), so the caching allocator
reuses it only after those kernels. Either way no CUDA allocation runs on the event loop's thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from klotski_tier.core.errors import ConfigError
from klotski_tier.tiers.arena import Arena
from klotski_tier.tiers.base import CopyDone, MemoryTierDriver, check_copy_args

__all__ = ["CopyDone", "DeviceDriver"]

logger = logging.getLogger(__name__)

DEVICE_COPY_THREADS = 1
"""One worker: copies on one stream are serial anyway, and the thread mostly waits on events."""

SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device of a supported type (present or not); else a ConfigError."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"cannot parse device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type not in SUPPORTED_DEVICE_TYPES:
        raise ConfigError(f"device type {resolved.type!r} is not supported; use 'cpu', 'cuda' or 'cuda:N'")
    return resolved


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else the CPU; CUDA without a CUDA device is a ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} needs CUDA, and no CUDA device is available; use 'cpu'")
    return resolved


class DeviceDriver(MemoryTierDriver):
    """Allocates flat ``uint8`` buffers on the compute device and copies host tensors into them."""

    name = "device"

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)
        super().__init__(max_workers=DEVICE_COPY_THREADS)
        self._stream: Any | None = None  # torch.cuda.Stream, created on the first CUDA copy
        self._compute_stream: Any | None = None  # the stream compute runs on (CUDA)
        self.arena: Arena | None = None

    @property
    def compute_stream(self) -> Any | None:
        """The CUDA stream the compute runner launches kernels on (created on first use); None off CUDA."""
        if self.device.type == "cuda" and self._compute_stream is None:
            self._compute_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        return self._compute_stream

    async def reserve(self, nbytes: int) -> None:
        """Set aside ``nbytes`` of device memory as the arena blocks are placed in (in the driver's
        thread: a large allocation may block)."""
        self._check_open()
        assert self.arena is None, "the device arena is reserved once"
        buffer = await self._run_job(lambda: torch.empty(nbytes, dtype=torch.uint8, device=self.device))
        self.arena = Arena(buffer)

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A flat ``uint8`` tensor of ``nbytes`` bytes on :attr:`device` (contents undefined)."""
        self._check_open()
        assert nbytes >= 0, f"cannot allocate a negative size ({nbytes} bytes)"
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)  # [nbytes]

    async def aplace(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of ``nbytes`` for a block: a region of the arena (None if no free region holds it,
        after waiting in the driver's thread for regions whose readers are still running), else a fresh
        allocation."""
        arena = self.arena
        if arena is None:  # a CPU allocation never blocks; a CUDA one may, so it runs in the driver's thread
            return self.allocate(nbytes) if self.device.type == "cpu" else await self.aallocate(nbytes)
        region = arena.allocate(nbytes)
        while region is None and arena.pending:
            await self._run_job(arena.wait_oldest)
            region = arena.allocate(nbytes)
        return region

    def release(self, buffer: torch.Tensor) -> None:
        """A block left the device: its buffer may be reused once the kernels queued so far on the
        compute stream are done (an arena region on an event; any other CUDA buffer through
        ``record_stream``, freed with its last reference)."""
        if self.arena is None or not self.arena.owns(buffer):
            stream = self.compute_stream
            if stream is not None and buffer.device.type == "cuda":
                buffer.record_stream(stream)
            return
        after = None
        if self.device.type == "cuda":
            after = torch.cuda.Event()  # type: ignore[no-untyped-call]
            after.record(self.compute_stream)
        self.arena.free(buffer, after)

    async def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> CopyDone:
        """Copy the CPU tensor ``src`` into ``dst`` on the device; on CUDA the result carries the event."""
        self._check_open()  # a closed driver says so first, whatever it was given
        check_copy_args(dst, src)
        assert dst.device.type == self.device.type, f"{self.device} tier got a buffer on {dst.device}"
        if self.device.type == "cuda":
            caller_stream = torch.cuda.current_stream(self.device)  # the stream allocate() ran on
            done = await self._run_job(lambda: _timed(lambda: self._cuda_copy(dst, src, caller_stream)))
        else:
            done = await self._run_job(lambda: _timed(lambda: _cpu_copy(dst, src)))
        self.bytes_copied += src.numel() * src.element_size()
        return done

    async def copy_any(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` into ``dst``, either on the device or in host memory, of any strides (a KV cache's
        positions), in the driver's thread; on CUDA on the copy stream, after the kernels queued so far
        on the compute stream (a copy out reads what they wrote), and returning once it is done."""
        self._check_open()
        assert dst.shape == src.shape and dst.dtype == src.dtype, (
            f"copy of {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}: "
            "shapes and dtypes must match"
        )
        if self.device.type == "cuda":
            after = self.compute_stream
            await self._run_job(lambda: self._cuda_copy(dst, src, after))
        else:
            await self._run_job(lambda: _cpu_copy(dst, src))

    def _release(self) -> None:
        self.arena = None  # the reservation goes with its last view

    def wait_ready(self, done: CopyDone, stream: Any | None = None) -> None:
        """CUDA: make ``stream`` (default: the current stream) wait on the copy's event; CPU: no-op."""
        if self.device.type != "cuda":
            super().wait_ready(done, stream)
            return
        assert done.event is not None, "a CUDA copy result must carry its event"
        target = stream if stream is not None else torch.cuda.current_stream(self.device)
        target.wait_event(done.event)

    def _cuda_copy(self, dst: torch.Tensor, src: torch.Tensor, caller_stream: Any) -> Any:
        """Worker thread: enqueue the copy on the copy stream, record an event, wait for it."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        # ``dst`` was allocated on the caller's stream, whose queued work may still use that memory
        # (the caching allocator reuses freed blocks in that stream's order): queue the copy behind it.
        self._stream.wait_stream(caller_stream)
        with torch.cuda.stream(self._stream), torch.inference_mode():  # dst may be the compute's
            dst.copy_(src, non_blocking=True)
            # blocking: the worker sleeps in synchronize() instead of spinning a core
            event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
            event.record(self._stream)
        event.synchronize()  # releases the GIL while it waits
        return event


def _timed(copy: Callable[[], Any]) -> CopyDone:
    """Worker thread: run ``copy`` (returning its CUDA event or None) and time it."""
    started = time.perf_counter()
    event = copy()
    return CopyDone(event, started, time.perf_counter())


def _cpu_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.inference_mode():  # dst may be a tensor the compute thread made (in inference mode)
        dst.copy_(src)
