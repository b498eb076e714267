"""The cost model: how long each job and each transfer of the pipeline takes on a :class:`Machine`.

:func:`machine_from_profile` turns what ``klotski-tier bench`` measured into a :class:`Machine`:

- compute: the profile times one routed expert and one decode attention layer at a few token
  counts. Their FLOPs and weight bytes follow from the profiled model's shape, so the three
  rates of :class:`ComputeRates` are fitted to the expert times (least squares in log time over
  a grid of overheads, each point in the regime, arithmetic or weights, that fits it), and the
  attention times left over per sequence give ``sequence_overhead_s`` (the engine attends one
  sequence at a time). The bench times each job as the engine runs it, handed to a
  ``ComputeRunner`` and awaited (:mod:`klotski_tier.core.bench.compute`), so the fitted job overhead
  already holds the hand-off to the compute thread: on this 2-core CPU ~0.4 ms median and ~1 ms mean
  after a multi-threaded op (its OpenMP worker spins for the core the event loop needs), where an
  empty job costs 0.1 ms. Every compute job of the pipeline pays it, the tiny ones (routing,
  gather, combine) included; the bench measures it alone as ``expert_s[0]``, which then is the
  fit's overhead. A profile from an older bench (ops timed directly) understates it:
  run ``klotski-tier bench`` again;
- the drive: ``drive.best`` (the engine's fastest cold read path) at its queue depth; on a CPU
  device, the lower rate the drive kept while compute ran beside it (``compute.io_read_gbps``,
  measured with the slowdown below), as a pipelined step reads while it computes (:func:`drive_gbps`);
- zstd: one thread's decoding rate; host to device: pinned copies on CUDA. On a CPU device the
  engine still copies every block into a second buffer (the "device" tier) in one thread:
  ``CPU_COPY_GBPS`` is that copy's rate, measured on this machine with fresh 5.25 MiB buffers;
- I/O contention: ``compute.io_slowdown`` becomes the machine's ``io_compute_slowdown`` c: compute
  progresses at 1/(1+c) of its rate while the drive reads (over a span where the drive reads for D
  seconds beside compute, compute needs D*c/(1+c) more). ``klotski-tier bench`` times the pipeline's
  expert job alone and while its test file streams at full speed (O_DIRECT, the best read's blocks
  and queue depth, xxh3 of each block; :mod:`klotski_tier.core.bench.contention`). On this 2-core
  CPU VM a thread streaming 16 MiB O_DIRECT reads slowed the demo's decode compute by +0% at
  0.5 GB/s, +13-19% at 1.0 GB/s and +58-62% at full speed (1.3-1.5 GB/s). The bench's figure there,
  ``measure_contention(Path("/work/benchtmp/t.bin"), expert_jobs(None, (1, 128)), block_bytes=64 MiB,
  threads=2, rounds=6)`` (the demo's expert, the full bench's settings): c = 0.55 at 1.31 GB/s
  (0.55-0.67 in three runs; 0.22-0.62 earlier the same day, the VM's speed drifting); the 128-token
  job takes +50-70%, the 1-token one (mostly the hand-off) +0-20%. Only drive reads count (not
  host-to-device copies, not blocks at home in host RAM): the step model
  (:mod:`klotski_tier.core.plan.pipeline_model`) and the simulator
  (:mod:`klotski_tier.core.plan.sim_hardware`) charge it the same way. A profile of an older
  bench lacks the figure: 0, and the machine's
  ``source`` says "not measured: run klotski-tier bench again";

:class:`CostModel` gives the time of every compute job the pipeline runs (attention per batch,
routing per batch, one expert over its tokens, ...) and of moving one block from its home (disk,
optionally compressed, or host) to the device, plus the device bytes a batch group holds outside
weights (KV cache, activations), with the same formulas as the engine. Block sizes are the
engine's: aligned views as :mod:`klotski_tier.core.model.layouts` places them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from klotski_tier.core.bench.profile import ComputeProfile, MachineProfile
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.families import family_of
from klotski_tier.core.model.spec import ModelSpec, QKNorm
from klotski_tier.core.plan.machine import ComputeRates, Machine
from klotski_tier.core.runtime.activations import RESIDUAL_SLOTS
from klotski_tier.core.runtime.config import DEVICE_ACTIVATIONS, DEVICE_KV, DISK_KV, HOST_KV, KV_SLOTS
from klotski_tier.core.units import GB, align_up

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

RUN_UNIT_BYTES = 4096  # the layouts' alignment of a block's file runs (O_DIRECT's unit)
CPU_COPY_GBPS = 4.3
"""Host-to-"device" copy rate on a CPU device: ``copy_`` of 5.25 MiB into freshly allocated buffers in
the device driver's thread, median, this machine (4.3 GB/s; 7.3 GB/s into reused buffers)."""
FP32_BYTES = 4  # routing weights, expert contributions and logits are float32 in the engine
PIPELINE_JOB_GAP_S = {"cpu": 7e-4, "cuda": 0.0}
"""Seconds the pipeline's event loop spends between two compute jobs beyond the bare hand-off the bench
measures: releasing the lease, pumping prefetches, the I/O completions and task steps queued meanwhile.
CPU: the demo's decode on this machine (2 shared cores), mean gap between compute spans outside
bubbles (0.73-1.4 ms over n = 1..8, bs = 4, from ``Engine.generate(timeline=True)``) less the bench's
hand-off (0.14 ms). CUDA: not measured here; the hand-off in the bench figures stands for it."""
HANDOFF_TOKENS = 0  # ``expert_s[0]`` of a profile: the hand-off to the compute thread alone
OVERHEAD_GRID = 200  # candidate job overheads tried by the fit, from 0 to just below the fastest job
MATMUL_FLOPS = 2  # one multiply-add per weight and token
HOST_SEQUENCE_OVERHEAD_S = 20e-6
"""Decode attention on the host's cores: one attention call per sequence (runtime/host_attention.py),
about 20 us each on a modern x86 core beside the bytes it reads."""


