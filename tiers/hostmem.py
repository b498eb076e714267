"""Host memory that disk reads land in: page-aligned, and backed by transparent huge pages when large.

Why huge pages. An O_DIRECT read is a DMA into the pages of its destination, and a block device
takes at most ``max_segments`` physically contiguous runs of memory per request
(``/sys/block/DEV/queue/max_segments``: 254 on a virtio disk, 127-255 on typical NVMe). A buffer
of scattered 4 KiB pages, which is what a long-running heap hands out after a few frees, caps a
request at ``max_segments`` pages (about 1 MiB, often less), however large the ``preadv``; a
drive whose throughput depends on request size then runs at a fraction of its bandwidth. On the
machine this was found on (a virtio disk with ``max_sectors_kb`` 4096) the same 16 MiB reads
reached the drive as 4 MiB requests at 1.6-2.3 GB/s into fresh or huge-page memory, and as
560-920 KiB requests at 0.5-0.9 GB/s into recycled heap buffers (``/sys/block/vda/stat``).

So buffers of at least :data:`HUGE_PAGE_BYTES` are private anonymous mappings, 2 MiB-aligned,
with ``MADV_HUGEPAGE`` on their whole 2 MiB units: each unit is one physically contiguous page
and a request reaches the device at full size. It works with transparent huge pages set to
``always`` or ``madvise`` (the common defaults); with ``never``, or where the kernel finds no free
huge page, the mapping is simply made of small pages, as before. The partial last unit stays in
small pages, so no more memory is touched than the buffer's size rounded up to 4 KiB.

Why a pool. A fresh mapping costs a page fault and the zeroing of every page, and unmapping it
a TLB flush: 0.2 s of CPU per GB here, 4 s of a run that streams 18 GB, taken from a compute
that shares the cores. So when the last tensor viewing a buffer is freed, its mapping goes back
to a :class:`MappingPool` (one per process) and the next buffer of the same size class reuses it,
huge pages and all; contents are undefined either way. The pool keeps at most
:data:`POOL_MAX_FREE_BYTES` of free mappings: memory outside every budget, and its bound.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np
import torch

HUGE_PAGE_BYTES = 2 * 1024 * 1024
"""A PMD-sized transparent huge page on x86-64 and arm64 (4 KiB base pages)."""

PAGE_ALIGN_BYTES = 4096
"""Every buffer starts on a page boundary: O_DIRECT reads land in it without a bounce copy."""

POOL_MAX_FREE_BYTES = 64 * 1024 * 1024
"""Free mappings kept for reuse (beyond them, a freed buffer is unmapped)."""

SizeClass = tuple[int, int]
"""(mapping bytes, huge-paged 2 MiB units): buffers of one class can share mappings."""

_ANONYMOUS_PRIVATE = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)


def aligned_empty(nbytes: int, alignment: int = PAGE_ALIGN_BYTES) -> torch.Tensor:
    """A flat ``uint8`` CPU tensor of ``nbytes`` (contents undefined) whose address is a multiple of
    ``alignment``; huge-page backed when at least :data:`HUGE_PAGE_BYTES` and the platform allows."""
    assert nbytes >= 0, f"cannot allocate a negative size ({nbytes} bytes)"
    if nbytes >= HUGE_PAGE_BYTES and _MADV_HUGEPAGE is not None and HUGE_PAGE_BYTES % alignment == 0:
        return _huge_empty(nbytes, _MADV_HUGEPAGE)
    raw = torch.empty(nbytes + alignment, dtype=torch.uint8)  # [nbytes + alignment]
    shift = -raw.data_ptr() % alignment
    return raw[shift : shift + nbytes]  # [nbytes] keeps raw's storage alive


def _huge_empty(nbytes: int, advice: int) -> torch.Tensor:
    """``nbytes`` at a 2 MiB boundary of a private mapping (from the pool, else fresh), whose whole
    2 MiB units are huge-paged; the mapping returns to the pool when the buffer's storage is freed."""
    units = nbytes // HUGE_PAGE_BYTES  # whole 2 MiB units: huge pages; a partial last one: small pages
    size = nbytes - nbytes % -HUGE_PAGE_BYTES + HUGE_PAGE_BYTES  # every unit, and room to align
    size_class = (size, units)  # buffers of one class have the same mapping and the same huge units
    mapping = POOL.take(size_class)
    fresh = mapping is None
    if mapping is None:
        mapping = mmap.mmap(-1, size, flags=_ANONYMOUS_PRIVATE)
    shift = -_address(mapping) % HUGE_PAGE_BYTES
    if fresh:
        mapping.madvise(advice, shift, units * HUGE_PAGE_BYTES)  # before any page is touched
    view = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=shift)  # [nbytes]
    weakref.finalize(view, POOL.give, mapping, size_class).atexit = False  # when torch's storage lets go
    return torch.from_numpy(view)  # [nbytes]


def _address(mapping: mmap.mmap) -> int:
    return int(np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data)


class MappingPool:
    """Free mappings by size, at most ``max_free_bytes`` of them; thread-safe (storages are freed
    in whichever thread drops the last reference)."""

    def __init__(self, max_free_bytes: int = POOL_MAX_FREE_BYTES) -> None:
        self.max_free_bytes = max_free_bytes
        self.free_bytes = 0
        self.reused = 0  # buffers served from the pool
        self._free: dict[SizeClass, list[mmap.mmap]] = {}
        self._lock = threading.Lock()

    def take(self, size_class: SizeClass) -> mmap.mmap | None:
        """A free mapping of this class, or None."""
        with self._lock:
            free = self._free.get(size_class)
            if not free:
                return None
            mapping = free.pop()
            self.free_bytes -= len(mapping)
            self.reused += 1
            return mapping

    def give(self, mapping: mmap.mmap, size_class: SizeClass) -> None:
        """Keep ``mapping`` for reuse by its class if there is room, else let it be unmapped."""
        with self._lock:
            if self.free_bytes + len(mapping) > self.max_free_bytes:
                return
            self._free.setdefault(size_class, []).append(mapping)
            self.free_bytes += len(mapping)

    def clear(self) -> None:
        """Unmap every free mapping."""
        with self._lock:
            self._free.clear()
            self.free_bytes = 0


POOL = MappingPool()
"""The process's pool of free huge-page mappings."""
