"""Where the KV cache lives: device memory (the default), host RAM or the drive, streamed through the
attention.

``[kv] home = "device"``: each batch's KV cache ``[L, B, Hkv, Tmax, D]`` is allocated on the device for
the whole run (the device budget counts all of it, for every batch of a group).

``[kv] home = "host"``: each batch's cache lives in host memory (pinned on CUDA), and the device holds
two *slots*, each room for one layer's cache of one batch (k and v, ``[B, Hkv, Tmax, D]`` each, sized
for the group's largest batch). In layer l's attention phase:

- batch k's entries so far (positions ``0 .. kv_cached``) are copied into slot ``k % 2`` while batch k-1
  computes (the pipeline asks for batch k+1's as soon as batch k's have arrived);
- batch k's attention reads and writes that slot;
- then the positions it wrote (``kv_written``) are copied back to host RAM, and only once they are
  may the slot be filled for batch k+2.

The copies run in the device tier's copy thread (on CUDA on its copy stream, after the kernels queued
on the compute stream), so they overlap the compute; the pipeline awaits them as readiness futures,
as it awaits weights, and counts the time it waits as a bubble.

``[kv] home = "disk"``: as "host", but each batch's cache is a file on the drive (:class:`DiskKv`,
through the scratch tier, O_DIRECT), read into and written from a host staging buffer per slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.timeline import Timeline
from klotski_tier.core.paths import CACHE_ENV_VAR
from klotski_tier.core.runtime.config import DEVICE_KV, DISK_KV, HOST_KV, KV_SLOTS
from klotski_tier.core.units import align_up
from klotski_tier.tiers.device import DeviceDriver
from klotski_tier.tiers.hostmem import aligned_empty
from klotski_tier.tiers.scratch import ScratchDriver

__all__ = ["DEVICE_KV", "DISK_KV", "HOST_KV", "KV_SLOTS", "DiskKv", "HostKv", "host_cache", "slot_bytes"]

KV_TRACK = "kv cache"  # the timeline's track of the cache's copies in and out of the device slots


@dataclass
class KvSlot:
    """A device slot's k and v buffers ``[B, Hkv, Tmax, D]`` and the store that last used it."""

    k: Tensor
    v: Tensor
    stored: asyncio.Future[None] | None = None  # copying a batch's new entries back home


def slot_bytes(batch: int, positions: int, spec: ModelSpec) -> int:
    """Device bytes of one slot: one layer's k and v for ``batch`` sequences of ``positions`` tokens."""
    return batch * positions * spec.kv_bytes_per_token() // spec.num_layers


def host_cache(
    batch: int, positions: int, spec: ModelSpec, pin: bool, layers: int | None = None
) -> tuple[Tensor, Tensor]:
    """A batch's k and v caches ``[layers, B, Hkv, Tmax, D]`` in host memory (pinned for a CUDA device)."""
    shape = (
        spec.num_layers if layers is None else layers,
        batch,
        spec.num_kv_heads,
        positions,
        spec.head_dim,
    )
    return (
        torch.zeros(shape, dtype=spec.dtype, pin_memory=pin),
        torch.zeros(shape, dtype=spec.dtype, pin_memory=pin),
    )


