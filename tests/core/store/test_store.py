"""Packed expert stores: pack then open gives back every block byte for byte, with and without
compression, at 4 KiB-aligned offsets; packing is atomic; corruption is caught with one-line errors."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from klotski_tier.core.demo.build import build_demo
from klotski_tier.core.demo.shape import DemoShape
from klotski_tier.core.errors import CheckpointError, InputError, TierError
from klotski_tier.core.model.blocks import BlockId, BlockKind, BlockLayout, expert_block
from klotski_tier.core.store import codec as codecs
from klotski_tier.core.store import pack as store_pack
from klotski_tier.core.store import packed as store
from klotski_tier.core.store.files import load_model_files, open_model
from tests.checkpoints import read_all_tensors
from tests.conftest import CheckpointFactory

ZSTD = codecs.parse_codec("zstd:3")
CASES = [
    ("mixtral", torch.float32, False),
    ("mixtral", torch.bfloat16, True),
    ("qwen2_moe", torch.bfloat16, False),  # a shared expert: the gate block has five views
    ("qwen3_moe", torch.float32, True),
]
TINY_DEMO = DemoShape(
    vocab_size=320,  # a little over the 259 ids every byte-level BPE needs
    hidden_size=64,
    num_layers=2,
    num_experts=4,
    top_k=2,
    intermediate_size=128,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
    rope_theta=1e6,
)
FAILING_BLOCK = 5  # the failure-injection tests fail while writing this block


def _expected_buffer(layout: BlockLayout) -> bytes:
    """The block buffer assembled with plain file reads, independently of the store's code."""
    buffer = bytearray(layout.nbytes)
    for piece in layout.pieces:
        with piece.path.open("rb") as handle:
            handle.seek(piece.file_offset)
            buffer[piece.buffer_offset : piece.buffer_offset + piece.nbytes] = handle.read(piece.nbytes)
    return bytes(buffer)


def _decoded(packed: store.PackedStore, entry: store.StoredBlock) -> torch.Tensor:
    with entry.path.open("rb") as handle:
        handle.seek(entry.offset)
        stored = handle.read(entry.padded_bytes)
    dst = torch.empty(entry.raw_bytes, dtype=torch.uint8)  # [raw_bytes]
    store.decode_block(stored, entry, dst)
    return dst


def _flip_byte(entry: store.StoredBlock, within: int = 100) -> None:
    with entry.path.open("r+b") as handle:
        handle.seek(entry.offset + within)
        value = handle.read(1)[0]
        handle.seek(entry.offset + within)
        handle.write(bytes([value ^ 0xFF]))


