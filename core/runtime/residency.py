"""The residency manager: the single record of where every block is.

Tiers, fastest last: ``disk`` (the home of every block: the checkpoint), ``host`` (RAM) and
``device`` (where compute runs). For each memory tier a :class:`TierLedger` holds the
blocks present there and enforces the tier's byte budget; the eviction policy orders the
victims. The life of a block in a tier::

    absent --reserve room--> in flight --bytes landed--> resident --lease--> leased
      ^                          |                          |  ^              |
      |                          | load failed              |  +--release---+
      +--------------------------+-------- evicted <--------+  (only when not leased)

One readiness future per (block, tier) is shared by every waiter; a waiter that is
cancelled does not cancel the load, and a load's buffer is not freed while a tier driver's
thread may still write it (drivers return only when their threads are done).

Demand loads (:meth:`Residency.request`) wait for room: the pipeline's releases make room. A
prefetch (:meth:`Residency.prefetch`) never waits and never evicts a leased block: "no room" is a
``False`` return that changes nothing.
A block is leased from the moment it is requested, in flight or not, so nothing a
computation is waiting for can be evicted under it.

Disk reads wait in a :class:`~klotski_tier.core.runtime.read_queue.ReadQueue` and reach the disk driver
by urgency, a few blocks at a time: demand first, then the next layer's prefetched attention and gate
(and the embedding and head), then other prefetches, then blocks staged for layers further ahead
(:meth:`Residency.stage`: the disk-to-DRAM window, read while the drive would otherwise idle).

A prefetch or a staging read takes room only from blocks the eviction policy needs later than the
one it loads (:meth:`~klotski_tier.policies.eviction.EvictionPolicy.evict_for`), so reading ahead
never costs a read of something needed sooner.

What the manager asks of the tiers is three small protocols (:class:`BlockReader`,
:class:`HostBuffers`, :class:`DeviceBuffers`): the engine passes its tier drivers, the simulator
drivers that take simulated time on a virtual clock and allocate nothing (``meta`` tensors). Time
is read from ``clock`` (``time.perf_counter`` in the engine, the loop's virtual time in the
simulator); an :class:`~klotski_tier.core.observe.events.EventLog`, when given, records each request,
prefetch, load, eviction and release.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from klotski_tier.core.errors import BudgetError
from klotski_tier.core.model.blocks import BlockId, BlockKind, BlockLayout, BlockWeights
from klotski_tier.core.observe.events import LOAD, LOADED, PREFETCH, RELEASE, REQUEST, EventLog
from klotski_tier.core.runtime.ledger import Entry, State, TierLedger
from klotski_tier.core.runtime.read_queue import AHEAD, DEMAND, NEXT_WEIGHTS, SPECULATIVE, ReadQueue
from klotski_tier.core.units import format_size
from klotski_tier.tiers.base import CopyDone
from klotski_tier.tiers.disk_defaults import DEFAULT_QUEUE_DEPTH

if TYPE_CHECKING:
    from klotski_tier.core.observe.timeline import Timeline

logger = logging.getLogger(__name__)

HOST = "host"
DEVICE = "device"


class BlockReader(Protocol):
    """Reads a block's bytes from its home on disk (the engine's :class:`~klotski_tier.core.store.
    block_source.BlockSource`)."""

    def buffer_bytes(self, block: BlockId) -> int:
        """Bytes the host buffer of ``block`` needs (its layout's, or more)."""
        ...

    async def read(self, block: BlockId, dst: torch.Tensor) -> None:
        """Fill ``dst`` with the block's bytes."""
        ...


class HostBuffers(Protocol):
    """Hands out page-aligned host buffers (the engine's :class:`~klotski_tier.tiers.host.HostDriver`)."""

    async def aallocate(self, nbytes: int) -> torch.Tensor: ...


class DeviceBuffers(Protocol):
    """Device buffers and copies into them (the engine's :class:`~klotski_tier.tiers.device.DeviceDriver`)."""

    async def aplace(self, nbytes: int) -> torch.Tensor | None:
        """A buffer for a block, or None when the reserved memory has no free region that holds it."""
        ...

    def release(self, buffer: torch.Tensor) -> None:
        """A block left the device: its buffer may be reused once computations queued so far are done."""
        ...

    async def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> CopyDone: ...


@dataclass(frozen=True)
class Lease:
    """A device-resident block held for a computation; release it through the manager."""

    block: BlockId
    weights: BlockWeights
    copy_done: CopyDone | None


class Residency:
    """Moves blocks disk -> host -> device on demand or ahead of time, within byte budgets."""

    def __init__(
        self,
        layouts: Mapping[BlockId, BlockLayout],
        *,
        source: BlockReader,
        host: HostBuffers,
        device: DeviceBuffers,
        host_ledger: TierLedger,
        device_ledger: TierLedger,
        timeline: Timeline | None = None,
        disk_to_device: bool = False,
        disk_slots: int = DEFAULT_QUEUE_DEPTH,
        events: EventLog | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._layouts = layouts
        self._disk_to_device = disk_to_device  # a CPU device without a host tier: read straight into it
        self._source = source
        self._host = host
        self._device = device
        self.host = host_ledger
        self.device = device_ledger
        self._room_waiters: list[asyncio.Future[None]] = []  # demand loads waiting for room, in order
        self._timeline = timeline
        self._reads = ReadQueue(disk_slots, self._urgency)  # blocks in the disk driver: its queue depth
        self._events = events
        self._clock = clock
        self.horizon = 0  # the layer the pipeline computes: reads for the one after it come first
        for ledger in (host_ledger, device_ledger):
            ledger.events = events
        device_ledger.release = device.release
        host_ledger.held_above = self._kept_on_device  # the host evicts its copies of device blocks first

    def _kept_on_device(self) -> list[BlockId]:
        """The device's resident blocks, those its policy keeps longest first."""
        kept = [block for block in self.device.eviction.victims() if self.device.entries[block].resident]
        return kept[::-1]

    # ---- queries -------------------------------------------------------------------------

    def state(self, block: BlockId, tier: str = DEVICE) -> State:
        entry = self._ledger(tier).entries.get(block)
        if entry is None:
            return State.ABSENT
        if not entry.ready.done():
            return State.IN_FLIGHT
        return State.LEASED if entry.leases else State.RESIDENT

    # ---- the pipeline's calls ------------------------------------------------------------

    def request(self, block: BlockId) -> asyncio.Future[Lease]:
        """Lease ``block`` on the device now; the future resolves once it is resident there."""
        entry = self.device.entries.get(block)
        if self._events is not None:
            self._events.record(REQUEST, str(block), DEVICE, self.state(block).value)
        if entry is None:
            entry = self._start(self.device, block, self._load_device, wait_for_room=True)
        entry.leases += 1
        entry.fresh = False  # in use now: counted in the window as leased until released
        lease: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        lease.add_done_callback(functools.partial(self._lease_ended, entry))
        if entry.ready.done():
            self._grant(entry, lease)
        else:
            entry.granting.append(lease)
        self._reads.dispatch()  # a prefetch waiting for the disk may have become demand
        return lease

    def prefetch(self, block: BlockId) -> bool:
        """Start loading ``block`` to the device if absent and there is room now; never waits."""
        if block in self.device.entries:
            return True
        return self._start_ahead(self.device, block, self._load_device, free_only=False)

    def stage(self, block: BlockId) -> bool:
        """Start reading ``block`` from disk for a layer beyond the next: into host RAM (the staging
        window), taking only the room of blocks needed later (free room only, under a policy that does
        not know when blocks are needed: LRU and the like); or, where a CPU device reads straight
        from disk, into the device's free room only (evicting there would trade the blocks the device
        keeps across steps for reads of the same size). Never waits; False when there is no room now."""
        if block in self.device.entries or block in self.host.entries:
            return True
        if self._disk_to_device:  # the window shares the device's room with the blocks it keeps
            return self._start_ahead(self.device, block, self._load_device, free_only=True)
        free_only = not self.host.eviction.knows_next_use  # LRU and the like cannot tell what it may evict
        started = self._start_ahead(self.host, block, self._load_host, free_only=free_only)
        if started:
            self.host.entries[block].ahead = True
        return started

    def _start_ahead(
        self, ledger: TierLedger, block: BlockId, load: Callable[[Entry], Any], *, free_only: bool
    ) -> bool:
        """Start loading ``block`` into ``ledger``'s tier ahead of its use if there is room now: free
        room, or (unless ``free_only``) the room of blocks the policy needs later; never waits, and
        yields to demand loads waiting for room. False (nothing changed) when there is none."""
        nbytes = self._layouts[block].nbytes
        if ledger.demand_waiting or (free_only and ledger.free_bytes() < nbytes):
            return False
        if not ledger.make_room(nbytes, ahead_of=block):
            return False
        ledger.take(nbytes)
        if self._events is not None:
            self._events.record(PREFETCH, str(block), ledger.name)
        entry = self._start(ledger, block, load, wait_for_room=False)
        entry.reserved = True
        entry.fresh = ledger is self.device  # the device's window counts it until it is used
        return True

    def passed(self, layer: int) -> None:
        """The pipeline is done with ``layer`` for this step: its blocks loaded ahead and never used (the
        experts a prediction got wrong) leave the window; they stay resident until evicted."""
        for entry in self.device.entries.values():
            if entry.block.layer == layer:
                entry.fresh = False

    async def stage_in_host(self, block: BlockId) -> None:
        """Make ``block`` resident in host RAM (waiting for room), without leasing it."""
        entry = await self._lease_host(block)
        entry.leases -= 1
        self._notify_room()

    async def release(self, lease: Lease) -> None:
        entry = self.device.entries.get(lease.block)
        assert entry is not None and entry.leases > 0, f"{lease.block} released without a lease"
        entry.leases -= 1
        if self._events is not None:
            self._events.record(RELEASE, str(lease.block), DEVICE)
        self._notify_room()

    async def aclose(self) -> None:
        """Cancel loads still running and wait until no driver thread touches a buffer."""
        tasks = [e.task for ledger in (self.device, self.host) for e in ledger.entries.values() if e.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- loading -------------------------------------------------------------------------

    def _start(
        self,
        ledger: TierLedger,
        block: BlockId,
        load: Callable[[Entry], Any],
        *,
        wait_for_room: bool,
    ) -> Entry:
        loop = asyncio.get_running_loop()
        entry = Entry(block, self._layouts[block].nbytes, loop.create_future())
        ledger.entries[block] = entry
        entry.task = loop.create_task(self._run_load(ledger, entry, load, wait_for_room))
        return entry

    async def _run_load(
        self, ledger: TierLedger, entry: Entry, load: Callable[[Entry], Any], wait_for_room: bool
    ) -> None:
        try:
            if wait_for_room:
                await self._reserve(ledger, entry)
            if self._events is not None:
                self._events.record(LOAD, str(entry.block), ledger.name)
            await load(entry)
        except BaseException as exc:
            ledger.drop(entry)
            self._notify_room()
            if not entry.ready.done():
                entry.ready.set_exception(exc)
                entry.ready.exception()  # mark retrieved: waiters re-raise it themselves
            self._grant_waiting(entry)
            if not isinstance(exc, Exception):
                raise
            return
        ledger.eviction.on_insert(entry.block, entry.nbytes)
        entry.task = None
        entry.ready.set_result(None)
        self._grant_waiting(entry)  # at once: a computation deciding next sees the block and its lease alike
        if self._events is not None:
            self._events.record(LOADED, str(entry.block), ledger.name)
        self._notify_room()  # a resident block nobody leases is a victim a waiting load can evict

    async def _reserve(self, ledger: TierLedger, entry: Entry) -> None:
        nbytes = entry.nbytes
        room_at_best = ledger.capacity_bytes - ledger.fixed_bytes
        if nbytes > room_at_best:
            raise BudgetError(
                f"{ledger.name} budget leaves {format_size(room_at_best)} for weights but one block needs "
                f"{format_size(nbytes)}; raise --{ledger.name}-memory"
            )
        ledger.demand_waiting += 1
        try:
            while not ledger.make_room(nbytes, block=entry.block):
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._room_waiters.append(waiter)
                await waiter
        finally:
            ledger.demand_waiting -= 1
        ledger.take(nbytes)
        entry.reserved = True

    def _notify_room(self) -> None:
        """Room may have been made (a release, a load that ended): every load waiting for room looks
        again, in the order they began to wait; those that still find none wait again, in that order."""
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _load_device(self, entry: Entry) -> None:
        host_entry = self.host.entries.get(entry.block)
        if self._disk_to_device and (host_entry is None or not host_entry.resident):
            await self._read_into_device(entry)
            return
        host_entry = await self._lease_host(entry.block)
        try:
            assert host_entry.buffer is not None
            buffer = await self._place(entry)
            source = host_entry.buffer[: entry.nbytes]  # a store's host buffer may hold padding too
            done = await self._device.copy_from_host(buffer, source)
            entry.copy_done = done
            self.device.stats.add_transfer(entry.nbytes, done.end_s - done.start_s)
            if self._timeline is not None:  # timed in the copy thread: one copy at a time
                self._timeline.span(
                    "copy host→device", str(entry.block), done.start_s, done.end_s, **_args(entry)
                )
            entry.buffer = buffer
        finally:
            host_entry.leases -= 1
            self._notify_room()

    async def _place(self, entry: Entry) -> torch.Tensor:
        """A device buffer for ``entry``, whose bytes the ledger has counted already. Where reserved
        memory has room by bytes but no free region that holds the block, blocks are evicted (in the
        policy's order) until one does, or releases awaited."""
        while (buffer := await self._device.aplace(entry.nbytes)) is None:
            if not self.device.evict_one():
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._room_waiters.append(waiter)
                await waiter
        return buffer

    async def _read_into_device(self, entry: Entry) -> None:
        """A CPU device's memory is host memory: read the block from disk straight into its buffer.

        The buffer comes from the host driver (page-aligned, so O_DIRECT reads land in place) but is
        counted in the device tier only: no second copy, no host-to-device memcpy.
        """
        await self._read_from_disk(entry, self.device)

    async def _lease_host(self, block: BlockId) -> Entry:
        entry = self.host.entries.get(block)
        if entry is None:
            entry = self._start(self.host, block, self._load_host, wait_for_room=True)
        entry.leases += 1
        if block in self.host.eviction:
            self.host.eviction.on_access(block)
        try:
            await asyncio.shield(entry.ready)
        except BaseException:
            entry.leases -= 1
            raise
        return entry

    async def _load_host(self, entry: Entry) -> None:
        await self._read_from_disk(entry, self.host)

    async def _read_from_disk(self, entry: Entry, ledger: TierLedger) -> None:
        """Read ``entry``'s block from disk into a fresh page-aligned host buffer counted in ``ledger``."""
        buffer = await self._host.aallocate(self._source.buffer_bytes(entry.block))
        async with self._reads.slot(entry.block):
            started = self._clock()
            await self._source.read(entry.block, buffer)
            ended = self._clock()
        ledger.stats.add_transfer(entry.nbytes, ended - started)
        if self._timeline is not None:
            self._timeline.lane_span("disk", str(entry.block), started, ended, **_args(entry))
        entry.buffer = buffer

    def _grant_waiting(self, entry: Entry) -> None:
        waiting, entry.granting = entry.granting, []
        for lease in waiting:
            self._grant(entry, lease)

    def _grant(self, entry: Entry, lease: asyncio.Future[Lease]) -> None:
        """``entry``'s load has ended: give ``lease`` the resident block, or the load's error."""
        if lease.done():  # its holder cancelled it while the block was loading
            return
        error = entry.ready.exception()
        if error is not None:
            lease.set_exception(error)
            return
        assert entry.buffer is not None, f"{entry.block} resident without a buffer"
        if entry.block in self.device.eviction:  # each lease is a use, a block loaded on demand's too
            self.device.eviction.on_access(entry.block)
        weights = self._layouts[entry.block].tensors(entry.buffer)
        lease.set_result(Lease(entry.block, weights, entry.copy_done))

    def _lease_ended(self, entry: Entry, lease: asyncio.Future[Lease]) -> None:
        """A lease that ended without the block (cancelled, or its load failed) gives its hold back. Its
        error is marked seen: whoever awaits it still gets it, and asyncio logs nothing for the requests
        a failed run abandons (the run reports the first error)."""
        if lease.cancelled() or lease.exception() is not None:
            entry.leases -= 1
            self._notify_room()

    def _urgency(self, block: BlockId) -> int:
        """How soon a read of ``block`` is needed: demand, next weights, speculative or ahead (see
        ReadQueue)."""
        entry = self.device.entries.get(block)
        if entry is None:  # a read for the host tier alone: staged ahead, or one a caller awaits
            staged = self.host.entries.get(block)
            return AHEAD if staged is not None and staged.ahead and not staged.leases else DEMAND
        if entry.leases:
            return DEMAND
        if block.kind is not BlockKind.EXPERT and block.layer <= self.horizon + 1:
            return NEXT_WEIGHTS  # the next layer's attention and gate; the embedding and head (layer -1)
        return SPECULATIVE

    def _ledger(self, tier: str) -> TierLedger:
        return {HOST: self.host, DEVICE: self.device}[tier]


def _args(entry: Entry) -> dict[str, object]:
    """What a timeline span of a block's move carries: its kind (for colors) and size."""
    return {"kind": entry.block.kind.value, "bytes": entry.nbytes}
