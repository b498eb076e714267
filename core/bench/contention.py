"""Compute while the drive streams: the I/O contention figure of ``klotski-tier bench``.

Where the device computes in host memory (a CPU device), a drive streaming into that memory slows
the compute down: the DMA and the block checksums compete with the matmuls for memory bandwidth and
caches (the reading threads themselves use ~5% of a core). On a 2-core CPU VM (the demo model
resident, a thread reading a 1 GiB file with O_DIRECT 16 MiB reads at a capped rate) compute took
+0% at 0.5 GB/s, +13-19% at 1.0 GB/s and +58-62% at full speed (1.3-1.5 GB/s, with or without
xxh3 of each block); a cost model that takes I/O as free for compute over-predicted that
machine's decode tokens/s by 1.24-1.41x on models that stream from the drive.

:func:`measure_contention` times the pipeline's expert job (:func:`bench_compute.expert_jobs`,
handed to a :class:`ComputeRunner` and awaited, as the engine runs it) alone and while a
:class:`DriveStreamer` reads the bench's test file at full speed the way the engine's best read path
does (O_DIRECT reads of its block size into host buffers from :func:`aligned_empty`, its queue depth
of threads, each block's xxh3 computed as the packed store checks it). This machine is noisy, so
rounds alternate alone and streaming (in ABBA order) and a job's time in a round is the median of
its runs. The figure is t_streaming / t_alone - 1 of the whole set of jobs (one per token count),
each streaming round against the alone one beside it so that the machine's drifts cancel, the
median over rounds, at least 0. The largest job weighs most: at 1 token the job is mostly the
hand-off to the compute thread, which the drive hardly slows, while the large ones are the matmuls
(and weight reads) that it does. The result is the machine's ``io_compute_slowdown`` (compute
progresses at 1/(1+c) of its rate alone while the drive streams). A GPU computes in its own memory
and should show about 0; it is measured all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
import xxhash

from klotski_tier.core.bench.compute import compute_device, run_times
from klotski_tier.core.errors import TierError
from klotski_tier.core.runtime.compute import ComputeRunner
from klotski_tier.core.units import GB
from klotski_tier.tiers.device import DeviceDriver
from klotski_tier.tiers.direct import open_for_reading
from klotski_tier.tiers.hostmem import aligned_empty

logger = logging.getLogger(__name__)

CONTENTION_WARMUP_RUNS = 1  # untimed jobs of each token count per round (the streamer's start is not timed)
CONTENTION_RUNS = 4  # timed jobs of each token count per round; their median is the round's figure
STREAM_START_TIMEOUT_S = 60.0  # the first block of the stream must arrive within this

Job = Callable[[], object]


@dataclass(frozen=True)
class ContentionResult:
    """Expert job times alone and while the drive streams, and what follows from them."""

    slowdown: float  # the job set's streaming / alone time - 1, median of the rounds, at least 0
    read_gbps: float  # the drive's read rate while the jobs ran (median of the streaming rounds)
    alone_s: dict[int, float]  # {tokens: seconds}, median of the rounds
    streaming_s: dict[int, float]  # {tokens: seconds}, median of the rounds


class DriveStreamer:
    """``threads`` threads that read ``path`` (or several files, one after the other) over and over,
    as fast as the drive goes, until closed, or until the reads cover ``limit_bytes`` (then
    :attr:`finished_s` is when the last one ended; :meth:`join` waits for it).

    Each reads ``block_bytes`` at a time (O_DIRECT where the file system allows) into its own host
    buffer and, with ``checksum``, hashes the block with xxh3 (as the packed store checks it; without,
    the drive alone). Usable as a context manager: entering starts the threads and returns once the
    first block has arrived (a blocking wait of milliseconds); leaving stops and joins them.
    """

    def __init__(
        self,
        path: Path | Sequence[Path],
        block_bytes: int,
        threads: int,
        *,
        checksum: bool = True,
        limit_bytes: int | None = None,
    ) -> None:
        assert block_bytes > 0 and threads > 0, f"bad stream: {block_bytes} bytes x {threads} threads"
        paths = [path] if isinstance(path, Path) else list(path)
        assert paths, "nothing to stream"
        self.path, self.block_bytes, self._checksum = paths[0], block_bytes, checksum
        self._files = [(open_for_reading(p, direct=True)[0], p.stat().st_size) for p in paths]  # (fd, size)
        self._cursor = (0, 0)  # (file index, offset)
        self._lock = threading.Lock()
        self._stop, self._started = threading.Event(), threading.Event()
        self._counts = [0] * threads  # bytes read by each thread
        self._limit = limit_bytes  # stop once this many bytes were read (None: when closed)
        self._claimed = 0  # bytes of the reads started (under _lock)
        self.finished_s: float | None = None  # perf_counter() when the limit's last read ended
        self._running = threads
        self._errors: list[OSError] = []
        self._threads = [
            threading.Thread(target=self._read_loop, args=(i,), name=f"klotski-stream-{i}", daemon=True)
            for i in range(threads)
        ]

    @property
    def bytes_read(self) -> int:
        return sum(self._counts)

    def __enter__(self) -> DriveStreamer:
        for thread in self._threads:
            thread.start()
        started = self._started.wait(STREAM_START_TIMEOUT_S)
        if self._errors or not started:
            self.close()
            reason = self._errors[0].strerror if self._errors else "no block arrived"
            raise TierError(f"cannot stream {self.path} to time compute beside it: {reason}")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def join(self) -> None:
        """Wait until the reads of ``limit_bytes`` are done (the threads stop by themselves)."""
        assert self._limit is not None, "a stream without a limit runs until closed"
        for thread in self._threads:
            thread.join()

    def close(self) -> None:
        """Stop the threads (each finishes its block), join them and close the file."""
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        for fd, _ in self._files:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _next_read(self) -> tuple[int, int] | None:
        """(fd, offset) of the next block: the files in order, each from its start, then again; None
        once the reads started cover ``limit_bytes``."""
        with self._lock:
            if self._limit is not None and self._claimed >= self._limit:
                return None
            self._claimed += self.block_bytes
            index, offset = self._cursor
            fd, size = self._files[index]
            if offset + self.block_bytes < size:
                self._cursor = (index, offset + self.block_bytes)
            else:
                self._cursor = ((index + 1) % len(self._files), 0)
            return fd, offset

    def _read_loop(self, index: int) -> None:
        buffer = aligned_empty(self.block_bytes).zero_()  # [block] touched: no page faults timed
        view = buffer.numpy().data
        try:
            while not self._stop.is_set():
                block = self._next_read()
                if block is None:
                    break
                fd, offset = block
                count = os.preadv(fd, [view], offset)
                if self._checksum:
                    xxhash.xxh3_64_intdigest(view[:count])  # as the packed store checks every block
                self._counts[index] += count
                self._started.set()
        except OSError as exc:
            self._errors.append(exc)
            self._started.set()
        finally:
            with self._lock:
                self._running -= 1
                if self._running == 0 and not self._stop.is_set():
                    self.finished_s = time.perf_counter()


def measure_contention(
    path: Path, jobs: dict[int, Job], *, block_bytes: int, threads: int, rounds: int
) -> ContentionResult:
    """Time each of ``jobs`` ({tokens: the expert job}) alone and while ``path`` streams
    (see the module docstring); ``rounds`` of each, alternating."""
    assert jobs and rounds > 0, "nothing to time"
    device = compute_device()
    alone, streaming, rates = asyncio.run(_rounds(path, jobs, device, block_bytes, threads, rounds))
    alone_s = {tokens: statistics.median(times) for tokens, times in alone.items()}
    streaming_s = {tokens: statistics.median(times) for tokens, times in streaming.items()}
    pairs = zip(_round_totals(alone, rounds), _round_totals(streaming, rounds), strict=True)
    slowdown = max(0.0, statistics.median(s / a for a, s in pairs) - 1.0)
    result = ContentionResult(slowdown, statistics.median(rates), alone_s, streaming_s)
    logger.info(
        "compute while the drive streams at %.2f GB/s: +%.0f%% (%s)",
        result.read_gbps,
        100 * result.slowdown,
        ", ".join(f"{t} tokens {100 * (streaming_s[t] / alone_s[t] - 1):+.0f}%" for t in jobs),
    )
    return result


async def _rounds(
    path: Path, jobs: dict[int, Job], device: torch.device, block_bytes: int, threads: int, rounds: int
) -> tuple[dict[int, list[float]], dict[int, list[float]], list[float]]:
    """Each job's per-round seconds alone and streaming, and the read rate of each streaming round."""
    alone: dict[int, list[float]] = {tokens: [] for tokens in jobs}
    streaming: dict[int, list[float]] = {tokens: [] for tokens in jobs}
    rates: list[float] = []
    driver = DeviceDriver(device)
    runner = ComputeRunner(driver)
    try:
        for round_index in range(rounds):
            for stream in (False, True) if round_index % 2 == 0 else (True, False):  # ABBA
                if not stream:
                    _append(alone, await _time_jobs(runner, jobs))
                    continue
                with DriveStreamer(path, block_bytes, threads) as streamer:
                    before, start = streamer.bytes_read, time.perf_counter()
                    _append(streaming, await _time_jobs(runner, jobs))
                    rates.append((streamer.bytes_read - before) / (time.perf_counter() - start) / GB)
    finally:
        runner.close()
        await driver.aclose()
    return alone, streaming, rates


async def _time_jobs(runner: ComputeRunner, jobs: dict[int, Job]) -> dict[int, float]:
    """Median seconds of each job handed to ``runner`` and awaited, after warm-up runs."""
    return {
        tokens: statistics.median(await run_times(runner, job, CONTENTION_WARMUP_RUNS, CONTENTION_RUNS))
        for tokens, job in jobs.items()
    }


def _round_totals(samples: dict[int, list[float]], rounds: int) -> list[float]:
    """Seconds of the whole set of jobs in each round."""
    return [sum(times[index] for times in samples.values()) for index in range(rounds)]


def _append(samples: dict[int, list[float]], figures: dict[int, float]) -> None:
    for tokens, seconds in figures.items():
        samples[tokens].append(seconds)
