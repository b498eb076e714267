"""klotski's configuration from the planner, and the planner's predictions next to what was measured.

``--klotski-config plan`` (the default): at each budget point, :func:`plan_klotski` asks
:func:`klotski_tier.core.plan.autoplan.plan_model` for n, bs, K and host preload within the budgets the
harness gives the engine (:func:`benchmarks.e2e.systems.budget_options`: those stay as they are),
for the workload's prompts and new tokens, with this machine's ``klotski-tier bench`` profile;
``--batch-size`` and ``--klotski-hot-experts``, when given, are fixed and the plan is made around
them. ``--klotski-config sweep``: n is the best of a sweep over ``--batches`` (and the batches sweep
always sets n itself); :func:`predict_config` then gives the planner's prediction for each n tried.

Without a profile there is nothing to plan with: :func:`klotski_mode` falls back to ``sweep`` and
says so in one line. Where the planner cannot plan a point, that point sweeps, saying why.

Predicted throughput is the planner's: decode tokens/s is :attr:`Plan.decode_tokens_per_s`; tokens/s
over the whole workload (the measured figure's definition: generated tokens / prefill + decode time)
is ``N x G / (groups x (prefill step + (G - 1) decode steps))`` from the plan's step predictions, with
``groups = ceil(N / (n x bs))``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.e2e.systems import Budget, Inputs, budget_options
from klotski_tier.core.plan.autoplan import PLANNED_FIELDS, RunPlan, plan_model
from klotski_tier.core.plan.placement_model import SWEEP as SWEEP_POLICY
from klotski_tier.core.plan.planner import Plan
from klotski_tier.core.runtime.config import ALL_EXPERTS, EngineOptions
from klotski_tier.core.store.files import ModelFiles

logger = logging.getLogger(__name__)

PLAN, SWEEP = "plan", "sweep"
SWEEP_EVICTION = SWEEP_POLICY  # klotski's device eviction when swept: a prefix of the layer sweep stays
KLOTSKI_CONFIGS = (PLAN, SWEEP)
BUDGET_FIELDS = frozenset(("device", "device_memory_bytes", "host_memory_bytes"))  # the harness's


@dataclass(frozen=True)
class Prediction:
    """The planner's figures for one klotski configuration."""

    batches: int
    batch_size: int
    hot_experts: int
    host_preload: bool
    eviction: str
    tokens_per_s: float  # generated tokens / predicted prefill + decode time of the whole workload
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    feasible: bool  # every deadline met in every layer, within every budget
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KlotskiPlan:
    """The configuration the planner chose for klotski at one budget point."""

    batches: int
    batch_size: int
    hot_experts: int | str
    host_preload: bool
    eviction: str
    prediction: Prediction


def klotski_mode(requested: str, profile: Path, sweep: str | None) -> tuple[str, str]:
    """(the mode klotski is configured by, a one-line note when it is not the one ``requested``)."""
    if sweep == "batches" or requested == SWEEP:
        return SWEEP, ""
    if not profile.is_file():
        note = (
            f"no machine profile at {profile}: klotski falls back to --klotski-config sweep (n the best "
            "of --batches); run `klotski-tier bench` to let the planner choose n, bs and K"
        )
        return SWEEP, note
    return PLAN, ""


def plan_klotski(
    work: Inputs,
    files: ModelFiles,
    budget: Budget,
    profile: Path,
    *,
    batch_size: int | None = None,
    hot_experts: int | str | None = None,
) -> KlotskiPlan | str:
    """The planner's configuration within ``budget`` (``batch_size``, ``hot_experts``: fixed when
    given); else why there is none. The budgets are those of one group of every prompt (they differ
    only on a GPU, where the device keeps that group's KV cache)."""
    given: dict[str, Any] = {"batch_size": batch_size, "hot_experts": hot_experts}
    fixed = {name: value for name, value in given.items() if value is not None}
    options = EngineOptions(**budget_options(work, files, budget, 1, len(work.prompts)), **fixed)
    chosen = _plan(work, options, {*BUDGET_FIELDS, *fixed}, profile)
    if chosen.plan is None:
        return chosen.note
    opts = chosen.options
    hot = ALL_EXPERTS if opts.hot_experts == ALL_EXPERTS else chosen.plan.hot_experts
    prediction = _prediction(chosen.plan, len(work.prompts), work.new_tokens)
    return KlotskiPlan(opts.batches, opts.batch_size, hot, opts.host_preload, opts.eviction, prediction)


def predict_config(
    work: Inputs,
    files: ModelFiles,
    budget: Budget,
    profile: Path,
    batches: int,
    batch_size: int,
    hot_experts: int | str | None,
    eviction: str = SWEEP_EVICTION,
) -> Prediction | None:
    """The planner's prediction for klotski at exactly this n, bs and K (None: the engine's top-k),
    without host preload, as :func:`benchmarks.e2e.systems.engine_job` runs it; None when it cannot
    plan that configuration."""
    hot = files.spec.top_k if hot_experts is None else hot_experts
    fixed: dict[str, Any] = {
        "batches": batches, "batch_size": batch_size, "hot_experts": hot, "eviction": eviction
    }  # fmt: skip
    options = EngineOptions(**budget_options(work, files, budget, batches, batch_size), **fixed)
    chosen = _plan(work, options, {*BUDGET_FIELDS, *PLANNED_FIELDS}, profile)
    if chosen.plan is None:
        logger.info("no prediction for n=%d x bs=%d: %s", batches, batch_size, chosen.note)
        return None
    return _prediction(chosen.plan, len(work.prompts), work.new_tokens)


def predicted_tokens_per_s(plan: Plan, sequences: int, new_tokens: int) -> float:
    """Generated tokens over the plan's predicted prefill and decode time of the whole workload."""
    groups = -(-sequences // (plan.batches * plan.batch_size))
    seconds = groups * (plan.prefill.step_s + (new_tokens - 1) * plan.decode.step_s)
    return sequences * new_tokens / seconds if seconds > 0 else 0.0


def _plan(work: Inputs, options: EngineOptions, explicit: set[str], profile: Path) -> RunPlan:
    model = work.store or work.model
    return plan_model(
        model, options, work.prompts, work.new_tokens, explicit=frozenset(explicit), profile_path=profile
    )


def _prediction(plan: Plan, sequences: int, new_tokens: int) -> Prediction:
    return Prediction(
        batches=plan.batches,
        batch_size=plan.batch_size,
        hot_experts=plan.hot_experts,
        host_preload=plan.placement.host_preload,
        eviction=plan.placement.eviction,
        tokens_per_s=predicted_tokens_per_s(plan, sequences, new_tokens),
        decode_tokens_per_s=plan.decode_tokens_per_s,
        prefill_tokens_per_s=plan.prefill_tokens_per_s,
        feasible=plan.feasible,
        why=plan.why,
    )
