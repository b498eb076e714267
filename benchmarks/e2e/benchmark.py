"""The whole benchmark: build the model, measure the runtime and the drive, run the points, write results.

:func:`run_benchmark` is what ``python -m benchmarks.e2e`` calls (and the test suite, at tiny
size). One run:

1. the bench model is built once (cached) and the workload's prompts are made; with ``llamacpp``
   among the systems, llama.cpp is built and the model converted to GGUF once (cached);
2. the runtime allowance is measured (an idle worker's peak), unless given;
3. the drive's raw O_DIRECT bandwidth is measured on a test file beside the model;
4. klotski's configuration mode is settled: ``plan`` (the planner's n, bs, K at each budget) needs
   the ``klotski-tier bench`` machine profile; without one it is ``sweep``, with a one-line note;
5. each point (one budget, or a sweep over n or over budgets) runs every system and the bound,
   checking that every run generates the reference tokens;
6. the JSON, the chart and the machine profile are written to ``out``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.e2e.bound import drive_gbps
from benchmarks.e2e.compare import Comparison, PointPlan
from benchmarks.e2e.llamacpp_peer import prepare
from benchmarks.e2e.model import BENCH_SHAPES, bench_store_dir, resolve_model
from benchmarks.e2e.planning import KLOTSKI_CONFIGS, PLAN, klotski_mode
from benchmarks.e2e.report import chart_point, chart_sweep, copy_machine_profile, write_json
from benchmarks.e2e.results import Point
from benchmarks.e2e.runner import DEFAULT_TIMEOUT_S, Runner, RunnerSettings
from benchmarks.e2e.systems import DEVICE_NOTE, KLOTSKI, SYSTEMS, Inputs, budget_for
from benchmarks.e2e.worker import LLAMACPP
from benchmarks.e2e.workload import Workload, make_prompts
from klotski_tier.core.bench.profile import default_profile_path
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.layouts import total_block_bytes
from klotski_tier.core.store.files import ModelFiles, load_model_files
from klotski_tier.core.units import MIB

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the JSON result
RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
SWEEPS = ("batches", "budget")
SWEEP_SYSTEMS = (KLOTSKI, "flexgen")  # the systems whose n the batches sweep varies
DEFAULT_SWEEP_BUDGETS = (0.125, 0.25, 0.5, 0.75, 1.0)  # an eighth of the model up to all of it
DEFAULT_DRIVE_FILE_BYTES = 1024 * MIB


CHECKPOINT, STORE = "checkpoint", "store"
ENGINE_READS = (CHECKPOINT, STORE)  # the engine reads a checkpoint (O_DIRECT) by default, a store on ask


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run is asked to do (the command line, as data)."""

    model: str = "e2e-2g"  # a bench model name, or a checkpoint directory
    workload: Workload = field(default_factory=lambda: Workload(16, 16, 16))
    systems: Sequence[str] = SYSTEMS
    budget: float = 0.25  # fraction of the model's bytes
    batches: Sequence[int] = (1, 2, 4, 8, 16)  # n: klotski's sweep (the batches sweep's x axis)
    batch_size: int | None = None  # None: the planner's, or all N prompts in one group (bs = ceil(N / n))
    klotski_hot_experts: int | str | None = None  # K of klotski; None: the planner's, "all" when swept
    klotski_config: str = PLAN  # PLAN: klotski's n, bs, K from the planner; SWEEP: n the best of batches
    profile_path: Path | None = None  # the klotski-tier bench profile; None: where bench writes it
    repeats: int = 3
    sweep: str | None = None  # None, "batches" or "budget"
    sweep_budgets: Sequence[float] = DEFAULT_SWEEP_BUDGETS
    use_cgroup: bool = True
    out: Path = RESULTS_DIR
    allowance_bytes: int | None = None  # None: measured by an idle worker
    drive_file_bytes: int = DEFAULT_DRIVE_FILE_BYTES
    accelerate_batch: int | None = None  # None: the largest that fits
    timeout_s: float = DEFAULT_TIMEOUT_S
    trace: bool = False  # save one extra klotski run's Chrome trace beside the results
    bound_beside_reads: bool = False  # also time the bound's runs with the drive reading what must move
    engine_reads: str = CHECKPOINT  # what the engine's systems read: the checkpoint (default) or the store
    cache_dir: Path | None = None  # where bench models are built (default: the klotski-tier cache)
    llamacpp_root: Path | None = None  # where llama.cpp is built (default: beside the bench models)
    command: str = ""  # the command line, recorded in the JSON

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ConfigError(f"unknown system {unknown[0]!r}; valid systems: {', '.join(SYSTEMS)}")
        if self.sweep is not None and self.sweep not in SWEEPS:
            raise ConfigError(f"unknown sweep {self.sweep!r}; valid sweeps: {', '.join(SWEEPS)}")
        if self.klotski_config not in KLOTSKI_CONFIGS:
            raise ConfigError(
                f"unknown klotski config {self.klotski_config!r}; valid: {', '.join(KLOTSKI_CONFIGS)}"
            )
        if self.engine_reads not in ENGINE_READS:
            valid = ", ".join(ENGINE_READS)
            raise ConfigError(f"unknown --engine-reads {self.engine_reads!r}; valid: {valid}")
        if self.repeats < 1 or (self.batch_size or 1) < 1 or not self.batches or min(self.batches) < 1:
            raise ConfigError("repeats, batch size and every n of --batches must be at least 1")

    @property
    def stem(self) -> str:
        name = self.model if self.model in BENCH_SHAPES else Path(self.model).name
        stem = name if name.startswith("e2e") else f"e2e-{name}"
        return stem + (f"-{self.sweep}" if self.sweep else "")

    @property
    def profile(self) -> Path:
        return self.profile_path if self.profile_path is not None else default_profile_path()


