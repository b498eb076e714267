"""The measurements of ``klotski-tier bench``: drive reads, zstd, host-to-device copies, compute.

Each measurement is a plain function returning a dataclass of :mod:`klotski_tier.core.profile`;
:func:`run_bench` runs them all for one :class:`BenchSettings` and returns the machine profile.
The drive is measured with a test file written into the directory under test:

- raw: one O_DIRECT ``preadv`` of the whole file into one page-aligned buffer, page cache
  evicted first: the hardware reference (100%);
- engine: the file (its first ``PASS_BLOCKS`` blocks) read as the engine reads blocks: one piece per
  block through :meth:`DiskDriver.read_into` into a host-tier buffer, ``queue_depth`` blocks in
  flight on a driver of ``queue_depth`` threads; O_DIRECT, and buffered (pages dropped after
  each read, the driver's default); cold (evicted first), then warm (the same reads again).

A shared or virtual drive's bandwidth drifts by a factor of two within seconds, so every figure
is the median of ``read_rounds`` samples taken round-robin over all configurations, and the raw
read is sampled between them (:func:`measure_reads`). Buffers are touched before any clock
starts: no measurement times page faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from klotski_tier.core import demo, ops
from klotski_tier.core.blocks import (
    BlockKind,
    BlockLayout,
    BlockWeights,
    TensorPiece,
    attn_block,
    expert_block,
)
from klotski_tier.core.codec import ZSTD_DEFAULT_LEVEL, Bytes, Codec, CodecName, decode, encode
from klotski_tier.core.errors import ConfigError, TierError
from klotski_tier.core.layouts import load_model_files
from klotski_tier.core.pagecache import evict
from klotski_tier.core.profile import (
    PROFILE_VERSION,
    CacheState,
    ComputeProfile,
    DriveProfile,
    H2DProfile,
    HostInfo,
    MachineProfile,
    ReadMode,
    ReadResult,
    ZstdProfile,
)
from klotski_tier.core.sizes import GIB, KIB, MIB, format_size
from klotski_tier.core.spec import ModelSpec, QKNorm
from klotski_tier.tiers.direct import DIRECT_ALIGN_BYTES, O_DIRECT, aligned_empty
from klotski_tier.tiers.disk import DiskDriver
from klotski_tier.tiers.host import HostDriver

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""``progress(message)``: what the bench is measuring now (the CLI shows it on stderr)."""

