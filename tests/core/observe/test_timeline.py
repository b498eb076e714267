"""The timeline records spans from many threads, lays concurrent reads out on as few lanes as the
deepest overlap needs, exports valid Chrome trace JSON with no overlap inside a track, reads it back,
and draws it as a PNG in which the bubbles show."""

from __future__ import annotations

import itertools
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from klotski_tier.core.errors import ConfigError, InputError
from klotski_tier.core.model.blocks import BlockKind
from klotski_tier.core.observe.timeline import (
    BUBBLE_TRACK,
    COMPUTE_TRACK,
    INTER_LAYER_BUBBLE,
    INTRA_LAYER_BUBBLE,
    Span,
    Timeline,
    drive_busy_share,
    lane_track,
    load_chrome_trace,
    read_trace,
)
from klotski_tier.core.observe.timeline_plot import compute_category, render_png, summary_text

MS = 1e-3  # seconds per millisecond
US = 1e-6  # seconds per microsecond: the trace's resolution
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_PNG_BYTES = 10_000  # a drawn timeline, not an empty canvas
THREADS, SPANS_PER_THREAD = 8, 500
BUBBLE_RGB = (0xD6, 0x27, 0x28)  # inter-layer bubble red in the PNG


def pipeline_timeline(layers: int = 3) -> Timeline:
    """A narrated layer loop: attention, gate, experts; concurrent disk reads; both bubble kinds."""
    timeline = Timeline()
    for layer in range(layers):
        t = 100.0 + layer * 30 * MS  # perf_counter seconds, far from zero
        timeline.mark("steps", f"layer {layer}", t)
        timeline.span(COMPUTE_TRACK, f"attention L{layer}", t, t + 8 * MS, layer=layer)
        timeline.span(BUBBLE_TRACK, INTER_LAYER_BUBBLE, t + 8 * MS, t + 11 * MS, layer=layer)
        timeline.span(COMPUTE_TRACK, f"gate L{layer}", t + 11 * MS, t + 12 * MS, layer=layer)
        timeline.span(COMPUTE_TRACK, f"expert L{layer}.E0", t + 12 * MS, t + 18 * MS)
        timeline.span(BUBBLE_TRACK, INTRA_LAYER_BUBBLE, t + 18 * MS, t + 20 * MS, layer=layer)
        timeline.span(COMPUTE_TRACK, f"expert L{layer}.E1", t + 20 * MS, t + 26 * MS)
        for expert in range(3):  # three reads in flight at once, reported as they finish
            begin = t + expert * MS
            timeline.lane_span(
                "disk", f"read L{layer}.E{expert}", begin, begin + 12 * MS, kind=BlockKind.EXPERT
            )
        timeline.span("copy host→device", f"copy L{layer}", t + 10 * MS, t + 11 * MS, kind="gate")
    return timeline


