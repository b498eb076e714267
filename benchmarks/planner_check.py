"""The planner check: the planner's and the simulator's predicted decode throughput against the real engine.

For each n of a sweep (bs fixed), the engine decodes ``--new-tokens`` tokens for n * bs prompts,
``--runs`` times (the median counts: the machine is shared, so single runs are noisy); the planner
(:func:`make_plan` with that n) and the simulator (:func:`simulate_workload`) predict the same run.
Both are fed this machine's profile (``~/.cache/klotski-tier/machine-profile.json``) with its compute
figures measured again on the checked model right before and after each n's runs (``compute_bench``:
the same jobs the pipeline runs, averaged, so they see the load the engine sees) and the routing the
engine recorded in a warm-up run. The planner's own choice of n (``batches=None``) is reported
against the best measured n. Both predict with the engine's default K (top-k).

    python benchmarks/planner_check.py                      # the demo, its default 128 MiB budget
    PYTHONPATH=. python benchmarks/planner_check.py --model e2e-2g   # bench-scale: packed store, host 0

Results go to ``benchmarks/results/planner-check[-NAME].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.bench.compute import compute_bench
from klotski_tier.core.bench.profile import ComputeProfile, find_profile
from klotski_tier.core.demo.build import demo_model_dir
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.plan.costmodel import CostModel, machine_from_profile
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.planner import PlanRequest, make_plan
from klotski_tier.core.plan.routing_model import RoutingModel, TraceRouting
from klotski_tier.core.plan.simulate import SimConfig, simulate_workload

MIB = 2**20
DEMO_DEVICE_BYTES = 128 * MIB  # the demo's default device budget (cli/run.py)
TOKEN_COUNTS = (1, 2, 4, 8, 16, 32)  # compute figures measured now (decode sees a few tokens per expert)
TOLERANCE = 0.20  # predictions should be within 20 % of the measured throughput
BEST_SHARE = 0.90  # the chosen n gives at least 90 % of the best measured throughput
IO_FIELDS = ("io_slowdown", "io_read_gbps", "io_alone_s", "io_streaming_s")  # contention, from the profile
VOCAB_START = 10  # prompt token ids start here (past the special tokens)


def setup(name: str) -> tuple[Path, Path, dict[str, Any]]:
    """The model to load, the checkpoint to time compute on, and the budgets: the demo (host budget
    unlimited unless --host-memory) or a bench model (its packed store, host budget 0)."""
    if name == "demo":
        budgets: dict[str, Any] = {"device_memory_bytes": DEMO_DEVICE_BYTES, "host_memory_bytes": None}
        return demo_model_dir(), demo_model_dir(), budgets
    from benchmarks.e2e.model import bench_model_dir, bench_store_dir, model_bytes

    directory = bench_model_dir(name)
    return (
        bench_store_dir(directory),
        directory,
        {
            "device_memory_bytes": model_bytes(directory) // 4,
            "host_memory_bytes": 0,
        },
    )


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    """``count`` distinct prompts of ``length`` token ids."""
    return [
        [VOCAB_START + (7 * i + 13 * j) % (vocab - VOCAB_START) for j in range(length)] for i in range(count)
    ]


def measure(model: Path, budgets: dict[str, Any], n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Median decode tokens/s of ``args.runs`` runs of the engine at n batches (after one warm-up)."""
    options = EngineOptions(
        batches=n, batch_size=args.batch_size, device="cpu", eviction=args.eviction, **budgets
    )
    engine = Engine.load(model, options)
    batch = prompts(n * args.batch_size, args.prompt_tokens, engine.spec.vocab_size)
    engine.generate(batch, max_new_tokens=2)
    runs = [engine.generate(batch, max_new_tokens=args.new_tokens).metrics for _ in range(args.runs)]
    return {
        "measured": statistics.median(m.decode_tokens_per_s for m in runs),
        "runs": [m.decode_tokens_per_s for m in runs],
        "compute_s": statistics.median(m.compute_s for m in runs),
        "io_wait_s": statistics.median(m.io_wait_s for m in runs),
        "decode_s": statistics.median(m.decode_s for m in runs),
    }


