"""The constraint-sensitive planner: n, bs, K and placement from the machine, the model and its routing.

The step model it searches over (deadlines (4)-(7) of ARCHITECTURE.md section 2 point 6 and the step
recurrence) lives in :mod:`klotski_tier.core.plan.pipeline_model`, placement, transfer times and LRU reuse
in :mod:`klotski_tier.core.plan.placement_model`, the request, candidate and plan types in
:mod:`klotski_tier.core.plan.plan_types`; their public names are re-exported here.

:func:`make_plan` tries n = 1, 2, ... (up to the sequences, ``max_batches`` and memory: the KV cache
grows with n * bs) and K in 0..2k (in eight steps when 2k > 8) and K = E, with each place for the KV
cache's attention and a prefill's activations. Of the candidates that fit it keeps those within
:data:`NEAR_BEST` of the best predicted decode throughput; among them, those that meet every deadline
in every layer (the feasible ones), the smallest n (at its best K): per-job costs spread over the
n * bs tokens of a group, so throughput often keeps rising with n, but memory and latency grow with n
too, and a few percent do not buy more batches. If none of them is feasible, the fastest, naming the
missed deadline and by how much. Unless
bs is given, it does so for each bs in powers of two and keeps the best predicted decode throughput.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

from klotski_tier.core.errors import BudgetError, ConfigError
from klotski_tier.core.plan.costmodel import CostModel, no_host_attention
from klotski_tier.core.plan.pipeline_model import BISECTIONS as BISECTIONS
from klotski_tier.core.plan.pipeline_model import MAX_SPEEDUP as MAX_SPEEDUP
from klotski_tier.core.plan.pipeline_model import MEANINGS as MEANINGS
from klotski_tier.core.plan.pipeline_model import SLACK_TOLERANCE_S as SLACK_TOLERANCE_S
from klotski_tier.core.plan.pipeline_model import STEADY_STEPS as STEADY_STEPS
from klotski_tier.core.plan.pipeline_model import Deadline as Deadline
from klotski_tier.core.plan.pipeline_model import FloatArray as FloatArray
from klotski_tier.core.plan.pipeline_model import Io as Io
from klotski_tier.core.plan.pipeline_model import LayerWork as LayerWork
from klotski_tier.core.plan.pipeline_model import StepPrediction as StepPrediction
from klotski_tier.core.plan.pipeline_model import StepShape as StepShape
from klotski_tier.core.plan.pipeline_model import WorkTable as WorkTable
from klotski_tier.core.plan.pipeline_model import deadlines as deadlines
from klotski_tier.core.plan.pipeline_model import layer_work as layer_work
from klotski_tier.core.plan.pipeline_model import least_factor as least_factor
from klotski_tier.core.plan.pipeline_model import predict_step as predict_step
from klotski_tier.core.plan.pipeline_model import speedup_to_meet as speedup_to_meet
from klotski_tier.core.plan.placement_model import (
    LRU,
    SWEEP,
    device_window_bytes,
    host_in_flight_bytes,
    kv_home_for,
    touched_bytes,
    window_of,
)
from klotski_tier.core.plan.placement_model import Placement as Placement
from klotski_tier.core.plan.placement_model import io_times as io_times
from klotski_tier.core.plan.placement_model import lru_misses as lru_misses
from klotski_tier.core.plan.placement_model import placement_for as placement_for
from klotski_tier.core.plan.placement_model import reads_into_device as reads_into_device
from klotski_tier.core.plan.placement_model import sweep_misses as sweep_misses
from klotski_tier.core.plan.placement_model import weights_working_set as weights_working_set
from klotski_tier.core.plan.plan_types import Candidate as Candidate
from klotski_tier.core.plan.plan_types import Plan as Plan
from klotski_tier.core.plan.plan_types import PlanRequest as PlanRequest
from klotski_tier.core.plan.plan_types import SweepPoint as SweepPoint
from klotski_tier.core.plan.plan_types import TierUse as TierUse
from klotski_tier.core.plan.routing_model import LayerLoads, RoutingModel
from klotski_tier.core.runtime.config import (
    DEVICE_ACTIVATIONS,
    DEVICE_ATTENTION,
    DEVICE_KV,
    DISK_KV,
    HOST_ACTIVATIONS,
    HOST_ATTENTION,
    HOST_KV,
    KV_SLOTS,
)
from klotski_tier.core.units import format_size

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 64  # largest bs tried when the request leaves it open
FINE_HOT_EXPERTS = 8  # K is tried one by one up to 2k when 2k is at most this; else in COARSE_HOT_STEPS
COARSE_HOT_STEPS = 8
TYPICAL_ZSTD_RATIO = 1.4  # bf16 expert weights with byte shuffle (the demo packs at 1/0.683 = 1.46)
NEAR_BEST = 0.98  # the smallest feasible n predicted within this share of the best feasible tokens/s wins
NOTABLE_GAIN = 0.01  # the why names a faster larger n only when it is predicted at least this much faster


@dataclass
class _Context:
    request: PlanRequest
    cost: CostModel
    routing: RoutingModel
    device_budget: int
    host_budget: int  # for weights: less what host_held takes
    tables: dict[int, WorkTable] = field(default_factory=dict)
    host_held: tuple[tuple[str, int], ...] = ()  # host RAM outside weights: the KV cache, the residuals

    def work_table(self, tokens: int) -> WorkTable:
        if tokens not in self.tables:
            self.tables[tokens] = WorkTable.of(self.routing.loads(tokens), self.cost)
        return self.tables[tokens]


def make_plan(request: PlanRequest) -> Plan:
    """The plan for ``request``; :class:`BudgetError` when no plan can run within its budgets."""
    ctx = _context(request)
    sizes = [request.batch_size] if request.batch_size else _batch_sizes(request.sequences)
    _check_minimum(ctx, min(sizes))
    chosen: list[tuple[Candidate, list[Candidate]]] = []
    for bs in sizes:
        tried = [c for n in _batch_counts(request, bs) for c in _candidates(ctx, n, bs)]
        if tried:
            chosen.append((_choose(tried), tried))
    best, tried = max(chosen, key=lambda pair: (pair[0].fits, pair[0].tokens_per_s, -pair[0].batch_size))
    logger.info("plan: n=%d bs=%d K=%d", best.batches, best.batch_size, best.hot_experts)
    return _plan(ctx, best, [c for c in tried if c.batch_size == best.batch_size])


def _context(request: PlanRequest) -> _Context:
    routing = request.routing or RoutingModel.default_for(request.spec)
    routing.check_model(request.spec)
    machine = request.machine
    device = (
        machine.device_memory_bytes if request.device_memory_bytes is None else request.device_memory_bytes
    )
    host = machine.host_memory_bytes if request.host_memory_bytes is None else request.host_memory_bytes
    return _Context(request, CostModel(request.spec, machine), routing, device, host)


def _check_minimum(ctx: _Context, batch_size: int) -> None:
    """The engine's own floor (runtime.minimum_budgets) for the smallest group this request allows."""
    req, sizes = ctx.request, ctx.cost.sizes
    batches = req.batches or 1
    acts = _activation_homes(ctx, batches, batch_size)[-1]  # in host RAM where allowed: the least needed
    home = _kv_home(ctx, batches, batch_size, acts) or req.kv_home or HOST_KV  # nothing fits: the least
    tokens = (req.prompt_tokens, req.new_tokens)
    fixed = ctx.cost.fixed_device_bytes(batches, batch_size, *tokens, kv_home=home, activations_home=acts)
    if ctx.device_budget < fixed + sizes.largest:
        raise BudgetError(
            f"device memory budget {format_size(ctx.device_budget)} is below the minimum working set "
            f"{format_size(fixed + sizes.largest)} (KV cache and activations of {batches} batch(es) of "
            f"{batch_size} + the largest block); raise the device memory or shorten the sequences"
        )
    if ctx.host_budget < sizes.largest and not reads_into_device(ctx.cost, ctx.host_budget):
        raise BudgetError(
            f"host memory budget {format_size(ctx.host_budget)} cannot stage the largest block "
            f"({format_size(sizes.largest)}); raise the host memory"
        )


