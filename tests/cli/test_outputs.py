"""The files a command writes, as a user meets them: every output checked before any work (two outputs
on one path, a trailing ``/``, a missing directory, ``prefetch.save_state`` from the config), written
by the one rule (a symlink followed, a FIFO and ``/dev/null`` written through, the umask's mode), and
a write that still fails at the end loses nothing: the report is printed, the other files are kept,
the outputs reach stdout, and one line says what was saved."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from klotski_tier.cli.main import main
from klotski_tier.core import atomic
from klotski_tier.core.errors import InputError
from klotski_tier.core.runtime.engine import Engine
from tests.conftest import CheckpointFactory

PROMPT_IDS = [[1, 2, 3], [4, 5]]
ARGS = ["--prompt-ids", "1,2,3", "--prompt-ids", "4,5", "--max-new-tokens", "2", "--plan", "off"]
UMASK = 0o027


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral")


@pytest.fixture
def never_replace(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError(f"os.replace{args}: a device or FIFO would be replaced")

    monkeypatch.setattr(atomic.os, "replace", refuse)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is never opened: whatever is refused, is refused before any work."""

    def refuse(*args: Any) -> None:
        raise AssertionError("the model was opened before the outputs were checked")

    monkeypatch.setattr("klotski_tier.cli.run.open_model", refuse)


def run(model: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["run", "--model", str(model), *ARGS, *args])


def succeeds(result: Result) -> Result:
    assert result.exit_code == 0, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    return result


def fails(result: Result, phrase: str, *, exit_code: int = 1) -> str:
    """The one-line error (a usage error's exit code is 2); the line returned."""
    assert result.exit_code == exit_code, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in result.output
    line = result.stderr.splitlines()[-1]
    assert line.startswith("error: ") and phrase in line, result.stderr
    return line


def jsonl(text: str) -> list[list[int]]:
    return [json.loads(line)["prompt_ids"] for line in text.splitlines() if line.startswith("{")]


def config(tmp_path: Path, save_state: Path) -> Path:
    path = tmp_path / "engine.toml"
    path.write_text(f'[prefetch]\npolicy = "correlation"\nsave_state = "{save_state}"\n')
    return path


# --- checked before any work --------------------------------------------------------------------


@pytest.mark.parametrize("second", ["--trace", "--record-routing"])
def test_two_outputs_on_one_path_are_refused_before_any_work(
    model: Path, tmp_path: Path, no_work: None, second: str
) -> None:
    shared = tmp_path / "x.json"
    fails(run(model, "--output", str(shared), second, str(tmp_path / "." / "x.json")), "the same file")
    assert list(tmp_path.iterdir()) == []


def test_an_output_and_prefetch_save_state_on_one_path_are_refused(
    model: Path, tmp_path: Path, no_work: None
) -> None:
    shared = tmp_path / "x.json"
    result = run(model, "--output", str(shared), "--config", str(config(tmp_path, shared)))
    fails(result, "--output and prefetch.save_state are the same file")


def test_a_save_state_in_a_missing_directory_is_refused_before_any_work(
    model: Path, tmp_path: Path, no_work: None
) -> None:
    state = tmp_path / "missing" / "state.json"
    result = run(model, "--output", str(tmp_path / "out.jsonl"), "--config", str(config(tmp_path, state)))
    fails(result, f"prefetch.save_state {state}: directory")
    assert result.stdout == "" and not (tmp_path / "out.jsonl").exists()


# --- an output that is also an input ------------------------------------------------------------

RUN = ["run", "--model", "{model}", *ARGS]
OUTPUT_IS_INPUT = {  # argv ({model}, {tmp}: the directories), the file it would replace, both options named
    "run --prompts": ([*RUN, "--prompts", "{tmp}/p.txt", "--output", "{tmp}/p.txt"], "{tmp}/p.txt",
                      ["--output", "--prompts"]),
    "run --profile": ([*RUN, "--profile", "{tmp}/prof.json", "--output", "{tmp}/prof.json"],
                      "{tmp}/prof.json", ["--output", "--profile"]),
    "run --prefetch-trace": ([*RUN, "--prefetch", "oracle", "--prefetch-trace", "{tmp}/rr.npz",
                              "--record-routing", "{tmp}/./rr.npz"], "{tmp}/rr.npz",
                             ["--record-routing", "--prefetch-trace"]),
    "run --config": ([*RUN, "--config", "{tmp}/self.toml"], "{tmp}/self.toml",
                     ["prefetch.save_state", "--config"]),
    "run prefetch.state": ([*RUN, "--config", "{tmp}/state.toml", "--trace", "{tmp}/old-state.json"],
                           "{tmp}/old-state.json", ["--trace", "prefetch.state"]),
    "run --model's file": ([*RUN, "--output", "{model}/config.json"], "{model}/config.json",
                           ["--output", "--model"]),
    "run --model's directory": ([*RUN, "--trace", "{model}/new.json"], None, ["--trace", "--model"]),
    "trace": (["trace", "{tmp}/t.json", "--png", "{tmp}/t.json"], "{tmp}/t.json", ["--png", "the trace"]),
    "simulate --trace": (["simulate", "--model-shape", "demo", "--hardware", "t4", "-n", "1",
                          "--trace", "{tmp}/rr.npz", "--png", "{tmp}/rr.npz"], "{tmp}/rr.npz",
                         ["--png", "--trace"]),
    "simulate --model": (["simulate", "--model", "{model}", "--hardware", "t4", "-n", "1",
                          "--png", "{model}/s.png"], None, ["--png", "--model"]),
    "bench --model": (["bench", "--quick", "--path", "{tmp}", "--model", "{model}", "--profile",
                       "{model}/config.json"], "{model}/config.json", ["--profile", "--model"]),
}  # fmt: skip


