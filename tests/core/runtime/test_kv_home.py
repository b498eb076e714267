"""The KV cache in host RAM, streamed through two device slots by the attention (runtime/kv.py).

Exactness against transformers for every family (float32: tokens identical, logits within 1e-4) at
several batch-group shapes and budgets; the device budget no longer counts the whole cache; batch
k+1's cache arrives while batch k computes, and each step's new entries go home.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.errors import BudgetError, ConfigError
from klotski_tier.core.model.layouts import largest_block_bytes
from klotski_tier.core.observe.events import JOB, WANT
from klotski_tier.core.runtime.config import parse_config
from klotski_tier.core.store.files import open_model
from tests.checkpoints import FAMILIES, make_checkpoint
from tests.core.runtime.test_exactness import (
    NEW_TOKENS,
    PROMPTS,
    Reference,
    reference_outputs,
    teacher_forced_logits,
)
from tests.numerics import assert_logits_close, compare_tokens

SHAPES = [(1, 1), (2, 2), (3, 1), (1, 4)]  # (n batches, bs sequences per batch)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reference]:
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param, top_k=2)
    return directory, reference_outputs(directory, torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}-bs{s[1]}")
@pytest.mark.parametrize("small_budget", [False, True], ids=["whole-model", "few-experts"])
def test_a_kv_cache_in_host_ram_gives_the_reference_tokens_and_logits(
    case: tuple[Path, Reference], shape: tuple[int, int], small_budget: bool
) -> None:
    directory, reference = case
    n, bs = shape
    options = EngineOptions(batches=n, batch_size=bs, kv_home="host")
    budget = None
    if small_budget:
        probe = Engine.load(directory, options)
        budget = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)[0] + 3 * probe.spec.expert_bytes
    engine = Engine.load(directory, EngineOptions(batches=n, batch_size=bs, kv_home="host",
                                                  device_memory_bytes=budget))  # fmt: skip
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert [o.token_ids for o in result.outputs] == reference.tokens
    assert_logits_close([o.logits for o in result.outputs], reference.logits, torch.float32)
    if budget is not None:
        assert result.metrics.tiers["device"].peak_bytes <= budget


def test_the_device_holds_two_slots_of_one_layer_instead_of_the_whole_cache(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=4)
    prompts = [[1 + i, 2 + i, 3 + i] for i in range(8)]

    def device_minimum(home: str) -> int:
        options = EngineOptions(batches=4, batch_size=2, kv_home=home, host_memory_bytes=1 << 30)
        engine = Engine.load(directory, options)
        return engine.minimum_budgets(prompts, max_new_tokens=16)[0]

    spec = Engine.load(directory).spec
    per_batch_layer = 2 * 19 * spec.kv_bytes_per_token() // spec.num_layers  # bs 2, 3 + 16 positions
    whole, slots = 4 * spec.num_layers * per_batch_layer, 2 * per_batch_layer
    assert device_minimum("device") - device_minimum("host") == whole - slots


def test_the_next_batchs_cache_is_asked_for_before_this_batchs_attention_runs(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    engine = Engine.load(directory, EngineOptions(batches=3, batch_size=1, kv_home="host"))
    result = engine.generate([[5, 6], [7], [8, 9, 10]], max_new_tokens=3, events=True)
    assert result.events is not None
    order = [(e.kind, e.subject) for e in result.events.events if e.kind in (JOB, WANT)]
    for layer in range(2):
        for index in range(3):
            asked = order.index((WANT, f"L{layer} kv b{index}"))  # the first step's
            runs = order.index((JOB, f"L{layer} attention b{index}"))
            assert asked < runs
            if index > 0:  # batch k's cache is asked for before batch k-1 computes
                assert asked < order.index((JOB, f"L{layer} attention b{index - 1}"))
            elif layer > 0:  # the first batch's, during the layer before: before its gate and experts
                assert asked < order.index((JOB, f"L{layer - 1} gate b0"))
    assert sum(1 for kind, subject in order if kind == WANT and " kv " in subject) == 3 * 2 * 3  # steps


def test_the_kv_home_is_a_config_key_with_a_one_line_error() -> None:
    assert parse_config({"kv": {"home": "host"}}) == {"kv_home": "host"}
    with pytest.raises(ConfigError, match=r"kv\.home"):
        parse_config({"kv": {"home": "ssd"}})
    with pytest.raises(ConfigError, match="kv_home must be one of device, host"):
        EngineOptions(kv_home="ssd")


def test_a_kv_cache_in_host_ram_counts_against_the_host_budget(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    files = open_model(directory)
    parts = (PROMPTS[:2], PROMPTS[2:4], PROMPTS[4:])
    kv = (
        sum(len(part) * max(len(p) + NEW_TOKENS for p in part) for part in parts)
        * files.spec.kv_bytes_per_token()
    )
    block = largest_block_bytes(files.layouts)
    options = EngineOptions(batches=3, batch_size=2, kv_home="host", host_memory_bytes=kv + block - 1)
    engine = Engine.load(directory, options)
    device_min, host_min = engine.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert host_min == kv + block  # the cache, and room to stage the largest block
    with pytest.raises(
        BudgetError, match=r"KV cache and activations kept in host RAM .*; raise --host-memory or keep"
    ):
        engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    # A CPU device without a host tier: host RAM is the device's memory, the cache counts there.
    no_tier = Engine.load(
        directory, EngineOptions(batches=3, batch_size=2, kv_home="host", host_memory_bytes=0)
    )
    assert no_tier.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS) == (device_min + kv, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_with_the_kv_cache_in_host_ram_holds_to_the_numerics_rule(
    tmp_path: Path, family: str
) -> None:
    _bfloat16_holds(tmp_path, family, "host")


def test_bfloat16_with_the_kv_cache_on_the_drive_holds_to_the_numerics_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))
    _bfloat16_holds(tmp_path, "qwen3_moe", "disk")


def _bfloat16_holds(tmp_path: Path, family: str, home: str) -> None:
    directory = make_checkpoint(tmp_path / family, family, dtype=torch.bfloat16, top_k=2)
    reference = reference_outputs(directory, torch.bfloat16)
    engine = Engine.load(directory, EngineOptions(batches=2, batch_size=2, kv_home=home))
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert_logits_close(teacher_forced_logits(engine, PROMPTS, reference), reference.logits, torch.bfloat16)
    compare_tokens([o.token_ids for o in result.outputs], reference.tokens, reference.logits, torch.bfloat16)


@pytest.mark.parametrize("home", ["host", "disk"])
def test_a_kv_cache_four_times_the_device_budget_runs_within_the_budget(
    tmp_path: Path, home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many sequences, long generations: the group's cache is over 4x the device budget, which holds
    the two slots, the activations and a few experts; the device's measured peak stays within it."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=4)
    prompts = [[1 + (i * 5 + j) % 90 for j in range(6)] for i in range(16)]
    options = EngineOptions(batches=4, batch_size=4, kv_home=home, host_memory_bytes=1 << 30)
    probe = Engine.load(directory, options)
    budget = probe.minimum_budgets(prompts, max_new_tokens=120)[0] + 2 * probe.spec.expert_bytes
    kv = 16 * (6 + 120) * probe.spec.kv_bytes_per_token()
    assert kv >= 4 * budget, (kv, budget)
    engine = Engine.load(directory, dataclasses.replace(options, device_memory_bytes=budget))
    result = engine.generate(prompts, max_new_tokens=120)
    assert result.metrics.tiers["device"].peak_bytes <= budget
    on_device = Engine.load(directory, EngineOptions(batches=4, batch_size=4, host_memory_bytes=1 << 30))
    assert on_device.minimum_budgets(prompts, max_new_tokens=120)[0] > budget  # the cache alone would not fit
    expected = on_device.generate(prompts, max_new_tokens=120)  # float32: the same tokens, unbudgeted
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]


def test_the_caches_copies_are_counted_and_drawn_on_their_own_track(tmp_path: Path) -> None:
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    engine = Engine.load(directory, EngineOptions(batches=2, batch_size=2, kv_home="host"))
    prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    result = engine.generate(prompts, max_new_tokens=3, timeline=True)
    spec, layers = engine.spec, engine.spec.num_layers
    per_token = spec.kv_bytes_per_token() // layers
    written = sum(len(p) for p in prompts) + 2 * len(prompts)  # the prompts, then two decode tokens each
    assert result.metrics.kv_bytes_out >= written * per_token * layers
    assert result.metrics.kv_bytes_in > 0
    assert result.timeline is not None
    events = result.timeline.to_chrome()["traceEvents"]
    spans = [e["name"] for e in events if e.get("ph") == "X" and e.get("args", {}).get("kind") == "kv"]
    batches, steps = 2, 3  # a prefill and two decode steps; the prefill reads no cache in
    assert sum(name.endswith(" in") for name in spans) == (steps - 1) * layers * batches
    assert sum(name.endswith(" out") for name in spans) == steps * layers * batches


@pytest.fixture
def scratch_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache directory the run's KV files go under (``$KLOTSKI_TIER_CACHE/kv-scratch``)."""
    monkeypatch.setenv("KLOTSKI_TIER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "kv-scratch"


@pytest.mark.parametrize("shape", [(2, 2), (3, 1)], ids=lambda s: f"n{s[0]}-bs{s[1]}")
def test_a_kv_cache_on_the_drive_gives_the_reference_tokens_and_its_files_go(
    case: tuple[Path, Reference], shape: tuple[int, int], scratch_root: Path
) -> None:
    directory, reference = case
    n, bs = shape
    engine = Engine.load(directory, EngineOptions(batches=n, batch_size=bs, kv_home="disk"))
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert [o.token_ids for o in result.outputs] == reference.tokens
    assert_logits_close([o.logits for o in result.outputs], reference.logits, torch.float32)
    assert result.metrics.kv_bytes_out > 0 and result.metrics.kv_bytes_in > 0
    assert not scratch_root.exists()  # the run's directory is gone, and kv-scratch/ that the run made


def test_the_kv_files_go_when_a_run_is_interrupted(tmp_path: Path, scratch_root: Path) -> None:
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    engine = Engine.load(directory, EngineOptions(batches=2, batch_size=2, kv_home="disk"))
    seen: list[list[Path]] = []

    def interrupt(phase: str, done: int, total: int) -> None:
        seen.append([p for run in scratch_root.iterdir() for p in run.iterdir()])
        raise KeyboardInterrupt  # as Ctrl-C would, after the prefill

    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, progress=interrupt)
    assert len(seen[0]) == 2  # one file per batch of the first group (4 of the 5 prompts) existed mid-run
    assert not scratch_root.exists()


