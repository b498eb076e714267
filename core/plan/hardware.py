"""Machines the planner and the simulator can study: built-in hardware, user TOML, and this machine.

Each built-in :class:`Machine` names, in its ``source``, the datasheets its figures come from and
what was assumed on top of them. The rules, applied the same way to every entry:

- compute: sustained dense bf16 matmul rate = :data:`SUSTAINED_TENSOR_FRACTION` of the datasheet's
  dense tensor peak (large GEMMs in cuBLAS reach 60-70 % of it); weights stream from device memory
  at :data:`WEIGHT_STREAM_FRACTION` of its rated bandwidth; a compute job costs
  :data:`JOB_OVERHEAD_S` (about three kernel launches: one expert is gate/up, activation, down);
- host-to-device: effective pinned-copy rates of a x16 link (about 80 % of its raw rate);
- disk: the engine's cold read rate from the drive, below the drive's rated sequential read;
- zstd: :data:`ZSTD_GBPS_PER_THREAD` per decoding thread, one thread per io_threads;
- decode attention on the host's cores (``host_attention_gbps``): :data:`HOST_ATTENTION_FRACTION` of the
  host's rated DRAM bandwidth (the attention reads each cached key and value once; FlexGen and
  MoE-Lightning find CPU attention memory-bound);
- I/O contention: ``io_compute_slowdown`` = :data:`GPU_IO_COMPUTE_SLOWDOWN` (0). A GPU computes in its
  own memory, and the drive's reads land in host RAM, so streaming does not slow its kernels (on a
  CPU device it does: ``klotski-tier bench`` measures it for this machine, a user's file may set it).

``this`` (or ``local``) is the machine ``klotski-tier bench`` measured: its profile, converted by
the cost model. A user's hardware file holds ``[hardware.NAME]`` tables with the :class:`Machine`
fields (sizes may be strings like ``"24GiB"``, ``compute`` an inline table), optionally starting
from a built-in (``base = "rtx3090-sata"``) and changing a few; :func:`hardware_to_toml` writes one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from klotski_tier.core.bench.profile import MachineProfile, default_profile_path, profile_if_present
from klotski_tier.core.errors import CheckpointError, ConfigError
from klotski_tier.core.model.checkpoint import Checkpoint
from klotski_tier.core.model.families import parse_spec
from klotski_tier.core.model.layouts import weight_dtype
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.plan.machine import ComputeRates, Machine
from klotski_tier.core.plan.shapes import model_shape, read_toml_tables, toml_table
from klotski_tier.core.plausible import plausible_fields
from klotski_tier.core.units import GB, GIB, MIB, parse_size

logger = logging.getLogger(__name__)

TFLOPS = 1e12  # flops per second in one datasheet TFLOPS
SUSTAINED_TENSOR_FRACTION = 0.65  # of the dense tensor peak that large bf16 GEMMs sustain
WEIGHT_STREAM_FRACTION = 0.8  # of the rated memory bandwidth that a weight-bound matmul reaches
JOB_OVERHEAD_S = 15e-6  # one compute job: ~3 kernel launches of ~5 us
ZSTD_GBPS_PER_THREAD = 1.0  # zstd decoding, output bytes per second per thread
PCIE3_X16_GBPS = 12.0  # pinned copies over PCIe 3.0 x16 (15.75 GB/s raw)
PCIE4_X16_GBPS = 25.0  # pinned copies over PCIe 4.0 x16 (31.5 GB/s raw)
PCIE5_X16_GBPS = 50.0  # pinned copies over PCIe 5.0 x16 (63 GB/s raw)
HOST_ATTENTION_FRACTION = 0.5  # of the host's rated DRAM bandwidth that CPU decode attention sustains
GPU_IO_COMPUTE_SLOWDOWN = 0.0  # a GPU computes in its own memory: drive reads (into host RAM) leave it be
LOCAL_NAMES = ("this", "local")  # names of the machine `klotski-tier bench` measured
DEVICES = ("cuda", "cpu")  # Machine.device values
DEMO_PROFILE_MODEL = "demo"  # the profile's compute.model when bench timed the demo's shape


def _gpu_compute(
    dense_tensor_tflops: float, memory_gbps: float, fraction: float = SUSTAINED_TENSOR_FRACTION
) -> ComputeRates:
    """Compute rates from a datasheet's dense tensor peak and memory bandwidth (see the module docstring)."""
    return ComputeRates(
        flops_per_s=float(round(fraction * dense_tensor_tflops * TFLOPS)),
        weight_bytes_per_s=float(round(WEIGHT_STREAM_FRACTION * memory_gbps * GB)),
        job_overhead_s=JOB_OVERHEAD_S,
    )


