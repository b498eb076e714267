"""Block layouts: which file byte ranges make up each block, and how its buffer reads as tensors.

:func:`build_layouts` turns a :class:`Checkpoint` and its :class:`ModelSpec` into one
:class:`BlockLayout` per block (EMBED, ATTN l, GATE l, EXPERT l e, HEAD) with the view roles of
the table in :mod:`klotski_tier.core.model.blocks`. Every tensor's shape and dtype is checked against
the spec on the way, so a checkpoint that does not match its config fails here, at start-up,
naming the tensor. :func:`klotski_tier.core.store.files.open_model` opens a model with them.

Each view starts at a buffer offset aligned to ``BUFFER_ALIGN_BYTES``. A view may be made of several
pieces placed back to back: a per-expert checkpoint's ``gate_proj`` and ``up_proj`` become one
``gate_up`` [2I, H] view, exactly as the fused layout stores them. In the fused layout expert
e's rows of ``gate_up_proj`` [E, 2I, H] are one contiguous file range, so each expert is still
one piece per view.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.model.blocks import (
    BUFFER_ALIGN_BYTES,
    BlockId,
    BlockLayout,
    TensorPiece,
    TensorView,
    attn_block,
    embed_block,
    expert_block,
    gate_block,
    head_block,
)
from klotski_tier.core.model.checkpoint import Checkpoint
from klotski_tier.core.model.families import ExpertLayout, Family, family_of
from klotski_tier.core.model.spec import ModelSpec, QKNorm
from klotski_tier.core.units import align_up

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]


def weight_dtype(checkpoint: Checkpoint) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's bytes; None without floating tensors."""
    counts: Counter[torch.dtype] = Counter()
    for entry in checkpoint.tensors.values():
        if entry.dtype.is_floating_point:
            counts[entry.dtype] += entry.nbytes
    return counts.most_common(1)[0][0] if counts else None


def largest_block_bytes(layouts: Mapping[BlockId, BlockLayout]) -> int:
    return max((layout.nbytes for layout in layouts.values()), default=0)


def total_block_bytes(layouts: Mapping[BlockId, BlockLayout]) -> int:
    return sum(layout.nbytes for layout in layouts.values())


def build_layouts(checkpoint: Checkpoint, spec: ModelSpec) -> dict[BlockId, BlockLayout]:
    """One layout per block, in model order: EMBED, then per layer ATTN, GATE, EXPERTs, then HEAD."""
    family = family_of(spec.family)
    source = _Sources(checkpoint, spec)
    expert_layout = family.names.expert_layout(checkpoint.tensors)
    layouts: dict[BlockId, BlockLayout] = {embed_block(): _embed(source, family)}
    for layer in range(spec.num_layers):
        layouts[attn_block(layer)] = _attention(source, family, layer)
        layouts[gate_block(layer)] = _gate(source, family, expert_layout, layer)
        for expert in range(spec.num_experts):
            layouts[expert_block(layer, expert)] = _expert(source, family, expert_layout, layer, expert)
    layouts[head_block()] = _head(source, family)
    return layouts


class _Source(NamedTuple):
    """A file byte range: all of a tensor, or one expert's slice of a fused tensor."""

    name: str
    path: Path
    file_offset: int
    nbytes: int


@dataclass(frozen=True)
class _Sources:
    """Checked access to the checkpoint's tensors: shape and dtype must match the spec."""

    checkpoint: Checkpoint
    spec: ModelSpec

    def tensor(self, name: str, shape: Shape) -> _Source:
        entry = self.checkpoint.entry(name)
        if entry.shape != shape:
            raise CheckpointError(
                f"tensor {name} has shape {entry.shape} but config.json implies {shape}; "
                "the checkpoint does not match its config"
            )
        if entry.dtype != self.spec.dtype:
            raise CheckpointError(
                f"tensor {name} has dtype {entry.dtype} but the model's dtype is {self.spec.dtype}; "
                "all weights must share the dtype config.json names"
            )
        return _Source(name, entry.path, entry.file_offset, entry.nbytes)

    def expert_slice(self, name: str, expert: int, shape: Shape) -> _Source:
        """Expert ``expert``'s [rows, cols] of the fused tensor ``name`` of ``shape`` [E, rows, cols]."""
        whole = self.tensor(name, shape)
        nbytes = whole.nbytes // shape[0]
        return _Source(name, whole.path, whole.file_offset + expert * nbytes, nbytes)


@dataclass
class _BlockBuilder:
    """Places views one after another, each at an aligned offset, and records their pieces."""

    block: BlockId
    dtype: torch.dtype
    pieces: list[TensorPiece] = field(default_factory=list)
    views: list[TensorView] = field(default_factory=list)
    end: int = 0

    def add(self, role: str, shape: Shape, *sources: _Source) -> None:
        """View ``role`` of ``shape`` over ``sources`` placed back to back."""
        start = cursor = align_up(self.end, BUFFER_ALIGN_BYTES)
        for source in sources:
            self.pieces.append(
                TensorPiece(source.name, source.path, source.file_offset, source.nbytes, cursor)
            )
            cursor += source.nbytes
        view = TensorView(role, start, self.dtype, shape)
        assert cursor - start == view.nbytes, f"{self.block} {role}: pieces hold {cursor - start} bytes"
        self.views.append(view)
        self.end = cursor

    def build(self) -> BlockLayout:
        nbytes = align_up(self.end, BUFFER_ALIGN_BYTES)
        return BlockLayout(self.block, tuple(self.pieces), tuple(self.views), nbytes)


