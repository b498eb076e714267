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

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from klotski_tier.cli import streams
from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.files import OUTPUT, Inputs, Save, atomic_write, check_outputs, save_all
from klotski_tier.cli.model_input import MODEL_DIRECTORIES, model_input
from klotski_tier.cli.options import engine_flags, options_and_explicit
from klotski_tier.cli.params import PROMPT_TEXT, SEED, TOKEN_IDS, NonEmptyPath, finite_float, whole
from klotski_tier.cli.plan_report import run_plan_line, run_plan_record
from klotski_tier.cli.progress import StepProgress, bytes_progress, items_progress
from klotski_tier.cli.prompts import Prompt, gather_prompts
from klotski_tier.cli.report import format_metrics, format_outputs, output_record, result_record
from klotski_tier.core.bench.profile import find_profile
from klotski_tier.core.demo.build import demo_model_dir, opening_demo
from klotski_tier.core.demo.tokenizer import demo_prompts
from klotski_tier.core.errors import InputError, KlotskiError
from klotski_tier.core.memory import read_memory_limit
from klotski_tier.core.plan.autoplan import PLAN_AUTO, PLAN_OFF, RunPlan, plan_files
from klotski_tier.core.runtime.budgets import resolve_budgets
from klotski_tier.core.runtime.config import replace
from klotski_tier.core.runtime.engine import Engine, GenerationResult
from klotski_tier.core.runtime.policy_setup import save_prefetch_state
from klotski_tier.core.store.files import ModelFiles, open_model
from klotski_tier.core.units import parse_size

logger = logging.getLogger(__name__)

DEMO_DEVICE_MEMORY = "128MiB"
"""Device budget of the demo run: a fraction of the demo model, so experts must stream."""


