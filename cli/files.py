"""Output files of the CLI: checked before any work, written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from klotski_tier.core.errors import InputError


def check_writable(path: Path, option: str = "--output") -> None:
    """Refuse, before any work, an output path whose directory is missing or that is a directory."""
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory; name a file to write")
    if not directory.is_dir():
        raise InputError(f"{option} {path}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK):
        raise InputError(f"{option} {path}: directory {directory} is not writable")


@contextmanager
def atomic_write(path: Path) -> Iterator[Any]:
    """Write ``path`` through a temporary file renamed into place; nothing is left on failure."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
        try:
            os.replace(temp, path)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
