"""The prefetch policy contract: which experts of a layer to load before the gate asks for them.

A prefetch policy watches routing decisions and predicts the *hot* experts of a layer, the
ones the pipeline loads ahead of time (the Klotski K). Like every policy it is pure: plain
ints in, plain ints out, no torch, no asyncio, no I/O.

Lifecycle: after each layer's gate phase the pipeline calls ``observe(layer, routes)`` with,
per token, the experts that token selected; before a layer's attention phase it calls
``predict(layer, k, previous_routes)`` and prefetches the experts returned, in order.
``previous_routes`` are the current tokens' routes in ``layer - 1`` (None for the first layer
or when unknown), for policies that correlate consecutive layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

Routes = Sequence[Sequence[int]]
"""Per token, the expert ids it selected in one layer: ``routes[token] == [e0, e1, ...]``."""


class PrefetchPolicy(ABC):
    """Observes routing decisions and names the experts to load next."""

    name: ClassVar[str]

    @abstractmethod
    def observe(self, layer: int, routes: Routes) -> None:
        """Record that each token selected ``routes[token]`` in ``layer``."""

    @abstractmethod
    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        """Up to ``k`` distinct expert ids of ``layer`` expected hot, most likely first."""


class NoPrefetch(PrefetchPolicy):
    """Prefetches nothing: every expert is loaded on demand once the gate selects it."""

    name = "none"

    def observe(self, layer: int, routes: Routes) -> None:
        """Nothing to learn."""

    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        assert k >= 0, f"cannot predict a negative number of experts ({k})"
        return []
