"""The end-to-end benchmark at tiny size, so that it cannot rot; and its parts that decide things.

The tiny run uses real worker processes, each in a memory cgroup where the machine allows it
(root with a cgroup v1 memory controller, as on CI), and checks what the full benchmark
promises: identical tokens, a well-formed JSON, a chart, peak memory from the cgroup, and klotski
configured by the planner (with the test machine profile) with its prediction beside the measured
throughput. The accelerate peer runs in this process (its imports cost seconds a worker would pay
again).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.e2e.__main__ import config_from, parser
from benchmarks.e2e.accelerate_peer import run_accelerate
from benchmarks.e2e.benchmark import BenchConfig, BenchOutcome, run_benchmark
from benchmarks.e2e.bound import must_move_bytes
from benchmarks.e2e.cgroup import (
    MemoryGroup,
    cgroups_usable,
    check_available,
    group_name,
    memory_root,
    own_memory_path,
)
from benchmarks.e2e.compare import Comparison, PointPlan
from benchmarks.e2e.model import BENCH_SHAPES, model_bytes
from benchmarks.e2e.planning import PLAN, SWEEP, KlotskiPlan, klotski_mode, plan_klotski, predict_config
from benchmarks.e2e.report import chart_sweep, format_point
from benchmarks.e2e.results import Point, RunRecord, TokenMismatch, check_tokens
from benchmarks.e2e.runner import _record
from benchmarks.e2e.systems import Inputs, budget_for, preset_problem
from benchmarks.e2e.worker import ACCELERATE, Job
from benchmarks.e2e.workload import Workload, make_prompts
from klotski_tier.core.demo.build import build_demo
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.blocks import BlockLayout, attn_block, expert_block
from klotski_tier.core.observe.routing_trace import RoutingTrace, TraceMeta
from klotski_tier.core.store.files import load_model_files
from klotski_tier.core.units import GIB, MIB

WORKLOAD = Workload(prompts=4, prompt_tokens=8, new_tokens=4)
BUDGET = 0.5  # half the model: accelerate sends layers to disk, the engine streams experts
PNG_MAGIC = b"\x89PNG"
PROFILE = Path(__file__).parents[1] / "data" / "machine-profile.json"  # a CPU profile with compute rates


CGROUPS = cgroups_usable()
needs_cgroups = pytest.mark.skipif(not CGROUPS, reason="needs root and a cgroup v1 memory controller")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("bench") / "tiny", BENCH_SHAPES["tiny"])


@pytest.fixture(scope="module")
def outcome(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> BenchOutcome:
    config = BenchConfig(
        model=str(tiny),
        workload=WORKLOAD,
        systems=("klotski",),  # three workers (klotski, the bound, beside reads) of a few seconds each
        budget=BUDGET,
        repeats=1,
        profile_path=PROFILE,  # klotski planned: n, bs and K are the planner's
        use_cgroup=CGROUPS,
        out=tmp_path_factory.mktemp("results"),
        allowance_bytes=1 * GIB,  # skip the idle probe: seconds of imports
        drive_file_bytes=4 * MIB,
        bound_beside_reads=True,
    )
    return run_benchmark(config)


def test_every_system_generates_the_reference_tokens(outcome: BenchOutcome) -> None:
    point = outcome.points[0]
    reference = point.bound_runs[0].tokens
    assert len(reference) == WORKLOAD.prompts
    assert all(len(tokens) == WORKLOAD.new_tokens for tokens in reference)
    klotski = point.system("klotski")
    assert klotski is not None and klotski.ok, klotski
    assert [run.tokens for run in klotski.runs] == [reference]


def test_results_json_is_well_formed(outcome: BenchOutcome) -> None:
    json_path, png_path, profile_path = outcome.files
    data = json.loads(json_path.read_text())
    assert data["benchmark"] == "e2e" and data["workload"] == WORKLOAD.to_dict()
    point = data["points"][0]
    assert point["budget"]["limit_bytes"] == point["budget"]["weight_bytes"] + 1 * GIB
    klotski = next(s for s in point["systems"] if s["name"] == "klotski")
    assert klotski["median"]["tokens_per_s"] > 0 and klotski["median"]["bytes_read"] is not None
    assert data["klotski_config"] == {"requested": PLAN, "used": PLAN, "note": None}
    assert data["engine_reads"] == "checkpoint"  # the engine's default: the safetensors, O_DIRECT
    notes = klotski["notes"]
    assert notes["config"] == PLAN and notes["predicted"]["tokens_per_s"] > 0
    assert notes["predicted"]["decode_tokens_per_s"] > 0
    planned = (notes["batches"], notes["batch_size"], notes["hot_experts"])
    assert planned == tuple(notes["predicted"][k] for k in ("batches", "batch_size", "hot_experts"))
    assert f"n={planned[0]} x bs={planned[1]}, K={planned[2]}" in klotski["config"]
    bound = point["bound"]
    assert (bound["batches"], bound["batch_size"]) == planned[:2]  # the bound runs klotski's grouping
    assert bound["compute_s"] > 0 and bound["must_move_bytes"] > 0 and bound["drive_gbps"] > 0
    assert bound["seconds"] == max(bound["compute_s"], bound["io_s"])
    assert bound["beside_reads_seconds"] == max(bound["beside_reads_compute_s"], bound["io_s"]) > 0
    beside = next(run for run in point["bound_runs"] if run["system"] == "bound-beside-reads")
    assert beside["streamed_bytes"] >= min(bound["must_move_bytes"], 1) and "stream_s" in beside
    assert png_path.read_bytes()[:4] == PNG_MAGIC
    assert json.loads(profile_path.read_text())


def test_sweep_chart_is_drawn(outcome: BenchOutcome, tmp_path: Path) -> None:
    chart_sweep([1.0, 2.0], [outcome.points[0]] * 2, tmp_path / "sweep.png", "n", "sweep")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == PNG_MAGIC


def test_config_names_outputs_and_refuses_unknown_systems() -> None:
    assert BenchConfig(model="e2e-2g", sweep="budget").stem == "e2e-2g-budget"
    assert BenchConfig(model="/models/tiny").stem == "e2e-tiny"
    with pytest.raises(ConfigError, match="unknown system 'vllm'"):
        BenchConfig(systems=("vllm",))


def test_table_names_every_system_and_the_bound(outcome: BenchOutcome) -> None:
    table = format_point(outcome.points[0])
    assert "klotski" in table and "bound: max(compute" in table and "budget: 0.5 of the model" in table
    assert "pred t/s" in table and "[planned]" in table and "klotski predicted by the planner: " in table
    assert "bound beside reads: max(compute " in table and "; of it: klotski " in table


@pytest.mark.skipif(not CGROUPS, reason="needs root and a cgroup v1 memory controller")
def test_peak_memory_comes_from_the_cgroup(outcome: BenchOutcome) -> None:
    klotski = outcome.points[0].system("klotski")
    assert klotski is not None
    run = klotski.runs[0]
    assert run.peak_source == "cgroup"
    assert run.peak_bytes is not None and 0 < run.peak_bytes <= outcome.points[0].budget.limit_bytes


def test_accelerate_peer_offloads_and_matches_the_engine(
    outcome: BenchOutcome, tiny: Path, tmp_path: Path
) -> None:
    prompts = make_prompts(tiny, WORKLOAD)
    budget = outcome.points[0].budget.weight_bytes
    job = Job(ACCELERATE, ACCELERATE, str(tiny), prompts, WORKLOAD.new_tokens, weight_budget_bytes=budget,
              batch_size=WORKLOAD.prompts, offload_dir=str(tmp_path / "offload"))  # fmt: skip
    result = run_accelerate(job)
    assert result["details"]["placed_bytes"].get("disk", 0) > 0
    assert result["tokens"] == outcome.points[0].bound_runs[0].tokens
    assert result["prefill_s"] > 0 and result["decode_s"] > 0 and result["hook_load_s"] > 0


# ---- klotski's configuration ---------------------------------------------------------------------


def test_without_a_profile_klotski_is_swept_with_a_one_line_note(tmp_path: Path) -> None:
    mode, note = klotski_mode(PLAN, tmp_path / "missing.json", None)
    assert mode == SWEEP and "no machine profile" in note and "klotski-tier bench" in note
    assert "\n" not in note
    assert klotski_mode(PLAN, PROFILE, None) == (PLAN, "")
    assert klotski_mode(PLAN, PROFILE, "batches") == (SWEEP, "")  # the batches sweep sets n itself
    assert klotski_mode(SWEEP, PROFILE, None) == (SWEEP, "")


def test_planner_keeps_what_is_fixed_and_predicts_each_n(tiny: Path) -> None:
    work = Inputs(tiny, make_prompts(tiny, WORKLOAD), WORKLOAD.new_tokens)
    files = load_model_files(tiny)
    budget = budget_for(BUDGET, model_bytes(tiny), 1 * GIB)
    chosen = plan_klotski(work, files, budget, PROFILE, batch_size=2, hot_experts="all")
    assert isinstance(chosen, KlotskiPlan), chosen
    assert chosen.batch_size == 2 and chosen.hot_experts == "all" and chosen.prediction.tokens_per_s > 0
    for n in (1, 2):
        predicted = predict_config(work, files, budget, PROFILE, n, 2, None)
        assert predicted is not None
        assert (predicted.batches, predicted.batch_size, predicted.hot_experts) == (n, 2, files.spec.top_k)
        assert predicted.tokens_per_s > 0 and not predicted.host_preload


class _FakeRunner:
    """Runs nothing: each engine job "succeeds", faster the more batches it has."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def run(self, job: Job, limit_bytes: int | None) -> RunRecord:
        self.jobs.append(job)
        n = int(job.engine_options["batches"])
        output = {
            "tokens": [],
            "generated_tokens": 8,
            "decode_tokens": 4,
            "prefill_s": 1.0 / n,
            "decode_s": 1.0,
        }
        return RunRecord(job.system, True, output, None, "rss")


