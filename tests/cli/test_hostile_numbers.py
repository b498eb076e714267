"""Absurd numbers through the commands (counts, sizes, ratios, lengths, a profile's figures) and a drive
that refuses the KV cache: each is one ``error:`` line that names what is wrong and what to do, nothing
on stdout, no traceback, before any planning or generation starts. A malformed value on the command
line is a usage mistake (exit code 2, the option and its help named: :mod:`klotski_tier.cli.params`);
what a command finds wrong once it knows the model or machine exits with 1."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from klotski_tier.cli.main import main
from klotski_tier.tiers import scratch
from tests.cli.hostile import error_line, usage_line
from tests.conftest import CheckpointFactory

IDS = ["--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
PROFILE = Path(__file__).parent.parent / "data" / "machine-profile.json"  # a real bench profile
HUGE = str(2**64 + 1)
SHAPE = ["--model-shape", "demo", "--hardware", "t4"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's cache (and its profile)."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral", dtype=torch.bfloat16)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.mark.parametrize("command", ["plan", "simulate"])
@pytest.mark.parametrize("ratio", ["1e-308", "0.1", "1e6"])
def test_a_compression_ratio_out_of_range_is_refused_alike_by_plan_and_simulate(
    command: str, ratio: str
) -> None:
    extra = ["-n", "1"] if command == "simulate" else []
    line = usage_line(invoke(command, *SHAPE, *extra, "--compression-ratio", ratio), "--compression-ratio")
    assert f"{float(ratio):g} is not a compressed store's ratio" in line
    assert "give one in 0.5..100, e.g. 1.3 for zstd over bf16 weights" in line


@pytest.mark.parametrize(
    ("args", "option", "phrase"),
    [
        (["plan", *SHAPE, "--batch-size", HUGE], "--batch-size", f"{HUGE} is not in the range 1<=x<=65536"),
        (["plan", *SHAPE, "-n", "100000"], "--batches", "100000 is not in the range 1<=x<=4096"),
        (["simulate", *SHAPE, "-n", "100000"], "--batches", "100000 is not in the range 1<=x<=4096"),
        (["simulate", *SHAPE, "--sweep", "1,5000"], "--sweep", "5000 in '1,5000' is not in 1..4096"),
    ],
)  # fmt: skip
def test_absurd_counts_are_usage_errors_before_planning(args: list[str], option: str, phrase: str) -> None:
    assert phrase in usage_line(invoke(*args), option)


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_more_kv_device_layers_than_the_model_has_are_refused(command: str) -> None:
    """The planner once clamped --kv-device-layers 999 to the demo's 7 silently."""
    extra = ["-n", "1"] if command == "simulate" else []
    line = error_line(invoke(command, *SHAPE, *extra, "--kv-home", "host", "--kv-device-layers", "999"))
    assert "--kv-device-layers 999 keeps every one of the model's 8 layers' cache on the device" in line


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_absurd_sequences_are_refused_before_planning(command: str) -> None:
    line = usage_line(invoke(command, *SHAPE, "--prompts", HUGE), "--prompts")
    assert f"{HUGE} is not in the range 1<=x<=268435456" in line


@pytest.mark.parametrize(
    ("args", "needed"),
    [(["plan", "--prompt-tokens", HUGE], 2**64 + 1 + 32),
     (["simulate", "--prompt-tokens", "100000000", "-n", "1"], 100000032),
     (["plan", "--prompt-tokens", "2000", "--max-new-tokens", "49"], 2049)],
)  # fmt: skip
def test_sequences_beyond_the_models_context_say_so(args: list[str], needed: int) -> None:
    line = error_line(invoke(args[0], *SHAPE, *args[1:]))
    assert f"needs {needed} positions but the model's context is 2048" in line
    assert line.endswith("lower --prompt-tokens or --max-new-tokens")