def record_routing(model: Path, budgets: dict[str, Any], args: argparse.Namespace) -> RoutingTrace:
    engine = Engine.load(model, EngineOptions(batches=4, batch_size=args.batch_size, device="cpu", **budgets))
    batch = prompts(4 * args.batch_size, args.prompt_tokens, engine.spec.vocab_size)
    trace: RoutingTrace | None = engine.generate(
        batch, max_new_tokens=args.new_tokens, record_routing=True
    ).routing
    assert trace is not None, "record_routing=True returns the trace"
    return trace


def this_machine(spec: ModelSpec, budgets: dict[str, Any], compute: ComputeProfile) -> Machine:
    """This machine: the stored profile's drive and codec figures, ``compute`` measured now."""
    profile = find_profile(None)
    if profile is None:
        raise SystemExit("no machine profile: run `klotski-tier bench` first")
    io = {name: getattr(profile.compute, name) for name in IO_FIELDS}  # measured by the bench only
    profile = dataclasses.replace(profile, compute=dataclasses.replace(compute, **io))
    return machine_from_profile(profile, spec, device_memory_bytes=budgets["device_memory_bytes"])


def predict(spec: ModelSpec, machine: Machine, trace: RoutingTrace, budgets: dict[str, Any], n: int | None,
            args: argparse.Namespace) -> tuple[float, float, int]:  # fmt: skip
    """(planner tokens/s, simulator tokens/s, planner's n) decoding at n batches (None: the planner's)."""
    sequences = (n or max(args.batches)) * args.batch_size
    request = PlanRequest(
        spec, machine, routing=RoutingModel(TraceRouting(trace)), sequences=sequences,
        prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batches=n, batch_size=args.batch_size,
        hot_experts=spec.top_k, eviction=args.eviction,  # the engine's default K
        device_memory_bytes=budgets["device_memory_bytes"], host_memory_bytes=_host(budgets),
    )  # fmt: skip
    plan = make_plan(request)
    if n is None:
        return plan.decode_tokens_per_s, 0.0, plan.batches
    config = SimConfig(
        spec, machine, n, args.batch_size, device_memory_bytes=budgets["device_memory_bytes"],
        host_memory_bytes=_host(budgets), routing=TraceRouting(trace), eviction=args.eviction,
    )  # fmt: skip
    sim = simulate_workload(
        config, sequences=sequences, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens
    )
    return plan.decode_tokens_per_s, sim.decode_tokens_per_s, n


