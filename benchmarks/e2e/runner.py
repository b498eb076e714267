"""Runs one worker job in its own process and memory cgroup, page cache evicted first.

:meth:`Runner.run` is the only place a system is started: it evicts the checkpoint's pages,
writes the job file, creates the system's cgroup (limit = the budget), starts
``python -m benchmarks.e2e.worker JOB`` joined to it, waits (with a timeout), reads the result
line and the cgroup's peak and OOM-kill count, and removes the group. Whatever happens to the
child becomes a :class:`RunRecord`; nothing a system does can crash the benchmark.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.e2e.cgroup import MemoryGroup, check_available, group_name
from benchmarks.e2e.model import weight_files
from benchmarks.e2e.results import BenchmarkError, RunRecord
from benchmarks.e2e.worker import PROBE, RESULT_MARK, Job
from klotski_tier.core.store.pagecache import evict
from klotski_tier.core.units import MIB, format_size

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_MODULE = "benchmarks.e2e.worker"
RUNTIME_MARGIN_BYTES = 256 * MIB  # above the idle probe's peak: thread stacks, allocator arenas, kernels
DEFAULT_TIMEOUT_S = 3600.0  # one worker run; a slower system is reported as timed out
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",  # the checkpoint is local; no system may reach a hub
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


@dataclass(frozen=True)
class RunnerSettings:
    model_dir: Path
    scratch: Path  # job files, routing traces, accelerate's offload folders (on the model's drive)
    use_cgroup: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S


class Runner:
    """Starts workers, each in a fresh memory cgroup (unless cgroups are off), one at a time."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self.cgroup_parent = check_available() if settings.use_cgroup else None
        self._counter = itertools.count()
        settings.scratch.mkdir(parents=True, exist_ok=True)

    def run(self, job: Job, limit_bytes: int | None) -> RunRecord:
        """Run ``job`` in a worker under a memory limit of ``limit_bytes`` (None: no limit)."""
        for path in weight_files(self.settings.model_dir):
            evict(path)
        job_path = self.settings.scratch / f"job-{next(self._counter)}-{job.system}.json"
        job.save(job_path)
        argv = [sys.executable, "-m", WORKER_MODULE, str(job_path)]
        started = time.perf_counter()
        group = None
        if self.cgroup_parent is not None:
            group = MemoryGroup.create(group_name(job.system), limit_bytes, self.cgroup_parent)
        try:
            proc = self._spawn(group.wrap(argv) if group else argv)
            peak, kills = (group.peak_bytes(), group.oom_kills()) if group else (None, 0)
        finally:
            if group is not None:
                group.remove()
        record = _record(job.system, proc, peak, kills, limit_bytes, self.settings.timeout_s)
        outcome = "ok" if record.ok else f"failed: {record.reason}"
        logger.info("%s: %s (worker %.1f s)", job.system, outcome, time.perf_counter() - started)
        return record

    def runtime_allowance(self) -> int:
        """Memory the runtime alone takes (an idle worker importing every system), plus a margin."""
        probe = Job(PROBE, PROBE, str(self.settings.model_dir), [], 1)
        record = self.run(probe, None)
        if not record.ok or record.peak_bytes is None:
            raise BenchmarkError(f"the idle probe worker failed: {record.reason}; check the environment")
        allowance = record.peak_bytes + RUNTIME_MARGIN_BYTES
        logger.info(
            "runtime allowance %s (idle peak %s)", format_size(allowance), format_size(record.peak_bytes)
        )
        return allowance

    def _spawn(self, argv: list[str]) -> subprocess.CompletedProcess[str] | None:
        """The finished child, or None when it ran past the timeout (it is killed)."""
        env = {**os.environ, **WORKER_ENV}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        try:
            return subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=env,
                cwd=REPO_ROOT,
                timeout=self.settings.timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return None


def _record(
    system: str,
    proc: subprocess.CompletedProcess[str] | None,
    peak: int | None,
    kills: int,
    limit_bytes: int | None,
    timeout_s: float,
) -> RunRecord:
    """What a finished (or killed) worker process amounts to."""
    output = _result_line(proc.stdout) if proc is not None else None
    source = "cgroup" if peak is not None else "rss"
    if peak is None and output is not None:
        peak = output.get("rss_peak_bytes")
    oom = kills > 0 or (proc is not None and proc.returncode == -signal.SIGKILL and limit_bytes is not None)
    if output is not None and output.get("ok"):
        return RunRecord(system, True, output, peak, source)
    reason = _failure(proc, output, oom, peak, limit_bytes, timeout_s)
    return RunRecord(system, False, output or {}, peak, source, reason, oom=oom)


def _failure(
    proc: subprocess.CompletedProcess[str] | None,
    output: dict[str, Any] | None,
    oom: bool,
    peak: int | None,
    limit_bytes: int | None,
    timeout_s: float,
) -> str:
    if proc is None:
        return f"timed out after {timeout_s:.0f} s"
    if oom:
        limit = format_size(limit_bytes) if limit_bytes is not None else "its"
        held = f" (peak {format_size(peak)})" if peak is not None else ""
        return f"killed by the kernel's OOM killer at its {limit} cgroup limit{held}"
    if output is not None:
        return str(output.get("error", "failed without a reason"))
    tail = [line for line in proc.stderr.splitlines() if line.strip()]
    return f"exited with code {proc.returncode} and no result" + (f": {tail[-1].strip()}" if tail else "")


def _result_line(stdout: str) -> dict[str, Any] | None:
    """The worker's result object: the JSON after the last ``RESULT_MARK`` line."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK) :])
            return result
    return None
