"""Standard output that fails (``> /dev/full``), is closed (``>&-``) or loses its reader (``| head``)
costs no run: every file the command was asked to write is written, then one line says what failed
and what was saved (exit code 1), or, for a reader that left, nothing (exit code 141). Each test runs
the real console script in a subprocess, whose standard output is what the test makes it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest

from tests.cli.test_bench import TINY
from tests.conftest import CheckpointFactory

CONSOLE_SCRIPT = "import sys; from klotski_tier.cli.entry import main; sys.argv[0] = 'klotski-tier'; main()"
RUN = ["--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-new-tokens", "2", "--plan", "off"]
WAIT_S = 300


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral")


def klotski(args: list[str], stdout: IO[Any] | int | None, tmp_path: Path) -> tuple[int, str]:
    """Run the console script with ``stdout`` as its standard output (None: closed); exit code, stderr."""
    env = {**os.environ, "KLOTSKI_TIER_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-c", CONSOLE_SCRIPT, *args]
    if stdout is None:  # closed, as `>&-` leaves it: the child's fd 1 is closed before it starts
        argv = ["sh", "-c", 'exec "$@" >&-', "sh", *argv]
    done = subprocess.run(argv, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=WAIT_S)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stderr


def klotski_without_stderr(args: list[str], stderr: IO[Any] | None, tmp_path: Path) -> tuple[int, str]:
    """Run the console script with ``stderr`` as its standard error (None: closed); exit code, stdout."""
    env = {**os.environ, "KLOTSKI_TIER_CACHE": str(tmp_path / "cache")}
    argv = [sys.executable, "-c", CONSOLE_SCRIPT, *args]
    if stderr is None:
        argv = ["sh", "-c", 'exec "$@" 2>&-', "sh", *argv]
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, timeout=WAIT_S)
    return done.returncode, done.stdout


@contextmanager
def dev_full() -> Iterator[IO[Any]]:
    with open("/dev/full", "w") as full:
        yield full


@contextmanager
def pipe_without_reader() -> Iterator[int]:
    read, write = os.pipe()
    os.close(read)
    try:
        yield write
    finally:
        os.close(write)


def last_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert sum(line.startswith("error: ") for line in lines) == 1, stderr
    return lines[-1]


def outputs_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("as_json", [False, True])
def test_a_full_stdout_keeps_every_output_file(model: Path, tmp_path: Path, as_json: bool) -> None:
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.json"
    args = ["run", "--model", str(model), *RUN, "--output", str(out), "--trace", str(trace)]
    with dev_full() as full:
        code, stderr = klotski([*args, *(["--json"] if as_json else [])], full, tmp_path)
    assert code == 1
    line = last_line(stderr)
    assert line.startswith("error: cannot write to standard output: No space left on device"), line
    assert f"saved --output {out}, --trace {trace}" in line
    assert [record["index"] for record in outputs_of(out)] == [0, 1]
    assert json.loads(trace.read_text())["traceEvents"]


def test_a_closed_stdout_is_reported_after_the_outputs_are_saved(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    code, stderr = klotski(["run", "--model", str(model), *RUN, "--output", str(out)], None, tmp_path)
    assert code == 1
    assert last_line(stderr) == (
        f"error: standard output is closed, so what the command printed is lost; saved --output {out}"
    )
    assert len(outputs_of(out)) == 2  # fd 1, closed at start, was never some other file's


def test_a_reader_that_left_ends_the_command_silently_after_its_outputs(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    with pipe_without_reader() as write:
        code, stderr = klotski(["run", "--model", str(model), *RUN, "--output", str(out)], write, tmp_path)
    assert code == 141 and "error" not in stderr, stderr
    assert len(outputs_of(out)) == 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_bench_writes_its_profile_when_stdout_is_full(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    with dev_full() as full:
        args = ["bench", *TINY, "--json", "--path", str(tmp_path), "--profile", str(profile)]
        code, stderr = klotski(args, full, tmp_path)
    assert code == 1
    assert last_line(stderr).endswith(f"; saved --profile {profile}")
    assert json.loads(profile.read_text())["drive"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["simulate", "--list"], ["config", "show"]])
def test_what_any_command_prints_to_a_full_stdout_is_one_line(tmp_path: Path, args: list[str]) -> None:
    with dev_full() as full:
        code, stderr = klotski(args, full, tmp_path)
    assert code == 1
    assert last_line(stderr) == "error: cannot write to standard output: No space left on device"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_output_and_stdout_both_full_say_the_outputs_are_lost(model: Path, tmp_path: Path) -> None:
    with dev_full() as full:
        code, stderr = klotski(["run", "--model", str(model), *RUN, "--output", "/dev/full"], full, tmp_path)
    assert code == 1
    assert last_line(stderr) == (
        "error: cannot write output /dev/full: No space left on device; and cannot write to standard "
        "output: No space left on device, so the outputs are lost; nothing else was saved"
    )


def test_a_writable_stdout_changes_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", CONSOLE_SCRIPT, "simulate", "--list"],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert "shape" in done.stdout


@pytest.mark.parametrize("stderr", ["full", "closed"])
def test_a_failing_stderr_costs_nothing_but_the_progress(model: Path, tmp_path: Path, stderr: str) -> None:
    """A progress line on `2> /dev/full` once aborted the run with nothing saved and nothing printed."""
    if stderr == "full" and not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    out = tmp_path / "out.jsonl"
    args = ["-v", "run", "--model", str(model), *RUN, "--output", str(out)]  # -v: log lines on stderr too
    if stderr == "full":
        with dev_full() as full:
            code, stdout = klotski_without_stderr(args, full, tmp_path)
    else:
        code, stdout = klotski_without_stderr(args, None, tmp_path)
    assert code == 0
    assert "budgets:" in stdout and len(outputs_of(out)) == 2


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_an_error_with_a_full_stderr_still_exits_1(tmp_path: Path) -> None:
    with dev_full() as full:
        code, stdout = klotski_without_stderr(["verify", str(tmp_path / "no-store")], full, tmp_path)
    assert code == 1 and stdout == ""
