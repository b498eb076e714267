"""The baselines as configurations of the engine: ``sequential``, ``flexgen`` and
``ondemand-lru`` generate the default engine's tokens while streaming; the sequential schedule
never reads or copies while the compute runs; whole-layer prefetch moves every expert; bad
schedule values are one-line config errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.layouts import total_block_bytes
from klotski_tier.core.observe.timeline import COMPUTE_TRACK, INTRA_LAYER_BUBBLE, Span, Timeline
from klotski_tier.core.runtime.config import read_config_file, replace, to_toml
from klotski_tier.core.runtime.engine import GenerationResult
from klotski_tier.core.runtime.pipeline import expert_waves
from klotski_tier.core.runtime.presets import PRESETS, build_options
from klotski_tier.policies.whole_layer import WholeLayerPrefetch
from tests.conftest import CheckpointFactory

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [40, 41, 42, 43, 44]]
NEW_TOKENS = 3
BATCH_SIZE = 2
STREAMING_EXPERTS = 4  # device room beyond the minimum working set, in experts: far below the model
NUM_LAYERS, NUM_EXPERTS = 2, 8
BASELINES = ["sequential", "flexgen", "ondemand-lru"]
DISK_QUEUE, COPY_TRACK = "disk queue", "copy host→device"


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral", num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS)


def streaming(model: Path, options: EngineOptions) -> EngineOptions:
    """``options`` with a device budget of the minimum working set plus a few experts."""
    probe = Engine.load(model, options)
    minimum = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)[0]
    budget = minimum + STREAMING_EXPERTS * probe.spec.expert_bytes
    return replace(options, device_memory_bytes=budget)


def preset(name: str, **overrides: Any) -> EngineOptions:
    return build_options(preset=name, overrides={"batch_size": BATCH_SIZE, **overrides})


def tokens_of(
    model: Path, options: EngineOptions, **kwargs: bool
) -> tuple[list[list[int]], GenerationResult]:
    result = Engine.load(model, options).generate(PROMPTS, max_new_tokens=NEW_TOKENS, **kwargs)
    return [o.token_ids for o in result.outputs], result


@pytest.fixture(scope="module")
def reference(model: Path) -> list[list[int]]:
    """The default engine's tokens (Klotski schedule, correlation prefetch) under a streaming budget."""
    tokens, _ = tokens_of(model, streaming(model, EngineOptions(batch_size=BATCH_SIZE)))
    return tokens


# ---- presets and config ----------------------------------------------------------------------


def test_presets_set_what_defines_each_baseline() -> None:
    sequential, flexgen, ondemand = (build_options(preset=name) for name in BASELINES)
    assert (sequential.batches, sequential.schedule, sequential.prefetch) == (1, "sequential", "none")
    assert (flexgen.prefetch, flexgen.hot_experts, flexgen.expert_order) == ("whole-layer", "all", "index")
    assert flexgen.schedule == "klotski" and flexgen.batches == EngineOptions().batches, (
        "n is left to the user"
    )
    assert (ondemand.batches, ondemand.prefetch, ondemand.eviction) == (1, "none", "lru")
    assert ondemand.schedule == "klotski" and ondemand.expert_order == "ready-first"
    assert set(BASELINES) <= set(PRESETS)