@dataclass
class BenchOutcome:
    payload: dict[str, Any]  # what the JSON file holds
    points: list[Point]
    xs: list[float]  # the swept quantity of each point (the budget fraction without a sweep)
    files: list[Path]  # written
    note: str = ""  # one line when klotski is not configured as asked (no machine profile)


def run_benchmark(config: BenchConfig) -> BenchOutcome:
    """Run every point of ``config``; write and return the results."""
    model_dir = resolve_model(config.model, config.cache_dir)
    files = load_model_files(model_dir)
    prompts = make_prompts(model_dir, config.workload)
    mode, note = klotski_mode(config.klotski_config, config.profile, config.sweep)
    if note:
        logger.warning("%s", note)
    runs_llamacpp = LLAMACPP in config.systems and config.sweep != "batches"  # that sweep: the engine only
    llamacpp = prepare(model_dir, config.llamacpp_root) if runs_llamacpp else None
    scratch = Path(tempfile.mkdtemp(prefix=".e2e-scratch-", dir=model_dir.parent))  # on the model's drive
    try:
        runner = Runner(RunnerSettings(model_dir, scratch, config.use_cgroup, config.timeout_s))
        allowance = config.allowance_bytes or runner.runtime_allowance()
        gbps = drive_gbps(model_dir.parent, config.drive_file_bytes)
        store = bench_store_dir(model_dir) if config.engine_reads == STORE else None
        inputs = Inputs(model_dir, prompts, config.workload.new_tokens, store, llamacpp)
        comparison = Comparison(runner, inputs, files, gbps)
        plan = _point_plan(config, mode)
        xs, points = _run_points(config, plan, comparison, total_block_bytes(files.layouts), allowance)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    payload = _payload(config, files, model_dir, allowance, gbps, xs, points)
    payload["klotski_config"] = {"requested": config.klotski_config, "used": mode, "note": note or None}
    payload["engine_reads"] = config.engine_reads
    return BenchOutcome(payload, points, xs, _write(config, payload, xs, points, gbps), note)


def _point_plan(config: BenchConfig, mode: str) -> PointPlan:
    """What every point runs; the profile plans (``mode`` PLAN) or predicts (SWEEP) when it exists."""
    return PointPlan(
        config.systems, config.batches, config.batch_size, config.repeats, config.accelerate_batch,
        config.out if config.trace else None, config.klotski_hot_experts, mode,
        config.profile if config.profile.is_file() else None, config.bound_beside_reads,
    )  # fmt: skip


def _run_points(
    config: BenchConfig, plan: PointPlan, comparison: Comparison, model_bytes: int, allowance: int
) -> tuple[list[float], list[Point]]:
    if config.sweep == "batches":  # n set explicitly: no planning (predictions only)
        systems = [s for s in config.systems if s in SWEEP_SYSTEMS] or [KLOTSKI]
        budget = budget_for(config.budget, model_bytes, allowance)
        plans = [
            replace(plan, systems=systems, batches=[n], accelerate_batch=None, trace_dir=None)
            for n in config.batches
        ]
        return [float(n) for n in config.batches], [comparison.point(p, budget) for p in plans]
    fractions = list(config.sweep_budgets) if config.sweep == "budget" else [config.budget]
    return fractions, [comparison.point(plan, budget_for(f, model_bytes, allowance)) for f in fractions]


def _payload(
    config: BenchConfig,
    files: ModelFiles,
    model_dir: Path,
    allowance: int,
    gbps: float,
    xs: list[float],
    points: list[Point],
) -> dict[str, Any]:
    spec = files.spec
    return {
        "benchmark": "e2e",
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": config.command,
        "device": DEVICE_NOTE,
        "cgroup": config.use_cgroup,
        "model": {
            "name": config.model,
            "directory": str(model_dir),
            "bytes": total_block_bytes(files.layouts),
            "layers": spec.num_layers,
            "experts": spec.num_experts,
            "top_k": spec.top_k,
            "hidden_size": spec.hidden_size,
            "expert_bytes": spec.expert_bytes,
        },
        "workload": config.workload.to_dict(),
        "repeats": config.repeats,
        "runtime_allowance_bytes": allowance,
        "drive_raw_gbps": gbps,
        "sweep": config.sweep,
        "x": xs,
        "points": [p.to_dict() for p in points],
    }


def _write(
    config: BenchConfig, payload: dict[str, Any], xs: list[float], points: list[Point], gbps: float
) -> list[Path]:
    config.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = config.out / f"{config.stem}.json", config.out / f"{config.stem}.png"
    profile_path = config.out / f"{config.stem}-machine.json"
    write_json(json_path, payload)
    title = f"{config.model}: {config.workload.describe()}, on the CPU"
    if config.sweep == "batches":
        chart_sweep(
            xs, points, png_path, "n (batches per group)", f"{title}, budget {config.budget:g} of the model"
        )
    elif config.sweep == "budget":
        chart_sweep(xs, points, png_path, "memory budget (fraction of the model)", title)
    else:
        chart_point(points[0], png_path, f"{title}, budget {config.budget:g} of the model")
    copy_machine_profile(profile_path, gbps, config.profile)
    return [json_path, png_path, profile_path]
