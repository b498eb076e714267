"""The drive measurements of ``klotski-tier bench``: the raw reference and the engine's read paths.

The drive is measured with a test file written into the directory under test:

- raw: one O_DIRECT ``preadv`` of the whole file (at most ``RAW_READ_MAX_BYTES``) into one
  page-aligned buffer, page cache evicted first: the hardware reference (100%);
- engine: the file (its first ``PASS_BLOCKS`` blocks) read as the engine reads blocks: one piece per
  block through :meth:`DiskDriver.read_into` into a host-tier buffer, ``queue_depth`` blocks in
  flight on a driver of ``queue_depth`` threads; O_DIRECT, and buffered (pages dropped after
  each read, the driver's default); cold (evicted first), then warm (the same reads again);
- layouts: expert-sized blocks as a packed store lays them out and as a safetensors checkpoint
  does (unaligned tensors, read as aligned runs in place), O_DIRECT, cold
  (:func:`measure_layout_reads`): the checkpoint path should read at the packed store's rate.

A shared or virtual drive's bandwidth drifts by a factor of two within seconds, so every figure
is the median of ``read_rounds`` samples taken round-robin over all configurations, and the raw
read is sampled between them (:func:`measure_reads`). Buffers are touched before any clock
starts: no measurement times page faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from klotski_tier.core.bench.profile import CacheState, LayoutReads, ReadMode, ReadResult
from klotski_tier.core.errors import ConfigError, TierError
from klotski_tier.core.model.layouts import SourceRange, place_runs
from klotski_tier.core.store.pagecache import evict
from klotski_tier.core.units import GB, GIB, MIB, align_down, align_up, format_size
from klotski_tier.tiers.direct import DIRECT_ALIGN_BYTES, O_DIRECT
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.host import HostDriver
from klotski_tier.tiers.hostmem import aligned_empty
from klotski_tier.tiers.ranges import ByteRange

logger = logging.getLogger(__name__)
Progress = Callable[[str], None]
"""``progress(message)``: what the bench is measuring now (the CLI shows it on stderr)."""
TEST_FILE_NAME = "klotski-tier-bench.bin"
WRITE_CHUNK_BYTES = 16 * MIB  # the test file is written in chunks of random bytes
RAW_READ_MAX_BYTES = 1 * GIB  # largest single read of the raw measurement (Linux caps one at ~2 GiB)
READ_MODES: tuple[ReadMode, ...] = ("direct", "buffered")
PASS_BLOCKS = 256  # blocks one engine pass reads at most: a steady rate, and a full sweep in minutes
RAW_EVERY = 4  # a raw read before every 4th engine configuration of a round (see measure_reads)
ReadConfig = tuple[ReadMode, int, int]  # mode, block_bytes, queue_depth
SAMPLE_SEED = 0


def write_test_file(path: Path, nbytes: int) -> None:
    """``nbytes`` of random data at ``path``, durable and evicted from the page cache; refused before a
    byte is written when the file system has less room than that (it would only fill the drive)."""
    chunk = np.random.default_rng(SAMPLE_SEED).integers(0, 256, WRITE_CHUNK_BYTES, dtype=np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _check_room(path.parent, nbytes)
        with path.open("wb") as handle:
            for index, start in enumerate(range(0, nbytes, WRITE_CHUNK_BYTES)):
                chunk[:8] = np.frombuffer(index.to_bytes(8, "little"), dtype=np.uint8)  # no two chunks alike
                handle.write(chunk[: min(WRITE_CHUNK_BYTES, nbytes - start)].data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):  # a directory that cannot hold the file cannot hold a part
            path.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write the bench's test file {path}: {exc.strerror or exc}; "
            f"pass --path a writable directory with {format_size(nbytes)} free"
        ) from exc
    evict(path)


def _check_room(directory: Path, nbytes: int) -> None:
    """Refuse a test file of ``nbytes`` that the file system of ``directory`` has no room for."""
    info = os.statvfs(directory)
    free = info.f_bavail * info.f_frsize
    if nbytes > free:
        raise ConfigError(
            f"the bench's test file of {format_size(nbytes)} does not fit in {directory}, whose file system "
            f"has {format_size(free)} free; pass a --file-size of at most that, or --path a directory "
            "with more room"
        )


def raw_direct_gbps(path: Path) -> float:
    """GB/s of one O_DIRECT sequential read of the whole file, page cache evicted first."""
    size = path.stat().st_size
    buffer = aligned_empty(min(size, RAW_READ_MAX_BYTES)).zero_()  # [n] touched: no faults timed
    view = buffer.numpy().data
    fd = _open_direct(path)
    try:
        evict(path)
        start = time.perf_counter()
        done = 0
        while done < size:
            count = os.preadv(fd, [view[: min(len(view), size - done)]], done)
            if count <= 0:
                raise TierError(f"short read of {path} at offset {done}; is the disk full or failing?")
            done += count
        elapsed = time.perf_counter() - start
    except OSError as exc:
        raise TierError(f"cannot read {path} with O_DIRECT: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return size / elapsed / GB


def _open_direct(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ConfigError(
                f"the file system of {path.parent} does not support O_DIRECT; pass --path a directory "
                "on the drive to measure"
            ) from exc
        raise TierError(f"cannot open {path}: {exc.strerror or exc}") from exc


def measure_reads(
    path: Path, block_sizes: tuple[int, ...], queue_depths: tuple[int, ...], rounds: int, progress: Progress
) -> tuple[float, tuple[ReadResult, ...]]:
    """The median raw GB/s, and each engine configuration's median cold and warm reads against it.

    Round-robin: each round reads every configuration once (warm passes in the last round only)
    and the raw file before every ``RAW_EVERY``-th one, so a shared drive's drifts hit all alike.
    """
    configs = [(mode, block, depth) for mode in READ_MODES for block in block_sizes for depth in queue_depths]
    raw: list[float] = []
    samples: dict[tuple[ReadConfig, CacheState], list[float]] = {}
    for round_index in range(rounds):
        for index, config in enumerate(configs):
            if index % RAW_EVERY == 0:
                raw.append(raw_direct_gbps(path))
            mode, block, depth = config
            progress(f"reads, round {round_index + 1}/{rounds}: {mode}, {format_size(block)} x {depth}")
            cold, *warm = engine_gbps(path, mode, block, depth, passes=1 + (round_index == rounds - 1))
            samples.setdefault((config, "cold"), []).append(cold)
            samples.setdefault((config, "warm"), []).extend(warm)
    raw_gbps = statistics.median(raw)
    results = []
    for (config, cache), values in samples.items():
        gbps = statistics.median(values)
        results.append(ReadResult(config[0], cache, config[1], config[2], gbps, gbps / raw_gbps))
    return raw_gbps, tuple(results)


def engine_gbps(path: Path, mode: ReadMode, block_bytes: int, queue_depth: int, passes: int) -> list[float]:
    """GB/s of ``passes`` consecutive passes of engine reads over ``path``, the page cache evicted first.

    A pass reads the file from its start, at most ``PASS_BLOCKS`` blocks.
    """
    nbytes = min(path.stat().st_size, PASS_BLOCKS * block_bytes)
    evict(path)
    seconds = asyncio.run(_engine_passes(path, nbytes, mode, block_bytes, queue_depth, passes))
    return [nbytes / s / GB for s in seconds]


async def _engine_passes(
    path: Path, size: int, mode: ReadMode, block_bytes: int, queue_depth: int, passes: int
) -> list[float]:
    """Seconds of each pass over the first ``size`` bytes of ``path``, ``queue_depth`` reads in flight."""
    async with (
        HostDriver(pin=torch.cuda.is_available()) as host,  # as the engine on this machine's GPU
        DiskDriver(queue_depth=queue_depth, direct=mode == "direct") as disk,  # drops what it read
    ):
        buffers = [host.allocate(block_bytes).zero_() for _ in range(queue_depth)]  # [block] each, touched
        blocks = [
            [ByteRange(path, offset, min(block_bytes, size - offset), 0)]
            for offset in range(0, size, block_bytes)
        ]
        return [await _timed_reads(disk, blocks, buffers) for _ in range(passes)]


def best_read(reads: tuple[ReadResult, ...]) -> ReadResult:
    """The fastest cold configuration: what the engine's read path achieves on data it has not seen."""
    return max((read for read in reads if read.cache == "cold"), key=lambda read: read.gbps)


