"""Each prefetch policy's own rules (the shared contract is in test_prefetch_contract.py)."""

from __future__ import annotations

import pytest

from klotski_tier.core.errors import ConfigError
from klotski_tier.policies.correlation import CorrelationPrefetch
from klotski_tier.policies.hot_first import HotFirstPrefetch
from klotski_tier.policies.oracle import OraclePrefetch
from klotski_tier.policies.prefetch import NoPrefetch
from klotski_tier.policies.registry import make_prefetch

ROUTES_L0 = [[0, 3], [3, 1], [3, 0], [2, 1]]  # per token, its top-2 experts: 3 x3, 0 x2, 1 x2, 2 x1

# ---- none ----------------------------------------------------------------------------------


def test_no_prefetch_never_predicts_and_keeps_no_state() -> None:
    policy = NoPrefetch()
    policy.observe(0, ROUTES_L0)
    assert policy.predict(0, 4, previous_routes=ROUTES_L0) == [] and policy.state() == {}
    assert NoPrefetch.name == "none" and not NoPrefetch.needs_trace


def test_a_policy_without_state_refuses_a_saved_one() -> None:
    with pytest.raises(ConfigError, match="prefetch policy 'none' keeps no learned state"):
        NoPrefetch().load_state({"frequency_count": [1.0]})
    NoPrefetch().load_state({"frequency_count": []})  # an empty state is nothing to refuse


# ---- hot-first -----------------------------------------------------------------------------


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


def test_hot_first_state_is_its_count_columns() -> None:
    policy = HotFirstPrefetch()
    policy.observe(1, [[4, 2], [4]])
    assert policy.state() == {
        "frequency_layer": [1, 1],
        "frequency_expert": [2, 4],
        "frequency_count": [1.0, 2.0],
    }


def test_a_damaged_state_is_a_config_error() -> None:
    policy = HotFirstPrefetch()
    with pytest.raises(ConfigError, match="lacks frequency_count"):
        policy.load_state({"frequency_layer": [0], "frequency_expert": [1]})
    with pytest.raises(ConfigError, match="differ in length"):
        policy.load_state({"frequency_layer": [0], "frequency_expert": [1], "frequency_count": []})
    with pytest.raises(ConfigError, match="not a number"):
        policy.load_state({"frequency_layer": ["x"], "frequency_expert": [1], "frequency_count": [2.0]})


# ---- correlation ---------------------------------------------------------------------------


def test_correlation_pairs_consecutive_layers_token_by_token() -> None:
    policy = CorrelationPrefetch()
    policy.observe(0, [[1, 2], [0]])
    policy.observe(1, [[3], [3, 5]])
    assert policy.pair_count(1, 1, 3) == policy.pair_count(1, 2, 3) == 1.0
    assert policy.pair_count(1, 0, 3) == policy.pair_count(1, 0, 5) == 1.0
    assert policy.pair_count(1, 1, 5) == 0.0


def test_correlation_pairs_nothing_across_a_gap_a_new_step_or_other_tokens() -> None:
    policy = CorrelationPrefetch()
    policy.observe(0, [[1]])
    policy.observe(2, [[3]])  # layer 1 was skipped: no pair
    policy.begin_step(1)
    policy.observe(3, [[4]])  # a new step began: layer 2 of the last step pairs with nothing
    policy.observe(4, [[5], [6]])  # two tokens after one: not the same tokens
    assert policy.state()["pair_count"] == []


def test_correlation_rows_are_normalized_per_expert() -> None:
    """Expert 0 was seen 100 times going to 4, expert 1 twice going to 5: a token of each counts alike."""
    policy = CorrelationPrefetch()
    for _ in range(50):
        policy.observe(0, [[0], [0], [1]])
        policy.observe(1, [[4], [4], [5 if _ < 2 else 6]])
        policy.begin_step(0)
    assert policy.predict(1, 1, [[0], [1], [1]]) == [6]  # 1 -> 6 (96%) twice beats 0 -> 4 once


