"""The Python API: load a checkpoint with memory budgets, generate, get ids, text and metrics.

::

    from klotski_tier import Engine, EngineOptions

    engine = Engine.load("path/to/mixtral", EngineOptions(batches=4, batch_size=8,
                                                         device_memory_bytes=2 * 2**30))
    result = engine.generate(["The capital of France is"], max_new_tokens=32)
    print(result.outputs[0].text, result.metrics.decode_tokens_per_s)

Prompts are split into batch groups of ``batches * batch_size`` sequences; each group runs
prefill and then decode steps through the :class:`~klotski_tier.core.runtime.pipeline.Pipeline`
until every sequence has hit EOS or ``max_new_tokens``. Each ``generate`` call runs its own
event loop (``agenerate`` is the coroutine for callers that have one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from klotski_tier.core.errors import ConfigError, InputError
from klotski_tier.core.memory import read_memory_limit
from klotski_tier.core.model.tokenizer import TOKENIZER_FILE, load_tokenizer
from klotski_tier.core.observe.events import EventLog
from klotski_tier.core.observe.metrics import RunMetrics
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.observe.timeline import STEPS_TRACK, Timeline
from klotski_tier.core.runtime.budgets import Budgets, resolve_budgets
from klotski_tier.core.runtime.config import EngineOptions
from klotski_tier.core.runtime.model_jobs import Batch
from klotski_tier.core.runtime.policy_setup import build_prefetch, save_prefetch_state
from klotski_tier.core.runtime.run import Runtime, check_budgets, check_options, minimum_budgets
from klotski_tier.core.runtime.sequences import GenSequence, new_batch, set_decode_inputs
from klotski_tier.core.store.files import ModelFiles, open_model
from klotski_tier.policies.prefetch import PrefetchPolicy

__all__ = ["Engine", "EngineOptions", "GenerationResult", "SequenceOutput"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(phase, done, total)`` after each step; phase is "prefill" or "decode"."""


@dataclass(frozen=True)
class SequenceOutput:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None  # decoded generated tokens, when the checkpoint has a tokenizer
    finish_reason: str  # "eos" or "length"
    logits: list[torch.Tensor] = field(default_factory=list)  # float32 [V] per token, if asked


@dataclass(frozen=True)
class GenerationResult:
    outputs: list[SequenceOutput]
    metrics: RunMetrics
    routing: RoutingTrace | None = None  # every step's routing, when asked (record_routing=True)
    timeline: Timeline | None = None  # compute, I/O and bubble spans, when asked (timeline=True)
    events: EventLog | None = None  # every request, load, eviction and job in order, when asked (events=True)


