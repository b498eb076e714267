"""Standard output and error that cannot cost a run: a failed write is noted, never raised mid-command.

The console script (:mod:`klotski_tier.cli.entry`) installs :func:`install` before anything is
printed. From then on every write to ``sys.stdout`` (``click.echo``, ``print``, the JSON of
``--json``) goes through :class:`_GuardedBuffer`: when the stream fails (``> /dev/full``, a disk that
fills, a reader that left), the error is kept and the rest of the output is dropped, so the command
goes on and writes its files (``run --output``, ``bench --profile``) instead of dying in a
traceback between printing and saving. At the end the command reports it
(:func:`klotski_tier.cli.errors.report_errors`): one line on stderr, exit code 1, and what was saved.

- A reader that left (``| head``, EPIPE) is the reader's choice, as for any Unix tool: no line,
  exit code 141 (128 + SIGPIPE, what a shell reports for a process SIGPIPE killed).
- A standard output closed at start (``>&-``) is reported the same way when the command prints, and
  its file descriptor is held on ``/dev/null`` so that no file the command opens takes fd 1 and
  receives the output by mistake.

Standard error carries progress, warnings and the last line; when it fails (``2> /dev/full``, ``2>&-``)
there is nowhere left to say so, so its failed writes are only dropped: the command runs to its end,
writes its files and stdout, and its exit code still says how it ended. A closed stderr's fd is held
on ``/dev/null`` too.

This module imports only the standard library: the console script installs it before the heavy imports.
"""

from __future__ import annotations

import errno
import io
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

STDOUT_FD = 1
STDERR_FD = 2
SIGPIPE_EXIT = 128 + signal.SIGPIPE
"""Exit code of a command whose standard output's reader left: as a shell reports a SIGPIPE death."""


@dataclass
class _Failure:
    """The first failed write to standard output (None while every write succeeded)."""

    error: OSError | None = None
    closed: bool = False
    reported: bool = False


_FAILURE = _Failure()


class _GuardedBuffer(io.BufferedWriter):
    """fd 1 or 2, buffered, whose first failed write or flush is recorded in ``failure``; from then on
    its data is dropped. The guard is around the C buffer, never inside it: a signal handler (Python
    code) then never runs while the buffer's lock is held or its bookkeeping is half done."""

    def __init__(self, fd: int, closed: bool, failure: _Failure) -> None:
        super().__init__(io.FileIO(fd, "w", closefd=False))
        self._closed_at_start = closed
        self._failure = failure

    def isatty(self) -> bool:
        return not self._closed_at_start and super().isatty()

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self._closed_at_start:
            self._failure.closed = self._failure.closed or size > 0
        elif self._failure.error is None:
            try:
                return super().write(data)
            except OSError as exc:
                self._failure.error = exc
        return size  # dropped once the stream failed: the command goes on

    def flush(self) -> None:
        if self._closed_at_start or self._failure.error is not None:
            return  # what is still buffered is dropped, at exit too (close flushes through here)
        try:
            super().flush()
        except OSError as exc:
            self._failure.error = exc


def install() -> None:
    """Route ``sys.stdout`` and ``sys.stderr`` through :class:`_GuardedBuffer` (once, in the console script,
    first). Standard error's failures are kept apart and never reported: nothing could show them."""
    sys.stdout = _guarded(sys.stdout, STDOUT_FD, _FAILURE)
    sys.stderr = _guarded(sys.stderr, STDERR_FD, _Failure())


def _guarded(stream: Any, fd: int, failure: _Failure) -> io.TextIOWrapper:
    closed = stream is None
    if closed:
        _hold_fd_on_devnull(fd)
    encoding = "utf-8" if closed else stream.encoding
    errors = "backslashreplace" if fd == STDERR_FD else "strict" if closed else stream.errors
    line_buffering = fd == STDERR_FD or (not closed and bool(getattr(stream, "line_buffering", False)))
    buffered = _GuardedBuffer(fd, closed, failure)
    return io.TextIOWrapper(buffered, encoding=encoding, errors=errors, line_buffering=line_buffering)


def _hold_fd_on_devnull(fd: int) -> None:
    """Open ``/dev/null`` as ``fd``, so that the next file opened does not become that standard stream."""
    opened = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if opened != fd:
        os.dup2(opened, fd, inheritable=False)
        os.close(opened)


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
