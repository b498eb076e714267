"""The demo checkpoint: a real Mixtral layout, loadable by transformers, deterministic and atomic."""

from __future__ import annotations

import ast
import itertools
import json
import math
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from tokenizers import Tokenizer

from klotski_tier.core import paths
from klotski_tier.core.demo import build as demo
from klotski_tier.core.demo import tokenizer as demo_tokenizer
from klotski_tier.core.demo.build import DEMO_DIR_NAME, build_demo, demo_model_dir
from klotski_tier.core.demo.shape import (
    BOS_TOKEN_ID,
    DEMO_ROUTING,
    DEMO_SHAPE,
    SPECIAL_TOKENS,
    UNK_TOKEN_ID,
    DemoRouting,
    DemoShape,
)
from klotski_tier.core.errors import CheckpointError, ConfigError
from klotski_tier.core.observe.routing_stats import RoutingStats, routing_stats

TINY = DemoShape(
    vocab_size=320,
    hidden_size=64,
    num_layers=2,
    num_experts=4,
    top_k=2,
    intermediate_size=96,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=128,
    rope_theta=1e6,
)
TINY_SHARD_BYTES = 100_000  # ~420 KB of tensors: five shards
MB = 1000**2
MEDIUM = DemoShape(  # the demo's vocabulary, experts and top-k; half its width, a quarter of its depth
    vocab_size=1024,
    hidden_size=256,
    num_layers=3,
    num_experts=8,
    top_k=2,
    intermediate_size=512,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=256,
    rope_theta=1e6,
)
UNSTRUCTURED = DemoRouting(hot_logit=0.0, hot_exponent=1.0, type_logit=0.0)  # plain random routers


def _build_tiny(directory: Path) -> Path:
    return build_demo(directory, TINY, shard_max_bytes=TINY_SHARD_BYTES)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_tiny(tmp_path_factory.mktemp("demo") / "tiny")


def _saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118
    return tensors


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_every_file_of_the_build_follows_the_umask(tmp_path: Path) -> None:
    umask = 0o027  # neither 0o022 (the usual) nor 0o077 (what a 0600 file looks like)
    previous = os.umask(umask)
    try:
        directory = _build_tiny(tmp_path / "tiny")
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in directory.iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_layout_is_a_sharded_mixtral_repository(tiny_dir: Path) -> None:
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    shards = sorted(tiny_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3
    assert [s.name for s in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, 6)
    ]
    tensors = _saved_tensors(tiny_dir)
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            assert all(index["weight_map"][name] == shard.name for name in handle.keys())  # noqa: SIM118
    expert = "model.layers.1.block_sparse_moe.experts.3"
    assert tensors[f"{expert}.w1.weight"].shape == (TINY.intermediate_size, TINY.hidden_size)
    assert tensors[f"{expert}.w3.weight"].shape == (TINY.intermediate_size, TINY.hidden_size)
    assert tensors[f"{expert}.w2.weight"].shape == (TINY.hidden_size, TINY.intermediate_size)
    assert tensors["model.layers.0.block_sparse_moe.gate.weight"].shape == (
        TINY.num_experts,
        TINY.hidden_size,
    )
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (32, TINY.hidden_size)  # Hkv*D = 2*16
    assert torch.equal(tensors["model.norm.weight"], torch.ones(TINY.hidden_size, dtype=torch.bfloat16))
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    assert (config["dtype"], config["bos_token_id"], config["eos_token_id"]) == ("bfloat16", 1, 2)
    assert config["tie_word_embeddings"] is False and config["sliding_window"] is None


