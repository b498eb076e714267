"""The model's shape and numerics, one frozen dataclass for every supported family.

Built from ``config.json`` by :func:`klotski_tier.core.model.families.parse_spec`; read by the
compute ops, the block layouts and the pipeline. Field names carry their meaning; sizes are
element counts unless the name ends in ``_bytes``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class QKNorm(enum.Enum):
    NONE = "none"
    PER_HEAD = "per_head"  # Qwen3-MoE: RMSNorm over head_dim, weight [D]
    FULL = "full"  # OLMoE: RMSNorm over the whole projection, weight [Hq*D] / [Hkv*D]


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe"
    vocab_size: int
    hidden_size: int  # H
    num_layers: int
    num_heads: int  # Hq
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    num_experts: int  # E
    top_k: int  # experts per token
    expert_intermediate_size: int  # I
    shared_expert_intermediate_size: int  # S, 0 without a shared expert
    norm_topk_prob: bool  # renormalize the top-k routing weights to sum to 1
    router_weights_in_model_dtype: (
        bool  # Qwen/OLMoE cast routing weights to the model dtype; Mixtral keeps fp32
    )
    qk_norm: QKNorm
    qkv_bias: bool
    clip_qkv: float | None
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: torch.dtype
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    bos_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert (gate, up and down matrices)."""
        return 3 * self.hidden_size * self.expert_intermediate_size * self.dtype.itemsize

    def kv_bytes_per_token(self) -> int:
        """Bytes the KV cache holds per token over all layers (K and V)."""
        return 2 * self.num_layers * self.kv_size * self.dtype.itemsize
