"""Eviction and prefetch policies by name: built-ins plus one entry-point group per family.

Third-party packages add policies through the ``klotski_tier.eviction`` and
``klotski_tier.prefetch`` entry-point groups. Config selects a policy by name and passes its
section as keyword arguments; an option the policy does not take is a :class:`ConfigError`.
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.registry import Registry
from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.policies.prefetch import PrefetchPolicy

P = TypeVar("P")

EVICTION_POLICIES: Registry[type[EvictionPolicy[Any]]] = Registry(
    "eviction policy",
    "klotski_tier.eviction",
    {
        "lru": "klotski_tier.policies.lru:LRUEviction",
        "lfu": "klotski_tier.policies.lfu:LFUEviction",
        "hot-first": "klotski_tier.policies.hot_first_eviction:HotFirstEviction",
        "fifo": "klotski_tier.policies.fifo:FIFOEviction",
        "sweep": "klotski_tier.policies.sweep:SweepEviction",
    },
)

PREFETCH_POLICIES: Registry[type[PrefetchPolicy]] = Registry(
    "prefetch policy",
    "klotski_tier.prefetch",
    {
        "none": "klotski_tier.policies.prefetch:NoPrefetch",
        "hot-first": "klotski_tier.policies.hot_first:HotFirstPrefetch",
        "correlation": "klotski_tier.policies.correlation:CorrelationPrefetch",
        "oracle": "klotski_tier.policies.oracle:OraclePrefetch",
        "whole-layer": "klotski_tier.policies.whole_layer:WholeLayerPrefetch",
    },
)


def make_eviction(name: str, **options: Any) -> EvictionPolicy[Any]:
    """A new eviction policy ``name`` built with ``options``."""
    return _make(EVICTION_POLICIES, EvictionPolicy, name, options)


def make_prefetch(name: str, **options: Any) -> PrefetchPolicy:
    """A new prefetch policy ``name`` built with ``options``."""
    return _make(PREFETCH_POLICIES, PrefetchPolicy, name, options)


def _make(registry: Registry[type[P]], base: type[Any], name: str, options: dict[str, Any]) -> P:
    cls = registry.get(name)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(
            f"{registry.family} {name!r} is {cls!r}, not a {base.__name__} subclass; fix the plugin"
        )
    _check_options(cls, registry.family, name, options)
    return cls(**options)


def _check_options(cls: type[Any], family: str, name: str, options: dict[str, Any]) -> None:
    """Refuse options the constructor of ``cls`` does not take, naming the option and the policy."""
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    accepted = sorted(
        p.name for p in parameters.values() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    )
    for option in options:
        if option not in accepted:
            valid = ", ".join(accepted) or "none"
            raise ConfigError(f"unknown option {option!r} for {family} {name!r}; valid options: {valid}")
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for {family} {name!r}: {exc}") from exc
