"""The scratch tier: a run's own directory of files it writes and reads back, gone when it closes."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
import torch

from klotski_tier.core.errors import TierError
from klotski_tier.tiers import scratch
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
    assert not directory.exists() and not (tmp_path / "scratch").exists()  # made for the run: gone


def test_a_parent_the_run_did_not_make_or_that_another_run_uses_stays(tmp_path: Path) -> None:
    async def run() -> None:
        (tmp_path / "kept").mkdir()
        async with ScratchDriver(tmp_path / "kept"):
            pass
        first = ScratchDriver(tmp_path / "shared")  # makes it
        async with ScratchDriver(tmp_path / "shared"):
            await first.aclose()  # the other run's directory is still in it
        assert (tmp_path / "shared").is_dir()

    asyncio.run(run())
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_a_write_the_drive_refuses_says_what_to_do_and_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    async def run() -> None:
        async with ScratchDriver(tmp_path / "scratch", advice="free space, or keep it in RAM") as driver:
            path = await driver.create("a.kv", 2 * ScratchDriver.alignment)
            monkeypatch.setattr(scratch.os, "pwrite", full)
            with pytest.raises(TierError) as caught:
                await driver.write(path, 0, aligned_empty(ScratchDriver.alignment))
        assert str(caught.value).endswith("No space left on device; free space, or keep it in RAM")

    asyncio.run(run())
    assert not (tmp_path / "scratch").exists()


def test_a_directory_the_drive_refuses_leaves_no_parent_and_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def read_only(**_: object) -> str:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(scratch.tempfile, "mkdtemp", read_only)
    with pytest.raises(TierError, match=r"Read-only file system; free space or move it$"):
        ScratchDriver(tmp_path / "scratch", advice="free space or move it")
    assert not (tmp_path / "scratch").exists()


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
