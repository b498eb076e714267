"""One memory tier's record: the blocks present in it, the bytes they take against its budget, and
the eviction policy that orders its victims.

An :class:`Entry` is one block in one tier, from the moment its room is reserved (in flight) until
it leaves; :class:`TierLedger` makes room by evicting unleased resident entries in the policy's
order. The residency manager (:mod:`~klotski_tier.core.runtime.residency`) moves the blocks and keeps
one ledger per memory tier.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from klotski_tier.core.model.blocks import BlockId, BlockKind
from klotski_tier.core.observe.events import EVICT, EventLog
from klotski_tier.core.observe.metrics import TierStats
from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.tiers.base import CopyDone

if TYPE_CHECKING:
    from klotski_tier.core.runtime.residency import Lease


class State(enum.Enum):
    ABSENT = "absent"
    IN_FLIGHT = "in flight"
    RESIDENT = "resident"
    LEASED = "leased"


@dataclass(eq=False)
class Entry:
    block: BlockId
    nbytes: int
    ready: asyncio.Future[None]
    buffer: torch.Tensor | None = None
    copy_done: CopyDone | None = None
    leases: int = 0
    reserved: bool = False  # its bytes are counted in the ledger
    ahead: bool = False  # staged for a layer beyond the next, by a prefetch that never waits
    fresh: bool = False  # on the device, loaded ahead of its use and not leased yet: part of its window
    task: asyncio.Task[None] | None = None
    granting: list[asyncio.Future[Lease]] = field(default_factory=list)  # leases to give once it lands

    @property
    def resident(self) -> bool:
        return self.ready.done() and self.ready.exception() is None


@dataclass(eq=False)
class TierLedger:
    """Blocks present in one memory tier, and the bytes they take against its budget."""

    name: str
    capacity_bytes: int
    eviction: EvictionPolicy[BlockId]
    stats: TierStats
    fixed_bytes: int = 0  # reserved outside blocks (KV cache, activations)
    entries: dict[BlockId, Entry] = field(default_factory=dict)
    used_bytes: int = 0
    demand_waiting: int = 0  # demand loads waiting for room; prefetches yield to them
    events: EventLog | None = None  # records each eviction, when given
    release: Callable[[torch.Tensor], None] | None = None  # gives a dropped block's buffer back
    # The blocks a faster tier holds too, those it keeps longest first: they are evicted first, in that
    # order, so that the two tiers together hold as many distinct blocks as they can (see victims()).
    held_above: Callable[[], list[BlockId]] | None = None
    # The streaming window: once making room means evicting, at most this many bytes of experts in use
    # or on their way (leased, in flight, loaded ahead and not used yet) at once; None: no cap. What a
    # full tier holds beyond its window it keeps across steps, so the window is what a step rereads on
    # top of what the tier cannot hold (see make_room).
    window_bytes: int | None = None

    def free_bytes(self) -> int:
        return self.capacity_bytes - self.fixed_bytes - self.used_bytes

    def take(self, nbytes: int) -> None:
        self.used_bytes += nbytes
        self.stats.observe_peak(self.used_bytes + self.fixed_bytes)

    def make_room(
        self, nbytes: int, ahead_of: BlockId | None = None, *, block: BlockId | None = None
    ) -> bool:
        """Evict unleased resident blocks until ``nbytes`` fit; False (nothing evicted) if they cannot.

        ``ahead_of``: the room is for a prefetch of that block, which takes only the room of victims
        the policy finds worth it (:meth:`EvictionPolicy.evict_for`: needed later than that block);
        the first refusal ends the search.

        With a window (``window_bytes``), a load of an expert (``block``, or ``ahead_of``) that needs
        evictions waits (False) while the experts in use or on their way already fill it: a layer's
        experts then stream through a few blocks of room, one computing while the next ones load,
        instead of all taking room at once from blocks the tier would keep for the next step. A demand
        load goes past the window only when no leased block is there to be released, so that it never
        waits for nothing. Attention, gate, embedding and head blocks (small, and every step needs them
        at once) never wait for the window.
        """
        if self.free_bytes() >= nbytes:
            return True
        incoming = ahead_of if ahead_of is not None else block
        streams = incoming is None or incoming.kind is BlockKind.EXPERT
        if streams and self._window_full(nbytes, ahead=ahead_of is not None):
            return False
        victims: list[Entry] = []
        room = self.free_bytes()
        for block in self.victims():
            if ahead_of is not None and not self.eviction.evict_for(block, ahead_of):
                break
            entry = self.entries[block]
            if entry.leases == 0 and entry.resident:
                victims.append(entry)
                room += entry.nbytes
                if room >= nbytes:
                    break
        if room < nbytes:
            return False
        for entry in victims:
            self.drop(entry)
            self.stats.evictions += 1
            if self.events is not None:
                self.events.record(EVICT, str(entry.block), self.name)
        return True

    def window_used(self) -> int:
        """Bytes of experts in use or on their way: leased, in flight, or loaded ahead and not used yet."""
        return sum(
            e.nbytes
            for e in self.entries.values()
            if e.reserved and e.block.kind is BlockKind.EXPERT and (e.leases or e.fresh or not e.resident)
        )

    def _window_full(self, nbytes: int, *, ahead: bool) -> bool:
        """Whether a load of ``nbytes`` that needs evictions must wait for the window: it is full, and the
        load reads ahead, or a leased block will be released (a demand load never waits for nothing)."""
        if self.window_bytes is None or self.window_used() + nbytes <= self.window_bytes:
            return False
        return ahead or any(e.leases and e.reserved for e in self.entries.values())

    def victims(self) -> Iterator[BlockId]:
        """Blocks in eviction order: the policy's, except that blocks a faster tier holds too go first.

        Under a layer cycle both tiers keep the same blocks by the same rule (``sweep`` keeps the first
        layers in each): a host tier would then only repeat the device's, and the drive would read
        what neither holds every step. Evicting its copies of device-resident blocks first lets the
        host hold other blocks (an exclusive cache, as far as room allows). Those copies go in the
        order the device keeps the blocks longest first: a block the device streams through its window
        leaves it soon, and a host copy of it is worth more than one of a block the device keeps.
        """
        if self.held_above is None:
            yield from self.eviction.victims()
            return
        above = [block for block in self.held_above() if block in self.entries]
        yield from above
        first = set(above)
        yield from (block for block in self.eviction.victims() if block not in first)

    def drop(self, entry: Entry) -> None:
        del self.entries[entry.block]
        if entry.block in self.eviction:
            self.eviction.on_remove(entry.block)
        if entry.reserved:
            self.used_bytes -= entry.nbytes
            entry.reserved = False
        if entry.buffer is not None and self.release is not None:
            self.release(entry.buffer)
        entry.buffer = None

    def evict_one(self) -> bool:
        """Evict the first victim that no computation leases (beyond the room asked for: its buffer
        space, not its bytes, is wanted); False if none is."""
        for block in self.victims():
            entry = self.entries[block]
            if entry.leases == 0 and entry.resident:
                self.drop(entry)
                self.stats.evictions += 1
                if self.events is not None:
                    self.events.record(EVICT, str(entry.block), self.name)
                return True
        return False
