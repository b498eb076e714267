"""Planning a run before its engine loads: the options the planner picks for a model, its prompts and
budgets on this machine.

``klotski-tier run --plan auto`` and the e2e benchmark plan a run and then load the engine once, with
:attr:`RunPlan.options`, from the model they opened for the plan::

    files = open_model("path/to/mixtral")
    chosen = plan_files(files, options, prompts, 32, explicit, profile_path, find_profile(profile_path))
    engine = Engine.from_files(files, chosen.options)

What the plan needs comes from the checkpoint's config and headers (:func:`open_model`, no weights),
the prompts' lengths (text prompts through the checkpoint's tokenizer), the options' budgets and
routing trace, and the ``klotski-tier bench`` profile. The fields named in ``explicit`` (the ones a
user set) stay as set and the plan is made around them; the planner chooses the others. Planning
is advice: when the planner cannot plan, the options stay as they are and :attr:`RunPlan.note` says
why. Without a profile the plan is made for :func:`~klotski_tier.core.plan.hardware.unmeasured_machine`,
conservative figures that choose ``sweep`` when the weights stream and a batch group as large as the
prompts and memory allow; :attr:`RunPlan.basis` says which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from klotski_tier.core.bench.profile import MachineProfile, find_profile
from klotski_tier.core.errors import InputError, KlotskiError
from klotski_tier.core.memory import read_memory_limit
from klotski_tier.core.model.tokenizer import TOKENIZER_FILE, load_tokenizer
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.plan.hardware import local_machine, unmeasured_machine
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.plan_types import MAX_COMPRESSION_RATIO, MIN_COMPRESSION_RATIO
from klotski_tier.core.plan.planner import Plan, PlanRequest, make_plan
from klotski_tier.core.plan.routing_model import RoutingModel, TraceRouting
from klotski_tier.core.runtime.config import ALL_EXPERTS, EngineOptions, replace
from klotski_tier.core.store.files import ModelFiles, open_model
from klotski_tier.core.store.packed import PackedStore
from klotski_tier.tiers.device import resolve_device

logger = logging.getLogger(__name__)

PLAN_AUTO, PLAN_OFF = "auto", "off"
NO_PROFILE_NOTE = "no machine profile: `klotski-tier bench` measures this machine"
# what a plan sets
PLANNED_FIELDS = (
    "batches", "batch_size", "hot_experts", "host_preload", "eviction", "lookahead_layers", "kv_home",
    "kv_attention", "activations_home", "kv_device_layers",
)  # fmt: skip

PromptInput = str | Sequence[int]  # a text prompt, or its token ids
CountProgress = Callable[[int, int], None]
"""``progress(done, total)``: prompts measured so far (tokenizing 5 million takes minutes)."""
PROGRESS_PROMPTS = 10_000  # prompts measured between two progress calls


@dataclass(frozen=True)
class RunPlan:
    """The options a run uses and the plan they come from, if any."""

    mode: str  # PLAN_AUTO or PLAN_OFF
    options: EngineOptions
    plan: Plan | None = None
    planned: tuple[str, ...] = ()  # EngineOptions fields the plan set (the others: the user's or defaults)
    note: str = ""  # why no plan is used, or what the plan is based on when it is not a profile
    basis: str = ""  # the machine the plan was made for, and where its figures come from


def plan_model(
    model: str | Path,
    options: EngineOptions,
    prompts: Sequence[PromptInput],
    max_new_tokens: int,
    *,
    explicit: Set[str] = frozenset(),
    profile_path: Path | None = None,
) -> RunPlan:
    """``options`` with the plan's values for the fields not in ``explicit``, for ``model`` (a
    checkpoint or packed store directory) generating ``max_new_tokens`` after each of ``prompts``.

    ``profile_path`` None: the profile ``klotski-tier bench`` wrote, if any. A checkpoint that cannot
    be opened raises (as :meth:`Engine.load` would); a plan that cannot be made is a note.
    """
    profile = find_profile(profile_path)
    return plan_files(open_model(model), options, prompts, max_new_tokens, explicit, profile_path, profile)


def plan_files(
    files: ModelFiles,
    options: EngineOptions,
    prompts: Sequence[PromptInput],
    max_new_tokens: int,
    explicit: Set[str],
    profile_path: Path | None,
    profile: MachineProfile | None,
    *,
    progress: CountProgress | None = None,
) -> RunPlan:
    """:func:`plan_model` for a checkpoint already opened and a profile already read from
    ``profile_path`` (None: none was found: the plan is made from conservative defaults). ``progress``
    is told how many prompts have been measured."""
    note = ""
    try:  # planning is advice: the run goes on with the options as they are
        lengths = prompt_lengths(files.directory, prompts, progress)
        if profile is None:
            machine, note = _unmeasured(options), NO_PROFILE_NOTE
        else:
            machine = local_machine(profile_path, profile=profile)
        plan = make_plan(plan_request(files, options, lengths, max_new_tokens, explicit, machine))
    except KlotskiError as exc:
        logger.info("no plan: %s", exc)
        return RunPlan(PLAN_AUTO, options, note=f"the planner cannot plan this run ({exc}); the defaults")
    planned = {k: v for k, v in plan.engine_options().items() if k not in fixed_fields(explicit)}
    basis = f"{machine.name}: {machine.source}"
    return RunPlan(PLAN_AUTO, replace(options, **planned), plan, tuple(planned), note, basis)


def _unmeasured(options: EngineOptions) -> Machine:
    """This machine without a profile; its memory: the options' budgets (as the run derived them), else
    what the process may use, else (a CUDA device) the GPU's."""
    device = resolve_device(options.device)
    host, device_bytes = options.host_memory_bytes, options.device_memory_bytes
    if device_bytes is None and device.type == "cuda":
        device_bytes = int(torch.cuda.get_device_properties(device).total_memory)
    if host is None or device_bytes is None:  # a budget left out (the CLI derived them already)
        free = read_memory_limit().free_bytes
        host = free if host is None else host
        device_bytes = free if device_bytes is None else device_bytes
    return unmeasured_machine(device.type, device_bytes, host)