@pytest.fixture
def inputs(model: Path, tmp_path: Path) -> Path:
    """The input files the cases above name, each holding a few bytes of its own."""
    for name in ("p.txt", "prof.json", "rr.npz", "t.json", "old-state.json"):
        (tmp_path / name).write_text(f"{name}\n")
    (tmp_path / "self.toml").write_text(
        f'[prefetch]\npolicy = "correlation"\nsave_state = "{tmp_path}/self.toml"\n'
    )
    (tmp_path / "state.toml").write_text(f'[prefetch]\nstate = "{tmp_path}/old-state.json"\n')
    return tmp_path


@pytest.fixture
def no_work_at_all(monkeypatch: pytest.MonkeyPatch, no_work: None) -> None:
    """No command reads its inputs or starts measuring: every refusal comes first."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started before the outputs were checked")

    for name in ("trace.read_trace", "simulate.study_from_flags", "bench.run_bench"):
        monkeypatch.setattr(f"klotski_tier.cli.{name}", refuse)


@pytest.mark.parametrize(
    ("argv", "replaced", "options"), OUTPUT_IS_INPUT.values(), ids=OUTPUT_IS_INPUT.keys()
)
def test_an_output_that_is_an_input_is_refused_before_any_work(
    model: Path, inputs: Path, no_work_at_all: None, argv: list[str], replaced: str | None, options: list[str]
) -> None:
    before = sorted(model.iterdir()), sorted(inputs.iterdir())
    path = Path(replaced.format(model=model, tmp=inputs)) if replaced is not None else None
    content = path.read_bytes() if path is not None else None
    result = CliRunner().invoke(main, [arg.format(model=model, tmp=inputs) for arg in argv])
    line = fails(result, "which the command reads")
    assert all(option in line for option in options), line
    assert (sorted(model.iterdir()), sorted(inputs.iterdir())) == before
    assert path is None or path.read_bytes() == content


def test_bench_may_measure_a_model_and_write_its_profile_beside_it(model: Path, tmp_path: Path) -> None:
    from klotski_tier.core.atomic import check_outputs

    check_outputs({"--profile": tmp_path / "p.json"}, {"--model": model}, directories={"--model"})


@pytest.mark.parametrize("option", ["--output", "--trace", "--record-routing"])
def test_a_trailing_slash_is_refused(model: Path, tmp_path: Path, option: str) -> None:
    fails(run(model, option, f"{tmp_path}/out/"), "ends with '/'", exit_code=2)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_is_refused(model: Path, tmp_path: Path, no_work: None) -> None:
    fails(run(model, "--trace", str(tmp_path)), "is a directory")


# --- written by the rule ------------------------------------------------------------------------


def test_a_symlinked_output_stays_a_link(model: Path, tmp_path: Path) -> None:
    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    succeeds(run(model, "--output", str(link)))
    assert link.is_symlink() and jsonl(target.read_text()) == PROMPT_IDS


def test_a_fifo_output_is_written_through(model: Path, tmp_path: Path, never_replace: None) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        succeeds(run(model, "--output", str(fifo)))
        assert jsonl(os.read(reader, 1 << 16).decode()) == PROMPT_IDS
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_dev_null_outputs_are_written_through(model: Path, never_replace: None) -> None:
    succeeds(run(model, "--output", "/dev/null", "--trace", "/dev/null"))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_output_files_follow_the_umask(model: Path, tmp_path: Path) -> None:
    previous = os.umask(UMASK)
    try:
        succeeds(run(model, "--output", str(tmp_path / "out.jsonl"), "--trace", str(tmp_path / "t.json")))
    finally:
        os.umask(previous)
    for name in ("out.jsonl", "t.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~UMASK


# --- a write that fails at the end --------------------------------------------------------------


def test_a_trace_that_cannot_be_written_keeps_the_report_and_the_output(model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    result = run(model, "--output", str(output), "--trace", "/dev/full")
    line = fails(result, "cannot write trace /dev/full: No space left on device")
    assert f"saved --output {output}" in line
    assert "decode" in result.stdout and jsonl(output.read_text()) == PROMPT_IDS


def test_an_output_that_cannot_be_written_goes_to_stdout(model: Path) -> None:
    result = run(model, "--output", "/dev/full")
    fails(result, "its JSON lines went to stdout instead")
    assert "decode" in result.stdout and jsonl(result.stdout) == PROMPT_IDS


def test_with_json_the_outputs_stay_in_the_json(model: Path) -> None:
    result = run(model, "--output", "/dev/full", "--json")
    fails(result, "the outputs are in the JSON on stdout")
    record = json.loads(result.stdout)
    assert [out["prompt_ids"] for out in record["outputs"]] == PROMPT_IDS


def test_a_save_state_directory_gone_during_the_run_loses_nothing_else(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check passed; the directory went away while the run loaded: the outputs are still written."""
    states = tmp_path / "states"
    states.mkdir()
    real_load = Engine.from_files

    def load_then_remove(*args: Any) -> Engine:
        shutil.rmtree(states)
        return real_load(*args)

    monkeypatch.setattr(Engine, "from_files", load_then_remove)
    output = tmp_path / "out.jsonl"
    result = run(model, "--output", str(output), "--config", str(config(tmp_path, states / "s.json")))
    line = fails(result, f"cannot write prefetch state {states / 's.json'}")
    assert f"saved --output {output}" in line and jsonl(output.read_text()) == PROMPT_IDS