_RTX3090 = Machine(
    name="rtx3090-sata",
    source=(
        "NVIDIA GeForce RTX 3090 (GA102 whitepaper: 71 TFLOPS dense BF16 tensor with FP32 accumulate, "
        "936 GB/s GDDR6X, 24576 MiB) on PCIe 4.0 x16; a SATA-class SSD read at 1 GB/s; 64 GiB dual-channel "
        "DDR4-3200 host RAM (51.2 GB/s) and 8 I/O threads assumed (a desktop)"
    ),
    device="cuda",
    device_memory_bytes=24576 * MIB,
    host_memory_bytes=64 * GIB,
    disk_read_gbps=1.0,
    host_to_device_gbps=PCIE4_X16_GBPS,
    compute=_gpu_compute(71.0, 936.0),
    zstd_decompress_gbps=ZSTD_GBPS_PER_THREAD,
    io_threads=8,
    io_compute_slowdown=GPU_IO_COMPUTE_SLOWDOWN,
    host_attention_gbps=HOST_ATTENTION_FRACTION * 51.2,  # dual-channel DDR4-3200
)
_H800 = Machine(
    name="h800",
    source=(
        "NVIDIA H800 SXM5 (datasheet: 989 TFLOPS dense BF16, 3.35 TB/s HBM3, 80 GB = 81559 MiB) on PCIe 5.0 "
        "x16; 1 TiB host RAM (a server, enough to hold any built-in shape; 8 channels of DDR5-4800 a "
        "socket, 307.2 GB/s), NVMe PCIe 4.0 data drive read at "
        "6 GB/s, 16 I/O threads assumed"
    ),
    device="cuda",
    device_memory_bytes=81559 * MIB,
    host_memory_bytes=1024 * GIB,
    disk_read_gbps=6.0,
    host_to_device_gbps=PCIE5_X16_GBPS,
    compute=_gpu_compute(989.0, 3350.0),
    zstd_decompress_gbps=ZSTD_GBPS_PER_THREAD,
    io_threads=16,
    io_compute_slowdown=GPU_IO_COMPUTE_SLOWDOWN,
    host_attention_gbps=HOST_ATTENTION_FRACTION * 307.2,  # one socket's 8 channels of DDR5-4800
)
_A5000 = Machine(
    name="a5000",
    source=(
        "NVIDIA RTX A5000 (datasheet: 222.2 TFLOPS sparse = 111.1 dense BF16 tensor, 768 GB/s GDDR6, 24 GB "
        "= 24564 MiB) on PCIe 4.0 x16; 128 GiB quad-channel DDR4-3200 host RAM (102.4 GB/s), NVMe PCIe 4.0 "
        "drive read at 5 GB/s and 8 I/O "
        "threads assumed (a workstation)"
    ),
    device="cuda",
    device_memory_bytes=24564 * MIB,
    host_memory_bytes=128 * GIB,
    disk_read_gbps=5.0,
    host_to_device_gbps=PCIE4_X16_GBPS,
    compute=_gpu_compute(111.1, 768.0),
    zstd_decompress_gbps=ZSTD_GBPS_PER_THREAD,
    io_threads=8,
    io_compute_slowdown=GPU_IO_COMPUTE_SLOWDOWN,
    host_attention_gbps=HOST_ATTENTION_FRACTION * 102.4,  # quad-channel DDR4-3200
)
T4_SUSTAINED_FRACTION = 0.45  # the T4's 70 W cap holds its clocks well below boost under GEMM load
_T4 = Machine(
    name="t4",
    source=(
        "NVIDIA T4 (datasheet: 65 TFLOPS FP16 tensor, 320 GB/s GDDR6, 16 GB = 15360 MiB) on PCIe 3.0 x16. "
        "Turing has no BF16 tensor cores: the FP16 rate stands in (a bf16 model would run in fp16), at 45 % "
        "of peak for the 70 W power cap; a cloud VM (8 vCPUs, 32 GiB RAM with about 20 GB/s of memory "
        "bandwidth, local NVMe read at 1.5 GB/s) "
        "assumed"
    ),
    device="cuda",
    device_memory_bytes=15360 * MIB,
    host_memory_bytes=32 * GIB,
    disk_read_gbps=1.5,
    host_to_device_gbps=PCIE3_X16_GBPS,
    compute=_gpu_compute(65.0, 320.0, fraction=T4_SUSTAINED_FRACTION),
    zstd_decompress_gbps=ZSTD_GBPS_PER_THREAD,
    io_threads=8,
    io_compute_slowdown=GPU_IO_COMPUTE_SLOWDOWN,
    host_attention_gbps=HOST_ATTENTION_FRACTION * 20.0,  # a cloud VM's share of its host's memory bandwidth
)

