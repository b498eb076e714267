"""The compute ops against Hugging Face transformers on tiny random models of the four MoE families.

A small engine in this file composes the ops (embed, attention, route, experts, shared expert,
combine, head) over weights taken from a transformers model by view role, with its own KV cache.
float32: a right-padded batch of two sequences and decode steps match transformers run on each
sequence alone within 1e-5. bfloat16: each sequence run alone matches bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import transformers
from torch import Tensor, nn
from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm, MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

from klotski_tier.core.model import ops
from klotski_tier.core.model.blocks import BlockWeights
from klotski_tier.core.model.spec import ModelSpec, QKNorm

VOCAB = 96
HIDDEN = 32
HEADS = 4
KV_HEADS = 2
LAYERS = 2
EXPERTS = 4
EXPERT_INTER = 16
SHARED_INTER = 24
MAX_POSITIONS = 64
INIT_RANGE = 0.2  # large enough that activations are O(1), so numeric differences show
NORM_JITTER = 0.2  # RMSNorm weights are 1 + this * randn, so a missing norm weight shows
FP32_TOL = 1e-5
CACHE_SLOTS = 16  # KV cache length of the ops engine, more than prompt + decode steps
PROMPT_LENGTHS = (7, 4)  # two right-padded sequences of different lengths
DECODE_STEPS = 3
PAD_ID = 0


@dataclass(frozen=True)
class Case:
    family: str
    top_k: int = 2
    norm_topk_prob: bool = True
    clip_qkv: float | None = None
    head_dim: int = HIDDEN // HEADS

    def __str__(self) -> str:
        return f"{self.family}-top{self.top_k}-norm{int(self.norm_topk_prob)}-clip{self.clip_qkv}"


CASES = [
    Case("mixtral"),
    Case("qwen2_moe", norm_topk_prob=True),
    Case("qwen2_moe", top_k=3, norm_topk_prob=False),
    Case("qwen3_moe", head_dim=16),  # Hq * D = 64 != H
    Case("olmoe", norm_topk_prob=False),
    Case("olmoe", norm_topk_prob=False, clip_qkv=0.8),
]


def _config(case: Case) -> transformers.PreTrainedConfig:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        num_experts_per_tok=case.top_k,
        initializer_range=INIT_RANGE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
    )
    moe = dict(num_experts=EXPERTS, norm_topk_prob=case.norm_topk_prob)
    if case.family == "mixtral":
        return transformers.MixtralConfig(
            **common, intermediate_size=EXPERT_INTER, num_local_experts=EXPERTS, head_dim=case.head_dim
        )
    if case.family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, **moe, moe_intermediate_size=EXPERT_INTER, shared_expert_intermediate_size=SHARED_INTER
        )
    if case.family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common, **moe, moe_intermediate_size=EXPERT_INTER, head_dim=case.head_dim
        )
    return transformers.OlmoeConfig(**common, **moe, intermediate_size=EXPERT_INTER, clip_qkv=case.clip_qkv)


def _spec(case: Case, config: transformers.PreTrainedConfig, dtype: torch.dtype) -> ModelSpec:
    qk_norm = {"qwen3_moe": QKNorm.PER_HEAD, "olmoe": QKNorm.FULL}.get(case.family, QKNorm.NONE)
    shared = case.family == "qwen2_moe"
    return ModelSpec(
        family=case.family,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=case.head_dim,
        num_experts=EXPERTS,
        top_k=case.top_k,
        expert_intermediate_size=EXPERT_INTER,
        shared_expert_intermediate_size=SHARED_INTER if shared else 0,
        norm_topk_prob=case.norm_topk_prob,
        router_weights_in_model_dtype=case.family != "mixtral",
        qk_norm=qk_norm,
        qkv_bias=shared,
        clip_qkv=case.clip_qkv,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=float(config.rope_parameters["rope_theta"]),
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        dtype=dtype,
        eos_token_ids=(),
        pad_token_id=None,
        bos_token_id=None,
    )


@pytest.fixture(scope="module", params=CASES, ids=str)
def case_model(request: pytest.FixtureRequest) -> tuple[Case, nn.Module]:
    case: Case = request.param
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        _config(case),
        attn_implementation="sdpa",  # and transformers' default grouped_mm experts
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + NORM_JITTER * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(INIT_RANGE * torch.randn_like(param))
    return case, model


class OpsEngine:
    """Composes the ops over one model's weights, with a KV cache for ``batch`` sequences."""

    def __init__(self, model: nn.Module, spec: ModelSpec, batch: int) -> None:
        self.spec, self.layers = spec, model.model.layers
        self.embed_w = {"embed": model.model.embed_tokens.weight}
        self.head_w = {"final_norm": model.model.norm.weight, "lm_head": model.lm_head.weight}
        shape = (batch, spec.num_kv_heads, CACHE_SLOTS, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype) for _ in range(spec.num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.int64)

    def attn_weights(self, layer: int) -> BlockWeights:
        attn = self.layers[layer].self_attn
        w = {"input_norm": self.layers[layer].input_layernorm.weight}
        for role in ("q", "k", "v", "o"):
            proj = getattr(attn, f"{role}_proj")
            w[role] = proj.weight
            if proj.bias is not None:
                w[f"{role}_bias"] = proj.bias
        if hasattr(attn, "q_norm"):
            w["q_norm"], w["k_norm"] = attn.q_norm.weight, attn.k_norm.weight
        return w

    def gate_weights(self, layer: int) -> BlockWeights:
        mlp = self.layers[layer].mlp
        w = {"post_norm": self.layers[layer].post_attention_layernorm.weight, "router": mlp.gate.weight}
        if hasattr(mlp, "shared_expert"):
            shared = mlp.shared_expert
            w["shared_gate_up"] = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
            w["shared_down"] = shared.down_proj.weight
            w["shared_expert_gate"] = mlp.shared_expert_gate.weight
        return w

    def moe(self, layer: int, h: Tensor) -> Tensor:
        """h [N, H] -> h + MoE(h), experts over their tokens in ascending expert order."""
        gate_w, experts = self.gate_weights(layer), self.layers[layer].mlp.experts
        x, idx, wts = ops.route(h, gate_w, self.spec)  # [N, H], [N, k], [N, k]
        dtype = ops.contribution_dtype(h.dtype, wts.dtype)
        contributions = torch.empty(*idx.shape, h.shape[-1], dtype=dtype)  # [N, k, H]
        for e in range(self.spec.num_experts):
            slots, tokens = torch.where((idx == e).T)  # slot-major, as transformers gathers
            w_e = {"gate_up": experts.gate_up_proj[e], "down": experts.down_proj[e]}
            contributions[tokens, slots] = ops.expert(x[tokens], w_e, wts[tokens, slots])
        shared = ops.shared_expert(x, gate_w, self.spec)
        return ops.combine(h, contributions, shared)

    @torch.no_grad()
    def step(self, ids: Tensor, counts: Tensor) -> Tensor:
        """ids [B, T] right-padded with counts [B] valid tokens -> logits [B, T, V] (valid rows)."""
        batch, tokens = ids.shape
        positions = self.lengths[:, None] + torch.arange(tokens)  # [B, T]
        key_lengths = self.lengths + counts  # [B]
        valid = torch.arange(tokens) < counts[:, None]  # [B, T]
        h = ops.embed(ids.flatten(), self.embed_w).view(batch, tokens, -1)  # [B, T, H]
        for layer in range(self.spec.num_layers):
            h = ops.attention(
                h, self.attn_weights(layer), self.spec, self.k[layer], self.v[layer], positions, key_lengths
            )
            h = h.masked_scatter(valid[..., None], self.moe(layer, h[valid]))
        self.lengths = key_lengths
        logits = torch.zeros(batch, tokens, self.spec.vocab_size, dtype=h.dtype)
        logits[valid] = ops.head(h[valid], self.head_w, self.spec)
        return logits


