"""Byte codecs and checksums of packed stores: none, zstd[:LEVEL], and a byte-shuffle filter.

A block's bytes are stored either as they are (``none``) or zstd-compressed (``zstd``). For
16-bit floats the compressor first sees the bytes *shuffled*: every element's high byte, then
every element's low byte (:func:`shuffle_bytes`). The high byte of a bf16 weight holds the sign
and most of the exponent, which takes few values in a trained (or Gaussian) matrix, so apart
from the noisy mantissa bytes it compresses well; interleaved, zstd sees mostly noise.

Checksums are xxHash XXH3-64 (``"xxh3_64:<16 hex digits>"``): the python ``xxhash`` binding is
well kept, releases the GIL (since 3.0), and hashes at memory speed, several times faster than
``zlib.crc32``. ``"crc32:<8 hex digits>"`` is also understood, so a store written by another tool
that lacks xxhash still verifies. zstandard's one-shot ``compress`` and ``decompress`` release
the GIL too, so :func:`decode` can run in a tier's thread pool in parallel with the event loop
and with other decodes.
"""

from __future__ import annotations

import enum
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from klotski_tier.core.errors import ConfigError

ZSTD_MIN_LEVEL = 1
ZSTD_MAX_LEVEL: int = zstandard.MAX_COMPRESSION_LEVEL  # 22
# Level 1, not zstd's default 3: on Gaussian bf16 weights (shuffled, 5 MiB blocks) level 1 measured
# here stores 68% of the bytes and decompresses at 1.6 GB/s, level 3 71% at 1.0 GB/s; higher levels
# find only spurious matches in the noisy mantissa bytes.
ZSTD_DEFAULT_LEVEL = 1
SHUFFLE_ITEM_BYTES = 2  # the filter is applied to blocks of 16-bit elements (bf16, fp16)
DEFAULT_CHECKSUM = "xxh3_64"
_UNKNOWN_CONTENT_SIZE = -1  # zstandard.frame_content_size of a frame that does not declare its size

Bytes = npt.NDArray[np.uint8]  # a flat, contiguous uint8 array: [nbytes]


class CodecName(enum.StrEnum):
    NONE = "none"
    ZSTD = "zstd"


@dataclass(frozen=True)
class Codec:
    """How to store blocks: ``zstd`` at ``level`` (shuffling 16-bit blocks when ``shuffle``), or as is."""

    name: CodecName = CodecName.NONE
    level: int = 0  # zstd level; 0 for none
    shuffle: bool = True

    def __str__(self) -> str:
        return f"{self.name}:{self.level}" if self.name is CodecName.ZSTD else str(self.name)


def parse_codec(text: str) -> Codec:
    """``"none"``, ``"zstd"`` or ``"zstd:LEVEL"`` (LEVEL 1 to 22) as a :class:`Codec`."""
    name, colon, level_text = text.strip().lower().partition(":")
    if name == CodecName.NONE and not colon:
        return Codec()
    if name != CodecName.ZSTD:
        raise ConfigError(f"unknown codec {text!r}; use none, zstd or zstd:LEVEL")
    if not colon:
        return Codec(CodecName.ZSTD, ZSTD_DEFAULT_LEVEL)
    if (
        not (level_text.isascii() and level_text.isdigit())
        or not ZSTD_MIN_LEVEL <= int(level_text) <= ZSTD_MAX_LEVEL
    ):
        raise ConfigError(
            f"zstd level {level_text!r} in {text!r} is out of range; use a level from "
            f"{ZSTD_MIN_LEVEL} to {ZSTD_MAX_LEVEL}"
        )
    return Codec(CodecName.ZSTD, int(level_text))


@dataclass(frozen=True)
class Encoded:
    """A block's bytes as stored, and how to get the raw bytes back."""

    data: Bytes  # [stored_bytes] uint8
    codec: CodecName
    level: int
    shuffle: bool


def encode(raw: Bytes, codec: Codec, item_bytes: int) -> Encoded:
    """``raw`` stored with ``codec``; raw again when compression would not make it smaller.

    ``item_bytes`` is the element size of the block's tensors (the shuffle filter needs 2).
    """
    if codec.name is CodecName.NONE:
        return Encoded(raw, CodecName.NONE, 0, shuffle=False)
    shuffle = codec.shuffle and item_bytes == SHUFFLE_ITEM_BYTES
    source = shuffle_bytes(raw, SHUFFLE_ITEM_BYTES) if shuffle else raw
    compressed = _compressor(codec.level).compress(source.data)
    if len(compressed) >= raw.nbytes:
        return Encoded(raw, CodecName.NONE, 0, shuffle=False)
    return Encoded(np.frombuffer(compressed, dtype=np.uint8), CodecName.ZSTD, codec.level, shuffle)


