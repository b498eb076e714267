"""The pipeline's timeline: spans of work on named tracks, exported as a Chrome trace-event file.

The engine records, from any thread, what ran when::

    timeline.span("compute", "attention L3 b0", start_s, end_s, layer=3)   # one thread: never overlaps
    timeline.lane_span("disk", "read L3.E5", start_s, end_s, kind="expert")  # concurrent reads
    timeline.span(BUBBLE_TRACK, INTER_LAYER_BUBBLE, start_s, end_s, layer=3)
    timeline.mark("steps", "decode step 2", at_s)

Times are ``time.perf_counter()`` seconds. Recording is a lock and a list append; all layout
happens in :meth:`Timeline.to_chrome`:

- a track becomes one Chrome thread (``pid`` 1, one ``tid`` per track) named by a ``thread_name``
  metadata event and ordered by ``thread_sort_index``: compute first, then I/O, then waits and
  bubbles;
- ``lane_span(queue, ...)`` spans are laid out greedily in start order on lanes
  ``"<queue> queue 0"``, ``"<queue> queue 1"``, ...: each goes on the first lane whose last span
  ended by its start, which uses as few lanes as the deepest overlap needs;
- ``span`` tracks should never overlap; if they do, the extra spans spill to lanes
  ``"<track> (overlap 1)"`` ... with a warning, so no Chrome thread ever holds overlapping events;
- ``ts``/``dur`` are whole microseconds from the earliest event (floored, so order is kept exactly).

:func:`load_chrome_trace` reads such a file back (``klotski-tier trace``, tests).
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

from klotski_tier.core import reads
from klotski_tier.core.atomic import atomic_open
from klotski_tier.core.errors import InputError
from klotski_tier.core.units import MIB

logger = logging.getLogger(__name__)

COMPUTE_TRACK = "compute"
BUBBLE_TRACK = "bubbles"
INTER_LAYER_BUBBLE = "inter-layer bubble"  # attention done, gate or hot experts not loaded yet
INTRA_LAYER_BUBBLE = "intra-layer bubble"  # an expert done, the next cold expert still in flight
US_PER_S = 1_000_000  # Chrome trace timestamps are microseconds
PID = 1  # the whole engine is one Chrome "process"
RANK_STEPS, RANK_COMPUTE, RANK_IO, RANK_WAIT = -1, 0, 1, 2  # thread_sort_index groups
STEPS_TRACK = "steps"  # one span per forward step, named "prefill ..." or "decode ..."
DRIVE_QUEUE = "disk"  # the residency's disk reads: lane tracks "disk queue N"
PHASES = ("prefill", "decode")
WAIT_WORDS = ("bubble", "wait", "stall")  # a track named with one of these sorts last
TRACE_KIND = reads.FileKind("trace file", 512 * MIB, InputError, "record one with `run --trace FILE`")
"""A trace holds ~100 bytes per event: 512 MiB is five million events, more than a plot can show."""

Span = tuple[float, float, str, dict[str, Any]]  # (start_s, end_s, name, args)


class _Event(NamedTuple):
    track: str
    name: str
    start_s: float
    end_s: float
    args: dict[str, object]


def lane_track(queue: str, lane: int) -> str:
    """The track name of lane ``lane`` of a queue laid out by :meth:`Timeline.lane_span`."""
    return f"{queue} queue {lane}"


def track_rank(track: str) -> int:
    """Sort group of a track: compute first, then I/O queues, then waits and bubbles."""
    lowered = track.lower()
    if lowered == STEPS_TRACK:
        return RANK_STEPS
    if lowered.startswith(COMPUTE_TRACK):
        return RANK_COMPUTE
    if any(word in lowered for word in WAIT_WORDS):
        return RANK_WAIT
    return RANK_IO


class Timeline:
    """Spans of work on named tracks, in seconds from time.perf_counter(); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[_Event] = []  # fixed tracks
        self._lane_spans: list[_Event] = []  # track = queue name, lane chosen at export
        self._marks: list[_Event] = []  # end_s == start_s
        self._annotations: dict[str, object] = {}

    def span(self, track: str, name: str, start_s: float, end_s: float, **args: object) -> None:
        """Record ``name`` on ``track`` from ``start_s`` to ``end_s`` (work of one thread)."""
        event = _Event(track, name, start_s, max(start_s, end_s), args)
        with self._lock:
            self._spans.append(event)

    def lane_span(self, queue: str, name: str, start_s: float, end_s: float, **args: object) -> None:
        """Record concurrent work of ``queue``; laid out on lanes ``"<queue> queue N"`` at export."""
        event = _Event(queue, name, start_s, max(start_s, end_s), args)
        with self._lock:
            self._lane_spans.append(event)

    def mark(self, track: str, name: str, at_s: float, **args: object) -> None:
        """Record an instant event (a step boundary ...) on ``track``."""
        event = _Event(track, name, at_s, at_s, args)
        with self._lock:
            self._marks.append(event)

    def annotate(self, **data: object) -> None:
        """Add JSON-able entries to the trace's ``otherData`` (e.g. ``summary={...}`` from metrics)."""
        with self._lock:
            self._annotations.update(data)

    def __len__(self) -> int:
        with self._lock:
            return len(self._spans) + len(self._lane_spans) + len(self._marks)

    def layout(self) -> dict[str, list[Span]]:
        """Track name -> its spans sorted by start, lanes assigned, no overlap within a track."""
        with self._lock:
            spans, lane_spans = list(self._spans), list(self._lane_spans)
        tracks: dict[str, list[Span]] = {}
        for queue, events in _group(lane_spans).items():
            _assign_lanes(events, functools.partial(lane_track, queue), tracks)
        for track, events in _group(spans).items():
            if _assign_lanes(events, functools.partial(_overflow_track, track), tracks) > 1:
                logger.warning("spans on track %r overlap; the overlapping ones go to extra rows", track)
        return tracks

    def summary(self) -> dict[str, Any]:
        """Wall time, compute busy time and share, and bubble time per kind, in seconds."""
        return summarize(self.layout())

    def to_chrome(self) -> dict[str, Any]:
        """The timeline as a Chrome trace-event object (``json.dump`` it, or use :meth:`save`)."""
        tracks = self.layout()
        with self._lock:
            marks, annotations = list(self._marks), dict(self._annotations)
        for event in marks:
            tracks.setdefault(event.track, [])
        starts = [s[0] for spans in tracks.values() for s in spans] + [m.start_s for m in marks]
        origin_s = min(starts, default=0.0)
        tids = {track: tid for tid, track in enumerate(_ordered(tracks), start=1)}
        events = _metadata_events(tids)
        events += [_complete_event(tids[t], s, origin_s) for t, spans in tracks.items() for s in spans]
        events += [_instant_event(tids[m.track], m, origin_s) for m in marks]
        other = {"generator": "klotski-tier", "origin_perf_counter_s": origin_s}
        other["summary"] = summarize(tracks)
        other.update(_jsonable_args(annotations))
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}

    def save(self, path: Path) -> None:
        """Write the Chrome trace to ``path`` atomically (temporary file, then rename)."""
        write_atomic(path, json.dumps(self.to_chrome(), separators=(",", ":")).encode("utf-8"), "trace")
        logger.info("wrote a trace of %d events to %s", len(self), path)


