"""The staging window in the simulator: decode tokens/s and drive bytes at look-ahead L = 1, 2, 3.

Mixtral-8x7B on the `rtx3090-sata` machine (RTX 3090, a 1 GB/s SATA drive), 64 prompts of 128
tokens, n = 4 x bs = 16, K = 2, `sweep` eviction, host RAM 16, 32 and 64 GiB: where the drive
binds, where RAM has room to stage, and where the host-to-device link binds.

    PYTHONPATH=. python benchmarks/staging_check.py
"""

from __future__ import annotations

from klotski_tier.core.plan.hardware import machine_named
from klotski_tier.core.plan.shapes import model_shape
from klotski_tier.core.plan.simulate import DISK_TO_HOST, SimConfig, simulate_workload
from klotski_tier.core.units import GIB


def main() -> None:
    spec, machine = model_shape("Mixtral-8x7B"), machine_named("rtx3090-sata")
    print("host RAM  L  decode tokens/s  drive GB read in decode (3 steps of 64 sequences)")
    for host in (16, 32, 64):
        for lookahead in (1, 2, 3):
            config = SimConfig(
                spec, machine, batches=4, batch_size=16, hot_experts=2, host_memory_bytes=host * GIB,
                eviction="sweep", lookahead_layers=lookahead,
            )  # fmt: skip
            result = simulate_workload(
                config, sequences=64, prompt_tokens=128, new_tokens=4, max_decode_steps=3
            )
            read = result.decode.bytes_moved[DISK_TO_HOST] / 1e9
            print(f"{host:5d} GiB  {lookahead}  {result.decode_tokens_per_s:15.3f}  {read:8.1f}")


if __name__ == "__main__":
    main()
