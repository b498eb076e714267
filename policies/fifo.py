"""First-in-first-out eviction, the naive baseline: blocks leave in the order they arrived.

Accesses change nothing, so a block used at every step leaves as early as one never used
again. Any policy that does worse than FIFO on a workload is worse than not deciding at all;
benchmarks report it for that reason.
"""

from __future__ import annotations

from klotski_tier.policies.eviction import K
from klotski_tier.policies.lru import LRUEviction


class FIFOEviction(LRUEviction[K]):
    """Evicts the earliest inserted key first; ``on_access`` only checks that the key is tracked."""

    name = "fifo"

    def on_access(self, key: K) -> None:
        assert key in self, f"{self.name}: access to {key}, which is not resident"
