"""The built-in demo model: a synthetic Mixtral checkpoint built once into the user's cache.

``klotski-tier run`` without ``--model`` runs this model, so a first try needs no download.
The directory looks exactly like a Hugging Face Mixtral repository (``config.json``,
``generation_config.json``, sharded safetensors with ``model.safetensors.index.json``,
per-expert tensors ``block_sparse_moe.experts.{e}.w1/w2/w3``, a byte-level BPE
``tokenizer.json``), so it exercises the same loading path as a real checkpoint and loads in
transformers' ``MixtralForCausalLM``. The weights are random, with structure that makes the
routing look like a trained MoE's (a few hot experts per layer, a token's expert in one layer
predicting its expert in the next: see ``DemoRouting``), and an ``lm_head`` that never picks a
special token, so generation runs to its length. The text it writes is gibberish, but every
expert is big enough that a small device budget holds only a fraction of the model, which is
what offloading needs to show.

Building is atomic and deterministic: files go into a temporary sibling directory, are
fsynced, and one ``os.rename`` commits them; a failed, interrupted or concurrent build never
leaves a directory under the final name that is not complete. One seeded
``torch.Generator`` draws every tensor in a fixed order, and the tokenizer is trained on a
fixed corpus (``_CORPUS`` below), so two builds give identical bytes.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from klotski_tier.core.atomic import NEW_FILE_MODE, remove_stale_temps
from klotski_tier.core.demo.shape import (
    BOS_TOKEN_ID,
    DEMO_ROUTING,
    DEMO_SHAPE,
    EOS_TOKEN_ID,
    RMS_NORM_EPS,
    SPECIAL_TOKENS,
    DemoRouting,
    DemoShape,
)
from klotski_tier.core.demo.tokenizer import train_demo_tokenizer
from klotski_tier.core.errors import CheckpointError
from klotski_tier.core.paths import CACHE_ENV_VAR, default_cache_dir
from klotski_tier.core.units import format_size

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``: called as the shards are written."""

DEMO_VERSION = 2  # bump whenever the bytes of the build change, so stale caches are not reused
DEMO_DIR_NAME = f"demo-mixtral-v{DEMO_VERSION}"

SEED = 20250301  # the one seed of the build: weights and nothing else depend on it
ROUTING_SEED = SEED + 1  # the routing plan (coordinates, token types, expert orders) has its own generator
# Every matrix W [out, in] is drawn with std 1/sqrt(in) (LeCun), so unit-variance inputs give
# unit-variance outputs at any shape: the demo's stds are 0.044 (H inputs) and 0.024 (down, I
# inputs). Each layer then changes the residual stream as much as it holds, attention is far
# from uniform and routing is decisive, so a bug in any part of the engine shows in the logits.
EMBEDDING_STD = 1.0  # unit-scale embeddings: the residual stream starts at std 1
INITIALIZER_RANGE = 0.02  # config.json's initializer_range (HF's default); used only by HF's own init
SHARD_MAX_BYTES = 100 * 1000**2  # ~100 MB per shard: a few shards, like a real sharded repository
# The routing coordinates (see DemoRouting): 1 + E coordinates of the residual stream that only
# the embeddings write and only the routers read. An embedding holds c and its type's u each at
# ROUTING_DIRECTION_RMS * sqrt(H) (5.7 in the demo): as much as 1/16 of its std-1 random part holds.
ROUTING_DIRECTION_RMS = 0.25
# Mean square that one attention or MoE sublayer adds to the residual stream, measured with
# transformers on the default demo (about the same at every width: the matrices are LeCun-scaled).
# The routers scale their structured rows by the residual's expected RMS at their layer, so that a
# bonus of x logits stays x logits at every depth although the residual grows.
SUBLAYER_MEAN_SQUARE = 0.3
FORMAT_TRANSFORMERS_VERSION = "5.0.0"  # the transformers release whose saved layout these files follow
# config.json fields that do not depend on the shape (values as in mistralai/Mixtral-8x7B-v0.1)
_CONFIG_FIXED: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "dtype": "bfloat16",
    "hidden_act": "silu", "initializer_range": INITIALIZER_RANGE, "model_type": "mixtral",
    "output_router_logits": False, "pad_token_id": None, "router_aux_loss_coef": 0.02,
    "router_jitter_noise": 0.0, "sliding_window": None, "tie_word_embeddings": False,
    "transformers_version": FORMAT_TRANSFORMERS_VERSION, "use_cache": True,
}  # fmt: skip
INDEX_FILE = "model.safetensors.index.json"
_TEMP_MARK = ".tmp-"  # temporary build directories: .{name}.tmp-{pid}-{random}


