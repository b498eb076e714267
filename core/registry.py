"""One registry per plugin family: built-ins by lazy ``"module:attribute"`` paths plus an
``importlib.metadata`` entry-point group for third-party packages.

A name is resolved on first use, so importing the registry imports no plugin. Registering a
name twice is refused; an unknown name is a :class:`ConfigError` that lists the valid names.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from klotski_tier.core.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to plugin classes (or factories) of one family, e.g. eviction policies."""

    def __init__(self, family: str, entry_point_group: str, builtins: Mapping[str, str]) -> None:
        self.family = family
        self.entry_point_group = entry_point_group
        self._paths: dict[str, str] = dict(builtins)
        self._loaded: dict[str, T] = {}
        self._entry_points_read = False

    def register(self, name: str, plugin: T) -> None:
        """Add ``plugin`` under ``name``; a name already taken is refused."""
        self._read_entry_points()
        if name in self._paths or name in self._loaded:
            raise ConfigError(f"{self.family} {name!r} is already registered; choose another name")
        self._loaded[name] = plugin

    def names(self) -> list[str]:
        self._read_entry_points()
        return sorted(set(self._paths) | set(self._loaded))

    def get(self, name: str) -> T:
        """The plugin registered as ``name``; unknown names raise :class:`ConfigError`."""
        self._read_entry_points()
        if name in self._loaded:
            return self._loaded[name]
        if name not in self._paths:
            valid = ", ".join(self.names())
            raise ConfigError(f"unknown {self.family} {name!r}; valid names: {valid}")
        module_name, _, attribute = self._paths[name].partition(":")
        plugin: T = getattr(importlib.import_module(module_name), attribute)
        self._loaded[name] = plugin
        return plugin

    def _read_entry_points(self) -> None:
        if self._entry_points_read:
            return
        self._entry_points_read = True
        for entry in entry_points(group=self.entry_point_group):
            if entry.name in self._paths:
                raise ConfigError(
                    f"{self.family} {entry.name!r} from entry point {entry.value!r} clashes with a built-in"
                )
            self._paths[entry.name] = entry.value
