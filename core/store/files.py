"""A model opened for a run: a Hugging Face checkpoint directory or a packed store, checked, with the
layout of every block and (for a store) the store its blocks come from.

:func:`open_model` is the one call the engine, the planner and the bench make; it reads
``config.json`` and the safetensors headers (or the store's manifest), never the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.model.blocks import BlockId, BlockLayout
from klotski_tier.core.model.checkpoint import Checkpoint
from klotski_tier.core.model.families import ExpertLayout, family_of, parse_spec
from klotski_tier.core.model.layouts import build_layouts, total_block_bytes, weight_dtype
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.store.packed import PackedStore, looks_like_store, open_store
from klotski_tier.core.units import format_size

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelFiles:
    """A checkpoint opened and checked: its spec and the layout of every block."""

    checkpoint: Checkpoint | None  # None for a packed store
    spec: ModelSpec
    layouts: Mapping[BlockId, BlockLayout]
    expert_layout: ExpertLayout
    directory: Path
    store: PackedStore | None = None  # the packed store the blocks come from, if any


def open_model(path: str | Path) -> ModelFiles:
    """A Hugging Face checkpoint directory, or a store written by ``klotski-tier pack``."""
    path = Path(path)
    if not looks_like_store(path):
        return load_model_files(path)
    store = open_store(path)
    return ModelFiles(None, store.spec, store.layouts, store.expert_layout, path, store)


STORE_HINT = "give the Hugging Face checkpoint it was packed from"
"""What to do when a packed store is given where a checkpoint is needed (the default of ``store_hint``)."""


def load_model_files(directory: str | Path, *, store_hint: str = STORE_HINT) -> ModelFiles:
    """Open the checkpoint ``directory``, parse its config and lay out every block; any mismatch raises.

    A packed store is not a checkpoint: it is refused by name, with ``store_hint`` (what to give instead).
    """
    if looks_like_store(Path(directory)):
        raise CheckpointError(f"{directory} is a packed store, not a Hugging Face checkpoint; {store_hint}")
    checkpoint = Checkpoint.open(directory)
    spec = parse_spec(checkpoint.config, weight_dtype(checkpoint))
    expert_layout = family_of(spec.family).names.expert_layout(checkpoint.tensors)
    layouts = build_layouts(checkpoint, spec)
    logger.info(
        "%s: %s, %d layers x %d experts (%s), %d blocks, %s",
        checkpoint.directory,
        spec.family,
        spec.num_layers,
        spec.num_experts,
        expert_layout.value,
        len(layouts),
        format_size(total_block_bytes(layouts)),
    )
    return ModelFiles(checkpoint, spec, layouts, expert_layout, checkpoint.directory)
