"""Block layouts read back with plain file reads equal the transformers model's own tensors."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.model.blocks import BlockKind, BlockLayout, attn_block, expert_block, head_block
from klotski_tier.core.model.families import ExpertLayout
from klotski_tier.core.model.layouts import SPLIT_ROLES, largest_block_bytes
from klotski_tier.core.store.files import ModelFiles, load_model_files
from tests.checkpoints import FAMILIES, load_reference, read_all_tensors, write_tensors
from tests.conftest import CheckpointFactory

BF16_STEP_AT_4 = 2.0**-5  # spacing of bfloat16 values in [4, 8), where the top logits lie
PROMPTS = torch.tensor([[1, 5, 17, 33, 60], [1, 60, 7, 80, 12]])  # [B, T] token ids


def read_block(layout: BlockLayout) -> dict[str, torch.Tensor]:
    """Fill a buffer from the layout's pieces with ordinary file reads, then view it."""
    buffer = torch.zeros(layout.nbytes, dtype=torch.uint8)
    for piece in layout.pieces:
        with piece.path.open("rb") as file:
            file.seek(piece.file_offset)
            data = bytearray(file.read(piece.nbytes))
        buffer[piece.buffer_offset : piece.buffer_offset + piece.nbytes] = torch.frombuffer(
            data, dtype=torch.uint8
        )
    return layout.tensors(buffer)


def expected_block(state: Mapping[str, torch.Tensor], layout: BlockLayout) -> dict[str, torch.Tensor]:
    """The block's tensors by role, taken from a transformers 5 state dict (fused expert names)."""
    layer, expert = layout.block.layer, layout.block.expert
    attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
    shared = f"{mlp}.shared_expert"
    by_kind: dict[BlockKind, dict[str, str]] = {
        BlockKind.EMBED: {"embed": "model.embed_tokens.weight"},
        BlockKind.HEAD: {"final_norm": "model.norm.weight", "lm_head": "lm_head.weight"},
        BlockKind.ATTN: {
            "input_norm": f"model.layers.{layer}.input_layernorm.weight",
            **{p: f"{attn}.{p}_proj.weight" for p in "qkvo"},
            **{f"{p}_bias": f"{attn}.{p}_proj.bias" for p in "qkvo"},
            **{f"{p}_norm": f"{attn}.{p}_norm.weight" for p in "qk"},
        },
        BlockKind.GATE: {
            "post_norm": f"model.layers.{layer}.post_attention_layernorm.weight",
            "router": f"{mlp}.gate.weight",
            "shared_down": f"{shared}.down_proj.weight",
            "shared_expert_gate": f"{mlp}.shared_expert_gate.weight",
        },
        BlockKind.EXPERT: {},
    }
    out = {role: state[name] for role, name in by_kind[layout.block.kind].items() if name in state}
    if f"{shared}.gate_proj.weight" in state and layout.block.kind is BlockKind.GATE:
        out["shared_gate_up"] = torch.cat(
            [state[f"{shared}.gate_proj.weight"], state[f"{shared}.up_proj.weight"]]
        )
    if layout.block.kind is BlockKind.EXPERT:
        out["gate_up"] = state[f"{mlp}.experts.gate_up_proj"][expert]  # [2I, H]
        out["down"] = state[f"{mlp}.experts.down_proj"][expert]  # [H, I]
    return out


