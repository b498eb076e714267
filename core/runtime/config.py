"""Configuration: the frozen :class:`EngineOptions`, read from TOML files and built-in presets.

A configuration file has one table per concern; every key is optional::

    [pipeline]
    batches = 4              # n: batches in a group sharing every loaded weight
    batch_size = 8           # bs: sequences per batch
    hot_experts = 2          # K: experts prefetched per layer (default: the router's top-k; "all": E)
    lookahead_layers = 2     # L: layers read ahead; beyond the next, staged in host RAM (or a CPU device)
    stream_window = 3        # on a full device: experts in use or moving at once (0: no cap)
    schedule = "klotski"     # "klotski" (I/O overlaps compute) or "sequential" (load, then compute)
    expert_order = "ready-first"  # "ready-first" (Klotski's reordering) or "index" (expert 0, 1, ...)

    [device]
    memory = "20GiB"         # byte budget, or "auto" (the default): derived from the memory limit
    type = "cuda"            # cpu, cuda or cuda:N (default: cuda when present)

    [host]
    memory = "64GiB"
    preload = false          # read every weight into host RAM before running

    [disk]
    driver = "disk"          # a name in the tier-driver registry
    queue_depth = 4          # reads in flight
    direct = true            # O_DIRECT reads (buffered where the file system refuses it, e.g. tmpfs)

    [prefetch]
    policy = "correlation"   # a name in the prefetch-policy registry
    trace = "warmup.npz"     # routing trace: warm-up for learning policies, the truth for "oracle"
    state = "table.json"     # learned state saved by an earlier run
    save_state = "table.json"  # where to save the learned state after the run (only when set)
    options = { decay = 0.99 }   # the policy's own keyword arguments

    [eviction]
    policy = "lru"
    options = {}

    [kv]
    home = "device"          # the KV cache: "device" for the whole run, "host" (RAM) or "disk" (files in
                             # the cache directory), streamed through two device slots (runtime/kv.py)
    attention = "device"     # where decode attention runs: "device", or "host" over the cache in host RAM,
                             # moving only queries, new entries and outputs (needs home = "host")
    device_layers = 0        # with home "host" or "disk": the first layers whose cache stays on the device

    [activations]
    home = "device"          # a prefill's residual streams: "device", or "host" (RAM) between their jobs,
                             # two device slots holding the ones in use (runtime/activations.py)

Layering: built-in defaults, then a preset (``--preset``), then the file (``--config``), then
command-line flags. Every value is checked when loaded; an error names the file, the key,
the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from klotski_tier.core import reads
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.units import GIB, KIB, MIB, parse_size
from klotski_tier.tiers.disk_defaults import DEFAULT_QUEUE_DEPTH

UNLIMITED = "unlimited"
AUTO = "auto"  # a budget derived from the memory the process may use (what "unlimited" means too)
ALL_EXPERTS = "all"  # hot_experts: prefetch every expert of a layer (K = E)

KLOTSKI = "klotski"  # schedule: prefetch ahead, fetch experts at the gate, overlap I/O with compute
SEQUENTIAL = "sequential"  # schedule: per layer, load what is needed, then compute; nothing ahead
SCHEDULES = (KLOTSKI, SEQUENTIAL)

READY_FIRST = "ready-first"  # expert order: resident experts first (most tokens first), then as loaded
INDEX = "index"  # expert order: by expert id, each expert fetched when its turn comes
EXPERT_ORDERS = (READY_FIRST, INDEX)

DEVICE_KV = "device"  # the KV cache on the device for the whole run
HOST_KV = "host"  # in host RAM, one layer of one batch at a time in a device slot (runtime/kv.py)
DISK_KV = "disk"  # in files on the drive (a directory made for the run), through the same slots
KV_HOMES = (DEVICE_KV, HOST_KV, DISK_KV)
CONFIG_FILE_KIND = reads.FileKind(
    "config file", MIB, ConfigError, "fix it, or start a new one from `klotski-tier config show`"
)
"""A config file is a few dozen lines: 1 MiB is far more than any needs."""
KV_SLOTS = 2  # device slots of a cache in host RAM: one being computed, one being filled
DEVICE_ATTENTION = "device"  # attention runs on the device, over the cache there or in its slots
HOST_ATTENTION = "host"  # decode attention runs on the host's cores over the cache in host RAM
KV_ATTENTION = (DEVICE_ATTENTION, HOST_ATTENTION)
DEVICE_ACTIVATIONS = "device"  # every batch's residual stream on the device for the whole step
HOST_ACTIVATIONS = "host"  # a prefill's residual streams in host RAM between jobs (runtime/activations.py)
ACTIVATION_HOMES = (DEVICE_ACTIVATIONS, HOST_ACTIVATIONS)

MAX_BATCHES = 4096  # n: far beyond what pays (the planner tries at most 64); a larger n is a typo
MAX_BATCH_SIZE = 65536  # bs: sequences per batch; each needs its own KV cache
MAX_QUEUE_DEPTH = 1024  # reads in flight from the drive: NVMe queues hold 1024 commands at most here
COUNT_RANGES: dict[str, tuple[int, int | None]] = {
    "batches": (1, MAX_BATCHES),
    "batch_size": (1, MAX_BATCH_SIZE),
    "disk_queue_depth": (1, MAX_QUEUE_DEPTH),
    "lookahead_layers": (1, None),
    "stream_window": (0, None),
    "kv_device_layers": (0, None),
}
"""The whole-number options' ranges (None: no upper bound), the one place they are held: every
EngineOptions, the config file's keys and the planner's request check against these."""


@dataclass(frozen=True)
class EngineOptions:
    """How to run: the batch group shape, memory budgets, policies and drivers."""

    batches: int = 2  # n: batches in a group sharing every loaded weight
    batch_size: int = 4  # bs: sequences per batch
    hot_experts: int | Literal["all"] | None = None  # K prefetched per layer; None: top-k; "all": E
    lookahead_layers: int = 2  # L: layers read ahead; those beyond the next are staged (the DRAM window)
    # Once the device is full, the experts in use or moving (leased, in flight, loaded ahead) take at most
    # this many largest experts' bytes; the rest of the device keeps blocks across steps. 0: no cap.
    stream_window: int = 3
    device_memory_bytes: int | None = None  # None: derived (runtime/budgets.py); the GPU's on CUDA
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None: CUDA when present
    host_memory_bytes: int | None = None  # None: derived from the memory limit (runtime/budgets.py)
    host_preload: bool = False  # read every block into host RAM before the first step
    disk_driver: str = "disk"  # a name in the tier-driver registry (built-in or entry point)
    disk_queue_depth: int = DEFAULT_QUEUE_DEPTH
    disk_direct: bool = True  # O_DIRECT reads (checkpoints and packed stores alike); False: page cache
    prefetch: str = "correlation"  # the Klotski predictor (falls back to frequency until it has learned)
    prefetch_options: Mapping[str, Any] = field(default_factory=dict)
    prefetch_trace: Path | None = None  # routing trace: warm-up, or the truth for an oracle
    prefetch_state: Path | None = None  # learned policy state saved by an earlier run
    prefetch_save_state: Path | None = None  # save the learned state here after each run
    eviction: str = "lru"
    eviction_options: Mapping[str, Any] = field(default_factory=dict)
    schedule: str = KLOTSKI  # one of SCHEDULES; "sequential" ignores prefetch, hot_experts, expert_order
    expert_order: str = READY_FIRST  # one of EXPERT_ORDERS: the order of the expert phase
    kv_home: str = DEVICE_KV  # one of KV_HOMES: where the KV cache lives (runtime/kv.py)
    kv_attention: str = DEVICE_ATTENTION  # one of KV_ATTENTION: where decode attention runs (runtime/kv.py)
    kv_device_layers: int = 0  # with the cache away from the device: its first layers that stay there
    activations_home: str = DEVICE_ACTIVATIONS  # one of ACTIVATION_HOMES (runtime/activations.py)

    def __post_init__(self) -> None:
        for name, (low, high) in COUNT_RANGES.items():
            check_count(name, getattr(self, name), low, high)
        _check_hot_experts("hot_experts", self.hot_experts)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("expert_order", self.expert_order, EXPERT_ORDERS)
        _check_choice("kv_home", self.kv_home, KV_HOMES)
        _check_choice("kv_attention", self.kv_attention, KV_ATTENTION)
        _check_choice("activations_home", self.activations_home, ACTIVATION_HOMES)
        if self.kv_device_layers and self.kv_home == DEVICE_KV:
            raise ConfigError(
                f"kv_device_layers = {self.kv_device_layers} keeps some layers' cache on the device, but "
                f'the whole cache is there already ([kv] home = "{DEVICE_KV}"); set home = "{HOST_KV}" or '
                f'"{DISK_KV}"'
            )
        if self.kv_attention == HOST_ATTENTION and self.kv_home != HOST_KV:
            raise ConfigError(
                f'kv attention "{HOST_ATTENTION}" runs over the KV cache in host RAM, but the cache lives '
                f'on the {self.kv_home}; set [kv] home = "{HOST_KV}" or attention = "{DEVICE_ATTENTION}"'
            )
        for name in ("device_memory_bytes", "host_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must not be negative, got {value}")


def check_count(key: str, value: object, low: int, high: int | None = None) -> None:
    """A :class:`ConfigError` unless ``value`` is a whole number in ``low..high`` (no bound: None)."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and low <= value <= (value if high is None else high)
    ):
        return
    allowed = f"in {low}..{high}" if high is not None else f">= {low}"
    shown = repr(value) if len(repr(value)) <= 24 else f"{repr(value)[:24]}..."
    raise ConfigError(f"{key} must be an integer {allowed}, got {shown}")


