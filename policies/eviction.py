"""The eviction policy contract: which resident blocks to give up first.

A policy orders candidates and nothing else: it holds no tensors, does no I/O, never imports
torch or asyncio, and counts no bytes (the residency manager owns each tier's byte budget).
Keys are opaque hashables: the engine passes :class:`~klotski_tier.core.model.blocks.BlockId`,
tests pass ints or strings.

Lifecycle of a key, as the residency manager drives it::

    on_insert(key, nbytes)   the block became resident in the tier (key must be absent)
    on_access(key)           each use of the resident block (key must be present)
    on_remove(key)           the block left the tier, evicted or released (key must be present)

Breaking this order is a bookkeeping bug in the caller and fails an ``assert``.

To make room, the caller iterates :meth:`EvictionPolicy.victims`: candidates, most evictable first
(a prefetch, which loads a block before it is needed, also asks :meth:`EvictionPolicy.evict_for`).
The policy skips nothing by itself; the caller skips keys it cannot evict (leased by a computation,
in flight), calls ``on_remove`` for each key it does evict, and stops as soon as it has room.
``victims`` walks a snapshot, so removing keys while iterating is allowed; keys removed meanwhile
are not yielded, keys inserted meanwhile are not yielded either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from typing import ClassVar, Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class EvictionPolicy(ABC, Generic[K]):
    """Orders the resident keys of one tier for eviction; see the module docstring for the lifecycle."""

    name: ClassVar[str]
    # Whether the policy knows when a key is needed next (evict_for can refuse): only then may a read
    # ahead of need evict for its room; otherwise reading ahead takes free room only.
    knows_next_use: ClassVar[bool] = False

    @abstractmethod
    def on_insert(self, key: K, nbytes: int) -> None:
        """``key`` (``nbytes`` bytes) became resident; it must not be tracked already."""

    @abstractmethod
    def on_access(self, key: K) -> None:
        """``key`` was used; it must be tracked."""

    @abstractmethod
    def on_remove(self, key: K) -> None:
        """``key`` left the tier; it must be tracked, and is forgotten."""

    @abstractmethod
    def victims(self) -> Iterator[K]:
        """Every tracked key, most evictable first (a snapshot; see the module docstring)."""

    def evict_for(self, victim: K, incoming: K) -> bool:
        """Whether evicting ``victim`` to load ``incoming`` ahead of its use is worth it.

        A prefetch asks this of each candidate :meth:`victims` offers and stops at the first refusal,
        so a policy that knows when keys are needed next refuses a victim needed no later than
        ``incoming`` (evicting it would only trade one read for another, sooner), and orders its
        victims so that every later one would be refused too. Policies without that knowledge
        (recency, frequency) allow any victim.
        """
        return True

    @abstractmethod
    def __len__(self) -> int:
        """Number of tracked keys."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked."""
