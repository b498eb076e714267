"""How much of a file the kernel's page cache holds, measured with ``mincore(2)``; and evicting it.

Page cache is memory: a model streamed from disk that stays cached is held by the process as
surely as a host buffer, only invisibly. These helpers make that visible (for tests and
benchmarks) and undo it::

    evict(path)                      # fsync, then drop every cached page of the file
    cached_fraction(path)            # 0.0 .. 1.0 of the file's pages are in the page cache
    cached_bytes(path)               # the same in bytes (whole pages, capped at the file size)

The file is mapped (``PROT_READ``, shared, never touched, so nothing is faulted in) window by
window, and ``mincore`` reports, per page, whether the page cache holds it. Linux answers
truthfully only for files the caller owns or may write (else it claims every page is cached,
to avoid leaking another user's access pattern); such files are refused with a clear error.
Linux only: elsewhere every call raises :class:`~klotski_tier.core.errors.ConfigError`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
from functools import cache
from pathlib import Path

import numpy as np

from klotski_tier.core.errors import ConfigError, TierError

logger = logging.getLogger(__name__)

PAGE_BYTES = mmap.PAGESIZE
"""The kernel's page size: the unit of the page cache and of ``mincore``."""

WINDOW_BYTES = 1 << 30
"""Mapped and probed at once (1 GiB): bounds the ``mincore`` vector to 256 Ki entries of 1 byte."""

_RESIDENT_BIT = 0x1  # mincore: the low bit of each vector byte says "page is resident"
_MAP_FAILED = ctypes.c_void_p(-1).value


@cache
def _libc() -> ctypes.CDLL:
    """The C library with ``mmap``, ``munmap`` and ``mincore`` typed; loaded once."""
    name = ctypes.util.find_library("c")
    if name is None or not hasattr(os, "posix_fadvise"):
        raise ConfigError("page-cache measurement needs Linux (mincore, posix_fadvise); run it on Linux")
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
    ]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def cached_bytes(path: Path) -> int:
    """Bytes of ``path`` held in the page cache now (whole pages; the last one counts up to EOF)."""
    _check_truthful(path)
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        windows = range(0, size, WINDOW_BYTES)
        pages = sum(_resident_pages(fd, start, min(WINDOW_BYTES, size - start)) for start in windows)
    finally:
        os.close(fd)
    return min(pages * PAGE_BYTES, size)


def cached_fraction(path: Path) -> float:
    """The share of ``path``'s bytes in the page cache, 0.0 to 1.0 (0.0 for an empty file)."""
    size = _size(path)
    return cached_bytes(path) / size if size else 0.0


def evict(path: Path) -> None:
    """Write back ``path``'s dirty pages, then drop every cached page of it (benchmarks, tests).

    Pages another process has mapped or locked stay; ``cached_fraction`` tells what is left.
    """
    fd = _open(path)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped; write them first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # length 0: to the end of the file
    except OSError as exc:
        raise TierError(f"cannot evict {path} from the page cache: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _resident_pages(fd: int, offset: int, length: int) -> int:
    """Pages of ``[offset, offset + length)`` (``offset`` page-aligned) the page cache holds."""
    libc = _libc()
    address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if address in (None, _MAP_FAILED):
        raise _os_error("mmap", ctypes.get_errno())
    try:
        vector = np.zeros((length + PAGE_BYTES - 1) // PAGE_BYTES, dtype=np.uint8)  # [pages]
        if libc.mincore(address, length, vector.ctypes.data_as(ctypes.POINTER(ctypes.c_ubyte))) != 0:
            raise _os_error("mincore", ctypes.get_errno())
        return int(np.count_nonzero(vector & _RESIDENT_BIT))
    finally:
        libc.munmap(address, length)


def _check_truthful(path: Path) -> None:
    """Refuse files for which Linux's ``mincore`` reports every page as cached, whatever the truth."""
    stat = _stat(path)
    if os.geteuid() in (0, stat.st_uid) or os.access(path, os.W_OK):
        return
    raise ConfigError(
        f"cannot measure the page cache of {path}: mincore only reports files you own or may write; "
        "run as the file's owner"
    )


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TierError(f"cannot open {path} to inspect its page cache: {exc.strerror or exc}") from exc


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise TierError(f"cannot stat {path} to inspect its page cache: {exc.strerror or exc}") from exc


def _size(path: Path) -> int:
    return _stat(path).st_size


def _os_error(call: str, errno_value: int) -> TierError:
    return TierError(f"{call} failed while measuring the page cache: {os.strerror(errno_value)}")