MIN_LAYOUT_BLOCKS = 8
"""Blocks the layout reads need at least, for a rate over more than the first request's latency."""

CHECKPOINT_HEADER_BYTES = 8 + 12_344
"""Where a safetensors checkpoint's tensors start: after its 8-byte length and JSON header (a typical
size, not a multiple of 4 KiB, so that no tensor is aligned)."""


def measure_layout_reads(
    path: Path, block_bytes: int, queue_depth: int, rounds: int, progress: Progress
) -> LayoutReads | None:
    """Expert-sized blocks of the test file read with O_DIRECT as a packed store lays them out and as a
    checkpoint does, alternately, ``rounds`` cold passes each; the medians (see :class:`LayoutReads`).
    None (and a progress note) when the test file holds fewer than :data:`MIN_LAYOUT_BLOCKS` blocks."""
    size = path.stat().st_size
    tensor = align_down(block_bytes // 3, 2)  # one of an expert's three matrices (bf16)
    block = 3 * tensor
    padded = align_up(block, DIRECT_ALIGN_BYTES)
    count = min(PASS_BLOCKS, (size - CHECKPOINT_HEADER_BYTES - padded) // padded)
    if count < MIN_LAYOUT_BLOCKS:
        progress(f"layout reads skipped: {format_size(size)} holds fewer than {MIN_LAYOUT_BLOCKS} blocks of "
                 f"{format_size(block)}; raise --file-size")  # fmt: skip
        return None
    packed = [[ByteRange(path, i * padded, padded, 0)] for i in range(count)]
    checkpoint = []
    for i in range(count):
        start = CHECKPOINT_HEADER_BYTES + i * block
        sources = [SourceRange(f"w{k}", path, start + k * tensor, tensor) for k in range(3)]
        _, reads, _ = place_runs(sources, lambda _: size)
        checkpoint.append(reads)
    buffer_bytes = padded + 2 * DIRECT_ALIGN_BYTES  # a checkpoint run's widening is at most two units
    samples: dict[str, list[float]] = {"packed": [], "checkpoint": []}
    for round_index in range(rounds):
        for name, blocks in (("packed", packed), ("checkpoint", checkpoint)):
            progress(f"layout reads, round {round_index + 1}/{rounds}: {name}, {format_size(block)} blocks")
            evict(path)
            seconds = asyncio.run(_read_blocks(blocks, buffer_bytes, queue_depth))
            samples[name].append(count * block / seconds / GB)
    return LayoutReads(
        block, queue_depth, statistics.median(samples["packed"]), statistics.median(samples["checkpoint"])
    )


async def _read_blocks(blocks: list[list[ByteRange]], buffer_bytes: int, queue_depth: int) -> float:
    """Seconds to read every block (its ranges into one buffer), ``queue_depth`` blocks in flight."""
    async with DiskDriver(queue_depth=queue_depth, direct=True) as disk:
        buffers = [aligned_empty(buffer_bytes).zero_() for _ in range(queue_depth)]  # [buffer_bytes], touched
        return await _timed_reads(disk, blocks, buffers)


async def _timed_reads(disk: DiskDriver, blocks: list[list[ByteRange]], buffers: list[torch.Tensor]) -> float:
    """Seconds to read every block (its ranges into one buffer) in file order, one block in flight per
    buffer; the buffers are touched already, so no page fault is timed."""
    pending = blocks[::-1]  # popped from the end: file order

    async def reader(buffer: torch.Tensor) -> None:
        while pending:
            await disk.read_into(pending.pop(), buffer)

    start = time.perf_counter()
    await asyncio.gather(*(reader(buffer) for buffer in buffers))
    return time.perf_counter() - start
