"""Blocks: the unit of movement between tiers, and how a block's bytes become tensors.

A block is what the tiers move and the residency manager tracks:

==========  =====  ======  ===================================================================
kind        layer  expert  tensors (view roles)
==========  =====  ======  ===================================================================
EMBED       -1     -1      ``embed`` [V, H]
ATTN        l      -1      ``input_norm`` [H], ``q`` [Hq*D, H], ``k``/``v`` [Hkv*D, H], ``o`` [H, Hq*D],
                           optional ``q_bias``/``k_bias``/``v_bias``/``o_bias``, ``q_norm``/``k_norm``
GATE        l      -1      ``post_norm`` [H], ``router`` [E, H]; with a shared expert also
                           ``shared_gate_up`` [2S, H], ``shared_down`` [H, S], ``shared_expert_gate`` [1, H]
EXPERT      l      e       ``gate_up`` [2I, H] (gate rows first) or ``gate``, ``up`` [I, H]; ``down`` [H, I]
HEAD        -1     -1      ``final_norm`` [H], ``lm_head`` [V, H] (the embedding when tied)
==========  =====  ======  ===================================================================

A block's bytes live in one flat ``uint8`` buffer of :attr:`BlockLayout.nbytes`. Each
:class:`TensorPiece` says which file byte range lands where in that buffer; each
:class:`TensorView` says how to look at a buffer range as a typed tensor. The buffer is an image
of the block's file ranges (:mod:`klotski_tier.core.model.layouts`), so one view spans two pieces
only where they lie back to back in the file (``gate_proj`` right before ``up_proj``); where they
do not (Mixtral's ``w1`` and ``w3``, ``w2`` between them), ``gate_up`` is two views, ``gate`` and
``up`` [I, H] (``shared_gate_up`` likewise), and the ops take either.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from klotski_tier.tiers.ranges import ByteRange, FileRange


class BlockKind(enum.Enum):
    EMBED = "embed"
    ATTN = "attn"
    GATE = "gate"
    EXPERT = "expert"
    HEAD = "head"


@functools.total_ordering
@dataclass(frozen=True)
class BlockId:
    """Names one block: ``BlockId(BlockKind.EXPERT, layer=3, expert=5)`` prints as ``L3.E5``."""

    kind: BlockKind
    layer: int = -1
    expert: int = -1

    def __hash__(self) -> int:
        # Blocks key every ledger, policy and queue: hash the plain fields once (an enum hashes slowly).
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.kind.value, self.layer, self.expert))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __str__(self) -> str:
        if self.kind is BlockKind.EXPERT:
            return f"L{self.layer}.E{self.expert}"
        if self.layer >= 0:
            return f"L{self.layer}.{self.kind.name.lower()}"
        return self.kind.name.lower()

    # Enums do not order; sort by the kind's value so ``order=True`` works.
    def __lt__(self, other: object) -> bool:
        if not isinstance(other, BlockId):
            return NotImplemented
        return (self.kind.value, self.layer, self.expert) < (other.kind.value, other.layer, other.expert)


def embed_block() -> BlockId:
    return BlockId(BlockKind.EMBED)


def head_block() -> BlockId:
    return BlockId(BlockKind.HEAD)


def attn_block(layer: int) -> BlockId:
    return BlockId(BlockKind.ATTN, layer)


def gate_block(layer: int) -> BlockId:
    return BlockId(BlockKind.GATE, layer)


def expert_block(layer: int, expert: int) -> BlockId:
    return BlockId(BlockKind.EXPERT, layer, expert)


@dataclass(frozen=True)
class TensorPiece:
    """``nbytes`` bytes at ``file_offset`` of ``path`` go to ``buffer_offset`` of the block buffer."""

    tensor_name: str
    path: Path
    file_offset: int
    nbytes: int
    buffer_offset: int


@dataclass(frozen=True)
class TensorView:
    """The buffer range at ``buffer_offset`` seen as a tensor of ``dtype`` and ``shape``."""

    role: str
    buffer_offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


@dataclass(frozen=True)
class BlockLayout:
    """Where a block's bytes come from and how its buffer is read as tensors.

    ``reads``: the file ranges a disk read of the whole block asks for, where they differ from the
    pieces (a checkpoint's: each run of nearby tensors widened to whole 4 KiB units, so that O_DIRECT
    reads them straight into the buffer, several tensors in one request); empty: the pieces.
    """

    block: BlockId
    pieces: tuple[TensorPiece, ...]
    views: tuple[TensorView, ...]
    nbytes: int
    reads: tuple[ByteRange, ...] = ()

    @property
    def disk_reads(self) -> tuple[FileRange, ...]:
        """What to read from disk to fill the buffer: :attr:`reads`, else the pieces."""
        return self.reads or self.pieces

    def tensors(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views of ``buffer`` (flat uint8, ``nbytes`` long) by role; no copy."""
        assert buffer.dtype == torch.uint8 and buffer.numel() >= self.nbytes, (
            f"{self.block}: buffer of {buffer.numel()} bytes cannot hold {self.nbytes}"
        )
        out: dict[str, torch.Tensor] = {}
        for view in self.views:
            raw = buffer[view.buffer_offset : view.buffer_offset + view.nbytes]
            out[view.role] = raw.view(view.dtype).view(view.shape)
        return out


BlockWeights = Mapping[str, torch.Tensor]
"""The tensors of one resident block, by view role (see the table above)."""
