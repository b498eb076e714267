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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from klotski_tier.core.atomic import remove_stale_temps
from klotski_tier.core.errors import CheckpointError, ConfigError
from klotski_tier.core.units import format_size

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``: called as the shards are written."""

DEMO_VERSION = 2  # bump whenever the bytes of the build change, so stale caches are not reused
DEMO_DIR_NAME = f"demo-mixtral-v{DEMO_VERSION}"
CACHE_ENV_VAR = "KLOTSKI_TIER_CACHE"  # overrides the cache root (default ~/.cache/klotski-tier)
CACHE_SUBDIR = "klotski-tier"  # under $XDG_CACHE_HOME or ~/.cache

SEED = 20250301  # the one seed of the build: weights and nothing else depend on it
ROUTING_SEED = SEED + 1  # the routing plan (coordinates, token types, expert orders) has its own generator
# Every matrix W [out, in] is drawn with std 1/sqrt(in) (LeCun), so unit-variance inputs give
# unit-variance outputs at any shape: the demo's stds are 0.044 (H inputs) and 0.024 (down, I
# inputs). Each layer then changes the residual stream as much as it holds, attention is far
# from uniform and routing is decisive, so a bug in any part of the engine shows in the logits.
EMBEDDING_STD = 1.0  # unit-scale embeddings: the residual stream starts at std 1
INITIALIZER_RANGE = 0.02  # config.json's initializer_range (HF's default); used only by HF's own init
RMS_NORM_EPS = 1e-5  # Mixtral's epsilon
SHARD_MAX_BYTES = 100 * 1000**2  # ~100 MB per shard: a few shards, like a real sharded repository
# The routing coordinates (see DemoRouting): 1 + E coordinates of the residual stream that only
# the embeddings write and only the routers read. An embedding holds c and its type's u each at
# ROUTING_DIRECTION_RMS * sqrt(H) (5.7 in the demo): as much as 1/16 of its std-1 random part holds.
ROUTING_DIRECTION_RMS = 0.25
MAX_ROUTING_LOGIT = 30.0  # a larger bonus only makes routing deterministic, and logits huge in bf16
# Mean square that one attention or MoE sublayer adds to the residual stream, measured with
# transformers on the default demo (about the same at every width: the matrices are LeCun-scaled).
# The routers scale their structured rows by the residual's expected RMS at their layer, so that a
# bonus of x logits stays x logits at every depth although the residual grows.
SUBLAYER_MEAN_SQUARE = 0.3
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in Mistral's tokenizer
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID = 0, 1, 2
FORMAT_TRANSFORMERS_VERSION = "5.0.0"  # the transformers release whose saved layout these files follow
# config.json fields that do not depend on the shape (values as in mistralai/Mixtral-8x7B-v0.1)
_CONFIG_FIXED: dict[str, Any] = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "dtype": "bfloat16",
    "hidden_act": "silu", "initializer_range": INITIALIZER_RANGE, "model_type": "mixtral",
    "output_router_logits": False, "pad_token_id": None, "router_aux_loss_coef": 0.02,
    "router_jitter_noise": 0.0, "sliding_window": None, "tie_word_embeddings": False,
    "transformers_version": FORMAT_TRANSFORMERS_VERSION, "use_cache": True,
}  # fmt: skip
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the special tokens and one token per byte
INDEX_FILE = "model.safetensors.index.json"
_TEMP_MARK = ".tmp-"  # temporary build directories: .{name}.tmp-{pid}-{random}


# The tokenizer's training text: everyday English, the demo prompts' topics, a little code
# and a few non-ASCII names. Changing it changes the vocabulary: bump DEMO_VERSION.
_CORPUS = """\
Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.
Every morning before sunrise they walked down to the harbour, checked the nets and listened to the wind.
When the weather was calm they sailed far beyond the rocks; when a storm was coming they stayed home,
mended ropes by the fire and told each other stories about distant islands, kings and talking animals.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
The capital of France is Paris, the capital of Japan is Tokyo, and the capital of Italy is Rome.
Spring brings rain and flowers, summer brings long warm evenings, autumn paints the leaves red and gold,
and winter covers the quiet fields with snow. Children build snowmen while their parents drink hot tea.
To cook rice, rinse it until the water runs clear, add one and a half cups of water for every cup of rice,
bring it to a boil, cover the pot, lower the heat and wait twenty minutes. Let it rest before serving.
A good bread needs flour, water, salt, yeast and patience: knead the dough, let it rise, shape it, bake it.
When the train finally arrived, the station was crowded with travellers carrying suitcases and umbrellas.
She bought a ticket, found a seat by the window and watched the mountains, rivers and cities roll past.
Science asks simple questions with careful experiments. Why is the sky blue? Why do apples fall down?
Light from the sun is scattered by the air, and gravity pulls every object toward the centre of the earth.
The three laws of thermodynamics describe energy, heat, work and entropy in every physical system.
A computer stores numbers in memory, reads them into registers, adds and multiplies them very quickly,
and writes the results back. Programs are written in languages such as Python, C, Rust and JavaScript.
def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)
for i in range(10): print(i, fibonacci(i)) # prints 0 1 1 2 3 5 8 13 21 34
A language model predicts the next word from the words before it. It reads a prompt, one token at a time,
and then writes new tokens, choosing the most likely one or sampling from the distribution it computes.
A mixture of experts sends each token to a few experts chosen by a small router, called the gate.
Each expert is a feed-forward network; only the selected experts run, so a large model stays fast.
When the weights do not fit in the memory of the accelerator, they live on disk or in host memory,
and they are copied to the device just in time, layer by layer and expert by expert, while it computes.
Good scheduling hides the slow transfers behind useful work, so the device is never idle for long.
Here is a short poem about autumn: the wind is cold, the light is thin, the apples wait to be brought in.
The library was quiet. An old clock ticked on the wall, and dust danced in a narrow beam of afternoon light.
Doctors, teachers, farmers, engineers, musicians and painters all work together to build a better city.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, million, billion.
Days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Months: January, February, March,
April, May, June, July, August, September, October, November, December. Colours: red, green, blue, yellow.
Café, naïve, façade, Zürich, São Paulo, Kraków, 東京, Москва and Αθήνα are names written in many scripts.
"""


@dataclass(frozen=True)
class DemoShape:
    """Mixtral dimensions of a demo checkpoint (element counts)."""

    vocab_size: int  # V: the tokenizer is trained to exactly this many ids, the model emits as many
    hidden_size: int  # H
    num_layers: int
    num_experts: int  # E routed experts per layer
    top_k: int  # experts per token
    intermediate_size: int  # I: one expert is three [I, H] / [H, I] matrices
    num_heads: int  # Hq
    num_kv_heads: int  # Hkv < Hq: grouped-query attention, as in Mixtral
    max_position_embeddings: int  # longest sequence (prompt + generated tokens)
    rope_theta: float  # RoPE base frequency

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{self}: hidden_size must divide by num_heads, num_heads by num_kv_heads")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"{self}: top_k must be between 1 and num_experts")
        if self.hidden_size <= self.num_experts:
            raise ConfigError(f"{self}: hidden_size must exceed num_experts (routing uses 1 + E coordinates)")

    @property
    def head_dim(self) -> int:
        """D: hidden size per attention head."""
        return self.hidden_size // self.num_heads

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in bf16 (w1, w2, w3)."""
        return 3 * self.hidden_size * self.intermediate_size * torch.bfloat16.itemsize