@pytest.mark.parametrize("name", BASELINES)
def test_a_preset_reads_back_from_its_shown_configuration(name: str, tmp_path: Path) -> None:
    options = build_options(preset=name)
    path = tmp_path / "shown.toml"
    path.write_text(to_toml(options))
    assert EngineOptions(**read_config_file(path)) == options


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[pipeline]\nschedule = "fast"\n',
            "pipeline.schedule must be one of klotski, sequential, got 'fast'",
        ),
        ("[pipeline]\nschedule = 1\n", "pipeline.schedule must be one of klotski, sequential, got 1"),
        (
            '[pipeline]\nexpert_order = "random"\n',
            "pipeline.expert_order must be one of ready-first, index, got 'random'",
        ),
        ('[pipeline]\nhot_experts = "most"\n', 'pipeline.hot_experts must be an integer >= 0 or "all"'),
        ("[pipeline]\nhot_experts = -1\n", 'pipeline.hot_experts must be an integer >= 0 or "all", got -1'),
    ],
)
def test_bad_schedule_values_name_the_file_key_value_and_choices(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "klotski.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        build_options(config_file=path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_bad_schedule_values_in_code_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="schedule must be one of klotski, sequential, got 'lazy'"):
        EngineOptions(schedule="lazy")
    with pytest.raises(ConfigError, match="expert_order must be one of ready-first, index"):
        EngineOptions(expert_order="")
    with pytest.raises(ConfigError, match="hot_experts must be an integer >= 0"):
        EngineOptions(hot_experts="every")  # type: ignore[arg-type]


# ---- same tokens -------------------------------------------------------------------------------

CONFIGURATIONS = [
    pytest.param(lambda: preset("sequential"), id="sequential"),
    pytest.param(lambda: preset("flexgen", batches=3), id="flexgen-n3"),
    pytest.param(lambda: preset("ondemand-lru"), id="ondemand-lru"),
]


@pytest.mark.parametrize("configure", CONFIGURATIONS)
def test_every_baseline_generates_the_default_tokens_while_streaming(
    model: Path, reference: list[list[int]], configure: Any
) -> None:
    options = streaming(model, configure())
    tokens, result = tokens_of(model, options)
    assert tokens == reference
    device = result.metrics.tiers["device"]
    assert device.evictions > 0, "the budget must force streaming"
    assert device.peak_bytes <= (options.device_memory_bytes or 0)


# ---- sequential: no overlap ------------------------------------------------------------------------


def _spans(tracks: dict[str, list[Span]], prefix: str) -> list[Span]:
    return [span for track, spans in tracks.items() if track.startswith(prefix) for span in spans]


def _overlapping(io: list[Span], compute: list[Span]) -> list[tuple[str, str]]:
    return [(i[2], c[2]) for i in io for c in compute if i[0] < c[1] and c[0] < i[1]]


def test_sequential_never_reads_or_copies_while_computing(model: Path, reference: list[list[int]]) -> None:
    tokens, result = tokens_of(model, streaming(model, preset("sequential", batches=2)), timeline=True)
    assert tokens == reference
    assert isinstance(result.timeline, Timeline)
    tracks = result.timeline.layout()
    compute = _spans(tracks, COMPUTE_TRACK)
    io = _spans(tracks, DISK_QUEUE) + _spans(tracks, COPY_TRACK)
    assert compute and len(io) > NUM_LAYERS * NUM_EXPERTS, "every layer streamed its blocks"
    assert _overlapping(io, compute) == []
    metrics = result.metrics
    assert metrics.expert_in_flight == 0 and sum(s.predicted for s in metrics.layers) == 0
    intra = [s for s in tracks["bubbles"] if s[2] == INTRA_LAYER_BUBBLE]
    assert intra, "the budget holds fewer experts than a prefill selects: a layer loads in several waves"


def test_expert_waves_fill_the_room_in_id_order() -> None:
    assert expert_waves([0, 2, 3, 7], [4, 4, 4, 4], room_bytes=8) == [[0, 2], [3, 7]]
    assert expert_waves([1, 5, 6], [4, 4, 4], room_bytes=100) == [[1, 5, 6]]
    assert expert_waves([1, 5], [4, 4], room_bytes=3) == [[1], [5]], "an expert alone always gets a wave"
    assert expert_waves([], [], room_bytes=8) == []


# ---- whole-layer prefetch ------------------------------------------------------------------------


def test_whole_layer_moves_every_expert_and_recalls_all(model: Path, reference: list[list[int]]) -> None:
    """With room for the model, flexgen loads every block once: every expert, used or not."""
    engine = Engine.load(model, replace(preset("flexgen"), host_memory_bytes=64 * 2**20))  # staged in host
    assert isinstance(engine.prefetch, WholeLayerPrefetch)
    for layer in range(NUM_LAYERS):  # as a warm-up trace would: the policy learns the layer shape
        engine.prefetch.observe(layer, [[NUM_EXPERTS - 1]])
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, record_routing=True)
    assert [o.token_ids for o in result.outputs] == reference and result.routing is not None
    total = total_block_bytes(engine.files.layouts)
    metrics = result.metrics
    assert metrics.tiers["device"].bytes_in == total and metrics.tiers["host"].bytes_in == total
    assert metrics.prefetch_recall == 1.0
    steps = len(result.routing.steps)  # forward steps of the batch group
    assert [s.predicted for s in metrics.layers] == [NUM_EXPERTS * steps] * NUM_LAYERS


def test_whole_layer_predicts_known_layers_up_to_k() -> None:
    policy = WholeLayerPrefetch()
    assert policy.predict(0, 4) == [], "nothing known yet"
    policy.observe(0, [[0, 5], [2, 1]])
    assert policy.predict(0, 8) == [0, 1, 2, 3, 4, 5] and policy.predict(0, 2) == [0, 1]
    assert policy.predict(1, 8) == [], "layer 1 was never observed"
    assert policy.predict(1, 8, [[7, 0]]) == list(range(8)), "the previous layer's routes widen E"
    assert policy.num_experts == 6, "predict learns nothing"
