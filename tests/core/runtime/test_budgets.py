"""Budgets hold: the bytes really allocated in each tier stay within its budget during a run,
and a budget below the minimum working set is refused before any byte moves."""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest
import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.errors import BudgetError
from klotski_tier.core.runtime import run as runtime
from klotski_tier.tiers.device import DeviceDriver
from klotski_tier.tiers.host import HostDriver
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [40, 41, 42, 43], [50]]
STAGING = 64 * 2**20  # a host budget: blocks are staged in the host tier (not read straight into the device)


class LiveBytes:
    """Bytes of buffers allocated and not yet freed, and their peak, measured from the tensors' lives."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._lock = threading.Lock()

    def track(self, buffer: torch.Tensor) -> torch.Tensor:
        nbytes = buffer.numel()
        with self._lock:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        weakref.finalize(buffer, self._free, nbytes)
        return buffer

    def _free(self, nbytes: int) -> None:
        with self._lock:
            self.live -= nbytes


HOST_LIVE = LiveBytes()
DEVICE_LIVE = LiveBytes()


class TrackedHost(HostDriver):
    def allocate(self, nbytes: int) -> torch.Tensor:
        return HOST_LIVE.track(super().allocate(nbytes))


class TrackedDevice(DeviceDriver):
    def allocate(self, nbytes: int) -> torch.Tensor:
        return DEVICE_LIVE.track(super().allocate(nbytes))


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2_moe", num_layers=3, num_experts=6)


def test_peak_bytes_stay_within_both_budgets(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "HostDriver", TrackedHost)
    monkeypatch.setattr(runtime, "DeviceDriver", TrackedDevice)
    probe = Engine.load(directory, EngineOptions(batches=2, batch_size=2, host_memory_bytes=STAGING))
    device_min, host_min = probe.minimum_budgets(PROMPTS, max_new_tokens=4)
    expert = probe.spec.expert_bytes
    device_budget, host_budget = device_min + 2 * expert, host_min + 3 * expert
    options = EngineOptions(
        batches=2, batch_size=2, device_memory_bytes=device_budget, host_memory_bytes=host_budget
    )
    metrics = Engine.load(directory, options).generate(PROMPTS, max_new_tokens=4).metrics

    device_fixed = device_min - host_min  # KV cache and activations, allocated outside the device tier
    assert 0 < DEVICE_LIVE.peak <= device_budget - device_fixed
    assert 0 < HOST_LIVE.peak <= host_budget
    assert metrics.tiers["device"].peak_bytes <= device_budget
    assert metrics.tiers["host"].peak_bytes <= host_budget
    assert metrics.tiers["device"].evictions > 0 and metrics.tiers["host"].evictions > 0


@pytest.mark.parametrize("tier", ["device", "host"])
def test_budget_below_minimum_is_refused_with_the_minimum(directory: Path, tier: str) -> None:
    engine = Engine.load(directory, EngineOptions(batches=2, batch_size=2, host_memory_bytes=STAGING))
    device_min, host_min = engine.minimum_budgets(PROMPTS, max_new_tokens=4)
    minimum = device_min if tier == "device" else host_min
    options = EngineOptions(batches=2, batch_size=2, **{f"{tier}_memory_bytes": minimum - 1})
    with pytest.raises(BudgetError, match=f"{tier} memory budget .* below the minimum working set") as info:
        Engine.load(directory, options).generate(PROMPTS, max_new_tokens=4)
    assert f"{minimum} bytes" in str(info.value)
    assert f"raise --{tier}-memory" in str(info.value)
    Engine.load(
        directory, EngineOptions(batches=2, batch_size=2, **{f"{tier}_memory_bytes": minimum})
    ).generate(PROMPTS, max_new_tokens=4)


def test_budget_below_any_block_is_refused_at_load(directory: Path) -> None:
    with pytest.raises(BudgetError, match="largest block"):
        Engine.load(directory, EngineOptions(device_memory_bytes=1024))