def _batch_sizes(sequences: int) -> list[int]:
    sizes = [1 << i for i in range(int(math.log2(MAX_BATCH_SIZE)) + 1) if 1 << i < sequences]
    return [*sizes, min(sequences, MAX_BATCH_SIZE)]


def _batch_counts(request: PlanRequest, batch_size: int) -> range:
    if request.batches is not None:
        return range(request.batches, request.batches + 1)
    return range(1, min(request.max_batches, math.ceil(request.sequences / batch_size)) + 1)


def _hot_counts(ctx: _Context) -> list[int]:
    spec = ctx.request.spec
    if ctx.request.hot_experts is not None:
        return [ctx.request.hot_experts]
    most = min(spec.num_experts, 2 * spec.top_k)
    every = [spec.num_experts]  # the whole layer: what a step uses when its many tokens select every expert
    if most <= FINE_HOT_EXPERTS:
        return sorted({*range(most + 1), *every})
    return sorted(
        {round(most * step / COARSE_HOT_STEPS) for step in range(COARSE_HOT_STEPS + 1)} | set(every)
    )


def _candidates(ctx: _Context, n: int, bs: int) -> list[Candidate]:
    """Every K at (n, bs), with each place for the activations; none when even the engine's floor does
    not fit this group."""
    return [c for home in _activation_homes(ctx, n, bs) for c in _candidates_at(ctx, n, bs, home)]


