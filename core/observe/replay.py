"""Offline policy evaluation: a routing trace replayed through prefetch and eviction policies.

No model runs. A simulated device cache holds routed experts, each ``expert_bytes`` of the
trace, within ``capacity_bytes``; attention, gate, embedding and KV blocks are not simulated,
so the whole budget goes to experts (give the replay what the live run leaves for experts).
Keys are :class:`Key` ``(layer, expert)``, with the fields of an expert ``BlockId``.

For each step ``s``, ``prefetch.begin_step(s)``, then for each layer ``l``::

    predict    the policy names up to K experts of l from the routes of l-1 (None for l = 0)
    prefetch   each predicted expert not resident is loaded (a prefetch load); room is made by
               evicting in the eviction policy's victim order, sparing the experts predicted
               for l; if nothing can go, the rest of the prediction is dropped
    gate       the used set is every expert some token selected in l; a used expert resident
               now is a hit (loaded by this prefetch or still cached) and is accessed, the
               others are demand loads, sparing l's used experts when making room; a demand
               load with no room is streamed through and not kept
    observe    the policy sees the routes of l

Over all (s, l), as the live run's metrics define them: hit rate = hits / used; precision =
predicted experts used / predicted experts (0.0 when the policy predicts nothing); recall =
predicted experts used / used; bytes moved = loads x expert_bytes, prefetch and demand loads
together. A predicted expert counts whether it was loaded now or was still resident. There
are no leases: only the experts of the current layer are spared.
Policies with ``needs_trace`` (the oracle) get ``warm_up(trace.as_steps())`` first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.units import format_size
from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.policies.prefetch import PrefetchPolicy, Routes
from klotski_tier.policies.registry import make_eviction, make_prefetch

logger = logging.getLogger(__name__)


class Key(NamedTuple):
    """A simulated expert block. Like the engine's :class:`~klotski_tier.core.model.blocks.BlockId` it
    has ``layer`` and ``expert`` (policies such as hot-first eviction read them), and as a tuple
    it hashes in C: a replay hashes keys millions of times."""

    layer: int
    expert: int


@dataclass(frozen=True)
class LayerReplay:
    """Counts of one layer summed over every step of the trace."""

    layer: int
    used: int  # experts some token selected, one per (step, expert)
    hits: int  # ... of which resident when the gate asked
    predicted: int  # experts the prefetch policy named hot, one per (step, expert)
    predicted_used: int  # ... of which the gate then selected
    loads: int  # expert loads, prefetch and demand
    prefetch_loads: int  # ... of which loads of a predicted expert ahead of the gate

    @property
    def hit_rate(self) -> float:
        return _ratio(self.hits, self.used)

    @property
    def precision(self) -> float:
        return _ratio(self.predicted_used, self.predicted)

    @property
    def recall(self) -> float:
        return _ratio(self.predicted_used, self.used)

    def to_dict(self) -> dict[str, Any]:
        rates = {"hit_rate": self.hit_rate, "precision": self.precision, "recall": self.recall}
        return {**asdict(self), **rates}


@dataclass(frozen=True)
class ReplayResult:
    """What one (prefetch, eviction) pair would have done on a trace."""

    prefetch: str
    eviction: str
    hit_rate: float  # used experts resident when the gate asked / used experts
    precision: float  # predicted experts that were used / predicted experts
    recall: float  # used experts that were predicted / used experts
    bytes_moved: int  # loads x expert_bytes
    loads: int
    used: int
    per_layer: tuple[LayerReplay, ...]
    expert_bytes: int
    capacity_bytes: int
    hot_experts: int  # K, experts predicted per layer

    @classmethod
    def of(cls, layers: tuple[LayerReplay, ...], **settings: Any) -> ReplayResult:
        used, hits = sum(x.used for x in layers), sum(x.hits for x in layers)
        predicted, useful = sum(x.predicted for x in layers), sum(x.predicted_used for x in layers)
        loads = sum(x.loads for x in layers)
        return cls(
            hit_rate=_ratio(hits, used),
            precision=_ratio(useful, predicted),
            recall=_ratio(useful, used),
            bytes_moved=loads * settings["expert_bytes"],
            loads=loads,
            used=used,
            per_layer=layers,
            **settings,
        )

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["per_layer"] = [layer.to_dict() for layer in self.per_layer]
        return record


def _ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


class _DeviceCache:
    """Resident expert blocks under a slot count, evicted in the policy's victim order."""

    def __init__(self, eviction: EvictionPolicy[Any], slots: int, expert_bytes: int) -> None:
        self.eviction = eviction
        self.slots = slots
        self.expert_bytes = expert_bytes
        self.resident: set[Key] = set()

    def make_room(self, spare: set[Key]) -> bool:
        """Whether one more expert fits, after evicting the first victim not in ``spare`` if needed."""
        if len(self.resident) < self.slots:
            return True
        for victim in self.eviction.victims():
            if victim not in spare:
                self.resident.discard(victim)
                self.eviction.on_remove(victim)
                return True
        return False

    def insert(self, key: Key) -> None:
        self.resident.add(key)
        self.eviction.on_insert(key, self.expert_bytes)


