"""Every reader of the tool, one rule: each file it reads (store manifest and blocks, config.json,
shard index, tokenizer, machine profile, prompts, Chrome trace, routing trace, TOML config,
hardware file, prefetch state) may be a FIFO, /dev/zero, a directory, larger than its kind allows,
nested too deep or not UTF-8, and each is one line naming the file: no hang, no read to the end of
memory, no RecursionError, no traceback. The table below is every reader; a new one goes in it."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from klotski_tier.cli import prompts
from klotski_tier.core import reads
from klotski_tier.core.bench import profile
from klotski_tier.core.errors import KlotskiError
from klotski_tier.core.model import checkpoint, tokenizer
from klotski_tier.core.observe import routing_trace, timeline
from klotski_tier.core.plan import hardware, shapes
from klotski_tier.core.runtime import config, policy_setup
from klotski_tier.core.store import pack as store_pack
from klotski_tier.core.store import packed
from klotski_tier.core.store.files import open_model
from tests.conftest import CheckpointFactory

SMALL_LIMIT_BYTES = 64  # the limit a "too large" case shrinks its kind to


@dataclass(frozen=True)
class Reader:
    """One reader: where its file goes in a fresh directory, the call that reads it, its kind."""

    target: str  # the file's path, relative to the directory ``setup`` prepares
    read: Callable[[Path], Any]  # reads, given the prepared directory
    kind: tuple[Any, str]  # (module, attribute) of its FileKind, for the "too large" case
    json: bool = False  # a JSON document: the deep-nesting case applies
    text: bool = True  # text: the non-UTF-8 case applies
    setup: str = "empty"  # "empty", "checkpoint", "sharded" or "store"


READERS: dict[str, Reader] = {
    "store manifest": Reader(
        "store/manifest.json",
        lambda d: packed.open_store(d / "store"),
        (packed, "MANIFEST_KIND"),
        True,
        setup="store",
    ),
    "store manifest, opened as a model": Reader(
        "store/manifest.json",
        lambda d: open_model(d / "store"),
        (packed, "MANIFEST_KIND"),
        text=False,
        setup="store",
    ),
    "store blocks": Reader(
        "store/blocks.bin",
        lambda d: open_model(d / "store"),
        (packed, "BLOCKS_KIND"),
        text=False,
        setup="store",
    ),
    "model config": Reader(
        "model/config.json",
        lambda d: open_model(d / "model"),
        (checkpoint, "CONFIG_KIND"),
        True,
        setup="checkpoint",
    ),
    "shard index": Reader(
        "model/model.safetensors.index.json",
        lambda d: open_model(d / "model"),
        (checkpoint, "INDEX_KIND"),
        True,
        setup="sharded",
    ),
    "safetensors file": Reader(
        "model/model.safetensors",
        lambda d: open_model(d / "model"),
        (checkpoint, "SHARD_KIND"),
        text=False,
        setup="checkpoint",
    ),
    "tokenizer": Reader(
        "tokenizer.json",
        lambda d: tokenizer.load_tokenizer(d / "tokenizer.json"),
        (tokenizer, "TOKENIZER_KIND"),
        text=False,
    ),
    "machine profile": Reader(
        "profile.json",
        lambda d: profile.MachineProfile.load(d / "profile.json"),
        (profile, "PROFILE_KIND"),
        True,
    ),
    "prompts file": Reader(
        "p.txt", lambda d: prompts.read_prompts_file(d / "p.txt"), (prompts, "PROMPTS_KIND")
    ),
    "trace file": Reader(
        "t.json", lambda d: timeline.read_trace(d / "t.json"), (timeline, "TRACE_KIND"), True
    ),
    "routing trace": Reader(
        "r.npz",
        lambda d: routing_trace.RoutingTrace.load(d / "r.npz"),
        (routing_trace, "TRACE_FILE_KIND"),
        text=False,
    ),
    "config file": Reader(
        "c.toml", lambda d: config.read_config_file(d / "c.toml"), (config, "CONFIG_FILE_KIND")
    ),
    "hardware file": Reader(
        "h.toml", lambda d: hardware.load_hardware_file(d / "h.toml"), (shapes, "TOML_TABLES")
    ),
    "prefetch state": Reader(
        "s.json",
        lambda d: policy_setup._read_state(d / "s.json"),
        (policy_setup, "PREFETCH_STATE_KIND"),
        True,
    ),
}


@pytest.fixture(scope="module")
def sources(
    checkpoint_factory: CheckpointFactory, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    single = checkpoint_factory("mixtral", num_layers=1)
    store = store_pack.pack(single, tmp_path_factory.mktemp("store") / "store").path
    return {
        "checkpoint": single,
        "sharded": checkpoint_factory("mixtral", num_layers=1, shards=2),
        "store": store,
    }


def _prepare(reader: Reader, sources: dict[str, Path], root: Path) -> Path:
    """A fresh copy of what the reader needs under ``root``; the target file removed."""
    if reader.setup != "empty":
        name = "store" if reader.setup == "store" else "model"
        shutil.copytree(sources[reader.setup], root / name)
    target = root / reader.target
    target.unlink(missing_ok=True)
    return target


def _fifo(target: Path) -> str:
    os.mkfifo(target)
    return "is a FIFO (named pipe), not a regular file"


def _dev_zero(target: Path) -> str:
    target.symlink_to("/dev/zero")
    return "is a character device, not a regular file"


def _directory(target: Path) -> str:
    target.mkdir()
    return "is a directory, not a regular file"


HOSTILE = {"fifo": _fifo, "dev-zero": _dev_zero, "directory": _directory}


def _refused(reader: Reader, root: Path, target: Path, phrase: str) -> None:
    with pytest.raises(KlotskiError) as caught:
        reader.read(root)
    message = str(caught.value)
    assert "\n" not in message and str(target) in message and phrase in message, message


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("name", READERS)
def test_only_regular_files_are_read(
    sources: dict[str, Path], tmp_path: Path, name: str, hostile: str
) -> None:
    reader = READERS[name]
    target = _prepare(reader, sources, tmp_path)
    _refused(reader, tmp_path, target, HOSTILE[hostile](target))


@pytest.mark.parametrize("name", READERS)
def test_each_kind_has_a_size_limit_named_in_its_error(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    reader = READERS[name]
    target = _prepare(reader, sources, tmp_path)
    target.write_bytes(b" " * (SMALL_LIMIT_BYTES + 1))
    module, attribute = reader.kind
    if attribute == "TOML_TABLES":  # the hardware and shape files share a limit, not a kind
        monkeypatch.setattr(shapes, "TOML_TABLES_MAX_BYTES", SMALL_LIMIT_BYTES)
    else:
        kind = getattr(module, attribute)
        assert isinstance(kind, reads.FileKind) and kind.max_bytes > SMALL_LIMIT_BYTES
        monkeypatch.setattr(module, attribute, dataclasses.replace(kind, max_bytes=SMALL_LIMIT_BYTES))
    _refused(reader, tmp_path, target, "is 65 B, over the 64 B limit of a")


@pytest.mark.parametrize("name", [name for name, reader in READERS.items() if reader.json])
def test_json_nested_100000_deep_is_one_line(sources: dict[str, Path], tmp_path: Path, name: str) -> None:
    reader = READERS[name]
    target = _prepare(reader, sources, tmp_path)
    target.write_text("[" * 100_000 + "]" * 100_000)
    _refused(reader, tmp_path, target, "nests JSON 100000 levels deep, more than the 64 allowed")


@pytest.mark.parametrize("name", [name for name, reader in READERS.items() if reader.text])
def test_text_that_is_not_utf8_is_one_line(sources: dict[str, Path], tmp_path: Path, name: str) -> None:
    reader = READERS[name]
    target = _prepare(reader, sources, tmp_path)
    target.write_bytes(b'{"a": "caf\xe9"}\n')
    _refused(reader, tmp_path, target, "is not UTF-8 text (invalid byte at offset 10)")


def test_a_non_utf8_profile_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "profile.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(KlotskiError) as caught:
        profile.MachineProfile.load(tmp_path / "profile.json")
    assert str(caught.value).endswith("run `klotski-tier bench` to write a new one, or delete it")


def test_the_table_holds_every_file_kind() -> None:
    """Each FileKind defined in the package is exercised above (a new reader must join the table)."""
    modules = [packed, checkpoint, tokenizer, profile, prompts, timeline, routing_trace, config, policy_setup]
    defined = {
        (module.__name__, name)
        for module in modules
        for name, value in vars(module).items()
        if isinstance(value, reads.FileKind) and name != "HEADER_KIND"  # the header is read from a shard
    }
    tested = {(module.__name__, attribute) for module, attribute in (r.kind for r in READERS.values())}
    assert defined <= tested, defined - tested
