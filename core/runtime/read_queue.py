"""The disk read queue: blocks reach the disk driver by urgency, a few at a time.

The disk driver's pool is first come, first served, and a packed store checks a block's bytes in
a job submitted only once its read is done: handed the next layer's attention and its expert
prefetches at once, the pool would finish that check behind every expert. So the residency
manager reads through a :class:`ReadQueue`: at most ``slots`` blocks in the driver (its queue
depth), the most urgent first, and no speculative read while a more urgent one is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from klotski_tier.core.model.blocks import BlockId

# Urgency of a disk read, most urgent first:
DEMAND = 0  # a block a computation has requested (or a read for the host tier alone)
NEXT_WEIGHTS = 1  # a prefetched attention, gate, embedding or head block: what the next phase needs first
SPECULATIVE = 2  # a prefetched expert, or a block of a layer beyond the next: needed after the blocks above
AHEAD = 3  # a block staged in host RAM for a layer beyond the next: read while the drive would idle


@dataclass(eq=False)
class _Read:
    seq: int  # arrival order
    block: BlockId
    admitted: asyncio.Future[None]


class ReadQueue:
    """Admits disk reads to the driver by urgency, at most ``slots`` blocks at once.

    The most urgent waiting read starts when a slot frees (each urgency in arrival order), and no
    speculative read starts while a more urgent one is in flight: nothing urgent queues behind one
    in the driver's first-come pool. ``urgency`` is asked anew each time, so a prefetch that a
    computation requests meanwhile is served as demand.
    """

    def __init__(self, slots: int, urgency: Callable[[BlockId], int]) -> None:
        assert slots >= 1, f"a read queue needs at least one slot, got {slots}"
        self._slots = slots
        self._urgency = urgency
        self._waiting: list[_Read] = []
        self._running: list[BlockId] = []
        self._arrivals = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, block: BlockId) -> AsyncIterator[None]:
        """Hold one of the driver's slots for reading ``block``, once its turn has come."""
        read = _Read(next(self._arrivals), block, asyncio.get_running_loop().create_future())
        self._waiting.append(read)
        self.dispatch()
        try:
            await read.admitted
        except BaseException:  # cancelled while waiting, or just after being admitted
            self._leave(read)
            raise
        try:
            yield
        finally:
            self._leave(read)

    def dispatch(self) -> None:
        """Admit the most urgent waiting reads while slots are free."""
        while self._waiting and len(self._running) < self._slots:
            read = min(self._waiting, key=lambda r: (self._urgency(r.block), r.seq))
            if self._urgency(read.block) >= SPECULATIVE and self._urgent_running():
                return
            self._waiting.remove(read)
            self._running.append(read.block)
            read.admitted.set_result(None)

    def _urgent_running(self) -> bool:
        return any(self._urgency(block) < SPECULATIVE for block in self._running)

    def _leave(self, read: _Read) -> None:
        if read in self._waiting:
            self._waiting.remove(read)
        else:
            self._running.remove(read.block)
        self.dispatch()
