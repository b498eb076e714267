"""How the engine's numbers are compared with the reference's (transformers), per dtype.

float32 is exact: greedy tokens identical, every logit within :data:`FLOAT32_LOGIT_ATOL`.

bfloat16 and float16 kernels round differently from CPU to CPU (AVX2, AVX-512 BF16, AMX) and with
the shape of a batch: the engine groups the tokens of n batches per expert, transformers one
sequence at a time, so the same sum is accumulated in another order and an output may land on the
neighbouring representable value. Bit identity is therefore no promise; the rule is the one
inference projects use for reduced precision:

1. Teacher-forced logits. The reference's own token sequence runs through the engine (each prefix
   ``prompt + reference[:t]`` as a prompt, one new token), and each of the engine's logits is within
   ``tolerance = ROUNDINGS * eps(dtype) * max|reference logit|`` of the reference's at that
   position: a few roundings of the largest logit (``eps`` is the spacing of the format at 1:
   2**-7 for bfloat16, 2**-10 for float16). A wrong weight, expert or routing weight moves logits
   by tens of percent; rounding moves them by about one ``eps`` of their scale (measured: at most
   1.14 here on AVX2 over every family and batch shape, 0 with the portable kernels).
2. Free-running tokens. Greedy tokens equal the reference's, except at a near-tie: where they first
   differ, the engine's token must score within ``tolerance`` of the reference's best (so the
   reference's top-2 margin is within it too); the rest of that sequence is then not compared, as
   two greedy decoders that part at a tie continue from different texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FLOAT32_LOGIT_ATOL = 1e-4
"""float32: every logit within this of the reference's (absolute)."""

ROUNDINGS = 8
"""Reduced precision: the logit tolerance in units of ``eps * max|logit|`` (measured worst: 1.14)."""


def logit_tolerance(dtype: torch.dtype, reference: torch.Tensor) -> float:
    """How far a logit may be from ``reference`` (one position's logits [V]) for a model in ``dtype``."""
    if dtype == torch.float32:
        return FLOAT32_LOGIT_ATOL
    return ROUNDINGS * torch.finfo(dtype).eps * float(reference.abs().max())


def assert_logits_close(
    ours: Sequence[Sequence[torch.Tensor]], reference: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype
) -> None:
    """Per sequence and position, the engine's logits [V] within :func:`logit_tolerance` of the reference."""
    for seq, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
        for position, (row, expected) in enumerate(zip(mine, theirs, strict=True)):
            tolerance = logit_tolerance(dtype, expected)
            worst = float((row - expected).abs().max())
            assert worst <= tolerance, (
                f"sequence {seq}, position {position}: logits differ by up to {worst:.3g}, "
                f"more than the {dtype} tolerance {tolerance:.3g}"
            )


@dataclass(frozen=True)
class TokenComparison:
    """What :func:`compare_tokens` found: tokens compared, and the sequences that parted at a near-tie."""

    compared: int
    parted: list[int]  # sequence indices


def compare_tokens(
    ours: Sequence[Sequence[int]],
    reference: Sequence[Sequence[int]],
    reference_logits: Sequence[Sequence[torch.Tensor]],
    dtype: torch.dtype,
) -> TokenComparison:
    """Free-running greedy tokens by rule 2 of the module docstring; AssertionError at a real divergence.

    float32 allows no divergence: its tolerance (1e-4) is below any margin the reference decides by.
    """
    compared, parted = 0, []
    for seq, (mine, theirs, logits) in enumerate(zip(ours, reference, reference_logits, strict=True)):
        assert len(mine) == len(theirs), (
            f"sequence {seq}: {len(mine)} tokens, the reference has {len(theirs)}"
        )
        for position, (token, expected) in enumerate(zip(mine, theirs, strict=True)):
            compared += 1
            if token == expected:
                continue
            row = logits[position]  # [V] the reference's logits where the two parted
            tolerance = logit_tolerance(dtype, row)
            shortfall = float(row.max() - row[token])
            assert shortfall <= tolerance, (
                f"sequence {seq}, position {position}: token {token} instead of {expected}, which the "
                f"reference prefers by {shortfall:.3g}, more than the {dtype} tolerance {tolerance:.3g}: "
                "a real divergence, not a near-tie"
            )
            parted.append(seq)
            break
    return TokenComparison(compared, parted)


def teacher_forced_prompts(
    prompts: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]
) -> list[list[int]]:
    """Every prefix ``prompt + reference[:t]``: run for one new token, each gives the logits at t."""
    return [list(p) + list(r[:t]) for p, r in zip(prompts, reference, strict=True) for t in range(len(r))]


def regroup(flat: Sequence[torch.Tensor], reference: Sequence[Sequence[int]]) -> list[list[torch.Tensor]]:
    """The rows of a teacher-forced run (one per prefix) back into sequences of positions."""
    out, start = [], 0
    for tokens in reference:
        out.append(list(flat[start : start + len(tokens)]))
        start += len(tokens)
    assert start == len(flat), f"{len(flat)} rows for {start} positions"
    return out