class _LayerCounts:
    """Mutable tallies of one layer while replaying."""

    def __init__(self) -> None:
        self.used = self.hits = self.predicted = self.predicted_used = self.loads = self.prefetch_loads = 0

    def frozen(self, layer: int) -> LayerReplay:
        counts = (self.used, self.hits, self.predicted, self.predicted_used, self.loads, self.prefetch_loads)
        return LayerReplay(layer, *counts)


class _Replayer:
    """Drives one prefetch policy and one device cache through a trace."""

    def __init__(self, trace: RoutingTrace, prefetch: PrefetchPolicy, cache: _DeviceCache, k: int) -> None:
        self.trace = trace
        self.prefetch = prefetch
        self.cache = cache
        self.k = k
        self.counts = [_LayerCounts() for _ in range(trace.meta.num_layers)]
        self.keys = [
            [Key(layer, e) for e in range(trace.meta.num_experts)] for layer in range(trace.meta.num_layers)
        ]

    def run(self) -> tuple[LayerReplay, ...]:
        if self.prefetch.needs_trace:
            self.prefetch.warm_up(self.trace.as_steps())
        for step, routes in enumerate(self.trace.steps):  # routes [L, T, k]
            self.prefetch.begin_step(step)
            used = _used_experts(routes, self.trace.meta.num_experts)  # [L, E]
            previous: Routes | None = None
            for layer in range(self.trace.meta.num_layers):
                previous = self._layer(layer, routes[layer], used[layer], previous)
        return tuple(counts.frozen(layer) for layer, counts in enumerate(self.counts))

    def _layer(self, layer: int, array: np.ndarray, used_mask: np.ndarray, previous: Routes | None) -> Routes:
        """One layer of one step: ``array`` [T, k] the routes, ``used_mask`` [E] the experts used."""
        routes: list[list[int]] = array.tolist()
        used = {self.keys[layer][e] for e in np.flatnonzero(used_mask).tolist()}
        predicted = self._predict(layer, previous)
        self._prefetch(layer, predicted)
        self._demand(layer, used, set(predicted))
        self.prefetch.observe(layer, routes)
        return routes

    def _predict(self, layer: int, previous: Routes | None) -> list[Key]:
        predicted = list(dict.fromkeys(self.prefetch.predict(layer, self.k, previous)))
        experts = self.trace.meta.num_experts
        if len(predicted) > self.k or any(not 0 <= e < experts for e in predicted):
            raise ConfigError(
                f"prefetch policy predicted {predicted} for layer {layer}: more than K={self.k} "
                f"or outside 0..{experts - 1}; fix the policy"
            )
        return [self.keys[layer][e] for e in predicted]

    def _prefetch(self, layer: int, predicted: list[Key]) -> None:
        """Load the predicted experts not resident, most likely first, while room can be made."""
        spare, loads = set(predicted), 0
        for key in predicted:
            if key in self.cache.resident:
                continue
            if not self.cache.make_room(spare):
                break
            self.cache.insert(key)
            loads += 1
        counts = self.counts[layer]
        counts.prefetch_loads += loads
        counts.loads += loads

    def _demand(self, layer: int, used: set[Key], predicted: set[Key]) -> None:
        """Resident used experts are hits; the others are loaded, kept while room can be made."""
        hits = sorted(used & self.cache.resident)
        for key in hits:
            self.cache.eviction.on_access(key)
        misses = sorted(used - self.cache.resident)
        for key in misses:
            if self.cache.make_room(used):
                self.cache.insert(key)
                self.cache.eviction.on_access(key)  # used once loaded, as the engine counts a lease
        counts = self.counts[layer]
        counts.used += len(used)
        counts.hits += len(hits)
        counts.predicted += len(predicted)
        counts.predicted_used += len(used & predicted)
        counts.loads += len(misses)


