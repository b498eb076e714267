"""The disk driver: chunking, retries, error translation, cancellation, liveness and closing.

Slow drives are simulated by a ``_read_chunk`` that blocks its worker thread on a
``threading.Event`` the test sets: nothing here sleeps to synchronize.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from klotski_tier.core.errors import ConfigError, TierError
from klotski_tier.core.model.blocks import TensorPiece
from klotski_tier.tiers.disk import DiskDriver, split_chunks

T = TypeVar("T")

FILE_BYTES = 96
CHUNK_BYTES = 32  # FILE_BYTES is three chunks
GATE_TIMEOUT_S = 10.0  # a worker still blocked after this long means the test is broken, not slow
LOOP_YIELDS = 50  # event-loop turns the test grants a task that should (not) finish meanwhile
LIVENESS_TICKS = 200  # event-loop ticks that must happen while a read blocks its thread
PARTIAL_READ_BYTES = 3


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = bytes((i * 13 + 5) % 256 for i in range(FILE_BYTES))
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    return path, data


def whole_file(path: Path) -> list[TensorPiece]:
    return [TensorPiece("all", path, 0, FILE_BYTES, 0)]


def zeros() -> torch.Tensor:
    return torch.zeros(FILE_BYTES, dtype=torch.uint8)  # [FILE_BYTES]


class GatedDisk(DiskDriver):
    """A slow drive: each chunk read blocks its worker thread until the test opens ``gate``."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.gate = threading.Event()
        self.entered = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.started = 0
        self.returned = 0

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        self.started += 1
        self.loop.call_soon_threadsafe(self.entered.set)
        if not self.gate.wait(GATE_TIMEOUT_S):
            raise AssertionError("the test never opened the gate: was the event loop blocked?")
        count = super()._read_chunk(fd, file_offset, view)
        self.returned += 1
        return count


class RecordingDisk(DiskDriver):
    """Records the descriptors it reads from; reads at most ``limit`` bytes per call."""

    def __init__(self, limit: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.limit = limit
        self.fds: set[int] = set()
        self.calls = 0

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        self.fds.add(fd)
        self.calls += 1
        return super()._read_chunk(fd, file_offset, view[: self.limit])


class FailingDisk(DiskDriver):
    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.calls = 0

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        self.calls += 1
        raise OSError(errno.EIO, "Input/output error")


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="queue_depth"):
        DiskDriver(queue_depth=0)
    with pytest.raises(ConfigError, match="chunk_bytes"):
        DiskDriver(chunk_bytes=0)


def test_split_chunks_cuts_each_piece_at_chunk_bytes() -> None:
    pieces = [TensorPiece("a", Path("f"), 100, 70, 0), TensorPiece("b", Path("g"), 0, 30, 128)]
    chunks = [(c.path.name, c.file_offset, c.buffer_offset, c.nbytes) for c in split_chunks(pieces, 32)]
    assert chunks == [("f", 100, 0, 32), ("f", 132, 32, 32), ("f", 164, 64, 6), ("g", 0, 128, 30)]


