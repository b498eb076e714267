"""Draw a Chrome trace of the pipeline as a PNG: one row per track, bubbles in red.

matplotlib is an optional extra (``pip install 'klotski-tier[plot]'``), imported only here and only
when a picture is asked for; the Agg canvas is used directly, so no GUI and no pyplot state.

What the picture shows, top to bottom (the trace's track order):

- ``compute``: spans colored by phase (attention / gate / experts / other); the bubbles are
  also shaded behind this row in red, so the gaps where compute waited stand out;
- I/O queues (disk lanes, host→device copies): spans colored by the ``kind`` of block moved;
- ``bubbles``: inter- and intra-layer bubbles in red (two shades).

The title gives the wall time and the compute busy share; when the trace's ``otherData`` holds a
``summary`` dict, its busy share and bubble seconds per kind are printed under the axes.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from klotski_tier.core.errors import ConfigError, InputError
from klotski_tier.core.observe.timeline import (
    BUBBLE_TRACK,
    INTER_LAYER_BUBBLE,
    INTRA_LAYER_BUBBLE,
    RANK_COMPUTE,
    RANK_WAIT,
    Span,
    TraceData,
    read_trace,
    summarize,
    track_rank,
    write_atomic,
)

logger = logging.getLogger(__name__)

MS_PER_S = 1000.0
ROW_HEIGHT_IN = 0.42  # figure height per track
BASE_HEIGHT_IN = 1.9  # title, axis labels and the summary line
BAR_HEIGHT = 0.8  # fraction of a row a bar fills
DPI = 110
MAX_TRACKS = 200
"""The most rows a timeline draws: a run's trace has a few dozen tracks; 20,000 (one per thread id of some
other program's trace) once kept the drawing busy for minutes on a figure hundreds of metres tall."""
MIN_VISIBLE_FRACTION = 1 / 1500  # bubbles narrower than this share of the wall time are widened to it
COMPUTE_COLORS = {"attention": "#4C72B0", "gate": "#DD8452", "experts": "#55A868", "other": "#8C8C8C"}
KIND_COLORS = {
    "attn": "#9DB8DE",
    "gate": "#F2B98F",
    "expert": "#97CFA5",
    "embed": "#B9A3D6",
    "head": "#C9A28C",
    "other": "#C7C7C7",
}
BUBBLE_COLORS = {INTER_LAYER_BUBBLE: "#D62728", INTRA_LAYER_BUBBLE: "#FF7F7F", "other": "#A50F15"}
BUBBLE_SHADE_ALPHA = 0.22
SHADE_ZORDER = 0.5  # behind the bars (collections draw at 1)
MARK_COLOR = "#555555"
MISSING_MATPLOTLIB = "drawing a timeline needs matplotlib: pip install 'klotski-tier[plot]'"
CATEGORY_WORDS = (
    ("attention", ("attn", "attention")),
    ("gate", ("gate", "router")),
    ("experts", ("expert",)),
)


def render_png(trace_path: Path, png_path: Path, *, width_in: float = 14) -> None:
    """Draw the trace at ``trace_path`` into ``png_path`` (written atomically)."""
    figure_cls, canvas_cls, patch_cls = _matplotlib()
    data = read_trace(trace_path)
    tracks = {track: spans for track, spans in data.spans.items() if spans}  # marks: lines across all rows
    if not any(tracks.values()):
        raise InputError(f"trace {trace_path} holds no spans; nothing to draw")
    if len(tracks) > MAX_TRACKS:
        raise InputError(
            f"trace {trace_path} has {len(tracks)} tracks with spans, more than the {MAX_TRACKS} a timeline "
            "draws (a klotski-tier run's trace has a few dozen); draw a trace from `run --trace`"
        )
    height_in = BASE_HEIGHT_IN + ROW_HEIGHT_IN * len(tracks)
    figure = figure_cls(figsize=(width_in, height_in), dpi=DPI)
    canvas_cls(figure)
    axes = figure.add_subplot(1, 1, 1)
    origin_s = min(s[0] for spans in tracks.values() for s in spans)
    colors_used = _draw_rows(axes, tracks, origin_s)
    _draw_marks(axes, data, origin_s, len(tracks))
    _decorate(axes, figure, tracks, data, colors_used, patch_cls)
    _save(figure, png_path)
    logger.info("drew %d tracks of %s into %s", len(tracks), trace_path, png_path)


def _matplotlib() -> tuple[Any, Any, Any]:
    """The Figure, Agg canvas and Patch classes; ConfigError without the ``plot`` extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ConfigError(MISSING_MATPLOTLIB) from exc
    return Figure, FigureCanvasAgg, Patch


def compute_category(name: str, args: dict[str, Any]) -> str:
    """attention / gate / experts / other, from a ``phase`` arg or the span's name."""
    text = str(args.get("phase", name)).lower()
    for category, words in CATEGORY_WORDS:
        if any(word in text for word in words):
            return category
    return "other"


