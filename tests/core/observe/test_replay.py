"""Offline replay on hand-made traces, narrated step by step with the exact counts expected.

Expert blocks are ``EXPERT_BYTES`` each; a capacity of ``n * EXPERT_BYTES`` holds n experts.
"""

from __future__ import annotations

import numpy as np
import pytest

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.observe.replay import LayerReplay, replay, replay_by_name
from klotski_tier.core.observe.routing_trace import RoutingTrace, TraceMeta
from klotski_tier.policies.hot_first import HotFirstPrefetch
from klotski_tier.policies.hot_first_eviction import HotFirstEviction
from klotski_tier.policies.lru import LRUEviction
from klotski_tier.policies.oracle import OraclePrefetch
from klotski_tier.policies.prefetch import NoPrefetch, PrefetchPolicy, Routes
from klotski_tier.policies.registry import make_eviction

EXPERT_BYTES = 100
HUGE = 1000 * EXPERT_BYTES

# 2 layers x 4 experts, top-1, two tokens per step; steps[s][layer][token] = [expert]
TWO_LAYERS = [
    [[[0], [1]], [[2], [2]]],
    [[[0], [0]], [[3], [2]]],
    [[[1], [0]], [[2], [2]]],
]
USED = 9  # distinct experts per (step, layer): 2 + 1 + 1 + 2 + 2 + 1
DISTINCT = 4  # (0, 0), (0, 1), (1, 2), (1, 3)


def trace_of(steps: list[list[list[list[int]]]], *, layers: int = 2, experts: int = 4) -> RoutingTrace:
    meta = TraceMeta("mixtral", layers, experts, 1, 8, EXPERT_BYTES)
    return RoutingTrace(meta, tuple(np.array(step, dtype=np.int16) for step in steps))


def run(
    steps: list[list[list[list[int]]]],
    prefetch: PrefetchPolicy,
    slots: int,
    *,
    layers: int = 2,
    hot_experts: int | None = None,
) -> tuple[float, float, float, int, int]:
    """(hit rate, precision, recall, loads, bytes moved) of a replay with an LRU cache of ``slots``."""
    trace = trace_of(steps, layers=layers)
    capacity = slots * EXPERT_BYTES
    result = replay(trace, prefetch, LRUEviction(), capacity_bytes=capacity, hot_experts=hot_experts)
    return result.hit_rate, result.precision, result.recall, result.loads, result.bytes_moved


def test_none_with_room_for_everything_loads_each_expert_once() -> None:
    # every expert is a demand load the first time and a cache hit afterwards
    assert run(TWO_LAYERS, NoPrefetch(), 1000) == (5 / 9, 0.0, 0.0, DISTINCT, DISTINCT * EXPERT_BYTES)


@pytest.mark.parametrize("policy", [NoPrefetch, HotFirstPrefetch, OraclePrefetch], ids=lambda p: p.name)
def test_huge_capacity_loads_every_used_expert_exactly_once(policy: type[PrefetchPolicy]) -> None:
    result = replay(trace_of(TWO_LAYERS), policy(), LRUEviction(), capacity_bytes=HUGE)
    assert result.loads == DISTINCT and result.bytes_moved == DISTINCT * EXPERT_BYTES
    assert result.used == USED


def test_hot_first_with_two_slots() -> None:
    """s0: nothing observed, so nothing predicted; 0 and 1 demand-loaded, then 2 evicts 0.
    s1 l0: predicts 0 (tie with 1 goes to the lower id), prefetched over 1: used, a hit.
        l1: predicts 2, already resident; 2 hits, 3 evicts 0.
    s2 l0: predicts 0, prefetched over 2; used, a hit; 1 evicts 3.
        l1: predicts 2, prefetched over 0; used, a hit.
    Hits 4 of 9; 4 predictions, all used (3 of them loaded); 8 loads in all."""
    assert run(TWO_LAYERS, HotFirstPrefetch(), 2) == (4 / 9, 1.0, 4 / 9, 8, 800)


def test_hot_first_per_layer_counts() -> None:
    result = replay(trace_of(TWO_LAYERS), HotFirstPrefetch(), LRUEviction(), capacity_bytes=200)
    assert result.per_layer == (
        LayerReplay(layer=0, used=5, hits=2, predicted=2, predicted_used=2, loads=5, prefetch_loads=2),
        LayerReplay(layer=1, used=4, hits=2, predicted=2, predicted_used=2, loads=3, prefetch_loads=1),
    )
    assert result.to_dict()["per_layer"][1]["recall"] == 2 / 4


