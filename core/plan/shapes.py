"""Model shapes the planner and the simulator can study without a checkpoint: built-ins and user TOML.

A *shape* is a :class:`ModelSpec` (sizes, heads, experts, dtype) with no weights behind it. The
built-ins are written below as the ``config.json`` values their Hugging Face repositories publish
(trimmed to the keys a shape needs) and go through :func:`klotski_tier.core.model.families.parse_spec`,
the same code that reads real checkpoints. Every built-in is bf16, the dtype these models are
served in (OLMoE's config names float32, the dtype its weights are stored in).

DeepSeek-V2-Lite is not a family the engine runs; :func:`deepseek_v2_equivalent` turns its config
into the nearest qwen2_moe one (its docstring says how). The planner only needs sizes and flops.

A user's shapes file holds one ``[shape.NAME]`` table per shape with the keys of a ``config.json``
(:data:`SHAPE_KEYS`; ``torch_dtype`` defaults to bfloat16, ``source`` says where the values come
from); :func:`shape_to_toml` writes one from any spec, a built-in's for instance, to start from.
Names are case-insensitive everywhere.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from klotski_tier.core import reads
from klotski_tier.core.demo import shape as demo
from klotski_tier.core.errors import CheckpointError, ConfigError
from klotski_tier.core.model.families import FAMILIES, parse_spec
from klotski_tier.core.model.spec import ModelSpec, QKNorm
from klotski_tier.core.units import MIB

logger = logging.getLogger(__name__)

DEFAULT_DTYPE = torch.bfloat16  # the dtype of a shape whose table names none
DEEPSEEK_V2 = "deepseek_v2"  # the one model type approximated rather than parsed as is
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")  # TOML keys that need no quotes
TOML_TABLES_MAX_BYTES = MIB  # a hardware or shape file: a few tables of a few lines each
EQUIVALENT_KV_HEADS = 2  # KV heads of the attention standing in for DeepSeek's MLA (see below)


@dataclass(frozen=True)
class ShapeEntry:
    """A built-in shape: its spec and where its figures come from."""

    name: str  # display name, e.g. "Mixtral-8x7B"
    source: str  # the Hugging Face repository whose config.json gives the values
    spec: ModelSpec
    note: str = ""  # approximations, if any


# --- the published configs -------------------------------------------------------------------

_MIXTRAL_8X7B: dict[str, Any] = {
    "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 8,
    "num_experts_per_tok": 2, "vocab_size": 32000, "rope_theta": 1e6, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
_MIXTRAL_8X22B: dict[str, Any] = {
    **_MIXTRAL_8X7B, "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56,
    "num_attention_heads": 48, "max_position_embeddings": 65536,
}  # fmt: skip
_QWEN15_MOE_A27B: dict[str, Any] = {
    "model_type": "qwen2_moe", "hidden_size": 2048, "moe_intermediate_size": 1408, "num_hidden_layers": 24,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "shared_expert_intermediate_size": 5632, "vocab_size": 151936, "rope_theta": 1e6,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "norm_topk_prob": False, "qkv_bias": True,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151643,
}  # fmt: skip
_QWEN3_30B_A3B: dict[str, Any] = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
    "num_experts_per_tok": 8, "vocab_size": 151936, "rope_theta": 1e6, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "norm_topk_prob": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645,
}  # fmt: skip
_OLMOE_1B_7B: dict[str, Any] = {
    "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
    "vocab_size": 50304, "rope_theta": 10000.0, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "norm_topk_prob": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "pad_token_id": 1, "eos_token_id": 50279,
}  # fmt: skip
_DEEPSEEK_V2_LITE: dict[str, Any] = {
    "model_type": DEEPSEEK_V2, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "first_k_dense_replace": 1, "num_attention_heads": 16, "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "vocab_size": 102400,
    "rope_theta": 10000.0, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "norm_topk_prob": False,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 100000, "eos_token_id": 100001,
}  # fmt: skip
_D = demo.DEMO_SHAPE
_DEMO: dict[str, Any] = {
    **_MIXTRAL_8X7B, "hidden_size": _D.hidden_size, "intermediate_size": _D.intermediate_size,
    "num_hidden_layers": _D.num_layers, "num_attention_heads": _D.num_heads,
    "num_key_value_heads": _D.num_kv_heads, "head_dim": _D.head_dim, "num_local_experts": _D.num_experts,
    "num_experts_per_tok": _D.top_k, "vocab_size": _D.vocab_size, "rope_theta": _D.rope_theta,
    "max_position_embeddings": _D.max_position_embeddings,
    "rms_norm_eps": demo.RMS_NORM_EPS, "bos_token_id": demo.BOS_TOKEN_ID, "eos_token_id": demo.EOS_TOKEN_ID,
}  # fmt: skip


_DEEPSEEK_SHARED_KEYS = (
    "hidden_size", "num_hidden_layers", "num_experts_per_tok", "moe_intermediate_size", "vocab_size",
    "rope_theta", "max_position_embeddings", "rms_norm_eps", "norm_topk_prob", "tie_word_embeddings",
    "torch_dtype", "dtype", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
"""Keys a DeepSeek-V2 config shares with qwen2_moe, copied as they are."""
_MLA_KEYS = ("qk_nope_head_dim", "qk_rope_head_dim", "kv_lora_rank", "v_head_dim")


def deepseek_v2_equivalent(config: Mapping[str, Any]) -> dict[str, Any]:
    """The qwen2_moe config nearest to a DeepSeek-V2 one, in bytes and flops.

    - MLA attention becomes grouped-query attention with :data:`EQUIVALENT_KV_HEADS` KV heads whose
      head_dim makes the KV cache per token equal to MLA's cached latent (kv_lora_rank +
      qk_rope_head_dim elements per layer), and as many query heads as bring the attention weights
      closest to MLA's (q / q_lora, kv_a, kv_b and o projections). DeepSeek-V2-Lite: 22 heads of
      144, 2 KV heads: KV cache exact (576 elements per token and layer), weights +2.9 %.
    - The n_shared_experts shared experts become one shared expert n_shared times as wide (same
      bytes and flops); qwen2_moe's sigmoid shared-expert gate adds H weights per layer.
    - The first_k_dense_replace dense layers become MoE layers like the others: per token the
      flops match (top-k + shared experts of Lite are 8 x 1408 wide, its dense MLP 10944), but
      the stored bytes grow by one MoE layer minus one dense MLP (Lite: +0.5 B parameters, +3.2 %).
    - Routing (softmax, greedy top-k) is the same; YaRN RoPE scaling is left out.
    """
    hidden, heads = _positive(config, "hidden_size"), _positive(config, "num_attention_heads")
    latent = _positive(config, "kv_lora_rank") + _positive(config, "qk_rope_head_dim")  # cached per token
    head_dim = math.ceil(latent / (2 * EQUIVALENT_KV_HEADS))
    per_head = 2 * hidden * head_dim  # weights one query head (q, o) or KV head (k, v) adds
    groups = round(
        (_mla_weights(config, hidden, heads) / per_head - EQUIVALENT_KV_HEADS) / EQUIVALENT_KV_HEADS
    )
    shared = _positive(config, "n_shared_experts") * _positive(config, "moe_intermediate_size")
    copied = {key: config[key] for key in _DEEPSEEK_SHARED_KEYS if key in config}
    return copied | {
        "model_type": "qwen2_moe",
        "num_attention_heads": EQUIVALENT_KV_HEADS * max(1, groups),
        "num_key_value_heads": EQUIVALENT_KV_HEADS,
        "head_dim": head_dim,
        "num_experts": _positive(config, "n_routed_experts"),
        "shared_expert_intermediate_size": shared,
        "qkv_bias": False,
    }


def _mla_weights(config: Mapping[str, Any], hidden: int, heads: int) -> int:
    """Weights of one MLA layer: query (plain or low-rank), kv_a (+ its norm), kv_b and o projections."""
    nope, rope, kv_lora, value_head = (_positive(config, key) for key in _MLA_KEYS)
    q_lora = _optional_positive(config, "q_lora_rank")
    query = (
        hidden * heads * (nope + rope) if q_lora is None else (hidden + 1 + heads * (nope + rope)) * q_lora
    )
    kv_a = hidden * (kv_lora + rope) + kv_lora
    return query + kv_a + kv_lora * heads * (nope + value_head) + heads * value_head * hidden


def _positive(config: Mapping[str, Any], key: str) -> int:
    """``config[key]``, a positive integer, else a :class:`ConfigError`."""
    found = _optional_positive(config, key)
    if found is None:
        raise ConfigError(f"{key} is missing; add it")
    return found


def _optional_positive(config: Mapping[str, Any], key: str) -> int | None:
    found = config.get(key)
    if found is not None and (not isinstance(found, int) or isinstance(found, bool) or found <= 0):
        raise ConfigError(f"{key} = {found!r} is not a positive integer; fix it")
    return found


# --- specs from configs ----------------------------------------------------------------------


def spec_from_config(config: Mapping[str, Any], where: str) -> ModelSpec:
    """The spec of a config.json-like mapping; a bad value is a :class:`ConfigError` naming ``where``."""
    try:
        if config.get("model_type") == DEEPSEEK_V2:
            config = deepseek_v2_equivalent(config)
        return parse_spec(config, tensor_dtype=DEFAULT_DTYPE)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except CheckpointError as exc:  # parse_spec speaks of config.json; here it is a table
        message = str(exc).replace("config.json: ", "").replace("config.json", "the table")
        raise ConfigError(f"{where}: {message.replace('restore the original', 'add it')}") from exc


def _entry(name: str, source: str, config: Mapping[str, Any], note: str = "") -> ShapeEntry:
    return ShapeEntry(name, source, spec_from_config(config, f"built-in shape {name}"), note)


MODEL_SHAPES: Mapping[str, ShapeEntry] = {
    entry.name: entry
    for entry in (
        _entry("Mixtral-8x7B", "mistralai/Mixtral-8x7B-v0.1", _MIXTRAL_8X7B),
        _entry("Mixtral-8x22B", "mistralai/Mixtral-8x22B-v0.1", _MIXTRAL_8X22B),
        _entry("Qwen1.5-MoE-A2.7B", "Qwen/Qwen1.5-MoE-A2.7B", _QWEN15_MOE_A27B),
        _entry("Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B", _QWEN3_30B_A3B),
        _entry("OLMoE-1B-7B", "allenai/OLMoE-1B-7B-0924", _OLMOE_1B_7B, "bf16; its config says fp32"),
        _entry("DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2-Lite", _DEEPSEEK_V2_LITE, "as qwen2_moe: see "
               "klotski_tier.core.plan.shapes.deepseek_v2_equivalent"),
        _entry("demo", "klotski_tier.core.demo.shape.DEMO_SHAPE (the built-in demo model)", _DEMO),
    )
}  # fmt: skip
"""Built-in shapes by display name; look them up with :func:`model_shape` (any case)."""

_BY_LOWER_NAME: Mapping[str, ShapeEntry] = {name.lower(): entry for name, entry in MODEL_SHAPES.items()}


def shape_entry(name: str) -> ShapeEntry:
    """The built-in shape ``name`` (any case); others raise :class:`ConfigError` listing the valid names."""
    found = _BY_LOWER_NAME.get(name.strip().lower())
    if found is None:
        raise _unknown_shape(name, {})
    return found


def model_shape(name: str, user_shapes: Mapping[str, ModelSpec] | None = None) -> ModelSpec:
    """The spec of shape ``name`` (any case): from ``user_shapes`` (:func:`load_shapes_file`) or built-in."""
    user = {user_name.lower(): spec for user_name, spec in (user_shapes or {}).items()}
    key = name.strip().lower()
    if key in user:
        return user[key]
    if key not in _BY_LOWER_NAME:
        raise _unknown_shape(name, user_shapes or {})
    return _BY_LOWER_NAME[key].spec


def _unknown_shape(name: str, user_shapes: Mapping[str, ModelSpec]) -> ConfigError:
    from_file = f"; from the shapes file: {', '.join(user_shapes)}" if user_shapes else ""
    return ConfigError(
        f"unknown model shape {name!r}; built-in shapes: {', '.join(MODEL_SHAPES)}{from_file} "
        "(define others in a shapes TOML file)"
    )


# --- parameter counts ------------------------------------------------------------------------


def parameter_count(spec: ModelSpec) -> int:
    """Every weight: embeddings, lm_head unless tied, each layer's attention, norms, router and experts."""
    return _outside_layers(spec) + spec.num_layers * _layer_params(spec, spec.num_experts)


