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
from typing import Any, TypeVar

import torch

from klotski_tier.tiers.device import CopyDone, DeviceDriver

T = TypeVar("T")


class ComputeRunner:
    """Runs model ops one at a time off the event loop; counts the time it is busy."""

    def __init__(self, device: DeviceDriver) -> None:
        self._device = device
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klotski-compute")
        self._stream: Any = None
        if device.device.type == "cuda":
            self._stream = torch.cuda.Stream(device.device)  # type: ignore[no-untyped-call]
        self.busy_s = 0.0

    async def run(self, fn: Callable[..., T], *args: Any, ready: Sequence[CopyDone | None] = ()) -> T:
        """``fn(*args)`` in the compute thread, after the blocks' copies in ``ready`` completed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._job, fn, args, ready)

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
