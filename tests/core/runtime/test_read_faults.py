"""A disk read error in the middle of a run: the run fails with one line, does not hang, and frees
every buffer it allocated; on both read paths (a checkpoint read buffered, a packed store O_DIRECT)."""

from __future__ import annotations

import errno
import gc
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from klotski_tier import Engine, EngineOptions
from klotski_tier.cli.main import main
from klotski_tier.core.errors import TierError
from klotski_tier.core.runtime import run as runtime
from klotski_tier.core.store.pack import pack
from klotski_tier.tiers.disk import DiskDriver
from tests.checkpoints import make_checkpoint
from tests.core.runtime.test_budgets import HOST_LIVE, TrackedDevice, TrackedHost

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22]]
ENGINE_THREAD_PREFIX = "klotski-"  # every tier pool and the compute thread are named so
GOOD_READS = 12  # reads that succeed before the drive starts failing: the run is under way by then


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", num_layers=3, num_experts=6)
    store = pack(directory, tmp_path_factory.mktemp("packed") / "store").path
    return {"checkpoint": directory, "store": store}


@pytest.fixture
def failing_drive(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every disk read after the first ``GOOD_READS`` fails with EIO; returns the call counter."""
    calls = [0]
    real = DiskDriver._read_chunk

    def read_chunk(self: DiskDriver, fd: int, file_offset: int, view: memoryview) -> int:
        calls[0] += 1
        if calls[0] > GOOD_READS:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, fd, file_offset, view)

    monkeypatch.setattr(DiskDriver, "_read_chunk", read_chunk)
    return calls


def streaming_options(directory: Path) -> EngineOptions:
    probe = Engine.load(directory, EngineOptions(batches=2, batch_size=2))
    device_min, _ = probe.minimum_budgets(PROMPTS, max_new_tokens=4)
    return EngineOptions(batches=2, batch_size=2, device_memory_bytes=device_min + probe.spec.expert_bytes)


@pytest.mark.parametrize("kind", ["checkpoint", "store"])
def test_a_read_error_fails_the_run_and_frees_everything(
    models: dict[str, Path], kind: str, failing_drive: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "HostDriver", TrackedHost)
    monkeypatch.setattr(runtime, "DeviceDriver", TrackedDevice)
    gc.collect()  # buffers of earlier tests that only a collection frees
    live_before = HOST_LIVE.live
    engine = Engine.load(models[kind], streaming_options(models[kind]))
    with pytest.raises(TierError, match="Input/output error") as caught:
        engine.generate(PROMPTS, max_new_tokens=4)
    assert failing_drive[0] > GOOD_READS  # the error came from the drive, mid-run
    assert "\n" not in str(caught.value)
    del caught  # its traceback holds the frames of the run, and their buffers
    gc.collect()
    assert HOST_LIVE.live == live_before, "host buffers leaked"
    engine_threads = [t.name for t in threading.enumerate() if t.name.startswith(ENGINE_THREAD_PREFIX)]
    assert not engine_threads, f"a tier's threads outlived the run: {engine_threads}"


def test_the_command_reports_a_read_error_in_one_line(
    models: dict[str, Path], failing_drive: list[int]
) -> None:
    args = ["run", "--model", str(models["store"]), "--prompt-ids", "1,2,3", "--device-memory", "40KiB"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "Input/output error" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
