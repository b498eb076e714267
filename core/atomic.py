"""Where output files go: the one rule for every file klotski-tier writes.

- A regular file (or a new one) is written atomically: the content goes to a temporary file beside
  the *resolved* target, renamed over it once complete; on any failure or interruption the temporary
  file is removed and the target is untouched. A symlink is followed: its target is replaced, the
  link stays a link. A new file's mode follows the umask; an existing file keeps its mode.
- A character device (``/dev/null``, a terminal) or a FIFO is written through: opened and written
  directly, never replaced. So is the file this process's stdout or stderr already writes to
  (``--output /dev/stdout > out.txt``): through that stream, not over it. A FIFO without a reader is
  refused rather than waited on.
- Anything else (a directory, a block device, a socket) is refused.
- Outputs are checked before any work (:func:`check_outputs`): each must be writable, two outputs
  of one command may not be the same file (a shared character device, such as ``/dev/null``, is fine),
  and no output may be one of the command's inputs (the same file, or a file inside an input
  directory such as ``--model``'s), unless the command updates that input in place.

A temporary file is named ``.{target}.{pid}-{hex}.tmp``; one left by a process that no longer runs
(killed with SIGKILL) is removed the next time the same target is written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import logging
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from klotski_tier.core.errors import InputError

logger = logging.getLogger(__name__)
NEW_FILE_MODE = 0o666
"""Mode a new output file is created with, before the umask (as ``open(path, "w")`` does)."""
_TEMP_TOKEN_BYTES = 8  # random bytes in a temporary file's name: 16 hex digits
_STD_STREAMS = ((1, "stdout"), (2, "stderr"))  # fd and name in sys
_REFUSED = {stat.S_IFDIR: "a directory", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def output_path(text: str) -> Path:
    """The path of an output named ``text``; a name ending in ``/`` is a directory, not a file to write,
    and an empty name is no file at all (``Path("")`` would be the current directory)."""
    if not text:
        raise InputError("the path is empty; name a file to write")
    if text.endswith(os.sep):
        raise InputError(f"{text} ends with {os.sep!r}; name a file to write")
    return Path(text)


Inputs = Mapping[str, Path | Iterable[Path] | None]
"""What a command reads: a label (the option, e.g. ``--model``) to its path or paths (None: not given)."""


def check_outputs(
    targets: Mapping[str, Path | None],
    inputs: Inputs | None = None,
    *,
    directories: Collection[str] = (),
    updates: Mapping[str, str] | None = None,
) -> None:
    """Refuse, before any work, an output that cannot be written, two outputs that are one file, or an
    output that is one of ``inputs`` (or inside one of ``directories``, the labels of inputs that are
    directories read whole, such as ``--model``).

    ``targets`` maps a label (the option, e.g. ``--output``) to its path (None: not asked for);
    ``updates`` maps an output's label to the input's label it rewrites in place on purpose.
    """
    seen: dict[tuple[object, ...], str] = {}
    for label, path in targets.items():
        if path is None:
            continue
        identity = check_output(path, label)
        if identity is not None and identity in seen:
            raise InputError(f"{seen[identity]} and {label} are the same file {path}; name two files")
        if identity is not None:
            seen[identity] = label
            allowed = (updates or {}).get(label)
            read = {k: v for k, v in (inputs or {}).items() if k != allowed}
            _refuse_input(path, label, read, directories)


def _refuse_input(path: Path, label: str, inputs: Inputs, directories: Collection[str]) -> None:
    """Refuse the output ``path`` when it is a file of ``inputs`` or lies inside one of ``directories``."""
    info = _stat(path, label)
    for input_label, value in inputs.items():
        for source in [value] if isinstance(value, Path) else value or ():
            try:
                read = os.stat(source)
            except OSError:
                continue  # not there: reading it will say so
            read_whole = input_label in directories and stat.S_ISDIR(read.st_mode)
            if read_whole and lies_within(path, source):
                raise InputError(
                    f"{label} {path} is inside {input_label} {source}, which the command reads; "
                    "write it somewhere else"
                )
            if read_whole and info is not None and _links_to(source, info):
                raise InputError(
                    f"{label} {path} is a file {input_label} {source} reads (through a link in it); "
                    "name another file to write"
                )
            if info is not None and (read.st_dev, read.st_ino) == (info.st_dev, info.st_ino):
                raise InputError(
                    f"{label} {path} is also {input_label} {source}, which the command reads; "
                    "name another file to write"
                )


def lies_within(path: Path, directory: Path) -> bool:
    """Whether the file ``path`` would be written inside ``directory``: by its resolved path, or because
    one of its resolved parents is that directory by identity (the same directory reached through a bind
    mount has another path)."""
    target = _resolved(path)
    if target.is_relative_to(_resolved(directory)):
        return True
    try:
        own = os.stat(directory)
    except OSError:
        return False
    for ancestor in target.parents:
        try:
            info = os.stat(ancestor)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) == (own.st_dev, own.st_ino):
            return True
    return False


_LINKED_FILES_MAX = 10_000
"""Entries of a directory read whole that are compared with an output: a model has tens of files."""


def _links_to(directory: Path, info: os.stat_result) -> bool:
    """Whether an entry of ``directory`` (a symlink followed, as a Hugging Face snapshot's are, one level
    of subdirectories too) is the file ``info`` describes."""
    pending, seen = [directory], 0
    for depth in range(2):
        subdirectories = []
        for folder in pending:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                seen += 1
                if seen > _LINKED_FILES_MAX:
                    return False
                try:
                    found = os.stat(entry.path)
                except OSError:
                    continue
                if (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino):
                    return True
                if depth == 0 and stat.S_ISDIR(found.st_mode):
                    subdirectories.append(Path(entry.path))
        pending = subdirectories
    return False


def check_output(path: Path, label: str = "output") -> tuple[object, ...] | None:
    """Refuse an output ``path`` that cannot be written by :func:`atomic_open`; else its identity
    (what two outputs share when they are one file; None for a character device, which may be shared)."""
    info = _stat(path, label)
    if info is None or stat.S_ISREG(info.st_mode):
        directory = _resolved(path).parent
        if not directory.is_dir():
            raise InputError(f"{label} {path}: directory {directory} does not exist; create it first")
        if not os.access(directory, os.W_OK):
            raise InputError(f"{label} {path}: directory {directory} is not writable")
        return ("path", str(_resolved(path))) if info is None else ("file", info.st_dev, info.st_ino)
    _refuse_kind(info, path, label)
    if not os.access(path, os.W_OK):
        raise InputError(f"{label} {path} is not writable")
    return None if stat.S_ISCHR(info.st_mode) else ("file", info.st_dev, info.st_ino)


@contextmanager
def atomic_open(path: Path, mode: str = "w", *, what: str = "file") -> Iterator[IO[Any]]:
    """Open ``path`` to write (``"w"`` text or ``"wb"`` bytes) by the rule of this module.

    Any ``OSError`` becomes a one-line :class:`InputError` naming ``what`` and ``path``.
    """
    info = _stat(path, f"cannot write {what}")
    if info is not None and not stat.S_ISREG(info.st_mode):
        _refuse_kind(info, path, f"cannot write {what}")
    stream = _std_stream(info)
    if info is not None and (stream is not None or not stat.S_ISREG(info.st_mode)):
        with _write_through(path, mode, what, stream) as handle:
            yield handle
        return
    with _write_replacing(path, mode, what, info) as handle:
        yield handle


@contextmanager
def _write_replacing(path: Path, mode: str, what: str, info: os.stat_result | None) -> Iterator[IO[Any]]:
    """The temporary file beside the resolved target, renamed over it once complete."""
    target = _resolved(path)
    if not target.parent.is_dir():
        raise InputError(
            f"cannot write {what} {path}: directory {target.parent} does not exist; create it first"
        )
    remove_dead_temps(target)
    temp = temp_beside(target)
    try:  # from before the file exists: an interruption at any point removes it by name
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, NEW_FILE_MODE)
        if info is not None:
            os.fchmod(fd, stat.S_IMODE(info.st_mode))
        with os.fdopen(fd, mode, encoding=_encoding(mode)) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, target)
    except OSError as exc:
        discard(temp)
        raise InputError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc
    except BaseException:
        discard(temp)
        raise


@contextmanager
def _write_through(path: Path, mode: str, what: str, stream: int | None) -> Iterator[IO[Any]]:
    """``path`` opened and written directly (a device, a FIFO, or this process's own stdout/stderr)."""
    try:
        fd = _open_through(path, stream)
        with os.fdopen(fd, mode, encoding=_encoding(mode)) as handle:
            yield handle
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise InputError(
                f"cannot write {what} {path}: nothing reads from it; start its reader first"
            ) from exc
        raise InputError(f"cannot write {what} {path}: {exc.strerror or exc}") from exc


def _open_through(path: Path, stream: int | None) -> int:
    if stream is not None:
        getattr(sys, dict(_STD_STREAMS)[stream]).flush()  # what was printed comes first
        return os.dup(stream)
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)  # a FIFO: ENXIO, no wait
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return fd


