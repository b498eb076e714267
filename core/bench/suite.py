"""``klotski-tier bench``: every measurement for one :class:`BenchSettings`, and the zstd and copy ones.

:func:`run_bench` runs the drive sweep (:mod:`klotski_tier.core.bench.drive`), zstd decoding and
host-to-device copies (here), the compute timings (:mod:`klotski_tier.core.bench.compute`) and
compute while the drive streams its test file (:mod:`klotski_tier.core.bench.contention`), and
returns the machine profile (:mod:`klotski_tier.core.bench.profile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from klotski_tier.core.atomic import discard, remove_dead_temps, temp_beside
from klotski_tier.core.bench.compute import compute_bench, expert_jobs, read_blocks
from klotski_tier.core.bench.compute import demo_spec as demo_spec
from klotski_tier.core.bench.contention import measure_contention
from klotski_tier.core.bench.drive import TEST_FILE_NAME as TEST_FILE_NAME
from klotski_tier.core.bench.drive import Progress as Progress
from klotski_tier.core.bench.drive import best_read, measure_layout_reads, measure_reads
from klotski_tier.core.bench.drive import raw_direct_gbps as raw_direct_gbps
from klotski_tier.core.bench.drive import write_test_file as write_test_file
from klotski_tier.core.bench.profile import (
    PROFILE_VERSION,
    ComputeProfile,
    DriveProfile,
    H2DProfile,
    HostInfo,
    MachineProfile,
    ReadResult,
    ZstdProfile,
)
from klotski_tier.core.demo.build import demo_model_path, opening_demo
from klotski_tier.core.demo.shape import DEMO_SHAPE
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.blocks import (
    BlockKind,
)
from klotski_tier.core.store.codec import ZSTD_DEFAULT_LEVEL, Bytes, Codec, CodecName, decode, encode
from klotski_tier.core.store.files import load_model_files
from klotski_tier.core.units import GB, GIB, KIB, MIB, format_size
from klotski_tier.tiers.direct import DIRECT_ALIGN_BYTES

logger = logging.getLogger(__name__)
ZSTD_PASSES = 3  # decoding passes over the sample; the fastest counts
H2D_REPEATS = 3  # timed copies after one warm-up copy; the fastest counts
RANDOM_WEIGHT_STD = 0.02  # scale of the random bf16 sample: trained MoE weights have std ~0.01-0.03
SAMPLE_SEED = 0


@dataclass(frozen=True)
class BenchSettings:
    """What to measure; the defaults are the full sweep, :meth:`quick` the one-minute one."""

    directory: Path
    file_bytes: int = 1 * GIB
    block_sizes: tuple[int, ...] = (256 * KIB, 1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB)
    queue_depths: tuple[int, ...] = (1, 2, 4, 8)
    token_counts: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 128)  # decode gives an expert a few tokens
    zstd_level: int = ZSTD_DEFAULT_LEVEL  # as `klotski-tier pack --compress zstd`
    zstd_sample_bytes: int = 64 * MIB
    h2d_bytes: int = 256 * MIB
    model: Path | None = None
    read_rounds: int = 3  # cold reads of each configuration; the median counts
    keep_file: bool = False
    contention_rounds: int = 6  # rounds of compute alone and while the drive streams (a few s in all)
    contention_tokens: tuple[int, ...] | None = None  # expert jobs timed so; None: 1 and the most tokens

    @classmethod
    def quick(cls, directory: Path) -> BenchSettings:
        return cls(
            directory,
            256 * MIB,
            (1 * MIB, 16 * MIB, 64 * MIB),
            (1, 4),
            (1, 2, 4, 8, 32),
            zstd_sample_bytes=16 * MIB,
            h2d_bytes=64 * MIB,
            contention_rounds=4,
            contention_tokens=(1, 128),  # as the full bench: the large job is the one the drive slows
        )

    def __post_init__(self) -> None:
        sizes = (self.file_bytes, *self.block_sizes)
        if not self.block_sizes:
            raise ConfigError("the bench needs at least one block size; write e.g. 1MiB,16MiB")
        if self.file_bytes < max(self.block_sizes):  # first: a file too small says so, aligned or not
            raise ConfigError(
                f"the bench's test file of {format_size(self.file_bytes)} is smaller than its largest block "
                f"of {format_size(max(self.block_sizes))}; raise --file-size to at least that"
            )
        unaligned = [size for size in sizes if size <= 0 or size % DIRECT_ALIGN_BYTES]
        if unaligned:
            raise ConfigError(
                f"bench file and block sizes must be positive multiples of {DIRECT_ALIGN_BYTES} bytes "
                f"(O_DIRECT), got {', '.join(f'{size} bytes' for size in unaligned)}"
            )
        counts = (*self.queue_depths, *self.token_counts, self.zstd_sample_bytes, self.h2d_bytes)
        if min((*counts, *(self.contention_tokens or ()), self.read_rounds, self.contention_rounds)) < 1:
            raise ConfigError("bench queue depths, token counts, sample sizes and rounds must be at least 1")


BENCH_STORE_HINT = (
    "bench --model times a Hugging Face checkpoint's weights: give the one the store was packed from, "
    "or leave --model out to time the demo's shape"
)


def run_bench(settings: BenchSettings, progress: Progress) -> MachineProfile:
    """Every measurement of ``settings``; the test file is removed afterwards, or with ``keep_file``
    kept as :data:`TEST_FILE_NAME`. It is written under a name of this process's own, so that benches
    of one directory at once do not share it."""
    if settings.model is not None:  # a wrong model (or a damaged demo) fails now, not after the sweep
        load_model_files(settings.model, store_hint=BENCH_STORE_HINT)
    elif (demo := _built_demo()) is not None:
        with opening_demo(demo):
            load_model_files(demo)
    kept = settings.directory / TEST_FILE_NAME
    path = temp_beside(kept)  # this bench's own: another on the same directory has another
    progress(f"writing a {format_size(settings.file_bytes)} test file in {settings.directory}")
    try:  # from before the file exists: an error, Ctrl-C or SIGTERM at any point removes it
        remove_dead_temps(kept)
        write_test_file(path, settings.file_bytes)
        raw_gbps, reads = measure_reads(
            path, settings.block_sizes, settings.queue_depths, settings.read_rounds, progress
        )
        best = best_read(reads)
        layouts = measure_layout_reads(  # short passes: a drifting drive needs more of them
            path,
            _expert_bytes(settings.model),
            best.queue_depth,
            LAYOUT_ROUNDS * settings.read_rounds,
            progress,
        )
        progress("zstd decompression")
        zstd = zstd_bench(settings.zstd_level, settings.zstd_sample_bytes, settings.model, best.gbps)
        progress("host-to-device copies")
        h2d = h2d_bench(settings.h2d_bytes)
        progress("compute")
        compute = compute_bench(settings.model, settings.token_counts)
        progress("compute while the drive streams")
        compute = contention_bench(compute, settings, path, best)
        if settings.keep_file:
            path.replace(kept)
    finally:
        discard(path)
    drive = DriveProfile(
        str(settings.directory), settings.file_bytes, settings.read_rounds, raw_gbps, best, layouts
    )
    created = datetime.now(UTC).isoformat(timespec="seconds")
    return MachineProfile(PROFILE_VERSION, created, HostInfo.current(), drive, reads, zstd, h2d, compute)


LAYOUT_ROUNDS = 3
"""Layout passes per drive round: each pass reads the test file once (about a second at most)."""


def _expert_bytes(model: Path | None) -> int:
    """The size of one expert block of the model the bench times (the demo's without one)."""
    if model is None:
        return DEMO_SHAPE.expert_bytes
    return load_model_files(model).spec.expert_bytes


def contention_bench(
    compute: ComputeProfile, settings: BenchSettings, path: Path, best: ReadResult
) -> ComputeProfile:
    """``compute`` with its ``io_*`` figures: the expert job at ``contention_tokens`` (by default 1 and
    the most of ``token_counts``), alone and while ``path`` streams as the best read does (its block
    size and queue depth, O_DIRECT)."""
    tokens = settings.contention_tokens or tuple(sorted({1, max(settings.token_counts)}))
    jobs = expert_jobs(settings.model, tokens)
    result = measure_contention(
        path, jobs, block_bytes=best.block_bytes, threads=best.queue_depth, rounds=settings.contention_rounds
    )
    return dataclasses.replace(
        compute,
        io_slowdown=result.slowdown,
        io_read_gbps=result.read_gbps,
        io_alone_s=result.alone_s,
        io_streaming_s=result.streaming_s,
    )


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
        return WeightSample("random bf16", data, min(DEMO_SHAPE.expert_bytes, nbytes), 2)
    with opening_demo(directory) if model is None else contextlib.nullcontext():
        files = load_model_files(directory)
    experts = [layout for block, layout in files.layouts.items() if block.kind is BlockKind.EXPERT]
    chosen = experts[: -(-nbytes // experts[0].nbytes)]  # enough blocks for nbytes
    buffers = asyncio.run(read_blocks(chosen))
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
    directory = demo_model_path()
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
