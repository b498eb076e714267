"""The compute measurements of ``klotski-tier bench``: one expert and one attention layer.

Times a model's layer-0 expert and attention (or, without a model, random weights of the demo's
shape) at a range of token counts, on the device the engine would use: the planner's compute
figures.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from klotski_tier.core import demo, ops
from klotski_tier.core.blocks import (
    BlockLayout,
    BlockWeights,
    attn_block,
    expert_block,
)
from klotski_tier.core.layouts import load_model_files
from klotski_tier.core.profile import (
    ComputeProfile,
)
from klotski_tier.core.spec import ModelSpec, QKNorm
from klotski_tier.tiers.disk import DiskDriver

logger = logging.getLogger(__name__)
CONTEXT_TOKENS = 256  # cached keys each attention query attends to
COMPUTE_WARMUP_RUNS = 2  # untimed calls first: kernel selection, allocator, caches
COMPUTE_RUNS = 5  # timed calls; the median counts
SAMPLE_SEED = 0  # the random weights of the demo-shaped sample


def compute_bench(model: Path | None, token_counts: tuple[int, ...]) -> ComputeProfile:
    """Median seconds of one expert and of one attention layer per token count, on the compute device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec, attn_w, expert_w = _model_weights(model, device)
    with torch.inference_mode():
        expert_s = {t: _median_s(_expert_call(spec, expert_w, t, device), device) for t in token_counts}
        attention_s = {t: _median_s(_attention_call(spec, attn_w, t, device), device) for t in token_counts}
    dtype = str(spec.dtype).removeprefix("torch.")
    name = "demo" if model is None else str(model)
    return ComputeProfile(device.type, name, dtype, CONTEXT_TOKENS, expert_s, attention_s)


def _expert_call(spec: ModelSpec, w: BlockWeights, tokens: int, device: torch.device) -> Callable[[], object]:
    x = torch.randn(tokens, spec.hidden_size, dtype=spec.dtype, device=device)  # [M, H]
    weights = torch.rand(tokens, device=device)  # [M] routing weights, float32 as Mixtral's
    return lambda: ops.expert(x, w, weights)


def _attention_call(
    spec: ModelSpec, w: BlockWeights, tokens: int, device: torch.device
) -> Callable[[], object]:
    """One decode step of ``tokens`` sequences, each attending to ``CONTEXT_TOKENS`` cached keys."""
    h = torch.randn(tokens, 1, spec.hidden_size, dtype=spec.dtype, device=device)  # [B, 1, H]
    cache_shape = (tokens, spec.num_kv_heads, CONTEXT_TOKENS + 1, spec.head_dim)
    k_cache = torch.randn(cache_shape, dtype=spec.dtype, device=device)  # [B, Hkv, C+1, D]
    v_cache = torch.randn(cache_shape, dtype=spec.dtype, device=device)  # [B, Hkv, C+1, D]
    positions = torch.full((tokens, 1), CONTEXT_TOKENS, device=device)  # [B, 1]
    key_lengths = torch.full((tokens,), CONTEXT_TOKENS + 1, device=device)  # [B]
    return lambda: ops.attention(h, w, spec, k_cache, v_cache, positions, key_lengths)


def _median_s(call: Callable[[], object], device: torch.device) -> float:
    seconds = []
    for run in range(COMPUTE_WARMUP_RUNS + COMPUTE_RUNS):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        if run >= COMPUTE_WARMUP_RUNS:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_weights(model: Path | None, device: torch.device) -> tuple[ModelSpec, BlockWeights, BlockWeights]:
    """Layer 0's attention and expert 0 of ``model`` (read by the disk tier), else demo-shaped ones."""
    if model is None:
        return _demo_weights(device)
    files = load_model_files(model)
    layouts = [files.layouts[attn_block(0)], files.layouts[expert_block(0, 0)]]
    attn, expert = (
        {role: t.to(device) for role, t in layout.tensors(buffer).items()}
        for layout, buffer in zip(layouts, asyncio.run(read_blocks(layouts)), strict=True)
    )
    return files.spec, attn, expert


async def read_blocks(layouts: list[BlockLayout]) -> list[torch.Tensor]:
    """Each block's buffer [nbytes] uint8, read through the disk tier."""
    async with DiskDriver() as disk:
        buffers = [torch.zeros(layout.nbytes, dtype=torch.uint8) for layout in layouts]
        for layout, buffer in zip(layouts, buffers, strict=True):
            await disk.read_into(layout.pieces, buffer)
    return buffers


def _demo_weights(device: torch.device) -> tuple[ModelSpec, BlockWeights, BlockWeights]:
    """Random weights of the demo's shape (scaled as the demo's: std 1/sqrt(inputs)), built in memory."""
    spec = demo_spec()
    generator = torch.Generator().manual_seed(SAMPLE_SEED)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        values = torch.randn(rows, cols, generator=generator) / math.sqrt(cols)  # [rows, cols] float32
        return values.to(dtype=spec.dtype, device=device)

    hidden, inter = spec.hidden_size, spec.expert_intermediate_size
    attn = {
        "input_norm": torch.ones(hidden, dtype=spec.dtype, device=device),
        "q": matrix(spec.q_size, hidden),
        "k": matrix(spec.kv_size, hidden),
        "v": matrix(spec.kv_size, hidden),
        "o": matrix(hidden, spec.q_size),
    }
    return spec, attn, {"gate_up": matrix(2 * inter, hidden), "down": matrix(hidden, inter)}


def demo_spec() -> ModelSpec:
    """The :class:`ModelSpec` of the demo model: Mixtral numerics, the dimensions of ``DEMO_SHAPE``."""
    shape = demo.DEMO_SHAPE
    return ModelSpec(
        family="mixtral",
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        expert_intermediate_size=shape.intermediate_size,
        shared_expert_intermediate_size=0,
        norm_topk_prob=True,
        router_weights_in_model_dtype=False,
        qk_norm=QKNorm.NONE,
        qkv_bias=False,
        clip_qkv=None,
        rms_norm_eps=demo.RMS_NORM_EPS,
        rope_theta=shape.rope_theta,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        dtype=torch.bfloat16,
        eos_token_ids=(demo.EOS_TOKEN_ID,),
        pad_token_id=None,
        bos_token_id=demo.BOS_TOKEN_ID,
    )
