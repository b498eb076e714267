"""Host I/O buffers: page-aligned always; large ones on 2 MiB boundaries, backed by huge pages where
the kernel allows (so that each disk read reaches the drive as large requests)."""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import pytest
import torch

from klotski_tier.tiers.host import HostDriver
from klotski_tier.tiers.hostmem import HUGE_PAGE_BYTES, PAGE_ALIGN_BYTES, POOL, MappingPool, aligned_empty

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
KIB = 1024


def _thp_mode() -> str | None:
    """The selected transparent-huge-page mode (``always``, ``madvise``, ``never``), None if unknown."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def _anon_huge_kib(address: int) -> int:
    """``AnonHugePages`` of the mapping of this process that contains ``address`` (in KiB)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping contains {address:#x}")


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 64 * KIB, HUGE_PAGE_BYTES - 1])
def test_small_buffers_are_page_aligned(nbytes: int) -> None:
    buffer = aligned_empty(nbytes)
    assert buffer.dtype == torch.uint8 and buffer.numel() == nbytes
    assert buffer.data_ptr() % PAGE_ALIGN_BYTES == 0


@pytest.mark.parametrize("nbytes", [HUGE_PAGE_BYTES, 3 * HUGE_PAGE_BYTES + 12 * KIB])
def test_large_buffers_start_on_a_huge_page_and_hold_data(nbytes: int) -> None:
    buffer = aligned_empty(nbytes)
    assert buffer.numel() == nbytes
    assert buffer.data_ptr() % HUGE_PAGE_BYTES == 0
    buffer.fill_(7)
    buffer[-1] = 9
    assert int(buffer[:-1].sum()) == 7 * (nbytes - 1) and int(buffer[-1]) == 9


HUGE_PAGES_OFF = pytest.mark.skipif(
    _thp_mode() not in {"always", "madvise"} or not hasattr(mmap, "MADV_HUGEPAGE"),
    reason="transparent huge pages are off on this kernel",
)


@HUGE_PAGES_OFF
def test_large_buffers_are_backed_by_huge_pages() -> None:
    units = 4
    buffer = aligned_empty(units * HUGE_PAGE_BYTES + 8 * KIB)  # a partial last unit stays small pages
    buffer.zero_()
    huge_kib = _anon_huge_kib(buffer.data_ptr())
    assert huge_kib >= HUGE_PAGE_BYTES // KIB, "no huge page backs a large I/O buffer"
    assert huge_kib <= units * HUGE_PAGE_BYTES // KIB, "the partial last unit was huge-paged"


@HUGE_PAGES_OFF
@pytest.mark.parametrize("units", [1, 2, 8])
def test_a_whole_number_of_units_is_all_huge_pages_even_when_reused(units: int) -> None:
    for _ in range(2):  # the second buffer comes from the pool
        buffer = aligned_empty(units * HUGE_PAGE_BYTES)
        buffer.zero_()
        assert _anon_huge_kib(buffer.data_ptr()) == units * HUGE_PAGE_BYTES // KIB
        del buffer
        gc.collect()


def test_the_mapping_lives_as_long_as_a_view_of_it() -> None:
    buffer = aligned_empty(2 * HUGE_PAGE_BYTES)
    view = buffer[HUGE_PAGE_BYTES:]  # [2 MiB]
    del buffer
    gc.collect()
    view.fill_(3)  # the storage is still mapped through the view
    assert int(view.sum()) == 3 * HUGE_PAGE_BYTES


def test_host_tier_buffers_use_it() -> None:
    host = HostDriver(pin=False)
    buffer = host.allocate(HUGE_PAGE_BYTES + 4 * KIB)
    assert buffer.data_ptr() % HUGE_PAGE_BYTES == 0 and buffer.numel() == HUGE_PAGE_BYTES + 4 * KIB


def test_a_freed_buffer_is_reused_and_a_viewed_one_is_not() -> None:
    POOL.clear()
    nbytes = 2 * HUGE_PAGE_BYTES + 4 * KIB
    first = aligned_empty(nbytes)
    address = first.data_ptr()
    weights = first[:KIB].view(torch.int32)  # [256] a view, as a block's weights are: keeps the storage
    del first
    gc.collect()
    second = aligned_empty(nbytes)
    assert second.data_ptr() != address, "a buffer still viewed was handed out again"
    del weights, second
    gc.collect()
    reused_before = POOL.reused
    third = aligned_empty(nbytes)
    assert POOL.reused == reused_before + 1 and third.data_ptr() % HUGE_PAGE_BYTES == 0


def test_the_pool_keeps_no_more_than_its_bound() -> None:
    pool = MappingPool(max_free_bytes=3 * HUGE_PAGE_BYTES)
    mappings = [mmap.mmap(-1, 2 * HUGE_PAGE_BYTES) for _ in range(3)]
    size_class = (2 * HUGE_PAGE_BYTES, 1)
    for mapping in mappings:
        pool.give(mapping, size_class)
    assert pool.free_bytes == 2 * HUGE_PAGE_BYTES  # the second would exceed the bound: unmapped instead
    assert pool.take((2 * HUGE_PAGE_BYTES, 0)) is None and pool.take(size_class) is mappings[0]
    assert pool.free_bytes == 0 and pool.reused == 1
