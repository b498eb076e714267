"""The bytes a run must move from the drive at least, from the routes it took: the yardstick of what
the engine reads.

The first step needs every block it uses (embedding, head, each layer's attention and gate, and the
experts its tokens selected). Each later step needs its blocks again, of which the memory tiers can
have kept at most ``hold`` bytes from before (the device's room beside its KV cache and activations,
plus host RAM's budget where blocks pass through it): it reads at least the rest. The bound ignores
the room blocks need while they move and are used, so an engine that reads within a few percent of it
keeps nearly everything its budgets allow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from klotski_tier.core.model.blocks import BlockId, BlockKind, BlockLayout, expert_block
from klotski_tier.core.observe.events import JOB, LOAD, Event

FIRST_JOB = "embed b0"
"""The label of every forward step's first job (its first batch's embedding): where a step begins."""


def bytes_to_move(layouts: Mapping[BlockId, BlockLayout], steps: Sequence[npt.ArrayLike], hold: int) -> int:
    """The lower bound above; ``steps``: each forward step's routes, ``[layers, tokens, k]``; ``hold``:
    bytes of block buffers the tiers keep. A block's buffer may be larger than what its reads take (a
    checkpoint's tensors are read from 4 KiB-aligned ranges into aligned slots): a later step reads at
    least its read bytes times the share of its buffer bytes that ``hold`` cannot keep."""
    dense = [layout for block, layout in layouts.items() if block.kind is not BlockKind.EXPERT]
    must = 0.0
    for index, routes in enumerate(steps):
        step = np.asarray(routes)
        used = dense + [
            layouts[expert_block(layer, int(e))]
            for layer in range(step.shape[0])
            for e in np.unique(step[layer])
        ]
        buffers, reads = sum(layout.nbytes for layout in used), sum(_read_bytes(layout) for layout in used)
        must += reads if index == 0 else reads * max(0.0, 1.0 - hold / buffers)
    return int(must)


def reads_per_step(events: Sequence[Event], layouts: Mapping[BlockId, BlockLayout], tier: str) -> list[int]:
    """Drive bytes of each forward step: the loads into ``tier`` (the tier every disk read lands in: the
    host's where blocks pass through host RAM) between the steps' first jobs, from an event log."""
    reads = {str(block): _read_bytes(layout) for block, layout in layouts.items()}
    steps: list[int] = []
    for event in events:
        if event.kind == JOB and event.subject == FIRST_JOB:
            steps.append(0)
        elif event.kind == LOAD and event.tier == tier and steps:
            steps[-1] += reads[event.subject]
    return steps


def _read_bytes(layout: BlockLayout) -> int:
    """Bytes the block's reads take from the drive (its buffer's size where it lists no reads)."""
    return sum(piece.nbytes for piece in layout.disk_reads) or layout.nbytes
