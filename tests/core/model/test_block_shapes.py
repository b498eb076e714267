"""The shapes a store is checked against are the shapes checkpoints are laid out with: for every
family, expert layout and option, :func:`layouts_problem` accepts the layouts :func:`build_layouts`
makes, and the blocks it requires are exactly the blocks built."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from klotski_tier.core.model.block_shapes import index_problem, layouts_problem, model_blocks
from klotski_tier.core.model.blocks import BlockId, BlockKind, attn_block, expert_block, head_block
from klotski_tier.core.store.files import load_model_files
from tests.checkpoints import FAMILIES
from tests.conftest import CheckpointFactory

OPTIONS: list[dict[str, Any]] = [
    {},
    {"fused": True},
    {"dtype": torch.bfloat16, "shards": 2},
    {"tie_word_embeddings": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "fused", "bf16-sharded", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_layouts_have_the_expected_shapes(
    checkpoint_factory: CheckpointFactory, family: str, options: dict[str, Any]
) -> None:
    files = load_model_files(checkpoint_factory(family, **options))
    assert list(model_blocks(files.spec)) == list(files.layouts)
    assert layouts_problem(files.spec, files.layouts) is None


def test_every_changed_shape_is_a_problem(checkpoint_factory: CheckpointFactory) -> None:
    files = load_model_files(checkpoint_factory("qwen2_moe"))
    for field in ("vocab_size", "hidden_size", "expert_intermediate_size", "shared_expert_intermediate_size"):
        other = dataclasses.replace(files.spec, **{field: getattr(files.spec, field) + 2})
        assert layouts_problem(other, files.layouts) is not None, field
    fewer = dict(files.layouts)
    del fewer[expert_block(1, 0)]
    assert layouts_problem(files.spec, fewer) == "block L1.E0 is missing"


@pytest.mark.parametrize(
    "block",
    [
        attn_block(-1),
        expert_block(0, 99),
        expert_block(99, 0),
        BlockId(BlockKind.HEAD, 0),
        BlockId(BlockKind.GATE, 1, 2),
    ],
    ids=str,
)
def test_indices_out_of_range(checkpoint_factory: CheckpointFactory, block: BlockId) -> None:
    spec = load_model_files(checkpoint_factory("qwen2_moe")).spec
    assert index_problem(spec, block) is not None
    assert index_problem(spec, head_block()) is None and index_problem(spec, expert_block(1, 3)) is None
