"""Tiny real checkpoints for tests, built and saved with transformers' own model classes.

:func:`make_checkpoint` writes a Hugging Face model directory (config.json plus safetensors,
optionally sharded, optionally with experts fused into one 3-D tensor per layer) for one of
the supported families; :func:`load_reference` loads it back as the transformers reference
model. Sizes are tiny (vocab 96, hidden 32, 4 query / 2 KV heads) so a checkpoint is built in a
fraction of a second. Weights are drawn with a large standard deviation so that logits are well
separated even in bfloat16 and greedy decoding is not decided by ties.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

VOCAB_SIZE = 96
HIDDEN_SIZE = 32
NUM_HEADS = 4
NUM_KV_HEADS = 2
EXPERT_INTERMEDIATE = 24  # I: differs from H so that a transposed matrix cannot pass
SHARED_INTERMEDIATE = 40  # S of Qwen2-MoE's shared expert
DENSE_INTERMEDIATE = 48  # Qwen's dense MLP size, unused while every layer is MoE
QWEN3_HEAD_DIM = 16  # explicit head_dim != H / Hq, as real Qwen3 configs have
MAX_POSITIONS = 128
INIT_STD = 0.3  # weight std: logits a few units apart, so greedy choices are clear in bf16
NORM_JITTER = 0.2  # norm weights are 1 + N(0, 0.2) and biases N(0, 0.2), so no two roles look alike
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
INDEX_FILE = "model.safetensors.index.json"

_FAMILY_CONFIG: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": EXPERT_INTERMEDIATE},
    "qwen2_moe": {
        "moe_intermediate_size": EXPERT_INTERMEDIATE,
        "shared_expert_intermediate_size": SHARED_INTERMEDIATE,
        "intermediate_size": DENSE_INTERMEDIATE,
    },
    "qwen3_moe": {
        "moe_intermediate_size": EXPERT_INTERMEDIATE,
        "intermediate_size": DENSE_INTERMEDIATE,
        "head_dim": QWEN3_HEAD_DIM,
    },
    "olmoe": {"intermediate_size": EXPERT_INTERMEDIATE},
}
MODEL_CLASSES: dict[str, type[transformers.PreTrainedModel]] = {
    "mixtral": transformers.MixtralForCausalLM,
    "qwen2_moe": transformers.Qwen2MoeForCausalLM,
    "qwen3_moe": transformers.Qwen3MoeForCausalLM,
    "olmoe": transformers.OlmoeForCausalLM,
}
_EXPERTS_KEY = {"mixtral": "num_local_experts"}
_PER_EXPERT_MLP = {"mixtral": "block_sparse_moe"}
_PER_EXPERT_MATRICES = {
    "mixtral": ("w1", "w3", "w2"),
}
_QWEN_MATRICES = ("gate_proj", "up_proj", "down_proj")


def tiny_config(family: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The transformers config of a tiny ``family`` model; ``overrides`` win."""
    values: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN_SIZE,
        "num_hidden_layers": 2,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_STD,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "num_experts_per_tok": 2,
        _EXPERTS_KEY.get(family, "num_experts"): 4,
        **_FAMILY_CONFIG[family],
    }
    values.update(overrides)
    return transformers.AutoConfig.for_model(family, **values)


def make_checkpoint(
    directory: Path,
    family: str,
    *,
    fused: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_layers: int = 2,
    num_experts: int = 4,
    top_k: int = 2,
    shards: int = 1,
    tie_word_embeddings: bool = False,
    **config_overrides: Any,
) -> Path:
    """Save a tiny random ``family`` model to ``directory`` (created) and return the directory."""
    config = tiny_config(
        family,
        num_hidden_layers=num_layers,
        num_experts_per_tok=top_k,
        tie_word_embeddings=tie_word_embeddings,
        **{_EXPERTS_KEY.get(family, "num_experts"): num_experts},
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](config)
    _randomize(model, seed)
    model.to(dtype)  # type: ignore[arg-type]  # transformers' decorator hides Module.to's signature
    model.config.dtype = dtype
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=_shard_bytes(model, shards))
    if fused:
        fuse_experts(directory, family, num_layers=num_layers, num_experts=num_experts, shards=shards)
    return directory


def load_reference(directory: Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The transformers model of ``directory`` in ``dtype``, eval mode, eager attention."""
    model: transformers.PreTrainedModel = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager"
    )
    model.train(False)  # eval mode
    return model


def read_all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of ``directory``, by name."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def write_tensors(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 1) -> None:
    """Replace the safetensors files of ``directory`` by ``tensors`` in ``shards`` files (+ index)."""
    for path in directory.glob("*.safetensors*"):
        path.unlink()
    names = sorted(tensors)
    if shards == 1:
        save_file(
            {n: tensors[n].contiguous() for n in names}, directory / "model.safetensors", {"format": "pt"}
        )
        return
    weight_map: dict[str, str] = {}
    per_shard = math.ceil(len(names) / shards)
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[index * per_shard : (index + 1) * per_shard]
        save_file({n: tensors[n].contiguous() for n in chunk}, directory / file_name, {"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2))


def fuse_experts(directory: Path, family: str, *, num_layers: int, num_experts: int, shards: int = 1) -> None:
    """Rewrite a per-expert checkpoint with transformers 5's fused names: ``mlp.experts.gate_up_proj``
    [E, 2I, H] (gate rows first), ``mlp.experts.down_proj`` [E, H, I] and ``mlp.gate.weight``."""
    tensors = read_all_tensors(directory)
    prefix = _PER_EXPERT_MLP.get(family, "mlp")
    gate_name, up_name, down_name = _PER_EXPERT_MATRICES.get(family, _QWEN_MATRICES)
    for layer in range(num_layers):
        old = f"model.layers.{layer}.{prefix}"
        new = f"model.layers.{layer}.mlp"
        experts = [f"{old}.experts.{e}" for e in range(num_experts)]
        gate_up = [
            torch.cat([tensors[f"{x}.{gate_name}.weight"], tensors[f"{x}.{up_name}.weight"]]) for x in experts
        ]
        down = [tensors[f"{x}.{down_name}.weight"] for x in experts]
        for x in experts:
            for matrix in (gate_name, up_name, down_name):
                del tensors[f"{x}.{matrix}.weight"]
        tensors[f"{new}.experts.gate_up_proj"] = torch.stack(gate_up)  # [E, 2I, H]
        tensors[f"{new}.experts.down_proj"] = torch.stack(down)  # [E, H, I]
        tensors[f"{new}.gate.weight"] = tensors.pop(f"{old}.gate.weight")  # [E, H]
    write_tensors(directory, tensors, shards)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Matrices ~ N(0, INIT_STD), norm weights ~ 1 + N(0, NORM_JITTER), biases ~ N(0, NORM_JITTER)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if param.dim() >= 2:
                param.copy_(noise * INIT_STD)
            elif "norm" in name:
                param.copy_(1.0 + noise * NORM_JITTER)
            else:
                param.copy_(noise * NORM_JITTER)


def _shard_bytes(model: torch.nn.Module, shards: int) -> int:
    """A ``max_shard_size`` that splits the model's weights into about ``shards`` files."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + 1 if shards == 1 else math.ceil(total / shards)
