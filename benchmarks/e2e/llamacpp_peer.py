"""llama.cpp, what a CPU user would run: the benchmark's driver on the checkpoint's bf16 GGUF, in a worker.

Set-up (the parent, once, cached; not timed): :func:`prepare` builds llama.cpp from source
(:mod:`benchmarks.e2e.llamacpp_build`) and converts the checkpoint to a bf16 GGUF beside it
(:mod:`benchmarks.e2e.llamacpp_convert`); a failure there skips the system, saying why.

A run (:func:`run_llamacpp`, in the worker, inside the system's memory cgroup): the worker writes
the prompts' token ids to a file and runs ``greedy_batched`` (``benchmarks/e2e/llamacpp/``) as its
child, so the driver is in the same cgroup and under the same limit. The driver memory-maps the
GGUF (llama.cpp's default, as its users run models larger than RAM: the kernel reads pages on
first touch and drops them under the limit's pressure), decodes all N prompts as N parallel
sequences of one batch (the whole prefill in one forward pass), greedy, on as many threads as
the cores this process may use, and prints the tokens and its timings. Measurements, as the
worker's: ``prefill_s`` and ``decode_s`` (the driver's wall times), ``load_s`` (model load and
context, not counted; with mmap llama.cpp populates the mapping while loading), ``bytes_read``
(the driver's ``read_bytes`` over prefill and decode; ``details.bytes_read_with_load`` adds the
load: ``ru_inblock`` of the finished child), ``compute_s`` and ``io_wait_s`` null (the reads are
page faults inside the kernels, as accelerate's).
"""

from __future__ import annotations

import ctypes
import json
import logging
import resource
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.e2e.worker import Job

logger = logging.getLogger(__name__)

BLOCK_BYTES = 512  # ru_inblock counts 512-byte blocks
PR_SET_PDEATHSIG = 1  # prctl option: a signal the child gets when its parent dies


@dataclass(frozen=True)
class LlamaCppSetup:
    """The built driver and the converted model, or why llama.cpp cannot run."""

    version: str
    driver: Path | None = None
    gguf: Path | None = None
    problem: str | None = None


def prepare(model_dir: Path, build_root: Path | None = None) -> LlamaCppSetup:
    """Build llama.cpp and convert ``model_dir`` where not done yet (cached); never raises for either."""
    from benchmarks.e2e.llamacpp_build import LLAMA_CPP_PYTHON_VERSION, ensure_built
    from benchmarks.e2e.llamacpp_convert import ensure_gguf
    from klotski_tier.core.errors import KlotskiError

    try:
        build = ensure_built(build_root)
        gguf = ensure_gguf(model_dir, build.sources)
    except (KlotskiError, OSError) as exc:
        logger.warning("llamacpp cannot run: %s", exc)
        return LlamaCppSetup(LLAMA_CPP_PYTHON_VERSION, problem=str(exc).splitlines()[0])
    return LlamaCppSetup(LLAMA_CPP_PYTHON_VERSION, build.driver, gguf)


def eos_token_ids(model_dir: Path) -> list[int]:
    """The checkpoint's end-of-sequence ids (generation_config.json, else config.json): where greedy stops."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if eos is not None:
            return [int(t) for t in (eos if isinstance(eos, list) else [eos])]
    return []


def driver_argv(job: Job, prompts_file: Path, threads: int) -> list[str]:
    if job.driver is None:
        raise ValueError("a llamacpp job needs the driver's path")
    argv = [
        job.driver, "--model", job.model, "--prompts", str(prompts_file),
        "--new-tokens", str(job.new_tokens), "--threads", str(threads),
    ]  # fmt: skip
    if job.eos_token_ids:
        argv += ["--eos", ",".join(str(t) for t in job.eos_token_ids)]
    return argv


def write_prompts(path: Path, prompts: list[list[int]]) -> None:
    """The driver's prompt file: one prompt per line, token ids separated by spaces."""
    path.write_text("".join(" ".join(str(t) for t in ids) + "\n" for ids in prompts), encoding="ascii")


def parse_driver_output(stdout: str) -> dict[str, Any]:
    """The driver's result: the JSON object on the last line of its stdout that holds one."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            result: dict[str, Any] = json.loads(line)
            return result
    raise RuntimeError("the llama.cpp driver printed no result")


def measurements(out: dict[str, Any], read_with_load: int, job: Job) -> dict[str, Any]:
    """The worker's result fields from the driver's output ``out``."""
    tokens: list[list[int]] = out["tokens"]
    bytes_read = out.get("bytes_read")
    return {
        "tokens": tokens,
        "generated_tokens": sum(len(t) for t in tokens),
        "decode_tokens": sum(max(len(t) - 1, 0) for t in tokens),
        "prefill_s": float(out["prefill_s"]),
        "decode_s": float(out["decode_s"]),
        "load_s": float(out["load_s"]),
        "compute_s": None,
        "io_wait_s": None,  # reads are page faults inside the kernels: not measurable apart
        "bytes_read": read_with_load if bytes_read is None or bytes_read < 0 else int(bytes_read),
        "details": {
            "threads": out.get("threads"),
            "n_ctx": out.get("n_ctx"),
            "n_batch": out.get("n_batch"),
            "n_ubatch": out.get("n_ubatch"),
            "mmap": True,
            "bytes_read_with_load": read_with_load,
            "driver": job.driver,
            "gguf": job.model,
        },
    }


def run_llamacpp(job: Job) -> dict[str, Any]:
    """Run the driver on ``job``'s prompts as a child of this worker; the measurements."""
    from benchmarks.e2e.llamacpp_build import usable_cores

    with tempfile.TemporaryDirectory(prefix="e2e-llamacpp-") as scratch:
        prompts_file = Path(scratch) / "prompts.txt"
        write_prompts(prompts_file, job.prompts)
        argv = driver_argv(job, prompts_file, usable_cores())
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, preexec_fn=_die_with_parent)
        read_with_load = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_inblock - before) * BLOCK_BYTES
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(f"the llama.cpp driver failed ({how})" + (f": {lines[-1]}" if lines else ""))
    return measurements(parse_driver_output(proc.stdout), read_with_load, job)


def _die_with_parent() -> None:
    """In the driver, before exec: be killed when the worker dies (the runner kills a worker that
    runs past its timeout, and the driver must not outlive it in the cgroup)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