def test_the_prefetch_state_is_saved_by_the_run(model: Path, tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    succeeds(run(model, "--config", str(config(tmp_path, state))))
    assert json.loads(state.read_text())["policy"] == "correlation"


# --- numbers validated by click, before any work ------------------------------------------------


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--temperature", "nan"], "'nan' is not a finite number"),
        (["--temperature", "inf"], "'inf' is not a finite number"),
        (["--seed", str(2**64)], "--seed"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_run_numbers_are_refused_before_loading(
    model: Path, no_work: None, args: list[str], phrase: str
) -> None:
    fails(run(model, *args), phrase, exit_code=2)


def test_the_largest_seed_runs(model: Path) -> None:
    succeeds(run(model, "--seed", str(2**64 - 1), "--temperature", "1.0"))


@pytest.mark.parametrize("width", ["inf", "nan", "1e9"])
def test_trace_width_must_be_a_drawable_number(tmp_path: Path, width: str) -> None:
    result = CliRunner().invoke(main, ["trace", "t.json", "--png", str(tmp_path / "t.png"), "--width", width])
    fails(result, "--width", exit_code=2)


def test_trace_png_is_checked_before_the_trace_is_read(tmp_path: Path) -> None:
    png = tmp_path / "missing" / "t.png"
    result = CliRunner().invoke(main, ["trace", str(tmp_path / "absent.json"), "--png", str(png)])
    fails(result, f"--png {png}: directory")


@pytest.mark.parametrize("name", ["config.json", "SHARD"])
def test_a_file_a_model_directory_links_to_is_refused_as_an_output(
    model: Path, tmp_path: Path, no_work: None, name: str
) -> None:
    """A Hugging Face snapshot is a directory of links into a blob store: `run --model snapshot
    --output blobs/config.json` once replaced the config the run reads."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(model, blobs)
    snapshot.mkdir()
    for blob in blobs.iterdir():
        (snapshot / blob.name).symlink_to(blob)
    shard = next(path.name for path in blobs.iterdir() if path.suffix == ".safetensors")
    target = blobs / (shard if name == "SHARD" else name)
    content = target.read_bytes()
    result = run(snapshot, "--output", str(target))
    line = fails(result, f"is a file --model {snapshot} reads (through a link in it)")
    assert line.startswith(f"error: --output {target}")
    assert target.read_bytes() == content


def test_a_directory_read_whole_is_refused_through_a_bind_mount(tmp_path: Path) -> None:
    """The same directory under another path (a bind mount) is still the directory the command reads."""
    source, alias = tmp_path / "model", tmp_path / "alias"
    source.mkdir()
    alias.mkdir()
    (source / "config.json").write_text("{}")
    if os.geteuid() != 0 or os.system(f"mount --bind {source} {alias} 2>/dev/null") != 0:
        pytest.skip("needs root and mount --bind")
    try:
        assert atomic.lies_within(alias / "config.json", source)
        assert atomic.lies_within(alias / "new.json", source)
        assert not atomic.lies_within(tmp_path / "elsewhere.json", source)
        with pytest.raises(InputError, match=f"is inside --model {source}, which the command reads"):
            atomic.check_outputs(
                {"--output": alias / "out.jsonl"}, {"--model": source}, directories={"--model"}
            )
    finally:
        os.system(f"umount {alias}")
    assert (source / "config.json").read_text() == "{}"
