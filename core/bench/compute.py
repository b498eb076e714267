"""The compute measurements of ``klotski-tier bench``: one expert and one attention layer.

Times a model's layer-0 expert and attention (or, without a model, random weights of the demo's
shape) at a range of token counts, on the device the engine would use: the planner's compute
figures. Each is timed as the engine runs it: the pipeline's own job function (the expert with its
token selection and the scatter of its output, as :mod:`klotski_tier.core.runtime.pipeline` calls it) handed
to a :class:`ComputeRunner` and awaited from the event loop, so every figure includes the hand-off to
the compute thread. Experts cycle through ``EXPERT_COPIES`` copies of the weights: the engine runs
each block once per layer, never the same weights twice in a row, so they are not cache-hot.
``expert_s[0]`` (and ``attention_s[0]``, so both tables keep the same keys) is the hand-off alone: an
empty job awaited right after a one-token expert job (whose thread pool is still spinning for the
cores), what every job of the pipeline pays besides its work.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from klotski_tier.core.bench.profile import (
    ComputeProfile,
)
from klotski_tier.core.demo import shape as demo_shape
from klotski_tier.core.model import ops
from klotski_tier.core.model.blocks import (
    BlockLayout,
    BlockWeights,
    attn_block,
    expert_block,
)
from klotski_tier.core.model.spec import ModelSpec, QKNorm
from klotski_tier.core.runtime import model_jobs
from klotski_tier.core.runtime.compute import ComputeRunner
from klotski_tier.core.store.files import load_model_files
from klotski_tier.tiers.device import DeviceDriver
from klotski_tier.tiers.disk import DiskDriver

logger = logging.getLogger(__name__)
CONTEXT_TOKENS = 256  # cached keys each attention query attends to
COMPUTE_WARMUP_RUNS = 2  # untimed calls first: kernel selection, allocator, caches
COMPUTE_RUNS = 10  # timed calls; their mean without the slowest counts (see _mean_s)
SAMPLE_SEED = 0  # the random weights of the demo-shaped sample
EXPERT_COPIES = 4  # distinct copies of the expert's weights timed in turn (a few MiB each: not cache-hot)
OTHER_EXPERT = 1  # the expert id in the other routing slots (the timed one is expert 0)
HANDOFF_TOKENS = 0  # the key of the hand-off alone in ``expert_s``


def compute_device() -> torch.device:
    """The device the engine computes on: the GPU where there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_bench(model: Path | None, token_counts: tuple[int, ...]) -> ComputeProfile:
    """Seconds of one expert and of one attention layer per token count, on the compute device."""
    device = compute_device()
    spec, attn_w, expert_w = _model_weights(model, device)
    experts = _expert_copies(expert_w)
    expert_s, attention_s = asyncio.run(_time_jobs(spec, attn_w, experts, token_counts, device))
    dtype = str(spec.dtype).removeprefix("torch.")
    name = "demo" if model is None else str(model)
    return ComputeProfile(device.type, name, dtype, CONTEXT_TOKENS, expert_s, attention_s)


async def _time_jobs(
    spec: ModelSpec,
    attn_w: BlockWeights,
    experts: list[BlockWeights],
    token_counts: tuple[int, ...],
    device: torch.device,
) -> tuple[dict[int, float], dict[int, float]]:
    """Each job awaited through a :class:`ComputeRunner`, as the pipeline awaits it."""
    driver = DeviceDriver(device)
    runner = ComputeRunner(driver)
    try:
        expert_s = {t: await _mean_s(runner, _expert_call(spec, experts, t, device)) for t in token_counts}
        attention_s = {
            t: await _mean_s(runner, _attention_call(spec, attn_w, t, device)) for t in token_counts
        }
        handoff = await _handoff_s(runner, _expert_call(spec, experts, 1, device))
        expert_s[HANDOFF_TOKENS] = attention_s[HANDOFF_TOKENS] = handoff  # a job with no work
    finally:
        runner.close()
        await driver.aclose()
    return expert_s, attention_s


