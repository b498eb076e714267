"""Decode attention where the KV cache lives: on the host's cores, over the cache in host RAM.

``[kv] attention = "host"`` (with ``[kv] home = "host"``): in a decode step, a batch's attention is cut
in three, as FlexGen and MoE-Lightning run it:

1. on the device, the input norm and the q/k/v projections (:func:`~klotski_tier.core.model.ops.project`);
2. on the host, in a thread of its own: the new k and v entries are written into the batch's cache in
   host RAM and the queries attend over it (:func:`~klotski_tier.core.model.ops.attend_cache`);
3. on the device, the output projection and the residual
   (:func:`~klotski_tier.core.model.ops.attention_output`).

Only the queries, the new entries and the output cross the link (a few KiB per sequence), never the
cache. The pipeline runs part 1 of batch k+1 and part 3 of batch k-1 on the device while part 2 of
batch k runs on the host. Prefill stays on the device (its attention is arithmetic-bound, and its cache
has nothing to read yet): its entries go home through the slots (runtime/kv.py).

On a CPU device the same path runs (the "device" and the host are one memory, the copies are plain
copies), so it is tested for exactness on any machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from klotski_tier.core.model import ops
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.timeline import Timeline
from klotski_tier.tiers.device import DeviceDriver

__all__ = ["HOST_ATTENTION_TRACK", "HostAttention"]

HOST_ATTENTION_TRACK = "host attention"  # the timeline's track of the attention on the host's cores


class HostAttention:
    """Runs part 2 (see above) of each batch's decode attention in a host thread."""

    def __init__(self, driver: DeviceDriver, spec: ModelSpec, timeline: Timeline | None = None) -> None:
        self.driver = driver
        self.spec = spec
        self.timeline = timeline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="klotski-host-attention")
        self.busy_s = 0.0  # seconds the host thread spent attending
        self.bytes_out = 0  # queries and new entries copied device to host
        self.bytes_in = 0  # outputs copied host to device

    async def attend(
        self,
        layer: int,
        index: int,
        caches: tuple[Tensor, Tensor],
        parts: tuple[Tensor, Tensor, Tensor, Tensor],
        positions: Tensor,
        key_lengths: Tensor,
    ) -> None:
        """Attend batch ``index``'s queries over its cache of layer ``layer`` in host RAM (``caches``: k
        and v ``[B, Hkv, T, D]``). ``parts``: its q, k, v from the device and the device buffer its
        output goes to."""
        q, k, v, out = parts
        host = [torch.empty(t.shape, dtype=t.dtype) for t in (q, k, v, positions, key_lengths)]
        for dst, src in zip(host, (q, k, v, positions, key_lengths), strict=True):
            await self.driver.copy_any(dst, src)
        self.bytes_out += sum(t.numel() * t.element_size() for t in host[:3])
        q_h, k_h, v_h, positions_h, lengths_h = host
        loop = asyncio.get_running_loop()
        k_cache, v_cache = caches
        args = (q_h, k_h, v_h, k_cache, v_cache, positions_h, lengths_h, self.spec)
        started = time.perf_counter()
        result = await loop.run_in_executor(self._executor, _inference, ops.attend_cache, args)
        ended = time.perf_counter()
        self.busy_s += ended - started
        if self.timeline is not None:
            self.timeline.span(HOST_ATTENTION_TRACK, f"L{layer} b{index}", started, ended)
        await self.driver.copy_any(out, result)
        self.bytes_in += result.numel() * result.element_size()

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _inference(fn: Callable[..., Tensor], args: tuple[Any, ...]) -> Tensor:
    """``fn(*args)`` in inference mode (the host thread's job)."""
    with torch.inference_mode():
        return fn(*args)
