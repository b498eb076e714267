"""Bench-scale checkpoints: the demo model's Mixtral layout and routing at benchmark sizes.

Each shape is built once by :func:`klotski_tier.core.demo.build.build_demo` (atomic, deterministic)
into ``<cache>/bench/<name>-v<DEMO_VERSION>`` (``<cache>`` is ``$KLOTSKI_TIER_CACHE`` or
``~/.cache/klotski-tier``), with the demo's realistic routing (a few hot experts per layer,
a token's expert in one layer predicting its next): a real Hugging Face Mixtral directory that
transformers loads as well as the engine.

=============  ======  ======  =======  ===  =====  ================  =========
name           layers  hidden  experts  k    I      heads (q / kv)    bf16 size
=============  ======  ======  =======  ===  =====  ================  =========
``tiny``       2       64      4        2    128    4 / 2             0.5 MB
``e2e-2g``     16      1024    8        2    2816   8 / 2             2.30 GB
``e2e-large``  32      1024    8        2    2816   8 / 2             4.60 GB
=============  ======  ======  =======  ===  =====  ================  =========

``e2e-large`` is ``e2e-2g`` with twice the layers: the same work per layer, twice the bytes,
so its point on the scaling chart isolates model size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from benchmarks.e2e.llamacpp_convert import gguf_path
from klotski_tier.core.demo.build import DEMO_VERSION, build_demo
from klotski_tier.core.demo.shape import DemoShape
from klotski_tier.core.errors import ConfigError
from klotski_tier.core.model.layouts import total_block_bytes
from klotski_tier.core.paths import default_cache_dir
from klotski_tier.core.store.files import load_model_files
from klotski_tier.core.store.pack import pack
from klotski_tier.core.store.packed import BLOCKS_FILE, is_store
from klotski_tier.core.units import format_size

logger = logging.getLogger(__name__)

BENCH_SUBDIR = "bench"  # under the cache root, beside the demo model
PROGRESS_STEP = 0.1  # log the build's progress every 10 % of its bytes

E2E_2G = DemoShape(
    vocab_size=1024,  # the demo tokenizer's vocabulary (the corpus yields up to ~1260 ids)
    hidden_size=1024,  # H: a quarter of Mixtral's 4096
    num_layers=16,
    num_experts=8,  # Mixtral's 8 experts, top-2
    top_k=2,
    intermediate_size=2816,  # I = 2.75 H: one expert is 16.5 MiB, a layer's experts 132 MiB
    num_heads=8,  # head_dim 128, as Mixtral's
    num_kv_heads=2,  # GQA 4:1, as Mixtral's 32:8
    max_position_embeddings=4096,  # room for long prompts and many new tokens
    rope_theta=1e6,  # Mixtral's RoPE base
)
"""About 2.3 GB in bf16: 128 experts of 16.5 MiB, attention 5 MiB per layer."""

BENCH_SHAPES: dict[str, DemoShape] = {
    "tiny": DemoShape(
        vocab_size=300,  # just above the 259 special and byte tokens: a fast tokenizer build
        hidden_size=64,
        num_layers=2,
        num_experts=4,
        top_k=2,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=512,
        rope_theta=1e6,
    ),
    "e2e-2g": E2E_2G,
    "e2e-large": replace(E2E_2G, num_layers=32),
}


def bench_model_dir(name: str, cache_dir: Path | None = None) -> Path:
    """The directory of bench model ``name``, building it (once, with logged progress) if absent."""
    shape = _shape(name)
    root = cache_dir if cache_dir is not None else default_cache_dir() / BENCH_SUBDIR
    target = root / f"{name}-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    logger.info("building bench model %s once into %s", name, target)
    started = time.perf_counter()
    build_demo(target, shape, progress=_progress_logger(name))
    logger.info("built %s in %.1f s", name, time.perf_counter() - started)
    return target


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A bench model name (built on first use) or the path of a Hugging Face MoE checkpoint."""
    if name_or_path in BENCH_SHAPES:
        return bench_model_dir(name_or_path, cache_dir)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        names = ", ".join(BENCH_SHAPES)
        raise ConfigError(
            f"model {name_or_path!r} is neither a bench model ({names}) nor a checkpoint directory"
        )
    return path


def model_bytes(directory: Path) -> int:
    """Bytes of every weight block of the checkpoint (what "the whole model" means in budgets)."""
    return total_block_bytes(load_model_files(directory).layouts)


def bench_store_dir(model_dir: Path) -> Path:
    """The packed expert store of ``model_dir`` (``<model_dir>-store``), packed once on first use.

    The engine's systems read it: 4 KiB-aligned blocks read with O_DIRECT straight into their
    buffers, no page cache and no CPU copy (packing is set-up, as accelerate's offload folder is).
    """
    target = model_dir.parent / f"{model_dir.name}-store"
    if is_store(target):
        return target
    logger.info("packing %s once into %s", model_dir.name, target)
    started = time.perf_counter()
    pack(model_dir, target)
    logger.info("packed %s in %.1f s", model_dir.name, time.perf_counter() - started)
    return target


def weight_files(directory: Path) -> list[Path]:
    """The weight files of the checkpoint, of its packed store and of its GGUF (llama.cpp's), where
    they exist: what is evicted from the page cache before each run."""
    store = directory.parent / f"{directory.name}-store" / BLOCKS_FILE
    derived = [path for path in (store, gguf_path(directory)) if path.is_file()]
    return sorted(directory.glob("*.safetensors")) + derived


def _shape(name: str) -> DemoShape:
    if name not in BENCH_SHAPES:
        raise ConfigError(f"unknown bench model {name!r}; valid names: {', '.join(BENCH_SHAPES)}")
    return BENCH_SHAPES[name]


def _progress_logger(name: str) -> Callable[[int, int], None]:
    """A build progress callback that logs every ``PROGRESS_STEP`` of the bytes."""
    logged = [-1.0]

    def progress(done: int, total: int) -> None:
        share = done / total if total else 1.0
        if share - logged[0] >= PROGRESS_STEP or done == total:
            logged[0] = share
            logger.info(
                "building %s: %s of %s (%.0f%%)", name, format_size(done), format_size(total), 100 * share
            )

    return progress
