"""What ``klotski-tier run`` shows: generated text per prompt and a metrics table.

Pure formatting of a :class:`~klotski_tier.core.runtime.engine.GenerationResult`; the command prints.
"""

from __future__ import annotations

from typing import Any

from klotski_tier.core.bench.profile import MachineProfile
from klotski_tier.core.observe.metrics import INTER_LAYER, INTRA_LAYER, RunMetrics
from klotski_tier.core.runtime.engine import GenerationResult, SequenceOutput
from klotski_tier.core.runtime.run import UNLIMITED_BYTES
from klotski_tier.core.units import format_size

PREVIEW_CHARS = 200
"""Characters of generated text shown per prompt in the human-readable report."""


def output_record(index: int, output: SequenceOutput) -> dict[str, Any]:
    return {
        "index": index,
        "prompt_ids": output.prompt_ids,
        "token_ids": output.token_ids,
        "text": output.text,
        "finish_reason": output.finish_reason,
    }


def result_record(result: GenerationResult, profile: MachineProfile | None = None) -> dict[str, Any]:
    """The whole result as one JSON-ready object (``--json``); ``drive`` only with a machine profile."""
    record = {
        "outputs": [output_record(i, o) for i, o in enumerate(result.outputs)],
        "metrics": result.metrics.to_dict(),
    }
    if profile is not None:
        record["drive"] = drive_record(result.metrics, profile)
    return record


def drive_record(metrics: RunMetrics, profile: MachineProfile) -> dict[str, Any]:
    """The run's disk reads against the drive ``klotski-tier bench`` measured.

    ``raw_seconds`` is the least time the drive needs for the bytes read (at its raw O_DIRECT
    bandwidth); ``raw_share`` is that time over the run's wall: near 1, the drive is the bottleneck.
    """
    read = metrics.disk_bytes_read
    raw_s = read / (profile.drive.raw_gbps * 1e9)
    return {
        "profile_created": profile.created,
        "raw_gbps": profile.drive.raw_gbps,
        "best_read_gbps": profile.drive.best.gbps,
        "bytes_read": read,
        "raw_seconds": raw_s,
        "raw_share": raw_s / metrics.wall_s if metrics.wall_s > 0 else 0.0,
    }


def format_outputs(result: GenerationResult) -> list[str]:
    lines = []
    for index, output in enumerate(result.outputs):
        body = output.text if output.text is not None else " ".join(map(str, output.token_ids))
        body = body.replace("\n", "\\n")
        if len(body) > PREVIEW_CHARS:
            body = body[:PREVIEW_CHARS] + "..."
        lines.append(f"[{index}] ({len(output.token_ids)} tokens, {output.finish_reason}) {body}")
    return lines


def format_metrics(metrics: RunMetrics, profile: MachineProfile | None = None) -> list[str]:
    rows = [
        (
            "prefill",
            f"{metrics.prefill_tokens} tokens in {metrics.prefill_s:.2f} s = "
            f"{metrics.prefill_tokens_per_s:.1f} tokens/s",
        ),
        (
            "decode",
            f"{metrics.decode_tokens} tokens in {metrics.decode_s:.2f} s = "
            f"{metrics.decode_tokens_per_s:.2f} tokens/s",
        ),
        (
            "expert hit rate",
            f"{metrics.expert_hit_rate:.1%} of {metrics.expert_requests} expert requests "
            f"(+{metrics.expert_in_flight} already in flight)",
        ),
        ("compute", f"{metrics.compute_s:.2f} s busy of {metrics.wall_s:.2f} s wall"),
        (
            "waited for I/O",
            f"{metrics.io_wait_s:.2f} s ({_share(metrics.io_wait_s, metrics.wall_s)} of wall)",
        ),
        (
            "bubbles",
            f"inter-layer {metrics.bubbles_s[INTER_LAYER]:.2f} s, "
            f"intra-layer {metrics.bubbles_s[INTRA_LAYER]:.2f} s",
        ),
        (
            "waits by block",
            ", ".join(f"{k} {v:.2f} s" for k, v in sorted(metrics.wait_by_kind_s.items())) or "none",
        ),
        ("prefetch", f"precision {metrics.prefetch_precision:.1%}, recall {metrics.prefetch_recall:.1%}"),
    ]
    for name, stats in metrics.tiers.items():
        budget = "unlimited" if stats.budget_bytes >= UNLIMITED_BYTES else format_size(stats.budget_bytes)
        rows.append(
            (
                f"{name} tier",
                f"read in {format_size(stats.bytes_in)} in {stats.transfers} moves; "
                f"peak {format_size(stats.peak_bytes)} of {budget}; {stats.evictions} evictions",
            )
        )
    rows.append(("drive", _drive_line(metrics, profile)))
    width = max(len(name) for name, _ in rows)
    return [f"{name:<{width}}  {value}" for name, value in rows] + ["", *format_layers(metrics)]


def format_layers(metrics: RunMetrics) -> list[str]:
    """One row per layer: experts activated, hits, predicted, precision and recall."""
    lines = [f"{'layer':>5} {'activated':>9} {'hits':>6} {'predicted':>9} {'precision':>9} {'recall':>7}"]
    for s in metrics.layers:
        lines.append(
            f"{s.layer:>5} {s.activated:>9} {s.hits:>6} {s.predicted:>9} {s.precision:>9.1%} {s.recall:>7.1%}"
        )
    return lines


def _drive_line(metrics: RunMetrics, profile: MachineProfile | None) -> str:
    if profile is None:
        return "no machine profile: run `klotski-tier bench` to compare the run with the drive"
    d = drive_record(metrics, profile)
    return (
        f"{format_size(d['bytes_read'])} read; at the drive's raw {d['raw_gbps']:.2f} GB/s "
        f"(bench {profile.created[:10]}) that takes at least {d['raw_seconds']:.2f} s, "
        f"{d['raw_share']:.0%} of the run's wall"
    )


def _share(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole > 0 else "n/a"
