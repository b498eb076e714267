"""The systems compared, the memory budget they share, and the worker job of each.

Budget. Every system gets the same cgroup limit: ``weight_bytes + allowance_bytes``.

- ``weight_bytes``: a fraction of the model's bytes (``--budget``, e.g. 0.25): the memory for
  model state, i.e. weights, KV cache, activations and whatever page cache the system's reads
  leave behind.
- ``allowance_bytes``: what the runtime itself takes (interpreter, torch, transformers,
  accelerate, the engine's code), measured in the same run as the peak of an idle worker that
  imports them all, plus a margin for thread stacks and allocator arenas. It is the same for
  every system.

Inside that limit each system is configured for the weight budget (its configuration is stated
in the results):

- ``accelerate``: ``max_memory={"cpu": weight_bytes - KV/activations of its batch}`` (the same
  estimate the engine reserves for its own grouping), the rest of the model on ``"disk"``, with
  the largest batch that fits: all N prompts at once, halved after each run killed for memory;
- ``llamacpp``: llama.cpp (built from source, CPU only) on the checkpoint's bf16 GGUF, memory-mapped
  as llama.cpp does by default, all N prompts as N parallel sequences of one batch, on every core this
  process may use (see :mod:`benchmarks.e2e.llamacpp_peer`); it has no budget of its own: the cgroup
  limit is what keeps its mapped weights from staying resident. Its bf16 kernels are not torch's, so
  its tokens are checked by the near-tie rule (:mod:`benchmarks.e2e.near_tie`), not for identity;
- ``sequential``, ``flexgen``, ``ondemand-lru``: the engine with those presets (when the preset is
  registered; else the system is skipped, saying so); batches and batch size from the preset when
  it sets them, else like ``klotski``;
- ``klotski``: the engine's defaults, configured by ``--klotski-config``: ``plan`` (the default) takes
  n, bs, K, host preload and eviction from the planner for these budgets (see :mod:`benchmarks.e2e.planning`;
  ``--batch-size`` and ``--klotski-hot-experts``, when given, are fixed and the plan is made around
  them); ``sweep`` keeps K = ``--klotski-hot-experts`` ("all" by default: with N x top-k tokens per
  layer every expert is activated, so the whole next layer is prefetched; Klotski's reordering
  still runs resident experts first), ``sweep`` eviction, and n the best of a sweep over ``--batches``;
- every engine system but a planned ``klotski`` runs all N prompts as one batch group: bs = ceil(N / n)
  unless ``--batch-size`` is given (``sequential`` and ``ondemand-lru``: one batch of N);
- the engine's systems read the checkpoint's safetensors with O_DIRECT, as the engine does by default
  (``--engine-reads store``: the model's packed store, checksummed), no page cache; with no GPU the
  device is the CPU, so the whole weight budget is the device tier and blocks are read from disk
  straight into it (host budget 0); with a GPU, the host tier would stage ``STAGING_BLOCKS``
  largest blocks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.e2e.llamacpp_peer import LlamaCppSetup, eos_token_ids
from benchmarks.e2e.worker import ACCELERATE, ENGINE, LLAMACPP, Job
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.layouts import largest_block_bytes
from klotski_tier.core.runtime.presets import preset_fields
from klotski_tier.core.runtime.run import fixed_device_bytes
from klotski_tier.core.runtime.sequences import GenSequence
from klotski_tier.core.store.files import ModelFiles
from klotski_tier.core.units import format_size

KLOTSKI = "klotski"
BOUND = "bound"
BOUND_BESIDE_READS = "bound-beside-reads"  # the bound's run with the drive reading what must move beside it
PRESET_SYSTEMS = ("sequential", "flexgen", "ondemand-lru")
SYSTEMS = (ACCELERATE, LLAMACPP, *PRESET_SYSTEMS, KLOTSKI)
NEAR_TIE_SYSTEMS = (LLAMACPP, ACCELERATE)  # other bf16 kernels: checked by benchmarks.e2e.near_tie
SINGLE_BATCH_SYSTEMS = ("sequential", "ondemand-lru")  # one batch per group by definition
DEVICE = "cpu"  # this machine has no GPU: every system computes on the CPU
DEVICE_NOTE = (
    "cpu: this machine has no GPU, so every system computes on the CPU and all tiers but disk are RAM"
)
STAGING_BLOCKS = 8  # host staging area of the engine: 2 x the disk tier's default queue depth of 4


@dataclass(frozen=True)
class Budget:
    """The memory every system gets: ``limit_bytes`` in its cgroup, ``weight_bytes`` of it for the model."""

    fraction: float  # of the model's bytes
    weight_bytes: int
    allowance_bytes: int  # the runtime's own memory, the same for every system

    @property
    def limit_bytes(self) -> int:
        return self.weight_bytes + self.allowance_bytes

    def describe(self) -> str:
        return (
            f"{self.fraction:g} of the model = {format_size(self.weight_bytes)} "
            f"(+ {format_size(self.allowance_bytes)} runtime = {format_size(self.limit_bytes)} cgroup limit)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "limit_bytes": self.limit_bytes}


def budget_for(fraction: float, model_bytes: int, allowance_bytes: int) -> Budget:
    if not fraction > 0:
        raise ConfigError(f"the budget must be a positive fraction of the model, got {fraction}")
    return Budget(fraction, int(fraction * model_bytes), allowance_bytes)


def preset_problem(name: str) -> str | None:
    """Why the engine preset ``name`` cannot be used (not registered yet), or None."""
    try:
        preset_fields(name)
    except ConfigError as exc:
        return f"preset {name!r} is not registered in klotski_tier.core.runtime.presets yet ({exc})"
    return None


def preset_batching(name: str | None) -> tuple[int | None, int | None]:
    """(batches, batch_size) the preset fixes, None where it leaves them to the benchmark."""
    fields = preset_fields(name) if name is not None else {}
    return fields.get("batches"), fields.get("batch_size")


def engine_budgets(weight_bytes: int, reserved_bytes: int, files: ModelFiles) -> tuple[int, int]:
    """(device, host) byte budgets splitting ``weight_bytes``.

    On a CPU device the device's memory is host memory: the whole budget goes to the device tier
    and the host tier is off (budget 0), so blocks are read from disk straight into the buffers
    compute uses. On a GPU, host stages ``STAGING_BLOCKS`` largest blocks (at least one) and the
    device keeps at least its minimum working set (``reserved_bytes`` of KV cache and activations
    plus one largest block) where the budget allows.
    """
    if DEVICE == "cpu":
        return weight_bytes, 0
    largest = largest_block_bytes(files.layouts)
    host = max(largest, min(STAGING_BLOCKS * largest, weight_bytes - reserved_bytes - largest))
    return weight_bytes - host, host


@dataclass(frozen=True)
class Inputs:
    """The checkpoint, the prompts (token ids) and the new tokens every system runs."""

    model: Path
    prompts: list[list[int]]
    new_tokens: int
    store: Path | None = None  # the model's packed store, when the engine's systems read it (else the model)
    llamacpp: LlamaCppSetup | None = None  # llama.cpp's driver and the model's GGUF (when it runs)


def engine_job(
    system: str,
    work: Inputs,
    files: ModelFiles,
    budget: Budget,
    batches: int,
    batch_size: int,
    *,
    preset: str | None = None,
    trace_path: Path | None = None,
    hot_experts: int | str | None = None,
    host_preload: bool | None = None,
    eviction: str | None = None,
) -> Job:
    """A run of the engine within ``budget``, batch group n = ``batches`` x bs = ``batch_size``
    (``hot_experts``, ``host_preload``, ``eviction``: None leaves them to the preset or the engine's
    defaults)."""
    options: dict[str, Any] = {
        "batches": batches,
        "batch_size": batch_size,
        **budget_options(work, files, budget, batches, batch_size),
    }
    if hot_experts is not None:
        options["hot_experts"] = hot_experts
    if host_preload is not None:
        options["host_preload"] = host_preload
    if eviction is not None:
        options["eviction"] = eviction
    return Job(
        system, ENGINE, str(work.store or work.model), work.prompts, work.new_tokens, preset=preset,
        engine_options=options, trace_path=None if trace_path is None else str(trace_path),
    )  # fmt: skip


def budget_options(
    work: Inputs, files: ModelFiles, budget: Budget, batches: int, batch_size: int
) -> dict[str, Any]:
    """The EngineOptions fields that put an engine within ``budget`` (device and its two byte budgets),
    for groups of ``batches`` x ``batch_size`` (whose KV cache and activations a GPU device keeps)."""
    device, host = engine_budgets(budget.weight_bytes, fixed_bytes(work, files, batches, batch_size), files)
    return {"device": DEVICE, "device_memory_bytes": device, "host_memory_bytes": host}


def bound_job(
    work: Inputs, batches: int, batch_size: int, routing_path: Path | None, stream_bytes: int | None = None
) -> Job:
    """The engine with every weight resident: unlimited budgets, the model preloaded into RAM; with
    ``stream_bytes``, the drive reading that many bytes of the model beside its steps."""
    options = {"batches": batches, "batch_size": batch_size, "device": DEVICE, "host_preload": True}
    return Job(
        BOUND if stream_bytes is None else BOUND_BESIDE_READS, ENGINE, str(work.store or work.model),
        work.prompts, work.new_tokens, engine_options=options,
        routing_path=None if routing_path is None else str(routing_path), stream_bytes=stream_bytes,
    )  # fmt: skip


def accelerate_job(
    work: Inputs, files: ModelFiles, budget: Budget | None, batch_size: int, offload_dir: Path
) -> Job:
    """transformers + accelerate with the weights that fit ``budget`` in RAM, the rest on disk
    (``budget`` None: every weight in RAM)."""
    weights = None
    if budget is not None:
        weights = max(budget.weight_bytes - accelerate_reserve_bytes(work, files, batch_size), 0)
    return Job(
        ACCELERATE, ACCELERATE, str(work.model), work.prompts, work.new_tokens,
        weight_budget_bytes=weights, batch_size=batch_size, offload_dir=str(offload_dir),
    )  # fmt: skip


def llamacpp_job(work: Inputs, setup: LlamaCppSetup) -> Job:
    """llama.cpp's driver on the model's GGUF: every prompt at once, greedy, stopping at the model's EOS."""
    if setup.driver is None or setup.gguf is None:
        raise ConfigError(f"llama.cpp is not set up: {setup.problem or 'no driver or GGUF'}")
    return Job(
        LLAMACPP, LLAMACPP, str(setup.gguf), work.prompts, work.new_tokens, driver=str(setup.driver),
        eos_token_ids=eos_token_ids(work.model),
    )  # fmt: skip


