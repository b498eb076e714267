"""The Klotski order itself, read off event logs (scheduling never changes the tokens, so only the
order can show it).

Checked on every layer of every step, in the simulator (the engine's pipeline on a virtual clock,
exact times) and in a real engine run (the order of its log):

- the expert phase runs, at each turn, the resident expert with the most tokens (ties: the lower id);
  with none resident, the first to arrive. So the experts resident when the phase begins go first,
  most tokens first, and the cold ones follow as their loads finish;
- each expert's lease is released right after its computation, before the next job;
- the next layer's attention (and gate and hot experts) is wanted as soon as the layer has routed:
  right after its last gate, before its expert phase.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from klotski_tier import Engine, EngineOptions
from klotski_tier.core.bench.compute import demo_spec
from klotski_tier.core.model.blocks import attn_block
from klotski_tier.core.observe.events import JOB, LOADED, RELEASE, REQUEST, WANT, Event, EventLog
from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.hardware import HARDWARE
from klotski_tier.core.plan.routing_model import ParametricRouting
from klotski_tier.core.plan.simulate import block_sizes_of
from tests.conftest import CheckpointFactory
from tests.core.fixed_timing import simulate_steps, split_batches

IntArray = npt.NDArray[np.int64]
SPEC = dataclasses.replace(demo_spec(), num_layers=4)  # 8 experts, top-2
BATCHES, BATCH_SIZE, PROMPT = 2, 4, 4
READ_S, JOB_S = 0.01, 0.001  # a cold expert's read outlasts the jobs of every resident expert of a layer
KEPT_EXPERTS = 16  # the device budget: half the experts, beside the largest blocks and a layer's attention
DECODE_STEPS = 5
EXPERT_JOB = re.compile(r"L(\d+) expert (\d+)$")
GATHER_JOB = re.compile(r"L(\d+) gather$")


@dataclass
class Phase:
    """One layer's expert phase in one step, as the log shows it."""

    layer: int
    start: int  # index of its gather job
    jobs: list[tuple[int, int]]  # (log index, expert), in the order they ran
    ready_at: dict[int, int]  # expert -> log index from which it was resident (its lease granted)
    cold: set[int] = dataclasses.field(default_factory=set)  # experts whose request found them absent


def expert_phases(log: EventLog) -> list[Phase]:
    """Every expert phase of the log, with when each requested expert became resident."""
    events, phases = log.events, []
    for index, event in enumerate(events):
        gather = GATHER_JOB.match(event.subject) if event.kind == JOB else None
        if gather is None:
            continue
        layer = int(gather.group(1))
        phase = Phase(layer, index, [], {})
        requests = _requests_before(events, index, layer)
        for expert, (at, state) in requests.items():
            if state == "absent":
                phase.cold.add(expert)
            phase.ready_at[expert] = (
                at if state in ("resident", "leased") else _loaded(events, at, layer, expert)
            )
        for later in range(index + 1, len(events)):
            job = EXPERT_JOB.match(events[later].subject) if events[later].kind == JOB else None
            if events[later].kind == JOB and events[later].subject.startswith(f"L{layer} combine"):
                break
            if job is not None:
                phase.jobs.append((later, int(job.group(2))))
        phases.append(phase)
    return phases


def _requests_before(events: Sequence[Event], gather: int, layer: int) -> dict[int, tuple[int, str]]:
    """The layer's experts requested at its gates (since its attention job), with index and state."""
    first = max(
        i
        for i in range(gather)
        if events[i].kind == JOB and events[i].subject.startswith(f"L{layer} attention")
    )
    found = {}
    for index in range(first, gather):
        event = events[index]
        match = re.fullmatch(rf"L{layer}\.E(\d+)", event.subject) if event.kind == REQUEST else None
        if match is not None:
            found[int(match.group(1))] = (index, event.detail)
    return found


def _loaded(events: Sequence[Event], after: int, layer: int, expert: int) -> int:
    loaded = Event(0.0, LOADED, f"L{layer}.E{expert}", "device")[1:4]
    return next(i for i in range(after, len(events)) if events[i][1:4] == loaded)


def check_expert_order(phase: Phase, counts: IntArray) -> None:
    """At each turn: the resident expert with the most tokens, ties to the lower id."""
    left = set(phase.ready_at)
    for index, expert in phase.jobs:
        ready = [e for e in left if phase.ready_at[e] < index]
        assert ready, f"L{phase.layer}: expert {expert} ran before any expert was resident"
        best = max(ready, key=lambda e: (counts[e], -e))
        assert expert == best, (
            f"L{phase.layer}: ran expert {expert} ({counts[expert]} tokens) while {best} "
            f"({counts[best]} tokens) was resident; resident then: {sorted(ready)}"
        )
        left.remove(expert)
    assert not left, f"L{phase.layer}: experts {sorted(left)} were requested but never ran"


def check_releases(log: EventLog, job_s: float | None) -> None:
    """Each expert's release is the pipeline's next act after its job (and, when jobs take ``job_s``,
    comes exactly when the job ends)."""
    events = log.events
    for index, event in enumerate(events):
        job = EXPERT_JOB.match(event.subject) if event.kind == JOB else None
        if job is None:
            continue
        block = f"L{job.group(1)}.E{job.group(2)}"
        after = next(e for e in events[index + 1 :] if e.kind in (JOB, RELEASE))
        assert (after.kind, after.subject) == (RELEASE, block), f"{event.subject}: next came {after}"
        if job_s is not None:
            assert after.at_s == pytest.approx(event.at_s + job_s), f"{block} released late"


