"""Hugging Face model directories read without mapping whole files.

A directory holds ``config.json`` and either ``model.safetensors`` or
``model.safetensors.index.json`` (a ``weight_map`` from tensor name to shard file) plus its
shards. Each shard starts with an 8-byte little-endian header length, then a JSON header that
gives every tensor's dtype, shape and ``data_offsets`` relative to the end of the header.

:meth:`Checkpoint.open` parses every header itself and checks it against the file size, so a
truncated or corrupt shard is reported up front, before any weight is read. The result is an
index: for each tensor, the file and absolute byte range that hold its data
(:class:`TensorEntry`). Tier drivers read those ranges; :meth:`Checkpoint.read_tensor` reads one
tensor for tools and tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch

from klotski_tier.core import reads
from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.units import MIB

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HEADER_LENGTH_BYTES = 8
"""The little-endian u64 at the start of a safetensors file: the JSON header's length in bytes."""
MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The safetensors format refuses headers over 100 MB; a larger length means a corrupt file."""
METADATA_KEY = "__metadata__"
CONFIG_KIND = reads.FileKind("model config", 16 * MIB, CheckpointError, "restore it from the original model")
"""A Hugging Face config.json is a few KiB; 16 MiB leaves room for long label maps."""
INDEX_KIND = reads.FileKind("shard index", 256 * MIB, CheckpointError, "re-download it")
"""A shard index holds ~100 bytes per tensor: 256 MiB is over two million tensors."""
HEADER_KIND = reads.FileKind(
    "header of safetensors file",
    MAX_HEADER_BYTES,
    CheckpointError,
    "the file has a corrupt header; re-download it",
)
SHARD_KIND = reads.FileKind("safetensors file", 2**50, CheckpointError, "re-download it")
"""Shards are never read whole; the limit (1 PiB) only asks that a shard be a regular file."""

SAFETENSORS_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: ``nbytes`` at absolute ``file_offset`` of ``path``."""

    name: str
    path: Path
    file_offset: int  # 8-byte header length + header + data_offsets[0]
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Checkpoint:
    """A model directory: its parsed ``config.json`` and the byte range of every tensor."""

    directory: Path
    config: dict[str, Any]
    tensors: Mapping[str, TensorEntry]

    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        """Read ``config.json`` and every safetensors header of ``directory``; read no weights."""
        path = _checked_directory(Path(directory))
        config = reads.read_json(path / CONFIG_FILE, CONFIG_KIND)
        if not isinstance(config, dict):
            raise CheckpointError(
                f"{path / CONFIG_FILE} is not a JSON object; restore the model's config.json"
            )
        tensors = _read_tensor_index(path)
        logger.debug("opened %s: %d tensors", path, len(tensors))
        return cls(directory=path, config=config, tensors=tensors)

    def entry(self, name: str) -> TensorEntry:
        """The entry of tensor ``name``; a :class:`CheckpointError` when the checkpoint lacks it."""
        found = self.tensors.get(name)
        if found is None:
            raise CheckpointError(
                f"tensor {name} is missing from the checkpoint in {self.directory}; "
                "the files do not match the model type in config.json"
            )
        return found

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` alone (one ``pread`` of its byte range) into a new CPU tensor."""
        found = self.entry(name)
        data = bytearray(read_range(found.path, found.file_offset, found.nbytes))
        if not data:
            return torch.empty(found.shape, dtype=found.dtype)
        return torch.frombuffer(data, dtype=torch.uint8).view(found.dtype).reshape(found.shape)


def read_range(path: Path, offset: int, nbytes: int) -> bytes:
    """``nbytes`` bytes at ``offset`` of ``path``; a short read is a :class:`CheckpointError`."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            data = os.pread(fd, nbytes, offset)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointError(
            f"cannot read {path}: {exc.strerror}; check the file and its permissions"
        ) from exc
    if len(data) != nbytes:
        raise CheckpointError(f"{path} ended after {len(data)} of {nbytes} bytes at {offset}; re-download it")
    return data


def _checked_directory(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"model directory {path} does not exist; pass a Hugging Face model directory")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a directory; pass the directory that holds config.json")
    if not os.path.lexists(path / CONFIG_FILE):  # there but not a regular file: refused when read
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; pass a Hugging Face model directory")
    return path.resolve()


def _read_tensor_index(directory: Path) -> dict[str, TensorEntry]:
    if os.path.lexists(directory / INDEX_FILE):
        return _read_sharded(directory)
    if os.path.lexists(directory / SINGLE_FILE):
        return read_safetensors_header(directory / SINGLE_FILE)
    others = sorted(p.name for p in directory.glob("*.safetensors"))
    hint = f" (found {', '.join(others)} without {INDEX_FILE})" if others else ""
    raise CheckpointError(
        f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}{hint}; "
        "only safetensors checkpoints are supported, save the model with safe_serialization"
    )


def _read_sharded(directory: Path) -> dict[str, TensorEntry]:
    index_path = directory / INDEX_FILE
    weight_map = _read_weight_map(index_path)
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    tensors: dict[str, TensorEntry] = {}
    for shard, names in sorted(by_shard.items()):
        shard_path = directory / shard
        if not os.path.lexists(shard_path):
            raise CheckpointError(
                f"{index_path} names shard {shard}, which is missing; re-download the model"
            )
        header = read_safetensors_header(shard_path)
        for name in names:
            if name not in header:
                raise CheckpointError(
                    f"{index_path} places tensor {name} in {shard_path}, which lacks it; re-download it"
                )
            tensors[name] = header[name]
    return tensors


def _read_weight_map(index_path: Path) -> dict[str, str]:
    index = reads.read_json(index_path, INDEX_KIND)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{index_path} has no weight_map of tensor names to shard files; re-download it"
        )
    for shard in set(weight_map.values()):
        if Path(shard).name != shard:
            raise CheckpointError(
                f"{index_path} names shard {shard!r} outside the model directory; fix the index"
            )
    return weight_map


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and validate the header of the safetensors file ``path`` against its size."""
    file_size = reads.check_file(path, SHARD_KIND)
    if file_size < HEADER_LENGTH_BYTES:
        raise CheckpointError(f"{path} is truncated ({file_size} bytes, no header); re-download it")
    header_length = int.from_bytes(read_range(path, 0, HEADER_LENGTH_BYTES), "little")
    if header_length > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_length > file_size:
        raise CheckpointError(
            f"{path} has a corrupt header: length {header_length} does not fit its {file_size} bytes; "
            "re-download it"
        )
    raw = read_range(path, HEADER_LENGTH_BYTES, header_length)
    header = reads.parse_json(raw, path, HEADER_KIND)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt header: not a JSON object; re-download it")
    data_start = HEADER_LENGTH_BYTES + header_length
    return {
        name: _parse_entry(path, name, fields, data_start, file_size)
        for name, fields in header.items()
        if name != METADATA_KEY
    }


def _parse_entry(path: Path, name: str, fields: Any, data_start: int, file_size: int) -> TensorEntry:
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"{path} has a corrupt header: tensor {name} {what}; re-download it")

    if not isinstance(fields, dict):
        raise corrupt("is not described by a JSON object")
    dtype = SAFETENSORS_DTYPES.get(str(fields.get("dtype")))
    if dtype is None:
        raise corrupt(f"has unknown dtype {fields.get('dtype')!r} (known: {', '.join(SAFETENSORS_DTYPES)})")
    shape, offsets = fields.get("shape"), fields.get("data_offsets")
    if not _is_int_list(shape) or any(dim < 0 for dim in shape):
        raise corrupt(f"has an invalid shape {shape!r}")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise corrupt(f"has invalid data_offsets {offsets!r}")
    nbytes, expected = offsets[1] - offsets[0], _numel(shape) * dtype.itemsize
    if nbytes != expected:
        raise corrupt(
            f"has data_offsets {offsets} ({nbytes} bytes) but {fields['dtype']} {shape} is {expected} bytes"
        )
    if data_start + offsets[1] > file_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name} needs bytes up to {data_start + offsets[1]} "
            f"but the file has {file_size}; re-download it"
        )
    return TensorEntry(name, path, data_start + offsets[0], nbytes, dtype, tuple(shape))


def _is_int_list(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
