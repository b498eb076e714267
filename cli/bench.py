"""``klotski-tier bench``: measure this machine's drive, zstd, copies and compute; write its profile.

Progress goes to stderr; the tables (or, with ``--json``, the profile) to stdout. The machine
profile (schema in :mod:`klotski_tier.core.bench.profile`) is written to ``--profile`` every time.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import click

from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.files import OUTPUT, check_outputs, record_saved
from klotski_tier.cli.model_input import MODEL_DIRECTORIES, model_input
from klotski_tier.cli.params import NonEmptyPath, count_list, size, size_list, whole
from klotski_tier.core.bench.profile import (
    PROFILE_FILE_NAME,
    ComputeProfile,
    LayoutReads,
    MachineProfile,
    ReadResult,
    default_profile_path,
)
from klotski_tier.core.bench.suite import TEST_FILE_NAME, BenchSettings, run_bench
from klotski_tier.core.errors import InputError, KlotskiError
from klotski_tier.core.paths import CACHE_ENV_VAR, default_cache_dir
from klotski_tier.core.runtime.config import COUNT_RANGES
from klotski_tier.core.store.codec import ZSTD_DEFAULT_LEVEL, ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL
from klotski_tier.core.units import format_size

MS_PER_S = 1000.0


@click.command("bench")
@click.option(
    "--path",
    "directory",
    type=NonEmptyPath(file_okay=False, path_type=Path),
    help="A directory on the drive to measure (default: the cache directory).",
)
@click.option(
    "--file-size",
    type=size(minimum=1),
    metavar="SIZE",
    help="Size of the test file (default 1GiB; 256MiB with --quick).",
)
@click.option(
    "--quick", is_flag=True, help="Fewer block sizes, queue depths and token counts: under a minute."
)
@click.option(
    "--model",
    type=NonEmptyPath(path_type=Path),
    help="Hugging Face checkpoint whose layer-0 attention and expert are timed, not a packed store "
    "(default: the demo's shape).",
)
@click.option(
    "--profile",
    "profile_path",
    type=OUTPUT,
    help=f"Where to write the machine profile (default: <cache>/{PROFILE_FILE_NAME}).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON instead of the tables.")
@click.option("--keep-file", is_flag=True, help="Keep the test file afterwards.")
@click.option(
    "--zstd-level",
    type=whole(ZSTD_MIN_LEVEL, ZSTD_MAX_LEVEL),
    default=ZSTD_DEFAULT_LEVEL,
    show_default=True,
    help="Level of the zstd measurement (as `pack --compress zstd:LEVEL`).",
)
@click.option(
    "--block-sizes", type=size_list(), hidden=True, help="Comma-separated block sizes, e.g. 1MiB,16MiB."
)
@click.option(
    "--queue-depths",
    type=count_list(*COUNT_RANGES["disk_queue_depth"]),
    hidden=True,
    help="Comma-separated queue depths, e.g. 1,4.",
)
@click.option("--tokens", type=count_list(1), hidden=True, help="Comma-separated token counts, e.g. 1,32.")
@click.option("--rounds", type=whole(min=1), hidden=True, help="Samples of each read figure.")
@click.option(
    "--sample-size",
    type=size(minimum=1),
    hidden=True,
    help="Bytes compressed by zstd and copied to the device.",
)
@report_errors
def bench(
    directory: Path | None,
    quick: bool,
    profile_path: Path | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Measure the drive, zstd, host-to-device copies and compute; write the machine profile."""
    if profile_path is None:
        profile_path = default_profile_path()
        try:
            profile_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot create {profile_path.parent} for the machine profile: {exc.strerror or exc}; "
                f"set {CACHE_ENV_VAR} to a directory klotski-tier may write, or pass --profile"
            ) from exc
    directory = directory if directory is not None else default_cache_dir()
    kept = directory / TEST_FILE_NAME if options["keep_file"] and directory.is_dir() else None
    if kept is not None and (kept.is_symlink() or (kept.exists() and not kept.is_file())):
        raise InputError(  # the test file is renamed into place on the drive measured: no link to follow
            f"--keep-file would replace {kept}, which is not a regular file (a link, a directory, ...); "
            "remove it or bench another --path"
        )
    check_outputs(  # the kept test file is an output too; a --path not there yet holds no other file
        {"--profile": profile_path, "--keep-file": kept},
        model_input(options["model"]),
        directories=MODEL_DIRECTORIES,
    )
    settings = _settings(directory, quick, options)
    with _Status() as status:
        profile = run_bench(settings, status)
    click.echo(profile.dumps() if as_json else format_profile(profile), nl=not as_json)
    try:
        profile.save(profile_path)
    except KlotskiError as exc:  # the measurements stay: on stdout, as the profile file would hold them
        if not as_json:
            click.echo("\n" + profile.dumps(), nl=False)
        raise InputError(f"{exc}; the profile is on stdout (as JSON) instead") from exc
    record_saved("--profile", profile_path)
    if not as_json:
        click.echo(f"\nmachine profile written to {profile_path}")


