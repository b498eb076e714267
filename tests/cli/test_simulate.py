"""``klotski-tier simulate``: a row per n of a sweep beside the planner's prediction, JSON, the plan's own
n by default, groups that cannot fit left out, the list of shapes and machines, the sweep chart, and
one-line errors. The machines are synthetic TOML entries: no test sees the user's machine profile."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from klotski_tier.cli.main import main
from klotski_tier.core.plan.hardware import HARDWARE
from klotski_tier.core.plan.shapes import MODEL_SHAPES, model_shape, shape_to_toml

HARDWARE_TOML = """
[hardware.test-box]
base = "rtx3090-sata"
source = "a synthetic test machine"
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP = [1, 2, 4]
# the demo shape on a small workload with tight budgets, so that experts stream: a few seconds in all
SMALL = ("--prompt-tokens", "8", "--max-new-tokens", "4", "--decode-steps", "2", "--host-memory", "32MiB")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's cache (and its profile)."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def machine_args(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ...]:
    path = tmp_path_factory.mktemp("hardware") / "hardware.toml"
    path.write_text(HARDWARE_TOML, encoding="utf-8")
    return ("--hardware-file", str(path), "--hardware", "test-box")


def simulate(*args: str) -> Result:
    return CliRunner().invoke(main, ["simulate", *args])


def simulate_ok(*args: str) -> str:
    result = simulate(*args)
    assert result.exit_code == 0, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    return result.stdout


