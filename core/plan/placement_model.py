"""Where the planner's blocks live and what moving them costs: placement, transfer times, LRU reuse.

Placement follows the engine: the device keeps every weight when they all fit beside the KV cache
and activations (then nothing moves after the first step), else it streams each layer through LRU;
the host holds every block when its budget allows (blocks then come from RAM), else it stages a
window of layers from the drive; a CPU device with no host budget reads blocks from the drive
straight into its buffers (:func:`reads_into_device`). A transfer time is the slowest stage a block
passes (drive, decompression spread over the disk threads, host-to-device copy): blocks stream back
to back. The step model that uses these times is :mod:`klotski_tier.core.plan.pipeline_model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from klotski_tier.core.errors import BudgetError
from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.pipeline_model import BISECTIONS, Io, LayerWork
from klotski_tier.core.plan.routing_model import LayerLoads
from klotski_tier.core.runtime.config import (
    DEVICE_ACTIVATIONS,
    DEVICE_ATTENTION,
    DEVICE_KV,
    DISK_KV,
    HOST_ATTENTION,
    HOST_KV,
)
from klotski_tier.core.units import format_size
from klotski_tier.policies.lru import LRUEviction
from klotski_tier.policies.sweep import SweepEviction
from klotski_tier.tiers.disk_defaults import DEFAULT_CHUNK_BYTES

LRU, SWEEP = LRUEviction.name, SweepEviction.name  # the policies modelled (any other as LRU)


STAGED_LOOKAHEAD = 2  # staging the layer after next fills the drive's gaps; deeper gained nothing simulated


@dataclass(frozen=True)
class Placement:
    """Where the weights live while the plan runs."""

    device_resident: bool  # every weight stays in device memory after the first step
    home: str  # where blocks come from when they are loaded: "host" (RAM) or "disk"
    host_preload: bool  # read every block into host RAM before the first step
    host_window_layers: int  # home "disk": whole layers the host budget could hold
    compressed: bool  # read from a compressed store (it pays off against the plain bytes)
    expert_reuse: float = 0.0  # expected share of used experts still in device memory from earlier steps
    into_device: bool = False  # a CPU device with no host budget: the drive reads into device buffers
    eviction: str = LRU  # the device tier's eviction policy: "sweep" keeps a prefix of the layer sweep
    # L of [pipeline] lookahead_layers: 2 where blocks come from the drive through a host tier with room
    # for a layer (the layer after next is staged in RAM while the next moves to the device), else 1
    lookahead_layers: int = 1
    kv_home: str = DEVICE_KV  # where the KV cache lives: the device, host RAM or the drive (slots)
    kv_attention: str = DEVICE_ATTENTION  # where decode attention runs: the device, or the host's cores
    # With the cache in host RAM and both places for decode attention priced: the predicted decode
    # tokens/s of this placement's and of the other's
    kv_choice: tuple[float, float] | None = None
    activations_home: str = DEVICE_ACTIVATIONS  # where a prefill's residual streams wait between jobs
    kv_device_layers: int = 0  # with the cache away: its first layers that stay on the device

    def describe(self) -> str:
        text = self._weights() + self._kv()
        if self.activations_home != DEVICE_ACTIVATIONS:
            text += "; a prefill's residual streams wait in host RAM between their jobs (two device slots)"
        return text

    def _kv(self) -> str:
        if self.kv_home == DEVICE_KV:
            return ""
        where = "in host RAM" if self.kv_home == HOST_KV else "in files on the drive"
        lives = f"; the KV cache lives {where}"
        if self.kv_device_layers:
            first = self.kv_device_layers
            layers = "layer" if first == 1 else f"{first} layers"
            lives = f"; the KV cache of the first {layers} stays on the device, the rest lives {where}"
        if self.kv_attention == HOST_ATTENTION:
            text = (
                f"{lives} and decode attention over it runs there, on the host's cores (only queries, new "
                "entries and outputs cross the link)"
            )
            other = "streaming the cache through the device"
        else:
            text = f"{lives} and streams through two device slots of one layer"
            other = "attending on the host's cores"
        if self.kv_choice is not None:
            mine, theirs = self.kv_choice
            text += f": {mine:.4g} decode tokens/s predicted, against {theirs:.4g} {other}"
        return text

    def _weights(self) -> str:
        device = (
            "every weight stays in device memory"
            if self.device_resident
            else "layers stream through device memory"
        )
        if not self.device_resident and self.eviction == SWEEP and self.expert_reuse > 0:
            device = (
                f"about {self.expert_reuse:.0%} of the weights (the first layers of each step) stay in "
                "device memory, the rest streams through it"
            )
        if self.home == "host":
            return f"{device}; host RAM holds the whole model"
        store = "a compressed store" if self.compressed else "the checkpoint"
        if self.into_device:
            return f"{device}; blocks are read from {store} on the drive straight into device memory"
        if self.lookahead_layers > 1:
            ahead = (
                "the layer after next"
                if self.lookahead_layers == 2
                else f"{self.lookahead_layers - 1} layers"
            )
            return (
                f"{device}; blocks come from {store} on the drive through host RAM, which keeps what the "
                f"device does not and stages {ahead} while the next moves to the device"
            )
        return f"{device}; blocks come from {store} on the drive through host RAM (no room to stage ahead)"


def placement_for(
    cost: CostModel,
    fixed: int,
    device_budget: int,
    host_budget: int,
    preload: bool | None,
    ratio: float | None,
    disk_queue_depth: int,
) -> Placement:
    """The engine's placement for these budgets (see the module docstring)."""
    sizes = cost.sizes
    resident = fixed + sizes.total <= device_budget
    into_device = reads_into_device(cost, host_budget)
    if preload and host_budget < sizes.total:
        raise BudgetError(
            f"host preload needs the whole model in host memory ({format_size(sizes.total)}) but the host "
            f"budget is {format_size(host_budget)}; raise the host memory or turn preload off"
        )
    home = "host" if preload or (preload is None and host_budget >= sizes.total) else "disk"
    compressed = False
    if home == "disk" and ratio:
        plain, packed = cost.transfer(sizes.expert, "disk"), cost.transfer(sizes.expert, "disk", ratio)
        compressed = packed.bottleneck_s < plain.bottleneck_s
    window = host_budget // sizes.layer if home == "disk" else sizes.num_layers
    layers = min(window, sizes.num_layers)
    in_flight = host_in_flight_bytes(cost, disk_queue_depth)
    room = home == "disk" and not into_device and host_budget >= in_flight + sizes.layer
    lookahead = STAGED_LOOKAHEAD if room else 1
    return Placement(
        resident,
        home,
        home == "host",
        layers,
        compressed,
        into_device=into_device,
        lookahead_layers=lookahead,
    )


