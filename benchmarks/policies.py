"""Prefetch policies compared on the demo model, offline (replay) and live, at equal settings.

A warm-up run records the demo's routing on the first half of the prompts; the learning
policies (hot-first, correlation) are warmed up from it. Then, with a device budget that
holds a quarter of the experts (plus the KV cache, activations and one of each other block),
each prefetch policy runs the second half of the prompts live, and the live run's own routing
is replayed through the same policies. Results go to ``benchmarks/results/policies.json`` and
``policies.png`` (``policies-kK.*`` with ``--hot-experts K``).

    python benchmarks/policies.py [--new-tokens 24] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.demo.build import demo_model_dir
from klotski_tier.core.demo.tokenizer import demo_prompts
from klotski_tier.core.observe.replay import replay
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.policies.registry import make_eviction, make_prefetch

POLICIES = ["none", "hot-first", "correlation", "oracle"]
EXPERT_SHARE = 0.25  # the device budget holds this share of all experts
EVICTION = "lru"


def prompts(engine: Engine) -> tuple[list[list[int]], list[list[int]]]:
    """Warm-up and measured prompt sets: the demo prompts, each continued with two suffixes."""
    texts = demo_prompts()
    warm = [engine.encode(t + " Then") for t in texts]
    measured = [engine.encode(t + " Finally,") for t in texts]
    return warm, measured


def record(engine: Engine, batch: list[list[int]], new_tokens: int, path: Path) -> RoutingTrace:
    result = engine.generate(batch, max_new_tokens=new_tokens, record_routing=True)
    assert result.routing is not None
    result.routing.save(path)
    return result.routing


def live(
    model: Path,
    base: EngineOptions,
    policy: str,
    warm: Path,
    truth: Path,
    batch: list[list[int]],
    new_tokens: int,
) -> dict[str, Any]:
    trace = truth if policy == "oracle" else (warm if policy in ("hot-first", "correlation") else None)
    options = EngineOptions(**{**base.__dict__, "prefetch": policy, "prefetch_trace": trace})
    metrics = Engine.load(model, options).generate(batch, max_new_tokens=new_tokens).metrics
    device = metrics.tiers["device"]
    return {
        "hit_rate": metrics.expert_hit_rate,
        "precision": metrics.prefetch_precision,
        "recall": metrics.prefetch_recall,
        "bytes_moved": device.bytes_in,
        "decode_tokens_per_s": metrics.decode_tokens_per_s,
        "io_wait_s": metrics.io_wait_s,
        "bubbles_s": metrics.bubbles_s,
    }


def offline(
    truth: RoutingTrace, warm: RoutingTrace, policy: str, capacity: int, k: int | None
) -> dict[str, Any]:
    prefetch = make_prefetch(policy)
    if policy in ("hot-first", "correlation"):
        prefetch.warm_up(warm.as_steps())
    result = replay(
        truth, prefetch, make_eviction(EVICTION), capacity_bytes=capacity, hot_experts=k, prefetch_name=policy
    )
    return {k: getattr(result, k) for k in ("hit_rate", "precision", "recall", "bytes_moved")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--hot-experts", type=int, default=None, help="K (default: the router's top-k)")
    args = parser.parse_args()
    model = demo_model_dir()
    probe = Engine.load(model, EngineOptions(batches=2, batch_size=4))
    warm_prompts, measured = prompts(probe)
    spec = probe.spec
    experts_bytes = int(EXPERT_SHARE * spec.num_layers * spec.num_experts * spec.expert_bytes)
    device = probe.minimum_budgets(measured, max_new_tokens=args.new_tokens)[0] + experts_bytes
    base = EngineOptions(
        batches=2, batch_size=4, device_memory_bytes=device, eviction=EVICTION, hot_experts=args.hot_experts
    )
    with tempfile.TemporaryDirectory() as scratch:
        warm_path, truth_path = Path(scratch) / "warm.npz", Path(scratch) / "truth.npz"
        recorder = Engine.load(model, EngineOptions(**{**base.__dict__, "prefetch": "none"}))
        warm = record(recorder, warm_prompts, args.new_tokens, warm_path)
        truth = record(recorder, measured, args.new_tokens, truth_path)
        rows = {
            p: {
                "live": live(model, base, p, warm_path, truth_path, measured, args.new_tokens),
                "replay": offline(truth, warm, p, experts_bytes, args.hot_experts),
            }
            for p in POLICIES
        }
    report = {
        "hot_experts": args.hot_experts or spec.top_k,
        "device_memory_bytes": device,
        "expert_budget_bytes": experts_bytes,
        "eviction": EVICTION,
        "new_tokens": args.new_tokens,
        "prompts": len(measured),
        "policies": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.hot_experts is None else f"-k{args.hot_experts}"
    (args.out / f"policies{suffix}.json").write_text(json.dumps(report, indent=2))
    print(f"{'policy':<12} {'':<7} {'hit rate':>8} {'precision':>9} {'recall':>7} {'MiB moved':>10}")
    for policy, modes in rows.items():
        for mode, r in modes.items():
            print(
                f"{policy:<12} {mode:<7} {r['hit_rate']:>8.1%} {r['precision']:>9.1%} {r['recall']:>7.1%} "
                f"{r['bytes_moved'] / 2**20:>10.0f}"
            )
    chart(rows, args.out / f"policies{suffix}.png")


def chart(rows: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6))
    for index, metric in enumerate(("hit_rate", "precision", "recall")):
        axes = figure.add_subplot(1, 3, index + 1)
        for offset, mode in enumerate(("live", "replay")):
            values = [rows[p][mode][metric] for p in POLICIES]
            axes.bar([i + 0.4 * offset for i in range(len(POLICIES))], values, width=0.4, label=mode)
        axes.set_xticks([i + 0.2 for i in range(len(POLICIES))], POLICIES, rotation=30)
        axes.set_ylim(0, 1)
        axes.set_title(metric.replace("_", " "))
        if index == 0:
            axes.legend()
    figure.suptitle("Prefetch policies on the demo model, device budget = 1/4 of the experts")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
