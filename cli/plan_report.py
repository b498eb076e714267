"""What ``plan`` and ``simulate`` show: a plan and why, a simulated sweep, the known shapes and machines.

Pure formatting: each function returns lines, the commands print them. The sweep chart is drawn
here too, with matplotlib (the ``plot`` extra) imported only when a picture is asked for.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.timeline import write_atomic
from klotski_tier.core.plan.autoplan import RunPlan
from klotski_tier.core.plan.costmodel import block_sizes
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.planner import Deadline, Plan, PlanRequest, StepPrediction, TierUse
from klotski_tier.core.plan.shapes import ShapeEntry, active_parameter_count, parameter_count
from klotski_tier.core.plan.simulate import DISK_TO_HOST, HOST_TO_DEVICE, WorkloadResult
from klotski_tier.core.runtime.config import DEVICE_ACTIVATIONS, DEVICE_KV, HOST_ATTENTION, HOST_KV
from klotski_tier.core.units import format_size

MS_PER_S = 1000.0
BILLION = 1e9  # parameters per "B" in the shapes list
MISSING_MATPLOTLIB = "drawing the sweep needs matplotlib: pip install 'klotski-tier[plot]'"
CHART_SIZE_IN = (8.0, 4.5)
CHART_DPI = 110
SWEEP_ROWS = 12  # rows of the planner's sweep shown in full; longer sweeps are thinned


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], text: Sequence[int] = (0,)) -> list[str]:
    """Columns two spaces apart: the ``text`` columns left-aligned, the others (numbers) right-aligned."""
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        cells = [
            c.ljust(w) if i in text else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(row) for row in (headers, *rows)]


def _ms(seconds: float) -> str:
    return f"{seconds * MS_PER_S:.2f}"


# --- a plan ---------------------------------------------------------------------------------


def format_plan(plan: Plan, request: PlanRequest, model: str, machine: Machine) -> list[str]:
    """The chosen plan and why: deadlines, predicted times, memory, the reasons and what would help."""
    return [
        f"plan for {model} on {machine.name} ({machine.device}): {request.sequences} sequences of "
        f"{request.prompt_tokens} prompt + {request.new_tokens} new tokens",
        f"machine: {machine.source}",
        f"chosen: n={plan.batches} batches of bs={plan.batch_size} sequences, "
        f"K={plan.hot_experts} hot experts prefetched per layer",
        f"placement: {plan.placement.describe()}",
        "",
        *format_deadlines(plan.deadlines, plan.binding),
        explain_binding(plan.binding, plan.batches),
        "",
        step_line("decode", plan.decode),
        step_line("prefill", plan.prefill),
        f"predicted throughput: prefill {plan.prefill_tokens_per_s:.1f} tokens/s, "
        f"decode {plan.decode_tokens_per_s:.2f} tokens/s",
        "",
        *format_memory(plan.memory),
        *format_drive(plan),
        *format_memory_cap(plan),
        "",
        f"why: {plan.why}",
        *format_advice(plan),
        "",
        *format_plan_sweep(plan),
    ]


def format_deadlines(deadlines: Sequence[Deadline], binding: Deadline) -> list[str]:
    """One row per deadline (4)-(7) in its worst layer: both sides, the slack, met or missed."""
    rows = [
        [
            f"({d.number}) {d.meaning}",
            _ms(d.compute_s),
            _ms(d.io_s),
            f"{d.slack_s * MS_PER_S:+.2f}",
            str(d.layer),
            ("met" if d.slack_s >= 0 else "MISSED") + (", binds" if d.number == binding.number else ""),
        ]
        for d in deadlines
    ]
    headers = ["deadline (compute side >= I/O side)", "compute ms", "I/O ms", "slack ms", "layer", ""]
    return table(headers, rows, text=(0, 5))


def explain_binding(binding: Deadline, batches: int) -> str:
    """The binding deadline in plain words."""
    sides = (
        f"the compute of n={batches} batches takes {_ms(binding.compute_s)} ms while the loads it "
        f"waits for take {_ms(binding.io_s)} ms"
    )
    if binding.slack_s >= 0:
        return (
            f"tightest: ({binding.number}) {binding.meaning}: in layer {binding.layer} {sides}, "
            f"{_ms(binding.slack_s)} ms to spare"
        )
    return (
        f"binding: ({binding.number}) {binding.meaning} fails: in layer {binding.layer} {sides}, so the "
        f"device waits {_ms(-binding.slack_s)} ms"
    )


def step_line(phase: str, step: StepPrediction) -> str:
    """A predicted step split into compute and the two kinds of bubble."""
    return (
        f"predicted {phase} step: {_ms(step.step_s)} ms for {step.tokens} tokens = compute "
        f"{_ms(step.compute_s)} ms + inter-layer bubble {_ms(step.inter_layer_s)} ms + intra-layer bubble "
        f"{_ms(step.intra_layer_s)} ms"
    )


def format_drive(plan: Plan) -> list[str]:
    """What a decode step reads from the drive, against what the device and host RAM cannot hold."""
    if not plan.drive_bytes:
        return []
    held = f"what the device and host RAM cannot hold of a step: {format_size(plan.unheld_bytes)}"
    ratio = f" ({plan.drive_bytes / plan.unheld_bytes:.2f}x)" if plan.unheld_bytes else ""
    return [f"drive per decode step: {format_size(plan.drive_bytes)} predicted; {held}{ratio}"]


def format_memory(memory: Sequence[TierUse]) -> list[str]:
    """Each tier: what the plan needs at once, its peak (caching fills the budget), the budget."""
    rows = [
        [
            use.tier,
            format_size(use.needed_bytes),
            format_size(use.peak_bytes),
            format_size(use.budget_bytes),
            "yes" if use.fits else "NO",
            ", ".join(f"{name} {format_size(nbytes)}" for name, nbytes in use.parts.items()),
        ]
        for use in memory
    ]
    short = [
        f"{use.tier} memory is {format_size(use.needed_bytes - use.budget_bytes)} short of what the plan "
        f"holds at once: loads wait for room; more {use.tier} memory would help"
        for use in memory
        if not use.fits
    ]
    return [*table(["memory", "needed", "peak", "budget", "fits", "needed for"], rows, text=(0, 5)), *short]


def format_memory_cap(plan: Plan) -> list[str]:
    if not all(use.fits for use in plan.memory):
        return []
    return [f"largest n tried that fits the budgets at bs={plan.batch_size}: {plan.memory_cap_batches}"]


def format_advice(plan: Plan) -> list[str]:
    if not plan.advice:
        return ["what would help: nothing is needed, every load hides behind compute within the budgets"]
    return ["what would relax it:", *(f"  - {advice}" for advice in plan.advice)]


def format_plan_sweep(plan: Plan) -> list[str]:
    """The planner's prediction for the n it tried at the chosen bs and K (beyond
    :data:`SWEEP_ROWS` of them: powers of two, the chosen n and the largest)."""
    tried = [point.batches for point in plan.sweep]
    shown = set(tried)
    if len(tried) > SWEEP_ROWS:
        shown = {n for n in tried if n & (n - 1) == 0} | {plan.batches, max(tried)}
    rows = [
        [str(n), f"{tokens_per_s:.2f}", _ms(bubble_s), "<- chosen" if n == plan.batches else ""]
        for n, tokens_per_s, bubble_s, _ in plan.sweep
        if n in shown
    ]
    heading = f"predicted by n (bs={plan.batch_size}, K={plan.hot_experts}):"
    return [heading, *table(["n", "decode tokens/s", "bubble ms/step", ""], rows, text=(3,))]


def plan_record(plan: Plan, request: PlanRequest, model: str, machine: Machine) -> dict[str, Any]:
    """``plan --json``: the plan's own dict, with what it was made for."""
    workload = {
        "sequences": request.sequences,
        "prompt_tokens": request.prompt_tokens,
        "new_tokens": request.new_tokens,
    }
    return {**plan.to_dict(), "model": model, "machine": machine.name, "workload": workload}