def _embed(source: _Sources, family: Family) -> BlockLayout:
    spec = source.spec
    block = _BlockBuilder(embed_block(), spec.dtype)
    shape = (spec.vocab_size, spec.hidden_size)
    block.add("embed", shape, source.tensor(family.names.embed, shape))
    return block.build()


def _head(source: _Sources, family: Family) -> BlockLayout:
    spec, names = source.spec, family.names
    block = _BlockBuilder(head_block(), spec.dtype)
    block.add("final_norm", (spec.hidden_size,), source.tensor(names.final_norm, (spec.hidden_size,)))
    shape = (spec.vocab_size, spec.hidden_size)
    lm_head = names.embed if spec.tie_word_embeddings else names.lm_head
    block.add("lm_head", shape, source.tensor(lm_head, shape))
    return block.build()


def _attention(source: _Sources, family: Family, layer: int) -> BlockLayout:
    spec, names = source.spec, family.names
    hidden, q_size, kv_size = spec.hidden_size, spec.q_size, spec.kv_size
    roles: list[tuple[str, str, Shape]] = [
        ("input_norm", names.input_norm, (hidden,)),
        ("q", names.q, (q_size, hidden)),
        ("k", names.k, (kv_size, hidden)),
        ("v", names.v, (kv_size, hidden)),
        ("o", names.o, (hidden, q_size)),
    ]
    if spec.qkv_bias:
        roles += [("q_bias", names.q_bias, (q_size,)), ("k_bias", names.k_bias, (kv_size,))]
        roles += [("v_bias", names.v_bias, (kv_size,))]
    if spec.qkv_bias and family.o_bias_with_qkv:
        roles.append(("o_bias", names.o_bias, (hidden,)))
    if spec.qk_norm is not QKNorm.NONE:
        per_head = spec.qk_norm is QKNorm.PER_HEAD
        roles.append(("q_norm", names.q_norm, (spec.head_dim,) if per_head else (q_size,)))
        roles.append(("k_norm", names.k_norm, (spec.head_dim,) if per_head else (kv_size,)))
    block = _BlockBuilder(attn_block(layer), spec.dtype)
    for role, name, shape in roles:
        block.add(role, shape, source.tensor(name.format(l=layer), shape))
    return block.build()


def _gate(source: _Sources, family: Family, expert_layout: ExpertLayout, layer: int) -> BlockLayout:
    spec, names = source.spec, family.names
    hidden, shared = spec.hidden_size, spec.shared_expert_intermediate_size
    router = names.fused.router if expert_layout is ExpertLayout.FUSED else names.per_expert.router
    block = _BlockBuilder(gate_block(layer), spec.dtype)
    block.add("post_norm", (hidden,), source.tensor(names.post_norm.format(l=layer), (hidden,)))
    block.add(
        "router",
        (spec.num_experts, hidden),
        source.tensor(router.format(l=layer), (spec.num_experts, hidden)),
    )
    if shared:
        gate = source.tensor(names.shared_gate.format(l=layer), (shared, hidden))
        up = source.tensor(names.shared_up.format(l=layer), (shared, hidden))
        block.add("shared_gate_up", (2 * shared, hidden), gate, up)
        block.add(
            "shared_down",
            (hidden, shared),
            source.tensor(names.shared_down.format(l=layer), (hidden, shared)),
        )
        block.add(
            "shared_expert_gate",
            (1, hidden),
            source.tensor(names.shared_expert_gate.format(l=layer), (1, hidden)),
        )
    return block.build()


def _expert(
    source: _Sources, family: Family, expert_layout: ExpertLayout, layer: int, expert: int
) -> BlockLayout:
    spec = source.spec
    hidden, inter, experts = spec.hidden_size, spec.expert_intermediate_size, spec.num_experts
    block = _BlockBuilder(expert_block(layer, expert), spec.dtype)
    if expert_layout is ExpertLayout.FUSED:
        fused = family.names.fused
        gate_up = source.expert_slice(fused.gate_up.format(l=layer), expert, (experts, 2 * inter, hidden))
        block.add("gate_up", (2 * inter, hidden), gate_up)
        down = source.expert_slice(fused.down.format(l=layer), expert, (experts, hidden, inter))
        block.add("down", (hidden, inter), down)
        return block.build()
    names = family.names.per_expert
    gate = source.tensor(names.gate.format(l=layer, e=expert), (inter, hidden))
    up = source.tensor(names.up.format(l=layer, e=expert), (inter, hidden))
    block.add("gate_up", (2 * inter, hidden), gate, up)
    block.add("down", (hidden, inter), source.tensor(names.down.format(l=layer, e=expert), (hidden, inter)))
    return block.build()