class HostKv:
    """Moves one layer's KV cache of one batch between host RAM and two device slots (see above)."""

    def __init__(self, driver: DeviceDriver, spec: ModelSpec, timeline: Timeline | None = None) -> None:
        self.driver = driver
        self.spec = spec
        self.timeline = timeline  # KV copies on their own track, "kv cache"
        self._slots: list[KvSlot] = []
        self.bytes_in = 0  # copied into the device slots
        self.bytes_out = 0  # copied back home

    async def new_caches(
        self, batch: int, positions: int, layers: int | None = None
    ) -> tuple[Tensor, Tensor, Path | None]:
        """A batch's k and v caches ``[layers, B, Hkv, T, D]`` at home (default: every layer's), and its
        file (None: in RAM)."""
        k, v = host_cache(batch, positions, self.spec, pin=self.driver.device.type == "cuda", layers=layers)
        return k, v, None

    def reserve(self, batch: int, positions: int) -> None:
        """Allocate the slots for batches of up to ``batch`` sequences of ``positions`` tokens."""
        spec = self.spec
        shape = (batch, spec.num_kv_heads, positions, spec.head_dim)
        self._slots = [
            KvSlot(
                torch.zeros(shape, dtype=spec.dtype, device=self.driver.device),
                torch.zeros(shape, dtype=spec.dtype, device=self.driver.device),
            )
            for _ in range(KV_SLOTS)
        ]

    def slot(self, index: int, k_home: Tensor) -> tuple[Tensor, Tensor]:
        """The views of batch ``index``'s slot shaped as its cache (``k_home``: ``[L, B, Hkv, T, D]``)."""
        slot = self._slots[index % KV_SLOTS]
        _, batch, _, positions, _ = k_home.shape
        return slot.k[:batch, :, :positions], slot.v[:batch, :, :positions]

    async def fetch(
        self, layer: int, index: int, caches: tuple[Tensor, Tensor], cached: int, path: Path | None = None
    ) -> None:
        """Copy positions ``0 .. cached`` of layer ``layer``'s cache into batch ``index``'s slot, once
        the slot's last store is done."""
        slot = self._slots[index % KV_SLOTS]
        if slot.stored is not None:
            await slot.stored
        if cached == 0:
            return
        started = time.perf_counter()
        await self._copy_in(layer, index, caches, path, cached)
        self.bytes_in += 2 * _nbytes(caches[0][layer][:, :, :cached])
        self._span(f"L{layer} b{index} in", started)

    def store(
        self,
        layer: int,
        index: int,
        caches: tuple[Tensor, Tensor],
        written: Sequence[int],
        path: Path | None = None,
    ) -> None:
        """Start copying positions ``written[0] .. written[1]`` of batch ``index``'s slot back home;
        the slot is filled again only once it is done."""
        slot = self._slots[index % KV_SLOTS]
        start, end = written
        slot.stored = asyncio.ensure_future(self._store(layer, index, caches, path, start, end))

    async def _store(
        self, layer: int, index: int, caches: tuple[Tensor, Tensor], path: Path | None, start: int, end: int
    ) -> None:
        started = time.perf_counter()
        await self._copy_out(layer, index, caches, path, start, end)
        self.bytes_out += 2 * _nbytes(caches[0][layer][:, :, start:end])
        self._span(f"L{layer} b{index} out", started)

    async def _copy_in(
        self, layer: int, index: int, caches: tuple[Tensor, Tensor], path: Path | None, cached: int
    ) -> None:
        k_dev, v_dev = self.slot(index, caches[0])
        for dst, src in ((k_dev, caches[0][layer]), (v_dev, caches[1][layer])):
            await self.driver.copy_any(dst[:, :, :cached], src[:, :, :cached])

    async def _copy_out(
        self, layer: int, index: int, caches: tuple[Tensor, Tensor], path: Path | None, start: int, end: int
    ) -> None:
        k_dev, v_dev = self.slot(index, caches[0])
        for dst, src in ((caches[0][layer], k_dev), (caches[1][layer], v_dev)):
            await self.driver.copy_any(dst[:, :, start:end], src[:, :, start:end])

    def _span(self, name: str, started: float) -> None:
        if self.timeline is not None:
            self.timeline.span(KV_TRACK, name, started, time.perf_counter(), kind="kv")

    async def drain(self) -> None:
        """Wait for every store in flight (the end of a step: the caches at home are whole)."""
        for slot in self._slots:
            if slot.stored is not None:
                await slot.stored

    async def drain_quietly(self) -> None:
        """Wait for the stores still running (the run is ending, maybe on an error): none may touch the
        slots or the files after it; their own errors are not the run's."""
        for slot in self._slots:
            if slot.stored is not None and not slot.stored.done():
                with contextlib.suppress(
                    Exception, asyncio.CancelledError
                ):  # the run's error is raised anyway
                    await asyncio.shield(slot.stored)

    async def discard(self, path: Path | None) -> None:
        """A batch is done: what its cache holds outside memory goes (nothing, in RAM)."""

    async def aclose(self) -> None:
        """Release what the cache holds outside memory (nothing, in RAM)."""


