"""``klotski-tier replay FILE``: compare prefetch and eviction policies on a recorded routing trace.

Thin: load the trace, replay every (prefetch, eviction) pair through
:func:`klotski_tier.core.observe.replay.replay_by_name`, print a table or one JSON object.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.params import NonEmptyPath, registry_name, size, whole
from klotski_tier.core.observe.replay import ReplayResult, replay_by_name
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.units import format_size
from klotski_tier.policies.registry import EVICTION_POLICIES, PREFETCH_POLICIES

DEFAULT_EVICTION = "lru"
COLUMNS = ("prefetch", "eviction", "hit rate", "precision", "recall", "bytes moved", "loads")


@click.command("replay")
@click.argument("file", type=NonEmptyPath(path_type=Path))
@click.option(
    "--prefetch",
    "prefetch_names",
    multiple=True,
    type=registry_name(PREFETCH_POLICIES),
    metavar="NAME",
    help=f"Prefetch policy to replay: {', '.join(PREFETCH_POLICIES.names())} (repeatable; default: all).",
)
@click.option(
    "--eviction",
    "eviction_names",
    multiple=True,
    type=registry_name(EVICTION_POLICIES),
    metavar="NAME",
    help=f"Eviction policy to replay: {', '.join(EVICTION_POLICIES.names())} (repeatable; default: "
    f"{DEFAULT_EVICTION}).",
)
@click.option(
    "--device-memory",
    "capacity",
    required=True,
    type=size(),
    metavar="SIZE",
    help="Device budget for experts, e.g. 2GiB.",
)
@click.option("--hot-experts", type=whole(min=0), help="Experts prefetched per layer (default: top-k).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@report_errors
def replay(
    file: Path,
    prefetch_names: tuple[str, ...],
    eviction_names: tuple[str, ...],
    capacity: int,
    hot_experts: int | None,
    as_json: bool,
) -> None:
    """Compare policies on the routing trace FILE.

    Replays FILE (from `run --record-routing`) through each pair of prefetch and eviction
    policies without running the model, and prints hit rate, prefetch precision and recall,
    and the bytes that would be moved.
    """
    trace = RoutingTrace.load(file)
    results = replay_by_name(
        trace,
        prefetch_names or PREFETCH_POLICIES.names(),
        eviction_names or (DEFAULT_EVICTION,),
        capacity_bytes=capacity,
        hot_experts=hot_experts,
    )
    if as_json:
        click.echo(json.dumps(_record(trace, capacity, results)))
        return
    for line in [_summary(trace, capacity, results), "", *format_table(results)]:
        click.echo(line)


def _record(trace: RoutingTrace, capacity: int, results: list[ReplayResult]) -> dict[str, Any]:
    meta = trace.meta
    return {
        "trace": {
            "file": str(trace.source),
            "model_type": meta.model_type,
            "num_layers": meta.num_layers,
            "num_experts": meta.num_experts,
            "top_k": meta.top_k,
            "expert_bytes": meta.expert_bytes,
            "steps": len(trace.steps),
            "tokens": trace.num_tokens,
        },
        "device_memory_bytes": capacity,
        "results": [result.to_dict() for result in results],
    }


def _summary(trace: RoutingTrace, capacity: int, results: list[ReplayResult]) -> str:
    meta = trace.meta
    experts = meta.num_layers * meta.num_experts
    slots = capacity // meta.expert_bytes
    held = f"all {experts}" if slots >= experts else f"{slots} of {experts}"
    k = results[0].hot_experts if results else meta.top_k
    return (
        f"{trace.source}: {meta.describe()}; {len(trace.steps)} steps, {trace.num_tokens} tokens; "
        f"device memory {format_size(capacity)} holds {held} experts ({format_size(meta.expert_bytes)} "
        f"each); K = {k}"
    )


def format_table(results: list[ReplayResult]) -> list[str]:
    """One aligned row per (prefetch, eviction) pair, under a header."""
    rows = [COLUMNS] + [
        (
            r.prefetch,
            r.eviction,
            f"{r.hit_rate:.1%}",
            f"{r.precision:.1%}",
            f"{r.recall:.1%}",
            format_size(r.bytes_moved),
            str(r.loads),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    left = 2  # prefetch and eviction names are left-aligned, numbers right-aligned
    return [
        "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
