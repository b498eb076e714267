"""A Hugging Face checkpoint as it is, read with O_DIRECT: each block's aligned runs straight into its
buffer. The tokens equal those of page-cache reads, in tmpfs too, and where a file system refuses
O_DIRECT the run falls back to buffered reads with one warning per file."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.model.layouts import total_block_bytes
from klotski_tier.core.store.files import open_model
from klotski_tier.tiers import direct as direct_module
from klotski_tier.tiers.direct import O_DIRECT
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22]]
NEW_TOKENS = 4
SHM = Path("/dev/shm")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", num_layers=3, num_experts=6)


def streaming(**changes: Any) -> EngineOptions:
    """Budgets that make the experts stream from disk (a third of the model on the device)."""
    return EngineOptions(device="cpu", host_memory_bytes=0, **changes)


def generate(model: Path, **changes: Any) -> tuple[list[list[int]], int]:
    third = total_block_bytes(open_model(model).layouts) // 3
    engine = Engine.load(model, streaming(device_memory_bytes=third, **changes))
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    return [o.token_ids for o in result.outputs], result.metrics.disk_bytes_read


def test_direct_reads_give_the_tokens_of_page_cache_reads(model: Path) -> None:
    direct, direct_bytes = generate(model)
    buffered, buffered_bytes = generate(model, disk_direct=False)
    assert direct == buffered and direct_bytes > 0 and buffered_bytes > 0


@pytest.mark.skipif(not SHM.is_dir(), reason="needs a tmpfs at /dev/shm")
def test_a_checkpoint_in_tmpfs_runs(model: Path, tmp_path: Path) -> None:
    shm_model = Path(shutil.copytree(model, SHM / f"klotski-test-{os.getpid()}-{tmp_path.name}"))
    try:
        assert generate(shm_model)[0] == generate(model)[0]
    finally:
        shutil.rmtree(shm_model)


def test_a_file_system_that_refuses_o_direct_is_read_buffered_with_a_warning(
    model: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    expected = generate(model)[0]
    real_open = os.open

    def refusing_open(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & O_DIRECT:  # as tmpfs before Linux 6.6, and some network file systems
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(direct_module.os, "open", refusing_open)
    with caplog.at_level(logging.WARNING, logger="klotski_tier.tiers.direct"):
        assert generate(model)[0] == expected
    shards = sorted(model.glob("*.safetensors"))
    refusals = [r.getMessage() for r in caplog.records if "refuses O_DIRECT" in r.getMessage()]
    assert len(refusals) == len(shards)  # once per file
    assert all(any(str(shard) in message for shard in shards) for message in refusals)
