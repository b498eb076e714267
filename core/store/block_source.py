"""Where a block's bytes come from: byte ranges of a Hugging Face checkpoint, or one block of a
packed store (checked against its checksum and, when compressed, decompressed).

Either way the disk tier moves the bytes and its own thread pool does the checking and the
decompression (zstandard and xxhash release the GIL), so the event loop never touches them.
A packed store's blocks are 4 KiB aligned and padded: a block is read as one aligned range,
straight into its page-aligned host buffer when uncompressed, through a staging buffer when not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from klotski_tier.core.model.blocks import BlockId, BlockLayout
from klotski_tier.core.store.packed import PackedStore, decode_block
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.hostmem import aligned_empty
from klotski_tier.tiers.ranges import ByteRange


class BlockSource:
    """Reads blocks from disk into host buffers, from a checkpoint or a packed store."""

    def __init__(
        self, layouts: Mapping[BlockId, BlockLayout], disk: DiskDriver, store: PackedStore | None = None
    ) -> None:
        self._layouts = layouts
        self._disk = disk
        self._store = store

    def buffer_bytes(self, block: BlockId) -> int:
        """Bytes the host buffer of ``block`` needs: its layout, or the aligned range read into it."""
        nbytes = self._layouts[block].nbytes
        if self._store is None:
            return nbytes
        entry = self._store.entry(block)
        return nbytes if entry.compressed else max(nbytes, entry.padded_bytes)

    async def read(self, block: BlockId, dst: torch.Tensor) -> None:
        """Fill ``dst`` (flat uint8, :meth:`buffer_bytes` long) with the block's buffer bytes."""
        if self._store is None:
            await self._disk.read_into(self._layouts[block].disk_reads, dst)
            return
        entry = self._store.entry(block)
        piece = ByteRange(entry.path, entry.offset, entry.padded_bytes, 0)
        if not entry.compressed:
            await self._disk.read_into([piece], dst)
            await self._disk.run_blocking(lambda: decode_block(dst, entry, dst))  # checks in place
            return
        staging = aligned_empty(entry.padded_bytes)  # [padded bytes], read in place by O_DIRECT
        await self._disk.read_into([piece], staging)
        await self._disk.run_blocking(lambda: decode_block(staging, entry, dst))
