"""parse_spec over configs as transformers 5 writes them and as published on the Hub, and every refusal."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from klotski_tier.core.errors import CheckpointError, UnsupportedModelError
from klotski_tier.core.model.families import (
    FAMILIES,
    SANE_LIMITS,
    SUPPORTED_MODEL_TYPES,
    ExpertLayout,
    parse_spec,
)
from klotski_tier.core.model.spec import QKNorm
from tests import checkpoints as ck

# The config.json files of the published models (older transformers form: top-level rope_theta,
# torch_dtype), trimmed of keys that do not matter here.
HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "mistralai/Mixtral-8x7B-v0.1": {
        "model_type": "mixtral", "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 1e6,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
    },
    "Qwen/Qwen1.5-MoE-A2.7B": {
        "model_type": "qwen2_moe", "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 8192,
        "max_window_layers": 21, "num_attention_heads": 16, "num_hidden_layers": 24,
        "num_key_value_heads": 16, "rms_norm_eps": 1e-06, "rope_theta": 1e6, "sliding_window": 32768,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "vocab_size": 151936, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
        "norm_topk_prob": False,
    },
    "Qwen/Qwen3-30B-A3B": {
        "model_type": "qwen3_moe", "attention_bias": False, "bos_token_id": 151643, "decoder_sparse_step": 1,
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
        "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1e6,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "allenai/OLMoE-1B-7B-0924": {
        "model_type": "olmoe", "attention_bias": False, "clip_qkv": None, "eos_token_id": 50279,
        "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 1024, "max_position_embeddings": 4096,
        "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
        "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
        "vocab_size": 50304,
    },
}  # fmt: skip

# E, top_k, I, S, Hkv, D, qk_norm, qkv_bias, norm_topk, router weights in model dtype, theta, eos, dtype
BF16, F32, NO_NORM, FULL = torch.bfloat16, torch.float32, QKNorm.NONE, QKNorm.FULL
HUB_EXPECTED: dict[str, tuple[Any, ...]] = {
    "mistralai/Mixtral-8x7B-v0.1": (8, 2, 14336, 0, 8, 128, NO_NORM, False, True, False, 1e6, (2,), BF16),
    "Qwen/Qwen1.5-MoE-A2.7B": (60, 4, 1408, 5632, 16, 128, NO_NORM, True, False, True, 1e6, (151643,), BF16),
    "Qwen/Qwen3-30B-A3B": (128, 8, 768, 0, 4, 128, QKNorm.PER_HEAD, False, True, True, 1e6, (151645,), BF16),
    "allenai/OLMoE-1B-7B-0924": (
        64,
        8,
        1024,
        0,
        16,
        128,
        QKNorm.FULL,
        False,
        False,
        True,
        1e4,
        (50279,),
        F32,
    ),
}


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_configs(name: str) -> None:
    spec = parse_spec(HUB_CONFIGS[name])
    sizes = (
        spec.num_experts,
        spec.top_k,
        spec.expert_intermediate_size,
        spec.shared_expert_intermediate_size,
    )
    attention = (spec.num_kv_heads, spec.head_dim, spec.qk_norm, spec.qkv_bias)
    numerics = (spec.norm_topk_prob, spec.router_weights_in_model_dtype, spec.rope_theta)
    assert (*sizes, *attention, *numerics, spec.eos_token_ids, spec.dtype) == HUB_EXPECTED[name]
    assert spec.family == HUB_CONFIGS[name]["model_type"]


def _config(family: str, **overrides: Any) -> dict[str, Any]:
    """config.json as transformers 5 writes it for a tiny model of ``family``."""
    values: dict[str, Any] = ck.tiny_config(family, dtype="bfloat16").to_dict()
    values.update(overrides)
    return values


@pytest.mark.parametrize("family", ck.FAMILIES)
def test_transformers_written_configs(family: str) -> None:
    reference = ck.tiny_config(family, num_experts_per_tok=3)
    spec = parse_spec(reference.to_dict(), torch.float16)
    assert spec.family == family
    assert (spec.vocab_size, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == (96, 32, 4, 2)
    assert spec.head_dim == (ck.QWEN3_HEAD_DIM if family == "qwen3_moe" else ck.HIDDEN_SIZE // ck.NUM_HEADS)
    assert (spec.num_layers, spec.num_experts, spec.top_k) == (2, reference.num_experts, 3)
    assert spec.expert_intermediate_size == ck.EXPERT_INTERMEDIATE
    assert spec.shared_expert_intermediate_size == (ck.SHARED_INTERMEDIATE if family == "qwen2_moe" else 0)
    assert spec.rope_theta == reference.rope_parameters["rope_theta"]
    assert spec.rms_norm_eps == reference.rms_norm_eps
    assert (spec.eos_token_ids, spec.pad_token_id, spec.bos_token_id) == ((ck.EOS_ID,), ck.PAD_ID, ck.BOS_ID)
    assert spec.dtype == torch.float16  # config.json had dtype null: the tensors' dtype stands in
    assert spec.qkv_bias == (family == "qwen2_moe")
    assert spec.norm_topk_prob == (family == "mixtral")


def test_optional_keys_take_transformers_defaults() -> None:
    config = {k: v for k, v in HUB_CONFIGS["allenai/OLMoE-1B-7B-0924"].items() if "token" not in k}
    for key in ("num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings", "clip_qkv"):
        del config[key]
    spec = parse_spec({**config, "head_dim": None})
    assert (spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps, spec.rope_theta) == (16, 128, 1e-5, 1e4)
    assert (spec.max_position_embeddings, spec.clip_qkv, spec.eos_token_ids, spec.pad_token_id) == (
        4096,
        None,
        (50279,),
        1,
    )


def test_family_specific_switches() -> None:
    assert parse_spec(_config("olmoe", clip_qkv=8)).clip_qkv == 8.0
    assert parse_spec(_config("qwen2_moe", qkv_bias=False)).qkv_bias is False
    assert parse_spec(_config("qwen3_moe", attention_bias=True)).qkv_bias is True
    assert parse_spec(_config("qwen3_moe", norm_topk_prob=True)).norm_topk_prob is True
    assert parse_spec(_config("mixtral", norm_topk_prob=False)).norm_topk_prob is True
    assert parse_spec(_config("qwen3_moe", num_experts=16, num_local_experts=None)).num_experts == 16


def test_token_ids_and_dtype_forms() -> None:
    spec = parse_spec(
        _config("mixtral", eos_token_id=[2, 7], pad_token_id=None, dtype=None, torch_dtype="float16")
    )
    assert (spec.eos_token_ids, spec.pad_token_id, spec.dtype) == ((2, 7), None, torch.float16)
    assert parse_spec(_config("qwen2_moe", eos_token_id=None)).eos_token_ids == ()
    assert parse_spec(_config("olmoe", dtype="auto"), torch.float32).dtype == torch.float32


def test_rope_theta_forms() -> None:
    old_form = _config("mixtral", rope_parameters=None, rope_theta=5e5, rope_scaling=None)
    assert parse_spec(old_form).rope_theta == 5e5
    assert (
        parse_spec(
            _config("mixtral", rope_parameters={"rope_type": "default", "rope_theta": 123.0})
        ).rope_theta
        == 123
    )


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        (
            "mixtral",
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
            "rope_parameters",
        ),
        (
            "qwen2_moe",
            {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2}},
            "rope_scaling",
        ),
        (
            "qwen3_moe",
            {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "rope_parameters",
        ),
        ("qwen2_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("qwen2_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
        ("qwen3_moe", {"mlp_only_layers": [1]}, "mlp_only_layers"),
        ("mixtral", {"sliding_window": 4096}, "sliding-window"),
        ("qwen2_moe", {"use_sliding_window": True}, "sliding-window"),
        ("qwen3_moe", {"use_sliding_window": True}, "sliding-window"),
        ("qwen2_moe", {"layer_types": ["sliding_attention", "full_attention"]}, "sliding-window"),
        ("mixtral", {"attention_bias": True}, "attention_bias"),
        ("olmoe", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ("olmoe", {"num_experts_per_tok": 99}, "num_experts_per_tok 99"),
        ("olmoe", {"head_dim": 16}, "head_dim 16"),
        ("mixtral", {"dtype": "float64"}, "dtype 'float64'"),
    ],
)
def test_unsupported_options(family: str, overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        parse_spec(_config(family, **overrides))


@pytest.mark.parametrize("model_type", ["llama", None, "deepseek_v3"])
def test_unknown_model_type_lists_supported(model_type: str | None) -> None:
    with pytest.raises(UnsupportedModelError, match=f"{model_type!r}.*" + ", ".join(SUPPORTED_MODEL_TYPES)):
        parse_spec({**_config("mixtral"), "model_type": model_type})


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_hidden_layers", "num_experts_per_tok"])
def test_missing_required_key(key: str) -> None:
    config = _config("qwen2_moe")
    del config[key]
    with pytest.raises(CheckpointError, match=f"lacks the required key '{key}'"):
        parse_spec(config)


def test_missing_expert_count_and_shared_size() -> None:
    with pytest.raises(CheckpointError, match="'num_local_experts'"):
        parse_spec({k: v for k, v in _config("mixtral").items() if k != "num_local_experts"})
    with pytest.raises(CheckpointError, match="'shared_expert_intermediate_size'"):
        parse_spec({k: v for k, v in _config("qwen2_moe").items() if k != "shared_expert_intermediate_size"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": "32"}, "hidden_size = '32' is not a positive integer"),
        ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
        ({"rms_norm_eps": "tiny"}, "rms_norm_eps = 'tiny'"),
        ({"eos_token_id": "eos"}, "eos_token_id = 'eos'"),
        ({"pad_token_id": -1}, "pad_token_id = -1"),
        ({"rope_parameters": {"rope_theta": 0}}, "rope_theta = 0"),
    ],
)
def test_malformed_values(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        parse_spec(_config("mixtral", **overrides))


def test_no_dtype_anywhere() -> None:
    with pytest.raises(CheckpointError, match="names no dtype"):
        parse_spec(_config("mixtral", dtype=None))


def test_expert_layout_is_detected_from_names() -> None:
    mixtral, qwen = FAMILIES["mixtral"].names, FAMILIES["qwen3_moe"].names
    assert (
        mixtral.expert_layout({"model.layers.0.block_sparse_moe.experts.0.w1.weight"})
        is ExpertLayout.PER_EXPERT
    )
    assert mixtral.expert_layout({"model.layers.0.mlp.experts.gate_up_proj"}) is ExpertLayout.FUSED
    assert qwen.expert_layout({"model.layers.0.mlp.experts.0.gate_proj.weight"}) is ExpertLayout.PER_EXPERT
    with pytest.raises(
        CheckpointError, match=r"neither of model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"
    ):
        qwen.expert_layout({"model.layers.0.mlp.experts.0.w1.weight"})
    both = {"model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"}
    with pytest.raises(CheckpointError, match="has both of"):
        qwen.expert_layout(both)


@pytest.mark.parametrize(
    ("family", "key"),
    [
        ("mixtral", "num_hidden_layers"),
        ("mixtral", "num_local_experts"),
        ("qwen2_moe", "num_experts"),
        ("mixtral", "vocab_size"),
        ("mixtral", "hidden_size"),
        ("mixtral", "intermediate_size"),
        ("qwen2_moe", "moe_intermediate_size"),
        ("qwen2_moe", "shared_expert_intermediate_size"),
        ("mixtral", "num_attention_heads"),
        ("qwen3_moe", "head_dim"),
    ],
)
def test_sizes_past_any_real_model_are_refused_before_anything_is_sized_by_them(
    family: str, key: str
) -> None:
    """A config claiming a million layers once made `plan` allocate 15 GiB, then fail with a traceback."""
    limit = SANE_LIMITS[key]
    with pytest.raises(CheckpointError, match=f"{key} = {limit + 1} is over {limit}, more than any model"):
        parse_spec(_config(family, **{key: limit + 1}))
    with pytest.raises(CheckpointError, match=f"{key} = 1000000000 is over {limit}"):
        parse_spec(_config(family, **{key: 10**9}))


@pytest.mark.parametrize(("layers", "experts"), [(1024, 16384), (1024, 1024), (2, 16384)])
def test_experts_whose_routing_statistics_no_machine_holds_are_refused(layers: int, experts: int) -> None:
    """Each within its own limit, 1024 layers of 16384 experts once made `plan` allocate 2 TiB for the
    experts x experts matrix of each layer."""
    config = _config("mixtral", num_hidden_layers=layers, num_local_experts=experts)
    with pytest.raises(CheckpointError, match=f"{layers} layers of {experts} experts is more than any model"):
        parse_spec(config)


def test_the_largest_released_expert_counts_are_accepted() -> None:
    spec = parse_spec(_config("mixtral", num_hidden_layers=128, num_local_experts=512))
    assert (spec.num_layers, spec.num_experts) == (128, 512)


@pytest.mark.parametrize("key", ["rms_norm_eps", "rope_theta", "clip_qkv"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_floats_are_refused(key: str, value: float) -> None:
    """json.loads reads NaN and Infinity: a config holding one would run and print garbage."""
    with pytest.raises(
        CheckpointError, match=f"{key} = {value!r} is not a finite (non-negative|positive) number"
    ):
        overrides = (
            {"rope_parameters": {"rope_type": "default", key: value}} if key == "rope_theta" else {key: value}
        )
        parse_spec(_config("olmoe", **overrides))