class _Role(enum.Enum):
    """How a tensor meets the routing coordinates (see DemoRouting)."""

    NORM = "norm"  # an RMSNorm weight: all ones
    EMBEDDING = "embedding"  # [V, H] random off the routing coordinates, plus c and the token's u_type
    READ = "read"  # [out, H] reads the residual stream: zero columns at the routing coordinates
    WRITE = "write"  # [H, in] writes the residual stream: zero rows at the routing coordinates
    ROUTER = "router"  # [E, H] a READ matrix plus its layer's structured rows
    OUTPUT = "output"  # [V, H] lm_head: a READ matrix that never scores the special tokens


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    dims: tuple[int, ...]
    std: float  # of the random part (0.0 for norms)
    role: _Role
    layer: int = -1  # a router's layer

    @classmethod
    def matrix(cls, name: str, dims: tuple[int, int], role: _Role, layer: int = -1) -> _TensorSpec:
        """A projection [out, in] with std 1/sqrt(in)."""
        return cls(name, dims, 1.0 / math.sqrt(dims[1]), role, layer)

    @classmethod
    def norm(cls, name: str, hidden: int) -> _TensorSpec:
        return cls(name, (hidden,), 0.0, _Role.NORM)

    @property
    def nbytes(self) -> int:
        return _numel(self.dims) * torch.bfloat16.itemsize


def _numel(dims: tuple[int, ...]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def demo_model_path(cache_dir: Path | None = None) -> Path:
    """Where the demo checkpoint is (or will be) under ``cache_dir`` (default: the user's cache); builds
    nothing, so a command can treat the directory as its input before it exists."""
    return (cache_dir if cache_dir is not None else default_cache_dir()) / DEMO_DIR_NAME


def demo_model_dir(cache_dir: Path | None = None, *, progress: ProgressFn | None = None) -> Path:
    """Directory of the built demo checkpoint under ``cache_dir``, building it (once) if absent."""
    target = demo_model_path(cache_dir)
    if target.is_dir():
        _check_complete(target)
        return target
    size = format_size(sum(spec.nbytes for spec in _tensor_specs(DEMO_SHAPE)))
    logger.info("building the demo model (%s, once) in %s", size, target)
    started = time.perf_counter()
    build_demo(target, DEMO_SHAPE, progress=progress)
    logger.info("built the demo model in %.1f s", time.perf_counter() - started)
    return target


@contextmanager
def opening_demo(directory: Path) -> Iterator[None]:
    """Open the built demo at ``directory`` inside this: a :class:`CheckpointError` from it means the
    demo is damaged (the user never wrote it), and says so, with how to have it rebuilt instead of the
    error's own advice (the part of its message after ``"; "``, such as "re-download it")."""
    try:
        yield
    except CheckpointError as exc:
        problem = str(exc).split("; ")[0]
        raise CheckpointError(
            f"the demo model at {directory} is damaged ({problem}); delete the directory so it is rebuilt"
        ) from exc


def build_demo(
    directory: Path,
    shape: DemoShape = DEMO_SHAPE,
    *,
    routing: DemoRouting = DEMO_ROUTING,
    shard_max_bytes: int = SHARD_MAX_BYTES,
    progress: ProgressFn | None = None,
) -> Path:
    """Build a demo checkpoint of ``shape`` routing as ``routing`` at ``directory``; return ``directory``.

    The build is atomic: if another process commits ``directory`` first, its build is kept and ours

    discarded.
    """
    directory = Path(directory)
    temp = directory.parent / f".{directory.name}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(directory, _TEMP_MARK)
        temp.mkdir()
        _write_checkpoint(temp, shape, routing, shard_max_bytes, progress)
        _fsync_dir(temp)
        _commit(temp, directory)
    except OSError as exc:
        raise CheckpointError(
            f"cannot build the demo model in {directory}: {exc}; "
            f"set {CACHE_ENV_VAR} to a writable directory with 400 MB free"
        ) from exc
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return directory


def _commit(temp: Path, directory: Path) -> None:
    """Rename ``temp`` to ``directory``: the commit point. A complete rival build wins."""
    try:
        os.rename(temp, directory)
    except OSError:
        if not _is_complete(directory):
            raise
        logger.info("another process built %s first; using its build", directory)
        return
    _fsync_dir(directory.parent)


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ("config.json", INDEX_FILE, "tokenizer.json"))


