"""The device arena: first fit in aligned regions, merging on free, regions kept until their readers
are done; and the device driver placing blocks in it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch

from klotski_tier.tiers.arena import ARENA_ALIGN_BYTES, Arena
from klotski_tier.tiers.device import DeviceDriver

UNIT = ARENA_ALIGN_BYTES


@dataclass
class FakeEvent:
    """An event the test completes by hand (a CUDA event's query/synchronize)."""

    done: bool = False
    waited: bool = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = self.done = True


def arena(units: int) -> Arena:
    return Arena(torch.empty(units * UNIT, dtype=torch.uint8))


def offset(region: torch.Tensor, of: Arena) -> int:
    return (region.data_ptr() - of._base) // UNIT


def test_regions_are_aligned_first_fit_and_none_when_full() -> None:
    a = arena(4)
    first, second = a.allocate(10), a.allocate(UNIT + 1)  # one unit, then two
    assert first is not None and second is not None
    assert (offset(first, a), offset(second, a)) == (0, 1) and first.numel() == 10
    assert a.allocate(2 * UNIT) is None  # one unit left
    last = a.allocate(UNIT)
    assert last is not None and offset(last, a) == 3 and a.used_bytes == 4 * UNIT


def test_freed_neighbours_merge_into_one_region() -> None:
    a = arena(4)
    regions = [a.allocate(UNIT) for _ in range(4)]
    assert all(r is not None for r in regions)
    a.free(regions[0])  # type: ignore[arg-type]
    a.free(regions[2])  # type: ignore[arg-type]
    assert a.allocate(2 * UNIT) is None  # two free units, not side by side
    a.free(regions[1])  # type: ignore[arg-type]
    merged = a.allocate(3 * UNIT)
    assert merged is not None and offset(merged, a) == 0


def test_a_region_is_reused_only_once_its_readers_are_done() -> None:
    a = arena(1)
    region = a.allocate(UNIT)
    assert region is not None and a.owns(region)
    readers = FakeEvent()
    a.free(region, after=readers)
    assert not a.owns(region) and a.pending == 1
    assert a.allocate(UNIT) is None  # the kernels reading it are still queued
    readers.done = True
    again = a.allocate(UNIT)
    assert again is not None and again.data_ptr() == region.data_ptr() and a.pending == 0


def test_wait_oldest_waits_for_the_first_pending_region_only() -> None:
    a = arena(2)
    first, second = a.allocate(UNIT), a.allocate(UNIT)
    events = [FakeEvent(), FakeEvent()]
    a.free(first, after=events[0])  # type: ignore[arg-type]
    a.free(second, after=events[1])  # type: ignore[arg-type]
    assert a.wait_oldest() and events[0].waited and not events[1].waited
    assert a.pending == 1 and a.allocate(UNIT) is not None and a.allocate(UNIT) is None


def test_the_device_driver_places_blocks_in_its_reservation() -> None:
    async def scenario() -> None:
        async with DeviceDriver("cpu") as device:
            unreserved = await device.aplace(100)
            assert unreserved is not None and device.arena is None
            await device.reserve(2 * UNIT)
            assert device.arena is not None and device.arena.capacity_bytes == 2 * UNIT
            block = await device.aplace(UNIT)
            assert block is not None and device.arena.owns(block)
            assert await device.aplace(2 * UNIT) is None  # no free region holds it
            device.release(block)  # on the CPU nothing is queued: free at once
            assert await device.aplace(2 * UNIT) is not None
            device.release(unreserved)  # a buffer from outside the arena: nothing to give back

    asyncio.run(scenario())