class Engine:
    """A loaded checkpoint and the options to run it with."""

    def __init__(
        self,
        files: ModelFiles,
        options: EngineOptions,
        tokenizer: Tokenizer | None,
        prefetch: PrefetchPolicy,
        budgets: Budgets,
    ) -> None:
        self.files = files
        self.spec = files.spec
        self.options = options
        self.budgets = budgets  # the device and host budgets, and where they come from
        self.tokenizer = tokenizer
        self.prefetch = prefetch  # lives as long as the engine: it keeps learning across runs

    @classmethod
    def load(cls, model: str | Path, options: EngineOptions | None = None) -> Engine:
        """Read the checkpoint's config and headers (no weights) and check the budgets' floor."""
        return cls.from_files(open_model(model), options)

    @classmethod
    def from_files(
        cls, files: ModelFiles, options: EngineOptions | None = None, budgets: Budgets | None = None
    ) -> Engine:
        """:meth:`load` for a model already opened (:func:`~klotski_tier.core.store.files.open_model`).

        Budgets the options leave out (None) are derived from the memory this process may use
        (:mod:`klotski_tier.core.runtime.budgets`), unless ``budgets`` resolved them already.
        """
        options = options or EngineOptions()
        if budgets is None:
            budgets = resolve_budgets(files, options, read_memory_limit())
        options = budgets.apply(options)
        tokenizer = load_tokenizer(files.directory / TOKENIZER_FILE)
        check_options(files, options)
        check_budgets(files, options, [], budgets)
        return cls(files, options, tokenizer, build_prefetch(options, files.spec), budgets)

    def minimum_budgets(
        self, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int = 32
    ) -> tuple[int, int]:
        """The smallest (device, host) byte budgets that can run ``prompts`` with these options."""
        device_min, host_min, _ = minimum_budgets(
            self.files, self.options, self._groups(prompts, max_new_tokens)
        )
        return device_min, host_min

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InputError(f"{self.files.directory} has no tokenizer.json; pass token ids (--prompt-ids)")
        ids: list[int] = self.tokenizer.encode(text).ids
        return ids

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        return_logits: bool = False,
        progress: ProgressFn | None = None,
        record_routing: bool = False,
        timeline: bool = False,
        events: bool = False,
    ) -> GenerationResult:
        """Generate for every prompt (text, or token ids); greedy when ``temperature`` is 0.

        ``record_routing`` keeps every step's expert selections (``result.routing``, a trace
        ``klotski-tier replay`` reads); ``timeline`` keeps the spans of compute, I/O and waits
        (``result.timeline``, saved as a Chrome trace); ``events`` keeps the scheduling decisions in
        order (``result.events``: requests, loads, evictions, releases, jobs).
        """
        coroutine = self.agenerate(
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            return_logits=return_logits,
            progress=progress,
            record_routing=record_routing,
            timeline=timeline,
            events=events,
        )
        return asyncio.run(coroutine)

    async def agenerate(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        seed: int = 0,
        return_logits: bool = False,
        progress: ProgressFn | None = None,
        record_routing: bool = False,
        timeline: bool = False,
        events: bool = False,
    ) -> GenerationResult:
        if temperature < 0:
            raise ConfigError(f"temperature must be 0 (greedy) or positive, got {temperature}")
        groups = self._groups(prompts, max_new_tokens)
        seqs = [seq for group in groups for seq in group]
        check_budgets(self.files, self.options, groups, self.budgets)
        sampler = _Sampler(temperature, seed, return_logits, self.spec.eos_token_ids)
        started = time.perf_counter()
        runtime = Runtime(
            self.files,
            self.options,
            self.prefetch,
            record_routing=record_routing,
            timeline=timeline,
            events=events,
        )
        async with runtime:
            await runtime.reserve(groups)
            if self.options.host_preload:
                await runtime.preload_host(progress)
            for group in groups:
                await self._run_group(runtime, group, sampler, progress)
            metrics = runtime.finish()
        metrics.wall_s = time.perf_counter() - started
        if self.options.prefetch_save_state is not None:
            save_prefetch_state(self.prefetch, self.options.prefetch_save_state)
        routing = runtime.recorder.trace() if runtime.recorder is not None else None
        outputs = [self._output(s) for s in seqs]
        return GenerationResult(outputs, metrics, routing, runtime.timeline, runtime.events)

    def _groups(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[list[GenSequence]]:
        seqs = self._sequences(prompts, max_new_tokens)
        size = self.options.batches * self.options.batch_size
        return [seqs[i : i + size] for i in range(0, len(seqs), size)]

    def _sequences(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[GenSequence]:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if not prompts:
            raise InputError("no prompts given; pass at least one prompt")
        seqs = []
        for index, prompt in enumerate(prompts):
            ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            self._check_prompt(index, ids, max_new_tokens)
            seqs.append(GenSequence(index, ids, max_new_tokens))
        return seqs

    def _check_prompt(self, index: int, ids: list[int], max_new_tokens: int) -> None:
        spec = self.spec
        if not ids:
            raise InputError(f"prompt {index} is empty; give it at least one token")
        bad = [t for t in ids if not 0 <= t < spec.vocab_size]
        if bad:
            raise InputError(
                f"prompt {index} has token id {bad[0]} outside the vocabulary 0..{spec.vocab_size - 1}"
            )
        needed = len(ids) + max_new_tokens
        if needed > spec.max_position_embeddings:
            raise InputError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it needs "
                f"{needed} "
                f"positions but the model's context is {spec.max_position_embeddings}; shorten the prompt "
                "or lower --max-new-tokens"
            )

    async def _run_group(
        self, runtime: Runtime, group: list[GenSequence], sampler: _Sampler, progress: ProgressFn | None
    ) -> None:
        bs = self.options.batch_size
        parts = [group[i : i + bs] for i in range(0, len(group), bs)]
        compute = runtime.compute
        batches = [await self._new_batch(runtime, part) for part in parts]
        metrics = runtime.metrics
        started = time.perf_counter()
        logits = await runtime.pipeline.forward(batches)
        ended = time.perf_counter()
        metrics.prefill_s += ended - started
        if runtime.timeline is not None:
            runtime.timeline.span(STEPS_TRACK, "prefill", started, ended, sequences=len(group))
        metrics.prefill_tokens += sum(len(s.prompt) for s in group)
        sampler.sample(parts, logits)
        total = max(s.max_new_tokens for s in group)
        step = 1
        if progress:
            progress("prefill", 1, 1)
        while any(s.finish_reason is None for s in group):
            for batch, part in zip(batches, parts, strict=True):
                await compute.run(set_decode_inputs, batch, part, label="inputs")
            active = sum(s.finish_reason is None for s in group)
            started = time.perf_counter()
            logits = await runtime.pipeline.forward(batches)
            ended = time.perf_counter()
            metrics.decode_s += ended - started
            if runtime.timeline is not None:
                runtime.timeline.span(STEPS_TRACK, f"decode {step + 1}", started, ended, sequences=active)
            metrics.decode_tokens += active
            sampler.sample(parts, logits)
            step += 1
            if progress:
                progress("decode", step, total)
        if runtime.kv is not None:  # the group is done: a cache on the drive gives its files back
            for batch in batches:
                await runtime.kv.discard(batch.kv_file)

    async def _new_batch(self, runtime: Runtime, part: list[GenSequence]) -> Batch:
        """A batch's KV cache and prefill inputs. On CUDA in the compute thread: the event loop never
        calls the CUDA allocator. A CPU device's tensors are host memory and are made here: made in the
        compute thread, they ran e2e-2g's decode 20 % slower (benchmarks/README.md, the A/B section)."""
        caches, kv_file, on_device = None, None, 0
        if runtime.kv is not None:  # the cache lives away from the device (runtime/kv.py)
            positions = max(len(s.prompt) + s.max_new_tokens for s in part)
            on_device = self.options.kv_device_layers  # the first layers' cache stays on the device
            k, v, kv_file = await runtime.kv.new_caches(
                len(part), positions, self.spec.num_layers - on_device
            )
            caches = (k, v)
        if runtime.device.type == "cuda":
            return await runtime.compute.run(
                new_batch, part, self.spec, runtime.device, caches, kv_file, on_device, label="inputs"
            )
        return new_batch(part, self.spec, runtime.device, caches, kv_file, on_device)

    def _output(self, seq: GenSequence) -> SequenceOutput:
        assert seq.finish_reason is not None, f"sequence {seq.index} did not finish"
        return SequenceOutput(
            seq.prompt, seq.generated, self.decode(seq.generated), seq.finish_reason, seq.logits
        )


class _Sampler:
    """Picks each unfinished sequence's next token: argmax, or sampling at a temperature."""

    def __init__(
        self, temperature: float, seed: int, keep_logits: bool, eos_token_ids: Sequence[int]
    ) -> None:
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.keep_logits = keep_logits
        self.eos_token_ids = eos_token_ids

    def sample(self, parts: Sequence[Sequence[GenSequence]], logits: Sequence[torch.Tensor]) -> None:
        for part, batch_logits in zip(parts, logits, strict=True):
            host_logits = batch_logits.cpu()  # [B, V] float32 (on the host already: the head job moved it)
            for seq, row in zip(part, host_logits, strict=True):
                if seq.finish_reason is not None:
                    continue
                if self.keep_logits:
                    seq.logits.append(row.clone())
                seq.append(self._pick(row), self.eos_token_ids)

    def _pick(self, row: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(torch.argmax(row))
        # in float64 and shifted by the largest logit first: the same distribution, finite at any
        # temperature (a denormal t makes row / t overflow to inf, whose softmax is nan, or rounds to 0
        # in float32); shifted, the largest logits scale to 0 and the rest to -inf: the argmax
        shifted = row.double() - row.max().double()
        probs = torch.softmax(shifted / self.temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
