"""What the benchmark measured: one worker run, a system's repeats and their medians, a budget point.

A :class:`RunRecord` is one worker process (its result line, the cgroup's peak, or why it failed);
a :class:`SystemResult` is a system's configuration and its repeats, summarised by medians; a
:class:`Point` is every system and the bound at one memory budget. :func:`check_tokens` enforces
that every system generated the same tokens.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from benchmarks.e2e.bound import Bound
from benchmarks.e2e.systems import Budget
from benchmarks.e2e.workload import Throughput
from klotski_tier.core.errors import KlotskiError

MEDIAN_FIELDS = ("prefill_s", "decode_s", "load_s", "compute_s", "io_wait_s", "bytes_read")


class BenchmarkError(KlotskiError):
    """The benchmark itself cannot go on (not a system under test failing: that is a result)."""


class TokenMismatch(BenchmarkError):
    """Two systems generated different tokens for the same prompt: the comparison is void."""


@dataclass(frozen=True)
class RunRecord:
    """One worker process: its measurements (``output``) or the reason it failed."""

    system: str
    ok: bool
    output: dict[str, Any]  # the worker's result object (see benchmarks.e2e.worker)
    peak_bytes: int | None  # the cgroup's memory.max_usage_in_bytes; else the worker's peak RSS
    peak_source: str  # "cgroup" or "rss"
    reason: str | None = None  # why it failed
    oom: bool = False  # killed by the kernel for exceeding its cgroup's limit

    @property
    def tokens(self) -> list[list[int]]:
        tokens: list[list[int]] = self.output.get("tokens", [])
        return tokens

    @property
    def throughput(self) -> Throughput:
        out = self.output
        return Throughput(out["generated_tokens"], out["decode_tokens"], out["prefill_s"], out["decode_s"])

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.output.items() if k != "tokens"}
        data.update(
            system=self.system,
            ok=self.ok,
            reason=self.reason,
            oom=self.oom,
            peak_bytes=self.peak_bytes,
            peak_source=self.peak_source,
        )
        if self.ok:
            data.update(tokens_per_s=self.throughput.tokens_per_s, total_s=self.throughput.total_s)
        return data


@dataclass
class SystemResult:
    """A system at one budget: its stated configuration, its runs, and their medians."""

    name: str
    config: str  # the configuration, in words ("n=4 x bs=2, device 520 MiB + host 132 MiB")
    runs: list[RunRecord] = field(default_factory=list)
    skipped: str | None = None  # why the system did not run at all (e.g. a preset not registered yet)
    notes: dict[str, Any] = field(default_factory=dict)  # sweeps tried to pick the configuration

    @property
    def ok(self) -> bool:
        return self.skipped is None and bool(self.runs) and all(run.ok for run in self.runs)

    @property
    def reason(self) -> str | None:
        """Why the system has no figures (skipped, or its first failed run), else None."""
        if self.skipped is not None:
            return self.skipped
        failed = [run.reason for run in self.runs if not run.ok]
        return failed[0] if failed else None

    def median(self, name: str) -> float | None:
        """The median of a run figure (None when a run lacks it)."""
        values = [_figure(run, name) for run in self.runs if run.ok]
        if not values or any(v is None for v in values):
            return None
        return float(statistics.median(v for v in values if v is not None))

    def to_dict(self) -> dict[str, Any]:
        medians = {
            name: self.median(name) for name in (*MEDIAN_FIELDS, "tokens_per_s", "decode_tokens_per_s")
        }
        medians["peak_bytes"] = self.median("peak_bytes")
        return {
            "name": self.name,
            "config": self.config,
            "ok": self.ok,
            "reason": self.reason,
            "median": medians if self.ok else None,
            "notes": self.notes,
            "runs": [run.to_dict() for run in self.runs],
        }


def _figure(run: RunRecord, name: str) -> float | None:
    if name == "tokens_per_s":
        return run.throughput.tokens_per_s
    if name == "decode_tokens_per_s":
        return run.throughput.decode_tokens_per_s
    if name == "peak_bytes":
        return None if run.peak_bytes is None else float(run.peak_bytes)
    value = run.output.get(name)
    return None if value is None else float(value)


@dataclass
class Point:
    """Every system and the lower bound at one memory budget."""

    budget: Budget
    systems: list[SystemResult]
    bound: Bound | None
    bound_runs: list[RunRecord] = field(default_factory=list)

    def system(self, name: str) -> SystemResult | None:
        return next((s for s in self.systems if s.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget.to_dict(),
            "bound": None if self.bound is None else self.bound.to_dict(),
            "bound_runs": [run.to_dict() for run in self.bound_runs],
            "systems": [s.to_dict() for s in self.systems],
        }


def check_tokens(reference: str, expected: list[list[int]], runs: list[RunRecord]) -> None:
    """Raise :class:`TokenMismatch` at the first prompt and position where a run differs from ``expected``."""
    for run in runs:
        if not run.ok:
            continue
        if len(run.tokens) != len(expected):
            raise TokenMismatch(
                f"{run.system} returned {len(run.tokens)} outputs for {len(expected)} prompts ({reference}: "
                f"{len(expected)}); the systems disagree"
            )
        for prompt, (got, want) in enumerate(zip(run.tokens, expected, strict=True)):
            for position in range(max(len(got), len(want))):
                mine = got[position] if position < len(got) else None
                theirs = want[position] if position < len(want) else None
                if mine != theirs:
                    raise TokenMismatch(
                        f"{run.system} generated {_token(mine)} at prompt {prompt}, position {position}, "
                        f"where {reference} generated {_token(theirs)}; the systems disagree, so the "
                        "comparison is void"
                    )


def _token(token: int | None) -> str:
    return "nothing" if token is None else f"token {token}"
