"""The disk tier's two read paths, buffered and O_DIRECT, against real files.

Both paths pass the disk conformance cases of ``test_conformance.py`` (pieces of real
safetensors files reproduced byte for byte). The O_DIRECT path is then checked where it differs:
the aligned read plan, unaligned pieces and buffers, reads in place versus through the bounce
buffer, the end of a file, and the fallback to buffered reads where O_DIRECT is refused.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from klotski_tier.core.errors import ConfigError, TierError
from klotski_tier.core.model.blocks import TensorPiece
from klotski_tier.tiers.direct import DIRECT_ALIGN_BYTES, O_DIRECT, plan_aligned
from klotski_tier.tiers.disk import DiskDriver, folio_ranges
from klotski_tier.tiers.hostmem import aligned_empty
from tests.tiers.test_conformance import _assert_reproduced, _pack, _sample_tensors, _write_safetensors

T = TypeVar("T")

ALIGN = DIRECT_ALIGN_BYTES
FILE_BYTES = 5 * ALIGN + 123  # not a multiple of the alignment: the last read stops short
RANDOM_PIECES = 60
PATHS = [
    pytest.param({}, id="buffered"),
    pytest.param({"direct": True}, id="direct"),
]
# (chunk_bytes, queue_depth) per path: direct chunks must be multiples of the alignment
CHUNKINGS = [
    pytest.param({"chunk_bytes": 61, "queue_depth": 1}, id="buffered-61B-qd1"),
    pytest.param({"chunk_bytes": 64, "queue_depth": 8}, id="buffered-64B-qd8"),
    pytest.param({"direct": True, "chunk_bytes": ALIGN, "queue_depth": 1}, id="direct-4K-qd1"),
    pytest.param({"direct": True, "chunk_bytes": ALIGN, "queue_depth": 8}, id="direct-4K-qd8"),
    pytest.param({"direct": True, "chunk_bytes": 3 * ALIGN, "queue_depth": 3}, id="direct-12K-qd3"),
]

Sample = tuple[list[TensorPiece], int, dict[str, torch.Tensor]]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _large_tensors() -> dict[str, torch.Tensor]:
    """Tensors that span several alignment units, so reads have a head, a body and a tail."""
    generator = torch.Generator().manual_seed(7)
    return {
        **_sample_tensors(seed=1),
        "big.bf16": torch.randn(37, 301, generator=generator).to(torch.bfloat16),  # [37, 301]
        "big.f32": torch.randn(4099, generator=generator),  # [4099]
    }


@pytest.fixture
def sample(tmp_path: Path) -> Sample:
    tensors = _large_tensors()
    pieces, nbytes = _pack(_write_safetensors(tmp_path / "model.safetensors", tensors))
    return pieces, nbytes, tensors


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(3).randbytes(FILE_BYTES)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def _read(disk: DiskDriver, pieces: list[TensorPiece], buffer: torch.Tensor) -> torch.Tensor:
    async def scenario() -> torch.Tensor:
        async with disk:
            await disk.read_into(pieces, buffer)
            return buffer

    return run(scenario())


def _buffer(nbytes: int, shift: int = 0) -> torch.Tensor:
    """A zeroed buffer of ``nbytes`` whose address is ``shift`` bytes past an aligned one."""
    return aligned_empty(nbytes + shift)[shift:].zero_()  # [nbytes]


def _random_pieces(path: Path, rng: random.Random) -> tuple[list[TensorPiece], int]:
    """Pieces at any offset and of any length (zero included), packed with gaps into one buffer."""
    pieces, offset = [], 0
    for index in range(RANDOM_PIECES):
        start = rng.randrange(FILE_BYTES)
        nbytes = rng.randrange(FILE_BYTES - start + 1)
        pieces.append(TensorPiece(f"p{index}", path, start, nbytes, offset))
        offset += nbytes + rng.choice([0, 1, ALIGN - start % ALIGN])
    return pieces, offset


def _assert_bytes(buffer: torch.Tensor, pieces: list[TensorPiece], data: bytes) -> None:
    for piece in pieces:
        got = bytes(buffer[piece.buffer_offset : piece.buffer_offset + piece.nbytes].numpy())
        assert got == data[piece.file_offset : piece.file_offset + piece.nbytes], piece.tensor_name


# ---------------------------------------------------------------- conformance, both paths


@pytest.mark.parametrize("options", PATHS)
@pytest.mark.parametrize("shift", [0, 64, ALIGN // 2])  # typed views need dtype-aligned addresses
def test_read_into_reproduces_safetensors_tensors(
    sample: Sample, options: dict[str, Any], shift: int
) -> None:
    pieces, nbytes, tensors = sample
    _assert_reproduced(_read(DiskDriver(**options), pieces, _buffer(nbytes, shift)), pieces, tensors)


@pytest.mark.parametrize("options", CHUNKINGS)
def test_chunking_and_queue_depth_give_the_same_bytes(sample: Sample, options: dict[str, Any]) -> None:
    pieces, nbytes, tensors = sample
    reference = _read(DiskDriver(), pieces, _buffer(nbytes))
    chunked = _read(DiskDriver(**options), pieces, _buffer(nbytes))
    assert torch.equal(chunked, reference)
    _assert_reproduced(chunked, pieces, tensors)


@pytest.mark.parametrize("options", PATHS)
def test_many_pieces_from_several_files(tmp_path: Path, options: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    raw_pieces: list[TensorPiece] = []
    for seed in range(3):
        shard = _sample_tensors(seed)
        tensors.update(shard)
        raw_pieces += _write_safetensors(tmp_path / f"shard-{seed}.safetensors", shard)
    pieces, nbytes = _pack(sorted(raw_pieces, key=lambda p: (p.tensor_name[::-1], p.path.name)))
    buffer = _read(DiskDriver(queue_depth=3, **options), pieces, _buffer(nbytes))
    _assert_reproduced(buffer, pieces, tensors)


@pytest.mark.parametrize("options", PATHS)
def test_missing_file_is_a_tier_error_naming_it(tmp_path: Path, options: dict[str, Any]) -> None:
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(TierError, match=f"cannot open {missing}"):
        _read(DiskDriver(**options), [TensorPiece("w", missing, 0, 16, 0)], _buffer(16))


@pytest.mark.parametrize("options", PATHS)
def test_truncated_file_is_a_tier_error_naming_it(sample: Sample, options: dict[str, Any]) -> None:
    pieces, nbytes, _ = sample
    path = pieces[0].path
    os.truncate(path, max(p.file_offset for p in pieces) + 1)
    with pytest.raises(TierError, match=rf"short read of {path} at offset \d+.*may be truncated"):
        _read(DiskDriver(**options), pieces, _buffer(nbytes))


@pytest.mark.parametrize("options", PATHS)
def test_driver_stays_usable_after_a_failed_read(sample: Sample, options: dict[str, Any]) -> None:
    pieces, nbytes, tensors = sample
    bad = TensorPiece("bad", pieces[0].path.with_name("absent"), 0, 8, 0)

    async def scenario() -> torch.Tensor:
        async with DiskDriver(**options) as disk:
            buffer = _buffer(nbytes)
            with pytest.raises(TierError):
                await disk.read_into([bad], buffer)
            await disk.read_into(pieces, buffer)
            return buffer

    _assert_reproduced(run(scenario()), pieces, tensors)


# ---------------------------------------------------------------- the aligned plan


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("base", [0, 3 * ALIGN, 5])
def test_plan_reads_are_aligned_and_deliver_each_piece_exactly(seed: int, base: int) -> None:
    pieces, _ = _random_pieces(Path("f"), random.Random(seed))
    chunks = list(plan_aligned(pieces, 2 * ALIGN, base))
    for chunk in chunks:
        assert chunk.file_offset % ALIGN == 0 and chunk.nbytes % ALIGN == 0 and chunk.nbytes <= 2 * ALIGN
        assert chunk.skip >= 0 and chunk.skip + chunk.wanted <= chunk.nbytes
        if chunk.in_place:
            assert chunk.skip == 0 and chunk.wanted == chunk.nbytes
            assert (base + chunk.buffer_offset) % ALIGN == 0
    delivered = {(c.buffer_offset, c.file_offset + c.skip, c.wanted) for c in chunks if c.wanted}
    for piece in pieces:  # the delivered ranges of a piece tile it, in order
        mine = sorted(
            d for d in delivered if piece.buffer_offset <= d[0] < piece.buffer_offset + piece.nbytes
        )
        position = piece.buffer_offset
        for buffer_offset, file_offset, wanted in mine:
            assert buffer_offset == position
            assert file_offset - piece.file_offset == buffer_offset - piece.buffer_offset
            position += wanted
        assert position == piece.buffer_offset + piece.nbytes


def test_plan_reads_an_in_phase_piece_in_place_but_its_partial_units() -> None:
    piece = TensorPiece("w", Path("f"), ALIGN + 10, 3 * ALIGN, 10)
    chunks = list(plan_aligned([piece], 16 * ALIGN, 0))
    layout = [(c.file_offset // ALIGN, c.nbytes // ALIGN, c.in_place) for c in chunks]
    assert layout == [(1, 1, False), (2, 2, True), (4, 1, False)]


def test_plan_bounces_a_piece_out_of_phase_with_its_buffer() -> None:
    piece = TensorPiece("w", Path("f"), 0, 8 * ALIGN, 0)
    assert all(c.in_place for c in plan_aligned([piece], 2 * ALIGN, 0))
    assert not any(c.in_place for c in plan_aligned([piece], 2 * ALIGN, 64))


# ---------------------------------------------------------------- O_DIRECT reads


class CountingDisk(DiskDriver):
    """Records every read's offset and length; returns at most ``limit`` bytes per call."""

    def __init__(self, limit: int | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.limit = limit
        self.reads: list[tuple[int, int]] = []

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        self.reads.append((file_offset, len(view)))
        return super()._read_chunk(fd, file_offset, view[: self.limit])


@pytest.mark.parametrize("shift", [0, 1, 100])
@pytest.mark.parametrize("seed", range(3))
def test_direct_reads_unaligned_pieces_into_unaligned_buffers(
    data_file: tuple[Path, bytes], shift: int, seed: int
) -> None:
    path, data = data_file
    pieces, nbytes = _random_pieces(path, random.Random(seed))
    disk = CountingDisk(direct=True, chunk_bytes=2 * ALIGN, queue_depth=4)
    _assert_bytes(_read(disk, pieces, _buffer(nbytes, shift)), pieces, data)
    assert all(offset % ALIGN == 0 and length % ALIGN == 0 for offset, length in disk.reads)
    assert disk.bytes_read == sum(p.nbytes for p in pieces)


def test_direct_aligned_piece_is_read_in_place_without_a_bounce_buffer(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    piece = TensorPiece("w", path, ALIGN, 4 * ALIGN, 0)
    disk = CountingDisk(direct=True, chunk_bytes=ALIGN)
    buffer = _read(disk, [piece], _buffer(piece.nbytes))
    _assert_bytes(buffer, [piece], data)
    assert sorted(disk.reads) == [(offset, ALIGN) for offset in range(ALIGN, 5 * ALIGN, ALIGN)]
    assert disk._bounce.nbytes == 0


def test_direct_bounce_buffers_are_one_per_thread_and_freed_by_aclose(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    pieces, nbytes = _random_pieces(path, random.Random(9))

    async def scenario() -> tuple[int, int]:
        disk = DiskDriver(direct=True, chunk_bytes=ALIGN, queue_depth=2)
        buffer = _buffer(nbytes, shift=1)  # out of phase: every read goes through a bounce buffer
        await disk.read_into(pieces, buffer)
        _assert_bytes(buffer, pieces, data)
        held = disk._bounce.nbytes
        await disk.aclose()
        return held, disk._bounce.nbytes

    held, after = run(scenario())
    assert 0 < held <= 2 * ALIGN and after == 0


def test_direct_partial_reads_are_retried(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    piece = TensorPiece("all", path, 0, FILE_BYTES, 0)
    disk = CountingDisk(limit=ALIGN, direct=True, chunk_bytes=4 * ALIGN)
    _assert_bytes(_read(disk, [piece], _buffer(FILE_BYTES)), [piece], data)
    assert len(disk.reads) == -(-FILE_BYTES // ALIGN)  # one aligned unit per call


def test_direct_read_error_names_file_and_offset(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file

    class FailingDisk(DiskDriver):
        def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
            raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(TierError, match=f"cannot read {path} at offset {ALIGN}: Input/output error"):
        _read(FailingDisk(direct=True), [TensorPiece("w", path, ALIGN + 5, 8, 0)], _buffer(8))


def test_direct_chunk_bytes_must_be_aligned() -> None:
    with pytest.raises(ConfigError, match=f"multiple of {ALIGN}"):
        DiskDriver(direct=True, chunk_bytes=ALIGN + 1)


def test_refused_o_direct_falls_back_to_buffered_reads_with_a_warning(
    data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, data = data_file
    real_open = os.open

    def refusing_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    pieces, nbytes = _random_pieces(path, random.Random(5))
    with caplog.at_level(logging.WARNING, logger="klotski_tier.tiers.direct"):
        disk = CountingDisk(direct=True, chunk_bytes=2 * ALIGN)
        _assert_bytes(_read(disk, pieces, _buffer(nbytes, shift=3)), pieces, data)
    warning = f"{path} refuses O_DIRECT (Invalid argument); reading it through the page cache"
    assert [record.getMessage() for record in caplog.records].count(warning) == 1  # once per file
    assert sum(length for _, length in disk.reads) == sum(p.nbytes for p in pieces)  # no widening


def test_other_open_errors_are_not_taken_for_a_refusal(tmp_path: Path) -> None:
    missing = tmp_path / "absent"
    with pytest.raises(TierError, match=f"cannot open {missing}: No such file"):
        _read(DiskDriver(direct=True), [TensorPiece("w", missing, 0, 8, 0)], _buffer(8))


def test_folio_ranges_widen_and_merge_per_file() -> None:
    mib = 1 << 20
    pieces = [
        TensorPiece("a", Path("f"), 3 * mib + 5, 10, 0),
        TensorPiece("b", Path("g"), 0, 1, 0),
        TensorPiece("c", Path("f"), 0, mib, 0),
        TensorPiece("d", Path("f"), 2 * mib, 1, 0),
        TensorPiece("empty", Path("h"), 5, 0, 0),
    ]
    assert folio_ranges(pieces) == [(Path("f"), 0, 4 * mib), (Path("g"), 0, 2 * mib)]