def active_parameter_count(spec: ModelSpec) -> int:
    """Weights one token uses: as :func:`parameter_count` with only top_k routed experts per layer."""
    return _outside_layers(spec) + spec.num_layers * _layer_params(spec, spec.top_k)


def _outside_layers(spec: ModelSpec) -> int:
    embeddings = spec.vocab_size * spec.hidden_size  # [V, H], and lm_head [V, H] unless tied
    return embeddings * (1 if spec.tie_word_embeddings else 2) + spec.hidden_size  # + final norm [H]


def _layer_params(spec: ModelSpec, routed_experts: int) -> int:
    hidden, shared = spec.hidden_size, spec.shared_expert_intermediate_size
    expert = 3 * hidden * spec.expert_intermediate_size  # gate, up [I, H] and down [H, I]
    moe = spec.num_experts * hidden + routed_experts * expert  # router [E, H]
    if shared:
        moe += 3 * hidden * shared + hidden  # the shared expert and its gate [1, H]
    return _attention_params(spec) + moe + 2 * hidden  # + input and post-attention norms [H]


def _attention_params(spec: ModelSpec) -> int:
    hidden, q_size, kv_size = spec.hidden_size, spec.q_size, spec.kv_size
    weights = 2 * hidden * q_size + 2 * hidden * kv_size  # q, o [Hq*D, H]; k, v [Hkv*D, H]
    biases = 0
    if spec.qkv_bias:
        biases = q_size + 2 * kv_size + (hidden if FAMILIES[spec.family].o_bias_with_qkv else 0)
    norms = {QKNorm.NONE: 0, QKNorm.PER_HEAD: 2 * spec.head_dim, QKNorm.FULL: q_size + kv_size}
    return weights + biases + norms[spec.qk_norm]


