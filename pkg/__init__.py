"""klotski-tier: expert-aware multi-batch offloaded inference for Mixture-of-Experts models.

The public Python API lives in :mod:`klotski_tier.core.engine`; the names most users need are
re-exported here::

    from klotski_tier import Engine, EngineOptions
"""

from klotski_tier.core.engine import Engine, EngineOptions, GenerationResult
from klotski_tier.core.errors import KlotskiError

__all__ = ["Engine", "EngineOptions", "GenerationResult", "KlotskiError"]
__version__ = "0.1.0"
