"""Built-in hardware (datasheet figures), this machine from its bench profile, user TOML, one-line errors."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from klotski_tier.core.bench.profile import (
    PROFILE_FILE_NAME,
    PROFILE_VERSION,
    ComputeProfile,
    DriveProfile,
    HostInfo,
    MachineProfile,
    ReadResult,
    ZstdProfile,
)
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.paths import CACHE_ENV_VAR
from klotski_tier.core.plan.hardware import (
    HARDWARE,
    JOB_OVERHEAD_S,
    hardware_to_toml,
    load_hardware_file,
    machine_named,
)
from klotski_tier.core.plan.machine import ComputeRates, Machine
from klotski_tier.core.plan.shapes import model_shape
from klotski_tier.core.plausible import Plausible, plausible_fields
from klotski_tier.core.store.files import load_model_files
from klotski_tier.core.units import GB, GIB, MAX_SIZE_BYTES, MIB
from tests.conftest import CheckpointFactory

COSTMODEL = "klotski_tier.core.plan.costmodel"
MINE = """
[hardware.My-3090]
base = "rtx3090-sata"
disk_read_gbps = 3.5
host_memory_bytes = "128GiB"
compute = { job_overhead_s = 0 }

[hardware.laptop]
source = "my laptop, measured by hand"
device = "cpu"
device_memory_bytes = "12GiB"
host_memory_bytes = 17179869184
disk_read_gbps = 2.0
zstd_decompress_gbps = 0.8
io_threads = 4
compute = { flops_per_s = 4e11, weight_bytes_per_s = "40GB", job_overhead_s = 5e-5 }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hardware.toml"
    path.write_text(text, encoding="utf-8")
    return path


def one_line_error(path: Path, *phrases: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_hardware_file(path)
    message = str(caught.value)
    assert "\n" not in message
    for phrase in (str(path), *phrases):
        assert phrase in message, f"{phrase!r} not in {message!r}"


def tiny_profile() -> MachineProfile:
    """A valid bench profile of a small CPU machine (figures made up, shapes as `bench` writes them)."""
    read = ReadResult("direct", "cold", 4 * MIB, 4, 1.8, 0.9)
    return MachineProfile(
        version=PROFILE_VERSION,
        created="2025-01-01T00:00:00+00:00",
        host=HostInfo("box", "Linux", "x86_64", 2, 8 * GIB, "3.11.9", "2.13.0", None),
        drive=DriveProfile("/tmp", 64 * MIB, 3, 2.0, read),
        reads=(read, ReadResult("buffered", "warm", 4 * MIB, 4, 6.0, 3.0)),
        zstd=ZstdProfile(3, "random bf16", 8 * MIB, 5 * MIB, 2, 1.1, 1.3, 1.0, 1.2, 2.0, 2.4),
        h2d=None,
        compute=ComputeProfile(
            "cpu", "demo", "bfloat16", 128, {1: 2e-3, 8: 3e-3, 64: 9e-3}, {1: 1e-3, 8: 4e-3, 64: 3e-2}
        ),
    )


@pytest.mark.parametrize("name", list(HARDWARE))
def test_every_built_in_loads_by_any_case_and_states_its_sources(name: str) -> None:
    machine = machine_named(name.upper())
    assert machine is HARDWARE[name] and machine.name == name
    assert machine.device == "cuda" and machine.host_to_device_gbps is not None
    assert "datasheet" in machine.source or "whitepaper" in machine.source
    assert machine.compute.job_overhead_s == JOB_OVERHEAD_S
    assert machine.host_memory_bytes > machine.device_memory_bytes


def test_built_in_figures_follow_the_datasheets() -> None:
    rtx, h800, a5000, t4 = (HARDWARE[name] for name in ("rtx3090-sata", "h800", "a5000", "t4"))
    assert rtx.device_memory_bytes == 24 * GIB and rtx.disk_read_gbps == 1.0
    assert rtx.compute.weight_bytes_per_s == pytest.approx(0.8 * 936 * GB)
    assert 0.6 * 71e12 <= rtx.compute.flops_per_s <= 0.7 * 71e12
    assert h800.compute.weight_bytes_per_s == pytest.approx(0.8 * 3350 * GB)
    assert h800.device_memory_bytes > 79 * GIB and a5000.device_memory_bytes > 23.9 * GIB
    assert t4.device_memory_bytes == 15 * GIB and "FP16" in t4.source and "no BF16" in t4.source
    links = [m.host_to_device_gbps or 0.0 for m in (t4, a5000, h800)]
    assert links == sorted(links) and links[0] < links[1] < links[2]  # PCIe 3.0 < 4.0 < 5.0


def test_an_unknown_name_lists_every_choice_in_one_line() -> None:
    with pytest.raises(ConfigError) as caught:
        machine_named("rtx4090")
    message = str(caught.value)
    assert "'rtx4090'" in message and "\n" not in message
    assert all(name in message for name in (*HARDWARE, "this", "local"))


def test_this_machine_without_a_profile_says_to_run_bench(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path))  # the default profile path is under the cache
    with pytest.raises(ConfigError, match="run `klotski-tier bench` first") as caught:
        machine_named("LOCAL")
    assert str(tmp_path / PROFILE_FILE_NAME) in str(caught.value)


