"""What a run shows about itself: the Chrome trace of a real run, per-layer statistics and
bubbles in the JSON, and bad configuration on the command line as one-line errors."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from klotski_tier import Engine, EngineOptions
from klotski_tier.cli.main import main
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [40, 41, 42, 43, 44]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", num_layers=3, num_experts=6)


def test_the_chrome_trace_of_a_run_has_its_tracks_and_no_overlap(model: Path, tmp_path: Path) -> None:
    probe = Engine.load(model, EngineOptions(batches=2, batch_size=2))
    budget = probe.minimum_budgets(PROMPTS, max_new_tokens=4)[0] + 3 * probe.spec.expert_bytes
    engine = Engine.load(model, EngineOptions(batches=2, batch_size=2, device_memory_bytes=budget))
    result = engine.generate(PROMPTS, max_new_tokens=4, timeline=True)
    assert result.timeline is not None
    path = tmp_path / "run.json"
    result.timeline.save(path)
    document = json.loads(path.read_text())
    names = {e["tid"]: e["args"]["name"] for e in document["traceEvents"] if e["name"] == "thread_name"}
    tracks = set(names.values())
    assert {"compute", "copy host→device", "bubbles"} <= tracks
    assert any(track.startswith("disk") for track in tracks)
    spans: dict[int, list[tuple[int, int]]] = {}
    for event in document["traceEvents"]:
        if event["ph"] == "X":
            spans.setdefault(event["tid"], []).append((event["ts"], event["ts"] + event["dur"]))
    for tid, intervals in spans.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, f"events overlap on track {names[tid]!r}"
    compute = [e for e in document["traceEvents"] if e["ph"] == "X" and names[e["tid"]] == "compute"]
    assert any("expert" in e["name"] for e in compute) and any("attention" in e["name"] for e in compute)
    steps = [e["name"] for e in document["traceEvents"] if e["ph"] == "X" and names[e["tid"]] == "steps"]
    assert steps == ["prefill", "decode 2", "decode 3", "decode 4"]  # one span per forward step
    drive = document["otherData"]["summary"]["drive_busy_share"]
    assert set(drive) == {"prefill", "decode"} and all(0 <= share <= 1 for share in drive.values())
    assert drive["prefill"] > 0  # the first step reads every block it uses from the drive


def test_json_carries_layers_waits_and_bubbles(model: Path) -> None:
    args = ["run", "--model", str(model), "--prompt-ids", "1,2,3", "--prompt-ids", "4,5"]
    result = CliRunner().invoke(main, [*args, "--max-new-tokens", "3", "--device-memory", "80KiB", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)["metrics"]
    assert len(metrics["layers"]) == 3
    assert {"activated", "hits", "predicted", "precision", "recall"} <= set(metrics["layers"][0])
    assert set(metrics["bubbles_s"]) == {"inter_layer", "intra_layer"}
    assert metrics["wait_by_kind_s"] and 0 <= metrics["prefetch_recall"] <= 1


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[prefetch]\npolicy = "psychic"\n', "unknown prefetch policy 'psychic'"),
        ("[device]\nmemory = -1\n", "device.memory must not be negative"),
        ("[pipeline]\nbatchs = 2\n", "unknown key pipeline.batchs"),
        ("[pipeline]\nhot_experts = 9\n", "hot_experts K=9 exceeds the model's 6 experts"),
    ],
)
def test_bad_config_is_a_one_line_error(model: Path, tmp_path: Path, toml: str, message: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    args = ["run", "--model", str(model), "--prompt-ids", "1,2", "--config", str(config)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output


def test_config_show_prints_the_effective_configuration(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[pipeline]\nbatches = 3\n")
    result = CliRunner().invoke(
        main, ["config", "show", "--preset", "ram-rich", "--config", str(config), "-n", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "batches = 5" in result.stdout and "preload = true" in result.stdout
    assert 'policy = "correlation"' in result.stdout


@pytest.mark.parametrize(("flag", "shown"), [("all", 'hot_experts = "all"'), ("3", "hot_experts = 3")])
def test_hot_experts_flag_takes_a_count_or_all(flag: str, shown: str) -> None:
    result = CliRunner().invoke(main, ["config", "show", "--hot-experts", flag])
    assert result.exit_code == 0, result.output
    assert shown in result.stdout


@pytest.mark.parametrize("flag", ["many", "-1"])
def test_hot_experts_flag_refuses_anything_else(flag: str) -> None:
    result = CliRunner().invoke(main, ["config", "show", "--hot-experts", flag])
    assert result.exit_code == 2
    assert "neither a count of experts" in result.output and "Traceback" not in result.output