@torch.no_grad()
def _reference(model: nn.Module, prompt: Tensor, decode: Tensor) -> list[Tensor]:
    """transformers on one sequence: logits [T, V] of the prompt, then [V] per decode token."""
    out = model(input_ids=prompt[None], use_cache=True)
    logits, cache = [out.logits[0]], out.cache
    for token in decode:
        out = model(input_ids=token.view(1, 1), cache=cache, use_cache=True)
        logits.append(out.logits[0, 0])
    return logits


def _inputs() -> tuple[list[Tensor], Tensor]:
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen) for n in PROMPT_LENGTHS]
    return prompts, torch.randint(1, VOCAB, (len(PROMPT_LENGTHS), DECODE_STEPS), generator=gen)


def test_float32_padded_batch_and_decode_match_transformers(case_model: tuple[Case, nn.Module]) -> None:
    case, model = case_model
    prompts, decode = _inputs()
    engine = OpsEngine(model, _spec(case, model.config, torch.float32), batch=len(prompts))
    ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True, padding_value=PAD_ID)  # [B, T]
    ours = [engine.step(ids, torch.tensor(PROMPT_LENGTHS))]
    ones = torch.ones(len(prompts), dtype=torch.int64)
    ours += [engine.step(decode[:, s : s + 1], ones) for s in range(DECODE_STEPS)]
    for b, prompt in enumerate(prompts):
        ref = _reference(model, prompt, decode[b])
        torch.testing.assert_close(ours[0][b, : len(prompt)], ref[0], atol=FP32_TOL, rtol=FP32_TOL)
        for s in range(DECODE_STEPS):
            torch.testing.assert_close(ours[s + 1][b, 0], ref[s + 1], atol=FP32_TOL, rtol=FP32_TOL)


