"""The benchmark's outputs: a table (text), the JSON file, the PNG charts, the machine profile beside them.

Files, in ``--out`` (default ``benchmarks/results``), named after the model (``<stem>`` is
``e2e-<model>``, ``e2e-<model>-batches`` or ``e2e-<model>-budget`` for the sweeps)::

    <stem>.json          every run of every system, medians, the bound and its terms, the settings
    <stem>.png           tokens/s per system against the bound (a sweep: against n or the budget)
    <stem>-machine.json  the machine profile of ``klotski-tier bench`` (or, without one, the host facts)

Table columns: tokens/s (generated tokens / prefill + decode time), the planner's predicted tokens/s
(klotski, when a machine profile exists: see :mod:`benchmarks.e2e.planning`), decode tokens/s, the
ratio to accelerate, the fraction of the lower bound, the time compute waited for I/O, the bytes read
from the drive, and the peak memory (the cgroup's, else the process's peak RSS): medians. Below the
table, each system's configuration (klotski's n, bs, K and whether planned or swept) and, for
klotski, the planner's predicted tokens/s and decode tokens/s next to the measured ones; for llama.cpp,
how many sequences matched the reference exactly and how many parted at a near-tie.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.e2e.planning import PLAN
from benchmarks.e2e.results import Point, SystemResult
from benchmarks.e2e.systems import KLOTSKI
from benchmarks.e2e.worker import ACCELERATE
from klotski_tier.core.atomic import atomic_open
from klotski_tier.core.bench.profile import HostInfo
from klotski_tier.core.units import format_size

COLUMNS = (
    ("system", 13), ("tokens/s", 9), ("pred t/s", 9), ("decode t/s", 10), ("x accel", 8), ("x bound", 8),
    ("I/O wait s", 10), ("read", 10), ("peak mem", 10),
)  # fmt: skip
CHART_DPI = 110
MISSING = "-"


def format_point(point: Point) -> str:
    """The table of one budget point, then each system's configuration (or why it has no figures)."""
    lines = [" ".join(f"{name:>{width}}" for name, width in COLUMNS)]
    accelerate = _tokens_per_s(point.system(ACCELERATE))
    bound = point.bound.tokens_per_s if point.bound is not None else None
    for system in point.systems:
        lines.append(_row(system, accelerate, bound))
    if point.bound is not None:
        b = point.bound
        cells = [
            "bound",
            f"{b.tokens_per_s:.2f}",
            MISSING,
            MISSING,
            _ratio(b.tokens_per_s, accelerate),
            "1.00",
        ]
        cells += [MISSING, format_size(b.must_move_bytes), MISSING]
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True)))
    lines.append("")
    lines.append(f"budget: {point.budget.describe()}")
    for system in point.systems:
        lines += _configuration(system)
    if point.bound is not None:
        b = point.bound
        lines.append(
            f"bound: max(compute {b.compute_s:.2f} s, {format_size(b.must_move_bytes)} / "
            f"{b.drive_gbps:.2f} GB/s = {b.io_s:.2f} s) = {b.seconds:.2f} s, {b.limited_by}-bound, "
            f"at n={b.batches} x bs={b.batch_size}"
        )
        lines += _beside_reads(point)
    return "\n".join(lines)


def _beside_reads(point: Point) -> list[str]:
    """The bound beside reads, and the fraction of it each system reached."""
    b = point.bound
    if b is None or b.beside_reads_seconds is None or b.beside_reads_compute_s is None:
        return []
    line = (
        f"bound beside reads: max(compute {b.beside_reads_compute_s:.2f} s while the drive reads "
        f"{format_size(b.must_move_bytes)} beside it, {b.io_s:.2f} s) = {b.beside_reads_seconds:.2f} s"
    )
    reached = [
        f"{s.name} {tps * b.beside_reads_seconds / b.generated_tokens:.2f}"
        for s in point.systems
        if (tps := _tokens_per_s(s)) is not None
    ]
    return [line + (f"; of it: {', '.join(reached)}" if reached else "")]


def _configuration(system: SystemResult) -> list[str]:
    """How ``system`` was configured (klotski: planned or swept, and the planner's prediction)."""
    mode = system.notes.get("config")
    how = (
        f" [{'planned' if mode == PLAN else 'best n of a sweep'}]" if system.name == KLOTSKI and mode else ""
    )
    lines = [f"{system.name}: {system.config or ''}{how}" + (f" -- {system.reason}" if not system.ok else "")]
    if "plan_note" in system.notes:
        lines.append(f"{system.name}: not planned at this budget: {system.notes['plan_note']}")
    check = system.notes.get("token_check")
    if check is not None:
        lines.append(f"{system.name} tokens: {_token_check(check)}")
    predicted = system.notes.get("predicted")
    if predicted is not None:
        tps, decode = (_number(system.median(name)) for name in ("tokens_per_s", "decode_tokens_per_s"))
        feasible = "" if predicted["feasible"] else " (infeasible to the planner)"
        lines.append(
            f"{system.name} predicted by the planner: {predicted['tokens_per_s']:.2f} tokens/s, decode "
            f"{predicted['decode_tokens_per_s']:.2f}{feasible}; measured {tps}, decode {decode}"
        )
        if mode == PLAN:
            lines.append(f"{system.name} plan: {predicted['why']}")
    return lines