def test_swept_klotski_carries_the_planners_prediction_for_each_n(tiny: Path) -> None:
    work = Inputs(tiny, make_prompts(tiny, WORKLOAD), WORKLOAD.new_tokens)
    runner = _FakeRunner()
    comparison = Comparison(runner, work, load_model_files(tiny), 1.0)  # type: ignore[arg-type]
    plan = PointPlan(["klotski"], [1, 2], None, 1, profile=PROFILE)
    result = comparison._system(plan, "klotski", budget_for(BUDGET, model_bytes(tiny), 1 * GIB))
    notes = result.notes
    assert notes["config"] == SWEEP and notes["batches"] == 2 and notes["hot_experts"] == "all"
    assert all(notes["sweep"][n]["predicted_tokens_per_s"] > 0 for n in ("1", "2"))
    assert notes["predicted"]["batches"] == 2 and notes["predicted"]["batch_size"] == 2


def test_a_budget_the_planner_cannot_plan_is_swept_saying_why(tiny: Path) -> None:
    work = Inputs(tiny, make_prompts(tiny, WORKLOAD), WORKLOAD.new_tokens)
    comparison = Comparison(_FakeRunner(), work, load_model_files(tiny), 1.0)  # type: ignore[arg-type]
    plan = PointPlan(["klotski"], [1], None, 1, klotski_config=PLAN, profile=PROFILE)
    budget = budget_for(1e-6, model_bytes(tiny), 1 * GIB)  # below any working set
    result = comparison._system(plan, "klotski", budget)
    assert result.notes["config"] == SWEEP and "cannot plan" in result.notes["plan_note"]
    assert "klotski: not planned at this budget: " in format_point(Point(budget, [result], None))


