"""``klotski-tier run`` on tiny real checkpoints: JSON and human output, output files, size options,
batch shapes, text prompts through a tokenizer, seeded sampling, and the built-in demo run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from tokenizers import Tokenizer

from klotski_tier.cli import progress
from klotski_tier.cli.main import main
from klotski_tier.core.demo.build import build_demo
from klotski_tier.core.demo.shape import DemoShape
from klotski_tier.core.runtime.engine import Engine, EngineOptions
from klotski_tier.core.units import KIB, MIB
from klotski_tier.policies.registry import EVICTION_POLICIES, PREFETCH_POLICIES
from tests.conftest import CheckpointFactory

MAX_NEW = 3
ID_ARGS = ["--prompt-ids", "1,2,3", "--prompt-ids", "4,5"]
PROMPTS = [[1, 2, 3], [4, 5]]
MIXED_PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [40, 41, 42, 43, 44, 45], [50]]
TINY_DEMO = DemoShape(
    vocab_size=320,  # a little over the 259 ids every byte-level BPE needs
    hidden_size=32,
    num_layers=2,
    num_experts=4,
    top_k=2,
    intermediate_size=48,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    rope_theta=1e6,
)
TINY_DEMO_SHARD_BYTES = 20_000  # ~130 KB of tensors: several shards, as in the real demo
DEMO_BUDGET_TEXT = "of 128.00 MiB"  # the demo's default device budget as the metrics table prints it


def run_ok(*args: str) -> Result:
    """``klotski-tier run ARGS``, asserting a clean exit."""
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 0, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    return result


def run_json(*args: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(run_ok(*args, "--json").stdout)
    return record


def tokens(record: dict[str, Any]) -> list[list[int]]:
    return [out["token_ids"] for out in record["outputs"]]


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral")


@pytest.fixture(scope="module")
def json_run(model: Path) -> Result:
    return run_ok("--model", str(model), *ID_ARGS, "--max-new-tokens", str(MAX_NEW), "--json")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny demo-shaped checkpoint with a tokenizer.json, for text prompts."""
    return build_demo(
        tmp_path_factory.mktemp("demo") / "tiny", TINY_DEMO, shard_max_bytes=TINY_DEMO_SHARD_BYTES
    )


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(demo_dir / "tokenizer.json"))


def test_json_output_is_one_object_with_outputs_and_metrics(json_run: Result) -> None:
    record = json.loads(json_run.stdout)
    assert [out["index"] for out in record["outputs"]] == [0, 1]
    assert [out["prompt_ids"] for out in record["outputs"]] == PROMPTS
    for out in record["outputs"]:
        assert 1 <= len(out["token_ids"]) <= MAX_NEW
        assert out["finish_reason"] in ("eos", "length")
        assert (out["finish_reason"] == "length") == (len(out["token_ids"]) == MAX_NEW)
        assert out["text"] is None  # no tokenizer.json in this checkpoint
    metrics = record["metrics"]
    assert metrics["prefill_tokens"] == sum(map(len, PROMPTS))
    decoded = sum(len(out["token_ids"]) - 1 for out in record["outputs"])  # the first comes from the prefill
    assert metrics["decode_tokens"] == decoded and metrics["prefill_tokens_per_s"] > 0
    assert metrics["decode_tokens_per_s"] == pytest.approx(decoded / metrics["decode_s"] if decoded else 0.0)
    assert 0.0 <= metrics["expert_hit_rate"] <= 1.0
    assert set(metrics["tiers"]) == {"host", "device"}
    for tier in metrics["tiers"].values():
        assert 0 <= tier["peak_bytes"] <= tier["budget_bytes"]
    assert metrics["tiers"]["device"]["peak_bytes"] > 0
    budgets = record["plan"]["budgets"]  # none given: both derived from the memory the process may use
    assert budgets["device_source"] == budgets["host_source"] == "derived"
    assert budgets["limit_kind"] in ("machine", "cgroup v1", "cgroup v2") and budgets["limit_bytes"] > 0
    assert budgets["device_bytes"] == metrics["tiers"]["device"]["budget_bytes"]
    assert budgets["device_bytes"] + budgets["host_bytes"] + budgets["reserve_bytes"] <= (
        budgets["limit_bytes"] - budgets["in_use_bytes"]
    )


