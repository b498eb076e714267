"""The disk driver's defaults, in a module without torch, for whoever plans around them (config, the
planner, the simulator)."""

from __future__ import annotations

from klotski_tier.core.units import MIB

DEFAULT_QUEUE_DEPTH = 4
"""Reads in flight (one worker thread each): enough to keep an NVMe queue busy."""

DEFAULT_CHUNK_BYTES = 16 * MIB
"""Largest single ``preadv``: big enough for full drive bandwidth, small enough to spread over threads."""
