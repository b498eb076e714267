"""One point of the benchmark: every system at one memory budget, the lower bound, the token check.

Each system runs ``repeats`` times in fresh workers; a system that picks a configuration does so
first and says how:

- ``klotski`` planned (``--klotski-config plan``): the planner's n, bs, K and preload for this budget
  (:mod:`benchmarks.e2e.planning`), its predicted tokens/s kept beside the measured ones;
- ``klotski`` swept (and ``flexgen`` unless its preset fixes n): one run per n of ``batches``, the
  fastest n kept; its run counts as the first repeat; with a machine profile, klotski's notes give
  the planner's prediction for each n tried;
- ``accelerate``: all N prompts in one batch, halved after every run killed for memory, until a
  batch fits (the first run that fits counts as the first repeat);
- ``llamacpp``: llama.cpp's driver, all N prompts at once (:mod:`benchmarks.e2e.llamacpp_peer`);
  skipped, saying why, when it could not be built or the model not converted;
- the bound: the engine with every weight resident at the grouping (n x bs) ``klotski`` chose, ``repeats``
  times, and the routing of its first run for the bytes the workload must move.

The bound's first run is the token reference; every run of every engine system (and accelerate's)
must match it exactly. llama.cpp's runs are held to the near-tie rule (:mod:`benchmarks.e2e.near_tie`):
where a sequence parts from the reference, the reference model's logits there (a ``reference-logits``
worker: transformers on the prompt and the reference's tokens before the parting) must rate
llama.cpp's token within bf16 rounding of the best; the system's notes count the sequences that
matched exactly and those that parted at a near-tie (``token_check``).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.e2e.bound import Bound, must_move_bytes
from benchmarks.e2e.near_tie import TokenCheck, judge, partings, prefix
from benchmarks.e2e.planning import PLAN, SWEEP, SWEEP_EVICTION, plan_klotski, predict_config
from benchmarks.e2e.results import BenchmarkError, Point, RunRecord, SystemResult, check_tokens
from benchmarks.e2e.runner import Runner
from benchmarks.e2e.systems import (
    KLOTSKI,
    NEAR_TIE_SYSTEMS,
    PRESET_SYSTEMS,
    SINGLE_BATCH_SYSTEMS,
    Budget,
    Inputs,
    accelerate_job,
    bound_job,
    describe_accelerate,
    describe_engine,
    describe_llamacpp,
    engine_job,
    llamacpp_job,
    preset_batching,
    preset_problem,
)
from benchmarks.e2e.worker import ACCELERATE, LLAMACPP, REFERENCE_LOGITS, Job
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.runtime.config import ALL_EXPERTS
from klotski_tier.core.store.files import ModelFiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PointPlan:
    """What to run at each budget point."""

    systems: Sequence[str]
    batches: Sequence[int]  # n candidates for systems that sweep n
    batch_size: int | None  # bs, unless a preset fixes it; None: the whole workload in one group (N / n)
    repeats: int
    accelerate_batch: int | None = None  # None: the largest that fits, starting from all prompts
    trace_dir: Path | None = None  # save one extra klotski run's Chrome trace here
    klotski_hot_experts: int | str | None = None  # K of klotski; None: the planner's, or "all" when swept
    klotski_config: str = SWEEP  # PLAN: n, bs, K from the planner; SWEEP: n the best of ``batches``
    profile: Path | None = None  # the machine profile to plan and predict with; None: neither
    bound_beside_reads: bool = False  # also time the bound's runs with the drive reading what must move


class Comparison:
    """Runs points (budgets) of one workload; remembers the reference tokens across points."""

    def __init__(self, runner: Runner, inputs: Inputs, files: ModelFiles, drive_gbps: float) -> None:
        self.runner = runner
        self.inputs = inputs
        self.files = files
        self.drive_gbps = drive_gbps
        self.reference: tuple[str, list[list[int]]] | None = None
        self._extra_runs: list[RunRecord] = []  # runs outside any system's figures, checked too
        self._logits: dict[tuple[int, ...], list[float]] = {}  # the reference model's, after each prefix

    def point(self, plan: PointPlan, budget: Budget) -> Point:
        logger.info("budget %s", budget.describe())
        systems = [self._system(plan, name, budget) for name in plan.systems]
        chosen = next((s for s in systems if s.name == KLOTSKI and s.ok), None)
        n = int(chosen.notes["batches"]) if chosen is not None else plan.batches[0]
        bs = int(chosen.notes["batch_size"]) if chosen is not None else self.batch_size(plan, n)
        bound, bound_runs = self._bound(plan, budget, n, bs)
        exact = [run for s in systems if s.name not in NEAR_TIE_SYSTEMS for run in s.runs]
        extra, self._extra_runs = self._extra_runs, []
        self._check([*bound_runs, *exact, *(run for run in extra if run.system not in NEAR_TIE_SYSTEMS)])
        for system in systems:
            if system.name in NEAR_TIE_SYSTEMS:
                self._check_near_ties(system)
        for name in NEAR_TIE_SYSTEMS:  # their runs outside the figures (accelerate's all-in-RAM run)
            runs = [run for run in extra if run.system == name]
            if runs:
                self._check_near_ties(SystemResult(name, "", runs))
        return Point(budget, systems, bound, bound_runs)

    def batch_size(self, plan: PointPlan, n: int) -> int:
        """bs of a group of ``n`` batches: the plan's, else all N prompts in one group (ceil(N / n))."""
        return plan.batch_size or -(-len(self.inputs.prompts) // n)

    # ---- systems -----------------------------------------------------------------------------

    def _system(self, plan: PointPlan, name: str, budget: Budget) -> SystemResult:
        logger.info("system %s", name)
        if name == ACCELERATE:
            return self._accelerate(plan, budget)
        if name in PRESET_SYSTEMS:
            problem = preset_problem(name)
            if problem is not None:
                logger.warning("skipping %s: %s", name, problem)
                return SystemResult(name, "", skipped=problem)
            return self._engine(plan, name, budget, preset=name)
        if name == LLAMACPP:
            return self._llamacpp(plan, budget)
        if name == KLOTSKI and plan.klotski_config == PLAN and plan.profile is not None:
            return self._planned(plan, budget, plan.profile)
        if name == KLOTSKI:
            return self._engine(plan, name, budget, preset=None)
        raise BenchmarkError(f"unknown system {name!r}")

    def _engine(self, plan: PointPlan, name: str, budget: Budget, preset: str | None) -> SystemResult:
        fixed_n, fixed_bs = preset_batching(preset)
        candidates = [fixed_n] if fixed_n else [1] if name in SINGLE_BATCH_SYSTEMS else list(plan.batches)
        hot = _swept_hot(plan.klotski_hot_experts) if name == KLOTSKI else None

        def job(n: int, trace: Path | None = None) -> Job:
            bs = fixed_bs or self.batch_size(plan, n)
            return engine_job(
                name, self.inputs, self.files, budget, n, bs, preset=preset, trace_path=trace,
                hot_experts=hot, eviction=SWEEP_EVICTION if name == KLOTSKI else None,
            )  # fmt: skip

        sweep = {n: self.runner.run(job(n), budget.limit_bytes) for n in candidates}
        best = _fastest(sweep)
        result = SystemResult(name, describe_engine(job(best)), [sweep[best]])
        result.notes.update(
            config=SWEEP,
            batches=best,
            batch_size=fixed_bs or self.batch_size(plan, best),
            hot_experts=hot,
            sweep={str(n): _summary(r) for n, r in sweep.items()},
        )
        if name == KLOTSKI and plan.profile is not None:
            self._predictions(result, plan, budget, plan.profile)
        return self._finish(result, plan, budget, lambda trace: job(best, trace))

    def _planned(self, plan: PointPlan, budget: Budget, profile: Path) -> SystemResult:
        """klotski at the planner's configuration for ``budget``; swept when the planner cannot plan."""
        chosen = plan_klotski(
            self.inputs, self.files, budget, profile,
            batch_size=plan.batch_size, hot_experts=plan.klotski_hot_experts,
        )  # fmt: skip
        if isinstance(chosen, str):
            logger.warning("klotski is swept at this budget: %s", chosen)
            result = self._engine(replace(plan, klotski_config=SWEEP), KLOTSKI, budget, preset=None)
            result.notes["plan_note"] = chosen
            return result

        def job(trace: Path | None = None) -> Job:
            return engine_job(
                KLOTSKI, self.inputs, self.files, budget, chosen.batches, chosen.batch_size, trace_path=trace,
                hot_experts=chosen.hot_experts, host_preload=chosen.host_preload, eviction=chosen.eviction,
            )  # fmt: skip

        result = SystemResult(KLOTSKI, describe_engine(job()), [self.runner.run(job(), budget.limit_bytes)])
        result.notes.update(
            config=PLAN,
            batches=chosen.batches,
            batch_size=chosen.batch_size,
            hot_experts=chosen.hot_experts,
            host_preload=chosen.host_preload,
            eviction=chosen.eviction,
            predicted=chosen.prediction.to_dict(),
        )
        return self._finish(result, plan, budget, job)

    def _predictions(self, result: SystemResult, plan: PointPlan, budget: Budget, profile: Path) -> None:
        """The planner's predicted tokens/s beside each n of klotski's sweep, and for the n kept."""
        hot = result.notes["hot_experts"]
        for key, summary in result.notes["sweep"].items():
            n = int(key)
            found = predict_config(self.inputs, self.files, budget, profile, n, self.batch_size(plan, n), hot)
            summary["predicted_tokens_per_s"] = None if found is None else found.tokens_per_s
            if n == result.notes["batches"] and found is not None:
                result.notes["predicted"] = found.to_dict()

    def _finish(
        self, result: SystemResult, plan: PointPlan, budget: Budget, job: Callable[[Path | None], Job]
    ) -> SystemResult:
        """``result`` (its first run done) with its further repeats, and klotski's traced run."""
        if result.ok:
            result.runs += self._repeat(lambda: job(None), budget.limit_bytes, plan.repeats - 1)
        if result.ok and plan.trace_dir is not None and result.name == KLOTSKI:
            trace = plan.trace_dir / f"e2e-{result.name}-trace.json"
            self.runner.run(job(trace), budget.limit_bytes)  # not counted: tracing costs time
            result.notes["trace"] = str(trace)
        return result

    def _llamacpp(self, plan: PointPlan, budget: Budget) -> SystemResult:
        """llama.cpp within the budget's cgroup limit (it has no budget of its own), ``repeats`` times."""
        setup = self.inputs.llamacpp
        if setup is None or setup.problem is not None:
            reason = setup.problem if setup is not None else "llama.cpp was not set up for this run"
            logger.warning("skipping %s: %s", LLAMACPP, reason)
            return SystemResult(LLAMACPP, "", skipped=f"llama.cpp cannot run: {reason}")
        job = llamacpp_job(self.inputs, setup)
        first = self.runner.run(job, budget.limit_bytes)
        result = SystemResult(LLAMACPP, describe_llamacpp(job, setup), [first])
        if result.ok:
            result.runs += self._repeat(lambda: job, budget.limit_bytes, plan.repeats - 1)
            result.config = describe_llamacpp(job, setup, result.runs[0].output.get("details"))
        result.notes.update(version=setup.version, driver=str(setup.driver), gguf=str(setup.gguf))
        return result

    def _accelerate(self, plan: PointPlan, budget: Budget) -> SystemResult:
        batch = plan.accelerate_batch or len(self.inputs.prompts)
        offload = self.runner.settings.scratch / "accelerate-offload"

        def job() -> Job:
            return accelerate_job(self.inputs, self.files, budget, batch, offload)

        attempts: list[dict[str, object]] = []
        while True:
            record = self.runner.run(job(), budget.limit_bytes)
            attempts.append({"batch": batch, **_summary(record)})
            if record.ok or not record.oom or plan.accelerate_batch or batch == 1:
                break
            batch //= 2
        placed = record.output.get("details", {}).get("placed_bytes")
        result = SystemResult(ACCELERATE, describe_accelerate(job(), placed), [record])
        result.notes.update(batch=batch, batch_attempts=attempts)
        if result.ok:
            result.runs += self._repeat(job, budget.limit_bytes, plan.repeats - 1)
        if result.ok:
            self._accelerate_waits(result, batch, offload)
        return result

    def _accelerate_waits(self, result: SystemResult, batch: int, offload: Path) -> None:
        """Estimate accelerate's I/O wait as its total time less that of a run with every weight in RAM.

        Its hooks cannot be timed for it: safetensors maps the offloaded files, so the reads happen as
        page faults inside the matmuls. Both runs compute the same batches on the same threads.
        """
        resident = self.runner.run(accelerate_job(self.inputs, self.files, None, batch, offload), None)
        self._extra_runs.append(resident)
        result.notes["resident_run"] = _summary(resident)
        if not resident.ok:
            return
        base_s = resident.throughput.total_s
        for run in result.runs:
            run.output["io_wait_s"] = max(run.throughput.total_s - base_s, 0.0)
        result.notes["io_wait"] = f"estimated: total time less {base_s:.2f} s with every weight in RAM"

    def _repeat(self, make: Callable[[], Job], limit_bytes: int | None, count: int) -> list[RunRecord]:
        """Up to ``count`` runs of ``make()``, stopping at the first failure."""
        runs: list[RunRecord] = []
        for _ in range(count):
            runs.append(self.runner.run(make(), limit_bytes))
            if not runs[-1].ok:
                break
        return runs

    # ---- the bound and the tokens --------------------------------------------------------------

    def _bound(
        self, plan: PointPlan, budget: Budget, n: int, bs: int
    ) -> tuple[Bound | None, list[RunRecord]]:
        routing = self.runner.settings.scratch / f"routing-n{n}-bs{bs}.npz"
        job = bound_job(self.inputs, n, bs, routing)
        runs = self._repeat(lambda: job, None, plan.repeats)  # unlimited: every weight resident
        if not runs or not all(r.ok for r in runs):
            logger.warning("the all-resident reference failed: %s", runs[-1].reason if runs else "no run")
            return None, runs
        compute_s = statistics.median(float(r.output["compute_s"]) for r in runs)
        resident = budget.weight_bytes - int(runs[0].output["fixed_bytes"])
        moved = must_move_bytes(RoutingTrace.load(routing), self.files.layouts, resident)
        generated = int(runs[0].output["generated_tokens"])
        bound = Bound(compute_s, moved, self.drive_gbps, resident, generated, n, bs)
        if plan.bound_beside_reads:
            beside = self._repeat(lambda: bound_job(self.inputs, n, bs, None, moved), None, plan.repeats)
            runs += beside
            if all(r.ok for r in beside):
                compute = statistics.median(float(r.output["compute_s"]) for r in beside)
                bound = replace(bound, beside_reads_compute_s=compute)
        return bound, runs

    def _check_near_ties(self, system: SystemResult) -> None:
        """Hold ``system``'s runs to the near-tie rule against the reference; its counts into its notes."""
        if self.reference is None:
            if any(run.ok for run in system.runs):
                system.notes["token_check"] = {"checked": False, "why": "no reference run succeeded"}
            return
        name, expected = self.reference
        found = {id(run): partings(run.system, name, expected, run.tokens) for run in system.runs if run.ok}
        rows = self._reference_logits(
            [prefix(self.inputs.prompts, expected, parting) for parts in found.values() for parting in parts]
        )
        check = TokenCheck()
        for run in system.runs:
            if run.ok:
                parts = found[id(run)]
                keys = [tuple(prefix(self.inputs.prompts, expected, p)) for p in parts]
                judge(run.system, name, parts, [rows[key] for key in keys], len(run.tokens), check)
        if check.sequences:
            system.notes["token_check"] = check.to_dict()

    def _reference_logits(self, prefixes: list[list[int]]) -> dict[tuple[int, ...], list[float]]:
        """The reference model's logits after each prefix (one worker for those not computed yet)."""
        missing = list({tuple(p): p for p in prefixes if tuple(p) not in self._logits}.values())
        if missing:
            job = Job(REFERENCE_LOGITS, REFERENCE_LOGITS, str(self.inputs.model), missing, 1)
            record = self.runner.run(job, None)  # unlimited, as the bound: the reference, not a system
            if not record.ok:
                raise BenchmarkError(f"the reference logits for the token check failed: {record.reason}")
            for ids, row in zip(missing, record.output["logits"], strict=True):
                self._logits[tuple(ids)] = row
        return {tuple(p): self._logits[tuple(p)] for p in prefixes}

    def _check(self, runs: list[RunRecord]) -> None:
        """Every successful run must match the reference (the first successful run ever seen)."""
        if self.reference is None:
            first = next((r for r in runs if r.ok), None)
            if first is None:
                return
            self.reference = (first.system, first.tokens)
        check_tokens(self.reference[0], self.reference[1], runs)


def _fastest(sweep: dict[int, RunRecord]) -> int:
    """The n whose run had the highest throughput (the first n when none succeeded)."""
    ok = {n: r.throughput.tokens_per_s for n, r in sweep.items() if r.ok}
    return max(ok, key=lambda n: ok[n]) if ok else next(iter(sweep))


def _swept_hot(hot_experts: int | str | None) -> int | str:
    """K of a swept klotski: the one asked for, else every expert of the next layer."""
    return ALL_EXPERTS if hot_experts is None else hot_experts


def _summary(record: RunRecord) -> dict[str, object]:
    if record.ok:
        return {"ok": True, "tokens_per_s": record.throughput.tokens_per_s}
    return {"ok": False, "reason": record.reason}
