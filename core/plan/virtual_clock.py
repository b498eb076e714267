"""An asyncio event loop on a virtual clock, for simulated runs of the engine's own pipeline.

:class:`VirtualClockLoop` is a stock selector event loop whose ``time()`` is a number the loop
advances itself: whenever nothing is ready to run, it jumps to the earliest timer instead of
sleeping until it. ``asyncio.sleep``, ``call_at`` and every future work unchanged, so the
pipeline, the residency manager and the read queue run exactly as in the engine, and a step of
a large model takes as long as its Python takes, whatever its simulated duration.

A simulated run has no threads and no I/O: every wait ends at a timer. If the loop has nothing
ready and no timer (a load waits for room that no release will make), the run can never finish,
and the loop says so instead of blocking forever.

Why not ``looptime``: that library fakes time for tests of code that also does real I/O, so it
lets real time pass for sockets and thread pools and spins no-op cycles before each jump. The
simulator does no real I/O at all, so a jump needs nothing but the next timer.
"""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _JumpingSelector(selectors.DefaultSelector):  # type: ignore[misc, valid-type]
    """Polls the loop's own wake-up pipe without blocking; a wait of ``timeout`` advances the clock."""

    def __init__(self, loop: VirtualClockLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready: list[tuple[selectors.SelectorKey, int]] = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise AssertionError(
                "simulation stalled: every task waits and no timer is set (a load waits for room that "
                "no release will make)"
            )
        self._loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock starts at 0 and moves only by jumping to the next timer."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward (the loop's selector does, when nothing is ready), and at
        least onto the earliest timer: nothing can happen before it. Far into a run (a slow drive's
        simulated days) ``now + (when - now)`` can round to below ``when`` by less than the clock's
        resolution, and the loop would spin on a timer it never reached."""
        assert seconds >= 0, f"the clock cannot go back ({seconds} s)"
        self._now += seconds
        scheduled: list[asyncio.TimerHandle] = getattr(self, "_scheduled", [])
        if scheduled:  # just past it: the loop runs a timer only when it is before now + 1 ns, a sum
            # that rounds back to now once the clock is past 2**23 s
            self._now = max(self._now, math.nextafter(scheduled[0].when(), math.inf))


def run_virtual(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to completion on a fresh :class:`VirtualClockLoop`."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(coroutine)
