"""Built-in model shapes (published sizes, parameter counts), user shapes from TOML, and one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from klotski_tier.core.bench.compute import demo_spec
from klotski_tier.core.demo.shape import DEMO_SHAPE
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.families import parse_spec
from klotski_tier.core.plan.shapes import (
    MODEL_SHAPES,
    active_parameter_count,
    load_shapes_file,
    model_shape,
    parameter_count,
    shape_entry,
    shape_to_toml,
)
from tests.core.model.test_families import HUB_CONFIGS

# Totals and per-token (active) parameters the model cards publish, in billions.
PUBLISHED_TOTAL = {
    "Mixtral-8x7B": 46.7,
    "Mixtral-8x22B": 141.0,
    "Qwen1.5-MoE-A2.7B": 14.3,
    "Qwen3-30B-A3B": 30.5,
    "OLMoE-1B-7B": 6.9,
    "DeepSeek-V2-Lite": 15.7,
}
PUBLISHED_ACTIVE = {
    "Mixtral-8x7B": 12.9,
    "Mixtral-8x22B": 39.0,
    "Qwen1.5-MoE-A2.7B": 2.7,
    "Qwen3-30B-A3B": 3.3,
    "OLMoE-1B-7B": 1.3,
}
EXACT_TOLERANCE = 0.01  # shapes parsed as published: counts agree to rounding of the published figure
DEEPSEEK_TOLERANCE = 0.04  # its first dense layer counted as a MoE layer: +3.2 % (see deepseek_v2_equivalent)

TINY = """
[shape.Tiny-Mixtral]
model_type = "mixtral"
source = "written by hand"
hidden_size = 256
intermediate_size = 896
num_hidden_layers = 4
num_attention_heads = 8
num_key_value_heads = 2
num_local_experts = 8
num_experts_per_tok = 2
vocab_size = 1000
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "shapes.toml"
    path.write_text(text, encoding="utf-8")
    return path


def one_line_error(path: Path, *phrases: str) -> str:
    """Load ``path``, expect a one-line ConfigError naming the file and every phrase."""
    with pytest.raises(ConfigError) as caught:
        load_shapes_file(path)
    message = str(caught.value)
    assert "\n" not in message
    for phrase in (str(path), *phrases):
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return message


@pytest.mark.parametrize("name", list(MODEL_SHAPES))
def test_every_built_in_loads_by_any_case_and_records_its_source(name: str) -> None:
    spec = model_shape(name.upper())
    assert spec is model_shape(name.lower()) is MODEL_SHAPES[name].spec
    assert spec.dtype is torch.bfloat16
    assert MODEL_SHAPES[name].source


@pytest.mark.parametrize("name", list(PUBLISHED_TOTAL))
def test_parameter_counts_match_the_published_totals(name: str) -> None:
    tolerance = DEEPSEEK_TOLERANCE if name == "DeepSeek-V2-Lite" else EXACT_TOLERANCE
    assert parameter_count(model_shape(name)) / 1e9 == pytest.approx(PUBLISHED_TOTAL[name], rel=tolerance)


@pytest.mark.parametrize("name", list(PUBLISHED_ACTIVE))
def test_active_parameter_counts_match_the_published_ones(name: str) -> None:
    assert active_parameter_count(model_shape(name)) / 1e9 == pytest.approx(PUBLISHED_ACTIVE[name], rel=0.03)


def test_the_published_expert_layouts() -> None:
    qwen15, qwen3 = model_shape("qwen1.5-moe-a2.7b"), model_shape("qwen3-30b-a3b")
    assert (qwen15.num_experts, qwen15.top_k, qwen15.expert_intermediate_size) == (60, 4, 1408)
    assert qwen15.shared_expert_intermediate_size == 5632
    assert (qwen3.num_experts, qwen3.top_k, qwen3.expert_intermediate_size, qwen3.num_layers) == (
        128,
        8,
        768,
        48,
    )
    olmoe = model_shape("olmoe-1b-7b")
    assert (olmoe.num_experts, olmoe.top_k) == (64, 8)
    mixtral = model_shape("mixtral-8x7b")
    assert mixtral.expert_bytes == 3 * 4096 * 14336 * 2  # 352 MB, as ARCHITECTURE.md says


@pytest.mark.parametrize(
    ("name", "repo"),
    [
        ("Mixtral-8x7B", "mistralai/Mixtral-8x7B-v0.1"),
        ("Qwen1.5-MoE-A2.7B", "Qwen/Qwen1.5-MoE-A2.7B"),
        ("Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B"),
        ("OLMoE-1B-7B", "allenai/OLMoE-1B-7B-0924"),
    ],
)
def test_built_ins_equal_the_hub_configs_the_family_tests_use(name: str, repo: str) -> None:
    hub = parse_spec(HUB_CONFIGS[repo])
    assert MODEL_SHAPES[name].source == repo
    assert model_shape(name) == dataclasses.replace(hub, dtype=torch.bfloat16)


