"""`run` inside a memory limit: with only --device-memory given, the host budget comes from the limit
and the run completes in a real cgroup smaller than the model; a limit below the minimum working set
is one line, before any weight loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmarks.e2e.cgroup import MemoryGroup, cgroups_usable, group_name
from klotski_tier.cli import run as run_command
from klotski_tier.cli.main import main
from klotski_tier.core.memory import MemoryLimit
from klotski_tier.core.units import MIB
from tests.checkpoints import make_checkpoint
from tests.conftest import CheckpointFactory

LIMIT_BYTES = 700 * MIB  # holds the runtime, its reserve and a few blocks; not the 816 MiB model


def test_a_limit_below_the_minimum_is_one_line_before_loading(
    checkpoint_factory: CheckpointFactory, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    tight = MemoryLimit(300 * MIB, 150 * MIB, "cgroup v2", Path("/sys/fs/cgroup/app/memory.max"))
    monkeypatch.setattr(run_command, "read_memory_limit", lambda: tight)
    output = tmp_path / "out.jsonl"
    args = [
        "run",
        "--model",
        str(checkpoint_factory("mixtral")),
        "--prompt-ids",
        "1,2",
        "--output",
        str(output),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    message = result.stderr.strip()
    assert "\n" not in message and "cgroup v2 limit 300.00 MiB (/sys/fs/cgroup/app/memory.max)" in message
    assert "below the minimum working set" in message and "raise the memory limit" in message
    assert not output.exists()


def test_config_show_says_what_auto_budgets_come_from() -> None:
    result = CliRunner().invoke(main, ["config", "show", "--device-memory", "1GiB"])
    assert result.exit_code == 0
    assert 'memory = "1GiB"' in result.stdout and 'memory = "auto"' in result.stdout
    assert '"auto" budgets are derived when a run starts from' in result.stdout


@pytest.mark.skipif(not cgroups_usable(), reason="needs root and a writable cgroup v1 memory controller")
def test_only_a_device_budget_in_a_cgroup_smaller_than_the_model_completes(tmp_path: Path) -> None:
    model = make_checkpoint(
        tmp_path / "model", "mixtral", dtype=torch.bfloat16, num_layers=8, num_experts=8,
        hidden_size=1024, intermediate_size=2048,
    )  # fmt: skip
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert model_bytes > LIMIT_BYTES
    group = MemoryGroup.create(group_name("run-limit"), LIMIT_BYTES)
    try:
        argv = [sys.executable, "-c", "from klotski_tier.cli.main import main; main()",
                "run", "--model", str(model), "--plan", "off", "--prompt-ids", "1,2,3",
                "--prompt-ids", "4,5", "--max-new-tokens", "3",
                "--device-memory", "64MiB", "--json"]  # fmt: skip
        env = {**os.environ, "KLOTSKI_TIER_CACHE": str(tmp_path / "cache")}
        done = subprocess.run(group.wrap(argv), capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        assert group.oom_kills() == 0 and group.peak_bytes() <= LIMIT_BYTES
    finally:
        group.remove()
    record = json.loads(done.stdout)
    budgets = record["plan"]["budgets"]
    assert (budgets["device_source"], budgets["host_source"]) == ("yours", "derived")
    assert budgets["limit_kind"] == "cgroup v1" and budgets["limit_bytes"] == LIMIT_BYTES
    assert (
        0
        < budgets["host_bytes"]
        <= LIMIT_BYTES - budgets["in_use_bytes"] - budgets["reserve_bytes"] - 64 * MIB
    ), budgets  # in use at start has been 152 MiB; one full-suite run derived no host budget
    assert record["metrics"]["tiers"]["host"]["peak_bytes"] <= budgets["host_bytes"]
    assert all(len(out["token_ids"]) == 3 for out in record["outputs"])
