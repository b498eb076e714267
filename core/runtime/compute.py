"""Where compute runs: a dedicated single-thread executor, and a compute stream on CUDA.

The event loop never runs a kernel, allocates device memory or waits for the GPU.
:meth:`ComputeRunner.run` hands a function to the compute thread and awaits it, so the loop stays
free to issue I/O while the CPU (or the GPU) computes.

On CUDA the job makes the compute stream (the device driver's) wait on the copy events of the
blocks it reads (no device-wide synchronize), launches its kernels on that stream and returns
without waiting for them: jobs on one stream run in order, and a block's buffer is reused only
after the kernels queued before its release are done (the device driver releases on an event).
The only jobs that wait for the GPU are those whose results the loop needs on the host, the
routes of a gate and a batch's logits, and they wait in the compute thread (their copy to the
host does). Busy time on CUDA is measured by events around each job, read once at the end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from klotski_tier.tiers.device import CopyDone, DeviceDriver

if TYPE_CHECKING:
    from klotski_tier.core.observe.timeline import Timeline

T = TypeVar("T")
MS_PER_S = 1000.0  # torch.cuda.Event.elapsed_time answers in milliseconds


class ComputeRunner:
    """Runs model ops one at a time off the event loop; counts the time it is busy."""

    def __init__(self, device: DeviceDriver, timeline: Timeline | None = None) -> None:
        self._device = device
        self._timeline = timeline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klotski-compute")
        self._stream: Any = device.compute_stream  # None off CUDA
        self._host_busy_s = 0.0  # off CUDA: the compute thread's time in jobs
        self._gpu_spans: list[tuple[Any, Any]] = []  # on CUDA: (start, end) events of each job

    @property
    def busy_s(self) -> float:
        """Seconds the device spent in jobs (on CUDA: waits for the jobs queued so far)."""
        if self._stream is None:
            return self._host_busy_s
        if self._gpu_spans:
            self._gpu_spans[-1][1].synchronize()
        elapsed_ms: float = sum(start.elapsed_time(end) for start, end in self._gpu_spans)
        return elapsed_ms / MS_PER_S

    async def run(
        self,
        fn: Callable[..., T],
        *args: Any,
        ready: Sequence[CopyDone | None] = (),
        label: str = "",
        finished: bool = False,
    ) -> T:
        """``fn(*args)`` in the compute thread, after the blocks' copies in ``ready`` completed.
        ``finished``: return only once its kernels are done (a job the bench times)."""
        loop = asyncio.get_running_loop()
        job = self._finished(fn) if finished and self._stream is not None else fn
        # The arguments go in a box the job empties: the executor's work item outlives the job by a
        # moment, and must not keep a block's weights alive after the pipeline released its lease (the
        # device tier may already have reused the room: real memory would exceed the budget).
        box = [args]
        result: T = await loop.run_in_executor(self._executor, self._timed_job, job, box, ready, label)
        return result

    def _finished(self, fn: Callable[..., T]) -> Callable[..., T]:
        def run_to_end(*args: Any) -> T:
            result = fn(*args)
            self._stream.synchronize()
            return result

        return run_to_end

    def _timed_job(
        self, fn: Callable[..., T], box: list[tuple[Any, ...]], ready: Sequence[CopyDone | None], label: str
    ) -> T:
        started = time.perf_counter()
        result = self._job(fn, box.pop(), ready)
        if self._timeline is not None:  # on CUDA: when the job was issued, its kernels may run later
            self._timeline.span("compute", label or fn.__name__.strip("_"), started, time.perf_counter())
        return result

    def _job(self, fn: Callable[..., T], args: tuple[Any, ...], ready: Sequence[CopyDone | None]) -> T:
        if self._stream is None:
            started = time.perf_counter()
            with torch.inference_mode():
                result = fn(*args)
            self._host_busy_s += time.perf_counter() - started
            return result
        return self._cuda_job(fn, args, ready)

    def _cuda_job(self, fn: Callable[..., T], args: tuple[Any, ...], ready: Sequence[CopyDone | None]) -> T:
        """Queue ``fn``'s kernels on the compute stream behind the copies of ``ready``; no wait."""
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        with torch.inference_mode(), torch.cuda.stream(self._stream):
            for done in ready:
                if done is not None:
                    self._device.wait_ready(done, self._stream)
            start.record(self._stream)
            result = fn(*args)
            end.record(self._stream)
        self._gpu_spans.append((start, end))
        return result

    def close(self) -> None:
        """Wait for the jobs (and, on CUDA, their kernels: the buffers they read are freed next)."""
        if self._stream is not None:
            self._executor.submit(self._stream.synchronize)
        self._executor.shutdown(wait=True)
