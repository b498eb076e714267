"""``klotski-tier pack``: rewrite a checkpoint into a packed expert store, atomically.

The store's format is described in :mod:`klotski_tier.core.store.packed`. :func:`pack` writes into a
temporary sibling directory, fsyncs every file and the directory, and renames it into place, so
an interrupted or failed pack leaves no store that looks valid.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from klotski_tier.core.atomic import check_outputs, remove_stale_temps
from klotski_tier.core.errors import InputError
from klotski_tier.core.model.blocks import BlockLayout
from klotski_tier.core.model.checkpoint import read_range
from klotski_tier.core.store import codec as codecs
from klotski_tier.core.store.files import ModelFiles, load_model_files
from klotski_tier.core.store.packed import (
    BLOCKS_FILE,
    COPIED_FILES,
    DTYPE_NAMES,
    FORMAT_TAG,
    FORMAT_VERSION,
    MANIFEST_FILE,
    STORE_ALIGN_BYTES,
    TEMP_MARK,
    ProgressFn,
    StoreSummary,
)
from klotski_tier.core.store.pagecache import evict
from klotski_tier.core.units import align_up

logger = logging.getLogger(__name__)


def pack(
    src: Path, out: Path, *, codec: codecs.Codec | None = None, progress: ProgressFn | None = None
) -> StoreSummary:
    """Rewrite the checkpoint ``src`` as a store at ``out`` (which must not exist); atomic."""
    started = time.perf_counter()
    out = Path(out)
    _check_target(out, Path(src))
    files = load_model_files(src, store_hint=_packed_already(Path(src)))
    checkpoint = files.checkpoint
    assert checkpoint is not None, "load_model_files opens a checkpoint"
    codec = codec or codecs.Codec()
    temp = out.parent / f".{out.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    remove_stale_temps(out, TEMP_MARK)
    try:
        temp.mkdir()
        records = _write_blocks(temp / BLOCKS_FILE, files, codec, progress)
        _copy_metadata(checkpoint.directory, temp)
        _write_json(temp / MANIFEST_FILE, _manifest(files, checkpoint.config, codec, records))
        _fsync_path(temp)
        _commit(temp, out)
    except OSError as exc:
        raise InputError(
            f"cannot write the store {out}: {exc.strerror or exc}; check space and permissions"
        ) from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    summary = _summary(out, records, time.perf_counter() - started)
    logger.info("packed %s into %s: %d blocks, ratio %.3f", src, out, summary.blocks, summary.ratio)
    return summary


def _check_target(out: Path, src: Path) -> None:
    """Refuse a store that would replace something or be written inside the checkpoint it is packed
    from (the reverse, a checkpoint inside the store, cannot be: the store must not exist yet)."""
    if out.exists() or out.is_symlink():
        raise InputError(f"{out} already exists; remove it or choose another path")
    if not out.parent.is_dir():
        raise InputError(
            f"cannot write the store {out}: directory {out.parent} does not exist; create it first"
        )
    check_outputs({"the store": out}, {"the checkpoint": src}, directories={"the checkpoint"})


def _packed_already(src: Path) -> str:
    """What to do with a packed store given to pack."""
    return (
        f"it is packed already, so there is nothing to pack: run it with `klotski-tier run --model {src}` "
        f"or check it with `klotski-tier verify {src}`"
    )


def _write_blocks(
    path: Path, files: ModelFiles, codec: codecs.Codec, progress: ProgressFn | None
) -> list[dict[str, Any]]:
    """Write every block to ``path`` at aligned offsets; one manifest record per block."""
    total = sum(layout.nbytes for layout in files.layouts.values())
    records: list[dict[str, Any]] = []
    done = 0
    with path.open("wb") as handle:
        for layout in files.layouts.values():
            encoded = codecs.encode(assemble_block(layout), codec, _item_bytes(layout))
            records.append(_block_record(layout, handle.tell(), encoded))
            handle.write(encoded.data.data)
            handle.write(bytes(align_up(encoded.data.nbytes, STORE_ALIGN_BYTES) - encoded.data.nbytes))
            done += layout.nbytes
            if progress is not None:
                progress(done, total)
        handle.flush()
        os.fsync(handle.fileno())
        _drop_cache(handle.fileno())
    for source in {piece.path for layout in files.layouts.values() for piece in layout.pieces}:
        evict(source)  # packing reads the whole model once: keep it out of the page cache
    return records


def assemble_block(layout: BlockLayout) -> codecs.Bytes:
    """The block's buffer read from its checkpoint pieces: [nbytes] uint8, padding zeroed."""
    buffer = np.zeros(layout.nbytes, dtype=np.uint8)  # [nbytes]
    for piece in layout.pieces:
        data = read_range(piece.path, piece.file_offset, piece.nbytes)
        buffer[piece.buffer_offset : piece.buffer_offset + piece.nbytes] = np.frombuffer(data, np.uint8)
    return buffer


