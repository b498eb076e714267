"""Decode attention where the KV cache lives, on the host (runtime/host_attention.py).

On this CPU-only machine the path runs as on a CUDA one (projections in the compute thread, the
attention over the cache in host RAM in a thread of its own, the output back), so it is held to the
exactness rule: float32 tokens identical and logits within 1e-4 for every family, bf16 by the
numerics rule; the cache never crosses to the device after the prefill; the device projects batch
k+1 before it finishes batch k, whose attention runs on the host meanwhile.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.observe.events import JOB
from klotski_tier.core.runtime.config import parse_config
from klotski_tier.core.runtime.host_attention import HOST_ATTENTION_TRACK
from tests.checkpoints import FAMILIES, make_checkpoint
from tests.core.runtime.test_exactness import (
    NEW_TOKENS,
    PROMPTS,
    Reference,
    reference_outputs,
    teacher_forced_logits,
)
from tests.numerics import assert_logits_close, compare_tokens


def _options(n: int, bs: int, **kw: object) -> EngineOptions:
    return EngineOptions(batches=n, batch_size=bs, kv_home="host", kv_attention="host", **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module", params=FAMILIES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reference]:
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, top_k=2)
    return directory, reference_outputs(directory, torch.float32)


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 1)], ids=lambda s: f"n{s[0]}-bs{s[1]}")
@pytest.mark.parametrize("small_budget", [False, True], ids=["whole-model", "few-experts"])
def test_attention_on_the_host_gives_the_reference_tokens_and_logits(
    case: tuple[Path, Reference], shape: tuple[int, int], small_budget: bool
) -> None:
    directory, reference = case
    budget = None
    if small_budget:
        probe = Engine.load(directory, _options(*shape))
        budget = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)[0] + 3 * probe.spec.expert_bytes
    engine = Engine.load(directory, _options(*shape, device_memory_bytes=budget))
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert [o.token_ids for o in result.outputs] == reference.tokens
    assert_logits_close([o.logits for o in result.outputs], reference.logits, torch.float32)
    if budget is not None:
        assert result.metrics.tiers["device"].peak_bytes <= budget


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_with_attention_on_the_host_holds_to_the_numerics_rule(tmp_path: Path, family: str) -> None:
    directory = make_checkpoint(tmp_path / family, family, dtype=torch.bfloat16, top_k=2)
    reference = reference_outputs(directory, torch.bfloat16)
    engine = Engine.load(directory, _options(2, 2))
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert_logits_close(teacher_forced_logits(engine, PROMPTS, reference), reference.logits, torch.bfloat16)
    compare_tokens([o.token_ids for o in result.outputs], reference.tokens, reference.logits, torch.bfloat16)


def test_only_queries_new_entries_and_outputs_cross_the_link(tmp_path: Path) -> None:
    """After the prefill (on the device, its entries going home through the slots) no cache is copied
    in: each decode step moves a query, a new k and v and an output per sequence and layer."""
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    engine = Engine.load(directory, _options(2, 2))
    result = engine.generate(prompts, max_new_tokens=4, timeline=True)
    spec, metrics = engine.spec, result.metrics
    per_token = spec.kv_bytes_per_token() // spec.num_layers  # k and v of one token, one layer
    assert metrics.kv_bytes_in == 0  # the prefill had nothing cached; decode attends at home
    prefill_rows = 2 * 3 + 2 * 4  # each batch's positions up to its longest prompt
    assert metrics.kv_bytes_out == prefill_rows * per_token * spec.num_layers
    decode_rows = 3 * len(prompts) * spec.num_layers  # three decode steps of each sequence, every layer
    item = spec.dtype.itemsize
    per_row = 2 * spec.num_heads * spec.head_dim * item + per_token  # q and output, new k and v
    assert metrics.host_attention_bytes == decode_rows * per_row
    assert metrics.host_attention_s > 0
    assert result.timeline is not None
    events = result.timeline.to_chrome()["traceEvents"]
    names = [e for e in events if e.get("ph") == "M" and e["name"] == "thread_name"]
    tracks = {e["args"]["name"]: e["tid"] for e in names}
    spans = [e for e in events if e.get("ph") == "X" and e["tid"] == tracks[HOST_ATTENTION_TRACK]]
    assert len(spans) == 3 * spec.num_layers * 2  # decode steps x layers x batches


def test_the_device_projects_the_next_batch_before_it_finishes_this_one(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    engine = Engine.load(directory, _options(3, 1))
    result = engine.generate([[5, 6], [7], [8, 9, 10]], max_new_tokens=2, events=True)
    assert result.events is not None
    jobs = [e.subject for e in result.events.events if e.kind == JOB]
    decode = jobs[jobs.index("head b2") + 1 :]  # the second step
    for layer in range(2):
        assert f"L{layer} attention b0" not in decode  # no attention on the device
        for index in range(2):
            assert decode.index(f"L{layer} project b{index + 1}") < decode.index(
                f"L{layer} attention output b{index}"
            )


def test_attention_on_the_host_is_a_config_key_that_needs_the_cache_in_host_ram() -> None:
    assert parse_config({"kv": {"home": "host", "attention": "host"}}) == {
        "kv_home": "host",
        "kv_attention": "host",
    }
    with pytest.raises(ConfigError, match=r"kv\.attention"):
        parse_config({"kv": {"attention": "cpu"}})
    with pytest.raises(ConfigError, match=r'cache lives on the device; set \[kv\] home = "host"'):
        EngineOptions(kv_attention="host")
    with pytest.raises(ConfigError, match="cache lives on the disk"):
        EngineOptions(kv_home="disk", kv_attention="host")
