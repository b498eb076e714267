"""SIGINT and SIGTERM stop a command the same way: its clean-up runs, no temporary file survives, one
line on stderr, and the exit code a shell gives a process the signal killed (130, 143). Each test
pauses a real ``klotski-tier run`` at a chosen point (:mod:`tests.cli.paused`) and signals it there."""

from __future__ import annotations

import signal
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from tests.cli.paused import start_paused, start_paused_at_import
from tests.conftest import CheckpointFactory

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
ARGS = ["--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--plan", "off"]


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral")


def stopped(code: int, stderr: str, signum: signal.Signals) -> None:
    assert code == EXIT_CODES[signum], stderr
    assert stderr.splitlines()[-1] == f"error: interrupted by {signum.name}", stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_output_is_written_leaves_no_temporary_file(
    model: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    argv = ["run", "--model", str(model), *ARGS, "--output", str(out / "out.jsonl")]
    paused = start_paused("klotski_tier.cli.run", "atomic_write", argv, context=True)
    paused.wait_for_pause()
    assert [p.name.endswith(".tmp") for p in out.iterdir()] == [True]  # inside the window
    stopped(*paused.signal(signum), signum)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_generation_stops_the_run_cleanly(
    model: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    argv = ["run", "--model", str(model), *ARGS, "--output", str(tmp_path / "out.jsonl")]
    paused = start_paused("klotski_tier.cli.progress", "StepProgress.__call__", argv)
    paused.wait_for_pause()  # inside the event loop, between two steps
    stopped(*paused.signal(signum), signum)
    assert list(tmp_path.iterdir()) == []


def test_an_unsignalled_paused_run_finishes(model: Path, tmp_path: Path) -> None:
    """The pause itself changes nothing: resumed, the run writes its output."""
    argv = ["run", "--model", str(model), *ARGS, "--output", str(tmp_path / "out.jsonl")]
    paused = start_paused("klotski_tier.cli.run", "atomic_write", argv, context=True)
    paused.wait_for_pause()
    code, stderr = paused.resume()
    assert code == 0, stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_commands_are_imported_is_one_line(tmp_path: Path, signum: signal.Signals) -> None:
    """The console script handles both signals before it imports torch (which takes a while)."""
    argv = ["run", *ARGS, "--output", str(tmp_path / "out.jsonl")]
    paused = start_paused_at_import("torch", argv)
    paused.wait_for_pause()  # the commands are being imported: torch is not yet
    code, stderr = paused.signal(signum)
    stopped(code, stderr, signum)
    assert stderr == f"error: interrupted by {signum.name}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_is_the_entry_that_handles_signals_first() -> None:
    (script,) = entry_points(group="console_scripts", name="klotski-tier")
    assert script.value == "klotski_tier.cli.entry:main"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_once_the_work_is_done_changes_nothing(
    model: Path, tmp_path: Path, signum: signal.Signals
) -> None:
    """A signal while a finished run exits (outputs saved, report printed: the interpreter shutting
    down) once ended it with 130 or 143 and no line, as if it had been stopped."""
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.json"
    argv = ["run", "--model", str(model), *ARGS, "--output", str(out), "--trace", str(trace)]
    paused = start_paused("klotski_tier.cli.errors", "end_if_stdout_failed", argv)
    paused.wait_for_pause()  # the command's work is over
    code, stderr = paused.signal(signum)
    assert code == 0 and "error" not in stderr, stderr
    assert len(out.read_text().splitlines()) == 1 and trace.stat().st_size > 0


def test_an_interrupted_run_names_what_it_saved(model: Path, tmp_path: Path) -> None:
    out, trace = tmp_path / "out.jsonl", tmp_path / "trace.json"
    argv = ["run", "--model", str(model), *ARGS, "--output", str(out), "--trace", str(trace)]
    paused = start_paused("klotski_tier.core.observe.timeline", "Timeline.save", argv)  # --output is saved
    paused.wait_for_pause()
    code, stderr = paused.signal(signal.SIGTERM)
    assert code == 143
    assert stderr.splitlines()[-1] == f"error: interrupted by SIGTERM; saved --output {out}", stderr
    assert len(out.read_text().splitlines()) == 1 and not trace.exists()
