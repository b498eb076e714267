"""The engine options of the command line: ``--config``, ``--preset`` and the flags that override them.

``run`` and ``config show`` share these flags, so that ``config show`` prints exactly the
configuration a ``run`` with the same flags would use. :func:`options_and_explicit` also says which
fields the user set (by a flag, the config file or the preset): ``run --plan auto`` lets the planner
choose only the others, and ``config show`` prints the configuration before any plan.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from klotski_tier.cli.params import DEVICE, HotExperts, NonEmptyPath, count, registry_name, size
from klotski_tier.core.registry import Registry
from klotski_tier.core.runtime.config import EngineOptions, read_config_file, replace
from klotski_tier.core.runtime.presets import PRESETS, build_options, preset_fields
from klotski_tier.core.units import parse_size
from klotski_tier.policies.registry import EVICTION_POLICIES, PREFETCH_POLICIES

F = TypeVar("F", bound=Callable[..., Any])

# flag parameter -> EngineOptions field, for flags that are plain values
_DIRECT = {
    "batches": "batches",
    "batch_size": "batch_size",
    "hot_experts": "hot_experts",
    "device": "device",
    "prefetch": "prefetch",
    "eviction": "eviction",
    "prefetch_trace": "prefetch_trace",
}
_SIZES = {
    "device_memory": ("device_memory_bytes", "--device-memory"),
    "host_memory": ("host_memory_bytes", "--host-memory"),
}


def _names(registry: Registry[Any]) -> str:
    """The names a registry knows (built-ins and installed plugins), for a flag's help."""
    return ", ".join(registry.names())


_FLAGS = [
    click.option(
        "--config", "config_file", type=NonEmptyPath(path_type=Path), help="A TOML configuration file."
    ),
    click.option(
        "--preset", type=click.Choice(sorted(PRESETS)), help="A built-in configuration to start from."
    ),
    click.option(
        "--batches",
        "-n",
        type=count("batches"),
        help="Batches in a group sharing every loaded weight (n; default 2).",
    ),
    click.option("--batch-size", type=count("batch_size"), help="Sequences per batch (bs; default 4)."),
    click.option(
        "--hot-experts",
        type=HotExperts(),
        metavar="K|all",
        help='Experts prefetched per layer (K; default: top-k; "all": every expert of the layer).',
    ),
    click.option(
        "--device-memory",
        type=size(),
        metavar="SIZE",
        help="Device budget, e.g. 2GiB (default: on a CPU device derived from the memory limit, "
        "on CUDA the GPU's).",
    ),
    click.option(
        "--host-memory",
        type=size(),
        metavar="SIZE",
        help="Host RAM budget, e.g. 8GiB (default: derived from the memory limit, the cgroup's or "
        "the machine's).",
    ),
    click.option("--device", type=DEVICE, help="cpu, cuda or cuda:N (default: cuda when present)."),
    click.option(
        "--prefetch",
        type=registry_name(PREFETCH_POLICIES),
        metavar="NAME",
        help=f"Prefetch policy: {_names(PREFETCH_POLICIES)}.",
    ),
    click.option(
        "--eviction",
        type=registry_name(EVICTION_POLICIES),
        metavar="NAME",
        help=f"Eviction policy: {_names(EVICTION_POLICIES)}.",
    ),
    click.option(
        "--prefetch-trace",
        type=NonEmptyPath(path_type=Path),
        help="Routing trace to warm the prefetch policy up with (the truth for oracle).",
    ),
]


def engine_flags(fn: F) -> F:
    """Add the configuration flags to a click command."""
    for flag in reversed(_FLAGS):
        fn = flag(fn)
    return fn


def options_from_flags(flags: dict[str, Any], **defaults: Any) -> EngineOptions:
    """Pop the configuration flags from ``flags`` and build the effective options.

    ``defaults`` apply only where neither the preset, the file nor a flag set a value.
    """
    return options_and_explicit(flags, **defaults)[0]


def options_and_explicit(flags: dict[str, Any], **defaults: Any) -> tuple[EngineOptions, frozenset[str]]:
    """As :func:`options_from_flags`, with the EngineOptions fields the user set: by a flag given on
    the command line, in the ``--config`` file or by the ``--preset`` (``defaults`` are not set)."""
    overrides = {field: flags.pop(name) for name, field in _DIRECT.items()}
    for name, (field, option) in _SIZES.items():
        value = flags.pop(name)  # bytes (the SIZE type), or a size as text from a caller of the library
        overrides[field] = None if value is None else parse_size(value, what=option)
    preset, config_file = flags.pop("preset"), flags.pop("config_file")
    fields = preset_fields(preset) if preset is not None else {}
    fields.update(read_config_file(config_file) if config_file is not None else {})
    given = {field: value for field, value in overrides.items() if value is not None}
    fields.update(given)
    options = build_options(overrides=fields)  # the layering above is build_options' own order
    unset = {k: v for k, v in defaults.items() if getattr(options, k) is None}
    return replace(options, **unset), frozenset(fields)
