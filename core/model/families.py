"""Supported model families: ``config.json`` to :class:`ModelSpec`, and each family's tensor names.

One table, :data:`FAMILIES`, holds everything that differs between Mixtral, Qwen2-MoE,
Qwen3-MoE and OLMoE: config keys, transformers' defaults for keys real configs omit, numerics
flags and tensor names. Nothing else in the code branches on the family's name.

Experts are stored in one of two layouts, told apart by which tensor names exist (never by file
or class names):

- per expert: ``...experts.{e}.gate_proj.weight`` [I, H], ``up_proj`` [I, H], ``down_proj`` [H, I]
  (Mixtral: ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2``), as published on the Hub and
  as transformers' ``save_pretrained`` writes them;
- fused: ``...mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj``
  [E, H, I], the parameters of transformers 5 models, which it also loads directly.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from klotski_tier.core.errors import CheckpointError, UnsupportedModelError
from klotski_tier.core.model.spec import ModelSpec, QKNorm

_LAYER = "model.layers.{l}"
_ATTN = _LAYER + ".self_attn"
_MLP = _LAYER + ".mlp"
SUPPORTED_ACTIVATION = "silu"
SANE_LIMITS: Mapping[str, int] = {
    "num_hidden_layers": 1024,  # the deepest released models have ~130 layers
    "num_local_experts": 16384,  # experts per layer: released MoEs have up to 512
    "num_experts": 16384,
    "num_experts_per_tok": 16384,
    "vocab_size": 1 << 22,  # 4M tokens; the largest released vocabularies hold ~260k
    "hidden_size": 1 << 17,  # the widest released models have ~20k
    "intermediate_size": 1 << 20,
    "moe_intermediate_size": 1 << 20,
    "shared_expert_intermediate_size": 1 << 20,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 4096,
}
"""The largest value of each size in ``config.json`` this tool accepts, checked before anything is
sized by it: a config that claims a million layers is refused, not allocated for."""
MAX_EXPERT_PAIRS = 1 << 28
"""The most layers x experts x experts a model may have: the routing statistics of the planner and of the
correlation prefetcher keep an experts x experts matrix per layer. The largest released MoEs need about
2^25 (128 layers of 512 experts); 2^28 of float64 is 2 GiB, each limit of :data:`SANE_LIMITS` alone
allows 2^38."""
MODEL_DTYPES: Mapping[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ExpertLayout(enum.Enum):
    PER_EXPERT = "per_expert"
    FUSED = "fused"


@dataclass(frozen=True)
class PerExpertNames:
    """Format strings (``{l}`` layer, ``{e}`` expert) of a per-expert checkpoint's MoE tensors."""

    router: str  # [E, H]
    gate: str  # [I, H]
    up: str  # [I, H]
    down: str  # [H, I]


@dataclass(frozen=True)
class FusedExpertNames:
    """Format strings (``{l}`` layer) of a fused checkpoint's MoE tensors."""

    router: str = _MLP + ".gate.weight"  # [E, H]
    gate_up: str = _MLP + ".experts.gate_up_proj"  # [E, 2I, H], gate rows first
    down: str = _MLP + ".experts.down_proj"  # [E, H, I]


_QWEN_PER_EXPERT = PerExpertNames(
    router=_MLP + ".gate.weight",
    gate=_MLP + ".experts.{e}.gate_proj.weight",
    up=_MLP + ".experts.{e}.up_proj.weight",
    down=_MLP + ".experts.{e}.down_proj.weight",
)
_MIXTRAL_PER_EXPERT = PerExpertNames(
    router=_LAYER + ".block_sparse_moe.gate.weight",
    gate=_LAYER + ".block_sparse_moe.experts.{e}.w1.weight",
    up=_LAYER + ".block_sparse_moe.experts.{e}.w3.weight",
    down=_LAYER + ".block_sparse_moe.experts.{e}.w2.weight",
)


