"""``klotski-tier bench`` on tiny settings: the tables, the best-configuration line, the profile
file, ``--json``, ``--keep-file``, and one-line errors for paths and options it cannot use."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from klotski_tier.cli.bench import bench
from klotski_tier.core.bench.profile import PROFILE_FILE_NAME, MachineProfile
from klotski_tier.core.bench.suite import TEST_FILE_NAME
from klotski_tier.core.store import pack as store_pack
from klotski_tier.core.store.codec import ZSTD_DEFAULT_LEVEL
from klotski_tier.core.units import format_size
from tests.cli.paused import start_paused
from tests.conftest import CheckpointFactory

TINY = [
    "--quick",
    "--file-size",
    "8MiB",
    "--block-sizes",
    "2MiB",
    "--queue-depths",
    "2",
    "--tokens",
    "1,4",
    "--rounds",
    "1",
    "--sample-size",
    "1MiB",
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(cache))
    return cache


def run_bench(*args: str) -> Result:
    return CliRunner().invoke(bench, [*TINY, *args])


def fails(result: Result, phrase: str) -> None:
    assert result.exit_code == 1, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("error: ") and phrase in lines[-1], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_bench_prints_the_tables_and_writes_the_profile(tmp_path: Path) -> None:
    profile_path = tmp_path / "profile.json"
    result = run_bench("--path", str(tmp_path), "--profile", str(profile_path))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for phrase in (
        "raw O_DIRECT sequential read",
        "Engine reads",
        "best: ",
        f"zstd level {ZSTD_DEFAULT_LEVEL}",
        "Compute on",
    ):
        assert phrase in out
    assert out.count("\ndirect ") == 1 and out.count("\nbuffered ") == 1  # one row per configuration
    profile = MachineProfile.load(profile_path)
    best = profile.drive.best
    assert f"{best.gbps:.2f} GB/s cold = {best.fraction:.0%} of the raw drive" in out
    assert str(profile_path) in out
    assert "reads, round 1/1: direct, 2.00 MiB x 2" in result.stderr  # progress on stderr
    assert not (tmp_path / TEST_FILE_NAME).exists()


def test_json_prints_the_profile_and_defaults_go_to_the_cache(tmp_path: Path, own_cache: Path) -> None:
    result = run_bench("--json", "--keep-file")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    saved = own_cache / PROFILE_FILE_NAME
    assert printed == json.loads(saved.read_text())
    assert printed["drive"]["path"] == str(own_cache)
    assert (own_cache / TEST_FILE_NAME).stat().st_size == 8 * 1024 * 1024


def test_an_unwritable_path_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    fails(run_bench("--path", str(blocker / "sub"), "--profile", str(tmp_path / "p.json")), "--path")


def test_an_unwritable_profile_is_refused_before_any_work(tmp_path: Path) -> None:
    result = run_bench("--path", str(tmp_path), "--profile", str(tmp_path / "missing" / "p.json"))
    fails(result, "--profile")
    assert not (tmp_path / TEST_FILE_NAME).exists()


@pytest.mark.parametrize(
    ("args", "phrase"),
    [(["--block-sizes", "1000"], "multiples of 4096"), (["--model", "no-such-dir"], "no-such-dir")],
)
def test_bad_options_are_one_line(tmp_path: Path, args: list[str], phrase: str) -> None:
    fails(run_bench("--path", str(tmp_path), "--profile", str(tmp_path / "p.json"), *args), phrase)


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (
            ["--queue-depths", "two"],
            "Invalid value for '--queue-depths': 'two' in 'two' is not a whole number",
        ),
        (["--queue-depths", "1,,4"], "'1,,4' has an empty item"),
        (["--queue-depths", "2000"], "2000 in '2000' is not in 1..1024"),
        (["--tokens", "0"], "0 in '0' is not in >= 1"),
        (["--file-size", "lots"], "Invalid value for '--file-size': 'lots' is not a size"),
        (["--file-size", "0B"], "'0B' is less than 1 B"),
        (["--block-sizes", "1MiB,x"], "Invalid value for '--block-sizes': 'x' is not a size"),
        (["--sample-size", "2EiB"], "'2EiB' is more than 1 EiB"),
    ],
)
def test_malformed_values_are_usage_errors_before_any_work(
    tmp_path: Path, args: list[str], phrase: str
) -> None:
    result = run_bench("--path", str(tmp_path), "--profile", str(tmp_path / "p.json"), *args)
    assert result.exit_code == 2 and phrase in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_test_file_smaller_than_a_block_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    result = run_bench("--path", str(tmp_path), "--profile", str(profile), "--file-size", "1MiB")
    fails(result, "test file of 1.00 MiB is smaller than its largest block of 2.00 MiB")
    assert list(tmp_path.iterdir()) == []


def bench_argv(directory: Path, profile: Path) -> list[str]:
    return ["bench", *TINY, "--path", str(directory), "--profile", str(profile)]


def test_two_benches_on_one_path_each_have_their_own_test_file(tmp_path: Path) -> None:
    """One bench is paused while its test file is in place; another runs on the same directory from
    start to end; the first then finishes its own measurements."""
    drive = tmp_path / "drive"
    first = start_paused("klotski_tier.core.bench.suite", "measure_reads", bench_argv(drive, tmp_path / "a"))
    first.wait_for_pause()
    second = run_bench("--path", str(drive), "--profile", str(tmp_path / "b"))
    assert second.exit_code == 0, second.stderr
    code, stderr = first.resume()
    assert code == 0, stderr
    assert list(drive.iterdir()) == []
    MachineProfile.load(tmp_path / "a")


def test_sigterm_removes_the_test_file(tmp_path: Path) -> None:
    drive = tmp_path / "drive"
    paused = start_paused("klotski_tier.core.bench.suite", "measure_reads", bench_argv(drive, tmp_path / "p"))
    paused.wait_for_pause()
    assert len(list(drive.iterdir())) == 1  # its test file, written
    code, stderr = paused.signal(signal.SIGTERM)
    assert code == 143 and stderr.splitlines()[-1] == "error: interrupted by SIGTERM", stderr
    assert list(drive.iterdir()) == [] and not (tmp_path / "p").exists()


def test_the_kept_test_file_is_an_output_checked_before_any_work(tmp_path: Path) -> None:
    """--keep-file writes the test file as TEST_FILE_NAME in --path: no other output may share it, and it
    must be writable, before anything is measured."""
    kept = tmp_path / TEST_FILE_NAME
    result = run_bench("--path", str(tmp_path), "--keep-file", "--profile", str(kept))
    fails(result, f"--profile and --keep-file are the same file {kept}; name two files")
    assert list(tmp_path.iterdir()) == []
    kept.mkdir()
    result = run_bench("--path", str(tmp_path), "--keep-file", "--profile", str(tmp_path / "p.json"))
    fails(result, f"--keep-file would replace {kept}, which is not a regular file")
    assert list(tmp_path.iterdir()) == [kept]


def test_a_kept_test_file_that_is_a_link_is_refused_and_stays_a_link(tmp_path: Path) -> None:
    """The bench once renamed its test file over such a link, turning it into a 64 MiB file."""
    drive, elsewhere = tmp_path / "drive", tmp_path / "mine.bin"
    drive.mkdir()
    elsewhere.write_text("the user's own")
    (drive / TEST_FILE_NAME).symlink_to(elsewhere)
    result = run_bench("--path", str(drive), "--keep-file", "--profile", str(tmp_path / "p.json"))
    fails(result, f"--keep-file would replace {drive / TEST_FILE_NAME}, which is not a regular file")
    assert (drive / TEST_FILE_NAME).is_symlink() and elsewhere.read_text() == "the user's own"


def test_a_test_file_the_drive_has_no_room_for_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = run_bench("--path", str(tmp_path), "--profile", str(tmp_path / "p.json"), "--file-size", "999PB")
    fails(result, f"the bench's test file of {format_size(999 * 10**15)} does not fit in {tmp_path}")
    assert "free; pass a --file-size of at most that, or --path a directory with more room" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_model_says_a_packed_store_is_not_a_checkpoint(
    checkpoint_factory: CheckpointFactory, tmp_path: Path
) -> None:
    store = store_pack.pack(checkpoint_factory("mixtral"), tmp_path / "store").path
    result = run_bench("--path", str(tmp_path), "--profile", str(tmp_path / "p.json"), "--model", str(store))
    fails(result, f"{store} is a packed store, not a Hugging Face checkpoint; bench --model times a Hugging")
    assert "checkpoint's weights: give the one the store was packed from" in result.stderr
    assert list(tmp_path.iterdir()) == [store]
