"""The CLI's error boundary: how a command ends when it does not succeed.

- a :class:`KlotskiError` becomes ``error: ...``, one line on stderr, exit code 1;
- a usage mistake (click's :class:`~click.UsageError`: a bad option value, a missing argument, an
  unknown option or command) becomes ``error: ... (see 'klotski-tier CMD --help')``, one line on
  stderr, exit code 2 (:class:`OneLineUsageGroup`, the ``klotski-tier`` group);
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
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any, TypeVar

import click

from klotski_tier.cli import files, streams
from klotski_tier.core.errors import KlotskiError

T = TypeVar("T")
_HELP_SHOWN: tuple[type[Exception], ...] = tuple(
    getattr(click.exceptions, name) for name in ("NoArgsIsHelpError",) if hasattr(click.exceptions, name)
)
"""Usage errors that show the help itself (click 8.2+: a group or command given no arguments at all)."""
SIGNAL_EXIT_BASE = 128
"""A command stopped by signal N exits with 128 + N, as shells report a process killed by it."""


class OneLineUsageError(click.UsageError):
    """A usage mistake shown as one line that names the help to read, not click's usage block."""

    def __init__(self, error: click.UsageError, command_path: str) -> None:
        super().__init__(error.format_message(), error.ctx)
        self.command_path = error.ctx.command_path if error.ctx is not None else command_path

    def show(self, file: IO[Any] | None = None) -> None:
        message = self.format_message().rstrip(".")
        click.echo(f"error: {message} (see '{self.command_path} --help')", file=file, err=True)


_COMMAND_PATH = "klotski_tier.command_path"
"""Key in a context's ``meta`` (shared by its subcontexts): the command path of the deepest command
resolved so far, for the usage errors click raises without a context."""


class OneLineUsageGroup(click.Group):
    """A click group whose usage mistakes, its own and every subcommand's, are :class:`OneLineUsageError`."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        path = f"{parent.command_path} {info_name}" if parent is not None else info_name or "klotski-tier"
        with _one_line_usage(lambda: path):
            return super().make_context(info_name, args, parent, **extra)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta[_COMMAND_PATH] = f"{ctx.command_path} {name}"
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage(lambda: str(ctx.meta.get(_COMMAND_PATH, ctx.command_path))):
            return super().invoke(ctx)


@contextmanager
def _one_line_usage(command_path: Callable[[], str]) -> Iterator[None]:
    """Raise click's usage errors inside as :class:`OneLineUsageError`; ``command_path`` names the
    command whose help to read when the error names no context."""
    try:
        yield
    except click.UsageError as exc:
        if isinstance(exc, (OneLineUsageError, *_HELP_SHOWN)):
            raise
        raise OneLineUsageError(exc, command_path()) from exc


def report_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn :class:`KlotskiError` raised by ``fn`` into ``error: ...`` on stderr and exit code 1, and
    SIGINT or SIGTERM into ``error: interrupted by ...`` and exit code 130 or 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        received: list[int] = []
        streams.reset()
        files.reset_saved()
        try:
            with _sigterm_as_sigint(received):
                value = fn(*args, **kwargs)
                _work_done()
        except KlotskiError as exc:
            _work_done()
            broken = streams.failure()
            streams.mark_reported()
            click.echo(f"error: {exc}" + (f" (and {broken})" if broken else ""), err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            _work_done()
            signum = received[-1] if received else signal.SIGINT
            saved = files.saved_outputs()
            kept = f"; saved {', '.join(saved)}" if saved else ""
            click.echo(f"error: interrupted by {signal.Signals(signum).name}{kept}", err=True)
            sys.exit(SIGNAL_EXIT_BASE + signum)
        end_if_stdout_failed()
        return value

    return wrapper


def end_if_stdout_failed() -> None:
    """Exit as a failed command when standard output failed (:mod:`klotski_tier.cli.streams`): one
    line naming what was saved and exit code 1; a reader that left, silently with exit code 141."""
    broken = streams.failure()
    if broken is None:
        return
    streams.mark_reported()
    if streams.reader_left():
        sys.exit(streams.SIGPIPE_EXIT)
    saved = files.saved_outputs()
    kept = f"; saved {', '.join(saved)}" if saved else ""
    click.echo(f"error: {broken}{kept}", err=True)
    sys.exit(1)


@dataclass
class _LateSignals:
    """Whether a signal after the command's work is ignored (the console script), and whether it is over."""

    ignored: bool = False
    work_done: bool = False


_LATE_SIGNALS = _LateSignals()


def ignore_late_signals() -> None:
    """From when a command's work is over (its outputs saved, its last line printed), SIGINT and SIGTERM
    are ignored: the process is only exiting, with the exit code the command chose. Without this, a
    signal while the interpreter shuts down (threads joined, torch torn down: a second or so) ended a
    finished run with 130 or 143 and no line. The console script (:mod:`klotski_tier.cli.entry`) asks
    for it; a command run in-process (a test, a notebook) leaves the handlers alone."""
    _LATE_SIGNALS.ignored = True


def _work_done() -> None:
    _LATE_SIGNALS.work_done = True
    if _LATE_SIGNALS.ignored and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


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

    _LATE_SIGNALS.work_done = False
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        late = _LATE_SIGNALS.ignored and _LATE_SIGNALS.work_done
        signal.signal(signal.SIGTERM, signal.SIG_IGN if late else previous)
