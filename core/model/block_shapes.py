"""What a model's blocks must be, from its spec alone: which blocks it has, and each block's views.

:func:`model_blocks` lists every block a run of the model may need (the table of
:mod:`klotski_tier.core.model.blocks`), :func:`expected_views` gives each block's view roles and
shapes as ``config.json`` implies them, and :func:`layout_problem` says what is wrong with a block
layout that does not match. :mod:`klotski_tier.core.model.layouts` builds layouts with these
shapes from a checkpoint; a packed store's layouts come from its manifest and are checked with
:func:`layout_problem` when the store is opened, so a store that opens has every block the model
needs, each shaped as its config says (tests check that the two agree for every family).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from klotski_tier.core.model.blocks import (
    BlockId,
    BlockKind,
    BlockLayout,
    attn_block,
    embed_block,
    expert_block,
    gate_block,
    head_block,
)
from klotski_tier.core.model.families import family_of
from klotski_tier.core.model.layouts import RUN_GAP_BYTES, SPLIT_ROLES
from klotski_tier.core.model.spec import ModelSpec, QKNorm
from klotski_tier.tiers.direct import DIRECT_ALIGN_BYTES

Shape = tuple[int, ...]

MAX_WIDENING_BYTES_PER_VIEW = RUN_GAP_BYTES + 2 * DIRECT_ALIGN_BYTES
"""What a block's buffer may hold beyond its views' bytes, per view: the gap a run may span and
its widening to whole alignment units (see :func:`~klotski_tier.core.model.layouts.place_runs`)."""


def model_blocks(spec: ModelSpec) -> Iterator[BlockId]:
    """Every block of the model, in model order: EMBED, per layer ATTN, GATE and EXPERTs, HEAD."""
    yield embed_block()
    for layer in range(spec.num_layers):
        yield attn_block(layer)
        yield gate_block(layer)
        for expert in range(spec.num_experts):
            yield expert_block(layer, expert)
    yield head_block()


def index_problem(spec: ModelSpec, block: BlockId) -> str | None:
    """Why ``block`` cannot be a block of the model (an index out of range), or None."""
    layered = block.kind in (BlockKind.ATTN, BlockKind.GATE, BlockKind.EXPERT)
    layer_ok = 0 <= block.layer < spec.num_layers if layered else block.layer == -1
    expert_ok = 0 <= block.expert < spec.num_experts if block.kind is BlockKind.EXPERT else block.expert == -1
    if layer_ok and expert_ok:
        return None
    return (
        f"has layer {block.layer}, expert {block.expert}: out of range for a model of "
        f"{spec.num_layers} layers x {spec.num_experts} experts"
    )


def expected_views(spec: ModelSpec, block: BlockId) -> dict[str, Shape]:
    """The view roles of ``block`` and their shapes as the spec implies them (split roles joined)."""
    builders = {
        BlockKind.EMBED: _embed,
        BlockKind.HEAD: _head,
        BlockKind.ATTN: _attention,
        BlockKind.GATE: _gate,
        BlockKind.EXPERT: _expert,
    }
    return builders[block.kind](spec)


def layout_problem(spec: ModelSpec, layout: BlockLayout) -> str | None:
    """What in ``layout`` contradicts the spec (a role, shape or dtype; a declared size), or None."""
    found = {view.role: view.shape for view in layout.views}
    joined = dict(found)
    for role, (first, second) in SPLIT_ROLES.items():
        if first in joined and second in joined and joined[first] == joined[second]:
            rows, *rest = joined.pop(first)
            joined.pop(second)
            joined[role] = (2 * rows, *rest)
    expected = expected_views(spec, layout.block)
    if joined != expected or len(found) != len(layout.views):
        return f"has views {_describe(found)} where config.json implies {_describe(expected)}"
    wrong_dtype = [view.role for view in layout.views if view.dtype != spec.dtype]
    if wrong_dtype:
        return f"has views {', '.join(wrong_dtype)} in a dtype other than the model's {spec.dtype}"
    views_bytes = sum(view.nbytes for view in layout.views)
    most = views_bytes + len(layout.views) * MAX_WIDENING_BYTES_PER_VIEW
    if layout.nbytes > most:
        return f"declares {layout.nbytes} bytes where its views need at most {most}"
    return None


def layouts_problem(spec: ModelSpec, layouts: Mapping[BlockId, BlockLayout]) -> str | None:
    """The first block that keeps ``layouts`` from running the model (out of range, misshapen or
    missing), as ``"block L1.E3 is missing"``; None when every block the model needs is there."""
    for block, layout in layouts.items():
        problem = index_problem(spec, block) or layout_problem(spec, layout)
        if problem is not None:
            return f"block {block} {problem}"
    missing = next((block for block in model_blocks(spec) if block not in layouts), None)
    return None if missing is None else f"block {missing} is missing"


def _describe(views: Mapping[str, Shape]) -> str:
    return ", ".join(f"{role} {list(shape)}" for role, shape in sorted(views.items())) or "none"


def _embed(spec: ModelSpec) -> dict[str, Shape]:
    return {"embed": (spec.vocab_size, spec.hidden_size)}


def _head(spec: ModelSpec) -> dict[str, Shape]:
    return {"final_norm": (spec.hidden_size,), "lm_head": (spec.vocab_size, spec.hidden_size)}


def _attention(spec: ModelSpec) -> dict[str, Shape]:
    hidden, q_size, kv_size = spec.hidden_size, spec.q_size, spec.kv_size
    views: dict[str, Shape] = {
        "input_norm": (hidden,),
        "q": (q_size, hidden),
        "k": (kv_size, hidden),
        "v": (kv_size, hidden),
        "o": (hidden, q_size),
    }
    if spec.qkv_bias:
        views |= {"q_bias": (q_size,), "k_bias": (kv_size,), "v_bias": (kv_size,)}
    if spec.qkv_bias and family_of(spec.family).o_bias_with_qkv:
        views["o_bias"] = (hidden,)
    if spec.qk_norm is not QKNorm.NONE:
        per_head = spec.qk_norm is QKNorm.PER_HEAD
        views["q_norm"] = (spec.head_dim,) if per_head else (q_size,)
        views["k_norm"] = (spec.head_dim,) if per_head else (kv_size,)
    return views


def _gate(spec: ModelSpec) -> dict[str, Shape]:
    hidden, shared = spec.hidden_size, spec.shared_expert_intermediate_size
    views: dict[str, Shape] = {"post_norm": (hidden,), "router": (spec.num_experts, hidden)}
    if shared:
        views |= {
            "shared_gate_up": (2 * shared, hidden),
            "shared_down": (hidden, shared),
            "shared_expert_gate": (1, hidden),
        }
    return views


def _expert(spec: ModelSpec) -> dict[str, Shape]:
    hidden, inter = spec.hidden_size, spec.expert_intermediate_size
    return {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}
