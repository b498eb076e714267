"""On a CPU device with a host budget of zero, blocks are read from disk straight into device memory:
the same tokens, nothing in the host tier, no host-to-device copies, and every byte still counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.errors import BudgetError
from klotski_tier.core.store.pack import pack
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22]]
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen2_moe", num_layers=3, num_experts=6)
    store = pack(directory, tmp_path_factory.mktemp("packed") / "store").path
    return {"checkpoint": directory, "store": store}


def streaming(directory: Path, **changes: object) -> EngineOptions:
    probe = Engine.load(directory, EngineOptions(batches=2, batch_size=2, device="cpu"))
    device_min, _ = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)
    budget = device_min + 2 * probe.spec.expert_bytes
    return EngineOptions(batches=2, batch_size=2, device="cpu", device_memory_bytes=budget, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["checkpoint", "store"])
def test_reads_skip_the_host_tier_with_the_same_tokens(models: dict[str, Path], kind: str) -> None:
    staged = Engine.load(models[kind], streaming(models[kind])).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    direct = Engine.load(models[kind], streaming(models[kind], host_memory_bytes=0)).generate(
        PROMPTS, max_new_tokens=NEW_TOKENS
    )
    assert [o.token_ids for o in direct.outputs] == [o.token_ids for o in staged.outputs]
    host, device = direct.metrics.tiers["host"], direct.metrics.tiers["device"]
    assert host.bytes_in == 0 and host.peak_bytes == 0
    assert device.bytes_in > 0 and device.peak_bytes <= device.budget_bytes
    # every device byte came from the drive, but a block's buffer past the end of its file (under one
    # 4 KiB unit: buffers hold whole units) is never read; a prefetch cancelled mid-read counts on disk only
    assert device.bytes_in - device.transfers * 4096 < direct.metrics.disk_bytes_read < 2 * device.bytes_in
    staged_in, staged_moves = staged.metrics.tiers["host"].bytes_in, staged.metrics.tiers["host"].transfers
    assert staged_in - staged_moves * 4096 < staged.metrics.disk_bytes_read < 2 * staged_in  # read once


def test_a_zero_host_budget_needs_a_cpu_device(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from klotski_tier.core.runtime import run as runtime

    monkeypatch.setattr(runtime, "resolve_device", lambda device: __import__("torch").device("cuda"))
    with pytest.raises(BudgetError, match="0 is allowed with a CPU device"):
        Engine.load(models["store"], EngineOptions(host_memory_bytes=0))