@dataclass(frozen=True)
class BlockSizes:
    """Bytes of each kind of block, as the engine lays them out (aligned views, aligned end)."""

    embed: int
    head: int
    attn: int
    gate: int
    expert: int
    num_layers: int
    num_experts: int

    @property
    def layer(self) -> int:
        """One whole layer: attention, gate and every expert."""
        return self.attn + self.gate + self.num_experts * self.expert

    @property
    def total(self) -> int:
        return self.embed + self.head + self.num_layers * self.layer

    @property
    def largest(self) -> int:
        return max(self.embed, self.head, self.attn, self.gate, self.expert)


def _image(view_bytes: list[int], runs: int = 1) -> int:
    """Bytes of a block buffer holding these views as the engine lays a checkpoint's block out
    (:func:`klotski_tier.core.model.layouts.place_runs`): its tensors in ``runs`` file runs, each
    rounded up to whole 4 KiB units plus one. Exact where the runs hold whole units; where the file
    puts other tensors between a block's, a unit or two more."""
    return align_up(sum(view_bytes), RUN_UNIT_BYTES) + runs * RUN_UNIT_BYTES


def block_sizes(spec: ModelSpec) -> BlockSizes:
    """The engine's block sizes for ``spec`` (see the role table of :mod:`klotski_tier.core.model.blocks`)."""
    item, hidden, q, kv = spec.dtype.itemsize, spec.hidden_size, spec.q_size, spec.kv_size
    attn = [hidden, q * hidden, kv * hidden, kv * hidden, hidden * q]
    if spec.qkv_bias:
        attn += [q, kv, kv] + ([hidden] if family_of(spec.family).o_bias_with_qkv else [])
    if spec.qk_norm is QKNorm.PER_HEAD:
        attn += [spec.head_dim, spec.head_dim]
    elif spec.qk_norm is QKNorm.FULL:
        attn += [q, kv]
    gate = [hidden, spec.num_experts * hidden]
    shared = spec.shared_expert_intermediate_size
    if shared:
        gate += [2 * shared * hidden, hidden * shared, hidden]
    inter = spec.expert_intermediate_size
    return BlockSizes(
        embed=_image([spec.vocab_size * hidden * item]),
        head=_image([hidden * item, spec.vocab_size * hidden * item], runs=2),  # the final norm apart
        attn=_image([n * item for n in attn], runs=2),  # the input norm apart from self_attn.*
        gate=_image([n * item for n in gate], runs=2),  # the post-attention norm apart
        expert=_image([2 * inter * hidden * item, hidden * inter * item]),  # w1, w2, w3 back to back
        num_layers=spec.num_layers,
        num_experts=spec.num_experts,
    )


