"""The discrete-event simulator against the planner, budgets, bytes moved, and known routing."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading

import numpy as np
import pytest

from klotski_tier.core.bench.suite import demo_spec
from klotski_tier.core.observe.events import JOB, PREFETCH, WANT, EventLog
from klotski_tier.core.observe.routing_trace import RoutingTrace, TraceMeta
from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.machine import ComputeRates, Machine
from klotski_tier.core.plan.planner import PlanRequest, make_plan
from klotski_tier.core.plan.routing_model import ParametricRouting, RoutingModel, TraceRouting
from klotski_tier.core.plan.sim_hardware import SimHardware
from klotski_tier.core.plan.simulate import (
    DISK_TO_HOST,
    HOST_TO_DEVICE,
    SimConfig,
    Simulator,
    block_sizes_of,
    simulate_workload,
    step_batches,
    sweep,
)
from klotski_tier.core.plan.virtual_clock import run_virtual

MIB, GIB = 2**20, 2**30
SPEC = dataclasses.replace(demo_spec(), num_layers=4)  # the demo's widths, 4 layers: 175 MiB
RATES = ComputeRates(flops_per_s=1.5e10, weight_bytes_per_s=1.5e10, job_overhead_s=3e-4)
SEQUENCES, PROMPT, NEW = 8, 8, 6


def _machine(disk_gbps: float = 1.0, link_gbps: float = 5.0) -> Machine:
    return Machine("test", "test", "cuda", 8 * GIB, 16 * GIB, disk_gbps, link_gbps, RATES, 0.6, 4)


def _config(**changes: object) -> SimConfig:
    fields: dict[str, object] = {"spec": SPEC, "machine": _machine(), "batches": 2, "batch_size": 4}
    fields["routing"] = ParametricRouting.for_spec(SPEC, seed=1)
    fields.update(changes)
    return SimConfig(**fields)  # type: ignore[arg-type]


def _run(config: SimConfig, sequences: int = SEQUENCES) -> tuple[float, float]:
    """Decode tokens/s and the share of decode time spent in bubbles."""
    result = simulate_workload(config, sequences=sequences, prompt_tokens=PROMPT, new_tokens=NEW)
    decode = result.decode
    return result.decode_tokens_per_s, (decode.inter_layer_s + decode.intra_layer_s) / decode.step_s


def _planned(config: SimConfig, sequences: int = SEQUENCES) -> float:
    request = PlanRequest(
        SPEC,
        config.machine,
        RoutingModel(ParametricRouting.for_spec(SPEC, seed=1), draws=8),
        device_memory_bytes=config.device_memory_bytes,
        host_memory_bytes=config.host_memory_bytes,
        sequences=sequences,
        prompt_tokens=PROMPT,
        new_tokens=NEW,
        batches=config.batches,
        batch_size=config.batch_size,
        hot_experts=SPEC.top_k,
        eviction=config.eviction,  # the policy simulated
    )
    return make_plan(request).decode_tokens_per_s


def test_without_bubbles_the_simulator_agrees_with_the_planner() -> None:
    config = _config()  # 8 GiB of device memory: every weight stays after the first step
    simulated, bubbles = _run(config)
    assert bubbles == 0.0
    assert simulated == pytest.approx(_planned(config), rel=0.05)


def test_when_io_dominates_both_show_bubbles() -> None:
    config = _config(
        machine=_machine(disk_gbps=0.2), device_memory_bytes=64 * MIB, host_memory_bytes=48 * MIB
    )
    simulated, bubbles = _run(config)
    assert bubbles > 0.5  # the drive, not the compute, sets the pace
    assert simulated == pytest.approx(_planned(config), rel=0.25)
    free, _ = _run(_config())
    assert simulated < free / 2


def test_budgets_hold_and_bytes_are_counted() -> None:
    device, host = 40 * MIB, 32 * MIB
    result = simulate_workload(
        _config(device_memory_bytes=device, host_memory_bytes=host),
        sequences=8,
        prompt_tokens=8,
        new_tokens=4,
    )
    for phase in (result.prefill, result.decode):
        assert 0 < phase.peak_device_bytes <= device and 0 < phase.peak_host_bytes <= host
        assert phase.bytes_moved[DISK_TO_HOST] > 0 and phase.bytes_moved[HOST_TO_DEVICE] > 0
    preloaded = simulate_workload(_config(device_memory_bytes=device, host_preload=True), sequences=8,
                                  prompt_tokens=8, new_tokens=4)  # fmt: skip
    assert (
        preloaded.prefill.bytes_moved[DISK_TO_HOST] == 0 and preloaded.decode.bytes_moved[HOST_TO_DEVICE] > 0
    )


def test_predicted_experts_stream_exactly_once_per_step() -> None:
    """Every token picks experts 0 and 1: once the predictor has seen a step, each decode step moves
    every layer's attention, gate and those two experts, plus the embedding and the head, once."""
    meta = TraceMeta(
        "mixtral", SPEC.num_layers, SPEC.num_experts, SPEC.top_k, SPEC.hidden_size, SPEC.expert_bytes
    )
    steps = (np.tile(np.array([[0, 1]], dtype=np.int16), (SPEC.num_layers, 16, 1)),)
    config = _config(routing=TraceRouting(RoutingTrace(meta, steps)), device_memory_bytes=40 * MIB)
    result = simulate_workload(config, sequences=8, prompt_tokens=8, new_tokens=5)
    sizes = CostModel(SPEC, config.machine).sizes
    per_step = sizes.embed + sizes.head + SPEC.num_layers * (sizes.attn + sizes.gate + 2 * sizes.expert)
    assert result.decode.bytes_moved[HOST_TO_DEVICE] == 4 * per_step
    assert result.decode.intra_layer_s == 0.0  # no cold expert: every used one was predicted
    assert result.decode.tokens == 4 * 8


