"""The tier driver contract: drivers move bytes between tiers and decide nothing.

A driver has a handful of async primitives (read pieces of a file into a buffer, allocate a
buffer, copy host memory into a buffer) and ``aclose()``. Which block goes where, when, and
what to evict is the residency manager's business (``core/``); drivers hold no budgets.

Lifecycle::

    async with DiskDriver(queue_depth=4) as disk:      # or: disk = DiskDriver(); ...; await disk.aclose()
        await disk.read_into(pieces, buffer)           # any number of concurrent calls
    # aclose(): waits for every job still running, shuts the pool down, releases files/streams;
    # any call after it raises TierError.

Threading rule. Every driver owns a dedicated, bounded ``ThreadPoolExecutor`` (never the
event loop's default executor); blocking calls (``preadv``, ``copy_``, ``Event.synchronize``)
run there and never on the event-loop thread. A cancelled await does not stop the thread, so
the buffer stays in use until the thread returns. Drivers therefore settle before they return:
when an await on a driver operation is cancelled, the jobs that have not started are
cancelled, the driver waits (uncancellably) until every job already running has returned, and
only then re-raises ``CancelledError``. The same holds when one job fails. So when a driver
call returns or raises, no thread touches its buffers any more, and the caller may free or
reuse them at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import torch

from klotski_tier.core.errors import TierError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class CopyDone:
    """A finished copy into a memory tier; ``event`` is a ``torch.cuda.Event`` on CUDA, else None.

    On CUDA the compute stream must wait on ``event`` before it reads the buffer
    (:meth:`MemoryTierDriver.wait_ready`); elsewhere the bytes are in place already.
    """

    event: Any | None
    start_s: float = 0.0  # when the worker thread began the copy (time.perf_counter)
    end_s: float = 0.0  # when it saw the copy finished


async def wait_settled(futures: Sequence[Future[Any]]) -> None:
    """Wait until every job in ``futures`` has returned or was cancelled before it started.

    Uncancellable: a cancellation meanwhile cancels the jobs not yet started, keeps waiting for
    the running ones, and is re-raised once none is left. Job results and errors are left in
    the futures for the caller to read.
    """
    if not futures:
        return
    everything = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
    cancelled: asyncio.CancelledError | None = None
    while not everything.done():
        try:
            await asyncio.shield(everything)
        except asyncio.CancelledError as exc:
            cancelled = exc
            for future in futures:
                future.cancel()  # succeeds only for jobs that have not started
    if cancelled is not None:
        raise cancelled


class _Skipped(Exception):
    """A job of a batch that had already failed: it did not run."""


class _Batch:
    """The jobs of one driver call: once one fails, those that have not begun are skipped."""

    def __init__(self) -> None:
        self._failed = threading.Event()

    def guard(self, job: Callable[[], T]) -> Callable[[], T]:
        # The pool's work item outlives the job by a moment (its thread lets go of it after setting the
        # result, which may already have woken the event loop): the job, and the buffers its closure
        # holds, go in a box the run empties, so they are freed when the job returns, not after.
        box = [job]

        def run() -> T:
            task = box.pop()
            if self._failed.is_set():
                raise _Skipped
            try:
                return task()
            except BaseException:
                self._failed.set()
                raise

        return run

    @staticmethod
    def first_error(futures: Sequence[Future[Any]]) -> BaseException | None:
        for future in futures:
            if future.cancelled():
                continue
            error = future.exception()
            if error is not None and not isinstance(error, _Skipped):
                return error
        return None


class TierDriver(ABC):
    """Base of every tier driver: a dedicated bounded thread pool, ``aclose``, ``async with``."""

    name: ClassVar[str]

    def __init__(self, *, max_workers: int) -> None:
        # Threads start lazily on the first submit, so constructing a driver has no side effects.
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"klotski-{self.name}")
        self._in_flight: set[Future[Any]] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Wait for running jobs, shut the pool down and release resources; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await wait_settled(list(self._in_flight))
        finally:
            self._pool.shutdown(wait=True)  # every job has returned: idle workers exit at once
            self._release()
            logger.debug("%s driver closed", self.name)

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _release(self) -> None:  # noqa: B027 (an optional hook, empty by default)
        """Free what the driver holds besides its pool (file descriptors ...); runs once in aclose."""

    def _check_open(self) -> None:
        if self._closed:
            raise TierError(f"the {self.name} tier driver is closed; create a new driver to move more bytes")

    async def _run_jobs(self, jobs: Sequence[Callable[[], T]]) -> list[T]:
        """Run ``jobs`` in the pool (at most ``max_workers`` at once); settle before returning.

        Once a job fails, the jobs that have not begun are skipped; the failure is raised once
        every running job has returned. Results come back in the order of ``jobs``.
        """
        self._check_open()
        batch = _Batch()
        futures = [self._pool.submit(batch.guard(job)) for job in jobs]
        self._in_flight.update(futures)
        try:
            await wait_settled(futures)
        finally:
            self._in_flight.difference_update(futures)
        error = _Batch.first_error(futures)
        if error is not None:
            raise error
        return [future.result() for future in futures]

    async def run_blocking(self, job: Callable[[], T]) -> T:
        """``job()`` in the driver's own pool (checksums, decompression of the bytes it moved)."""
        return await self._run_job(job)

    async def _run_job(self, job: Callable[[], T]) -> T:
        (result,) = await self._run_jobs([job])
        return result


class MemoryTierDriver(TierDriver):
    """A tier that holds buffers (host RAM, device memory): allocate them, copy host bytes in."""

    def __init__(self, *, max_workers: int) -> None:
        super().__init__(max_workers=max_workers)
        self.bytes_copied = 0

    @abstractmethod
    def allocate(self, nbytes: int) -> torch.Tensor:
        """A flat ``uint8`` tensor of ``nbytes`` bytes in this tier (contents undefined)."""

    async def aallocate(self, nbytes: int) -> torch.Tensor:
        """:meth:`allocate` in the driver's pool: pinning a large host buffer can take long."""
        return await self._run_job(lambda: self.allocate(nbytes))

    @abstractmethod
    async def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> CopyDone:
        """Copy the CPU tensor ``src`` into ``dst`` (a buffer of this tier, same shape and dtype)."""

    def wait_ready(self, done: CopyDone, stream: Any | None = None) -> None:
        """Make ``stream`` wait until the copy behind ``done`` is visible; a no-op off CUDA."""
        assert done.event is None, f"{self.name} tier got a CUDA event it cannot wait on"


def check_copy_args(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Assert that ``src`` can be copied into ``dst`` without broadcasting or conversion."""
    assert src.device.type == "cpu", f"copy source must be a CPU tensor, got one on {src.device}"
    assert dst.shape == src.shape and dst.dtype == src.dtype, (
        f"copy of {tuple(src.shape)} {src.dtype} into {tuple(dst.shape)} {dst.dtype}: "
        "shapes and dtypes must match"
    )