@dataclass(frozen=True)
class Transfer:
    """Moving one block from its home to the device: the time of each stage it passes."""

    nbytes: int
    disk_s: float  # reading it (its compressed bytes when compressed) at the drive's full rate
    decode_s: float  # decompressing it in one disk thread (0 when not compressed)
    copy_s: float  # host to device
    io_threads: int

    @property
    def drive_share(self) -> float:
        """Share of this block's streaming time (:attr:`bottleneck_s`) during which the drive reads: 1
        when the drive is the slowest stage, less when decoding or the copy is, 0 from host RAM."""
        bottleneck = self.bottleneck_s
        return self.disk_s / bottleneck if bottleneck > 0 else 0.0

    @property
    def bottleneck_s(self) -> float:
        """Time per block when many stream back to back: the slowest stage (decoding runs on every
        disk thread at once)."""
        return max(self.disk_s, self.decode_s / self.io_threads, self.copy_s)


NO_TRANSFER = Transfer(0, 0.0, 0.0, 0.0, 1)


class CostModel:
    """Seconds of every compute job and block transfer of ``spec`` on ``machine``."""

    def __init__(self, spec: ModelSpec, machine: Machine) -> None:
        self.spec = spec
        self.machine = machine
        self.rates = machine.compute
        self.sizes = block_sizes(spec)

    # ---- compute jobs ---------------------------------------------------------------------

    def expert_s(self, tokens: float) -> float:
        """One routed expert over ``tokens`` tokens (0 when it has none: the engine skips it)."""
        if tokens <= 0:
            return 0.0
        flops = 3 * MATMUL_FLOPS * self.spec.hidden_size * self.spec.expert_intermediate_size * tokens
        return self.rates.seconds(flops, self.sizes.expert)

    def expert_s_array(self, tokens: FloatArray) -> FloatArray:
        """:meth:`expert_s` of each entry of ``tokens`` (any shape)."""
        spec, rates = self.spec, self.rates
        flops = 3 * MATMUL_FLOPS * spec.hidden_size * spec.expert_intermediate_size * tokens
        seconds = rates.job_overhead_s + np.maximum(
            flops / rates.flops_per_s, self.sizes.expert / rates.weight_bytes_per_s
        )
        return np.where(tokens > 0, seconds, 0.0)

    def attention_s(self, sequences: int, query_tokens: int, context_tokens: int) -> float:
        """Attention of one batch: ``sequences`` sequences of ``query_tokens`` new tokens each (1 to
        decode, the prompt to prefill), after ``context_tokens`` cached ones."""
        spec, item = self.spec, self.spec.dtype.itemsize
        q, kv, hidden = spec.q_size, spec.kv_size, spec.hidden_size
        tokens = sequences * query_tokens
        keys = query_tokens * context_tokens + query_tokens * (query_tokens + 1) / 2  # causal pairs
        flops = MATMUL_FLOPS * tokens * hidden * (2 * q + 2 * kv) + 2 * MATMUL_FLOPS * q * sequences * keys
        kv_bytes = sequences * (context_tokens + query_tokens) * 2 * kv * item
        rates = self.rates
        extra = rates.attention_overhead_s + sequences * rates.sequence_overhead_s
        return rates.seconds(flops, self.sizes.attn + kv_bytes) + extra

    def projection_s(self, sequences: int, query_tokens: int) -> float:
        """The device's part of an attention whose core runs on the host (runtime/host_attention.py):
        the input norm and the q/k/v and output projections of one batch."""
        spec = self.spec
        tokens = sequences * query_tokens
        flops = MATMUL_FLOPS * tokens * spec.hidden_size * (2 * spec.q_size + 2 * spec.kv_size)
        return self.rates.seconds(flops, self.sizes.attn) + self.rates.attention_overhead_s

    def host_attention_s(self, sequences: int, context_tokens: int) -> float | None:
        """One batch's decode attention over its cache in host RAM on the host's cores: reading
        ``context_tokens`` + 1 keys and values of each sequence, a call per sequence, and its queries,
        new entries and outputs across the link; None where the machine's rate is not known."""
        spec = self.spec
        per_token = spec.kv_bytes_per_token() // spec.num_layers  # k and v of one token in one layer
        read = self.machine.host_attention_seconds(sequences * (context_tokens + 1) * per_token)
        if read is None:
            return None
        crossing = sequences * (2 * spec.q_size * spec.dtype.itemsize + per_token)  # q and out, new k, v
        return read + sequences * HOST_SEQUENCE_OVERHEAD_S + self.machine.host_to_device_seconds(crossing)

    def gate_s(self, tokens: int) -> float:
        """Routing one batch's ``tokens`` tokens (norm, router, top-k; the shared expert if any)."""
        spec = self.spec
        flops = MATMUL_FLOPS * tokens * spec.hidden_size * spec.num_experts
        flops += 3 * MATMUL_FLOPS * tokens * spec.hidden_size * spec.shared_expert_intermediate_size
        return self.rates.seconds(flops, self.sizes.gate)

    def gather_s(self, tokens: int) -> float:
        """Gathering the routed tokens of all n batches and zeroing their contributions."""
        return self.rates.seconds(0.0, self._contribution_bytes(tokens))

    def combine_s(self, tokens: int) -> float:
        """Summing one batch's expert contributions into its residual stream."""
        return self.rates.seconds(0.0, self._contribution_bytes(tokens))

    def embed_s(self, tokens: int) -> float:
        return self.rates.seconds(0.0, tokens * self.spec.hidden_size * self.spec.dtype.itemsize)

    def head_s(self, sequences: int) -> float:
        """Final norm and LM head over each sequence's last token."""
        flops = MATMUL_FLOPS * sequences * self.spec.hidden_size * self.spec.vocab_size
        return self.rates.seconds(flops, self.sizes.head)

    def _contribution_bytes(self, tokens: int) -> int:
        return tokens * self.spec.top_k * self.spec.hidden_size * FP32_BYTES

    # ---- transfers ------------------------------------------------------------------------

    def transfer(
        self, nbytes: int, home: str, compression_ratio: float | None = None, *, into_device: bool = False
    ) -> Transfer:
        """Moving ``nbytes`` to the device from ``home``: "device" (already there), "host" or "disk";
        from disk, a compressed store reads ``nbytes / compression_ratio`` and decodes in a disk thread.
        ``into_device``: the read lands in the device buffer (a CPU device with no host budget), no copy."""
        machine = self.machine
        if home == "device":
            return NO_TRANSFER
        copy_s = 0.0 if into_device else machine.host_to_device_seconds(nbytes)
        if home == "host":
            return Transfer(nbytes, 0.0, 0.0, copy_s, machine.io_threads)
        if home != "disk":
            raise ConfigError(f"unknown block home {home!r}; use 'device', 'host' or 'disk'")
        ratio = compression_ratio or 1.0
        decode_s = nbytes / (machine.zstd_decompress_gbps * GB) if compression_ratio else 0.0
        disk_s = machine.disk_seconds(math.ceil(nbytes / ratio))
        return Transfer(nbytes, disk_s, decode_s, copy_s, machine.io_threads)

    # ---- memory outside weights -------------------------------------------------------------

    def kv_cache_bytes(self, batch_size: int, prompt_tokens: int, new_tokens: int) -> int:
        """KV cache of one batch, as :func:`klotski_tier.core.runtime.sequences.kv_cache_bytes`."""
        return batch_size * (prompt_tokens + new_tokens) * self.spec.kv_bytes_per_token()

    def kv_copy_s(self, batch_size: int, context: int, home: str = HOST_KV) -> float:
        """Seconds to bring one batch's KV cache of one layer (``context`` cached tokens) into a device
        slot and its new token's entries back, where the cache lives in host RAM (over the host-to-device
        link) or on the drive (read into a staging buffer, then over the link; written back the same
        way, a write priced as a read of its size)."""
        per_token = self.spec.kv_bytes_per_token() // self.spec.num_layers
        moved = batch_size * (context + 1) * per_token
        seconds = self.machine.host_to_device_seconds(moved)
        if home == DISK_KV:
            seconds += self.machine.disk_seconds(moved)
        return seconds

    def activation_bytes(self, batch_size: int, prompt_tokens: int) -> tuple[int, int]:
        """Activations of one batch in prefill, as :func:`klotski_tier.core.runtime.sequences.
        activation_bytes`: (held from phase to phase, held by one batch's attention and head at a time)."""
        spec = self.spec
        tokens = batch_size * prompt_tokens
        held = tokens * spec.hidden_size * spec.dtype.itemsize * (2 + spec.top_k)
        scores = spec.num_heads * prompt_tokens * prompt_tokens * FP32_BYTES  # one sequence's at a time
        return held, scores + batch_size * spec.vocab_size * FP32_BYTES

    def residual_bytes(self, batch_size: int, prompt_tokens: int) -> int:
        """A prefill's residual stream of one batch, as :func:`klotski_tier.core.runtime.sequences.
        residual_bytes`."""
        return batch_size * prompt_tokens * self.spec.hidden_size * self.spec.dtype.itemsize

    def residual_copy_s(self, batch_size: int, prompt_tokens: int) -> float:
        """Seconds over the host-to-device link of one batch's prefill residual stream, one way."""
        return self.machine.host_to_device_seconds(self.residual_bytes(batch_size, prompt_tokens))

    def fixed_device_bytes(
        self,
        batches: int,
        batch_size: int,
        prompt_tokens: int,
        new_tokens: int,
        kv_home: str = DEVICE_KV,
        activations_home: str = DEVICE_ACTIVATIONS,
        kv_device_layers: int = 0,
    ) -> int:
        """Device bytes of a group of ``batches`` full batches outside weights, as the engine reserves:
        their KV cache (with the cache away from the device, two slots of one layer of one batch) and
        activations (each batch's held ones, one batch's attention and head; with the residual streams
        in host RAM, two slots of them in prefill), as :func:`klotski_tier.core.runtime.sequences.
        group_activation_bytes`."""
        per_batch = self.kv_cache_bytes(batch_size, prompt_tokens, new_tokens)
        layers = self.spec.num_layers
        kv = batches * per_batch
        if kv_home != DEVICE_KV:  # two slots, and the first layers kept on the device
            kv = KV_SLOTS * per_batch // layers + batches * per_batch * kv_device_layers // layers
        held, at_once = self.activation_bytes(batch_size, prompt_tokens)
        if activations_home == DEVICE_ACTIVATIONS:
            return kv + batches * held + at_once
        residual = self.residual_bytes(batch_size, prompt_tokens)
        prefill = batches * (held - residual) + RESIDUAL_SLOTS * residual
        decode = (
            batches * batch_size * self.spec.hidden_size * self.spec.dtype.itemsize * (2 + self.spec.top_k)
        )
        return kv + max(prefill, decode) + at_once