# --- the plan of a run -----------------------------------------------------------------------


def run_plan_line(chosen: RunPlan) -> str:
    """One line for ``run``'s table: the n, bs and K the run used and where they come from."""
    options, plan = chosen.options, chosen.plan
    hot = "top-k" if options.hot_experts is None else str(options.hot_experts)
    shape = f"n={options.batches}, bs={options.batch_size}, K={hot}, eviction {options.eviction}"
    if options.kv_home != DEVICE_KV:
        shape += ", KV cache " + ("in host RAM" if options.kv_home == HOST_KV else "on the drive")
        if options.kv_device_layers:
            shape += f" but its first {options.kv_device_layers} layers'"
    if options.kv_attention == HOST_ATTENTION:
        shape += ", decode attention on the host"
    if options.activations_home != DEVICE_ACTIVATIONS:
        shape += ", prefill residuals in host RAM"
    if plan is None:
        return f"plan: {chosen.mode}, {shape}" + (f" ({chosen.note})" if chosen.note else "")
    kept = sorted(set(plan.engine_options()) - set(chosen.planned))
    yours = f"; yours: {', '.join(kept)}" if kept else ""
    prediction = f"{chosen.mode}: predicted {plan.decode_tokens_per_s:.2f} decode tok/s{yours}"
    basis = f"; for {chosen.basis}" if chosen.basis else ""
    note = f"; {chosen.note}" if chosen.note else ""
    return f"plan: {shape} ({prediction}{basis}{note})"