# --- user shapes from TOML -------------------------------------------------------------------

_BOOL_KEYS = ("norm_topk_prob", "tie_word_embeddings", "qkv_bias", "attention_bias")
_STRING_KEYS = ("model_type", "torch_dtype", "dtype", "hidden_act", "source")
_NUMBER_KEYS = ("rope_theta", "rms_norm_eps", "clip_qkv")
_INT_KEYS = (
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "num_local_experts", "num_experts", "num_experts_per_tok",
    "shared_expert_intermediate_size", "vocab_size", "max_position_embeddings", "bos_token_id",
    "pad_token_id",
)  # fmt: skip
_DEEPSEEK_KEYS = (
    "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "n_routed_experts", "n_shared_experts",
)  # fmt: skip
SHAPE_KEYS: tuple[str, ...] = (*_STRING_KEYS, *_INT_KEYS, *_NUMBER_KEYS, *_BOOL_KEYS, "eos_token_id")
"""Keys a ``[shape.NAME]`` table may hold (deepseek_v2 tables also its MLA and expert keys)."""


def load_shapes_file(path: Path | str) -> dict[str, ModelSpec]:
    """The shapes of the ``[shape.NAME]`` tables of the TOML file at ``path``, by name."""
    shapes: dict[str, ModelSpec] = {}
    for name, table in read_toml_tables(Path(path), "shape", "shapes file").items():
        where = f"{path}: [shape.{name}]"
        if name.lower() in _BY_LOWER_NAME:
            raise ConfigError(f"{where} has the name of a built-in shape; rename it")
        _check_shape_table(table, where)
        shapes[name] = spec_from_config({k: v for k, v in table.items() if k != "source"}, where)
        logger.debug("shape %s from %s: %s", name, path, table.get("source", "no source given"))
    return shapes


