"""The disk tier: read byte ranges of checkpoint files straight into a block buffer.

``read_into`` splits every :class:`TensorPiece` into chunks of at most ``chunk_bytes`` and reads
each with one ``os.preadv`` into a ``memoryview`` of the destination tensor (no staging copy),
``queue_depth`` chunks in flight at most. File descriptors are opened once per path, in a
worker thread, and closed in ``aclose``. See :mod:`klotski_tier.tiers.base` for the threading
and cancellation rules.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from klotski_tier.core.blocks import TensorPiece
from klotski_tier.core.errors import ConfigError, TierError
from klotski_tier.core.sizes import MIB, format_size
from klotski_tier.tiers.base import TierDriver

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_DEPTH = 4
"""Reads in flight (one worker thread each): enough to keep an NVMe queue busy."""

DEFAULT_CHUNK_BYTES = 16 * MIB
"""Largest single ``preadv``: big enough for full drive bandwidth, small enough to spread over threads."""


@dataclass(frozen=True)
class _Chunk:
    """``nbytes`` bytes at ``file_offset`` of ``path`` go to ``buffer_offset`` of the destination."""

    path: Path
    file_offset: int
    buffer_offset: int
    nbytes: int


def split_chunks(pieces: Sequence[TensorPiece], chunk_bytes: int) -> Iterator[_Chunk]:
    """Each piece cut into consecutive chunks of at most ``chunk_bytes`` bytes."""
    for piece in pieces:
        for start in range(0, piece.nbytes, chunk_bytes):
            size = min(chunk_bytes, piece.nbytes - start)
            yield _Chunk(piece.path, piece.file_offset + start, piece.buffer_offset + start, size)


class DiskDriver(TierDriver):
    """Reads checkpoint byte ranges into CPU buffers with ``os.preadv`` in a bounded pool."""

    name = "disk"

    def __init__(
        self, *, queue_depth: int = DEFAULT_QUEUE_DEPTH, chunk_bytes: int = DEFAULT_CHUNK_BYTES
    ) -> None:
        if queue_depth < 1:
            raise ConfigError(f"disk queue_depth must be at least 1, got {queue_depth}")
        if chunk_bytes < 1:
            raise ConfigError(f"disk chunk_bytes must be at least 1 byte, got {chunk_bytes}")
        super().__init__(max_workers=queue_depth)
        self.queue_depth = queue_depth
        self.chunk_bytes = chunk_bytes
        self.bytes_read = 0
        self.busy_s = 0.0  # time at least one read was in flight (the drive's busy time)
        self._reads_in_flight = 0
        self._busy_since = 0.0
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # guards _fds and bytes_read, touched by worker threads

    async def read_into(self, pieces: Sequence[TensorPiece], dst: torch.Tensor) -> None:
        """Read every piece into ``dst`` (flat ``uint8`` CPU tensor, may be pinned) at its buffer offset.

        Raises :class:`TierError` naming the file and offset when a read fails or the file is short.
        """
        self._check_open()
        memory = _writable_view(dst)
        for piece in pieces:
            assert piece.buffer_offset >= 0 and piece.buffer_offset + piece.nbytes <= len(memory), (
                f"piece {piece.tensor_name} [{piece.buffer_offset}, +{piece.nbytes}) "
                f"does not fit a buffer of {len(memory)} bytes"
            )
        jobs = [self._job(chunk, memory) for chunk in split_chunks(pieces, self.chunk_bytes)]
        await self._run_jobs(jobs)

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        """The one blocking call: read into ``view`` from ``file_offset``; bytes read (0 at end of file)."""
        return os.preadv(fd, [view], file_offset)

    def _job(self, chunk: _Chunk, memory: memoryview) -> Callable[[], None]:
        view = memory[chunk.buffer_offset : chunk.buffer_offset + chunk.nbytes]
        return lambda: self._read_fully(chunk, view)

    def _read_fully(self, chunk: _Chunk, view: memoryview) -> None:
        """Worker thread: fill ``view``, retrying partial reads; a read of 0 bytes means the file is short."""
        fd = self._fd(chunk.path)
        self._busy(+1)
        try:
            self._read_all(fd, chunk, view)
        finally:
            self._busy(-1)
        with self._lock:
            self.bytes_read += chunk.nbytes

    def _busy(self, delta: int) -> None:
        """Count reads in flight; the clock runs while there is at least one."""
        with self._lock:
            now = time.perf_counter()
            if self._reads_in_flight == 0:
                self._busy_since = now
            self._reads_in_flight += delta
            if self._reads_in_flight == 0:
                self.busy_s += now - self._busy_since

    def _read_all(self, fd: int, chunk: _Chunk, view: memoryview) -> None:
        done = 0
        while done < chunk.nbytes:
            offset = chunk.file_offset + done
            try:
                count = self._read_chunk(fd, offset, view[done:])
            except OSError as exc:
                reason = exc.strerror or exc
                raise TierError(f"cannot read {chunk.path} at offset {offset}: {reason}") from exc
            if count == 0:
                raise TierError(
                    f"short read of {chunk.path} at offset {offset}: {format_size(chunk.nbytes - done)} "
                    "missing; the file may be truncated, re-download the checkpoint"
                )
            done += count

    def _fd(self, path: Path) -> int:
        """Worker thread: the cached read-only descriptor of ``path``, opened on first use."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    reason = exc.strerror or exc
                    raise TierError(f"cannot open {path}: {reason}; check the checkpoint path") from exc
                self._fds[path] = fd
            return fd

    def _release(self) -> None:
        with self._lock:
            for path, fd in self._fds.items():
                try:
                    os.close(fd)
                except OSError as exc:
                    logger.warning("closing %s failed: %s", path, exc)
            self._fds.clear()


def _writable_view(dst: torch.Tensor) -> memoryview:
    """A byte ``memoryview`` of ``dst``'s own memory (no copy)."""
    assert dst.device.type == "cpu", f"disk reads land in CPU memory, got a buffer on {dst.device}"
    assert dst.dtype == torch.uint8 and dst.dim() == 1 and dst.is_contiguous(), (
        f"disk reads need a flat contiguous uint8 buffer, got {dst.dtype} of shape {tuple(dst.shape)}"
    )
    return dst.numpy().data  # [nbytes] shares dst's storage
