"""``klotski-tier run``: generate with the Klotski pipeline under memory budgets.

With ``--plan auto`` (the default) the planner (:mod:`klotski_tier.core.planner`) chooses n, bs, K
and host preload for this model, these prompts and budgets on this machine (its ``klotski-tier
bench`` profile); whatever the user set (a flag, the ``--config`` file or the ``--preset``) stays
as set and the plan is made around it. Without a profile, or when the planner cannot plan, the
run keeps the defaults and says so. ``--plan off``: the defaults. Scheduling never changes tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.files import atomic_write, check_writable
from klotski_tier.cli.options import engine_flags, options_and_explicit
from klotski_tier.cli.plan_report import run_plan_line, run_plan_record
from klotski_tier.cli.progress import StepProgress, bytes_progress
from klotski_tier.cli.prompts import Prompt, gather_prompts
from klotski_tier.cli.report import format_metrics, format_outputs, output_record, result_record
from klotski_tier.core.config import ALL_EXPERTS, EngineOptions, replace
from klotski_tier.core.demo import demo_model_dir, demo_prompts
from klotski_tier.core.engine import Engine, GenerationResult
from klotski_tier.core.errors import InputError, KlotskiError
from klotski_tier.core.hardware import local_machine
from klotski_tier.core.planner import Plan, PlanRequest, make_plan
from klotski_tier.core.profile import find_profile
from klotski_tier.core.routing_model import RoutingModel, TraceRouting
from klotski_tier.core.routing_trace import RoutingTrace
from klotski_tier.core.sizes import parse_size
from klotski_tier.core.store import PackedStore

logger = logging.getLogger(__name__)

DEMO_DEVICE_MEMORY = "128MiB"
"""Device budget of the demo run: a fraction of the demo model, so experts must stream."""
PLAN_AUTO, PLAN_OFF = "auto", "off"
NO_PROFILE_NOTE = "no machine profile: the defaults; `klotski-tier bench` enables planning"


@click.command()
@click.option(
    "--model", type=click.Path(path_type=Path), help="Hugging Face model directory (default: demo)."
)
@click.option("--prompt", "texts", multiple=True, help="A text prompt (repeatable).")
@click.option(
    "--prompts",
    "files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A file of prompts: one per line, or JSONL (.jsonl) with a prompt or prompt_ids field.",
)
@click.option(
    "--prompt-ids", "id_lists", multiple=True, help='Token ids of a prompt, e.g. "1,2,3" (repeatable).'
)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@engine_flags
@click.option(
    "--plan",
    "plan_mode",
    type=click.Choice([PLAN_AUTO, PLAN_OFF]),
    default=PLAN_AUTO,
    show_default=True,
    help="auto: the planner picks n, bs, K and preload where not set (needs `klotski-tier bench`); "
    "off: the defaults.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 is greedy."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with outputs and metrics.")
@click.option(
    "--output", type=click.Path(path_type=Path), help="Write one JSON line per prompt to this file."
)
@click.option(
    "--record-routing", type=click.Path(path_type=Path), help="Save every step's expert routing (npz)."
)
@click.option(
    "--trace", "trace_file", type=click.Path(path_type=Path), help="Save a Chrome trace of the run (JSON)."
)
@click.option(
    "--profile",
    "profile_path",
    type=click.Path(path_type=Path),
    help="Machine profile from `klotski-tier bench` (default: the one bench wrote, if any).",
)
@report_errors
def run(
    model: Path | None,
    texts: tuple[str, ...],
    files: tuple[Path, ...],
    id_lists: tuple[str, ...],
    max_new_tokens: int,
    plan_mode: str,
    seed: int,
    temperature: float,
    as_json: bool,
    output: Path | None,
    record_routing: Path | None,
    trace_file: Path | None,
    profile_path: Path | None,
    **flags: Any,
) -> None:
    """Generate with the Klotski pipeline under memory budgets (the demo model without --model)."""
    for path, option in ((output, "--output"), (record_routing, "--record-routing"), (trace_file, "--trace")):
        if path is not None:
            check_writable(path, option)
    prompts = gather_prompts(texts, files, id_lists)
    profile = find_profile(profile_path)
    if model is None:
        model, prompts, demo_defaults = _demo(prompts)
    else:
        demo_defaults = {}
    if not prompts:
        raise InputError("no prompt given; use --prompt, --prompts or --prompt-ids")
    options, explicit = options_and_explicit(flags, **demo_defaults)
    engine = Engine.load(model, options, profile=profile)
    chosen = RunPlan(PLAN_OFF, options)
    if plan_mode == PLAN_AUTO:
        chosen = auto_plan(engine, prompts, max_new_tokens, explicit, profile_path)
    if chosen.options != options:
        engine = Engine.load(model, chosen.options, profile=profile)
    with StepProgress() as progress:
        result = engine.generate(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            progress=progress,
            record_routing=record_routing is not None,
            timeline=trace_file is not None,
        )
    _save(result, output, record_routing, trace_file)
    if as_json:
        click.echo(json.dumps({**result_record(result, profile), "plan": chosen.to_dict()}))
        return
    for line in [*format_outputs(result), "", chosen.line(), *format_metrics(result.metrics, profile)]:
        click.echo(line)


@dataclass(frozen=True)
class RunPlan:
    """The options a run uses and the plan they come from, if any."""

    mode: str  # PLAN_AUTO or PLAN_OFF
    options: EngineOptions
    plan: Plan | None = None
    planned: tuple[str, ...] = ()  # EngineOptions fields the plan set (the others: the user's or defaults)
    note: str = ""  # why no plan is used

    def line(self) -> str:
        return run_plan_line(self.mode, self.options, self.plan, self.planned, self.note)

    def to_dict(self) -> dict[str, Any]:
        return run_plan_record(self.mode, self.options, self.plan, self.planned, self.note)


def auto_plan(
    engine: Engine, prompts: list[Prompt], max_new_tokens: int, explicit: Set[str], profile_path: Path | None
) -> RunPlan:
    """The engine's options with the plan's values for the fields the user did not set (``explicit``).

    ``profile_path`` None: the default profile. Without a profile, or when the planner refuses, the
    options stay as they are and the note says why.
    """
    options = engine.options
    if engine.profile is None:
        return RunPlan(PLAN_AUTO, options, note=NO_PROFILE_NOTE)
    try:
        plan = make_plan(plan_request(engine, prompts, max_new_tokens, explicit, profile_path))
    except KlotskiError as exc:  # planning is advice: the run goes on with the defaults
        logger.info("no plan: %s", exc)
        return RunPlan(PLAN_AUTO, options, note=f"the planner cannot plan this run ({exc}); the defaults")
    planned = {k: v for k, v in plan.engine_options().items() if k not in explicit}
    return RunPlan(PLAN_AUTO, replace(options, **planned), plan, tuple(planned))


def plan_request(
    engine: Engine, prompts: list[Prompt], max_new_tokens: int, explicit: Set[str], profile_path: Path | None
) -> PlanRequest:
    """What to plan: this model, these prompts, the run's budgets, and the fields the user fixed."""
    options, spec = engine.options, engine.spec
    lengths = [len(engine.encode(p)) if isinstance(p, str) else len(p) for p in prompts]
    fixed: dict[str, Any] = {
        name: getattr(options, name)
        for name in ("batches", "batch_size", "hot_experts", "host_preload")
        if name in explicit
    }
    if fixed.get("hot_experts") == ALL_EXPERTS:
        fixed["hot_experts"] = spec.num_experts
    trace = options.prefetch_trace
    return PlanRequest(
        spec,
        local_machine(profile_path),
        RoutingModel(TraceRouting(RoutingTrace.load(trace))) if trace is not None else None,
        device_memory_bytes=options.device_memory_bytes,
        host_memory_bytes=options.host_memory_bytes,
        sequences=len(prompts),
        prompt_tokens=max(1, *lengths),
        new_tokens=max_new_tokens,
        compression_ratio=store_ratio(engine.files.store),
        **fixed,
    )


def store_ratio(store: PackedStore | None) -> float | None:
    """Raw over stored bytes of a store whose blocks are compressed; None for anything else."""
    if store is None or not any(entry.compressed for entry in store.entries.values()):
        return None
    return store.raw_bytes / store.stored_bytes


def _demo(prompts: list[Prompt]) -> tuple[Path, list[Prompt], dict[str, Any]]:
    """The built-in demo model (built on first use), its default prompts and device budget."""
    with bytes_progress("building demo model") as progress:
        model = demo_model_dir(progress=progress)
    return model, prompts or list(demo_prompts()), {"device_memory_bytes": parse_size(DEMO_DEVICE_MEMORY)}


def _save(result: GenerationResult, output: Path | None, routing: Path | None, trace: Path | None) -> None:
    if output is not None:
        with atomic_write(output) as handle:
            for index, out in enumerate(result.outputs):
                handle.write(json.dumps(output_record(index, out)) + "\n")
    if routing is not None and result.routing is not None:
        result.routing.save(routing)
    if trace is not None and result.timeline is not None:
        result.timeline.save(trace)
