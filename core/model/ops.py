"""Functional compute ops: one transformer layer's pieces, exact against Hugging Face transformers.

Every op takes the tensors it needs as a :data:`~klotski_tier.core.model.blocks.BlockWeights` mapping
(one block's tensors by view role, see the table in :mod:`klotski_tier.core.model.blocks`), so the
pipeline can run it on whichever copy of a block the tiers made ready. Ops hold no state.

One layer, as the pipeline composes them (``N`` = valid tokens of all sequences, flattened)::

    h = attention(h, attn_w, spec, k_cache, v_cache, positions, key_lengths)  # [B, T, H]
    x, idx, wts = route(h_valid, gate_w, spec)                                 # [N, H], [N, k], [N, k]
    per (token, slot) routed to e: c[token, slot] = expert(x[tokens], w_e, wts[tokens, slots])
    h_valid = combine(h_valid, c, shared_expert(x, gate_w, spec))

Numerics follow transformers 5 (``modeling_{mixtral,qwen2_moe,qwen3_moe,olmoe}.py``) with its
default ``grouped_mm`` experts (``integrations/moe.py``) op by op: the same casts, the same
operation order, the same fused ``gate_up`` matmul for routed experts, routing weights applied
in their own precision, and each token's k contributions summed in one reduction cast once to
the model dtype. Bit-identity of a matmul also assumes that a row's result does not depend on
which other rows share the call, which holds for the CPU bfloat16 kernels tested (float32
kernels differ in the last bits with the row count: float32 is compared within a tolerance).

Measured on CPU (torch 2.13, transformers 5.24): bit-identical to transformers in bfloat16,
prefill and decode, where the CPU multiplies bfloat16 natively; on one without (AVX2), the
projections and experts of four rows or more are computed in float32 and rounded once
(:func:`linear`), as fast as the CPU's float32 and equal up to the order of the sums, within the
bf16 rule of the tests (``tests/numerics.py``). The router and the LM head keep the bf16 kernel.
Decode queries of sequences with different key lengths attend one sequence
at a time over exactly their own keys: over a masked tail the bf16 SDPA kernel reduces in
another order. On CUDA, transformers' grouped GEMM and unmasked SDPA pick other kernels than
these calls: expect float tolerance there, not bit identity.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from klotski_tier.core.model.blocks import BlockWeights
from klotski_tier.core.model.spec import ModelSpec, QKNorm

logger = logging.getLogger(__name__)

ROPE_CHANNEL_STEP = 2
"""RoPE rotates channel pairs: one inverse frequency per two channels of a head (D/2 in all)."""

_INV_FREQ_CACHE_SIZE = 8
"""Distinct (rope_theta, head_dim) pairs whose inverse frequencies are kept; one per loaded model."""


WIDEN_MIN_ROWS = 4
"""Rows from which a bfloat16 matmul on a CPU without native bfloat16 runs widened (see :func:`linear`)."""

WIDEN_CHUNK_ROWS = 512
"""Weight rows widened to float32 at a time: 2 MiB for a 1024-wide matrix, so each chunk stays in cache."""


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX); without it (AVX2) the bf16
    GEMM takes a path whose time grows with every row: 4.7x float32's at 64 rows on an AVX2 EPYC."""
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, bias)`` [..., In] x [Out, In] -> [..., Out], in the input dtype.

    On a CPU without native bfloat16 (:func:`native_bf16_matmul`), a bfloat16 product of at least
    :data:`WIDEN_MIN_ROWS` rows is computed in float32, :data:`WIDEN_CHUNK_ROWS` weight rows at a time
    (bf16 -> float32 is exact), and rounded to bfloat16 once, as the bf16 kernel rounds its float32
    accumulator: the same value up to the order of the sums (the numerics rule of the tests, not bit
    identity), 2.4x faster than the bf16 kernel at 8 rows and 4.7x at 64 on that CPU. Elsewhere, and for
    fewer rows (a decode step's few tokens per expert, where the bf16 kernel is as fast), ``F.linear``.
    """
    if (
        x.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or w.dtype != torch.bfloat16
        or native_bf16_matmul()
    ):
        return F.linear(x, w, bias)
    rows = x.numel() // x.shape[-1]
    if rows < WIDEN_MIN_ROWS:
        return F.linear(x, w, bias)
    xt = x.reshape(rows, x.shape[-1]).to(torch.float32).T  # [In, M]
    out_t = torch.empty(w.shape[0], rows, dtype=torch.float32)  # [Out, M]: each chunk's rows contiguous
    for start in range(0, w.shape[0], WIDEN_CHUNK_ROWS):
        stop = start + WIDEN_CHUNK_ROWS
        torch.mm(w[start:stop].to(torch.float32), xt, out=out_t[start:stop])
    out = out_t.T  # [M, Out]
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype).contiguous().reshape(*x.shape[:-1], w.shape[0])


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim, computed in fp32 and scaled in the input dtype, as transformers."""
    input_dtype = x.dtype
    x32 = x.to(torch.float32)  # [..., C]
    variance = x32.pow(2).mean(-1, keepdim=True)  # [..., 1]
    x32 = x32 * torch.rsqrt(variance + eps)  # [..., C]
    return weight * x32.to(input_dtype)


@functools.lru_cache(maxsize=_INV_FREQ_CACHE_SIZE)
def _inv_freq(rope_theta: float, head_dim: int) -> Tensor:
    """Default RoPE inverse frequencies [D/2], fp32, computed on the CPU as transformers does at init."""
    channels = torch.arange(0, head_dim, ROPE_CHANNEL_STEP, dtype=torch.float)  # [D/2]
    return 1.0 / (rope_theta ** (channels / head_dim))


def rope_cos_sin(positions: Tensor, spec: ModelSpec) -> tuple[Tensor, Tensor]:
    """cos, sin [B, T, D] in ``spec.dtype`` for int64 ``positions`` [B, T] (default rotary embedding)."""
    inv_freq = _inv_freq(spec.rope_theta, spec.head_dim).to(positions.device)  # [D/2]
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(spec.dtype), emb.sin().to(spec.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, Hx, T, D] rotated by cos, sin [B, T, D] (broadcast over heads)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    return (x * cos) + (_rotate_half(x) * sin)


def embed(ids: Tensor, w: BlockWeights) -> Tensor:
    """Token ids [N] -> embeddings [N, H]."""
    return F.embedding(ids, w["embed"])


def embed_into(ids: Tensor, w: BlockWeights, out: Tensor) -> Tensor:
    """Token ids [B, T] -> their embeddings written into ``out`` [B, T, H] (the values of :func:`embed`)."""
    torch.index_select(w["embed"], 0, ids.reshape(-1), out=out.view(-1, out.shape[-1]))
    return out


def _project_qkv(x: Tensor, w: BlockWeights, spec: ModelSpec, positions: Tensor) -> tuple[Tensor, ...]:
    """Normed input [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]: bias, qk-norm, clip, rope."""
    batch, tokens, _ = x.shape
    eps = spec.rms_norm_eps
    q = linear(x, w["q"], w.get("q_bias"))  # [B, T, Hq*D]
    k = linear(x, w["k"], w.get("k_bias"))  # [B, T, Hkv*D]
    v = linear(x, w["v"], w.get("v_bias"))  # [B, T, Hkv*D]
    if spec.qk_norm is QKNorm.FULL:
        q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    if spec.clip_qkv is not None:
        clip = spec.clip_qkv
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    head_shape = (batch, tokens, -1, spec.head_dim)
    q, k, v = q.view(head_shape), k.view(head_shape), v.view(head_shape)  # [B, T, Hx, D]
    if spec.qk_norm is QKNorm.PER_HEAD:
        q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, Hx, T, D]
    cos, sin = rope_cos_sin(positions, spec)  # [B, T, D]
    return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v