def no_host_attention(machine: str, device: str) -> str:
    """Why decode attention cannot be placed on the host's cores of ``machine``, and what to do."""
    if device == "cpu":
        return (
            f"machine {machine!r} computes on its CPU: its attention already runs on the host's cores; "
            "leave [kv] attention on the device"
        )
    return (
        f"attention on the host is not priced on machine {machine!r}: its host_attention_gbps is not known; "
        "set it in a hardware file, or leave [kv] attention on the device"
    )


# ---- fitting a machine to a profile ---------------------------------------------------------


def fit_roofline(
    flops: FloatArray, weight_bytes: FloatArray, seconds: FloatArray, overhead_s: float | None = None
) -> ComputeRates:
    """``job_overhead_s``, ``flops_per_s`` and ``weight_bytes_per_s`` that best explain ``seconds``.

    For each overhead on a grid, each point is put in the regime its arithmetic intensity suggests
    (the most intense ones bound by arithmetic, the others by weights, for every split), each rate is
    the geometric mean its points imply, a regime without points gets the slowest rate that keeps it
    from binding, and the split's error is the squared log error of the roofline at every point.
    The best (overhead, split) wins; among equal errors the largest overhead. ``overhead_s``, when
    measured, is the only overhead tried.
    """
    order = np.argsort(flops / weight_bytes)  # least intense first
    f, w, s = flops[order], weight_bytes[order], seconds[order]
    best: tuple[float, float, float, float] | None = None  # (error, -overhead, 1/F, 1/W)
    grid = np.linspace(0.0, 0.999 * float(s.min()), OVERHEAD_GRID)
    for overhead in grid if overhead_s is None else [min(overhead_s, 0.999 * float(s.min()))]:
        busy = s - overhead
        for split in range(len(s) + 1):  # points [split:] are bound by arithmetic
            per_flop, per_byte = _regime_rates(f, w, busy, split)
            model = overhead + np.maximum(f * per_flop, w * per_byte)
            error = float(np.sum(np.log(model / s) ** 2))
            candidate = (round(error, 12), -float(overhead), per_flop, per_byte)
            if best is None or candidate < best:
                best = candidate
    assert best is not None
    _, overhead, per_flop, per_byte = best
    return ComputeRates(1.0 / per_flop, 1.0 / per_byte, -overhead)