def test_command_line_plans_klotski_by_default() -> None:
    args = parser().parse_args([])
    assert args.klotski_config == PLAN and args.klotski_hot_experts is None
    config = config_from(parser().parse_args(["--klotski-config", "sweep", "--klotski-hot-experts", "3"]))
    assert config.klotski_config == SWEEP and config.klotski_hot_experts == 3
    with pytest.raises(ConfigError, match="unknown klotski config 'auto'"):
        BenchConfig(klotski_config="auto")
    with pytest.raises(ConfigError, match="unknown --engine-reads 'gguf'; valid: checkpoint, store"):
        BenchConfig(engine_reads="gguf")


def test_unregistered_presets_are_skipped_with_a_reason() -> None:
    assert preset_problem("no-such-baseline") is not None
    assert "not registered" in (preset_problem("no-such-baseline") or "")


def test_prompts_have_exactly_p_tokens_and_differ(tiny: Path) -> None:
    prompts = make_prompts(tiny, Workload(prompts=9, prompt_tokens=12, new_tokens=1))
    assert all(len(p) == 12 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 9


# ---- token check ------------------------------------------------------------------------------


def _run(system: str, tokens: list[list[int]]) -> RunRecord:
    output = {"tokens": tokens, "generated_tokens": 0, "decode_tokens": 0, "prefill_s": 1.0, "decode_s": 1.0}
    return RunRecord(system, True, output, None, "rss")


def test_token_mismatch_names_the_first_differing_prompt_and_position() -> None:
    expected = [[5, 6, 7], [8, 9, 10]]
    check_tokens("bound", expected, [_run("klotski", [[5, 6, 7], [8, 9, 10]])])
    with pytest.raises(
        TokenMismatch, match=r"accelerate generated token 11 at prompt 1, position 2, where bound"
    ):
        check_tokens(
            "bound", expected, [_run("klotski", expected), _run("accelerate", [[5, 6, 7], [8, 9, 11]])]
        )
    with pytest.raises(TokenMismatch, match=r"generated nothing at prompt 0, position 2"):
        check_tokens("bound", expected, [_run("sequential", [[5, 6], [8, 9, 10]])])


def test_failed_runs_are_not_compared() -> None:
    failed = RunRecord("accelerate", False, {}, None, "cgroup", "killed", oom=True)
    check_tokens("bound", [[1]], [failed])


# ---- bytes the workload must move ----------------------------------------------------------------


def test_must_move_counts_cold_blocks_and_what_the_budget_cannot_keep() -> None:
    layouts = {
        attn_block(0): BlockLayout(attn_block(0), (), (), 10),
        **{expert_block(0, e): BlockLayout(expert_block(0, e), (), (), 100) for e in range(4)},
    }
    meta = TraceMeta("mixtral", num_layers=1, num_experts=4, top_k=1, hidden_size=8, expert_bytes=100)
    steps = tuple(np.array([[[e] for e in experts]], dtype=np.int16) for experts in ([0, 1], [1], [2]))
    trace = RoutingTrace(meta, steps)  # step needs: attn + {0, 1}; attn + {1}; attn + {2}
    assert must_move_bytes(trace, layouts, resident_bytes=10**6) == 210 + 0 + 100  # each block once
    assert must_move_bytes(trace, layouts, resident_bytes=0) == 210 + 110 + 110  # nothing kept
    assert must_move_bytes(trace, layouts, resident_bytes=60) == 210 + 50 + 100  # 60 B kept of step 2's 110


# ---- cgroups -----------------------------------------------------------------------------------


def test_no_memory_controller_is_a_one_line_error(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    with pytest.raises(ConfigError, match=r"no cgroup v1 memory controller .*--no-cgroup") as info:
        memory_root(mounts)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        memory_root(tmp_path / "missing")


def test_memory_controller_and_own_group_are_found(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /cg/memory cgroup rw,nosuid,memory 0 0\n")
    assert memory_root(mounts) == Path("/cg/memory")
    own = tmp_path / "cgroup"
    own.write_text("5:cpu:/\n4:memory:/jobs/abc\n0::/\n")
    assert own_memory_path(own) == "jobs/abc"


def test_cgroups_need_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match=r"need root .*--no-cgroup"):
        check_available()


@needs_cgroups
def test_a_group_holds_its_child_reports_its_peak_and_kills_beyond_its_limit() -> None:
    group = MemoryGroup.create(group_name("test-limit"), 64 * MIB)
    try:
        allocate = "import sys; sys.stdout.write('x'); sys.stdout.flush(); bytearray(256 * 2**20)"
        proc = subprocess.run(group.wrap([sys.executable, "-c", allocate]), capture_output=True, check=False)
        assert proc.returncode != 0 and proc.stdout == b"x"
        assert group.oom_kills() >= 1
        assert 0 < group.peak_bytes() <= 64 * MIB
        assert group.limit_bytes() == 64 * MIB
    finally:
        group.remove()
    assert not group.path.exists()


def test_a_killed_or_silent_worker_is_a_failed_run() -> None:
    killed = subprocess.CompletedProcess(["w"], -9, stdout="", stderr="")
    record = _record("accelerate", killed, 900 * MIB, 1, 900 * MIB, 60.0)
    assert (
        not record.ok and record.oom and "OOM killer at its 900.00 MiB cgroup limit" in (record.reason or "")
    )
    timed_out = _record("klotski", None, None, 0, None, 60.0)
    assert timed_out.reason == "timed out after 60 s"
    silent = subprocess.CompletedProcess(["w"], 1, stdout="", stderr="Traceback\nValueError: boom\n")
    assert (
        _record("klotski", silent, None, 0, None, 60.0).reason
        == "exited with code 1 and no result: ValueError: boom"
    )
    errored = subprocess.CompletedProcess(
        ["w"], 1, stdout='E2E-RESULT {"ok": false, "error": "BudgetError: low"}\n', stderr=""
    )
    record = _record("klotski", errored, None, 0, None, 60.0)
    assert record.reason == "BudgetError: low" and not record.oom