def _write_cache(cache: Tensor, new: Tensor, positions: Tensor, key_lengths: Tensor) -> None:
    """Store new [B, Hkv, T, D] into cache [B, Hkv, Tmax, D] at each valid token's position.

    Tokens at or beyond their sequence's ``key_lengths`` are padding and are not written (boolean
    indexing: one host sync, which the attention call needs anyway for the key length).
    """
    batch, tokens = positions.shape
    valid = positions < key_lengths[:, None]  # [B, T]
    rows = torch.arange(batch, device=positions.device)[:, None].expand(batch, tokens)[valid]  # [n]
    cache[rows, :, positions[valid]] = new.transpose(1, 2)[valid]  # [n, Hkv, D]


def _attend(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, key_lengths: Tensor, counts: list[int], spec: ModelSpec
) -> Tensor:
    """Scaled dot-product attention of each sequence over exactly its own keys: [B, Hq, T, D].

    Sequence b's ``counts[b]`` queries are its last tokens (positions key_lengths[b] - counts[b]
    onwards, right-padded in T); padded query rows come out as zeros. One SDPA call per sequence,
    shaped as the reference shapes a sequence run alone (causal without a mask for a prompt,
    unmasked for one decode query): over a padded, masked batch the bf16 kernels round differently.
    """
    out = torch.zeros_like(q)  # [B, Hq, T, D]
    for b, (count, length) in enumerate(zip(counts, key_lengths.tolist(), strict=True)):
        if count == 0:
            continue
        mask = None
        if 1 < count < length:  # new tokens after cached ones: query t sees keys up to its position
            first = length - count
            keys = torch.arange(length, device=q.device)  # [L]
            mask = keys <= first + torch.arange(count, device=q.device)[:, None]  # [t, L]
        out[b : b + 1, :, :count] = F.scaled_dot_product_attention(
            q[b : b + 1, :, :count],  # [1, Hq, t, D]
            k_cache[b : b + 1, :, :length],  # [1, Hkv, L, D]
            v_cache[b : b + 1, :, :length],  # [1, Hkv, L, D]
            attn_mask=mask,
            is_causal=count == length and count > 1,
            scale=spec.head_dim**-0.5,
            enable_gqa=spec.num_heads != spec.num_kv_heads,
        )
    return out


