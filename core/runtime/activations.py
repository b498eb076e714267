"""Activations that wait in host RAM: the residual streams of a prefill's batches between their jobs.

``[activations] home = "device"`` (the default): each batch's residual stream ``[B, T, H]`` stays on
the device for the whole step, so a prefill of n batches holds n of them there.

``[activations] home = "host"``: in a prefill step (where a batch's residual stream is as large as its
prompt), each batch's residual stream lives in host RAM (pinned on CUDA) and the device holds two
*slots*, each room for the largest batch's. Every job that reads or changes a batch's residual (its
embedding, attention, routing, combine and head) runs with it in slot ``k % 2``: it arrives while the
batch before computes (the pipeline asks for batch k+1's as soon as batch k's has arrived), and what
the job changed goes home behind it, the slot being refilled only once it has. The routed tokens and
their expert outputs, which the expert phase uses for every batch at once, stay on the device. Decode
steps keep their residuals (one token a sequence) on the device.

The copies run in the device tier's copy thread (runtime/kv.py's mechanism: on CUDA after the kernels
queued on the compute stream), and the pipeline awaits them as readiness futures, counting the waits
as bubbles of kind "activations".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.timeline import Timeline
from klotski_tier.tiers.device import DeviceDriver

__all__ = ["ACTIVATIONS_TRACK", "RESIDUAL_SLOTS", "HostResiduals"]

ACTIVATIONS_TRACK = "activations"  # the timeline's track of the residual streams' copies
RESIDUAL_SLOTS = 2  # device slots: one batch's residual being computed, the next one's arriving


@dataclass
class _Slot:
    buffer: Tensor  # [Bmax * Tmax * H] on the device
    stored: asyncio.Future[None] | None = None  # the last residual it held, going home


class HostResiduals:
    """Moves prefill residual streams between host RAM and two device slots (see above)."""

    def __init__(self, driver: DeviceDriver, spec: ModelSpec, timeline: Timeline | None = None) -> None:
        self.driver = driver
        self.spec = spec
        self.timeline = timeline
        self._slots: list[_Slot] = []
        self.bytes_in = 0  # copied into the device slots
        self.bytes_out = 0  # copied back home

    def reserve(self, batch: int, tokens: int) -> None:
        """Allocate the slots for batches of up to ``batch`` sequences of ``tokens`` prompt tokens."""
        size = batch * tokens * self.spec.hidden_size
        device = self.driver.device
        self._slots = [
            _Slot(torch.empty(size, dtype=self.spec.dtype, device=device)) for _ in range(RESIDUAL_SLOTS)
        ]

    def home(self, shape: tuple[int, ...]) -> Tensor:
        """A batch's residual stream ``[B, T, H]`` in host RAM (pinned for a CUDA device)."""
        return torch.empty(shape, dtype=self.spec.dtype, pin_memory=self.driver.device.type == "cuda")

    def slot(self, index: int, shape: tuple[int, ...]) -> Tensor:
        """Batch ``index``'s slot, viewed as its residual stream ``[B, T, H]``."""
        count = shape[0] * shape[1] * shape[2]
        return self._slots[index % RESIDUAL_SLOTS].buffer[:count].view(shape)

    async def claim(self, index: int) -> None:
        """Wait until batch ``index``'s slot holds no residual on its way home."""
        stored = self._slots[index % RESIDUAL_SLOTS].stored
        if stored is not None:
            await stored

    async def fetch(self, index: int, home: Tensor) -> Tensor:
        """Batch ``index``'s residual stream, copied from ``home`` into its slot once the slot is free."""
        await self.claim(index)
        started = time.perf_counter()
        slot = self.slot(index, tuple(home.shape))
        await self.driver.copy_any(slot, home)
        self.bytes_in += _nbytes(home)
        self._span(f"b{index} in", started)
        return slot

    def store(self, index: int, home: Tensor) -> None:
        """Start copying batch ``index``'s slot back to ``home``; the slot is refilled only after."""
        slot = self._slots[index % RESIDUAL_SLOTS]
        slot.stored = asyncio.ensure_future(self._store(index, home))

    async def _store(self, index: int, home: Tensor) -> None:
        started = time.perf_counter()
        await self.driver.copy_any(home, self.slot(index, tuple(home.shape)))
        self.bytes_out += _nbytes(home)
        self._span(f"b{index} out", started)

    async def drain(self) -> None:
        """Wait for every copy home (the end of a step)."""
        for slot in self._slots:
            if slot.stored is not None:
                await slot.stored

    async def drain_quietly(self) -> None:
        """Wait for the copies still running (the run is ending, maybe on an error)."""
        for slot in self._slots:
            if slot.stored is not None and not slot.stored.done():
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(slot.stored)

    def _span(self, name: str, started: float) -> None:
        if self.timeline is not None:
            self.timeline.span(ACTIVATIONS_TRACK, name, started, time.perf_counter(), kind="activations")


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()
