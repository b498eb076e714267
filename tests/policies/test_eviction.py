"""Eviction policies: one contract every policy passes, then LRU's own order, then a model check."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klotski_tier.core.blocks import expert_block
from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.policies.lru import LRUEviction

BLOCK_BYTES = 4096  # every test block's size: policies order, they do not count bytes


class EvictionContract:
    """The lifecycle contract of :mod:`klotski_tier.policies.eviction`; subclass per policy."""

    def make_policy(self) -> EvictionPolicy[Any]:
        raise NotImplementedError

    def filled(self, keys: list[Hashable]) -> EvictionPolicy[Any]:
        policy = self.make_policy()
        for key in keys:
            policy.on_insert(key, BLOCK_BYTES)
        return policy

    def test_starts_empty(self) -> None:
        policy = self.make_policy()
        assert len(policy) == 0 and list(policy.victims()) == [] and 1 not in policy

    def test_insert_tracks_len_and_contains(self) -> None:
        policy = self.filled([1, 2, 3])
        assert len(policy) == 3
        assert 2 in policy and 4 not in policy

    def test_victims_name_every_key_once_and_skip_nothing(self) -> None:
        policy = self.filled([5, 1, 4, 2])
        policy.on_access(4)
        assert sorted(policy.victims()) == [1, 2, 4, 5]

    def test_remove_forgets_the_key(self) -> None:
        policy = self.filled([1, 2, 3])
        policy.on_remove(2)
        assert 2 not in policy and len(policy) == 2
        assert 2 not in list(policy.victims())

    def test_removing_while_iterating_victims(self) -> None:
        policy = self.filled(list(range(6)))
        evicted = []
        for key in policy.victims():
            if key % 2 == 0:  # the caller skips odd keys, as if they were leased
                policy.on_remove(key)
                evicted.append(key)
        assert sorted(evicted) == [0, 2, 4] and sorted(policy.victims()) == [1, 3, 5]

    def test_victims_skip_keys_removed_during_iteration(self) -> None:
        policy = self.filled([1, 2, 3])
        seen = []
        for key in policy.victims():
            seen.append(key)
            for other in [1, 2, 3]:
                if other not in seen and other in policy:
                    policy.on_remove(other)
        assert len(seen) == 1

    def test_reinsert_after_remove(self) -> None:
        policy = self.filled([1])
        policy.on_remove(1)
        policy.on_insert(1, BLOCK_BYTES)
        assert list(policy.victims()) == [1]

    def test_block_ids_and_strings_are_keys(self) -> None:
        policy = self.filled([expert_block(0, 1), "attn.0"])
        assert expert_block(0, 1) in policy and "attn.0" in policy

    def test_lifecycle_violations_fail_loudly(self) -> None:
        policy = self.filled([1])
        with pytest.raises(AssertionError, match="twice"):
            policy.on_insert(1, BLOCK_BYTES)
        with pytest.raises(AssertionError, match="not resident"):
            policy.on_access(2)
        with pytest.raises(AssertionError, match="not resident"):
            policy.on_remove(2)


class TestLRUContract(EvictionContract):
    def make_policy(self) -> EvictionPolicy[Any]:
        return LRUEviction()


def test_lru_evicts_in_insertion_order_without_accesses() -> None:
    policy = LRUEviction[int]()
    for key in [3, 1, 2]:
        policy.on_insert(key, BLOCK_BYTES)
    assert list(policy.victims()) == [3, 1, 2]


def test_lru_access_moves_a_key_to_the_back() -> None:
    policy = LRUEviction[str]()
    for key in "abcd":
        policy.on_insert(key, BLOCK_BYTES)
    policy.on_access("a")
    policy.on_access("c")
    assert list(policy.victims()) == ["b", "d", "a", "c"]


def test_lru_reinserted_key_is_most_recent() -> None:
    policy = LRUEviction[int]()
    for key in [1, 2, 3]:
        policy.on_insert(key, BLOCK_BYTES)
    policy.on_remove(1)
    policy.on_insert(1, BLOCK_BYTES)
    assert list(policy.victims()) == [2, 3, 1]


def test_lru_caller_stops_when_it_has_room() -> None:
    policy = LRUEviction[int]()
    for key in range(5):
        policy.on_insert(key, BLOCK_BYTES)
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
def test_lru_matches_a_list_model(ops: list[tuple[str, int]]) -> None:
    policy = LRUEviction[int]()
    model: list[int] = []  # least recently used first
    for op, key in ops:
        if op == "insert" and key not in model:
            policy.on_insert(key, BLOCK_BYTES)
            model.append(key)
        elif op == "access" and key in model:
            policy.on_access(key)
            model.remove(key)
            model.append(key)
        elif op == "remove" and key in model:
            policy.on_remove(key)
            model.remove(key)
        assert list(policy.victims()) == model
        assert len(policy) == len(model)
        assert all((k in policy) == (k in model) for k in range(6))