def _used_experts(routes: np.ndarray, num_experts: int) -> np.ndarray:
    """Per layer, which experts some token selected: bool [L, E] from routes [L, T, k]."""
    layers = routes.shape[0]
    used = np.zeros((layers, num_experts), dtype=bool)  # [L, E]
    used[np.arange(layers)[:, None], routes.reshape(layers, -1)] = True
    return used


def replay(
    trace: RoutingTrace,
    prefetch: PrefetchPolicy,
    eviction: EvictionPolicy[Any],
    *,
    capacity_bytes: int,
    hot_experts: int | None = None,
    prefetch_name: str = "",
    eviction_name: str = "",
) -> ReplayResult:
    """Replay ``trace`` through fresh ``prefetch`` and ``eviction`` policies (see the module docstring)."""
    meta = trace.meta
    k = meta.top_k if hot_experts is None else hot_experts
    _check_settings(trace, capacity_bytes, k)
    cache = _DeviceCache(eviction, capacity_bytes // meta.expert_bytes, meta.expert_bytes)
    layers = _Replayer(trace, prefetch, cache, k).run()
    result = ReplayResult.of(
        layers,
        prefetch=prefetch_name or getattr(prefetch, "name", type(prefetch).__name__),
        eviction=eviction_name or getattr(eviction, "name", type(eviction).__name__),
        expert_bytes=meta.expert_bytes,
        capacity_bytes=capacity_bytes,
        hot_experts=k,
    )
    logger.info(
        "replay %s/%s: hit rate %.3f, precision %.3f, recall %.3f, %s moved",
        result.prefetch,
        result.eviction,
        result.hit_rate,
        result.precision,
        result.recall,
        format_size(result.bytes_moved),
    )
    return result


def replay_by_name(
    trace: RoutingTrace,
    prefetch_names: Iterable[str],
    eviction_names: Iterable[str],
    *,
    capacity_bytes: int,
    hot_experts: int | None = None,
) -> list[ReplayResult]:
    """One replay per (prefetch, eviction) pair, each with new policies from the registries."""
    evictions = list(eviction_names)
    return [
        replay(
            trace,
            make_prefetch(p),
            make_eviction(e),
            capacity_bytes=capacity_bytes,
            hot_experts=hot_experts,
            prefetch_name=p,
            eviction_name=e,
        )
        for p in prefetch_names
        for e in evictions
    ]


def _check_settings(trace: RoutingTrace, capacity_bytes: int, k: int) -> None:
    meta = trace.meta
    if capacity_bytes < meta.expert_bytes:
        raise ConfigError(
            f"device memory {format_size(capacity_bytes)} holds no expert of this trace "
            f"({format_size(meta.expert_bytes)} each); give at least {meta.expert_bytes} bytes"
        )
    if not 0 <= k <= meta.num_experts:
        raise ConfigError(
            f"hot experts K={k} is outside 0..{meta.num_experts}, the experts per layer of this trace"
        )