def _regime_rates(f: FloatArray, w: FloatArray, busy: FloatArray, split: int) -> tuple[float, float]:
    """Seconds per FLOP and per weight byte implied by the points of each regime."""
    per_flop = float(np.exp(np.mean(np.log(busy[split:] / f[split:])))) if split < len(f) else 0.0
    per_byte = float(np.exp(np.mean(np.log(busy[:split] / w[:split])))) if split > 0 else 0.0
    if split == len(f):  # no arithmetic-bound point: arithmetic just never binds
        per_flop = float(np.min(w * per_byte / f))
    if split == 0:  # no weight-bound point: weights just never bind
        per_byte = float(np.min(f * per_flop / w))
    return per_flop, per_byte


def machine_from_profile(
    profile: MachineProfile,
    spec_of_profile_model: ModelSpec,
    *,
    device_memory_bytes: int | None = None,
    name: str = "this machine",
    source: str = "klotski-tier bench profile",
) -> Machine:
    """This machine as the profile measured it (see the module docstring for each figure).

    ``spec_of_profile_model`` is the model the profile's compute figures were measured on (the
    demo's spec for ``compute.model == "demo"``). ``device_memory_bytes`` defaults to the host's
    memory on a CPU device; a CUDA profile does not record the GPU's memory, so pass it.
    """
    compute, host = profile.compute, profile.host
    if not compute.expert_s or not compute.attention_s:
        raise ConfigError("the machine profile has no compute figures; run `klotski-tier bench` again")
    cpu = compute.device == "cpu"
    if device_memory_bytes is None and not cpu:
        raise ConfigError("a CUDA profile does not record the GPU's memory; pass device_memory_bytes")
    rates = _fit_compute(spec_of_profile_model, profile)
    if cpu:
        h2d: float | None = CPU_COPY_GBPS
    else:
        h2d = profile.h2d.pinned_gbps if profile.h2d is not None else None
    return Machine(
        name=name,
        source=f"{source}, measured {profile.created} on {host.hostname}{_contention_note(compute)}",
        device="cpu" if cpu else "cuda",
        device_memory_bytes=host.memory_bytes if device_memory_bytes is None else device_memory_bytes,
        host_memory_bytes=host.memory_bytes,
        disk_read_gbps=drive_gbps(profile),
        host_to_device_gbps=h2d,
        compute=rates,
        zstd_decompress_gbps=profile.zstd.decompress_gbps,
        io_threads=profile.drive.best.queue_depth,
        io_compute_slowdown=compute.io_slowdown,
    )


