"""Budgets the user leaves out are derived from the memory the process may use; ones it cannot hold,
and limits below the minimum working set, are refused in one line before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.errors import BudgetError
from klotski_tier.core.memory import MemoryLimit
from klotski_tier.core.model.layouts import largest_block_bytes, total_block_bytes
from klotski_tier.core.runtime import budgets as budgets_module
from klotski_tier.core.runtime import engine as engine_module
from klotski_tier.core.runtime.budgets import DERIVED, GIVEN, reserve_bytes, resolve_budgets
from klotski_tier.core.store.files import ModelFiles, open_model
from klotski_tier.core.units import GIB, MIB
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22]]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return open_model(
        make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", num_layers=2, num_experts=4)
    )


@pytest.fixture(autouse=True)
def constant_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reserve without its share of the limit, so that a test can size a pool exactly."""
    monkeypatch.setattr(budgets_module, "MARGIN_FRACTION", 0.0)


def limit_of(free: int, used: int = 300 * MIB) -> MemoryLimit:
    """A cgroup-like limit leaving ``free`` bytes after ``used`` (the reserve comes off ``free``)."""
    return MemoryLimit(free + used, used, "cgroup v1", Path("/sys/fs/cgroup/memory/x/memory.stat"))


def pool(options: EngineOptions, limit: MemoryLimit) -> int:
    return limit.free_bytes - reserve_bytes(options, limit)


def test_cpu_device_takes_the_pool_and_nothing_is_held_twice(files: ModelFiles) -> None:
    options, limit = EngineOptions(device="cpu"), limit_of(GIB)
    budgets = resolve_budgets(files, options, limit)
    assert (budgets.device_bytes, budgets.host_bytes) == (pool(options, limit), 0)
    assert budgets.device_source == budgets.host_source == DERIVED
    assert budgets.pool_bytes == pool(options, limit)
    assert "cgroup v1 limit" in budgets.describe() and "kept for the runtime" in budgets.describe()


def test_cpu_host_gets_what_the_given_device_budget_leaves(files: ModelFiles) -> None:
    limit = limit_of(GIB)
    options = EngineOptions(device="cpu", device_memory_bytes=100 * MIB)
    budgets = resolve_budgets(files, options, limit)
    assert budgets.device_bytes == 100 * MIB and budgets.device_source == GIVEN
    assert budgets.host_bytes == pool(options, limit) - 100 * MIB and budgets.host_source == DERIVED
    applied = budgets.apply(options)
    assert (applied.device_memory_bytes, applied.host_memory_bytes) == (
        budgets.device_bytes,
        budgets.host_bytes,
    )


def test_cpu_host_below_a_block_reads_straight_into_the_device(files: ModelFiles) -> None:
    options = EngineOptions(device="cpu")
    block = largest_block_bytes(files.layouts)
    limit = limit_of(reserve_bytes(options, limit_of(0)) + 2 * block)  # a pool of about two blocks
    device = pool(options, limit) - block // 2
    budgets = resolve_budgets(files, EngineOptions(device="cpu", device_memory_bytes=device), limit)
    assert budgets.host_bytes == 0


def test_preload_puts_the_model_in_the_host_tier(files: ModelFiles) -> None:
    options, limit = EngineOptions(device="cpu", host_preload=True), limit_of(GIB)
    budgets = resolve_budgets(files, options, limit)
    assert budgets.host_bytes == total_block_bytes(files.layouts)
    assert budgets.device_bytes == pool(options, limit) - budgets.host_bytes


def test_on_cuda_the_host_tier_gets_the_pool(files: ModelFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budgets_module, "resolve_device", lambda _: torch.device("cuda"))
    options, limit = EngineOptions(), limit_of(GIB)
    budgets = resolve_budgets(files, options, limit)
    assert (budgets.device_bytes, budgets.device_source) == (None, "the GPU")
    assert (budgets.host_bytes, budgets.host_source) == (pool(options, limit), DERIVED)
    assert "device the GPU" in budgets.describe()


def test_given_budgets_the_process_cannot_hold_are_refused(files: ModelFiles) -> None:
    model = total_block_bytes(files.layouts)
    options = EngineOptions(device="cpu", device_memory_bytes=model, host_memory_bytes=model)
    limit = limit_of(reserve_bytes(options, limit_of(0)) + model)  # room for the model once, not twice
    with pytest.raises(BudgetError) as info:
        resolve_budgets(files, options, limit)
    message = str(info.value)
    assert "\n" not in message and "cgroup v1 limit" in message and "leave --host-memory out" in message
    # budgets beyond the model, within the limit, are fine: the tiers never hold more than the model
    roomy = limit_of(reserve_bytes(options, limit_of(0)) + 4 * model)
    assert resolve_budgets(files, EngineOptions(device="cpu", device_memory_bytes=3 * model), roomy)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("tier", ["device", "host"])
def test_a_given_budget_beyond_the_limit_itself_is_refused(
    files: ModelFiles, monkeypatch: pytest.MonkeyPatch, device: str, tier: str
) -> None:
    """999PB on a 23 GiB machine once ran, its budgets line claiming 930391252 GiB."""
    monkeypatch.setattr(budgets_module, "resolve_device", lambda _: torch.device(device))
    limit = limit_of(8 * GIB)
    options = EngineOptions(device=device, **{f"{tier}_memory_bytes": limit.limit_bytes + 1})
    if device == "cuda" and tier == "device":  # a GPU's memory is not the host's limit
        assert resolve_budgets(files, options, limit).device_bytes == limit.limit_bytes + 1
        return
    with pytest.raises(BudgetError, match=f"the {tier} budget .* is more than this process may ever hold"):
        resolve_budgets(files, options, limit)


def test_a_limit_below_the_largest_block_is_refused_naming_limit_and_minimum(files: ModelFiles) -> None:
    options = EngineOptions(device="cpu")
    limit = limit_of(reserve_bytes(options, limit_of(0)) + 10)
    with pytest.raises(BudgetError) as info:
        resolve_budgets(files, options, limit)
    message = str(info.value)
    assert "cgroup v1 limit" in message and "minimum working set" in message and "\n" not in message


def test_a_derived_device_below_the_kv_cache_is_refused_at_generate(
    files: ModelFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool holds a block but not the group's KV cache and activations: the error names the limit."""
    options = EngineOptions(device="cpu", batches=4, batch_size=8)
    block = largest_block_bytes(files.layouts)
    limit = limit_of(reserve_bytes(options, limit_of(0)) + block + 1)
    monkeypatch.setattr(engine_module, "read_memory_limit", lambda: limit)
    engine = Engine.from_files(files, options)
    with pytest.raises(BudgetError, match=r"cgroup v1 limit .* below the minimum working set .* KV cache"):
        engine.generate(PROMPTS * 10, max_new_tokens=60)


def test_the_engine_derives_its_budgets_and_says_so(files: ModelFiles) -> None:
    engine = Engine.from_files(files, EngineOptions(device="cpu", device_memory_bytes=64 * MIB))
    assert engine.budgets.device_source == GIVEN and engine.budgets.host_source == DERIVED
    assert engine.options.host_memory_bytes == engine.budgets.host_bytes is not None
    assert engine.budgets.host_bytes + 64 * MIB <= engine.budgets.pool_bytes
