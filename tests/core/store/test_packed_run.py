"""A packed store runs like the checkpoint it came from, and no run leaves the model in the page cache.

pack, then verify, then run: the same tokens as running the original directory, with and
without compression, under a budget that makes experts stream; afterwards the page cache
holds none of the files the run read (O_DIRECT for the store, dropped pages for a checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.store.codec import parse_codec
from klotski_tier.core.store.pack import pack
from klotski_tier.core.store.packed import verify_store
from klotski_tier.core.store.pagecache import cached_fraction, evict
from tests.checkpoints import make_checkpoint

PROMPTS = [[5, 7, 9, 11], [3, 4], [20, 21, 22], [40, 41, 42, 43, 44]]
NEW_TOKENS = 5
CACHED_AT_MOST = 0.05  # share of a file's pages the page cache may still hold after a run


def streaming(model: Path) -> EngineOptions:
    probe = Engine.load(model, EngineOptions(batches=2, batch_size=2))
    budget = probe.minimum_budgets(PROMPTS, max_new_tokens=NEW_TOKENS)[0] + 2 * probe.spec.expert_bytes
    return EngineOptions(batches=2, batch_size=2, device_memory_bytes=budget, host_memory_bytes=budget)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    return make_checkpoint(directory, "qwen2_moe", dtype=request.param, num_layers=3, num_experts=6, shards=2)


@pytest.mark.parametrize("codec", [None, "zstd:3"])
def test_pack_verify_run_gives_the_checkpoints_tokens(
    checkpoint: Path, tmp_path: Path, codec: str | None
) -> None:
    expected = Engine.load(checkpoint, streaming(checkpoint)).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    store = tmp_path / "store"
    summary = pack(checkpoint, store, codec=parse_codec(codec) if codec else None)
    assert verify_store(store).ok
    if codec is not None:
        assert summary.stored_bytes <= summary.raw_bytes and 0 < summary.ratio <= 1
    result = Engine.load(store, streaming(store)).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]
    assert result.metrics.tiers["host"].evictions > 0, "blocks should stream from the store"


def test_no_run_leaves_the_model_in_the_page_cache(checkpoint: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    pack(checkpoint, store)
    shards = sorted(checkpoint.glob("*.safetensors"))
    for path in [*shards, store / "blocks.bin"]:
        evict(path)
    Engine.load(checkpoint, streaming(checkpoint)).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    for shard in shards:
        assert cached_fraction(shard) <= CACHED_AT_MOST, f"{shard.name} stayed in the page cache"
    Engine.load(store, streaming(store)).generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert cached_fraction(store / "blocks.bin") <= CACHED_AT_MOST
    with (store / "blocks.bin").open("rb") as handle:  # the measurement itself sees a plain read
        handle.read()
    assert cached_fraction(store / "blocks.bin") > 0.5