def drive_gbps(profile: MachineProfile) -> float:
    """The drive's rate as a pipelined step sees it: the best cold read path's, or on a CPU device the
    rate the drive kept while the compute thread ran beside it, when the bench measured that and it is
    lower (on this machine 1.30 GB/s against 3.07 alone: the reads' own CPU work, checksums and
    completions, waits for cores the compute holds)."""
    best, compute = profile.drive.best.gbps, profile.compute
    if compute.device == "cpu" and compute.io_measured:
        return min(best, compute.io_read_gbps)
    return best


def _contention_note(compute: ComputeProfile) -> str:
    """What the source says about compute while the drive streams (see the module docstring)."""
    if compute.io_measured:
        return (
            f"; compute +{compute.io_slowdown:.0%} while the drive streams at {compute.io_read_gbps:.2f} GB/s"
        )
    level = logging.WARNING if compute.device == "cpu" else logging.INFO  # a GPU computes in its own memory
    logger.log(
        level,
        "the machine profile does not say how much slower compute runs while the drive streams "
        "(not measured: run klotski-tier bench again); taking it as unaffected",
    )
    return "; compute beside drive reads not measured: run klotski-tier bench again"


def _fit_compute(spec: ModelSpec, profile: MachineProfile) -> ComputeRates:
    """The roofline of the expert figures (the hand-off included) and the attention's per-sequence rest."""
    compute = profile.compute
    unit = CostModel(spec, _unit_machine(compute.device))
    handoff = compute.expert_s.get(HANDOFF_TOKENS)  # measured by newer benches: pins the job overhead
    tokens = np.array(sorted(t for t in compute.expert_s if t != HANDOFF_TOKENS), dtype=np.float64)
    flops = 3 * MATMUL_FLOPS * spec.hidden_size * spec.expert_intermediate_size * tokens
    weights = np.full_like(tokens, unit.sizes.expert)
    measured = np.array([compute.expert_s[int(t)] for t in tokens])
    rates = fit_roofline(flops, weights, measured, handoff)
    fitted = CostModel(spec, _unit_machine(compute.device, rates))
    sequences = sorted(t for t in compute.attention_s if t != HANDOFF_TOKENS)
    rest = [compute.attention_s[t] - fitted.attention_s(t, 1, compute.context_tokens) for t in sequences]
    per_job, per_sequence = fit_line(np.array(sequences, dtype=np.float64), np.array(rest))
    logger.info(
        "fitted %s; attention +%.3f ms per job, +%.3f ms per sequence",
        rates,
        per_job * 1e3,
        per_sequence * 1e3,
    )
    gap = PIPELINE_JOB_GAP_S["cpu" if compute.device == "cpu" else "cuda"]
    return ComputeRates(
        rates.flops_per_s, rates.weight_bytes_per_s, rates.job_overhead_s + gap, per_job, per_sequence
    )


def fit_line(x: FloatArray, y: FloatArray) -> tuple[float, float]:
    """Intercept and slope, both >= 0, of the least-squares line through (x, y)."""
    if len(x) >= 2:
        slope, intercept = np.polyfit(x, y, 1)
        if slope >= 0 and intercept >= 0:
            return float(intercept), float(slope)
        if slope < 0:  # flat: only the intercept
            return max(0.0, float(np.mean(y))), 0.0
    return 0.0, max(0.0, float(np.sum(x * y) / np.sum(x * x)))  # through the origin


def _unit_machine(device: str, rates: ComputeRates | None = None) -> Machine:
    """A machine that only carries ``rates`` (the fit's scratch: no memory, links at 1 GB/s)."""
    return Machine(
        name="fit",
        source="fit",
        device="cpu" if device == "cpu" else "cuda",
        device_memory_bytes=0,
        host_memory_bytes=0,
        disk_read_gbps=1.0,
        host_to_device_gbps=None,
        compute=rates or ComputeRates(1.0, 1.0, 0.0),
        zstd_decompress_gbps=1.0,
        io_threads=1,
    )