def decode(stored: Bytes, codec: CodecName, shuffle: bool, out: Bytes) -> None:
    """Write the raw bytes of ``stored`` into ``out`` (exactly as long); ``ValueError`` if they do not fit."""
    if codec is CodecName.NONE:
        if stored.nbytes != out.nbytes:
            raise ValueError(f"holds {stored.nbytes} bytes where {out.nbytes} are expected")
        if stored.ctypes.data != out.ctypes.data:  # already in place when read straight into ``out``
            out[:] = stored
        return
    raw = _inflate(stored, out.nbytes)
    if len(raw) != out.nbytes:
        raise ValueError(f"decompresses to {len(raw)} bytes where {out.nbytes} are expected")
    planes = np.frombuffer(raw, dtype=np.uint8)
    if shuffle:
        unshuffle_bytes(planes, SHUFFLE_ITEM_BYTES, out)
    else:
        out[:] = planes


def _inflate(stored: Bytes, nbytes: int) -> bytes:
    """The zstd frame ``stored`` decompressed into at most ``nbytes``: never more is allocated.

    zstandard sizes its output by the size a frame declares, whatever ``max_output_size`` says, so
    a declared size other than ``nbytes`` is refused before decompressing; a frame that declares
    none is decompressed into ``nbytes`` at most, and one that would inflate past it is refused.
    """
    try:
        declared = zstandard.frame_content_size(stored.data)  # -1: the frame does not say
    except zstandard.ZstdError as exc:
        raise ValueError(f"is not a valid zstd frame ({exc})") from exc
    if declared not in (_UNKNOWN_CONTENT_SIZE, nbytes):
        raise ValueError(f"declares {declared} decompressed bytes where {nbytes} are expected")
    try:
        return _decompressor().decompress(stored.data, max_output_size=nbytes)
    except zstandard.ZstdError as exc:
        raise ValueError(f"does not decompress to {nbytes} bytes ({exc})") from exc


def shuffle_bytes(raw: Bytes, item_bytes: int) -> Bytes:
    """Byte planes of little-endian ``item_bytes`` elements, most significant byte's plane first."""
    assert raw.nbytes % item_bytes == 0, f"{raw.nbytes} bytes are not whole {item_bytes}-byte elements"
    elements = raw.reshape(-1, item_bytes)  # [N, item_bytes], least significant byte first
    planes = np.empty((item_bytes, elements.shape[0]), dtype=np.uint8)  # [item_bytes, N]
    for plane in range(item_bytes):  # one strided copy per plane: far faster than a transposed copy
        planes[plane] = elements[:, item_bytes - 1 - plane]
    return planes.reshape(-1)  # [item_bytes * N]


def unshuffle_bytes(planes: Bytes, item_bytes: int, out: Bytes) -> None:
    """The inverse of :func:`shuffle_bytes`, written into ``out`` (as long as ``planes``)."""
    assert planes.nbytes == out.nbytes, f"{planes.nbytes} shuffled bytes for a {out.nbytes}-byte buffer"
    by_plane = planes.reshape(item_bytes, -1)  # [item_bytes, N], most significant byte first
    if item_bytes == 2:  # the hot path (bf16, fp16): two vector passes, ~4.6 GB/s here
        words = out.view("<u2")  # [N]
        np.left_shift(by_plane[0], 8, out=words, dtype=np.uint16)
        np.bitwise_or(words, by_plane[1], out=words)
        return
    elements = out.reshape(-1, item_bytes)  # [N, item_bytes]
    for plane in range(item_bytes):
        elements[:, item_bytes - 1 - plane] = by_plane[plane]


# --- checksums ------------------------------------------------------------------------------

_CHECKSUMS: Mapping[str, Callable[[Bytes], str]] = {
    "xxh3_64": lambda data: xxhash.xxh3_64_hexdigest(data.data),
    "crc32": lambda data: f"{zlib.crc32(data.data) & 0xFFFFFFFF:08x}",
}


def checksum(data: Bytes, algorithm: str = DEFAULT_CHECKSUM) -> str:
    """``"<algorithm>:<hex digest>"`` of ``data``."""
    return f"{algorithm}:{_CHECKSUMS[algorithm](data)}"


def checksum_matches(data: Bytes, expected: str) -> bool:
    """Whether ``data`` has the checksum ``expected`` (``"<algorithm>:<hex>"``)."""
    algorithm, _, _ = expected.partition(":")
    return checksum(data, algorithm) == expected


def is_known_checksum(text: str) -> bool:
    """Whether ``text`` is ``"<algorithm>:<hex>"`` with an algorithm this module computes."""
    algorithm, sep, digest = text.partition(":")
    return bool(sep and digest) and algorithm in _CHECKSUMS and all(c in "0123456789abcdef" for c in digest)


# --- zstd contexts: one per thread, as they must not be shared between threads ---------------

_contexts = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    by_level: dict[int, zstandard.ZstdCompressor] | None = getattr(_contexts, "compressors", None)
    if by_level is None:
        by_level = _contexts.compressors = {}
    if level not in by_level:
        by_level[level] = zstandard.ZstdCompressor(level=level)
    return by_level[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    found: zstandard.ZstdDecompressor | None = getattr(_contexts, "decompressor", None)
    if found is None:
        found = _contexts.decompressor = zstandard.ZstdDecompressor()
    return found