def test_deepseek_v2_lite_is_the_documented_equivalent() -> None:
    spec = model_shape("DeepSeek-V2-Lite")
    assert (spec.family, spec.num_layers, spec.num_experts, spec.top_k) == ("qwen2_moe", 27, 64, 6)
    assert spec.shared_expert_intermediate_size == 2 * 1408  # two shared experts of 1408
    assert 2 * spec.kv_size == 512 + 64  # KV cache per token and layer = MLA's latent + rope key
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (22, 2, 144)
    mla_weights = 2048 * 16 * 192 + 2048 * 576 + 512 + 512 * 16 * 256 + 16 * 128 * 2048  # q, kv_a, kv_b, o
    attention = 2 * 2048 * (spec.q_size + spec.kv_size)
    assert attention == pytest.approx(mla_weights, rel=0.03)


def test_demo_is_the_demo_models_shape() -> None:
    spec = model_shape("DEMO")
    assert spec == demo_spec()  # as `klotski-tier bench` times it
    assert (spec.family, spec.hidden_size, spec.num_layers) == ("mixtral", DEMO_SHAPE.hidden_size, 8)
    assert spec.expert_bytes == DEMO_SHAPE.expert_bytes
    assert (spec.num_experts, spec.top_k, spec.vocab_size) == (
        DEMO_SHAPE.num_experts,
        2,
        DEMO_SHAPE.vocab_size,
    )


def test_an_unknown_name_lists_every_choice_in_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        model_shape("mixtral-8x9b")
    message = str(caught.value)
    assert "mixtral-8x9b" in message and "\n" not in message
    assert all(name in message for name in MODEL_SHAPES)
    with pytest.raises(ConfigError, match="from the shapes file: Tiny"):
        model_shape("nope", {"Tiny": model_shape("demo")})
    with pytest.raises(ConfigError, match="built-in shapes: Mixtral-8x7B"):
        shape_entry("nope")


def test_a_handwritten_file_loads_and_is_found_by_any_case(tmp_path: Path) -> None:
    shapes = load_shapes_file(write(tmp_path, TINY))
    spec = model_shape("tiny-mixtral", shapes)
    assert (spec.family, spec.hidden_size, spec.head_dim, spec.num_experts) == ("mixtral", 256, 32, 8)
    assert spec.dtype is torch.bfloat16  # the default when the table names none
    assert model_shape("mixtral-8x7b", shapes) is MODEL_SHAPES["Mixtral-8x7B"].spec


@pytest.mark.parametrize("name", list(MODEL_SHAPES))
def test_every_built_in_round_trips_through_toml(tmp_path: Path, name: str) -> None:
    entry = MODEL_SHAPES[name]
    text = shape_to_toml(f"{name}-copy", entry.spec, source=entry.source)
    assert load_shapes_file(write(tmp_path, text)) == {f"{name}-copy": entry.spec}


def test_a_deepseek_v2_table_is_approximated_like_the_built_in(tmp_path: Path) -> None:
    lines = [
        "[shape.my-lite]",
        'model_type = "deepseek_v2"',
        "hidden_size = 2048\nmoe_intermediate_size = 1408\nnum_hidden_layers = 27\nnum_attention_heads = 16",
        "kv_lora_rank = 512\nqk_nope_head_dim = 128\nqk_rope_head_dim = 64\nv_head_dim = 128",
        "n_routed_experts = 64\nn_shared_experts = 2\nnum_experts_per_tok = 6\nvocab_size = 102400",
        "first_k_dense_replace = 1\nrope_theta = 10000.0\neos_token_id = 100001\nbos_token_id = 100000",
        "max_position_embeddings = 163840\nrms_norm_eps = 1e-6",
    ]
    spec = load_shapes_file(write(tmp_path, "\n".join(lines)))["my-lite"]
    assert spec == model_shape("deepseek-v2-lite")


@pytest.mark.parametrize(
    ("change", "phrases"),
    [
        (("vocab_size = 1000", "vocab_sise = 1000"), ["[shape.Tiny-Mixtral]", "'vocab_sise'", "valid keys"]),
        (("hidden_size = 256", 'hidden_size = "big"'), ["hidden_size", "'big'", "integer"]),
        (("hidden_size = 256", "hidden_size = -256"), ["hidden_size", "-256", "positive integer"]),
        (('model_type = "mixtral"', 'model_type = "llama"'), ["model_type", "'llama'", "qwen3_moe"]),
        (("num_experts_per_tok = 2", "num_experts_per_tok = 9"), ["num_experts_per_tok 9", "only 8"]),
        (("vocab_size = 1000", ""), ["vocab_size", "lacks"]),
        (("[shape.Tiny-Mixtral]", "[shape.MIXTRAL-8x7b]"), ["built-in shape", "rename"]),
        (("[shape.Tiny-Mixtral]", "stray = 1\n[shape.Tiny-Mixtral]"), ["stray", "[shape.NAME]"]),
        (("[shape.Tiny-Mixtral]", "shape = 3"), ["shape", "[shape.NAME]"]),
        (("vocab_size = 1000", "vocab_size = 1000 ="), ["not valid TOML"]),
    ],
)
def test_bad_tables_are_one_line_errors(tmp_path: Path, change: tuple[str, str], phrases: list[str]) -> None:
    old, new = change
    assert old in TINY
    one_line_error(write(tmp_path, TINY.replace(old, new)), *phrases)


def test_a_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    one_line_error(tmp_path / "absent.toml", "cannot read shapes file")