def run_plan_record(chosen: RunPlan) -> dict[str, Any]:
    """``run --json``'s ``plan`` object: what the run used, which of it the plan set, the prediction."""
    options, plan = chosen.options, chosen.plan
    record: dict[str, Any] = {
        "mode": chosen.mode,
        "used": plan is not None,
        "batches": options.batches,
        "batch_size": options.batch_size,
        "hot_experts": options.hot_experts,
        "host_preload": options.host_preload,
        "eviction": options.eviction,
        "lookahead_layers": options.lookahead_layers,
        "kv_home": options.kv_home,
        "kv_attention": options.kv_attention,
        "activations_home": options.activations_home,
        "kv_device_layers": options.kv_device_layers,
        "planned": sorted(chosen.planned),
        "note": chosen.note,
        "basis": chosen.basis,
    }
    if plan is not None:
        record.update(
            predicted_decode_tokens_per_s=plan.decode_tokens_per_s,
            predicted_prefill_tokens_per_s=plan.prefill_tokens_per_s,
            feasible=plan.feasible,
            binding=plan.binding.to_dict(),  # the why and advice: `klotski-tier plan`
        )
    return record


# --- a simulated sweep ---------------------------------------------------------------------


def format_simulation(
    results: Sequence[WorkloadResult], sequences: Sequence[int], predicted: Sequence[float | None]
) -> list[str]:
    """One row per n: throughput, the planner's prediction, bubbles, bytes moved and peak memory."""
    rows = [
        _simulation_row(result, count, guess)
        for result, count, guess in zip(results, sequences, predicted, strict=True)
    ]
    headers = [
        "n", "bs", "K", "seqs", "prefill tok/s", "decode tok/s", "planner tok/s", "decode bubbles s",
        "bubble share", "disk->host", "host->device", "peak device", "peak host",
    ]  # fmt: skip
    return table(headers, rows)