def _settings(directory: Path, quick: bool, options: dict[str, Any]) -> BenchSettings:
    """The quick or full settings, with the options the user gave instead of their defaults."""
    base = BenchSettings.quick(directory) if quick else BenchSettings(directory)
    changes: dict[str, Any] = {"zstd_level": options["zstd_level"], "keep_file": options["keep_file"]}
    if options["model"] is not None:
        changes["model"] = options["model"]
    if options["file_size"] is not None:
        changes["file_bytes"] = options["file_size"]
    if options["block_sizes"] is not None:
        changes["block_sizes"] = options["block_sizes"]
    for option, field in (("queue_depths", "queue_depths"), ("tokens", "token_counts")):
        if options[option] is not None:
            changes[field] = options[option]
    if options["rounds"] is not None:
        changes["read_rounds"] = options["rounds"]
    if options["sample_size"] is not None:
        sample = options["sample_size"]
        changes.update(zstd_sample_bytes=sample, h2d_bytes=sample)
    return dataclasses.replace(base, **changes)


class _Status:
    """``status(message)``: one line on stderr, redrawn in place on a terminal, else one per message."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._shown = False

    def __call__(self, message: str) -> None:
        if self._tty:
            click.echo(f"\r{message}\033[K", nl=False, err=True)
            self._shown = True
        else:
            click.echo(message, err=True)

    def __enter__(self) -> _Status:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._shown:
            click.echo("\r\033[K", nl=False, err=True)


# --- tables ---------------------------------------------------------------------------------


def format_profile(profile: MachineProfile) -> str:
    """The profile as plain-text tables: drive reads, best configuration, zstd, copies, compute."""
    return "\n\n".join((_drive(profile), _zstd(profile), _h2d(profile), _compute(profile)))


def _drive(profile: MachineProfile) -> str:
    drive = profile.drive
    rows = [_read_row(read, _warm_of(profile.reads, read)) for read in profile.reads if read.cache == "cold"]
    header = (
        f"Drive of {drive.path}: test file {format_size(drive.file_bytes)}, "
        f"each figure the median of {drive.rounds} rounds\n"
        f"raw O_DIRECT sequential read: {drive.raw_gbps:.2f} GB/s (100%)\n\n"
        "Engine reads (DiskDriver.read_into, one block per read)\n"
    )
    table = _table(["mode", "block", "queue", "cold GB/s", "cold", "warm GB/s", "warm"], rows)
    return header + table + "\n\n" + best_line(profile) + _layouts_line(drive.layouts)


def _layouts_line(layouts: LayoutReads | None) -> str:
    """The checkpoint read path against the packed store's, where the bench measured them."""
    if layouts is None:
        return ""
    block, depth = format_size(layouts.block_bytes), layouts.queue_depth
    return (
        f"\nexpert blocks of {block}, O_DIRECT, queue depth {depth}, cold: checkpoint (safetensors as it "
        f"is) {layouts.checkpoint_gbps:.2f} GB/s = {layouts.ratio:.0%} of the packed store's "
        f"{layouts.packed_gbps:.2f} GB/s"
    )


