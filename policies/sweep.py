"""Sweep eviction: the block whose next use is furthest away goes first, for a pipeline sweeping layers.

Every step of the pipeline walks the layers in order, 0 to L-1, and starts again. When the weights
do not fit, LRU evicts exactly the block needed next (the one used longest ago is the first of the
next sweep), so nothing survives from one step to the next and every block is read every step.
Belady's rule (evict what is needed furthest in the future) is known here without a trace: seen
from the layer being computed, the layers just passed come back last. So this policy keeps a
stable prefix of the sweep resident and streams the rest, which reads ``model - capacity`` bytes
per step instead of the whole model.

The clock is the layer of the last accessed block (a key with int ``layer >= 0``; the engine
calls ``on_access`` each time a computation leases a block). Inserts do not move it: a prefetch
inserts blocks of layers ahead. Ranks, highest evicted first:

- a block of the current layer already used in this pass: ``L`` (done until the next sweep);
- a block of layer ``p != current``: ``(p - current) mod L``, so the next layer is kept longest;
- a block of the current layer not used yet in this pass: 0 (it may be needed now);
- a key without a layer (embedding, head, opaque keys): ``L - current - 0.5``, at the sweep's end.

Ties among blocks of layers go most recently used first: within a layer too, what was used last in
the past sweep comes last in the next (attention, then gate, then experts). Layerless keys tie least
recently used first. ``L`` is one more than the largest layer seen.

Keys are kept per layer in recency order, so :meth:`victims` walks the layers in rank order and
touches only the keys its caller takes: making room for one block costs a few steps, not a sort of
every resident block.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator, Mapping

from klotski_tier.policies.eviction import EvictionPolicy, K

BOUNDARY = 0.5  # a layerless key sits between the last layer and the first of the next sweep


def layer_of(key: object) -> int | None:
    """The layer of ``key`` if it names one (an int attribute ``layer >= 0``), else None."""
    layer: object = getattr(key, "layer", None)
    if isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0:
        return layer
    return None


class SweepEviction(EvictionPolicy[K]):
    """Evicts the block needed furthest ahead in the layer sweep first (see the module docstring)."""

    name = "sweep"
    knows_next_use = True

    def __init__(self) -> None:
        # layer (None: layerless) -> key -> insertion number, least recently used first
        self._by_layer: dict[int | None, OrderedDict[K, int]] = {}
        self._layer_of: dict[K, int | None] = {}
        self._used_in_pass: dict[K, int] = {}  # key -> pass number of its last access
        self._inserts = itertools.count()  # insertion numbers: victims() skips keys inserted after it began
        self._layers = 0  # one more than the largest layer seen
        self._current = -1  # layer of the last accessed layered key; -1 before any
        self._pass = 0  # sweeps begun: the clock going back to a lower layer starts one

    def on_insert(self, key: K, nbytes: int) -> None:
        assert key not in self._layer_of, f"{self.name}: {key} inserted twice without on_remove in between"
        assert nbytes >= 0, f"{self.name}: {key} inserted with a negative size ({nbytes} bytes)"
        layer = layer_of(key)
        self._layer_of[key] = layer
        self._by_layer.setdefault(layer, OrderedDict())[key] = next(self._inserts)
        if layer is not None:
            self._layers = max(self._layers, layer + 1)

    def on_access(self, key: K) -> None:
        assert key in self._layer_of, f"{self.name}: access to {key}, which is not resident"
        layer = self._layer_of[key]
        self._by_layer[layer].move_to_end(key)
        if layer is None:
            return
        if layer < self._current:
            self._pass += 1
        self._current = layer
        self._used_in_pass[key] = self._pass

    def on_remove(self, key: K) -> None:
        assert key in self._layer_of, f"{self.name}: removal of {key}, which is not resident"
        layer = self._layer_of.pop(key)
        del self._by_layer[layer][key]
        self._used_in_pass.pop(key, None)

    def victims(self) -> Iterator[K]:
        last_insert = next(self._inserts)  # keys inserted from now on are not this call's candidates
        for group in self._groups():
            for key in group:
                if key in self._layer_of and self._by_layer[self._layer_of[key]][key] < last_insert:
                    yield key

    def _groups(self) -> Iterator[list[K]]:
        """Candidates in rank order, highest first; each group is a snapshot taken when it is reached."""
        layers, current = self._layers, max(self._current, 0)
        layerless: Mapping[K, int] = self._by_layer.get(None, {})
        if not layers:
            yield list(layerless)
            return
        current_keys = list(reversed(self._by_layer.get(current, {})))  # most recently used first
        yield [key for key in current_keys if self._used_in_pass.get(key) == self._pass]  # rank L
        if current == 0:
            yield list(layerless)  # rank L - 0.5
        for distance in range(layers - 1, 0, -1):  # rank L-1 (the layer before current) down to 1
            layer = (current + distance) % layers
            yield list(reversed(self._by_layer.get(layer, {})))
            if layer == 0:
                yield list(layerless)  # rank L - current - 0.5: just after layer 0
        yield [key for key in current_keys if self._used_in_pass.get(key) != self._pass]  # rank 0

    def evict_for(self, victim: K, incoming: K) -> bool:
        """A prefetch evicts only blocks needed later in the sweep than the one it loads: a block of
        layer ``c + d`` ahead may take the room of what the sweep needs after ``c + d`` (layers already
        passed, the current layer's used blocks, layers further ahead), never that of layers ``c + 1``
        .. ``c + d``. :meth:`victims` yields by rank, highest first, so every later victim is refused too.
        """
        victim_layer, incoming_layer = self._layer_of.get(victim, layer_of(victim)), layer_of(incoming)
        layers = max(
            [self._layers, *(layer + 1 for layer in (victim_layer, incoming_layer) if layer is not None)]
        )
        return self._rank(victim, victim_layer, layers) > self._rank(incoming, incoming_layer, layers)

    def rank(self, key: K, layer: int | None) -> float:
        """How far ahead in the sweep ``key`` is needed next (higher: evicted sooner)."""
        return self._rank(key, layer, self._layers)

    def _rank(self, key: K, layer: int | None, layers: int) -> float:
        current = max(self._current, 0)
        if layer is None:
            return layers - current - BOUNDARY
        if layer != current:
            return float((layer - current) % layers)
        return float(layers) if self._used_in_pass.get(key) == self._pass else 0.0

    def __len__(self) -> int:
        return len(self._layer_of)

    def __contains__(self, key: object) -> bool:
        return key in self._layer_of