def write_atomic(path: Path, data: bytes, what: str = "output") -> None:
    """Write ``data`` to ``path`` by the one rule for output files (:mod:`klotski_tier.core.atomic`)."""
    with atomic_open(path, "wb", what=what) as handle:
        handle.write(data)


def _group(events: Iterable[_Event]) -> dict[str, list[_Event]]:
    groups: dict[str, list[_Event]] = {}
    for event in events:
        groups.setdefault(event.track, []).append(event)
    return groups


def _overflow_track(track: str, lane: int) -> str:
    return track if lane == 0 else f"{track} (overlap {lane})"


def _assign_lanes(events: list[_Event], name_of: Callable[[int], str], tracks: dict[str, list[Span]]) -> int:
    """Greedy interval partitioning in start order: first lane free by the span's start; lanes used."""
    lane_ends: list[float] = []  # end of the last span on each lane
    for event in sorted(events, key=lambda e: (e.start_s, e.end_s)):
        lane = next((i for i, end in enumerate(lane_ends) if end <= event.start_s), len(lane_ends))
        if lane == len(lane_ends):
            lane_ends.append(event.end_s)
        lane_ends[lane] = event.end_s
        tracks.setdefault(name_of(lane), []).append((event.start_s, event.end_s, event.name, event.args))
    return len(lane_ends)


