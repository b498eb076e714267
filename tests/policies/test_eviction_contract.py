"""The eviction contract of :mod:`klotski_tier.policies.eviction`, run against every registered policy.

The tests are parametrized over the registry's names, so a new built-in (or an installed
third-party plugin) is held to the same contract without touching this file.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klotski_tier.core.model.blocks import attn_block, expert_block
from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.policies.registry import EVICTION_POLICIES, make_eviction
from tests.policies.helpers import BLOCK_BYTES, FakeKey, filled

Factory = Callable[[], EvictionPolicy[Any]]
NAMES = EVICTION_POLICIES.names()
MIXED_KEYS: list[Hashable] = [5, FakeKey(0, 1), "attn.0", FakeKey(0, 2), FakeKey(1), 1]


@pytest.fixture(params=NAMES)
def make(request: pytest.FixtureRequest) -> Factory:
    """A factory for the policy under test, built by name with its default options."""
    name: str = request.param
    return lambda: make_eviction(name)


def test_the_registry_holds_the_built_in_policies() -> None:
    assert {"lru", "lfu", "hot-first", "fifo", "sweep"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_name_matches_the_registry(name: str) -> None:
    assert make_eviction(name).name == name


def test_starts_empty(make: Factory) -> None:
    policy = make()
    assert len(policy) == 0 and list(policy.victims()) == [] and 1 not in policy


def test_insert_tracks_len_and_contains(make: Factory) -> None:
    policy = filled(make(), [1, 2, 3])
    assert len(policy) == 3
    assert 2 in policy and 4 not in policy


def test_victims_name_every_key_once(make: Factory) -> None:
    policy = filled(make(), MIXED_KEYS)
    policy.on_access(FakeKey(0, 2))
    policy.on_access(5)
    victims = list(policy.victims())
    assert len(victims) == len(MIXED_KEYS) and set(victims) == set(MIXED_KEYS)


def test_remove_forgets_the_key(make: Factory) -> None:
    policy = filled(make(), MIXED_KEYS)
    policy.on_remove(FakeKey(0, 1))
    assert FakeKey(0, 1) not in policy and len(policy) == len(MIXED_KEYS) - 1
    assert FakeKey(0, 1) not in list(policy.victims())


def test_removing_while_iterating_victims(make: Factory) -> None:
    policy = filled(make(), list(range(6)))
    evicted = []
    for key in policy.victims():
        if key % 2 == 0:  # the caller skips odd keys, as if they were leased
            policy.on_remove(key)
            evicted.append(key)
    assert sorted(evicted) == [0, 2, 4] and sorted(policy.victims()) == [1, 3, 5]


def test_victims_skip_keys_removed_during_iteration(make: Factory) -> None:
    policy = filled(make(), [1, 2, 3])
    seen = []
    for key in policy.victims():
        seen.append(key)
        for other in [1, 2, 3]:
            if other not in seen and other in policy:
                policy.on_remove(other)
    assert len(seen) == 1


def test_victims_skip_keys_inserted_during_iteration(make: Factory) -> None:
    policy = filled(make(), [1, 2])
    seen = []
    for key in policy.victims():
        seen.append(key)
        if 3 not in policy:
            policy.on_insert(3, BLOCK_BYTES)
    assert sorted(seen) == [1, 2] and 3 in policy


def test_reinsert_after_remove(make: Factory) -> None:
    policy = filled(make(), [1])
    policy.on_remove(1)
    policy.on_insert(1, BLOCK_BYTES)
    assert list(policy.victims()) == [1] and len(policy) == 1


def test_block_ids_and_strings_are_keys(make: Factory) -> None:
    policy = filled(make(), [expert_block(0, 1), attn_block(0), "attn.0"])
    policy.on_access(expert_block(0, 1))
    assert expert_block(0, 1) in policy and "attn.0" in policy
    assert set(policy.victims()) == {expert_block(0, 1), attn_block(0), "attn.0"}


def test_lifecycle_violations_fail_loudly(make: Factory) -> None:
    policy = filled(make(), [1])
    with pytest.raises(AssertionError, match="twice"):
        policy.on_insert(1, BLOCK_BYTES)
    with pytest.raises(AssertionError, match="not resident"):
        policy.on_access(2)
    with pytest.raises(AssertionError, match="not resident"):
        policy.on_remove(2)


KEYS = st.sampled_from([0, 1, 2, FakeKey(0, 0), FakeKey(0, 1), FakeKey(0, 2), FakeKey(1, 0), FakeKey(1)])
OPS = st.lists(st.tuples(st.sampled_from(["insert", "access", "remove"]), KEYS), max_size=50)


def _drive(policy: EvictionPolicy[Any], ops: list[tuple[str, Hashable]], tracked: set[Hashable]) -> None:
    """Apply the legal ones of ``ops`` to ``policy``, keeping ``tracked`` as the model of its keys."""
    for op, key in ops:
        if op == "insert" and key not in tracked:
            policy.on_insert(key, BLOCK_BYTES)
            tracked.add(key)
        elif op == "access" and key in tracked:
            policy.on_access(key)
        elif op == "remove" and key in tracked:
            policy.on_remove(key)
            tracked.discard(key)


@pytest.mark.parametrize("name", NAMES)
@given(ops=OPS)
def test_any_history_keeps_the_contract_and_is_deterministic(
    name: str, ops: list[tuple[str, Hashable]]
) -> None:
    first, second, tracked = make_eviction(name), make_eviction(name), set[Hashable]()
    _drive(first, ops, tracked)
    _drive(second, ops, set())
    victims = list(first.victims())
    assert len(victims) == len(set(victims)) == len(first) == len(tracked)
    assert set(victims) == tracked and all(key in first for key in tracked)
    assert victims == list(second.victims())  # same history, same order