def kv_home_for(
    cost: CostModel,
    batches: int,
    batch_size: int,
    tokens: tuple[int, int],
    budgets: tuple[int, int],
    requested: str | None = None,
    activations: str = DEVICE_ACTIVATIONS,
) -> str | None:
    """Where the KV cache of ``batches`` x ``batch_size`` (``tokens``: prompt and new) lives under the
    (device, host) ``budgets``: ``requested`` if it fits, else the device when the group's cache fits
    there beside the largest block, else host RAM when it fits there (leaving room to stage a block)
    and the device holds its two slots, else files on the drive through the same slots; None when the
    device cannot hold even the slots."""
    device_budget, host_budget = budgets
    for home in [requested] if requested is not None else [DEVICE_KV, HOST_KV, DISK_KV]:
        fixed = cost.fixed_device_bytes(
            batches, batch_size, *tokens, kv_home=home, activations_home=activations
        )
        if fixed + cost.sizes.largest > device_budget:
            continue
        in_ram = batches * cost.kv_cache_bytes(batch_size, *tokens)
        if activations != DEVICE_ACTIVATIONS:  # the residual streams wait in host RAM too
            in_ram += batches * cost.residual_bytes(batch_size, tokens[0])
        if home == HOST_KV and in_ram + cost.sizes.largest > host_budget:
            continue
        return home
    return None


def host_in_flight_bytes(cost: CostModel, disk_queue_depth: int, stream_window: int = 0) -> int:
    """Host RAM blocks from the drive hold at once: each from its read until its copy, so the engine's
    reads in flight (one block per read its disk driver keeps in flight) and one copy, of the largest
    block; no more than the device's streaming window admits (``stream_window`` experts; 0: no window),
    since the device's reads are what the host reads for."""
    blocks = disk_queue_depth + 1
    return (min(blocks, stream_window) if stream_window else blocks) * cost.sizes.largest


def reads_into_device(cost: CostModel, host_budget: int) -> bool:
    """As :func:`klotski_tier.core.runtime.run.reads_into_device`: a CPU device's memory is host memory, so
    with a host budget of 0 the drive reads every block straight into its device buffer."""
    return cost.machine.device == "cpu" and host_budget == 0


def io_times(
    cost: CostModel,
    placement: Placement,
    ratio: float | None,
    *,
    steady: bool,
    misses: tuple[float, float] = (1, 1),
    disk_misses: tuple[float, float] | None = None,
) -> Io:
    """Expected transfer time per block: none once every weight is resident (``steady``), else its
    time from the placement's home times the chance that it must be loaded (``misses``: of the blocks
    every step uses, and of the experts; see :func:`lru_misses`). With a disk home, ``disk_misses``
    (default: ``misses``) are the chances that neither the device nor the host tier kept the block:
    the other device misses are copies from host RAM."""
    if steady and placement.device_resident:
        return Io(0.0, 0.0, 0.0, 0.0, 0.0)
    sizes, home = cost.sizes, placement.home
    ratio = ratio if placement.compressed else None
    always, experts = misses
    disk_always, disk_experts = disk_misses or misses

    def seconds(nbytes: int, miss: float = always, disk: float = disk_always) -> float:
        read = cost.transfer(nbytes, home, ratio, into_device=placement.into_device).bottleneck_s
        if home != "disk" or disk >= miss:
            return read * miss
        # the rest of the device's misses are copies from host RAM
        return read * disk + cost.transfer(nbytes, "host").bottleneck_s * (miss - disk)

    return Io(
        attn=seconds(sizes.attn),
        gate=seconds(sizes.gate),
        expert=seconds(sizes.expert, experts, disk_experts),
        embed=seconds(sizes.embed),
        head=seconds(sizes.head),
        parallel=_blocks_at_once(cost, ratio) if home == "disk" else 1,
        drive_share=cost.transfer(sizes.expert, home, ratio, into_device=placement.into_device).drive_share,
    )


