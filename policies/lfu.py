"""Least-frequently-used eviction with aging: the block used least goes first, and old use fades.

Each tracked key has a use count: 1 when inserted, +1 per access. Plain LFU never lets a block
that was hot long ago leave, because its count stays high forever. Aging fixes that: every
``aging_interval`` accesses (over all keys), every count is multiplied by ``decay``, so a block
must keep being used to keep a high count. ``decay=1`` is plain LFU.

Victims go by lowest count; equal counts go least recently used first. A removed key's count is
forgotten: a block that comes back starts again at 1.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from klotski_tier.policies.eviction import EvictionPolicy, K
from klotski_tier.policies.tables import check_count, check_range

OWNER = "eviction policy 'lfu'"
DEFAULT_DECAY = 0.5  # counts halve at each aging: a use counts half as much one interval later
DEFAULT_AGING_INTERVAL = 64  # accesses between agings, about a few layers' worth of expert uses


class LFUEviction(EvictionPolicy[K]):
    """Evicts the key with the lowest aged use count first, ties least recently used first."""

    name = "lfu"

    def __init__(self, decay: float = DEFAULT_DECAY, aging_interval: int = DEFAULT_AGING_INTERVAL) -> None:
        self.decay = check_range(OWNER, "decay", decay, 0.0, 1.0, low_open=True)
        self.aging_interval = check_count(OWNER, "aging_interval", aging_interval, 1)
        self._counts: OrderedDict[K, float] = OrderedDict()  # key -> aged uses, least recently used first
        self._accesses = 0  # accesses since the last aging

    def on_insert(self, key: K, nbytes: int) -> None:
        assert key not in self._counts, f"{self.name}: {key} inserted twice without on_remove in between"
        assert nbytes >= 0, f"{self.name}: {key} inserted with a negative size ({nbytes} bytes)"
        self._counts[key] = 1.0

    def on_access(self, key: K) -> None:
        assert key in self._counts, f"{self.name}: access to {key}, which is not resident"
        self._counts[key] += 1.0
        self._counts.move_to_end(key)
        self._accesses += 1
        if self._accesses >= self.aging_interval:
            self._age()

    def on_remove(self, key: K) -> None:
        assert key in self._counts, f"{self.name}: removal of {key}, which is not resident"
        del self._counts[key]

    def victims(self) -> Iterator[K]:
        # sorted() is stable, so equal counts keep the least-recently-used-first order.
        for key in sorted(self._counts, key=self._counts.__getitem__):
            if key in self._counts:
                yield key

    def count(self, key: K) -> float:
        """The aged use count of tracked ``key``."""
        return self._counts[key]

    def __len__(self) -> int:
        return len(self._counts)

    def __contains__(self, key: object) -> bool:
        return key in self._counts

    def _age(self) -> None:
        self._accesses = 0
        for key in self._counts:
            self._counts[key] *= self.decay
