"""The peer users would pick today: transformers + accelerate big-model offloading, in one worker.

``infer_auto_device_map`` on an empty (meta) copy of the model, with ``max_memory={"cpu":
budget}`` and the model's own no-split classes (whole decoder layers), keeps the modules that
fit in the weight budget in RAM, in model order, and sends the rest to ``"disk"``;
``from_pretrained(device_map=..., offload_folder=...)`` then writes the offloaded weights to
the offload folder once (not timed) and accelerate's hooks read each offloaded module back
just before its forward and drop it after. This machine has no GPU, so the execution device is
the CPU, as for every other system.

Generation: ``model.generate`` greedy over batches of ``job.batch_size`` equal-length prompts (no
padding). A logits processor timestamps the first step of each batch, which splits prefill from
decode. ``hook_load_s`` is the time accelerate's hooks spend in ``AlignDevicesHook.pre_forward``
of offloaded modules; it is not all of its I/O wait, because safetensors maps the offloaded files
and most reads happen as page faults inside the matmuls, so the parent estimates the wait against
a run with every weight in RAM (:mod:`benchmarks.e2e.compare`).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.e2e.worker import Job, drive_read_bytes

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NO_SPLIT_FALLBACK = ["MixtralDecoderLayer"]  # when a model class does not name its own


def run_accelerate(job: Job) -> dict[str, Any]:
    """Load with a cpu/disk device map within ``job.weight_budget_bytes``, generate; the measurements."""
    import torch
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    if job.offload_dir is not None:
        shutil.rmtree(job.offload_dir, ignore_errors=True)  # a previous run's offloaded weights
    device_map, placed = plan_device_map(job.model, job.weight_budget_bytes)
    model = AutoModelForCausalLM.from_pretrained(
        job.model, device_map=device_map, offload_folder=job.offload_dir, dtype=torch.bfloat16
    )
    _evict_offload(job.offload_dir)
    load_s = time.perf_counter() - started
    read_before = drive_read_bytes()
    with _timed_weight_loads() as loads:
        tokens, prefill_s, decode_s = _generate(model, job)
    return {
        "tokens": tokens,
        "generated_tokens": sum(len(t) for t in tokens),
        "decode_tokens": sum(max(len(t) - 1, 0) for t in tokens),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "load_s": load_s,
        "compute_s": None,
        "io_wait_s": None,  # estimated by the parent against a run with every weight in RAM
        "hook_load_s": loads[0],
        "bytes_read": drive_read_bytes() - read_before,
        "details": {"batch_size": job.batch_size, "placed_bytes": placed, "device_map": _summary(device_map)},
    }


def plan_device_map(model_dir: str, budget_bytes: int | None) -> tuple[dict[str, str], dict[str, int]]:
    """The device map accelerate infers for ``budget_bytes`` of RAM (None: everything in RAM), and
    the parameter bytes it places on each of ``cpu`` and ``disk``."""
    import torch
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    auto: Any = AutoModelForCausalLM  # from_config is untyped
    with init_empty_weights():
        meta = auto.from_config(config, dtype=torch.bfloat16)
    if budget_bytes is None:
        device_map = {"": "cpu"}
    else:
        device_map = infer_auto_device_map(
            meta,
            max_memory={"cpu": budget_bytes},
            no_split_module_classes=meta._no_split_modules or NO_SPLIT_FALLBACK,
            dtype=torch.bfloat16,
        )
    return dict(device_map), _placed_bytes(meta, device_map)


def _placed_bytes(meta: torch.nn.Module, device_map: dict[str, str]) -> dict[str, int]:
    placed: dict[str, int] = {}
    for name, param in meta.named_parameters():
        device = _device_of(name, device_map)
        placed[device] = placed.get(device, 0) + param.numel() * param.element_size()
    return placed


def _device_of(name: str, device_map: dict[str, str]) -> str:
    """The device of parameter ``name``: the entry of its longest prefix in the map."""
    best, device = -1, "cpu"
    for prefix, target in device_map.items():
        if (prefix == "" or name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, device = len(prefix), str(target)
    return device


def _summary(device_map: dict[str, str]) -> dict[str, int]:
    """How many top-level entries of the device map go to each device."""
    counts: dict[str, int] = {}
    for target in device_map.values():
        counts[str(target)] = counts.get(str(target), 0) + 1
    return counts


def _evict_offload(offload_dir: str | None) -> None:
    """Drop the offload files just written from the page cache: every run starts cold."""
    from klotski_tier.core.store.pagecache import evict

    if offload_dir is None:
        return
    for path in sorted(Path(offload_dir).rglob("*")):
        if path.is_file():
            evict(path)


def _generate(model: Any, job: Job) -> tuple[list[list[int]], float, float]:
    """Greedy generation in batches of ``job.batch_size``; (tokens, prefill s, decode s)."""
    import torch
    from transformers import LogitsProcessorList

    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos
    tokens: list[list[int]] = []
    prefill_s = decode_s = 0.0
    for start in range(0, len(job.prompts), job.batch_size):
        ids = torch.tensor(job.prompts[start : start + job.batch_size])  # [B, P] int64, equal lengths
        stamp = _FirstStep()
        begun = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=job.new_tokens,
                do_sample=False,
                pad_token_id=pad,
                logits_processor=LogitsProcessorList([stamp]),
            )  # [B, P + G]
        ended = time.perf_counter()
        first = stamp.at_s if stamp.at_s is not None else ended
        prefill_s += first - begun
        decode_s += ended - first
        tokens += [_strip(row.tolist()[ids.shape[1] :], eos) for row in out]
    return tokens, prefill_s, decode_s


def _strip(row: list[int], eos: int | list[int] | None) -> list[int]:
    """Generated ids up to and including the first EOS (the rest is padding)."""
    stops = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for index, token in enumerate(row):
        if token in stops:
            return row[: index + 1]
    return row


class _FirstStep:
    """A logits processor that notes when the first step's logits arrive (the end of prefill)."""

    def __init__(self) -> None:
        self.at_s: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at_s is None:
            self.at_s = time.perf_counter()
        return scores


@contextmanager
def _timed_weight_loads() -> Iterator[list[float]]:
    """Time spent in accelerate's hooks loading offloaded weights, summed into ``[seconds]``."""
    from accelerate.hooks import AlignDevicesHook

    seconds = [0.0]
    original = AlignDevicesHook.pre_forward

    def timed(hook: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
        if not hook.offload:
            return original(hook, module, *args, **kwargs)
        begun = time.perf_counter()
        try:
            return original(hook, module, *args, **kwargs)
        finally:
            seconds[0] += time.perf_counter() - begun

    AlignDevicesHook.pre_forward = timed
    try:
        yield seconds
    finally:
        AlignDevicesHook.pre_forward = original
