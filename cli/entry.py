"""The ``klotski-tier`` console script: SIGINT and SIGTERM are handled from its first line.

Importing the commands imports torch, which takes a while; a signal then would otherwise end the
process with a traceback from inside ``import torch`` (SIGINT) or silently (SIGTERM). Here, before
any heavy import, both signals are set to end the process as a command's do
(:mod:`klotski_tier.cli.errors`): ``error: interrupted by SIGINT`` and exit code 130 (143 for
SIGTERM). Once the commands are imported the handlers in place before are restored, so that a
command's own clean-up (:func:`~klotski_tier.cli.errors.report_errors`, asyncio's SIGINT handler)
takes over. This module imports nothing of the package but, at the end, the commands (and, first,
:mod:`klotski_tier.cli.streams`, which imports only the standard library).
"""

from __future__ import annotations

import contextlib
import os
import signal
from types import FrameType
from typing import Any

SIGNAL_EXIT_BASE = 128  # as klotski_tier.cli.errors.SIGNAL_EXIT_BASE, which this module may not import yet
_EARLY_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main() -> Any:
    """Run ``klotski-tier`` with the signals handled while its commands are imported, and standard
    output guarded (:mod:`klotski_tier.cli.streams`) from the start."""
    previous = {signum: signal.getsignal(signum) for signum in _EARLY_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:  # an ignored signal (a background job's SIGINT) stays ignored
            signal.signal(signum, _exit_interrupted)
    from klotski_tier.cli import streams

    streams.install()
    from klotski_tier.cli.errors import end_if_stdout_failed, ignore_late_signals
    from klotski_tier.cli.main import main as commands

    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
    ignore_late_signals()
    try:
        return commands()
    except SystemExit as exc:
        if exc.code in (0, None):  # what click printed itself (--help, --version) may have failed too
            end_if_stdout_failed()
        for signum in _EARLY_SIGNALS:  # the exit code is chosen: a signal now would only hide it
            signal.signal(signum, signal.SIG_IGN)
        raise


def _exit_interrupted(signum: int, frame: FrameType | None) -> None:
    """End the process as a command interrupted by ``signum`` ends: one line, exit code 128 + signum."""
    line = f"error: interrupted by {signal.Signals(signum).name}\n"
    # straight to fd 2: the signal may have come inside a write to sys.stderr, whose lock it holds; with
    # no stderr to say it on, the exit code still does
    with contextlib.suppress(OSError):
        os.write(2, line.encode())
    # and at once: raised inside an import, SystemExit can be swallowed by the module being imported
    # (numpy, torch), and the process would go on half-imported. Nothing has been made yet to clean up.
    os._exit(SIGNAL_EXIT_BASE + signum)
