"""Packed expert stores: a checkpoint rewritten block by block, aligned for O_DIRECT.

A store is a directory::

    manifest.json     format tag and version, the model's config, one record per block
    blocks.bin        every block's bytes, each at a 4 KiB-aligned offset, padded to 4 KiB
    config.json, generation_config.json, tokenizer files   copied from the source, if present

A block's raw bytes are exactly its :class:`BlockLayout` buffer (each view at its buffer
offset, as :meth:`BlockLayout.tensors` reads it), so an uncompressed block is one read straight
into a block buffer. A compressed block holds those bytes through :mod:`klotski_tier.core.store.codec`
(zstd, byte-shuffled for 16-bit weights) and goes through :func:`decode_block`. Each block's
record in the manifest::

    {"kind": "expert", "layer": 3, "expert": 5, "offset": 1048576, "stored_bytes": 201543,
     "raw_bytes": 262144, "codec": "zstd", "level": 3, "shuffle": true,
     "checksum": "xxh3_64:<hex digest of the stored bytes>",
     "views": [{"role": "gate_up", "buffer_offset": 0, "dtype": "BF16", "shape": [96, 64]}, ...]}

``totals`` holds raw and stored bytes and their ratio, overall and per block kind, so that the
planner can tell whether decompression pays. :func:`pack` writes into a temporary sibling
directory, fsyncs it and renames it into place, so an interrupted pack leaves no valid-looking
store; :func:`open_store` checks the manifest and the size of ``blocks.bin`` before any block is
read; :func:`decode_block` checks a block's checksum before anyone can use its bytes.
"""

from __future__ import annotations

import enum
import logging
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from klotski_tier.core import reads
from klotski_tier.core.errors import CheckpointError, TierError
from klotski_tier.core.model.block_shapes import layouts_problem
from klotski_tier.core.model.blocks import BlockId, BlockKind, BlockLayout, TensorPiece, TensorView
from klotski_tier.core.model.checkpoint import SAFETENSORS_DTYPES, read_range
from klotski_tier.core.model.families import ExpertLayout, parse_spec
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.store import codec as codecs
from klotski_tier.core.store.pagecache import evict
from klotski_tier.core.units import MIB, align_up

logger = logging.getLogger(__name__)

FORMAT_TAG = "klotski-tier-store"
FORMAT_VERSION = 1  # bump on any change to the layout of blocks.bin or the manifest's fields
STORE_ALIGN_BYTES = 4096  # offset and padding of every block: the O_DIRECT alignment of common drives
MANIFEST_FILE = "manifest.json"
BLOCKS_FILE = "blocks.bin"
COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
TEMP_MARK = ".tmp-"  # temporary pack directories: .{name}.tmp-{pid}-{random}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
REPACK_HINT = "pack the model again with klotski-tier pack"
MANIFEST_KIND = reads.FileKind("store manifest", 256 * MIB, CheckpointError, REPACK_HINT)
"""A manifest holds ~400 bytes per block: 256 MiB is over half a million blocks."""
BLOCKS_KIND = reads.FileKind("store blocks file", 2**50, CheckpointError, REPACK_HINT)
"""blocks.bin is read block by block; the limit (1 PiB) only asks that it be a regular file."""

ProgressFn = Callable[[int, int], None]
"""``progress(done_raw_bytes, total_raw_bytes)``, called after each block."""
StoredData = bytes | memoryview | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class StoredBlock:
    """Where one block is in ``blocks.bin`` and how its stored bytes become its buffer."""

    block: BlockId
    path: Path  # the store's blocks.bin
    offset: int  # a multiple of STORE_ALIGN_BYTES
    stored_bytes: int
    raw_bytes: int  # the block buffer's size: BlockLayout.nbytes
    codec: codecs.CodecName
    level: int
    shuffle: bool
    checksum: str  # "<algorithm>:<hex>" of the stored bytes

    @property
    def padded_bytes(self) -> int:
        """The stored bytes rounded up to the alignment: what an O_DIRECT read must ask for."""
        return align_up(self.stored_bytes, STORE_ALIGN_BYTES)

    @property
    def compressed(self) -> bool:
        return self.codec is not codecs.CodecName.NONE