def _ordered(tracks: dict[str, list[Span]]) -> list[str]:
    """Tracks by rank, then by first activity (stable for equal starts: by name)."""
    first = {t: min((s[0] for s in spans), default=float("inf")) for t, spans in tracks.items()}
    return sorted(tracks, key=lambda t: (track_rank(t), first[t], t))


def summarize(tracks: dict[str, list[Span]]) -> dict[str, Any]:
    """Wall time, compute busy seconds and share, and seconds per bubble kind of laid-out tracks."""
    all_spans = [s for spans in tracks.values() for s in spans]
    wall_s = max((s[1] for s in all_spans), default=0.0) - min((s[0] for s in all_spans), default=0.0)
    busy_s = sum(s[1] - s[0] for t, spans in tracks.items() if track_rank(t) == RANK_COMPUTE for s in spans)
    bubbles: dict[str, float] = {}
    for start_s, end_s, name, _ in tracks.get(BUBBLE_TRACK, []):
        bubbles[name] = bubbles.get(name, 0.0) + end_s - start_s
    share = busy_s / wall_s if wall_s > 0 else 0.0
    summary = {"wall_s": wall_s, "compute_busy_s": busy_s, "compute_busy_share": share, "bubble_s": bubbles}
    drive = drive_busy_share(tracks)
    if drive:
        summary["drive_busy_share"] = drive
    return summary


