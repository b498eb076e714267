"""Where the KV cache lives: device memory (the default), or host RAM, streamed through the attention.

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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.timeline import Timeline
from klotski_tier.core.runtime.config import DEVICE_KV, HOST_KV, KV_SLOTS
from klotski_tier.tiers.device import DeviceDriver

__all__ = ["DEVICE_KV", "HOST_KV", "KV_SLOTS", "HostKv", "host_cache", "slot_bytes"]

KV_TRACK = "kv cache"  # the timeline's track of the cache's copies in and out of the device slots


@dataclass
class KvSlot:
    """A device slot's k and v buffers ``[B, Hkv, Tmax, D]`` and the store that last used it."""

    k: Tensor
    v: Tensor
    stored: asyncio.Task[None] | None = None  # copying a batch's new entries back to host RAM


def slot_bytes(batch: int, positions: int, spec: ModelSpec) -> int:
    """Device bytes of one slot: one layer's k and v for ``batch`` sequences of ``positions`` tokens."""
    return batch * positions * spec.kv_bytes_per_token() // spec.num_layers


def host_cache(batch: int, positions: int, spec: ModelSpec, pin: bool) -> tuple[Tensor, Tensor]:
    """A batch's k and v caches ``[L, B, Hkv, Tmax, D]`` in host memory (pinned for a CUDA device)."""
    shape = (spec.num_layers, batch, spec.num_kv_heads, positions, spec.head_dim)
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
        self.bytes_in = 0  # copied host to device
        self.bytes_out = 0  # copied device to host

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

    def slot(self, index: int, k_host: Tensor) -> tuple[Tensor, Tensor]:
        """The views of batch ``index``'s slot shaped as its cache (``k_host``: ``[L, B, Hkv, T, D]``)."""
        slot = self._slots[index % KV_SLOTS]
        _, batch, _, positions, _ = k_host.shape
        return slot.k[:batch, :, :positions], slot.v[:batch, :, :positions]

    async def fetch(self, layer: int, index: int, caches: tuple[Tensor, Tensor], cached: int) -> None:
        """Copy positions ``0 .. cached`` of layer ``layer``'s cache into batch ``index``'s slot, once
        the slot's last store is done."""
        slot = self._slots[index % KV_SLOTS]
        if slot.stored is not None:
            await slot.stored
        if cached == 0:
            return
        k_dev, v_dev = self.slot(index, caches[0])
        started = time.perf_counter()
        for dst, src in ((k_dev, caches[0][layer]), (v_dev, caches[1][layer])):
            await self.driver.copy_any(dst[:, :, :cached], src[:, :, :cached])
            self.bytes_in += _nbytes(src[:, :, :cached])
        self._span(f"L{layer} b{index} in", started)

    def store(self, layer: int, index: int, caches: tuple[Tensor, Tensor], written: Sequence[int]) -> None:
        """Start copying positions ``written[0] .. written[1]`` of batch ``index``'s slot back to host
        RAM; the slot is filled again only once it is done."""
        slot = self._slots[index % KV_SLOTS]
        start, end = written
        slot.stored = asyncio.ensure_future(self._store(layer, index, caches, start, end))

    async def _store(
        self, layer: int, index: int, caches: tuple[Tensor, Tensor], start: int, end: int
    ) -> None:
        k_dev, v_dev = self.slot(index, caches[0])
        started = time.perf_counter()
        for dst, src in ((caches[0][layer], k_dev), (caches[1][layer], v_dev)):
            await self.driver.copy_any(dst[:, :, start:end], src[:, :, start:end])
            self.bytes_out += _nbytes(src[:, :, start:end])
        self._span(f"L{layer} b{index} out", started)

    def _span(self, name: str, started: float) -> None:
        if self.timeline is not None:
            self.timeline.span(KV_TRACK, name, started, time.perf_counter(), kind="kv")

    async def drain(self) -> None:
        """Wait for every store in flight (the end of a step: the host caches are whole)."""
        for slot in self._slots:
            if slot.stored is not None:
                await slot.stored


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
