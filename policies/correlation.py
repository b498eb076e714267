"""Correlation prefetch, the Klotski predictor: where tokens went in layer l-1 tells where they go in l.

The policy keeps a co-activation table ``counts[l][e_prev][e_next]``: how often a token that
chose ``e_prev`` in layer ``l-1`` chose ``e_next`` in layer ``l``. It is learned from
``observe`` calls: the routes of the last observed layer are kept, and when ``observe(l, routes)``
follows ``observe(l-1, previous)`` for the same number of tokens, the two are paired token by
token. A warm-up run (``warm_up``) fills the table before a run; it keeps learning online during
the run; ``state``/``load_state`` save and restore it when the user asks.

``predict(l, k, previous_routes)`` gives every token of ``previous_routes`` (all n batches) its
*tendency*: the normalized rows ``counts[l][e]`` of each expert ``e`` it chose in ``l-1``, summed.
The tendencies of all tokens are summed and the top ``k`` experts returned, ties to the lower id.
Where that is not possible (layer 0, no ``previous_routes``), and for an expert whose row is
still empty, the layer's overall selection frequency stands in (as in hot-first). If the
tendencies name fewer than ``k`` experts, the most frequent other experts fill the rest.

Options (config keys of the ``correlation`` section):

- ``smoothing`` (default 0): pseudo-observations mixed into every row, spread like the layer's
  frequency; rows seen only a few times lean on the frequency, well-known rows on themselves.
- ``decay`` (default 1, no forgetting): at each new step every earlier observation's weight is
  multiplied by ``decay``, so the table follows routing that drifts over a long run.

State columns: ``pair_layer``, ``pair_previous``, ``pair_expert``, ``pair_count`` and
``frequency_layer``, ``frequency_expert``, ``frequency_count`` (counts after decay, floats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from klotski_tier.policies.prefetch import PolicyState, PrefetchPolicy, Routes
from klotski_tier.policies.tables import (
    CountTable,
    IntArray,
    check_range,
    check_state_keys,
    expert_counts,
    pair_counts,
    route_array,
    top_k,
)

OWNER = "prefetch policy 'correlation'"
MAX_SMOOTHING = float("inf")  # pseudo-observations per row: any non-negative number
RESCALE_WEIGHT = 1e12  # once a new observation weighs this much, stored weights are rescaled to 1


class CorrelationPrefetch(PrefetchPolicy):
    """Predicts the hot experts of layer l from the experts the same tokens chose in layer l-1."""

    name = "correlation"

    def __init__(self, smoothing: float = 0.0, decay: float = 1.0) -> None:
        self.smoothing = check_range(OWNER, "smoothing", smoothing, 0.0, MAX_SMOOTHING, low_open=False)
        self.decay = check_range(OWNER, "decay", decay, 0.0, 1.0, low_open=True)
        self._pairs = CountTable("pair", ["layer", "previous"])  # (l, e_prev) -> e_next -> weight
        self._frequency = CountTable("frequency", ["layer"])  # (l,) -> expert -> weight
        # Decay is lazy: a new observation weighs 1/decay more than one a step older, which ranks
        # the same as multiplying every stored weight by decay at each step.
        self._weight = 1.0
        self._last: tuple[int, IntArray] | None = None  # last observed layer, its routes [N, k]

    def begin_step(self, step: int) -> None:
        self._last = None  # routes of the previous step's last layer pair with nothing
        if self.decay < 1.0:
            self._weight /= self.decay
            if self._weight > RESCALE_WEIGHT:
                self._rescale()

    def observe(self, layer: int, routes: Routes) -> None:
        current = route_array(routes)
        self._frequency.add_counts((layer,), expert_counts(current), self._weight)
        last = self._last
        if last is not None and last[0] == layer - 1 and len(last[1]) == len(current):
            for e_prev, row in pair_counts(last[1], current).items():
                self._pairs.add_counts((layer, e_prev), row, self._weight)
        self._last = (layer, current)

    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        assert k >= 0, f"cannot predict a negative number of experts ({k})"
        prior = _normalized(self._frequency.row((layer,)))
        previous = route_array(previous_routes) if previous_routes is not None else None
        known = previous is not None and previous.size > 0
        scores = self._tendencies(layer, previous, prior) if known and previous is not None else {}
        chosen = top_k(scores, k)
        return chosen + top_k(prior, k - len(chosen), exclude=chosen)

    def pair_count(self, layer: int, previous: int, expert: int) -> float:
        """How often (after decay) a token that chose ``previous`` in ``layer - 1`` chose ``expert``."""
        return self._pairs.count((layer, previous), expert) / self._weight

    def state(self) -> PolicyState:
        factor = 1.0 / self._weight
        return {**self._pairs.columns(factor), **self._frequency.columns(factor)}

    def load_state(self, state: Mapping[str, Sequence[Any]]) -> None:
        check_state_keys(OWNER, state, [self._pairs, self._frequency])
        self._pairs.load_columns(OWNER, state)
        self._frequency.load_columns(OWNER, state)
        self._weight = 1.0

    def _tendencies(
        self, layer: int, previous_routes: IntArray, prior: Mapping[int, float]
    ) -> dict[int, float]:
        """The tendencies of every token of ``previous_routes``, summed per expert of ``layer``."""
        scores: dict[int, float] = {}
        for e_prev, tokens in expert_counts(previous_routes).items():
            for expert, share in self._tendency(layer, e_prev, prior).items():
                scores[expert] = scores.get(expert, 0.0) + tokens * share
        return scores

    def _tendency(self, layer: int, e_prev: int, prior: Mapping[int, float]) -> Mapping[int, float]:
        """Where a token that chose ``e_prev`` in ``layer - 1`` goes: its row, normalized and smoothed."""
        row = self._pairs.row((layer, e_prev))
        total = sum(row.values())
        if total <= 0:
            return prior
        pseudo = self.smoothing * self._weight  # smoothing in stored units
        experts = (set(row) | set(prior)) if pseudo > 0 else set(row)
        return {e: (row.get(e, 0.0) + pseudo * prior.get(e, 0.0)) / (total + pseudo) for e in experts}

    def _rescale(self) -> None:
        self._pairs.scale(1.0 / self._weight)
        self._frequency.scale(1.0 / self._weight)
        self._weight = 1.0


def _normalized(counts: Mapping[int, float]) -> dict[int, float]:
    """``counts`` divided by their sum (empty if they sum to nothing)."""
    total = sum(counts.values())
    return {e: c / total for e, c in counts.items()} if total > 0 else {}