def test_bytes_read_counts_every_byte(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file

    async def scenario() -> int:
        async with DiskDriver(chunk_bytes=CHUNK_BYTES) as disk:
            buffer = zeros()
            await disk.read_into(whole_file(path), buffer)
            await disk.read_into([TensorPiece("head", path, 0, 10, 0)], buffer)
            assert bytes(buffer.numpy()) == data
            return disk.bytes_read

    assert run(scenario()) == FILE_BYTES + 10


def test_partial_reads_are_retried(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file

    async def scenario() -> RecordingDisk:
        async with RecordingDisk(limit=PARTIAL_READ_BYTES, chunk_bytes=CHUNK_BYTES) as disk:
            buffer = zeros()
            await disk.read_into(whole_file(path), buffer)
            assert bytes(buffer.numpy()) == data
            return disk

    disk = run(scenario())
    calls_per_chunk = -(-CHUNK_BYTES // PARTIAL_READ_BYTES)  # ceiling division
    assert disk.calls == FILE_BYTES // CHUNK_BYTES * calls_per_chunk


def test_descriptors_are_opened_once_and_closed_by_aclose(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file

    async def scenario() -> set[int]:
        disk = RecordingDisk(chunk_bytes=CHUNK_BYTES)
        await disk.read_into(whole_file(path), zeros())
        await disk.read_into(whole_file(path), zeros())
        await disk.aclose()
        return disk.fds

    fds = run(scenario())
    assert len(fds) == 1
    with pytest.raises(OSError):
        os.fstat(fds.pop())


def test_os_error_becomes_tier_error_with_file_and_offset(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file

    async def scenario() -> None:
        async with FailingDisk() as disk:
            await disk.read_into([TensorPiece("w", path, 40, 8, 0)], zeros())

    with pytest.raises(TierError, match=f"cannot read {path} at offset 40: Input/output error") as caught:
        run(scenario())
    assert isinstance(caught.value.__cause__, OSError)


def test_a_failed_chunk_cancels_the_chunks_not_started(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file

    async def scenario() -> int:
        async with FailingDisk(queue_depth=1, chunk_bytes=1) as disk:
            with pytest.raises(TierError):
                await disk.read_into(whole_file(path), zeros())
            return disk.calls

    assert run(scenario()) == 1


def test_buffer_must_be_flat_uint8_on_the_cpu(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file

    async def scenario() -> None:
        async with DiskDriver() as disk:
            with pytest.raises(AssertionError, match="flat contiguous uint8"):
                await disk.read_into(whole_file(path), torch.zeros(FILE_BYTES // 4, dtype=torch.float32))
            with pytest.raises(AssertionError, match="does not fit"):
                await disk.read_into(whole_file(path), torch.zeros(FILE_BYTES - 1, dtype=torch.uint8))

    run(scenario())


def test_cancelled_read_waits_for_its_thread_then_ends_cancelled(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file

    async def scenario() -> None:
        disk = GatedDisk(queue_depth=1, chunk_bytes=CHUNK_BYTES)
        buffer = zeros()
        task = asyncio.create_task(disk.read_into(whole_file(path), buffer))
        await disk.entered.wait()  # the first chunk's thread is inside _read_chunk
        task.cancel()
        for _ in range(LOOP_YIELDS):
            await asyncio.sleep(0)
        assert not task.done(), "the read returned while its thread still wrote into the buffer"
        disk.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert disk.started == disk.returned == 1  # the chunks queued behind it never started
        assert bytes(buffer[:CHUNK_BYTES].numpy()) == data[:CHUNK_BYTES]
        assert not buffer[CHUNK_BYTES:].any()
        await disk.aclose()

    run(scenario())


def test_event_loop_keeps_ticking_during_a_slow_read(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file

    async def scenario() -> int:
        disk = GatedDisk(queue_depth=1)
        buffer = zeros()
        read = asyncio.create_task(disk.read_into(whole_file(path), buffer))
        await disk.entered.wait()
        ticks = 0
        while not read.done():  # the read cannot finish before LIVENESS_TICKS ticks open the gate
            ticks += 1
            if ticks == LIVENESS_TICKS:
                disk.gate.set()
            await asyncio.sleep(0)
        await read
        assert bytes(buffer.numpy()) == data
        await disk.aclose()
        return ticks

    assert run(scenario()) >= LIVENESS_TICKS


def test_aclose_waits_for_reads_in_flight(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file

    async def scenario() -> None:
        disk = GatedDisk()
        buffer = zeros()
        read = asyncio.create_task(disk.read_into(whole_file(path), buffer))
        await disk.entered.wait()
        closing = asyncio.create_task(disk.aclose())
        for _ in range(LOOP_YIELDS):
            await asyncio.sleep(0)
        assert not closing.done(), "aclose returned while a worker thread still read"
        disk.gate.set()
        await closing
        await read
        assert bytes(buffer.numpy()) == data
        with pytest.raises(TierError, match="closed"):
            await disk.read_into(whole_file(path), buffer)

    run(scenario())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_read_into_pinned_buffer(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file

    async def scenario() -> None:
        async with DiskDriver(chunk_bytes=CHUNK_BYTES) as disk:
            buffer = torch.zeros(FILE_BYTES, dtype=torch.uint8, pin_memory=True)  # [FILE_BYTES]
            await disk.read_into(whole_file(path), buffer)
            assert buffer.is_pinned() and bytes(buffer.numpy()) == data

    run(scenario())