def check_next_layer_wanted_after_routing(
    log: EventLog, num_layers: int, batches: int, job_s: float | None
) -> None:
    """The next layer's attention is wanted right after the layer's last gate, before its expert phase."""
    events = log.events
    for index, event in enumerate(events):
        if event.kind != JOB or not event.subject.endswith(f"gate b{batches - 1}"):
            continue
        layer = int(event.subject.split()[0][1:])
        gather = next(i for i in range(index, len(events)) if events[i].subject == f"L{layer} gather")
        wants = {e.subject: e for e in events[index:gather] if e.kind == WANT}
        if layer + 1 < num_layers:
            assert str(attn_block(layer + 1)) in wants, f"L{layer + 1}.attn not wanted as L{layer} routed"
            want = wants[str(attn_block(layer + 1))]
            if job_s is not None:
                assert want.at_s == pytest.approx(event.at_s + job_s), "wanted later than the last gate's end"
        else:
            assert "head" in wants, "the head not wanted as the last layer routed"


def layer_counts(routes: Sequence[IntArray], layer: int, num_experts: int) -> IntArray:
    """Tokens of every batch selecting each expert in ``layer``."""
    return sum(np.bincount(r[layer].ravel(), minlength=num_experts) for r in routes)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def simulated() -> tuple[EventLog, list[list[IntArray]]]:
    """A prefill and decode steps of the demo's widths in the simulator, with room for half the experts:
    some stay resident from step to step, the others are read when a gate selects them."""
    sizes = block_sizes_of(CostModel(SPEC, HARDWARE["h800"]))
    expert = sizes[next(b for b in sizes if b.expert >= 0)]
    budget = 2 * max(sizes.values()) + sizes[attn_block(0)] + KEPT_EXPERTS * expert
    options = EngineOptions(batches=BATCHES, batch_size=BATCH_SIZE, device_memory_bytes=budget,
                            host_memory_bytes=0, disk_queue_depth=1, eviction="sweep")  # fmt: skip
    sampler = ParametricRouting.for_spec(SPEC, seed=3)
    rng = np.random.default_rng(3)
    shapes = [(PROMPT, 0)] + [(1, PROMPT + i) for i in range(DECODE_STEPS)]
    routes = [sampler.sample(BATCHES * BATCH_SIZE * query, rng) for query, _ in shapes]  # [L, T, k] each
    steps = [split_batches(r, BATCHES, BATCH_SIZE, q, c) for r, (q, c) in zip(routes, shapes, strict=True)]
    log = simulate_steps(SPEC, sizes, options, steps, read_s=READ_S, job_s=JOB_S)
    per_batch = [[batch.routes for batch in step] for step in steps]
    return log, per_batch


def test_resident_experts_run_first_most_tokens_first_then_cold_ones_as_they_arrive(
    simulated: tuple[EventLog, list[list[IntArray]]],
) -> None:
    log, routes = simulated
    phases = expert_phases(log)
    assert len(phases) == SPEC.num_layers * (1 + DECODE_STEPS)
    for step, start in enumerate(range(0, len(phases), SPEC.num_layers)):
        for phase in phases[start : start + SPEC.num_layers]:
            check_expert_order(phase, layer_counts(routes[step], phase.layer, SPEC.num_experts))
    mixed = [p for p in phases if _resident_at_start(p) >= 2 and p.cold]
    assert mixed, "no layer began its expert phase with both resident and cold experts: the scenario is moot"
    for phase in mixed:  # a read begun at the gate outlasts the resident ones' jobs: those went first
        resident = {e for e, at in phase.ready_at.items() if at < phase.start}
        ran = [expert for _, expert in phase.jobs]
        assert max(ran.index(e) for e in resident) < min(ran.index(e) for e in phase.cold), (resident, ran)


def _resident_at_start(phase: Phase) -> int:
    return sum(at < phase.start for at in phase.ready_at.values())


def test_each_expert_is_released_right_after_its_computation(
    simulated: tuple[EventLog, list[list[IntArray]]],
) -> None:
    check_releases(simulated[0], JOB_S)


def test_the_next_layer_is_wanted_as_soon_as_the_layer_has_routed(
    simulated: tuple[EventLog, list[list[IntArray]]],
) -> None:
    check_next_layer_wanted_after_routing(simulated[0], SPEC.num_layers, BATCHES, JOB_S)


def test_a_real_run_keeps_the_same_order(checkpoint_factory: CheckpointFactory, tmp_path: Path) -> None:
    model = checkpoint_factory("mixtral")
    prompts = [[5, 7, 9, 11], [3, 4, 5, 6], [20, 21, 22, 23], [40, 41, 42, 43]]
    probe = Engine.load(model, EngineOptions(batches=2, batch_size=2))
    budget = probe.minimum_budgets(prompts, max_new_tokens=4)[0] + 2 * probe.spec.expert_bytes
    engine = Engine.load(model, EngineOptions(batches=2, batch_size=2, device_memory_bytes=budget))
    result = engine.generate(prompts, max_new_tokens=4, events=True, record_routing=True)
    assert result.events is not None and result.routing is not None
    phases = expert_phases(result.events)
    layers = engine.spec.num_layers
    for step, trace in enumerate(result.routing.steps):  # [L, T, k]: the group's tokens, batch after batch
        for phase in phases[step * layers : (step + 1) * layers]:
            counts = np.bincount(
                trace[phase.layer].ravel().astype(np.int64), minlength=engine.spec.num_experts
            )
            check_expert_order(phase, counts)
    check_releases(result.events, None)
    check_next_layer_wanted_after_routing(result.events, layers, 2, None)
