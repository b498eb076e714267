"""Each eviction policy's own order (the shared contract is in test_eviction_contract.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.blocks import attn_block, expert_block, gate_block
from klotski_tier.policies.fifo import FIFOEviction
from klotski_tier.policies.hot_first_eviction import HotFirstEviction, expert_of
from klotski_tier.policies.lfu import LFUEviction
from klotski_tier.policies.lru import LRUEviction
from klotski_tier.policies.registry import make_eviction
from tests.policies.helpers import BLOCK_BYTES, FakeKey, filled

# ---- lru -----------------------------------------------------------------------------------


def test_lru_evicts_in_insertion_order_without_accesses() -> None:
    assert list(filled(LRUEviction[int](), [3, 1, 2]).victims()) == [3, 1, 2]


def test_lru_access_moves_a_key_to_the_back() -> None:
    policy = filled(LRUEviction[str](), "abcd")
    policy.on_access("a")
    policy.on_access("c")
    assert list(policy.victims()) == ["b", "d", "a", "c"]


def test_lru_reinserted_key_is_most_recent() -> None:
    policy = filled(LRUEviction[int](), [1, 2, 3])
    policy.on_remove(1)
    policy.on_insert(1, BLOCK_BYTES)
    assert list(policy.victims()) == [2, 3, 1]


def test_lru_caller_stops_when_it_has_room() -> None:
    policy = filled(LRUEviction[int](), range(5))
    leased, needed, freed = {0}, 2 * BLOCK_BYTES, 0
    for key in policy.victims():
        if key in leased:
            continue
        policy.on_remove(key)
        freed += BLOCK_BYTES
        if freed >= needed:
            break
    assert list(policy.victims()) == [0, 3, 4]


OPS = st.lists(st.tuples(st.sampled_from(["insert", "access", "remove"]), st.integers(0, 5)), max_size=60)


@given(OPS)
def test_lru_and_fifo_match_a_list_model(ops: list[tuple[str, int]]) -> None:
    lru, fifo = LRUEviction[int](), FIFOEviction[int]()
    lru_model: list[int] = []  # least recently used first
    fifo_model: list[int] = []  # earliest inserted first
    for op, key in ops:
        if op == "insert" and key not in lru_model:
            for policy, model in ((lru, lru_model), (fifo, fifo_model)):
                policy.on_insert(key, BLOCK_BYTES)
                model.append(key)
        elif op == "access" and key in lru_model:
            lru.on_access(key)
            fifo.on_access(key)
            lru_model.remove(key)
            lru_model.append(key)
        elif op == "remove" and key in lru_model:
            for policy, model in ((lru, lru_model), (fifo, fifo_model)):
                policy.on_remove(key)
                model.remove(key)
        assert list(lru.victims()) == lru_model and list(fifo.victims()) == fifo_model


# ---- fifo ----------------------------------------------------------------------------------


def test_fifo_access_changes_nothing() -> None:
    policy = filled(FIFOEviction[int](), [1, 2, 3])
    for _ in range(5):
        policy.on_access(1)
    assert list(policy.victims()) == [1, 2, 3] and FIFOEviction.name == "fifo"


# ---- lfu -----------------------------------------------------------------------------------


def test_lfu_orders_by_count_then_least_recently_used() -> None:
    policy = filled(LFUEviction[str](aging_interval=1000), "abcd")
    for key in "bbdc":
        policy.on_access(key)  # counts: a 1, b 3, c 2, d 2; c used after d
    assert list(policy.victims()) == ["a", "d", "c", "b"]
    assert policy.count("b") == 3.0


def test_lfu_ages_every_interval() -> None:
    policy = filled(LFUEviction[str](decay=0.5, aging_interval=2), "ab")
    policy.on_access("a")  # a 2, b 1
    policy.on_access("a")  # a 3 -> aging: a 1.5, b 0.5
    assert (policy.count("a"), policy.count("b")) == (1.5, 0.5)


def test_lfu_forgets_a_removed_key() -> None:
    policy = filled(LFUEviction[str](aging_interval=1000), "ab")
    for _ in range(3):
        policy.on_access("a")
    policy.on_remove("a")
    policy.on_insert("a", BLOCK_BYTES)
    assert policy.count("a") == 1.0 and list(policy.victims()) == ["b", "a"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decay": 0}, "decay=0 is out of range"),
        ({"decay": 1.5}, r"decay=1.5 is out of range; use a number in \(0.0, 1.0\]"),
        ({"aging_interval": 0}, "aging_interval=0 is out of range; use an integer >= 1"),
        ({"decay": True}, "decay=True"),
    ],
)
def test_lfu_bad_options_are_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"eviction policy 'lfu' option {message}"):
        make_eviction("lfu", **options)


# ---- hot-first -----------------------------------------------------------------------------


def test_expert_of_reads_layer_and_expert_attributes() -> None:
    assert expert_of(expert_block(3, 5)) == (3, 5)
    assert expert_of(FakeKey(1, 0)) == (1, 0)
    assert expert_of(gate_block(3)) is None and expert_of(attn_block(0)) is None
    assert expert_of(7) is None and expert_of("L0.E1") is None and expert_of(FakeKey(1)) is None


def test_hot_first_non_experts_go_first_in_lru_order() -> None:
    policy = filled(HotFirstEviction[object](keep_per_layer=1), [FakeKey(0, 0), "embed", FakeKey(0), 9])
    policy.on_access("embed")
    assert list(policy.victims()) == [FakeKey(0), 9, "embed", FakeKey(0, 0)]


def test_hot_first_counts_uses_across_stays() -> None:
    policy = filled(HotFirstEviction[FakeKey](), [FakeKey(2, 4)])
    policy.on_access(FakeKey(2, 4))
    policy.on_remove(FakeKey(2, 4))
    policy.on_insert(FakeKey(2, 4), BLOCK_BYTES)
    assert policy.uses(2, 4) == 3 and policy.uses(2, 5) == 0


def test_hot_first_hot_set_ties_go_to_the_lower_expert() -> None:
    policy = filled(HotFirstEviction[FakeKey](keep_per_layer=2), [FakeKey(0, e) for e in (3, 1, 2)])
    assert policy.hot_experts() == {(0, 1), (0, 2)}


def test_hot_first_keep_zero_is_lru() -> None:
    policy = filled(HotFirstEviction[FakeKey](keep_per_layer=0), [FakeKey(0, 1), FakeKey(0, 2)])
    for _ in range(3):
        policy.on_access(FakeKey(0, 1))
    assert list(policy.victims()) == [FakeKey(0, 2), FakeKey(0, 1)]


def test_hot_first_bad_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="keep_per_layer=-1 is out of range"):
        make_eviction("hot-first", keep_per_layer=-1)
