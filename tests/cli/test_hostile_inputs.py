"""Hostile and unlucky input files through the commands: each is one ``error:`` line naming the file
and what to do, exit code 1, nothing on stdout, no traceback, before any generation starts."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from klotski_tier.cli.main import main
from klotski_tier.core.bench.profile import default_profile_path
from klotski_tier.core.plan.shapes import model_shape, shape_to_toml
from klotski_tier.core.store import pack as store_pack
from klotski_tier.core.store import packed
from tests.cli.hostile import error_line
from tests.conftest import CheckpointFactory

IDS = ["--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
BENCH_HINT = "run `klotski-tier bench` to write a new one, or delete it"


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's cache (and its profile)."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral", dtype=torch.bfloat16)


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.mark.parametrize("command", [["run", "--model", "{model}", *IDS], ["plan"]], ids=["run", "plan"])
def test_a_default_profile_that_is_not_utf8_says_which_file_and_what_to_do(
    model: Path, command: list[str]
) -> None:
    default_profile_path().parent.mkdir(parents=True)
    default_profile_path().write_bytes(b'{"version": "\xff"}')
    line = error_line(invoke(*[arg.format(model=model) for arg in command]))
    assert f"machine profile {default_profile_path()} is not UTF-8 text" in line
    assert line.endswith(BENCH_HINT)


def test_a_profile_that_is_a_fifo_does_not_hang_run(model: Path, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "profile.json")
    line = error_line(invoke("run", "--model", model, *IDS, "--profile", tmp_path / "profile.json"))
    assert "is a FIFO (named pipe), not a regular file" in line


@pytest.mark.parametrize("prompts", ["/dev/zero", "fifo", "dir"])
def test_a_prompts_file_that_is_not_a_regular_file(model: Path, tmp_path: Path, prompts: str) -> None:
    path = Path(prompts) if prompts.startswith("/") else tmp_path / prompts
    if prompts == "fifo":
        os.mkfifo(path)
    elif prompts == "dir":
        path.mkdir()
    line = error_line(invoke("run", "--model", model, "--prompts", path, "--max-new-tokens", "2"))
    assert line.startswith(f"error: prompts file {path} is a ") and "not a regular file" in line


def test_a_trace_whose_other_data_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": [], "otherData": [1, 2]}))
    line = error_line(invoke("trace", path, "--png", tmp_path / "t.png"))
    assert line == f"error: {path}: otherData is list, not an object; the trace is corrupt"


def test_run_on_a_store_missing_an_expert_fails_before_generating(model: Path, tmp_path: Path) -> None:
    """It used to run until a gate first chose the expert, then die with a KeyError traceback."""
    store = store_pack.pack(model, tmp_path / "store").path
    manifest_path = store / packed.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["blocks"] = [
        b for b in manifest["blocks"] if (b["kind"], b["layer"], b["expert"]) != ("expert", 1, 3)
    ]
    manifest_path.write_text(json.dumps(manifest))
    line = error_line(invoke("run", "--model", store, *IDS))
    assert line == (
        f"error: store {store} cannot run its model: block L1.E3 is missing; {packed.REPACK_HINT}"
    )
    line = error_line(invoke("verify", store))
    assert "block L1.E3 is missing" in line


def test_a_shape_of_a_million_layers_is_refused_before_planning(tmp_path: Path) -> None:
    """`plan` once allocated 15 GiB of routing statistics for it, then died with a traceback."""
    shape = shape_to_toml("big", model_shape("demo"))
    path = tmp_path / "shapes.toml"
    path.write_text(re.sub(r"(?m)^num_hidden_layers = \d+$", "num_hidden_layers = 1000000", shape))
    line = error_line(invoke("plan", "--shapes", path, "--model-shape", "big"))
    assert "num_hidden_layers = 1000000 is over 1024, more than any model this tool runs" in line


@pytest.mark.parametrize("kind", ["/dev/urandom", "fifo", "text"])  # a directory: click's usage error
def test_a_profile_that_is_there_but_is_no_profile_says_what_it_is(tmp_path: Path, kind: str) -> None:
    """Only a missing profile is "no machine profile at ..."; what else is there is named as reads says."""
    path = Path(kind) if kind.startswith("/") else tmp_path / kind
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "text":
        path.write_text("not a profile\n")
    phrase = {
        "/dev/urandom": "is a character device, not a regular file",
        "fifo": "is a FIFO (named pipe), not a regular file",
        "text": "is not valid JSON",
    }[kind]
    line = error_line(invoke("plan", "--profile", path))
    assert line.startswith(f"error: machine profile {path} {phrase}") and line.endswith(BENCH_HINT)


def test_a_missing_profile_says_to_run_bench(tmp_path: Path) -> None:
    line = error_line(invoke("plan", "--profile", tmp_path / "none.json"))
    assert line == (
        f"error: no machine profile at {tmp_path / 'none.json'}; "
        "run `klotski-tier bench` first to measure this machine"
    )


def test_a_default_profile_path_that_is_a_directory_is_not_taken_for_no_profile(model: Path) -> None:
    default_profile_path().mkdir(parents=True)
    line = error_line(invoke("run", "--model", model, *IDS))
    assert line.startswith(f"error: machine profile {default_profile_path()} is a directory, not a regular")


@pytest.mark.parametrize(
    "command",
    [["run", *IDS], ["run", "--model", "{model}", *IDS], ["plan"],
     ["bench", "--quick", "--file-size", "8MiB"], ["simulate", "--model-shape", "demo", "-n", "1"]],
    ids=["run-demo", "run-model", "plan", "bench", "simulate"],
)  # fmt: skip
def test_a_cache_that_is_a_file_is_one_line(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    """`bench` once died in a FileExistsError traceback with KLOTSKI_TIER_CACHE naming a file."""
    cache = tmp_path / "cache-file"
    cache.write_text("not a directory")
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(cache))
    line = error_line(invoke(*[str(model) if arg == "{model}" else arg for arg in command]))
    assert line == (
        f"error: KLOTSKI_TIER_CACHE={cache}: {cache} is not a directory; set KLOTSKI_TIER_CACHE to a "
        "directory klotski-tier may write"
    )
    assert cache.read_text() == "not a directory"


def test_a_cache_that_cannot_be_created_is_one_line_for_bench(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tmp_path / "parent"
    parent.write_text("a file, so nothing can be made under it")
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(parent / "cache"))
    line = error_line(invoke("bench", "--quick", "--file-size", "8MiB"))
    assert line.startswith(f"error: cannot create {parent / 'cache'} for the machine profile: ")
    assert line.endswith("or pass --profile")
