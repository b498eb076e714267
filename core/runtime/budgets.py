"""The tiers' byte budgets: the user's, or derived from the memory this process may really use.

A budget the user did not give (``None``: no flag, or ``"unlimited"`` in a config file) is not
"unlimited" any more: beyond what the process may hold, a tier only gets the process killed (in
a container, by the kernel's OOM killer, without a message). So it is derived from the
:class:`~klotski_tier.core.memory.MemoryLimit` (the cgroup's limit, or the machine's available
memory), less what is in use when the run starts (the interpreter, torch, the opened model:
measured, not guessed) and less :func:`reserve_bytes`, the memory the runtime holds outside its
tiers:

- on a CPU device, device and host memory are one pool: the device gets the pool (or what the
  user's host budget leaves), and the host tier what the device's budget leaves, or nothing when
  that is less than a block (blocks are then read from disk straight into device buffers, and
  nothing is held twice); with ``host.preload`` and neither budget given, the host tier gets the
  model and the device the rest;
- on CUDA the device budget stays the GPU's, and the host tier gets the pool.

A budget the user gave is kept, but one the process cannot hold (more than the limit itself, or more
than the pool where the model would fill it) is refused before anything loads, as is a pool below the
minimum working set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from klotski_tier.core.errors import BudgetError
from klotski_tier.core.memory import MemoryLimit
from klotski_tier.core.model.layouts import largest_block_bytes, total_block_bytes
from klotski_tier.core.runtime.config import EngineOptions
from klotski_tier.core.store.files import ModelFiles
from klotski_tier.core.units import MIB, format_size
from klotski_tier.tiers.device import resolve_device
from klotski_tier.tiers.disk_defaults import DEFAULT_CHUNK_BYTES
from klotski_tier.tiers.hostmem import POOL_MAX_FREE_BYTES

MARGIN_BYTES = 128 * MIB
MARGIN_FRACTION = 0.02
"""A margin of :data:`MARGIN_BYTES` plus this part of the limit is kept free for what grows during a
run: compute temporaries, thread pools, allocator slack."""

GIVEN, DERIVED = "yours", "derived"


@dataclass(frozen=True)
class Budgets:
    """The device and host budgets a run uses (bytes; None: unlimited, a CUDA device's own memory),
    where each comes from (:data:`GIVEN` or :data:`DERIVED`), and the limit they were derived from."""

    device_bytes: int | None
    device_source: str
    host_bytes: int | None
    host_source: str
    limit: MemoryLimit
    reserve_bytes: int  # held by the runtime outside the tiers (see reserve_bytes)

    @property
    def pool_bytes(self) -> int:
        """What the tiers may fill together: the limit less what is in use and the runtime's reserve."""
        return _pool(self.limit, self.reserve_bytes)

    def apply(self, options: EngineOptions) -> EngineOptions:
        """``options`` with these budgets."""
        return dataclasses.replace(
            options, device_memory_bytes=self.device_bytes, host_memory_bytes=self.host_bytes
        )

    def describe(self) -> str:
        """``"device 400.00 MiB (yours), host 1.10 GiB (derived: cgroup v1 limit ..., reserve 128 MiB)"``."""
        parts = [f"device {_size(self.device_bytes, 'the GPU')} ({self.device_source})"]
        parts.append(f"host {_size(self.host_bytes, 'unlimited')} ({self.host_source})")
        if DERIVED in (self.device_source, self.host_source):
            parts.append(
                f"from {self.limit.describe()}, {format_size(self.reserve_bytes)} kept for the runtime"
            )
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_bytes": self.device_bytes,
            "device_source": self.device_source,
            "host_bytes": self.host_bytes,
            "host_source": self.host_source,
            "limit_bytes": self.limit.limit_bytes,
            "limit_kind": self.limit.kind,
            "limit_path": str(self.limit.path),
            "in_use_bytes": self.limit.used_bytes,
            "reserve_bytes": self.reserve_bytes,
        }


def reserve_bytes(options: EngineOptions, limit: MemoryLimit) -> int:
    """Memory the runtime holds outside its tiers' budgets: reads in flight (the page cache a buffered
    chunk fills before it is dropped, and O_DIRECT bounce buffers), the host mapping pool's free
    buffers, and a margin for compute temporaries (:data:`MARGIN_FRACTION`)."""
    reads = 2 * options.disk_queue_depth * DEFAULT_CHUNK_BYTES
    margin = MARGIN_BYTES + int(limit.limit_bytes * MARGIN_FRACTION)
    return reads + POOL_MAX_FREE_BYTES + margin


