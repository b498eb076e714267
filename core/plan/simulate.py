"""A discrete-event simulation of the pipeline on a machine we may not have, with the planner's cost model.

The events (the pipeline's order, the residency manager's loads and leases, the disk pool and the
copy channel) live in :mod:`klotski_tier.core.plan.simulate_events`; see its docstring.

:func:`simulate_workload` runs the engine's ``generate``: groups of n batches of bs sequences,
each a prefill step and ``new_tokens - 1`` decode steps; :func:`sweep` does it for several n.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.routing_model import ParametricRouting
from klotski_tier.core.plan.simulate_events import DISK_TO_HOST as DISK_TO_HOST
from klotski_tier.core.plan.simulate_events import HOST_TO_DEVICE as HOST_TO_DEVICE
from klotski_tier.core.plan.simulate_events import READ_DONE_BYTES as READ_DONE_BYTES
from klotski_tier.core.plan.simulate_events import EventSimulator
from klotski_tier.core.plan.simulate_events import SimConfig as SimConfig
from klotski_tier.core.plan.simulate_events import StepStats as StepStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkloadResult:
    """A simulated ``generate``: prefill and decode totals (decode extrapolated past ``max_decode_steps``)."""

    batches: int
    batch_size: int
    hot_experts: int
    prefill: StepStats
    decode: StepStats

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill.tokens_per_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode.tokens_per_s

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(
            prefill_tokens_per_s=self.prefill_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s
        )
        return data


def simulate_workload(
    config: SimConfig,
    *,
    sequences: int,
    prompt_tokens: int,
    new_tokens: int,
    max_decode_steps: int | None = None,
) -> WorkloadResult:
    """Simulate ``generate`` of ``sequences`` prompts of ``prompt_tokens`` tokens, ``new_tokens`` each.

    Groups of ``batches * batch_size`` sequences run one after the other on one simulator (blocks
    stay where the previous group left them); decode steps past ``max_decode_steps`` of a group are
    counted at the mean of those simulated.
    """
    cost = CostModel(config.spec, config.machine)
    group = config.batches * config.batch_size
    fixed = cost.fixed_device_bytes(config.batches, config.batch_size, prompt_tokens, new_tokens)
    sim = EventSimulator(config, cost, fixed)
    sampler = config.routing or ParametricRouting.for_spec(config.spec, seed=config.seed)
    rng = np.random.default_rng(config.seed)
    prefill, decode = StepStats(), StepStats()
    for first in range(0, sequences, group):
        count = min(group, sequences - first)
        sizes = [min(config.batch_size, count - i) for i in range(0, count, config.batch_size)]
        prefill.add(sim.step(sampler.sample(count * prompt_tokens, rng), sizes, prompt_tokens, 0))
        steps = new_tokens - 1
        simulated = steps if max_decode_steps is None else min(steps, max_decode_steps)
        for index in range(simulated):
            stats = sim.step(sampler.sample(count, rng), sizes, 1, prompt_tokens + index)
            decode.add(dataclasses.replace(stats, tokens=0), steps / simulated)
        decode.tokens += steps * count  # every sequence runs to new_tokens: the simulation has no EOS
    return WorkloadResult(config.batches, config.batch_size, sim.hot, prefill, decode)


def sweep(
    config: SimConfig,
    batches: Sequence[int],
    *,
    sequences: int | Callable[[int], int],
    prompt_tokens: int,
    new_tokens: int,
    max_decode_steps: int | None = None,
) -> list[WorkloadResult]:
    """:func:`simulate_workload` for each n in ``batches`` (``sequences`` may depend on n)."""
    results = []
    for n in batches:
        count = sequences(n) if callable(sequences) else sequences
        run = dataclasses.replace(config, batches=n)
        result = simulate_workload(
            run,
            sequences=count,
            prompt_tokens=prompt_tokens,
            new_tokens=new_tokens,
            max_decode_steps=max_decode_steps,
        )
        results.append(result)
    return results
