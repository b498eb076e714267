"""The Python API: stopping at EOS, sampling, text prompts, progress, input errors, metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import transformers

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.demo.build import build_demo
from klotski_tier.core.demo.shape import DemoShape
from klotski_tier.core.errors import ConfigError, InputError
from klotski_tier.core.runtime.run import Runtime
from klotski_tier.policies.prefetch import NoPrefetch
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22, 23, 24, 25]]
TINY_DEMO = DemoShape(
    vocab_size=512,
    hidden_size=32,
    num_layers=2,
    num_experts=4,
    top_k=2,
    intermediate_size=48,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=128,
    rope_theta=10000.0,
)


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mixtral")


def reference_tokens(directory: Path, prompt: list[int], new_tokens: int) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
    return list(out[0, len(prompt) :].tolist())


def test_generation_stops_at_eos_per_sequence(directory: Path, tmp_path: Path) -> None:
    free_run = Engine.load(directory).generate(PROMPTS, max_new_tokens=8)
    eos = free_run.outputs[0].token_ids[2]  # the third token of prompt 0 becomes the end of sequence
    stopping = make_checkpoint(tmp_path / "eos", "mixtral", eos_token_id=eos)
    result = Engine.load(stopping, EngineOptions(batches=2, batch_size=2)).generate(PROMPTS, max_new_tokens=8)
    first = result.outputs[0]
    assert first.finish_reason == "eos" and first.token_ids == free_run.outputs[0].token_ids[:3]
    for output, prompt in zip(result.outputs, PROMPTS, strict=True):
        assert output.token_ids == reference_tokens(stopping, prompt, 8)
        assert output.finish_reason == ("eos" if output.token_ids[-1] == eos else "length")


def test_sampling_is_seeded(directory: Path) -> None:
    engine = Engine.load(directory)
    first = engine.generate(PROMPTS, max_new_tokens=6, temperature=1.5, seed=7)
    again = engine.generate(PROMPTS, max_new_tokens=6, temperature=1.5, seed=7)
    other = engine.generate(PROMPTS, max_new_tokens=6, temperature=1.5, seed=8)
    greedy = engine.generate(PROMPTS, max_new_tokens=6)
    tokens = [o.token_ids for o in first.outputs]
    assert tokens == [o.token_ids for o in again.outputs]
    assert tokens != [o.token_ids for o in other.outputs] or tokens != [o.token_ids for o in greedy.outputs]


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-45])
def test_a_vanishing_temperature_samples_the_argmax(directory: Path, temperature: float) -> None:
    """As t -> 0 sampling tends to greedy; a denormal t must not overflow the scaled logits to nan."""
    engine = Engine.load(directory)
    cold = engine.generate(PROMPTS, max_new_tokens=4, temperature=temperature, seed=3)
    greedy = engine.generate(PROMPTS, max_new_tokens=4)
    assert [o.token_ids for o in cold.outputs] == [o.token_ids for o in greedy.outputs]


def test_text_prompts_are_encoded_and_outputs_decoded(tmp_path: Path) -> None:
    demo = build_demo(tmp_path / "demo", TINY_DEMO)
    engine = Engine.load(demo, EngineOptions(batches=1, batch_size=2))
    result = engine.generate(["Hello there", "The cat"], max_new_tokens=4)
    for output, text in zip(result.outputs, ["Hello there", "The cat"], strict=True):
        assert output.prompt_ids == engine.encode(text)
        assert output.text == engine.decode(output.token_ids)


def test_progress_reports_prefill_and_every_decode_step(directory: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    Engine.load(directory, EngineOptions(batches=1, batch_size=2)).generate(
        PROMPTS, max_new_tokens=3, progress=lambda *args: calls.append(args)
    )
    assert calls.count(("prefill", 1, 1)) == 2  # two groups of two sequences
    assert ("decode", 3, 3) in calls


def test_agenerate_runs_inside_a_callers_loop(directory: Path) -> None:
    engine = Engine.load(directory)

    async def caller() -> list[list[int]]:
        result = await engine.agenerate(PROMPTS, max_new_tokens=3)
        return [o.token_ids for o in result.outputs]

    assert asyncio.run(caller()) == [o.token_ids for o in engine.generate(PROMPTS, max_new_tokens=3).outputs]


def test_metrics_count_tokens_and_bytes(directory: Path) -> None:
    options = EngineOptions(host_memory_bytes=64 * 2**20)  # blocks staged in the host tier
    metrics = Engine.load(directory, options).generate(PROMPTS, max_new_tokens=4).metrics
    assert metrics.prefill_tokens == sum(len(p) for p in PROMPTS)
    assert metrics.decode_tokens == 3 * len(PROMPTS)  # the first new token comes from the prefill
    assert metrics.tiers["host"].bytes_in > 0 and metrics.tiers["device"].bytes_in > 0
    assert 0 < metrics.expert_hit_rate < 1 and metrics.compute_s > 0 and metrics.wall_s > 0


@pytest.mark.parametrize(
    ("prompts", "new_tokens", "message"),
    [
        ([[1] * 120], 10, "context is 128"),
        ([[]], 4, "prompt 0 is empty"),
        ([[1, 500]], 4, "outside the vocabulary"),
        ([], 4, "no prompts"),
        (["text"], 4, "no tokenizer.json"),
    ],
)
def test_bad_prompts_are_input_errors(
    directory: Path, prompts: list[list[int]], new_tokens: int, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        Engine.load(directory).generate(prompts, max_new_tokens=new_tokens)


@pytest.mark.parametrize("options", [{"batches": 0}, {"batch_size": 0}, {"hot_experts": -1}])
def test_bad_options_are_config_errors(options: dict[str, int]) -> None:
    with pytest.raises(ConfigError, match="must"):
        EngineOptions(**options)


def test_unknown_policy_names_the_valid_ones(directory: Path) -> None:
    with pytest.raises(ConfigError, match="valid names: correlation, hot-first, none, oracle"):
        Engine.load(directory, EngineOptions(prefetch="psychic"))


def test_host_buffers_are_pinned_for_a_cuda_device_only(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU machine, a run on the CPU device must not page-lock every host buffer."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is present ...
    files = Engine.load(directory, EngineOptions(device="cpu")).files
    runtime = Runtime(files, EngineOptions(device="cpu"), NoPrefetch())  # ... but compute runs on the CPU
    assert runtime.device.type == "cpu" and not runtime.host_driver.pinned
