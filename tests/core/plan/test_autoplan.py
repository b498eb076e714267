"""Planning a run from Python, before any engine loads: the plan's options where the user set none,
the user's where they did, prompt lengths from ids or text, and a note (never an error) when no plan
can be made."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from klotski_tier.core.errors import CheckpointError, InputError
from klotski_tier.core.model.layouts import total_block_bytes
from klotski_tier.core.plan.autoplan import (
    NO_PROFILE_NOTE,
    PLAN_AUTO,
    PLANNED_FIELDS,
    plan_model,
    plan_request,
    prompt_lengths,
    store_ratio,
)
from klotski_tier.core.plan.hardware import UNMEASURED_DISK_GBPS, local_machine
from klotski_tier.core.plan.planner import PlanRequest, make_plan
from klotski_tier.core.runtime.config import ALL_EXPERTS, EngineOptions
from klotski_tier.core.store.files import open_model
from tests.conftest import BENCH_PROFILE, CheckpointFactory

PROFILE = BENCH_PROFILE
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12]]
MAX_NEW = 3
WORDS = {"[UNK]": 0, "the": 1, "cat": 2, "sat": 3}


pytestmark = pytest.mark.usefixtures("empty_cache")


@pytest.fixture(scope="module")
def model(checkpoint_factory: CheckpointFactory) -> Path:
    return checkpoint_factory("mixtral")


def _word_tokenizer(directory: Path) -> Path:
    """A tokenizer.json that gives one token per known word (and [UNK] for the others)."""
    tokenizer = Tokenizer(models.WordLevel(WORDS, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def test_the_plan_sets_every_field_the_user_left_open(model: Path) -> None:
    chosen = plan_model(model, EngineOptions(), PROMPTS, MAX_NEW, profile_path=PROFILE)
    assert chosen.mode == PLAN_AUTO and chosen.plan is not None and chosen.note == ""
    assert set(chosen.planned) == set(PLANNED_FIELDS)
    request = PlanRequest(
        open_model(model).spec, local_machine(PROFILE), sequences=len(PROMPTS),
        prompt_tokens=max(map(len, PROMPTS)), new_tokens=MAX_NEW,
    )  # fmt: skip
    expected = make_plan(request).engine_options()
    assert {name: getattr(chosen.options, name) for name in PLANNED_FIELDS} == expected


def test_fields_the_user_set_stay_and_the_plan_is_made_around_them(model: Path) -> None:
    options = EngineOptions(batches=3, hot_experts=1)
    chosen = plan_model(
        model, options, PROMPTS, MAX_NEW, explicit={"batches", "hot_experts"}, profile_path=PROFILE
    )
    assert (chosen.options.batches, chosen.options.hot_experts) == (3, 1)
    assert chosen.plan is not None and (chosen.plan.batches, chosen.plan.hot_experts) == (3, 1)
    assert set(chosen.planned) == set(PLANNED_FIELDS) - {"batches", "hot_experts"}  # the others, planned


@pytest.mark.parametrize(("fraction", "eviction"), [(0.5, "sweep"), (0.7, "sweep"), (2.0, "lru")])
def test_without_a_profile_the_plan_is_made_from_conservative_defaults(
    checkpoint_factory: CheckpointFactory, fraction: float, eviction: str
) -> None:
    """A first run: no profile. Where the weights stream (a device budget below the model, no host
    tier) the plan evicts with sweep; where they fit, LRU; either way memory allows a group that covers
    every prompt, and the plan says what it was based on."""
    deep = checkpoint_factory("mixtral", num_layers=6)  # a layer is a sixth of the model: sweep keeps some
    budget = int(total_block_bytes(open_model(deep).layouts) * fraction)
    options = EngineOptions(device="cpu", device_memory_bytes=budget, host_memory_bytes=0)
    chosen = plan_model(
        deep, options, PROMPTS, MAX_NEW, explicit={"device_memory_bytes", "host_memory_bytes"}
    )
    assert chosen.plan is not None and chosen.note == NO_PROFILE_NOTE
    assert chosen.basis.startswith("this (not measured): conservative defaults")
    assert f"a drive read at {UNMEASURED_DISK_GBPS:g} GB/s" in chosen.basis
    assert chosen.options.eviction == eviction
    assert chosen.options.batches * chosen.options.batch_size >= len(PROMPTS)


def test_a_plan_that_cannot_be_made_is_a_note(model: Path) -> None:
    options = EngineOptions(device_memory_bytes=1024)  # below any working set
    chosen = plan_model(model, options, PROMPTS, MAX_NEW, profile_path=PROFILE)
    assert chosen.options == options and chosen.plan is None
    assert chosen.note.startswith("the planner cannot plan this run (device memory budget")


def test_a_checkpoint_that_cannot_be_opened_raises(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        plan_model(tmp_path, EngineOptions(), PROMPTS, MAX_NEW, profile_path=PROFILE)


def test_prompt_lengths_count_ids_and_text(tmp_path: Path) -> None:
    assert prompt_lengths(tmp_path, PROMPTS) == [3, 2, 4, 2, 1]  # ids: no tokenizer needed
    with pytest.raises(InputError, match=r"no tokenizer\.json"):
        prompt_lengths(tmp_path, ["the cat"])
    directory = _word_tokenizer(tmp_path)
    assert prompt_lengths(directory, ["the cat sat", [7, 8], "a dog"]) == [3, 2, 2]
    (directory / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="cannot read tokenizer"):
        prompt_lengths(directory, ["the cat"])


def test_the_request_takes_budgets_lengths_and_all_experts_from_the_run(model: Path) -> None:
    files = open_model(model)
    options = EngineOptions(hot_experts=ALL_EXPERTS, device_memory_bytes=2**26, host_memory_bytes=2**27)
    request = plan_request(files, options, [5, 9, 2], 7, {"hot_experts"}, local_machine(PROFILE))
    assert (request.sequences, request.prompt_tokens, request.new_tokens) == (3, 9, 7)
    assert (request.device_memory_bytes, request.host_memory_bytes) == (2**26, 2**27)
    assert request.hot_experts == files.spec.num_experts and request.batches is None
    assert store_ratio(files.store) is None and request.compression_ratio is None
    fixed = plan_request(files, dataclasses.replace(options, batches=4), [5], 7, {"batches"}, request.machine)
    assert (fixed.batches, fixed.hot_experts) == (4, None)
