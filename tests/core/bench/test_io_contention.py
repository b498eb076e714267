"""Compute slowed while the drive streams: the bench's figure, the profile field, the machine, and its
charge in the step model and the simulator (the same charge, so the two still agree)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest

from klotski_tier.core.bench.compute import expert_jobs
from klotski_tier.core.bench.contention import DriveStreamer, measure_contention
from klotski_tier.core.bench.drive import write_test_file
from klotski_tier.core.bench.profile import MachineProfile
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.plan.costmodel import CostModel, machine_from_profile
from klotski_tier.core.plan.hardware import HARDWARE, load_hardware_file
from klotski_tier.core.plan.pipeline_model import Io, LayerWork, StepPrediction, StepShape, predict_step
from klotski_tier.core.plan.shapes import model_shape
from klotski_tier.core.units import MIB
from tests.core.plan.test_hardware import tiny_profile
from tests.core.plan.test_simulate import _config, _machine, _planned, _run

SLOWDOWN = 1.0  # compute at half speed while the drive reads
WORK = (LayerWork(hot_s=2.0, cold=3.0, cold_s=3.0, distinct_max=5),) * 3
STREAMED = Io(attn=1.0, gate=0.5, expert=0.8, embed=0.2, head=0.2, drive_share=1.0)
RESIDENT = Io(0.0, 0.0, 0.0, 0.0, 0.0, drive_share=1.0)
FROM_HOST = dataclasses.replace(STREAMED, drive_share=0.0)  # the same transfers, none from the drive
STREAM_WAIT_S = 60.0  # the streamer test gives up (and fails) after this


def _shape(slowdown: float) -> StepShape:
    return StepShape(2, 4, 8, 1.0, 0.5, 0.25, 0.1, 0.05, 0.05, io_compute_slowdown=slowdown)


def _step(slowdown: float, io: Io) -> StepPrediction:
    return predict_step(_shape(slowdown), 2, WORK, io, window=100)


# ---- the profile and the machine ---------------------------------------------------------------


def _measured(profile: MachineProfile, slowdown: float) -> MachineProfile:
    figures = {
        "io_slowdown": slowdown,
        "io_read_gbps": 1.3,
        "io_alone_s": {1: 1e-3},
        "io_streaming_s": {1: 2e-3},
    }
    return dataclasses.replace(profile, compute=dataclasses.replace(profile.compute, **figures))


def test_a_profile_of_an_older_bench_loads_as_not_measured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tiny_profile().to_json()
    for key in [key for key in data["compute"] if key.startswith("io_")]:
        del data["compute"][key]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    compute = MachineProfile.load(path).compute
    assert (compute.io_slowdown, compute.io_read_gbps, compute.io_alone_s) == (0.0, 0.0, {})
    assert not compute.io_measured
    with caplog.at_level(logging.WARNING):
        machine = machine_from_profile(MachineProfile.load(path), model_shape("demo"))
    assert machine.io_compute_slowdown == 0.0
    assert "not measured: run klotski-tier bench again" in machine.source
    assert "run klotski-tier bench again" in caplog.text


def test_a_measured_figure_round_trips_and_becomes_the_machines(tmp_path: Path) -> None:
    profile = _measured(tiny_profile(), 0.6)
    path = tmp_path / "profile.json"
    profile.save(path)
    assert MachineProfile.load(path) == profile and profile.compute.io_measured
    machine = machine_from_profile(profile, model_shape("demo"))
    assert machine.io_compute_slowdown == 0.6 and "+60%" in machine.source
    assert machine.io_compute_rate == pytest.approx(1 / 1.6)


def test_a_cpu_machine_reads_at_the_rate_the_drive_kept_beside_compute() -> None:
    profile = _measured(tiny_profile(), 0.6)
    best = profile.drive.best.gbps
    slower = dataclasses.replace(profile, compute=dataclasses.replace(profile.compute, io_read_gbps=best / 2))
    assert machine_from_profile(slower, model_shape("demo")).disk_read_gbps == best / 2
    faster = dataclasses.replace(profile, compute=dataclasses.replace(profile.compute, io_read_gbps=best * 2))
    assert machine_from_profile(faster, model_shape("demo")).disk_read_gbps == best  # never above the best
    unmeasured = dataclasses.replace(profile, compute=dataclasses.replace(profile.compute, io_read_gbps=0.0))
    assert machine_from_profile(unmeasured, model_shape("demo")).disk_read_gbps == best


def test_a_negative_figure_in_a_profile_is_refused(tmp_path: Path) -> None:
    data = _measured(tiny_profile(), 0.6).to_json()
    data["compute"]["io_slowdown"] = -0.2
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"compute\.io_slowdown must be a number >= 0"):
        MachineProfile.load(path)


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf])
def test_a_machine_refuses_a_bad_slowdown_in_one_line(value: float) -> None:
    with pytest.raises(ConfigError) as caught:
        dataclasses.replace(_machine(), io_compute_slowdown=value)
    assert "io_compute_slowdown" in str(caught.value) and "\n" not in str(caught.value)


def test_built_in_gpus_are_not_slowed_and_toml_may_set_it(tmp_path: Path) -> None:
    assert all(machine.io_compute_slowdown == 0.0 for machine in HARDWARE.values())
    path = tmp_path / "hardware.toml"
    path.write_text('[hardware.box]\nbase = "t4"\nio_compute_slowdown = 0.5\n', encoding="utf-8")
    assert load_hardware_file(path)["box"].io_compute_slowdown == 0.5
    path.write_text('[hardware.box]\nbase = "t4"\nio_compute_slowdown = -0.5\n', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_hardware_file(path)
    message = str(caught.value)
    assert "io_compute_slowdown = -0.5" in message and "at least 0" in message and "\n" not in message


def test_the_drive_share_of_a_transfer() -> None:
    cost = CostModel(model_shape("demo"), _machine(disk_gbps=1.0, link_gbps=5.0))
    expert = cost.sizes.expert
    assert cost.transfer(expert, "disk").drive_share == 1.0  # the drive is the slowest stage
    assert cost.transfer(expert, "host").drive_share == 0.0  # from RAM: only the copy
    assert cost.transfer(expert, "device").drive_share == 0.0
    fast = CostModel(model_shape("demo"), _machine(disk_gbps=10.0, link_gbps=5.0))
    assert fast.transfer(expert, "disk").drive_share == pytest.approx(0.5)  # the copy sets the pace


# ---- the step model ----------------------------------------------------------------------------


def test_a_step_that_reads_from_the_drive_is_slower() -> None:
    free, slowed = _step(0.0, STREAMED), _step(SLOWDOWN, STREAMED)
    assert slowed.step_s > free.step_s and slowed.compute_s > free.compute_s
    assert slowed.step_s == pytest.approx(slowed.compute_s + slowed.bubble_s)
    extra = SLOWDOWN / (1 + SLOWDOWN)  # of the drive's busy time, at most
    assert slowed.compute_s - free.compute_s <= extra * slowed.io_busy_s + 1e-9


@pytest.mark.parametrize("io", [RESIDENT, FROM_HOST], ids=["resident", "host"])
def test_nothing_changes_when_nothing_is_read_from_the_drive(io: Io) -> None:
    assert _step(SLOWDOWN, io) == _step(0.0, io)


def test_the_step_grows_with_the_slowdown() -> None:
    steps = [_step(c, STREAMED).step_s for c in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert steps == sorted(steps) and steps[-1] > steps[0]
    shares = [predict_step(_shape(1.0), 2, WORK, dataclasses.replace(STREAMED, drive_share=f), 100).step_s
              for f in (0.0, 0.5, 1.0)]  # fmt: skip
    assert shares == sorted(shares) and shares[-1] > shares[0]


def test_compute_beside_a_read_takes_the_charge_exactly() -> None:
    """One layer whose only load is the gate (2 s, issued at 0) read while its attention (3 s) runs:
    the attention needs 2 s * c/(1+c) more."""
    shape = StepShape(1, 1, 1, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, io_compute_slowdown=SLOWDOWN)
    work = (LayerWork(hot_s=0.0, cold=0.0, cold_s=0.0, distinct_max=0),)
    io = Io(attn=0.0, gate=2.0, expert=0.0, embed=0.0, head=0.0, drive_share=1.0)
    first = predict_step(dataclasses.replace(shape, io_compute_slowdown=0.0), 0, work, io, window=10)
    slowed = predict_step(shape, 0, work, io, window=10)
    assert slowed.compute_s - first.compute_s == pytest.approx(2.0 * SLOWDOWN / (1 + SLOWDOWN))


# ---- the simulator, and its agreement with the planner ------------------------------------------


def _streaming(slowdown: float) -> Any:
    """The demo's widths streaming from a 4 GB/s drive through a 96 MiB device, 4 batches: compute
    and reads overlap, with next to no bubbles."""
    machine = dataclasses.replace(_machine(disk_gbps=4.0), io_compute_slowdown=slowdown)
    return _config(machine=machine, device_memory_bytes=96 * MIB, host_memory_bytes=48 * MIB, batches=4)


def test_the_simulator_charges_as_the_step_model_and_they_agree() -> None:
    sequences = 16
    free, slowed = (_streaming(c) for c in (0.0, SLOWDOWN))
    simulated = [_run(config, sequences)[0] for config in (free, slowed)]
    planned = [_planned(config, sequences) for config in (free, slowed)]
    assert simulated[1] < 0.95 * simulated[0] and planned[1] < 0.95 * planned[0]  # both charge it
    assert simulated[1] == pytest.approx(planned[1], rel=0.25)  # as test_simulate's streaming case
    assert simulated[1] / simulated[0] == pytest.approx(planned[1] / planned[0], abs=0.1)


def test_the_simulator_is_unchanged_without_drive_reads() -> None:
    preloaded = {"device_memory_bytes": 96 * MIB, "host_preload": True}
    free = _config(**preloaded)
    slowed = _config(machine=dataclasses.replace(_machine(), io_compute_slowdown=SLOWDOWN), **preloaded)
    assert _run(free) == _run(slowed)


# ---- the bench's measurement -------------------------------------------------------------------


def test_the_measurement_gives_a_finite_figure_on_a_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "stream.bin"
    write_test_file(path, 4 * MIB)
    jobs = expert_jobs(None, (1, 2))
    result = measure_contention(path, jobs, block_bytes=1 * MIB, threads=2, rounds=2)
    assert math.isfinite(result.slowdown) and result.slowdown >= 0
    assert math.isfinite(result.read_gbps) and result.read_gbps > 0
    assert set(result.alone_s) == set(result.streaming_s) == {1, 2}
    assert all(seconds > 0 for seconds in (*result.alone_s.values(), *result.streaming_s.values()))


def test_the_streamer_reads_round_and_round_and_stops(tmp_path: Path) -> None:
    path = tmp_path / "stream.bin"
    write_test_file(path, 2 * MIB)
    deadline = time.monotonic() + STREAM_WAIT_S
    with DriveStreamer(path, 1 * MIB, threads=1) as streamer:
        assert streamer.bytes_read > 0  # entering waits for the first block
        while streamer.bytes_read <= 4 * MIB and time.monotonic() < deadline:  # past the end: over again
            pass
    read = streamer.bytes_read
    assert read > 4 * MIB and streamer.bytes_read == read  # stopped: nothing more is read


def test_a_limited_stream_reads_its_bytes_in_whole_blocks_and_stops_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "stream.bin"
    write_test_file(path, 2 * MIB)
    started = time.perf_counter()
    with DriveStreamer(path, 1 * MIB, threads=2, checksum=False, limit_bytes=5 * MIB + 1) as streamer:
        streamer.join()
        assert streamer.bytes_read == 6 * MIB  # the limit rounded up to whole blocks, the file over again
        assert streamer.finished_s is not None and started < streamer.finished_s <= time.perf_counter()
    assert streamer.bytes_read == 6 * MIB
    with DriveStreamer(path, 1 * MIB, threads=1) as unlimited, pytest.raises(AssertionError):
        unlimited.join()  # would never return
