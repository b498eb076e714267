"""A store that opens (and so verifies) can run its model: every block the model needs is there,
every index in range, every view shaped as the config says, every declared size bounded. Each
manifest edit below used to open and pass ``verify``, then crash mid-run or run silently."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner

from klotski_tier.cli.pack import verify
from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.store import codec as codecs
from klotski_tier.core.store import pack as store_pack
from klotski_tier.core.store import packed as store
from tests.conftest import CheckpointFactory

Manifest = dict[str, Any]


@click.group()
def cli() -> None:
    """``verify`` attached to a group, as the main command attaches it."""


cli.add_command(verify)


@pytest.fixture(scope="module")
def source(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral", dtype=torch.bfloat16)


@pytest.fixture
def packed(source: Path, tmp_path: Path) -> Path:
    return store_pack.pack(source, tmp_path / "store", codec=codecs.parse_codec("zstd")).path


def _edit(directory: Path, change: Callable[[Manifest], None]) -> None:
    path = directory / store.MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _record(manifest: Manifest, kind: str, layer: int = -1, expert: int = -1) -> dict[str, Any]:
    return next(
        r for r in manifest["blocks"] if (r["kind"], r["layer"], r["expert"]) == (kind, layer, expert)
    )


def _drop_expert(manifest: Manifest) -> None:
    manifest["blocks"].remove(_record(manifest, "expert", 1, 3))


def _expert_out_of_range(manifest: Manifest) -> None:
    _record(manifest, "expert", 1, 3)["layer"] = 99


def _view_shape(manifest: Manifest) -> None:
    _record(manifest, "expert", 0, 2)["views"][-1]["shape"] = [16, 24]  # down is [H=32, I=24]


def _vocab(manifest: Manifest) -> None:
    manifest["config"]["vocab_size"] += 4


def _hidden(manifest: Manifest) -> None:
    manifest["config"]["hidden_size"] = 64


def _one_more_layer(manifest: Manifest) -> None:
    manifest["config"]["num_hidden_layers"] = 3  # the store holds 2


def _huge_raw_size(manifest: Manifest) -> None:
    record = _record(manifest, "expert", 0, 1)
    assert record["codec"] == "zstd"
    record["raw_bytes"] = 1024**3  # a valid frame may inflate to it: its views need a few KiB


def _view_dtype(manifest: Manifest) -> None:
    _record(manifest, "gate", 1)["views"][0]["dtype"] = "F16"


BROKEN = [
    (_drop_expert, r"block L1\.E3 is missing"),
    (_expert_out_of_range, r"block L99\.E3 has layer 99, expert 3: out of range for a model of 2 layers"),
    (_view_shape, r"block L0\.E2 has views .*down \[16, 24\].* where config.json implies .*down \[32, 24\]"),
    (_vocab, r"block embed has views embed \[96, 32\] where config.json implies embed \[100, 32\]"),
    (_hidden, r"block embed has views embed \[96, 32\] where config.json implies embed \[96, 64\]"),
    (_one_more_layer, r"block L2\.attn is missing"),
    (_huge_raw_size, r"block L0\.E1 declares 1073741824 bytes where its views need at most"),
    (_view_dtype, r"block L1\.gate has views post_norm in a dtype other than the model's torch\.bfloat16"),
]
IDS = [change.__name__.strip("_") for change, _ in BROKEN]


@pytest.mark.parametrize(("change", "message"), BROKEN, ids=IDS)
def test_open_refuses_a_store_that_cannot_run(
    packed: Path, change: Callable[[Manifest], None], message: str
) -> None:
    _edit(packed, change)
    with pytest.raises(CheckpointError, match=f"store {packed} cannot run its model: {message}"):
        store.open_store(packed)


@pytest.mark.parametrize(("change", "message"), BROKEN, ids=IDS)
def test_verify_rejects_it_in_one_line(
    packed: Path, change: Callable[[Manifest], None], message: str
) -> None:
    _edit(packed, change)
    result = CliRunner().invoke(cli, ["verify", str(packed)])
    assert result.exit_code == 1 and result.stdout == "" and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: store ") and line.endswith(store.REPACK_HINT)
    assert re.search(message, line), line


def test_a_good_store_verifies(packed: Path) -> None:
    result = CliRunner().invoke(cli, ["verify", str(packed)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("ok: ")
