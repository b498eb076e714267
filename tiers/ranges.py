"""What a disk read asks for: byte ranges of files and where they land in a buffer.

Drivers know file ranges and buffers, not models. Any object with these four attributes is a
:class:`FileRange` (the model layer's tensor pieces are); :class:`ByteRange` is the plain one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class FileRange(Protocol):
    """``nbytes`` bytes at ``file_offset`` of ``path`` go to ``buffer_offset`` of a destination buffer."""

    @property
    def path(self) -> Path: ...

    @property
    def file_offset(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def buffer_offset(self) -> int: ...


@dataclass(frozen=True)
class ByteRange:
    """A :class:`FileRange` and nothing more."""

    path: Path
    file_offset: int
    nbytes: int
    buffer_offset: int
