"""Sweep eviction: Belady's rule for a pipeline that walks the layers in order every step."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.policies.registry import make_eviction
from klotski_tier.policies.sweep import SweepEviction
from tests.policies.helpers import BLOCK_BYTES, FakeKey, filled

LAYERS = 4
EXPERTS = 2


def sweep_accesses(steps: int) -> list[FakeKey]:
    """Every step uses every layer's attention and experts, layer 0 to the last."""
    return [
        key
        for _ in range(steps)
        for layer in range(LAYERS)
        for key in (FakeKey(layer), *(FakeKey(layer, e) for e in range(EXPERTS)))
    ]


def run_as_the_engine(policy: EvictionPolicy[Hashable], accesses: Sequence[Hashable], capacity: int) -> int:
    """Hits through a cache of ``capacity`` blocks; a miss is inserted once loaded, then accessed (the
    engine counts each lease as a use, a demand load's too)."""
    hits = 0
    for key in accesses:
        if key in policy:
            hits += 1
        else:
            while len(policy) >= capacity:
                policy.on_remove(next(iter(policy.victims())))
            policy.on_insert(key, BLOCK_BYTES)
        policy.on_access(key)
    return hits


def belady_hits(accesses: Sequence[Hashable], capacity: int, counted: int) -> int:
    """Hits among the first ``counted`` accesses of the optimal policy, which knows the future: evict
    the block next used furthest ahead (accesses after ``counted`` only inform it: the loop goes on)."""
    cache: set[Hashable] = set()
    hits = 0
    for now, key in enumerate(accesses[:counted]):
        if key in cache:
            hits += 1
            continue
        if len(cache) >= capacity:
            ahead = list(accesses[now + 1 :])
            cache.remove(max(cache, key=lambda k: ahead.index(k) if k in ahead else len(ahead)))
        cache.add(key)
    return hits


def test_a_sweep_larger_than_the_cache_hits_as_often_as_the_optimum() -> None:
    """12 blocks a step through 8 slots: LRU evicts the block needed next and never hits; sweep knows
    the future of a layer sweep, so it hits as often as Belady's optimum (over 7 times a step)."""
    steps, capacity = 6, 8
    accesses = sweep_accesses(steps)
    assert run_as_the_engine(make_eviction("lru"), accesses, capacity) == 0
    hits = run_as_the_engine(make_eviction("sweep"), accesses, capacity)
    optimum = belady_hits(sweep_accesses(steps + 1), capacity, counted=len(accesses))
    assert hits == optimum >= (steps - 1) * (capacity - 1)


def test_enough_room_hits_after_the_first_step() -> None:
    steps, blocks = 3, LAYERS * (1 + EXPERTS)
    assert run_as_the_engine(SweepEviction(), sweep_accesses(steps), blocks) == (steps - 1) * blocks


def test_victims_from_the_layer_just_used_to_the_next_one() -> None:
    policy: SweepEviction[FakeKey] = filled(SweepEviction(), [FakeKey(layer, 0) for layer in range(LAYERS)])
    policy.on_insert(FakeKey(2, 1), BLOCK_BYTES)  # a prefetch of layer 2 not used yet
    policy.on_access(FakeKey(2, 0))  # computing layer 2
    assert list(policy.victims()) == [
        FakeKey(2, 0),  # used in this pass: needed again only next step
        FakeKey(1, 0),  # just passed: next needed after every other layer
        FakeKey(0, 0),
        FakeKey(3, 0),  # the next layer: kept longest but for ...
        FakeKey(2, 1),  # ... the current layer's block not used yet
    ]


def test_a_new_pass_starts_when_the_clock_goes_back() -> None:
    policy: SweepEviction[FakeKey] = filled(SweepEviction(), [FakeKey(0, 0), FakeKey(0, 1), FakeKey(1, 0)])
    for key in (FakeKey(0, 0), FakeKey(0, 1), FakeKey(1, 0), FakeKey(0, 0)):
        policy.on_access(key)  # step 1 uses layers 0 and 1; step 2 begins with L0.E0
    assert list(policy.victims()) == [FakeKey(0, 0), FakeKey(1, 0), FakeKey(0, 1)]


def test_layerless_keys_sit_at_the_end_of_the_sweep() -> None:
    policy: SweepEviction[object] = filled(SweepEviction(), [FakeKey(0, 0), "head", FakeKey(3, 0)])
    policy.on_access(FakeKey(0, 0))
    # from layer 0: layer 3 is 3 layers ahead, the head (and the next embedding) 3.5, L0.E0 a whole sweep
    assert list(policy.victims()) == [FakeKey(0, 0), "head", FakeKey(3, 0)]


def test_without_layers_it_is_lru() -> None:
    policy: SweepEviction[int] = filled(SweepEviction(), [1, 2, 3])
    policy.on_access(1)
    assert list(policy.victims()) == [2, 3, 1]


