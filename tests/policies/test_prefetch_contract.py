"""The prefetch contract of :mod:`klotski_tier.policies.prefetch`, run against every registered policy.

Parametrized over the registry's names: a new built-in or installed plugin is covered without
touching this file. Every policy first gets the same small routing trace through ``warm_up``
(the oracle needs it; the learning policies learn from it), then plain-int calls.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klotski_tier.core.errors import ConfigError
from klotski_tier.policies.prefetch import PrefetchPolicy, Routes, StepRoutes
from klotski_tier.policies.registry import PREFETCH_POLICIES, make_prefetch

Factory = Callable[[], PrefetchPolicy]
NAMES = PREFETCH_POLICIES.names()
NUM_EXPERTS = 6  # every expert id in TRACE is below this
TRACE: StepRoutes = [  # [step][layer] -> per token, its top-2 experts; 2 steps, 3 layers, 4 tokens
    [
        [[0, 3], [3, 1], [3, 0], [2, 1]],
        [[4, 5], [5, 1], [4, 2], [0, 5]],
        [[1, 2], [2, 3], [1, 3], [5, 4]],
    ],
    [
        [[3, 1], [3, 2], [0, 3], [1, 4]],
        [[5, 4], [5, 0], [2, 1], [4, 5]],
        [[2, 1], [3, 1], [2, 0], [4, 1]],
    ],
]


@pytest.fixture(params=NAMES)
def make(request: pytest.FixtureRequest) -> Factory:
    """A factory for the policy under test, built by name with default options and warmed up on TRACE."""
    name: str = request.param

    def factory() -> PrefetchPolicy:
        policy = make_prefetch(name)
        policy.warm_up(TRACE)
        return policy

    return factory


def _predictions(policy: PrefetchPolicy, k: int = 3) -> list[list[int]]:
    """What ``policy`` predicts at step 0 for every layer of TRACE, fed the true previous routes."""
    policy.begin_step(0)
    previous: list[Routes | None] = [None, *TRACE[0][:-1]]
    return [policy.predict(layer, k, previous[layer]) for layer in range(len(TRACE[0]))]


def _assert_valid(predicted: list[int], k: int) -> None:
    assert len(predicted) <= k and len(set(predicted)) == len(predicted)
    assert all(type(e) is int and 0 <= e < NUM_EXPERTS for e in predicted), predicted


def test_the_registry_holds_the_built_in_policies() -> None:
    assert {"none", "hot-first", "correlation", "oracle", "whole-layer"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_name_matches_the_registry(name: str) -> None:
    assert make_prefetch(name).name == name


def test_predicts_at_most_k_distinct_experts_in_range(make: Factory) -> None:
    policy = make()
    for k in range(NUM_EXPERTS + 2):
        for predicted in _predictions(policy, k):
            _assert_valid(predicted, k)


def test_k_zero_predicts_nothing(make: Factory) -> None:
    policy = make()
    assert policy.predict(0, 0) == [] and policy.predict(1, 0, TRACE[0][0]) == []


def test_negative_k_fails_loudly(make: Factory) -> None:
    with pytest.raises(AssertionError, match="negative"):
        make().predict(0, -1)


def test_a_layer_never_seen_predicts_nothing(make: Factory) -> None:
    policy = make()
    policy.begin_step(0)
    assert policy.predict(len(TRACE[0]) + 4, 3) == []


def test_observe_and_predict_with_plain_ints_across_steps(make: Factory) -> None:
    policy = make()
    for step, layers in enumerate(TRACE):
        policy.begin_step(step)
        for layer, routes in enumerate(layers):
            _assert_valid(policy.predict(layer, 2, layers[layer - 1] if layer else None), 2)
            policy.observe(layer, routes)


def test_arguments_are_not_modified(make: Factory) -> None:
    policy, routes = make(), copy.deepcopy(TRACE)
    policy.begin_step(0)
    policy.observe(0, routes[0][0])
    policy.predict(1, 2, routes[0][0])
    assert routes == TRACE


def _fresh_for_state(make: Factory) -> PrefetchPolicy:
    """A policy that has learned nothing; one that needs a trace gets it, as the engine gives it."""
    name = make().name
    fresh = make_prefetch(name)
    if fresh.needs_trace:
        fresh.warm_up(TRACE)
    return fresh


def test_state_survives_a_json_round_trip(make: Factory) -> None:
    policy = make()
    saved = json.loads(json.dumps(policy.state()))
    restored = _fresh_for_state(make)
    restored.load_state(saved)
    assert _predictions(restored) == _predictions(policy)
    assert restored.state() == saved


def test_state_survives_an_npz_round_trip(make: Factory, tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    policy = make()
    np.savez(tmp_path / "state.npz", **{key: np.asarray(values) for key, values in policy.state().items()})
    with np.load(tmp_path / "state.npz") as arrays:
        restored = _fresh_for_state(make)
        restored.load_state({key: arrays[key] for key in arrays.files})
    assert _predictions(restored) == _predictions(policy)


def test_a_foreign_state_is_a_config_error(make: Factory) -> None:
    with pytest.raises(ConfigError, match="state"):
        make().load_state({"bogus_column": [1, 2]})


ROUTES = st.lists(st.lists(st.integers(0, NUM_EXPERTS - 1), min_size=1, max_size=2), min_size=1, max_size=5)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=25, deadline=None)
@given(steps=st.lists(st.lists(ROUTES, min_size=1, max_size=3), min_size=1, max_size=3), k=st.integers(0, 8))
def test_any_routing_history_gives_valid_predictions(name: str, steps: StepRoutes, k: int) -> None:
    policy = make_prefetch(name)
    policy.warm_up(steps)
    for step, layers in enumerate(steps):
        policy.begin_step(step)
        for layer, routes in enumerate(layers):
            _assert_valid(policy.predict(layer, k, layers[layer - 1] if layer else None), k)
            policy.observe(layer, routes)
