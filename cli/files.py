"""Output files of the CLI: checked before any work, written atomically."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

from klotski_tier.core.atomic import atomic_open
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


def atomic_write(path: Path) -> AbstractContextManager[IO[Any]]:
    """Write the text file ``path`` atomically (see :mod:`klotski_tier.core.atomic`)."""
    return atomic_open(path, what="output")