def _host(budgets: dict[str, Any]) -> int | None:
    host: int | None = budgets["host_memory_bytes"]
    return host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo", help="demo, or a bench model name (e2e-2g)")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8, 16])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--eviction", default="sweep", help="the device's eviction policy (lru or sweep)")
    parser.add_argument("--host-memory", type=int, default=None, help="host budget in bytes (demo only)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    model, compute_model, budgets = setup(args.model)
    if args.model == "demo" and args.host_memory is not None:
        budgets["host_memory_bytes"] = args.host_memory
    started = time.perf_counter()
    spec = Engine.load(model, EngineOptions(device="cpu", **budgets)).spec
    trace = record_routing(model, budgets, args)
    rows, machines = [], []
    for n in args.batches:
        row, machine = check(n, model, compute_model, spec, trace, budgets, args)
        rows.append(row)
        machines.append(machine)
    _, _, chosen = predict(spec, machines[len(machines) // 2], trace, budgets, None, args)
    if chosen not in args.batches:  # measure the planner's own choice too
        row, _ = check(chosen, model, compute_model, spec, trace, budgets, args)
        rows = sorted([*rows, row], key=lambda r: int(r["n"]))
    report(rows, chosen, args, machines[len(machines) // 2], budgets, time.perf_counter() - started)


def check(n: int, model: Path, compute_model: Path, spec: ModelSpec, trace: RoutingTrace,
          budgets: dict[str, Any], args: argparse.Namespace) -> tuple[dict[str, Any], Machine]:  # fmt: skip
    """One row of the sweep: n measured, then predicted with compute timed just before and after."""
    before = compute_bench(compute_model, TOKEN_COUNTS)
    row: dict[str, Any] = {"n": n, **measure(model, budgets, n, args)}
    machine = this_machine(spec, budgets, mean_profile(before, compute_bench(compute_model, TOKEN_COUNTS)))
    row["planner"], row["simulator"], _ = predict(spec, machine, trace, budgets, n, args)
    row["planner_ratio"] = row["planner"] / row["measured"]
    row["simulator_ratio"] = row["simulator"] / row["measured"]
    row["expert_s"] = machine_compute_figures(machine, spec)
    print(f"n={n}: measured {row['measured']:.2f} tok/s (runs {[round(r, 2) for r in row['runs']]}), "
          f"planner {row['planner']:.2f}, simulator {row['simulator']:.2f}", flush=True)  # fmt: skip
    return row, machine


def mean_profile(first: ComputeProfile, second: ComputeProfile) -> ComputeProfile:
    """The compute figures measured before and after the engine's runs, averaged per token count."""

    def mean(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
        return {t: (a[t] + b[t]) / 2 for t in a}

    return dataclasses.replace(
        first,
        expert_s=mean(first.expert_s, second.expert_s),
        attention_s=mean(first.attention_s, second.attention_s),
    )


def machine_compute_figures(machine: Machine, spec: ModelSpec) -> dict[int, float]:
    cost = CostModel(spec, machine)
    return {t: cost.expert_s(t) for t in TOKEN_COUNTS}


def report(rows: list[dict[str, Any]], chosen: int, args: argparse.Namespace, machine: Machine,
           budgets: dict[str, Any], wall_s: float) -> None:  # fmt: skip
    best = max(rows, key=lambda r: r["measured"])
    at_chosen = next((r["measured"] for r in rows if r["n"] == chosen), float("nan"))
    print(
        f"\n{args.model}, bs={args.batch_size}, budgets {budgets}, {args.new_tokens} new tokens, "
        f"median of {args.runs}"
    )
    print(" n  measured  planner  simulator  planner/meas  sim/meas")
    for r in rows:
        print(f"{r['n']:2d}  {r['measured']:8.2f}  {r['planner']:7.2f}  {r['simulator']:9.2f}  "
              f"{r['planner_ratio']:12.2f}  {r['simulator_ratio']:8.2f}")  # fmt: skip
    share = at_chosen / best["measured"]
    within = all(abs(r[f"{k}_ratio"] - 1) <= TOLERANCE for r in rows for k in ("planner", "simulator"))
    print(
        f"planner chooses n={chosen}: {share:.0%} of the best measured (n={best['n']}); "
        f"all within 20 %: {within}"
    )
    name = "planner-check" if args.model == "demo" else f"planner-check-{args.model}"
    args.out.mkdir(parents=True, exist_ok=True)
    data = {
        **{key: getattr(args, key) for key in ("model", "batch_size", "new_tokens", "prompt_tokens", "runs")},
        "budgets": budgets, "rows": rows, "chosen_n": chosen, "chosen_share_of_best": share,
        "within_tolerance": within, "machine": dataclasses.asdict(machine), "wall_s": wall_s,
    }  # fmt: skip
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    plot(rows, chosen, args, args.out / f"{name}.png")


def plot(rows: list[dict[str, Any]], chosen: int, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("measured", "o-"), ("planner", "s--"), ("simulator", "^:")):
        ax.plot(ns, [r[key] for r in rows], style, label=key)
    low, high = ([r["measured"] * (1 + sign * TOLERANCE) for r in rows] for sign in (-1, 1))
    ax.fill_between(ns, low, high, alpha=0.15, label="±20 % of measured")
    ax.axvline(chosen, color="gray", linewidth=0.8, label=f"planner's n={chosen}")
    ax.set(xscale="log", xlabel="batches n", ylabel="decode tokens/s",
           title=f"{args.model}: bs={args.batch_size}, predicted vs measured")  # fmt: skip
    swept = sorted(set(args.batches))  # the chosen n is the line (a tick beside 16 would overlap it)
    ax.set_xticks(swept, [str(n) for n in swept])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