DEMO_SHAPE = DemoShape(
    vocab_size=1024,  # the corpus below yields up to ~1260 ids; tiny next to Mixtral's 32000
    hidden_size=512,  # big enough that each expert matrix is a real GEMM, 1/8 of Mixtral's 4096
    num_layers=8,  # enough layers for prefetching one layer ahead to matter
    num_experts=8,  # Mixtral's 8 experts ...
    top_k=2,  # ... top-2 routed, so 3/4 of the experts of a layer are idle per token
    intermediate_size=1792,  # 3.5 x H like Mixtral (14336 / 4096): one expert is 5.25 MiB
    num_heads=8,  # head_dim 64
    num_kv_heads=4,  # GQA: two query heads share one KV head
    max_position_embeddings=2048,  # plenty for the demo prompts and a few hundred new tokens
    rope_theta=1e6,  # Mixtral's RoPE base
)
"""The shipped demo: ~367 MB in bf16, 64 experts of 5.25 MiB, so a 128 MiB budget holds about a third."""


@dataclass(frozen=True)
class DemoRouting:
    """How the demo's routers pick experts: skew within a layer, correlation between layers.

    Random routers spread tokens almost uniformly and independently per layer, which makes every
    prefetcher look alike. The demo's weights are chosen with structure instead (the checkpoint stays
    an ordinary Mixtral one). The residual stream reserves 1 + E *routing coordinates*, drawn at
    random (like the few outsized dimensions of trained LLMs): a common one c that every token's
    embedding holds, and type coordinates u_0 .. u_{E-1}, of which each token id's embedding holds
    one (its *type*, drawn once per id). No other matrix reads or writes them (attention, experts
    and lm_head have zeros there), so they reach every layer's router unchanged while the rest of
    the residual stream evolves freely. RMSNorm only rescales them. Router row e of layer l is a
    random row elsewhere (logits of std ~1, independent between layers) plus two structured parts,
    in logits per token, scaled for the residual's growth with depth (``SUBLAYER_MEAN_SQUARE``):

    - skew: ``hot_logit / (r + 1) ** hot_exponent`` along c, where r is e's rank in the layer's own
      random hot order: a few experts per layer get a large bonus for every token;
    - correlation: ``type_logit`` along u_j for the expert that type j prefers in layer l (a random
      permutation per layer): a token that took type j's expert in layer l - 1 tends to take type
      j's expert in layer l, a different but predictable one.

    ``DemoRouting(0, 1, 0)`` gives the old unstructured routing. Defaults: see ``DEMO_ROUTING``.
    """

    hot_logit: float  # logit bonus of each layer's hottest expert, for every token
    hot_exponent: float  # Zipf-like profile: the r-th hottest expert (r = 0, 1, ...) gets hot_logit/(r+1)^x
    type_logit: float  # logit bonus of the expert a token's type prefers in each layer

    def __post_init__(self) -> None:
        values = (self.hot_logit, self.hot_exponent, self.type_logit)
        if not all(math.isfinite(v) and 0.0 <= v <= MAX_ROUTING_LOGIT for v in values):
            raise ConfigError(f"{self}: every routing parameter must be between 0 and {MAX_ROUTING_LOGIT}")

    def hot_bonuses(self, num_experts: int) -> list[float]:
        """Logit bonus of the r-th hottest expert of a layer, r = 0 .. num_experts - 1."""
        return [self.hot_logit / (rank + 1) ** self.hot_exponent for rank in range(num_experts)]


