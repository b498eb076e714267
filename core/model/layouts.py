"""Block layouts: which file byte ranges make up each block, and how its buffer reads as tensors.

:func:`build_layouts` turns a :class:`Checkpoint` and its :class:`ModelSpec` into one
:class:`BlockLayout` per block (EMBED, ATTN l, GATE l, EXPERT l e, HEAD) with the view roles of
the table in :mod:`klotski_tier.core.model.blocks`. Every tensor's shape and dtype is checked against
the spec on the way, so a checkpoint that does not match its config fails here, at start-up,
naming the tensor. :func:`klotski_tier.core.store.files.open_model` opens a model with them.

A block's buffer is an image of its file ranges, so that a disk read needs no copy:

- the block's tensors are grouped into *runs*, per file, of tensors that lie at most
  :data:`RUN_GAP_BYTES` apart (an expert's three matrices are usually one run: safetensors stores
  tensors in name order);
- each run, widened to whole :data:`~klotski_tier.tiers.direct.DIRECT_ALIGN_BYTES` units, is one
  range of the buffer, placed at an aligned offset: a tensor sits at the same offset modulo 4 KiB
  in the buffer as in its file. :attr:`BlockLayout.reads` asks the disk tier for exactly these
  aligned ranges, which O_DIRECT reads straight into the buffer, the run's tensors in one request;
- a view spans several tensors where they lie back to back (a fused ``gate_up_proj``'s expert
  rows, or ``gate_proj`` right before ``up_proj``); where they do not (Mixtral's ``w1``, ``w2``,
  ``w3``: the down matrix between gate and up), the ``gate_up`` view is two, ``gate`` and ``up``
  (:data:`SPLIT_ROLES`), and the ops take either.

Widening costs at most 8 KiB per run of buffer and read; each run's part of the buffer is its size
rounded up plus one unit, whatever its offset, so that blocks of one shape have one size.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.model.blocks import (
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
from klotski_tier.core.units import align_down, align_up
from klotski_tier.tiers.direct import DIRECT_ALIGN_BYTES
from klotski_tier.tiers.ranges import ByteRange

logger = logging.getLogger(__name__)

Shape = tuple[int, ...]

RUN_GAP_BYTES = 16 * 1024
"""Tensors of a block this close in a file are read as one run (the gap's bytes are read too)."""

SPLIT_ROLES = {"gate_up": ("gate", "up"), "shared_gate_up": ("shared_gate", "shared_up")}
"""Views of two tensors that become two views where the tensors do not lie back to back."""


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


class SourceRange(NamedTuple):
    """A file byte range of a block: all of a tensor, or one expert's slice of a fused tensor."""

    name: str
    path: Path
    file_offset: int
    nbytes: int


@dataclass(frozen=True)
class _Sources:
    """Checked access to the checkpoint's tensors: shape and dtype must match the spec."""

    checkpoint: Checkpoint
    spec: ModelSpec
    sizes: dict[Path, int] = field(default_factory=dict)  # file sizes, read once per build

    def builder(self, block: BlockId) -> _BlockBuilder:
        return _BlockBuilder(block, self.spec.dtype, self.file_bytes)

    def file_bytes(self, path: Path) -> int:
        if path not in self.sizes:
            try:
                self.sizes[path] = path.stat().st_size
            except OSError as exc:
                raise CheckpointError(
                    f"cannot read {path}: {exc.strerror or exc}; check the checkpoint"
                ) from exc
        return self.sizes[path]

    def tensor(self, name: str, shape: Shape) -> SourceRange:
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
        return SourceRange(name, entry.path, entry.file_offset, entry.nbytes)

    def expert_slice(self, name: str, expert: int, shape: Shape) -> SourceRange:
        """Expert ``expert``'s [rows, cols] of the fused tensor ``name`` of ``shape`` [E, rows, cols]."""
        whole = self.tensor(name, shape)
        nbytes = whole.nbytes // shape[0]
        return SourceRange(name, whole.path, whole.file_offset + expert * nbytes, nbytes)


@dataclass
class _BlockBuilder:
    """Collects a block's views and their sources; :meth:`build` lays the buffer out as an image of
    the sources' file runs (see the module docstring)."""

    block: BlockId
    dtype: torch.dtype
    file_bytes: Callable[[Path], int]  # a file's size: the last run of a file stops at its end
    roles: list[tuple[str, Shape, tuple[SourceRange, ...]]] = field(default_factory=list)

    def add(self, role: str, shape: Shape, *sources: SourceRange) -> None:
        """View ``role`` of ``shape`` over ``sources`` back to back (split per :data:`SPLIT_ROLES`)."""
        assert len(sources) == 1 or role in SPLIT_ROLES, f"{self.block} {role}: one source per view"
        self.roles.append((role, shape, sources))

    def build(self) -> BlockLayout:
        sources = [source for _, _, group in self.roles for source in group]
        placed, reads, nbytes = place_runs(sources, self.file_bytes)
        pieces = [TensorPiece(s.name, s.path, s.file_offset, s.nbytes, placed[s]) for s in sources]
        views: list[TensorView] = []
        for role, shape, group in self.roles:
            offsets = [placed[s] for s in group]
            contiguous = all(offsets[i] + group[i].nbytes == offsets[i + 1] for i in range(len(group) - 1))
            if contiguous:
                views.append(TensorView(role, offsets[0], self.dtype, shape))
                continue
            rows = shape[0] // len(group)
            for part, offset in zip(SPLIT_ROLES[role], offsets, strict=True):
                views.append(TensorView(part, offset, self.dtype, (rows, *shape[1:])))
        for view in views:
            assert view.buffer_offset % view.dtype.itemsize == 0, f"{self.block} {view.role}: misaligned"
        return BlockLayout(self.block, tuple(pieces), tuple(views), nbytes, tuple(reads))


def place_runs(
    sources: list[SourceRange], file_bytes: Callable[[Path], int]
) -> tuple[dict[SourceRange, int], list[ByteRange], int]:
    """A block buffer laid out as an image of its sources' file runs (see the module docstring): each
    source's buffer offset, the aligned reads that fill the buffer, and the buffer's size."""
    unit = DIRECT_ALIGN_BYTES
    runs: list[tuple[list[SourceRange], int]] = []  # (sources in file order, end of the run in the file)
    for source in sorted(set(sources), key=lambda s: (str(s.path), s.file_offset)):
        end = source.file_offset + source.nbytes
        if runs and runs[-1][0][0].path == source.path and source.file_offset <= runs[-1][1] + RUN_GAP_BYTES:
            runs[-1] = (runs[-1][0] + [source], max(runs[-1][1], end))
        else:
            runs.append(([source], end))
    placed: dict[SourceRange, int] = {}
    reads: list[ByteRange] = []
    cursor = 0
    for run, run_end in runs:
        start = run[0].file_offset
        low, high = align_down(start, unit), align_up(run_end, unit)
        for source in run:
            placed[source] = cursor + source.file_offset - low
        stop = min(high, file_bytes(run[0].path))  # O_DIRECT reads stop short at the end of the file
        reads.append(ByteRange(run[0].path, low, stop - low, cursor))
        # Room for the widest widening whatever the run's offset, so that blocks of one shape (every
        # expert of a model) have one size: the ledger and the arena see them alike.
        cursor += align_up(run_end - start, unit) + unit  # >= high - low
    return placed, reads, cursor


def _embed(source: _Sources, family: Family) -> BlockLayout:
    spec = source.spec
    block = source.builder(embed_block())
    shape = (spec.vocab_size, spec.hidden_size)
    block.add("embed", shape, source.tensor(family.names.embed, shape))
    return block.build()


def _head(source: _Sources, family: Family) -> BlockLayout:
    spec, names = source.spec, family.names
    block = source.builder(head_block())
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
    block = source.builder(attn_block(layer))
    for role, name, shape in roles:
        block.add(role, shape, source.tensor(name.format(l=layer), shape))
    return block.build()


def _gate(source: _Sources, family: Family, expert_layout: ExpertLayout, layer: int) -> BlockLayout:
    spec, names = source.spec, family.names
    hidden, shared = spec.hidden_size, spec.shared_expert_intermediate_size
    router = names.fused.router if expert_layout is ExpertLayout.FUSED else names.per_expert.router
    block = source.builder(gate_block(layer))
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
    block = source.builder(expert_block(layer, expert))
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
