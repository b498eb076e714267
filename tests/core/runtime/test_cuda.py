"""The CUDA path: pinned host buffers, a copy stream with events, a compute stream waiting on them.

Marked ``cuda`` and skipped on machines without a GPU; ``benchmarks/gpu_check.sh`` runs them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.runtime.engine import GenerationResult
from tests.checkpoints import make_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22, 23, 24]]


def run(directory: Path, device: str, budget: int | None) -> GenerationResult:
    options = EngineOptions(batches=2, batch_size=2, device=device, device_memory_bytes=budget)
    return Engine.load(directory, options).generate(PROMPTS, max_new_tokens=5, return_logits=True)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_offloaded_cuda_generation_matches_cpu(tmp_path: Path, family: str) -> None:
    directory = make_checkpoint(tmp_path / family, family, num_layers=3)
    engine = Engine.load(directory, EngineOptions(batches=2, batch_size=2))
    device_min, _ = engine.minimum_budgets(PROMPTS, max_new_tokens=5)
    cpu = run(directory, "cpu", None)
    cuda = run(directory, "cuda", device_min + 2 * engine.spec.expert_bytes)
    assert [o.token_ids for o in cuda.outputs] == [o.token_ids for o in cpu.outputs]
    for ours, theirs in zip(cuda.outputs, cpu.outputs, strict=True):
        for a, b in zip(ours.logits, theirs.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert cuda.metrics.tiers["device"].evictions > 0
    assert cuda.metrics.tiers["device"].bytes_in > 0


def test_a_cuda_budget_is_reserved_as_an_arena_and_blocks_are_placed_in_it(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "mixtral", "mixtral", num_layers=3)
    engine = Engine.load(directory, EngineOptions(batches=2, batch_size=2))
    budget = engine.minimum_budgets(PROMPTS, max_new_tokens=5)[0] + 2 * engine.spec.expert_bytes
    options = EngineOptions(batches=2, batch_size=2, device="cuda", device_memory_bytes=budget)
    cuda = Engine.load(directory, options)
    before = torch.cuda.memory_reserved()
    result = cuda.generate(PROMPTS, max_new_tokens=5, events=True)
    assert result.metrics.tiers["device"].peak_bytes <= budget
    assert result.metrics.compute_s > 0  # busy time from CUDA events
    assert torch.cuda.memory_reserved() >= before  # the arena came from the caching allocator once