def _check_hot_experts(key: str, value: object) -> None:
    if value is None or value == ALL_EXPERTS:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f'{key} must be an integer >= 0 or "{ALL_EXPERTS}", got {value!r}')


def _check_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


# ---- reading TOML --------------------------------------------------------------------------

_Reader = Callable[[str, Any], Any]


def _integer(field: str) -> _Reader:
    """The reader of the whole-number option ``field``, in its :data:`COUNT_RANGES` range."""

    def read(key: str, value: Any) -> int:
        check_count(key, value, *COUNT_RANGES[field])
        result: int = value
        return result

    return read


def _size(key: str, value: Any) -> int | None:
    if value in (AUTO, UNLIMITED):
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f'{key} must be a size such as "512MiB" or "{AUTO}", got {value!r}')
    if isinstance(value, int) and value < 0:
        raise ConfigError(f"{key} must not be negative, got {value}")
    return parse_size(value, what=key)


def _hot_experts(key: str, value: Any) -> int | str:
    _check_hot_experts(key, value)
    result: int | str = value
    return result


def _choice(*allowed: str) -> _Reader:
    def read(key: str, value: Any) -> str:
        _check_choice(key, value, allowed)
        result: str = value
        return result

    return read


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _path(key: str, value: Any) -> Path:
    return Path(_text(key, value)).expanduser()


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table of the policy's options, got {value!r}")
    return dict(value)


