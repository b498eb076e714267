"""Whole-layer prefetch: every expert of the next layer, whatever the gates will choose.

This is how a layer-by-layer offloading system without expert awareness (FlexGen) streams an
MoE model: the whole layer is loaded ahead of its computation. With ``k`` at least the number
of experts per layer (``hot_experts = "all"``) the prediction is the whole layer, so its recall
is 1 and its precision is the share of experts the gates use.

A policy holds no model description, so the layer shape is learned from routing: the experts
of a layer are ids ``0 .. E-1``, with ``E`` one more than the largest id selected so far in any
layer (all layers of a model have as many experts). A layer is known once it has been observed,
or when the routes of the layer before it are given (a live run that reached ``layer - 1``); an
unknown layer predicts nothing. A routing trace (``warm_up``) or a saved state teaches the shape
before the first step; otherwise the first step learns it as it goes.

The state is the table of selections per layer and expert (columns ``whole_layer_layer``,
``whole_layer_expert``, ``whole_layer_count``), from which the shape is read back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from klotski_tier.policies.prefetch import PolicyState, PrefetchPolicy, Routes
from klotski_tier.policies.tables import CountTable, IntArray, check_state_keys, expert_counts, route_array


class WholeLayerPrefetch(PrefetchPolicy):
    """Predicts experts ``0 .. min(k, E) - 1`` of every known layer: the whole layer when k >= E."""

    name = "whole-layer"

    def __init__(self) -> None:
        self._seen = CountTable("whole_layer", ["layer"])  # (layer,) -> expert id -> selections
        self._experts = 0  # E: one more than the largest expert id selected so far

    def observe(self, layer: int, routes: Routes) -> None:
        array = route_array(routes)
        self._seen.add_counts((layer,), expert_counts(array))
        self._experts = max(self._experts, _span(array))

    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        assert k >= 0, f"cannot predict a negative number of experts ({k})"
        if previous_routes is None and not self._seen.row((layer,)):
            return []  # a layer this policy has no evidence of
        previous = route_array(previous_routes) if previous_routes is not None else None
        experts = max(self._experts, _span(previous) if previous is not None else 0)
        return list(range(min(k, experts)))

    @property
    def num_experts(self) -> int:
        """E as learned so far: one more than the largest expert id selected (0 before any)."""
        return self._experts

    def state(self) -> PolicyState:
        return self._seen.columns()

    def load_state(self, state: Mapping[str, Sequence[Any]]) -> None:
        owner = f"prefetch policy {self.name!r}"
        check_state_keys(owner, state, [self._seen])
        self._seen.load_columns(owner, state)
        experts = self._seen.columns()["whole_layer_expert"]
        self._experts = max(experts, default=-1) + 1


def _span(routes: IntArray) -> int:
    """One more than the largest expert id in ``routes`` (0 for no routes)."""
    return int(routes.max()) + 1 if routes.size else 0
