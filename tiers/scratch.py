"""The scratch tier: byte ranges of files the run writes and reads back (a KV cache on the drive).

A :class:`ScratchDriver` owns one directory made for the run (``mkdtemp`` under the directory it is
given) and the files it creates there. It writes a CPU tensor's bytes at an offset of a file and
reads a range back into a CPU tensor, in its own thread; it decides nothing about what the bytes are.
``aclose`` (and, should the process end without it, a finalizer) removes the directory with every
file in it: nothing the run wrote stays on the drive, also after Ctrl-C or an error.

Reads and writes go through the page cache (buffered): a KV cache's new entries are a few KiB at
an offset no drive block aligns, which O_DIRECT could only write by reading and rewriting whole
blocks. Each range is dropped from the page cache once written back or read
(``POSIX_FADV_DONTNEED``, best effort: pages not yet on the drive stay until the kernel writes them).
"""

from __future__ import annotations

import contextlib
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

logger = logging.getLogger(__name__)

SCRATCH_THREADS = 1  # one file range at a time: the ranges are small and the drive serializes them


class ScratchDriver(TierDriver):
    """Creates files in a run's own directory under ``parent``; writes and reads their byte ranges."""

    name = "scratch"

    def __init__(self, parent: Path) -> None:
        super().__init__(max_workers=SCRATCH_THREADS)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix="klotski-kv-", dir=parent))
        except OSError as exc:
            raise TierError(f"cannot make a scratch directory in {parent}: {exc.strerror or exc}") from exc
        self._files: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)
        self.bytes_written = 0
        self.bytes_read = 0

    async def create(self, name: str, nbytes: int) -> Path:
        """A new file of ``nbytes`` (sparse) named ``name`` in the run's directory."""
        self._check_open()
        path = self.directory / name
        return await self._run_job(lambda: self._create(path, nbytes))

    def _create(self, path: Path, nbytes: int) -> Path:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, nbytes)
        except OSError as exc:
            raise TierError(f"cannot create {path}: {exc.strerror or exc}; free space on the drive") from exc
        with self._lock:
            self._files[path] = fd
        return path

    async def write(self, path: Path, offset: int, src: torch.Tensor) -> None:
        """Write the bytes of the contiguous CPU tensor ``src`` at ``offset`` of ``path``."""
        self._check_open()
        await self._run_job(lambda: self._write(path, offset, src))

    def _write(self, path: Path, offset: int, src: torch.Tensor) -> None:
        view = _bytes(src)
        fd = self._fd(path)
        done = 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            raise TierError(f"cannot write {path} at offset {offset}: {exc.strerror or exc}") from exc
        self.bytes_written += len(view)
        _drop(fd, offset, len(view))

    async def read(self, path: Path, offset: int, dst: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor ``dst`` with the bytes at ``offset`` of ``path``."""
        self._check_open()
        await self._run_job(lambda: self._read(path, offset, dst))

    def _read(self, path: Path, offset: int, dst: torch.Tensor) -> None:
        view = _bytes(dst)
        fd = self._fd(path)
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
        _drop(fd, offset, len(view))

    async def remove(self, path: Path) -> None:
        """Close and delete one scratch file (its data is no longer needed)."""
        self._check_open()
        await self._run_job(lambda: self._remove(path))

    def _remove(self, path: Path) -> None:
        with self._lock:
            fd = self._files.pop(path, None)
        if fd is None:
            raise TierError(f"{path} is not a scratch file of this run")
        os.close(fd)
        try:
            path.unlink()
        except OSError as exc:
            raise TierError(f"cannot remove {path}: {exc.strerror or exc}") from exc

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._files.get(path)
        if fd is None:
            raise TierError(f"{path} is not a scratch file of this run")
        return fd

    def _release(self) -> None:
        with self._lock:
            for fd in self._files.values():
                try:
                    os.close(fd)
                except OSError as exc:
                    logger.warning("closing a scratch file failed: %s", exc)
            self._files.clear()
        self._cleanup()  # the directory and every file in it


def _bytes(tensor: torch.Tensor) -> memoryview:
    assert tensor.device.type == "cpu" and tensor.is_contiguous(), "scratch I/O needs a contiguous CPU tensor"
    return tensor.view(torch.uint8).reshape(-1).numpy().data


def _drop(fd: int, offset: int, nbytes: int) -> None:
    with contextlib.suppress(OSError):  # advice refused: the pages cost memory, not correctness
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