def test_bfloat16_single_sequence_is_bit_identical(case_model: tuple[Case, nn.Module]) -> None:
    case, model32 = case_model
    model = transformers.AutoModelForCausalLM.from_config(
        model32.config, attn_implementation="sdpa", dtype=torch.bfloat16
    ).eval()
    model.load_state_dict(model32.state_dict())
    prompts, decode = _inputs()
    for b, prompt in enumerate(prompts):
        engine = OpsEngine(model, _spec(case, model.config, torch.bfloat16), batch=1)
        ours = [engine.step(prompt[None], torch.tensor([len(prompt)]))[0]]
        one = torch.ones(1, dtype=torch.int64)
        ours += [engine.step(decode[b : b + 1, s : s + 1], one)[0, 0] for s in range(DECODE_STEPS)]
        ref = _reference(model, prompt, decode[b])
        assert ref[0].dtype == torch.bfloat16
        for step, (mine, theirs) in enumerate(zip(ours, ref, strict=True)):
            assert torch.equal(mine, theirs), (
                f"{case} sequence {b} step {step}: {(mine - theirs).abs().max()}"
            )


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16], ids=["mixtral", "qwen"])
def test_combine_sums_each_tokens_slots_like_grouped_mm_experts(weights_dtype: torch.dtype) -> None:
    tokens, top_k = 64, 3
    gen = torch.Generator().manual_seed(2)
    scale = torch.logspace(-3, 3, HIDDEN)  # mixed magnitudes so that rounding twice would show
    outputs = (torch.randn(tokens, top_k, HIDDEN, generator=gen) * scale).bfloat16()  # expert outputs
    weights = torch.rand(tokens, top_k, generator=gen).to(weights_dtype)  # [N, k]
    contributions = outputs * weights[..., None]  # [N, k, H], as ops.expert returns them
    assert contributions.dtype == ops.contribution_dtype(torch.bfloat16, weights_dtype)
    h = torch.randn(tokens, HIDDEN, generator=gen).bfloat16()  # [N, H]
    reference = contributions.view(tokens, top_k, HIDDEN).sum(dim=1).to(torch.bfloat16)  # integrations/moe.py
    assert torch.equal(ops.combine(h, contributions, None), h + reference)
    rounded_each = sum(contributions[:, s].bfloat16() for s in range(top_k))
    assert not torch.equal(ops.combine(h, contributions, None), h + rounded_each), "one rounding, not k"
    shared = torch.randn(tokens, HIDDEN, generator=gen).bfloat16()
    assert torch.equal(ops.combine(h, contributions, shared), h + (reference + shared))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype: torch.dtype) -> None:
    module = MixtralRMSNorm(HIDDEN, eps=1e-5).to(dtype)
    with torch.no_grad():
        module.weight.copy_(1 + NORM_JITTER * torch.randn(HIDDEN))
    x = (torch.randn(5, 3, HIDDEN) * 4).to(dtype)
    out = ops.rms_norm(x, module.weight, 1e-5)
    assert out.dtype == dtype and torch.equal(out, module(x))


def _router_case(family: str, norm: bool) -> tuple[Case, nn.Module]:
    case = Case(family, top_k=3, norm_topk_prob=norm)
    config = _config(case)
    router = MixtralTopKRouter(config) if family == "mixtral" else Qwen2MoeTopKRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, HIDDEN))
    return case, router.to(torch.bfloat16)


