"""Every file klotski-tier reads, read with bounds: the one place that decides what may be read.

A reader names the *kind* of file it reads (:class:`FileKind`: what it is called in messages, the
largest size it may have, the error it raises and what the user should do) and calls one of
:func:`read_bytes`, :func:`read_text`, :func:`read_json`, :func:`read_toml`, :func:`read_npz` or,
for a file another library opens, :func:`check_file`. The rules, held here and nowhere else:

- only a regular file is read: a FIFO (which would block), a device (``/dev/zero`` never ends), a
  directory or a socket is refused by name, before it is opened; the file is opened non-blocking
  and checked again on the open descriptor, so a path swapped in between is refused too;
- a file is at most ``kind.max_bytes`` long, the limit in the message; the read itself is capped,
  so a file that grows while it is read cannot pass;
- text is UTF-8, and a file that is not says which file it is and what to do;
- JSON nests at most :data:`MAX_JSON_DEPTH` levels, checked by a scan before the parser recurses
  (a TOML parser's recursion error is turned into the same one-line error);
- an ``.npz`` archive's arrays are checked from their headers (count, dtype, declared bytes)
  before any array is allocated.

Every failure is one ``kind.error`` (a :class:`~klotski_tier.core.errors.KlotskiError`), one line.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

import numpy as np

from klotski_tier.core.errors import KlotskiError
from klotski_tier.core.units import format_size

MAX_JSON_DEPTH = 64
"""Nesting levels a JSON document may have: every file we read needs fewer than ten."""
MAX_NPZ_ARRAYS = 64  # arrays an .npz archive may hold: ours hold three
_NPY_SUFFIX = ".npy"
_DEPTH_CHUNK_BYTES = 16 * 1024 * 1024  # the depth scan works through a document in pieces this long
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block open


@dataclass(frozen=True)
class FileKind:
    """A kind of file the tool reads: its name in messages, its size limit, its error and a hint."""

    what: str  # "store manifest", "machine profile" ...: the start of every message
    max_bytes: int
    error: type[KlotskiError]
    hint: str  # what the user should do, ending every message: "pack the model again ..."

    def fail(self, path: Path, problem: str) -> KlotskiError:
        """``kind.error("<what> <path> <problem>; <hint>")``."""
        return self.error(f"{self.what} {path} {problem}; {self.hint}")

    def unreadable(self, path: Path, reason: str) -> KlotskiError:
        """``kind.error("cannot read <what> <path>: <reason>; <hint>")``."""
        return self.error(f"cannot read {self.what} {path}: {reason}; {self.hint}")


def check_file(path: Path, kind: FileKind) -> int:
    """The size of ``path``, refused unless it is a regular file of at most ``kind.max_bytes``."""
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise kind.unreadable(path, "it does not exist") from exc
    except OSError as exc:
        raise kind.unreadable(path, str(exc.strerror or exc)) from exc
    _check_stat(path, info, kind)
    return info.st_size


def open_binary(path: Path, kind: FileKind) -> BinaryIO:
    """``path`` opened for reading after :func:`check_file`, checked again on the open descriptor."""
    check_file(path, kind)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise kind.unreadable(path, str(exc.strerror or exc)) from exc
    try:
        _check_stat(path, os.fstat(fd), kind)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bytes(path: Path, kind: FileKind) -> bytes:
    """All of ``path``: a regular file of at most ``kind.max_bytes``."""
    with open_binary(path, kind) as handle:
        try:
            data = handle.read(kind.max_bytes + 1)
        except OSError as exc:
            raise kind.unreadable(path, str(exc.strerror or exc)) from exc
    if len(data) > kind.max_bytes:
        limit = format_size(kind.max_bytes)
        raise kind.fail(path, f"grew past the {limit} limit of a {kind.what} while it was read")
    return data


def read_text(path: Path, kind: FileKind, *, encoding: str = "utf-8") -> str:
    """``path`` decoded as ``encoding`` (``utf-8-sig`` drops a leading byte-order mark)."""
    return decode_text(read_bytes(path, kind), path, kind, encoding=encoding)


def decode_text(data: bytes, path: Path, kind: FileKind, *, encoding: str = "utf-8") -> str:
    """``data`` read from ``path`` as text; a byte that is not UTF-8 is a one-line error."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise kind.fail(path, f"is not UTF-8 text (invalid byte at offset {exc.start})") from exc


