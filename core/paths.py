"""Where klotski-tier keeps what it builds and measures: the user's cache directory."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "KLOTSKI_TIER_CACHE"  # overrides the cache root (default ~/.cache/klotski-tier)
CACHE_SUBDIR = "klotski-tier"  # under $XDG_CACHE_HOME or ~/.cache


def default_cache_dir() -> Path:
    """``$KLOTSKI_TIER_CACHE``, else ``$XDG_CACHE_HOME/klotski-tier``, else ``~/.cache/klotski-tier``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / CACHE_SUBDIR