def test_a_sweep_over_n_on_a_slow_drive_gains_with_n() -> None:
    config = _config(
        machine=_machine(disk_gbps=0.5), device_memory_bytes=96 * MIB, host_memory_bytes=48 * MIB
    )
    results = sweep(config, [1, 2, 4], sequences=lambda n: 4 * n, prompt_tokens=PROMPT, new_tokens=4)
    assert [r.batches for r in results] == [1, 2, 4]
    speeds = [r.decode_tokens_per_s for r in results]
    assert speeds == sorted(speeds) and speeds[-1] > 1.5 * speeds[0]


def test_same_seed_same_result_and_decode_extrapolation() -> None:
    config = _config(device_memory_bytes=64 * MIB, host_memory_bytes=48 * MIB)
    first = simulate_workload(config, sequences=8, prompt_tokens=8, new_tokens=9)
    again = simulate_workload(config, sequences=8, prompt_tokens=8, new_tokens=9)
    assert first == again
    short = simulate_workload(config, sequences=8, prompt_tokens=8, new_tokens=9, max_decode_steps=3)
    assert short.decode.tokens == first.decode.tokens == 8 * 8
    assert short.decode_tokens_per_s == pytest.approx(first.decode_tokens_per_s, rel=0.3)
    assert first.to_dict()["decode_tokens_per_s"] == first.decode_tokens_per_s


def test_a_cpu_device_without_host_budget_reads_into_device_memory() -> None:
    """Host budget 0 on a CPU device: blocks go from the drive to the device, nothing is copied."""
    cpu = dataclasses.replace(_machine(), device="cpu", host_to_device_gbps=4.0)
    result = simulate_workload(
        _config(machine=cpu, device_memory_bytes=96 * MIB, host_memory_bytes=0),
        sequences=SEQUENCES,
        prompt_tokens=PROMPT,
        new_tokens=NEW,
    )
    moved = result.decode.bytes_moved
    assert moved[HOST_TO_DEVICE] == 0 and moved[DISK_TO_HOST] > 0
    assert result.decode.peak_host_bytes == 0 and result.decode_tokens_per_s > 0


def _baseline_log(**changes: object) -> EventLog:
    """Two steps of ``_config(**changes)`` in the simulator, with its event log."""
    config = _config(device_memory_bytes=64 * MIB, host_memory_bytes=48 * MIB, **changes)
    cost = CostModel(SPEC, config.machine)

    async def run() -> EventLog:
        hardware = SimHardware.for_machine(config.machine)
        sim = Simulator(SPEC, block_sizes_of(cost), config.engine_options(), hardware, cost,
                        fixed_device_bytes=0, reads_into_device=False, events=True)  # fmt: skip
        sampler, rng = ParametricRouting.for_spec(SPEC, seed=1), np.random.default_rng(1)
        for query, context in ((PROMPT, 0), (1, PROMPT)):
            await sim.step(step_batches(sampler, rng, [4] * config.batches, query, context))
        await sim.aclose()
        assert sim.events is not None
        return sim.events

    return run_virtual(run())


def test_the_baselines_simulate_by_their_own_rules() -> None:
    sequential = _baseline_log(batches=1, schedule="sequential", prefetch="none", eviction="sweep")
    assert not sequential.of(PREFETCH) and not sequential.of(WANT)  # nothing is loaded ahead
    flexgen = _baseline_log(hot_experts=SPEC.num_experts, expert_order="index", prefetch="whole-layer")
    experts = [job.split() for job in flexgen.subjects(JOB) if " expert " in job]  # ["L3", "expert", "5"]
    phases = [list(run) for _, run in itertools.groupby(experts, key=lambda job: job[0])]
    assert len(phases) == 2 * SPEC.num_layers  # two steps
    for phase in phases:  # each layer's experts in id order
        ids = [int(job[2]) for job in phase]
        assert ids == sorted(set(ids)), phase
    assert {s for s in flexgen.subjects(WANT) if s.startswith("L1.E")} == {f"L1.E{e}" for e in range(8)}
    klotski = _baseline_log()
    assert klotski.of(PREFETCH) and flexgen.subjects(JOB) != klotski.subjects(JOB)