def test_correlation_fills_up_with_the_most_frequent_experts() -> None:
    policy = CorrelationPrefetch()
    policy.observe(0, [[0], [1], [1]])
    policy.observe(1, [[7], [2], [2]])
    assert policy.predict(1, 3, [[0]]) == [7, 2]  # tendency names 7, frequency adds 2; nothing else seen


def test_correlation_smoothing_leans_a_rare_row_on_the_frequency() -> None:
    policy = CorrelationPrefetch(smoothing=4.0)
    policy.observe(0, [[0]] + [[1]] * 9)
    policy.observe(1, [[6]] + [[2]] * 9)  # expert 0 -> 6 seen once; layer 1 mostly picks 2
    assert policy.predict(1, 1, [[0]]) == [2]  # (1 + 4*0.1)/5 for 6 < (0 + 4*0.9)/5 for 2
    assert CorrelationPrefetch().predict(1, 1, [[0]]) == []  # nothing learned: nothing predicted


def test_correlation_decay_forgets_old_steps() -> None:
    policy = CorrelationPrefetch(decay=0.5)
    policy.warm_up([[[[0]], [[2]]]] * 3 + [[[[0]], [[3]]]])  # 0 -> 2 three steps ago, 0 -> 3 last step
    assert policy.pair_count(1, 0, 3) == 1.0 and policy.pair_count(1, 0, 2) == 0.5 + 0.25 + 0.125
    assert policy.predict(1, 1, [[0]]) == [3]
    stubborn = CorrelationPrefetch()
    stubborn.warm_up([[[[0]], [[2]]]] * 3 + [[[[0]], [[3]]]])
    assert stubborn.predict(1, 1, [[0]]) == [2]


def test_correlation_rescales_without_changing_predictions() -> None:
    policy = CorrelationPrefetch(decay=0.01)
    for step in range(10):  # the weight of one observation passes 1e12 and is rescaled
        policy.begin_step(step)
        policy.observe(0, [[step % 3]])
        policy.observe(1, [[step % 3 + 3]])
    assert policy.predict(1, 1, [[0]]) == [3]  # step 9 saw 0 -> 3
    assert policy.pair_count(1, 0, 3) == pytest.approx(1 + 1e-6 + 1e-12 + 1e-18)  # steps 9, 6, 3, 0
    assert policy.pair_count(1, 1, 4) == pytest.approx(1e-4 + 1e-10 + 1e-16)  # steps 7, 4, 1


def test_correlation_starts_from_a_hot_first_state() -> None:
    hot = HotFirstPrefetch()
    hot.observe(2, [[5], [5], [1]])
    policy = CorrelationPrefetch()
    policy.load_state(hot.state())
    assert policy.predict(2, 2, [[0]]) == [5, 1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"decay": 0.0}, r"decay=0.0 is out of range; use a number in \(0.0, 1.0\]"),
        ({"smoothing": -1}, r"smoothing=-1 is out of range; use a number in \[0.0, inf\]"),
        ({"smoothing": "a"}, "smoothing='a' is out of range"),
    ],
)
def test_correlation_bad_options_are_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"prefetch policy 'correlation' option {message}"):
        make_prefetch("correlation", **options)


# ---- oracle --------------------------------------------------------------------------------


def test_oracle_needs_a_trace_and_predicts_nothing_without_one() -> None:
    policy = OraclePrefetch()
    assert OraclePrefetch.needs_trace and policy.trace_steps == 0
    assert policy.predict(0, 2) == []


def test_oracle_ranks_by_use_ties_to_lower_id_and_ignores_observe() -> None:
    policy = OraclePrefetch()
    policy.warm_up([[ROUTES_L0]])
    policy.observe(0, [[7, 7]] * 9)
    assert policy.predict(0, 3) == [3, 0, 1] and policy.predict(0, 9) == [3, 0, 1, 2]
    assert policy.state() == {}
