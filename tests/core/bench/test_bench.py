"""The bench's measurements on tiny sizes, and the machine profile's JSON: round trip and refusals.

Figures on a shared test machine vary too much to assert speeds; these tests assert what must
hold whatever the speed: positive finite numbers, fractions consistent with the raw figure,
the best configuration being the fastest cold one, the test file gone afterwards, and a
profile file that loads back equal or fails with one line naming the bad field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from klotski_tier.core.bench import compute as bench_compute
from klotski_tier.core.bench import drive as bench_drive
from klotski_tier.core.bench import suite as bench
from klotski_tier.core.bench.profile import PROFILE_VERSION, MachineProfile
from klotski_tier.core.bench.suite import BenchSettings
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.store.pagecache import cached_fraction
from klotski_tier.core.units import KIB, MIB
from tests.conftest import CheckpointFactory

FILE_BYTES = 8 * MIB
BLOCK_BYTES = 2 * MIB
SAMPLE_BYTES = 1 * MIB
TOKENS = (1, 4)
EVICTED_AT_MOST = 0.1  # share of a freshly written, evicted test file still cached


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the user's cache (a built demo there would change the zstd sample)."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def profile(tmp_path_factory: pytest.TempPathFactory) -> MachineProfile:
    """One tiny bench run shared by the tests that only read its result."""
    directory = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KLOTSKI_TIER_CACHE", str(directory / "cache"))
        result = bench.run_bench(tiny_settings(directory), lambda message: None)
    assert not (directory / bench.TEST_FILE_NAME).exists(), "the test file was not removed"
    return result


def tiny_settings(directory: Path, **changes: object) -> BenchSettings:
    base = BenchSettings(
        directory,
        FILE_BYTES,
        (BLOCK_BYTES,),
        (1, 2),
        TOKENS,
        zstd_sample_bytes=SAMPLE_BYTES,
        h2d_bytes=SAMPLE_BYTES,
        read_rounds=1,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_test_file_is_written_whole_and_evicted(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    bench_drive.write_test_file(path, FILE_BYTES + 4 * KIB)  # not a whole number of write chunks
    assert path.stat().st_size == FILE_BYTES + 4 * KIB
    assert cached_fraction(path) <= EVICTED_AT_MOST
    assert positive(bench_drive.raw_direct_gbps(path))


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_engine_reads_give_one_positive_figure_per_pass(tmp_path: Path, mode: bench_drive.ReadMode) -> None:
    path = tmp_path / "file.bin"
    bench_drive.write_test_file(path, FILE_BYTES)
    figures = bench_drive.engine_gbps(path, mode, BLOCK_BYTES, queue_depth=2, passes=2)
    assert len(figures) == 2 and all(positive(gbps) for gbps in figures)


def test_every_configuration_is_measured_cold_and_warm_against_the_raw_figure(
    profile: MachineProfile,
) -> None:
    configs = {(read.mode, read.block_bytes, read.queue_depth, read.cache) for read in profile.reads}
    expected = {
        (mode, BLOCK_BYTES, depth, cache)
        for mode in ("direct", "buffered")
        for depth in (1, 2)
        for cache in ("cold", "warm")
    }
    assert configs == expected and len(profile.reads) == len(expected)
    assert positive(profile.drive.raw_gbps)
    for read in profile.reads:
        assert positive(read.gbps)
        assert read.fraction == pytest.approx(read.gbps / profile.drive.raw_gbps)


def test_best_is_the_fastest_cold_read(profile: MachineProfile) -> None:
    cold = [read for read in profile.reads if read.cache == "cold"]
    assert profile.drive.best in cold
    assert profile.drive.best.gbps == max(read.gbps for read in cold)


def test_zstd_figures_are_consistent(profile: MachineProfile) -> None:
    z = profile.zstd
    assert z.sample == "random bf16" and z.sample_bytes == SAMPLE_BYTES
    assert z.ratio > 1 and z.shuffled_ratio > z.ratio, "byte shuffle should help bf16"
    assert positive(z.decompress_gbps) and positive(z.shuffled_decompress_gbps)
    drive = profile.drive.best.gbps
    assert z.effective_gbps == pytest.approx(min(drive * z.ratio, z.decompress_gbps * z.threads))
    assert z.shuffled_effective_gbps == pytest.approx(
        min(drive * z.shuffled_ratio, z.shuffled_decompress_gbps * z.threads)
    )


def test_compute_times_every_token_count(profile: MachineProfile) -> None:
    compute = profile.compute
    assert compute.model == "demo" and compute.dtype == "bfloat16"
    assert set(compute.expert_s) == set(compute.attention_s) == {0, *TOKENS}  # 0: the hand-off alone
    assert all(positive(s) for s in (*compute.expert_s.values(), *compute.attention_s.values()))


def test_compute_is_timed_while_the_drive_streams(profile: MachineProfile) -> None:
    """At 1 token and at the most tokens, alone and while the test file streams (before it is removed)."""
    compute = profile.compute
    assert compute.io_measured and positive(compute.io_read_gbps)
    assert math.isfinite(compute.io_slowdown) and compute.io_slowdown >= 0
    assert set(compute.io_alone_s) == set(compute.io_streaming_s) == {1, max(TOKENS)}
    assert all(positive(s) for s in (*compute.io_alone_s.values(), *compute.io_streaming_s.values()))


def test_a_profile_without_the_contention_figures_still_loads(
    profile: MachineProfile, tmp_path: Path
) -> None:
    """Profiles written before the contention figures existed load them as not measured."""
    path = bad_profile(
        profile, tmp_path, lambda d: [d["compute"].pop(k) for k in list(d["compute"]) if k[:3] == "io_"]
    )
    compute = MachineProfile.load(path).compute
    assert not compute.io_measured and compute.io_slowdown == 0.0 and compute.io_streaming_s == {}
    assert compute.expert_s == profile.compute.expert_s


def test_checkpoint_and_packed_layouts_are_read_alike(tmp_path: Path) -> None:
    """Expert-sized blocks read as a checkpoint lays them out (three unaligned tensors, one aligned run)
    and as a packed store does: both measured, cold, and the profile keeps them."""
    path = tmp_path / bench.TEST_FILE_NAME
    bench_drive.write_test_file(path, FILE_BYTES)
    notes: list[str] = []
    layouts = bench_drive.measure_layout_reads(path, 300 * KIB, 2, 2, notes.append)
    assert layouts is not None and layouts.block_bytes == 3 * (300 * KIB // 3)
    assert positive(layouts.packed_gbps) and positive(layouts.checkpoint_gbps)
    assert layouts.ratio == layouts.checkpoint_gbps / layouts.packed_gbps
    assert sum("packed" in note for note in notes) == sum("checkpoint" in note for note in notes) == 2
    assert bench_drive.measure_layout_reads(path, 2 * MIB, 2, 1, notes.append) is None  # 3 blocks only
    assert "layout reads skipped" in notes[-1]


def test_a_profile_keeps_its_layout_reads_and_older_ones_load_without(
    profile: MachineProfile, tmp_path: Path
) -> None:
    measured = dataclasses.replace(profile.drive, layouts=bench_drive.LayoutReads(3 * MIB, 4, 2.0, 1.9))
    path = tmp_path / "p.json"
    dataclasses.replace(profile, drive=measured).save(path)
    assert MachineProfile.load(path).drive.layouts == measured.layouts
    older = bad_profile(profile, tmp_path, lambda d: d["drive"].pop("layouts"))
    assert MachineProfile.load(older).drive.layouts is None


def test_host_to_device_is_measured_only_with_cuda(profile: MachineProfile) -> None:
    if torch.cuda.is_available():
        assert profile.h2d is not None and positive(profile.h2d.pinned_gbps)
    else:
        assert profile.h2d is None


def test_a_model_gives_its_own_experts_and_layer(checkpoint_factory: CheckpointFactory) -> None:
    model = checkpoint_factory("mixtral")
    sample = bench.weight_sample(SAMPLE_BYTES, model)
    assert str(model) in sample.source and sample.item_bytes == 4  # the factory saves float32
    assert 0 < sample.data.nbytes <= SAMPLE_BYTES and sample.data.any()
    compute = bench_compute.compute_bench(model, (2,))
    assert compute.model == str(model) and compute.dtype == "float32" and positive(compute.expert_s[2])


def test_the_test_file_is_kept_when_asked(tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path, queue_depths=(1,), token_counts=(1,), keep_file=True)
    bench.run_bench(settings, lambda message: None)
    assert (tmp_path / bench.TEST_FILE_NAME).stat().st_size == FILE_BYTES


def test_an_unwritable_directory_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write the bench's test file") as caught:
        bench_drive.write_test_file(blocker / "sub" / "file.bin", FILE_BYTES)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"block_sizes": (1000,)}, "multiples of 4096"),
        ({"queue_depths": (0,)}, "at least 1"),
        ({"file_bytes": 0}, "smaller than its largest block"),
        ({"file_bytes": 64 * 1024**2 + 1}, r"multiples of 4096 bytes \(O_DIRECT\), got 67108865 bytes$"),
    ],
)
def test_settings_are_checked(tmp_path: Path, changes: dict[str, object], phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        tiny_settings(tmp_path, **changes)


# --- the profile file -----------------------------------------------------------------------


def test_the_profile_round_trips(profile: MachineProfile, tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    profile.save(path)
    assert MachineProfile.load(path) == profile
    assert json.loads(path.read_text())["version"] == PROFILE_VERSION


def bad_profile(profile: MachineProfile, tmp_path: Path, edit: object) -> Path:
    data = profile.to_json()
    edit(data)  # type: ignore[operator]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [
        (lambda d: d.update(version=PROFILE_VERSION + 1), f"reads version {PROFILE_VERSION}"),
        (lambda d: d["drive"].pop("raw_gbps"), "field drive.raw_gbps is missing"),
        (lambda d: d["reads"][1].update(mode="fast"), "reads[1].mode is 'fast'"),
        (lambda d: d["zstd"].update(ratio=-1.0), "field zstd.ratio must be a number >= 0"),
        (lambda d: d["compute"]["expert_s"].update(many=1.0), "compute.expert_s.many must be keyed"),
        (lambda d: d.update(h2d=[]), "field h2d must be an object"),
    ],
)
def test_a_bad_profile_is_refused_in_one_line(
    profile: MachineProfile, tmp_path: Path, edit: object, phrase: str
) -> None:
    path = bad_profile(profile, tmp_path, edit)
    with pytest.raises(ConfigError) as caught:
        MachineProfile.load(path)
    message = str(caught.value)
    assert phrase in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize("figure", ["expert_s", "attention_s", "io_alone_s", "io_streaming_s", "io_slowdown"])
@pytest.mark.parametrize("value", [1e308, 3601.0, 0.0, float("inf"), float("nan"), -1.0])
def test_compute_figures_no_bench_measures_are_refused_in_one_line(
    profile: MachineProfile, tmp_path: Path, figure: str, value: float
) -> None:
    """An hour per job, a zero time or a 100-fold slowdown is an edited or corrupt profile, refused before
    the planner's arithmetic overflows on it; the message names the file and the field."""
    if figure == "io_slowdown" and 0 <= value <= 100:
        return  # a slowdown of 0 (none measured) is plausible

    def edit(data: dict[str, Any]) -> None:
        times = data["compute"][figure]
        if isinstance(times, dict):
            times[next(iter(times), "1")] = value
        else:
            data["compute"][figure] = value

    with pytest.raises(ConfigError) as caught:
        MachineProfile.load(bad_profile(profile, tmp_path, edit))
    message = str(caught.value)
    assert f"field compute.{figure}" in message and str(tmp_path / "profile.json") in message
    assert "\n" not in message and "klotski-tier bench" in message


@pytest.mark.parametrize(("content", "phrase"), [(None, "cannot read"), ("{not json", "not valid JSON")])
def test_a_missing_or_broken_profile_file_is_one_line(
    tmp_path: Path, content: str | None, phrase: str
) -> None:
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=phrase):
        MachineProfile.load(path)