def _item_bytes(layout: BlockLayout) -> int:
    """The element size shared by all the block's views; 1 (no shuffle) when they differ."""
    sizes = {view.dtype.itemsize for view in layout.views}
    return sizes.pop() if len(sizes) == 1 else 1


def _block_record(layout: BlockLayout, offset: int, encoded: codecs.Encoded) -> dict[str, Any]:
    block = layout.block
    return {
        "kind": block.kind.value,
        "layer": block.layer,
        "expert": block.expert,
        "offset": offset,
        "stored_bytes": encoded.data.nbytes,
        "raw_bytes": layout.nbytes,
        "codec": str(encoded.codec),
        "level": encoded.level,
        "shuffle": encoded.shuffle,
        "checksum": codecs.checksum(encoded.data),
        "views": [
            {
                "role": v.role,
                "buffer_offset": v.buffer_offset,
                "dtype": DTYPE_NAMES[v.dtype],
                "shape": v.shape,
            }
            for v in layout.views
        ],
    }


def _manifest(
    files: ModelFiles, config: dict[str, Any], codec: codecs.Codec, records: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "format": FORMAT_TAG,
        "version": FORMAT_VERSION,
        "model_type": config.get("model_type"),
        "dtype": DTYPE_NAMES[files.spec.dtype],
        "config": config,
        "expert_layout": files.expert_layout.value,
        "alignment": STORE_ALIGN_BYTES,
        "codec": str(codec),
        "blocks": records,
        "totals": _totals(records),
    }


def _totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Raw and stored bytes with their ratio, over all blocks and per block kind."""
    sums: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record in records:
        for key in ("all", record["kind"]):
            sums[key][0] += record["raw_bytes"]
            sums[key][1] += record["stored_bytes"]

    def entry(raw: int, stored: int) -> dict[str, Any]:
        return {"raw_bytes": raw, "stored_bytes": stored, "ratio": round(stored / raw, 4) if raw else 1.0}

    by_kind = {kind: entry(*sums[kind]) for kind in sums if kind != "all"}
    return {**entry(*sums["all"]), "by_kind": by_kind}


def _copy_metadata(src: Path, dst: Path) -> None:
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            _fsync_path(dst / name)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(content, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _commit(temp: Path, out: Path) -> None:
    """Rename the finished ``temp`` to ``out``: the commit point."""
    if out.exists():
        raise InputError(f"{out} already exists; remove it or choose another path")
    os.rename(temp, out)
    _fsync_path(out.parent)


def _summary(out: Path, records: list[dict[str, Any]], elapsed_s: float) -> StoreSummary:
    compressed = sum(record["codec"] != codecs.CodecName.NONE for record in records)
    raw = sum(record["raw_bytes"] for record in records)
    stored = sum(record["stored_bytes"] for record in records)
    return StoreSummary(out, len(records), compressed, raw, stored, elapsed_s)


def _fsync_path(path: Path) -> None:
    """fsync a file, or a directory's entries where the filesystem allows it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise  # some filesystems refuse fsync on directories; files must sync
    finally:
        os.close(fd)


def _drop_cache(fd: int) -> None:
    """Ask the kernel to drop ``fd``'s cached pages, so packing or verifying does not fill RAM."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
