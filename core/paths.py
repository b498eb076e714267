"""Where klotski-tier keeps what it builds and measures: the user's cache directory."""

from __future__ import annotations

import os
from pathlib import Path

from klotski_tier.core.errors import ConfigError

CACHE_ENV_VAR = "KLOTSKI_TIER_CACHE"  # overrides the cache root (default ~/.cache/klotski-tier)
CACHE_SUBDIR = "klotski-tier"  # under $XDG_CACHE_HOME or ~/.cache


def default_cache_dir() -> Path:
    """``$KLOTSKI_TIER_CACHE``, else ``$XDG_CACHE_HOME/klotski-tier``, else ``~/.cache/klotski-tier``;
    a path there that is not a directory (nor a link to one) is a :class:`ConfigError` naming the variable."""
    if os.environ.get(CACHE_ENV_VAR):
        path, named = (
            Path(os.environ[CACHE_ENV_VAR]).expanduser(),
            f"{CACHE_ENV_VAR}={os.environ[CACHE_ENV_VAR]}",
        )
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        path, named = base / CACHE_SUBDIR, "the cache directory"
    if os.path.lexists(path) and not path.is_dir():
        raise ConfigError(
            f"{named}: {path} is not a directory; set {CACHE_ENV_VAR} to a directory klotski-tier may write"
        )
    return path
