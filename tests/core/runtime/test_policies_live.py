"""Policies in a live run: every combination gives the same tokens, and the statistics differ
as they should (``none`` recalls nothing, ``oracle`` is always right); routing traces, learned
state and third-party plugins chosen from a config file."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.runtime.presets import build_options
from klotski_tier.policies.registry import EVICTION_POLICIES, PREFETCH_POLICIES
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [40, 41, 42, 43, 44], [50, 51]]
NEW_TOKENS = 5
BUILT_IN_PREFETCH = ["none", "hot-first", "correlation", "oracle"]
BUILT_IN_EVICTION = ["lru", "lfu", "hot-first", "fifo"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2_moe", num_layers=3, num_experts=8)


@pytest.fixture(scope="module")
def recorded(model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[list[int]], Path]:
    """Reference tokens and the routing trace of the same workload (the oracle's truth)."""
    result = Engine.load(model, options(model)).generate(
        PROMPTS, max_new_tokens=NEW_TOKENS, record_routing=True
    )
    assert result.routing is not None
    path = tmp_path_factory.mktemp("trace") / "routing.npz"
    result.routing.save(path)
    return [o.token_ids for o in result.outputs], path


def options(model: Path, **fields: object) -> EngineOptions:
    probe = Engine.load(model, EngineOptions(batches=2, batch_size=2))
    budget = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)[0] + 4 * probe.spec.expert_bytes
    return EngineOptions(batches=2, batch_size=2, device_memory_bytes=budget, **fields)  # type: ignore[arg-type]


def test_the_registries_hold_the_built_in_policies() -> None:
    assert set(BUILT_IN_PREFETCH) <= set(PREFETCH_POLICIES.names())
    assert set(BUILT_IN_EVICTION) <= set(EVICTION_POLICIES.names())


@pytest.mark.parametrize("eviction", BUILT_IN_EVICTION)
@pytest.mark.parametrize("prefetch", BUILT_IN_PREFETCH)
def test_every_policy_combination_generates_the_same_tokens(
    model: Path, recorded: tuple[list[list[int]], Path], prefetch: str, eviction: str
) -> None:
    tokens, trace = recorded
    chosen = options(
        model, prefetch=prefetch, eviction=eviction, prefetch_trace=trace if prefetch == "oracle" else None
    )
    result = Engine.load(model, chosen).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [o.token_ids for o in result.outputs] == tokens
    metrics = result.metrics
    if prefetch == "none":
        assert metrics.prefetch_recall == 0.0 and sum(s.predicted for s in metrics.layers) == 0
    if prefetch == "oracle":
        assert metrics.prefetch_precision == 1.0
        assert metrics.prefetch_recall > 0.3  # K = top-k experts per layer cannot cover a whole prefill


def test_oracle_without_a_trace_is_refused(model: Path) -> None:
    with pytest.raises(ConfigError, match="prefetch policy 'oracle' needs a routing trace"):
        Engine.load(model, options(model, prefetch="oracle"))


def test_a_trace_from_another_model_is_refused(
    recorded: tuple[list[list[int]], Path], tmp_path: Path
) -> None:
    other = make_checkpoint(tmp_path / "other", "mixtral", num_layers=2, num_experts=4)
    with pytest.raises(ConfigError, match="recorded from another model"):
        Engine.load(other, EngineOptions(prefetch="correlation", prefetch_trace=recorded[1]))


def test_recorded_trace_has_every_step_layer_and_token(recorded: tuple[list[list[int]], Path]) -> None:
    trace = RoutingTrace.load(recorded[1])
    groups = -(-len(PROMPTS) // 4)  # batch groups of n * bs = 4 sequences
    assert len(trace.steps) == groups * NEW_TOKENS  # one prefill and NEW_TOKENS - 1 decode steps each
    first = trace.steps[0]
    assert first.shape == (3, sum(len(p) for p in PROMPTS[:4]), trace.meta.top_k)  # prefill tokens of group 1


def test_correlation_learns_saves_and_restores_its_table(
    model: Path, recorded: tuple[list[list[int]], Path], tmp_path: Path
) -> None:
    saved = tmp_path / "table.json"
    first = Engine.load(
        model, options(model, prefetch="correlation", prefetch_trace=recorded[1], prefetch_save_state=saved)
    )
    first.generate(PROMPTS[:2], max_new_tokens=2)
    document = json.loads(saved.read_text())
    assert document["policy"] == "correlation" and document["state"]
    restored = Engine.load(model, options(model, prefetch="correlation", prefetch_state=saved))
    assert restored.prefetch.state() == first.prefetch.state()
    with pytest.raises(ConfigError, match="was saved by policy 'correlation', not 'hot-first'"):
        Engine.load(model, options(model, prefetch="hot-first", prefetch_state=saved))


PLUGIN = '''
from klotski_tier.policies.prefetch import PrefetchPolicy


class EverythingPrefetch(PrefetchPolicy):
    """Predicts experts 0..k-1 of every layer, whatever happened."""

    name = "everything"

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def observe(self, layer, routes):
        pass

    def predict(self, layer, k, previous_routes=None):
        return list(range(self.offset, self.offset + k))
'''


def test_a_third_party_policy_is_selected_from_a_config_file(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package installed beside klotski-tier adds a prefetch policy through its entry point."""
    site = tmp_path / "site"
    (site / "everything_policy.py").parent.mkdir(parents=True)
    (site / "everything_policy.py").write_text(PLUGIN)
    dist = site / "everything_policy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: everything-policy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[klotski_tier.prefetch]\neverything = everything_policy:EverythingPrefetch\n"
    )
    monkeypatch.syspath_prepend(str(site))
    # the registry reads entry points again, into copies restored after the test
    monkeypatch.setattr(PREFETCH_POLICIES, "_entry_points_read", False)
    monkeypatch.setattr(PREFETCH_POLICIES, "_paths", dict(PREFETCH_POLICIES._paths))
    monkeypatch.setattr(PREFETCH_POLICIES, "_loaded", dict(PREFETCH_POLICIES._loaded))
    config = tmp_path / "klotski.toml"
    config.write_text(
        textwrap.dedent("""
        [prefetch]
        policy = "everything"
        options = { offset = 1 }
    """)
    )
    engine = Engine.load(model, build_options(config_file=config))
    assert type(engine.prefetch).__name__ == "EverythingPrefetch" and engine.prefetch.predict(0, 2) == [1, 2]
    result = engine.generate(PROMPTS[:2], max_new_tokens=3)
    assert sum(s.predicted for s in result.metrics.layers) > 0
