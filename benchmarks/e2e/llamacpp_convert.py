"""The checkpoint as llama.cpp reads it: a bf16 GGUF made by llama.cpp's own converter, cached.

:func:`ensure_gguf` converts ``<model_dir>`` once into ``<model_dir>-bf16.gguf`` beside it (the
packed store's place), with the ``convert_hf_to_gguf.py`` of the llama.cpp the benchmark builds
(:mod:`benchmarks.e2e.llamacpp_build`) and its vendored ``gguf-py`` (on ``PYTHONPATH``: ``gguf`` is
no dependency of the project), ``--outtype bf16``: the checkpoint is bf16, so every weight is
written as it is (the converter only reorders: experts stacked per layer, Q and K rows permuted to
llama.cpp's RoPE layout). It runs as ``python -m benchmarks.e2e.llamacpp_convert`` in a child
process, so the converter's own modules and torch stay out of the benchmark's process.

The vocabulary. The converter asks the tokenizer to prove it is one llama.cpp can re-implement:
Llama-family checkpoints need ``sentencepiece`` or a byte-level BPE whose pre-tokenizer's
fingerprint (the hash of a test text's tokens) is in its table. The bench models' tokenizer is a
small synthetic BPE that no table holds, and :func:`tests.checkpoints.make_checkpoint` writes no
tokenizer at all, so conversion would stop there. The benchmark gives llama.cpp token ids, never
text, so the vocabulary's content is never used; only its size matters (it sizes the logits). The
converted model therefore gets llama.cpp's "no vocabulary" tokenizer (``tokenizer.ggml.model =
none``, the converter's own ``_set_vocab_none``) with ``<arch>.vocab_size`` set to the checkpoint's
``vocab_size``: llama.cpp then holds that many placeholder tokens. This is done by
:func:`placeholder_vocab`, which subclasses the model class the converter picks and overrides only
``set_vocab`` (and adds the size where the class does not write it); the weights are untouched.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from klotski_tier.core.errors import ConfigError

logger = logging.getLogger(__name__)

GGUF_SUFFIX = "-bf16.gguf"
OUTTYPE = "bf16"
CHECKPOINT_DTYPE = "bfloat16"  # the only dtype converted as it is (bf16 to bf16)
CONVERT_MODULE = "benchmarks.e2e.llamacpp_convert"
REPO_ROOT = Path(__file__).resolve().parents[2]


def gguf_path(model_dir: Path) -> Path:
    """Where the GGUF of ``model_dir`` is cached: beside it, ``<model_dir>-bf16.gguf``."""
    return model_dir.parent / f"{model_dir.name}{GGUF_SUFFIX}"


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The checkpoint's dtype as config.json states it (``dtype``, or the older ``torch_dtype``)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    found = config.get("dtype", config.get("torch_dtype"))
    return None if found is None else str(found)


def ensure_gguf(model_dir: Path, llama_sources: Path) -> Path:
    """The bf16 GGUF of ``model_dir`` (a bf16 checkpoint), converting it once when it is missing."""
    target = gguf_path(model_dir)
    if target.is_file():
        return target
    dtype = checkpoint_dtype(model_dir)
    if dtype != CHECKPOINT_DTYPE:
        raise ConfigError(
            f"{model_dir} is {dtype}, not {CHECKPOINT_DTYPE}: a bf16 GGUF would round its weights, so "
            "llama.cpp would not run the same model"
        )
    partial = target.with_name(target.name + ".partial")
    logger.info("converting %s once into %s (llama.cpp's convert_hf_to_gguf.py)", model_dir.name, target)
    started = time.perf_counter()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), str(llama_sources / "gguf-py"), env.get("PYTHONPATH")) if p
    )
    argv = [sys.executable, "-m", CONVERT_MODULE, str(llama_sources), str(model_dir), str(partial)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=False)
    if proc.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise ConfigError(
            f"converting {model_dir} to GGUF failed (exit {proc.returncode}): " + " | ".join(lines[-3:])
        )
    partial.replace(target)
    logger.info("converted %s in %.1f s", model_dir.name, time.perf_counter() - started)
    return target


def placeholder_vocab(model_class: type[Any]) -> type[Any]:
    """``model_class`` (a converter model class) writing no vocabulary but ``vocab_size`` placeholders.

    ``set_vocab`` becomes the converter's own ``_set_vocab_none`` (``tokenizer.ggml.model = none``);
    ``set_gguf_parameters`` adds ``<arch>.vocab_size`` (from config.json) where the class does not
    write it itself, so llama.cpp sizes its vocabulary, and the logits, like the checkpoint's.
    """

    def set_vocab(self: Any) -> None:
        self._set_vocab_none()

    def set_gguf_parameters(self: Any) -> None:
        model_class.set_gguf_parameters(self)
        key = f"{self.gguf_writer.arch}.vocab_size"
        if not any(key in kv for kv in self.gguf_writer.kv_data):
            self.gguf_writer.add_vocab_size(int(self.hparams["vocab_size"]))

    namespace = {
        "model_arch": model_class.model_arch,  # the converter's classes must each name their arch
        "set_vocab": set_vocab,
        "set_gguf_parameters": set_gguf_parameters,
        "__doc__": f"{model_class.__name__} with placeholder tokens (benchmarks.e2e.llamacpp_convert)",
    }
    return type(f"{model_class.__name__}PlaceholderVocab", (model_class,), namespace)


def convert(llama_sources: Path, model_dir: Path, out: Path) -> None:
    """Run ``convert_hf_to_gguf.py`` (in this process) with :func:`placeholder_vocab` applied."""
    sys.path[:0] = [str(llama_sources), str(llama_sources / "gguf-py")]
    import convert_hf_to_gguf  # llama.cpp's script, importable: its main() runs under __main__ only

    pick = convert_hf_to_gguf.get_model_class

    def get_model_class(*args: Any, **kwargs: Any) -> type[Any]:
        return placeholder_vocab(pick(*args, **kwargs))

    convert_hf_to_gguf.get_model_class = get_model_class
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", OUTTYPE, "--outfile", str(out)]
    convert_hf_to_gguf.main()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print(f"usage: python -m {CONVERT_MODULE} LLAMA_SOURCES MODEL_DIR OUT.gguf", file=sys.stderr)
        return 2
    convert(Path(args[0]), Path(args[1]), Path(args[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
