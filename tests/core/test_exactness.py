"""Scheduling never changes the numbers: the engine against transformers' own generate.

For each family, in both on-disk expert layouts, in float32 and bfloat16, the engine's greedy
tokens equal transformers' tokens for every prompt (each run alone through ``generate``), and
float32 logits agree within 1e-4, for several batch-group shapes (n, bs), with a device budget
that holds the whole model and with one that holds only a few experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.demo import DemoShape, build_demo, demo_prompts
from tests.checkpoints import FAMILIES, make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3], [20, 21, 22, 23, 24, 25, 26, 27], [40, 41], [60, 61, 62, 63, 64]]
NEW_TOKENS = 6
LOGIT_TOLERANCE = 1e-4  # float32, absolute
SHAPES = [(1, 1), (2, 2), (3, 1), (1, 4)]  # (n batches, bs sequences per batch)
FEW_EXPERTS = 3  # the small budget: the minimum working set plus room for this many experts


@dataclass(frozen=True)
class Reference:
    tokens: list[list[int]]
    logits: list[list[torch.Tensor]]


def reference_outputs(directory: Path, dtype: torch.dtype) -> Reference:
    # transformers' default attention (SDPA), as a user's generate() runs it
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    tokens, logits = [], []
    for prompt in PROMPTS:
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        tokens.append(out.sequences[0, len(prompt) :].tolist())
        logits.append([step[0].float() for step in out.logits])
    return Reference(tokens, logits)


@pytest.fixture(
    scope="module",
    params=[
        (f, fused, dt) for f in FAMILIES for fused in (False, True) for dt in (torch.float32, torch.bfloat16)
    ],
    ids=lambda p: f"{p[0]}-{'fused' if p[1] else 'per-expert'}-{str(p[2]).removeprefix('torch.')}",
)
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Reference, torch.dtype]:
    family, fused, dtype = request.param
    directory = make_checkpoint(tmp_path_factory.mktemp(family), family, fused=fused, dtype=dtype, top_k=2)
    return directory, reference_outputs(directory, dtype), dtype


def few_experts_budget(directory: Path, n: int, bs: int) -> int:
    engine = Engine.load(directory, EngineOptions(batches=n, batch_size=bs))
    device_min, _ = engine.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)
    return device_min + FEW_EXPERTS * engine.spec.expert_bytes


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}-bs{s[1]}")
@pytest.mark.parametrize("small_budget", [False, True], ids=["whole-model", "few-experts"])
def test_engine_matches_transformers(
    case: tuple[Path, Reference, torch.dtype], shape: tuple[int, int], small_budget: bool
) -> None:
    directory, reference, dtype = case
    n, bs = shape
    budget = few_experts_budget(directory, n, bs) if small_budget else None
    engine = Engine.load(directory, EngineOptions(batches=n, batch_size=bs, device_memory_bytes=budget))
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert [o.token_ids for o in result.outputs] == reference.tokens
    if dtype is torch.float32:
        for output, expected in zip(result.outputs, reference.logits, strict=True):
            for ours, theirs in zip(output.logits, expected, strict=True):
                torch.testing.assert_close(ours, theirs, atol=LOGIT_TOLERANCE, rtol=0)
    if small_budget:
        assert result.metrics.tiers["device"].evictions > 0, "the small budget should force evictions"
        assert result.metrics.tiers["device"].peak_bytes <= budget


DEMO_SCALE = DemoShape(  # the demo model's real widths (the kernels' blocking depends on them), 2 layers
    vocab_size=1024,
    hidden_size=512,
    num_layers=2,
    num_experts=8,
    top_k=2,
    intermediate_size=1792,
    num_heads=8,
    num_kv_heads=4,
    max_position_embeddings=256,
    rope_theta=1e6,
)


def test_demo_scale_bfloat16_matches_transformers_token_for_token(tmp_path: Path) -> None:
    """Realistic widths in bfloat16, padded batches, a budget of a third of the experts."""
    directory = build_demo(tmp_path / "demo", DEMO_SCALE)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    probe = Engine.load(directory)
    prompts = [probe.encode(text) for text in demo_prompts()]
    expected = [
        model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
        for ids in prompts
    ]
    budget = probe.minimum_budgets(prompts, max_new_tokens=12)[0] + 5 * probe.spec.expert_bytes
    options = EngineOptions(batches=2, batch_size=4, device_memory_bytes=budget)
    result = Engine.load(directory, options).generate(prompts, max_new_tokens=12)
    assert [o.token_ids for o in result.outputs] == expected
