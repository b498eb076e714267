"""The streaming window and the exclusive host tier: what a step reads from the drive beyond what the
device and host RAM cannot hold.

Once the device is full, the blocks in use or on their way (leased, in flight, loaded ahead and not
used yet) take at most ``[pipeline] stream_window`` largest experts; a layer's experts stream through
that room while the rest of the device keeps blocks across steps. The host tier evicts its copies of
device blocks first, those the device keeps longest first.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.model.blocks import BlockKind, attn_block, expert_block, gate_block
from klotski_tier.core.model.layouts import total_block_bytes
from klotski_tier.core.observe.metrics import TierStats
from klotski_tier.core.observe.must_move import bytes_to_move, reads_per_step
from klotski_tier.core.plan.autoplan import PLANNED_FIELDS, plan_request
from klotski_tier.core.plan.hardware import local_machine
from klotski_tier.core.plan.planner import make_plan
from klotski_tier.core.plan.routing_model import RoutingModel, TraceRouting
from klotski_tier.core.runtime.ledger import Entry, TierLedger
from klotski_tier.core.runtime.residency import HOST
from klotski_tier.core.runtime.run import fixed_device_bytes, stream_window_bytes
from klotski_tier.core.store.files import ModelFiles, open_model
from klotski_tier.policies.lru import LRUEviction
from klotski_tier.policies.sweep import SweepEviction
from tests.checkpoints import HIDDEN_SIZE, make_checkpoint
from tests.conftest import BENCH_PROFILE
from tests.core.runtime.test_residency import files, residency, run

__all__ = ["files"]  # the residency tests' module fixture: a 4-expert checkpoint

PROMPTS = [[1 + (i * 7 + j) % 50 for j in range(6)] for i in range(8)]
NEW_TOKENS = 5
BENCH = local_machine(BENCH_PROFILE)  # a measured machine: its drive and compute rates do not change bytes


# ---- the ledger and the residency manager ------------------------------------------------------------


def test_a_full_device_streams_a_layer_through_its_window(files: ModelFiles) -> None:
    """Three experts requested at once through a window of two: two load (evicting two kept blocks),
    the third waits for a release and then takes the room of the expert just computed."""
    expert = files.layouts[expert_block(0, 0)].nbytes

    async def scenario() -> None:
        async with residency(files, device_bytes=4 * expert, eviction=SweepEviction) as res:
            for e in range(4):  # the device keeps layer 1's experts
                await res.release(await res.request(expert_block(1, e)))
            res.device.window_bytes = 2 * expert
            wanted = [res.request(expert_block(0, e)) for e in range(3)]
            first, second = await asyncio.gather(wanted[0], wanted[1])
            assert not wanted[2].done() and not res.device.entries[expert_block(0, 2)].reserved
            assert res.device.stats.evictions == 2 and res.device.window_used() == 2 * expert
            await res.release(first)
            third = await wanted[2]
            assert res.device.stats.evictions == 3 and expert_block(0, 0) not in res.device.entries
            kept = [block for block in res.device.entries if block.layer == 1]
            assert len(kept) == 2  # the window cost two kept blocks, not three
            await res.release(second)
            await res.release(third)

    run(scenario)


def test_a_demand_load_goes_past_a_window_that_no_release_will_empty(files: ModelFiles) -> None:
    """A window full of blocks loaded ahead (nobody leases them yet) refuses further reads ahead, but
    a demand load still goes: nothing it could wait for would ever be released."""
    expert = files.layouts[expert_block(0, 0)].nbytes

    async def scenario() -> None:
        async with residency(files, device_bytes=4 * expert) as res:
            for e in range(4):
                await res.release(await res.request(expert_block(1, e)))
            res.device.window_bytes = expert
            assert res.prefetch(expert_block(0, 0))
            await res.device.entries[expert_block(0, 0)].ready
            assert res.device.window_used() == expert  # loaded ahead, not used yet
            assert not res.prefetch(expert_block(0, 1))  # the window is full
            lease = await asyncio.wait_for(res.request(expert_block(0, 2)), timeout=60)
            await res.release(lease)
            res.passed(0)  # layer 0 is done: its unused block leaves the window
            assert res.device.window_used() == 0
            assert res.prefetch(expert_block(0, 1))

    run(scenario)


def test_attention_and_gate_never_wait_for_the_window(files: ModelFiles) -> None:
    """A window full of a leased expert holds further experts back, not attention and gate blocks:
    every step needs those, at once."""
    expert = files.layouts[expert_block(0, 0)].nbytes

    async def scenario() -> None:
        async with residency(files, device_bytes=4 * expert, eviction=SweepEviction) as res:
            for e in range(4):
                await res.release(await res.request(expert_block(1, e)))
            res.device.window_bytes = expert
            held = await res.request(expert_block(0, 0))
            assert not res.prefetch(expert_block(0, 1))  # an expert waits for the window
            assert res.prefetch(gate_block(0))  # a gate does not
            attention = await asyncio.wait_for(res.request(attn_block(0)), timeout=60)  # nor attention
            await res.release(attention)
            await res.release(held)

    run(scenario)


def test_the_host_evicts_copies_of_what_the_device_keeps_longest_first() -> None:
    """Held-above copies go first, in the order the faster tier gives (keeps longest first); then the
    policy's own order for the rest."""
    loop = asyncio.new_event_loop()
    try:
        ledger = TierLedger("host", 1 << 30, LRUEviction(), TierStats("host", 1 << 30))
        blocks = [expert_block(0, e) for e in range(4)]
        for block in blocks:
            ledger.entries[block] = Entry(block, 1, loop.create_future())
            ledger.eviction.on_insert(block, 1)
        ledger.held_above = lambda: [blocks[3], expert_block(5, 5), blocks[1]]  # one the host lacks
        assert list(ledger.victims()) == [blocks[3], blocks[1], blocks[0], blocks[2]]
    finally:
        loop.close()