UNMEASURED_DISK_GBPS = 1.0  # a SATA-class SSD, or a busy NVMe drive: slower than most drives
UNMEASURED_CPU = ComputeRates(  # a few cores running bf16 matmuls: figures of a 2-core x86 VM (bench)
    flops_per_s=60e9,
    weight_bytes_per_s=12e9,
    job_overhead_s=100e-6,
    attention_overhead_s=300e-6,
    sequence_overhead_s=100e-6,
)
UNMEASURED_CPU_IO_SLOWDOWN = 0.5  # streaming into host memory slows a CPU device's compute


def unmeasured_machine(device: str, device_memory_bytes: int, host_memory_bytes: int) -> Machine:
    """This machine before ``klotski-tier bench`` measured it: conservative figures for a first run.

    The drive is taken as slow (:data:`UNMEASURED_DISK_GBPS`) and compute as a modest CPU's or a T4's,
    so a plan errs toward what is safe when the weights stream: a batch group as large as memory and
    the prompts allow (each load then serves more tokens) and ``sweep`` eviction (what the device keeps
    survives the layer cycle). The memory figures are the run's budgets.
    """
    from klotski_tier.core.plan.costmodel import CPU_COPY_GBPS  # the planner's; imported when needed

    cpu = device == "cpu"
    return Machine(
        name="this (not measured)",
        source=f"conservative defaults: a drive read at {UNMEASURED_DISK_GBPS:g} GB/s, "
        + ("a 2-core CPU's compute" if cpu else "a T4's compute on PCIe 3.0"),
        device="cpu" if cpu else "cuda",
        device_memory_bytes=device_memory_bytes,
        host_memory_bytes=host_memory_bytes,
        disk_read_gbps=UNMEASURED_DISK_GBPS,
        host_to_device_gbps=CPU_COPY_GBPS if cpu else PCIE3_X16_GBPS,
        compute=UNMEASURED_CPU if cpu else _T4.compute,
        zstd_decompress_gbps=ZSTD_GBPS_PER_THREAD,
        io_threads=4,
        io_compute_slowdown=UNMEASURED_CPU_IO_SLOWDOWN if cpu else GPU_IO_COMPUTE_SLOWDOWN,
    )


HARDWARE: Mapping[str, Machine] = {machine.name: machine for machine in (_RTX3090, _H800, _A5000, _T4)}
"""Built-in machines by name; look them up with :func:`machine_named` (any case)."""


def machine_named(
    name: str,
    profile_path: Path | None = None,
    *,
    user_hardware: Mapping[str, Machine] | None = None,
    profile_spec: ModelSpec | None = None,
    device_memory_bytes: int | None = None,
) -> Machine:
    """The machine ``name`` (any case): one of ``user_hardware``, a built-in, or this machine.

    ``this`` / ``local`` is :func:`local_machine` (``profile_path``, ``profile_spec`` and
    ``device_memory_bytes`` are for it).
    """
    key = name.strip().lower()
    if key in LOCAL_NAMES:
        return local_machine(profile_path, profile_spec=profile_spec, device_memory_bytes=device_memory_bytes)
    user = {user_name.lower(): machine for user_name, machine in (user_hardware or {}).items()}
    found = user.get(key) or HARDWARE.get(key)
    if found is None:
        from_file = f"; from the hardware file: {', '.join(user_hardware or {})}" if user else ""
        raise ConfigError(
            f"unknown hardware {name!r}; built-in: {', '.join(HARDWARE)}, {' / '.join(LOCAL_NAMES)} "
            f"(this machine, from `klotski-tier bench`){from_file}"
        )
    return found


