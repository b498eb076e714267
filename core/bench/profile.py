"""The machine profile: what ``klotski-tier bench`` measured, as versioned JSON that ``run`` reads.

Bandwidths are decimal GB/s (1e9 bytes per second), times are seconds, sizes are bytes.
``fraction`` is a bandwidth divided by ``drive.raw_gbps`` (1.0 = the raw drive). Schema of
version :data:`PROFILE_VERSION` (every field required but the ``compute.io_*`` ones, which older benches
did not write and which load as 0 / empty: not measured; ``h2d`` is ``null`` without CUDA). Every
number is held to the range a real machine's can have, which its type names
(:mod:`klotski_tier.core.plausible`); a profile with one outside is refused, naming the field::

    version            1
    created            UTC time of the measurement, ISO 8601
    host               hostname, system, machine, cpu_count, memory_bytes, python, torch,
                       cuda_device (name of the GPU, or null)
    drive
      path             directory whose drive was measured
      file_bytes       size of the test file read by every measurement
      rounds           samples of every figure below (taken round-robin); each figure is their median
      raw_gbps         one large O_DIRECT sequential read of the test file, cache evicted: 100%
      best             the fastest cold engine read below (a ``reads`` entry)
      layouts          expert-sized blocks read as a packed store and as a checkpoint lays them out
                       (O_DIRECT, cold): block_bytes, queue_depth, packed_gbps, checkpoint_gbps
                       (older benches did not write it: null)
    reads[]            one entry per engine read configuration and cache state:
      mode             "buffered" (page cache, dropped after each read) or "direct" (O_DIRECT)
      cache            "cold" (page cache evicted first) or "warm" (the same reads again)
      block_bytes      bytes per block (one ``read_into`` of one piece; a pass reads <= 256 blocks)
      queue_depth      blocks in flight (the disk tier's threads)
      gbps, fraction   bandwidth, and as a fraction of raw_gbps
    zstd
      level, sample    zstd level; what was compressed ("expert weights of ...", "random bf16")
      sample_bytes     bytes compressed with the packed store's codec, in frames of frame_bytes
                       (one expert block each; a demo expert's size for the random sample)
      threads          decompression threads assumed for effective bandwidths (CPU count)
      ratio            original / compressed bytes, without and with (shuffled_ratio) byte shuffle
      decompress_gbps  decoded output per thread, into a block buffer (shuffled: unshuffle included)
      effective_gbps   read bandwidth of compressed blocks: min(best read gbps x ratio,
                       decompress_gbps x threads); shuffled_* the same with shuffle
    h2d                host-to-device copies: device, copy_bytes, pinned_gbps, pageable_gbps
    compute            device, model, dtype, context_tokens (cached keys of each attention query),
      expert_s         {tokens: seconds} of one routed expert over that many tokens
      attention_s      {tokens: seconds} of one attention layer, one decode query per sequence
      io_slowdown      compute time while the drive streams / alone - 1, >= 0 (see
                       :mod:`klotski_tier.core.bench.contention`): the machine's io_compute_slowdown
      io_read_gbps     the drive's read rate meanwhile (0: not measured)
      io_alone_s       {tokens: seconds} of the expert job alone, median of the contention rounds
      io_streaming_s   {tokens: seconds} of the same job while the drive streams
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch

from klotski_tier.core import reads
from klotski_tier.core.atomic import atomic_open
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.paths import default_cache_dir
from klotski_tier.core.plausible import (
    COUNT,
    IO_SLOWDOWN,
    JOB_S,
    RATE_GBPS,
    RATE_OR_UNMEASURED_GBPS,
    RATIO,
    SIZE,
    THREADS,
    TOKENS,
    Plausible,
    implausible,
)
from klotski_tier.core.store.codec import ZSTD_MAX_LEVEL, ZSTD_MIN_LEVEL
from klotski_tier.core.units import MIB

PROFILE_VERSION = 1
"""Bump when a field changes meaning or is removed; loading refuses other versions."""

PROFILE_FILE_NAME = "machine-profile.json"
PROFILE_KIND = reads.FileKind(
    "machine profile", 16 * MIB, ConfigError, "run `klotski-tier bench` to write a new one, or delete it"
)
"""A profile is a few KiB: 16 MiB is room for thousands of measured sizes."""
"""The profile's name in the user's cache directory."""

ReadMode = Literal["buffered", "direct"]
CacheState = Literal["cold", "warm"]
T = TypeVar("T")

# Every number of the profile has its plausible range in its type (klotski_tier.core.plausible),
# checked when a profile is read: a field with none is a programming error.
Gbps = Annotated[float, RATE_GBPS]
Bytes = Annotated[int, SIZE]
Threads = Annotated[int, THREADS]
Count = Annotated[int, COUNT]
Tokens = Annotated[int, TOKENS]  # a job's tokens (0: the empty job that times the hand-off), a context's
Ratio = Annotated[float, RATIO]
JobSeconds = Annotated[float, JOB_S]  # one timed compute job
Version = Annotated[int, Plausible(PROFILE_VERSION, PROFILE_VERSION)]
ZstdLevel = Annotated[int, Plausible(ZSTD_MIN_LEVEL, ZSTD_MAX_LEVEL)]


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    system: str  # platform.system(), e.g. "Linux"
    machine: str  # e.g. "x86_64"
    cpu_count: Threads
    memory_bytes: Bytes
    python: str
    torch: str
    cuda_device: str | None

    @classmethod
    def current(cls) -> HostInfo:
        """This machine."""
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        node, system, machine = platform.node(), platform.system(), platform.machine()
        cpus, python = os.cpu_count() or 1, platform.python_version()
        return cls(node, system, machine, cpus, memory_bytes, python, torch.__version__, cuda)


@dataclass(frozen=True)
class ReadResult:
    """One pass of engine reads over the test file."""

    mode: ReadMode
    cache: CacheState
    block_bytes: Bytes
    queue_depth: Threads
    gbps: Gbps
    fraction: Ratio  # gbps / raw_gbps


@dataclass(frozen=True)
class LayoutReads:
    """Expert-sized blocks read with O_DIRECT as a packed store lays them out (one aligned block each)
    and as a safetensors checkpoint does (three tensors at unaligned offsets, read as one aligned run
    straight into the buffer: :func:`klotski_tier.core.model.layouts.place_runs`); cold, medians."""

    block_bytes: Bytes
    queue_depth: Threads
    packed_gbps: Gbps
    checkpoint_gbps: Gbps

    @property
    def ratio(self) -> float:
        return self.checkpoint_gbps / self.packed_gbps


@dataclass(frozen=True)
class DriveProfile:
    path: str
    file_bytes: Bytes
    rounds: Count
    raw_gbps: Gbps
    best: ReadResult
    layouts: LayoutReads | None = None  # older benches did not measure it


@dataclass(frozen=True)
class ZstdProfile:
    level: ZstdLevel
    sample: str
    sample_bytes: Bytes
    frame_bytes: Bytes
    threads: Threads
    ratio: Ratio
    shuffled_ratio: Ratio
    decompress_gbps: Gbps  # per thread
    shuffled_decompress_gbps: Gbps  # per thread, unshuffle included
    effective_gbps: Gbps
    shuffled_effective_gbps: Gbps


@dataclass(frozen=True)
class H2DProfile:
    device: str
    copy_bytes: Bytes
    pinned_gbps: Gbps
    pageable_gbps: Gbps


@dataclass(frozen=True)
class ComputeProfile:
    device: str
    model: str  # the model directory, or "demo"
    dtype: str  # e.g. "bfloat16"
    context_tokens: Tokens
    expert_s: dict[Tokens, JobSeconds]  # {tokens: seconds}
    attention_s: dict[Tokens, JobSeconds]
    # I/O contention (klotski_tier.core.bench.contention); older profiles lack them: not measured
    io_slowdown: Annotated[float, IO_SLOWDOWN] = 0.0  # compute time while the drive streams / alone - 1
    io_read_gbps: Annotated[float, RATE_OR_UNMEASURED_GBPS] = 0.0  # the drive's meanwhile; 0: not measured
    io_alone_s: dict[Tokens, JobSeconds] = field(default_factory=dict)  # {tokens: seconds} expert job alone
    io_streaming_s: dict[Tokens, JobSeconds] = field(default_factory=dict)  # the same while the drive streams

    @property
    def io_measured(self) -> bool:
        """Whether the bench measured compute while the drive streams (older profiles did not)."""
        return self.io_read_gbps > 0


@dataclass(frozen=True)
class MachineProfile:
    version: Version
    created: str
    host: HostInfo
    drive: DriveProfile
    reads: tuple[ReadResult, ...]
    zstd: ZstdProfile
    h2d: H2DProfile | None
    compute: ComputeProfile

    def to_json(self) -> dict[str, Any]:
        """The profile as JSON-ready data (token counts become string keys in JSON)."""
        return dataclasses.asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def save(self, path: Path) -> None:
        """Write the profile atomically to ``path``."""
        with atomic_open(path, what="machine profile") as handle:
            handle.write(self.dumps())

    @classmethod
    def from_json(cls, data: Any, source: str = "machine profile") -> MachineProfile:
        """Validate ``data`` (parsed JSON); a :class:`ConfigError` names the first bad field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source} is not a JSON object; run `klotski-tier bench` to write a new one")
        version = data.get("version")
        if version != PROFILE_VERSION:
            raise ConfigError(
                f"{source} has version {version!r}, this klotski-tier reads version {PROFILE_VERSION}; "
                "run `klotski-tier bench` to measure again"
            )
        try:
            profile = _convert(cls, data, "")
        except _FieldError as exc:
            raise ConfigError(
                f"{source}: {exc}; fix the file or run `klotski-tier bench` to write a new one"
            ) from exc
        assert isinstance(profile, cls)
        return profile

    @classmethod
    def load(cls, path: Path) -> MachineProfile:
        """Read and validate the profile at ``path``."""
        return cls.from_json(reads.read_json(path, PROFILE_KIND), f"machine profile {path}")


