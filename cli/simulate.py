"""``klotski-tier simulate``: what the pipeline would do on a machine, for one n or a sweep of n.

It takes ``plan``'s options (:func:`klotski_tier.cli.plan.study_options`), runs the discrete-event
simulation of ``generate`` (:mod:`klotski_tier.core.plan.simulate`) for each n, and prints one row per n
beside the planner's prediction for the same n, bs and K. Without ``--batches`` or ``--sweep`` it
simulates the plan (the planner's n, bs, K and preload). Each row runs ``--prompts`` sequences, or
else one full group (n x bs). A group whose KV cache and activations leave no room for a block is
not simulated (it could not run); the others are. ``--preset`` simulates a built-in configuration:
the baselines (``sequential``, ``flexgen``, ``ondemand-lru``) run their own schedule through the
engine's pipeline, as ``run --preset`` does; the planner models the Klotski schedule only, so its
column is empty for them. ``--list`` prints the shapes and machines known.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.files import OUTPUT, check_outputs, record_saved
from klotski_tier.cli.params import SEED, count, count_list, whole
from klotski_tier.cli.plan import Study, study_from_flags, study_options
from klotski_tier.cli.plan_report import format_hardware, format_shapes, format_simulation, render_sweep_png
from klotski_tier.core.bench.profile import default_profile_path
from klotski_tier.core.errors import BudgetError
from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.hardware import HARDWARE, load_hardware_file
from klotski_tier.core.plan.placement_model import kv_home_for
from klotski_tier.core.plan.planner import Plan, make_plan
from klotski_tier.core.plan.shapes import MODEL_SHAPES, load_shapes_file
from klotski_tier.core.plan.simulate import SimConfig, WorkloadResult, simulate_workload
from klotski_tier.core.runtime.config import (
    ALL_EXPERTS,
    COUNT_RANGES,
    DEVICE_ACTIVATIONS,
    DEVICE_ATTENTION,
    DEVICE_KV,
    DISK_KV,
    HOST_ATTENTION,
    HOST_KV,
    KLOTSKI,
    READY_FIRST,
    EngineOptions,
)
from klotski_tier.core.runtime.presets import PRESETS, preset_fields
from klotski_tier.core.units import format_size

DEFAULT_DECODE_STEPS = 8  # decode steps simulated per group; the rest are counted at their mean
SCHEDULE_FIELDS = ("schedule", "expert_order")
MODELLED_FIELDS = (*SCHEDULE_FIELDS, "prefetch")  # the planner predicts the engine's defaults of these
PRESET_FIELDS = ("schedule", "expert_order", "prefetch", "eviction", "hot_experts", "host_preload")
_INPUTS = {  # the files simulate reads: option name to flag key
    "model": "model",
    "profile": "profile_path",
    "shapes": "shapes_file",
    "hardware-file": "hardware_file",
    "trace": "trace_path",
}


@dataclass(frozen=True)
class SweepSetup:
    """The group shapes to simulate and the planner's predictions for them."""

    batches: list[int]  # n that fit, ascending
    skipped: dict[int, str]  # n that do not fit: why
    batch_size: int
    hot_experts: int
    host_preload: bool
    plan: Plan  # at this bs and K: its sweep predicts each n
    from_plan: bool  # n, bs, K and preload are the plan's
    preset: dict[str, Any] = dataclasses.field(default_factory=dict)  # the --preset's engine options
    kv_homes: dict[int, str] = dataclasses.field(default_factory=dict)  # n -> where its KV cache lives
    kv_attention: str = DEVICE_ATTENTION  # where decode attention runs (the plan's, or --kv-attention)
    activations_home: str = DEVICE_ACTIVATIONS  # where a prefill's residuals wait (the plan's, or the flag)
    kv_device_layers: int = (
        0  # with the cache away: its first layers kept on the device (the plan's, or the flag)
    )

    @property
    def eviction(self) -> str:
        """The device's eviction policy: the preset's, else the plan's (sweep where the weights stream)."""
        return str(self.preset.get("eviction", self.plan.placement.eviction))

    @property
    def klotski(self) -> bool:
        """Whether the engine's own schedule and prefetch run (what the planner models)."""
        options = EngineOptions(**{k: v for k, v in self.preset.items() if k in MODELLED_FIELDS})
        defaults = EngineOptions()
        return all(getattr(options, k) == getattr(defaults, k) for k in MODELLED_FIELDS)

    @property
    def predicted(self) -> dict[int, float]:
        if not self.klotski:
            return {}
        return {point.batches: point.decode_tokens_per_s for point in self.plan.sweep}

    def eviction_at(self, batches: int) -> str:
        """The device's eviction policy at ``batches``: the preset's, else the planner's for that n."""
        planned = {point.batches: point.eviction for point in self.plan.sweep}
        return str(self.preset.get("eviction", planned.get(batches, self.eviction)))


