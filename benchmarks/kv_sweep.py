"""Group size against throughput with the KV cache in host RAM: measured on this machine, simulated beside.

A fixed workload (``--prompts`` prompts of ``--prompt-tokens`` tokens, ``--new-tokens`` each) runs in
groups of n batches of ``--batch-size`` for each n of ``--batches``, on a CPU device with a small
device budget (``--device-mib``): with the cache on the device only the smallest groups fit (the
planner and the engine refuse the others); with ``[kv] home = "host"`` every group runs, the largest
with a cache several times the device budget. Each n is measured once through the engine's API
(decode tokens/s) and simulated with this machine's ``klotski-tier bench`` profile, and both are
drawn against n.

    PYTHONPATH=. python benchmarks/kv_sweep.py --model ~/.cache/klotski-tier/demo-mixtral-v2 \\
        --out benchmarks/results/kv-sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.observe.timeline_plot import render_png
from klotski_tier.core.plan.hardware import local_machine
from klotski_tier.core.plan.simulate import SimConfig, simulate_workload
from klotski_tier.core.store.files import open_model
from klotski_tier.core.units import MIB

DEFAULT_BATCHES = (1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device-mib", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=lambda t: [int(x) for x in t.split(",")], default=DEFAULT_BATCHES)
    parser.add_argument(
        "--activations-home", choices=("device", "host"), default="device",
        help="where a prefill's residual streams wait ([activations] home): host RAM lets larger groups fit",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.png")
    parser.add_argument(
        "--timeline",
        action="store_true",
        help="also draw the largest n's run as <out>-timeline.png (and .json)",
    )
    args = parser.parse_args()
    rows = [_point(args, n, timeline=args.timeline and n == max(args.batches)) for n in args.batches]
    if args.out is not None:
        payload = {"command": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        text = json.dumps(payload, indent=2) + "\n"
        args.out.with_suffix(".json").write_text(text, encoding="utf-8")
        _chart(rows, args, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.png')}")


def _point(args: argparse.Namespace, n: int, *, timeline: bool = False) -> dict[str, Any]:
    """One n: does its cache fit the device, and its decode rate measured and simulated in host RAM."""
    files = open_model(args.model)
    spec = files.spec
    prompts = [
        [1 + (i * 13 + j * 7) % (spec.vocab_size - 1) for j in range(args.prompt_tokens)]
        for i in range(args.prompts)
    ]
    device = args.device_mib * MIB
    group_kv = n * args.batch_size * (args.prompt_tokens + args.new_tokens) * spec.kv_bytes_per_token()
    on_device = EngineOptions(device="cpu", batches=n, batch_size=args.batch_size, eviction="sweep")
    device_min, _ = Engine.from_files(files, on_device).minimum_budgets(
        prompts, max_new_tokens=args.new_tokens
    )
    options = dataclasses.replace(
        on_device, device_memory_bytes=device, kv_home="host", activations_home=args.activations_home
    )
    result = Engine.from_files(files, options).generate(
        prompts, max_new_tokens=args.new_tokens, timeline=timeline
    )
    metrics = result.metrics
    if timeline and result.timeline is not None and args.out is not None:
        trace = args.out.with_name(args.out.name + "-timeline.json")
        result.timeline.save(trace)
        render_png(trace, trace.with_suffix(".png"))
    machine = local_machine(device_memory_bytes=device)
    config = SimConfig(
        spec, machine, batches=n, batch_size=args.batch_size, device_memory_bytes=device, eviction="sweep",
        kv_home="host", activations_home=args.activations_home,
    )  # fmt: skip
    simulated = simulate_workload(
        config, sequences=args.prompts, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
        max_decode_steps=4,
    )  # fmt: skip
    row = {
        "batches": n,
        "group_kv_bytes": group_kv,
        "kv_over_device": group_kv / device,
        "fits_on_device": device_min <= device,  # else the engine and the planner refuse the group
        "device_minimum_bytes": device_min,
        "measured_decode_tokens_per_s": metrics.decode_tokens_per_s,
        "simulated_decode_tokens_per_s": simulated.decode_tokens_per_s,
        "device_peak_bytes": metrics.tiers["device"].peak_bytes,
        "kv_bytes_in": metrics.kv_bytes_in,
        "kv_bytes_out": metrics.kv_bytes_out,
    }
    fits = "fits" if row["fits_on_device"] else "refused"
    print(
        f"n={n:<3d} cache {group_kv / MIB:7.1f} MiB ({group_kv / device:4.1f}x the device budget; on the "
        f"device: {fits}): measured decode {metrics.decode_tokens_per_s:6.2f} tok/s, simulated "
        f"{simulated.decode_tokens_per_s:6.2f}; device peak {row['device_peak_bytes'] / MIB:.2f} MiB",
        flush=True,
    )
    return row


def _chart(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5))
    axes = figure.add_subplot(1, 1, 1)
    xs = [row["batches"] for row in rows]
    measured = [row["measured_decode_tokens_per_s"] for row in rows]
    axes.plot(xs, measured, marker="o", label="measured, KV cache in host RAM")
    simulated = [row["simulated_decode_tokens_per_s"] for row in rows]
    axes.plot(xs, simulated, marker="s", linestyle="--", label="simulated (this machine's profile)")
    for row, y in zip(rows, measured, strict=True):
        if not row["fits_on_device"]:
            label = f"cache {row['kv_over_device']:.1f}x the device"
            axes.annotate(label, (row["batches"], y), textcoords="offset points", xytext=(0, 8), ha="center",
                          fontsize=8)  # fmt: skip
    axes.set_xscale("log", base=2)
    axes.set_xlabel(f"n (batches of {args.batch_size} per group)")
    axes.set_ylabel("decode tokens / s")
    axes.set_title(f"{args.model.name}: device budget {args.device_mib} MiB", fontsize=10)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