@pytest.mark.parametrize(
    ("args", "option", "phrase"),
    [
        (["-n", HUGE], "--batches", f"{HUGE} is not in the range 1<=x<=4096"),
        (["-n", "100000", "--batch-size", "100000"], "--batches", "100000 is not in the range 1<=x<=4096"),
        (["--batch-size", "100000"], "--batch-size", "100000 is not in the range 1<=x<=65536"),
        (["--device-memory", HUGE], "--device-memory", "'18446744073709551617' is more than 1 EiB"),
        (["--host-memory", "2EiB"], "--host-memory", "'2EiB' is more than 1 EiB, the largest size accepted"),
        (["--prompt-ids", "1,,2"], "--prompt-ids", "'1,,2' has an empty item (number 2)"),
    ],
)  # fmt: skip
def test_run_refuses_absurd_numbers_before_loading(
    model: Path, args: list[str], option: str, phrase: str
) -> None:
    assert phrase in usage_line(invoke("run", "--model", model, *IDS, *args), option)


NOT_UTF8 = b"\xff\xfe bad".decode("utf-8", "surrogateescape")  # as Python receives such an argument


@pytest.mark.parametrize(
    ("args", "option", "phrase"),
    [
        (["run", "--device-memory", "nan"], "--device-memory", "'nan' is not a size"),
        (["run", "--device-memory", "inf"], "--device-memory", "'inf' is not a size"),
        (["run", "--device-memory", "-1"], "--device-memory", "'-1' is not a size"),
        (["run", "--device-memory", ""], "--device-memory", "'' is not a size"),
        (["run", "--device-memory", "2EiB"], "--device-memory", "more than 1 EiB"),
        (["run", "--batches", str(10**20)], "--batches", "is not in the range 1<=x<=4096"),
        (["run", "--prompt-ids", ""], "--prompt-ids", "'' holds no token id"),
        (["run", "--prompt-ids", "１,2"], "--prompt-ids", "not a comma-separated list of token ids"),
        (["run", "--prompt", NOT_UTF8], "--prompt", "the prompt is not UTF-8 text (from character 1)"),
        (["run", "--output", ""], "--output", "the path is empty"),
        (["run", "--model", ""], "--model", "the path is empty"),
        (["run", "--temperature", "０.５"], "--temperature", "write it in ASCII digits"),
        (["run", "--hot-experts", "２"], "--hot-experts", "neither a count of experts"),
        (["run", "--max-new-tokens", "１"], "--max-new-tokens", "'１' is not a whole number"),
        (["run", "--prefetch", "bogus"], "--prefetch", "unknown prefetch policy 'bogus'; valid names: "),
        (["config", "show", "--eviction", "bogus"], "--eviction", "unknown eviction policy 'bogus'"),
        (["replay", "x.npz", "--device-memory", "1G", "--prefetch", "no"], "--prefetch", "unknown prefetch"),
        (["run", "--device", "bogus"], "--device", "cannot parse device 'bogus'"),
        (["run", "--device", "mps"], "--device", "device type 'mps' is not supported"),
        (["run", "--seed", "３"], "--seed", "write it in ASCII digits"),
        (["simulate", *SHAPE, "--decode-steps", "２"], "--decode-steps", "write it in ASCII digits"),
        (["pack", "a", "b", "--compress", "zstd:３"], "--compress", "zstd level '３' in 'zstd:３'"),
        (["simulate", *SHAPE, "--sweep", ",,"], "--sweep", "',,' has an empty item"),
        (["simulate", *SHAPE, "--sweep", "1,２"], "--sweep", "'２' in '1,２' is not a whole number"),
        (["plan", *SHAPE, "--compression-ratio", "1e308"], "--compression-ratio", "not a compressed store's"),
        (["plan", *SHAPE, "--device-memory", "lots"], "--device-memory", "'lots' is not a size"),
        (["plan", "--profile", ""], "--profile", "the path is empty"),
        (["bench", "--file-size", "0B"], "--file-size", "'0B' is less than 1 B"),
        (["replay", "x.npz", "--device-memory", "9XB"], "--device-memory", "'9XB' is not a size"),
        (["verify", ""], "STORE", "the path is empty"),
        (["plan", "--model", "x", *SHAPE], None, "give --model DIR or --model-shape NAME, not both"),
        (["simulate", "--model", "x", *SHAPE, "-n", "1"], None, "--model-shape NAME, not both"),
    ],
)  # fmt: skip
def test_every_malformed_value_is_a_usage_error_before_any_work(
    args: list[str], option: str | None, phrase: str, tmp_path: Path
) -> None:
    """Exit code 2 and the help to read, before the demo is built or anything is read."""
    assert phrase in usage_line(invoke(*args), option)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("depth", [HUGE, "100000", "0"])
