"""Scenarios that narrate a small history of block uses and check what each eviction policy gives up.

Keys are :class:`FakeKey` (layer, expert) blocks; ``FakeKey(layer)`` is a non-expert block such
as a layer's attention weights.
"""

from __future__ import annotations

from klotski_tier.policies.fifo import FIFOEviction
from klotski_tier.policies.hot_first_eviction import HotFirstEviction
from klotski_tier.policies.lfu import LFUEviction
from klotski_tier.policies.lru import LRUEviction
from klotski_tier.policies.registry import make_eviction
from tests.policies.helpers import FakeKey, filled, simulate

OLD_HOT, NEW_A, NEW_B = FakeKey(0, 0), FakeKey(0, 1), FakeKey(0, 2)


def _yesterday_and_today(policy: LFUEviction[FakeKey]) -> list[FakeKey]:
    """During a long prompt, expert 0 served 12 accesses. Then the topic changed: experts 1 and 2
    each got 4 accesses, expert 0 none. Which block goes first?"""
    filled(policy, [OLD_HOT])
    for _ in range(12):
        policy.on_access(OLD_HOT)
    filled(policy, [NEW_A, NEW_B])
    for key in [NEW_A, NEW_B] * 4:
        policy.on_access(key)
    return list(policy.victims())


def test_lfu_with_aging_lets_yesterdays_hot_block_go() -> None:
    """Counts halve every 4 accesses: expert 0's 13 uses fade to under 1, below today's experts."""
    aging = LFUEviction[FakeKey](decay=0.5, aging_interval=4)
    assert _yesterday_and_today(aging)[0] == OLD_HOT
    assert aging.count(OLD_HOT) < aging.count(NEW_A) == aging.count(NEW_B)


def test_lfu_without_aging_keeps_it_forever() -> None:
    """decay=1 is plain LFU: 13 old uses beat 5 recent ones, so today's experts go first."""
    plain = LFUEviction[FakeKey](decay=1.0, aging_interval=4)
    assert _yesterday_and_today(plain) == [NEW_A, NEW_B, OLD_HOT]


def test_fifo_ignores_accesses_while_lru_does_not() -> None:
    """Layer 0's attention block arrived first and is used at every step; two experts came after.
    LRU keeps the busy block; FIFO, the baseline, evicts it first anyway."""
    attention = FakeKey(0)
    history = [attention, FakeKey(0, 3), FakeKey(0, 4)]
    lru, fifo = filled(LRUEviction[FakeKey](), history), filled(FIFOEviction[FakeKey](), history)
    for _ in range(3):
        lru.on_access(attention)
        fifo.on_access(attention)
    assert next(iter(lru.victims())) == FakeKey(0, 3)
    assert next(iter(fifo.victims())) == attention


def test_hot_first_keeps_each_layers_top_experts_while_there_is_room() -> None:
    """Layer 0's router likes experts 0 and 5; layer 1's likes 2 and 3. After a few steps the device
    holds those four, two rarely used experts, and layer 1's gate. Room is needed: the gate and the
    cold experts go first (least recently used first), the hot experts last, fewest uses first."""
    policy = HotFirstEviction[FakeKey](keep_per_layer=2)
    hot = [FakeKey(0, 0), FakeKey(0, 5), FakeKey(1, 2), FakeKey(1, 3)]
    cold = [FakeKey(0, 7), FakeKey(1, 6)]
    filled(policy, [*hot, *cold, FakeKey(1)])
    for key in hot * 3 + [FakeKey(0, 0), FakeKey(1, 3), FakeKey(1, 3)]:
        policy.on_access(key)
    policy.on_access(FakeKey(0, 7))  # used once more, but still far from the layer's top two
    assert policy.hot_experts() == {(0, 0), (0, 5), (1, 2), (1, 3)}
    assert list(policy.victims()) == [
        FakeKey(1, 6),  # cold, used longest ago
        FakeKey(1),  # the gate: never hot
        FakeKey(0, 7),  # cold, used just now
        FakeKey(0, 5),  # hot, 4 uses (used before 1.2 among the ties)
        FakeKey(1, 2),  # hot, 4 uses
        FakeKey(0, 0),  # hot, 5 uses
        FakeKey(1, 3),  # hot, 6 uses
    ]


def test_a_loop_one_block_larger_than_the_cache() -> None:
    """Each step, each of 2 layers uses its hot experts 0 and 1 and one cold expert that changes
    every step: 6 blocks per step through a cache of 5. LRU and FIFO always evict the block needed
    next and never hit; LFU forgets a block's count when it leaves, so it never learns either.
    Hot-first remembers uses across stays and keeps the four hot experts: every hot use hits but
    the first of each."""
    steps = 12
    accesses = [
        FakeKey(layer, expert)
        for step in range(steps)
        for layer in range(2)
        for expert in (0, 1, 2 + step % 6)
    ]
    hits = {name: simulate(make_eviction(name), accesses, capacity=5) for name in ("lru", "fifo", "lfu")}
    assert hits == {"lru": 0, "fifo": 0, "lfu": 0}
    assert simulate(make_eviction("hot-first"), accesses, capacity=5) == steps * 4 - 4
