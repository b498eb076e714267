"""Hot-first prefetch: the experts selected most often so far in a layer are loaded first.

Per layer, the policy counts how many times each expert was selected (one count per token
per selection). ``predict`` returns the ``k`` most counted experts, ties going to the lower
expert id so the answer is deterministic. A layer never observed predicts nothing.
"""

from __future__ import annotations

from collections import Counter

from klotski_tier.policies.prefetch import PrefetchPolicy, Routes


class HotFirstPrefetch(PrefetchPolicy):
    """Predicts the top-``k`` experts of a layer by selection count."""

    name = "hot-first"

    def __init__(self) -> None:
        self._counts: dict[int, Counter[int]] = {}  # layer -> expert id -> selections

    def observe(self, layer: int, routes: Routes) -> None:
        counts = self._counts.setdefault(layer, Counter())
        for token_experts in routes:
            counts.update(token_experts)

    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        assert k >= 0, f"cannot predict a negative number of experts ({k})"
        counts = self._counts.get(layer)
        if not counts:
            return []
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return [expert for expert, _ in ranked[:k]]

    def count(self, layer: int, expert: int) -> int:
        """How many times ``expert`` of ``layer`` was selected so far."""
        return self._counts.get(layer, Counter())[expert]