def local_machine(
    profile_path: Path | None = None,
    *,
    profile: MachineProfile | None = None,
    profile_spec: ModelSpec | None = None,
    device_memory_bytes: int | None = None,
) -> Machine:
    """This machine, from its ``klotski-tier bench`` profile (default: where ``bench`` writes it).

    ``profile`` is that profile already loaded from ``profile_path`` (read from it otherwise).
    ``profile_spec`` is the shape of the model the profile timed: by default the demo's when it
    timed the demo, else read from the model directory it names. ``device_memory_bytes`` defaults
    to this GPU's memory (a CUDA profile does not record it) or, on a CPU device, the host's.
    """
    path = profile_path if profile_path is not None else default_profile_path()
    if profile is None:
        profile = profile_if_present(path)
    if profile is None:
        raise ConfigError(
            f"no machine profile at {path}; run `klotski-tier bench` first to measure this machine"
        )
    from klotski_tier.core.plan.costmodel import machine_from_profile  # the planner's; imported when needed

    machine: Machine = machine_from_profile(
        profile,
        profile_spec if profile_spec is not None else _profiled_spec(profile, path),
        device_memory_bytes=device_memory_bytes if device_memory_bytes is not None else _gpu_memory(profile),
        name=LOCAL_NAMES[0],
        source=f"klotski-tier bench profile {path}",
    )
    logger.debug("this machine from %s: %s", path, machine)
    return machine


def _profiled_spec(profile: MachineProfile, path: Path) -> ModelSpec:
    """The shape of the model the profile's compute figures were measured on."""
    if profile.compute.model == DEMO_PROFILE_MODEL:
        return model_shape("demo")
    try:
        checkpoint = Checkpoint.open(profile.compute.model)
        return parse_spec(checkpoint.config, weight_dtype(checkpoint))
    except CheckpointError as exc:
        raise ConfigError(
            f"machine profile {path} timed the model {profile.compute.model}, which cannot be read ({exc}); "
            "run `klotski-tier bench` again"
        ) from exc


def _gpu_memory(profile: MachineProfile) -> int | None:
    """This GPU's memory for a CUDA profile (None on a CPU device: the cost model takes the host's)."""
    if profile.compute.device == "cpu":
        return None
    if not torch.cuda.is_available():
        raise ConfigError(
            f"the machine profile timed a {profile.compute.device} device but torch sees no CUDA device now; "
            "run `klotski-tier bench` again here"
        )
    return int(torch.cuda.get_device_properties(0).total_memory)


# --- user hardware from TOML -----------------------------------------------------------------

_SIZE_KEYS = ("device_memory_bytes", "host_memory_bytes")
_RATE_KEYS = ("disk_read_gbps", "host_to_device_gbps", "zstd_decompress_gbps", "host_attention_gbps")
_RATIO_KEYS = ("io_compute_slowdown",)  # numbers of at least 0
_COMPUTE_KEYS = tuple(field.name for field in dataclasses.fields(ComputeRates))
_COMPUTE_REQUIRED = tuple(
    f.name for f in dataclasses.fields(ComputeRates) if f.default is dataclasses.MISSING
)
HARDWARE_KEYS: tuple[str, ...] = (
    "base",
    "source",
    "device",
    *_SIZE_KEYS,
    *_RATE_KEYS,
    "compute",
    "io_threads",
    *_RATIO_KEYS,
)
"""Keys a ``[hardware.NAME]`` table may hold; ``compute`` is a table of :data:`_COMPUTE_KEYS`."""


def load_hardware_file(path: Path | str) -> dict[str, Machine]:
    """The machines of the ``[hardware.NAME]`` tables of the TOML file at ``path``, by name."""
    machines: dict[str, Machine] = {}
    for name, table in read_toml_tables(Path(path), "hardware", "hardware file").items():
        where = f"{path}: [hardware.{name}]"
        if name.lower() in HARDWARE or name.lower() in LOCAL_NAMES:
            raise ConfigError(f"{where} has the name of a built-in machine; rename it")
        fields = _machine_fields(table, where)
        source = fields.pop("source", None) or where + (
            f", based on {table['base']}" if "base" in table else ""
        )
        try:
            machines[name] = Machine(name=name, source=source, **fields)
        except ConfigError as exc:  # Machine's own checks (device, rates)
            raise ConfigError(f"{path}: {exc}") from exc
    return machines


