"""A device arena: one reservation of the whole weight budget, handed out in aligned regions.

A byte budget counted over the caching allocator's blocks is a promise the allocator may not keep:
it rounds, splits and caches, and a budget of logical bytes can need more memory than it says, or
fail to find a large block among fragments. So on a GPU the device tier reserves its weight budget
once, as one tensor, and places every block in it itself:

- first fit over the free regions sorted by offset; a freed region merges with free neighbours;
- a region given back may still be read by kernels already queued on the compute stream, so
  :meth:`Arena.free` takes the event recorded after them and keeps the region aside until the
  event has completed (polled with ``query()``, never waited for on the event loop);
- a block that finds no contiguous region gets ``None`` ("no room" is a value): the residency
  manager then evicts another block, or waits for a release.

Blocks of a model come in a handful of sizes (attention, gate, expert, embedding, head), so
first fit with merging keeps fragmentation low; the residency manager's eviction covers the rest.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Protocol

import torch

from klotski_tier.core.units import align_up

ARENA_ALIGN_BYTES = 512
"""Offset of every region: a multiple of CUDA's allocation granularity for kernels (256) and of every
dtype's size."""


class Completion(Protocol):
    """Something that says whether queued work is done (a ``torch.cuda.Event``)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass(frozen=True)
class _Pending:
    offset: int
    size: int
    after: Completion


class Arena:
    """Aligned regions of ``buffer`` (flat ``uint8``), placed first fit; see the module docstring."""

    def __init__(self, buffer: torch.Tensor, alignment: int = ARENA_ALIGN_BYTES) -> None:
        assert buffer.dtype == torch.uint8 and buffer.dim() == 1, "an arena is a flat uint8 tensor"
        self._buffer = buffer
        self._alignment = alignment
        self._base = buffer.data_ptr()
        self._free: list[tuple[int, int]] = [(0, buffer.numel())] if buffer.numel() else []  # (offset, size)
        self._used: dict[int, int] = {}  # offset -> size of each region handed out
        self._pending: list[_Pending] = []  # freed regions waiting for their readers

    @property
    def capacity_bytes(self) -> int:
        return self._buffer.numel()

    @property
    def used_bytes(self) -> int:
        """Bytes of the regions handed out and not yet back (pending ones included)."""
        return sum(self._used.values()) + sum(p.size for p in self._pending)

    def owns(self, region: torch.Tensor) -> bool:
        """Whether ``region`` is one this arena handed out (and has not taken back)."""
        return region.device == self._buffer.device and region.data_ptr() - self._base in self._used

    @property
    def pending(self) -> int:
        """Freed regions whose readers may still be running."""
        return len(self._pending)

    def allocate(self, nbytes: int) -> torch.Tensor | None:
        """A region of ``nbytes`` (a view of the arena), or None if no free region holds it."""
        self.reclaim()
        size = align_up(max(nbytes, 1), self._alignment)
        for index, (offset, free) in enumerate(self._free):
            if free >= size:
                if free == size:
                    del self._free[index]
                else:
                    self._free[index] = (offset + size, free - size)
                self._used[offset] = size
                return self._buffer[offset : offset + nbytes]  # [nbytes]
        return None

    def free(self, region: torch.Tensor, after: Completion | None = None) -> None:
        """Give ``region`` back: at once, or once ``after`` (the readers' event) has completed."""
        offset = region.data_ptr() - self._base
        size = self._used.pop(offset)
        if after is None or after.query():
            self._insert(offset, size)
        else:
            self._pending.append(_Pending(offset, size, after))

    def reclaim(self) -> None:
        """Take back the pending regions whose readers are done."""
        still: list[_Pending] = []
        for pending in self._pending:
            if pending.after.query():
                self._insert(pending.offset, pending.size)
            else:
                still.append(pending)
        self._pending = still

    def wait_oldest(self) -> bool:
        """Block until the oldest pending region is free again (in a worker thread); False if none is."""
        if not self._pending:
            return False
        self._pending[0].after.synchronize()
        self.reclaim()
        return True

    def _insert(self, offset: int, size: int) -> None:
        """Return a region to the free list, merged with the free regions it touches."""
        index = bisect.bisect_left(self._free, (offset, 0))
        if index < len(self._free) and offset + size == self._free[index][0]:
            size += self._free.pop(index)[1]
        if index > 0 and self._free[index - 1][0] + self._free[index - 1][1] == offset:
            offset, before = self._free.pop(index - 1)
            size += before
            index -= 1
        self._free.insert(index, (offset, size))