def test_a_disk_queue_depth_out_of_range_names_the_key(model: Path, tmp_path: Path, depth: str) -> None:
    config = tmp_path / "qd.toml"
    config.write_text(f"[disk]\nqueue_depth = {depth}\n")
    line = error_line(invoke("run", "--model", model, *IDS, "--config", config))
    assert f"{config}: disk.queue_depth must be an integer in 1..1024" in line
    assert "memory" not in line


@pytest.mark.parametrize("size", ["1PiB", "999PB", "1EiB"])
def test_sizes_in_petabytes_and_exabytes_are_sizes(size: str) -> None:
    result = invoke("plan", *SHAPE, "--device-memory", size)
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("value", [1e308, 0.0, -1.0, "inf", "nan"])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_profile_with_implausible_compute_figures_says_run_bench_again(
    model: Path, tmp_path: Path, command: str, value: float | str
) -> None:
    data = json.loads(PROFILE.read_text())
    data["compute"]["expert_s"] = {tokens: float(value) for tokens in data["compute"]["expert_s"]}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    args = ["--model", model, *IDS] if command == "run" else []
    line = error_line(invoke(command, *args, "--profile", path))
    assert f"machine profile {path}: field compute.expert_s." in line and "klotski-tier bench" in line


def kv_on_drive(model: Path, tmp_path: Path) -> Result:
    config = tmp_path / "kv.toml"
    config.write_text('[kv]\nhome = "disk"\n')
    return invoke("run", "--model", model, *IDS, "--config", config)


def test_a_full_drive_under_the_kv_cache_says_what_to_do_and_leaves_no_directory(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(scratch.os, "pwrite", full)
    line = error_line(kv_on_drive(model, tmp_path))
    assert "No space left on device; free space on that drive" in line
    assert line.endswith(
        'point KLOTSKI_TIER_CACHE at a directory on another drive, or set [kv] home = "host"'
    )
    assert not (tmp_path / "cache" / "kv-scratch").exists()


def test_a_kv_cache_directory_the_drive_refuses_says_what_to_do(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(**_: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(scratch.tempfile, "mkdtemp", read_only)
    line = error_line(kv_on_drive(model, tmp_path))
    assert "cannot make a scratch directory in" in line and "Read-only file system; free space" in line
    assert line.endswith('or set [kv] home = "host"')
    assert not (tmp_path / "cache" / "kv-scratch").exists()


@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_profile_drive_of_1e308_gbps_is_refused_naming_the_field(
    model: Path, tmp_path: Path, command: str
) -> None:
    data = json.loads(PROFILE.read_text())
    data["drive"]["best"]["gbps"] = 1e308
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    args = ["--model", model, *IDS] if command == "run" else []
    line = error_line(invoke(command, *args, "--profile", path))
    assert (
        f"machine profile {path}: field drive.best.gbps is 1e+308 GB/s, not a plausible measurement" in line
    )


def test_a_hardware_file_device_of_999_petabytes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hw.toml"
    path.write_text('[hardware.big]\nbase = "t4"\ndevice_memory_bytes = "999PB"\n')
    line = error_line(invoke("simulate", "--model-shape", "demo", "-n", "1", "--hardware-file", path,
                             "--hardware", "big"))  # fmt: skip
    assert "[hardware.big] device_memory_bytes = '999PB' is 887.29 PiB, not a plausible figure" in line
    assert line.endswith("(0 B <= x <= 1.00 PiB); fix the file")
