"""O_DIRECT reads: aligned read plans, aligned bounce buffers, and opening files for direct I/O.

With ``O_DIRECT`` the kernel moves bytes between the drive and user memory without the page
cache, but only when the file offset, the length and the buffer address are all multiples of
the drive's logical block size (:data:`DIRECT_ALIGN_BYTES` covers every common drive). A piece
of a checkpoint rarely is, so :func:`plan_aligned` widens each piece to alignment and splits it
into :class:`AlignedChunk` reads:

- a piece whose destination address has the same phase modulo the alignment as its file offset
  (always the case for a packed store read into a 4 KiB-aligned buffer) is read straight into
  the destination, except for a partial first and last alignment unit;
- any other piece, and those partial units, go through a per-thread aligned bounce buffer
  (:class:`BounceBuffers`) and the wanted bytes are copied out; the extra bytes are discarded.

::

    file      |....[=====piece=====]....|      alignment units of DIRECT_ALIGN_BYTES
    reads     [head][ body, in place ][tail]   head and tail through the bounce buffer
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from klotski_tier.core.errors import TierError
from klotski_tier.core.units import align_down, align_up
from klotski_tier.tiers.hostmem import aligned_empty
from klotski_tier.tiers.ranges import FileRange

logger = logging.getLogger(__name__)

DIRECT_ALIGN_BYTES = 4096
"""Alignment of O_DIRECT offsets, lengths and buffers: a multiple of every common logical block size."""

O_DIRECT: int = getattr(os, "O_DIRECT", 0)
"""The ``O_DIRECT`` open flag; 0 where the platform has none."""


@dataclass(frozen=True)
class AlignedChunk:
    """One aligned read: ``nbytes`` at ``file_offset`` of ``path``; ``wanted`` of them land in the buffer.

    The ``wanted`` bytes start ``skip`` bytes into the read and go to ``buffer_offset`` of the
    destination. ``in_place``: read straight into the destination (nothing skipped or discarded,
    and the destination address is aligned); else through a bounce buffer.
    """

    path: Path
    file_offset: int
    nbytes: int
    skip: int
    wanted: int
    buffer_offset: int
    in_place: bool


def plan_aligned(
    pieces: Sequence[FileRange], chunk_bytes: int, base_address: int, alignment: int = DIRECT_ALIGN_BYTES
) -> Iterator[AlignedChunk]:
    """Aligned reads that together deliver every piece into a buffer starting at ``base_address``.

    ``chunk_bytes`` (a multiple of ``alignment``) bounds each read.
    """
    assert chunk_bytes > 0 and chunk_bytes % alignment == 0, (
        f"chunk of {chunk_bytes} bytes is not a multiple of the {alignment}-byte alignment"
    )
    for piece in pieces:
        if piece.nbytes == 0:
            continue
        start, end = piece.file_offset, piece.file_offset + piece.nbytes
        low, high = align_down(start, alignment), align_up(end, alignment)
        body_start, body_end = align_up(start, alignment), align_down(end, alignment)
        in_phase = (base_address + piece.buffer_offset - start) % alignment == 0
        if not (in_phase and body_start < body_end):
            yield from _spans(piece, low, high, chunk_bytes, in_place=False)
            continue
        yield from _spans(piece, low, body_start, chunk_bytes, in_place=False)  # partial first unit
        yield from _spans(piece, body_start, body_end, chunk_bytes, in_place=True)
        yield from _spans(piece, body_end, high, chunk_bytes, in_place=False)  # partial last unit


def _spans(
    piece: FileRange, low: int, high: int, chunk_bytes: int, *, in_place: bool
) -> Iterator[AlignedChunk]:
    """Reads of ``[low, high)`` (aligned) cut at ``chunk_bytes``, each keeping its overlap with the piece."""
    start, end = piece.file_offset, piece.file_offset + piece.nbytes
    for read_start in range(low, high, chunk_bytes):
        read_end = min(read_start + chunk_bytes, high)
        keep_start, keep_end = max(read_start, start), min(read_end, end)
        yield AlignedChunk(
            path=piece.path,
            file_offset=read_start,
            nbytes=read_end - read_start,
            skip=keep_start - read_start,
            wanted=keep_end - keep_start,
            buffer_offset=piece.buffer_offset + keep_start - start,
            in_place=in_place,
        )


class BounceBuffers:
    """One aligned staging buffer per worker thread, grown on demand and reused by later reads."""

    def __init__(self, alignment: int = DIRECT_ALIGN_BYTES) -> None:
        self._alignment = alignment
        self._buffers: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held by every thread's buffer together."""
        with self._lock:
            return sum(buffer.numel() for buffer in self._buffers.values())

    def get(self, nbytes: int) -> torch.Tensor:
        """The calling thread's buffer, at least ``nbytes`` long (only that thread may use it)."""
        thread = threading.get_ident()
        with self._lock:
            buffer = self._buffers.get(thread)
        if buffer is None or buffer.numel() < nbytes:
            buffer = aligned_empty(nbytes, self._alignment)
            with self._lock:
                self._buffers[thread] = buffer
        return buffer[:nbytes]

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


def open_for_reading(path: Path, direct: bool) -> tuple[int, bool]:
    """A read-only descriptor of ``path`` and whether it is O_DIRECT.

    A file system that refuses O_DIRECT (``EINVAL``) gets a buffered descriptor and a warning.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC
    if direct:
        try:
            return os.open(path, flags | O_DIRECT), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise _open_error(path, exc) from exc
            logger.warning("%s refuses O_DIRECT (%s); reading it through the page cache", path, exc.strerror)
    try:
        return os.open(path, flags), False
    except OSError as exc:
        raise _open_error(path, exc) from exc


def _open_error(path: Path, exc: OSError) -> TierError:
    return TierError(f"cannot open {path}: {exc.strerror or exc}; check the checkpoint path")