def plan_request(
    files: ModelFiles,
    options: EngineOptions,
    lengths: Sequence[int],
    max_new_tokens: int,
    explicit: Set[str],
    machine: Machine,
) -> PlanRequest:
    """What to plan: this model, prompts of these ``lengths``, the options' budgets and routing trace,
    and the fields the user fixed (``explicit``)."""
    spec = files.spec
    explicit = fixed_fields(explicit)
    fixed: dict[str, Any] = {name: getattr(options, name) for name in PLANNED_FIELDS if name in explicit}
    if fixed.get("hot_experts") == ALL_EXPERTS:
        fixed["hot_experts"] = spec.num_experts
    trace = options.prefetch_trace
    return PlanRequest(
        spec,
        machine,
        RoutingModel(TraceRouting(RoutingTrace.load(trace))) if trace is not None else None,
        device_memory_bytes=options.device_memory_bytes,
        host_memory_bytes=options.host_memory_bytes,
        sequences=len(lengths),
        prompt_tokens=max(1, *lengths),
        new_tokens=max_new_tokens,
        compression_ratio=store_ratio(files.store),
        stream_window=options.stream_window,
        disk_queue_depth=options.disk_queue_depth,
        **fixed,
    )


def fixed_fields(explicit: Set[str]) -> Set[str]:
    """The planned fields the user fixed: options given for an eviction policy fix the policy too."""
    return explicit | {"eviction"} if "eviction_options" in explicit else explicit


def prompt_lengths(
    model: Path, prompts: Sequence[PromptInput], progress: CountProgress | None = None
) -> list[int]:
    """Tokens of each prompt; text through ``model``'s tokenizer, read only when a prompt is text.
    ``progress(done, total)`` is called as text prompts are tokenized."""
    if not prompts:
        raise InputError("no prompts given; pass at least one prompt")
    if not any(isinstance(prompt, str) for prompt in prompts):
        return [len(prompt) for prompt in prompts]
    tokenizer = _tokenizer(model)
    lengths: list[int] = []
    for start in range(0, len(prompts), PROGRESS_PROMPTS):
        chunk = prompts[start : start + PROGRESS_PROMPTS]
        lengths.extend(len(tokenizer.encode(p).ids) if isinstance(p, str) else len(p) for p in chunk)
        if progress is not None:
            progress(len(lengths), len(prompts))
    return lengths


def store_ratio(store: PackedStore | None) -> float | None:
    """Raw over stored bytes of a store whose blocks are compressed, held to the plausible range the
    planner accepts (a store of zeros compresses a thousandfold); None for anything else."""
    if store is None or not any(entry.compressed for entry in store.entries.values()):
        return None
    ratio = store.raw_bytes / max(1, store.stored_bytes)
    return min(max(ratio, MIN_COMPRESSION_RATIO), MAX_COMPRESSION_RATIO)


def _tokenizer(model: Path) -> Tokenizer:
    tokenizer = load_tokenizer(model / TOKENIZER_FILE)
    if tokenizer is None:
        raise InputError(f"{model} has no {TOKENIZER_FILE}; pass token ids (--prompt-ids)")
    return tokenizer
