"""``klotski-tier run``: generate with the Klotski pipeline under memory budgets.

With ``--plan auto`` (the default) the planner chooses n, bs, K and host preload for this model,
these prompts and budgets on this machine (its ``klotski-tier bench`` profile) before the engine
loads (:func:`klotski_tier.core.plan.autoplan.plan_files`); whatever the user set (a flag, the
``--config`` file or the ``--preset``) stays as set and the plan is made around it. Without a
profile the plan is made for conservative figures, and the plan line says so; when the planner
cannot plan, the run keeps the defaults and says why. ``--plan off``: the defaults. Budgets left
out are derived from the memory this process may use before anything is planned or loaded
(:mod:`klotski_tier.core.runtime.budgets`). Scheduling never changes tokens.
"""

from __future__ import annotations

import json
import logging
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
from klotski_tier.core.bench.profile import find_profile
from klotski_tier.core.demo.build import demo_model_dir
from klotski_tier.core.demo.tokenizer import demo_prompts
from klotski_tier.core.errors import InputError
from klotski_tier.core.memory import read_memory_limit
from klotski_tier.core.plan.autoplan import PLAN_AUTO, PLAN_OFF, RunPlan, plan_files
from klotski_tier.core.runtime.budgets import resolve_budgets
from klotski_tier.core.runtime.engine import Engine, GenerationResult
from klotski_tier.core.store.files import open_model
from klotski_tier.core.units import parse_size

logger = logging.getLogger(__name__)

DEMO_DEVICE_MEMORY = "128MiB"
"""Device budget of the demo run: a fraction of the demo model, so experts must stream."""


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
    help="auto: the planner picks n, bs, K, preload and eviction where not set (from the `klotski-tier "
    "bench` profile, else conservative figures); off: the defaults.",
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
    model_files = open_model(model)
    budgets = resolve_budgets(model_files, options, read_memory_limit())  # measured before any weight loads
    options = budgets.apply(options)
    chosen = RunPlan(PLAN_OFF, options)
    if plan_mode == PLAN_AUTO:
        chosen = plan_files(model_files, options, prompts, max_new_tokens, explicit, profile_path, profile)
    engine = Engine.from_files(model_files, chosen.options, budgets)
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
        plan = {**run_plan_record(chosen), "budgets": budgets.to_dict()}
        click.echo(json.dumps({**result_record(result, profile), "plan": plan}))
        return
    lines = [*format_outputs(result), "", run_plan_line(chosen), f"budgets: {budgets.describe()}"]
    lines += format_metrics(result.metrics, profile)
    for line in lines:
        click.echo(line)


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
