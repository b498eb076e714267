"""Codecs of packed stores: parsing ``--compress``, the byte-shuffle filter, zstd round trips, checksums."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.store import codec as codecs
from klotski_tier.core.store.codec import Codec, CodecName

SEED = 7
BLOCK_BYTES = 64 * 1024  # a small block: [32768] 16-bit elements


def _bf16_like(count: int) -> np.ndarray:
    """Gaussian weights as bf16 bytes: float32 with the low half dropped (the bf16 bits), [2 * count]."""
    weights = np.random.default_rng(SEED).normal(0.0, 0.05, count).astype(np.float32)  # [count]
    high_halves = (weights.view(np.uint32) >> 16).astype(np.uint16)  # [count] bf16 bit patterns
    return high_halves.view(np.uint8)  # [2 * count] little endian


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", Codec()),
        ("zstd", Codec(CodecName.ZSTD, codecs.ZSTD_DEFAULT_LEVEL)),
        ("zstd:1", Codec(CodecName.ZSTD, 1)),
        ("ZSTD:22", Codec(CodecName.ZSTD, 22)),
    ],
)
def test_parse_codec(text: str, expected: Codec) -> None:
    assert codecs.parse_codec(text) == expected


@pytest.mark.parametrize("text", ["zstd:0", "zstd:99", "zstd:-1", "zstd:x", "zstd:"])
def test_parse_codec_names_the_valid_levels(text: str) -> None:
    with pytest.raises(ConfigError, match="from 1 to 22"):
        codecs.parse_codec(text)


@pytest.mark.parametrize("text", ["lz4", "none:3", "gzip:1", ""])
def test_parse_codec_rejects_unknown_codecs(text: str) -> None:
    with pytest.raises(ConfigError, match="use none, zstd or zstd:LEVEL"):
        codecs.parse_codec(text)


@given(st.integers(codecs.ZSTD_MIN_LEVEL, codecs.ZSTD_MAX_LEVEL))
def test_codec_prints_as_it_parses(level: int) -> None:
    codec = Codec(CodecName.ZSTD, level)
    assert codecs.parse_codec(str(codec)) == codec


def test_shuffle_puts_all_high_bytes_first() -> None:
    raw = np.array([0x0102, 0x0304, 0x0506], dtype="<u2").view(np.uint8)  # bytes 02 01 04 03 06 05
    shuffled = codecs.shuffle_bytes(raw, 2)
    assert shuffled.tolist() == [0x01, 0x03, 0x05, 0x02, 0x04, 0x06]


@given(st.sampled_from([1, 2, 4, 8]), st.data())
def test_shuffle_round_trip(item_bytes: int, data: st.DataObject) -> None:
    count = data.draw(st.integers(0, 64))
    raw = np.frombuffer(
        data.draw(st.binary(min_size=count * item_bytes, max_size=count * item_bytes)), np.uint8
    )
    out = np.full(raw.nbytes, 0xAA, dtype=np.uint8)
    codecs.unshuffle_bytes(codecs.shuffle_bytes(raw, item_bytes), item_bytes, out)
    assert out.tobytes() == raw.tobytes()


@settings(max_examples=50)
@given(
    st.binary(max_size=4096).filter(lambda b: len(b) % 2 == 0),
    st.sampled_from(["none", "zstd:1", "zstd:3", "zstd:9"]),
    st.booleans(),
    st.sampled_from([1, 2, 4]),
)
def test_encode_decode_round_trip(payload: bytes, codec_text: str, shuffle: bool, item_bytes: int) -> None:
    codec = codecs.parse_codec(codec_text)
    codec = Codec(codec.name, codec.level, shuffle)
    raw = np.frombuffer(payload, dtype=np.uint8)
    encoded = codecs.encode(raw, codec, item_bytes)
    assert encoded.data.nbytes <= raw.nbytes  # never larger than raw: stored raw instead
    assert encoded.shuffle == (encoded.codec is CodecName.ZSTD and shuffle and item_bytes == 2)
    out = np.empty(raw.nbytes, dtype=np.uint8)
    codecs.decode(encoded.data, encoded.codec, encoded.shuffle, out)
    assert out.tobytes() == payload


def test_incompressible_blocks_are_stored_raw() -> None:
    raw = np.random.default_rng(SEED).integers(0, 256, BLOCK_BYTES, dtype=np.uint8)
    encoded = codecs.encode(raw, codecs.parse_codec("zstd:3"), 1)
    assert encoded.codec is CodecName.NONE and encoded.level == 0 and not encoded.shuffle
    assert encoded.data.tobytes() == raw.tobytes()


def test_shuffle_makes_bf16_weights_smaller() -> None:
    raw = _bf16_like(BLOCK_BYTES // 2)
    shuffled = codecs.encode(raw, Codec(CodecName.ZSTD, 3, shuffle=True), 2)
    plain = codecs.encode(raw, Codec(CodecName.ZSTD, 3, shuffle=False), 2)
    assert shuffled.shuffle and not plain.shuffle
    assert shuffled.data.nbytes < plain.data.nbytes < raw.nbytes


def test_decode_rejects_corrupt_frames_and_wrong_sizes() -> None:
    raw = np.zeros(BLOCK_BYTES, dtype=np.uint8)
    encoded = codecs.encode(raw, codecs.parse_codec("zstd"), 2)
    declared = f"declares {BLOCK_BYTES} decompressed bytes where {BLOCK_BYTES // 2}"
    with pytest.raises(ValueError, match=declared):
        codecs.decode(encoded.data, CodecName.ZSTD, True, np.empty(BLOCK_BYTES // 2, dtype=np.uint8))
    garbage = encoded.data.copy()
    garbage[:4] = 0  # destroys the zstd magic number
    with pytest.raises(ValueError, match="not a valid zstd frame"):
        codecs.decode(garbage, CodecName.ZSTD, True, np.empty(BLOCK_BYTES, dtype=np.uint8))
    with pytest.raises(ValueError, match="holds 8 bytes"):
        codecs.decode(raw[:8], CodecName.NONE, False, np.empty(16, dtype=np.uint8))


def test_a_frame_declaring_a_huge_size_is_refused_before_decompressing() -> None:
    """A frame header claiming 40 GiB must not make zstandard allocate 40 GiB."""
    frame = zstandard.ZstdCompressor().compress(bytes(BLOCK_BYTES))
    params = zstandard.get_frame_parameters(frame)
    assert params.content_size == BLOCK_BYTES
    huge = _with_content_size(frame, 40 * 1024**3)
    assert zstandard.frame_content_size(huge) == 40 * 1024**3
    with pytest.raises(ValueError, match=f"declares {40 * 1024**3} decompressed bytes where {BLOCK_BYTES}"):
        codecs.decode(np.frombuffer(huge, np.uint8), CodecName.ZSTD, False, np.empty(BLOCK_BYTES, np.uint8))


def test_a_frame_inflating_past_its_block_is_refused() -> None:
    """A valid frame without a declared size that inflates to 1 GiB stops at the block's size."""
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1024**3))
    assert len(bomb) < BLOCK_BYTES  # a few KiB of stored bytes
    out = np.empty(BLOCK_BYTES, dtype=np.uint8)
    with pytest.raises(ValueError, match=f"does not decompress to {BLOCK_BYTES} bytes"):
        codecs.decode(np.frombuffer(bomb, np.uint8), CodecName.ZSTD, False, out)
    short = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(BLOCK_BYTES // 2))
    with pytest.raises(ValueError, match=f"decompresses to {BLOCK_BYTES // 2} bytes where {BLOCK_BYTES}"):
        codecs.decode(np.frombuffer(short, np.uint8), CodecName.ZSTD, False, out)


def _with_content_size(frame: bytes, content_size: int) -> bytes:
    """``frame`` with its header's 8-byte frame content size field set to ``content_size``.

    Header: 4-byte magic, a descriptor byte (bits 7-6: size field flag, 3 = 8 bytes; bit 5: single
    segment, no window byte), [window byte], [dictionary id], then the content size.
    """
    descriptor = frame[4]
    assert descriptor >> 6 == 0 or descriptor & 0x20, "this helper handles single-segment frames"
    size_bytes = {0: 1, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    dict_bytes = {0: 0, 1: 1, 2: 2, 3: 4}[descriptor & 0x3]
    start = 5 + dict_bytes
    new_descriptor = (descriptor & 0x3F) | (3 << 6) | 0x20
    return (
        frame[:4]
        + bytes([new_descriptor])
        + frame[5:start]
        + content_size.to_bytes(8, "little")
        + frame[start + size_bytes :]
    )


def test_decode_from_many_threads() -> None:
    """Each thread uses its own zstd context: concurrent decodes all come out right."""
    blocks = [_bf16_like(4096 + 512 * i) for i in range(8)]
    codec = codecs.parse_codec("zstd:3")
    encoded = [codecs.encode(raw, codec, 2) for raw in blocks]

    def decode(index: int) -> bytes:
        out = np.empty(blocks[index].nbytes, dtype=np.uint8)
        codecs.decode(encoded[index].data, encoded[index].codec, encoded[index].shuffle, out)
        return out.tobytes()

    with ThreadPoolExecutor(max_workers=4) as pool:
        decoded = list(pool.map(decode, [i % 8 for i in range(32)]))
    assert decoded == [blocks[i % 8].tobytes() for i in range(32)]


def test_checksums() -> None:
    data = _bf16_like(1000)
    digest = codecs.checksum(data)
    assert digest.startswith("xxh3_64:") and len(digest) == len("xxh3_64:") + 16
    assert codecs.checksum(data, "crc32") == f"crc32:{zlib.crc32(data.tobytes()):08x}"
    assert codecs.checksum_matches(data, digest) and codecs.checksum_matches(
        data, codecs.checksum(data, "crc32")
    )
    flipped = data.copy()
    flipped[500] ^= 0x01
    assert not codecs.checksum_matches(flipped, digest)
    assert codecs.is_known_checksum(digest) and not codecs.is_known_checksum("md5:abcd")
    assert not codecs.is_known_checksum("xxh3_64:") and not codecs.is_known_checksum("xxh3_64:XYZ")