DEMO_ROUTING = DemoRouting(hot_logit=2.25, hot_exponent=1.0, type_logit=3.0)
"""The shipped demo's routing, tuned with transformers (tests/core/demo/test_demo.py) to Mixtral-8x7B's skew
(the 2 busiest of 8 experts take ~0.5 of a layer's selections) and a strong link between consecutive
layers (a token's previous first choice predicts its next one ~70% of the time, frequency ~27%)."""


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


def default_cache_dir() -> Path:
    """``$KLOTSKI_TIER_CACHE``, else ``$XDG_CACHE_HOME/klotski-tier``, else ``~/.cache/klotski-tier``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / CACHE_SUBDIR


def demo_model_dir(cache_dir: Path | None = None, *, progress: ProgressFn | None = None) -> Path:
    """Directory of the built demo checkpoint under ``cache_dir``, building it (once) if absent."""
    target = (cache_dir if cache_dir is not None else default_cache_dir()) / DEMO_DIR_NAME
    if target.is_dir():
        _check_complete(target)
        return target
    size = format_size(sum(spec.nbytes for spec in _tensor_specs(DEMO_SHAPE)))
    logger.info("building the demo model (%s, once) in %s", size, target)
    started = time.perf_counter()
    build_demo(target, DEMO_SHAPE, progress=progress)
    logger.info("built the demo model in %.1f s", time.perf_counter() - started)
    return target


def demo_prompts() -> list[str]:
    """Short prompts the CLI runs when the user gives none."""
    return [
        "The quick brown fox",
        "Once upon a time, in a small village by the sea,",
        "A mixture of experts sends each token to",
        "The best way to cook rice is",
        "def fibonacci(n):",
        "Here is a short poem about autumn:",
        "The capital of France is",
        "When the train finally arrived,",
    ]


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
    tokenizer.save(str(directory / "tokenizer.json"))
    _fsync_file(directory / "tokenizer.json")
    for name, content in _metadata_files(shape).items():
        _write_json(directory / name, content)
    specs = _tensor_specs(shape)
    shards = _plan_shards(specs, shard_max_bytes)
    _write_shards(directory, shards, _RoutingPlan.draw(shape, routing), progress)
    _write_json(directory / INDEX_FILE, _index(shards))


# --- tokenizer ------------------------------------------------------------------------------


def train_demo_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE with exactly ``vocab_size`` ids, trained on the built-in corpus.

    Byte-level: any text, in any script, encodes (unknown characters fall back to bytes).
    Encoding adds ``<s>`` in front, like Mistral's tokenizer.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL_TOKENS[BOS_TOKEN_ID]} $A",
        pair=f"{SPECIAL_TOKENS[BOS_TOKEN_ID]} $A {SPECIAL_TOKENS[BOS_TOKEN_ID]} $B",
        special_tokens=[(SPECIAL_TOKENS[BOS_TOKEN_ID], BOS_TOKEN_ID)],
    )
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual != vocab_size:
        raise ConfigError(
            f"the demo corpus yields {actual} token ids, not {vocab_size}; pick a vocab_size from "
            f"{MIN_VOCAB_SIZE} to about 1260"
        )
    return tokenizer


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
    """Write one safetensors shard and fsync it (tests replace this to inject failures)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(path)


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
    with path.open("w", encoding="utf-8") as handle:
        handle.write(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
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