@dataclass(frozen=True)
class PackedStore:
    """An opened store: the model's spec, a layout and a :class:`StoredBlock` per block.

    An uncompressed block's layout has one :class:`TensorPiece` (its range of ``blocks.bin``, to
    buffer offset 0), so tiers read it like a checkpoint's block. A compressed block's layout has
    no pieces: its bytes must go through :func:`decode_block`.
    """

    path: Path
    config: dict[str, Any]
    spec: ModelSpec
    expert_layout: ExpertLayout
    layouts: Mapping[BlockId, BlockLayout]
    entries: Mapping[BlockId, StoredBlock]

    def entry(self, block: BlockId) -> StoredBlock:
        return self.entries[block]

    @property
    def blocks_path(self) -> Path:
        return self.path / BLOCKS_FILE

    @property
    def raw_bytes(self) -> int:
        return sum(entry.raw_bytes for entry in self.entries.values())

    @property
    def stored_bytes(self) -> int:
        return sum(entry.stored_bytes for entry in self.entries.values())


@dataclass(frozen=True)
class StoreSummary:
    """What :func:`pack` wrote."""

    path: Path
    blocks: int
    compressed_blocks: int
    raw_bytes: int
    stored_bytes: int
    elapsed_s: float

    @property
    def ratio(self) -> float:
        """Stored over raw bytes: 1.0 uncompressed, below 1 when compression pays."""
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_store` found: ``problems`` holds (block, what is wrong) for each bad block."""

    path: Path
    blocks: int
    verified_bytes: int  # raw bytes of the blocks that passed
    problems: tuple[tuple[BlockId, str], ...]

    @property
    def ok(self) -> bool:
        return not self.problems


# --- reading --------------------------------------------------------------------------------

EnumT = TypeVar("EnumT", bound=enum.Enum)
T = TypeVar("T")


class _Malformed(Exception):
    """A manifest field that is missing, of the wrong type or out of range (a CheckpointError)."""


def is_store(path: Path) -> bool:
    """Whether ``path`` is a directory with a manifest that names the store format.

    A manifest that cannot be read within bounds (a FIFO, a device, too large) is an error naming
    it; one that names the format is a store, and :func:`open_store` says what is wrong with it.
    """
    manifest_path = Path(path) / MANIFEST_FILE
    if not os.path.lexists(manifest_path):
        return False
    return FORMAT_TAG.encode("ascii") in reads.read_bytes(manifest_path, MANIFEST_KIND)


def looks_like_store(path: Path) -> bool:
    """Whether ``path`` is a store or the wreck of one: a store, or a directory holding a store's blocks
    file (its manifest gone or damaged), which :func:`open_store` then names for what it is."""
    return os.path.lexists(Path(path) / BLOCKS_FILE) or is_store(path)


def open_store(path: Path) -> PackedStore:
    """Read and check the manifest of the store ``path`` and the size of its blocks file."""
    path = Path(path).resolve()
    manifest = _read_manifest(path)
    try:
        entries, layouts = _parse_blocks(_field(manifest, "blocks", list), path / BLOCKS_FILE)
        config = _field(manifest, "config", dict)
        dtype = SAFETENSORS_DTYPES.get(_field(manifest, "dtype", str))
        expert_layout = _choice(ExpertLayout, _field(manifest, "expert_layout", str))
        if dtype is None:
            raise _Malformed(f"dtype {manifest['dtype']!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    except _Malformed as exc:
        raise CheckpointError(f"{path / MANIFEST_FILE} is malformed: {exc}; {REPACK_HINT}") from exc
    _check_size(path / BLOCKS_FILE, entries.values())
    spec = parse_spec(config, dtype)
    problem = layouts_problem(spec, layouts)
    if problem is not None:
        raise CheckpointError(f"store {path} cannot run its model: {problem}; {REPACK_HINT}")
    return PackedStore(path, config, spec, expert_layout, layouts, entries)


def decode_block(stored: StoredData, entry: StoredBlock, dst: torch.Tensor) -> None:
    """Check ``stored`` (the block's bytes, at least ``stored_bytes`` long) and decode it into ``dst``.

    ``dst`` is a contiguous CPU uint8 tensor of at least ``raw_bytes``; an uncompressed block read
    straight into ``dst`` is only checked. A bad block raises :class:`TierError` naming it.
    """
    assert dst.dtype == torch.uint8 and dst.device.type == "cpu" and dst.is_contiguous(), (
        f"{entry.block}: decode into a contiguous CPU uint8 buffer, not {dst.dtype} on {dst.device}"
    )
    assert dst.numel() >= entry.raw_bytes, f"{entry.block}: {dst.numel()} bytes cannot hold {entry.raw_bytes}"
    out = dst.reshape(-1)[: entry.raw_bytes].numpy()  # [raw_bytes], shares memory with dst
    problem = _block_problem(_as_bytes(stored), entry, out)
    if problem is not None:
        raise TierError(
            f"block {entry.block} of {entry.path} {problem}; the store is corrupt: run klotski-tier verify"
        )


def verify_store(path: Path, progress: ProgressFn | None = None) -> VerifyReport:
    """Read, check and decode every block of the store ``path``; the bad ones are listed, not raised."""
    store = open_store(path)
    scratch = np.empty(max((e.raw_bytes for e in store.entries.values()), default=0), dtype=np.uint8)
    problems: list[tuple[BlockId, str]] = []
    verified = done = 0
    for entry in store.entries.values():
        data = np.frombuffer(read_range(entry.path, entry.offset, entry.stored_bytes), dtype=np.uint8)
        problem = _block_problem(data, entry, scratch[: entry.raw_bytes])
        if problem is None:
            verified += entry.raw_bytes
        else:
            problems.append((entry.block, problem))
        done += entry.raw_bytes
        if progress is not None:
            progress(done, store.raw_bytes)
    evict(store.blocks_path)  # verifying reads the whole store once: keep it out of the page cache
    return VerifyReport(store.path, len(store.entries), verified, tuple(problems))


def _block_problem(data: codecs.Bytes, entry: StoredBlock, out: codecs.Bytes) -> str | None:
    """What is wrong with a block's stored bytes ``data`` (decoded into ``out`` when nothing is)."""
    if data.nbytes < entry.stored_bytes:
        return f"was read short ({data.nbytes} of {entry.stored_bytes} bytes)"
    data = data[: entry.stored_bytes]
    if not codecs.checksum_matches(data, entry.checksum):
        return "fails its checksum"
    try:
        codecs.decode(data, entry.codec, entry.shuffle, out)
    except ValueError as exc:
        return f"cannot be decoded: it {exc}"
    return None


def _as_bytes(stored: StoredData) -> codecs.Bytes:
    if isinstance(stored, torch.Tensor):
        return stored.detach().reshape(-1).view(torch.uint8).numpy()  # [nbytes]
    if isinstance(stored, np.ndarray):
        return np.ascontiguousarray(stored).reshape(-1).view(np.uint8)  # [nbytes]
    return np.frombuffer(stored, dtype=np.uint8)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise CheckpointError(
            f"store {path} is not a directory; pass the output directory of klotski-tier pack"
        )
    if not os.path.lexists(manifest_path):
        raise CheckpointError(f"{path} has no {MANIFEST_FILE}, so it is not a finished store; {REPACK_HINT}")
    manifest = reads.read_json(manifest_path, MANIFEST_KIND)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{manifest_path} is not a {FORMAT_TAG} manifest; {REPACK_HINT}")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_path} is store format version {manifest.get('version')!r} but this klotski-tier "
            f"reads version {FORMAT_VERSION}; {REPACK_HINT}"
        )
    return manifest


def _parse_blocks(
    records: list[Any], blocks_path: Path
) -> tuple[dict[BlockId, StoredBlock], dict[BlockId, BlockLayout]]:
    entries: dict[BlockId, StoredBlock] = {}
    layouts: dict[BlockId, BlockLayout] = {}
    end = 0  # where the previous block's padded bytes end: blocks must not overlap
    previous: StoredBlock | None = None
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise _Malformed(f"block record {index} is not a JSON object")
        entry = _parse_entry(record, blocks_path)
        views = tuple(_parse_view(view) for view in _field(record, "views", list))
        if (
            previous is not None and entry.offset < end
        ):  # of two overlapping blocks, name the one that is wrong
            _check_within(previous, blocks_path)
        _check_entry(entry, views, end)
        if entry.block in entries:
            raise _Malformed(f"block {entry.block} appears twice")
        entries[entry.block], layouts[entry.block] = entry, _stored_layout(entry, views)
        end = entry.offset + entry.padded_bytes
        previous = entry
    return entries, layouts


def _check_within(entry: StoredBlock, blocks_path: Path) -> None:
    """Refuse ``entry`` when it reaches past the end of the regular file ``blocks_path`` (anything else
    there is for its reader to name)."""
    try:
        info = os.stat(blocks_path)
    except OSError:
        return
    if stat.S_ISREG(info.st_mode) and entry.offset + entry.stored_bytes > info.st_size:
        raise _Malformed(
            f"block {entry.block} has offset {entry.offset} and {entry.stored_bytes} stored bytes, past the "
            f"end of {blocks_path.name} ({info.st_size} bytes)"
        )


def _parse_entry(record: dict[str, Any], blocks_path: Path) -> StoredBlock:
    kind = _choice(BlockKind, _field(record, "kind", str))
    block = BlockId(kind, _field(record, "layer", int), _field(record, "expert", int))
    return StoredBlock(
        block=block,
        path=blocks_path,
        offset=_field(record, "offset", int),
        stored_bytes=_field(record, "stored_bytes", int),
        raw_bytes=_field(record, "raw_bytes", int),
        codec=_choice(codecs.CodecName, _field(record, "codec", str)),
        level=_field(record, "level", int),
        shuffle=_field(record, "shuffle", bool),
        checksum=_field(record, "checksum", str),
    )


def _parse_view(record: Any) -> TensorView:
    if not isinstance(record, dict):
        raise _Malformed(f"view {record!r} is not a JSON object")
    dtype = SAFETENSORS_DTYPES.get(_field(record, "dtype", str))
    shape = _field(record, "shape", list)
    if dtype is None or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _Malformed(f"view {record.get('role')!r} has dtype {record['dtype']!r} and shape {shape!r}")
    return TensorView(_field(record, "role", str), _field(record, "buffer_offset", int), dtype, tuple(shape))


def _check_entry(entry: StoredBlock, views: tuple[TensorView, ...], previous_end: int) -> None:
    where = f"block {entry.block}"
    if entry.offset % STORE_ALIGN_BYTES or entry.offset < previous_end:
        raise _Malformed(f"{where} has offset {entry.offset}: not aligned or overlapping the block before")
    if (
        entry.stored_bytes < 0
        or entry.raw_bytes < 0
        or (not entry.compressed and entry.stored_bytes != entry.raw_bytes)
    ):
        raise _Malformed(f"{where} has {entry.stored_bytes} stored and {entry.raw_bytes} raw bytes")
    if entry.shuffle and entry.raw_bytes % codecs.SHUFFLE_ITEM_BYTES:
        raise _Malformed(f"{where} is shuffled but has an odd size, {entry.raw_bytes} bytes")
    if not codecs.is_known_checksum(entry.checksum):
        raise _Malformed(f"{where} has an unknown checksum {entry.checksum!r}")
    for view in views:
        if view.buffer_offset < 0 or view.buffer_offset + view.nbytes > entry.raw_bytes:
            raise _Malformed(f"{where}: view {view.role} does not fit in its {entry.raw_bytes} bytes")


def _stored_layout(entry: StoredBlock, views: tuple[TensorView, ...]) -> BlockLayout:
    """One piece (the stored range, to buffer offset 0) when raw; none when it must be decoded."""
    pieces = (
        ()
        if entry.compressed
        else (TensorPiece(str(entry.block), entry.path, entry.offset, entry.stored_bytes, 0),)
    )
    return BlockLayout(entry.block, pieces, views, entry.raw_bytes)


def _check_size(blocks_path: Path, entries: Iterable[StoredBlock]) -> None:
    """``blocks.bin`` must reach the end of its last block's padding: catches truncated copies."""
    ordered = sorted(entries, key=lambda entry: entry.offset)
    needed = max((entry.offset + entry.padded_bytes for entry in ordered), default=0)
    size = reads.check_file(blocks_path, BLOCKS_KIND)
    for entry in ordered[:-1]:  # a block before the last past the end: the manifest is wrong, not the file
        if entry.offset + entry.stored_bytes > size:
            raise CheckpointError(
                f"{blocks_path.parent / MANIFEST_FILE} is malformed: block {entry.block} has offset "
                f"{entry.offset} and {entry.stored_bytes} stored bytes, past the end of {blocks_path.name} "
                f"({size} bytes); {REPACK_HINT}"
            )
    if size < needed:
        raise CheckpointError(
            f"{blocks_path} is truncated: {size} bytes where the manifest needs {needed}; {REPACK_HINT}"
        )


def _field(record: Mapping[str, Any], key: str, kind: type[T]) -> T:
    value = record.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _Malformed(f"field {key!r} is {value!r}, not a {kind.__name__}")
    return value


def _choice(enum_type: type[EnumT], value: str) -> EnumT:
    try:
        return enum_type(value)
    except ValueError as exc:
        valid = ", ".join(str(member.value) for member in enum_type)
        raise _Malformed(f"{value!r} is not one of {valid}") from exc
