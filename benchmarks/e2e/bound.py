"""The lower bound of a workload's time: what the hardware cannot do faster, whatever the scheduler.

    bound_s = max(compute_s, must_move_bytes / raw drive bandwidth)

- ``compute_s``: the engine's compute-busy time (``RunMetrics.compute_s``) for the same prompts,
  new tokens and batch grouping (n x bs) with every weight resident: unlimited budgets, every
  block preloaded into host RAM before the first step, so no step ever waits for the drive.
- raw drive bandwidth: one O_DIRECT sequential read of a test file on the checkpoint's drive,
  page cache evicted (:func:`klotski_tier.core.bench.suite.raw_direct_gbps`, as ``klotski-tier
  bench`` measures its 100 % reference), the median of a few reads, in the same run.
- ``must_move_bytes``: the fewest bytes any schedule must read from the drive under the budget.
  A *forward step* is one prefill or decode pass of a batch group (the trace's steps). Step s
  needs U_s: every non-expert block (embedding, head, each layer's attention and gate) and each
  expert that at least one token of the group's n batches selected in that layer (from the
  recorded routing, identical for every system since the tokens are). With R the bytes of weights
  the budget can keep resident (the weight budget less the KV cache and activations of the
  grouping), at most R bytes of U_s can be in memory when s starts, and only blocks some earlier
  step loaded: step s reads at least ``max(bytes(U_s) - R, bytes(U_s not needed by any earlier
  step))``. The first step starts cold (every page evicted). ``must_move_bytes`` sums that over
  the steps of the run.

With ``--bound-beside-reads`` the all-resident runs are timed again while the drive reads
``must_move_bytes`` of the model's files beside them (O_DIRECT, as fast as it goes, from the first
step): ``beside_reads_compute_s``. Where reading costs compute time (on a VM the hypervisor does the
virtual disk's work on the guest's cores; DMA shares the memory bandwidth), a schedule that overlaps
its reads with its compute perfectly still computes that long: ``max(beside_reads_compute_s,
io_s)`` is the bound such a schedule meets, reported beside the plain one.

Both terms are lower bounds of the total time (a run computes at least ``compute_s`` and reads
at least ``must_move_bytes``), so their maximum is one too: no system, this engine included, can
beat it; the benchmark reports each system's throughput as a fraction of it.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from klotski_tier.core.bench.suite import TEST_FILE_NAME, raw_direct_gbps, write_test_file
from klotski_tier.core.model.blocks import BlockId, BlockKind, BlockLayout, expert_block
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.units import GB

logger = logging.getLogger(__name__)

DRIVE_ROUNDS = 3  # raw reads of the test file; the median counts


def drive_gbps(directory: Path, file_bytes: int, rounds: int = DRIVE_ROUNDS) -> float:
    """Median raw O_DIRECT read bandwidth (GB/s) of a ``file_bytes`` test file written in ``directory``."""
    path = directory / TEST_FILE_NAME
    write_test_file(path, file_bytes)
    try:
        samples = [raw_direct_gbps(path) for _ in range(rounds)]
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
    logger.info("raw drive bandwidth %.2f GB/s (samples %s)", statistics.median(samples), samples)
    return statistics.median(samples)


def step_blocks(trace: RoutingTrace, layouts: Mapping[BlockId, BlockLayout]) -> list[set[BlockId]]:
    """U_s for every step s of ``trace``: the non-expert blocks and each expert some token selected."""
    fixed = {block for block in layouts if block.kind is not BlockKind.EXPERT}
    steps = []
    for routes in trace.steps:  # [L, T_s, k] int16
        needed = set(fixed)
        for layer in range(routes.shape[0]):
            needed.update(expert_block(layer, int(e)) for e in set(routes[layer].ravel().tolist()))
        steps.append(needed)
    return steps


def must_move_bytes(trace: RoutingTrace, layouts: Mapping[BlockId, BlockLayout], resident_bytes: int) -> int:
    """The fewest bytes a schedule keeping at most ``resident_bytes`` of weights must read (see above)."""
    resident = max(resident_bytes, 0)
    seen: set[BlockId] = set()
    total = 0
    for needed in step_blocks(trace, layouts):
        needed_bytes = sum(layouts[b].nbytes for b in needed)
        new_bytes = sum(layouts[b].nbytes for b in needed - seen)
        total += max(needed_bytes - resident, new_bytes)
        seen |= needed
    return total


@dataclass(frozen=True)
class Bound:
    """The lower bound of one workload at one budget and grouping, and its two terms."""

    compute_s: float  # compute busy with every weight resident (median of the repeats)
    must_move_bytes: int
    drive_gbps: float  # raw O_DIRECT
    resident_bytes: int  # R: weights the budget can keep resident
    generated_tokens: int
    batches: int  # the grouping the terms were measured at
    batch_size: int
    beside_reads_compute_s: float | None = None  # compute busy while the drive read must_move_bytes beside it

    @property
    def io_s(self) -> float:
        return self.must_move_bytes / (self.drive_gbps * GB)

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.io_s)

    @property
    def beside_reads_seconds(self) -> float | None:
        """max(compute beside the reads, I/O): the bound of a schedule whose reads overlap its compute
        perfectly, on a machine where reading costs compute time (a VM's virtual disk, shared memory
        bandwidth). None when not measured."""
        if self.beside_reads_compute_s is None:
            return None
        return max(self.beside_reads_compute_s, self.io_s)

    @property
    def limited_by(self) -> str:
        return "compute" if self.compute_s >= self.io_s else "drive"

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            io_s=self.io_s, seconds=self.seconds, limited_by=self.limited_by, tokens_per_s=self.tokens_per_s,
            beside_reads_seconds=self.beside_reads_seconds,
        )  # fmt: skip
        return data
