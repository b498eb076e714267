"""The CLI's error boundary: how a command ends when it does not succeed.

- a :class:`KlotskiError` becomes ``error: ...``, one line on stderr, exit code 1;
- SIGINT (Ctrl-C) and SIGTERM stop the command the same way: the work in progress unwinds (temporary
  files are removed, the test file of a bench, the tier threads are joined), then one line on stderr
  and exit code 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM, as a shell reports a
  process the signal killed.

SIGTERM is delivered as SIGINT is: to whatever SIGINT handler is in place when it arrives (Python's,
raising :class:`KeyboardInterrupt`, or asyncio's, cancelling the running task first), so that every
clean-up written for Ctrl-C runs for SIGTERM too.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, TypeVar

import click

from klotski_tier.core.errors import KlotskiError

T = TypeVar("T")
SIGNAL_EXIT_BASE = 128
"""A command stopped by signal N exits with 128 + N, as shells report a process killed by it."""


def report_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn :class:`KlotskiError` raised by ``fn`` into ``error: ...`` on stderr and exit code 1, and
    SIGINT or SIGTERM into ``error: interrupted by ...`` and exit code 130 or 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        received: list[int] = []
        try:
            with _sigterm_as_sigint(received):
                return fn(*args, **kwargs)
        except KlotskiError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            signum = received[-1] if received else signal.SIGINT
            click.echo(f"error: interrupted by {signal.Signals(signum).name}", err=True)
            sys.exit(SIGNAL_EXIT_BASE + signum)

    return wrapper


@contextmanager
def _sigterm_as_sigint(received: list[int]) -> Iterator[None]:
    """While inside, SIGTERM is handled by the SIGINT handler of the moment; ``received`` records it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers (a command run from a worker thread)
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored (a background job): SIGTERM still stops the command
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