def joined(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views a layout split (gate and up apart in the checkpoint) joined back, as transformers fuses them."""
    for role, parts in SPLIT_ROLES.items():
        if all(part in tensors for part in parts):
            tensors[role] = torch.cat([tensors.pop(part) for part in parts])
    return tensors


def assert_blocks_match_reference(files: ModelFiles, dtype: torch.dtype) -> None:
    state = load_reference(files.checkpoint.directory, dtype).state_dict()
    for block, layout in files.layouts.items():
        got, want = joined(read_block(layout)), expected_block(state, layout)
        assert got.keys() == want.keys(), block
        for role, tensor in want.items():
            assert got[role].dtype == dtype and torch.equal(got[role], tensor), f"{block} {role}"


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_equal_transformers_tensors(
    checkpoint_factory: CheckpointFactory, family: str, fused: bool
) -> None:
    files = load_model_files(checkpoint_factory(family, fused=fused))
    assert files.expert_layout is (ExpertLayout.FUSED if fused else ExpertLayout.PER_EXPERT)
    assert len(files.layouts) == 2 + files.spec.num_layers * (2 + files.spec.num_experts)
    assert_blocks_match_reference(files, torch.float32)


@pytest.mark.parametrize(
    ("family", "overrides", "roles"),
    [
        ("qwen3_moe", {"attention_bias": True}, {"q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm"}),
        (
            "olmoe",
            {"attention_bias": True, "clip_qkv": 4.0},
            {"q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm"},
        ),
        ("qwen2_moe", {"qkv_bias": False}, set()),
    ],
)
def test_optional_attention_tensors(
    checkpoint_factory: CheckpointFactory, family: str, overrides: dict[str, Any], roles: set[str]
) -> None:
    files = load_model_files(checkpoint_factory(family, **overrides))
    attention_roles = {view.role for view in files.layouts[attn_block(1)].views}
    assert attention_roles - {"input_norm", "q", "k", "v", "o"} == roles
    assert_blocks_match_reference(files, torch.float32)


@pytest.mark.parametrize(("family", "fused"), [("qwen2_moe", False), ("olmoe", True)])
def test_sharded_bfloat16_checkpoint(checkpoint_factory: CheckpointFactory, family: str, fused: bool) -> None:
    files = load_model_files(checkpoint_factory(family, fused=fused, shards=3, dtype=torch.bfloat16))
    assert len({piece.path for layout in files.layouts.values() for piece in layout.pieces}) >= 2
    assert files.spec.dtype == torch.bfloat16
    assert_blocks_match_reference(files, torch.bfloat16)


def test_tied_embeddings_read_the_embedding(checkpoint_factory: CheckpointFactory) -> None:
    files = load_model_files(checkpoint_factory("qwen3_moe", tie_word_embeddings=True))
    assert "lm_head.weight" not in files.checkpoint.tensors
    embed = files.checkpoint.entry("model.embed_tokens.weight")
    (piece,) = [p for p in files.layouts[head_block()].pieces if p.tensor_name == embed.name]
    assert (piece.path, piece.file_offset, piece.nbytes) == (embed.path, embed.file_offset, embed.nbytes)
    assert_blocks_match_reference(files, torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
def test_buffers_are_images_of_aligned_file_runs(checkpoint_factory: CheckpointFactory, family: str) -> None:
    """Every read is a 4 KiB-aligned file range landing at a 4 KiB-aligned buffer offset (O_DIRECT reads it
    in place), each tensor sits in its read at its file offset, and views are disjoint and covered."""
    files = load_model_files(checkpoint_factory(family))
    for layout in files.layouts.values():
        reads = layout.reads
        assert reads and layout.disk_reads == reads and layout.nbytes % 4096 == 0
        for read in reads:
            assert read.file_offset % 4096 == 0 and read.buffer_offset % 4096 == 0, layout.block
            assert read.nbytes % 4096 == 0 or read.file_offset + read.nbytes == read.path.stat().st_size
        for piece in layout.pieces:
            (read,) = [
                r for r in reads if r.path == piece.path and 0 <= piece.file_offset - r.file_offset < r.nbytes
            ]
            assert piece.buffer_offset - read.buffer_offset == piece.file_offset - read.file_offset
            assert piece.file_offset + piece.nbytes <= read.file_offset + read.nbytes, layout.block
        end = 0
        for view in sorted(layout.views, key=lambda v: v.buffer_offset):
            assert view.buffer_offset >= end and view.buffer_offset % view.dtype.itemsize == 0
            end = view.buffer_offset + view.nbytes
            inside = [p for p in layout.pieces if view.buffer_offset <= p.buffer_offset < end]
            assert sum(p.nbytes for p in inside) == view.nbytes, f"{layout.block} {view.role}"
        assert end <= layout.nbytes
    assert largest_block_bytes(files.layouts) == max(layout.nbytes for layout in files.layouts.values())


def test_an_experts_matrices_are_one_read(checkpoint_factory: CheckpointFactory) -> None:
    """Mixtral's w1, w2, w3 lie back to back: one request; gate and up are views apart (w2 between)."""
    files = load_model_files(checkpoint_factory("mixtral"))
    layout = files.layouts[expert_block(1, 2)]
    assert len(layout.reads) == 1 and len(layout.pieces) == 3
    assert {view.role for view in layout.views} == {"gate", "up", "down"}
    fused = load_model_files(checkpoint_factory("mixtral", fused=True)).layouts[expert_block(1, 2)]
    assert {view.role for view in fused.views} == {"gate_up", "down"}  # one slice of gate_up_proj


def test_fused_checkpoint_loads_in_transformers_identically(checkpoint_factory: CheckpointFactory) -> None:
    for family in FAMILIES:
        split = load_reference(checkpoint_factory(family), torch.float32)
        fused = load_reference(checkpoint_factory(family, fused=True), torch.float32)
        split_state, fused_state = split.state_dict(), fused.state_dict()
        assert split_state.keys() == fused_state.keys()
        assert all(torch.equal(split_state[name], fused_state[name]) for name in split_state), family
        with torch.no_grad():
            torch.testing.assert_close(split(PROMPTS).logits, fused(PROMPTS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_factory_models_decode_without_ties(checkpoint_factory: CheckpointFactory, family: str) -> None:
    model: Any = load_reference(checkpoint_factory(family, dtype=torch.bfloat16), torch.bfloat16)
    with torch.no_grad():
        logits = model(PROMPTS).logits.float()  # [B, T, V]
        tokens = model.generate(PROMPTS, max_new_tokens=8, do_sample=False)[:, PROMPTS.shape[1] :]
    top2 = logits.topk(2, dim=-1).values  # [B, T, 2]
    gaps = top2[..., 0] - top2[..., 1]  # [B, T]
    assert gaps.median() > 4 * BF16_STEP_AT_4, gaps  # most greedy choices are far from a tie
    assert len(set(tokens.flatten().tolist())) >= 4


def _edited_copy(source: Path, tmp_path: Path, replace: Mapping[str, torch.Tensor | None]) -> Path:
    """A copy of ``source`` with tensors replaced (or deleted, for None); single shard."""
    directory = Path(shutil.copytree(source, tmp_path / "edited"))
    tensors = read_all_tensors(directory)
    for name, tensor in replace.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    write_tensors(directory, tensors)
    return directory


def test_shape_mismatch_names_the_tensor(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    wrong = {"model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 16)}
    directory = _edited_copy(checkpoint_factory("mixtral"), tmp_path, wrong)
    name = re.escape("tensor model.layers.0.self_attn.q_proj.weight")
    message = name + r" has shape \(32, 16\) but config\.json implies \(32, 32\)"
    with pytest.raises(CheckpointError, match=message):
        load_model_files(directory)


def test_fused_expert_count_mismatch(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(checkpoint_factory("olmoe", fused=True), tmp_path / "copy"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_experts": 3}))
    with pytest.raises(CheckpointError, match=r"has shape \(4, 32\) but config\.json implies \(3, 32\)"):
        load_model_files(directory)


def test_dtype_mismatch_names_the_tensor(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    half = torch.zeros(32, 24, dtype=torch.float16)
    directory = _edited_copy(checkpoint_factory("qwen2_moe"), tmp_path, {name: half})
    message = rf"tensor {name} has dtype torch\.float16 but the model's dtype is torch\.float32"
    with pytest.raises(CheckpointError, match=message):
        load_model_files(directory)


def test_config_dtype_must_match_the_weights(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    directory = Path(shutil.copytree(checkpoint_factory("mixtral"), tmp_path / "copy"))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    message = r"model\.embed_tokens\.weight has dtype torch\.float32 but the model's dtype is torch\.bfloat16"
    with pytest.raises(CheckpointError, match=message):
        load_model_files(directory)


def test_dtype_inferred_from_weights_when_config_has_none(
    checkpoint_factory: CheckpointFactory, tmp_path: Path
) -> None:
    directory = Path(
        shutil.copytree(checkpoint_factory("qwen3_moe", dtype=torch.bfloat16), tmp_path / "copy")
    )
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    assert load_model_files(directory).spec.dtype == torch.bfloat16


@pytest.mark.parametrize("missing", ["model.layers.1.post_attention_layernorm.weight", "lm_head.weight"])
def test_missing_tensor_is_named(checkpoint_factory: CheckpointFactory, tmp_path: Path, missing: str) -> None:
    directory = _edited_copy(checkpoint_factory("mixtral"), tmp_path, {missing: None})
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(missing)} is missing"):
        load_model_files(directory)


def test_no_expert_tensors_in_either_layout(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    source = checkpoint_factory("qwen3_moe", fused=True)
    directory = _edited_copy(source, tmp_path, {"model.layers.0.mlp.experts.gate_up_proj": None})
    with pytest.raises(CheckpointError, match=r"has neither of .*experts\.0\.gate_proj\.weight"):
        load_model_files(directory)
