"""Median decode throughput of the engine on the demo or a bench model: the figure an A/B of two
versions of the code compares.

    PYTHONPATH=DIR python benchmarks/decode_check.py --model e2e-2g -n 1 --runs 3

``DIR`` is an install of the version to measure (``pip install --no-deps --target DIR <checkout>``),
so that two versions run the same script on the same machine, interleaved. The demo runs with its
128 MiB device budget (blocks from host RAM), e2e-2g from its packed store with a quarter of the
model on the device and no host tier; bs = 4, sweep eviction, 8-token prompts, 8 new tokens after a
warm-up run. It also runs against installs from before the core/ split (2026-12-06).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

try:
    from klotski_tier.core.runtime.engine import Engine, EngineOptions
except ImportError:  # an install from before the core/ subpackages
    from klotski_tier.core.engine import Engine, EngineOptions  # type: ignore[no-redef]

MIB = 2**20
DEMO_DEVICE_BYTES = 128 * MIB
E2E_2G_STORE = "bench/e2e-2g-v2-store"  # under the cache, as benchmarks.e2e builds it
E2E_2G_DEVICE_BYTES = 575_750_656  # a quarter of e2e-2g's weights
VOCAB_START = 10  # prompt ids start past the special tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["demo", "e2e-2g"], default="demo")
    parser.add_argument("-n", "--batches", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "klotski-tier")
    args = parser.parse_args()
    if args.model == "demo":
        model, budgets = args.cache / "demo-mixtral-v2", {"device_memory_bytes": DEMO_DEVICE_BYTES}
    else:
        model = args.cache / E2E_2G_STORE
        budgets = {"device_memory_bytes": E2E_2G_DEVICE_BYTES, "host_memory_bytes": 0}
    options = EngineOptions(batches=args.batches, batch_size=4, device="cpu", eviction="sweep", **budgets)
    engine = Engine.load(model, options)
    vocab = engine.spec.vocab_size - VOCAB_START
    prompts = [[VOCAB_START + (7 * i + 13 * j) % vocab for j in range(8)] for i in range(args.batches * 4)]
    engine.generate(prompts, max_new_tokens=2)
    runs = [engine.generate(prompts, max_new_tokens=8).metrics for _ in range(args.runs)]
    median = statistics.median
    speeds = [round(m.decode_tokens_per_s, 2) for m in runs]
    compute, waited = median(m.compute_s for m in runs), median(m.io_wait_s for m in runs)
    print(
        f"{args.model} n={args.batches}: decode {median(speeds):.2f} tokens/s (runs {speeds}), "
        f"compute {compute:.2f} s, waited {waited:.2f} s, "
        f"read {runs[0].disk_bytes_read / 2**30:.2f} GiB, {runs[0].tiers['device'].evictions} evictions"
    )


if __name__ == "__main__":
    main()
