"""A prefill's residual streams waiting in host RAM between their jobs (runtime/activations.py).

Exactness for every family (float32 tokens identical, logits within 1e-4; bf16 by the numerics rule),
alone and with the KV cache away from the device; the device then holds two residual slots instead of
every batch's, the residuals count against the host budget, and each job's residual is fetched before
it runs and taken home after it changes it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.errors import BudgetError, ConfigError
from klotski_tier.core.runtime.activations import ACTIVATIONS_TRACK
from klotski_tier.core.runtime.config import parse_config
from tests.checkpoints import FAMILIES, make_checkpoint
from tests.core.runtime.test_exactness import (
    NEW_TOKENS,
    PROMPTS,
    Reference,
    reference_outputs,
    teacher_forced_logits,
)
from tests.numerics import assert_logits_close, compare_tokens

HOST = 1 << 30  # a host tier of its own: the residuals leave the device's memory for it


@pytest.fixture(scope="module", params=FAMILIES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reference]:
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, top_k=2)
    return directory, reference_outputs(directory, torch.float32)


@pytest.mark.parametrize(
    "kv",
    [{}, {"kv_home": "host", "kv_attention": "host"}, {"kv_home": "disk"}],
    ids=["kv-device", "kv-host", "kv-disk"],
)
@pytest.mark.parametrize("shape", [(2, 2), (3, 1)], ids=lambda s: f"n{s[0]}-bs{s[1]}")
def test_residuals_in_host_ram_give_the_reference_tokens_and_logits(
    case: tuple[Path, Reference], shape: tuple[int, int], kv: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:  # fmt: skip
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))
    directory, reference = case
    n, bs = shape
    options = EngineOptions(batches=n, batch_size=bs, activations_home="host", host_memory_bytes=HOST, **kv)
    probe = Engine.load(directory, options)
    budget = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)[0] + 3 * probe.spec.expert_bytes
    engine = Engine.load(directory, dataclasses.replace(options, device_memory_bytes=budget))
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert [o.token_ids for o in result.outputs] == reference.tokens
    assert_logits_close([o.logits for o in result.outputs], reference.logits, torch.float32)
    assert result.metrics.tiers["device"].peak_bytes <= budget


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_with_residuals_in_host_ram_holds_to_the_numerics_rule(tmp_path: Path, family: str) -> None:
    directory = make_checkpoint(tmp_path / family, family, dtype=torch.bfloat16, top_k=2)
    reference = reference_outputs(directory, torch.bfloat16)
    options = EngineOptions(batches=2, batch_size=2, activations_home="host", host_memory_bytes=HOST)
    engine = Engine.load(directory, options)
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert_logits_close(teacher_forced_logits(engine, PROMPTS, reference), reference.logits, torch.bfloat16)
    compare_tokens([o.token_ids for o in result.outputs], reference.tokens, reference.logits, torch.bfloat16)


def test_the_device_holds_two_residual_slots_and_the_host_the_rest(tmp_path: Path) -> None:
    """Long prompts in many batches: the residual streams are most of a prefill's activations."""
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    prompts = [[1 + (i + j) % 90 for j in range(40)] for i in range(8)]
    spec = Engine.load(directory).spec

    def minimum(home: str, host: int = HOST) -> tuple[int, int]:
        options = EngineOptions(batches=4, batch_size=2, activations_home=home, host_memory_bytes=host)
        return Engine.load(directory, options).minimum_budgets(prompts, max_new_tokens=2)

    residual = 2 * 40 * spec.hidden_size * spec.dtype.itemsize  # one batch's [B, T, H]
    on_device, in_ram = minimum("device"), minimum("host")
    assert on_device[0] - in_ram[0] == (4 - 2) * residual  # four batches' on the device, against two slots
    assert in_ram[1] - on_device[1] == 4 * residual  # every batch's in host RAM
    with pytest.raises(
        BudgetError, match=r"KV cache and activations kept in host RAM .*\[activations\] home"
    ):
        small = EngineOptions(
            batches=4, batch_size=2, activations_home="host", host_memory_bytes=in_ram[1] - 1
        )
        Engine.load(directory, small).generate(prompts, max_new_tokens=2)


def test_each_job_fetches_its_residual_and_takes_home_what_it_changed(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    options = EngineOptions(batches=2, batch_size=2, activations_home="host", host_memory_bytes=HOST)
    engine = Engine.load(directory, options)
    prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    result = engine.generate(prompts, max_new_tokens=3, timeline=True)
    spec, layers = engine.spec, engine.spec.num_layers
    residuals = [2 * 3, 2 * 4]  # each batch's [B, T] up to its longest prompt
    row = spec.hidden_size * spec.dtype.itemsize
    fetched = (3 * layers + 1) * sum(residuals) * row  # attention, gate, combine of each layer; the head
    stored = (2 * layers + 1) * sum(residuals) * row  # the embedding, attention and combine of each layer
    assert (result.metrics.activation_bytes_in, result.metrics.activation_bytes_out) == (fetched, stored)
    assert result.timeline is not None
    events = result.timeline.to_chrome()["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
    assert ACTIVATIONS_TRACK in names
    spans = [e for e in events if e.get("ph") == "X" and e.get("args", {}).get("kind") == "activations"]
    assert len(spans) == 2 * (5 * layers + 2)  # only the prefill's: decode keeps its residuals


def test_the_activations_home_is_a_config_key_with_a_one_line_error() -> None:
    assert parse_config({"activations": {"home": "host"}}) == {"activations_home": "host"}
    with pytest.raises(ConfigError, match=r"activations\.home"):
        parse_config({"activations": {"home": "disk"}})
    with pytest.raises(ConfigError, match="activations_home must be one of device, host"):
        EngineOptions(activations_home="ram")