def _stat(path: Path, label: str) -> os.stat_result | None:
    """What ``path`` names, symlinks followed; None when nothing is there (or a dangling link)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        fix = "; fix or remove the link" if exc.errno == errno.ELOOP else ""
        raise InputError(f"{label} {path}: {exc.strerror or exc}{fix}") from exc


def _refuse_kind(info: os.stat_result, path: Path, label: str) -> None:
    kind = _REFUSED.get(stat.S_IFMT(info.st_mode))
    if kind is not None:
        raise InputError(f"{label} {path} is {kind}; name a file to write")


def _std_stream(info: os.stat_result | None) -> int | None:
    """The fd (1 or 2) that already writes to the file ``info`` describes, if one does."""
    for fd, _ in _STD_STREAMS:
        try:
            own = os.fstat(fd)
        except OSError:
            continue
        if info is not None and (own.st_dev, own.st_ino) == (info.st_dev, info.st_ino):
            return fd
    return None


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _encoding(mode: str) -> str | None:
    return None if "b" in mode else "utf-8"


def discard(path: Path) -> None:
    """Remove the file ``path`` if it is there; a clean-up that fails hides no error it follows."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def temp_beside(target: Path) -> Path:
    """A name for a temporary file beside ``target``, this process's own (see :func:`remove_dead_temps`)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(_TEMP_TOKEN_BYTES)}.tmp")


def remove_dead_temps(target: Path) -> None:
    """Delete the temporary files of ``target`` left by processes that no longer run."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)-[0-9a-f]+\.tmp")
    try:
        candidates = list(target.parent.glob(f".{glob.escape(target.name)}.*.tmp"))
    except OSError:  # a directory that cannot be listed: the write itself will say why
        return
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match is not None and not _pid_alive(int(match.group(1))):
            logger.info("removing %s, left by an interrupted write", candidate)
            candidate.unlink(missing_ok=True)


def remove_stale_temps(target: Path, mark: str) -> None:
    """Delete ``.{target.name}{mark}{pid}-...`` directories left by processes that no longer run."""
    prefix = f".{target.name}{mark}"
    for candidate in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid_text = candidate.name.removeprefix(prefix).split("-")[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)) and candidate.is_dir():
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
