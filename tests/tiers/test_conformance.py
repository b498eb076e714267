"""Conformance suites: every memory tier passes one suite; the disk tier reproduces real checkpoints.

Memory tiers (host, device) are checked through their shared contract only: allocate, copy
from host, wait_ready, ``async with`` and ``aclose``. The disk tier reads tensors out of real
safetensors files whose byte offsets the test computes from the header itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from safetensors.torch import save_file

from klotski_tier.core.errors import TierError
from klotski_tier.core.model.blocks import (
    BlockLayout,
    TensorPiece,
    TensorView,
    expert_block,
)
from klotski_tier.core.units import align_up
from klotski_tier.tiers.base import MemoryTierDriver
from klotski_tier.tiers.device import DeviceDriver
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.host import HostDriver

T = TypeVar("T")

CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
MEMORY_TIERS = [
    pytest.param(lambda: HostDriver(), id="host"),
    pytest.param(lambda: DeviceDriver("cpu"), id="device-cpu"),
    pytest.param(lambda: DeviceDriver("cuda"), id="device-cuda", marks=CUDA),
]
SIZES_BYTES = (0, 1, 63, 4096)
SAFETENSORS_LENGTH_BYTES = 8  # little-endian u64 header length at the start of every file
SMALL_CHUNK_BYTES = 7  # odd, so chunks straddle tensor and element boundaries

BUFFER_ALIGN_BYTES = 64  # views of the test's blocks start on cache lines


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class RefusingExecutor(ThreadPoolExecutor):
    """Stands in for the loop's default executor: drivers must never use it."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        raise AssertionError("a tier driver used the event loop's default executor")


def _pattern(nbytes: int, seed: int = 0) -> torch.Tensor:
    return ((torch.arange(nbytes, dtype=torch.int64) * 7 + seed) % 251).to(torch.uint8)  # [nbytes]


@pytest.fixture(params=MEMORY_TIERS)
def make_tier(request: pytest.FixtureRequest) -> Callable[[], MemoryTierDriver]:
    factory: Callable[[], MemoryTierDriver] = request.param
    return factory


class TestMemoryTierConformance:
    def test_allocate_gives_flat_uint8_buffers_of_the_size_asked(
        self, make_tier: Callable[[], MemoryTierDriver]
    ) -> None:
        async def scenario() -> None:
            async with make_tier() as tier:
                for nbytes in SIZES_BYTES:
                    buffer = tier.allocate(nbytes)
                    assert buffer.dtype == torch.uint8 and tuple(buffer.shape) == (nbytes,)

        run(scenario())

    def test_aallocate_runs_in_the_drivers_own_pool(self, make_tier: Callable[[], MemoryTierDriver]) -> None:
        async def scenario() -> None:
            asyncio.get_running_loop().set_default_executor(RefusingExecutor())
            async with make_tier() as tier:
                buffer = await tier.aallocate(SIZES_BYTES[-1])
                assert buffer.dtype == torch.uint8 and tuple(buffer.shape) == (SIZES_BYTES[-1],)

        run(scenario())

    def test_copy_from_host_lands_every_byte(self, make_tier: Callable[[], MemoryTierDriver]) -> None:
        async def scenario() -> None:
            asyncio.get_running_loop().set_default_executor(RefusingExecutor())
            async with make_tier() as tier:
                for nbytes in SIZES_BYTES:
                    src = _pattern(nbytes)
                    dst = tier.allocate(nbytes)
                    tier.wait_ready(await tier.copy_from_host(dst, src))
                    assert torch.equal(dst.cpu(), src)
                assert tier.bytes_copied == sum(SIZES_BYTES)

        run(scenario())

    def test_copy_into_a_typed_view_of_a_buffer(self, make_tier: Callable[[], MemoryTierDriver]) -> None:
        async def scenario() -> None:
            async with make_tier() as tier:
                src = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)  # [4, 6]
                dst = tier.allocate(src.numel() * src.element_size()).view(torch.float32).view(4, 6)
                tier.wait_ready(await tier.copy_from_host(dst, src))
                assert torch.equal(dst.cpu(), src)

        run(scenario())

    def test_concurrent_copies_do_not_mix(self, make_tier: Callable[[], MemoryTierDriver]) -> None:
        async def scenario() -> None:
            async with make_tier() as tier:
                sources = [_pattern(1000, seed) for seed in range(8)]
                buffers = [tier.allocate(1000) for _ in sources]
                dones = await asyncio.gather(
                    *(tier.copy_from_host(b, s) for b, s in zip(buffers, sources, strict=True))
                )
                for done, buffer, src in zip(dones, buffers, sources, strict=True):
                    tier.wait_ready(done)
                    assert torch.equal(buffer.cpu(), src)

        run(scenario())

    def test_context_manager_closes_the_driver(self, make_tier: Callable[[], MemoryTierDriver]) -> None:
        async def scenario() -> MemoryTierDriver:
            async with make_tier() as tier:
                assert not tier.closed
            return tier

        tier = run(scenario())
        assert tier.closed
        assert tier._pool._shutdown  # the dedicated pool is shut down, not merely forgotten

    def test_use_after_aclose_raises_a_clear_error(self, make_tier: Callable[[], MemoryTierDriver]) -> None:
        async def scenario() -> None:
            tier = make_tier()
            await tier.aclose()
            await tier.aclose()  # idempotent
            with pytest.raises(TierError, match="closed; create a new driver"):
                tier.allocate(16)
            with pytest.raises(TierError, match="closed"):
                await tier.copy_from_host(torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8))
            with pytest.raises(TierError, match="closed"):
                async with tier:
                    pass

        run(scenario())


