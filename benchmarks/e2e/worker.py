"""One system in one process: ``python -m benchmarks.e2e.worker JOB.json`` prints one result line.

The parent (:mod:`benchmarks.e2e.runner`) writes a :class:`Job`, starts this module inside the
system's memory cgroup (see :mod:`benchmarks.e2e.cgroup`), and reads the line of standard output
that starts with :data:`RESULT_MARK`: a JSON object with ``ok`` and either the measurements or
``error`` (one line). A failure inside the system is reported that way, never raised; a process
the kernel kills for its memory limit prints nothing, and the parent says so.

Kinds: ``engine`` (klotski-tier), ``accelerate`` (:mod:`benchmarks.e2e.accelerate_peer`),
``llamacpp`` (:mod:`benchmarks.e2e.llamacpp_peer`: llama.cpp's driver as this worker's child),
``reference-logits`` (:mod:`benchmarks.e2e.near_tie`: the reference model's logits after each
prompt, for the token check; result ``logits``, no measurements) and ``probe`` (the idle runtime).

Measurements (seconds, bytes): ``tokens`` (generated ids per prompt), ``generated_tokens``,
``decode_tokens``, ``prefill_s``, ``decode_s``, ``load_s`` (before the first step, not in the
throughput), ``compute_s`` (the engine's compute thread busy; null for accelerate and llama.cpp),
``streamed_bytes`` and ``stream_s`` (engine with ``stream_bytes``: what a stream of O_DIRECT reads
of the model's files beside the steps read, from the first step on, and how long it took; null if
the generation ended first), ``io_wait_s`` (compute waited for weights: the engine's bubbles; null
for accelerate, whose wait the parent estimates, see ``accelerate_peer``, and for llama.cpp), ``bytes_read``
(``read_bytes`` of ``/proc/self/io`` over the generation: what came from the drive; llama.cpp's
driver reads its own), ``rss_peak_bytes`` and ``details`` (the system's own figures: the engine's
metrics, accelerate's device map, llama.cpp's threads and batch).
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

RESULT_MARK = "E2E-RESULT "
"""Prefix of the result line on stdout (libraries may print lines of their own)."""
ENGINE = "engine"
ACCELERATE = "accelerate"
LLAMACPP = "llamacpp"
REFERENCE_LOGITS = "reference-logits"  # transformers' logits after each prompt (the token check's near-ties)
PROBE = "probe"  # an idle worker: imports every system's libraries, runs one small matmul, generates nothing
PROC_IO = Path("/proc/self/io")
KIB_BYTES = 1024  # ru_maxrss is in KiB on Linux
PROBE_MATMUL_SIZE = 512  # elements per side of the probe's warm-up matmul
MIB = 1 << 20


@dataclass(frozen=True)
class Job:
    """What one worker runs: a system, the model, the workload and the system's configuration."""

    system: str
    kind: str  # ENGINE, ACCELERATE, LLAMACPP, REFERENCE_LOGITS or PROBE
    model: str  # the checkpoint directory (the engine: its packed store; llama.cpp: its GGUF)
    prompts: list[list[int]]
    new_tokens: int
    preset: str | None = None  # engine: a preset name applied before engine_options
    engine_options: dict[str, Any] = field(default_factory=dict)  # engine: EngineOptions fields
    weight_budget_bytes: int | None = None  # accelerate: max_memory for the weights on "cpu"
    batch_size: int = 1  # accelerate: sequences per generate call
    offload_dir: str | None = None  # accelerate: offload_folder
    routing_path: str | None = None  # engine: save the run's routing trace here
    trace_path: str | None = None  # engine: save a Chrome trace of compute, I/O and bubbles here
    driver: str | None = None  # llamacpp: the compiled driver (benchmarks/e2e/llamacpp/greedy_batched.cpp)
    eos_token_ids: list[int] = field(default_factory=list)  # llamacpp: greedy stops after one of these
    stream_bytes: int | None = None  # engine: read this many bytes of the model's files beside its steps

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Job:
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def drive_read_bytes() -> int:
    """Bytes this process (all threads) caused to be read from storage so far."""
    for line in PROC_IO.read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        if key == "read_bytes":
            return int(value)
    return 0


