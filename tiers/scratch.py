"""The scratch tier: byte ranges of files the run writes and reads back (a KV cache on the drive).

A :class:`ScratchDriver` owns one directory made for the run (``mkdtemp`` under the directory it is
given) and the files it creates there. It writes a CPU tensor's bytes at an offset of a file and
reads a range back into a CPU tensor, in its own thread; it decides nothing about what the bytes are.
``aclose`` (and, should the process end without it, a finalizer) removes the directory with every
file in it: nothing the run wrote stays on the drive, also after Ctrl-C or an error.

Files are opened ``O_DIRECT``: their bytes go between the drive and the caller's buffers without
the page cache, so a cache of many GiB does not crowd the page cache out of a container's memory
limit (nor count against it). Every range must then start and end on :data:`DIRECT_ALIGN_BYTES`
and its buffer's address be aligned too: the caller lays its data out so (the KV cache pads each
position's row to the alignment: :class:`~klotski_tier.core.runtime.kv.DiskKv`), and an unaligned
range is an error, not a silent slow path. Where the file system refuses ``O_DIRECT`` (tmpfs), the
file is buffered and each range dropped from the page cache once written or read
(``POSIX_FADV_DONTNEED``, best effort).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path

import torch

from klotski_tier.core.errors import TierError
from klotski_tier.tiers.base import TierDriver
from klotski_tier.tiers.direct import DIRECT_ALIGN_BYTES, O_DIRECT

logger = logging.getLogger(__name__)

SCRATCH_THREADS = 1  # one file range at a time: the ranges are small and the drive serializes them


class ScratchDriver(TierDriver):
    """Creates files in a run's own directory under ``parent``; writes and reads their byte ranges."""

    name = "scratch"

    alignment = DIRECT_ALIGN_BYTES  # of every range's offset, length and buffer address

    def __init__(self, parent: Path, direct: bool = True, *, advice: str = "free space on the drive") -> None:
        """``advice``: what the user may do when the drive refuses a directory, a file or a write (it
        ends those errors' messages)."""
        super().__init__(max_workers=SCRATCH_THREADS)
        self.direct = direct and O_DIRECT != 0  # asked for; a file system may still refuse it
        self.advice = advice
        try:
            self.directory, made_parent = _make_run_directory(parent)
        except OSError as exc:
            raise TierError(
                f"cannot make a scratch directory in {parent}: {exc.strerror or exc}; {advice}"
            ) from exc
        self._files: dict[Path, tuple[int, bool]] = {}  # path -> (descriptor, O_DIRECT)
        self._lock = threading.Lock()
        self._cleanup = weakref.finalize(self, _remove_run_directory, self.directory, made_parent)
        self.bytes_written = 0
        self.bytes_read = 0

    async def create(self, name: str, nbytes: int) -> Path:
        """A new file of ``nbytes`` (sparse) named ``name`` in the run's directory."""
        self._check_open()
        path = self.directory / name
        return await self._run_job(lambda: self._create(path, nbytes))

    def _create(self, path: Path, nbytes: int) -> Path:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd, direct = self._open(path, flags)
            os.ftruncate(fd, nbytes)
        except OSError as exc:
            raise TierError(f"cannot create {path}: {exc.strerror or exc}; {self.advice}") from exc
        with self._lock:
            self._files[path] = (fd, direct)
        return path

    def _open(self, path: Path, flags: int) -> tuple[int, bool]:
        if self.direct:
            try:
                return os.open(path, flags | O_DIRECT, 0o600), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                path.unlink(missing_ok=True)  # O_CREAT may have made it before O_DIRECT was refused
                logger.info("%s refuses O_DIRECT; the KV cache goes through the page cache", path.parent)
        return os.open(path, flags, 0o600), False

    def is_direct(self, path: Path) -> bool:
        """Whether ``path`` is read and written with O_DIRECT."""
        return self._entry(path)[1]

    async def write(self, path: Path, offset: int, src: torch.Tensor) -> None:
        """Write the bytes of the contiguous CPU tensor ``src`` at ``offset`` of ``path``."""
        self._check_open()
        await self._run_job(lambda: self._write(path, offset, src))

    def _write(self, path: Path, offset: int, src: torch.Tensor) -> None:
        view = _bytes(src)
        fd, direct = self._entry(path)
        if direct:
            self._check_aligned(path, offset, src)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise TierError(
                f"cannot write {path} at offset {offset}: {exc.strerror or exc}; {self.advice}"
            ) from exc
        self.bytes_written += len(view)
        if not direct:
            _drop(fd, offset, len(view))

    async def read(self, path: Path, offset: int, dst: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor ``dst`` with the bytes at ``offset`` of ``path``."""
        self._check_open()
        await self._run_job(lambda: self._read(path, offset, dst))

    def _read(self, path: Path, offset: int, dst: torch.Tensor) -> None:
        view = _bytes(dst)
        fd, direct = self._entry(path)
        if direct:
            self._check_aligned(path, offset, dst)
        done = 0
        try:
            while done < len(view):
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    where = offset + done
                    raise TierError(f"short read of {path} at offset {where}: the scratch file shrank")
                done += count
        except OSError as exc:
            raise TierError(f"cannot read {path} at offset {offset}: {exc.strerror or exc}") from exc
        self.bytes_read += len(view)
        if not direct:
            _drop(fd, offset, len(view))

    def _check_aligned(self, path: Path, offset: int, buffer: torch.Tensor) -> None:
        nbytes = buffer.numel() * buffer.element_size()
        if (offset | nbytes | buffer.data_ptr()) % self.alignment:
            raise TierError(
                f"unaligned O_DIRECT range of {path}: offset {offset}, {nbytes} bytes, buffer address "
                f"{buffer.data_ptr():#x} must all be multiples of {self.alignment}"
            )

    async def remove(self, path: Path) -> None:
        """Close and delete one scratch file (its data is no longer needed)."""
        self._check_open()
        await self._run_job(lambda: self._remove(path))

    def _remove(self, path: Path) -> None:
        with self._lock:
            entry = self._files.pop(path, None)
        if entry is None:
            raise TierError(f"{path} is not a scratch file of this run")
        os.close(entry[0])
        try:
            path.unlink()
        except OSError as exc:
            raise TierError(f"cannot remove {path}: {exc.strerror or exc}") from exc

    def _entry(self, path: Path) -> tuple[int, bool]:
        with self._lock:
            entry = self._files.get(path)
        if entry is None:
            raise TierError(f"{path} is not a scratch file of this run")
        return entry

    def _release(self) -> None:
        with self._lock:
            for fd, _ in self._files.values():
                try:
                    os.close(fd)
                except OSError as exc:
                    logger.warning("closing a scratch file failed: %s", exc)
            self._files.clear()
        self._cleanup()  # the directory and every file in it


def _make_run_directory(parent: Path) -> tuple[Path, bool]:
    """A new directory for the run under ``parent``, and whether ``parent`` was made for it (then it
    goes with the run's directory, when no other run uses it). Another run removing ``parent`` between
    its creation and ours is tried once more."""
    made_parent = False
    for attempt in range(2):
        made_parent = made_parent or not parent.is_dir()
        parent.mkdir(parents=True, exist_ok=True)
        try:
            return Path(tempfile.mkdtemp(prefix="klotski-kv-", dir=parent)), made_parent
        except FileNotFoundError:
            if attempt:
                raise
        except OSError:
            _remove_empty(parent if made_parent else None)
            raise
    raise AssertionError("unreachable")


def _remove_run_directory(directory: Path, made_parent: bool) -> None:
    """The run's directory with every file in it, and its parent if the run made it and it is empty."""
    shutil.rmtree(directory, ignore_errors=True)
    _remove_empty(directory.parent if made_parent else None)


def _remove_empty(directory: Path | None) -> None:
    if directory is not None:
        with contextlib.suppress(OSError):  # not empty: another run's directory is in it
            directory.rmdir()


def _bytes(tensor: torch.Tensor) -> memoryview:
    assert tensor.device.type == "cpu" and tensor.is_contiguous(), "scratch I/O needs a contiguous CPU tensor"
    return tensor.view(torch.uint8).reshape(-1).numpy().data


def _drop(fd: int, offset: int, nbytes: int) -> None:
    with contextlib.suppress(OSError):  # advice refused: the pages cost memory, not correctness
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