def _check_complete(directory: Path) -> None:
    if not _is_complete(directory):
        raise CheckpointError(f"demo model directory {directory} is incomplete; delete it and run again")


def _write_checkpoint(
    directory: Path, shape: DemoShape, routing: DemoRouting, shard_max_bytes: int, progress: ProgressFn | None
) -> None:
    tokenizer = train_demo_tokenizer(shape.vocab_size)
    # written by us, not tokenizer.save(): a full disk is then an OSError like every other write's,
    # where tokenizers raises a bare Exception (the same bytes: save() writes to_str(pretty=True))
    _write_text(directory / "tokenizer.json", tokenizer.to_str(pretty=True))
    for name, content in _metadata_files(shape).items():
        _write_json(directory / name, content)
    specs = _tensor_specs(shape)
    shards = _plan_shards(specs, shard_max_bytes)
    _write_shards(directory, shards, _RoutingPlan.draw(shape, routing), progress)
    _write_json(directory / INDEX_FILE, _index(shards))


# --- tokenizer ------------------------------------------------------------------------------


def _metadata_files(shape: DemoShape) -> dict[str, dict[str, Any]]:
    """config.json, generation_config.json and the tokenizer's side files, as a real repo has them."""
    tokens = {"unk_token": SPECIAL_TOKENS[0], "bos_token": SPECIAL_TOKENS[1], "eos_token": SPECIAL_TOKENS[2]}
    return {
        "config.json": _config(shape),
        "generation_config.json": {
            "_from_model_config": True,
            "bos_token_id": BOS_TOKEN_ID,
            "eos_token_id": EOS_TOKEN_ID,
            "transformers_version": FORMAT_TRANSFORMERS_VERSION,
        },
        "special_tokens_map.json": tokens,
        "tokenizer_config.json": {
            **tokens,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": shape.max_position_embeddings,
            "pad_token": None,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    }


def _config(shape: DemoShape) -> dict[str, Any]:
    """The fields transformers' MixtralConfig writes, plus the top-level rope_theta older readers use."""
    return {
        **_CONFIG_FIXED,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "head_dim": shape.head_dim,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "num_attention_heads": shape.num_heads,
        "num_experts_per_tok": shape.top_k,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "num_local_experts": shape.num_experts,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_parameters": {"rope_theta": shape.rope_theta, "rope_type": "default"},
        "rope_theta": shape.rope_theta,
        "vocab_size": shape.vocab_size,
    }


# --- weights --------------------------------------------------------------------------------


def _tensor_specs(shape: DemoShape) -> list[_TensorSpec]:
    """Every tensor of the checkpoint, in the order they are drawn and stored."""
    hidden, vocab = shape.hidden_size, shape.vocab_size
    specs = [_TensorSpec("model.embed_tokens.weight", (vocab, hidden), EMBEDDING_STD, _Role.EMBEDDING)]
    for layer in range(shape.num_layers):
        specs += _layer_specs(shape, layer)
    specs.append(_TensorSpec.norm("model.norm.weight", hidden))  # [H]
    specs.append(_TensorSpec.matrix("lm_head.weight", (vocab, hidden), _Role.OUTPUT))  # [V, H]
    return specs


def _layer_specs(shape: DemoShape, layer: int) -> list[_TensorSpec]:
    prefix, hidden, inter = f"model.layers.{layer}", shape.hidden_size, shape.intermediate_size
    q_size, kv_size = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    matrix, read, write = _TensorSpec.matrix, _Role.READ, _Role.WRITE
    specs = [
        _TensorSpec.norm(f"{prefix}.input_layernorm.weight", hidden),  # [H]
        matrix(f"{prefix}.self_attn.q_proj.weight", (q_size, hidden), read),  # [Hq*D, H]
        matrix(f"{prefix}.self_attn.k_proj.weight", (kv_size, hidden), read),  # [Hkv*D, H]
        matrix(f"{prefix}.self_attn.v_proj.weight", (kv_size, hidden), read),  # [Hkv*D, H]
        matrix(f"{prefix}.self_attn.o_proj.weight", (hidden, q_size), write),  # [H, Hq*D]
        _TensorSpec.norm(f"{prefix}.post_attention_layernorm.weight", hidden),  # [H]
        matrix(f"{prefix}.block_sparse_moe.gate.weight", (shape.num_experts, hidden), _Role.ROUTER, layer),
    ]  # the gate is [E, H]
    for expert in range(shape.num_experts):
        base = f"{prefix}.block_sparse_moe.experts.{expert}"
        specs.append(matrix(f"{base}.w1.weight", (inter, hidden), read))  # gate [I, H]
        specs.append(matrix(f"{base}.w3.weight", (inter, hidden), read))  # up [I, H]
        specs.append(matrix(f"{base}.w2.weight", (hidden, inter), write))  # down [H, I]
    return specs


@dataclass(frozen=True)
class _RoutingPlan:
    """The routing structure of one build, drawn from its own generator (see DemoRouting)."""

    shape: DemoShape
    routing: DemoRouting
    coords: torch.Tensor  # [1+E] int64: residual coordinates of c, then of u_0 .. u_{E-1}
    token_types: torch.Tensor  # [V] int64: the type j of each token id
    type_experts: torch.Tensor  # [L, E] int64: [l, j] is the expert type j prefers in layer l
    hot_order: torch.Tensor  # [L, E] int64: layer l's experts from hottest to coldest

    @classmethod
    def draw(cls, shape: DemoShape, routing: DemoRouting) -> _RoutingPlan:
        generator = torch.Generator().manual_seed(ROUTING_SEED)
        experts = shape.num_experts
        coords = torch.randperm(shape.hidden_size, generator=generator)[: 1 + experts]  # [1+E]
        types = torch.randint(experts, (shape.vocab_size,), generator=generator)  # [V]
        orders = [torch.randperm(experts, generator=generator) for _ in range(2 * shape.num_layers)]
        type_experts, hot_order = torch.stack(orders[0::2]), torch.stack(orders[1::2])  # [L, E] each
        return cls(shape, routing, coords, types, type_experts, hot_order)

    @property
    def _direction_length(self) -> float:
        """The value an embedding holds at c and at its type's coordinate."""
        return ROUTING_DIRECTION_RMS * math.sqrt(self.shape.hidden_size)

    def structure(self, spec: _TensorSpec, weight: torch.Tensor) -> torch.Tensor:
        """``weight``, its random part, given the routing structure of ``spec.role`` in place."""
        if spec.role is _Role.WRITE:
            weight[self.coords] = 0.0  # [H, in]: writes nothing at a routing coordinate
            return weight
        weight[:, self.coords] = 0.0  # [out, H]: reads nothing from the routing coordinates
        if spec.role is _Role.EMBEDDING:
            weight[:, self.coords[0]] = self._direction_length  # c
            weight[torch.arange(self.shape.vocab_size), self.coords[1 + self.token_types]] = (
                self._direction_length
            )
        elif spec.role is _Role.ROUTER:
            self._set_router_columns(weight, spec.layer)
        elif spec.role is _Role.OUTPUT:
            weight[: len(SPECIAL_TOKENS)] = 0.0  # logit 0, below the top of ~V N(0, 1) logits: never greedy
        return weight

    def _set_router_columns(self, weight: torch.Tensor, layer: int) -> None:
        """Router columns whose dot product with a normed residual gives the layer's logit bonuses."""
        # a normed residual holds c and its u at _direction_length / its RMS
        scale = self._residual_rms(layer) / self._direction_length
        bonuses = torch.zeros(self.shape.num_experts)  # [E]
        bonuses[self.hot_order[layer]] = torch.tensor(self.routing.hot_bonuses(self.shape.num_experts))
        weight[:, self.coords[0]] = bonuses * scale  # [E]
        weight[self.type_experts[layer], self.coords[1:]] = self.routing.type_logit * scale  # [E]

    @staticmethod
    def _residual_rms(layer: int) -> float:
        """Expected RMS of the residual at ``layer``'s router: the embedding plus 2 * layer + 1 sublayers."""
        embedding_mean_square = EMBEDDING_STD**2 + 2 * ROUTING_DIRECTION_RMS**2
        return math.sqrt(embedding_mean_square + (2 * layer + 1) * SUBLAYER_MEAN_SQUARE)


def _plan_shards(specs: list[_TensorSpec], shard_max_bytes: int) -> list[list[_TensorSpec]]:
    """Consecutive tensors packed greedily into shards of at most ``shard_max_bytes`` each."""
    shards: list[list[_TensorSpec]] = [[]]
    filled = 0
    for spec in specs:
        if shards[-1] and filled + spec.nbytes > shard_max_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(spec)
        filled += spec.nbytes
    return shards


def _shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _write_shards(
    directory: Path, shards: list[list[_TensorSpec]], plan: _RoutingPlan, progress: ProgressFn | None
) -> None:
    total = sum(spec.nbytes for shard in shards for spec in shard)
    done = 0
    if progress is not None:
        progress(done, total)
    generator = torch.Generator().manual_seed(SEED)
    for index, shard in enumerate(shards):
        tensors = {spec.name: _draw(spec, generator, plan) for spec in shard}
        _write_shard(directory / _shard_name(index, len(shards)), tensors)
        done += sum(spec.nbytes for spec in shard)
        if progress is not None:
            progress(done, total)


def _draw(spec: _TensorSpec, generator: torch.Generator, plan: _RoutingPlan) -> torch.Tensor:
    """The tensor of ``spec`` in bf16: ones for norms, else N(0, std) given the routing structure."""
    if spec.role is _Role.NORM:
        return torch.ones(spec.dims, dtype=torch.bfloat16)
    noise = torch.randn(spec.dims, generator=generator).mul_(spec.std)  # [R, C] float32
    return plan.structure(spec, noise).to(torch.bfloat16)


def _write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write one safetensors shard and fsync it (tests replace this to inject failures); the new file's
    mode follows the umask (safetensors' own ``save_file`` makes it 0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, NEW_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(save(tensors, metadata={"format": "pt"}))
        handle.flush()
        os.fsync(handle.fileno())


def _index(shards: list[list[_TensorSpec]]) -> dict[str, Any]:
    weight_map = {spec.name: _shard_name(i, len(shards)) for i, shard in enumerate(shards) for spec in shard}
    specs = [spec for shard in shards for spec in shard]
    return {
        "metadata": {
            "total_parameters": sum(_numel(spec.dims) for spec in specs),
            "total_size": sum(spec.nbytes for spec in specs),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }


# --- durable files --------------------------------------------------------------------------


def _write_json(path: Path, content: dict[str, Any]) -> None:
    _write_text(path, json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _write_text(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, a rename) durable; a no-op where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)
