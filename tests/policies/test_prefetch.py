"""Prefetch policies with plain integers: the shared contract, NoPrefetch, HotFirstPrefetch."""

from __future__ import annotations

import pytest

from klotski_tier.policies.hot_first import HotFirstPrefetch
from klotski_tier.policies.prefetch import NoPrefetch, PrefetchPolicy

ROUTES_L0 = [[0, 3], [3, 1], [3, 0], [2, 1]]  # per token, its top-2 experts: 3 x3, 0 x2, 1 x2, 2 x1


class PrefetchContract:
    """What every prefetch policy promises; subclass per policy."""

    def make_policy(self) -> PrefetchPolicy:
        raise NotImplementedError

    def test_predicts_at_most_k_distinct_ints(self) -> None:
        policy = self.make_policy()
        policy.observe(0, ROUTES_L0)
        for k in range(6):
            predicted = policy.predict(0, k)
            assert len(predicted) <= k and len(set(predicted)) == len(predicted)
            assert all(isinstance(e, int) for e in predicted)

    def test_unobserved_layer_predicts_nothing(self) -> None:
        policy = self.make_policy()
        policy.observe(0, ROUTES_L0)
        assert policy.predict(7, 4) == []

    def test_k_zero_predicts_nothing(self) -> None:
        policy = self.make_policy()
        policy.observe(0, ROUTES_L0)
        assert policy.predict(0, 0) == []

    def test_negative_k_fails_loudly(self) -> None:
        with pytest.raises(AssertionError, match="negative"):
            self.make_policy().predict(0, -1)


class TestNoPrefetchContract(PrefetchContract):
    def make_policy(self) -> PrefetchPolicy:
        return NoPrefetch()


class TestHotFirstContract(PrefetchContract):
    def make_policy(self) -> PrefetchPolicy:
        return HotFirstPrefetch()


def test_no_prefetch_never_predicts() -> None:
    policy = NoPrefetch()
    policy.observe(0, ROUTES_L0)
    assert policy.predict(0, 4, previous_routes=ROUTES_L0) == []
    assert NoPrefetch.name == "none"


def test_hot_first_ranks_by_count_ties_to_lower_id() -> None:
    policy = HotFirstPrefetch()
    policy.observe(0, ROUTES_L0)
    assert policy.predict(0, 3) == [3, 0, 1]
    assert policy.predict(0, 10) == [3, 0, 1, 2]
    assert policy.count(0, 3) == 3 and policy.count(0, 9) == 0


def test_hot_first_accumulates_over_observations() -> None:
    policy = HotFirstPrefetch()
    policy.observe(0, ROUTES_L0)
    policy.observe(0, [[2, 1], [2, 1], [2, 5]])  # now 2 x4, 1 x4, 3 x3
    assert policy.predict(0, 3) == [1, 2, 3]


def test_hot_first_keeps_layers_apart() -> None:
    policy = HotFirstPrefetch()
    policy.observe(0, ROUTES_L0)
    policy.observe(1, [[6, 7], [7, 4]])
    assert policy.predict(1, 2) == [7, 4]
    assert policy.predict(0, 1) == [3]


def test_hot_first_ignores_previous_routes() -> None:
    policy = HotFirstPrefetch()
    policy.observe(1, ROUTES_L0)
    assert policy.predict(1, 2, previous_routes=[[5, 6]]) == policy.predict(1, 2) == [3, 0]