# ---------------------------------------------------------------- disk: real safetensors files


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> list[TensorPiece]:
    """Save ``tensors`` and return one piece per tensor, from the header, packed into one buffer."""
    save_file(tensors, str(path))
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:SAFETENSORS_LENGTH_BYTES])
    header = json.loads(raw[SAFETENSORS_LENGTH_BYTES : SAFETENSORS_LENGTH_BYTES + header_len])
    data_start = SAFETENSORS_LENGTH_BYTES + header_len
    pieces = []
    for name in tensors:
        begin, end = header[name]["data_offsets"]
        pieces.append(TensorPiece(name, path, data_start + begin, end - begin, 0))
    return pieces


def _pack(pieces: list[TensorPiece]) -> tuple[list[TensorPiece], int]:
    """Give each piece an aligned place in one buffer; the buffer's size."""
    placed, offset = [], 0
    for piece in pieces:
        placed.append(TensorPiece(piece.tensor_name, piece.path, piece.file_offset, piece.nbytes, offset))
        offset = align_up(offset + piece.nbytes, BUFFER_ALIGN_BYTES)
    return placed, offset


def _sample_tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"w{seed}.f32": torch.randn(5, 7, generator=generator),  # [5, 7]
        f"w{seed}.bf16": torch.randn(3, 11, generator=generator).to(torch.bfloat16),  # [3, 11]
        f"w{seed}.f16": torch.randn(13, generator=generator).to(torch.float16),  # [13]
        f"w{seed}.i64": torch.randint(-(2**40), 2**40, (4,), generator=generator),  # [4]
        f"w{seed}.u8": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=generator),  # [9]
    }


def _read(disk: DiskDriver, pieces: list[TensorPiece], nbytes: int) -> torch.Tensor:
    async def scenario() -> torch.Tensor:
        async with disk:
            buffer = torch.zeros(nbytes, dtype=torch.uint8)  # [nbytes]
            await disk.read_into(pieces, buffer)
            return buffer

    return run(scenario())


