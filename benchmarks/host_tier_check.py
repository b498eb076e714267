"""Drive bytes of a run whose host tier holds about half the model, LRU against sweep on both tiers,
without and with the staging window (look-ahead 1 and 2), against what RAM and the device cannot hold:
the model once, then each later pass the model less both budgets; and, stricter, of the blocks each
step used (:func:`~klotski_tier.core.observe.must_move.bytes_to_move`: a step of few tokens does not use
every expert, and the bound keeps exactly the ones it will).

A CPU device with a host budget and a device budget both given stands in for a GPU machine's pair of
tiers: blocks come from the drive into the host tier and are copied into the device tier.

    PYTHONPATH=. python benchmarks/host_tier_check.py --model /path/to/model
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.model.layouts import total_block_bytes
from klotski_tier.core.observe.must_move import bytes_to_move, reads_per_step
from klotski_tier.core.plan.autoplan import PLANNED_FIELDS, plan_request
from klotski_tier.core.plan.hardware import unmeasured_machine
from klotski_tier.core.plan.planner import make_plan
from klotski_tier.core.plan.routing_model import RoutingModel, TraceRouting
from klotski_tier.core.runtime.residency import HOST
from klotski_tier.core.runtime.run import fixed_device_bytes
from klotski_tier.core.store.files import open_model
from klotski_tier.core.units import GIB, MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--host-share", type=float, default=0.55, help="host budget, as a share")
    parser.add_argument("--device-share", type=float, default=0.28, help="device budget, as a share")
    parser.add_argument("--new-tokens", type=int, default=4, help="passes over the model: one per step")
    args = parser.parse_args()
    files = open_model(args.model)
    total = total_block_bytes(files.layouts)
    vocab = files.spec.vocab_size
    prompts = [[1 + (i * 7 + j) % (vocab - 1) for j in range(8)] for i in range(8)]
    host, device = int(total * args.host_share), int(total * args.device_share)
    for eviction, lookahead in (("lru", 1), ("sweep", 1), ("lru", 2), ("sweep", 2)):
        options = EngineOptions(
            device="cpu", batches=1, batch_size=8, device_memory_bytes=device, host_memory_bytes=host,
            eviction=eviction, lookahead_layers=lookahead,
        )  # fmt: skip
        engine = Engine.from_files(files, options)
        result = engine.generate(prompts, max_new_tokens=args.new_tokens, record_routing=True, events=True)
        assert result.routing is not None and result.events is not None
        fixed = fixed_device_bytes(files, engine._groups(prompts, args.new_tokens), options.batch_size)
        unheld = total + (args.new_tokens - 1) * max(0, total - host - device)  # the yardstick
        used = bytes_to_move(files.layouts, result.routing.steps, host + device - fixed)
        read = result.metrics.disk_bytes_read
        later = reads_per_step(result.events.events, files.layouts, HOST)[1:]  # the decode steps
        per_step = max(0, total - host - device)
        print(
            f"{eviction}, look-ahead {lookahead}: model {total / GIB:.2f} GiB, drive {read / GIB:.2f} GiB in "
            f"{args.new_tokens} passes; what RAM and the device cannot hold: {unheld / GIB:.2f} GiB "
            f"(ratio {read / unheld:.2f}); of the blocks the steps used: {used / GIB:.2f} GiB "
            f"(ratio {read / used:.2f}); per decode step {', '.join(f'{b / MIB:.0f}' for b in later)} MiB "
            f"against {per_step / MIB:.0f} MiB (ratio {max(later) / per_step:.2f} at most)"
        )
        machine = unmeasured_machine("cpu", device, host)  # bytes do not depend on the machine's rates
        lengths = [len(p) for p in prompts]
        request = plan_request(files, options, lengths, args.new_tokens, set(PLANNED_FIELDS), machine)
        plan = make_plan(dataclasses.replace(request, routing=RoutingModel(TraceRouting(result.routing))))
        print(
            f"  the planner, given this run's routes: {plan.drive_bytes / MIB:.0f} MiB per decode step, "
            f"{plan.unheld_bytes / MIB:.0f} MiB that the device and host RAM cannot hold "
            f"(ratio {plan.drive_bytes / max(plan.unheld_bytes, 1):.2f}); the engine's mean step "
            f"{sum(later) / len(later) / MIB:.0f} MiB"
        )


if __name__ == "__main__":
    main()