class DiskKv(HostKv):
    """The KV cache in files on the drive (``[kv] home = "disk"``), one per batch, in a directory made
    for the run under ``directory`` and removed with it (:class:`~klotski_tier.tiers.scratch.
    ScratchDriver`, O_DIRECT). A file holds ``[L, 2, T]`` rows, each the k (or v) of one position of
    every sequence and head ``[B, Hkv, D]``, padded to the drive's alignment: a layer's cached prefix
    and a step's new positions are each one aligned byte range. They pass through an aligned host
    staging buffer per slot (the file's layout) on their way to and from the device slots, whose
    layout is the attention's."""

    def __init__(
        self, driver: DeviceDriver, spec: ModelSpec, directory: Path, timeline: Timeline | None = None
    ) -> None:
        super().__init__(driver, spec, timeline)
        advice = (
            f"free space on that drive or make it writable, point {CACHE_ENV_VAR} at a directory on "
            f'another drive, or set [kv] home = "{HOST_KV}"'
        )
        self.scratch = ScratchDriver(directory, advice=advice)
        self._staging: list[tuple[Tensor, Tensor]] = []  # per slot: k and v rows, aligned bytes
        self._files = 0

    def _row_bytes(self, batch: int) -> int:
        """Bytes of one position's row in a file: ``[B, Hkv, D]``, padded to the drive's alignment."""
        spec = self.spec
        row = batch * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize
        return align_up(row, self.scratch.alignment)

    async def new_caches(
        self, batch: int, positions: int, layers: int | None = None
    ) -> tuple[Tensor, Tensor, Path | None]:
        spec = self.spec
        layers = spec.num_layers if layers is None else layers
        shape = (layers, batch, spec.num_kv_heads, positions, spec.head_dim)
        nbytes = layers * 2 * positions * self._row_bytes(batch)
        path = await self.scratch.create(f"batch-{self._files}.kv", nbytes)
        self._files += 1
        meta = (
            torch.empty(shape, dtype=spec.dtype, device="meta"),
            torch.empty(shape, dtype=spec.dtype, device="meta"),
        )
        return meta[0], meta[1], path  # the shapes of the caches, whose bytes are in the file

    def reserve(self, batch: int, positions: int) -> None:
        super().reserve(batch, positions)
        nbytes = positions * self._row_bytes(batch)
        align = self.scratch.alignment
        self._staging = [
            (aligned_empty(nbytes, align), aligned_empty(nbytes, align)) for _ in range(KV_SLOTS)
        ]

    async def _copy_in(
        self, layer: int, index: int, caches: tuple[Tensor, Tensor], path: Path | None, cached: int
    ) -> None:
        assert path is not None, "a KV cache on the drive needs its file"
        k_dev, v_dev = self.slot(index, caches[0])
        for half, dev in enumerate((k_dev, v_dev)):
            rows, values = self._stage(index, caches[0], half)
            await self.scratch.read(path, self._offset(caches[0], layer, half, 0), rows[:cached])
            await self.driver.copy_any(dev[:, :, :cached], values[:cached].permute(1, 2, 0, 3))

    async def _copy_out(
        self, layer: int, index: int, caches: tuple[Tensor, Tensor], path: Path | None, start: int, end: int
    ) -> None:
        assert path is not None, "a KV cache on the drive needs its file"
        k_dev, v_dev = self.slot(index, caches[0])
        for half, dev in enumerate((k_dev, v_dev)):
            rows, values = self._stage(index, caches[0], half)
            await self.driver.copy_any(values[start:end].permute(1, 2, 0, 3), dev[:, :, start:end])
            await self.scratch.write(path, self._offset(caches[0], layer, half, start), rows[start:end])

    def _stage(self, index: int, k_home: Tensor, half: int) -> tuple[Tensor, Tensor]:
        """Batch ``index``'s slot's staging buffer for k (``half`` 0) or v (1), shaped as its file: the
        rows ``[T, row bytes]`` the drive reads and writes, and their values ``[T, B, Hkv, D]``."""
        _, batch, heads, positions, dim = k_home.shape
        row = self._row_bytes(batch)
        rows = self._staging[index % KV_SLOTS][half][: positions * row].view(positions, row)
        used = batch * heads * dim * k_home.element_size()
        values = rows[:, :used].view(k_home.dtype).view(positions, batch, heads, dim)
        return rows, values

    def _offset(self, k_home: Tensor, layer: int, half: int, position: int) -> int:
        """Byte offset of ``position`` of layer ``layer``'s k (``half`` 0) or v (1) in the file."""
        _, batch, _, positions, _ = k_home.shape
        return ((layer * 2 + half) * positions + position) * self._row_bytes(batch)

    async def discard(self, path: Path | None) -> None:
        await self.drain()  # no store still writes it
        if path is not None:
            await self.scratch.remove(path)

    async def aclose(self) -> None:
        await self.scratch.aclose()  # the files and their directory go


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
