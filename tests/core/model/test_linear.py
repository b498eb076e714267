"""ops.linear: bfloat16 products widened to float32 on CPUs without native bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from klotski_tier.core.model import ops


@pytest.fixture
def widening(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "native_bf16_matmul", lambda: False)


@pytest.mark.parametrize("rows", [ops.WIDEN_MIN_ROWS, 9, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_a_widened_product_is_the_bf16_product_up_to_the_order_of_its_sums(
    widening: None, rows: int, bias: bool
) -> None:
    torch.manual_seed(rows)
    out_features = 2 * ops.WIDEN_CHUNK_ROWS + 40  # three chunks, the last one partial
    x = torch.randn(2, rows, 96).bfloat16()  # [B, T, In]
    w = torch.randn(out_features, 96).bfloat16()  # [Out, In]
    b = torch.randn(out_features).bfloat16() if bias else None
    ours = ops.linear(x, w, b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())  # [B, T, Out]
    assert ours.dtype == torch.bfloat16 and ours.shape == (2, rows, out_features) and ours.is_contiguous()
    # one rounding to bf16 of a float32 sum: within half a bf16 ulp of the exact value, plus float32's error
    eps = torch.finfo(torch.bfloat16).eps
    assert ((ours.double() - exact).abs() <= exact.abs() * eps / 2 + 1e-3).all()
    reference = F.linear(x, w, b)  # the bf16 kernel: the same rounding of a float32 accumulator
    assert (ours.float() - reference.float()).abs().max() <= 2 * eps * reference.float().abs().max()


def test_few_rows_and_other_dtypes_go_to_the_plain_kernel(
    widening: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(torch, "mm", lambda *args, **kwargs: calls.append(1))  # the widened path's call
    w = torch.randn(8, 16).bfloat16()
    few = torch.randn(ops.WIDEN_MIN_ROWS - 1, 16).bfloat16()
    assert torch.equal(ops.linear(few, w), F.linear(few, w))
    wide32 = torch.randn(32, 16)
    assert torch.equal(ops.linear(wide32, w.float()), F.linear(wide32, w.float()))
    assert calls == []


def test_a_cpu_with_native_bf16_keeps_the_bf16_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "native_bf16_matmul", lambda: True)
    x, w = torch.randn(64, 32).bfloat16(), torch.randn(48, 32).bfloat16()
    assert torch.equal(ops.linear(x, w), F.linear(x, w))
