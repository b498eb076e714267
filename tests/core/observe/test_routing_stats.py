"""Routing statistics: exact numbers on hand-made routes, invariants on random ones, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klotski_tier.core.errors import InputError
from klotski_tier.core.observe.routing_stats import routing_stats

# Four tokens, four experts, top-2, two layers. First choices 0,0,1,2 then 3,3,2,1: each layer's
# first choice determines the other's. Worked by hand in the comments of the test below.
LAYER0 = [[0, 1], [0, 2], [1, 0], [2, 3]]
LAYER1 = [[3, 0], [3, 1], [2, 0], [1, 0]]


def test_hand_made_routes_give_the_numbers_worked_by_hand() -> None:
    stats = routing_stats([np.array(LAYER0), np.array(LAYER1)], num_experts=4)
    assert (stats.num_tokens, stats.num_experts, stats.top_k, stats.num_layers) == (4, 4, 2, 2)
    # layer 0: expert 0 has 3 of 8 selections, 1 and 2 have 2, 3 has 1; layer 1: 0:3, 1:2, 3:2, 2:1
    assert stats.shares == ((0.375, 0.25, 0.25, 0.125), (0.375, 0.25, 0.25, 0.125))
    assert stats.top2_share == (0.625, 0.625)
    # first choices 0->3 (twice), 1->2, 2->1: every token predicted; the most common next, 3, is 2 of 4
    assert stats.predictability == (1.0,)
    assert stats.baseline == (0.5,)
    assert stats.nmi == (pytest.approx(1.0),)
    # co-activation table rows a=0..3: [2,1,1,2], [2,0,1,1], [1,2,0,1], [1,1,0,0]; predicted sets
    # {0,3}, {0,1} (a three-way tie to the lower ids), {0,3}, {0,1}: hits 2, 1, 1, 2 of 8
    assert stats.recall == (0.75,)
    assert stats.recall_baseline == (0.625,)  # the two busiest experts of layer 1


def test_independent_layers_are_not_predictable() -> None:
    layer0 = [[0, 2], [0, 3], [1, 2], [1, 3]]  # first choices 0, 0, 1, 1
    layer1 = [[0, 3], [1, 3], [0, 2], [1, 2]]  # first choices 0, 1, 0, 1: every pair once
    stats = routing_stats([layer0, layer1], num_experts=4)
    assert stats.predictability == stats.baseline == (0.5,)
    assert stats.nmi == (0.0,)
    assert stats.top2_share == (0.5, 0.5)


def test_a_constant_first_choice_carries_no_information() -> None:
    stats = routing_stats([[[0, 1], [0, 2]], [[1, 0], [2, 0]]], num_experts=3)
    assert stats.nmi == (0.0,)  # layer 0's first choice has zero entropy
    assert stats.predictability == (0.5,) and stats.baseline == (0.5,)


def test_three_layers_report_pairs_in_order_and_means() -> None:
    same = [[0, 1], [1, 0], [0, 1], [1, 0]]  # first choices 0, 1, 0, 1
    shifted = [[1, 0], [0, 1], [1, 0], [0, 1]]  # the other expert first: still determined
    constant = [[0, 1], [0, 1], [0, 1], [0, 1]]
    stats = routing_stats([same, shifted, constant], num_experts=2)
    assert stats.predictability == (1.0, 1.0)
    assert stats.baseline == (0.5, 1.0)
    assert stats.nmi == (pytest.approx(1.0), 0.0)
    assert stats.top2_share == (1.0, 1.0, 1.0)  # two experts, top-2: every selection
    means = stats.means()
    assert means["predictability"] == 1.0 and means["baseline"] == 0.75
    assert means["nmi"] == pytest.approx(0.5)


def test_one_layer_has_shares_but_no_pairs() -> None:
    stats = routing_stats([[[2], [2], [0]]], num_experts=3)
    assert stats.shares == ((2 / 3, 1 / 3, 0.0),) and stats.top2_share == (1.0,)
    assert stats.predictability == () and math.isnan(stats.means()["nmi"])


def test_to_dict_is_plain_json() -> None:
    stats = routing_stats([np.array(LAYER0), np.array(LAYER1)], num_experts=4)
    data = json.loads(json.dumps(stats.to_dict()))
    assert data["shares"][1] == [0.375, 0.25, 0.25, 0.125]
    assert data["num_layers"] == 2 and data["recall"] == [0.75]
    assert data["mean"]["top2_share"] == 0.625


@pytest.mark.parametrize(
    ("routes", "num_experts", "message"),
    [
        ([], 4, "at least one layer"),
        ([[0, 1]], 4, r"\[tokens, k\]"),
        ([np.zeros((0, 2), dtype=int)], 4, r"\[tokens, k\]"),
        ([[[0, 1]], [[0, 1], [1, 2]]], 4, "same tokens"),
        ([[[0, 4]]], 4, "another model"),
        ([[[-1, 0]]], 4, "another model"),
        ([[[1, 1]]], 4, "same expert twice"),
    ],
)
def test_bad_routes_are_input_errors(routes: list[object], num_experts: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        routing_stats(routes, num_experts)


@st.composite
def random_routes(draw: st.DrawFn) -> tuple[list[np.ndarray], int]:
    experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, experts))
    layers, tokens = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    routes = [np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]) for _ in range(layers)]
    return routes, experts


@settings(max_examples=60, deadline=None)
@given(case=random_routes())
def test_invariants_and_relabelling(case: tuple[list[np.ndarray], int]) -> None:
    routes, experts = case
    stats = routing_stats(routes, experts)
    assert all(math.isclose(sum(share), 1.0) for share in stats.shares)
    assert all(list(share) == sorted(share, reverse=True) for share in stats.shares)
    assert all(p >= b - 1e-12 for p, b in zip(stats.predictability, stats.baseline, strict=True))
    assert all(-1e-12 <= n <= 1.0 + 1e-9 for n in stats.nmi)
    assert all(0.0 <= r <= 1.0 for r in stats.recall)
    permutation = np.random.default_rng(0).permutation(experts)  # rename the experts of every layer
    renamed = routing_stats([permutation[layer] for layer in routes], experts)
    for name in ("shares", "top2_share", "predictability", "baseline", "recall_baseline"):
        assert np.allclose(getattr(renamed, name), getattr(stats, name)), name
    assert np.allclose(renamed.nmi, stats.nmi, atol=1e-9)