def test_a_groups_kv_files_go_once_the_group_is_done(tmp_path: Path, scratch_root: Path) -> None:
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    engine = Engine.load(directory, EngineOptions(batches=1, batch_size=2, kv_home="disk"))
    files: list[int] = []

    def count(phase: str, done: int, total: int) -> None:
        if phase == "prefill":  # each group's first step
            files.append(sum(1 for run in scratch_root.iterdir() for _ in run.iterdir()))

    engine.generate(PROMPTS, max_new_tokens=2, progress=count)
    assert files == [1, 1, 1]  # 5 prompts in groups of 2: never more than the group's one file


def test_a_kv_cache_on_the_drive_is_read_and_written_with_o_direct_in_aligned_rows(tmp_path: Path) -> None:
    """Each position's row of a file is padded to the drive's alignment, so a layer's prefix and a
    step's new entries are aligned ranges the scratch tier moves past the page cache."""
    from klotski_tier.core.runtime.kv import DiskKv
    from klotski_tier.tiers.device import DeviceDriver

    spec = Engine.load(make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)).spec

    async def run() -> tuple[bool, int]:
        driver = DeviceDriver("cpu")
        kv = DiskKv(driver, spec, tmp_path / "scratch")
        try:
            _, _, path = await kv.new_caches(3, 10)
            assert path is not None
            return kv.scratch.is_direct(path), path.stat().st_size
        finally:
            await kv.aclose()
            await driver.aclose()

    direct, size = asyncio.run(run())
    row = 3 * spec.num_kv_heads * spec.head_dim * spec.dtype.itemsize  # 3 sequences' heads at one position
    assert direct and row % 4096 != 0
    assert size == spec.num_layers * 2 * 10 * 4096 * -(-row // 4096)


@pytest.mark.parametrize(
    "kv",
    [{"kv_home": "host"}, {"kv_home": "host", "kv_attention": "host"}, {"kv_home": "disk"}],
    ids=["host", "host-attention", "disk"],
)
def test_the_first_layers_cache_stays_on_the_device_and_the_rest_streams(
    case: tuple[Path, Reference], kv: dict[str, str], scratch_root: Path
) -> None:
    """[kv] device_layers = 1 of 2: layer 0's cache on the device for the whole run, layer 1's at home;
    the same tokens and logits, half the cache's copies, and the device counts layer 0's cache."""
    directory, reference = case
    options = EngineOptions(batches=2, batch_size=2, kv_device_layers=1, host_memory_bytes=1 << 30, **kv)  # type: ignore[arg-type]
    engine = Engine.load(directory, options)
    result = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert [o.token_ids for o in result.outputs] == reference.tokens
    assert_logits_close([o.logits for o in result.outputs], reference.logits, torch.float32)
    streamed = Engine.load(directory, dataclasses.replace(options, kv_device_layers=0))
    whole = streamed.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    moved = (result.metrics.kv_bytes_in, result.metrics.kv_bytes_out, result.metrics.host_attention_bytes)
    assert [2 * m for m in moved] == [
        whole.metrics.kv_bytes_in, whole.metrics.kv_bytes_out, whole.metrics.host_attention_bytes
    ]  # fmt: skip
    spec = engine.spec
    largest = (PROMPTS[:2], PROMPTS[2:4])  # the first group's two batches
    layer_0 = (
        sum(len(p) * max(len(s) + NEW_TOKENS for s in p) for p in largest) * spec.kv_bytes_per_token() // 2
    )
    (device, host), (device_0, host_0) = (
        e.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS) for e in (engine, streamed)
    )
    assert device - device_0 == layer_0  # the largest group's layer 0, on the device
    assert host_0 - host == (layer_0 if kv["kv_home"] == "host" else 0)  # and no longer in host RAM


def test_device_layers_is_a_config_key_with_one_line_errors(tmp_path: Path) -> None:
    assert parse_config({"kv": {"home": "host", "device_layers": 3}}) == {
        "kv_home": "host",
        "kv_device_layers": 3,
    }
    with pytest.raises(ConfigError, match=r"kv\.device_layers"):
        parse_config({"kv": {"device_layers": -1}})
    with pytest.raises(ConfigError, match=r'the whole cache is there already \(\[kv\] home = "device"\)'):
        EngineOptions(kv_device_layers=2)
    directory = make_checkpoint(tmp_path / "m", "mixtral", num_layers=2)
    engine = Engine.load(directory, EngineOptions(kv_home="host", kv_device_layers=2))
    with pytest.raises(ConfigError, match=r"every one of the model's 2 layers' cache on the device"):
        engine.generate(PROMPTS, max_new_tokens=2)
