"""Oracle prefetch: reads the true routing from a recorded trace, an upper bound for benchmarks.

The oracle is given the routing of the whole run before it starts (``warm_up`` with a trace
recorded from the same model and prompts) and, at each step, predicts the experts that step
really uses in each layer, most used first (ties to the lower expert id). When ``k`` is at most
the number of experts a layer uses, every prediction is used: precision 1. No real system can
know this; replaying policies against the oracle shows how much better prediction could do.

``needs_trace`` is True: the engine refuses the oracle without a routing trace. ``observe``
learns nothing; a step or layer beyond the trace predicts nothing. The trace is input, not
learned state, so ``state()`` is empty.
"""

from __future__ import annotations

from klotski_tier.policies.prefetch import PrefetchPolicy, Routes, StepRoutes
from klotski_tier.policies.tables import expert_counts, route_array, top_k


class OraclePrefetch(PrefetchPolicy):
    """Predicts the experts the current step really selects, read from the routing trace."""

    name = "oracle"
    needs_trace = True

    def __init__(self) -> None:
        self._ranked: list[list[list[int]]] = []  # [step][layer] -> used experts, most used first
        self._step = 0

    def warm_up(self, steps: StepRoutes) -> None:
        """Store the true routing of every step and layer, and start at step 0."""
        self._ranked = [[_rank(routes) for routes in layers] for layers in steps]
        self._step = 0

    def begin_step(self, step: int) -> None:
        assert step >= 0, f"steps are numbered from 0, got {step}"
        self._step = step

    def observe(self, layer: int, routes: Routes) -> None:
        """Nothing to learn: the trace already holds the truth."""

    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        assert k >= 0, f"cannot predict a negative number of experts ({k})"
        if self._step >= len(self._ranked) or not 0 <= layer < len(self._ranked[self._step]):
            return []
        return self._ranked[self._step][layer][:k]

    @property
    def trace_steps(self) -> int:
        """How many steps the trace holds (0 before ``warm_up``)."""
        return len(self._ranked)


def _rank(routes: Routes) -> list[int]:
    """The experts of ``routes``, most selected first, ties to the lower expert id."""
    uses = expert_counts(route_array(routes))
    return top_k(uses, len(uses))
