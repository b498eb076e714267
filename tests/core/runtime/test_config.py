"""Configuration: TOML files, presets, layering with flags, and one-line errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from klotski_tier import Engine
from klotski_tier.core.errors import BudgetError, ConfigError
from klotski_tier.core.runtime.config import COUNT_RANGES, EngineOptions, read_config_file, to_toml
from klotski_tier.core.runtime.presets import PRESETS, build_options
from tests.checkpoints import make_checkpoint

FULL = """
[pipeline]
batches = 3
batch_size = 5
hot_experts = 1
lookahead_layers = 3
stream_window = 5

[device]
memory = "64MiB"
type = "cpu"

[host]
memory = "unlimited"
preload = true

[disk]
driver = "disk"
queue_depth = 6

[prefetch]
policy = "correlation"
trace = "warm.npz"
options = { decay = 0.9 }

[eviction]
policy = "lfu"
options = { decay = 0.5 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "klotski.toml"
    path.write_text(text)
    return path


def test_every_key_of_a_file_lands_in_the_options(tmp_path: Path) -> None:
    options = build_options(config_file=write(tmp_path, FULL))
    assert (options.batches, options.batch_size, options.hot_experts) == (3, 5, 1)
    assert options.lookahead_layers == 3 and options.stream_window == 5
    assert options.device_memory_bytes == 64 * 2**20 and options.device == "cpu"
    assert options.host_memory_bytes is None and options.host_preload is True
    assert options.disk_queue_depth == 6 and options.disk_driver == "disk"
    assert options.prefetch == "correlation" and dict(options.prefetch_options) == {"decay": 0.9}
    assert options.prefetch_trace == tmp_path / "warm.npz", "paths are relative to the config file"
    assert options.eviction == "lfu" and dict(options.eviction_options) == {"decay": 0.5}


def test_flags_override_the_file_which_overrides_the_preset(tmp_path: Path) -> None:
    path = write(tmp_path, '[host]\nmemory = "2GiB"\n[pipeline]\nbatches = 7\n')
    options = build_options(preset="nvme-only", config_file=path, overrides={"batches": 9, "prefetch": None})
    assert options.batches == 9, "a flag wins"
    assert options.host_memory_bytes == 2 * 2**30, "the file wins over the preset"
    assert options.disk_queue_depth == 8 and options.prefetch == "correlation", "the preset fills the rest"


def test_shown_configuration_reads_back_to_the_same_options(tmp_path: Path) -> None:
    options = build_options(config_file=write(tmp_path, FULL))
    again = read_config_file(write(tmp_path, to_toml(options)))
    assert EngineOptions(**again) == options


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_configurations(name: str) -> None:
    options = build_options(preset=name)
    baselines = {"sequential": "none", "flexgen": "whole-layer", "ondemand-lru": "none"}
    assert options.prefetch == baselines.get(name, "correlation")
    assert options.host_preload is (name == "ram-rich")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[pipeline]\nbatchs = 2\n", "unknown key pipeline.batchs; valid keys in \\[pipeline\\]: batches"),
        ("[gpu]\nmemory = 1\n", "unknown section \\[gpu\\]; valid sections: pipeline"),
        ('[device]\nmemory = "-5GiB"\n', "device.memory '-5GiB' is not a size"),
        ("[device]\nmemory = -5\n", "device.memory must not be negative, got -5"),
        ('[pipeline]\nbatches = "four"\n', "pipeline.batches must be an integer in 1..4096, got 'four'"),
        ("[pipeline]\nbatches = 0\n", "pipeline.batches must be an integer in 1..4096, got 0"),
        ("[pipeline]\nlookahead_layers = 0\n", "pipeline.lookahead_layers must be an integer >= 1, got 0"),
        ("[pipeline]\nstream_window = -1\n", "pipeline.stream_window must be an integer >= 0, got -1"),
        ("[disk]\nqueue_depth = 100000\n", "disk.queue_depth must be an integer in 1..1024, got 100000"),
        ("[disk]\nqueue_depth = 18446744073709551617\n", "disk.queue_depth must be an integer in 1..1024"),
        ("[pipeline]\nbatch_size = 65537\n", "pipeline.batch_size must be an integer in 1..65536, got 65537"),
        ('[host]\npreload = "yes"\n', "host.preload must be true or false"),
        ('[prefetch]\noptions = "fast"\n', "prefetch.options must be a table"),
        ("[pipeline\n", "is not valid TOML"),
    ],
)
def test_bad_values_name_the_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        build_options(config_file=path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("field", sorted(COUNT_RANGES))
def test_every_whole_number_option_is_held_to_its_range(field: str) -> None:
    low, high = COUNT_RANGES[field]
    EngineOptions(**{field: low})
    for bad in (low - 1, True, 2.0, *([high + 1, 2**64 + 1] if high is not None else [])):
        with pytest.raises(ConfigError, match=f"^{field} must be an integer ") as info:
            EngineOptions(**{field: bad})
        assert "\n" not in str(info.value) and len(str(info.value)) < 120


def test_missing_file_and_unknown_preset(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        build_options(config_file=tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="unknown preset 'gpu-rich'; valid presets: nvme-only, ram-rich"):
        build_options(preset="gpu-rich")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", num_experts=4)


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"hot_experts": 5}, ConfigError, "hot_experts K=5 exceeds the model's 4 experts per layer"),
        ({"prefetch": "psychic"}, ConfigError, "unknown prefetch policy 'psychic'; valid names: correlation"),
        ({"eviction": "random"}, ConfigError, "unknown eviction policy 'random'; valid names: fifo"),
        ({"eviction": "lru", "eviction_options": {"size": 3}}, ConfigError, "size"),
        ({"prefetch": "oracle"}, ConfigError, "needs a routing trace"),
        ({"disk_driver": "tape"}, ConfigError, "unknown tier driver 'tape'"),
        (
            {"host_preload": True, "host_memory_bytes": 1024},
            BudgetError,
            "host.preload needs the whole model",
        ),
    ],
)
def test_options_that_do_not_fit_the_model_fail_at_load(
    model: Path, fields: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Engine.load(model, EngineOptions(**fields))  # type: ignore[arg-type]