@click.command()
@click.option(
    "--model", type=NonEmptyPath(path_type=Path), help="Hugging Face model directory (default: demo)."
)
@click.option("--prompt", "texts", multiple=True, type=PROMPT_TEXT, help="A text prompt (repeatable).")
@click.option(
    "--prompts",
    "files",
    multiple=True,
    type=NonEmptyPath(path_type=Path),
    help="A file of prompts: one per line, or JSONL (.jsonl) with a prompt or prompt_ids field.",
)
@click.option(
    "--prompt-ids",
    "id_lists",
    multiple=True,
    type=TOKEN_IDS,
    help='Token ids of a prompt, e.g. "1,2,3" (repeatable).',
)
@click.option("--max-new-tokens", default=32, show_default=True, type=whole(min=1))
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
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option(
    "--temperature", default=0.0, show_default=True, type=finite_float(min=0.0), help="0 is greedy."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with outputs and metrics.")
@click.option("--output", type=OUTPUT, help="Write one JSON line per prompt to this file.")
@click.option("--record-routing", type=OUTPUT, help="Save every step's expert routing (npz).")
@click.option("--trace", "trace_file", type=OUTPUT, help="Save a Chrome trace of the run (JSON).")
@click.option(
    "--profile",
    "profile_path",
    type=NonEmptyPath(path_type=Path),
    help="Machine profile from `klotski-tier bench` (default: the one bench wrote, if any).",
)
@report_errors
def run(
    model: Path | None,
    texts: tuple[str, ...],
    files: tuple[Path, ...],
    id_lists: tuple[list[int], ...],
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
    demo_defaults = {"device_memory_bytes": parse_size(DEMO_DEVICE_MEMORY)} if model is None else {}
    config_file, trace_flag = flags["config_file"], flags["prefetch_trace"]
    options, explicit = options_and_explicit(flags, **demo_defaults)
    outputs = Outputs(output, record_routing, trace_file, options.prefetch_save_state)
    outputs.check(
        {
            **model_input(model),
            "--prompts": files,
            "--config": config_file,
            "--profile": profile_path,
            "--prefetch-trace" if trace_flag is not None else "prefetch.trace": options.prefetch_trace,
            "prefetch.state": options.prefetch_state,
        }
    )
    prompts = gather_prompts(texts, files, id_lists)
    profile = find_profile(profile_path)
    if model is None:
        model_files, prompts = _demo(prompts)
    else:
        model_files = open_model(model)
    if not prompts:
        raise InputError("no prompt given; use --prompt, --prompts or --prompt-ids")
    budgets = resolve_budgets(model_files, options, read_memory_limit())  # measured before any weight loads
    options = budgets.apply(options)
    chosen = RunPlan(PLAN_OFF, options)
    if plan_mode == PLAN_AUTO:
        with items_progress("planning: measuring the prompts") as measured:
            request = (model_files, options, prompts, max_new_tokens, explicit, profile_path, profile)
            chosen = plan_files(*request, progress=measured)
    engine = Engine.from_files(model_files, replace(chosen.options, prefetch_save_state=None), budgets)
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
    if as_json:
        plan = {**run_plan_record(chosen), "budgets": budgets.to_dict()}
        click.echo(json.dumps({**result_record(result, profile), "plan": plan}))
    else:
        lines = [*format_outputs(result), "", run_plan_line(chosen), f"budgets: {budgets.describe()}"]
        for line in lines + format_metrics(result.metrics, profile):
            click.echo(line)
    outputs.save(result, engine, as_json)  # after the report: a failed write loses nothing printed


def _demo(prompts: list[Prompt]) -> tuple[ModelFiles, list[Prompt]]:
    """The built-in demo model (built on first use) and its default prompts."""
    with bytes_progress("building demo model") as progress:
        model = demo_model_dir(progress=progress)
    with opening_demo(model):
        return open_model(model), prompts or list(demo_prompts())


@dataclass(frozen=True)
class Outputs:
    """Every file a run writes: checked before any work, all tried at the end, none lost for another."""

    output: Path | None
    routing: Path | None
    trace: Path | None
    prefetch_state: Path | None

    def check(self, inputs: Inputs) -> None:
        """Refuse, before any work, an output that cannot be written, is another output or is an input
        (the learned prefetch state alone may be saved over the state it was loaded from)."""
        check_outputs(
            {
                "--output": self.output,
                "--record-routing": self.routing,
                "--trace": self.trace,
                "prefetch.save_state": self.prefetch_state,
            },
            inputs,
            directories=MODEL_DIRECTORIES,
            updates={"prefetch.save_state": "prefetch.state"},
        )

    def save(self, result: GenerationResult, engine: Engine, as_json: bool) -> None:
        output, routing, trace, state = self.output, result.routing, result.timeline, self.prefetch_state
        saves: list[Save] = []
        if output is not None:
            saves.append(("--output", output, lambda: _write_outputs(result, output, as_json)))
        if self.routing is not None and routing is not None:
            saves.append(("--record-routing", self.routing, functools.partial(routing.save, self.routing)))
        if self.trace is not None and trace is not None:
            saves.append(("--trace", self.trace, functools.partial(trace.save, self.trace)))
        if state is not None:
            saves.append(("prefetch.save_state", state, lambda: save_prefetch_state(engine.prefetch, state)))
        save_all(saves)


def _write_outputs(result: GenerationResult, output: Path, as_json: bool) -> None:
    """One JSON line per prompt into ``output``; when that fails, onto stdout (unless --json had them)."""
    lines = [json.dumps(output_record(index, out)) for index, out in enumerate(result.outputs)]
    try:
        with atomic_write(output) as handle:
            handle.writelines(line + "\n" for line in lines)
    except KlotskiError as exc:
        if as_json:
            raise InputError(f"{exc} (the outputs are in the JSON on stdout)") from exc
        for line in lines:
            click.echo(line)
        broken = streams.failure()
        if broken is not None:  # both ways failed: say so once, in this line
            streams.mark_reported()
            raise InputError(f"{exc}; and {broken}, so the outputs are lost") from exc
        raise InputError(f"{exc} (its JSON lines went to stdout instead)") from exc