GB = 1e9  # bandwidths are decimal GB/s, as drives and links are rated
TEST_FILE_NAME = "klotski-tier-bench.bin"
WRITE_CHUNK_BYTES = 16 * MIB  # the test file is written in chunks of random bytes
RAW_READ_MAX_BYTES = 1 * GIB  # largest single read of the raw measurement (Linux caps one at ~2 GiB)
READ_MODES: tuple[ReadMode, ...] = ("direct", "buffered")
PASS_BLOCKS = 256  # blocks one engine pass reads at most: a steady rate, and a full sweep in minutes
RAW_EVERY = 4  # a raw read before every 4th engine configuration of a round (see measure_reads)
ReadConfig = tuple[ReadMode, int, int]  # mode, block_bytes, queue_depth
ZSTD_PASSES = 3  # decoding passes over the sample; the fastest counts
H2D_REPEATS = 3  # timed copies after one warm-up copy; the fastest counts
CONTEXT_TOKENS = 256  # cached keys each attention query attends to
COMPUTE_WARMUP_RUNS = 2  # untimed calls first: kernel selection, allocator, caches
COMPUTE_RUNS = 5  # timed calls; the median counts
RANDOM_WEIGHT_STD = 0.02  # scale of the random bf16 sample: trained MoE weights have std ~0.01-0.03
SAMPLE_SEED = 0


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; the defaults are the full sweep, :meth:`quick` the one-minute one."""

    directory: Path
    file_bytes: int = 1 * GIB
    block_sizes: tuple[int, ...] = (256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB)
    queue_depths: tuple[int, ...] = (1, 2, 4, 8)
    token_counts: tuple[int, ...] = (1, 8, 32, 128)
    zstd_level: int = ZSTD_DEFAULT_LEVEL  # as `klotski-tier pack --compress zstd`
    zstd_sample_bytes: int = 64 * MIB
    h2d_bytes: int = 256 * MIB
    model: Path | None = None
    read_rounds: int = 3  # cold reads of each configuration; the median counts
    keep_file: bool = False

    @classmethod
    def quick(cls, directory: Path) -> BenchSettings:
        return cls(
            directory,
            256 * MIB,
            (1 * MIB, 16 * MIB),
            (1, 4),
            (1, 32),
            zstd_sample_bytes=16 * MIB,
            h2d_bytes=64 * MIB,
        )

    def __post_init__(self) -> None:
        sizes = (self.file_bytes, *self.block_sizes)
        if any(size <= 0 or size % DIRECT_ALIGN_BYTES for size in sizes):
            raise ConfigError(
                f"bench file and block sizes must be positive multiples of {DIRECT_ALIGN_BYTES} bytes "
                f"(O_DIRECT), got {', '.join(map(format_size, sizes))}"
            )
        counts = (*self.queue_depths, *self.token_counts, self.zstd_sample_bytes, self.h2d_bytes)
        if min((*counts, self.read_rounds)) < 1:
            raise ConfigError("bench queue depths, token counts and sample sizes must be at least 1")


def run_bench(settings: BenchSettings, progress: Progress) -> MachineProfile:
    """Every measurement of ``settings``; the test file is removed afterwards unless ``keep_file``."""
    if settings.model is not None:
        load_model_files(settings.model)  # a wrong model fails now, not after the drive sweep
    path = settings.directory / TEST_FILE_NAME
    progress(f"writing a {format_size(settings.file_bytes)} test file in {settings.directory}")
    write_test_file(path, settings.file_bytes)
    try:
        raw_gbps, reads = measure_reads(
            path, settings.block_sizes, settings.queue_depths, settings.read_rounds, progress
        )
    finally:
        if not settings.keep_file:
            path.unlink(missing_ok=True)
    best = best_read(reads)
    drive = DriveProfile(str(settings.directory), settings.file_bytes, settings.read_rounds, raw_gbps, best)
    progress("zstd decompression")
    zstd = zstd_bench(settings.zstd_level, settings.zstd_sample_bytes, settings.model, best.gbps)
    progress("host-to-device copies")
    h2d = h2d_bench(settings.h2d_bytes)
    progress("compute")
    compute = compute_bench(settings.model, settings.token_counts)
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return MachineProfile(PROFILE_VERSION, created, HostInfo.current(), drive, reads, zstd, h2d, compute)


# --- drive ----------------------------------------------------------------------------------


def write_test_file(path: Path, nbytes: int) -> None:
    """``nbytes`` of random data at ``path``, durable and evicted from the page cache."""
    chunk = np.random.default_rng(SAMPLE_SEED).integers(0, 256, WRITE_CHUNK_BYTES, dtype=np.uint8)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            for index, start in enumerate(range(0, nbytes, WRITE_CHUNK_BYTES)):
                chunk[:8] = np.frombuffer(index.to_bytes(8, "little"), dtype=np.uint8)  # no two chunks alike
                handle.write(chunk[: min(WRITE_CHUNK_BYTES, nbytes - start)].data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):  # a directory that cannot hold the file cannot hold a part
            path.unlink(missing_ok=True)
        raise ConfigError(
            f"cannot write the bench's test file {path}: {exc.strerror or exc}; "
            f"pass --path a writable directory with {format_size(nbytes)} free"
        ) from exc
    evict(path)


def raw_direct_gbps(path: Path) -> float:
    """GB/s of one O_DIRECT sequential read of the whole file, page cache evicted first."""
    size = path.stat().st_size
    buffer = aligned_empty(min(size, RAW_READ_MAX_BYTES)).zero_()  # [n] touched: no faults timed
    view = buffer.numpy().data
    fd = _open_direct(path)
    try:
        evict(path)
        start = time.perf_counter()
        done = 0
        while done < size:
            count = os.preadv(fd, [view[: min(len(view), size - done)]], done)
            if count <= 0:
                raise TierError(f"short read of {path} at offset {done}; is the disk full or failing?")
            done += count
        elapsed = time.perf_counter() - start
    except OSError as exc:
        raise TierError(f"cannot read {path} with O_DIRECT: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return size / elapsed / GB


def _open_direct(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | O_DIRECT)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ConfigError(
                f"the file system of {path.parent} does not support O_DIRECT; pass --path a directory "
                "on the drive to measure"
            ) from exc
        raise TierError(f"cannot open {path}: {exc.strerror or exc}") from exc


def measure_reads(
    path: Path, block_sizes: tuple[int, ...], queue_depths: tuple[int, ...], rounds: int, progress: Progress
) -> tuple[float, tuple[ReadResult, ...]]:
    """The median raw GB/s, and each engine configuration's median cold and warm reads against it.

    Round-robin: each round reads every configuration once (warm passes in the last round only)
    and the raw file before every ``RAW_EVERY``-th one, so a shared drive's drifts hit all alike.
    """
    configs = [(mode, block, depth) for mode in READ_MODES for block in block_sizes for depth in queue_depths]
    raw: list[float] = []
    samples: dict[tuple[ReadConfig, CacheState], list[float]] = {}
    for round_index in range(rounds):
        for index, config in enumerate(configs):
            if index % RAW_EVERY == 0:
                raw.append(raw_direct_gbps(path))
            mode, block, depth = config
            progress(f"reads, round {round_index + 1}/{rounds}: {mode}, {format_size(block)} x {depth}")
            cold, *warm = engine_gbps(path, mode, block, depth, passes=1 + (round_index == rounds - 1))
            samples.setdefault((config, "cold"), []).append(cold)
            samples.setdefault((config, "warm"), []).extend(warm)
    raw_gbps = statistics.median(raw)
    results = []
    for (config, cache), values in samples.items():
        gbps = statistics.median(values)
        results.append(ReadResult(config[0], cache, config[1], config[2], gbps, gbps / raw_gbps))
    return raw_gbps, tuple(results)


def engine_gbps(path: Path, mode: ReadMode, block_bytes: int, queue_depth: int, passes: int) -> list[float]:
    """GB/s of ``passes`` consecutive passes of engine reads over ``path``, the page cache evicted first.

    A pass reads the file from its start, at most ``PASS_BLOCKS`` blocks.
    """
    nbytes = min(path.stat().st_size, PASS_BLOCKS * block_bytes)
    evict(path)
    seconds = asyncio.run(_engine_passes(path, nbytes, mode, block_bytes, queue_depth, passes))
    return [nbytes / s / GB for s in seconds]


async def _engine_passes(
    path: Path, size: int, mode: ReadMode, block_bytes: int, queue_depth: int, passes: int
) -> list[float]:
    """Seconds of each pass over the first ``size`` bytes of ``path``, ``queue_depth`` reads in flight."""
    async with (
        HostDriver() as host,
        DiskDriver(queue_depth=queue_depth, direct=mode == "direct") as disk,  # drops what it read
    ):
        buffers = [host.allocate(block_bytes).zero_() for _ in range(queue_depth)]  # [block] each, touched

        async def reader(buffer: torch.Tensor, offsets: list[int]) -> None:
            while offsets:
                offset = offsets.pop()
                piece = TensorPiece("block", path, offset, min(block_bytes, size - offset), 0)
                await disk.read_into([piece], buffer)

        seconds = []
        for _ in range(passes):
            offsets = list(range(0, size, block_bytes))[::-1]  # popped from the end: file order
            start = time.perf_counter()
            await asyncio.gather(*(reader(buffer, offsets) for buffer in buffers))
            seconds.append(time.perf_counter() - start)
        return seconds


def best_read(reads: tuple[ReadResult, ...]) -> ReadResult:
    """The fastest cold configuration: what the engine's read path achieves on data it has not seen."""
    return max((read for read in reads if read.cache == "cold"), key=lambda read: read.gbps)