def describe_llamacpp(job: Job, setup: LlamaCppSetup, details: dict[str, Any] | None = None) -> str:
    """The configuration of a llama.cpp job in words (``details``: the driver's figures, once run)."""
    n, p = len(job.prompts), max((len(ids) for ids in job.prompts), default=0)
    threads = f"{details['threads']} threads" if details and details.get("threads") else "a thread per core"
    return (
        f"llama.cpp {setup.version} (llama-cpp-python sdist), CPU build -march=native, bf16 GGUF mmapped, "
        f"{n} prompts as {n} parallel sequences, n_batch = n_ubatch = {n * p}, {threads}, greedy"
    )


def accelerate_reserve_bytes(work: Inputs, files: ModelFiles, batch_size: int) -> int:
    """KV cache and activations of one generate batch, estimated as the engine estimates its own."""
    return fixed_bytes(work, files, 1, batch_size)


def fixed_bytes(work: Inputs, files: ModelFiles, batches: int, batch_size: int) -> int:
    """The engine's estimate of the KV cache and activations of the largest group of n x bs prompts."""
    size = batches * batch_size
    seqs = [GenSequence(i, ids, work.new_tokens) for i, ids in enumerate(work.prompts)]
    groups = [seqs[i : i + size] for i in range(0, len(seqs), size)]
    return fixed_device_bytes(files, groups, batch_size)


def describe_engine(job: Job) -> str:
    """The configuration of an engine job in words."""
    opts = job.engine_options
    preset = f"preset {job.preset}, " if job.preset else ""
    device, host = format_size(opts["device_memory_bytes"]), format_size(opts["host_memory_bytes"])
    hot = f", K={opts['hot_experts']}" if "hot_experts" in opts else ""
    preload = ", host preload" if opts.get("host_preload") else ""
    eviction = f", {opts['eviction']} eviction" if "eviction" in opts else ""
    return (
        f"{preset}n={opts['batches']} x bs={opts['batch_size']}{hot}{preload}{eviction}, "
        f"device {device} + host {host}"
    )


def describe_accelerate(job: Job, placed: dict[str, int] | None = None) -> str:
    """The configuration of an accelerate job in words (``placed``: bytes per device, once known)."""
    where = ""
    if placed:
        where = ", " + " + ".join(f"{format_size(n)} on {d}" for d, n in sorted(placed.items()))
    if job.weight_budget_bytes is None:
        return f"batch {job.batch_size}, every weight in RAM"
    budget = format_size(job.weight_budget_bytes)
    return f"batch {job.batch_size}, max_memory cpu {budget}{where}, offload_folder on the model's drive"
