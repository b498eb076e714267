"""``klotski-tier trace FILE.json --png OUT.png`` draws a recorded trace and says what it drew;
a missing or broken trace, or no matplotlib, is one line on stderr and exit code 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from klotski_tier.cli.trace import trace
from klotski_tier.core.observe.timeline import BUBBLE_TRACK, COMPUTE_TRACK, INTER_LAYER_BUBBLE, Timeline
from klotski_tier.core.observe.timeline_plot import MAX_TRACKS

MS = 1e-3  # seconds per millisecond
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    """Two layers: compute, an inter-layer bubble, two concurrent disk reads per layer."""
    timeline = Timeline()
    for layer in range(2):
        t = layer * 20 * MS
        timeline.span(COMPUTE_TRACK, f"attention L{layer}", t, t + 5 * MS)
        timeline.span(BUBBLE_TRACK, INTER_LAYER_BUBBLE, t + 5 * MS, t + 8 * MS)
        timeline.span(COMPUTE_TRACK, f"expert L{layer}.E0", t + 8 * MS, t + 15 * MS)
        timeline.lane_span("disk", f"read L{layer}.E0", t, t + 8 * MS, kind="expert")
        timeline.lane_span("disk", f"read L{layer}.E1", t + 1 * MS, t + 9 * MS, kind="expert")
    path = tmp_path / "trace.json"
    timeline.save(path)
    return path


def fails(args: list[str], phrase: str) -> Result:
    result = CliRunner().invoke(trace, args)
    assert result.exit_code == 1, f"stderr: {result.stderr!r}; exception: {result.exception!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], result.stderr
    assert result.stdout == ""
    return result


def test_trace_draws_a_png_and_prints_a_summary(trace_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "timeline.png"
    result = CliRunner().invoke(trace, [str(trace_file), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {png}"
    assert lines[1].startswith("4 tracks, 10 events, 35.0 ms wall, compute busy 69%")


def test_a_missing_trace_is_one_line(tmp_path: Path) -> None:
    fails([str(tmp_path / "nope.json"), "--png", str(tmp_path / "t.png")], "does not exist")


def test_a_broken_trace_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    path.write_text('{"traceEvents": 3}', encoding="utf-8")
    fails([str(path), "--png", str(tmp_path / "t.png")], "not a Chrome trace")


@pytest.mark.parametrize(
    ("event", "phrase"),
    [
        (
            {"ph": "X", "name": "a", "pid": 1, "tid": [1], "ts": 0, "dur": 1},
            "pid or tid that is not a number",
        ),
        ({"ph": "X", "name": "a", "pid": {"x": 1}, "tid": 1, "ts": 0, "dur": 1}, "pid or tid that is not"),
        ({"ph": "X", "name": "a", "pid": 1, "tid": 1, "ts": float("nan"), "dur": 1}, "has a bad ts/dur"),
        ({"ph": "X", "name": "a", "pid": 1, "tid": 1, "ts": 0, "dur": float("inf")}, "has a bad ts/dur"),
    ],
)
def test_a_corrupt_event_is_one_line(tmp_path: Path, event: dict[str, object], phrase: str) -> None:
    """A list as tid once raised TypeError (unhashable); a NaN ts was drawn."""
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [event]}), encoding="utf-8")  # json writes NaN, Infinity
    fails([str(path), "--png", str(tmp_path / "t.png")], phrase)
    assert not (tmp_path / "t.png").exists()


def test_a_trace_of_thousands_of_tracks_is_refused_before_drawing(tmp_path: Path) -> None:
    """20,000 thread ids once kept `trace` drawing for minutes."""
    pytest.importorskip("matplotlib")
    events = [
        {"ph": "X", "name": "a", "pid": 1, "tid": tid, "ts": tid, "dur": 1} for tid in range(MAX_TRACKS + 1)
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}), encoding="utf-8")
    fails([str(path), "--png", str(tmp_path / "t.png")], f"has {MAX_TRACKS + 1} tracks with spans, more than")


def test_a_png_in_a_missing_directory_is_one_line(trace_file: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    fails([str(trace_file), "--png", str(tmp_path / "no" / "t.png")], "does not exist")


def test_without_matplotlib_the_error_names_the_extra(
    trace_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (
        "matplotlib",
        "matplotlib.figure",
        "matplotlib.patches",
        "matplotlib.backends.backend_agg",
    ):
        monkeypatch.setitem(sys.modules, module, None)  # a None entry makes the import fail
    fails([str(trace_file), "--png", str(tmp_path / "t.png")], "klotski-tier[plot]")


def test_png_is_required(trace_file: Path) -> None:
    result = CliRunner().invoke(trace, [str(trace_file)])
    assert result.exit_code == 2 and "--png" in result.stderr
