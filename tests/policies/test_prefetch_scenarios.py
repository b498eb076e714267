"""Scenarios that narrate a small routing history and check what each prefetch policy chooses.

Routes are per token, the experts it selected in one layer (plain ints). Precision is the share
of prefetched experts that were used; recall the share of used experts that were prefetched.
"""

from __future__ import annotations

import random

from klotski_tier.policies.correlation import CorrelationPrefetch
from klotski_tier.policies.hot_first import HotFirstPrefetch
from klotski_tier.policies.oracle import OraclePrefetch
from klotski_tier.policies.prefetch import NoPrefetch, PrefetchPolicy, StepRoutes
from klotski_tier.policies.registry import make_prefetch
from tests.policies.helpers import precision_recall


def test_correlation_follows_the_tokens_while_hot_first_follows_the_crowd() -> None:
    """Warm-up: six tokens go 0 -> 2 from layer 0 to layer 1, four tokens go 1 -> 3.

    So expert 2 is layer 1's most frequent expert, and hot-first bets on it. Then a new batch
    arrives whose three tokens all chose expert 1 in layer 0. Klotski's correlation table says
    such tokens take expert 3 next, and it is right: the batch uses 3, never 2.
    """
    warm_up: StepRoutes = [[[[0]] * 6 + [[1]] * 4, [[2]] * 6 + [[3]] * 4]]
    correlation, hot_first = CorrelationPrefetch(), HotFirstPrefetch()
    correlation.warm_up(warm_up)
    hot_first.warm_up(warm_up)
    came_from, went_to = [[1], [1], [1]], [[3], [3], [3]]

    assert correlation.predict(1, 1, came_from) == [3]
    assert hot_first.predict(1, 1, came_from) == [2]
    assert precision_recall(correlation.predict(1, 1, came_from), went_to) == (1.0, 1.0)
    assert precision_recall(hot_first.predict(1, 1, came_from), went_to) == (0.0, 0.0)
    # With a mixed batch the tendencies add up: two tokens lean to 3, one to 2.
    assert correlation.predict(1, 2, [[0], [1], [1]]) == [3, 2]
    # Layer 0 has no previous layer: correlation falls back to frequency, like hot-first.
    assert correlation.predict(0, 2) == hot_first.predict(0, 2) == [0, 1]


def test_correlation_keeps_learning_during_the_run() -> None:
    """After warm-up, the model's habits change: tokens from expert 1 now go to expert 5.

    The table is updated online from every observed step, so the prediction follows once the
    new habit has been seen more often than the old one.
    """
    policy = CorrelationPrefetch()
    policy.warm_up([[[[1]] * 2, [[3]] * 2]])
    assert policy.predict(1, 1, [[1]]) == [3]
    for step in range(3):
        policy.begin_step(step)
        policy.observe(0, [[1]])
        policy.observe(1, [[5]])
    assert policy.predict(1, 1, [[1]]) == [5]


def test_oracle_knows_each_step_and_none_knows_nothing() -> None:
    """A two-step trace of a 2-layer model, 3 tokens, top-2 routing.

    Step 0, layer 1 uses expert 4 (three times), 6 (twice) and 1 (once); step 1, layer 1 uses
    2 and 7. The oracle reads this from the trace: whatever k up to the number of used experts,
    its precision is 1; with k covering them all, recall is 1 too. ``none`` predicts nothing:
    recall 0, whatever k.
    """
    trace: StepRoutes = [
        [[[0, 1], [1, 2], [0, 2]], [[4, 6], [4, 1], [6, 4]]],
        [[[3, 0], [3, 0], [3, 1]], [[2, 7], [7, 2], [2, 7]]],
    ]
    oracle, none = OraclePrefetch(), NoPrefetch()
    oracle.warm_up(trace)
    oracle.begin_step(0)
    assert oracle.predict(1, 2) == [4, 6]
    for k in (1, 2, 3):
        assert precision_recall(oracle.predict(1, k), trace[0][1])[0] == 1.0
    assert precision_recall(oracle.predict(1, 8), trace[0][1]) == (1.0, 1.0)
    assert precision_recall(none.predict(1, 8, trace[0][0]), trace[0][1]) == (0.0, 0.0)

    oracle.begin_step(1)
    assert oracle.predict(1, 8) == [2, 7] and oracle.predict(0, 1) == [3]
    oracle.begin_step(2)  # the run went on past the recorded trace
    assert oracle.predict(1, 8) == []


NUM_LAYERS, NUM_EXPERTS, TOP_K, TOKENS = 4, 8, 2, 4  # a decode step of 4 tokens, Mixtral-like top-2 of 8
FOLLOW = 0.85  # how often a token takes its usual next expert


def _habitual_routing(rng: random.Random, steps: int) -> StepRoutes:
    """Tokens with habits: in layer l, a token that took expert e in l-1 takes (3e + l) mod 8 with
    probability FOLLOW, else any expert. Layer 0 picks are uniform, so no expert is globally hot."""
    trace = []
    for _ in range(steps):
        layers = [[rng.sample(range(NUM_EXPERTS), TOP_K) for _ in range(TOKENS)]]
        for layer in range(1, NUM_LAYERS):
            layers.append([_next(rng, token, layer) for token in layers[-1]])
        trace.append(layers)
    return trace


def _next(rng: random.Random, previous: list[int], layer: int) -> list[int]:
    chosen: list[int] = []
    for expert in previous:
        usual = (3 * expert + layer) % NUM_EXPERTS
        pick = usual if rng.random() < FOLLOW else rng.randrange(NUM_EXPERTS)
        chosen.append(pick if pick not in chosen else (pick + 1) % NUM_EXPERTS)
    return chosen


def _mean_recall_precision(policy: PrefetchPolicy, trace: StepRoutes) -> tuple[float, float]:
    """Replay ``trace`` as the engine would: predict layer l from layer l-1, then observe l."""
    recalls, precisions = [], []
    for step, layers in enumerate(trace):
        policy.begin_step(step)
        for layer, routes in enumerate(layers):
            if layer > 0:
                precision, recall = precision_recall(policy.predict(layer, TOP_K, layers[layer - 1]), routes)
                precisions.append(precision)
                recalls.append(recall)
            policy.observe(layer, routes)
    return sum(recalls) / len(recalls), sum(precisions) / len(precisions)


def test_replay_ranks_the_policies_as_the_paper_does() -> None:
    """A routing history with strong layer-to-layer habits and no globally hot expert.

    Every learning policy warms up on 40 recorded steps, then 20 new steps are replayed with
    K = top-k = 2. Knowing where each token came from (correlation) beats knowing only which
    experts are popular (hot-first), which beats not prefetching (none, recall 0); the oracle,
    reading the future, bounds them all with precision 1.
    """
    rng = random.Random(0)
    warm_up, run = _habitual_routing(rng, 40), _habitual_routing(rng, 20)
    results = {}
    for name in ("none", "hot-first", "correlation", "oracle"):
        policy = make_prefetch(name)
        policy.warm_up(run if policy.needs_trace else warm_up)
        results[name] = _mean_recall_precision(policy, run)
    recall = {name: r for name, (r, _) in results.items()}
    assert recall["oracle"] >= recall["correlation"] > recall["hot-first"] > recall["none"] == 0.0
    assert results["oracle"][1] == 1.0 and results["correlation"][1] > 0.8
