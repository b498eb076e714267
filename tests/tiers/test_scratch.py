"""The scratch tier: a run's own directory of files it writes and reads back, gone when it closes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from klotski_tier.core.errors import TierError
from klotski_tier.tiers.hostmem import aligned_empty
from klotski_tier.tiers.scratch import ScratchDriver


def test_ranges_written_are_read_back_and_the_directory_goes_on_close(tmp_path: Path) -> None:
    """O_DIRECT (this drive takes it): aligned ranges from aligned buffers, past the page cache."""
    unit = ScratchDriver.alignment

    async def run() -> tuple[Path, torch.Tensor]:
        driver = ScratchDriver(tmp_path / "scratch")
        path = await driver.create("a.kv", 4 * unit)
        assert driver.is_direct(path)
        data = aligned_empty(2 * unit)
        data.copy_(torch.arange(2 * unit) % 251)
        await driver.write(path, unit, data)  # two units at the second
        back = aligned_empty(2 * unit)
        await driver.read(path, unit, back)
        assert path.parent == driver.directory and path.stat().st_size == 4 * unit
        assert driver.bytes_written == driver.bytes_read == 2 * unit
        await driver.aclose()
        return driver.directory, back

    directory, back = asyncio.run(run())
    assert back.tolist() == (torch.arange(2 * unit) % 251).tolist()
    assert not directory.exists() and (tmp_path / "scratch").is_dir()


def test_an_unaligned_range_is_refused_with_o_direct_and_taken_buffered(tmp_path: Path) -> None:
    async def run() -> torch.Tensor:
        async with ScratchDriver(tmp_path / "direct") as direct:
            path = await direct.create("a.kv", 64)
            with pytest.raises(TierError, match=r"unaligned O_DIRECT range .* must all be multiples of 4096"):
                await direct.write(path, 16, torch.arange(8, dtype=torch.int16))
        async with ScratchDriver(tmp_path / "buffered", direct=False) as buffered:
            path = await buffered.create("a.kv", 64)
            assert not buffered.is_direct(path)
            await buffered.write(path, 16, torch.arange(8, dtype=torch.int16))  # 16 bytes at offset 16
            back = torch.zeros(8, dtype=torch.int16)
            await buffered.read(path, 16, back)
            return back

    assert asyncio.run(run()).tolist() == list(range(8))


def test_a_removed_or_foreign_file_is_a_one_line_error(tmp_path: Path) -> None:
    async def run() -> None:
        async with ScratchDriver(tmp_path) as driver:
            path = await driver.create("a.kv", 8)
            await driver.remove(path)
            assert not path.exists()
            with pytest.raises(TierError, match="is not a scratch file of this run"):
                await driver.read(path, 0, torch.zeros(2, dtype=torch.int16))
            with pytest.raises(TierError, match="is not a scratch file"):
                await driver.write(tmp_path / "other", 0, torch.zeros(2))

    asyncio.run(run())


def test_a_directory_that_cannot_be_made_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    with pytest.raises(TierError, match="cannot make a scratch directory in"):
        ScratchDriver(blocker / "below")