def drive_busy_share(tracks: dict[str, list[Span]]) -> dict[str, float]:
    """Per phase with steps on the ``steps`` track: the share of its steps' time during which at least
    one disk read was in flight (the union of the ``disk queue`` lanes, clipped to the steps)."""
    disk = _union([(s[0], s[1]) for t, spans in tracks.items() if t.startswith(DRIVE_QUEUE) for s in spans])
    shares: dict[str, float] = {}
    for phase in PHASES:
        steps = [(s[0], s[1]) for s in tracks.get(STEPS_TRACK, []) if s[2].startswith(phase)]
        total = sum(end - start for start, end in steps)
        if total > 0:
            busy = sum(
                min(end, e) - max(start, b) for start, end in steps for b, e in disk if b < end and e > start
            )
            shares[phase] = busy / total
    return shares


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping spans merged: disjoint, in order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _metadata_events(tids: dict[str, int]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": PID, "tid": 0, "args": {"name": "klotski-tier"}}
    ]
    for track, tid in tids.items():
        events.append({"name": "thread_name", "ph": "M", "pid": PID, "tid": tid, "args": {"name": track}})
        events.append(
            {"name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid, "args": {"sort_index": tid}}
        )
    return events


def _us(seconds: float, origin_s: float) -> int:
    """Whole microseconds since ``origin_s``, floored: monotonic, so touching spans never overlap."""
    return int((seconds - origin_s) * US_PER_S // 1)


def _complete_event(tid: int, span: Span, origin_s: float) -> dict[str, Any]:
    start_s, end_s, name, args = span
    ts = _us(start_s, origin_s)
    event = {"name": name, "ph": "X", "ts": ts, "dur": _us(end_s, origin_s) - ts, "pid": PID, "tid": tid}
    if args:
        event["args"] = _jsonable_args(args)
    return event


def _instant_event(tid: int, mark: _Event, origin_s: float) -> dict[str, Any]:
    event = {
        "name": mark.name,
        "ph": "i",
        "s": "t",
        "ts": _us(mark.start_s, origin_s),
        "pid": PID,
        "tid": tid,
    }
    if mark.args:
        event["args"] = _jsonable_args(mark.args)
    return event


def _jsonable(value: object) -> Any:
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _jsonable_args(args: dict[str, Any]) -> dict[str, Any]:
    return {key: _jsonable(value) for key, value in args.items()}


@dataclass
class TraceData:
    """A Chrome trace read back: spans and instant marks per track, and ``otherData``."""

    spans: dict[str, list[Span]] = field(default_factory=dict)
    marks: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)

    @property
    def event_count(self) -> int:
        return sum(map(len, self.spans.values())) + sum(map(len, self.marks.values()))


def read_trace(path: Path) -> TraceData:
    """Read a Chrome trace-event file (object or bare array form) into spans per track, in seconds."""
    raw = reads.read_json(path, TRACE_KIND)
    events = raw.get("traceEvents") if isinstance(raw, dict) else raw
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise InputError(f"{path} is not a Chrome trace: expected a traceEvents list of objects")
    names = {
        (e.get("pid"), e.get("tid")): str(e.get("args", {}).get("name"))
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "thread_name"
        and isinstance(e.get("args"), dict)
        and _is_id(e.get("pid"))
        and _is_id(e.get("tid"))
    }
    other = raw.get("otherData", {}) if isinstance(raw, dict) else {}
    if not isinstance(other, dict):
        raise InputError(f"{path}: otherData is {type(other).__name__}, not an object; the trace is corrupt")
    data = TraceData(other=other)
    for name in names.values():
        data.spans.setdefault(name, [])
    for event in events:
        _add_event(data, event, names, path)
    for spans in data.spans.values():
        spans.sort(key=lambda s: (s[0], s[1]))
    return data


def load_chrome_trace(path: Path) -> dict[str, list[Span]]:
    """Track name -> its spans ``(start_s, end_s, name, args)`` sorted by start."""
    return read_trace(path).spans


def _add_event(data: TraceData, event: dict[str, Any], names: dict[Any, str], path: Path) -> None:
    phase = event.get("ph")
    if phase not in ("X", "i", "I"):
        return
    pid, tid = event.get("pid"), event.get("tid")
    if not all(_is_id(value) for value in (pid, tid)):
        raise InputError(
            f"{path}: event {str(event.get('name'))[:80]!r} has a pid or tid that is not a number or a "
            "string; the trace is corrupt"
        )
    track = names.get((pid, tid), f"tid {tid}")
    ts, dur = event.get("ts"), event.get("dur", 0)
    if not _is_number(ts) or not _is_number(dur) or dur < 0:
        raise InputError(f"{path}: event {event.get('name')!r} has a bad ts/dur; the trace is corrupt")
    start_s = ts / US_PER_S
    if phase == "X":
        args = event.get("args", {}) if isinstance(event.get("args"), dict) else {}
        span = (start_s, start_s + dur / US_PER_S, str(event.get("name", "")), args)
        data.spans.setdefault(track, []).append(span)
    else:
        data.marks.setdefault(track, []).append((start_s, str(event.get("name", ""))))


def _is_number(value: object) -> TypeGuard[int | float]:
    """A finite JSON number (``json`` reads NaN and Infinity too)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_id(value: object) -> bool:
    """A pid or tid a track can be named by: absent, a number or a string (not a list or an object)."""
    return value is None or isinstance(value, int | float | str)