def _check_shape_table(table: Mapping[str, Any], where: str) -> None:
    model_type = table.get("model_type")
    valid_types = (*FAMILIES, DEEPSEEK_V2)
    if model_type not in valid_types:
        raise ConfigError(f"{where} model_type = {model_type!r} is not one of: {', '.join(valid_types)}")
    valid = (*SHAPE_KEYS, *(_DEEPSEEK_KEYS if model_type == DEEPSEEK_V2 else ()))
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(f"{where} has unknown key {key!r}; valid keys: {', '.join(valid)}")
        expected = _expected_type(key, value)
        if expected:
            raise ConfigError(f"{where} {key} = {value!r} is not {expected}; fix the file")


def _expected_type(key: str, value: Any) -> str | None:
    """What ``value`` should be when it is the wrong type for ``key``, else None."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if key in _BOOL_KEYS:
        return None if isinstance(value, bool) else "true or false"
    if key in _STRING_KEYS:
        return None if isinstance(value, str) else "a string"
    if key in _NUMBER_KEYS:
        return None if is_int or isinstance(value, float) else "a number"
    if key == "eos_token_id":
        ids = value if isinstance(value, list) else [value]
        return None if all(isinstance(v, int) and not isinstance(v, bool) for v in ids) else "an id or ids"
    return None if is_int else "an integer"


def shape_to_toml(name: str, spec: ModelSpec, source: str = "") -> str:
    """A ``[shape.NAME]`` table that :func:`load_shapes_file` reads back as ``spec``."""
    family = FAMILIES[spec.family]
    keys: dict[str, Any] = {"model_type": spec.family, **({"source": source} if source else {})}
    keys |= {
        "hidden_size": spec.hidden_size, family.intermediate_key: spec.expert_intermediate_size,
        "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
        family.experts_keys[0]: spec.num_experts, "num_experts_per_tok": spec.top_k,
        "vocab_size": spec.vocab_size, "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": spec.rms_norm_eps,
        "norm_topk_prob": spec.norm_topk_prob, "tie_word_embeddings": spec.tie_word_embeddings,
        "torch_dtype": str(spec.dtype).removeprefix("torch."), "eos_token_id": list(spec.eos_token_ids),
    }  # fmt: skip
    if family.shared_expert:
        keys["shared_expert_intermediate_size"] = spec.shared_expert_intermediate_size
    if family.bias_key:
        keys[family.bias_key] = spec.qkv_bias
    optional = {
        "clip_qkv": spec.clip_qkv,
        "bos_token_id": spec.bos_token_id,
        "pad_token_id": spec.pad_token_id,
    }
    keys |= {key: value for key, value in optional.items() if value is not None}
    return toml_table("shape", name, keys)


# --- TOML helpers (also used by klotski_tier.core.plan.hardware) ----------------------------------


def read_toml_tables(path: Path, section: str, what: str) -> dict[str, dict[str, Any]]:
    """The ``[section.NAME]`` tables of the TOML file at ``path``; anything else there is an error."""
    document = reads.read_toml(path, reads.FileKind(what, TOML_TABLES_MAX_BYTES, ConfigError, "fix the file"))
    extra = [key for key in document if key != section]
    tables = document.get(section, {})
    if extra or not isinstance(tables, dict):
        raise ConfigError(f"{what} {path} may hold only [{section}.NAME] tables, found {extra or [section]}")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: {section}.{name} = {table!r} is not a [{section}.{name}] table")
    return tables


def toml_table(section: str, name: str, keys: Mapping[str, Any]) -> str:
    """``[section.NAME]`` and one ``key = value`` line per key (see :func:`toml_value`)."""
    header = name if _BARE_KEY.fullmatch(name) else toml_value(name)
    lines = [f"[{section}.{header}]", *(f"{key} = {toml_value(value)}" for key, value in keys.items())]
    return "\n".join(lines) + "\n"


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal: bool, int, float, str, a list of those, or a mapping (inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    raise AssertionError(f"no TOML form for {value!r}")