def max_depth(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (touching ends do not overlap)."""
    points = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1])
    )
    depth = best = 0
    for _, step in points:
        depth += step
        best = max(best, depth)
    return best


def assert_no_overlap(spans: list[Span]) -> None:
    for before, after in itertools.pairwise(spans):
        assert before[1] <= after[0], f"{before[2]!r} overlaps {after[2]!r}"


def x_events_by_tid(trace: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    by_tid: dict[int, list[dict[str, Any]]] = {}
    for event in trace["traceEvents"]:
        if event["ph"] == "X":
            by_tid.setdefault(event["tid"], []).append(event)
    return by_tid


def test_concurrent_reads_use_as_few_lanes_as_the_deepest_overlap() -> None:
    tracks = pipeline_timeline().layout()
    disk = {name: spans for name, spans in tracks.items() if name.startswith("disk")}
    assert sorted(disk) == [lane_track("disk", lane) for lane in range(3)]
    for spans in tracks.values():
        assert_no_overlap(spans)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 20)), min_size=1, max_size=30))
def test_lane_layout_never_overlaps_and_is_minimal(reads: list[tuple[int, int]]) -> None:
    timeline = Timeline()
    intervals = [(start * MS, (start + length) * MS) for start, length in reads]
    for index, (start_s, end_s) in sorted(enumerate(intervals), key=lambda item: item[1][1]):  # by end
        timeline.lane_span("disk", f"read {index}", start_s, end_s)
    tracks = timeline.layout()
    assert len(tracks) == max_depth(intervals)
    assert sum(map(len, tracks.values())) == len(intervals)
    for spans in tracks.values():
        assert_no_overlap(spans)


def test_overlapping_spans_on_a_plain_track_spill_to_an_extra_row(caplog: pytest.LogCaptureFixture) -> None:
    timeline = Timeline()
    timeline.span(COMPUTE_TRACK, "a", 0.0, 2 * MS)
    timeline.span(COMPUTE_TRACK, "b", 1 * MS, 3 * MS)
    with caplog.at_level(logging.WARNING):
        tracks = timeline.layout()
    assert [s[2] for s in tracks[COMPUTE_TRACK]] == ["a"]
    assert [s[2] for s in tracks[f"{COMPUTE_TRACK} (overlap 1)"]] == ["b"]
    assert "overlap" in caplog.text


def test_to_chrome_is_valid_trace_json() -> None:
    trace = json.loads(json.dumps(pipeline_timeline().to_chrome()))
    assert trace["displayTimeUnit"] == "ms"
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    by_tid = x_events_by_tid(trace)
    assert set(by_tid) <= set(names)
    for tid, events in by_tid.items():
        for event in events:
            assert {"name", "ph", "ts", "dur", "pid", "tid"} <= event.keys()
            assert event["pid"] == 1 and event["ts"] >= 0 and event["dur"] >= 0
        events.sort(key=lambda e: e["ts"])
        for before, after in itertools.pairwise(events):
            assert before["ts"] + before["dur"] <= after["ts"], f"overlap on {names[tid]}"
    assert min(e["ts"] for events in by_tid.values() for e in events) == 0


def test_tracks_sort_steps_first_then_compute_then_io_then_bubbles() -> None:
    trace = pipeline_timeline().to_chrome()
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    order = {
        e["tid"]: e["args"]["sort_index"] for e in trace["traceEvents"] if e["name"] == "thread_sort_index"
    }
    ranked = [names[tid] for tid in sorted(order, key=order.__getitem__)]
    assert ranked[:2] == ["steps", COMPUTE_TRACK] and ranked[-1] == BUBBLE_TRACK
    assert set(ranked) == {
        COMPUTE_TRACK,
        BUBBLE_TRACK,
        "steps",
        "copy host→device",
        *map(lane_track, ["disk"] * 3, range(3)),
    }


def test_args_marks_and_summary_are_exported() -> None:
    trace = pipeline_timeline(layers=2).to_chrome()
    reads = [e for e in trace["traceEvents"] if e["name"].startswith("read")]
    assert all(e["args"]["kind"] == "expert" for e in reads)  # the enum is written as its value
    instants = [e for e in trace["traceEvents"] if e["ph"] == "i"]
    assert [e["name"] for e in instants] == ["layer 0", "layer 1"]
    summary = trace["otherData"]["summary"]
    assert summary["bubble_s"][INTER_LAYER_BUBBLE] == pytest.approx(6 * MS)
    assert summary["bubble_s"][INTRA_LAYER_BUBBLE] == pytest.approx(4 * MS)
    assert summary["compute_busy_s"] == pytest.approx(42 * MS)
    assert summary["wall_s"] == pytest.approx(56 * MS)


def test_spans_from_many_threads_are_all_kept() -> None:
    timeline = Timeline()
    start = threading.Barrier(THREADS)

    def record(worker: int) -> None:
        start.wait()
        for index in range(SPANS_PER_THREAD):
            timeline.lane_span("disk", f"w{worker} r{index}", index * MS, (index + 2) * MS)

    threads = [threading.Thread(target=record, args=(worker,)) for worker in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(timeline) == THREADS * SPANS_PER_THREAD
    tracks = timeline.layout()
    assert sum(map(len, tracks.values())) == THREADS * SPANS_PER_THREAD
    assert len(tracks) == 2 * THREADS  # each read overlaps only the next one of every thread


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    timeline = pipeline_timeline()
    path = tmp_path / "trace.json"
    timeline.save(path)
    loaded = load_chrome_trace(path)
    expected = timeline.layout()
    origin_s = min(s[0] for spans in expected.values() for s in spans)
    assert set(loaded) == set(expected) | {"steps"}
    for track, spans in expected.items():
        assert [s[2] for s in loaded[track]] == [s[2] for s in spans]
        for got, want in zip(loaded[track], spans, strict=True):
            assert got[0] == pytest.approx(want[0] - origin_s, abs=US)
            assert got[1] == pytest.approx(want[1] - origin_s, abs=2 * US)
    assert read_trace(path).marks["steps"][0] == (0.0, "layer 0")
    assert [p.name for p in tmp_path.iterdir()] == ["trace.json"]  # no temporary file left


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ('{"events": []}', "not a Chrome trace"),
        ('{"traceEvents": [1, 2]}', "not a Chrome trace"),
        ('{"traceEvents": [{"name": "a", "ph": "X", "ts": "soon", "dur": 1}]}', "bad ts/dur"),
        ('[{"name": "a", "ph": "X", "ts": 0, "dur": -5}]', "bad ts/dur"),
    ],
)
def test_load_refuses_what_is_not_a_trace(tmp_path: Path, content: str | None, phrase: str) -> None:
    path = tmp_path / "trace.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=phrase):
        load_chrome_trace(path)


def test_save_into_a_missing_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        pipeline_timeline().save(tmp_path / "missing" / "trace.json")


def test_compute_spans_are_grouped_by_phase() -> None:
    assert compute_category("attention L3 b0", {}) == "attention"
    assert compute_category("gate L3 b1", {}) == "gate"
    assert compute_category("expert L3.E5", {}) == "experts"
    assert compute_category("lm head", {}) == "other"
    assert compute_category("L3 b0", {"phase": "attn"}) == "attention"


def test_summary_text_names_busy_share_and_each_bubble_kind() -> None:
    text = summary_text({"compute_busy_share": 0.5, "bubble_s": {INTER_LAYER_BUBBLE: 0.012}})
    assert text == f"compute busy 50.0%   {INTER_LAYER_BUBBLE} 12.0 ms"
    assert summary_text("not a dict") == ""


def test_render_png_draws_the_timeline_with_visible_bubbles(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    trace, png = tmp_path / "trace.json", tmp_path / "timeline.png"
    pipeline_timeline().save(trace)
    render_png(trace, png, width_in=8)
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > MIN_PNG_BYTES
    pixels = (imread(png)[..., :3] * 255).round()  # [H, W, 3]
    red = (abs(pixels - BUBBLE_RGB).sum(axis=-1) < 3).sum()
    assert red > 100, "the inter-layer bubbles are not drawn"


def test_render_png_of_an_empty_trace_is_an_input_error(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    trace = tmp_path / "trace.json"
    Timeline().save(trace)
    with pytest.raises(InputError, match="no spans"):
        render_png(trace, tmp_path / "timeline.png")


def test_render_png_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in (
        "matplotlib",
        "matplotlib.figure",
        "matplotlib.patches",
        "matplotlib.backends.backend_agg",
    ):
        monkeypatch.setitem(sys.modules, module, None)  # a None entry makes the import fail
    trace, png = tmp_path / "trace.json", tmp_path / "timeline.png"
    pipeline_timeline().save(trace)
    with pytest.raises(ConfigError, match=r"pip install 'klotski-tier\[plot\]'"):
        render_png(trace, png)
    assert not png.exists()


def test_the_drive_busy_share_of_each_phase_is_the_union_of_its_reads_within_its_steps() -> None:
    timeline = Timeline()
    timeline.span("steps", "prefill", 0.0, 4.0)
    timeline.span("steps", "decode 2", 4.0, 6.0)
    timeline.span("steps", "decode 3", 7.0, 9.0)  # 6 to 7: between steps, not counted
    for start, end in [(1.0, 3.0), (2.0, 5.0), (6.0, 8.0), (8.5, 8.75)]:  # two overlap: a union, not a sum
        timeline.lane_span("disk", "read", start, end)
    shares = drive_busy_share(timeline.layout())
    assert shares["prefill"] == pytest.approx(3.0 / 4.0)  # 1 to 4
    assert shares["decode"] == pytest.approx((1.0 + 1.0 + 0.25) / 4.0)  # 4 to 5, 7 to 8, 8.5 to 8.75
    assert timeline.summary()["drive_busy_share"] == shares
    assert "drive_busy_share" not in Timeline().summary()  # no steps, no share
    assert summary_text(timeline.summary()).count("drive busy") == 2
