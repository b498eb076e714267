"""Policy registries: built-ins by name, option checking, duplicates, and a real entry-point plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.registry import Registry
from klotski_tier.policies import registry as policy_registry
from klotski_tier.policies.correlation import CorrelationPrefetch
from klotski_tier.policies.eviction import EvictionPolicy
from klotski_tier.policies.fifo import FIFOEviction
from klotski_tier.policies.hot_first import HotFirstPrefetch
from klotski_tier.policies.hot_first_eviction import HotFirstEviction
from klotski_tier.policies.lfu import LFUEviction
from klotski_tier.policies.lru import LRUEviction
from klotski_tier.policies.oracle import OraclePrefetch
from klotski_tier.policies.prefetch import NoPrefetch
from klotski_tier.policies.registry import (
    EVICTION_POLICIES,
    PREFETCH_POLICIES,
    make_eviction,
    make_prefetch,
)

PLUGIN_MODULE = "fakeplugin_mod"
PLUGIN_SOURCE = '''
from collections.abc import Iterator
from klotski_tier.policies.eviction import EvictionPolicy


class MRUEviction(EvictionPolicy):
    """Most recently used first."""

    name = "mru"

    def __init__(self):
        self._order = []

    def on_insert(self, key, nbytes):
        self._order.append(key)

    def on_access(self, key):
        self._order.remove(key)
        self._order.append(key)

    def on_remove(self, key):
        self._order.remove(key)

    def victims(self) -> Iterator:
        yield from reversed(list(self._order))

    def __len__(self):
        return len(self._order)

    def __contains__(self, key):
        return key in self._order
'''


def test_builtins_are_made_by_name() -> None:
    assert isinstance(make_eviction("lru"), LRUEviction)
    assert isinstance(make_eviction("lfu"), LFUEviction)
    assert isinstance(make_eviction("fifo"), FIFOEviction)
    assert isinstance(make_eviction("hot-first"), HotFirstEviction)
    assert isinstance(make_prefetch("none"), NoPrefetch)
    assert isinstance(make_prefetch("hot-first"), HotFirstPrefetch)
    assert isinstance(make_prefetch("correlation"), CorrelationPrefetch)
    assert isinstance(make_prefetch("oracle"), OraclePrefetch)
    assert make_eviction("lru") is not make_eviction("lru")


def test_options_reach_the_constructor() -> None:
    lfu = make_eviction("lfu", decay=0.25, aging_interval=8)
    assert isinstance(lfu, LFUEviction) and (lfu.decay, lfu.aging_interval) == (0.25, 8)
    correlation = make_prefetch("correlation", smoothing=2, decay=0.9)
    assert isinstance(correlation, CorrelationPrefetch)
    assert (correlation.smoothing, correlation.decay) == (2.0, 0.9)


def test_only_the_oracle_needs_a_trace() -> None:
    needing = [name for name in PREFETCH_POLICIES.names() if PREFETCH_POLICIES.get(name).needs_trace]
    assert needing == ["oracle"]


def test_policies_import_neither_torch_nor_asyncio() -> None:
    """Policies are pure: no tensors, no event loop. numpy they may use (routes arrive as int arrays,
    and a prefill of a large group is hundreds of thousands of tokens to count)."""
    code = (
        "import sys; from klotski_tier.policies.registry import "
        "EVICTION_POLICIES, PREFETCH_POLICIES, make_eviction, make_prefetch; "
        "[make_eviction(n) for n in EVICTION_POLICIES.names()]; "
        "[make_prefetch(n) for n in PREFETCH_POLICIES.names()]; "
        "print(sorted(m for m in ('torch', 'asyncio') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_registries_list_their_names() -> None:
    assert EVICTION_POLICIES.names() == ["fifo", "hot-first", "lfu", "lru", "sweep"]
    assert PREFETCH_POLICIES.names() == ["correlation", "hot-first", "none", "oracle", "whole-layer"]


def test_unknown_name_lists_the_valid_names() -> None:
    with pytest.raises(
        ConfigError, match="unknown eviction policy 'mru'; valid names: fifo, hot-first, lfu, lru"
    ):
        make_eviction("mru")
    with pytest.raises(ConfigError, match="valid names: correlation, hot-first, none, oracle, whole-layer"):
        make_prefetch("klotski")


def test_unknown_option_names_the_option_and_the_policy() -> None:
    with pytest.raises(ConfigError, match="unknown option 'window' for prefetch policy 'hot-first'"):
        make_prefetch("hot-first", window=3)
    with pytest.raises(ConfigError, match="unknown option 'capacity_bytes' for eviction policy 'lru'"):
        make_eviction("lru", capacity_bytes=1)
    with pytest.raises(ConfigError, match="prefetch policy 'correlation'; valid options: decay, smoothing"):
        make_prefetch("correlation", window=3)


def test_duplicate_names_are_refused() -> None:
    fresh: Registry[type[EvictionPolicy[object]]] = Registry(
        "eviction policy", "klotski_tier.eviction", {"lru": "klotski_tier.policies.lru:LRUEviction"}
    )
    fresh.register("lru2", LRUEviction)
    with pytest.raises(ConfigError, match="'lru' is already registered"):
        fresh.register("lru", LRUEviction)
    with pytest.raises(ConfigError, match="'lru2' is already registered"):
        fresh.register("lru2", LRUEviction)
    with pytest.raises(ConfigError, match="already registered"):
        EVICTION_POLICIES.register("lru", LRUEviction)


def test_a_plugin_that_is_not_a_policy_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    fresh: Registry[type[EvictionPolicy[object]]] = Registry("eviction policy", "klotski_tier.eviction", {})
    fresh.register("bogus", dict)  # type: ignore[arg-type]
    monkeypatch.setattr(policy_registry, "EVICTION_POLICIES", fresh)
    with pytest.raises(ConfigError, match="not a EvictionPolicy subclass"):
        make_eviction("bogus")


def _install_fake_plugin(root: Path) -> None:
    (root / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    dist_info = root / "fakeplugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        f"[klotski_tier.eviction]\nmru = {PLUGIN_MODULE}:MRUEviction\n"
    )


def test_third_party_plugin_found_through_a_real_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _install_fake_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)  # import it afresh from tmp_path
    fresh: Registry[type[EvictionPolicy[int]]] = Registry(
        "eviction policy", "klotski_tier.eviction", {"lru": "klotski_tier.policies.lru:LRUEviction"}
    )
    assert fresh.names() == ["lru", "mru"]
    policy = fresh.get("mru")()
    for key in [1, 2, 3]:
        policy.on_insert(key, 1)
    policy.on_access(1)
    assert list(policy.victims()) == [1, 3, 2]
    assert isinstance(policy, EvictionPolicy) and type(policy).__module__ == PLUGIN_MODULE
    sys.modules.pop(PLUGIN_MODULE)
