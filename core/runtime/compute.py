"""Where compute runs: a dedicated single-thread executor, and a compute stream on CUDA.

The event loop never runs a kernel itself. :meth:`ComputeRunner.run` hands a function to
the compute thread and awaits it, so the loop stays free to issue I/O while the CPU (or
the GPU) computes. On CUDA the job first makes the compute stream wait on the copy events
of the blocks it uses (no device-wide synchronize), launches its kernels on that stream,
and waits for that one stream before returning, inside the compute thread, so that the
buffers it used can be released and its outputs read by the next job.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from klotski_tier.tiers.device import CopyDone, DeviceDriver

if TYPE_CHECKING:
    from klotski_tier.core.observe.timeline import Timeline

T = TypeVar("T")


class ComputeRunner:
    """Runs model ops one at a time off the event loop; counts the time it is busy."""

    def __init__(self, device: DeviceDriver, timeline: Timeline | None = None) -> None:
        self._device = device
        self._timeline = timeline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klotski-compute")
        self._stream: Any = None
        if device.device.type == "cuda":
            self._stream = torch.cuda.Stream(device.device)  # type: ignore[no-untyped-call]
        self.busy_s = 0.0

    async def run(
        self, fn: Callable[..., T], *args: Any, ready: Sequence[CopyDone | None] = (), label: str = ""
    ) -> T:
        """``fn(*args)`` in the compute thread, after the blocks' copies in ``ready`` completed."""
        loop = asyncio.get_running_loop()
        result: T = await loop.run_in_executor(self._executor, self._timed_job, fn, args, ready, label)
        return result

    def _timed_job(
        self, fn: Callable[..., T], args: tuple[Any, ...], ready: Sequence[CopyDone | None], label: str
    ) -> T:
        started = time.perf_counter()
        result = self._job(fn, args, ready)
        if self._timeline is not None:
            self._timeline.span("compute", label or fn.__name__.strip("_"), started, time.perf_counter())
        return result

    def _job(self, fn: Callable[..., T], args: tuple[Any, ...], ready: Sequence[CopyDone | None]) -> T:
        started = time.perf_counter()
        stream_ctx: Any = contextlib.nullcontext()
        if self._stream is not None:
            # Inputs the event loop made (token ids, KV cache) were queued on the default stream.
            self._stream.wait_stream(torch.cuda.default_stream(self._device.device))
            stream_ctx = torch.cuda.stream(self._stream)
        with torch.inference_mode(), stream_ctx:
            for done in ready:
                if done is not None:
                    self._device.wait_ready(done, self._stream)
            result = fn(*args)
            if self._stream is not None:
                self._stream.synchronize()
        self.busy_s += time.perf_counter() - started
        return result

    def close(self) -> None:
        self._executor.shutdown(wait=True)