# ---- through the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    """Eight experts a layer (a layer's used experts are more than a window of three), enough layers
    that the window is small beside the budgets, and experts larger than a layer's attention, as in
    real MoE models (an expert of intermediate size 4 x hidden)."""
    directory = tmp_path_factory.mktemp("wide")
    return open_model(
        make_checkpoint(directory, "mixtral", num_layers=12, num_experts=8, intermediate_size=4 * HIDDEN_SIZE)
    )


def _streamed(
    files: ModelFiles, device_room: int, host: int, **changes: object
) -> tuple[list[list[int]], int, int]:
    """(tokens, drive bytes, the bytes that must move) of a run whose device has ``device_room`` bytes
    beside its KV cache and activations, and host RAM ``host`` bytes."""
    probe = Engine.from_files(files, EngineOptions(device="cpu", batches=1, batch_size=8))
    fixed = fixed_device_bytes(files, probe._groups(PROMPTS, NEW_TOKENS), 8)
    options = EngineOptions(
        device="cpu", batches=1, batch_size=8, device_memory_bytes=fixed + device_room,
        host_memory_bytes=host, eviction="sweep", **changes,  # type: ignore[arg-type]
    )  # fmt: skip
    engine = Engine.from_files(files, options)
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, record_routing=True)
    assert result.routing is not None
    must = bytes_to_move(files.layouts, result.routing.steps, device_room + host)
    return [o.token_ids for o in result.outputs], result.metrics.disk_bytes_read, must


def _expert_bytes(files: ModelFiles) -> int:
    return max(layout.nbytes for block, layout in files.layouts.items() if block.kind is BlockKind.EXPERT)


def test_streaming_through_the_window_reads_what_the_device_cannot_keep(wide: ModelFiles) -> None:
    """A CPU device reading from the drive with room for a third of the model: the same tokens as
    without a window, fewer bytes, and at most 1.1x the bytes that must move."""
    room = total_block_bytes(wide.layouts) // 3
    windowed_tokens, windowed, must = _streamed(wide, room, 0)
    open_tokens, unwindowed, _ = _streamed(wide, room, 0, stream_window=0)
    assert windowed_tokens == open_tokens
    assert windowed < unwindowed
    assert windowed <= 1.1 * must, (windowed, must)


def test_host_ram_and_the_device_keep_distinct_blocks(wide: ModelFiles) -> None:
    """Host RAM holding half the model and the device a quarter: over the run, the drive reads at most
    1.1x the model once plus, each later step, what neither holds (the model less both budgets)."""
    total = total_block_bytes(wide.layouts)
    host, room = total // 2, total // 4
    _, read, _ = _streamed(wide, room, host)
    _, unwindowed, _ = _streamed(wide, room, host, stream_window=0)
    must = total + (NEW_TOKENS - 1) * (total - host - room)
    assert read <= 1.1 * must < unwindowed, (read, must, unwindowed)


def test_the_window_is_in_largest_experts_where_blocks_come_from_the_drive(wide: ModelFiles) -> None:
    """On where the drive feeds the device (no host tier, or host RAM smaller than the model); off
    where host RAM holds the whole model, when turned off, and for the sequential baseline."""
    total = total_block_bytes(wide.layouts)
    options = EngineOptions(stream_window=4, host_memory_bytes=0)
    assert stream_window_bytes(options, wide.layouts) == 4 * _expert_bytes(wide)
    assert stream_window_bytes(dataclasses.replace(options, host_memory_bytes=total // 2), wide.layouts)
    for off in (
        dataclasses.replace(options, host_memory_bytes=total),
        dataclasses.replace(options, host_memory_bytes=None),  # unlimited
        dataclasses.replace(options, host_memory_bytes=total // 2, host_preload=True),
        dataclasses.replace(options, stream_window=0),
        dataclasses.replace(options, schedule="sequential"),
    ):
        assert stream_window_bytes(off, wide.layouts) is None, off


def test_the_planner_predicts_a_steps_drive_reads_with_host_ram_holding_half(wide: ModelFiles) -> None:
    """Host RAM holding half the model and the device a quarter: every decode step reads at most 1.1x
    what neither tier can hold (the model less both budgets for weights), the planner, given the run's
    routes, says so of its plan too, and predicts the engine's mean step within 15 %."""
    total = total_block_bytes(wide.layouts)
    probe = Engine.from_files(wide, EngineOptions(device="cpu", batches=1, batch_size=8))
    fixed = fixed_device_bytes(wide, probe._groups(PROMPTS, NEW_TOKENS), 8)
    options = EngineOptions(
        device="cpu", batches=1, batch_size=8, hot_experts=2, device_memory_bytes=fixed + total // 4,
        host_memory_bytes=total // 2, eviction="sweep", lookahead_layers=2,
    )  # fmt: skip
    result = Engine.from_files(wide, options).generate(
        PROMPTS, max_new_tokens=NEW_TOKENS, record_routing=True, events=True
    )
    assert result.routing is not None and result.events is not None
    decode_steps = reads_per_step(result.events.events, wide.layouts, HOST)[1:]
    trace = RoutingModel(TraceRouting(result.routing))
    request = plan_request(wide, options, [len(p) for p in PROMPTS], NEW_TOKENS, set(PLANNED_FIELDS), BENCH)
    plan = make_plan(dataclasses.replace(request, routing=trace))
    unheld = total - total // 4 - total // 2
    assert abs(plan.unheld_bytes - unheld) <= 0.02 * total, (plan.unheld_bytes, unheld)
    assert len(decode_steps) == NEW_TOKENS - 1
    mean = sum(decode_steps) / len(decode_steps)  # a step's reads vary with the timing of its prefetches
    assert mean <= 1.1 * unheld, (decode_steps, unheld)
    assert plan.unheld_bytes <= plan.drive_bytes <= 1.1 * plan.unheld_bytes, plan
    assert mean <= plan.drive_bytes <= 1.2 * mean, (plan.drive_bytes, decode_steps)
