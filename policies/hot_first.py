"""Hot-first prefetch: the experts selected most often so far in a layer are loaded first.

Per layer, the policy counts how many times each expert was selected (one count per token
per selection). ``predict`` returns the ``k`` most counted experts, ties going to the lower
expert id so the answer is deterministic. A layer never observed predicts nothing.

This is the frequency baseline of the Klotski paper, and the fallback of the correlation
policy for the first layer. Its state is the count table, columns ``frequency_layer``,
``frequency_expert``, ``frequency_count``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from klotski_tier.policies.prefetch import PolicyState, PrefetchPolicy, Routes
from klotski_tier.policies.tables import CountTable, check_state_keys, expert_counts, route_array, top_k


class HotFirstPrefetch(PrefetchPolicy):
    """Predicts the top-``k`` experts of a layer by selection count."""

    name = "hot-first"

    def __init__(self) -> None:
        self._frequency = CountTable("frequency", ["layer"])  # (layer,) -> expert id -> selections

    def observe(self, layer: int, routes: Routes) -> None:
        self._frequency.add_counts((layer,), expert_counts(route_array(routes)))

    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        assert k >= 0, f"cannot predict a negative number of experts ({k})"
        return top_k(self._frequency.row((layer,)), k)

    def count(self, layer: int, expert: int) -> float:
        """How many times ``expert`` of ``layer`` was selected so far."""
        return self._frequency.count((layer,), expert)

    def state(self) -> PolicyState:
        return self._frequency.columns()

    def load_state(self, state: Mapping[str, Sequence[Any]]) -> None:
        owner = f"prefetch policy {self.name!r}"
        check_state_keys(owner, state, [self._frequency])
        self._frequency.load_columns(owner, state)
