"""The prefetch policy contract: which experts of a layer to load before the gate asks for them.

A prefetch policy watches routing decisions and predicts the *hot* experts of a layer, the
ones the pipeline loads ahead of time (the Klotski K). Like every policy it is pure: plain
ints in, plain ints out, no torch, no asyncio, no I/O.

Lifecycle, as the engine drives it::

    warm_up(steps)                   once, before a run, from a recorded routing trace (optional)
    load_state(state)                once, before a run, from a saved state (optional)
    per step (prefill or decode) of a batch group, steps numbered 0, 1, 2 ... over the run:
        begin_step(step)
        per layer l, in order:
            predict(l, k, previous_routes)   before l's attention phase: the experts to prefetch
            observe(l, routes)               after l's gate phase: what every token selected
    state()                          after a run, when the user asks to save what was learned

``routes`` hold, per token of all n batches of the group, the experts that token selected (an int
array [N, k] from the engine, lists in tests); policies count them with numpy, so a prefill of a
large group costs a few array operations, not a Python loop per token.
``previous_routes`` are the same tokens' routes in ``layer - 1`` (None for the first layer or
when unknown), for policies that correlate consecutive layers. A policy whose ``needs_trace``
is True (the oracle) is refused by the engine unless a routing trace is given to ``warm_up``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from klotski_tier.core.errors import ConfigError

Routes = Sequence[Sequence[int]] | npt.NDArray[np.int64]
"""Per token, the expert ids it selected in one layer: ``routes[token] == [e0, e1, ...]``; the engine
passes an int array [N, k] (a policy may not assume more than a sequence of rows)."""

StepRoutes = Sequence[Sequence[Routes]]
"""A routing trace: ``steps[step][layer]`` are the routes of that step in that layer."""

PolicyState = dict[str, list[Any]]
"""Learned state as named flat lists of numbers, ready for JSON or ``numpy.savez``."""


class PrefetchPolicy(ABC):
    """Observes routing decisions and names the experts to load next."""

    name: ClassVar[str]
    needs_trace: ClassVar[bool] = False  # True: the engine refuses the policy without a routing trace

    def begin_step(self, step: int) -> None:  # noqa: B027 (a hook: most policies ignore steps)
        """A new forward step (prefill or decode) of the batch group begins."""

    @abstractmethod
    def observe(self, layer: int, routes: Routes) -> None:
        """Record that each token selected ``routes[token]`` in ``layer``."""

    @abstractmethod
    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        """Up to ``k`` distinct expert ids of ``layer`` expected hot, most likely first."""

    def warm_up(self, steps: StepRoutes) -> None:
        """Learn from a recorded trace: each step begins, then each layer's routes are observed."""
        for step, layers in enumerate(steps):
            self.begin_step(step)
            for layer, routes in enumerate(layers):
                self.observe(layer, routes)

    def state(self) -> PolicyState:
        """What the policy learned, as plain lists; empty for a policy that learns nothing."""
        return {}

    def load_state(self, state: Mapping[str, Sequence[Any]]) -> None:
        """Restore what :meth:`state` returned; a policy that learns nothing refuses a non-empty state."""
        if any(len(values) for values in state.values()):
            raise ConfigError(
                f"prefetch policy {self.name!r} keeps no learned state but was given {sorted(state)}; "
                "drop the saved state or choose a policy that learns (correlation, hot-first)"
            )


class NoPrefetch(PrefetchPolicy):
    """Prefetches nothing: every expert is loaded on demand once the gate selects it."""

    name = "none"

    def observe(self, layer: int, routes: Routes) -> None:
        """Nothing to learn."""

    def predict(self, layer: int, k: int, previous_routes: Routes | None = None) -> list[int]:
        assert k >= 0, f"cannot predict a negative number of experts ({k})"
        return []
