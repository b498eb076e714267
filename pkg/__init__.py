"""klotski-tier: expert-aware multi-batch offloaded inference for Mixture-of-Experts models.

The public Python API lives in :mod:`klotski_tier.core.runtime.engine`; the names most users need are
re-exported here (imported lazily, so ``import klotski_tier.policies`` stays light)::

    from klotski_tier import Engine, EngineOptions
"""

from __future__ import annotations

from typing import Any

__all__ = ["Engine", "EngineOptions", "GenerationResult", "KlotskiError"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in ("Engine", "EngineOptions", "GenerationResult"):
        from klotski_tier.core.runtime import engine

        return getattr(engine, name)
    if name == "KlotskiError":
        from klotski_tier.core.errors import KlotskiError

        return KlotskiError
    raise AttributeError(f"module 'klotski_tier' has no attribute {name!r}")
