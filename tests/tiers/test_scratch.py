"""The scratch tier: a run's own directory of files it writes and reads back, gone when it closes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from klotski_tier.core.errors import TierError
from klotski_tier.tiers.scratch import ScratchDriver


def test_ranges_written_are_read_back_and_the_directory_goes_on_close(tmp_path: Path) -> None:
    async def run() -> tuple[Path, torch.Tensor]:
        driver = ScratchDriver(tmp_path / "scratch")
        path = await driver.create("a.kv", 64)
        await driver.write(path, 16, torch.arange(8, dtype=torch.int16))  # 16 bytes at offset 16
        back = torch.zeros(8, dtype=torch.int16)
        await driver.read(path, 16, back)
        assert path.parent == driver.directory and path.stat().st_size == 64
        assert driver.bytes_written == driver.bytes_read == 16
        await driver.aclose()
        return driver.directory, back

    directory, back = asyncio.run(run())
    assert back.tolist() == list(range(8))
    assert not directory.exists() and (tmp_path / "scratch").is_dir()


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
