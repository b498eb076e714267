"""Built-in configurations a user starts from (``--preset NAME``), as TOML documents.

``nvme-only``: weights stay on the drive. Experts stream from disk through a small host
staging area (a few large blocks' worth), with more reads in flight to keep an NVMe drive
busy, and the correlation predictor prefetching the next layer's experts.

``ram-rich``: host RAM holds the whole model. Every weight is read into host memory before
the first step (pinned where CUDA is present) and blocks stream host to device only.

Baselines, run through the same engine so that a benchmark compares schedules, not code bases
(every one of them generates the same tokens as the default engine). Each sets only what
defines the system it imitates; memory budgets and the batch size are left to the user, and so
is the number of batches where the imitated system shares loads between batches:

``sequential``: naive offloading, as Hugging Face accelerate's offload hooks do it. One batch;
for each layer the blocks it needs are loaded, then computed: attention, then the gate, then
the selected experts (as many at a time as the device budget holds, in expert id order).
Nothing is loaded ahead and no read or copy runs while the compute does. What fits the device
budget stays there (``sweep`` eviction), as accelerate's ``device_map`` keeps a fixed share resident.

``flexgen``: FlexGen's layer-by-layer schedule, which knows nothing of experts. Batches share
every loaded weight (``--batches``, default 2), and while layer l computes its experts, the whole
of layer l+1 is prefetched: attention, gate and every expert, used or not (prefetch
``whole-layer`` with ``hot_experts = "all"``). The selected experts run in id order, each waited
for in turn; one the prefetch has not brought yet is loaded when its turn comes, not as soon as its gate ran.
FlexGen's policy search places a fixed share of the weights on the device: ``sweep`` eviction keeps
such a share resident.

``ondemand-lru``: a single-request expert cache (as in Mixtral-offloading). One batch; an
expert is fetched when the gate selects it and kept in an LRU cache on the device; no expert
is predicted or prefetched. Attention and gate weights still load during the previous layer,
as those systems keep them resident.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.runtime.config import EngineOptions, parse_config, read_config_file

PRESETS: dict[str, str] = {
    "nvme-only": """
[host]
memory = "1GiB"        # staging: room for a few blocks on their way from disk
preload = false

[disk]
queue_depth = 8        # NVMe drives need several reads in flight to reach their bandwidth

[prefetch]
policy = "correlation"

[eviction]
policy = "lru"
""",
    "ram-rich": """
[host]
memory = "auto"        # all the memory this process may use
preload = true         # read every weight once; afterwards only host -> device copies

[prefetch]
policy = "correlation"

[eviction]
policy = "lru"
""",
    "sequential": """
[pipeline]
batches = 1
schedule = "sequential"   # load, then compute; nothing ahead, no overlap

[prefetch]
policy = "none"

[eviction]
policy = "sweep"          # what fits stays (accelerate's device_map keeps a fixed share resident)
""",
    "flexgen": """
[pipeline]
hot_experts = "all"       # the whole next layer ...
expert_order = "index"    # ... computed expert by expert in id order, no reordering

[prefetch]
policy = "whole-layer"    # every expert, whatever the gates choose

[eviction]
policy = "sweep"          # FlexGen's policy search places a fixed share of the weights on the device
""",
    "ondemand-lru": """
[pipeline]
batches = 1

[prefetch]
policy = "none"           # experts only when a gate selects them

[eviction]
policy = "lru"
""",
}


def preset_fields(name: str) -> dict[str, Any]:
    """EngineOptions fields the preset ``name`` sets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return parse_config(tomllib.loads(PRESETS[name]), source=f"preset {name}")


def build_options(
    *, preset: str | None = None, config_file: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> EngineOptions:
    """Defaults, then ``preset``, then ``config_file``, then ``overrides`` (flags given by the user)."""
    fields: dict[str, Any] = {}
    if preset is not None:
        fields.update(preset_fields(preset))
    if config_file is not None:
        fields.update(read_config_file(config_file))
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return EngineOptions(**fields)
