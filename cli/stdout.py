"""Standard output that cannot cost a run: a failed write to it is noted, never raised mid-command.

The console script (:mod:`klotski_tier.cli.entry`) installs :func:`install` before anything is
printed. From then on every write to ``sys.stdout`` (``click.echo``, ``print``, the JSON of
``--json``) goes through :class:`_GuardedFd`: when the stream fails (``> /dev/full``, a disk that
fills, a reader that left), the error is kept and the rest of the output is dropped, so the command
goes on and writes its files (``run --output``, ``bench --profile``) instead of dying in a
traceback between printing and saving. At the end the command reports it
(:func:`klotski_tier.cli.errors.report_errors`): one line on stderr, exit code 1, and what was saved.

- A reader that left (``| head``, EPIPE) is the reader's choice, as for any Unix tool: no line,
  exit code 141 (128 + SIGPIPE, what a shell reports for a process SIGPIPE killed).
- A standard output closed at start (``>&-``) is reported the same way when the command prints, and
  its file descriptor is held on ``/dev/null`` so that no file the command opens takes fd 1 and
  receives the output by mistake.

This module imports only the standard library: the console script installs it before the heavy imports.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
from dataclasses import dataclass

STDOUT_FD = 1
SIGPIPE_EXIT = 128 + signal.SIGPIPE
"""Exit code of a command whose standard output's reader left: as a shell reports a SIGPIPE death."""


@dataclass
class _Failure:
    """The first failed write to standard output (None while every write succeeded)."""

    error: OSError | None = None
    closed: bool = False
    reported: bool = False


_FAILURE = _Failure()


class _GuardedFd(io.RawIOBase):
    """fd 1 as a raw stream whose failed writes are recorded and their data dropped."""

    def __init__(self, closed: bool) -> None:
        super().__init__()
        self._closed_at_start = closed

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return STDOUT_FD

    def isatty(self) -> bool:
        return not self._closed_at_start and os.isatty(STDOUT_FD)

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        if self._closed_at_start:
            _FAILURE.closed = _FAILURE.closed or len(view) > 0
        elif _FAILURE.error is None:
            try:
                done = 0
                while done < len(view):
                    done += os.write(STDOUT_FD, view[done:])
            except OSError as exc:
                _FAILURE.error = exc
        return len(view)  # dropped once the stream failed: the command goes on


def install() -> None:
    """Route ``sys.stdout`` through :class:`_GuardedFd` (call once, in the console script, first)."""
    closed = sys.stdout is None
    if closed:
        _hold_fd_on_devnull()
    encoding = "utf-8" if closed else sys.stdout.encoding
    errors = "strict" if closed else sys.stdout.errors
    line_buffering = False if closed else bool(getattr(sys.stdout, "line_buffering", False))
    buffered = io.BufferedWriter(_GuardedFd(closed))  # type: ignore[type-var]
    sys.stdout = io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=line_buffering)


def _hold_fd_on_devnull() -> None:
    """Open ``/dev/null`` as fd 1, so that the next file opened does not become standard output."""
    fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if fd != STDOUT_FD:
        os.dup2(fd, STDOUT_FD, inheritable=False)
        os.close(fd)


def failure() -> str | None:
    """What went wrong with standard output, for the line that ends the command; None if nothing did
    (or if it was already reported). Flushes first, so a failure of the last write counts too."""
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except OSError as exc:  # a stream this module did not install (a test runner's)
            _FAILURE.error = _FAILURE.error or exc
    if _FAILURE.reported:
        return None
    if _FAILURE.closed:
        return "standard output is closed, so what the command printed is lost"
    if _FAILURE.error is not None:
        return f"cannot write to standard output: {_FAILURE.error.strerror or _FAILURE.error}"
    return None


def reader_left() -> bool:
    """Whether standard output failed because its reader closed the pipe (EPIPE)."""
    return _FAILURE.error is not None and _FAILURE.error.errno == errno.EPIPE


def mark_reported() -> None:
    """The failure has been reported (by the command); the console script need not report it again."""
    _FAILURE.reported = True


def reset() -> None:
    """Forget any failure (between commands run in one process, as tests do)."""
    _FAILURE.error, _FAILURE.closed, _FAILURE.reported = None, False, False
