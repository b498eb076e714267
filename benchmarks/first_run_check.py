"""A first run without a machine profile: the plan it picks, and the bytes it reads from the drive against
the bytes that must move.

The run streams: a device budget below the model and no host tier (``--host-memory 0``). The bytes that
must move are a lower bound (:func:`~klotski_tier.core.observe.must_move.bytes_to_move`): every block of
the first step, and in each later step every block it needs beyond what the device could have kept from
before (its budget less the KV cache and activations).

    PYTHONPATH=. python benchmarks/first_run_check.py --model /path/to/model --device-mib 200 --prompts 16
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.observe.must_move import bytes_to_move
from klotski_tier.core.plan.autoplan import plan_files
from klotski_tier.core.runtime.run import fixed_device_bytes
from klotski_tier.core.store.files import open_model
from klotski_tier.core.units import MIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device-mib", type=int, required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--defaults", action="store_true", help="no plan: the options' defaults (before)")
    parser.add_argument("--stream-window", type=int, default=None, help="[pipeline] stream_window")
    args = parser.parse_args()
    files = open_model(args.model)
    vocab = files.spec.vocab_size
    prompts = [
        [1 + (i * 7 + j) % (vocab - 1) for j in range(args.prompt_tokens)] for i in range(args.prompts)
    ]
    options = EngineOptions(device="cpu", device_memory_bytes=args.device_mib * MIB, host_memory_bytes=0)
    if args.stream_window is not None:
        options = dataclasses.replace(options, stream_window=args.stream_window)
    explicit = {"device_memory_bytes", "host_memory_bytes"}
    if args.defaults:
        planned = options
    else:
        chosen = plan_files(files, options, prompts, args.new_tokens, explicit, None, None)  # no profile
        planned = chosen.options
        print(f"basis: {chosen.basis}")
    print(f"plan: n={planned.batches}, bs={planned.batch_size}, K={planned.hot_experts}, {planned.eviction}")
    engine = Engine.from_files(files, planned)
    result = engine.generate(prompts, max_new_tokens=args.new_tokens, record_routing=True)
    assert result.routing is not None
    groups = engine._groups(prompts, args.new_tokens)  # the run's batch groups
    fixed = fixed_device_bytes(files, groups, planned.batch_size)  # their KV cache and activations
    must = bytes_to_move(files.layouts, result.routing.steps, args.device_mib * MIB - fixed)
    read = result.metrics.disk_bytes_read
    print(
        f"drive read {read / MIB:.1f} MiB; must move at least {must / MIB:.1f} MiB: {read / must:.2f}x; "
        f"{len(result.routing.steps)} steps; decode {result.metrics.decode_tokens_per_s:.2f} tokens/s"
    )


if __name__ == "__main__":
    main()