class RankedSweep:
    """The rule of the module docstring, the slow way: every key ranked, all of them sorted."""

    def __init__(self) -> None:
        self.order: list[Hashable] = []  # least recently used first
        self.used_in_pass: dict[Hashable, int] = {}
        self.layers, self.current, self.passes = 0, -1, 0

    def insert(self, key: Hashable) -> None:
        self.order.append(key)
        layer = getattr(key, "layer", None)
        if isinstance(layer, int) and layer >= 0:
            self.layers = max(self.layers, layer + 1)

    def access(self, key: Hashable) -> None:
        self.order.remove(key)
        self.order.append(key)
        layer = getattr(key, "layer", None)
        if not isinstance(layer, int) or layer < 0:
            return
        if layer < self.current:
            self.passes += 1
        self.current = layer
        self.used_in_pass[key] = self.passes

    def victims(self) -> list[Hashable]:
        current = max(self.current, 0)

        def rank(key: Hashable) -> float:
            layer = getattr(key, "layer", None)
            if not isinstance(layer, int) or layer < 0:
                return self.layers - current - 0.5
            if layer != current:
                return float((layer - current) % self.layers)
            return float(self.layers) if self.used_in_pass.get(key) == self.passes else 0.0

        def order(item: tuple[int, Hashable]) -> tuple[float, int]:
            age, key = item
            layered = isinstance(getattr(key, "layer", None), int) and key.layer >= 0  # type: ignore[attr-defined]
            return -rank(key), -age if layered else age

        return [key for _, key in sorted(enumerate(self.order), key=order)]


OPERATIONS = st.tuples(
    st.sampled_from(["insert", "access", "remove"]), st.integers(-1, 5), st.integers(-1, 2)
)


@settings(max_examples=200, deadline=None)
@given(st.lists(OPERATIONS, max_size=60))
def test_victims_follow_the_rank_rule_whatever_the_history(ops: list[tuple[str, int, int]]) -> None:
    """The per-layer victims walk gives exactly the order of ranking and sorting every key."""
    policy: SweepEviction[Hashable] = SweepEviction()
    reference = RankedSweep()
    for op, layer, expert in ops:
        key: Hashable = FakeKey(layer, expert) if layer >= 0 else f"layerless-{expert}"
        if op == "insert" and key not in policy:
            policy.on_insert(key, BLOCK_BYTES)
            reference.insert(key)
        elif op == "access" and key in policy:
            policy.on_access(key)
            reference.access(key)
        elif op == "remove" and key in policy:
            policy.on_remove(key)
            reference.order.remove(key)
            reference.used_in_pass.pop(key, None)
        assert list(policy.victims()) == reference.victims()


# ---------------------------------------------------------------- reading ahead (evict_for)


def test_a_prefetch_takes_only_the_room_of_blocks_needed_later_than_the_one_it_loads() -> None:
    policy = SweepEviction[FakeKey]()
    for layer in range(LAYERS):
        policy.on_insert(FakeKey(layer), BLOCK_BYTES)
    policy.on_insert(FakeKey(0, 1), BLOCK_BYTES)
    policy.on_access(FakeKey(0))  # the sweep is at layer 0: its attention used, its expert 1 not yet
    policy.on_access(FakeKey(1))  # now at layer 1
    two_ahead = FakeKey(3, 0)  # layer 3 is two layers ahead of layer 1
    assert policy.evict_for(FakeKey(1), two_ahead)  # used in this pass: needed a whole sweep later
    assert policy.evict_for(FakeKey(0), two_ahead)  # layer 0 comes back only in the next sweep
    assert policy.evict_for(FakeKey(0, 1), two_ahead)
    assert not policy.evict_for(FakeKey(2), two_ahead)  # the next layer is needed sooner
    assert not policy.evict_for(FakeKey(3), two_ahead)  # as soon as the block itself: no gain
    # victims() yields by rank, so the first refusal ends the search with nothing useful skipped
    ranked = list(policy.victims())
    refusals = [not policy.evict_for(key, two_ahead) for key in ranked]
    assert refusals == sorted(refusals)  # every refusal comes after every allowed victim


@given(st.lists(st.tuples(st.integers(0, LAYERS - 1), st.integers(-1, EXPERTS - 1)), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None)
def test_sweep_refusals_come_after_every_allowed_victim(accesses: list[tuple[int, int]]) -> None:
    """Whatever the history, ``victims()`` never offers a refused key before an allowed one, for any
    incoming key (the ledger stops at the first refusal)."""
    policy = SweepEviction[FakeKey]()
    for layer, expert in accesses:
        key = FakeKey(layer, expert) if expert >= 0 else FakeKey(layer)
        if key not in policy:
            policy.on_insert(key, BLOCK_BYTES)
        policy.on_access(key)
    ranked = list(policy.victims())
    for layer in range(LAYERS):
        incoming = FakeKey(layer, EXPERTS)  # an expert no access inserted
        refusals = [not policy.evict_for(key, incoming) for key in ranked]
        assert refusals == sorted(refusals), (layer, ranked)


def test_policies_that_do_not_know_the_future_allow_any_victim() -> None:
    for name in ("lru", "fifo", "lfu"):
        policy = make_eviction(name)
        policy.on_insert(FakeKey(0), BLOCK_BYTES)
        assert policy.evict_for(FakeKey(0), FakeKey(1)), name