# --- zstd -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSample:
    """Weights to compress in frames of ``frame_bytes`` (one expert block each, as a packed store)."""

    source: str
    data: Bytes  # [n] uint8
    frame_bytes: int
    item_bytes: int  # element size of the weights (the shuffle filter applies to 2)

    def frames(self) -> list[Bytes]:
        return [self.data[i : i + self.frame_bytes] for i in range(0, self.data.nbytes, self.frame_bytes)]


def zstd_bench(level: int, sample_bytes: int, model: Path | None, drive_gbps: float) -> ZstdProfile:
    """Ratio and one thread's decoding speed with the packed store's codec, plain and shuffled."""
    sample = weight_sample(sample_bytes, model)
    threads = os.cpu_count() or 1
    figures = [_codec_figures(sample, Codec(CodecName.ZSTD, level, shuffle)) for shuffle in (False, True)]
    ratios, speeds = zip(*figures, strict=True)  # (plain, shuffled) each
    effective = (min(drive_gbps * ratio, speed * threads) for ratio, speed in figures)
    head = (level, sample.source, sample.data.nbytes, sample.frame_bytes, threads)
    return ZstdProfile(*head, *ratios, *speeds, *effective)


def weight_sample(nbytes: int, model: Path | None) -> WeightSample:
    """Expert weights of ``model``, else of the demo when it is built, else random bf16."""
    directory = model if model is not None else _built_demo()
    if directory is None:
        generator = torch.Generator().manual_seed(SAMPLE_SEED)
        values = torch.randn(nbytes // 2, generator=generator).mul_(RANDOM_WEIGHT_STD)  # [n/2] float32
        data = values.to(torch.bfloat16).view(torch.uint8).numpy()  # [n]
        return WeightSample("random bf16", data, min(demo.DEMO_SHAPE.expert_bytes, nbytes), 2)
    files = load_model_files(directory)
    experts = [layout for block, layout in files.layouts.items() if block.kind is BlockKind.EXPERT]
    chosen = experts[: -(-nbytes // experts[0].nbytes)]  # enough blocks for nbytes
    buffers = asyncio.run(_read_blocks(chosen))
    views = [
        t.reshape(-1).view(torch.uint8)
        for lay, buf in zip(chosen, buffers, strict=True)
        for t in lay.tensors(buf).values()
    ]
    item_bytes = files.spec.dtype.itemsize
    data = torch.cat(views).numpy()[:nbytes]  # [n] uint8: the weights' bytes, not the buffers' padding
    data = data[: data.nbytes // item_bytes * item_bytes]
    source = f"expert weights of {'the demo' if model is None else directory}"
    return WeightSample(source, data, min(experts[0].nbytes, data.nbytes), item_bytes)


def _built_demo() -> Path | None:
    directory = demo.default_cache_dir() / demo.DEMO_DIR_NAME
    return directory if (directory / "config.json").is_file() else None


def _codec_figures(sample: WeightSample, codec: Codec) -> tuple[float, float]:
    """Compression ratio of ``sample`` and one thread's decoding GB/s into a block buffer."""
    frames = [encode(frame, codec, sample.item_bytes) for frame in sample.frames()]
    out = np.zeros(sample.frame_bytes, dtype=np.uint8)  # [frame] the block buffer decoded into
    fastest = float("inf")
    for _ in range(ZSTD_PASSES):
        start = time.perf_counter()
        for frame, raw in zip(frames, sample.frames(), strict=True):
            decode(frame.data, frame.codec, frame.shuffle, out[: raw.nbytes])
        fastest = min(fastest, time.perf_counter() - start)
    ratio = sample.data.nbytes / sum(frame.data.nbytes for frame in frames)
    return ratio, sample.data.nbytes / fastest / GB


# --- host to device -------------------------------------------------------------------------


def h2d_bench(nbytes: int) -> H2DProfile | None:
    """Host-to-device copy bandwidth from pinned and from pageable memory; None without CUDA."""
    if not torch.cuda.is_available():
        logger.info("no CUDA device: host-to-device copies not measured")
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)  # [n]
    pinned = torch.ones(nbytes, dtype=torch.uint8).pin_memory()  # [n]
    pageable = torch.ones(nbytes, dtype=torch.uint8)  # [n]
    name = torch.cuda.get_device_name(device)
    return H2DProfile(name, nbytes, _copy_gbps(dst, pinned), _copy_gbps(dst, pageable))


def _copy_gbps(dst: torch.Tensor, src: torch.Tensor) -> float:
    seconds = []
    for _ in range(1 + H2D_REPEATS):  # the first copy warms the path up
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return src.numel() / min(seconds[1:]) / GB


# --- compute --------------------------------------------------------------------------------


def compute_bench(model: Path | None, token_counts: tuple[int, ...]) -> ComputeProfile:
    """Median seconds of one expert and of one attention layer per token count, on the compute device."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec, attn_w, expert_w = _model_weights(model, device)
    with torch.inference_mode():
        expert_s = {t: _median_s(_expert_call(spec, expert_w, t, device), device) for t in token_counts}
        attention_s = {t: _median_s(_attention_call(spec, attn_w, t, device), device) for t in token_counts}
    dtype = str(spec.dtype).removeprefix("torch.")
    name = "demo" if model is None else str(model)
    return ComputeProfile(device.type, name, dtype, CONTEXT_TOKENS, expert_s, attention_s)


def _expert_call(spec: ModelSpec, w: BlockWeights, tokens: int, device: torch.device) -> Callable[[], object]:
    x = torch.randn(tokens, spec.hidden_size, dtype=spec.dtype, device=device)  # [M, H]
    weights = torch.rand(tokens, device=device)  # [M] routing weights, float32 as Mixtral's
    return lambda: ops.expert(x, w, weights)


def _attention_call(
    spec: ModelSpec, w: BlockWeights, tokens: int, device: torch.device
) -> Callable[[], object]:
    """One decode step of ``tokens`` sequences, each attending to ``CONTEXT_TOKENS`` cached keys."""
    h = torch.randn(tokens, 1, spec.hidden_size, dtype=spec.dtype, device=device)  # [B, 1, H]
    cache_shape = (tokens, spec.num_kv_heads, CONTEXT_TOKENS + 1, spec.head_dim)
    k_cache = torch.randn(cache_shape, dtype=spec.dtype, device=device)  # [B, Hkv, C+1, D]
    v_cache = torch.randn(cache_shape, dtype=spec.dtype, device=device)  # [B, Hkv, C+1, D]
    positions = torch.full((tokens, 1), CONTEXT_TOKENS, device=device)  # [B, 1]
    key_lengths = torch.full((tokens,), CONTEXT_TOKENS + 1, device=device)  # [B]
    return lambda: ops.attention(h, w, spec, k_cache, v_cache, positions, key_lengths)


def _median_s(call: Callable[[], object], device: torch.device) -> float:
    seconds = []
    for run in range(COMPUTE_WARMUP_RUNS + COMPUTE_RUNS):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        if run >= COMPUTE_WARMUP_RUNS:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_weights(model: Path | None, device: torch.device) -> tuple[ModelSpec, BlockWeights, BlockWeights]:
    """Layer 0's attention and expert 0 of ``model`` (read by the disk tier), else demo-shaped ones."""
    if model is None:
        return _demo_weights(device)
    files = load_model_files(model)
    layouts = [files.layouts[attn_block(0)], files.layouts[expert_block(0, 0)]]
    attn, expert = (
        {role: t.to(device) for role, t in layout.tensors(buffer).items()}
        for layout, buffer in zip(layouts, asyncio.run(_read_blocks(layouts)), strict=True)
    )
    return files.spec, attn, expert


async def _read_blocks(layouts: list[BlockLayout]) -> list[torch.Tensor]:
    """Each block's buffer [nbytes] uint8, read through the disk tier."""
    async with DiskDriver() as disk:
        buffers = [torch.zeros(layout.nbytes, dtype=torch.uint8) for layout in layouts]
        for layout, buffer in zip(layouts, buffers, strict=True):
            await disk.read_into(layout.pieces, buffer)
    return buffers


def _demo_weights(device: torch.device) -> tuple[ModelSpec, BlockWeights, BlockWeights]:
    """Random weights of the demo's shape (scaled as the demo's: std 1/sqrt(inputs)), built in memory."""
    spec = demo_spec()
    generator = torch.Generator().manual_seed(SAMPLE_SEED)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        values = torch.randn(rows, cols, generator=generator) / math.sqrt(cols)  # [rows, cols] float32
        return values.to(dtype=spec.dtype, device=device)

    hidden, inter = spec.hidden_size, spec.expert_intermediate_size
    attn = {
        "input_norm": torch.ones(hidden, dtype=spec.dtype, device=device),
        "q": matrix(spec.q_size, hidden),
        "k": matrix(spec.kv_size, hidden),
        "v": matrix(spec.kv_size, hidden),
        "o": matrix(hidden, spec.q_size),
    }
    return spec, attn, {"gate_up": matrix(2 * inter, hidden), "down": matrix(hidden, inter)}


def demo_spec() -> ModelSpec:
    """The :class:`ModelSpec` of the demo model: Mixtral numerics, the dimensions of ``DEMO_SHAPE``."""
    shape = demo.DEMO_SHAPE
    return ModelSpec(
        family="mixtral",
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        expert_intermediate_size=shape.intermediate_size,
        shared_expert_intermediate_size=0,
        norm_topk_prob=True,
        router_weights_in_model_dtype=False,
        qk_norm=QKNorm.NONE,
        qkv_bias=False,
        clip_qkv=None,
        rms_norm_eps=demo.RMS_NORM_EPS,
        rope_theta=shape.rope_theta,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=False,
        dtype=torch.bfloat16,
        eos_token_ids=(demo.EOS_TOKEN_ID,),
        pad_token_id=None,
        bos_token_id=demo.BOS_TOKEN_ID,
    )