def _machine_fields(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Machine fields (but ``name``) of a ``[hardware.NAME]`` table, over its base machine's."""
    for key in table:
        if key not in HARDWARE_KEYS:
            raise ConfigError(f"{where} has unknown key {key!r}; valid keys: {', '.join(HARDWARE_KEYS)}")
    base = _base_fields(table, where)
    fields = base | {
        key: _read(key, value, where) for key, value in table.items() if key not in ("base", "compute")
    }
    fields["compute"] = _compute(table.get("compute", {}), base.get("compute"), where)
    if fields.get("device") == "cpu" and "host_to_device_gbps" not in table:
        fields["host_to_device_gbps"] = None  # the device is the host: no link to cross
    required = [
        field.name
        for field in dataclasses.fields(Machine)
        if field.name not in ("name", "source") and field.default is dataclasses.MISSING
    ]
    missing = [key for key in required if key not in fields]
    if missing:
        raise ConfigError(
            f"{where} lacks {', '.join(missing)}; add them, or start from a built-in: base = NAME"
        )
    return fields


def _base_fields(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The fields of the built-in machine named by ``base`` (but its name and source), or none."""
    if "base" not in table:
        return {}
    base = HARDWARE.get(str(table["base"]).lower())
    if base is None:
        raise ConfigError(
            f"{where} base = {table['base']!r} is not a built-in machine: {', '.join(HARDWARE)}"
        )
    fields = {field.name: getattr(base, field.name) for field in dataclasses.fields(Machine)}
    return {key: value for key, value in fields.items() if key not in ("name", "source")}


def _read(key: str, value: Any, where: str) -> Any:
    """``value`` of ``key`` checked and converted (sizes to bytes), a number within its plausible range."""
    converted = _convert(key, value, where)
    bounds = plausible_fields(Machine).get(key)
    if bounds is not None:
        bounds.check(converted, f"{where} {key} = {value!r}", "fix the file")
    return converted


def _convert(key: str, value: Any, where: str) -> Any:
    if key in _SIZE_KEYS:
        return _size(key, value, where)
    if key in _RATE_KEYS:
        return _number(key, value, where)
    if key in _RATIO_KEYS:
        return _number(key, value, where, allow_zero=True)
    if key == "io_threads" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where} io_threads = {value!r} is not an integer of at least 1; fix the file")
    if key == "source" and not isinstance(value, str):
        raise ConfigError(f"{where} source = {value!r} is not a string; fix the file")
    if key == "device" and value not in DEVICES:
        raise ConfigError(f"{where} device = {value!r} is not one of: {', '.join(DEVICES)}")
    return value


def _size(key: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f'{where} {key} = {value!r} is not a size; write bytes or a string like "24GiB"')
    return parse_size(value, what=f"{where} {key}")


def _number(key: str, value: Any, where: str, *, allow_zero: bool = False) -> float:
    """``value`` as a float: a finite number above 0 (or 0 where ``allow_zero``)."""
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (value == 0 and not allow_zero):
        least = "a number of at least 0" if allow_zero else "a positive number"
        raise ConfigError(f"{where} {key} = {value!r} is not {least}; fix the file")
    return float(value)


def _compute(table: Any, base: ComputeRates | None, where: str) -> ComputeRates:
    """The ``compute`` table over the base machine's rates."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} compute = {table!r} is not a table of {', '.join(_COMPUTE_KEYS)}")
    fields = dataclasses.asdict(base) if base is not None else {}
    for key, value in table.items():
        if key not in _COMPUTE_KEYS:
            raise ConfigError(
                f"{where} has unknown key compute.{key}; valid keys: {', '.join(_COMPUTE_KEYS)}"
            )
        if key == "weight_bytes_per_s" and isinstance(value, str):  # "750GB": bytes per second
            fields[key] = float(_size(f"compute.{key}", value, where))
        else:
            fields[key] = _number(f"compute.{key}", value, where, allow_zero=key.endswith("overhead_s"))
        bounds = plausible_fields(ComputeRates)[key]
        bounds.check(fields[key], f"{where} compute.{key} = {value!r}", "fix the file")
    missing = [key for key in _COMPUTE_REQUIRED if key not in fields]
    if missing:
        raise ConfigError(f"{where} compute lacks {', '.join(missing)}; add them, or start from a built-in")
    return ComputeRates(**fields)


def hardware_to_toml(machine: Machine, name: str | None = None) -> str:
    """A ``[hardware.NAME]`` table that :func:`load_hardware_file` reads back as ``machine``."""
    keys = {field.name: getattr(machine, field.name) for field in dataclasses.fields(Machine)}
    keys["compute"] = dataclasses.asdict(machine.compute)
    del keys["name"]
    for optional in ("host_to_device_gbps", "host_attention_gbps"):
        if keys[optional] is None:
            del keys[optional]
    return toml_table("hardware", name or machine.name, keys)
