"""The residency manager: one load per block however many wait, leases, budgets, cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest

from klotski_tier.core.errors import BudgetError, TierError
from klotski_tier.core.model.blocks import BlockId, attn_block, expert_block
from klotski_tier.core.observe.metrics import TierStats
from klotski_tier.core.runtime.ledger import State, TierLedger
from klotski_tier.core.runtime.residency import DEVICE, HOST, Residency
from klotski_tier.core.store.block_source import BlockSource
from klotski_tier.core.store.files import ModelFiles, load_model_files
from klotski_tier.core.units import align_up
from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.policies.lru import LRUEviction
from klotski_tier.tiers.arena import ARENA_ALIGN_BYTES
from klotski_tier.tiers.device import DeviceDriver
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.host import HostDriver
from tests.checkpoints import make_checkpoint

UNLIMITED = 1 << 40


class GatedDisk(DiskDriver):
    """A disk whose reads block in the worker thread until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(queue_depth=1)
        self.gate = threading.Event()
        self.reading = threading.Event()

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        self.reading.set()
        assert self.gate.wait(timeout=30), "test never opened the gate"
        return super()._read_chunk(fd, file_offset, view)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return load_model_files(make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", num_experts=4))


@asynccontextmanager
async def residency(
    files: ModelFiles,
    *,
    device_bytes: int = UNLIMITED,
    host_bytes: int = UNLIMITED,
    disk: DiskDriver | None = None,
    eviction: Callable[[], EvictionPolicy[BlockId]] = LRUEviction,
    disk_to_device: bool = False,
) -> AsyncIterator[Residency]:
    disk = disk or DiskDriver()
    async with disk, HostDriver() as host, DeviceDriver("cpu") as device:
        res = Residency(
            files.layouts,
            source=BlockSource(files.layouts, disk),
            host=host,
            device=device,
            host_ledger=TierLedger(HOST, host_bytes, eviction(), TierStats(HOST, host_bytes)),
            device_ledger=TierLedger(DEVICE, device_bytes, eviction(), TierStats(DEVICE, device_bytes)),
            disk_to_device=disk_to_device,
        )
        try:
            yield res
        finally:
            await res.aclose()


def run(coro_fn: Callable[[], object]) -> None:
    asyncio.run(coro_fn())  # type: ignore[arg-type]


def test_one_load_is_shared_by_every_waiter(files: ModelFiles) -> None:
    async def scenario() -> None:
        async with residency(files) as res:
            block = expert_block(0, 1)
            first, second = res.request(block), res.request(block)
            leases = await asyncio.gather(first, second)
            assert res.host.stats.transfers == 1 and res.device.stats.transfers == 1
            assert leases[0].weights["down"].data_ptr() == leases[1].weights["down"].data_ptr()
            assert res.state(block) is State.LEASED
            for lease in leases:
                await res.release(lease)
            assert res.state(block) is State.RESIDENT

    run(scenario)


def test_leased_block_is_never_evicted(files: ModelFiles) -> None:
    expert_bytes = files.layouts[expert_block(0, 0)].nbytes

    async def scenario() -> None:
        async with residency(files, device_bytes=2 * expert_bytes) as res:
            held = await res.request(expert_block(0, 0))
            for expert in (1, 2, 3):
                lease = await res.request(expert_block(0, expert))
                await res.release(lease)
                assert res.state(expert_block(0, 0)) is State.LEASED
            assert res.device.stats.peak_bytes <= 2 * expert_bytes
            assert res.device.stats.evictions == 2
            await res.release(held)

    run(scenario)


def test_prefetch_without_room_changes_nothing(files: ModelFiles) -> None:
    expert_bytes = files.layouts[expert_block(0, 0)].nbytes

    async def scenario() -> None:
        async with residency(files, device_bytes=expert_bytes) as res:
            held = await res.request(expert_block(0, 0))
            assert res.prefetch(expert_block(0, 1)) is False
            assert res.state(expert_block(0, 1)) is State.ABSENT
            assert res.device.used_bytes == expert_bytes
            await res.release(held)
            assert res.prefetch(expert_block(0, 1)) is True
            assert res.state(expert_block(0, 0)) is State.ABSENT  # evicted to make room

    run(scenario)


def test_block_larger_than_budget_is_a_budget_error(files: ModelFiles) -> None:
    async def scenario() -> None:
        async with residency(files, device_bytes=16) as res:
            with pytest.raises(BudgetError, match="raise --device-memory"):
                await res.request(attn_block(0))
            assert res.device.used_bytes == 0 and res.state(attn_block(0)) is State.ABSENT

    run(scenario)


def test_cancelled_wait_leaves_the_load_running(files: ModelFiles) -> None:
    async def scenario() -> None:
        disk = GatedDisk()
        async with residency(files, disk=disk) as res:
            block = expert_block(1, 2)
            waiter = asyncio.ensure_future(res.request(block))
            await asyncio.to_thread(disk.reading.wait, 30)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
            assert res.state(block) is State.IN_FLIGHT, "cancelling a waiter must not stop the load"
            assert res.device.used_bytes == files.layouts[block].nbytes
            disk.gate.set()
            lease = await res.request(block)
            assert lease.weights["down"].shape[0] == files.spec.hidden_size
            await res.release(lease)

    run(scenario)


def test_close_waits_for_the_reading_thread(files: ModelFiles) -> None:
    async def scenario() -> None:
        disk = GatedDisk()
        async with residency(files, disk=disk) as res:
            res.prefetch(expert_block(1, 3))
            await asyncio.to_thread(disk.reading.wait, 30)
            closing = asyncio.ensure_future(res.aclose())
            for _ in range(20):
                await asyncio.sleep(0)
            assert not closing.done(), "aclose returned while a thread still writes the buffer"
            disk.gate.set()
            await closing
            assert res.device.used_bytes == 0 and res.host.used_bytes == 0

    run(scenario)


def test_failed_read_reaches_waiters_and_frees_the_room(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "ckpt", "mixtral")
    files = load_model_files(directory)
    shard = next(directory.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated after opening

    async def scenario() -> None:
        async with residency(files) as res:
            block = expert_block(1, 3)
            with pytest.raises(TierError, match=r"truncated|short read"):
                await res.request(block)
            assert res.state(block) is State.ABSENT
            assert res.device.used_bytes == 0 and res.host.used_bytes == 0

    run(scenario)


def test_a_block_that_fits_by_bytes_but_not_in_one_region_evicts_until_it_does(files: ModelFiles) -> None:
    """The arena holds four experts; experts 0 and 2 leave, so two experts' bytes are free but not side
    by side: a block of two experts' size evicts one more, in the policy's order, and lands."""
    expert = files.layouts[expert_block(0, 0)].nbytes
    attn = files.layouts[attn_block(0)].nbytes
    room = 4 * align_up(expert, ARENA_ALIGN_BYTES)
    assert expert < attn <= 2 * expert, "the test's block sizes"

    async def scenario() -> None:
        async with residency(files, device_bytes=room) as res:
            device = res._device
            assert isinstance(device, DeviceDriver)
            await device.reserve(room)
            leases = [await res.request(expert_block(0, e)) for e in range(4)]
            for lease in leases:
                await res.release(lease)
            res.device.drop(res.device.entries[expert_block(0, 0)])
            res.device.drop(res.device.entries[expert_block(0, 2)])
            lease = await res.request(attn_block(0))
            placed = res.device.entries[lease.block].buffer
            assert device.arena is not None and placed is not None and device.arena.owns(placed)
            assert res.device.stats.evictions == 1 and res.state(expert_block(0, 1)) is State.ABSENT
            assert res.device.used_bytes <= room

    run(scenario)


# ---------------------------------------------------------------- the staging window


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """Four layers: enough to stage two layers ahead of the next."""
    return load_model_files(
        make_checkpoint(tmp_path_factory.mktemp("deep"), "mixtral", num_layers=4, num_experts=4)
    )


def sweep_residency(
    files: ModelFiles, *, device_bytes: int, host_bytes: int, disk_to_device: bool = False
) -> AbstractAsyncContextManager[Residency]:
    from klotski_tier.policies.sweep import SweepEviction

    return residency(
        files, device_bytes=device_bytes, host_bytes=host_bytes, eviction=SweepEviction,
        disk_to_device=disk_to_device,
    )  # fmt: skip


def test_a_staged_block_waits_in_host_ram_and_then_costs_no_disk_read(deep: ModelFiles) -> None:
    block = expert_block(1, 2)

    async def scenario() -> None:
        async with sweep_residency(deep, device_bytes=UNLIMITED, host_bytes=UNLIMITED) as res:
            assert res.stage(block) is True
            assert res.state(block, HOST) is State.IN_FLIGHT and res.state(block) is State.ABSENT
            await res.host.entries[block].ready
            assert res.host.stats.transfers == 1 and res.device.stats.transfers == 0
            lease = await res.request(block)  # the device takes it from RAM: a copy, no second read
            assert res.host.stats.transfers == 1 and res.device.stats.transfers == 1
            await res.release(lease)
            assert res.stage(block) is True  # already there: nothing more to do
            assert res.host.stats.transfers == 1

    run(scenario)


def test_staging_takes_no_room_from_a_block_needed_sooner(deep: ModelFiles) -> None:
    """Host RAM holds one block: an unused block of layer 1 is needed before one of layer 2, so
    staging the latter is refused and changes nothing; once the sweep has used the layer-1 block it
    is needed only in the next sweep, and staging takes its room."""
    one = deep.layouts[expert_block(1, 0)].nbytes

    async def scenario() -> None:
        async with sweep_residency(deep, device_bytes=UNLIMITED, host_bytes=one) as res:
            await res.stage_in_host(expert_block(1, 0))
            assert res.stage(expert_block(2, 0)) is False
            assert res.state(expert_block(2, 0), HOST) is State.ABSENT
            assert res.state(expert_block(1, 0), HOST) is State.RESIDENT
            res.host.eviction.on_access(expert_block(1, 0))  # the sweep is at layer 1 and used it
            assert res.stage(expert_block(2, 0)) is True
            assert res.state(expert_block(1, 0), HOST) is State.ABSENT
            await res.host.entries[expert_block(2, 0)].ready
            assert res.host.used_bytes <= one

    run(scenario)


def test_a_cpu_device_stages_only_into_free_room(deep: ModelFiles) -> None:
    """Reading straight into a CPU device, staging never evicts: the blocks the device keeps across
    steps would be traded for reads of the same size."""
    one = deep.layouts[expert_block(1, 0)].nbytes

    async def scenario() -> None:
        async with sweep_residency(deep, device_bytes=one, host_bytes=0, disk_to_device=True) as res:
            lease = await res.request(expert_block(0, 0))
            await res.release(lease)  # used: a prefetch of layer 2 could take its room, staging may not
            assert res.stage(expert_block(2, 0)) is False
            assert res.state(expert_block(0, 0)) is State.RESIDENT
            assert res.prefetch(expert_block(2, 0)) is True  # a prefetch (the next layer's) still may
            assert res.state(expert_block(0, 0)) is State.ABSENT

    run(scenario)


def test_reads_ahead_queue_behind_every_nearer_read(deep: ModelFiles) -> None:
    """The read queue's order: demand, the next layer's attention and gate, other prefetches, then
    blocks staged for layers beyond the next."""
    from klotski_tier.core.model.blocks import gate_block
    from klotski_tier.core.runtime.read_queue import AHEAD, DEMAND, NEXT_WEIGHTS, SPECULATIVE

    async def scenario() -> None:
        async with sweep_residency(deep, device_bytes=UNLIMITED, host_bytes=UNLIMITED) as res:
            res.horizon = 0
            demanded = res.request(expert_block(0, 0))
            assert res.prefetch(attn_block(1)) and res.prefetch(expert_block(1, 1))
            assert res.prefetch(gate_block(2))  # beyond the next layer: speculative
            assert res.stage(attn_block(3))
            urgency = res._urgency
            assert urgency(expert_block(0, 0)) == DEMAND
            assert urgency(attn_block(1)) == NEXT_WEIGHTS
            assert urgency(expert_block(1, 1)) == SPECULATIVE == urgency(gate_block(2))
            assert urgency(attn_block(3)) == AHEAD
            res.request(attn_block(3))  # a computation wants it now: demand, wherever it waits
            assert urgency(attn_block(3)) == DEMAND
            await res.release(await demanded)

    run(scenario)


def test_under_a_policy_that_does_not_know_the_future_staging_takes_free_room_only(deep: ModelFiles) -> None:
    """LRU cannot tell whether a staged block is needed before the one it would evict: staging waits
    for free room there (it would otherwise trade kept blocks for reads, as host_tier_check showed)."""
    one = deep.layouts[expert_block(1, 0)].nbytes

    async def scenario() -> None:
        async with residency(deep, device_bytes=UNLIMITED) as res:  # an LRU host ledger
            res.host.capacity_bytes = one
            await res.stage_in_host(expert_block(0, 0))
            assert not res.host.eviction.knows_next_use
            assert res.stage(expert_block(2, 0)) is False
            assert res.state(expert_block(0, 0), HOST) is State.RESIDENT
            res.host.capacity_bytes = 2 * one  # free room: staging goes ahead
            assert res.stage(expert_block(2, 0)) is True

    run(scenario)
