"""Checkpoint.open: headers parsed by hand and checked against file sizes; each broken case named."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.model.checkpoint import INDEX_FILE, Checkpoint
from tests.checkpoints import read_all_tensors, write_tensors
from tests.conftest import CheckpointFactory

CONFIG = {"model_type": "mixtral"}


def _model_dir(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None, shards: int = 1) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(CONFIG))
    tensors = tensors if tensors is not None else {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    write_tensors(directory, tensors, shards)
    return directory


def _raw_safetensors(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> None:
    """Write a safetensors file byte by byte; ``length`` overrides the header length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def test_single_file_entries_point_at_the_tensor_bytes(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path)
    checkpoint = Checkpoint.open(directory)
    entry = checkpoint.entry("a")
    assert checkpoint.config == CONFIG
    assert (entry.dtype, entry.shape, entry.nbytes) == (torch.float32, (2, 3), 24)
    raw = (directory / "model.safetensors").read_bytes()[entry.file_offset : entry.file_offset + entry.nbytes]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32), torch.arange(6.0))
    assert torch.equal(checkpoint.read_tensor("a"), torch.arange(6.0).reshape(2, 3))


def test_sharded_checkpoint_reads_every_tensor_from_its_shard(checkpoint_factory: CheckpointFactory) -> None:
    directory = checkpoint_factory("qwen2_moe", shards=3)
    checkpoint = Checkpoint.open(directory)
    expected = read_all_tensors(directory)
    assert len({entry.path for entry in checkpoint.tensors.values()}) >= 2
    assert set(checkpoint.tensors) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(checkpoint.read_tensor(name), tensor), name


FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2]
INTEGERS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", [*FLOATS, *INTEGERS])
def test_every_safetensors_dtype_round_trips(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = (torch.arange(12) % 5).reshape(3, 4).to(dtype)
    checkpoint = Checkpoint.open(_model_dir(tmp_path, {"t": tensor, "empty": torch.zeros(0, 4)}))
    assert checkpoint.entry("t").dtype == dtype
    assert torch.equal(checkpoint.read_tensor("t"), tensor)
    assert checkpoint.read_tensor("empty").shape == (0, 4)


def test_entry_names_missing_tensor_and_directory(tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(_model_dir(tmp_path))
    with pytest.raises(CheckpointError, match=r"tensor nope is missing .*model"):
        checkpoint.entry("nope")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"absent does not exist"):
        Checkpoint.open(tmp_path / "absent")


def test_path_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"weights\.bin is a file"):
        Checkpoint.open(tmp_path / "weights.bin")


def test_no_config(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"model has no config\.json"):
        Checkpoint.open(directory)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_config_not_a_json_object(tmp_path: Path, text: str) -> None:
    directory = _model_dir(tmp_path)
    (directory / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"config\.json is not"):
        Checkpoint.open(directory)


def test_no_safetensors_files(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path)
    (directory / "model.safetensors").rename(directory / "pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors .*found pytorch_model\.safetensors"):
        Checkpoint.open(directory)


def test_index_names_a_missing_shard(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, shards=2)
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"names shard model-00002-of-00002\.safetensors, which is missing"
    ):
        Checkpoint.open(directory)


@pytest.mark.parametrize(
    "index", ["{broken", json.dumps({"metadata": {}}), json.dumps({"weight_map": {"a": 3}})]
)
def test_index_is_not_a_weight_map(tmp_path: Path, index: str) -> None:
    directory = _model_dir(tmp_path, shards=2)
    (directory / INDEX_FILE).write_text(index)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        Checkpoint.open(directory)


def test_index_shard_outside_directory(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, shards=2)
    (directory / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"outside the model directory"):
        Checkpoint.open(directory)


def test_tensor_in_index_missing_from_its_shard(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, shards=2)
    index = json.loads((directory / INDEX_FILE).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (directory / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"places tensor ghost in .*model-00001-of-00002\.safetensors"):
        Checkpoint.open(directory)


def test_truncated_shard_is_detected_from_its_size(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors is truncated: tensor \w+ needs bytes up to"
    ):
        Checkpoint.open(directory)


def test_file_shorter_than_the_length_field(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated"):
        Checkpoint.open(directory)


def _corrupt_header(tmp_path: Path, header: Any, data: bytes = b"", **kwargs: Any) -> Path:
    directory = _model_dir(tmp_path)
    _raw_safetensors(directory / "model.safetensors", header, data, **kwargs)
    return directory


GOOD = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize(
    ("header", "kwargs", "message"),
    [
        (GOOD, {"length": 10**12}, r"corrupt header: length 1000000000000 does not fit"),
        (b"{oops", {}, r"is not valid JSON \(Expecting property name .*\); the file has a corrupt header"),
        (
            b"[" * 100_000,
            {},
            r"nests JSON 100000 levels deep, more than the 64 allowed; the file has a corrupt header",
        ),
        (b"[1]", {}, r"corrupt header: not a JSON object"),
        ({"t": [1]}, {}, r"tensor t is not described"),
        ({"t": {**GOOD["t"], "dtype": "F12"}}, {}, r"tensor t has unknown dtype 'F12'"),
        ({"t": {**GOOD["t"], "shape": [-2]}}, {}, r"tensor t has an invalid shape"),
        ({"t": {**GOOD["t"], "data_offsets": [8, 0]}}, {}, r"tensor t has invalid data_offsets"),
        (
            {"t": {**GOOD["t"], "data_offsets": [0, 12]}},
            {},
            r"tensor t has data_offsets \[0, 12\] \(12 bytes\)",
        ),
        ({"t": {**GOOD["t"], "data_offsets": [8, 16]}}, {}, r"is truncated: tensor t"),
    ],
)
def test_corrupt_header(tmp_path: Path, header: Any, kwargs: dict[str, Any], message: str) -> None:
    directory = _corrupt_header(tmp_path, header, bytes(8), **kwargs)
    with pytest.raises(CheckpointError, match=r"model\.safetensors .*" + message):
        Checkpoint.open(directory)


def test_hand_written_header_with_metadata_is_read(tmp_path: Path) -> None:
    header = {"__metadata__": {"format": "pt"}, **GOOD}
    directory = _corrupt_header(tmp_path, header, struct.pack("<2f", 1.5, -2.0))
    checkpoint = Checkpoint.open(directory)
    assert list(checkpoint.tensors) == ["t"]
    assert checkpoint.read_tensor("t").tolist() == [1.5, -2.0]


def test_real_checkpoint_matches_safetensors_library(checkpoint_factory: CheckpointFactory) -> None:
    directory = checkpoint_factory("mixtral", dtype=torch.bfloat16)
    checkpoint = Checkpoint.open(directory)
    expected = load_file(directory / "model.safetensors")
    assert checkpoint.tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(checkpoint.read_tensor(name), tensor), name