# section -> key -> (EngineOptions field, reader)
SCHEMA: dict[str, dict[str, tuple[str, _Reader]]] = {
    "pipeline": {
        "batches": ("batches", _integer("batches")),
        "batch_size": ("batch_size", _integer("batch_size")),
        "hot_experts": ("hot_experts", _hot_experts),
        "lookahead_layers": ("lookahead_layers", _integer("lookahead_layers")),
        "stream_window": ("stream_window", _integer("stream_window")),
        "schedule": ("schedule", _choice(*SCHEDULES)),
        "expert_order": ("expert_order", _choice(*EXPERT_ORDERS)),
    },
    "device": {"memory": ("device_memory_bytes", _size), "type": ("device", _text)},
    "host": {"memory": ("host_memory_bytes", _size), "preload": ("host_preload", _flag)},
    "disk": {
        "driver": ("disk_driver", _text),
        "queue_depth": ("disk_queue_depth", _integer("disk_queue_depth")),
        "direct": ("disk_direct", _flag),
    },
    "prefetch": {
        "policy": ("prefetch", _text),
        "options": ("prefetch_options", _table),
        "trace": ("prefetch_trace", _path),
        "state": ("prefetch_state", _path),
        "save_state": ("prefetch_save_state", _path),
    },
    "eviction": {"policy": ("eviction", _text), "options": ("eviction_options", _table)},
    "kv": {
        "home": ("kv_home", _choice(*KV_HOMES)),
        "attention": ("kv_attention", _choice(*KV_ATTENTION)),
        "device_layers": ("kv_device_layers", _integer("kv_device_layers")),
    },
    "activations": {"home": ("activations_home", _choice(*ACTIVATION_HOMES))},
}


def parse_config(document: Mapping[str, Any], *, source: str = "config") -> dict[str, Any]:
    """EngineOptions fields set by a parsed TOML ``document``; errors name ``source`` and the key."""
    fields: dict[str, Any] = {}
    for section, table in document.items():
        if section not in SCHEMA:
            raise ConfigError(f"{source}: unknown section [{section}]; valid sections: {', '.join(SCHEMA)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, got {table!r}")
        for key, value in table.items():
            if key not in SCHEMA[section]:
                valid = ", ".join(SCHEMA[section])
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; valid keys in [{section}]: {valid}"
                )
            name, read = SCHEMA[section][key]
            try:
                fields[name] = read(f"{section}.{key}", value)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from exc
    return fields


def read_config_file(path: Path) -> dict[str, Any]:
    """EngineOptions fields set by the TOML file at ``path``."""
    document = reads.read_toml(path, CONFIG_FILE_KIND)
    fields = parse_config(document, source=str(path))
    for name in ("prefetch_trace", "prefetch_state", "prefetch_save_state"):
        if name in fields and not fields[name].is_absolute():
            fields[name] = path.parent / fields[name]  # relative to the file that names it
    return fields


# ---- writing TOML ----------------------------------------------------------------------------


def to_toml(options: EngineOptions) -> str:
    """The effective configuration as a TOML document that :func:`read_config_file` reads back."""
    lines: list[str] = []
    for section, keys in SCHEMA.items():
        lines.append(f"[{section}]")
        for key, (name, _) in keys.items():
            value = getattr(options, name)
            if value is None and name.endswith("_memory_bytes"):
                lines.append(f'{key} = "{AUTO}"')
                continue
            if value is None:
                lines.append(f"# {key} = (default)")
                continue
            lines.append(f"{key} = {_toml_value(name, value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(name: str, value: Any) -> str:
    if name.endswith("_memory_bytes"):
        return _size_text(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return f'"{value}"'
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, Mapping):
        inner = ", ".join(f"{k} = {_toml_value('', v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return repr(value)


def _size_text(nbytes: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if nbytes and nbytes % scale == 0:
            return f'"{nbytes // scale}{unit}"'
    return str(nbytes)


def replace(options: EngineOptions, **changes: Any) -> EngineOptions:
    """A copy of ``options`` with ``changes`` (validated again)."""
    return dataclasses.replace(options, **changes)