class _FieldError(Exception):
    """A field of the profile has the wrong type or value; the message names it."""


def _convert(kind: Any, value: Any, where: str) -> Any:
    """``value`` checked against the type ``kind`` (and converted: lists to tuples, keys to int)."""
    if dataclasses.is_dataclass(kind):
        return _convert_dataclass(kind, value, where)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:  # a number and its plausible range
        return _number(args[0], value, where, kind.__metadata__[0])
    if kind in (int, float):
        raise AssertionError(f"profile field {where} is a number without a plausible range; annotate it")
    if origin is types.UnionType:  # X | None
        return None if value is None else _convert(args[0], value, where)
    if origin is Literal:
        if value not in args:
            raise _FieldError(f"{where} is {value!r}, expected one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        _expect(isinstance(value, list), where, "a list")
        return tuple(_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        _expect(isinstance(value, dict), where, "an object")
        items = ((_int_key(key, where), item, f"{where}.{key}") for key, item in value.items())
        return {_convert(args[0], key, at): _convert(args[1], item, at) for key, item, at in items}
    return _scalar(kind, value, where)


def _convert_dataclass(kind: Any, value: Any, where: str) -> Any:
    _expect(isinstance(value, dict), where or "the profile", "an object")
    hints = typing.get_type_hints(kind, include_extras=True)
    fields = {}
    for item in dataclasses.fields(kind):
        name = f"{where}.{item.name}" if where else item.name
        if item.name in value:
            fields[item.name] = _convert(hints[item.name], value[item.name], name)
        elif item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING:
            raise _FieldError(f"field {name} is missing")  # a field with a default is newer than the file
    return kind(**fields)


def _number(kind: Any, value: Any, where: str, bounds: Plausible) -> Any:
    """``value``, a number of type ``kind`` checked against its plausible range."""
    number = _scalar(kind, value, where)
    if not bounds.allows(number):
        raise _FieldError(f"field {where} is {bounds.show(number)}, {implausible(bounds, 'measurement')}")
    return number


def _scalar(kind: Any, value: Any, where: str) -> Any:
    if kind is str:
        _expect(isinstance(value, str), where, "a string")
    elif kind is int:
        _expect(
            isinstance(value, int) and not isinstance(value, bool) and value >= 0, where, "an integer >= 0"
        )
    elif kind is float:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        _expect(number and math.isfinite(value) and value >= 0, where, "a number >= 0")
        return float(value)
    else:
        raise AssertionError(f"profile field {where} has an unsupported type {kind!r}")
    return value


def _int_key(key: str, where: str) -> int:
    _expect(key.isdigit(), f"{where}.{key}", "keyed by a token count")
    return int(key)


def _expect(condition: bool, where: str, what: str) -> None:
    if not condition:
        raise _FieldError(f"field {where} must be {what}")


def default_profile_path() -> Path:
    """Where ``klotski-tier bench`` writes the profile unless told otherwise: the user's cache."""
    return default_cache_dir() / PROFILE_FILE_NAME


def find_profile(path: Path | None) -> MachineProfile | None:
    """The profile at ``path`` (which must exist), else the default one if bench wrote it, else None."""
    if path is not None:
        return MachineProfile.load(path)
    return profile_if_present(default_profile_path())


def profile_if_present(path: Path) -> MachineProfile | None:
    """The profile at ``path``; None only when nothing is there. Anything else there (a directory, a
    FIFO, a device, a file that is no profile) is refused by name, as :mod:`~klotski_tier.core.reads`
    and :meth:`MachineProfile.from_json` say, never taken for a missing profile."""
    if not os.path.lexists(path):
        return None
    return MachineProfile.load(path)
