"""The Klotski evaluation's ablation ladder, simulated: what each of the design's parts adds.

For a model on a machine and a workload, the planner's plan gives n, K, where the KV cache lives and
where decode attention runs (every rung keeps them, so that the ladder measures the schedule);
the simulator (the engine's own pipeline on a virtual clock) then runs four configurations, each
adding one part to the one before:

1. simple pipeline: one batch, the whole next MoE layer prefetched (every expert, used or not),
   experts computed in id order (FlexGen's schedule at n = 1);
2. + multi-batch: n batches share every loaded weight (n as planned);
3. + only the hot experts prefetched: the correlation predictor's K (as planned) instead of all;
4. + the Klotski expert order: resident experts first, the others as they arrive (the full design).

Total throughput is generated tokens over prefill and decode time. The cases are the issue's: the
evaluation's RTX 3090 machine (24 GB on PCIe 4.0 x16, 256 GiB of DRAM, an SSD read at 1 GB/s) with
Mixtral-8x7B and Mixtral-8x22B, and an H800 (80 GB on PCIe 5.0 x16, 800 GB of DRAM) with
Mixtral-8x22B; prompts of 512 tokens, 32 generated, bs = 64, n up to 15.

    PYTHONPATH=. python benchmarks/ablation.py [--out benchmarks/results/ablation.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from klotski_tier.core.plan.hardware import machine_named
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.placement_model import Placement
from klotski_tier.core.plan.planner import PlanRequest, make_plan
from klotski_tier.core.plan.shapes import model_shape
from klotski_tier.core.plan.simulate import SimConfig, WorkloadResult, simulate_workload
from klotski_tier.core.runtime.config import INDEX, READY_FIRST
from klotski_tier.core.units import GB, GIB

PROMPT_TOKENS, NEW_TOKENS, BATCH_SIZE, MAX_BATCHES = 512, 32, 64, 15
DECODE_STEPS = 2  # simulated per group; the others counted at their mean


def machines() -> dict[str, Machine]:
    rtx = dataclasses.replace(machine_named("rtx3090-sata"), host_memory_bytes=256 * GIB)
    h800 = dataclasses.replace(machine_named("h800"), host_memory_bytes=800 * GB)
    return {"env1 (RTX 3090, 256 GiB)": rtx, "env2 (H800, 800 GB)": h800}


CASES = [
    ("Mixtral-8x7B", "env1 (RTX 3090, 256 GiB)"),
    ("Mixtral-8x22B", "env1 (RTX 3090, 256 GiB)"),
    ("Mixtral-8x22B", "env2 (H800, 800 GB)"),
]
RUNGS = ("simple pipeline", "+ multi-batch", "+ only hot experts prefetched", "+ Klotski expert order")


def ladder(model: str, machine: Machine) -> dict[str, Any]:
    spec = model_shape(model)
    sequences = MAX_BATCHES * BATCH_SIZE
    request = PlanRequest(
        spec, machine, sequences=sequences, prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS,
        batch_size=BATCH_SIZE, max_batches=MAX_BATCHES,
    )  # fmt: skip
    plan = make_plan(request)
    n, hot, placed = plan.batches, plan.hot_experts, plan.placement
    base = SimConfig(spec, machine, batches=n, batch_size=BATCH_SIZE, hot_experts=hot, eviction="sweep",
                     **_placed(placed))  # fmt: skip
    single = make_plan(dataclasses.replace(request, batches=1)).placement
    whole = {"hot_experts": spec.num_experts, "prefetch": "whole-layer", "expert_order": INDEX}
    configs = [
        dataclasses.replace(base, batches=1, **_placed(single), **whole),
        dataclasses.replace(base, **whole),
        dataclasses.replace(base, prefetch="correlation", expert_order=INDEX),
        dataclasses.replace(base, prefetch="correlation", expert_order=READY_FIRST),
    ]
    rows = []
    for name, config in zip(RUNGS, configs, strict=True):
        started = time.perf_counter()
        result = simulate_workload(
            config, sequences=config.batches * BATCH_SIZE, prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS,
            max_decode_steps=DECODE_STEPS,
        )  # fmt: skip
        rows.append(_row(name, config, result, time.perf_counter() - started))
    planned = {"batches": n, "hot_experts": hot, **_placed(placed)}
    return {"model": model, "machine": machine.name, "plan": planned, "rows": rows}


def _placed(placement: Placement) -> dict[str, Any]:
    """Where the plan puts the KV cache, the decode attention and a prefill's activations."""
    keys = ("kv_home", "kv_attention", "kv_device_layers", "activations_home")
    return {key: getattr(placement, key) for key in keys}


def _row(name: str, config: SimConfig, result: WorkloadResult, took_s: float) -> dict[str, Any]:
    seconds = result.prefill.step_s + result.decode.step_s
    generated = config.batches * BATCH_SIZE * NEW_TOKENS
    return {
        "rung": name,
        "batches": config.batches,
        "hot_experts": config.hot_experts,
        "prefetch": config.prefetch,
        "expert_order": config.expert_order,
        "kv_home": config.kv_home,
        "kv_attention": config.kv_attention,
        "kv_device_layers": config.kv_device_layers,
        "activations_home": config.activations_home,
        "total_tokens_per_s": generated / seconds,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "simulated_in_s": took_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the ladders as JSON here")
    args = parser.parse_args()
    named = machines()
    ladders = []
    for model, where in CASES:
        data = ladder(model, named[where])
        data["machine"] = where
        ladders.append(data)
        print(f"{model} on {where}: plan n={data['plan']['batches']} x bs={BATCH_SIZE}, "
              f"K={data['plan']['hot_experts']}, KV cache on {data['plan']['kv_home']}, "
              f"its first {data['plan']['kv_device_layers']} layers' on the device, decode attention on "
              f"{data['plan']['kv_attention']}, prefill activations on "
              f"{data['plan']['activations_home']}")  # fmt: skip
        first = data["rows"][0]["total_tokens_per_s"]
        for row in data["rows"]:
            total = row["total_tokens_per_s"]
            print(f"  {row['rung']:32s} n={row['batches']:<2d} total {total:8.2f} tok/s "
                  f"({total / first:5.2f}x)  decode {row['decode_tokens_per_s']:8.2f}")  # fmt: skip
    if args.out is not None:
        args.out.write_text(json.dumps(ladders, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