def _activation_homes(ctx: _Context, n: int, bs: int) -> list[str]:
    """Where a prefill's residual streams may wait: as fixed, else on the device, and also in host RAM
    where there is a host tier with room for them beside the KV cache it keeps."""
    req, cost = ctx.request, ctx.cost
    if req.activations_home is not None:
        return [req.activations_home]
    residuals = n * cost.residual_bytes(bs, req.prompt_tokens)
    kv = _group_kv_bytes(ctx, n, bs) if _kv_home(ctx, n, bs) == HOST_KV else 0
    if reads_into_device(cost, ctx.host_budget) or residuals + kv + cost.sizes.largest > ctx.host_budget:
        return [DEVICE_ACTIVATIONS]
    return [DEVICE_ACTIVATIONS, HOST_ACTIVATIONS]


def _candidates_at(ctx: _Context, n: int, bs: int, activations: str) -> list[Candidate]:
    """Every K at (n, bs) with the activations at ``activations``, and with the cache away from the
    device, each number of first layers whose cache stays there (:func:`_device_layer_counts`)."""
    kv_home = _kv_home(ctx, n, bs, activations)
    if kv_home is None:
        return []
    counts = [0] if kv_home == DEVICE_KV else _device_layer_counts(ctx, n, bs, kv_home, activations)
    return [c for layers in counts for c in _candidates_with(ctx, n, bs, activations, kv_home, layers)]