def lru_misses(cost: CostModel, loads: tuple[LayerLoads, ...], capacity: int) -> tuple[float, float]:
    """The chance that a block a step uses is not resident from earlier steps: for the blocks every
    step uses, and for the experts (weighted by use). Steps route independently; with LRU a block
    survives j* steps where j* steps touch ``capacity`` bytes (Che's approximation); one step touches
    its blocks in layer order, so with less room than one step touches, nothing survives."""
    sizes = cost.sizes
    usage = np.stack([load.usage for load in loads])  # [L, E]
    always = _always_bytes(cost)

    def touched(steps: float) -> float:
        return always + sizes.expert * float((1.0 - (1.0 - usage) ** steps).sum())

    if capacity < touched(1.0):
        return 1.0, 1.0
    if capacity >= always + sizes.expert * float((usage > 0).sum()):
        return 0.0, 0.0
    low, high = 1.0, 2.0
    while touched(high) < capacity:
        low, high = high, 2 * high
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        low, high = (middle, high) if touched(middle) < capacity else (low, middle)
    return 0.0, float((usage * (1.0 - usage) ** low).sum() / max(float(usage.sum()), 1e-300))


def sweep_misses(
    cost: CostModel, loads: tuple[LayerLoads, ...], capacity: int, lru: tuple[float, float]
) -> tuple[float, float]:
    """As :func:`lru_misses` (``lru``: its answer), with the ``sweep`` eviction policy: it keeps a
    prefix of the layer sweep resident, ``capacity`` bytes of the blocks the steps touch, so a block a
    step needs is resident with the chance ``capacity`` / those bytes (the same share of every block
    kind; no worse than LRU). The blocks the steps touch are every expert any step may use: a step of
    few tokens uses few experts, but not the ones the step before kept."""
    missed = 1.0 - min(max(capacity, 0) / touched_bytes(cost, loads), 1.0)
    return min(lru[0], missed), min(lru[1], missed)


def touched_bytes(cost: CostModel, loads: tuple[LayerLoads, ...]) -> float:
    """Bytes of the blocks the steps touch over a run: those every step uses, and every expert any step
    may use (a step of few tokens uses few experts, but not the same ones as the step before)."""
    usage = np.stack([load.usage for load in loads])  # [L, E]
    return _always_bytes(cost) + cost.sizes.expert * float((usage > 0).sum())


def _always_bytes(cost: CostModel) -> int:
    """Bytes of the blocks every step uses: embedding, head, each layer's attention and gate."""
    sizes = cost.sizes
    return sizes.embed + sizes.head + sizes.num_layers * (sizes.attn + sizes.gate)


def _blocks_at_once(cost: CostModel, ratio: float | None) -> int:
    """Experts read at once: the disk pool's threads take one chunk of at most DEFAULT_CHUNK_BYTES each."""
    chunks = math.ceil(cost.sizes.expert / (ratio or 1.0) / DEFAULT_CHUNK_BYTES)
    return max(1, math.ceil(cost.machine.io_threads / chunks))


def window_of(placement: Placement, stream_window: int) -> int:
    """The streaming window the engine runs under ``placement`` (:func:`klotski_tier.core.runtime.run.
    stream_window_bytes`): ``stream_window`` where blocks come from the drive, else none (0)."""
    return stream_window if placement.home == "disk" else 0


def device_window_bytes(cost: CostModel, stream_window: int, experts: int) -> int:
    """Device bytes of blocks in use or moving at once while the device streams: a layer's attention
    and gate, and of the ``experts`` the pipeline would hold at once (a layer's used experts and the
    next layer's hot ones) at most ``stream_window``, as the engine caps them
    (:func:`klotski_tier.core.runtime.run.stream_window_bytes`; 0: no cap)."""
    sizes = cost.sizes
    held = experts if stream_window == 0 else min(experts, stream_window)
    return max(sizes.largest, sizes.attn + sizes.gate + held * sizes.expert)


def weights_working_set(
    cost: CostModel, placement: Placement, hot: int, work: tuple[LayerWork, ...], stream_window: int
) -> int:
    """Device bytes of weights the plan needs at once: all of them when resident, else one layer's used
    experts (leased until computed) plus the next layer's attention, gate and K hot experts, as far as
    the streaming window lets them take room at once (:func:`device_window_bytes`)."""
    sizes = cost.sizes
    if placement.device_resident:
        return sizes.total
    used = max((w.distinct_max for w in work), default=0)
    return device_window_bytes(cost, window_of(placement, stream_window), hot + used)
