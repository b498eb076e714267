"""The cost model: block sizes against real layouts, job and transfer times, fitting to a profile."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from klotski_tier.core.bench.profile import (
    ComputeProfile,
    DriveProfile,
    H2DProfile,
    HostInfo,
    MachineProfile,
    ReadResult,
    ZstdProfile,
)
from klotski_tier.core.bench.suite import demo_spec
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.blocks import BlockKind
from klotski_tier.core.model.layouts import largest_block_bytes, total_block_bytes
from klotski_tier.core.plan.costmodel import (
    CPU_COPY_GBPS,
    PIPELINE_JOB_GAP_S,
    RUN_UNIT_BYTES,
    CostModel,
    block_sizes,
    fit_roofline,
    machine_from_profile,
)
from klotski_tier.core.plan.machine import ComputeRates, Machine
from klotski_tier.core.runtime.sequences import (
    GenSequence,
    activation_bytes,
    group_activation_bytes,
    kv_cache_bytes,
)
from klotski_tier.core.store.files import load_model_files
from tests.checkpoints import FAMILIES, make_checkpoint

RATES = ComputeRates(
    flops_per_s=2e11,
    weight_bytes_per_s=5e10,
    job_overhead_s=2e-4,
    attention_overhead_s=3e-4,
    sequence_overhead_s=5e-5,
)
GIB = 2**30


def _machine(rates: ComputeRates = RATES) -> Machine:
    return Machine("test", "test", "cuda", 8 * GIB, 32 * GIB, 2.0, 20.0, rates, 1.0, 4)


# ---- block sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fused", [False, True])
def test_block_sizes_match_the_engine_layouts(tmp_path: Path, family: str, fused: bool) -> None:
    """The cost model's sizes are the engine's within two 4 KiB units a block: where a checkpoint puts
    other tensors between a block's, or one tensor apart, the engine's image of the file runs differs."""
    directory = make_checkpoint(tmp_path / family, family, fused=fused, dtype=torch.bfloat16)
    files = load_model_files(directory)
    sizes = block_sizes(files.spec)
    expected = {BlockKind.EMBED: sizes.embed, BlockKind.HEAD: sizes.head, BlockKind.ATTN: sizes.attn}
    expected |= {BlockKind.GATE: sizes.gate, BlockKind.EXPERT: sizes.expert}
    slack = 2 * RUN_UNIT_BYTES
    for block, layout in files.layouts.items():
        assert abs(layout.nbytes - expected[block.kind]) <= slack, f"{family} {block}"
    assert abs(sizes.total - total_block_bytes(files.layouts)) <= slack * len(files.layouts)
    assert abs(sizes.largest - largest_block_bytes(files.layouts)) <= slack


def test_demo_expert_block_is_its_three_matrices() -> None:
    spec = demo_spec()
    assert block_sizes(spec).expert == spec.expert_bytes + RUN_UNIT_BYTES  # 5.25 MiB, one run, whole units


# ---- jobs, transfers and memory ------------------------------------------------------------------


def test_expert_time_follows_the_roofline_and_skips_idle_experts() -> None:
    cost = CostModel(demo_spec(), _machine())
    spec, sizes = cost.spec, cost.sizes
    assert cost.expert_s(0) == 0.0
    weights_s = RATES.job_overhead_s + sizes.expert / RATES.weight_bytes_per_s
    assert cost.expert_s(1) == pytest.approx(weights_s)  # one token: bound by reading the weights
    tokens = 4096
    flops_s = RATES.job_overhead_s + 6 * spec.hidden_size * spec.expert_intermediate_size * tokens / 2e11
    assert cost.expert_s(tokens) == pytest.approx(flops_s)  # many: bound by arithmetic
    times = [cost.expert_s(t) for t in (1, 16, 64, 256, 1024)]
    assert times == sorted(times) and times[-1] > 10 * times[0]


def test_attention_pays_per_job_and_per_sequence() -> None:
    cost = CostModel(demo_spec(), _machine())
    one, eight = cost.attention_s(1, 1, 128), cost.attention_s(8, 1, 128)
    assert eight - one >= 7 * RATES.sequence_overhead_s
    assert one >= RATES.job_overhead_s + RATES.attention_overhead_s + RATES.sequence_overhead_s
    assert cost.attention_s(8, 1, 2048) > eight  # a longer context reads more keys


def test_transfers_from_each_home() -> None:
    cost = CostModel(demo_spec(), _machine())
    nbytes = cost.sizes.expert
    assert cost.transfer(nbytes, "device").bottleneck_s == 0.0
    host = cost.transfer(nbytes, "host")
    assert host.copy_s == pytest.approx(nbytes / 20e9) and host.disk_s == 0.0
    disk = cost.transfer(nbytes, "disk")
    assert disk.disk_s == pytest.approx(nbytes / 2e9) and disk.bottleneck_s == disk.disk_s
    packed = cost.transfer(nbytes, "disk", compression_ratio=2.0)
    assert packed.disk_s == pytest.approx(disk.disk_s / 2, rel=1e-6)
    assert packed.decode_s == pytest.approx(nbytes / 1e9)  # one thread decodes at 1 GB/s ...
    assert packed.bottleneck_s == pytest.approx(max(packed.disk_s, packed.decode_s / 4))  # ... four at once
    with pytest.raises(ConfigError, match="unknown block home"):
        cost.transfer(nbytes, "tape")


def test_kv_cache_and_activations_as_the_engine_counts_them() -> None:
    spec = demo_spec()
    cost = CostModel(spec, _machine())
    batch = [GenSequence(i, [1] * 17, 9) for i in range(3)]
    assert cost.kv_cache_bytes(3, 17, 9) == kv_cache_bytes(batch, spec)
    assert cost.activation_bytes(3, 17) == activation_bytes(batch, spec)
    held, at_once = activation_bytes(batch, spec)
    assert cost.fixed_device_bytes(4, 3, 17, 9) == 4 * (kv_cache_bytes(batch, spec) + held) + at_once
    assert group_activation_bytes([batch] * 4, spec) == 4 * held + at_once
    slot = 3 * (17 + 9) * spec.kv_bytes_per_token() // spec.num_layers  # one layer of one batch
    assert cost.fixed_device_bytes(4, 3, 17, 9, kv_home="host") == 2 * slot + 4 * held + at_once


# ---- fitting -------------------------------------------------------------------------------------


def test_fit_roofline_recovers_known_rates() -> None:
    truth = ComputeRates(flops_per_s=3e10, weight_bytes_per_s=1.2e10, job_overhead_s=1.5e-4)
    flops = np.array([1, 4, 16, 64, 256], dtype=np.float64) * 5.5e6  # an expert of 5.5 MFLOP per token
    weights = np.full_like(flops, 5.5e6)
    seconds = np.array([truth.seconds(f, w) for f, w in zip(flops, weights, strict=True)])
    fitted = fit_roofline(flops, weights, seconds)
    assert fitted.flops_per_s == pytest.approx(truth.flops_per_s, rel=0.02)
    assert fitted.weight_bytes_per_s == pytest.approx(truth.weight_bytes_per_s, rel=0.05)
    assert fitted.job_overhead_s == pytest.approx(truth.job_overhead_s, rel=0.05)


def _profile(machine: Machine, device: str, tokens: tuple[int, ...]) -> MachineProfile:
    """A profile whose compute figures are what ``machine`` predicts for the demo (no dispatch)."""
    cost = CostModel(demo_spec(), machine)
    best = ReadResult("direct", "cold", 16 << 20, 8, 3.1, 0.9)
    h2d = H2DProfile("GPU", 1 << 26, 24.0, 11.0) if device == "cuda" else None
    return MachineProfile(
        version=1,
        created="2026-01-01T00:00:00+00:00",
        host=HostInfo("box", "Linux", "x86_64", 16, 64 * GIB, "3.11", "2.13", None),
        drive=DriveProfile("/data", 1 << 30, 3, 3.4, best),
        reads=(best,),
        zstd=ZstdProfile(1, "random bf16", 1 << 24, 5505024, 16, 1.3, 1.46, 0.6, 0.74, 4.0, 4.5),
        h2d=h2d,
        compute=ComputeProfile(
            device,
            "demo",
            "bfloat16",
            256,
            {t: cost.expert_s(t) for t in tokens},
            {t: cost.attention_s(t, 1, 256) for t in tokens},
        ),
    )


TRUTH = ComputeRates(2e10, 1.5e10, 1e-4, attention_overhead_s=6e-4, sequence_overhead_s=2e-4)


def test_machine_from_profile_recovers_synthetic_rates() -> None:
    machine = machine_from_profile(_profile(_machine(TRUTH), "cpu", (1, 8, 32, 128)), demo_spec())
    fitted = machine.compute
    gap = PIPELINE_JOB_GAP_S["cpu"]  # the bench's figures hold the hand-off, not the pipeline's own gap
    assert fitted.job_overhead_s - gap == pytest.approx(TRUTH.job_overhead_s, rel=0.05)
    assert fitted.flops_per_s == pytest.approx(TRUTH.flops_per_s, rel=0.05)
    assert fitted.weight_bytes_per_s == pytest.approx(TRUTH.weight_bytes_per_s, rel=0.05)
    assert fitted.attention_overhead_s == pytest.approx(TRUTH.attention_overhead_s, rel=0.05)
    assert fitted.sequence_overhead_s == pytest.approx(TRUTH.sequence_overhead_s, rel=0.05)
    assert (machine.device, machine.host_to_device_gbps, machine.io_threads) == ("cpu", CPU_COPY_GBPS, 8)
    assert machine.disk_read_gbps == 3.1 and machine.zstd_decompress_gbps == 0.6
    assert machine.device_memory_bytes == machine.host_memory_bytes == 64 * GIB


def test_two_token_counts_fit_a_curve_through_both() -> None:
    """Two points cannot tell the three rates apart; the fit still passes through both (the quick bench)."""
    machine = machine_from_profile(_profile(_machine(TRUTH), "cpu", (1, 32)), demo_spec())
    cost, reference = CostModel(demo_spec(), machine), CostModel(demo_spec(), _machine(TRUTH))
    gap = PIPELINE_JOB_GAP_S["cpu"]
    for tokens in (1, 32):
        assert cost.expert_s(tokens) - gap == pytest.approx(reference.expert_s(tokens), rel=1e-3)
        assert cost.attention_s(tokens, 1, 256) - gap == pytest.approx(
            reference.attention_s(tokens, 1, 256), rel=1e-3
        )
    for tokens in (2, 8, 16):
        assert cost.expert_s(tokens) - gap == pytest.approx(reference.expert_s(tokens), rel=0.25)


def test_a_measured_hand_off_is_the_job_overhead() -> None:
    """A profile with ``expert_s[0]`` (the hand-off alone) pins the fit's overhead to it."""
    profile = _profile(_machine(TRUTH), "cpu", (1, 8, 32, 128))
    compute = dataclasses.replace(profile.compute, expert_s={**profile.compute.expert_s, 0: 5e-5})
    machine = machine_from_profile(dataclasses.replace(profile, compute=compute), demo_spec())
    assert machine.compute.job_overhead_s == pytest.approx(5e-5 + PIPELINE_JOB_GAP_S["cpu"])


def test_machine_from_a_cuda_profile_needs_the_gpu_memory() -> None:
    profile = _profile(_machine(), "cuda", (1, 32))
    with pytest.raises(ConfigError, match="device_memory_bytes"):
        machine_from_profile(profile, demo_spec())
    machine = machine_from_profile(profile, demo_spec(), device_memory_bytes=24 * GIB)
    assert machine.device == "cuda" and machine.host_to_device_gbps == 24.0
    assert machine.device_memory_bytes == 24 * GIB