def _device_layer_counts(ctx: _Context, n: int, bs: int, kv_home: str, activations: str) -> list[int]:
    """With the cache away from the device: as fixed, else none, all the device has room for beside a
    whole layer of weights (each layer kept saves its copies every step, and costs room the weights
    could have cached), and half as many."""
    req, cost = ctx.request, ctx.cost
    layers = req.spec.num_layers
    if req.kv_device_layers is not None:
        return [min(req.kv_device_layers, layers - 1)]
    tokens = (req.prompt_tokens, req.new_tokens)
    fixed = cost.fixed_device_bytes(n, bs, *tokens, kv_home=kv_home, activations_home=activations)
    per_layer = n * cost.kv_cache_bytes(bs, *tokens) // layers
    room = ctx.device_budget - fixed - cost.sizes.layer
    most = min(layers - 1, max(0, room // per_layer)) if per_layer else 0
    return sorted({0, most // 2, most})


def _candidates_with(
    ctx: _Context, n: int, bs: int, activations: str, kv_home: str, device_layers: int
) -> list[Candidate]:
    """Every K at (n, bs) with the activations at ``activations`` and the cache at ``kv_home`` but its
    first ``device_layers`` layers."""
    req, cost = ctx.request, ctx.cost
    tokens = (req.prompt_tokens, req.new_tokens)
    fixed = cost.fixed_device_bytes(
        n, bs, *tokens, kv_home=kv_home, activations_home=activations, kv_device_layers=device_layers
    )
    held = []
    if kv_home == HOST_KV:
        at_home = req.spec.num_layers - device_layers
        held.append(("KV cache", _group_kv_bytes(ctx, n, bs) * at_home // req.spec.num_layers))
    if activations == HOST_ACTIVATIONS:
        held.append(("activations", n * cost.residual_bytes(bs, req.prompt_tokens)))
    if held:  # the cache and residuals take their room in host RAM: the weights get the rest
        in_ram = sum(nbytes for _, nbytes in held)
        ctx = dataclasses.replace(ctx, host_budget=ctx.host_budget - in_ram, host_held=tuple(held))
    placement = placement_for(
        cost, fixed, ctx.device_budget, ctx.host_budget, req.host_preload, req.compression_ratio,
        req.disk_queue_depth,
    )  # fmt: skip
    shape = StepShape.decode(cost, n, bs, req.prompt_tokens + req.new_tokens // 2)
    placement = dataclasses.replace(
        placement, kv_home=kv_home, activations_home=activations, kv_device_layers=device_layers
    )
    loads = ctx.routing.loads(shape.tokens)
    window = window_of(placement, req.stream_window)
    in_use = device_window_bytes(cost, window, req.spec.top_k + max(load.distinct_max() for load in loads))
    eviction, misses = _eviction(req.eviction, cost, loads, ctx.device_budget - fixed - in_use)
    placement = dataclasses.replace(placement, expert_reuse=1.0 - misses[1], eviction=eviction)
    if req.lookahead_layers is not None:
        placement = dataclasses.replace(placement, lookahead_layers=req.lookahead_layers)
    disk = _disk_misses(ctx, placement, eviction, loads, ctx.device_budget - fixed - in_use)
    io = io_times(cost, placement, req.compression_ratio, steady=True, misses=misses, disk_misses=disk)
    _, drive = _step_bytes(ctx, loads, placement, disk or misses)
    device_kept = max(0, min(cost.sizes.total, ctx.device_budget - fixed))  # weights the device keeps
    unheld = _unheld(placement, touched_bytes(cost, loads), device_kept + ctx.host_budget)
    options = [(shape, placement)]
    if kv_home != DEVICE_KV:
        options = _kv_attention(ctx, shape, placement, req.prompt_tokens + req.new_tokens // 2)
    tried = [_candidate(ctx, sh, k, pl, io, fixed) for sh, pl in options for k in _hot_counts(ctx)]
    copies = 0.0
    if (
        activations == HOST_ACTIVATIONS
    ):  # five a batch and layer: in and out of attention and combine, in to gate
        copies = 5 * req.spec.num_layers * cost.residual_copy_s(bs, req.prompt_tokens) / (bs * req.new_tokens)
    return [
        dataclasses.replace(c, drive_bytes=drive, unheld_bytes=unheld, prefill_copy_s_per_token=copies)
        for c in tried
    ]


def _kv_home(ctx: _Context, n: int, bs: int, activations: str = DEVICE_ACTIVATIONS) -> str | None:
    """Where the KV cache of n batches of bs lives (:func:`kv_home_for`); None when nowhere fits."""
    req = ctx.request
    tokens, budgets = (req.prompt_tokens, req.new_tokens), (ctx.device_budget, ctx.host_budget)
    requested = req.kv_home or (HOST_KV if req.kv_attention == HOST_ATTENTION else None)
    return kv_home_for(ctx.cost, n, bs, tokens, budgets, requested, activations)


def _kv_attention(
    ctx: _Context, shape: StepShape, placement: Placement, context: int
) -> list[tuple[StepShape, Placement]]:
    """With the KV cache away from the device: the ways decode attention may run, each priced per batch.

    On the device, a batch's cache of a layer streams into a slot while the batch before computes, so
    the slower of its attention and its copies sets the pace; those copies share the weights' channel
    where the weights come over the same link (from host RAM) or the cache comes from the drive. On the
    host's cores (a CUDA device with the cache in host RAM, where the machine's rate is known), the
    device projects and the host attends, each batch's attention beside the next one's projections.
    Both are offered to the search (its step model weighs the channel they share), unless fixed."""
    cost, req, bs = ctx.cost, ctx.request, shape.batch_size
    copy = cost.kv_copy_s(bs, context, placement.kv_home)
    shares = placement.kv_home == DISK_KV or placement.home == "host"
    away = 1.0 - placement.kv_device_layers / req.spec.num_layers  # layers whose cache is at home
    shape = dataclasses.replace(shape, kv_share=away, in_place_s=shape.attention_s)
    streamed = dataclasses.replace(shape, kv_s=copy, kv_channel_s=copy if shares else 0.0)
    at_home = None
    if placement.kv_home == HOST_KV and cost.machine.device == "cuda":
        at_home = cost.host_attention_s(bs, context)
    if req.kv_attention == HOST_ATTENTION and at_home is None:
        raise ConfigError(no_host_attention(cost.machine.name, cost.machine.device))
    options = [] if req.kv_attention == HOST_ATTENTION else [(streamed, placement)]
    if at_home is not None and req.kv_attention != DEVICE_ATTENTION:
        device_side = cost.projection_s(bs, 1) + cost.rates.job_overhead_s  # projections, then the output
        at_host = dataclasses.replace(shape, attention_s=device_side, kv_s=at_home)
        options.append((at_host, dataclasses.replace(placement, kv_attention=HOST_ATTENTION)))
    return options


def _group_kv_bytes(ctx: _Context, n: int, bs: int) -> int:
    req = ctx.request
    return n * ctx.cost.kv_cache_bytes(bs, req.prompt_tokens, req.new_tokens)


def _unheld(placement: Placement, touched: float, budgets: int) -> int:
    """What the device and host RAM cannot hold of the blocks the steps touch, where blocks come from the
    drive: those bytes beyond the two tiers' budgets for weights (the device's less its KV cache and
    activations), as ``benchmarks/host_tier_check.py`` counts it in the engine. A step reads them, and
    the blocks crossing the tiers' working room (reads in flight, the device's streaming window)."""
    if placement.home != "disk":
        return 0
    return int(max(0.0, touched - budgets))


def _step_bytes(
    ctx: _Context, loads: tuple[LayerLoads, ...], placement: Placement, disk: tuple[float, float]
) -> tuple[int, int]:
    """(bytes of the blocks a decode step uses, of them the bytes expected from the drive): every
    non-expert block and each layer's expected distinct experts; from the drive, each with the chance
    that neither tier kept it (``disk``: of the blocks every step uses, of the experts)."""
    sizes = ctx.cost.sizes
    always = sizes.embed + sizes.head + sizes.num_layers * (sizes.attn + sizes.gate)
    experts = sum(float(load.usage.sum()) for load in loads) * sizes.expert
    if placement.home != "disk":
        return int(always + experts), 0
    return int(always + experts), int(always * disk[0] + experts * disk[1])


def _disk_misses(
    ctx: _Context, placement: Placement, eviction: str, loads: tuple[LayerLoads, ...], device_room: int
) -> tuple[float, float] | None:
    """The chance that a block a step uses is in neither the device nor the host tier, where blocks come
    from the drive through a host tier: the host evicts its copies of device blocks first
    (:meth:`~klotski_tier.core.runtime.ledger.TierLedger.victims`), so the two keep distinct blocks,
    less the host's room for the reads in flight. Modelled with ``sweep`` only, which keeps a prefix of
    the layer cycle in each tier (under LRU a cycle longer than both tiers together still misses every
    block, as the simulator finds). None elsewhere: the device's misses are the drive's."""
    if placement.home != "disk" or placement.into_device or eviction != SWEEP:
        return None
    cost = ctx.cost
    host_room = max(0, ctx.host_budget - _host_in_flight(ctx, placement))
    return _eviction(eviction, cost, loads, device_room + host_room)[1]


def _eviction(
    fixed: str | None, cost: CostModel, loads: tuple[LayerLoads, ...], capacity: int
) -> tuple[str, tuple[float, float]]:
    """The device's eviction policy and its chance of missing a block a step uses (of every block kind,
    of the experts), given ``capacity`` bytes beyond a layer's blocks in use: ``fixed`` when the user
    chose one (any but "sweep" modelled as LRU), else "sweep" where it keeps more than LRU."""
    lru = lru_misses(cost, loads, capacity)
    if fixed is not None and fixed != SWEEP:
        return fixed, lru
    sweep = sweep_misses(cost, loads, capacity, lru)
    if fixed == SWEEP or sweep < lru:
        return SWEEP, sweep
    return LRU, lru


def _candidate(
    ctx: _Context, shape: StepShape, hot: int, placement: Placement, io: Io, fixed: int
) -> Candidate:
    cost, req = ctx.cost, ctx.request
    work = ctx.work_table(shape.tokens).work(hot)
    weights = weights_working_set(cost, placement, hot, work, req.stream_window)
    window = _expert_window(ctx, placement, fixed)
    decode = predict_step(shape, hot, work, io, window)
    kv = shape.batches * cost.kv_cache_bytes(shape.batch_size, req.prompt_tokens, req.new_tokens)
    if placement.kv_home != DEVICE_KV:  # two slots of one layer of one batch, and the first layers kept
        per_batch = cost.kv_cache_bytes(shape.batch_size, req.prompt_tokens, req.new_tokens)
        layers = cost.spec.num_layers
        kv = KV_SLOTS * per_batch // layers + shape.batches * per_batch * placement.kv_device_layers // layers
    total = cost.sizes.total
    parts = {"KV cache": kv, "activations": fixed - kv, "weights": weights}
    device = TierUse(
        "device", fixed + weights, min(fixed + total, ctx.device_budget), ctx.device_budget, parts
    )
    host = _with_held(_host_use(ctx, placement, hot, min(total, ctx.device_budget - fixed)), ctx.host_held)
    found = deadlines(shape, hot, work, io)
    return Candidate(
        shape.batches, shape.batch_size, hot, placement, found, decode, device, host, shape, work, io
    )


def _expert_window(ctx: _Context, placement: Placement, fixed: int) -> int:
    """Experts the device holds at once for a layer: its room, or (streaming) its window's."""
    cost, window = ctx.cost, window_of(placement, ctx.request.stream_window)
    room = (ctx.device_budget - fixed) // cost.sizes.expert
    if placement.device_resident or window == 0:
        return room
    return max(1, min(room, window))


def _host_in_flight(ctx: _Context, placement: Placement) -> int:
    """Bytes of host RAM that blocks on their way from the drive to the device hold at once."""
    window = window_of(placement, ctx.request.stream_window)
    return host_in_flight_bytes(ctx.cost, ctx.request.disk_queue_depth, window)


def _with_held(use: TierUse, held: tuple[tuple[str, int], ...]) -> TierUse:
    """``use`` of a tier whose budget for weights was cut by ``held`` (named bytes), those added back."""
    extra = sum(nbytes for _, nbytes in held)
    if not extra:
        return use
    parts = {**dict(held), **use.parts}
    return dataclasses.replace(
        use,
        needed_bytes=use.needed_bytes + extra,
        peak_bytes=use.peak_bytes + extra,
        budget_bytes=use.budget_bytes + extra,
        parts=parts,
    )


def _host_use(ctx: _Context, placement: Placement, hot: int, device_kept: int) -> TierUse:
    """Host RAM under the plan. From the drive it needs the reads in flight and a copy (each block is
    held from its read until its copy) plus, with a look-ahead, the layer after next's staged blocks;
    beyond those it keeps, up to its budget, blocks the device (``device_kept`` bytes of weights) does
    not hold (it evicts its copies of device-resident blocks first), so a step reads from the drive only
    what neither tier keeps."""
    cost, total, budget = ctx.cost, ctx.cost.sizes.total, ctx.host_budget
    if placement.into_device:
        return TierUse("host", 0, 0, budget, {})
    if placement.home == "host":
        return TierUse("host", total, min(total, budget), budget, {"weights": total})
    in_flight = _host_in_flight(ctx, placement)
    staged = 0
    if placement.lookahead_layers > 1:
        layer = cost.sizes.attn + cost.sizes.gate + hot * cost.sizes.expert  # what a layer ahead stages
        staged = (placement.lookahead_layers - 1) * layer
    kept = max(0, min(budget - in_flight - staged, total - device_kept))
    parts = {"reads in flight": in_flight, "staged ahead": staged, "kept": kept}
    return TierUse("host", in_flight + staged, min(budget, in_flight + staged + kept), budget, parts)


def _choose(tried: list[Candidate]) -> Candidate:
    """Of those that fit (else of all), the ones within NEAR_BEST of the best predicted decode throughput;
    of them the feasible ones when there are any (every load hidden), the smallest n near the best
    (:func:`_near_best`); else the fastest. A feasible plan does not win over one predicted faster
    beyond NEAR_BEST: what the user gets is tokens/s, bubbles or not."""
    fitting = [c for c in tried if c.fits] or tried
    best = max(c.tokens_per_s for c in fitting)
    near = [c for c in fitting if c.tokens_per_s >= NEAR_BEST * best]
    feasible = _feasible(near)
    if feasible:
        return _near_best(feasible)
    return min(near, key=lambda c: (-c.tokens_per_s, c.decode.bubble_s / c.decode.tokens, c.batches))


def _feasible(tried: list[Candidate]) -> list[Candidate]:
    return [c for c in tried if c.fits and c.meets_deadlines]


def _near_best(feasible: list[Candidate]) -> Candidate:
    """The smallest n with a candidate within NEAR_BEST of the best predicted tokens/s; its best K."""
    best = max(c.tokens_per_s for c in feasible)
    n = min(c.batches for c in feasible if c.tokens_per_s >= NEAR_BEST * best)
    return max((c for c in feasible if c.batches == n), key=lambda c: c.tokens_per_s)


def _plan(ctx: _Context, best: Candidate, tried: list[Candidate]) -> Plan:
    req, cost = ctx.request, ctx.cost
    shape = StepShape.prefill(cost, best.batches, best.batch_size, req.prompt_tokens)
    if best.placement.activations_home == HOST_ACTIVATIONS:  # five residual copies a batch and layer
        copies = 5 * cost.residual_copy_s(best.batch_size, req.prompt_tokens)
        shape = dataclasses.replace(shape, kv_channel_s=copies)
    work = ctx.work_table(shape.tokens).work(best.hot_experts)
    fixed = best.device.parts["KV cache"] + best.device.parts["activations"]
    io = io_times(cost, best.placement, req.compression_ratio, steady=False)
    prefill = predict_step(shape, best.hot_experts, work, io, _expert_window(ctx, best.placement, fixed))
    placed = best.placement
    alike = [
        c
        for c in tried
        if c.hot_experts == best.hot_experts
        and (c.placement.kv_attention, c.placement.activations_home)
        == (placed.kv_attention, placed.activations_home)
    ]
    same_k = [  # each n's fastest (of its numbers of cache layers kept on the device)
        max((c for c in alike if c.batches == n), key=lambda c: (c.fits, c.tokens_per_s))
        for n in sorted({c.batches for c in alike})
    ]
    other = [
        c.decode.tokens_per_s
        for c in tried
        if (c.batches, c.hot_experts) == (best.batches, best.hot_experts)
        and c.placement.kv_attention != placed.kv_attention
        and c.placement.activations_home == placed.activations_home
    ]
    if other:  # the plan says what the other place for the attention would give
        choice = (best.decode.tokens_per_s, other[0])
        best = dataclasses.replace(best, placement=dataclasses.replace(best.placement, kv_choice=choice))
    cap = max((c.batches for c in same_k if c.fits), default=best.batches)
    sweep = tuple(
        SweepPoint(c.batches, c.decode.tokens_per_s, c.decode.bubble_s, c.placement.eviction) for c in same_k
    )
    feasible = best.fits and best.meets_deadlines
    return Plan(
        batches=best.batches,
        batch_size=best.batch_size,
        hot_experts=best.hot_experts,
        placement=best.placement,
        deadlines=best.deadlines,
        binding=best.binding,
        feasible=feasible,
        decode=best.decode,
        prefill=prefill,
        memory=(best.device, best.host),
        memory_cap_batches=cap,
        why=_why(ctx, best, cap, _feasible(tried)),
        advice=tuple(_advice(ctx, best, cap, feasible)),
        sweep=sweep,
        drive_bytes=best.drive_bytes,
        unheld_bytes=best.unheld_bytes,
    )


def _why(ctx: _Context, best: Candidate, cap: int, feasible: list[Candidate]) -> str:
    if best.fits and best.meets_deadlines:
        return _why_feasible(best, feasible)
    if best.meets_deadlines:  # loads would hide, but the plan does not fit a budget
        return _why_too_big(best)
    binding = best.binding
    req = ctx.request
    top = _batch_counts(req, best.batch_size).stop - 1
    limit = f"device memory holds the KV cache of at most n={cap}"
    if cap >= top:
        limit = f"{req.sequences} sequences in batches of {best.batch_size} allow n <= {top}"
    return (
        f"no n hides every load ({limit}): deadline ({binding.number}), {binding.meaning}, is missed by "
        f"{-binding.slack_s * 1e3:.2f} ms in layer {binding.layer}; n={best.batches} predicts the most "
        "decode tokens/s"
    )


def _why_too_big(best: Candidate) -> str:
    """Why a plan whose loads would all hide is still no plan: a tier's needs exceed its budget."""
    over = [use for use in (best.device, best.host) if not use.fits]
    needs = "; ".join(
        f"{use.tier} memory needs {format_size(use.needed_bytes)} of a {format_size(use.budget_bytes)} budget"
        for use in over
    )
    return (
        f"no plan fits the budgets: n={best.batches} x bs={best.batch_size} with K={best.hot_experts}, the "
        f"fastest of those tried, does not ({needs}); its loads would hide behind compute"
    )


def _why_feasible(best: Candidate, feasible: list[Candidate]) -> str:
    """Why this n among those that meet every deadline (see :func:`_near_best`), and what it hides."""
    n, resident = best.batches, best.placement.device_resident
    smallest = max((c for c in feasible if c.batches == min(f.batches for f in feasible)), key=_speed)
    fastest = max(feasible, key=_speed)
    faster = _speed_ratio(fastest, best) - 1  # how much faster the fastest feasible candidate is predicted
    nothing_moves = "every weight fits in device memory, so nothing moves after the first step"
    if n == smallest.batches and resident:
        why = f"{nothing_moves}: n={n} is enough"
    elif n == smallest.batches:
        why = f"n={n} is the smallest number of batches whose loads hide behind compute in every layer"
    else:
        best_at = "the best predicted throughput"
        best_at = f"within {1 - NEAR_BEST:.0%} of {best_at}" if faster >= NOTABLE_GAIN else best_at
        why = (
            f"n={n}: {best_at}; n={smallest.batches} meets every deadline too but is predicted "
            f"{1 - _speed_ratio(smallest, best):.0%} slower"
        )
    if faster >= NOTABLE_GAIN:
        why += (
            f"; n={fastest.batches} is predicted only {faster:.1%} faster, not worth "
            f"{fastest.batches / n:.3g}x the KV cache"
        )
    if resident:
        return why if n == smallest.batches else f"{why}; {nothing_moves}"
    binding = best.binding
    return (
        f"{why}; the tightest deadline is ({binding.number}) {binding.meaning}, "
        f"with {binding.slack_s * 1e3:.2f} ms to spare"
    )


def _speed(candidate: Candidate) -> float:
    return candidate.tokens_per_s


def _speed_ratio(candidate: Candidate, base: Candidate) -> float:
    """``candidate``'s predicted tokens/s over ``base``'s; 1 where ``base`` predicts none (a step whose
    compute time overflowed to infinity predicts 0 tokens/s: nothing to compare)."""
    speed = _speed(base)
    return _speed(candidate) / speed if speed > 0 else 1.0


def _advice(ctx: _Context, best: Candidate, cap: int, feasible: bool) -> list[str]:
    """Plain-words changes that would relax the binding deadline."""
    if feasible:
        return []
    advice: list[str] = []
    cost, req, placement = ctx.cost, ctx.request, best.placement
    link = _binding_link(cost, placement, req.compression_ratio)
    link_field = {"drive": "disk_read_gbps", "host-to-device link": "host_to_device_gbps"}.get(link)
    if link_field is not None:
        gbps = getattr(cost.machine, link_field)
        factor = _link_speedup(ctx, best, link_field)
        if math.isfinite(factor):
            advice.append(
                f"a faster {link}: at {gbps * factor:.2f} GB/s instead of {gbps:.2f} every deadline would "
                f"be met with n={best.batches}"
            )
        else:
            advice.append(
                f"a faster {link} alone is not enough: even without its {gbps:.2f} GB/s limit, the other "
                "stages (host-to-device copies, decompression) or the compute of n batches miss a deadline"
            )
    if cap == best.batches and req.batches is None and cap < _batch_counts(req, best.batch_size).stop - 1:
        extra = cost.fixed_device_bytes(1, best.batch_size, req.prompt_tokens, req.new_tokens)
        advice.append(
            f"more device memory: each further batch of {best.batch_size} needs {format_size(extra)} of KV "
            "cache and activations, and more batches share every load"
        )
    if cap >= _batch_counts(req, best.batch_size).stop - 1 and req.batches is None:
        advice.append(
            f"more sequences at once: {req.sequences} in batches of {best.batch_size} make at most "
            f"{best.batches} batches; more batches would share every load"
        )
    if placement.home == "disk":
        missing = format_size(max(cost.sizes.total - ctx.host_budget, 0))
        advice.append(
            f"more host memory: {missing} more holds the whole model in RAM (host.preload), so experts "
            "come over the host link instead of from the drive"
        )
    if placement.home == "disk" and not placement.compressed and link == "drive":
        ratio = req.compression_ratio or TYPICAL_ZSTD_RATIO
        advice.append(
            f"compression: a zstd store (`klotski-tier pack --compress zstd`, ratio ~{ratio:.2f}) reads "
            f"{1 / ratio:.0%} of the bytes from the drive, if the disk threads decode fast enough"
        )
    return advice


def _binding_link(cost: CostModel, placement: Placement, ratio: float | None) -> str:
    """The slowest stage experts pass on their way to the device."""
    ratio = ratio if placement.compressed else None
    expert = cost.transfer(cost.sizes.expert, placement.home, ratio, into_device=placement.into_device)
    if expert.copy_s >= max(expert.disk_s, expert.decode_s / expert.io_threads):
        return "host-to-device link"
    return "drive" if expert.disk_s >= expert.decode_s / expert.io_threads else "decompression"


def _link_speedup(ctx: _Context, best: Candidate, link_field: str) -> float:
    """How many times faster the machine's ``link_field`` link must be for every deadline of ``best``."""
    req, machine = ctx.request, ctx.cost.machine

    def met(factor: float) -> bool:
        faster = dataclasses.replace(machine, **{link_field: getattr(machine, link_field) * factor})
        io = io_times(CostModel(req.spec, faster), best.placement, req.compression_ratio, steady=True)
        return all(
            d.slack_s >= -SLACK_TOLERANCE_S for d in deadlines(best.shape, best.hot_experts, best.work, io)
        )

    return least_factor(met)
