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
small pages, so no more memory is touched than the buffer's size rounded up to 4 KiB. The mapping
is unmapped when the last tensor viewing it is freed.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE_BYTES = 2 * 1024 * 1024
"""A PMD-sized transparent huge page on x86-64 and arm64 (4 KiB base pages)."""

PAGE_ALIGN_BYTES = 4096
"""Every buffer starts on a page boundary: O_DIRECT reads land in it without a bounce copy."""

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
    """``nbytes`` at a 2 MiB boundary of a fresh private mapping, its whole 2 MiB units huge-paged."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES, flags=_ANONYMOUS_PRIVATE)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # [nbytes + 2 MiB], keeps the mapping alive
    shift = -whole.data_ptr() % HUGE_PAGE_BYTES
    huge_bytes = nbytes - nbytes % HUGE_PAGE_BYTES
    mapping.madvise(advice, shift, huge_bytes)  # before any page is touched
    return whole[shift : shift + nbytes]  # [nbytes]