@pytest.mark.parametrize(("family", "norm"), [("mixtral", True), ("qwen2_moe", True), ("qwen2_moe", False)])
def test_route_matches_each_familys_router(family: str, norm: bool) -> None:
    case, router = _router_case(family, norm)
    spec = _spec(case, _config(case), torch.bfloat16)
    h = torch.randn(20, HIDDEN).bfloat16()
    post_norm = (1 + NORM_JITTER * torch.randn(HIDDEN)).bfloat16()
    x, idx, weights = ops.route(h, {"post_norm": post_norm, "router": router.weight}, spec)
    _, ref_weights, ref_idx = router(ops.rms_norm(h, post_norm, spec.rms_norm_eps))
    assert torch.equal(x, ops.rms_norm(h, post_norm, spec.rms_norm_eps))
    assert idx.dtype == torch.int64 and torch.equal(idx, ref_idx)
    assert weights.dtype == (torch.float32 if family == "mixtral" else torch.bfloat16)
    assert torch.equal(weights, ref_weights)
    sums = weights.float().sum(-1)
    assert bool(torch.all((sums - 1).abs() < 1e-2)) is norm


def _attention_setup() -> tuple[ModelSpec, dict[str, Tensor]]:
    case = Case("qwen2_moe")
    spec = _spec(case, _config(case), torch.float32)
    gen = torch.Generator().manual_seed(3)
    shapes: dict[str, tuple[int, ...]] = {"q": (spec.q_size, HIDDEN), "k": (spec.kv_size, HIDDEN)}
    shapes |= {"v": (spec.kv_size, HIDDEN)}
    shapes |= {"o": (HIDDEN, spec.q_size), "q_bias": (spec.q_size,), "k_bias": (spec.kv_size,)}
    shapes |= {"v_bias": (spec.kv_size,), "input_norm": (HIDDEN,)}
    return spec, {role: INIT_RANGE * torch.randn(shape, generator=gen) for role, shape in shapes.items()}


def _run_attention(spec: ModelSpec, w: BlockWeights, h: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    k_cache = torch.zeros(h.shape[0], KV_HEADS, CACHE_SLOTS, spec.head_dim)
    v_cache = torch.zeros_like(k_cache)
    positions = torch.arange(h.shape[1]).expand(h.shape[0], -1)  # [B, T]
    return ops.attention(h, w, spec, k_cache, v_cache, positions, counts), k_cache


def test_attention_padding_is_finite_and_does_not_leak() -> None:
    spec, w = _attention_setup()
    counts = torch.tensor([5, 2, 0])  # the last sequence has no valid token at all
    h = torch.randn(3, 5, HIDDEN)
    out, k_cache = _run_attention(spec, w, h, counts)
    assert bool(torch.isfinite(out).all())
    assert bool((k_cache[1, :, 2:] == 0).all()) and bool((k_cache[2] == 0).all()), "padding wrote K"
    noisy = h.clone()
    noisy[1, 2:] = 1e4 * torch.randn(3, HIDDEN)
    out_noisy, _ = _run_attention(spec, w, noisy, counts)
    assert torch.equal(out_noisy[0], out[0]) and torch.equal(out_noisy[1, :2], out[1, :2])
    alone, _ = _run_attention(spec, w, h[1:2, :2], counts[1:2])
    torch.testing.assert_close(out[1, :2], alone[0], atol=FP32_TOL, rtol=FP32_TOL)


def test_shared_expert_is_none_without_one() -> None:
    case = Case("mixtral")
    spec = _spec(case, _config(case), torch.float32)
    assert ops.shared_expert(torch.randn(2, HIDDEN), {}, spec) is None


def test_gate_and_up_apart_compute_what_the_fused_view_does() -> None:
    """A checkpoint that keeps gate and up apart (Mixtral's w1, w3) gives two views; the expert and the
    shared expert take them as they take the fused one (float32: the same sums, to rounding)."""
    torch.manual_seed(0)
    hidden, inter = 32, 24
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    x, weights = torch.randn(5, hidden), torch.rand(5)
    fused = ops.expert(x, {"gate_up": torch.cat([gate, up]), "down": down}, weights)
    apart = ops.expert(x, {"gate": gate, "up": up, "down": down}, weights)
    torch.testing.assert_close(apart, fused, rtol=1e-6, atol=1e-5)
    spec: Any = SimpleNamespace(shared_expert_intermediate_size=inter)  # all shared_expert reads of a spec
    shared_gate = torch.randn(1, hidden)
    one = {"shared_gate_up": torch.cat([gate, up]), "shared_down": down, "shared_expert_gate": shared_gate}
    two = {"shared_gate": gate, "shared_up": up, "shared_down": down, "shared_expert_gate": shared_gate}
    a, b = ops.shared_expert(x, one, spec), ops.shared_expert(x, two, spec)
    assert a is not None and b is not None
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
