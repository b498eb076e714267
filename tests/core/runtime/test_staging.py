"""The disk-to-DRAM staging window in a real run: layers beyond the next are read into host RAM
ahead of their turn, and the tokens do not change."""

from __future__ import annotations

from pathlib import Path

import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.observe.events import PREFETCH
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4, 5, 6], [20, 21, 22, 23], [40, 41, 42, 43]]


def test_staging_ahead_reads_into_host_ram_and_keeps_tokens_and_logits(tmp_path: Path) -> None:
    model = make_checkpoint(tmp_path / "m", "mixtral", num_layers=5, num_experts=4)
    probe = Engine.load(model, EngineOptions(batches=2, batch_size=2, device="cpu"))
    device = probe.minimum_budgets(PROMPTS, max_new_tokens=4)[0] + 3 * probe.spec.expert_bytes
    host = 40 * probe.spec.expert_bytes  # room for a window, not the whole model

    def generate(lookahead: int):  # type: ignore[no-untyped-def]
        options = EngineOptions(
            batches=2, batch_size=2, device="cpu", device_memory_bytes=device, host_memory_bytes=host,
            eviction="sweep", lookahead_layers=lookahead,
        )  # fmt: skip
        return Engine.load(model, options).generate(
            PROMPTS, max_new_tokens=4, return_logits=True, events=True
        )

    near, far = generate(1), generate(3)
    assert [o.token_ids for o in far.outputs] == [o.token_ids for o in near.outputs]
    for ours, theirs in zip(far.outputs, near.outputs, strict=True):
        for a, b in zip(ours.logits, theirs.logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert far.events is not None and near.events is not None
    staged = [e.subject for e in far.events.of(PREFETCH) if e.tier == "host"]
    assert staged, "a look-ahead of 3 layers staged nothing in host RAM"
    assert not [e for e in near.events.of(PREFETCH) if e.tier == "host"]
    assert far.metrics.tiers["host"].peak_bytes <= host
