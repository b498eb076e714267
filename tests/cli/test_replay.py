"""``klotski-tier replay FILE``: a table or JSON per (prefetch, eviction) pair, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from klotski_tier.cli.main import main
from klotski_tier.cli.replay import COLUMNS
from klotski_tier.core.observe.routing_trace import RoutingTrace, TraceMeta
from klotski_tier.policies.registry import PREFETCH_POLICIES
from tests.cli.hostile import usage_line

EXPERT_BYTES = 1024
LAYERS, EXPERTS, TOP_K = 2, 4, 2
STEPS = 6  # decode steps of 3 tokens
TWO_EXPERTS = "2KiB"


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    """A trace whose tokens pick experts 0 and 1 of layer 0 and experts 2 and 3 of layer 1."""
    meta = TraceMeta("mixtral", LAYERS, EXPERTS, TOP_K, 8, EXPERT_BYTES)
    step = np.array([[[0, 1]] * 3, [[2, 3]] * 3], dtype=np.int16)  # [L, T, k]
    path = tmp_path / "routes.npz"
    RoutingTrace(meta, (step,) * STEPS).save(path)
    return path


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["replay", *args])


def fails(result: Result, phrase: str) -> None:
    assert result.exit_code == 1, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.stderr
    assert result.stdout == ""


def test_table_has_one_row_per_pair(trace_file: Path) -> None:
    result = invoke(
        str(trace_file), "--device-memory", TWO_EXPERTS, "--prefetch", "none", "--prefetch", "hot-first",
        "--eviction", "lru", "--eviction", "fifo",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "mixtral, 2 layers x 4 experts, top-2; 6 steps, 18 tokens" in lines[0]
    assert "holds 2 of 8 experts" in lines[0]
    assert lines[2].split("  ")[0] == COLUMNS[0] and "bytes moved" in lines[2]
    rows = [line.split() for line in lines[3:]]
    assert [row[:2] for row in rows] == [
        ["none", "lru"],
        ["none", "fifo"],
        ["hot-first", "lru"],
        ["hot-first", "fifo"],
    ]
    # two slots for four experts used every step: none loads 2 experts per layer per step
    assert rows[0][2:5] == ["0.0%", "0.0%", "0.0%"] and rows[0][-1] == str(STEPS * 4)


def test_json_carries_every_result(trace_file: Path) -> None:
    result = invoke(str(trace_file), "--device-memory", "1MiB", "--prefetch", "hot-first", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["trace"]["steps"] == STEPS and record["device_memory_bytes"] == 1 << 20
    (only,) = record["results"]
    assert (only["prefetch"], only["eviction"], only["hot_experts"]) == ("hot-first", "lru", TOP_K)
    assert only["loads"] == 4 and only["bytes_moved"] == 4 * EXPERT_BYTES  # room for all: each once
    assert only["hit_rate"] == (STEPS - 1) / STEPS and len(only["per_layer"]) == LAYERS


def test_default_is_every_prefetch_policy_with_lru(trace_file: Path) -> None:
    result = invoke(str(trace_file), "--device-memory", TWO_EXPERTS, "--json")
    assert result.exit_code == 0, result.output
    pairs = [(r["prefetch"], r["eviction"]) for r in json.loads(result.stdout)["results"]]
    assert pairs == [(name, "lru") for name in PREFETCH_POLICIES.names()]


def test_hot_experts_option_sets_k(trace_file: Path) -> None:
    result = invoke(
        str(trace_file), "--device-memory", "1MiB", "--prefetch", "oracle", "--hot-experts", "1", "--json"
    )
    assert result.exit_code == 0, result.output
    (only,) = json.loads(result.stdout)["results"]
    assert only["hot_experts"] == 1 and only["precision"] == 1.0


def test_missing_file(tmp_path: Path) -> None:
    fails(invoke(str(tmp_path / "nope.npz"), "--device-memory", "1GiB"), "does not exist")


def test_not_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("hello\n")
    fails(invoke(str(path), "--device-memory", "1GiB"), "is not a klotski routing trace")


def test_bad_size(trace_file: Path) -> None:
    line = usage_line(invoke(str(trace_file), "--device-memory", "lots"), "--device-memory")
    assert "'lots' is not a size" in line


def test_too_small_for_one_expert(trace_file: Path) -> None:
    fails(invoke(str(trace_file), "--device-memory", "1000"), "holds no expert")


def test_unknown_policy_lists_the_valid_ones(trace_file: Path) -> None:
    line = usage_line(
        invoke(str(trace_file), "--device-memory", "1GiB", "--eviction", "random"), "--eviction"
    )
    assert "unknown eviction policy 'random'; valid names: fifo" in line


def test_device_memory_is_required(trace_file: Path) -> None:
    result = invoke(str(trace_file))
    assert result.exit_code == 2 and "--device-memory" in result.stderr


@pytest.mark.parametrize("memory", ["8KiB", "999PB"])
def test_device_memory_for_every_expert_holds_all_of_them(trace_file: Path, memory: str) -> None:
    result = invoke(str(trace_file), "--device-memory", memory, "--prefetch", "none")
    assert result.exit_code == 0, result.output
    assert f"holds all {LAYERS * EXPERTS} experts" in result.stdout.splitlines()[0]
