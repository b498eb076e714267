"""``klotski-tier pack`` and ``verify`` through click: summaries, ``--compress`` parsing, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner, Result

from klotski_tier.cli.pack import pack, verify
from klotski_tier.core.model.blocks import expert_block
from klotski_tier.core.store import pack as store_pack
from klotski_tier.core.store import packed as store
from tests.conftest import CheckpointFactory


@click.group()
def cli() -> None:
    """The two commands attached to a group, as the main command attaches them."""


cli.add_command(pack)
cli.add_command(verify)


def _invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def _error_line(result: Result) -> str:
    """The last stderr line, which must be the only ``error:`` line (a progress bar may precede it)."""
    assert result.exit_code == 1, f"stdout: {result.stdout!r} stderr: {result.stderr!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1 and lines[-1].startswith("error: ")
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[-1]


@pytest.fixture(scope="module")
def source(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral", dtype=torch.bfloat16)


def test_pack_prints_a_summary(source: Path, tmp_path: Path) -> None:
    result = _invoke("pack", source, tmp_path / "store")
    assert result.exit_code == 0, result.stderr
    blocks = len(store.open_store(tmp_path / "store").entries)
    assert f"packed {tmp_path / 'store'}" in result.stdout and f"blocks  {blocks}" in result.stdout
    assert "ratio   1.000" in result.stdout and "codec none, 0 of" in result.stdout
    assert all(f"  {label}" in result.stdout for label in ("raw", "stored", "time"))


def test_pack_compressed_then_verify(source: Path, tmp_path: Path) -> None:
    result = _invoke("pack", source, tmp_path / "store", "--compress", "zstd:5")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "store" / store.MANIFEST_FILE).read_text())
    assert f"ratio   {manifest['totals']['ratio']:.3f}" in result.stdout and "codec zstd:5" in result.stdout
    assert manifest["totals"]["ratio"] < 1.0
    verified = _invoke("verify", tmp_path / "store")
    assert verified.exit_code == 0, verified.stderr
    assert (
        verified.stdout.startswith(f"ok: {len(manifest['blocks'])} blocks, ")
        and "verified" in verified.stdout
    )


@pytest.mark.parametrize(
    ("value", "message"), [("zstd:99", "from 1 to 22"), ("lz4", "use none, zstd or zstd:LEVEL")]
)
def test_pack_rejects_bad_compress_values(source: Path, tmp_path: Path, value: str, message: str) -> None:
    result = _invoke("pack", source, tmp_path / "store", "--compress", value)
    assert result.exit_code == 2 and message in result.stderr and "--compress" in result.stderr
    assert not (tmp_path / "store").exists()


def test_pack_into_an_existing_directory(source: Path, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    assert "already exists; remove it or choose another path" in _error_line(
        _invoke("pack", source, tmp_path / "store")
    )


def test_pack_a_missing_model(tmp_path: Path) -> None:
    line = _error_line(_invoke("pack", tmp_path / "nowhere", tmp_path / "store"))
    assert "does not exist" in line and not (tmp_path / "store").exists()


def test_verify_names_the_first_bad_block(source: Path, tmp_path: Path) -> None:
    store_pack.pack(source, tmp_path / "store")
    entry = store.open_store(tmp_path / "store").entry(expert_block(1, 0))
    with entry.path.open("r+b") as handle:
        handle.seek(entry.offset + 7)
        value = handle.read(1)[0]
        handle.seek(entry.offset + 7)
        handle.write(bytes([value ^ 0x01]))
    line = _error_line(_invoke("verify", tmp_path / "store"))
    assert "1 of" in line and "the first is L1.E0, which fails its checksum" in line


def test_verify_a_directory_that_is_not_a_store(source: Path) -> None:
    assert "has no manifest.json" in _error_line(_invoke("verify", source))


def test_packing_a_packed_store_says_it_is_packed_already(source: Path, tmp_path: Path) -> None:
    packed = store_pack.pack(source, tmp_path / "store").path
    line = _error_line(_invoke("pack", packed, tmp_path / "again"))
    assert f"{packed} is a packed store, not a Hugging Face checkpoint; it is packed already" in line
    assert f"`klotski-tier run --model {packed}`" in line and f"`klotski-tier verify {packed}`" in line
    assert "safe_serialization" not in line and not (tmp_path / "again").exists()


def test_a_store_inside_its_checkpoint_is_refused_before_any_work(source: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(source, tmp_path / "model"))
    before = sorted(model.iterdir())
    line = _error_line(_invoke("pack", model, model / "sub"))
    assert f"the store {model / 'sub'} is inside the checkpoint {model}, which the command reads" in line
    assert sorted(model.iterdir()) == before
