"""The built-in demo model as an input: no output of ``run`` or ``bench`` may be written into its
directory, a damaged one says to delete it, and a build that runs out of room is one line.

The demo directory here is a stand-in with the three files that make a build look complete: an output
in it is refused before the demo is built or opened, so its content only shows that nothing changed.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from klotski_tier.cli.main import main
from klotski_tier.core.demo.build import DEMO_DIR_NAME, INDEX_FILE
from tests.cli.hostile import error_line

IDS = ["--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
TINY_BENCH = ["--quick", "--file-size", "8MiB", "--block-sizes", "2MiB", "--queue-depths", "2",
              "--tokens", "1", "--rounds", "1", "--sample-size", "1MiB"]  # fmt: skip
FILE_SIZE_LIMIT_BYTES = 16 * 1024  # below the demo's tokenizer.json (54 KB): its write fails first


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(path))
    return path


@pytest.fixture
def demo(cache: Path) -> Path:
    """A stand-in for a built demo: its files hold a few bytes of their own."""
    directory = cache / DEMO_DIR_NAME
    directory.mkdir(parents=True)
    for name in ("config.json", INDEX_FILE, "tokenizer.json"):
        (directory / name).write_text(f'{{"stand-in": "{name}"}}\n')
    return directory


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the demo is built or opened nor the bench started: every refusal comes first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the outputs were checked")

    for name in ("run.demo_model_dir", "run.open_model", "bench.run_bench"):
        monkeypatch.setattr(f"klotski_tier.cli.{name}", refuse)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.mark.parametrize(
    "args",
    [
        ["run", *IDS, "--output", "{demo}/config.json"],
        ["run", *IDS, "--output", "{demo}/tokenizer.json"],
        ["run", *IDS, "--trace", "{demo}/new-file.json"],
        ["run", *IDS, "--config", "{tmp}/state.toml"],
        ["bench", *TINY_BENCH, "--path", "{tmp}", "--profile", "{demo}/config.json"],
        ["bench", *TINY_BENCH, "--path", "{tmp}", "--profile", "{demo}/" + INDEX_FILE],
    ],
    ids=["run --output config", "run --output tokenizer", "run --trace", "run save_state", "bench config",
         "bench index"],
)  # fmt: skip
def test_an_output_inside_the_demo_is_refused_without_model(
    demo: Path, tmp_path: Path, no_work: None, args: list[str]
) -> None:
    """Without --model the demo's directory is the command's model input, as a --model directory is."""
    (tmp_path / "state.toml").write_text(
        f'[prefetch]\npolicy = "correlation"\nsave_state = "{demo}/config.json"\n'
    )
    before = {path.name: path.read_bytes() for path in demo.iterdir()}
    line = error_line(invoke(*[arg.format(demo=demo, tmp=tmp_path) for arg in args]))
    assert f"is inside the demo model {demo}, which the command reads; write it somewhere else" in line
    assert {path.name: path.read_bytes() for path in demo.iterdir()} == before


def test_with_model_the_demo_is_no_input(demo: Path, tmp_path: Path) -> None:
    """Given --model, the demo's directory is just a directory: the check names what is read."""
    model = tmp_path / "model"
    model.mkdir()
    line = error_line(invoke("run", "--model", model, *IDS, "--output", model / "out.jsonl"))
    assert f"is inside --model {model}" in line


@pytest.mark.parametrize(
    "config", ['{"index": 0, "prompt_ids": [1, 2, 3], "output_ids": [4]}\n', '{"a": 1}\n{"b": 2}\n']
)
def test_a_damaged_demo_says_to_delete_it(demo: Path, config: str) -> None:
    """A demo whose config.json was overwritten (by a JSONL output, say) is the tool's own file gone bad."""
    (demo / "config.json").write_text(config)
    line = error_line(invoke("run", *IDS))
    assert line.startswith(f"error: the demo model at {demo} is damaged (")
    assert line.endswith("; delete the directory so it is rebuilt") and "restore it" not in line


def test_a_demo_build_that_runs_out_of_room_is_one_line(cache: Path) -> None:
    """Files are capped below the demo's tokenizer.json, so its write fails as on a full disk
    (tokenizers' own save raised a bare Exception there: a traceback); no temporary build is left."""

    def cap_file_size() -> None:  # Python ignores SIGXFSZ: a write past the cap fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))

    program = "from klotski_tier.cli.main import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", program, "run", *IDS],
        preexec_fn=cap_file_size,
        env={**os.environ, "KLOTSKI_TIER_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.splitlines()[-1]
    assert line.startswith(f"error: cannot build the demo model in {cache / DEMO_DIR_NAME}: "), line
    assert "File too large" in line and line.endswith("with 400 MB free")
    assert list(cache.iterdir()) == []


def test_the_demo_tokenizer_file_is_what_tokenizers_writes(tmp_path: Path) -> None:
    """The build writes tokenizer.json itself (so a full disk is an OSError): the same bytes as save()."""
    from klotski_tier.core.demo.build import build_demo
    from klotski_tier.core.demo.tokenizer import train_demo_tokenizer
    from tests.cli.test_run import TINY_DEMO, TINY_DEMO_SHARD_BYTES

    directory = build_demo(tmp_path / "demo", TINY_DEMO, shard_max_bytes=TINY_DEMO_SHARD_BYTES)
    train_demo_tokenizer(TINY_DEMO.vocab_size).save(str(tmp_path / "saved.json"))
    assert (directory / "tokenizer.json").read_bytes() == (tmp_path / "saved.json").read_bytes()
    json.loads((directory / "tokenizer.json").read_text())


def test_bench_says_a_damaged_demo_is_damaged_before_measuring(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --model, bench compresses the built demo's weights: a damaged one is named before the sweep."""
    monkeypatch.setattr(
        "klotski_tier.core.bench.suite.write_test_file", lambda *args: pytest.fail("the sweep started")
    )
    line = error_line(invoke("bench", *TINY_BENCH, "--path", tmp_path, "--profile", tmp_path / "p.json"))
    assert line.startswith(f"error: the demo model at {demo} is damaged (")
    assert not (tmp_path / "p.json").exists() and sorted(path.name for path in tmp_path.iterdir()) == [
        "cache"
    ]


@pytest.mark.parametrize(
    ("command", "label"),
    [
        (["trace", "TRACE", "--png"], "--png"),
        (["simulate", "--model-shape", "demo", "--hardware", "t4", "-n", "1", "--png"], "--png"),
        (["pack", "MODEL"], "OUT_DIR"),
        (["run", "--model", "MODEL", *IDS, "--output"], "--output"),
    ],
)
def test_no_command_writes_into_the_demo_even_one_that_does_not_read_it(
    demo: Path, tmp_path: Path, command: list[str], label: str
) -> None:
    """`trace --png` once replaced the demo's special_tokens_map.json, `simulate --png` its
    tokenizer_config.json: the demo is refused as a place to write by every command."""
    trace, model = tmp_path / "trace.json", tmp_path / "model"
    trace.write_text(json.dumps({"traceEvents": []}))
    model.mkdir()
    before = {path.name: path.read_bytes() for path in demo.iterdir()}
    target = demo / "config.json"
    args = [{"TRACE": str(trace), "MODEL": str(model)}.get(arg, arg) for arg in command]
    line = error_line(invoke(*args, target))
    assert line == (
        f"error: {label} {target} is inside the built-in demo model {demo}, which klotski-tier keeps in its "
        "cache; write it somewhere else"
    )
    assert {path.name: path.read_bytes() for path in demo.iterdir()} == before
