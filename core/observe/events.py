"""The scheduling decisions of a run, in the order they happened: an event log.

The residency manager records what it does with blocks and the pipeline records each compute job
as it issues it. The engine and the simulator run the same pipeline and residency manager, so
their logs are directly comparable: the same step with the same durations gives the same
sequence of loads, evictions and jobs (``tests/core/plan/test_sim_engine_agree.py``), and the
Klotski order can be checked on either (``tests/core/runtime/test_klotski_order.py``).

Events, by kind (``subject`` is a block such as ``L3.E5``, or a job such as ``L3 expert 5``)::

    request   a computation asked for a block on the device (``detail``: resident, in flight, absent)
    want      the pipeline wants a block ahead of need (it prefetches it as soon as there is room)
    prefetch  a load ahead of need started (room was there)
    load      a block's load into ``tier`` began: its room is reserved
    loaded    the block is resident in ``tier`` (the leases waiting for it are granted)
    evict     the block left ``tier`` to make room
    release   a computation let its lease of the block go
    job       the pipeline issued a compute job
    wait      the pipeline waited for ``subject`` with nothing to compute

Records come from the event-loop thread only; recording is a list append.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

REQUEST, WANT, PREFETCH, LOAD, LOADED, EVICT, RELEASE, JOB, WAIT = (
    "request", "want", "prefetch", "load", "loaded", "evict", "release", "job", "wait",
)  # fmt: skip


class Event(NamedTuple):
    at_s: float  # on the run's clock
    kind: str
    subject: str
    tier: str = ""  # "device" or "host" for block events
    detail: str = ""  # e.g. the state a request found


class EventLog:
    """Events in the order they were recorded, timed by ``clock``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.events: list[Event] = []

    def record(self, kind: str, subject: str, tier: str = "", detail: str = "") -> None:
        self.events.append(Event(self.clock(), kind, subject, tier, detail))

    def of(self, kind: str, tier: str | None = None) -> list[Event]:
        """The events of ``kind`` (in ``tier``, if given), in order."""
        return [e for e in self.events if e.kind == kind and (tier is None or e.tier == tier)]

    def subjects(self, kind: str, tier: str | None = None) -> list[str]:
        return [e.subject for e in self.of(kind, tier)]