@pytest.fixture
def fake_costmodel(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace the cost model's ``machine_from_profile``; the list records each call's arguments."""
    calls: list[dict[str, Any]] = []

    def machine_from_profile(profile: MachineProfile, spec: Any, **options: Any) -> Machine:
        calls.append({"profile": profile, "spec": spec, **options})
        return dataclasses.replace(HARDWARE["t4"], name=options["name"], source=options["source"])

    fake = types.ModuleType(COSTMODEL)
    fake.machine_from_profile = machine_from_profile  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, COSTMODEL, fake)
    return calls


def test_this_machine_converts_its_profile_with_the_cost_model(
    tmp_path: Path, fake_costmodel: list[dict[str, Any]]
) -> None:
    path = tmp_path / "profile.json"
    tiny_profile().save(path)
    machine = machine_named("This", path)
    assert machine.name == "this" and str(path) in machine.source
    (call,) = fake_costmodel
    assert call["profile"] == tiny_profile() and call["spec"] == model_shape("demo")  # bench timed the demo
    assert call["device_memory_bytes"] is None  # a CPU device: the cost model takes the host's memory
    machine_named("local", path, profile_spec=model_shape("olmoe-1b-7b"), device_memory_bytes=GIB)
    assert fake_costmodel[-1]["spec"] is model_shape("olmoe-1b-7b")
    assert fake_costmodel[-1]["device_memory_bytes"] == GIB


def test_this_machine_reads_the_shape_of_the_model_bench_timed(
    tmp_path: Path, fake_costmodel: list[dict[str, Any]], checkpoint_factory: CheckpointFactory
) -> None:
    model = checkpoint_factory("qwen3_moe")
    path = tmp_path / "profile.json"
    profiled = tiny_profile()
    dataclasses.replace(profiled, compute=dataclasses.replace(profiled.compute, model=str(model))).save(path)
    machine_named("this", path)
    assert fake_costmodel[-1]["spec"] == load_model_files(model).spec
    dataclasses.replace(profiled, compute=dataclasses.replace(profiled.compute, model=str(tmp_path))).save(
        path
    )
    with pytest.raises(ConfigError, match="run `klotski-tier bench` again") as caught:
        machine_named("this", path)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the profile's device is there")
def test_a_cuda_profile_without_a_gpu_is_refused(
    tmp_path: Path, fake_costmodel: list[dict[str, Any]]
) -> None:
    profiled = tiny_profile()
    path = tmp_path / "profile.json"
    dataclasses.replace(profiled, compute=dataclasses.replace(profiled.compute, device="cuda")).save(path)
    with pytest.raises(ConfigError, match="no CUDA device"):
        machine_named("this", path)
    assert not fake_costmodel


def test_this_machine_with_the_real_cost_model(tmp_path: Path) -> None:
    pytest.importorskip(COSTMODEL)
    path = tmp_path / "profile.json"
    tiny_profile().save(path)
    machine = machine_named("this", path)
    assert (machine.device, machine.host_memory_bytes, machine.disk_read_gbps) == ("cpu", 8 * GIB, 1.8)


def test_a_handwritten_file_loads_with_bases_sizes_and_a_cpu_device(tmp_path: Path) -> None:
    mine = load_hardware_file(write(tmp_path, MINE))
    assert set(mine) == {"My-3090", "laptop"}
    faster = machine_named("my-3090", user_hardware=mine)
    base = HARDWARE["rtx3090-sata"]
    assert (faster.disk_read_gbps, faster.host_memory_bytes) == (3.5, 128 * GIB)
    assert faster.compute == dataclasses.replace(base.compute, job_overhead_s=0.0)
    assert faster.device_memory_bytes == base.device_memory_bytes and "rtx3090-sata" in faster.source
    laptop = mine["laptop"]
    assert (laptop.device, laptop.host_to_device_gbps, laptop.device_memory_bytes) == ("cpu", None, 12 * GIB)
    assert laptop.compute == ComputeRates(4e11, 40e9, 5e-5) and laptop.source == "my laptop, measured by hand"
    assert machine_named("h800", user_hardware=mine) is HARDWARE["h800"]


@pytest.mark.parametrize("name", list(HARDWARE))
def test_every_built_in_round_trips_through_toml(tmp_path: Path, name: str) -> None:
    text = hardware_to_toml(HARDWARE[name], f"{name}.copy")
    assert load_hardware_file(write(tmp_path, text)) == {
        f"{name}.copy": dataclasses.replace(HARDWARE[name], name=f"{name}.copy")
    }


def test_a_cpu_machine_round_trips_with_or_without_a_copy_rate(tmp_path: Path) -> None:
    laptop = load_hardware_file(write(tmp_path, MINE))["laptop"]
    assert load_hardware_file(write(tmp_path, hardware_to_toml(laptop))) == {"laptop": laptop}
    copying = dataclasses.replace(laptop, host_to_device_gbps=4.3)  # as the cost model sees a CPU device
    assert load_hardware_file(write(tmp_path, hardware_to_toml(copying))) == {"laptop": copying}


@pytest.mark.parametrize(
    ("change", "phrases"),
    [
        (("disk_read_gbps = 2.0", "disk_speed = 2.0"), ["[hardware.laptop]", "'disk_speed'", "valid keys"]),
        (("disk_read_gbps = 2.0", "disk_read_gbps = -2.0"), ["disk_read_gbps = -2.0", "positive number"]),
        (("disk_read_gbps = 3.5", 'disk_read_gbps = "fast"'), ["[hardware.My-3090]", "'fast'"]),
        (('"12GiB"', '"12 gigs"'), ["device_memory_bytes", "'12 gigs'", "not a size"]),
        (('"12GiB"', "12.5"), ["device_memory_bytes = 12.5", "not a size"]),
        (("io_threads = 4", "io_threads = 0"), ["io_threads = 0", "at least 1"]),
        (("io_threads = 4", ""), ["lacks io_threads", "base = NAME"]),
        (('base = "rtx3090-sata"', 'base = "rtx9090"'), ["'rtx9090'", "h800"]),
        (("job_overhead_s = 0 }", "overhead = 0 }"), ["compute.overhead", "flops_per_s"]),
        (("flops_per_s = 4e11, ", ""), ["compute lacks flops_per_s"]),
        (('device = "cpu"', 'device = "tpu"'), ["device = 'tpu'", "cuda, cpu"]),
        (("io_threads = 4", "io_threads = 4\nhost_to_device_gbps = 0"), ["host_to_device_gbps = 0"]),
        (("[hardware.laptop]", "[hardware.H800]"), ["built-in machine", "rename"]),
        (("[hardware.laptop]", "[hardware.this]"), ["built-in machine"]),
        (
            (
                'compute = { flops_per_s = 4e11, weight_bytes_per_s = "40GB", job_overhead_s = 5e-5 }',
                "compute = 3",
            ),
            ["compute = 3", "not a table"],
        ),
        (("[hardware.laptop]", "[machines.laptop]"), ["[hardware.NAME]", "machines"]),
    ],
)
def test_bad_tables_are_one_line_errors(tmp_path: Path, change: tuple[str, str], phrases: list[str]) -> None:
    old, new = change
    assert old in MINE
    one_line_error(write(tmp_path, MINE.replace(old, new)), *phrases)


def test_a_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    one_line_error(tmp_path / "absent.toml", "cannot read hardware file")


def test_this_machine_takes_the_measured_contention_and_toml_keeps_it(tmp_path: Path) -> None:
    """The bench's compute-while-streaming figure becomes this machine's; a TOML copy keeps it."""
    pytest.importorskip(COSTMODEL)
    profiled = tiny_profile()
    measured = dataclasses.replace(profiled.compute, io_slowdown=0.4, io_read_gbps=1.2)
    path = tmp_path / "profile.json"
    dataclasses.replace(profiled, compute=measured).save(path)
    machine = machine_named("this", path)
    assert machine.io_compute_slowdown == 0.4
    copy = dataclasses.replace(machine, name="copy")
    assert load_hardware_file(write(tmp_path, hardware_to_toml(copy))) == {"copy": copy}


FIELD_RANGES = [*plausible_fields(Machine).items(), *plausible_fields(ComputeRates).items()]


@pytest.mark.parametrize(("key", "bounds"), FIELD_RANGES, ids=[key for key, _ in FIELD_RANGES])
def test_every_figure_beyond_its_plausible_range_is_refused_naming_it(
    tmp_path: Path, key: str, bounds: Plausible
) -> None:
    """Each numeric key of a [hardware.NAME] table is held to its range; a size past 1 EiB is not even a
    size (parse_size says so), anything else says the key, its value and the range."""
    in_compute = key in plausible_fields(ComputeRates)
    absurd = int(bounds.high) * 2 if bounds.unit == "B" or key == "io_threads" else bounds.high * 2
    setting = f"compute = {{ {key} = {absurd!r} }}" if in_compute else f"{key} = {absurd!r}"
    path = write(tmp_path, f'[hardware.mine]\nbase = "t4"\n{setting}\n')
    prefix = "compute." if in_compute else ""
    if bounds.unit == "B" and absurd > MAX_SIZE_BYTES:
        one_line_error(path, f"{key} {absurd} is more than 1 EiB")
    else:
        one_line_error(
            path,
            f"[hardware.mine] {prefix}{key} = {absurd!r}",  # then " is <shown>," where that says more
            f"not a plausible figure ({bounds.describe()}); fix the file",
        )


def test_a_device_memory_of_999_petabytes_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[hardware.mine]\nbase = "t4"\ndevice_memory_bytes = "999PB"\n')
    one_line_error(
        path, "device_memory_bytes = '999PB' is 887.29 PiB, not a plausible figure (0 B <= x <= 1.00 PiB)"
    )