def span_color(track: str, span: Span) -> tuple[str, str]:
    """(legend label, color) of a span on ``track``."""
    _, _, name, args = span
    rank = track_rank(track)
    if rank == RANK_COMPUTE:
        category = compute_category(name, args)
        return f"compute: {category}", COMPUTE_COLORS[category]
    if rank == RANK_WAIT:
        key = name if name in BUBBLE_COLORS else "other"
        return (name if key != "other" else "wait"), BUBBLE_COLORS[key]
    kind = str(args.get("kind", "other")).lower()
    kind = kind if kind in KIND_COLORS else "other"
    return f"I/O: {kind}", KIND_COLORS[kind]


def _draw_rows(axes: Any, tracks: dict[str, list[Span]], origin_s: float) -> dict[str, str]:
    """One broken_barh per (row, color); returns legend label -> color of what was drawn."""
    wall_s = max(s[1] for spans in tracks.values() for s in spans) - origin_s
    min_width_ms = wall_s * MS_PER_S * MIN_VISIBLE_FRACTION
    used: dict[str, str] = {}
    for row, (track, spans) in enumerate(tracks.items()):
        by_color: dict[str, list[tuple[float, float]]] = {}
        for span in spans:
            label, color = span_color(track, span)
            used.setdefault(label, color)
            start_ms, width_ms = (span[0] - origin_s) * MS_PER_S, (span[1] - span[0]) * MS_PER_S
            if track_rank(track) == RANK_WAIT:
                width_ms = max(width_ms, min_width_ms)  # a bubble must never vanish under a pixel
            by_color.setdefault(color, []).append((start_ms, width_ms))
        for color, bars in by_color.items():
            axes.broken_barh(bars, (row - BAR_HEIGHT / 2, BAR_HEIGHT), facecolors=color, linewidth=0)
    _shade_compute_gaps(axes, tracks, origin_s, min_width_ms)
    return used


def _shade_compute_gaps(axes: Any, tracks: dict[str, list[Span]], origin_s: float, min_ms: float) -> None:
    """Shade every bubble behind the compute rows, so the gaps read at a glance."""
    bubbles = [
        ((s[0] - origin_s) * MS_PER_S, max((s[1] - s[0]) * MS_PER_S, min_ms))
        for s in tracks.get(BUBBLE_TRACK, [])
    ]
    if not bubbles:
        return
    for row, track in enumerate(tracks):
        if track_rank(track) == RANK_COMPUTE:
            shade = BUBBLE_COLORS[INTER_LAYER_BUBBLE]
            band = (row - 0.5, 1.0)  # the whole row, so the shade frames the gap
            axes.broken_barh(bubbles, band, facecolors=shade, alpha=BUBBLE_SHADE_ALPHA, zorder=SHADE_ZORDER)


def _draw_marks(axes: Any, data: TraceData, origin_s: float, rows: int) -> None:
    """Instant events (step boundaries) as thin dotted lines across every row."""
    times_ms = [(at_s - origin_s) * MS_PER_S for marks in data.marks.values() for at_s, _ in marks]
    if times_ms:
        axes.vlines(times_ms, -0.5, rows - 0.5, colors=MARK_COLOR, linestyles="dotted", linewidth=0.6)


def _decorate(
    axes: Any, figure: Any, tracks: dict[str, list[Span]], data: TraceData, used: dict[str, str], patch: Any
) -> None:
    """Track labels, ms axis, title with wall time and busy share, legend, summary line."""
    names = list(tracks)
    axes.set_yticks(range(len(names)), labels=names)
    axes.set_ylim(len(names) - 0.5, -0.5)  # first track at the top
    axes.set_xlabel("time (ms)")
    axes.grid(axis="x", linewidth=0.3, alpha=0.5)
    totals = summarize(tracks)
    axes.set_title(
        f"klotski-tier timeline: {totals['wall_s'] * MS_PER_S:.1f} ms wall, "
        f"compute busy {totals['compute_busy_share']:.0%}"
    )
    handles = [patch(facecolor=used[label], label=label) for label in sorted(used, key=_legend_order)]
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize="small")
    text = summary_text(data.other.get("summary"))
    if text:
        figure.text(0.01, 0.01, text, fontsize="small", family="monospace", va="bottom")
    figure.tight_layout(rect=(0, 0.06 if text else 0, 1, 1))


def _legend_order(label: str) -> tuple[int, str]:
    """Compute phases first, then I/O kinds, then bubbles and waits."""
    group = 0 if label.startswith("compute") else 1 if label.startswith("I/O") else 2
    return group, label


def summary_text(summary: object) -> str:
    """One line from a ``summary`` dict: compute busy share and bubble milliseconds per kind."""
    if not isinstance(summary, dict):
        return ""
    parts = []
    share = summary.get("compute_busy_share")
    if isinstance(share, int | float):
        parts.append(f"compute busy {share:.1%}")
    drive = summary.get("drive_busy_share")
    if isinstance(drive, dict):
        parts += [f"drive busy {v:.1%} of {k}" for k, v in drive.items() if isinstance(v, int | float)]
    bubbles = summary.get("bubble_s")
    if isinstance(bubbles, dict):
        for kind, seconds in sorted(bubbles.items()):
            if isinstance(seconds, int | float):
                parts.append(f"{kind} {seconds * MS_PER_S:.1f} ms")
    return "   ".join(parts)


def _save(figure: Any, png_path: Path) -> None:
    """Render to memory, then write the PNG atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    write_atomic(png_path, buffer.getvalue(), "picture")