def best_line(profile: MachineProfile) -> str:
    best = profile.drive.best
    return (
        f"best: {best.mode} reads, {format_size(best.block_bytes)} blocks, queue depth {best.queue_depth}: "
        f"{best.gbps:.2f} GB/s cold = {best.fraction:.0%} of the raw drive"
    )


def _warm_of(reads: Sequence[ReadResult], cold: ReadResult) -> ReadResult | None:
    key = (cold.mode, cold.block_bytes, cold.queue_depth)
    return next(
        (r for r in reads if r.cache == "warm" and (r.mode, r.block_bytes, r.queue_depth) == key), None
    )


def _read_row(cold: ReadResult, warm: ReadResult | None) -> list[str]:
    warm_cells = _gbps(warm) if warm is not None else ["-", "-"]
    return [cold.mode, format_size(cold.block_bytes), str(cold.queue_depth), *_gbps(cold), *warm_cells]


def _gbps(read: ReadResult) -> list[str]:
    return [f"{read.gbps:.2f}", f"{read.fraction:.0%}"]


def _zstd(profile: MachineProfile) -> str:
    z, raw = profile.zstd, profile.drive.raw_gbps
    rows = [
        _zstd_row("plain", z.ratio, z.decompress_gbps, z.effective_gbps, raw),
        _zstd_row("shuffled", z.shuffled_ratio, z.shuffled_decompress_gbps, z.shuffled_effective_gbps, raw),
    ]
    header = (
        f"zstd level {z.level} on {z.sample} ({format_size(z.sample_bytes)} in frames of "
        f"{format_size(z.frame_bytes)}); effective read = best read x ratio, "
        f"at most decompression x {z.threads} threads\n"
    )
    return header + _table(["", "ratio", "decompress GB/s/thread", "effective GB/s", "of raw"], rows)


def _zstd_row(name: str, ratio: float, speed: float, effective: float, raw: float) -> list[str]:
    return [name, f"{ratio:.3f}", f"{speed:.2f}", f"{effective:.2f}", f"{effective / raw:.0%}"]


def _h2d(profile: MachineProfile) -> str:
    h2d = profile.h2d
    if h2d is None:
        return "Host to device: skipped (no CUDA device)"
    return (
        f"Host to device ({h2d.device}, {format_size(h2d.copy_bytes)} copies): "
        f"pinned {h2d.pinned_gbps:.2f} GB/s, pageable {h2d.pageable_gbps:.2f} GB/s"
    )


def _compute(profile: MachineProfile) -> str:
    c = profile.compute
    rows = [
        [str(tokens), f"{c.expert_s[tokens] * MS_PER_S:.3f}", f"{c.attention_s[tokens] * MS_PER_S:.3f}"]
        for tokens in sorted(c.expert_s)
    ]
    header = (
        f"Compute on {c.device}: {c.model} ({c.dtype}); one expert over the tokens, one attention layer "
        f"decoding one token per sequence over {c.context_tokens} cached keys\n"
    )
    return header + _table(["tokens", "expert ms", "attention ms"], rows) + "\n\n" + contention_line(c)


def contention_line(c: ComputeProfile) -> str:
    """Compute while the drive streams: the machine's io_compute_slowdown."""
    if not c.io_measured:
        return "Compute while the drive streams: not measured (a profile of an older bench: run it again)"
    alone, streaming = c.io_alone_s, c.io_streaming_s
    jobs = ", ".join(
        f"{t} tokens {alone[t] * MS_PER_S:.2f} -> {streaming[t] * MS_PER_S:.2f} ms" for t in sorted(alone)
    )
    return (
        f"Compute while the drive streams at {c.io_read_gbps:.2f} GB/s: +{c.io_slowdown:.0%} "
        f"(one expert, alone -> streaming, median rounds: {jobs})"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(len(headers))]
    lines = (
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in (headers, *rows)
    )
    return "\n".join(line.rstrip() for line in lines)