def read_json(path: Path, kind: FileKind) -> Any:
    """The JSON document in ``path``, nested at most :data:`MAX_JSON_DEPTH` deep."""
    return parse_json(read_bytes(path, kind), path, kind)


def parse_json(data: bytes | str, path: Path, kind: FileKind) -> Any:
    """``data`` (read from ``path``) parsed as JSON, its depth checked before the parser recurses."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise kind.fail(path, f"nests JSON {depth} levels deep, more than the {MAX_JSON_DEPTH} allowed")
    text = data if isinstance(data, str) else decode_text(data, path, kind)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise kind.fail(path, f"is not valid JSON ({exc.msg}, line {exc.lineno})") from exc
    except RecursionError as exc:  # cannot happen below MAX_JSON_DEPTH; kept so it is never a traceback
        raise kind.fail(path, "nests JSON too deep") from exc


def json_depth(data: bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in the JSON text ``data``, strings skipped."""
    codes = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)  # [nbytes]
    level = peak = 0
    for start in range(0, codes.size, _DEPTH_CHUNK_BYTES):
        chunk = codes[start : start + _DEPTH_CHUNK_BYTES]
        steps = np.isin(chunk, (ord("["), ord("{"))).astype(np.int64) - np.isin(chunk, (ord("]"), ord("}")))
        levels = np.cumsum(steps) + level  # [chunk bytes]: the depth after each byte
        peak, level = max(peak, int(levels.max())), int(levels[-1])
    return peak


def read_toml(path: Path, kind: FileKind) -> dict[str, Any]:
    """The TOML document in ``path``; a parse error, or nesting the parser cannot follow, is one line."""
    text = read_text(path, kind, encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not TOML
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise kind.fail(path, f"is not valid TOML ({exc})") from exc
    except RecursionError as exc:
        raise kind.fail(path, "nests TOML arrays or tables too deep") from exc


def read_npz(path: Path, kind: FileKind, *, max_array_bytes: int) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` archive ``path``, each header checked before it is allocated.

    An array whose header declares more than ``max_array_bytes``, or an object dtype, is refused;
    so is an archive of more than :data:`MAX_NPZ_ARRAYS` members or anything that is not an npz.
    """
    data = read_bytes(path, kind)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = _checked_members(archive, path, kind, max_array_bytes)
            return {name.removesuffix(_NPY_SUFFIX): _load_member(archive, name) for name in names}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as exc:
        raise kind.fail(path, f"is not a readable .npz archive ({' '.join(str(exc).split())})") from exc


def _checked_members(archive: zipfile.ZipFile, path: Path, kind: FileKind, max_array_bytes: int) -> list[str]:
    members = archive.namelist()
    if len(members) > MAX_NPZ_ARRAYS or not all(name.endswith(_NPY_SUFFIX) for name in members):
        raise kind.fail(path, f"holds {len(members)} members, not up to {MAX_NPZ_ARRAYS} .npy arrays")
    for member in members:
        with archive.open(member) as handle:
            shape, dtype = _npy_header(handle)
        name, declared = member[: -len(_NPY_SUFFIX)], int(np.prod(shape, dtype=object)) * dtype.itemsize
        if dtype.hasobject:
            raise kind.fail(
                path,
                f"declares array {name} {list(shape)} with dtype {dtype} (Python objects, never unpickled); "
                "expected integers, floats or text",
            )
        if declared > max_array_bytes:
            raise kind.fail(
                path,
                f"declares array {name} as {dtype} {list(shape)} "
                f"({format_size(declared)}), over the {format_size(max_array_bytes)} an array may hold",
            )
    return members


def _npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype[Any]]:
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise ValueError(f"npy format version {version} is not supported")
    return tuple(shape), dtype


def _load_member(archive: zipfile.ZipFile, member: str) -> np.ndarray:
    with archive.open(member) as handle:
        array: np.ndarray = np.lib.format.read_array(handle, allow_pickle=False)
    return array


def _check_stat(path: Path, info: os.stat_result, kind: FileKind) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise kind.fail(path, f"is {_file_type(info.st_mode)}, not a regular file")
    if info.st_size > kind.max_bytes:
        limit = format_size(kind.max_bytes)
        raise kind.fail(path, f"is {format_size(info.st_size)}, over the {limit} limit of a {kind.what}")


def _file_type(mode: int) -> str:
    """What a non-regular file is, for a message."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"
