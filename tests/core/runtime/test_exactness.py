"""Scheduling never changes the numbers: the engine against transformers' own generate.

For each family, in both on-disk expert layouts, in float32 and bfloat16, for several batch-group
shapes (n, bs), with a device budget that holds the whole model and with one that holds only a few
experts, the engine is compared with transformers (each prompt alone through ``generate``) by the
rule of :mod:`tests.numerics`: float32 tokens identical and logits within 1e-4; bfloat16
teacher-forced logits within a few roundings of the logit scale, and greedy tokens equal except
after a near-tie of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.demo.build import build_demo
from klotski_tier.core.demo.shape import DemoShape
from klotski_tier.core.demo.tokenizer import demo_prompts
from tests.checkpoints import FAMILIES, make_checkpoint
from tests.numerics import assert_logits_close, compare_tokens, regroup, teacher_forced_prompts

PROMPTS = [[5, 7, 9, 11], [3], [20, 21, 22, 23, 24, 25, 26, 27], [40, 41], [60, 61, 62, 63, 64]]
NEW_TOKENS = 6
SHAPES = [(1, 1), (2, 2), (3, 1), (1, 4)]  # (n batches, bs sequences per batch)
FEW_EXPERTS = 3  # the small budget: the minimum working set plus room for this many experts


@dataclass(frozen=True)
class Reference:
    tokens: list[list[int]]
    logits: list[list[torch.Tensor]]


def reference_outputs(
    directory: Path, dtype: torch.dtype, prompts: list[list[int]] = PROMPTS, new_tokens: int = NEW_TOKENS
) -> Reference:
    """transformers' greedy tokens and the logits of each (its default attention, SDPA, as a user's
    generate() runs it)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    tokens, logits = [], []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens,
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
    tokens = [o.token_ids for o in result.outputs]
    if dtype is torch.float32:
        assert tokens == reference.tokens
        assert_logits_close([o.logits for o in result.outputs], reference.logits, dtype)
    else:
        assert_logits_close(teacher_forced_logits(engine, PROMPTS, reference), reference.logits, dtype)
        compare_tokens(tokens, reference.tokens, reference.logits, dtype)
    if small_budget:
        assert result.metrics.tiers["device"].evictions > 0, "the small budget should force evictions"
        assert result.metrics.tiers["device"].peak_bytes <= budget


DEMO_NEW_TOKENS = 12
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


def teacher_forced_logits(
    engine: Engine, prompts: list[list[int]], reference: Reference
) -> list[list[torch.Tensor]]:
    """The engine's logits at every position of the reference's own sequences."""
    forced = teacher_forced_prompts(prompts, reference.tokens)
    result = engine.generate(forced, max_new_tokens=1, return_logits=True)
    return regroup([o.logits[0] for o in result.outputs], reference.tokens)


def test_demo_scale_bfloat16_matches_transformers(tmp_path: Path) -> None:
    """Realistic widths in bfloat16, padded batches, a budget of a third of the experts."""
    directory = build_demo(tmp_path / "demo", DEMO_SCALE)
    probe = Engine.load(directory)
    prompts = [probe.encode(text) for text in demo_prompts()]
    reference = reference_outputs(directory, torch.bfloat16, prompts, DEMO_NEW_TOKENS)
    budget = probe.minimum_budgets(prompts, max_new_tokens=DEMO_NEW_TOKENS)[0] + 5 * probe.spec.expert_bytes
    options = EngineOptions(batches=2, batch_size=4, device_memory_bytes=budget)
    engine = Engine.load(directory, options)
    result = engine.generate(prompts, max_new_tokens=DEMO_NEW_TOKENS, return_logits=True)
    assert_logits_close(teacher_forced_logits(engine, prompts, reference), reference.logits, torch.bfloat16)
    outcome = compare_tokens([o.token_ids for o in result.outputs], reference.tokens, reference.logits,
                             torch.bfloat16)  # fmt: skip
    assert outcome.compared >= len(prompts) * 2  # every sequence is compared past its first token