def simulate_json(*args: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(simulate_ok(*args, "--json"))
    return record


@pytest.fixture(scope="module")
def sweep_record(machine_args: tuple[str, ...]) -> dict[str, Any]:
    return simulate_json(*machine_args, *SMALL, "--device-memory", "64MiB", "--sweep", "1,2,4")


def test_a_sweep_gives_one_row_per_n_with_throughput_bubbles_bytes_and_memory(
    sweep_record: dict[str, Any],
) -> None:
    rows = sweep_record["rows"]
    assert [row["batches"] for row in rows] == SWEEP
    assert [row["sequences"] for row in rows] == [4 * n for n in SWEEP]  # one full group of bs=4 each
    for row in rows:
        assert row["batch_size"] == 4 and row["hot_experts"] == model_shape("demo").top_k
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
        assert row["planner_decode_tokens_per_s"] > 0
        assert row["decode"]["inter_layer_s"] + row["decode"]["intra_layer_s"] > 0  # experts stream
        assert row["decode"]["bytes_moved"]["host->device"] > 0
        assert 0 < row["decode"]["peak_device_bytes"] <= sweep_record["device_budget_bytes"]
    assert sweep_record["from_plan"] is False and sweep_record["skipped"] == []


def test_the_table_has_a_row_per_n(machine_args: tuple[str, ...]) -> None:
    lines = simulate_ok(*machine_args, *SMALL, "--device-memory", "64MiB", "--batches", "2").splitlines()
    assert lines[0].startswith("simulated demo on test-box (cuda)")
    header = next(i for i, line in enumerate(lines) if line.startswith("n "))
    assert (
        "decode tok/s" in lines[header] and "planner tok/s" in lines[header] and "peak host" in lines[header]
    )
    assert [line.split()[0] for line in lines[header + 1 :] if line] == ["2"]


def test_without_n_the_plan_is_simulated(machine_args: tuple[str, ...]) -> None:
    record = simulate_json(*machine_args, *SMALL, "--device-memory", "64MiB")
    plan = json.loads(
        CliRunner().invoke(main, ["plan", *machine_args, *SMALL[:4], "--host-memory", "32MiB",
                                  "--device-memory", "64MiB", "--json"]).stdout
    )  # fmt: skip
    assert record["from_plan"] is True
    (row,) = record["rows"]
    assert (row["batches"], row["batch_size"], row["hot_experts"]) == (
        plan["batches"], plan["batch_size"], plan["hot_experts"],
    )  # fmt: skip
    assert row["planner_decode_tokens_per_s"] == pytest.approx(plan["decode"]["tokens_per_s"])


def test_a_group_that_cannot_fit_is_left_out(machine_args: tuple[str, ...]) -> None:
    on_device = ("--device-memory", "16MiB", "--kv-home", "device")
    out = simulate_ok(*machine_args, *SMALL, *on_device, "--sweep", "1,64")
    assert "n=64 not simulated:" in out and "exceed the device budget 16.00 MiB" in out
    result = simulate(*machine_args, *SMALL, *on_device, "--sweep", "64")
    assert result.exit_code == 1 and "no n fits" in result.stderr and "--kv-home host" in result.stderr
    in_ram = simulate_ok(*machine_args, *SMALL, "--device-memory", "16MiB", "--sweep", "1,64")
    assert "not simulated" not in in_ram and "; in host RAM (two device slots) at n=64" in in_ram


def test_list_names_every_shape_and_machine_with_its_source(tmp_path: Path) -> None:
    shapes = tmp_path / "shapes.toml"
    shapes.write_text(shape_to_toml("my-moe", model_shape("demo")), encoding="utf-8")
    out = simulate_ok("--list", "--shapes", str(shapes))
    for name, entry in MODEL_SHAPES.items():
        assert any(line.startswith(name + " ") and entry.source in line for line in out.splitlines())
    assert any(line.startswith("my-moe ") for line in out.splitlines())
    for name, machine in HARDWARE.items():
        assert f"  {name}: {machine.source}" in out
    assert "this / local" in out and "run `klotski-tier bench`" in out  # no profile in this cache


def test_png_draws_the_sweep(machine_args: tuple[str, ...], tmp_path: Path) -> None:
    png = tmp_path / "sweep.png"
    out = simulate_ok(*machine_args, *SMALL, "--device-memory", "64MiB", "--sweep", "1,2", "--png", str(png))
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert f"wrote {png}" in out


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model-shape", "nope"], ["unknown model shape", "Qwen3-30B-A3B"]),
        (["--png", "/no/such/dir/x.png"], ["--png", "does not exist"]),
    ],
)
def test_errors_are_one_line(machine_args: tuple[str, ...], args: list[str], words: list[str]) -> None:
    result = simulate(*machine_args, *args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in result.stderr


@pytest.mark.parametrize("preset", ["sequential", "flexgen", "ondemand-lru"])
def test_a_baseline_preset_simulates_its_own_schedule_without_a_planner_prediction(
    machine_args: tuple[str, ...], sweep_record: dict[str, Any], preset: str
) -> None:
    args = (*machine_args, *SMALL, "--device-memory", "64MiB", "--prompts", "4")
    record = simulate_json(*args, "--preset", preset, "-n", "1")
    (row,) = record["rows"]
    assert row["batches"] == 1 and row["planner_decode_tokens_per_s"] is None
    assert row["decode_tokens_per_s"] > 0
    klotski = simulate_json(*args, "-n", "1")["rows"][0]
    assert klotski["planner_decode_tokens_per_s"] is not None
    assert row["decode_tokens_per_s"] != klotski["decode_tokens_per_s"]  # another schedule, another run
    text = simulate_ok(*args, "--preset", preset, "-n", "1")
    schedule = "sequential schedule" if preset == "sequential" else "prefetch"
    assert schedule in text.splitlines()[0]


def _klotski_workload(tmp_path: Path) -> list[str]:
    """Issue 14's command: Mixtral-8x7B on the Klotski evaluation's RTX 3090 with 256 GiB of RAM, 960
    prompts of 512 tokens, 32 new, bs 64, one decode step simulated."""
    env1 = tmp_path / "env1.toml"
    env1.write_text(
        '[hardware.env1]\nbase = "rtx3090-sata"\nhost_memory_bytes = "256GiB"\n', encoding="utf-8"
    )
    return ["--model-shape", "Mixtral-8x7B", "--hardware-file", str(env1), "--hardware", "env1",
            "--prompts", "960", "--prompt-tokens", "512", "--max-new-tokens", "32", "--batch-size", "64",
            "--decode-steps", "1"]  # fmt: skip


def test_the_klotski_evaluations_group_runs_with_the_kv_cache_in_host_ram(tmp_path: Path) -> None:
    """Issue 14's command: Mixtral-8x7B, 960 prompts of 512 tokens, bs 64, n = 15 on the RTX 3090 with
    256 GiB of RAM: its KV cache (about 80 GiB) cannot sit in 24 GiB of device memory, and in host RAM
    it streams through two slots; more batches decode faster."""
    command = _klotski_workload(tmp_path)
    refused = simulate(*command, "-n", "15", "--kv-home", "device")
    assert refused.exit_code == 1 and "no n fits: at n=15" in refused.stderr
    assert "--kv-home host" in refused.stderr
    out = simulate_ok(*command, "-n", "2", "-n", "15")  # the cache in RAM where the device cannot hold it
    assert "KV cache on the device at n=2; in host RAM (two device slots) at n=15" in out
    rows = simulate_json(*command, "-n", "2", "-n", "15", "--kv-home", "host")["rows"]
    assert [row["batches"] for row in rows] == [2, 15]
    assert rows[1]["decode_tokens_per_s"] > 2 * rows[0]["decode_tokens_per_s"]
    phases = ("prefill", "decode")
    assert all(row[phase]["peak_device_bytes"] <= 24 * 2**30 for row in rows for phase in phases)
    on_host = simulate_ok(*command, "-n", "15", "--kv-attention", "host")  # the cache goes to host RAM
    assert "KV cache in host RAM, decode attention on the host's cores" in on_host


def test_the_plans_kv_placement_is_simulated_and_named(tmp_path: Path) -> None:
    """Issue 14's group from the plan: the cache in host RAM but its first layers', decode attention on
    the host's cores; the heading says so and the rate is the plan's."""
    command = _klotski_workload(tmp_path)
    heading = simulate_ok(*command, "--kv-device-layers", "3").splitlines()[0]
    assert "KV cache in host RAM, decode attention on the host's cores but the first 3 layers'" in heading
    (row,) = simulate_json(*command)["rows"]
    assert row["kv_home"] == "host" and row["kv_attention"] == "host" and row["kv_device_layers"] > 0
    assert row["decode_tokens_per_s"] == pytest.approx(row["planner_decode_tokens_per_s"], rel=0.15)
