"""Tier drivers by name: the built-ins plus the ``klotski_tier.tiers`` entry-point group.

Config names a driver (``"disk"``, ``"host"``, ``"device"``); the class is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from klotski_tier.core.registry import Registry

if TYPE_CHECKING:  # importing the registry imports no driver (and not torch)
    from klotski_tier.tiers.base import TierDriver

TIER_DRIVERS: Registry[type[TierDriver]] = Registry(
    "tier driver",
    "klotski_tier.tiers",
    {
        "disk": "klotski_tier.tiers.disk:DiskDriver",
        "host": "klotski_tier.tiers.host:HostDriver",
        "device": "klotski_tier.tiers.device:DeviceDriver",
    },
)
