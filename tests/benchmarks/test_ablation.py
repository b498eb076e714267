"""The ablation ladder (benchmarks/ablation.py): four simulated configurations, each adding one part."""

from __future__ import annotations

from benchmarks.ablation import RUNGS, ladder, machines


def test_the_ladder_adds_one_part_per_rung_on_the_evaluation_machine() -> None:
    data = ladder("Mixtral-8x7B", machines()["env1 (RTX 3090, 256 GiB)"])
    rows = data["rows"]
    assert [row["rung"] for row in rows] == list(RUNGS)
    assert rows[0]["batches"] == 1 and all(row["batches"] == data["plan"]["batches"] > 1 for row in rows[1:])
    assert rows[0]["prefetch"] == rows[1]["prefetch"] == "whole-layer"
    assert rows[2]["prefetch"] == rows[3]["prefetch"] == "correlation"
    assert [row["expert_order"] for row in rows] == ["index", "index", "index", "ready-first"]
    assert data["plan"]["kv_home"] == "host"  # 15 batches of 64: the cache does not fit the device
    total = [row["total_tokens_per_s"] for row in rows]
    assert total[1] > 3 * total[0]  # n batches share every load
    assert total[3] > total[2]  # the Klotski order hides what prefetching fewer experts exposes
