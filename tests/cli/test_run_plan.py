"""``klotski-tier run --plan auto|off``: the planner picks n, bs, K and preload where the user set none,
explicit flags, config files and presets win, the tokens never change, and without a machine profile
the run keeps the defaults and says how to enable planning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from klotski_tier.cli import run as run_command
from klotski_tier.cli.main import main
from klotski_tier.cli.options import options_and_explicit
from klotski_tier.core.bench.profile import MachineProfile
from klotski_tier.core.plan.autoplan import PLANNED_FIELDS
from klotski_tier.core.plan.hardware import local_machine
from klotski_tier.core.plan.planner import PlanRequest, make_plan
from klotski_tier.core.runtime.config import EngineOptions
from klotski_tier.core.runtime.engine import Engine
from klotski_tier.core.store.files import ModelFiles, open_model
from tests.conftest import BENCH_PROFILE, CheckpointFactory

PROFILE = BENCH_PROFILE
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12]]
MAX_NEW = 3
# the fields a plan sets
PLANNED = sorted(PLANNED_FIELDS)  # every field a plan sets, as run --json lists them
DEFAULTS = EngineOptions()


pytestmark = pytest.mark.usefixtures("empty_cache")


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral")


def run(model: Path, *args: str) -> tuple[str, str]:
    id_args = [arg for prompt in PROMPTS for arg in ("--prompt-ids", ",".join(map(str, prompt)))]
    args = ("--model", str(model), *id_args, "--max-new-tokens", str(MAX_NEW), *args)
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 0, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    return result.stdout, result.stderr


def run_json(model: Path, *args: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(run(model, *args, "--json")[0])
    return record


def tokens(record: dict[str, Any]) -> list[list[int]]:
    return [out["token_ids"] for out in record["outputs"]]


@pytest.fixture(scope="module")
def planned_off(model: Path) -> dict[str, Any]:
    return run_json(model, "--plan", "off")


def expected_plan(model: Path, **fixed: Any) -> dict[str, Any]:
    """The plan for these prompts on the profile's machine, asked of the planner directly."""
    request = PlanRequest(
        open_model(model).spec, local_machine(PROFILE), sequences=len(PROMPTS),
        prompt_tokens=max(map(len, PROMPTS)), new_tokens=MAX_NEW, **fixed,
    )  # fmt: skip
    options: dict[str, Any] = make_plan(request).engine_options()
    return options


def test_auto_takes_n_bs_k_and_preload_from_the_plan(model: Path, planned_off: dict[str, Any]) -> None:
    record = run_json(model, "--profile", str(PROFILE))
    plan = record["plan"]
    assert plan["mode"] == "auto" and plan["used"] and plan["planned"] == PLANNED
    budgets = {f"{tier}_memory_bytes": plan["budgets"][f"{tier}_bytes"] for tier in ("device", "host")}
    assert {key: plan[key] for key in PLANNED} == expected_plan(model, **budgets)
    assert plan["predicted_decode_tokens_per_s"] > 0 and plan["binding"]["number"] in (4, 5, 6, 7)
    assert tokens(record) == tokens(planned_off)  # scheduling never changes tokens