def attention(
    h: Tensor,
    w: BlockWeights,
    spec: ModelSpec,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    key_lengths: Tensor,
) -> Tensor:
    """Self-attention sublayer with residual: h [B, T, H] -> h + o_proj(attn(input_norm(h))) [B, T, H].

    Writes this call's K/V (after qk-norm, clip and rope) into ``k_cache``/``v_cache``
    [B, Hkv, Tmax, D] at ``positions`` [B, T]; ``key_lengths`` [B] is each sequence's valid cache
    length after this call. Right-padded rows (position >= key length) give finite, ignored values.
    An ``o_bias`` role, when present, is added by the output projection (Qwen3/OLMoE attention_bias).
    Its three parts (:func:`project`, :func:`attend_cache`, :func:`attention_output`) may run apart:
    the middle one where the cache lives (runtime/kv.py).
    """
    q, k, v = project(h, w, spec, positions)
    out = attend_cache(q, k, v, k_cache, v_cache, positions, key_lengths, spec)
    return attention_output(h, out, w)


def project(h: Tensor, w: BlockWeights, spec: ModelSpec, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Input norm and projections: h [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D] (rope applied)."""
    x = rms_norm(h, w["input_norm"], spec.rms_norm_eps)  # [B, T, H]
    q, k, v = _project_qkv(x, w, spec, positions)
    return q, k, v


def attend_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    positions: Tensor,
    key_lengths: Tensor,
    spec: ModelSpec,
) -> Tensor:
    """Store k, v [B, Hkv, T, D] in the caches [B, Hkv, Tmax, D] at ``positions`` and attend each
    sequence's queries q [B, Hq, T, D] over its keys: [B, Hq, T, D]. Runs wherever the tensors live."""
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, (
        f"KV cache dtype {k_cache.dtype} differs from the hidden states' {q.dtype}: allocate it in spec.dtype"
    )
    _write_cache(k_cache, k, positions, key_lengths)
    _write_cache(v_cache, v, positions, key_lengths)
    assert int(key_lengths.max()) <= k_cache.shape[2], "key length exceeds the KV cache's slots"
    counts = (positions < key_lengths[:, None]).sum(dim=1).tolist()  # valid queries per sequence
    return _attend(q, k_cache, v_cache, key_lengths, counts, spec)  # [B, Hq, T, D]


def attention_output(h: Tensor, out: Tensor, w: BlockWeights) -> Tensor:
    """The output projection and residual: h [B, T, H], out [B, Hq, T, D] -> [B, T, H]."""
    out = out.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)  # [B, T, Hq*D]
    return h + linear(out, w["o"], w.get("o_bias"))


