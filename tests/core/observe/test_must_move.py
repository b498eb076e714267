"""The bytes a run must move at least: the first step's blocks, then what each later step uses beyond
what the tiers can keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from klotski_tier.core.model.blocks import BlockId, BlockLayout, attn_block, expert_block, gate_block
from klotski_tier.core.observe.must_move import bytes_to_move
from klotski_tier.tiers.ranges import ByteRange

EXPERT, DENSE = 100, 40


def _layouts(read_share: float = 1.0) -> dict[BlockId, BlockLayout]:
    """Two layers of four experts; each block's reads take ``read_share`` of its buffer."""
    blocks = {attn_block(layer): DENSE for layer in range(2)} | {
        gate_block(layer): DENSE for layer in range(2)
    }
    blocks |= {expert_block(layer, e): EXPERT for layer in range(2) for e in range(4)}
    reads = lambda nbytes: (ByteRange(Path("m.safetensors"), 0, int(nbytes * read_share), 0),)  # noqa: E731
    return {block: BlockLayout(block, (), (), nbytes, reads(nbytes)) for block, nbytes in blocks.items()}


def test_the_first_step_moves_what_it_uses_and_later_ones_what_the_tiers_cannot_keep() -> None:
    first = np.array([[[0, 1], [1, 2]], [[3, 0], [3, 3]]])  # [layers, tokens, k]: experts 0-2, then 0 and 3
    later = np.array([[[0, 0]], [[1, 1]]])  # one expert a layer
    uses_first, uses_later = 4 * DENSE + 5 * EXPERT, 4 * DENSE + 2 * EXPERT
    assert bytes_to_move(_layouts(), [first], hold=0) == uses_first
    assert bytes_to_move(_layouts(), [first, later], hold=100) == uses_first + uses_later - 100
    assert bytes_to_move(_layouts(), [first, later, later], hold=10_000) == uses_first  # all kept


def test_reads_smaller_than_their_buffers_count_as_read() -> None:
    step = np.array([[[0, 1]], [[2, 3]]])
    buffers = 4 * DENSE + 4 * EXPERT
    half = bytes_to_move(_layouts(0.5), [step, step], hold=buffers // 2)
    assert half == pytest.approx(buffers / 2 + buffers / 4, abs=1)  # a half-read first step, then half of it


def test_a_steps_reads_are_the_loads_into_the_reading_tier_between_first_jobs() -> None:
    from klotski_tier.core.observe.events import JOB, LOAD, Event
    from klotski_tier.core.observe.must_move import FIRST_JOB, reads_per_step

    def load(block: BlockId, tier: str = "host") -> Event:
        return Event(0.0, LOAD, str(block), tier)

    events = [
        load(attn_block(0)),  # before the first step: not counted
        Event(0.0, JOB, FIRST_JOB),
        load(attn_block(0)), load(expert_block(0, 1)), load(expert_block(0, 1), "device"),
        Event(0.0, JOB, "L0 attention"),
        Event(0.0, JOB, FIRST_JOB),
        load(expert_block(1, 2)),
    ]  # fmt: skip
    assert reads_per_step(events, _layouts(0.5), "host") == [(DENSE + EXPERT) // 2, EXPERT // 2]
    assert reads_per_step(events, _layouts(), "device") == [EXPERT, 0]