def rss_peak_bytes() -> int:
    """The peak RSS of this process or of its largest finished child (llama.cpp's driver), if larger."""
    peaks = (resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return max(peaks) * KIB_BYTES


def run_engine(job: Job) -> dict[str, Any]:
    """Generate with the klotski-tier engine configured by ``job``; the measurements."""
    from klotski_tier.core.runtime.engine import Engine
    from klotski_tier.core.runtime.presets import build_options

    options = build_options(preset=job.preset, overrides=job.engine_options)
    started = time.perf_counter()
    engine = Engine.load(job.model, options)
    device_min, host_min = engine.minimum_budgets(job.prompts, max_new_tokens=job.new_tokens)
    load_s = time.perf_counter() - started
    read_before = drive_read_bytes()
    stream = _BesideSteps(Path(job.model), job.stream_bytes, preloads=options.host_preload)
    try:
        result = engine.generate(
            job.prompts,
            max_new_tokens=job.new_tokens,
            record_routing=job.routing_path is not None,
            timeline=job.trace_path is not None,
            progress=stream.progress,
        )
    finally:
        stream.close()
    bytes_read = drive_read_bytes() - read_before
    if job.routing_path is not None and result.routing is not None:
        result.routing.save(Path(job.routing_path))
    if job.trace_path is not None and result.timeline is not None:
        result.timeline.save(Path(job.trace_path))
    metrics = result.metrics
    return {
        "tokens": [out.token_ids for out in result.outputs],
        "generated_tokens": sum(len(out.token_ids) for out in result.outputs),
        "decode_tokens": metrics.decode_tokens,
        "prefill_s": metrics.prefill_s,
        "decode_s": metrics.decode_s,
        "load_s": load_s + metrics.wall_s - metrics.prefill_s - metrics.decode_s,  # + preload, if any
        "compute_s": metrics.compute_s,
        "io_wait_s": metrics.io_wait_s,
        "bytes_read": bytes_read,
        "fixed_bytes": device_min - host_min,  # KV cache and activations of the batch groups
        **stream.figures(),
        "details": {"options": _options_dict(options), "metrics": metrics.to_dict()},
    }


class _BesideSteps:
    """With a byte count: O_DIRECT reads of ``model``'s data files (its files of a MiB or more, in
    name order; a smaller file's read stops at its end), as fast as the drive goes, from the first
    step on (after a host preload, if any) until they cover the count: the drive's work of a schedule
    that reads the bytes that must move while the steps compute, without the schedule."""

    def __init__(self, model: Path, limit_bytes: int | None, *, preloads: bool) -> None:
        self._model_dir, self._limit = model, limit_bytes
        self._streamer: Any | None = None  # a DriveStreamer once started
        self._started_s = 0.0
        if limit_bytes and not preloads:
            self._start()

    def progress(self, phase: str, done: int, total: int) -> None:
        """The engine's progress callback: the preload's last block starts the stream."""
        if self._limit and self._streamer is None and phase == "preload" and done == total:
            self._start()

    def _start(self) -> None:
        from klotski_tier.core.bench.contention import DriveStreamer
        from klotski_tier.tiers.disk_defaults import DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_DEPTH

        sizes = {p: p.stat().st_size for p in self._model_dir.iterdir() if p.is_file()}
        least = min(MIB, max(sizes.values(), default=0))  # a tiny model's data file may be under a MiB
        files = sorted(p for p, size in sizes.items() if size >= least)
        streamer = DriveStreamer(
            files, DEFAULT_CHUNK_BYTES, DEFAULT_QUEUE_DEPTH, checksum=False, limit_bytes=self._limit
        )
        self._started_s = time.perf_counter()
        self._streamer = streamer.__enter__()

    def close(self) -> None:
        if self._streamer is not None:
            self._streamer.close()

    def figures(self) -> dict[str, Any]:
        if self._streamer is None:
            return {}
        done = self._streamer.finished_s
        return {
            "streamed_bytes": self._streamer.bytes_read,
            "stream_s": None if done is None else done - self._started_s,
        }


def _options_dict(options: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}


def run_probe() -> dict[str, Any]:
    """Load what any system loads before its model (the runtime's own memory), and nothing else."""
    import accelerate  # noqa: F401
    import torch
    import transformers.models.mixtral.modeling_mixtral  # noqa: F401

    import klotski_tier.core.runtime.engine  # noqa: F401

    square = torch.ones(PROBE_MATMUL_SIZE, PROBE_MATMUL_SIZE, dtype=torch.bfloat16)  # [S, S]
    float((square @ square).sum())  # starts the intra-op thread pool and the bf16 kernels
    return {}


def run(job: Job) -> dict[str, Any]:
    if job.kind == PROBE:
        return run_probe()
    if job.kind == ACCELERATE:
        from benchmarks.e2e.accelerate_peer import run_accelerate

        return run_accelerate(job)
    if job.kind == LLAMACPP:
        from benchmarks.e2e.llamacpp_peer import run_llamacpp

        return run_llamacpp(job)
    if job.kind == REFERENCE_LOGITS:
        from benchmarks.e2e.near_tie import run_reference_logits

        return run_reference_logits(job)
    if job.kind == ENGINE:
        return run_engine(job)
    kinds = ", ".join(repr(k) for k in (ENGINE, ACCELERATE, LLAMACPP, REFERENCE_LOGITS, PROBE))
    raise ValueError(f"unknown job kind {job.kind!r}; expected one of {kinds}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="worker: %(message)s")
    job = Job.load(Path(args[0]))
    try:
        result = {"ok": True, **run(job)}
    except Exception as exc:  # any failure of the system under test is a result, not a crash
        reason = str(exc).splitlines()[0] if str(exc) else ""
        logger.exception("system %s failed", job.system)
        result = {"ok": False, "error": f"{type(exc).__name__}: {reason}"}
    result["rss_peak_bytes"] = rss_peak_bytes()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