def route(h: Tensor, w: BlockWeights, spec: ModelSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Post-attention norm and router: h [N, H] -> x [N, H], topk_idx [N, k] int64, topk_w [N, k].

    Softmax in fp32, top-k (by descending weight), renormalized when ``spec.norm_topk_prob``;
    weights cast to the model dtype when ``spec.router_weights_in_model_dtype`` (Qwen, OLMoE),
    kept fp32 otherwise (Mixtral, whose spec must set ``norm_topk_prob``).
    """
    x = rms_norm(h, w["post_norm"], spec.rms_norm_eps)  # [N, H]
    logits = F.linear(x, w["router"])  # [N, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
    topk_w, topk_idx = torch.topk(probs, spec.top_k, dim=-1)  # [N, k] x2
    if spec.norm_topk_prob:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    if spec.router_weights_in_model_dtype:
        topk_w = topk_w.to(logits.dtype)
    return x, topk_idx, topk_w


def _gated_mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """down(silu(x @ gate.T) * (x @ up.T)) with separate gate [S, H] and up [S, H] matmuls."""
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def shared_expert(x: Tensor, w: BlockWeights, spec: ModelSpec) -> Tensor | None:
    """Qwen2-MoE shared expert: sigmoid(x @ gate.T) * mlp(x) [N, H]; None without one.

    The fused ``shared_gate_up`` [2S, H] view is used as two matmuls on its row halves, as
    Qwen2MoeMLP's separate gate_proj/up_proj linears, so the result matches on every backend.
    """
    size = spec.shared_expert_intermediate_size
    if size == 0:
        return None
    if "shared_gate_up" in w:
        gate_up = w["shared_gate_up"]  # [2S, H]
        gate, up = gate_up[:size], gate_up[size:]  # [S, H] x2
    else:  # the checkpoint keeps them apart (see layouts.SPLIT_ROLES)
        gate, up = w["shared_gate"], w["shared_up"]  # [S, H] x2
    y = _gated_mlp(x, gate, up, w["shared_down"])  # [N, H]
    return torch.sigmoid(F.linear(x, w["shared_expert_gate"])) * y


def expert(x: Tensor, w: BlockWeights, weights: Tensor) -> Tensor:
    """One routed expert on its tokens x [M, H], scaled by their routing weights [M] -> [M, H].

    The product keeps the routing weights' precision (float32 for Mixtral, whose router weights
    stay float32), as transformers' grouped-GEMM experts do before their per-token sum.
    """
    if "gate_up" in w:
        gate, up = linear(x, w["gate_up"]).chunk(2, dim=-1)  # [M, I] x2
    else:  # gate and up apart in the checkpoint (Mixtral's w1, w3 around w2): two matmuls
        gate, up = linear(x, w["gate"]), linear(x, w["up"])  # [M, I] x2
    y = linear(F.silu(gate) * up, w["down"])  # [M, H]
    return y * weights[:, None]  # [M, H]


def contribution_dtype(model_dtype: torch.dtype, weights_dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`expert` returns, to allocate room for every token's contributions."""
    return torch.promote_types(model_dtype, weights_dtype)


def combine(h: Tensor, contributions: Tensor, shared: Tensor | None) -> Tensor:
    """Residual plus MoE output: h [N, H] + (contributions [N, k, H] summed over k (+ shared [N, H])).

    ``contributions`` are in slot order (as :func:`route` returned the experts). The sum over
    a token's k slots is one reduction in the contributions' dtype (accumulated in float32 for
    16-bit types) cast once to the model dtype, as transformers' default ``grouped_mm`` experts
    compute it, so the result does not depend on the order experts were computed in.
    """
    moe_out = contributions.sum(dim=1).to(h.dtype)  # [N, H]
    if shared is not None:
        moe_out = moe_out + shared
    return h + moe_out


def head(h: Tensor, w: BlockWeights, spec: ModelSpec) -> Tensor:
    """Final norm and LM head: h [N, H] -> logits [N, V]."""
    return F.linear(rms_norm(h, w["final_norm"], spec.rms_norm_eps), w["lm_head"])