def auto_note(options: EngineOptions, limit: MemoryLimit) -> str:
    """What budgets left out ("auto") are derived from, in words (``config show``)."""
    kept = format_size(reserve_bytes(options, limit))
    return (
        f"budgets are derived when a run starts from {limit.describe()}, less {kept} kept for "
        "the runtime: on a CPU device the device and host tiers share what is left; on CUDA the host "
        "tier gets it"
    )


def _pool(limit: MemoryLimit, reserve: int) -> int:
    return max(0, limit.free_bytes - reserve)


def resolve_budgets(files: ModelFiles, options: EngineOptions, limit: MemoryLimit) -> Budgets:
    """The budgets of a run of ``files`` with ``options`` under ``limit`` (see the module docstring).

    Raises :class:`BudgetError` (one line, naming the limit) when a budget the user gave cannot be
    held, or when the derived pool cannot hold the largest block.
    """
    reserve = reserve_bytes(options, limit)
    pool = _pool(limit, reserve)
    model = total_block_bytes(files.layouts)
    block = largest_block_bytes(files.layouts)
    device, host = options.device_memory_bytes, options.host_memory_bytes
    device_source = GIVEN if device is not None else DERIVED
    host_source = GIVEN if host is not None else DERIVED
    if pool < block:
        raise _too_small(pool, block, limit, reserve)
    cpu = resolve_device(options.device).type == "cpu"
    if cpu:
        _check_given(device, host, model, pool, limit, reserve)
        if device is None and host is None and options.host_preload:
            host = min(model, max(0, pool - block))  # preload wants the model in the host tier
            host_source = DERIVED
        if device is None:
            device = max(0, pool - min(host or 0, model))  # the host tier never holds more than the model
            if device < block:
                raise BudgetError(
                    f"the host budget {format_size(host or 0)} leaves {format_size(device)} of the "
                    f"{format_size(pool)} this process may use ({limit.describe()}) for the device, "
                    f"below the largest block {format_size(block)}; lower --host-memory or give "
                    "--device-memory"
                )
        if host is None:
            rest = pool - device
            host = rest if rest >= block else 0  # less than a block: read straight into the device
    else:
        device_source = GIVEN if device is not None else "the GPU"
        _check_given(None, host, model, pool, limit, reserve)
        if host is None:
            host = pool
    return Budgets(device, device_source, host, host_source, limit, reserve)


def _check_given(
    device: int | None, host: int | None, model: int, pool: int, limit: MemoryLimit, reserve: int
) -> None:
    """Refuse budgets the user gave that exceed the limit itself (no model size makes them true), or
    whose tiers, filled with the model, would exceed the pool."""
    for name, value in (("device", device), ("host", host)):
        if value is not None and value > limit.limit_bytes:
            raise BudgetError(
                f"the {name} budget {format_size(value)} is more than this process may ever hold "
                f"({limit.describe()}); give at most {format_size(limit.limit_bytes)}, or leave "
                f"--{name}-memory out to derive it"
            )
    holds = min(device or 0, model) + min(host or 0, model)
    if holds > pool:
        given = " and ".join(
            f"{name} budget {format_size(value)}"
            for name, value in (("device", device), ("host", host))
            if value
        )
        raise BudgetError(
            f"the {given} would hold {format_size(holds)} of this {format_size(model)} model, "
            f"more than the {format_size(pool)} this process may use ({limit.describe()}, "
            f"{format_size(reserve)} kept for the runtime); lower them, or leave --host-memory out to "
            "derive it"
        )


def _too_small(pool: int, block: int, limit: MemoryLimit, reserve: int) -> BudgetError:
    return BudgetError(
        f"{limit.describe()}: that leaves {format_size(pool)} for the tiers after {format_size(reserve)} "
        f"kept for the runtime, below the minimum working set {format_size(block)} (the largest block); "
        "raise the memory limit"
    )


def _size(nbytes: int | None, none: str) -> str:
    return none if nbytes is None else format_size(nbytes)
