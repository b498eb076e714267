"""The comparison rule of tests/numerics.py, on logits whose answer is known."""

from __future__ import annotations

import pytest
import torch

from tests.numerics import (
    ROUNDINGS,
    assert_logits_close,
    compare_tokens,
    logit_tolerance,
    regroup,
    teacher_forced_prompts,
)

EPS = torch.finfo(torch.bfloat16).eps


def row(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)  # [V]


def test_the_tolerance_scales_with_the_format_and_the_largest_logit() -> None:
    logits = row(1.0, -4.0, 2.0)
    assert logit_tolerance(torch.bfloat16, logits) == pytest.approx(ROUNDINGS * EPS * 4.0)
    assert logit_tolerance(torch.float16, logits) == pytest.approx(ROUNDINGS * 2**-10 * 4.0)
    assert logit_tolerance(torch.float32, logits) == 1e-4


def test_a_near_tie_may_part_the_sequences_and_the_rest_is_not_compared() -> None:
    near_tie = row(5.0, 5.0 - EPS * 5, 0.0)  # top-2 margin one rounding of the scale: within tolerance
    clear = row(5.0, 0.0, 0.0)
    reference_logits = [[clear, near_tie, clear, clear], [clear, clear]]
    reference = [[0, 0, 0, 0], [0, 0]]
    ours = [[0, 1, 2, 2], [0, 0]]  # parts at the tie, then (legitimately) goes elsewhere
    result = compare_tokens(ours, reference, reference_logits, torch.bfloat16)
    assert result.parted == [0]
    assert result.compared == 2 + 2  # sequence 0 up to where it parted, all of sequence 1


def test_a_real_divergence_is_refused() -> None:
    decided = row(5.0, 4.0, 0.0)  # the reference prefers token 0 by 1.0, far beyond 8 * eps * 5 = 0.31
    with pytest.raises(AssertionError, match="real divergence"):
        compare_tokens([[1]], [[0]], [[decided]], torch.bfloat16)


def test_float32_allows_no_divergence_at_a_bfloat16_near_tie() -> None:
    near_tie = row(5.0, 5.0 - EPS * 5, 0.0)
    with pytest.raises(AssertionError, match="real divergence"):
        compare_tokens([[1]], [[0]], [[near_tie]], torch.float32)


def test_teacher_forced_logits_pass_rounding_and_fail_a_real_error() -> None:
    reference = [[row(5.0, -3.0, 1.0)]]
    rounded = [[row(5.0 + 2 * EPS * 5, -3.0, 1.0 - EPS)]]  # two roundings off: fine
    wrong = [[row(5.0, -3.0, 1.5)]]  # off by 0.5: a bug
    assert_logits_close(rounded, reference, torch.bfloat16)
    with pytest.raises(AssertionError, match="position 0"):
        assert_logits_close(wrong, reference, torch.bfloat16)


def test_teacher_forced_prompts_are_every_prefix_in_order() -> None:
    prompts, reference = [[7, 8], [9]], [[1, 2, 3], [4]]
    assert teacher_forced_prompts(prompts, reference) == [[7, 8], [7, 8, 1], [7, 8, 1, 2], [9]]
    rows = [row(float(i)) for i in range(4)]
    assert regroup(rows, reference) == [rows[:3], rows[3:]]
