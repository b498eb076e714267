"""Routing traces: recorded step by step, saved atomically, loaded back exactly, and every kind of
bad file refused with one line that names it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from klotski_tier.core.errors import ConfigError, InputError
from klotski_tier.core.model.spec import ModelSpec, QKNorm
from klotski_tier.core.observe.routing_trace import RoutingRecorder, RoutingTrace, TraceMeta

LAYERS, EXPERTS, TOP_K, HIDDEN, INTER = 2, 4, 2, 8, 16

SPEC = ModelSpec(
    family="mixtral",
    vocab_size=32,
    hidden_size=HIDDEN,
    num_layers=LAYERS,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    num_experts=EXPERTS,
    top_k=TOP_K,
    expert_intermediate_size=INTER,
    shared_expert_intermediate_size=0,
    norm_topk_prob=True,
    router_weights_in_model_dtype=False,
    qk_norm=QKNorm.NONE,
    qkv_bias=False,
    clip_qkv=None,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    dtype=torch.float32,
    eos_token_ids=(),
    pad_token_id=None,
    bos_token_id=None,
)

# steps[s][layer][token] = selected experts: a 3-token prefill, then two 2-token decode steps
STEPS = [
    [[[0, 1], [2, 3], [1, 0]], [[3, 2], [0, 3], [1, 2]]],
    [[[1, 2], [0, 1]], [[2, 3], [3, 0]]],
    [[[3, 1], [2, 0]], [[0, 2], [1, 3]]],
]


def record(steps: list[list[list[list[int]]]], meta: TraceMeta | None = None) -> RoutingTrace:
    recorder = RoutingRecorder(meta or TraceMeta.of(SPEC))
    for layers in steps:
        recorder.begin_step()
        for layer, routes in enumerate(layers):
            recorder.record(layer, routes)
    return recorder.trace()


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "routes.npz"
    record(STEPS).save(path)
    return path


def raw_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as archive:
        return {name: archive[name] for name in archive.files}


def write_archive(path: Path, arrays: dict[str, Any]) -> Path:
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def load_fails(path: Path, phrase: str) -> None:
    with pytest.raises(InputError) as caught:
        RoutingTrace.load(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and phrase in message, message


def test_meta_of_spec() -> None:
    meta = TraceMeta.of(SPEC)
    assert (meta.model_type, meta.num_layers, meta.num_experts, meta.top_k) == ("mixtral", 2, 4, 2)
    assert meta.expert_bytes == 3 * HIDDEN * INTER * 4 and meta.format_version == 1


def test_recorder_builds_one_int16_array_per_step() -> None:
    trace = record(STEPS)
    assert [step.shape for step in trace.steps] == [
        (LAYERS, 3, TOP_K),
        (LAYERS, 2, TOP_K),
        (LAYERS, 2, TOP_K),
    ]
    assert all(step.dtype == np.int16 for step in trace.steps)
    assert trace.routes(0, 1) == [[3, 2], [0, 3], [1, 2]]
    assert trace.as_steps() == STEPS
    assert trace.num_tokens == 7


def test_recorder_leaves_out_an_unfinished_step() -> None:
    recorder = RoutingRecorder(TraceMeta.of(SPEC))
    recorder.begin_step()
    recorder.record(0, [[0, 1]])
    recorder.record(1, [[2, 3]])
    recorder.begin_step()
    recorder.record(0, [[1, 2]])  # the run stopped before layer 1
    assert record([[[[0, 1]], [[2, 3]]]]).as_steps() == recorder.trace().as_steps()


def test_recorder_refuses_layers_out_of_order() -> None:
    recorder = RoutingRecorder(TraceMeta.of(SPEC))
    recorder.begin_step()
    with pytest.raises(AssertionError, match="layer 1 recorded after 0 layers"):
        recorder.record(1, [[0, 1]])


def test_round_trip_keeps_arrays_and_meta_exactly(saved: Path) -> None:
    original, loaded = record(STEPS), RoutingTrace.load(saved)
    assert loaded.meta == original.meta and loaded.source == saved
    assert len(loaded.steps) == len(original.steps)
    for ours, theirs in zip(original.steps, loaded.steps, strict=True):
        assert theirs.dtype == np.int16 and np.array_equal(ours, theirs)
    assert loaded.as_steps() == STEPS


def test_file_holds_concatenated_routes_offsets_and_json_meta(saved: Path) -> None:
    arrays = raw_arrays(saved)
    assert arrays["routes"].shape == (LAYERS, 7, TOP_K)
    assert arrays["offsets"].tolist() == [0, 3, 5, 7]
    meta = json.loads(str(arrays["meta"]))
    assert meta["format"] == "klotski-routing-trace" and meta["num_experts"] == EXPERTS


def test_empty_trace_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "empty.npz"
    record([]).save(path)
    loaded = RoutingTrace.load(path)
    assert loaded.steps == () and loaded.meta == TraceMeta.of(SPEC)


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = saved.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", broken)
    with pytest.raises(InputError, match="No space left on device"):
        record(STEPS[:1]).save(saved)
    assert saved.read_bytes() == before
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]


def test_save_into_a_missing_directory_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot write routing trace"):
        record(STEPS).save(tmp_path / "missing" / "routes.npz")


def test_missing_file(tmp_path: Path) -> None:
    load_fails(tmp_path / "nope.npz", "does not exist")


def test_text_file_is_not_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "notes.npz"
    path.write_text("hello\n")
    load_fails(path, "is not a klotski routing trace")


def test_bare_npy_array_is_not_a_trace(tmp_path: Path) -> None:
    path = tmp_path / "array.npy"
    np.save(path, np.zeros(3))
    load_fails(path, "is not a klotski routing trace")


def test_truncated_file_is_not_a_trace(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    load_fails(saved, "is not a klotski routing trace")


def test_foreign_npz_is_not_a_trace(tmp_path: Path) -> None:
    path = write_archive(tmp_path / "weights.npz", {"w": np.ones((2, 2))})
    load_fails(path, "is not a klotski routing trace")


def test_wrong_format_tag_is_not_a_trace(saved: Path) -> None:
    arrays = raw_arrays(saved)
    arrays["meta"] = np.array(json.dumps({"format": "something-else", "format_version": 1}))
    load_fails(write_archive(saved, arrays), "is not a klotski routing trace")


def test_newer_format_version_is_refused(saved: Path) -> None:
    arrays = raw_arrays(saved)
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "format_version": 2}))
    load_fails(write_archive(saved, arrays), "format version 2")


def test_malformed_meta_is_refused(saved: Path) -> None:
    arrays = raw_arrays(saved)
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "num_experts": -1}))
    load_fails(write_archive(saved, arrays), "malformed meta")


@pytest.mark.parametrize(
    ("name", "bad", "phrase"),
    [
        ("offsets", np.array([0, 3, 5, 6]), "do not split 7 tokens"),
        ("offsets", np.array([0, 5, 3, 7]), "do not split 7 tokens"),
        ("routes", np.full((LAYERS, 7, TOP_K), EXPERTS, dtype=np.int16), "expert ids outside 0..3"),
        ("routes", np.zeros((LAYERS + 1, 7, TOP_K), dtype=np.int16), "routes are int16 [3, 7, 2]"),
        ("routes", np.zeros((LAYERS, 7, TOP_K), dtype=np.float32), "not int"),
    ],
)
def test_inconsistent_arrays_are_refused(saved: Path, name: str, bad: np.ndarray, phrase: str) -> None:
    arrays = raw_arrays(saved)
    arrays[name] = bad
    load_fails(write_archive(saved, arrays), phrase)


def test_missing_routes_array_is_refused(saved: Path) -> None:
    arrays = raw_arrays(saved)
    del arrays["routes"]
    load_fails(write_archive(saved, arrays), "routes or offsets array is missing")


def test_check_model_accepts_the_same_model_in_another_dtype(saved: Path) -> None:
    RoutingTrace.load(saved).check_model(dataclasses.replace(SPEC, dtype=torch.bfloat16))


def test_check_model_refuses_another_model(saved: Path) -> None:
    other = dataclasses.replace(SPEC, family="qwen3_moe", num_experts=8)
    with pytest.raises(ConfigError) as caught:
        RoutingTrace.load(saved).check_model(other)
    message = str(caught.value)
    assert f"routing trace {saved} was recorded from another model" in message
    assert "(mixtral, 2 layers x 4 experts, top-2" in message
    assert "this model is qwen3_moe, 2 layers x 8 experts, top-2" in message
    assert message.endswith("record a new one") and "\n" not in message
