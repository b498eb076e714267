"""Every way ``klotski-tier run`` can be given something wrong ends the same way: exit code 1, one
line on stderr that starts with ``error:`` and names the problem, no traceback, nothing on stdout,
and no ``--output`` file (nor a temporary one) left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from klotski_tier.cli.main import main
from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.model.checkpoint import Checkpoint
from klotski_tier.core.runtime.engine import Engine, EngineOptions
from klotski_tier.core.store.files import ModelFiles
from tests.checkpoints import MAX_POSITIONS, VOCAB_SIZE
from tests.conftest import CheckpointFactory

IDS = ["--prompt-ids", "1,2,3"]
TOO_LONG = 200  # prompt tokens, over the factory's MAX_POSITIONS
HUGE_HEADER_LENGTH = 1 << 62  # a safetensors header length no file can hold
TRUNCATED_SIZE_BYTES = 1024  # what is left of a shard cut after loading: less than the embedding


def run_fails(args: list[str], phrase: str, out_dir: Path, *, exit_code: int = 1) -> Result:
    """Run with ``--output out_dir/out.jsonl`` and assert the one-line failure naming ``phrase``."""
    output = out_dir / "out.jsonl"
    before = sorted(out_dir.iterdir()) if out_dir.is_dir() else None
    result = CliRunner().invoke(main, ["run", *args, "--output", str(output)])
    assert result.exit_code == exit_code, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert phrase in lines[0]
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert not output.exists()
    assert (sorted(out_dir.iterdir()) if out_dir.is_dir() else None) == before  # no temporary file
    return result


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


@pytest.fixture
def model(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> Path:
    """A private copy of a tiny single-file Mixtral checkpoint, free to corrupt."""
    return Path(shutil.copytree(checkpoint_factory("mixtral"), tmp_path / "model"))


@pytest.fixture
def sharded(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoint_factory("mixtral", shards=3), tmp_path / "sharded"))


def edit_config(model: Path, **changes: Any) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)


# --- the model directory ---------------------------------------------------------------------


def test_missing_model_directory(tmp_path: Path, out_dir: Path) -> None:
    run_fails(["--model", str(tmp_path / "nowhere"), *IDS], "does not exist", out_dir)


def test_a_file_instead_of_a_directory(model: Path, out_dir: Path) -> None:
    run_fails(["--model", str(model / "config.json"), *IDS], "is a file, not a directory", out_dir)


def test_directory_without_config(tmp_path: Path, out_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    run_fails(["--model", str(tmp_path / "empty"), *IDS], "has no config.json", out_dir)


def test_unsupported_model_type(model: Path, out_dir: Path) -> None:
    edit_config(model, model_type="llama")
    result = run_fails(["--model", str(model), *IDS], "model_type 'llama'", out_dir)
    assert "mixtral" in result.stderr  # lists what is supported


def test_missing_shard(sharded: Path, out_dir: Path) -> None:
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    run_fails(["--model", str(sharded), *IDS], f"{shard.name}, which is missing", out_dir)


@pytest.mark.parametrize("cut", ["half", "one byte"])
def test_truncated_shard_is_caught_when_opened(model: Path, out_dir: Path, cut: str) -> None:
    shard = model / "model.safetensors"
    size = shard.stat().st_size
    os.truncate(shard, size // 2 if cut == "half" else size - 1)
    with pytest.raises(CheckpointError, match="is truncated"):
        Checkpoint.open(model)
    run_fails(["--model", str(model), *IDS], "is truncated", out_dir)


def test_shard_truncated_after_loading_is_reported_when_read(
    model: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = Engine.from_files

    def load_then_truncate(files: ModelFiles, options: EngineOptions | None = None, *rest: Any) -> Engine:
        engine = real_load(files, options, *rest)
        os.truncate(model / "model.safetensors", TRUNCATED_SIZE_BYTES)
        return engine

    monkeypatch.setattr(Engine, "from_files", load_then_truncate)
    run_fails(["--model", str(model), "--plan", "off", *IDS], "truncated", out_dir)


def test_header_length_larger_than_the_file(model: Path, out_dir: Path) -> None:
    overwrite(model / "model.safetensors", 0, HUGE_HEADER_LENGTH.to_bytes(8, "little"))
    run_fails(["--model", str(model), *IDS], "corrupt header", out_dir)


def test_header_that_is_not_json(model: Path, out_dir: Path) -> None:
    overwrite(model / "model.safetensors", 8, b"}{ not json")
    result = run_fails(["--model", str(model), *IDS], "corrupt header", out_dir)
    assert "not valid JSON" in result.stderr


def test_shard_index_that_is_not_json(sharded: Path, out_dir: Path) -> None:
    (sharded / "model.safetensors.index.json").write_text("{ not json")
    run_fails(["--model", str(sharded), *IDS], "is not valid JSON", out_dir)


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size"])
def test_tensor_shape_disagrees_with_config(model: Path, out_dir: Path, key: str) -> None:
    config = json.loads((model / "config.json").read_text())
    edit_config(model, **{key: config[key] * 2})
    result = run_fails(["--model", str(model), *IDS], "config.json implies", out_dir)
    assert "has shape" in result.stderr


def test_tensor_dtype_disagrees_with_config(model: Path, out_dir: Path) -> None:
    edit_config(model, dtype="bfloat16")  # the tensors are float32
    result = run_fails(["--model", str(model), *IDS], "has dtype torch.float32", out_dir)
    assert "bfloat16" in result.stderr


def test_corrupt_tokenizer(model: Path, out_dir: Path) -> None:
    (model / "tokenizer.json").write_text("{ not json")
    run_fails(["--model", str(model), *IDS], "tokenizer.json", out_dir)


# --- prompts --------------------------------------------------------------------------------


def test_prompt_longer_than_the_context(model: Path, out_dir: Path) -> None:
    ids = ",".join(["5"] * TOO_LONG)
    result = run_fails(["--model", str(model), "--prompt-ids", ids], f"context is {MAX_POSITIONS}", out_dir)
    assert f"has {TOO_LONG} tokens" in result.stderr


def test_missing_prompts_file(model: Path, tmp_path: Path, out_dir: Path) -> None:
    missing = tmp_path / "missing.txt"
    run_fails(["--model", str(model), "--prompts", str(missing)], "it does not exist", out_dir)


def test_prompts_file_that_is_a_directory(model: Path, tmp_path: Path, out_dir: Path) -> None:
    run_fails(["--model", str(model), "--prompts", str(tmp_path)], "is a directory, not a regular", out_dir)


def test_prompts_file_that_is_not_utf8(model: Path, tmp_path: Path, out_dir: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_bytes(b"hello\n\xff\xfe world\n")
    run_fails(["--model", str(model), "--prompts", str(path)], "not UTF-8", out_dir)


def test_jsonl_line_that_is_not_json(model: Path, tmp_path: Path, out_dir: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [3,\n')
    run_fails(["--model", str(model), "--prompts", str(path)], "prompts.jsonl:2 is not valid JSON", out_dir)


def test_prompts_file_without_prompts(model: Path, tmp_path: Path, out_dir: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("\n  \n")
    run_fails(["--model", str(model), "--prompts", str(path)], "holds no prompt", out_dir)


def test_no_prompt_at_all(model: Path, out_dir: Path) -> None:
    run_fails(["--model", str(model)], "no prompt given", out_dir)


def test_prompt_ids_that_are_not_integers(model: Path, out_dir: Path) -> None:
    run_fails(
        ["--model", str(model), "--prompt-ids", "1,x"], "not a comma-separated list of token ids", out_dir,
        exit_code=2,
    )  # fmt: skip


def test_token_id_outside_the_vocabulary(model: Path, out_dir: Path) -> None:
    result = run_fails(
        ["--model", str(model), "--prompt-ids", f"1,{VOCAB_SIZE}"], "outside the vocabulary", out_dir
    )
    assert f"0..{VOCAB_SIZE - 1}" in result.stderr


def test_text_prompt_without_a_tokenizer(model: Path, out_dir: Path) -> None:
    result = run_fails(["--model", str(model), "--prompt", "Hello"], "no tokenizer.json", out_dir)
    assert "--prompt-ids" in result.stderr


# --- options --------------------------------------------------------------------------------


def test_device_memory_below_the_minimum_states_the_minimum(model: Path, out_dir: Path) -> None:
    device_min, _ = Engine.load(model).minimum_budgets([[1, 2, 3]], max_new_tokens=1)
    args = ["--model", str(model), *IDS, "--max-new-tokens", "1", "--device-memory", str(device_min - 1)]
    result = run_fails(args, "below the minimum working set", out_dir)
    assert f"({device_min} bytes)" in result.stderr
    assert "--device-memory" in result.stderr


def test_host_memory_below_the_minimum(model: Path, out_dir: Path) -> None:
    run_fails(["--model", str(model), *IDS, "--host-memory", "1KiB"], "host memory budget", out_dir)


@pytest.mark.parametrize("option", ["--device-memory", "--host-memory"])
def test_size_that_is_not_a_size(model: Path, out_dir: Path, option: str) -> None:
    run_fails(
        ["--model", str(model), *IDS, option, "12 parsecs"],
        f"Invalid value for '{option}': '12 parsecs' is not a size",
        out_dir,
        exit_code=2,
    )


def test_output_into_a_missing_directory(model: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    run_fails(["--model", str(model), *IDS], "does not exist", missing)
    assert not missing.exists()


def test_output_that_is_a_directory(model: Path, tmp_path: Path, out_dir: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--model", str(model), *IDS, "--output", str(out_dir)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines() == [f"error: --output {out_dir} is a directory; name a file to write"]
    assert list(out_dir.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


USAGE_ERRORS = {  # a usage mistake of each kind, on several commands: argv, the command whose help it names
    "range": (["run", "--batches", "0"], "klotski-tier run"),
    "not a number": (["run", "--temperature", "nan"], "klotski-tier run"),
    "seed": (["run", "--seed", str(2**64)], "klotski-tier run"),
    "choice": (["run", "--plan", "maybe"], "klotski-tier run"),
    "output ends in /": (["run", "--output", "x/"], "klotski-tier run"),
    "no such option": (["simulate", "--bogus"], "klotski-tier simulate"),
    "missing argument": (["trace", "--png", "t.png"], "klotski-tier trace"),
    "missing option": (["trace", "t.json"], "klotski-tier trace"),
    "codec": (["pack", "--compress", "gzip", "in", "out"], "klotski-tier pack"),
    "nested command": (["config", "show", "--hot-experts", "-1"], "klotski-tier config show"),
    "no such command": (["nosuch"], "klotski-tier"),
    "group option": (["--bogus", "run"], "klotski-tier"),
    "option without value": (["bench", "--file-size"], "klotski-tier bench"),
    "nested option without value": (["config", "show", "--config"], "klotski-tier config show"),
    "no such nested command": (["config", "nosuch"], "klotski-tier config"),
}


@pytest.mark.parametrize("argv, command", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_every_usage_error_is_one_line_naming_the_help_with_exit_code_2(
    argv: list[str], command: str
) -> None:
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.stderr
    assert isinstance(result.exception, SystemExit), result.exception
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and line.endswith(f" (see '{command} --help')"), line
    assert result.stdout == ""


def test_no_arguments_still_show_the_help() -> None:
    result = CliRunner().invoke(main, [])
    assert "Usage: klotski-tier" in result.output and "Commands:" in result.output


@pytest.mark.parametrize(
    ("table", "phrase"),
    [
        ('[disk]\ndriver = "nope"\n', "unknown tier driver 'nope'; valid names: "),
        ("[prefetch]\npolicy = 'correlation'\n[prefetch.options]\ndecay = nan\n", "decay=nan is out"),
        ("[eviction]\npolicy = 'lru'\n[eviction.options]\nbogus = 1\n", "unknown option 'bogus'"),
    ],
)
def test_config_show_refuses_what_a_run_refuses(tmp_path: Path, table: str, phrase: str) -> None:
    """`config show` prints the configuration a run would use: it once printed one no run accepts."""
    path = tmp_path / "config.toml"
    path.write_text(table)
    result = CliRunner().invoke(main, ["config", "show", "--config", str(path)])
    assert result.exit_code == 1 and result.stdout == "", result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and phrase in line