def _simulation_row(result: WorkloadResult, sequences: int, predicted: float | None) -> list[str]:
    decode = result.decode
    bubbles = decode.inter_layer_s + decode.intra_layer_s
    moved = {pair: result.prefill.bytes_moved[pair] + decode.bytes_moved[pair] for pair in decode.bytes_moved}
    return [
        str(result.batches),
        str(result.batch_size),
        str(result.hot_experts),
        str(sequences),
        f"{result.prefill_tokens_per_s:.1f}",
        f"{result.decode_tokens_per_s:.2f}",
        "-" if predicted is None else f"{predicted:.2f}",
        f"{decode.inter_layer_s:.2f} + {decode.intra_layer_s:.2f}",
        f"{bubbles / decode.step_s:.0%}" if decode.step_s > 0 else "-",
        format_size(moved[DISK_TO_HOST]),
        format_size(moved[HOST_TO_DEVICE]),
        format_size(max(result.prefill.peak_device_bytes, decode.peak_device_bytes)),
        format_size(max(result.prefill.peak_host_bytes, decode.peak_host_bytes)),
    ]


def render_sweep_png(
    results: Sequence[WorkloadResult], predicted: Sequence[float | None], path: Path, title: str
) -> None:
    """Decode tokens/s by n, simulated and as the planner predicts, into the PNG ``path`` (atomically)."""
    figure_cls, canvas_cls = _matplotlib()
    figure = figure_cls(figsize=CHART_SIZE_IN, dpi=CHART_DPI)
    canvas = canvas_cls(figure)
    axes = figure.add_subplot(1, 1, 1)
    batches = [result.batches for result in results]
    axes.plot(batches, [r.decode_tokens_per_s for r in results], marker="o", label="simulated")
    known = [(n, p) for n, p in zip(batches, predicted, strict=True) if p is not None]
    if known:
        axes.plot(*zip(*known, strict=True), marker="x", linestyle="--", label="planner")
    axes.set_xscale("log", base=2)
    axes.set_xticks(batches, [str(n) for n in batches])
    axes.set(xlabel="batches n", ylabel="decode tokens/s", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    write_atomic(path, buffer.getvalue(), "picture")


def _matplotlib() -> tuple[Any, Any]:
    """The Figure and Agg canvas classes; ConfigError without the ``plot`` extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ConfigError(MISSING_MATPLOTLIB) from exc
    return Figure, FigureCanvasAgg


# --- what can be studied ---------------------------------------------------------------------


def format_shapes(builtin: Mapping[str, ShapeEntry], user: Mapping[str, ModelSpec]) -> list[str]:
    """Every model shape: its size and where its figures come from."""
    rows = [_shape_row(entry.name, entry.spec, entry.source + (f" ({entry.note})" if entry.note else ""))
            for entry in builtin.values()]  # fmt: skip
    rows += [_shape_row(name, spec, "shapes file") for name, spec in user.items()]
    return table(
        ["shape", "params", "active", "layers x experts", "top-k", "size", "source"], rows, text=(0, 6)
    )


def _shape_row(name: str, spec: ModelSpec, source: str) -> list[str]:
    return [
        name,
        f"{parameter_count(spec) / BILLION:.2f} B",
        f"{active_parameter_count(spec) / BILLION:.2f} B",
        f"{spec.num_layers} x {spec.num_experts}",
        str(spec.top_k),
        format_size(block_sizes(spec).total),
        source,
    ]


def format_hardware(machines: Mapping[str, Machine], this_machine: str) -> list[str]:
    """Every machine: its figures, then where they come from; ``this_machine`` describes ``this``."""
    rows = [
        [
            m.name,
            m.device,
            format_size(m.device_memory_bytes),
            format_size(m.host_memory_bytes),
            f"{m.disk_read_gbps:g}",
            "-" if m.host_to_device_gbps is None else f"{m.host_to_device_gbps:g}",
        ]
        for m in machines.values()
    ]
    headers = ["hardware", "device", "device memory", "host memory", "drive GB/s", "host->device GB/s"]
    sources = [f"  {m.name}: {m.source}" for m in machines.values()]
    return [*table(headers, rows, text=(0, 1)), f"  this / local: {this_machine}", "sources:", *sources]