def test_the_model_opens_and_the_profile_loads_once_and_the_engine_has_the_planned_options(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[EngineOptions | None] = []
    opened: list[Path] = []
    profiles: list[Path] = []
    load, open_files, read_profile = Engine.from_files, run_command.open_model, MachineProfile.load

    def counting_load(cls: type[Engine], *args: Any, **kwargs: Any) -> Engine:
        engine = load(*args, **kwargs)
        loaded.append(engine.options)
        return engine

    def counting_open(path: Path) -> ModelFiles:
        opened.append(path)
        return open_files(path)

    def counting_read(cls: type[MachineProfile], path: Path) -> MachineProfile:
        profiles.append(path)
        return read_profile(path)

    monkeypatch.setattr(Engine, "from_files", classmethod(counting_load))
    monkeypatch.setattr(run_command, "open_model", counting_open)
    monkeypatch.setattr(MachineProfile, "load", classmethod(counting_read))
    plan = run_json(model, "--profile", str(PROFILE))["plan"]
    assert len(loaded) == 1 and loaded[0] is not None
    assert opened == [model] and profiles == [PROFILE]
    assert {key: getattr(loaded[0], key) for key in PLANNED} == {key: plan[key] for key in PLANNED}


def test_off_keeps_the_defaults(planned_off: dict[str, Any]) -> None:
    plan = planned_off["plan"]
    assert plan["mode"] == "off" and not plan["used"] and plan["planned"] == []
    assert (plan["batches"], plan["batch_size"]) == (DEFAULTS.batches, DEFAULTS.batch_size)


def test_explicit_flags_win_over_the_plan(model: Path, planned_off: dict[str, Any]) -> None:
    record = run_json(model, "--profile", str(PROFILE), "--batches", "3", "--hot-experts", "1")
    plan = record["plan"]
    assert (plan["batches"], plan["hot_experts"]) == (3, 1)
    assert plan["planned"] == sorted(set(PLANNED_FIELDS) - {"batches", "hot_experts"})
    assert plan["batch_size"] == expected_plan(model, batches=3, hot_experts=1)["batch_size"]
    assert tokens(record) == tokens(planned_off)


def test_config_files_and_presets_count_as_explicit(model: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[pipeline]\nbatch_size = 1\n\n[host]\npreload = false\n", encoding="utf-8")
    plan = run_json(model, "--profile", str(PROFILE), "--config", str(config), "--preset", "sequential")[
        "plan"
    ]
    assert (plan["batches"], plan["batch_size"], plan["host_preload"]) == (1, 1, False)
    preset = {"batches", "batch_size", "host_preload", "eviction"}  # the config's and the preset's
    assert plan["planned"] == sorted(set(PLANNED_FIELDS) - preset)


def test_the_table_names_the_plan(model: Path) -> None:
    out, _ = run(model, "--profile", str(PROFILE))
    line = next(line for line in out.splitlines() if line.startswith("plan: "))
    assert line.startswith("plan: n=") and "(auto: predicted " in line and "decode tok/s" in line
    out, _ = run(model, "--plan", "off")
    assert f"plan: off, n={DEFAULTS.batches}, bs={DEFAULTS.batch_size}" in out


def test_without_a_profile_auto_plans_from_conservative_defaults_and_says_so(
    model: Path, planned_off: dict[str, Any]
) -> None:
    record = run_json(model)
    plan = record["plan"]
    assert plan["mode"] == "auto" and plan["used"] and "klotski-tier bench" in plan["note"]
    assert plan["basis"].startswith("this (not measured): conservative defaults")
    assert plan["batches"] * plan["batch_size"] >= len(PROMPTS)  # memory allows a group of every prompt
    assert tokens(record) == tokens(planned_off)
    out, _ = run(model)
    line = next(line for line in out.splitlines() if line.startswith("plan: "))
    assert (
        "for this (not measured): conservative defaults" in line and "`klotski-tier bench` measures" in line
    )


def test_options_and_explicit_name_only_what_the_user_set(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[pipeline]\nhot_experts = 2\n", encoding="utf-8")
    flags: dict[str, Any] = {
        "config_file": config, "preset": "ram-rich", "batches": None, "batch_size": 3, "hot_experts": None,
        "device": None, "prefetch": None, "eviction": None, "prefetch_trace": None,
        "device_memory": None, "host_memory": "1GiB",
    }  # fmt: skip
    options, explicit = options_and_explicit(flags, device_memory_bytes=1024)
    assert explicit >= {"batch_size", "hot_experts", "host_memory_bytes", "host_preload"}
    assert not explicit & {"batches", "device_memory_bytes"}
    assert (options.batch_size, options.hot_experts, options.device_memory_bytes) == (3, 2, 1024)
    assert flags == {}  # every configuration flag was taken