@dataclass(frozen=True)
class FamilyNames:
    """Tensor names of one family; per-layer names are format strings with ``{l}``."""

    per_expert: PerExpertNames
    fused: FusedExpertNames = field(default_factory=FusedExpertNames)
    embed: str = "model.embed_tokens.weight"  # [V, H]
    final_norm: str = "model.norm.weight"  # [H]
    lm_head: str = "lm_head.weight"  # [V, H]
    input_norm: str = _LAYER + ".input_layernorm.weight"  # [H]
    post_norm: str = _LAYER + ".post_attention_layernorm.weight"  # [H]
    q: str = _ATTN + ".q_proj.weight"  # [Hq*D, H]
    k: str = _ATTN + ".k_proj.weight"  # [Hkv*D, H]
    v: str = _ATTN + ".v_proj.weight"  # [Hkv*D, H]
    o: str = _ATTN + ".o_proj.weight"  # [H, Hq*D]
    q_bias: str = _ATTN + ".q_proj.bias"
    k_bias: str = _ATTN + ".k_proj.bias"
    v_bias: str = _ATTN + ".v_proj.bias"
    o_bias: str = _ATTN + ".o_proj.bias"
    q_norm: str = _ATTN + ".q_norm.weight"
    k_norm: str = _ATTN + ".k_norm.weight"
    shared_gate: str = _MLP + ".shared_expert.gate_proj.weight"  # [S, H]
    shared_up: str = _MLP + ".shared_expert.up_proj.weight"  # [S, H]
    shared_down: str = _MLP + ".shared_expert.down_proj.weight"  # [H, S]
    shared_expert_gate: str = _MLP + ".shared_expert_gate.weight"  # [1, H]

    def expert_layout(self, tensor_names: Collection[str]) -> ExpertLayout:
        """Which layout the checkpoint uses, from the names of layer 0's expert tensors."""
        per_expert = self.per_expert.gate.format(l=0, e=0) in tensor_names
        fused = self.fused.gate_up.format(l=0) in tensor_names
        if per_expert == fused:
            found = "both" if fused else "neither"
            raise CheckpointError(
                f"the checkpoint has {found} of {self.per_expert.gate.format(l=0, e=0)} (experts stored one "
                f"by one) and {self.fused.gate_up.format(l=0)} (experts fused); it does not match config.json"
            )
        return ExpertLayout.FUSED if fused else ExpertLayout.PER_EXPERT


@dataclass(frozen=True)
class Family:
    """Everything that differs between the supported model families; fields left out are the common case."""

    model_type: str
    names: FamilyNames
    experts_keys: tuple[str, ...]  # the first present key gives E
    intermediate_key: str  # gives I
    defaults: Mapping[str, Any]  # transformers' defaults for keys a config.json may omit
    qk_norm: QKNorm = QKNorm.NONE
    bias_key: str | None = "attention_bias"  # config key switching attention biases on; None: no biases
    o_bias_with_qkv: bool = True  # the bias switch also puts a bias on o_proj
    shared_expert: bool = False
    always_norm_topk: bool = False  # Mixtral renormalizes the top-k weights whatever the config says
    router_weights_in_model_dtype: bool = True
    sliding_switch: str | None = None  # key turning sliding windows on; None: a non-null sliding_window does


