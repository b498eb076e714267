"""``klotski-tier trace FILE.json --png OUT.png``: draw a recorded pipeline trace as a picture.

The trace is the Chrome trace-event file ``run --trace`` writes; the picture needs the ``plot``
extra (matplotlib). Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

from pathlib import Path

import click

from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.files import OUTPUT, check_outputs, record_saved
from klotski_tier.cli.params import NonEmptyPath, finite_float
from klotski_tier.core.observe.timeline import read_trace, summarize
from klotski_tier.core.observe.timeline_plot import DPI, render_png

MS_PER_S = 1000.0
AGG_MAX_PIXELS = 2**16
"""matplotlib's Agg canvas draws at most 2**16 pixels a side."""
MAX_WIDTH_IN = AGG_MAX_PIXELS // DPI
"""The widest picture, in inches, that the canvas can draw at the picture's DPI."""


@click.command("trace")
@click.argument("trace_file", metavar="FILE.json", type=NonEmptyPath(path_type=Path))
@click.option(
    "--png",
    "png_path",
    required=True,
    type=OUTPUT,
    help="Write the timeline picture to this PNG file.",
)
@click.option(
    "--width",
    "width_in",
    default=14.0,
    show_default=True,
    type=finite_float(min=2.0, max=MAX_WIDTH_IN),
    help="Inches.",
)
@report_errors
def trace(trace_file: Path, png_path: Path, width_in: float) -> None:
    """Draw the pipeline timeline of a Chrome trace FILE.json (from `run --trace`) as a PNG."""
    check_outputs({"--png": png_path}, {"the trace": trace_file})
    data = read_trace(trace_file)
    render_png(trace_file, png_path, width_in=width_in)
    record_saved("--png", png_path)
    totals = summarize(data.spans)
    click.echo(f"wrote {png_path}")
    drive = "".join(
        f", drive busy {share:.0%} of {phase}" for phase, share in totals.get("drive_busy_share", {}).items()
    )
    click.echo(
        f"{len(data.spans)} tracks, {data.event_count} events, "
        f"{totals['wall_s'] * MS_PER_S:.1f} ms wall, compute busy {totals['compute_busy_share']:.0%}{drive}"
    )