def test_oracle_prefetching_every_used_expert_hits_always() -> None:
    # K = 4 experts: the oracle loads each step's used experts before the gate asks
    assert run(TWO_LAYERS, OraclePrefetch(), 1000, hot_experts=4) == (1.0, 1.0, 1.0, 4, 400)


def test_oracle_precision_is_one_under_pressure() -> None:
    _, precision, recall, _, _ = run(TWO_LAYERS, OraclePrefetch(), 2)
    assert precision == 1.0
    assert recall > run(TWO_LAYERS, HotFirstPrefetch(), 2)[2]


def test_a_wrong_prefetch_evicts_what_the_gate_then_needs() -> None:
    """One slot, one layer, sequence 0 0 1 1: at the last step hot-first still predicts 0 (seen
    twice); its prefetch evicts 1, which the gate then asks for again. Hits: only step 1, the one
    correct prediction of three."""
    steps = [[[[e]]] for e in (0, 0, 1, 1)]
    assert run(steps, HotFirstPrefetch(), 1, layers=1) == (1 / 4, 1 / 3, 1 / 4, 4, 400)


def test_experts_the_layer_needs_now_are_never_evicted() -> None:
    """One slot, two tokens using 0 and 1 in one layer: 1 may not evict 0, so it streams through
    unkept; the next step finds 0 resident."""
    steps = [[[[0], [1]]], [[[0]]]]
    assert run(steps, NoPrefetch(), 1, layers=1) == (1 / 3, 0.0, 0.0, 2, 200)


def test_lru_keeps_the_recently_used_expert_fifo_does_not() -> None:
    """Two slots, one layer, sequence 0 1 0 2 0. LRU: 2 evicts 1, the last 0 hits (2 hits,
    3 loads). FIFO: 2 evicts 0, the oldest insert, and the last 0 misses (1 hit, 4 loads)."""
    steps = [[[[e]]] for e in (0, 1, 0, 2, 0)]
    trace = trace_of(steps, layers=1)
    lru, fifo = replay_by_name(trace, ["none"], ["lru", "fifo"], capacity_bytes=2 * EXPERT_BYTES)
    assert (lru.eviction, lru.hit_rate, lru.loads) == ("lru", 2 / 5, 3)
    assert (fifo.eviction, fifo.hit_rate, fifo.loads) == ("fifo", 1 / 5, 4)


def test_hot_first_eviction_keeps_the_layers_hot_expert() -> None:
    """Two slots, one layer, sequence 0 0 1 2 0. LRU: 2 evicts 0, used longest ago, and the last 0
    misses. Hot-first keeping one expert per layer: 0 has the most uses, so 2 evicts 1 instead."""
    trace = trace_of([[[[e]]] for e in (0, 0, 1, 2, 0)], layers=1)
    lru = replay(trace, NoPrefetch(), LRUEviction(), capacity_bytes=2 * EXPERT_BYTES)
    hot = replay(trace, NoPrefetch(), HotFirstEviction(keep_per_layer=1), capacity_bytes=2 * EXPERT_BYTES)
    assert (lru.hit_rate, lru.loads) == (1 / 5, 4)
    assert (hot.hit_rate, hot.loads, hot.eviction) == (2 / 5, 3, "hot-first")


def test_replay_by_name_builds_fresh_policies_per_pair() -> None:
    trace = trace_of(TWO_LAYERS)
    first, second = replay_by_name(trace, ["hot-first", "hot-first"], ["lru"], capacity_bytes=200)
    assert first.to_dict() == second.to_dict()  # the second did not inherit the first one's counts
    assert (first.prefetch, first.eviction, first.hot_experts) == ("hot-first", "lru", 1)


def test_capacity_below_one_expert_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="holds no expert"):
        replay(trace_of(TWO_LAYERS), NoPrefetch(), LRUEviction(), capacity_bytes=EXPERT_BYTES - 1)


def test_k_above_the_number_of_experts_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"K=5 is outside 0\.\.4"):
        replay(trace_of(TWO_LAYERS), NoPrefetch(), LRUEviction(), capacity_bytes=HUGE, hot_experts=5)


class _OutOfRange(NoPrefetch):
    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        return [7]


def test_a_prediction_outside_the_layer_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"predicted \[7\] for layer 0"):
        replay(trace_of(TWO_LAYERS), _OutOfRange(), make_eviction("lru"), capacity_bytes=HUGE)


def test_empty_trace_replays_to_zeros() -> None:
    result = replay(trace_of([]), HotFirstPrefetch(), LRUEviction(), capacity_bytes=HUGE)
    assert (result.used, result.loads, result.hit_rate, result.precision, result.recall) == (0, 0, 0, 0, 0)
