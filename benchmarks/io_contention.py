"""How much the compute slows while the drive streams, with nothing but O_DIRECT reads beside it.

``klotski-tier bench`` measures the slowdown with the packed store's work (an xxh3 of every block)
in the reading threads. This isolates the drive: reader threads that only ``preadv`` a model's
safetensors with O_DIRECT into one buffer each (``DriveStreamer`` without its checksum: no copy, no
Python work per byte), while the main thread times one expert (the e2e models' shape: hidden 1024,
intermediate 2048, bf16, through ``ops.linear`` as the engine computes it) over a set of experts
larger than the caches. It also reports the CPU the readers took (``/proc/stat``: user, system,
iowait, steal), so that a slowdown the reads' own CPU time cannot explain is visible as such.

    PYTHONPATH=. python benchmarks/io_contention.py --model ~/.cache/klotski-tier/bench/e2e-2g-v2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from klotski_tier.core.bench.contention import DriveStreamer
from klotski_tier.core.model.ops import linear

HIDDEN, INTERMEDIATE = 1024, 2048  # the e2e models' expert shape
EXPERTS = 16  # 192 MiB of experts: every call reads its weights from RAM, as a streamed expert does
CALLS = 64  # expert calls timed per measurement
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times() -> list[int]:
    """The machine's CPU time counters of ``/proc/stat`` (jiffies), in :data:`CPU_FIELDS` order."""
    with open("/proc/stat", encoding="ascii") as stat:
        return [int(v) for v in stat.readline().split()[1 : 1 + len(CPU_FIELDS)]]


def expert_ms(experts: Sequence[tuple[torch.Tensor, ...]], rows: int) -> float:
    """Mean milliseconds of one expert over ``rows`` tokens, cycling through ``experts``."""
    x = torch.randn(rows, HIDDEN).bfloat16()  # [M, H]

    def ffn(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return linear(F.silu(linear(x, w1)) * linear(x, w3), w2)

    for weights in experts[:3]:
        ffn(*weights)
    started = time.perf_counter()
    for call in range(CALLS):
        ffn(*experts[call % len(experts)])
    return (time.perf_counter() - started) / CALLS * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a checkpoint directory (its safetensors)")
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 8], help="tokens per expert call")
    parser.add_argument("--readers", type=int, default=4, help="reading threads (the disk queue depth)")
    parser.add_argument("--chunk-mib", type=int, default=16, help="bytes per read request, MiB")
    parser.add_argument("--rounds", type=int, default=3, help="alone / with readers pairs; medians")
    args = parser.parse_args(argv)
    files = sorted(args.model.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"no .safetensors files in {args.model}")
    torch.manual_seed(0)
    experts = [
        (
            torch.randn(INTERMEDIATE, HIDDEN).bfloat16(),  # w1 [I, H]
            torch.randn(INTERMEDIATE, HIDDEN).bfloat16(),  # w3 [I, H]
            torch.randn(HIDDEN, INTERMEDIATE).bfloat16(),  # w2 [H, I]
        )
        for _ in range(EXPERTS)
    ]
    print(f"torch threads {torch.get_num_threads()}, {args.readers} readers of {args.chunk_mib} MiB requests")
    print("rows  alone ms  with reads ms  slowdown  drive GB/s  CPU while reading (share of all cores)")
    for rows in args.rows:
        alone, busy, rates, shares = [], [], [], []
        for _ in range(args.rounds):
            alone.append(expert_ms(experts, rows))
            before, started = cpu_times(), time.perf_counter()
            with DriveStreamer(files, args.chunk_mib << 20, args.readers, checksum=False) as readers:
                busy.append(expert_ms(experts, rows))
            elapsed, after = time.perf_counter() - started, cpu_times()
            rates.append(readers.bytes_read / elapsed / 1e9)
            spent = [b - a for a, b in zip(before, after, strict=True)]
            shares.append([v / max(1, sum(spent)) for v in spent])
        a, b = statistics.median(alone), statistics.median(busy)
        cpu = {name: statistics.median(s[i] for s in shares) for i, name in enumerate(CPU_FIELDS)}
        used = ", ".join(f"{k} {v:.0%}" for k, v in cpu.items() if k in ("user", "system", "iowait", "steal"))
        print(f"{rows:4d}  {a:8.2f}  {b:13.2f}  {b / a - 1:+8.0%}  {statistics.median(rates):10.2f}  {used}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
