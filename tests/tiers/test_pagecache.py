"""Page-cache honesty: the measurement itself, and what each disk read path leaves cached.

The measurement is validated first (a plain read caches the whole file, ``evict`` drops it, a
read of a few pages caches just those), then the driver: after a buffered read (dropping what
it read) and after an O_DIRECT read, the file is not in the page cache; without ``drop_cache``
a buffered read leaves it cached, so the check can fail. Files live on a directory whose page
cache can really be dropped (tmpfs cannot): ``tmp_path`` if it qualifies, else one under the
working tree; the tests skip where neither does.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from klotski_tier.core.errors import ConfigError, TierError
from klotski_tier.core.model.blocks import TensorPiece
from klotski_tier.core.store.pagecache import PAGE_BYTES, cached_bytes, cached_fraction, evict
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.hostmem import aligned_empty

FILE_BYTES = 8 << 20  # 8 MiB: larger than the kernel's first read-ahead windows
PROBE_BYTES = 64 << 10
NOT_CACHED = 0.05  # at most this share of the file may stay cached ("about none")
CACHED = 0.95  # at least this share counts as "the whole file"
SCATTERED_PIECES = 24
PIECE_BYTES = 48 << 10
CHUNK_BYTES = 1 << 20
MIDDLE_START = (1 << 20) + 5  # unaligned
MIDDLE_BYTES = 3 << 20
FALLBACK_DIR = ".pytest-disk"  # under the working tree, for machines whose /tmp is tmpfs


def _droppable(directory: Path) -> bool:
    """Whether a file written in ``directory`` can be evicted from the page cache."""
    probe = directory / f"probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(bytes(PROBE_BYTES))
        evict(probe)
        return cached_fraction(probe) < NOT_CACHED
    except (OSError, TierError, ConfigError):
        return False
    finally:
        probe.unlink(missing_ok=True)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    if _droppable(tmp_path):
        yield tmp_path
        return
    fallback = Path.cwd() / FALLBACK_DIR / uuid.uuid4().hex
    fallback.mkdir(parents=True)
    try:
        if not _droppable(fallback):
            pytest.skip("no directory here whose page cache can be dropped (tmpfs only?)")
        yield fallback
    finally:
        shutil.rmtree(fallback)
        if not any(fallback.parent.iterdir()):
            fallback.parent.rmdir()


@pytest.fixture
def big_file(disk_dir: Path) -> Path:
    """8 MiB written back to the disk, as a downloaded checkpoint is (dirty pages cannot be dropped)."""
    path = disk_dir / "model.bin"
    with path.open("wb") as file:
        file.write(random.Random(1).randbytes(FILE_BYTES))
        file.flush()
        os.fsync(file.fileno())
    return path


def _read(path: Path, pieces: list[TensorPiece], **options: Any) -> bytes:
    async def scenario() -> bytes:
        buffer = aligned_empty(sum(p.nbytes for p in pieces))  # [nbytes]
        async with DiskDriver(chunk_bytes=CHUNK_BYTES, **options) as disk:
            await disk.read_into(pieces, buffer)
        return bytes(buffer.numpy())

    return asyncio.run(scenario())


def _whole(path: Path) -> list[TensorPiece]:
    return [TensorPiece("all", path, 0, FILE_BYTES, 0)]


def _middle(path: Path) -> list[TensorPiece]:
    """One large piece ending mid-file: kernel read-ahead would run on past its end."""
    return [TensorPiece("middle", path, MIDDLE_START, MIDDLE_BYTES, 0)]


def _scattered(path: Path) -> list[TensorPiece]:
    """Pieces at unaligned offsets across the file, as a checkpoint's tensors would be read."""
    rng = random.Random(2)
    starts = sorted(rng.sample(range(FILE_BYTES - PIECE_BYTES), SCATTERED_PIECES))
    return [TensorPiece(f"p{i}", path, start, PIECE_BYTES, i * PIECE_BYTES) for i, start in enumerate(starts)]


# ---------------------------------------------------------------- the measurement


def test_a_plain_read_caches_the_file_and_evict_drops_it(big_file: Path) -> None:
    evict(big_file)
    assert cached_fraction(big_file) < NOT_CACHED
    assert len(big_file.read_bytes()) == FILE_BYTES
    assert cached_fraction(big_file) > CACHED
    evict(big_file)
    assert cached_fraction(big_file) < NOT_CACHED


def test_cached_bytes_counts_exactly_the_pages_read(big_file: Path) -> None:
    evict(big_file)
    fd = os.open(big_file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no read-ahead: only the pages asked for
        os.pread(fd, 16 * PAGE_BYTES, 32 * PAGE_BYTES)
    finally:
        os.close(fd)
    assert cached_bytes(big_file) == 16 * PAGE_BYTES


def test_evict_writes_back_and_drops_a_fresh_write(disk_dir: Path) -> None:
    path = disk_dir / "fresh.bin"
    path.write_bytes(bytes(FILE_BYTES))  # dirty pages: only droppable once written back
    assert cached_fraction(path) > CACHED
    evict(path)
    assert cached_fraction(path) < NOT_CACHED


def test_an_empty_file_has_nothing_cached(tmp_path: Path) -> None:
    path = tmp_path / "empty.bin"
    path.touch()
    assert cached_bytes(path) == 0 and cached_fraction(path) == 0.0


def test_a_missing_file_is_a_tier_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.bin"
    with pytest.raises(TierError, match=f"cannot stat {missing}"):
        cached_fraction(missing)
    with pytest.raises(TierError, match=f"cannot open {missing}"):
        evict(missing)


def test_files_mincore_would_misreport_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "foreign.bin"
    path.write_bytes(b"x")
    monkeypatch.setattr(os, "geteuid", lambda: path.stat().st_uid + 1)  # neither root nor the owner
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # and not writable
    with pytest.raises(ConfigError, match="only reports files you own or may write"):
        cached_bytes(path)


# ---------------------------------------------------------------- what the read paths leave cached


@pytest.mark.parametrize(
    "options",
    [{}, {"direct": True}, {"direct": True, "drop_cache": False}],
    ids=["buffered", "direct", "direct-keep"],
)
@pytest.mark.parametrize("layout", [_whole, _middle, _scattered], ids=["whole", "middle", "scattered"])
def test_reads_leave_nothing_cached(big_file: Path, options: dict[str, Any], layout: Any) -> None:
    pieces = layout(big_file)
    evict(big_file)
    data = _read(big_file, pieces, **options)
    assert cached_fraction(big_file) < NOT_CACHED
    expected = big_file.read_bytes()  # caches the file: after the measurement
    assert data == b"".join(expected[p.file_offset : p.file_offset + p.nbytes] for p in pieces)


def test_a_buffered_read_keeping_the_cache_leaves_the_file_cached(big_file: Path) -> None:
    evict(big_file)
    _read(big_file, _whole(big_file), drop_cache=False)
    assert cached_fraction(big_file) > CACHED


def test_reads_drop_pages_that_were_cached_before(big_file: Path) -> None:
    for options in ({}, {"direct": True}):
        big_file.read_bytes()
        assert cached_fraction(big_file) > CACHED
        _read(big_file, _whole(big_file), **options)
        assert cached_fraction(big_file) < NOT_CACHED, options


def test_the_page_cache_measurement_does_not_fault_pages_in(big_file: Path) -> None:
    evict(big_file)
    for _ in range(3):
        assert cached_bytes(big_file) == 0