@click.command("simulate")
@study_options
@click.option(
    "--batches",
    "-n",
    "batch_counts",
    metavar="N",
    type=count("batches"),
    multiple=True,
    help="n to simulate (repeatable; default: the planner's).",
)
@click.option(
    "--sweep",
    "sweep",
    type=count_list(*COUNT_RANGES["batches"]),
    metavar="LIST",
    help="Several n at once, e.g. 1,2,4,8,16.",
)
@click.option("--host-preload", is_flag=True, help="Read every block into host RAM first (host.preload).")
@click.option(
    "--preset",
    type=click.Choice(sorted(PRESETS)),
    help="Simulate a built-in configuration: its schedule, policies and K (baselines included).",
)
@click.option(
    "--decode-steps",
    type=whole(min=1),
    default=DEFAULT_DECODE_STEPS,
    show_default=True,
    help="Decode steps simulated per group; the others are counted at their mean.",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the simulated routes.")
@click.option(
    "--png",
    "png_path",
    type=OUTPUT,
    help="Draw decode tokens/s by n into this PNG (needs matplotlib).",
)
@click.option("--list", "list_all", is_flag=True, help="List the model shapes and hardware known, and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a row per n.")
@report_errors
def simulate(
    batch_counts: tuple[int, ...],
    sweep: tuple[int, ...] | None,
    host_preload: bool,
    preset: str | None,
    decode_steps: int,
    seed: int,
    png_path: Path | None,
    list_all: bool,
    as_json: bool,
    **flags: Any,
) -> None:  # fmt: skip
    """Simulate generation of a model on a machine for one n or a sweep: throughput, bubbles, bytes
    moved and peak memory per tier, beside the planner's prediction.

    Without --batches or --sweep: the plan's n, bs, K and preload. With them: bs and K as given, else
    the engine's defaults (bs 4, K = top-k); each n runs --prompts sequences, else one full group.
    """
    if list_all:
        for line in catalog(flags["shapes_file"], flags["hardware_file"], flags["profile_path"]):
            click.echo(line)
        return
    inputs = {f"--{name}": flags[key] for name, key in _INPUTS.items()}
    check_outputs({"--png": png_path}, inputs, directories={"--model"})
    fields = preset_fields(preset) if preset is not None else {}
    counts = sorted({*batch_counts, *(sweep or ())})
    if not counts and "batches" in fields:
        counts = [fields["batches"]]  # a preset of one batch (sequential, ondemand-lru)
    study = study_from_flags(flags)
    setup = sweep_setup(study, counts, host_preload or bool(fields.get("host_preload")))
    setup = dataclasses.replace(setup, preset={k: v for k, v in fields.items() if k in PRESET_FIELDS})
    if not setup.batches:
        least = min(setup.skipped)
        in_ram = ", or keep the KV cache in host RAM (--kv-home host)"
        raise BudgetError(
            f"no n fits: at n={least}, {setup.skipped[least]}; raise --device-memory, lower --batch-size"
            f"{in_ram if study.request.kv_home == DEVICE_KV else ''}"
        )
    results, sequences = _simulate(study, setup, decode_steps, seed)
    predicted = [setup.predicted.get(result.batches) for result in results]
    if as_json:
        click.echo(json.dumps(_record(study, setup, results, sequences, predicted)))
    else:
        lines = [*_heading(study, setup), *format_simulation(results, sequences, predicted), *_notes(setup)]
        for line in lines:
            click.echo(line)
    if png_path is not None:  # after the results: a picture that cannot be written loses none of them
        render_sweep_png(results, predicted, png_path, f"{study.model} on {study.machine.name}")
        record_saved("--png", png_path)
        if not as_json:
            click.echo(f"wrote {png_path}")


def sweep_setup(study: Study, counts: list[int], host_preload: bool) -> SweepSetup:
    """Without ``counts``: the plan's n, bs, K and preload; else ``counts`` at the given (or default)
    bs and K."""
    request = study.request
    if not counts:
        plan = make_plan(request)
        return SweepSetup([plan.batches], {}, plan.batch_size, plan.hot_experts,
                          plan.placement.host_preload, plan, from_plan=True,
                          kv_homes={plan.batches: plan.placement.kv_home},
                          kv_attention=plan.placement.kv_attention,
                          activations_home=plan.placement.activations_home,
                          kv_device_layers=plan.placement.kv_device_layers)  # fmt: skip
    bs = request.batch_size or EngineOptions().batch_size  # the engine's default bs
    hot = request.hot_experts if request.hot_experts is not None else study.spec.top_k  # as the engine
    sequences = study.sequences or max(counts) * bs  # the planner tries every n up to this many
    fixed = dataclasses.replace(request, batch_size=bs, hot_experts=hot, sequences=sequences,
                                host_preload=True if host_preload else None)  # fmt: skip
    plan = make_plan(fixed)
    homes = {n: _kv_home(study, n, bs) for n in counts}
    skipped = {n: why for n in counts if (why := _does_not_fit(study, n, bs, homes[n])) is not None}
    fitting = [n for n in counts if n not in skipped]
    attention = request.kv_attention or DEVICE_ATTENTION
    return SweepSetup(fitting, skipped, bs, hot, host_preload, plan, from_plan=False, kv_homes=homes,
                      kv_attention=attention,
                      activations_home=request.activations_home or DEVICE_ACTIVATIONS,
                      kv_device_layers=request.kv_device_layers or 0)  # fmt: skip


def _kv_home(study: Study, batches: int, batch_size: int) -> str:
    """Where the KV cache of ``batches`` x ``batch_size`` lives: as the planner places it
    (:func:`kv_home_for`: --kv-home, else the device where the group's cache fits, else host RAM);
    where nothing fits, the requested home or host RAM, for :func:`_does_not_fit` to say why."""
    request = study.request
    tokens, budgets = (
        (request.prompt_tokens, request.new_tokens),
        (_device_budget(study), _host_budget(study)),
    )
    requested = request.kv_home or (HOST_KV if request.kv_attention == HOST_ATTENTION else None)
    cost, acts = CostModel(study.spec, study.machine), request.activations_home or DEVICE_ACTIVATIONS
    home = kv_home_for(cost, batches, batch_size, tokens, budgets, requested, acts)
    return home or requested or HOST_KV


def _does_not_fit(study: Study, batches: int, batch_size: int, kv_home: str) -> str | None:
    """Why a group of ``batches`` x ``batch_size`` cannot run within the device budget (or, with the
    KV cache in host RAM, its cache within the host budget), or None."""
    request, cost = study.request, CostModel(study.spec, study.machine)
    budget = _device_budget(study)
    tokens = (request.prompt_tokens, request.new_tokens)
    acts = request.activations_home or DEVICE_ACTIVATIONS
    fixed = cost.fixed_device_bytes(batches, batch_size, *tokens, kv_home=kv_home, activations_home=acts)
    in_ram = batches * cost.kv_cache_bytes(batch_size, *tokens) if kv_home == HOST_KV else 0
    if acts != DEVICE_ACTIVATIONS:
        in_ram += batches * cost.residual_bytes(batch_size, request.prompt_tokens)
    if in_ram and in_ram >= _host_budget(study):
        return (
            f"its KV cache and activations in host RAM ({format_size(in_ram)}) exceed the host budget "
            f"{format_size(_host_budget(study))}"
        )
    if fixed + cost.sizes.largest <= budget:
        return None
    where = "KV cache slots" if kv_home != DEVICE_KV else "KV cache"
    return (
        f"its {where} and activations ({format_size(fixed)}) and the largest block "
        f"({format_size(cost.sizes.largest)}) exceed the device budget {format_size(budget)}"
    )


def _device_budget(study: Study) -> int:
    given = study.request.device_memory_bytes
    return study.machine.device_memory_bytes if given is None else given


def _host_budget(study: Study) -> int:
    given = study.request.host_memory_bytes
    return study.machine.host_memory_bytes if given is None else given


def _simulate(
    study: Study, setup: SweepSetup, steps: int, seed: int
) -> tuple[list[WorkloadResult], list[int]]:
    request, preset = study.request, setup.preset
    hot = preset.get("hot_experts", setup.hot_experts)
    policies = {k: preset[k] for k in ("prefetch", *SCHEDULE_FIELDS) if k in preset}
    config = SimConfig(
        study.spec, study.machine, batches=setup.batches[0], batch_size=setup.batch_size,
        hot_experts=study.spec.num_experts if hot == ALL_EXPERTS else hot,
        device_memory_bytes=request.device_memory_bytes, host_memory_bytes=request.host_memory_bytes,
        host_preload=setup.host_preload, compression_ratio=request.compression_ratio, routing=study.sampler,
        seed=seed, eviction=setup.eviction, **policies,
    )  # fmt: skip

    def sequences(n: int) -> int:
        if setup.from_plan:
            return request.sequences
        return study.sequences or n * setup.batch_size

    results = [
        simulate_workload(
            dataclasses.replace(
                config,
                batches=n,
                eviction=setup.eviction_at(n),
                kv_home=setup.kv_homes.get(n, DEVICE_KV),
                kv_attention=_attention_at(setup, n),
                activations_home=setup.activations_home,
                kv_device_layers=setup.kv_device_layers
                if setup.kv_homes.get(n, DEVICE_KV) != DEVICE_KV
                else 0,
            ),
            sequences=sequences(n),
            prompt_tokens=request.prompt_tokens,
            new_tokens=request.new_tokens,
            max_decode_steps=steps,
        )
        for n in setup.batches
    ]
    return results, [sequences(n) for n in setup.batches]


def _heading(study: Study, setup: SweepSetup) -> list[str]:
    request, machine = study.request, study.machine
    routing = study.sampler.describe() if study.sampler is not None else "parametric model"
    device, host = format_size(_device_budget(study)), format_size(_host_budget(study))
    lines = [
        f"simulated {study.model} on {machine.name} ({machine.device}): {request.prompt_tokens} prompt + "
        f"{request.new_tokens} new tokens per sequence; budgets: device {device}, host {host}; "
        f"{_schedule(setup)}; {_evictions(setup)}; {_kv_homes(setup)}{_activations(setup)}; "
        f"routing: {routing}",
    ]
    if setup.from_plan:
        lines.append(f"n, bs, K and preload from the plan ({setup.plan.why})")
    return [*lines, ""]


def _schedule(setup: SweepSetup) -> str:
    """The schedule simulated, in words."""
    options = EngineOptions(**setup.preset)
    if (options.schedule, options.expert_order) == (KLOTSKI, READY_FIRST):
        return f"klotski schedule, {options.prefetch} prefetch"
    return f"{options.schedule} schedule, {options.expert_order} expert order, {options.prefetch} prefetch"


def _attention_at(setup: SweepSetup, n: int) -> str:
    """Where decode attention runs at ``n``: on the host only where the cache lives in host RAM."""
    return setup.kv_attention if setup.kv_homes.get(n) == HOST_KV else DEVICE_ATTENTION


def _kv_homes(setup: SweepSetup) -> str:
    """Where each n simulated keeps its KV cache (and runs its decode attention), in words."""
    words = {
        DEVICE_KV: "on the device",
        HOST_KV: "in host RAM (two device slots)",
        DISK_KV: "on the drive (two device slots)",
    }
    if setup.kv_attention == HOST_ATTENTION:
        words[HOST_KV] = "in host RAM, decode attention on the host's cores"
    if setup.kv_device_layers:
        words[HOST_KV] += f" but the first {setup.kv_device_layers} layers' (on the device)"
        words[DISK_KV] += f" but the first {setup.kv_device_layers} layers' (on the device)"
    homes = {n: setup.kv_homes.get(n, DEVICE_KV) for n in setup.batches}
    if len(set(homes.values())) <= 1:
        return f"KV cache {words[next(iter(homes.values()), DEVICE_KV)]}"
    by_home = {home: [n for n, h in homes.items() if h == home] for home in dict.fromkeys(homes.values())}
    return "KV cache " + "; ".join(
        f"{words[home]} at n={', '.join(map(str, ns))}" for home, ns in by_home.items()
    )


def _activations(setup: SweepSetup) -> str:
    if setup.activations_home == DEVICE_ACTIVATIONS:
        return ""
    return "; prefill residual streams in host RAM between jobs"


def _evictions(setup: SweepSetup) -> str:
    """The eviction policy of each n simulated, in words."""
    chosen = {n: setup.eviction_at(n) for n in setup.batches}
    if len(set(chosen.values())) == 1:
        return f"{next(iter(chosen.values()))} eviction"
    return "eviction by n as the planner chose: " + ", ".join(f"{e} at n={n}" for n, e in chosen.items())


def _notes(setup: SweepSetup) -> list[str]:
    notes = [f"n={n} not simulated: {why}" for n, why in sorted(setup.skipped.items())]
    return ["", *notes] if notes else []


def _record(
    study: Study,
    setup: SweepSetup,
    results: Sequence[WorkloadResult],
    sequences: Sequence[int],
    predicted: Sequence[float | None],
) -> dict[str, Any]:
    rows = [
        {
            **result.to_dict(),
            "sequences": count,
            "planner_decode_tokens_per_s": guess,
            "eviction": setup.eviction_at(result.batches),
            "kv_home": setup.kv_homes.get(result.batches, DEVICE_KV),
            "kv_attention": _attention_at(setup, result.batches),
            "kv_device_layers": setup.kv_device_layers,
            "activations_home": setup.activations_home,
        }
        for result, count, guess in zip(results, sequences, predicted, strict=True)
    ]
    return {
        "model": study.model,
        "machine": study.machine.name,
        "prompt_tokens": study.request.prompt_tokens,
        "new_tokens": study.request.new_tokens,
        "device_budget_bytes": _device_budget(study),
        "host_budget_bytes": _host_budget(study),
        "from_plan": setup.from_plan,
        "rows": rows,
        "skipped": [{"batches": n, "reason": why} for n, why in sorted(setup.skipped.items())],
    }


def catalog(shapes_file: Path | None, hardware_file: Path | None, profile_path: Path | None) -> list[str]:
    """The model shapes and machines that ``--model-shape`` and ``--hardware`` can name."""
    user_shapes = load_shapes_file(shapes_file) if shapes_file is not None else {}
    machines = {**HARDWARE, **(load_hardware_file(hardware_file) if hardware_file is not None else {})}
    path = profile_path if profile_path is not None else default_profile_path()
    state = "" if path.is_file() else " (none yet: run `klotski-tier bench`)"
    this = f"this machine, from the `klotski-tier bench` profile at {path}{state}"
    return [*format_shapes(MODEL_SHAPES, user_shapes), "", *format_hardware(machines, this)]
