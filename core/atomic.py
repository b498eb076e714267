"""Files written atomically: the old file or the whole new one, never half of it.

The content goes to a temporary file beside the target, renamed over it once complete; on
any failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from klotski_tier.core.errors import InputError

logger = logging.getLogger(__name__)


@contextmanager
def atomic_open(path: Path, mode: str = "w", *, what: str = "file") -> Iterator[IO[Any]]:
    """Open a temporary file to write ``path`` with (``"w"`` text or ``"wb"`` bytes); renamed at exit."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(
            f"cannot write {what} {path}: {exc.strerror or exc}; choose a writable path"
        ) from exc
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
        os.replace(temp, path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise InputError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def remove_stale_temps(target: Path, mark: str) -> None:
    """Delete ``.{target.name}{mark}{pid}-...`` directories left by processes that no longer run."""
    prefix = f".{target.name}{mark}"
    for candidate in target.parent.glob(f"{prefix}*"):
        pid_text = candidate.name.removeprefix(prefix).split("-")[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            logger.info("removing the interrupted build %s", candidate)
            shutil.rmtree(candidate, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