def _assert_reproduced(
    buffer: torch.Tensor, pieces: list[TensorPiece], tensors: dict[str, torch.Tensor]
) -> None:
    views = tuple(
        TensorView(
            p.tensor_name, p.buffer_offset, tensors[p.tensor_name].dtype, tuple(tensors[p.tensor_name].shape)
        )
        for p in pieces
    )
    layout = BlockLayout(expert_block(0, 0), tuple(pieces), views, buffer.numel())
    for name, view in layout.tensors(buffer).items():
        expected = tensors[name]
        assert torch.equal(view.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


@pytest.fixture
def one_file(tmp_path: Path) -> tuple[list[TensorPiece], int, dict[str, torch.Tensor]]:
    tensors = _sample_tensors(seed=0)
    pieces, nbytes = _pack(_write_safetensors(tmp_path / "model.safetensors", tensors))
    return pieces, nbytes, tensors


class TestDiskConformance:
    def test_read_into_reproduces_safetensors_tensors(
        self, one_file: tuple[list[TensorPiece], int, dict[str, torch.Tensor]]
    ) -> None:
        pieces, nbytes, tensors = one_file
        _assert_reproduced(_read(DiskDriver(), pieces, nbytes), pieces, tensors)

    @pytest.mark.parametrize(
        ("chunk_bytes", "queue_depth"), [(SMALL_CHUNK_BYTES, 1), (SMALL_CHUNK_BYTES, 8), (64, 8)]
    )
    def test_chunking_and_queue_depth_give_the_same_bytes(
        self,
        one_file: tuple[list[TensorPiece], int, dict[str, torch.Tensor]],
        chunk_bytes: int,
        queue_depth: int,
    ) -> None:
        pieces, nbytes, tensors = one_file
        reference = _read(DiskDriver(), pieces, nbytes)
        chunked = _read(DiskDriver(chunk_bytes=chunk_bytes, queue_depth=queue_depth), pieces, nbytes)
        assert torch.equal(chunked, reference)
        _assert_reproduced(chunked, pieces, tensors)

    def test_many_pieces_from_several_files(self, tmp_path: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        raw_pieces: list[TensorPiece] = []
        for seed in range(3):
            shard = _sample_tensors(seed)
            tensors.update(shard)
            raw_pieces += _write_safetensors(tmp_path / f"shard-{seed}.safetensors", shard)
        interleaved = sorted(
            raw_pieces, key=lambda p: (p.tensor_name.split(".")[1], p.path.name), reverse=True
        )
        pieces, nbytes = _pack(interleaved)
        buffer = _read(DiskDriver(chunk_bytes=16, queue_depth=3), pieces, nbytes)
        _assert_reproduced(buffer, pieces, tensors)

    def test_missing_file_is_a_tier_error_naming_it(self, tmp_path: Path) -> None:
        missing = tmp_path / "absent.safetensors"
        with pytest.raises(TierError, match=f"cannot open {missing}"):
            _read(DiskDriver(), [TensorPiece("w", missing, 0, 16, 0)], 16)

    def test_truncated_file_is_a_tier_error_naming_it(
        self, one_file: tuple[list[TensorPiece], int, dict[str, torch.Tensor]]
    ) -> None:
        pieces, nbytes, _ = one_file
        path = pieces[0].path
        os.truncate(path, max(p.file_offset for p in pieces) + 1)
        with pytest.raises(TierError, match=rf"short read of {path} at offset \d+.*may be truncated"):
            _read(DiskDriver(chunk_bytes=SMALL_CHUNK_BYTES), pieces, nbytes)

    def test_driver_stays_usable_after_a_failed_read(self, tmp_path: Path) -> None:
        tensors = _sample_tensors(seed=4)
        pieces, nbytes = _pack(_write_safetensors(tmp_path / "ok.safetensors", tensors))
        bad = TensorPiece("bad", tmp_path / "absent.safetensors", 0, 8, 0)

        async def scenario() -> torch.Tensor:
            async with DiskDriver() as disk:
                buffer = torch.zeros(nbytes, dtype=torch.uint8)  # [nbytes]
                with pytest.raises(TierError):
                    await disk.read_into([bad], buffer)
                await disk.read_into(pieces, buffer)
                return buffer

        _assert_reproduced(run(scenario()), pieces, tensors)
