"""The sweep eviction policy through the engine and the simulator: a model streamed through a device
budget smaller than a step's weights reads less per step than with LRU, with the same tokens."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.model.blocks import expert_block
from klotski_tier.core.model.layouts import total_block_bytes
from klotski_tier.core.plan.simulate import DISK_TO_HOST, simulate_workload
from klotski_tier.core.store.files import open_model
from klotski_tier.core.units import MIB
from tests.checkpoints import make_checkpoint
from tests.core.plan.test_simulate import NEW, PROMPT, _config, _machine, _planned

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [8, 1]]
NEW_TOKENS = 6
SPARE_EXPERTS = 12
SIM_SEQUENCES = 8  # device room beyond the engine's floor, in experts: less than the model's


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", num_layers=4, num_experts=4)


def run(model: Path, eviction: str) -> tuple[list[list[int]], int, int]:
    """(tokens, bytes read from disk, the device budget) of a streamed CPU run with ``eviction``."""
    probe = Engine.load(model, EngineOptions(batches=1, batch_size=4, device="cpu"))
    floor, _ = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)
    budget = floor + SPARE_EXPERTS * probe.files.layouts[expert_block(0, 0)].nbytes
    options = EngineOptions(
        batches=1,
        batch_size=4,
        device="cpu",
        device_memory_bytes=budget,
        host_memory_bytes=0,
        eviction=eviction,
    )
    result = Engine.load(model, options).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    return [o.token_ids for o in result.outputs], result.metrics.disk_bytes_read, budget


def test_sweep_reads_less_than_lru_with_the_same_tokens(model: Path) -> None:
    lru_tokens, lru_read, budget = run(model, "lru")
    sweep_tokens, sweep_read, _ = run(model, "sweep")
    assert sweep_tokens == lru_tokens
    assert sweep_read < 0.9 * lru_read
    assert budget < total_block_bytes(open_model(model).layouts)  # the weights do not fit: both stream


# ---- the simulator runs the same policy ------------------------------------------------------------


def _simulated(eviction: str) -> tuple[float, int]:
    """(decode tokens/s, bytes read from the drive) of the demo's widths streaming from a slow drive."""
    config = _config(
        machine=_machine(disk_gbps=0.5),
        device_memory_bytes=96 * MIB,
        host_memory_bytes=48 * MIB,
        eviction=eviction,
    )
    result = simulate_workload(config, sequences=SIM_SEQUENCES, prompt_tokens=PROMPT, new_tokens=NEW)
    return result.decode_tokens_per_s, result.decode.bytes_moved[DISK_TO_HOST]


def test_the_simulator_keeps_a_prefix_with_sweep_and_agrees_with_the_planner() -> None:
    (lru_rate, lru_read), (sweep_rate, sweep_read) = _simulated("lru"), _simulated("sweep")
    assert sweep_read < 0.9 * lru_read and sweep_rate > lru_rate
    config = _config(
        machine=_machine(disk_gbps=0.5), device_memory_bytes=96 * MIB, host_memory_bytes=48 * MIB
    )
    swept = dataclasses.replace(config, eviction="sweep")  # the planner models the policy simulated
    assert _planned(swept, SIM_SEQUENCES) == pytest.approx(sweep_rate, rel=0.25)
