"""``klotski-tier run`` reads the machine profile of ``klotski-tier bench`` and compares its reads with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from klotski_tier.cli.main import main
from klotski_tier.core.bench.profile import MachineProfile, default_profile_path, find_profile
from tests.conftest import CheckpointFactory

PROFILE = Path(__file__).parent.parent / "data" / "machine-profile.json"  # a real bench profile
STREAMING_BUDGET = "40KiB"  # a fraction of the tiny model: experts stream from disk


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's cache (and its profile)."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["run", "--prompt-ids", "1,2,3", "--max-new-tokens", "2", *args])
    return result.exit_code, result.stdout, result.stderr


def test_find_profile_uses_the_default_only_when_bench_wrote_it(tmp_path: Path) -> None:
    assert find_profile(None) is None
    default_profile_path().parent.mkdir(parents=True)
    default_profile_path().write_text(PROFILE.read_text())
    assert find_profile(None) == MachineProfile.load(PROFILE)


def test_run_compares_its_disk_reads_with_the_profile(checkpoint_factory: CheckpointFactory) -> None:
    model = checkpoint_factory("mixtral")
    code, out, err = run(
        "--model", str(model), "--device-memory", STREAMING_BUDGET, "--profile", str(PROFILE), "--json"
    )
    assert code == 0, err
    drive = json.loads(out)["drive"]
    profile = MachineProfile.load(PROFILE)
    assert drive["raw_gbps"] == profile.drive.raw_gbps
    assert drive["bytes_read"] > 0
    assert drive["raw_seconds"] == pytest.approx(drive["bytes_read"] / (profile.drive.raw_gbps * 1e9))


def test_the_table_names_the_drive_or_says_how_to_measure_it(checkpoint_factory: CheckpointFactory) -> None:
    model = str(checkpoint_factory("mixtral"))
    code, out, _ = run("--model", model, "--profile", str(PROFILE))
    assert code == 0
    assert f"raw {MachineProfile.load(PROFILE).drive.raw_gbps:.2f} GB/s" in out
    code, out, _ = run("--model", model)
    assert code == 0
    assert "run `klotski-tier bench`" in out


def test_a_missing_profile_is_one_line(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    code, _, err = run(
        "--model", str(checkpoint_factory("mixtral")), "--profile", str(tmp_path / "none.json")
    )
    assert code == 1
    assert "cannot read machine profile" in err and "klotski-tier bench" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
