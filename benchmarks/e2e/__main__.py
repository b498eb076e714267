"""``python -m benchmarks.e2e``: tokens/s of every system at the same memory budget, and the bound.

Examples::

    python -m benchmarks.e2e                                   # e2e-2g, a quarter of the model, all systems
    python -m benchmarks.e2e --klotski-config sweep            # klotski's n: the best of --batches
    python -m benchmarks.e2e --systems accelerate,klotski --repeats 1 --prompts 8 --new-tokens 8
    python -m benchmarks.e2e --sweep batches --systems klotski,flexgen
    python -m benchmarks.e2e --sweep budget --systems klotski,accelerate
    python -m benchmarks.e2e --model e2e-large --systems klotski
    python -m benchmarks.e2e --systems llamacpp,klotski        # llama.cpp: built and converted once

Progress goes to stderr; the table to stdout; JSON, PNG and the machine profile to ``--out``.
Exit code 1 with a one-line message when the benchmark cannot run (cgroups unavailable without
``--no-cgroup``, a token mismatch between systems, a bad option).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from benchmarks.e2e.benchmark import (
    CHECKPOINT,
    DEFAULT_DRIVE_FILE_BYTES,
    ENGINE_READS,
    RESULTS_DIR,
    SWEEPS,
    BenchConfig,
    run_benchmark,
)
from benchmarks.e2e.model import BENCH_SHAPES
from benchmarks.e2e.planning import KLOTSKI_CONFIGS, PLAN
from benchmarks.e2e.report import format_point
from benchmarks.e2e.runner import DEFAULT_TIMEOUT_S
from benchmarks.e2e.systems import SYSTEMS
from benchmarks.e2e.workload import Workload
from klotski_tier.core.errors import KlotskiError
from klotski_tier.core.runtime.config import ALL_EXPERTS
from klotski_tier.core.units import parse_size


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _hot(text: str) -> int | str:
    return text if text == ALL_EXPERTS else int(text)


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="e2e-2g", help=f"{', '.join(BENCH_SHAPES)} or a checkpoint directory")
    p.add_argument(
        "--systems", type=_names, default=list(SYSTEMS), help=f"comma-separated, of {','.join(SYSTEMS)}"
    )
    p.add_argument(
        "--budget", type=float, default=0.25, help="memory budget as a fraction of the model (0.25)"
    )
    p.add_argument("--prompts", type=int, default=16, help="N prompts (16)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="P tokens per prompt (16)")
    p.add_argument("--new-tokens", type=int, default=16, help="G new tokens per prompt (16)")
    p.add_argument(
        "--klotski-config",
        choices=KLOTSKI_CONFIGS,
        default=PLAN,
        help="plan: klotski's n, bs and K from the planner (needs `klotski-tier bench`'s profile; without "
        "one, sweep); sweep: n the best of --batches (default: plan)",
    )
    p.add_argument(
        "--batches",
        type=_ints,
        default=[1, 2, 4, 8, 16],
        help="n values swept by flexgen, by klotski when swept, and by --sweep batches (1,2,4,8,16)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="bs of the engine's batches (default: the planner's for klotski, else N / n: one group)",
    )
    p.add_argument(
        "--klotski-hot-experts",
        type=_hot,
        default=None,
        help='K of klotski: an integer or "all" (default: the planner\'s; "all" when swept)',
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="machine profile of `klotski-tier bench` (default: the one bench wrote, if any)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per system; medians are reported (3)")
    p.add_argument(
        "--sweep", choices=SWEEPS, help="batches: klotski over --batches; budget: over --sweep-budgets"
    )
    p.add_argument("--sweep-budgets", type=_floats, default=[0.125, 0.25, 0.5, 0.75, 1.0])
    p.add_argument(
        "--no-cgroup", action="store_true", help="no memory cgroups: budgets are the engines' own only"
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="where JSON, PNG and the profile go")
    p.add_argument("--allowance", help="runtime allowance, e.g. 900MiB (default: measured by an idle worker)")
    p.add_argument(
        "--drive-file-size", default=str(DEFAULT_DRIVE_FILE_BYTES), help="raw drive test file size"
    )
    p.add_argument("--accelerate-batch", type=int, help="accelerate's batch (default: the largest that fits)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per worker run")
    p.add_argument("--trace", action="store_true", help="save one extra klotski run's Chrome trace in --out")
    p.add_argument(
        "--bound-beside-reads",
        action="store_true",
        help="also time the bound's all-resident runs while the drive reads the bytes that must move "
        "beside them (O_DIRECT, from the first step): what compute costs here when reads overlap it",
    )
    p.add_argument(
        "--engine-reads",
        choices=ENGINE_READS,
        default=CHECKPOINT,
        help="what the engine's systems read: the checkpoint's safetensors (O_DIRECT, the engine's default) "
        "or its packed store (checksummed; packed once)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def config_from(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model,
        workload=Workload(args.prompts, args.prompt_tokens, args.new_tokens),
        systems=args.systems,
        budget=args.budget,
        batches=args.batches,
        batch_size=args.batch_size,
        klotski_hot_experts=args.klotski_hot_experts,
        klotski_config=args.klotski_config,
        profile_path=args.profile,
        repeats=args.repeats,
        sweep=args.sweep,
        sweep_budgets=args.sweep_budgets,
        use_cgroup=not args.no_cgroup,
        out=args.out,
        allowance_bytes=parse_size(args.allowance, what="--allowance") if args.allowance else None,
        drive_file_bytes=parse_size(args.drive_file_size, what="--drive-file-size"),
        accelerate_batch=args.accelerate_batch,
        timeout_s=args.timeout,
        trace=args.trace,
        bound_beside_reads=args.bound_beside_reads,
        engine_reads=args.engine_reads,
        command=shlex.join(["python", "-m", "benchmarks.e2e", *sys.argv[1:]]),
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        outcome = run_benchmark(config_from(args))
    except KlotskiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if outcome.note:
        print(f"note: {outcome.note}")
    for x, point in zip(outcome.xs, outcome.points, strict=True):
        print(f"\n== {outcome.payload['sweep'] or 'budget'} = {x:g} ==")
        print(format_point(point))
    print("\nwrote " + ", ".join(str(p) for p in outcome.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
