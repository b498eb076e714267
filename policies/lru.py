"""Least-recently-used eviction: the block used longest ago goes first.

Insertion counts as a use. The order lives in an ``OrderedDict`` whose first entry is the
least recently used key, so every hook is O(1) and ``victims`` is one pass.

Inserting a key that is already tracked is refused with an ``AssertionError`` rather than
treated as a refresh: a block becomes resident once per stay, so a second insert means the
caller's residency bookkeeping is wrong, and hiding that would evict the wrong blocks later.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from klotski_tier.policies.eviction import EvictionPolicy, K


class LRUEviction(EvictionPolicy[K]):
    """Evicts the least recently inserted-or-accessed key first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[K, int] = OrderedDict()  # key -> nbytes, least recently used first

    def on_insert(self, key: K, nbytes: int) -> None:
        assert key not in self._order, f"{self.name}: {key} inserted twice without on_remove in between"
        assert nbytes >= 0, f"{self.name}: {key} inserted with a negative size ({nbytes} bytes)"
        self._order[key] = nbytes

    def on_access(self, key: K) -> None:
        assert key in self._order, f"{self.name}: access to {key}, which is not resident"
        self._order.move_to_end(key)

    def on_remove(self, key: K) -> None:
        assert key in self._order, f"{self.name}: removal of {key}, which is not resident"
        del self._order[key]

    def victims(self) -> Iterator[K]:
        for key in list(self._order):
            if key in self._order:
                yield key

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order
