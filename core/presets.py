"""Built-in configurations a user starts from (``--preset NAME``), as TOML documents.

``nvme-only``: weights stay on the drive. Experts stream from disk through a small host
staging area (a few large blocks' worth), with more reads in flight to keep an NVMe drive
busy, and the correlation predictor prefetching the next layer's experts.

``ram-rich``: host RAM holds the whole model. Every weight is read into host memory before
the first step (pinned where CUDA is present) and blocks stream host to device only.
"""

from __future__ import annotations

import tomllib
from typing import Any

from klotski_tier.core.config import parse_config
from klotski_tier.core.errors import ConfigError

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
memory = "unlimited"
preload = true         # read every weight once; afterwards only host -> device copies

[prefetch]
policy = "correlation"

[eviction]
policy = "lru"
""",
}


def preset_fields(name: str) -> dict[str, Any]:
    """EngineOptions fields the preset ``name`` sets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return parse_config(tomllib.loads(PRESETS[name]), source=f"preset {name}")
