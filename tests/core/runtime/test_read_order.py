"""Disk reads reach the drive by urgency: demand, then the next attention and gate, then predicted experts.

The disk driver's pool serves jobs first come, first served, and a packed store checks each block's
bytes in a second job, submitted only when its read is done. Handed the next layer's attention and
its whole expert prefetch at once, the pool would check the attention behind every expert read, and
the attention phase would wait for the experts. The read queue of the residency manager admits reads
a few blocks at a time, the most urgent first, and holds predicted experts back while an urgent read
is in the driver.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

import pytest
import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.model.blocks import BlockId, attn_block, expert_block, gate_block
from klotski_tier.core.registry import Registry
from klotski_tier.core.runtime import run as runtime
from klotski_tier.core.runtime.read_queue import DEMAND, NEXT_WEIGHTS, SPECULATIVE, ReadQueue
from klotski_tier.core.store.pack import pack
from klotski_tier.core.store.packed import open_store
from klotski_tier.tiers.base import TierDriver
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.ranges import FileRange
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [40, 41, 42, 43]]
NEW_TOKENS = 2
NUM_LAYERS, NUM_EXPERTS = 3, 4
READ_DELAY_S = 0.01  # extra time of every chunk read (a slow drive): the prefetches queue up meanwhile
READ, CHECK = "read", "check"

T = TypeVar("T")


class RecordingDisk(DiskDriver):
    """A slow drive that logs each job as it is submitted: with one worker, the order its jobs run in."""

    log: ClassVar[list[tuple[str, str]]] = []  # (READ or CHECK, block)
    reading: ClassVar[dict[asyncio.Task[object] | None, str]] = {}  # the block each coroutine read last
    blocks: ClassVar[dict[int, str]] = {}  # the store's block at each file offset

    async def read_into(self, pieces: Sequence[FileRange], dst: torch.Tensor) -> None:
        block = RecordingDisk.blocks[pieces[0].file_offset]  # a packed store reads a block as one range
        RecordingDisk.reading[asyncio.current_task()] = block
        RecordingDisk.log.append((READ, block))
        await super().read_into(pieces, dst)

    async def run_blocking(self, job: Callable[[], T]) -> T:
        RecordingDisk.log.append((CHECK, RecordingDisk.reading[asyncio.current_task()]))  # the store's check
        return await super().run_blocking(job)

    def _read_chunk(self, fd: int, file_offset: int, view: memoryview) -> int:
        time.sleep(READ_DELAY_S)
        return super()._read_chunk(fd, file_offset, view)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_checkpoint(
        tmp_path_factory.mktemp("ckpt"), "mixtral", num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS
    )
    return pack(directory, tmp_path_factory.mktemp("packed") / "store").path


def whole_layer_prefetch(disk_driver: str) -> EngineOptions:
    """K = every expert: right after layer l routes, the attention, gate and all experts of l+1 are wanted.
    One read in flight, so the pool runs its jobs in the order they were submitted."""
    return EngineOptions(
        batches=2,
        batch_size=2,
        device="cpu",
        hot_experts=NUM_EXPERTS,
        prefetch="whole-layer",
        disk_driver=disk_driver,
        disk_queue_depth=1,
    )


def test_next_attention_and_gate_are_checked_before_any_expert_prefetch_is_read(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drivers: Registry[type[TierDriver]] = Registry(
        "tier driver", "klotski_tier.tiers", {"disk": "klotski_tier.tiers.disk:DiskDriver"}
    )
    drivers.register("recording-disk", RecordingDisk)  # a private registry: the global one stays as shipped
    monkeypatch.setattr(runtime, "TIER_DRIVERS", drivers)
    monkeypatch.setattr(RecordingDisk, "log", [])
    monkeypatch.setattr(RecordingDisk, "reading", {})
    opened = open_store(store)
    monkeypatch.setattr(RecordingDisk, "blocks", {opened.entry(b).offset: str(b) for b in opened.layouts})
    result = Engine.load(store, whole_layer_prefetch("recording-disk")).generate(
        PROMPTS, max_new_tokens=NEW_TOKENS
    )
    expected = Engine.load(store, whole_layer_prefetch("disk")).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]
    log = RecordingDisk.log
    for layer in range(1, NUM_LAYERS):  # layer 0's attention is read before any prediction exists
        for block in (str(attn_block(layer)), str(gate_block(layer))):
            read, check = log.index((READ, block)), log.index((CHECK, block))
            experts = [b for job, b in log[read:check] if job == READ and b.startswith(f"L{layer}.E")]
            assert not experts, f"{block} was checked behind the expert prefetches {experts}: {log}"
        first_expert = min(i for i, (job, b) in enumerate(log) if job == READ and b.startswith(f"L{layer}.E"))
        assert log.index((CHECK, str(attn_block(layer)))) < first_expert, log


class Reads:
    """Reads through a :class:`ReadQueue` whose urgencies the test sets; the first read holds its slot."""

    def __init__(self, slots: int, urgency: dict[BlockId, int]) -> None:
        self.urgency = urgency
        self.queue = ReadQueue(slots, lambda block: self.urgency[block])
        self.order: list[BlockId] = []  # blocks in the order they got a slot
        self.first_started = asyncio.Event()
        self.release_first = asyncio.Event()

    async def read(self, block: BlockId) -> None:
        async with self.queue.slot(block):
            self.order.append(block)
            if len(self.order) == 1:
                self.first_started.set()
                await self.release_first.wait()

    async def start(self, blocks: Sequence[BlockId]) -> list[asyncio.Task[None]]:
        """A task per block, in order; returns once the first holds its slot and the others have queued."""
        tasks = [asyncio.ensure_future(self.read(block)) for block in blocks]
        await self.first_started.wait()  # the other tasks took their first step before this one resumes
        return tasks


def test_demand_then_next_weights_then_predicted_experts() -> None:
    predicted = [expert_block(1, e) for e in range(4)]
    urgency = {
        **dict.fromkeys(predicted, SPECULATIVE),
        attn_block(2): NEXT_WEIGHTS,
        gate_block(2): NEXT_WEIGHTS,
    }

    async def scenario() -> list[BlockId]:
        reads = Reads(1, urgency)
        tasks = await reads.start([*predicted, attn_block(2), gate_block(2)])
        reads.urgency[predicted[3]] = DEMAND  # a gate selected it while its prefetch was queued
        reads.queue.dispatch()
        reads.release_first.set()
        await asyncio.gather(*tasks)
        return reads.order

    order = asyncio.run(scenario())
    assert order == [predicted[0], predicted[3], attn_block(2), gate_block(2), predicted[1], predicted[2]]


def test_no_predicted_expert_starts_while_the_next_attention_is_read() -> None:
    urgency = {attn_block(2): NEXT_WEIGHTS, expert_block(2, 0): SPECULATIVE}

    async def scenario() -> tuple[list[BlockId], list[BlockId]]:
        reads = Reads(2, urgency)
        tasks = await reads.start([attn_block(2), expert_block(2, 0)])
        during = list(reads.order)  # a slot is free, yet the expert must wait
        reads.release_first.set()
        await asyncio.gather(*tasks)
        return during, reads.order

    during, order = asyncio.run(scenario())
    assert during == [attn_block(2)]
    assert order == [attn_block(2), expert_block(2, 0)]


def test_a_cancelled_read_gives_its_place_back() -> None:
    blocks = [expert_block(0, 0), expert_block(0, 1), expert_block(0, 2)]

    async def scenario() -> list[BlockId]:
        reads = Reads(1, dict.fromkeys(blocks, DEMAND))
        tasks = await reads.start(blocks)
        tasks[1].cancel()  # waiting for a slot
        reads.release_first.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return reads.order

    assert asyncio.run(scenario()) == [blocks[0], blocks[2]]