def test_the_staging_window_reads_layers_beyond_the_next_into_host_ram() -> None:
    """With a look-ahead of L layers the simulated engine stages layers l+2 .. l+L in host RAM (the
    disk-to-DRAM window) while the device takes l+1 from there; with L = 1 nothing goes to RAM ahead."""
    staged = [e for e in _baseline_log(lookahead_layers=3).of(PREFETCH) if e.tier == "host"]
    assert staged and all(e.subject.startswith("L") for e in staged)
    assert not [e for e in _baseline_log(lookahead_layers=1).of(PREFETCH) if e.tier == "host"]


def test_the_staging_window_keeps_the_drive_busy_where_ram_has_room() -> None:
    """Mixtral-8x7B on the RTX 3090 + SATA machine with 32 GiB of RAM: the drive binds. Staging the
    layer after next fills the gaps in which the device has nothing more to ask for, and reads fewer
    bytes (the window evicts only blocks needed later): decode is faster than with L = 1."""
    from klotski_tier.core.plan.hardware import machine_named
    from klotski_tier.core.plan.shapes import model_shape

    spec, machine = model_shape("Mixtral-8x7B"), machine_named("rtx3090-sata")

    def decode(lookahead: int) -> tuple[float, int]:
        config = SimConfig(spec, machine, batches=4, batch_size=16, hot_experts=2, host_memory_bytes=32 * GIB,
                           eviction="sweep", lookahead_layers=lookahead)  # fmt: skip
        result = simulate_workload(config, sequences=64, prompt_tokens=128, new_tokens=4, max_decode_steps=3)
        return result.decode_tokens_per_s, result.decode.bytes_moved[DISK_TO_HOST]

    (one, read_one), (two, read_two) = decode(1), decode(2)
    assert two > 1.05 * one, (one, two)
    assert read_two < read_one


def test_mixtral_nearly_fits_ram_and_device_and_the_drive_reads_the_rest_and_their_working_room() -> None:
    """Mixtral-8x7B (87 GiB) on the RTX 3090 + SATA machine, 64 GiB of RAM and 24 GiB of device memory
    hold nearly all of it: what neither tier can hold is under 1 GiB a decode step, and the drive reads
    that and the blocks crossing the tiers' working room (the device's streaming window of 3 experts of
    336 MiB, the host's reads in flight). The simulated engine, run at the plan's shape, reads between
    the two, closer to the plan's figure than to what nobody holds. Streaming through the device's
    window is faster there than letting a layer's experts take room at once."""
    from klotski_tier.core.plan.hardware import machine_named
    from klotski_tier.core.plan.shapes import model_shape

    spec, machine = model_shape("Mixtral-8x7B"), machine_named("rtx3090-sata")
    plan = make_plan(PlanRequest(spec, machine, sequences=64, prompt_tokens=128, new_tokens=32))
    assert plan.placement.home == "disk" and 0 < plan.unheld_bytes < GIB < plan.drive_bytes

    def decode(window: int) -> tuple[float, float]:
        placement = plan.placement
        config = SimConfig(spec, machine, batches=plan.batches, batch_size=plan.batch_size,
                           hot_experts=plan.hot_experts, eviction=placement.eviction,
                           lookahead_layers=placement.lookahead_layers, stream_window=window)  # fmt: skip
        result = simulate_workload(config, sequences=64, prompt_tokens=128, new_tokens=4, max_decode_steps=3)
        return result.decode_tokens_per_s, result.decode.bytes_moved[DISK_TO_HOST] / 3

    (windowed, read), (unwindowed, _) = decode(3), decode(0)
    assert plan.unheld_bytes < read <= plan.drive_bytes, (plan.unheld_bytes, read, plan.drive_bytes)
    assert read - plan.unheld_bytes > (plan.drive_bytes - plan.unheld_bytes) / 2
    assert windowed > unwindowed


def test_reads_and_jobs_finish_far_into_a_run() -> None:
    """A slow drive's run lasts simulated days: there, a timer cannot land closer to a job's end than a
    few ulps of the clock, and the simulator once spun forever on the remainder."""
    hardware = SimHardware(read_seconds=lambda nbytes: nbytes / 1e3, copy_seconds=lambda _: 0.0, io_threads=2)

    async def far_run() -> float:
        await asyncio.sleep(3.3e9)  # a century of virtual time
        for _ in range(20):
            await asyncio.gather(hardware.compute(0.3), hardware.read(7_000), hardware.read(1_300))
        return asyncio.get_running_loop().time()

    finished: list[float] = []
    worker = threading.Thread(target=lambda: finished.append(run_virtual(far_run())), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert finished, "the simulation did not finish"
    assert finished[0] > 3.3e9 + 20 * 7
