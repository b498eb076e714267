"""The disk tier: read byte ranges of checkpoint files into a block buffer, buffered or O_DIRECT.

Two read paths, chosen per driver and both ``queue_depth`` reads in flight at most, each read at
most ``chunk_bytes``:

- buffered (the default, for the original safetensors files): every
  :class:`~klotski_tier.tiers.ranges.FileRange` is cut into chunks read with one ``os.preadv`` each
  straight into a ``memoryview`` of the destination (no staging copy);
- ``direct=True`` (for a packed store whose blocks are 4 KiB-aligned): files are opened with
  ``O_DIRECT`` and read by the aligned plan of :mod:`klotski_tier.tiers.direct`, straight into
  the destination where its address allows, else through a per-thread bounce buffer. A file
  system that refuses ``O_DIRECT`` (``EINVAL``) is read buffered, with a warning.

Page cache is memory. With ``drop_cache`` (the default) the driver keeps none of what it read,
on both paths (an O_DIRECT read does not cache, but neither does it drop pages cached earlier,
by packing the store, say):

- kernel read-ahead is off on its descriptors (``POSIX_FADV_RANDOM``): read-ahead runs up to two
  windows (``read_ahead_kb``, 8 MiB here) past every read and is still in flight when the read
  returns, so those pages could be dropped by no one. Every read is explicit and large, and the
  driver keeps ``queue_depth`` of them in flight itself; give buffered reads a deeper queue (8)
  to make up for the missing read-ahead;
- each chunk's pages are dropped once read (``POSIX_FADV_DONTNEED`` widened to whole pages);
- once a ``read_into`` has finished, each piece's range is dropped again, widened to whole
  folios: pages cached by others (a write, a plain read) sit in folios of up to
  :data:`FOLIO_BYTES`, which are dropped only when covered whole.

Check it with :func:`klotski_tier.core.store.pagecache.cached_fraction`.

File descriptors are opened once per path, in a worker thread, and closed in ``aclose``. See
:mod:`klotski_tier.tiers.base` for the threading and cancellation rules.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from klotski_tier.core.errors import ConfigError, TierError
from klotski_tier.core.units import MIB, align_down, align_up, format_size
from klotski_tier.tiers.base import TierDriver
from klotski_tier.tiers.direct import (
    DIRECT_ALIGN_BYTES,
    O_DIRECT,
    AlignedChunk,
    BounceBuffers,
    open_for_reading,
    plan_aligned,
)
from klotski_tier.tiers.disk_defaults import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_DEPTH
from klotski_tier.tiers.ranges import FileRange

logger = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
"""The page cache's unit: each chunk's dropped range is widened to whole pages."""

FOLIO_BYTES = 2 * MIB
"""The largest page-cache folio on x86-64 (a PMD): pages cached by others (a write, a plain read) sit in
folios this large, which ``POSIX_FADV_DONTNEED`` drops only when the range covers them whole."""


@dataclass(frozen=True)
class _Chunk:
    """``nbytes`` bytes at ``file_offset`` of ``path`` go to ``buffer_offset`` of the destination."""

    path: Path
    file_offset: int
    buffer_offset: int
    nbytes: int


@dataclass(frozen=True)
class _OpenFile:
    fd: int
    direct: bool


def split_chunks(pieces: Sequence[FileRange], chunk_bytes: int) -> Iterator[_Chunk]:
    """Each piece cut into consecutive chunks of at most ``chunk_bytes`` bytes."""
    for piece in pieces:
        for start in range(0, piece.nbytes, chunk_bytes):
            size = min(chunk_bytes, piece.nbytes - start)
            yield _Chunk(piece.path, piece.file_offset + start, piece.buffer_offset + start, size)


def folio_ranges(pieces: Sequence[FileRange]) -> list[tuple[Path, int, int]]:
    """``(path, start, end)`` covering the pieces, widened to :data:`FOLIO_BYTES`, merged where they touch."""
    ranges: list[tuple[Path, int, int]] = []
    widened = sorted(
        (p.path, align_down(p.file_offset, FOLIO_BYTES), align_up(p.file_offset + p.nbytes, FOLIO_BYTES))
        for p in pieces
        if p.nbytes
    )
    for path, start, end in widened:
        if ranges and ranges[-1][0] == path and start <= ranges[-1][2]:
            ranges[-1] = (path, ranges[-1][1], max(end, ranges[-1][2]))
        else:
            ranges.append((path, start, end))
    return ranges


class DiskDriver(TierDriver):
    """Reads checkpoint byte ranges into CPU buffers in a bounded pool, buffered or O_DIRECT."""

    name = "disk"

    def __init__(
        self,
        *,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        direct: bool = False,
        drop_cache: bool = True,
    ) -> None:
        _check_options(queue_depth, chunk_bytes, direct)
        super().__init__(max_workers=queue_depth)
        self.queue_depth = queue_depth
        self.chunk_bytes = chunk_bytes
        self.direct = direct
        self.drop_cache = drop_cache
        self.bytes_read = 0
        self.busy_s = 0.0  # time at least one read was in flight (the drive's busy time)
        self._reads_in_flight = 0
        self._busy_since = 0.0
        self._files: dict[Path, _OpenFile] = {}
        self._bounce = BounceBuffers()
        self._lock = threading.Lock()  # guards _files, bytes_read and busy time, touched by workers

    async def read_into(self, pieces: Sequence[FileRange], dst: torch.Tensor) -> None:
        """Read every piece into ``dst`` (flat ``uint8`` CPU tensor, may be pinned) at its buffer offset.

        Raises :class:`TierError` naming the file and offset when a read fails or the file is short.
        """
        self._check_open()
        memory = _writable_view(dst)
        for piece in pieces:
            assert piece.buffer_offset >= 0 and piece.buffer_offset + piece.nbytes <= len(memory), (
                f"range {piece.path}@{piece.file_offset} to [{piece.buffer_offset}, +{piece.nbytes}) "
                f"does not fit a buffer of {len(memory)} bytes"
            )
        jobs: list[Callable[[], None]]
        if self.direct:
            plan = plan_aligned(pieces, self.chunk_bytes, dst.data_ptr())
            jobs = [self._direct_job(chunk, dst, memory) for chunk in plan]
        else:
            jobs = [self._job(chunk, memory) for chunk in split_chunks(pieces, self.chunk_bytes)]
        if self.drop_cache:
            jobs = _then(jobs, lambda: self._sweep(pieces))
        await self._run_jobs(jobs)

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        """The one blocking call: read into ``view`` from ``file_offset``; bytes read (0 at end of file)."""
        return os.preadv(fd, [view], file_offset)

    # ------------------------------------------------------------ buffered path

    def _job(self, chunk: _Chunk, memory: memoryview) -> Callable[[], None]:
        view = memory[chunk.buffer_offset : chunk.buffer_offset + chunk.nbytes]
        return lambda: self._read_fully(chunk, view)

    def _read_fully(self, chunk: _Chunk, view: memoryview) -> None:
        """Worker thread: fill ``view``, retrying partial reads; a read of 0 bytes means the file is short."""
        file = self._file(chunk.path)
        self._busy(+1)
        try:
            self._read_all(file.fd, chunk, view)
        finally:
            self._busy(-1)
        self._drop(file.fd, chunk.file_offset, chunk.nbytes)
        self._count(chunk.nbytes)

    def _read_all(self, fd: int, chunk: _Chunk, view: memoryview) -> None:
        done = 0
        while done < chunk.nbytes:
            done += self._pread(fd, chunk.path, chunk.file_offset + done, view[done:], chunk.nbytes - done)

    # ------------------------------------------------------------ O_DIRECT path

    def _direct_job(self, chunk: AlignedChunk, dst: torch.Tensor, memory: memoryview) -> Callable[[], None]:
        return lambda: self._read_direct(chunk, dst, memory)

    def _read_direct(self, chunk: AlignedChunk, dst: torch.Tensor, memory: memoryview) -> None:
        """Worker thread: one aligned read, in place or through this thread's bounce buffer."""
        file = self._file(chunk.path)
        if not file.direct:  # the file system refused O_DIRECT: read just the wanted bytes
            wanted = _Chunk(chunk.path, chunk.file_offset + chunk.skip, chunk.buffer_offset, chunk.wanted)
            self._read_fully(wanted, memory[wanted.buffer_offset : wanted.buffer_offset + wanted.nbytes])
            return
        end = chunk.buffer_offset + chunk.wanted
        bounce = None if chunk.in_place else self._bounce.get(chunk.nbytes)  # [nbytes]
        target = memory[chunk.buffer_offset : end] if bounce is None else _writable_view(bounce)
        self._busy(+1)
        try:
            self._read_aligned(file.fd, chunk, target)
        finally:
            self._busy(-1)
        if bounce is not None:  # memmove releases the GIL and stays on this thread (torch's copy_ may not)
            ctypes.memmove(dst.data_ptr() + chunk.buffer_offset, bounce.data_ptr() + chunk.skip, chunk.wanted)
        self._drop(file.fd, chunk.file_offset, chunk.nbytes)
        self._count(chunk.wanted)

    def _read_aligned(self, fd: int, chunk: AlignedChunk, view: memoryview) -> None:
        """Read until the wanted bytes are in ``view``; past the end of file only a short read is legal."""
        needed, done = chunk.skip + chunk.wanted, 0
        while done < needed:
            offset = chunk.file_offset + done
            if done % DIRECT_ALIGN_BYTES:  # O_DIRECT reads stop short only at the end of the file
                raise _short_read(chunk.path, offset, needed - done)
            done += self._pread(fd, chunk.path, offset, view[done : chunk.nbytes], needed - done)

    # ------------------------------------------------------------ shared

    def _pread(self, fd: int, path: Path, offset: int, view: memoryview, missing: int) -> int:
        """One :meth:`_read_chunk`, its errors translated; a read of 0 bytes means the file is short."""
        try:
            count = self._read_chunk(fd, offset, view)
        except OSError as exc:
            reason = exc.strerror or exc
            raise TierError(f"cannot read {path} at offset {offset}: {reason}") from exc
        if count == 0:
            raise _short_read(path, offset, missing)
        return count

    def _drop(self, fd: int, file_offset: int, nbytes: int) -> None:
        """Drop ``[file_offset, +nbytes)`` widened to whole pages from the page cache (if ``drop_cache``)."""
        if not self.drop_cache:
            return
        start, end = align_down(file_offset, PAGE_BYTES), align_up(file_offset + nbytes, PAGE_BYTES)
        _advise(fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def _sweep(self, pieces: Sequence[FileRange]) -> None:
        """Worker thread: drop the pieces' ranges widened to whole folios (large folios cached before)."""
        for path, start, end in folio_ranges(pieces):
            _advise(self._file(path).fd, start, end - start, os.POSIX_FADV_DONTNEED)

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def _busy(self, delta: int) -> None:
        """Count reads in flight; the clock runs while there is at least one."""
        with self._lock:
            now = time.perf_counter()
            if self._reads_in_flight == 0:
                self._busy_since = now
            self._reads_in_flight += delta
            if self._reads_in_flight == 0:
                self.busy_s += now - self._busy_since

    def _file(self, path: Path) -> _OpenFile:
        """Worker thread: the cached descriptor of ``path`` (O_DIRECT where asked and allowed)."""
        with self._lock:
            file = self._files.get(path)
            if file is None:
                file = _OpenFile(*open_for_reading(path, self.direct))
                if self.drop_cache and not file.direct:  # read-ahead caches pages nobody asked for
                    _advise(file.fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._files[path] = file
            return file

    def _release(self) -> None:
        with self._lock:
            for path, file in self._files.items():
                try:
                    os.close(file.fd)
                except OSError as exc:
                    logger.warning("closing %s failed: %s", path, exc)
            self._files.clear()
        self._bounce.clear()


def _check_options(queue_depth: int, chunk_bytes: int, direct: bool) -> None:
    if queue_depth < 1:
        raise ConfigError(f"disk queue_depth must be at least 1, got {queue_depth}")
    if chunk_bytes < 1:
        raise ConfigError(f"disk chunk_bytes must be at least 1 byte, got {chunk_bytes}")
    if direct and chunk_bytes % DIRECT_ALIGN_BYTES:
        raise ConfigError(
            f"direct disk reads need chunk_bytes a multiple of {DIRECT_ALIGN_BYTES}, got {chunk_bytes}"
        )
    if direct and not O_DIRECT:
        raise ConfigError("direct disk reads need O_DIRECT, which this platform lacks; use buffered reads")


def _then(jobs: Sequence[Callable[[], None]], final: Callable[[], None]) -> list[Callable[[], None]]:
    """``jobs`` wrapped so that whichever finishes last (all of them succeeding) then runs ``final``."""
    remaining = len(jobs)
    lock = threading.Lock()

    def wrap(job: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            nonlocal remaining
            job()
            with lock:
                remaining -= 1
                last = remaining == 0
            if last:
                final()

        return run

    return [wrap(job) for job in jobs]


def _advise(fd: int, offset: int, nbytes: int, advice: int) -> None:
    """``posix_fadvise``, best effort: advice a file system refuses costs memory, not correctness."""
    try:
        os.posix_fadvise(fd, offset, nbytes, advice)
    except OSError as exc:
        logger.warning("page-cache advice %d refused (%s): read pages may stay cached", advice, exc.strerror)


def _short_read(path: Path, offset: int, missing: int) -> TierError:
    return TierError(
        f"short read of {path} at offset {offset}: {format_size(missing)} missing; "
        "the file may be truncated, re-download the checkpoint"
    )


def _writable_view(dst: torch.Tensor) -> memoryview:
    """A byte ``memoryview`` of ``dst``'s own memory (no copy)."""
    assert dst.device.type == "cpu", f"disk reads land in CPU memory, got a buffer on {dst.device}"
    assert dst.dtype == torch.uint8 and dst.dim() == 1 and dst.is_contiguous(), (
        f"disk reads need a flat contiguous uint8 buffer, got {dst.dtype} of shape {tuple(dst.shape)}"
    )
    return dst.numpy().data  # [nbytes] shares dst's storage
