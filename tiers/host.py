"""The host tier: RAM buffers, page-locked (pinned) when a CUDA device will read them (``pin``: the
runtime asks for it when its compute device is CUDA, not merely when a GPU is present).

Pinned buffers let the device driver copy asynchronously on its own stream and let the disk
driver read straight into memory that the GPU can DMA from, so a block crosses host RAM once.
The host driver allocates and copies; it never decides what to keep (see ``core/residency``).
"""

from __future__ import annotations

import logging

import torch

from klotski_tier.core.errors import ConfigError
from klotski_tier.tiers.base import CopyDone, MemoryTierDriver, check_copy_args
from klotski_tier.tiers.hostmem import aligned_empty

logger = logging.getLogger(__name__)

HOST_COPY_THREADS = 1
"""Worker threads for host-to-host copies: one memcpy already runs near memory bandwidth."""


class HostDriver(MemoryTierDriver):
    """Allocates flat ``uint8`` host buffers (pinned when ``pin``) and copies host bytes into them."""

    name = "host"

    def __init__(self, *, pin: bool = False) -> None:
        if pin and not torch.cuda.is_available():
            raise ConfigError("pinned host memory needs CUDA, and no CUDA device is available; set pin false")
        super().__init__(max_workers=HOST_COPY_THREADS)
        self._pin = pin

    @property
    def pinned(self) -> bool:
        return self._pin

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A flat ``uint8`` CPU tensor of ``nbytes`` bytes starting on a page boundary, page-locked
        when :attr:`pinned`."""
        self._check_open()
        assert nbytes >= 0, f"cannot allocate a negative size ({nbytes} bytes)"
        if self._pin:  # the CUDA host allocator hands out page-aligned memory
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # [nbytes]
        return aligned_empty(nbytes)  # [nbytes] page-aligned, huge-page backed when large (tiers/hostmem)

    async def copy_from_host(self, dst: torch.Tensor, src: torch.Tensor) -> CopyDone:
        """Copy ``src`` into the host buffer ``dst`` in the driver's thread; done when it returns."""
        check_copy_args(dst, src)
        assert dst.device.type == "cpu", f"host tier buffers live on the CPU, got one on {dst.device}"
        await self._run_job(lambda: dst.copy_(src))
        self.bytes_copied += src.numel() * src.element_size()
        return CopyDone(None)
