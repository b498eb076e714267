"""``klotski-tier plan``: the chosen plan with its deadlines, times and memory, JSON for tools, a tight
case explained in words, models from shapes, checkpoints and shape files, and one-line errors.

No test sees the user's machine profile: "this" machine is ``tests/data/machine-profile.json``
(through ``--profile``) or the hardware is a synthetic TOML entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from klotski_tier.cli.main import main
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.routing_trace import RoutingRecorder, TraceMeta
from klotski_tier.core.plan.shapes import model_shape, shape_to_toml
from klotski_tier.core.units import MIB
from tests.conftest import CheckpointFactory

PROFILE = Path(__file__).parent.parent / "data" / "machine-profile.json"  # a real bench profile
HARDWARE_TOML = """
[hardware.test-box]
base = "rtx3090-sata"
source = "a synthetic test machine"

[hardware.slow-box]
base = "rtx3090-sata"
source = "a synthetic machine with a slow drive, little device and host memory"
device_memory_bytes = "30MiB"
host_memory_bytes = "32MiB"
disk_read_gbps = 0.05
"""
DEMO_BUDGET_TEXT = "128.00 MiB"  # run's demo device budget, which plan uses for the default model
RTX3090_MEMORY = 24576 * MIB  # test-box's device memory (its base's)
TIGHT_ARGS = (
    "--hardware",
    "slow-box",
    "--prompts",
    "64",
    "--device-memory",
    "30MiB",
    "--kv-home",
    "device",
)  # a slow drive, little memory (the KV cache kept on the device: its memory caps the group)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's cache (and its profile)."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def hardware_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hardware") / "hardware.toml"
    path.write_text(HARDWARE_TOML, encoding="utf-8")
    return path


def plan(*args: str) -> Result:
    return CliRunner().invoke(main, ["plan", *args])


def plan_ok(*args: str) -> str:
    result = plan(*args)
    assert result.exit_code == 0, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    return result.stdout


def plan_json(*args: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(plan_ok(*args, "--json"))
    return record


def test_the_plan_shows_choice_deadlines_times_memory_and_why() -> None:
    lines = plan_ok("--profile", str(PROFILE)).splitlines()
    text = "\n".join(lines)
    assert lines[0].startswith("plan for demo on this (cpu)")
    assert any(line.startswith("chosen: n=") and "bs=" in line and "K=" in line for line in lines)
    for number in (4, 5, 6, 7):
        assert sum(line.startswith(f"({number}) ") for line in lines) == 1
    assert sum("binds" in line for line in lines if line.startswith("(")) == 1
    step = next(line for line in lines if line.startswith("predicted decode step"))
    assert "compute" in step and "inter-layer bubble" in step and "intra-layer bubble" in step
    assert "predicted throughput: prefill" in text and "decode tokens/s" in text
    device = next(line for line in lines if line.startswith("device "))
    assert device.count(DEMO_BUDGET_TEXT) >= 1  # the demo's budget, as `run` gives it
    assert any(line.startswith("host ") for line in lines)
    assert any(line.startswith("why: ") for line in lines)


def test_json_holds_every_deadline_with_its_two_sides(hardware_file: Path) -> None:
    record = plan_json("--hardware-file", str(hardware_file), "--hardware", "test-box")
    assert record["model"] == "demo" and record["machine"] == "test-box"
    assert record["workload"] == {"sequences": 8, "prompt_tokens": 32, "new_tokens": 32}
    deadlines = record["deadlines"]
    assert [d["number"] for d in deadlines] == [4, 5, 6, 7]
    for d in deadlines:
        assert d["slack_s"] == pytest.approx(d["compute_s"] - d["io_s"])
        assert d["met"] == (d["slack_s"] >= -1e-9)
    assert record["binding"]["slack_s"] == pytest.approx(min(d["slack_s"] for d in deadlines))
    assert record["batches"] >= 1 and record["batch_size"] >= 1
    assert [tier["tier"] for tier in record["memory"]] == ["device", "host"]
    assert record["decode"]["tokens_per_s"] > 0 and record["prefill"]["tokens_per_s"] > 0


def test_a_tight_case_names_the_binding_deadline_and_what_would_relax_it(hardware_file: Path) -> None:
    out = plan_ok("--hardware-file", str(hardware_file), *TIGHT_ARGS)
    binding = next(line for line in out.splitlines() if line.startswith("binding: ("))
    assert "fails" in binding and "the device waits" in binding
    assert "MISSED, binds" in out
    advice = out.split("what would relax it:")[1]
    for words in ("more device memory", "more host memory", "compression", "faster drive"):
        assert words in advice
    record = plan_json("--hardware-file", str(hardware_file), *TIGHT_ARGS)
    assert not record["feasible"] and record["binding"]["slack_s"] < 0
    assert f"missed by {-record['binding']['slack_s'] * 1e3:.2f} ms" in record["why"]


def test_fixed_n_bs_and_k_are_kept(hardware_file: Path) -> None:
    record = plan_json(
        "--hardware-file", str(hardware_file), "--hardware", "test-box",
        "--batches", "3", "--batch-size", "2", "--hot-experts", "1", "--prompts", "6",
    )  # fmt: skip
    assert (record["batches"], record["batch_size"], record["hot_experts"]) == (3, 2, 1)
    assert record["workload"]["sequences"] == 6


def test_a_checkpoint_directory_is_planned_from_its_config(checkpoint_factory: CheckpointFactory) -> None:
    model = checkpoint_factory("mixtral")
    record = plan_json("--model", str(model), "--profile", str(PROFILE), "--prompts", "3")
    assert record["model"] == str(model)
    assert record["batch_size"] <= 3  # a batch holds at most the 3 sequences
    assert record["memory"][0]["budget_bytes"] > 0


def test_a_shape_from_a_shapes_file(tmp_path: Path, hardware_file: Path) -> None:
    shapes = tmp_path / "shapes.toml"
    shapes.write_text(shape_to_toml("my-moe", model_shape("demo"), source="a test"), encoding="utf-8")
    record = plan_json(
        "--shapes", str(shapes), "--model-shape", "MY-MOE",
        "--hardware-file", str(hardware_file), "--hardware", "test-box",
    )  # fmt: skip
    assert record["model"] == "MY-MOE"
    assert record["memory"][0]["budget_bytes"] == RTX3090_MEMORY  # the machine's, not the demo's budget


def write_trace(path: Path, spec: ModelSpec, tokens: int = 16) -> Path:
    recorder = RoutingRecorder(TraceMeta.of(spec))
    rng = np.random.default_rng(0)
    recorder.begin_step()
    for layer in range(spec.num_layers):
        routes = [
            rng.choice(spec.num_experts, size=spec.top_k, replace=False).tolist() for _ in range(tokens)
        ]
        recorder.record(layer, routes)
    recorder.trace().save(path)
    return path


def test_a_routing_trace_feeds_the_routing_statistics(tmp_path: Path, hardware_file: Path) -> None:
    trace = write_trace(tmp_path / "routes.npz", model_shape("demo"))
    common = ("--hardware-file", str(hardware_file), *TIGHT_ARGS, "--trace", str(trace))
    assert plan_json(*common)["decode"]["tokens_per_s"] > 0
    other = write_trace(tmp_path / "other.npz", model_shape("OLMoE-1B-7B"))
    result = plan("--hardware-file", str(hardware_file), "--hardware", "test-box", "--trace", str(other))
    assert result.exit_code == 1 and "recorded from another model" in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model-shape", "gpt-5-moe", "--hardware", "t4"], ["unknown model shape", "Mixtral-8x7B", "demo"]),
        (["--hardware", "rtx9090"], ["unknown hardware", "rtx3090-sata", "this"]),
        ([], ["no machine profile", "klotski-tier bench"]),
        (["--hardware", "t4", "--device-memory", "1MiB"], ["below the minimum", "raise the device memory"]),
    ],
)
def test_errors_are_one_line(args: list[str], words: list[str]) -> None:
    result = plan(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for word in words:
        assert word in result.stderr
