"""The prefetch policy of an engine: built from config, warmed up, its learned state kept.

Policies are pure and do no I/O; this module does their I/O for them. A routing trace named
by ``prefetch.trace`` is loaded, checked against the model, and fed to the policy's
``warm_up`` (a learning policy builds its tables from it; the oracle takes it as the truth).
A state saved by an earlier run (``prefetch.state``) is restored; after a run the learned
state is written to ``prefetch.save_state`` when, and only when, that is set.
"""

from __future__ import annotations

import json
from pathlib import Path

from klotski_tier.core import reads
from klotski_tier.core.atomic import atomic_open
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.runtime.config import EngineOptions
from klotski_tier.core.units import MIB
from klotski_tier.policies.prefetch import PrefetchPolicy
from klotski_tier.policies.registry import make_prefetch

PREFETCH_STATE_KIND = reads.FileKind(
    "prefetch state", 1024 * MIB, ConfigError, "save one with prefetch.save_state, or leave it out"
)
"""A correlation table of 100 layers of 256 x 256 experts is ~100 MiB as JSON: 1 GiB leaves room."""


def build_prefetch(options: EngineOptions, spec: ModelSpec) -> PrefetchPolicy:
    """The configured prefetch policy, warmed up from its trace or saved state."""
    policy = make_prefetch(options.prefetch, **options.prefetch_options)
    if options.prefetch_trace is not None:
        trace = RoutingTrace.load(options.prefetch_trace)
        trace.check_model(spec)
        policy.warm_up(trace.as_steps())
    elif policy.needs_trace:
        raise ConfigError(
            f"prefetch policy {options.prefetch!r} needs a routing trace; set prefetch.trace "
            "(record one with: klotski-tier run --record-routing FILE)"
        )
    if options.prefetch_state is not None:
        saved_by, state = _read_state(options.prefetch_state)
        if saved_by != options.prefetch:
            raise ConfigError(
                f"prefetch state {options.prefetch_state} was saved by policy {saved_by!r}, not "
                f"{options.prefetch!r}; use a state saved by the same policy"
            )
        policy.load_state(state)
    return policy


def save_prefetch_state(policy: PrefetchPolicy, path: Path) -> None:
    """Write the policy's learned state as JSON, atomically."""
    with atomic_open(path, what="prefetch state") as handle:
        json.dump({"policy": policy.name, "state": policy.state()}, handle)


def _read_state(path: Path) -> tuple[str, dict[str, list[object]]]:
    document = reads.read_json(path, PREFETCH_STATE_KIND)
    if not isinstance(document, dict) or not isinstance(document.get("state"), dict):
        raise ConfigError(f"{path} is not a saved prefetch state; save one with prefetch.save_state")
    state: dict[str, list[object]] = document["state"]
    return str(document.get("policy")), state
