"""The memory this process may really use: its cgroup's limit, or what the machine has available.

A container's memory limit covers everything the processes in it hold: heap, thread stacks and
the page cache their reads fill. Where the limit binds, the kernel first reclaims the group's
clean cache and then kills a process, without a message. So the engine's budgets must come from
that limit, not from the machine's RAM. :func:`read_memory_limit` finds it:

- cgroup v2 (the process's line ``0::/path`` in ``/proc/self/cgroup``, the ``cgroup2`` mount
  in ``/proc/self/mountinfo``): the smallest ``memory.max`` from the process's group up to the
  root, and in use ``memory.current`` less the group's page cache (``file`` in ``memory.stat``,
  which the kernel reclaims before it kills);
- cgroup v1 (the ``memory`` controller's line and mount): ``hierarchical_memory_limit`` of
  ``memory.stat`` (the smallest limit up the hierarchy), else ``memory.limit_in_bytes``, and in
  use ``memory.usage_in_bytes`` less ``total_cache``;
- the machine: ``MemAvailable`` of ``/proc/meminfo``, which also bounds a group whose limit is
  larger than what the machine has free.

Every path is a parameter, so tests read fake cgroup files and a fake ``/proc``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from klotski_tier.core.units import format_size

logger = logging.getLogger(__name__)

PROC = Path("/proc")
NO_LIMIT_BYTES = 1 << 60
"""A cgroup v1 limit at or above this means "no limit" (the kernel writes PAGE_COUNTER_MAX pages)."""

_Matcher = Callable[[str, str], bool]
"""Picks a line of ``/proc/self/cgroup`` by its (controllers, hierarchy id)."""


@dataclass(frozen=True)
class MemoryLimit:
    """``limit_bytes`` the process may hold in all, ``used_bytes`` of which are held already and
    cannot be reclaimed; ``kind`` and ``path`` say where the limit comes from."""

    limit_bytes: int
    used_bytes: int
    kind: str  # "cgroup v2", "cgroup v1" or "machine"
    path: Path  # the file the limit was read from

    @property
    def free_bytes(self) -> int:
        """What is left for the engine to fill: the limit less what is in use."""
        return max(0, self.limit_bytes - self.used_bytes)

    def describe(self) -> str:
        """``"cgroup v1 limit 2.00 GiB (/sys/.../memory.stat), 350.00 MiB in use"``, for messages."""
        what = "memory" if self.kind == "machine" else "limit"
        used = format_size(self.used_bytes)
        return f"{self.kind} {what} {format_size(self.limit_bytes)} ({self.path}), {used} in use"


def read_memory_limit(proc: Path = PROC, cgroup_root: Path | None = None) -> MemoryLimit:
    """The tightest limit on this process's memory: its cgroup's (v2, then v1), or the machine's.

    ``cgroup_root`` overrides where the cgroup file systems are found (a test's fake tree, laid out
    as ``<root>/<path in /proc/self/cgroup>``); by default the mounts of ``proc/self/mountinfo``.
    """
    machine = _machine(proc)
    group = _cgroup_v2(proc, cgroup_root) or _cgroup_v1(proc, cgroup_root)
    if group is None or group.free_bytes >= machine.free_bytes:
        return machine
    return group


def _machine(proc: Path) -> MemoryLimit:
    """What the machine can still give: MemAvailable (MemTotal when the kernel has no MemAvailable)."""
    fields = _key_values(proc / "meminfo", scale=1024)  # "MemAvailable:  24230432 kB"
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", total)
    return MemoryLimit(total, total - available, "machine", proc / "meminfo")


def _cgroup_v2(proc: Path, root: Path | None) -> MemoryLimit | None:
    relative = _own_group(proc, lambda controllers, hierarchy: hierarchy == "0")
    mount = root if root is not None else _mount_point(proc, "cgroup2", "")
    if relative is None or mount is None:
        return None
    group = _existing(mount, relative)
    if group is None or not (group / "memory.current").is_file():
        return None  # the memory controller is not enabled for this group
    limits = []
    for directory in (group, *group.parents):
        value = _read_text(directory / "memory.max")
        if value is not None and value != "max":
            limits.append((int(value), directory / "memory.max"))
        if directory == mount:
            break
    if not limits:
        return None
    limit, path = min(limits)
    current = int(_read_text(group / "memory.current") or 0)
    cache = _key_values(group / "memory.stat", separator=" ").get("file", 0)
    return MemoryLimit(limit, max(0, current - cache), "cgroup v2", path)


def _cgroup_v1(proc: Path, root: Path | None) -> MemoryLimit | None:
    relative = _own_group(proc, lambda controllers, hierarchy: "memory" in controllers.split(","))
    mount = root if root is not None else _mount_point(proc, "cgroup", "memory")
    if relative is None or mount is None:
        return None
    group = _existing(mount, relative)
    if group is None:
        return None
    stat = _key_values(group / "memory.stat", separator=" ")
    path = group / "memory.stat"
    limit = stat.get("hierarchical_memory_limit", 0)
    if not limit:
        path = group / "memory.limit_in_bytes"
        limit = int(_read_text(path) or 0)
    if not limit or limit >= NO_LIMIT_BYTES:
        return None
    usage = int(_read_text(group / "memory.usage_in_bytes") or 0)
    used = max(0, usage - stat.get("total_cache", stat.get("cache", 0)))
    return MemoryLimit(limit, used, "cgroup v1", path)


def _own_group(proc: Path, matches: _Matcher) -> str | None:
    """This process's group path for the hierarchy ``matches`` picks, from ``proc/self/cgroup``."""
    text = _read_text(proc / "self" / "cgroup")
    for line in (text or "").splitlines():
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if matches(controllers, hierarchy):
            return path.strip("/")
    return None


def _mount_point(proc: Path, fstype: str, option: str) -> Path | None:
    """Where a file system of ``fstype`` (with super option ``option``, if given) is mounted."""
    text = _read_text(proc / "self" / "mountinfo")
    for line in (text or "").splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] != fstype:
            continue
        if option and option not in tail[2].split(","):
            continue
        return Path(fields[4])
    return None


def _existing(mount: Path, relative: str) -> Path | None:
    """The group's directory; inside a container the mount's root is the group itself."""
    for candidate in (mount / relative, mount):
        if candidate.is_dir():
            return candidate
    return None


def _key_values(path: Path, *, separator: str = ":", scale: int = 1) -> dict[str, int]:
    """``key value`` lines of a kernel file as integers (times ``scale``); unreadable files are empty."""
    values: dict[str, int] = {}
    for line in (_read_text(path) or "").splitlines():
        key, _, rest = line.partition(separator)
        number = rest.split()[0] if rest.split() else ""
        if number.isdigit():
            values[key.strip()] = int(number) * scale
    return values


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