def expert_jobs(model: Path | None, token_counts: tuple[int, ...]) -> dict[int, Callable[[], object]]:
    """The pipeline's expert job over each token count, on :func:`compute_device`: the job
    :func:`compute_bench` times (``model``'s layer-0 expert 0, else demo-shaped weights)."""
    device = compute_device()
    spec, _, expert_w = _model_weights(model, device)
    experts = _expert_copies(expert_w)
    return {tokens: _expert_call(spec, experts, tokens, device) for tokens in token_counts}


def _expert_copies(expert_w: BlockWeights) -> list[BlockWeights]:
    """``EXPERT_COPIES`` distinct copies of the expert's weights (the first is ``expert_w``)."""
    copies = [{role: t.clone() for role, t in expert_w.items()} for _ in range(EXPERT_COPIES - 1)]
    return [expert_w, *copies]


def _expert_call(
    spec: ModelSpec, experts: list[BlockWeights], tokens: int, device: torch.device
) -> Callable[[], object]:
    """The pipeline's expert job: ``tokens`` gathered tokens that each chose expert 0 (and another)."""
    x = torch.randn(tokens, spec.hidden_size, dtype=spec.dtype, device=device)  # [M, H]
    topk_idx = torch.full((tokens, spec.top_k), OTHER_EXPERT, device=device)  # [M, k]
    topk_idx[:, 0] = 0
    topk_w = torch.rand(tokens, spec.top_k, device=device)  # [M, k] routing weights, float32 as Mixtral's
    dtype = ops.contribution_dtype(x.dtype, topk_w.dtype)
    out = torch.zeros(tokens, spec.top_k, spec.hidden_size, dtype=dtype, device=device)  # [M, k, H]
    weights = itertools.cycle(experts)
    return lambda: model_jobs._expert(x, topk_idx, topk_w, 0, next(weights), out)


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


async def _mean_s(runner: ComputeRunner, call: Callable[[], object]) -> float:
    """Mean wall time of ``call`` handed to ``runner`` and awaited, the hand-off included, without the
    slowest run. A mean, not a median: a decode step is the sum of its jobs, and on this CPU the
    hand-off after a multi-threaded op is heavy-tailed (its worker thread spins for the core the event
    loop needs), so a median understates what a step pays; the slowest run is a scheduler outlier."""
    seconds = await run_times(runner, call, COMPUTE_WARMUP_RUNS, COMPUTE_RUNS)
    return statistics.mean(sorted(seconds)[:-1])


async def run_times(runner: ComputeRunner, call: Callable[[], object], warmup: int, runs: int) -> list[float]:
    """Wall seconds of each of ``runs`` runs of ``call`` handed to ``runner`` and awaited (the hand-off
    included), after ``warmup`` untimed ones."""
    seconds = []
    for run in range(warmup + runs):
        start = time.perf_counter()
        await runner.run(call, finished=True)
        if run >= warmup:
            seconds.append(time.perf_counter() - start)
    return seconds


async def _handoff_s(runner: ComputeRunner, expert: Callable[[], object]) -> float:
    """Mean wall time (without the slowest) of an empty job awaited right after ``expert``."""
    seconds = []
    for run in range(COMPUTE_WARMUP_RUNS + COMPUTE_RUNS):
        await runner.run(expert, finished=True)
        start = time.perf_counter()
        await runner.run(_nothing, finished=True)
        if run >= COMPUTE_WARMUP_RUNS:
            seconds.append(time.perf_counter() - start)
    return statistics.mean(sorted(seconds)[:-1])


def _nothing() -> None:
    """The empty job."""


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
    shape = demo_shape.DEMO_SHAPE
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
        rms_norm_eps=demo_shape.RMS_NORM_EPS,
        rope_theta=shape.rope_theta,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        dtype=torch.bfloat16,
        eos_token_ids=(demo_shape.EOS_TOKEN_ID,),
        pad_token_id=None,
        bos_token_id=demo_shape.BOS_TOKEN_ID,
    )