_COMMON_DEFAULTS: Mapping[str, Any] = {
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "norm_topk_prob": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "clip_qkv": None,
    "attention_bias": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
_QWEN_DEFAULTS: Mapping[str, Any] = {
    **_COMMON_DEFAULTS,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10_000.0,
    "max_position_embeddings": 32768,
}

FAMILIES: Mapping[str, Family] = {
    "mixtral": Family(
        model_type="mixtral",
        names=FamilyNames(per_expert=_MIXTRAL_PER_EXPERT),
        experts_keys=("num_local_experts", "num_experts"),
        intermediate_key="intermediate_size",
        defaults={
            **_COMMON_DEFAULTS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": 4096 * 32,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
        bias_key=None,
        always_norm_topk=True,
        router_weights_in_model_dtype=False,
    ),
    "qwen2_moe": Family(
        model_type="qwen2_moe",
        names=FamilyNames(per_expert=_QWEN_PER_EXPERT),
        experts_keys=("num_experts",),
        intermediate_key="moe_intermediate_size",
        defaults={**_QWEN_DEFAULTS, "num_key_value_heads": 16, "qkv_bias": True},
        bias_key="qkv_bias",
        o_bias_with_qkv=False,
        shared_expert=True,
        sliding_switch="use_sliding_window",
    ),
    "qwen3_moe": Family(
        model_type="qwen3_moe",
        names=FamilyNames(per_expert=_QWEN_PER_EXPERT),
        experts_keys=("num_experts", "num_local_experts"),
        intermediate_key="moe_intermediate_size",
        defaults={**_QWEN_DEFAULTS, "num_key_value_heads": 4},
        qk_norm=QKNorm.PER_HEAD,
        sliding_switch="use_sliding_window",
    ),
    "olmoe": Family(
        model_type="olmoe",
        names=FamilyNames(per_expert=_QWEN_PER_EXPERT),
        experts_keys=("num_experts", "num_local_experts"),
        intermediate_key="intermediate_size",
        defaults={
            **_COMMON_DEFAULTS,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10_000.0,
            "max_position_embeddings": 4096,
            "pad_token_id": 1,
            "eos_token_id": 50279,
        },
        qk_norm=QKNorm.FULL,
    ),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family_of(model_type: Any) -> Family:
    """The :class:`Family` of ``model_type``; others raise :class:`UnsupportedModelError`."""
    found = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if found is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} in config.json is not supported; "
            f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return found


def parse_spec(config: Mapping[str, Any], tensor_dtype: torch.dtype | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a ``config.json``; ``tensor_dtype`` stands in when it names no dtype."""
    family = family_of(config.get("model_type"))
    read = ConfigReader(config, family)
    _check_supported(read, family)
    num_heads, num_experts = read.positive_int("num_attention_heads"), read.positive_int(*family.experts_keys)
    num_layers = read.positive_int("num_hidden_layers")
    if num_layers * num_experts**2 > MAX_EXPERT_PAIRS:
        raise CheckpointError(
            f"config.json: {num_layers} layers of {num_experts} experts is more than any model this tool "
            f"runs (layers x experts^2 = {num_layers * num_experts**2}, over {MAX_EXPERT_PAIRS}); "
            "fix config.json"
        )
    bias = bool(read.value(family.bias_key)) if family.bias_key else False
    return ModelSpec(
        family=family.model_type,
        vocab_size=read.positive_int("vocab_size"),
        hidden_size=read.positive_int("hidden_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=_kv_heads(read, num_heads),
        head_dim=_head_dim(read, family, num_heads),
        num_experts=num_experts,
        top_k=_top_k(read, num_experts),
        expert_intermediate_size=read.positive_int(family.intermediate_key),
        shared_expert_intermediate_size=(
            read.positive_int("shared_expert_intermediate_size") if family.shared_expert else 0
        ),
        norm_topk_prob=family.always_norm_topk or bool(read.value("norm_topk_prob")),
        router_weights_in_model_dtype=family.router_weights_in_model_dtype,
        qk_norm=family.qk_norm,
        qkv_bias=bias,
        clip_qkv=None if read.value("clip_qkv") is None else read.float_value("clip_qkv"),
        rms_norm_eps=read.float_value("rms_norm_eps"),
        rope_theta=_rope_theta(read),
        max_position_embeddings=read.positive_int("max_position_embeddings"),
        tie_word_embeddings=bool(read.value("tie_word_embeddings")),
        dtype=_model_dtype(config, tensor_dtype),
        eos_token_ids=_token_ids(read.token("eos_token_id")),
        pad_token_id=read.token_id("pad_token_id"),
        bos_token_id=read.token_id("bos_token_id"),
    )


class ConfigReader:
    """Typed reads of ``config.json`` keys with the family's defaults; bad values raise."""

    def __init__(self, config: Mapping[str, Any], family: Family) -> None:
        self.config = config
        self.family = family

    def value(self, key: str) -> Any:
        """The value of ``key``; absent or null gives transformers' default."""
        found = self.config.get(key)
        return self.family.defaults.get(key) if found is None else found

    def positive_int(self, *keys: str) -> int:
        """The value of the first of ``keys`` present (aliases); it must be an integer above 0."""
        key = next((k for k in keys if self.value(k) is not None), keys[0])
        found = self.value(key)
        if found is None:
            raise CheckpointError(f"config.json lacks the required key {key!r}; restore the original")
        if not isinstance(found, int) or isinstance(found, bool) or found <= 0:
            raise CheckpointError(
                f"config.json: {key} = {found!r} is not a positive integer; fix config.json"
            )
        limit = SANE_LIMITS.get(key)
        if limit is not None and found > limit:
            raise CheckpointError(
                f"config.json: {key} = {found} is over {limit}, more than any model this tool runs; "
                "fix config.json"
            )
        return found

    def float_value(self, key: str) -> float:
        found = self.value(key)
        if not isinstance(found, int | float) or isinstance(found, bool) or not 0 <= found < math.inf:
            raise CheckpointError(  # NaN fails the comparison: json reads NaN and Infinity
                f"config.json: {key} = {found!r} is not a finite non-negative number; fix config.json"
            )
        return float(found)

    def token(self, key: str) -> Any:
        """A token id entry: an explicit null stays None, an absent key takes the default."""
        return self.config[key] if key in self.config else self.family.defaults.get(key)

    def token_id(self, key: str) -> int | None:
        found = self.token(key)
        if found is not None and (not isinstance(found, int) or isinstance(found, bool) or found < 0):
            raise CheckpointError(f"config.json: {key} = {found!r} is not a token id; fix config.json")
        return found


def _check_supported(read: ConfigReader, family: Family) -> None:
    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"config.json of this {family.model_type} model {what}; not supported")

    if read.value("hidden_act") != SUPPORTED_ACTIVATION:
        raise refuse(
            f"uses hidden_act {read.value('hidden_act')!r}; only {SUPPORTED_ACTIVATION!r} is implemented"
        )
    if read.value("decoder_sparse_step") != 1 or read.value("mlp_only_layers"):
        raise refuse("mixes dense and MoE layers (decoder_sparse_step != 1 or mlp_only_layers set)")
    if _sliding_window_in_use(read, family):
        raise refuse("uses sliding-window attention; only full attention is implemented")
    if family.bias_key is None and read.config.get("attention_bias"):
        raise refuse("sets attention_bias, but the family has no attention biases")


def _sliding_window_in_use(read: ConfigReader, family: Family) -> bool:
    layer_types = read.config.get("layer_types") or []
    if any(kind != "full_attention" for kind in layer_types):
        return True
    if family.sliding_switch is not None:
        return bool(read.config.get(family.sliding_switch))
    return read.config.get("sliding_window") is not None


def _kv_heads(read: ConfigReader, num_heads: int) -> int:
    if read.value("num_key_value_heads") is None:
        return num_heads
    kv_heads = read.positive_int("num_key_value_heads")
    if num_heads % kv_heads:
        raise CheckpointError(
            f"config.json: num_attention_heads {num_heads} is not a multiple of "
            f"num_key_value_heads {kv_heads}; fix config.json"
        )
    return kv_heads


def _head_dim(read: ConfigReader, family: Family, num_heads: int) -> int:
    default = read.positive_int("hidden_size") // num_heads
    head_dim = default if read.value("head_dim") is None else read.positive_int("head_dim")
    if family.qk_norm is QKNorm.FULL and head_dim != default:
        raise UnsupportedModelError(
            f"config.json of this {family.model_type} model sets head_dim {head_dim} != hidden_size / "
            f"num_attention_heads {default}; transformers' {family.model_type} does not support that either"
        )
    return head_dim


def _top_k(read: ConfigReader, num_experts: int) -> int:
    top_k = read.positive_int("num_experts_per_tok")
    if top_k > num_experts:
        raise UnsupportedModelError(
            f"config.json routes each token to num_experts_per_tok {top_k} experts but the model has only "
            f"{num_experts}; fix config.json"
        )
    return top_k


def _rope_theta(read: ConfigReader) -> float:
    """``rope_parameters.rope_theta`` (transformers 5) or top-level ``rope_theta`` (older configs)."""
    theta = read.value("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        params = read.config.get(key) or {}
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            raise UnsupportedModelError(f"config.json: {key} = {params!r} is not one plain RoPE setting")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError(
                f"config.json: {key} asks for {params}; only plain (default) RoPE is supported"
            )
        theta = params.get("rope_theta", theta)
    if not isinstance(theta, int | float) or isinstance(theta, bool) or not 0 < theta < math.inf:
        raise CheckpointError(f"config.json: rope_theta = {theta!r} is not a finite positive number; fix it")
    return float(theta)


def _model_dtype(config: Mapping[str, Any], tensor_dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` (transformers 5) or ``torch_dtype`` (older), else the tensors' dtype."""
    named = config.get("dtype") or config.get("torch_dtype")
    if named is None or named == "auto":
        if tensor_dtype is None:
            raise CheckpointError('config.json names no dtype and no weight dtype was given; add "dtype"')
        named = str(tensor_dtype)
    key = str(named).removeprefix("torch.")
    if key not in MODEL_DTYPES:
        raise UnsupportedModelError(
            f"config.json names dtype {named!r}; supported model dtypes: {', '.join(MODEL_DTYPES)}"
        )
    return MODEL_DTYPES[key]


def _token_ids(value: Any) -> tuple[int, ...]:
    """``eos_token_id`` as a tuple: an int, a list of ints, or null (no end token)."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"config.json: eos_token_id = {value!r} is not an id or a list of ids")
    return tuple(values)