def _hf_expected(saved: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved tensors under the model's state-dict names (transformers 5 fuses experts per layer)."""
    expected = {n: t for n, t in saved.items() if ".experts." not in n}
    expected = {n.replace(".block_sparse_moe.gate.", ".mlp.gate."): t for n, t in expected.items()}
    for layer in range(TINY.num_layers):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        fused = f"model.layers.{layer}.mlp.experts"
        if f"{fused}.gate_up_proj" not in state:  # per-expert modules: names as saved
            expected.update({n: t for n, t in saved.items() if n.startswith(prefix)})
            continue
        w = {
            k: [saved[f"{prefix}.{e}.{k}.weight"] for e in range(TINY.num_experts)]
            for k in ("w1", "w2", "w3")
        }
        expected[f"{fused}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(w["w1"], w["w3"], strict=True)]
        )  # [E, 2I, H]
        expected[f"{fused}.down_proj"] = torch.stack(w["w2"])  # [E, H, I]
    return expected


def test_loads_in_transformers_with_the_saved_weights(tiny_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, info = transformers.MixtralForCausalLM.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    state = model.state_dict()
    expected = _hf_expected(_saved_tensors(tiny_dir), state)
    assert set(expected) == set(state)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    ids = torch.tensor([[1, 5, 77, 200, 319, 42]])  # [B=1, T]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert out.logits.shape == (1, 6, TINY.vocab_size) and torch.isfinite(out.logits).all()
    states = [h.float() for h in out.hidden_states[:-1]]  # residual stream before the final norm
    updates = [float((b - a).std()) for a, b in itertools.pairwise(states)]
    assert all(0.2 < u < 5.0 for u in updates), updates  # every layer matters, nothing explodes


def test_tokenizer_files_load_in_tokenizers_and_transformers(tiny_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == TINY.vocab_size
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    assert (fast.unk_token_id, fast.bos_token_id, fast.eos_token_id) == (0, 1, 2)
    text = "The quick brown fox, naïve café, 東京 🙂"
    assert fast(text)["input_ids"] == tokenizer.encode(text).ids
    assert fast.decode(tokenizer.encode(text).ids, skip_special_tokens=True) == text


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=60).filter(lambda t: not any(s in t for s in SPECIAL_TOKENS)))
def test_any_text_round_trips(tiny_tokenizer: Tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text).ids
    assert ids[0] == BOS_TOKEN_ID
    assert all(0 <= i < TINY.vocab_size for i in ids)
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_two_builds_are_byte_identical(tiny_dir: Path, tmp_path: Path) -> None:
    again = _build_tiny(tmp_path / "again")
    assert _files(again) == _files(tiny_dir)


def test_failed_build_leaves_nothing_and_a_retry_succeeds(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_writer = demo._write_shard
    calls: list[Path] = []

    def failing_writer(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_writer(path, tensors)

    monkeypatch.setattr(demo, "_write_shard", failing_writer)
    with pytest.raises(CheckpointError, match="cannot build the demo model"):
        _build_tiny(tmp_path / "model")
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []  # no final directory, no temp left
    monkeypatch.setattr(demo, "_write_shard", real_writer)
    assert _files(_build_tiny(tmp_path / "model")) == _files(tiny_dir)


def test_a_committed_build_wins_over_a_later_one(tiny_dir: Path, tmp_path: Path) -> None:
    first = _build_tiny(tmp_path / "model")
    (first / "marker").write_text("first")
    assert _build_tiny(tmp_path / "model") == first
    assert (first / "marker").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_temp_of_a_dead_process_is_removed_and_of_a_live_one_kept(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".model.tmp-{dead.pid}-0000"
    live = tmp_path / f".model.tmp-{os.getpid()}-1111"
    for temp in (stale, live):
        temp.mkdir()
        (temp / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    _build_tiny(tmp_path / "model")
    assert not stale.exists() and live.exists()


def test_demo_model_dir_builds_once_under_the_cache_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(paths.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "DEMO_SHAPE", TINY)
    seen: list[tuple[int, int]] = []
    path = demo_model_dir(progress=lambda done, total: seen.append((done, total)))
    assert path == tmp_path / "cache" / DEMO_DIR_NAME and (path / "config.json").is_file()
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    monkeypatch.setattr(demo, "build_demo", lambda *a, **k: pytest.fail("rebuilt a built demo"))
    assert demo_model_dir() == path


def test_default_cache_dir_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(paths.CACHE_ENV_VAR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert paths.default_cache_dir() == tmp_path / "home" / ".cache" / "klotski-tier"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.default_cache_dir() == tmp_path / "xdg" / "klotski-tier"
    monkeypatch.setenv(paths.CACHE_ENV_VAR, str(tmp_path / "own"))
    assert paths.default_cache_dir() == tmp_path / "own"


def test_an_incomplete_cache_directory_is_reported(tmp_path: Path) -> None:
    (tmp_path / DEMO_DIR_NAME).mkdir()
    with pytest.raises(CheckpointError, match="incomplete; delete it"):
        demo_model_dir(tmp_path)


def test_bad_shapes_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="num_heads"):
        DemoShape(
            320, 64, 2, 4, 2, 96, num_heads=5, num_kv_heads=1, max_position_embeddings=8, rope_theta=1.0
        )
    with pytest.raises(ConfigError, match="token ids"):
        demo_tokenizer.train_demo_tokenizer(50_000)


def test_prompts_and_runtime_imports() -> None:
    prompts = demo_tokenizer.demo_prompts()
    assert len(prompts) >= 4 and all(p.strip() for p in prompts)
    tree = ast.parse(Path(demo.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.split(".")[0] == "transformers" for name in imported)


def test_bad_routing_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="between 0 and"):
        DemoRouting(hot_logit=-1.0, hot_exponent=1.0, type_logit=3.0)
    with pytest.raises(ConfigError, match="between 0 and"):
        DemoRouting(hot_logit=1.0, hot_exponent=1.0, type_logit=math.inf)
    with pytest.raises(ConfigError, match="must exceed num_experts"):
        DemoShape(320, 8, 1, 8, 2, 16, num_heads=2, num_kv_heads=1, max_position_embeddings=8, rope_theta=1.0)


def test_routing_parameters_change_only_the_routers(tiny_dir: Path, tmp_path: Path) -> None:
    plain = build_demo(tmp_path / "plain", TINY, routing=UNSTRUCTURED, shard_max_bytes=TINY_SHARD_BYTES)
    ours, theirs = _saved_tensors(tiny_dir), _saved_tensors(plain)
    changed = {name for name, tensor in ours.items() if not torch.equal(tensor, theirs[name])}
    assert changed == {f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(TINY.num_layers)}


# --- routing, measured through transformers ---------------------------------------------------

MEDIUM_NEW_TOKENS = 12  # greedy tokens per demo prompt, measured with the prompts
FULL_NEW_TOKENS = 32  # the same for the full default demo


@dataclass(frozen=True)
class Measured:
    stats: RoutingStats
    generated: list[list[int]]  # the greedy tokens of each demo prompt
    max_abs_logit: float  # over every position of prompts and generated tokens


def measure_routing(directory: Path, *, new_tokens: int, dtype: torch.dtype = torch.float32) -> Measured:
    """Routes of the demo prompts plus ``new_tokens`` greedy tokens each, through transformers' Mixtral.

    The prompts are left-padded into one batch and generated greedily; one forward over prompts and
    generated tokens then gives every layer's router logits, whose top-k (first choice first) are the
    routes. Padding is dropped, so every real token counts once per layer.
    """
    transformers = pytest.importorskip("transformers")
    model = transformers.MixtralForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(directory, padding_side="left")
    tokenizer.pad_token = SPECIAL_TOKENS[UNK_TOKEN_ID]  # id 0: never generated, masked out
    batch = tokenizer(demo_tokenizer.demo_prompts(), return_tensors="pt", padding=True)
    prompt_length = batch["input_ids"].shape[1]
    with torch.no_grad():
        ids = batch["input_ids"]  # [B, T]
        if new_tokens:
            ids = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(ids[:, prompt_length:])], dim=1)  # [B, T]
        out = model(ids, attention_mask=mask, output_router_logits=True)
    keep = mask.flatten().bool()  # [B*T]
    top_k = model.config.num_experts_per_tok
    routes = [logits[keep].topk(top_k, dim=-1).indices.numpy() for logits in out.router_logits]  # [N, k]
    return Measured(
        stats=routing_stats(routes, model.config.num_local_experts),
        generated=ids[:, prompt_length:].tolist(),
        max_abs_logit=float(out.logits[mask.bool()].abs().max()),
    )


def _assert_routes_like_mixtral(stats: RoutingStats) -> None:
    """Skew as in Mixtral-8x7B, and a previous expert that predicts the next far beyond frequency."""
    means = stats.means()
    assert all(0.4 <= share <= 0.65 for share in stats.top2_share), stats.top2_share
    assert 0.45 <= means["top2_share"] <= 0.6, means
    assert means["predictability"] > 0.55 and means["baseline"] < 0.4, means
    assert means["predictability"] > means["baseline"] + 0.25, means
    assert means["nmi"] > 0.35 and means["recall"] > means["recall_baseline"] + 0.05, means


def _assert_sane_generation(measured: Measured, new_tokens: int) -> None:
    for tokens in measured.generated:
        assert len(tokens) == new_tokens and min(tokens) >= len(SPECIAL_TOKENS)  # no <unk>, <s>, </s>
        assert len(set(tokens)) >= new_tokens // 3, tokens  # not one token repeated
    assert len({tuple(tokens) for tokens in measured.generated}) == len(measured.generated)
    assert 1.0 < measured.max_abs_logit < 20.0  # decisive, not saturated


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Measured:
    directory = build_demo(tmp_path_factory.mktemp("medium") / "demo", MEDIUM)
    return measure_routing(directory, new_tokens=MEDIUM_NEW_TOKENS)


def test_medium_demo_routes_like_mixtral(medium: Measured) -> None:
    assert medium.stats.num_tokens >= 150 and medium.stats.num_layers == MEDIUM.num_layers
    _assert_routes_like_mixtral(medium.stats)


def test_medium_demo_generates_varied_text_with_sane_logits(medium: Measured) -> None:
    _assert_sane_generation(medium, MEDIUM_NEW_TOKENS)


def test_unstructured_routing_is_flatter_and_unpredictable(medium: Measured, tmp_path: Path) -> None:
    directory = build_demo(tmp_path / "plain", MEDIUM, routing=UNSTRUCTURED)
    plain = measure_routing(directory, new_tokens=MEDIUM_NEW_TOKENS)
    means, structured = plain.stats.means(), medium.stats.means()
    assert means["predictability"] < means["baseline"] + 0.15, means
    assert means["nmi"] < 0.2 and means["top2_share"] < structured["top2_share"] - 0.05, means


@pytest.mark.slow
def test_the_default_demo_routes_like_mixtral(tmp_path: Path) -> None:
    """The numbers of the shipped demo, printed as JSON (run with -s), checked like the medium one."""
    measured = measure_routing(
        build_demo(tmp_path / "demo"), new_tokens=FULL_NEW_TOKENS, dtype=torch.bfloat16
    )
    print(json.dumps({"routing": asdict(DEMO_ROUTING), **measured.stats.to_dict()}, indent=1))
    assert measured.stats.num_layers == DEMO_SHAPE.num_layers
    _assert_routes_like_mixtral(measured.stats)
    _assert_sane_generation(measured, FULL_NEW_TOKENS)


@pytest.mark.slow
def test_the_real_demo_is_a_few_hundred_mb_and_builds_quickly(tmp_path: Path) -> None:
    started = time.perf_counter()
    path = build_demo(tmp_path / "real")
    elapsed = time.perf_counter() - started
    print(f"built the {DEMO_SHAPE} demo in {elapsed:.1f} s")
    shards = list(path.glob("model-*.safetensors"))
    assert 300 * MB <= sum(s.stat().st_size for s in shards) <= 450 * MB
    assert len(shards) >= 3 and all(s.stat().st_size <= 101 * MB for s in shards)
    experts = DEMO_SHAPE.num_layers * DEMO_SHAPE.num_experts
    assert 128 * 2**20 // DEMO_SHAPE.expert_bytes < experts // 2  # a 128 MiB budget holds under half
    assert elapsed < 120.0
