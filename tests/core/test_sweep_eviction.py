"""The sweep eviction policy through the engine: a model streamed through a device budget smaller than
a step's weights reads less per step than with LRU, with the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from klotski_tier import Engine, EngineOptions
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [8, 1]]
NEW_TOKENS = 6
SPARE_EXPERTS = 12  # device room beyond the engine's floor, in experts: less than the model's


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral", num_layers=4, num_experts=4)


def run(model: Path, eviction: str) -> tuple[list[list[int]], int, int]:
    """(tokens, bytes read from disk, the device budget) of a streamed CPU run with ``eviction``."""
    probe = Engine.load(model, EngineOptions(batches=1, batch_size=4, device="cpu"))
    floor, _ = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)
    budget = floor + SPARE_EXPERTS * probe.spec.expert_bytes
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
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert budget < model_bytes  # the weights do not fit: both stream