def _edit_manifest(directory: Path, **changes: Any) -> None:
    manifest = json.loads((directory / store.MANIFEST_FILE).read_text())
    manifest.update(changes)
    (directory / store.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def mixtral_bf16(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral", dtype=torch.bfloat16)


@pytest.fixture
def packed(mixtral_bf16: Path, tmp_path: Path) -> Path:
    """A compressed store of the bf16 Mixtral checkpoint, private to the test (free to corrupt)."""
    return store_pack.pack(mixtral_bf16, tmp_path / "store", codec=ZSTD).path


@pytest.mark.parametrize("codec", [None, ZSTD], ids=["raw", "zstd"])
@pytest.mark.parametrize(("family", "dtype", "fused"), CASES)
def test_every_block_round_trips(
    checkpoint_factory: CheckpointFactory,
    tmp_path: Path,
    family: str,
    dtype: torch.dtype,
    fused: bool,
    codec: codecs.Codec | None,
) -> None:
    source = checkpoint_factory(family, dtype=dtype, fused=fused)
    files = load_model_files(source)
    summary = store_pack.pack(source, tmp_path / "store", codec=codec)
    packed = store.open_store(tmp_path / "store")
    assert packed.spec == files.spec and packed.expert_layout is files.expert_layout
    assert list(packed.layouts) == list(files.layouts) and summary.blocks == len(files.layouts)
    for block, layout in files.layouts.items():
        assert packed.layouts[block].views == layout.views and packed.layouts[block].nbytes == layout.nbytes
        assert _decoded(packed, packed.entry(block)).numpy().tobytes() == _expected_buffer(layout), block
    assert summary.raw_bytes == sum(layout.nbytes for layout in files.layouts.values())


def test_views_read_the_checkpoint_tensors(packed: Path, mixtral_bf16: Path) -> None:
    tensors = read_all_tensors(mixtral_bf16)
    opened = store.open_store(packed)
    expert = opened.layouts[expert_block(1, 2)].tensors(_decoded(opened, opened.entry(expert_block(1, 2))))
    prefix = "model.layers.1.block_sparse_moe.experts.2"
    assert set(expert) == {"gate", "up", "down"}  # w2 lies between w1 and w3 in the checkpoint
    assert torch.equal(expert["gate"], tensors[f"{prefix}.w1.weight"])
    assert torch.equal(expert["up"], tensors[f"{prefix}.w3.weight"])
    assert torch.equal(expert["down"], tensors[f"{prefix}.w2.weight"])


def test_uncompressed_blocks_are_one_aligned_piece(mixtral_bf16: Path, tmp_path: Path) -> None:
    opened = store.open_store(store_pack.pack(mixtral_bf16, tmp_path / "store").path)
    files = load_model_files(mixtral_bf16)
    for block, layout in opened.layouts.items():
        entry = opened.entry(block)
        (piece,) = layout.pieces
        assert (piece.path, piece.file_offset, piece.nbytes, piece.buffer_offset) == (
            entry.path,
            entry.offset,
            entry.raw_bytes,
            0,
        )
        assert _expected_buffer(layout) == _expected_buffer(
            files.layouts[block]
        )  # a plain read is the buffer


def test_offsets_are_aligned_and_blocks_do_not_overlap(packed: Path) -> None:
    entries = list(store.open_store(packed).entries.values())
    assert all(entry.offset % store.STORE_ALIGN_BYTES == 0 for entry in entries)
    assert all(a.offset + a.padded_bytes <= b.offset for a, b in itertools.pairwise(entries))
    assert (packed / store.BLOCKS_FILE).stat().st_size % store.STORE_ALIGN_BYTES == 0
    assert all(entry.compressed for entry in entries)  # bf16 weights: every block shrinks


def test_manifest_records_format_config_and_ratios(packed: Path, mixtral_bf16: Path) -> None:
    manifest = json.loads((packed / store.MANIFEST_FILE).read_text())
    source_config = json.loads((mixtral_bf16 / "config.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["alignment"]) == (store.FORMAT_TAG, 1, 4096)
    assert manifest["config"] == source_config and manifest["model_type"] == "mixtral"
    totals = manifest["totals"]
    assert totals["stored_bytes"] == sum(block["stored_bytes"] for block in manifest["blocks"])
    assert totals["ratio"] == pytest.approx(totals["stored_bytes"] / totals["raw_bytes"], abs=1e-4)
    assert set(totals["by_kind"]) == {kind.value for kind in BlockKind}
    assert {"config.json", "generation_config.json"} <= {path.name for path in packed.iterdir()}
    assert store.is_store(packed) and not store.is_store(mixtral_bf16)


def test_demo_model_compresses_with_shuffle(tmp_path: Path) -> None:
    """Structured bf16 weights: zstd:3 after shuffling stores ~74% of the bytes, ~76% without."""
    demo = build_demo(tmp_path / "demo", TINY_DEMO)
    shuffled = store_pack.pack(demo, tmp_path / "shuffled", codec=ZSTD)
    plain = store_pack.pack(
        demo, tmp_path / "plain", codec=codecs.Codec(ZSTD.name, ZSTD.level, shuffle=False)
    )
    assert shuffled.ratio < plain.ratio < 1.0
    assert shuffled.ratio < 0.8 and shuffled.compressed_blocks == shuffled.blocks


# --- atomic packing -------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [RuntimeError("injected"), KeyboardInterrupt()])
def test_failed_pack_leaves_nothing(
    mixtral_bf16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException
) -> None:
    real = store_pack.assemble_block
    calls: list[BlockLayout] = []

    def failing(layout: BlockLayout) -> codecs.Bytes:
        calls.append(layout)
        if len(calls) == FAILING_BLOCK:
            raise failure
        return real(layout)

    monkeypatch.setattr(store_pack, "assemble_block", failing)
    parent = tmp_path / "parent"
    parent.mkdir()
    with pytest.raises(type(failure)):
        store_pack.pack(mixtral_bf16, parent / "store", codec=ZSTD)
    assert len(calls) == FAILING_BLOCK and list(parent.iterdir()) == []


def test_write_error_is_one_input_error(
    mixtral_bf16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(path: Path, content: dict[str, Any]) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_pack, "_write_json", disk_full)
    with pytest.raises(InputError, match=r"cannot write the store .*No space left on device"):
        store_pack.pack(mixtral_bf16, tmp_path / "store")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_pack_is_cleaned_up_by_the_next(mixtral_bf16: Path, tmp_path: Path) -> None:
    """A pack killed midway leaves a hidden temporary directory, never a store; the next pack removes it."""
    exited = subprocess.Popen(["true"])
    exited.wait()  # reaped: its pid names no process now, like a pack killed midway
    leftover = tmp_path / f".store{store.TEMP_MARK}{exited.pid}-0badc0de"
    leftover.mkdir()
    (leftover / store.BLOCKS_FILE).write_bytes(bytes(store.STORE_ALIGN_BYTES))
    assert not store.is_store(leftover) and not (tmp_path / "store").exists()
    store_pack.pack(mixtral_bf16, tmp_path / "store")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["store"]


@pytest.mark.parametrize("existing", ["directory", "file"])
def test_pack_refuses_an_existing_target(mixtral_bf16: Path, tmp_path: Path, existing: str) -> None:
    target = tmp_path / "store"
    target.mkdir() if existing == "directory" else target.write_text("keep me")
    with pytest.raises(InputError, match="already exists; remove it or choose another path"):
        store_pack.pack(mixtral_bf16, target)
    assert target.exists() and sorted(path.name for path in tmp_path.iterdir()) == ["store"]


# --- corruption -----------------------------------------------------------------------------


def test_flipped_byte_fails_the_checksum(packed: Path) -> None:
    opened = store.open_store(packed)
    entry = opened.entry(expert_block(0, 1))
    _flip_byte(entry)
    with pytest.raises(
        TierError, match=r"block L0\.E1 of .*blocks\.bin fails its checksum; the store is corrupt"
    ):
        _decoded(opened, entry)
    report = store.verify_store(packed)
    assert not report.ok and report.problems == ((expert_block(0, 1), "fails its checksum"),)
    assert report.verified_bytes == opened.raw_bytes - entry.raw_bytes


def test_verify_passes_a_good_store(packed: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = store.verify_store(packed, progress=lambda done, total: seen.append((done, total)))
    opened = store.open_store(packed)
    assert report.ok and report.blocks == len(opened.entries) and report.verified_bytes == opened.raw_bytes
    assert len(seen) == report.blocks and seen[-1] == (opened.raw_bytes, opened.raw_bytes)


def test_decode_accepts_every_buffer_kind_and_checks_reads_in_place(
    mixtral_bf16: Path, tmp_path: Path
) -> None:
    opened = store.open_store(store_pack.pack(mixtral_bf16, tmp_path / "store").path)
    entry = opened.entry(expert_block(1, 3))
    data = (tmp_path / "store" / store.BLOCKS_FILE).read_bytes()[
        entry.offset : entry.offset + entry.padded_bytes
    ]
    expected = _decoded(opened, entry)
    for stored in (
        memoryview(data),
        np.frombuffer(data, np.uint8),
        torch.frombuffer(bytearray(data), dtype=torch.uint8),
    ):
        dst = torch.zeros(entry.raw_bytes, dtype=torch.uint8)
        store.decode_block(stored, entry, dst)
        assert torch.equal(dst, expected)
    in_place = torch.frombuffer(
        bytearray(data[: entry.raw_bytes]), dtype=torch.uint8
    )  # read straight into dst
    store.decode_block(in_place, entry, in_place)
    with pytest.raises(TierError, match=r"L1\.E3 .* was read short"):
        store.decode_block(data[:100], entry, torch.empty(entry.raw_bytes, dtype=torch.uint8))


def test_truncated_blocks_file(packed: Path) -> None:
    blocks = packed / store.BLOCKS_FILE
    os.truncate(blocks, blocks.stat().st_size - store.STORE_ALIGN_BYTES)
    with pytest.raises(CheckpointError, match=r"blocks\.bin is truncated: .* pack the model again"):
        store.open_store(packed)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "store format version 2 but this klotski-tier reads version 1"),
        ({"format": "something-else"}, "is not a klotski-tier-store manifest"),
        ({"blocks": "none"}, "malformed: field 'blocks'"),
        ({"dtype": "F7"}, "malformed: dtype 'F7'"),
        ({"expert_layout": "diagonal"}, "malformed: 'diagonal' is not one of per_expert, fused"),
    ],
)
def test_bad_manifests(packed: Path, change: dict[str, Any], message: str) -> None:
    _edit_manifest(packed, **change)
    with pytest.raises(CheckpointError, match=message):
        store.open_store(packed)


def test_bad_block_records(packed: Path) -> None:
    manifest = json.loads((packed / store.MANIFEST_FILE).read_text())
    manifest["blocks"][3]["offset"] += 1
    (packed / store.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"malformed: block .* has offset .*not aligned"):
        store.open_store(packed)
    manifest["blocks"][3]["offset"] -= 1
    manifest["blocks"][3]["views"][0]["shape"] = [10**6]
    (packed / store.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"view .* does not fit"):
        store.open_store(packed)


@pytest.mark.parametrize("field", ["offset", "stored_bytes"])
def test_a_block_past_the_end_of_the_file_is_the_one_named(packed: Path, field: str) -> None:
    """An offset of 2**62 on one block once blamed the next for overlapping it."""
    manifest = json.loads((packed / store.MANIFEST_FILE).read_text())
    record = manifest["blocks"][2]
    record[field] = 2**62
    if field == "stored_bytes" and record["codec"] == "none":
        record["raw_bytes"] = 2**62
    (packed / store.MANIFEST_FILE).write_text(json.dumps(manifest))
    block = BlockId(BlockKind(record["kind"]), record["layer"], record["expert"])
    with pytest.raises(CheckpointError, match=r"malformed: block .* past the end of blocks\.bin") as info:
        store.open_store(packed)
    assert f"block {block} has offset {record['offset']} and {record['stored_bytes']} stored" in str(
        info.value
    )


@pytest.mark.parametrize(
    ("manifest", "message"),
    [(None, "has no manifest.json, so it is not a finished store"), (b"garbage", "is not valid JSON"),
     (b"", "is not valid JSON"), (b"[" * 100_000, "nests JSON 100000 levels deep")],
)  # fmt: skip
def test_a_store_with_a_damaged_manifest_is_named_a_store(
    packed: Path, manifest: bytes | None, message: str
) -> None:
    """`run --model STORE` once said a store without its manifest had no model.safetensors."""
    path = packed / store.MANIFEST_FILE
    if manifest is None:
        path.unlink()
    else:
        path.write_bytes(manifest)
    with pytest.raises(CheckpointError, match=message) as info:
        open_model(packed)
    assert "safetensors" not in str(info.value)


def test_missing_and_unreadable_manifests(packed: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not a directory"):
        store.open_store(tmp_path / "nowhere")
    (packed / store.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json is not valid JSON"):
        store.open_store(packed)
    assert not store.is_store(packed)
    (packed / store.MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"has no manifest\.json, so it is not a finished store"):
        store.open_store(packed)


def test_copied_store_still_opens(packed: Path, tmp_path: Path) -> None:
    """Paths in a store are relative: a moved store reads from its new place."""
    moved = Path(shutil.copytree(packed, tmp_path / "moved"))
    shutil.rmtree(packed)
    opened = store.open_store(moved)
    assert all(entry.path == moved.resolve() / store.BLOCKS_FILE for entry in opened.entries.values())
    assert store.verify_store(moved).ok
