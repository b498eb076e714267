"""A cgroup v1 memory group per benchmarked process: the budget enforced for real, the peak measured.

The limit covers everything the process causes to be held: its heap, its threads, and the page
cache its reads and writes fill (v1 charges a page to the group that first touched it; the
kernel reclaims the group's clean cache before it kills anything). Lifecycle::

    group = MemoryGroup.create("klotski-e2e-<pid>-<system>", limit_bytes)   # parent, as root
    argv = group.wrap([python, "-m", "benchmarks.e2e.worker", ...])         # joins, then execs
    ... run argv, wait ...
    group.peak_bytes(); group.oom_kills()                                   # after the child exits
    group.remove()

The child joins before anything is loaded: :meth:`MemoryGroup.wrap` prefixes the command with a
shell that writes its own pid into ``cgroup.procs`` and then ``exec``\\ s the real command, so
even the interpreter's start-up is charged. The group is made under the parent's own memory
cgroup (``/sys/fs/cgroup/memory/<own path>/klotski-e2e-...``; the hierarchy's root when the
parent runs at the top, as on CI), so limits set above it still apply.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.units import format_size

logger = logging.getLogger(__name__)

MOUNTS = Path("/proc/mounts")
OWN_CGROUP = Path("/proc/self/cgroup")
GROUP_PREFIX = "klotski-e2e"
NO_CGROUP_HINT = "pass --no-cgroup to run with the engines' own budgets only"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def memory_root(mounts: Path = MOUNTS) -> Path:
    """The mount point of the cgroup v1 memory controller; ConfigError (one line) where there is none."""
    try:
        lines = mounts.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {mounts} to find cgroups: {exc.strerror or exc}; {NO_CGROUP_HINT}"
        ) from exc
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "cgroup" and "memory" in fields[3].split(","):
            return Path(fields[1])
    raise ConfigError(f"no cgroup v1 memory controller is mounted (see {mounts}); {NO_CGROUP_HINT}")


def own_memory_path(own_cgroup: Path = OWN_CGROUP) -> str:
    """This process's memory cgroup, relative to the controller's root ("" at the top)."""
    try:
        lines = own_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path.strip("/")
    return ""


def check_available(mounts: Path = MOUNTS, own_cgroup: Path = OWN_CGROUP) -> Path:
    """The directory new groups go into; ConfigError saying why cgroups cannot be used."""
    if os.geteuid() != 0:
        raise ConfigError(f"memory cgroups need root (running as uid {os.geteuid()}); {NO_CGROUP_HINT}")
    parent = memory_root(mounts) / own_memory_path(own_cgroup)
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"cannot create memory cgroups in {parent} (not writable); {NO_CGROUP_HINT}")
    return parent


def cgroups_usable() -> bool:
    """Whether :func:`check_available` finds memory cgroups this process can create (for tests)."""
    try:
        check_available()
    except ConfigError:
        return False
    return True


def group_name(system: str) -> str:
    """``klotski-e2e-<parent pid>-<system>``, with characters a directory name should not hold replaced."""
    return f"{GROUP_PREFIX}-{os.getpid()}-{_SAFE_NAME.sub('_', system)}"


@dataclass(frozen=True)
class MemoryGroup:
    """One memory cgroup directory and the files the benchmark reads and writes in it."""

    path: Path

    @classmethod
    def create(cls, name: str, limit_bytes: int | None, parent: Path | None = None) -> MemoryGroup:
        """Make the group (a leftover of the same name is removed first) and set its limit."""
        group = cls((parent if parent is not None else check_available()) / name)
        if group.path.exists():
            group.remove()
        try:
            group.path.mkdir()
            if limit_bytes is not None:
                group._write("memory.limit_in_bytes", limit_bytes)
        except OSError as exc:
            group.remove()
            raise ConfigError(
                f"cannot create memory cgroup {group.path}: {exc.strerror or exc}; {NO_CGROUP_HINT}"
            ) from exc
        logger.debug("cgroup %s: limit %s", group.path, format_size(limit_bytes) if limit_bytes else "none")
        return group

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into this group, then ``exec``\\ s it."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.procs), *argv]

    def limit_bytes(self) -> int:
        return self._read_int("memory.limit_in_bytes")

    def peak_bytes(self) -> int:
        """The most memory the group held at once (heap and page cache), since it was made."""
        return self._read_int("memory.max_usage_in_bytes")

    def oom_kills(self) -> int:
        """Processes the kernel killed for exceeding the group's limit (0 where the kernel has no count)."""
        for line in self._read("memory.oom_control").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Delete the group (its processes must have exited; charged page cache goes to the parent)."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise ConfigError(f"cannot remove memory cgroup {self.path}: {exc.strerror or exc}") from exc
            logger.warning("memory cgroup %s still has processes; left in place", self.path)

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path / name}: {exc.strerror or exc}") from exc

    def _read_int(self, name: str) -> int:
        return int(self._read(name).strip())

    def _write(self, name: str, value: int) -> None:
        (self.path / name).write_text(str(value), encoding="utf-8")