def _token_check(check: dict[str, Any]) -> str:
    """A system's near-tie token check (``benchmarks.e2e.near_tie``) in words."""
    if not check.get("checked", True):
        return f"not checked: {check['why']}"
    text = (
        f"{check['exact']} of {check['sequences']} sequences exactly the reference's, "
        f"{check['near_tie']} parted at a near-tie"
    )
    if check["near_ties"]:
        first = check["near_ties"][0]
        text += (
            f" (first: prompt {first['prompt']}, position {first['position']}, token {first['token']} for "
            f"{first['expected']}, {first['shortfall']:.3g} below the best logit, "
            f"tolerance {first['tolerance']:.3g})"
        )
    return text


def _row(system: SystemResult, accelerate: float | None, bound: float | None) -> str:
    if not system.ok:
        cells = [system.name, "failed" if system.runs else "skipped", *([MISSING] * (len(COLUMNS) - 2))]
    else:
        tps = _tokens_per_s(system)
        cells = [
            system.name,
            f"{tps:.2f}",
            _predicted(system),
            f"{system.median('decode_tokens_per_s') or 0.0:.2f}",
            _ratio(tps, accelerate),
            _ratio(tps, bound),
            _number(system.median("io_wait_s")),
            _bytes(system.median("bytes_read")),
            _bytes(system.median("peak_bytes")),
        ]
    return " ".join(f"{c:>{w}}" for c, (_, w) in zip(cells, COLUMNS, strict=True))


def _predicted(system: SystemResult | None) -> str:
    predicted = system.notes.get("predicted") if system is not None else None
    return MISSING if predicted is None else f"{predicted['tokens_per_s']:.2f}"


def _tokens_per_s(system: SystemResult | None) -> float | None:
    return system.median("tokens_per_s") if system is not None and system.ok else None


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else MISSING


def _number(value: float | None) -> str:  # seconds or tokens/s
    return MISSING if value is None else f"{value:.2f}"


def _bytes(value: float | None) -> str:
    return MISSING if value is None else format_size(value)


# ---- files -----------------------------------------------------------------------------------


def write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_open(path, "w", what="e2e result") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")


def copy_machine_profile(target: Path, drive_gbps: float, profile: Path) -> None:
    """The ``klotski-tier bench`` ``profile`` copied to ``target``; without one, the host facts and drive."""
    if profile.is_file():
        shutil.copyfile(profile, target)
        return
    facts = {
        "note": "no klotski-tier bench profile on this machine; `klotski-tier bench` writes the full one",
        "host": dataclasses.asdict(HostInfo.current()),
        "drive_raw_gbps": drive_gbps,
    }
    write_json(target, facts)


# ---- charts ----------------------------------------------------------------------------------


def chart_point(point: Point, path: Path, title: str) -> None:
    """Bars of tokens/s per system, the bound as a dashed line, each bar labelled with its fraction of it
    (and, measured, of the bound beside reads: a dotted line)."""
    from matplotlib.figure import Figure

    systems = [s for s in point.systems if s.ok]
    values = [_tokens_per_s(s) or 0.0 for s in systems]
    figure = Figure(figsize=(8, 4))
    axes = figure.add_subplot(1, 1, 1)
    bars = axes.bar([s.name for s in systems], values, color="tab:blue")
    if point.bound is not None:
        bound = point.bound.tokens_per_s
        axes.axhline(
            bound, color="tab:red", linestyle="--", label=f"bound ({point.bound.limited_by}-limited)"
        )
        beside = point.bound.beside_reads_seconds
        labels = [f"{v / bound:.0%}" for v in values]
        if beside:
            reachable = point.bound.generated_tokens / beside
            axes.axhline(reachable, color="tab:orange", linestyle=":", label="bound beside reads")
            labels = [f"{v / bound:.0%} ({v / reachable:.0%})" for v in values]
        axes.bar_label(bars, labels=labels)
        axes.legend()
    axes.set_ylabel("generated tokens / s")
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=CHART_DPI)


def chart_sweep(xs: Sequence[float], points: Sequence[Point], path: Path, xlabel: str, title: str) -> None:
    """tokens/s of every system (and the bound) against the swept quantity."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    names = [s.name for s in points[0].systems] if points else []
    for name in names:
        series = [_tokens_per_s(p.system(name)) for p in points]
        axes.plot(xs, [v if v is not None else float("nan") for v in series], marker="o", label=name)
        predicted = _predicted_series(points, name)
        if predicted is not None:
            axes.plot(xs, predicted, linestyle=":", marker="x", label=f"{name} (planner's prediction)")
    bounds = [p.bound.tokens_per_s if p.bound is not None else float("nan") for p in points]
    axes.plot(xs, bounds, linestyle="--", color="tab:red", label="bound")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("generated tokens / s")
    axes.set_ylim(bottom=0)
    axes.set_title(title, fontsize=10)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=CHART_DPI)


def _predicted_series(points: Sequence[Point], name: str) -> list[float] | None:
    """The planner's predicted tokens/s of system ``name`` at each point (NaN where none); None if none."""
    notes = [s.notes.get("predicted") if s is not None else None for s in (p.system(name) for p in points)]
    if all(n is None for n in notes):
        return None
    return [float("nan") if n is None else float(n["tokens_per_s"]) for n in notes]
