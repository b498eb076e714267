"""``klotski-tier`` in a subprocess that pauses at a chosen point, for tests of what happens there.

:func:`start_paused` runs the CLI with one function (or context manager) of one module wrapped: on
reaching it, the process prints :data:`PAUSED` on stderr and waits for a line on its stdin. The test
waits for that line (no sleep), then signals the process, or does something else and lets it go on
with :meth:`Paused.resume`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

PAUSED = "PAUSED-FOR-TEST"
WAIT_S = 300  # the longest a paused process may take to reach its pause or to finish

_WRAPPER = """
import contextlib, importlib, json, sys
module_name, attribute, is_context, argv = json.loads(sys.argv[1])
owner = importlib.import_module(module_name)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
real = getattr(owner, name)

def pause():
    print({paused!r}, file=sys.stderr, flush=True)
    sys.stdin.readline()

def paused_call(*args, **kwargs):
    pause()
    return real(*args, **kwargs)

@contextlib.contextmanager
def paused_context(*args, **kwargs):
    with real(*args, **kwargs) as value:
        pause()
        yield value

setattr(owner, name, paused_context if is_context else paused_call)
sys.argv = ["klotski-tier", *argv]
from klotski_tier.cli.entry import main  # as the console script runs
main()
"""


_IMPORT_WRAPPER = """
import importlib.abc, sys
module_name, argv = {arguments!r}

class PauseAtImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == module_name:
            sys.meta_path.remove(self)
            print({paused!r}, file=sys.stderr, flush=True)
            sys.stdin.readline()
        return None  # the usual finders import it

sys.meta_path.insert(0, PauseAtImport())
sys.argv = ["klotski-tier", *argv]
from klotski_tier.cli.entry import main
main()
"""


@dataclass
class Paused:
    process: subprocess.Popen[str]

    def wait_for_pause(self) -> str:
        """Read stderr up to the pause; what came before it."""
        assert self.process.stderr is not None
        seen = []
        for line in self.process.stderr:
            if line.strip() == PAUSED:
                return "".join(seen)
            seen.append(line)
        self.process.wait(WAIT_S)
        raise AssertionError(f"exited {self.process.returncode} before the pause: {''.join(seen)}")

    def signal(self, signum: int) -> tuple[int, str]:
        """Send ``signum``, then let the pause end (a handler that only takes note, as asyncio's does,
        returns to the wait); the exit code and the rest of stderr."""
        self.process.send_signal(signum)
        return self.resume()

    def resume(self) -> tuple[int, str]:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it may have exited already
            self.process.stdin.write("\n")
            self.process.stdin.flush()
        return self.finish()

    def finish(self) -> tuple[int, str]:
        _, stderr = self.process.communicate(timeout=WAIT_S)
        return self.process.returncode, stderr


def start_paused(module: str, attribute: str, argv: list[str], *, context: bool = False) -> Paused:
    """``klotski-tier ARGV`` with ``module.attribute`` pausing (entered, if ``context``); ``attribute``
    may be dotted (``Class.method``)."""
    code = _WRAPPER.format(paused=PAUSED)
    return _start([sys.executable, "-c", code, json.dumps([module, attribute, context, argv])])


def start_paused_at_import(module: str, argv: list[str]) -> Paused:
    """``klotski-tier ARGV`` as the console script runs it, pausing as it first imports ``module``
    (before the module is found and run)."""
    code = _IMPORT_WRAPPER.format(paused=PAUSED, arguments=(module, argv))
    return _start([sys.executable, "-c", code])


def _start(command: list[str]) -> Paused:
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not ignored, as in a shell
    )
    return Paused(process)
