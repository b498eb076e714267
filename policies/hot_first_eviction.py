"""Hot-first eviction: each layer's most selected experts stay resident while there is room.

MoE routing is skewed: in Mixtral-8x7B two of a layer's eight experts take about half of its
selections. This policy counts uses per (layer, expert), an insert or an access each counting
one, and remembers the counts after a block leaves, so an expert that comes back is known to
be hot. In each layer the ``keep_per_layer`` experts with the most uses (ties to the lower
expert id) are *hot*.

Victims come in two groups: first every key that is not a hot expert, least recently used
first; then the hot experts, fewest uses first (ties least recently used first). So hot
experts leave only when nothing else can make room.

Keys stay opaque: a key is an expert if it has int attributes ``layer`` and ``expert`` with
``expert >= 0`` (as :class:`~klotski_tier.core.model.blocks.BlockId` has); any other key (ints,
strings, attention or gate blocks) is never hot and ages in plain LRU order.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator

from klotski_tier.policies.eviction import EvictionPolicy, K
from klotski_tier.policies.tables import check_count

OWNER = "eviction policy 'hot-first'"
DEFAULT_KEEP_PER_LAYER = 2  # Mixtral's router top-k: the two experts that take most of a layer

Expert = tuple[int, int]  # (layer, expert id)


def expert_of(key: object) -> Expert | None:
    """``(layer, expert)`` if ``key`` names an expert, else None."""
    layer: object = getattr(key, "layer", None)
    expert: object = getattr(key, "expert", None)
    if isinstance(layer, int) and isinstance(expert, int) and not isinstance(expert, bool) and expert >= 0:
        return int(layer), int(expert)
    return None


class HotFirstEviction(EvictionPolicy[K]):
    """Evicts everything but each layer's top experts first (LRU), then the top experts by uses."""

    name = "hot-first"

    def __init__(self, keep_per_layer: int = DEFAULT_KEEP_PER_LAYER) -> None:
        self.keep_per_layer = check_count(OWNER, "keep_per_layer", keep_per_layer, 0)
        self._order: OrderedDict[K, Expert | None] = OrderedDict()  # least recently used first
        self._uses: Counter[Expert] = Counter()  # kept across stays

    def on_insert(self, key: K, nbytes: int) -> None:
        assert key not in self._order, f"{self.name}: {key} inserted twice without on_remove in between"
        assert nbytes >= 0, f"{self.name}: {key} inserted with a negative size ({nbytes} bytes)"
        self._order[key] = expert_of(key)
        self._use(key)

    def on_access(self, key: K) -> None:
        assert key in self._order, f"{self.name}: access to {key}, which is not resident"
        self._order.move_to_end(key)
        self._use(key)

    def on_remove(self, key: K) -> None:
        assert key in self._order, f"{self.name}: removal of {key}, which is not resident"
        del self._order[key]

    def victims(self) -> Iterator[K]:
        hot = self.hot_experts()
        cold = [key for key, expert in self._order.items() if expert not in hot]
        kept = [key for key, expert in self._order.items() if expert in hot]
        kept.sort(key=lambda key: self._uses[self._order[key] or (-1, -1)])  # stable: ties stay LRU
        for key in cold + kept:
            if key in self._order:
                yield key

    def hot_experts(self) -> set[Expert]:
        """Per layer with a tracked expert, its ``keep_per_layer`` most used experts."""
        layers = {expert[0] for expert in self._order.values() if expert is not None}
        by_layer: dict[int, list[Expert]] = {layer: [] for layer in layers}
        for expert in self._uses:
            if expert[0] in by_layer:
                by_layer[expert[0]].append(expert)
        hot: set[Expert] = set()
        for experts in by_layer.values():
            experts.sort(key=lambda e: (-self._uses[e], e[1]))
            hot.update(experts[: self.keep_per_layer])
        return hot

    def uses(self, layer: int, expert: int) -> int:
        """How often expert ``expert`` of ``layer`` was inserted or accessed so far."""
        return self._uses[(layer, expert)]

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def _use(self, key: K) -> None:
        expert = self._order[key]
        if expert is not None:
            self._uses[expert] += 1
