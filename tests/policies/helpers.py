"""Small fakes and measures shared by the policy tests: expert keys, a cache simulator, precision/recall."""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from klotski_tier.policies.eviction import EvictionPolicy

BLOCK_BYTES = 4096  # every test block's size: policies order, they do not count bytes

P = TypeVar("P", bound=EvictionPolicy[Any])


@dataclass(frozen=True, order=True)
class FakeKey:
    """A block key with the attributes hot-first eviction reads; ``expert=-1`` is a non-expert block."""

    layer: int
    expert: int = -1

    def __str__(self) -> str:
        return f"L{self.layer}.E{self.expert}" if self.expert >= 0 else f"L{self.layer}.attn"


def filled(policy: P, keys: Iterable[Hashable]) -> P:
    """``policy`` after inserting ``keys`` in order."""
    for key in keys:
        policy.on_insert(key, BLOCK_BYTES)
    return policy


def simulate(policy: EvictionPolicy[Any], accesses: Sequence[Hashable], capacity: int) -> int:
    """Hits when ``accesses`` go through a cache of ``capacity`` blocks ordered by ``policy``."""
    hits = 0
    for key in accesses:
        if key in policy:
            hits += 1
            policy.on_access(key)
            continue
        while len(policy) >= capacity:
            policy.on_remove(next(iter(policy.victims())))
        policy.on_insert(key, BLOCK_BYTES)
    return hits


def precision_recall(predicted: Sequence[int], routes: Sequence[Sequence[int]]) -> tuple[float, float]:
    """Share of ``predicted`` experts that ``routes`` used, and share of used experts predicted."""
    used = {expert for experts in routes for expert in experts}
    hit = len(used.intersection(predicted))
    precision = hit / len(predicted) if predicted else 0.0
    recall = hit / len(used) if used else 0.0
    return precision, recall