def test_progress_goes_to_stderr_and_stdout_is_only_json(json_run: Result) -> None:
    assert "group 1: prefill step 1/1" in json_run.stderr
    assert "step" not in json_run.stdout
    assert json_run.stdout.count("\n") == 1  # one JSON object on one line


def test_tokens_match_the_python_api(model: Path, json_run: Result) -> None:
    result = Engine.load(model, EngineOptions()).generate(PROMPTS, max_new_tokens=MAX_NEW)
    assert tokens(json.loads(json_run.stdout)) == [out.token_ids for out in result.outputs]


def test_output_file_holds_one_json_line_per_prompt(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    record = run_json("--model", str(model), *ID_ARGS, "--max-new-tokens", str(MAX_NEW), "--output", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == record["outputs"]
    assert [line["prompt_ids"] for line in lines] == PROMPTS
    assert [path.name for path in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary file left


def test_human_output_lists_each_prompt_and_the_metrics_rows(model: Path, json_run: Result) -> None:
    result = run_ok("--model", str(model), *ID_ARGS, "--max-new-tokens", str(MAX_NEW))
    lines = result.stdout.splitlines()
    for index, out in enumerate(json.loads(json_run.stdout)["outputs"]):
        ids = " ".join(map(str, out["token_ids"]))
        assert f"[{index}] ({len(out['token_ids'])} tokens, {out['finish_reason']}) {ids}" in lines
    rows = {line.split("  ")[0] for line in lines if "  " in line}
    assert {"prefill", "decode", "expert hit rate", "waited for I/O", "device tier", "host tier"} <= rows
    assert "step" not in result.stdout


@pytest.mark.parametrize(
    ("text", "nbytes"), [("512KiB", 512 * KIB), ("0.5MiB", 512 * KIB), ("2mb", 2_000_000), ("1048576", MIB)]
)
def test_size_options_parse(model: Path, text: str, nbytes: int) -> None:
    record = run_json(
        "--model", str(model), "--prompt-ids", "1,2", "--max-new-tokens", "1",
        "--device-memory", text, "--host-memory", text,
    )  # fmt: skip
    assert record["metrics"]["tiers"]["device"]["budget_bytes"] == nbytes
    assert record["metrics"]["tiers"]["host"]["budget_bytes"] == nbytes


def test_a_tight_device_budget_streams_experts_and_keeps_the_tokens(model: Path, json_run: Result) -> None:
    engine = Engine.load(model, EngineOptions())
    device_min, _ = engine.minimum_budgets(PROMPTS, max_new_tokens=MAX_NEW)
    budget = device_min + 2 * engine.spec.expert_bytes
    record = run_json(
        "--model", str(model), *ID_ARGS, "--max-new-tokens", str(MAX_NEW), "--device-memory", str(budget)
    )
    device = record["metrics"]["tiers"]["device"]
    assert device["budget_bytes"] == budget
    assert device["peak_bytes"] <= budget and device["evictions"] > 0
    assert tokens(record) == tokens(json.loads(json_run.stdout))


@pytest.fixture(scope="module")
def one_by_one(model: Path) -> list[list[int]]:
    """Greedy tokens of MIXED_PROMPTS run one sequence at a time through the Python API."""
    engine = Engine.load(model, EngineOptions(batches=1, batch_size=1))
    return [out.token_ids for out in engine.generate(MIXED_PROMPTS, max_new_tokens=4).outputs]


@pytest.mark.parametrize(("batches", "batch_size"), [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_batch_shapes_give_identical_tokens(
    model: Path, one_by_one: list[list[int]], batches: int, batch_size: int
) -> None:
    id_args = [arg for prompt in MIXED_PROMPTS for arg in ("--prompt-ids", ",".join(map(str, prompt)))]
    record = run_json(
        "--model", str(model), *id_args, "--max-new-tokens", "4",
        "--batches", str(batches), "--batch-size", str(batch_size),
    )  # fmt: skip
    assert tokens(record) == one_by_one


def test_sampling_with_a_seed_is_deterministic(model: Path) -> None:
    args = ("--model", str(model), *ID_ARGS, "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "1")
    first, second = run_json(*args), run_json(*args)
    assert tokens(first) == tokens(second)
    greedy = Engine.load(model, EngineOptions()).generate(PROMPTS, max_new_tokens=6).outputs
    assert tokens(first) != [out.token_ids for out in greedy]  # it did sample


def test_a_text_prompt_runs_as_its_token_ids(demo_dir: Path, tokenizer: Tokenizer) -> None:
    text = "The capital of France is"
    by_text = run_json("--model", str(demo_dir), "--prompt", text, "--max-new-tokens", "4")
    ids = tokenizer.encode(text).ids
    by_ids = run_json(
        "--model", str(demo_dir), "--prompt-ids", ",".join(map(str, ids)), "--max-new-tokens", "4"
    )
    assert by_text["outputs"][0]["prompt_ids"] == ids
    assert tokens(by_text) == tokens(by_ids)
    generated = by_text["outputs"][0]
    assert generated["text"] == tokenizer.decode(generated["token_ids"], skip_special_tokens=True)


def test_a_text_prompts_file_skips_blank_lines(demo_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("Hello world\n\n   \nOnce upon a time\n", encoding="utf-8")
    record = run_json("--model", str(demo_dir), "--prompts", str(path), "--max-new-tokens", "2")
    expected = [tokenizer.encode(text).ids for text in ("Hello world", "Once upon a time")]
    assert [out["prompt_ids"] for out in record["outputs"]] == expected


def test_a_jsonl_prompts_file_mixes_text_and_ids(
    demo_dir: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Hello world"}, {"prompt_ids": [1, 50, 60]}, {"text": "def fibonacci(n):"}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    record = run_json("--model", str(demo_dir), "--prompts", str(path), "--max-new-tokens", "2")
    expected = [tokenizer.encode("Hello world").ids, [1, 50, 60], tokenizer.encode("def fibonacci(n):").ids]
    assert [out["prompt_ids"] for out in record["outputs"]] == expected
    assert all(isinstance(out["text"], str) for out in record["outputs"])


def test_prompt_kinds_combine_in_order(demo_dir: Path, tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("from a file\n", encoding="utf-8")
    record = run_json(
        "--model", str(demo_dir), "--prompt-ids", "1,7", "--prompts", str(path), "--prompt", "typed",
        "--max-new-tokens", "1",
    )  # fmt: skip
    expected = [tokenizer.encode("typed").ids, tokenizer.encode("from a file").ids, [1, 7]]
    assert [out["prompt_ids"] for out in record["outputs"]] == expected


@pytest.mark.parametrize("many", [False, True])
def test_planning_many_text_prompts_shows_progress(
    demo_dir: Path, monkeypatch: pytest.MonkeyPatch, many: bool
) -> None:
    """Tokenizing millions of prompts for the plan takes minutes: a progress line says so; a few, none."""
    if many:
        monkeypatch.setattr(progress, "LONG_PASS_ITEMS", 2)  # three prompts are then many
    texts = [arg for text in ("one", "two", "three") for arg in ("--prompt", text)]
    result = run_ok("--model", str(demo_dir), *texts, "--max-new-tokens", "1")
    assert ("planning: measuring the prompts" in result.stderr) is many


@pytest.mark.slow
def test_the_default_run_builds_and_runs_the_demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(cache))
    try:
        result = run_ok("--max-new-tokens", "2", "--prompt", "Hello")
        device_rows = [line for line in result.stdout.splitlines() if line.startswith("device tier")]
        assert len(device_rows) == 1 and DEMO_BUDGET_TEXT in device_rows[0]
        assert result.stdout.startswith("[0] (")
        assert any(path.name.startswith("demo-mixtral") for path in cache.iterdir())
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # ~370 MB: not worth keeping in pytest's tmp dirs


@pytest.mark.parametrize("command", [["run"], ["config", "show"], ["replay"]])
def test_help_names_every_registered_policy(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"], terminal_width=400)
    assert result.exit_code == 0
    for name in [*PREFETCH_POLICIES.names(), *EVICTION_POLICIES.names()]:
        assert name in result.stdout, f"{' '.join(command)} --help does not name {name}"
