"""The memory this process may use, read from fake cgroup v1 / v2 trees and a fake /proc."""

from __future__ import annotations

from pathlib import Path

from klotski_tier.core.memory import NO_LIMIT_BYTES, read_memory_limit
from klotski_tier.core.units import GIB, MIB

V2_LINE = "0::/kube/pod1/app\n"
V1_LINES = "12:pids:/\n4:memory:/docker/abc\n1:name=systemd:/docker/abc\n0::/\n"


def fake_proc(tmp_path: Path, *, cgroup: str, available: int = 20 * GIB, total: int = 24 * GIB) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(
        f"MemTotal: {total // 1024} kB\nMemFree: 1000 kB\nMemAvailable: {available // 1024} kB\n"
    )
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text("")
    return proc


def v2_group(root: Path, *, maxes: dict[str, str], current: int, file_cache: int) -> Path:
    """A v2 tree with ``memory.max`` per directory (relative to ``root``), the group at kube/pod1/app."""
    group = root / "kube" / "pod1" / "app"
    group.mkdir(parents=True)
    for relative, value in maxes.items():
        (root / relative / "memory.max").write_text(value + "\n")
    (group / "memory.current").write_text(f"{current}\n")
    (group / "memory.stat").write_text(f"anon {current - file_cache}\nfile {file_cache}\nkernel 1234\n")
    return group


def test_v2_takes_the_smallest_max_up_the_tree_and_counts_cache_as_reclaimable(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, cgroup=V2_LINE)
    root = tmp_path / "cg2"
    v2_group(root, maxes={"kube/pod1/app": "max", "kube/pod1": str(2 * GIB), "kube": str(4 * GIB)},
             current=900 * MIB, file_cache=600 * MIB)  # fmt: skip
    limit = read_memory_limit(proc, cgroup_root=root)
    assert (limit.kind, limit.limit_bytes, limit.used_bytes) == ("cgroup v2", 2 * GIB, 300 * MIB)
    assert limit.path == root / "kube" / "pod1" / "memory.max"
    assert limit.free_bytes == 2 * GIB - 300 * MIB
    assert "cgroup v2 limit 2.00 GiB" in limit.describe() and "300.00 MiB in use" in limit.describe()


def test_v2_without_any_max_is_the_machine(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, cgroup=V2_LINE, available=5 * GIB, total=8 * GIB)
    root = tmp_path / "cg2"
    v2_group(root, maxes={"kube/pod1/app": "max"}, current=100 * MIB, file_cache=0)
    limit = read_memory_limit(proc, cgroup_root=root)
    assert (limit.kind, limit.limit_bytes, limit.used_bytes) == ("machine", 8 * GIB, 3 * GIB)
    assert limit.path == proc / "meminfo"


def test_v1_reads_the_hierarchical_limit_less_the_cache(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, cgroup=V1_LINES)
    group = tmp_path / "cg1" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "memory.limit_in_bytes").write_text(f"{NO_LIMIT_BYTES * 8}\n")  # unlimited here ...
    (group / "memory.stat").write_text(  # ... but limited above
        f"cache {400 * MIB}\nrss {200 * MIB}\nhierarchical_memory_limit {3 * GIB}\ntotal_cache {500 * MIB}\n"
    )
    (group / "memory.usage_in_bytes").write_text(f"{700 * MIB}\n")
    limit = read_memory_limit(proc, cgroup_root=tmp_path / "cg1")
    assert (limit.kind, limit.limit_bytes, limit.used_bytes) == ("cgroup v1", 3 * GIB, 200 * MIB)


def test_v1_without_a_limit_and_a_tighter_machine_give_the_machine(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, cgroup=V1_LINES, available=1 * GIB, total=2 * GIB)
    group = tmp_path / "cg1" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "memory.stat").write_text(f"hierarchical_memory_limit {NO_LIMIT_BYTES * 8}\ntotal_cache 0\n")
    (group / "memory.usage_in_bytes").write_text("0\n")
    assert read_memory_limit(proc, cgroup_root=tmp_path / "cg1").kind == "machine"
    # a group limit above what the machine has free does not bind either
    (group / "memory.stat").write_text(f"hierarchical_memory_limit {4 * GIB}\ntotal_cache 0\n")
    limit = read_memory_limit(proc, cgroup_root=tmp_path / "cg1")
    assert (limit.kind, limit.free_bytes) == ("machine", 1 * GIB)


def test_inside_a_container_the_mount_root_is_the_group(tmp_path: Path) -> None:
    """/proc/self/cgroup names the host's path, but the container sees its group at the mount's root."""
    proc = fake_proc(tmp_path, cgroup=V2_LINE)
    root = tmp_path / "cg2"
    root.mkdir()
    (root / "memory.max").write_text(f"{GIB}\n")
    (root / "memory.current").write_text(f"{100 * MIB}\n")
    (root / "memory.stat").write_text("file 0\n")
    limit = read_memory_limit(proc, cgroup_root=root)
    assert (limit.kind, limit.limit_bytes, limit.used_bytes) == ("cgroup v2", GIB, 100 * MIB)


def test_mounts_are_found_in_mountinfo(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, cgroup="4:memory:/g\n")
    mount = tmp_path / "sys" / "memory"
    (mount / "g").mkdir(parents=True)
    (proc / "self" / "mountinfo").write_text(
        f"30 25 0:26 / {tmp_path}/sys/unified rw - cgroup2 cgroup2 rw\n"
        f"31 25 0:27 / {mount} rw,nosuid - cgroup cgroup rw,memory\n"
    )
    (mount / "g" / "memory.limit_in_bytes").write_text(f"{GIB}\n")
    (mount / "g" / "memory.usage_in_bytes").write_text("0\n")
    limit = read_memory_limit(proc)
    assert (limit.kind, limit.limit_bytes, limit.path) == (
        "cgroup v1",
        GIB,
        mount / "g" / "memory.limit_in_bytes",
    )


def test_unreadable_files_fall_back_to_the_machine(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, cgroup="garbage\n\n0::\n", available=3 * GIB, total=4 * GIB)
    limit = read_memory_limit(proc, cgroup_root=tmp_path / "missing")
    assert (limit.kind, limit.limit_bytes, limit.used_bytes) == ("machine", 4 * GIB, GIB)


def test_this_machine_has_a_limit() -> None:
    limit = read_memory_limit()
    assert 0 < limit.free_bytes <= limit.limit_bytes and limit.path.is_file()
