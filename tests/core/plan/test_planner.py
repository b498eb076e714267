"""The planner on synthetic machines where the answer is known by hand, and the routing model it uses."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from klotski_tier.core.bench.suite import demo_spec
from klotski_tier.core.errors import BudgetError, ConfigError
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.routing_trace import RoutingTrace, TraceMeta
from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.machine import ComputeRates, Machine
from klotski_tier.core.plan.planner import (
    NEAR_BEST,
    Io,
    LayerWork,
    Plan,
    PlanRequest,
    StepShape,
    deadlines,
    layer_work,
    make_plan,
    predict_step,
    speedup_to_meet,
)
from klotski_tier.core.plan.routing_model import (
    HotPredictor,
    ParametricRouting,
    RoutingModel,
    TableRouting,
    TraceRouting,
)
from klotski_tier.policies.correlation import CorrelationPrefetch

MIB, GIB = 2**20, 2**30
SPEC = dataclasses.replace(demo_spec(), num_layers=4)  # the demo's widths, 4 layers: 175 MiB
RATES = ComputeRates(flops_per_s=1.5e10, weight_bytes_per_s=1.5e10, job_overhead_s=3e-4)
# Compute linear in tokens: no per-job cost and weights read from device memory for free, so more
# batches share nothing but loads (with RATES, n batches also share each expert job's fixed cost).
LINEAR_RATES = ComputeRates(flops_per_s=1.5e10, weight_bytes_per_s=1e18, job_overhead_s=0.0)


def _machine(disk_gbps: float = 1.0, link_gbps: float = 5.0, rates: ComputeRates = RATES) -> Machine:
    return Machine("test", "test", "cuda", 8 * GIB, 16 * GIB, disk_gbps, link_gbps, rates, 0.6, 4)


def _routing(spec: ModelSpec = SPEC) -> RoutingModel:
    return RoutingModel(ParametricRouting.for_spec(spec, seed=1), draws=4, seed=1)


ROUTING = _routing()


def _plan(**changes: object) -> Plan:
    fields: dict[str, object] = {"spec": SPEC, "machine": _machine(), "routing": ROUTING, "sequences": 64}
    fields.update(prompt_tokens=16, new_tokens=16)
    fields.update(changes)
    return make_plan(PlanRequest(**fields))


def _streaming(disk_gbps: float, **changes: object) -> Plan:
    """Weights on the drive (the host holds a quarter), a device budget that streams the layers."""
    fields: dict[str, object] = {
        "device_memory_bytes": 96 * MIB,
        "host_memory_bytes": 48 * MIB,
        "batch_size": 4,
    }
    fields["machine"] = _machine(disk_gbps)
    fields.update(changes)
    return _plan(**fields)


# ---- answers known by hand ---------------------------------------------------------------------------


def test_a_model_that_fits_in_device_memory_needs_one_batch() -> None:
    plan = _plan(batch_size=4, machine=_machine(rates=LINEAR_RATES))
    assert plan.placement.device_resident and plan.feasible
    assert plan.batches == 1 and plan.decode.bubble_s == 0.0
    assert "nothing moves" in plan.why and plan.advice == ()


def test_free_io_needs_one_batch_even_when_streaming() -> None:
    plan = _streaming(1e6, machine=_machine(1e6, 1e6, LINEAR_RATES))
    assert not plan.placement.device_resident and plan.placement.home == "disk"
    assert plan.batches == 1 and plan.feasible


def test_a_very_slow_drive_is_capped_by_device_memory_and_says_so() -> None:
    cost = CostModel(SPEC, _machine())
    six = cost.fixed_device_bytes(6, 8, 128, 128)  # KV cache and activations of 6 batches of 8
    budget = 20 * MIB + six  # little left at any n to keep a step's experts for the next
    plan = _streaming(0.01, batch_size=8, device_memory_bytes=budget, prompt_tokens=128, new_tokens=128,
                      kv_home="device")  # fmt: skip
    assert not plan.feasible and plan.binding.slack_s < 0 and plan.placement.expert_reuse < 0.1
    assert plan.batches == plan.memory_cap_batches < 8  # more batches would not fit their KV cache
    assert "device memory" in plan.why and f"missed by {-plan.binding.slack_s * 1e3:.2f} ms" in plan.why
    words = " ".join(plan.advice)
    for hint in ("faster drive", "more device memory", "more host memory", "compression"):
        assert hint in words
    device = plan.memory[0]
    assert device.fits and device.peak_bytes <= device.budget_bytes


def test_loads_that_would_hide_but_do_not_fit_say_so() -> None:
    plan = _streaming(100.0, device_memory_bytes=16 * MIB)  # a drive fast enough for every deadline
    assert not plan.feasible and not plan.memory[0].fits
    assert plan.why.startswith("no plan fits the budgets") and "of a 16.00 MiB budget" in plan.why
    assert "missed by" not in plan.why


def test_room_for_a_steps_experts_keeps_them_for_the_next() -> None:
    """With few tokens a step uses few experts; LRU keeps them when the device has room for a step."""
    tight, roomy = (
        _streaming(0.05, batches=1, device_memory_bytes=mib * MIB, eviction="lru") for mib in (64, 160)
    )
    assert tight.placement.expert_reuse == 0.0 < roomy.placement.expert_reuse < 1.0
    assert roomy.decode_tokens_per_s > 2 * tight.decode_tokens_per_s
    assert tight.engine_options()["eviction"] == "lru"


def test_sweep_eviction_keeps_a_share_where_lru_keeps_nothing() -> None:
    """Less room than a step touches: LRU re-reads every block each step, sweep keeps the room's worth,
    so the planner chooses it, predicts more tokens/s, and the share grows with the budget."""
    lru = _streaming(0.05, batches=1, device_memory_bytes=64 * MIB, eviction="lru")
    sweep = _streaming(0.05, batches=1, device_memory_bytes=64 * MIB)
    more = _streaming(0.05, batches=1, device_memory_bytes=80 * MIB)
    assert sweep.engine_options()["eviction"] == "sweep" and sweep.placement.eviction == "sweep"
    assert lru.placement.expert_reuse == 0.0 < sweep.placement.expert_reuse < more.placement.expert_reuse
    assert sweep.decode_tokens_per_s > lru.decode_tokens_per_s
    assert "stay in device memory" in sweep.placement.describe()


def test_a_resident_model_keeps_lru() -> None:
    """Nothing is evicted when every weight fits: the plan leaves the engine's default policy."""
    plan = _streaming(0.05, device_memory_bytes=4096 * MIB, host_memory_bytes=4096 * MIB)
    assert plan.placement.device_resident and plan.engine_options()["eviction"] == "lru"


def test_deadlines_by_hand() -> None:
    shape = StepShape(2, 4, 8, attention_s=1.0, gate_s=0.5, gather_s=0.25, combine_s=0.1, embed_s=0, head_s=0)
    work = (LayerWork(hot_s=2.0, cold=3.0, cold_s=3.0, distinct_max=5),)
    io = Io(attn=1.0, gate=0.5, expert=0.8, embed=0.0, head=0.0)
    found = {d.number: d for d in deadlines(shape, 2, work, io)}
    assert (found[4].compute_s, found[4].io_s) == (2.0, 0.5)  # n*tA >= tIO_G
    assert found[5].compute_s == pytest.approx(3.25) and found[5].io_s == pytest.approx(0.5 + 2 * 0.8)
    # (6): cold loads start after the hot ones (2.1) and after the first gate (2.5): the later
    assert found[6].compute_s == pytest.approx(5.25) and found[6].io_s == pytest.approx(2.5 + 0.8)
    # (7): the last of 3 cold loads is in at 2.5 + 2.4, then its compute (1.0) and two combines (0.2)
    assert found[7].compute_s == pytest.approx(8.45) and found[7].io_s == pytest.approx(2.5 + 2.4 + 1.2)
    assert all(d.slack_s > 0 for d in found.values())
    step = predict_step(shape, 2, work, io, window=100)
    assert step.bubble_s == pytest.approx(0.0) and step.compute_s == pytest.approx(8.45)


def test_a_missed_deadline_shows_as_bubbles() -> None:
    shape = StepShape(1, 4, 4, attention_s=1.0, gate_s=0.5, gather_s=0.0, combine_s=0.0, embed_s=0, head_s=0)
    work = (LayerWork(hot_s=1.0, cold=2.0, cold_s=2.0, distinct_max=4),) * 2
    io = Io(attn=1.0, gate=0.0, expert=3.0, embed=0.0, head=0.0)
    found = {d.number: d for d in deadlines(shape, 2, work, io)}
    assert found[5].slack_s == pytest.approx(1.5 - 6.0)
    assert speedup_to_meet(shape, 2, work, io) == pytest.approx(
        6.0 / 1.5, rel=1e-3
    )  # (5): 6 s of loads in 1.5
    step = predict_step(shape, 2, work, io, window=100)
    assert step.inter_layer_s > 0 and step.step_s > step.compute_s


# ---- which feasible n: the smallest near the best predicted throughput ---------------------------


def _feasible_speeds(disk_gbps: float, machine: Machine, **changes: object) -> dict[int, float]:
    """Predicted decode tokens/s of each n that meets every deadline within the budgets (its best such K
    and placement): what the planner weighs (64 sequences in batches of 4: n up to 16)."""
    from klotski_tier.core.plan import planner

    speeds = {}
    for n in range(1, 17):
        plan = _streaming(disk_gbps, machine=machine, batches=n, **changes)  # the request's own fields
        request = dataclasses.replace(plan_request(disk_gbps, machine, **changes), batches=n)
        tried = planner._candidates(planner._context(request), n, plan.batch_size)
        feasible = [c.decode.tokens_per_s for c in tried if c.fits and c.meets_deadlines]
        if feasible:
            speeds[n] = max(feasible)
    return speeds


def plan_request(disk_gbps: float, machine: Machine, **changes: object) -> PlanRequest:
    """The request :func:`_streaming` plans."""
    fields: dict[str, object] = {"spec": SPEC, "machine": machine, "routing": ROUTING, "sequences": 64}
    fields.update(prompt_tokens=16, new_tokens=16, device_memory_bytes=96 * MIB, host_memory_bytes=48 * MIB)
    fields.update(batch_size=4)
    fields.update(changes)
    return PlanRequest(**fields)  # type: ignore[arg-type]


def test_throughput_rising_with_n_buys_more_batches_than_the_smallest_feasible() -> None:
    """Per-job costs (RATES) are shared by the n * bs tokens of a group: more n, more tokens/s."""
    machine = _machine(8.0)
    speeds = _feasible_speeds(8.0, machine)
    plan = _streaming(8.0, machine=machine)
    near = [n for n, speed in speeds.items() if speed >= NEAR_BEST * max(speeds.values())]
    assert plan.feasible and plan.batches == min(near) > min(speeds)
    assert plan.batches < max(speeds, key=lambda n: speeds[n])  # a few percent do not buy more KV cache
    assert f"n={min(speeds)} meets every deadline too but is predicted" in plan.why
    assert "faster, not worth" in plan.why


def test_flat_throughput_keeps_the_smallest_feasible_n() -> None:
    """Compute linear in tokens: once the loads hide, more batches add KV cache and nothing else. (No
    streaming window: with one, a layer's loads queue behind releases and more tokens per expert hide
    more of them, so throughput keeps rising with n.)"""
    machine = _machine(2.0, rates=LINEAR_RATES)
    speeds = _feasible_speeds(2.0, machine, stream_window=0)
    plan = _streaming(2.0, machine=machine, stream_window=0)
    assert plan.feasible and 1 < plan.batches == min(speeds)
    assert max(speeds.values()) < plan.decode_tokens_per_s / NEAR_BEST
    assert plan.why.startswith(f"n={plan.batches} is the smallest number of batches whose loads hide")
    assert "faster" not in plan.why


def test_device_resident_weights_with_per_job_costs_take_more_batches_and_say_why() -> None:
    plan = _plan(batch_size=4)  # RATES: each expert job costs the same for 4 tokens or 40
    assert plan.placement.device_resident and plan.feasible and plan.batches > 1
    speeds = [point.decode_tokens_per_s for point in plan.sweep]
    assert plan.decode_tokens_per_s >= NEAR_BEST * max(speeds) > speeds[0]
    assert plan.why.startswith(f"n={plan.batches}: ") and "n=1 meets every deadline too" in plan.why
    assert plan.why.endswith("nothing moves after the first step")


# ---- properties ------------------------------------------------------------------------------------


SPEEDS_GBPS = (0.02, 0.1, 0.3, 0.6, 1.0, 2.0, 8.0, 100.0)


def test_a_faster_drive_never_raises_n() -> None:
    chosen = [_streaming(gbps).batches for gbps in SPEEDS_GBPS]
    assert chosen == sorted(chosen, reverse=True), chosen
    assert chosen[0] > chosen[-1]


def test_with_bs_open_a_faster_drive_never_lowers_the_predicted_throughput() -> None:
    plans = [_streaming(gbps, batch_size=None) for gbps in SPEEDS_GBPS[::2]]
    speeds = [plan.decode_tokens_per_s for plan in plans]
    assert all(faster >= slower * (1 - 1e-12) for slower, faster in itertools.pairwise(speeds)), speeds


@pytest.mark.parametrize(
    ("device_mib", "host_mib"), [(64, 32), (80, 48), (128, 256), (200, 64), (4096, 4096), (70, 1024)]
)
def test_the_chosen_plan_stays_within_its_budgets(device_mib: int, host_mib: int) -> None:
    plan = _streaming(0.5, device_memory_bytes=device_mib * MIB, host_memory_bytes=host_mib * MIB)
    device, host = plan.memory
    assert device.peak_bytes <= device.budget_bytes == device_mib * MIB
    assert host.peak_bytes <= host.budget_bytes == host_mib * MIB
    assert device.fits  # some n fits its whole working set at every budget of this list
    assert (
        device.parts["KV cache"] + device.parts["activations"] + device.parts["weights"]
        == device.needed_bytes
    )


def test_impossible_budgets_are_budget_errors() -> None:
    with pytest.raises(BudgetError, match=r"device memory budget .* below the minimum") as device:
        _streaming(1.0, device_memory_bytes=2 * MIB)
    with pytest.raises(BudgetError, match="host memory budget") as host:
        _streaming(1.0, host_memory_bytes=1 * MIB)
    with pytest.raises(BudgetError, match="host preload needs the whole model"):
        _streaming(1.0, host_preload=True)
    assert "\n" not in str(device.value) + str(host.value)


def test_expert_compute_grows_with_the_tokens_routed() -> None:
    cost = CostModel(SPEC, _machine())
    totals = []
    for tokens in (4, 16, 64, 256):
        work = layer_work(ROUTING.loads(tokens), SPEC.top_k, cost)
        totals.append(sum(w.hot_s + w.cold_s for w in work))
    assert totals == sorted(totals) and totals[-1] > 3 * totals[0]
    assert totals[-1] / 256 < totals[0] / 4  # but less per token: more tokens share each expert


def test_overrides_are_kept_and_the_plan_is_json() -> None:
    plan = _streaming(0.5, batches=3, batch_size=2, hot_experts=1)
    assert (plan.batches, plan.batch_size, plan.hot_experts) == (3, 2, 1)
    assert plan.engine_options() == {
        "batches": 3, "batch_size": 2, "hot_experts": 1, "host_preload": False, "eviction": "sweep",
        "lookahead_layers": plan.placement.lookahead_layers,
        "kv_home": "device", "kv_attention": "device", "activations_home": "device", "kv_device_layers": 0,
    }  # fmt: skip
    data = json.loads(json.dumps(plan.to_dict()))
    assert [d["number"] for d in data["deadlines"]] == [4, 5, 6, 7]
    assert data["decode"]["tokens"] == 6 and data["memory"][0]["tier"] == "device"


def test_compression_is_used_when_it_relieves_the_drive() -> None:
    slow = _streaming(0.2, compression_ratio=1.5)
    assert slow.placement.compressed  # the drive is slower than four threads decoding
    fast = _streaming(50.0, compression_ratio=1.5)
    assert not fast.placement.compressed  # decoding at 4 x 0.6 GB/s would be the bottleneck


# ---- the routing model ---------------------------------------------------------------------------


def test_uniform_routing_activates_the_expected_number_of_experts() -> None:
    model = RoutingModel(ParametricRouting(2, 8, 2, skew=0.0, correlation=0.0), draws=64)
    for tokens in (1, 2, 4, 16):
        expected = 8 * (1 - (1 - 2 / 8) ** tokens)  # each token misses a given expert with prob. 6/8
        assert model.distinct(tokens) == pytest.approx(expected, rel=0.08)


def test_skew_concentrates_tokens_on_the_hot_experts() -> None:
    flat = RoutingModel(ParametricRouting(4, 8, 2, skew=0.0, correlation=0.0), draws=16)
    skewed = RoutingModel(ParametricRouting(4, 8, 2, skew=2.0, correlation=0.0), draws=16)
    assert skewed.hot_share(64, 2) > flat.hot_share(64, 2) + 0.2
    assert skewed.distinct(8) < flat.distinct(8)


def test_a_trace_routes_as_recorded() -> None:
    meta = TraceMeta("mixtral", 2, 4, 2, 32, 1024)
    steps = (np.tile(np.array([[0, 1]], dtype=np.int16), (2, 10, 1)),)  # every token picks 0 and 1
    model = RoutingModel(TraceRouting(RoutingTrace(meta, steps)), draws=4)
    assert model.distinct(50) == 2.0 and model.hot_share(50, 2) == 1.0 and model.hot_share(50, 1) == 0.5


def test_a_correlation_table_routes_through_its_pairs() -> None:
    policy = CorrelationPrefetch()
    for _ in range(20):  # every token goes 0 -> 3 and 1 -> 2 between layers 0 and 1
        policy.begin_step(0)
        policy.observe(0, [[0, 1]])
        policy.observe(1, [[3, 2]])
    routes = TableRouting(policy.state(), 2, 4, 2).sample(200, np.random.default_rng(0))
    assert set(np.unique(routes[0])) == {0, 1} and set(np.unique(routes[1])) == {2, 3}


def test_the_predictor_matches_the_correlation_policy() -> None:
    rng = np.random.default_rng(3)
    routes = ParametricRouting(3, 8, 2, skew=1.0, correlation=0.6).sample(40, rng)
    predictor, policy = HotPredictor(3, 8), CorrelationPrefetch()
    policy.begin_step(0)
    for layer in range(3):
        policy.observe(layer, routes[layer].tolist())
        predictor.observe_layer(layer, routes[layer], routes[layer - 1] if layer else None)
    fresh = ParametricRouting(3, 8, 2, skew=1.0, correlation=0.6).sample(6, rng)
    for layer in range(3):
        previous = fresh[layer - 1] if layer else None
        expected = policy.predict(layer, 3, previous.tolist() if previous is not None else None)
        assert predictor.predict(layer, 3, previous) == expected


def test_a_cpu_device_without_host_budget_reads_straight_into_device_memory() -> None:
    """As the engine: no host staging, so no BudgetError for a host budget of 0, and no copy to pay."""
    cpu = dataclasses.replace(_machine(), device="cpu", host_to_device_gbps=0.5)  # a copy would dominate
    plan = _streaming(1.0, machine=cpu, host_memory_bytes=0)
    assert plan.placement.into_device and plan.placement.home == "disk"
    assert plan.memory[1].needed_bytes == 0 and "straight into device memory" in plan.placement.describe()
    staged = _streaming(1.0, machine=cpu, host_memory_bytes=48 * MIB, batches=plan.batches)
    assert not staged.placement.into_device
    assert plan.decode_tokens_per_s > staged.decode_tokens_per_s  # the slow copy is gone


def test_the_plan_says_what_a_decode_step_reads_from_the_drive_and_what_ram_and_device_cannot_hold() -> None:
    streaming = _streaming(0.5)
    assert streaming.placement.home == "disk"
    assert 0 < streaming.unheld_bytes <= streaming.drive_bytes  # the drive brings at least what nobody kept
    assert streaming.drive_bytes <= _streaming(0.5, host_memory_bytes=12 * MIB).drive_bytes  # less RAM, more
    in_ram = _plan(device_memory_bytes=96 * MIB, host_memory_bytes=1 << 40)  # the whole model in RAM
    assert in_ram.placement.home == "host" and in_ram.drive_bytes == 0 and in_ram.unheld_bytes == 0


def test_the_streaming_window_is_planned_only_where_blocks_come_from_the_drive() -> None:
    """As the engine: with the whole model in host RAM there is no window, so its size changes nothing;
    streaming from a slow drive, a narrow window keeps more across steps: fewer bytes, a faster step."""
    in_ram = dict(device_memory_bytes=96 * MIB, host_memory_bytes=1 << 40, batch_size=4, batches=2)
    narrow, wide = _plan(**in_ram, stream_window=1), _plan(**in_ram, stream_window=0)
    assert narrow.placement.home == "host" and narrow.decode == wide.decode
    streaming = {"batches": 2, "hot_experts": 2}
    windowed, open_ = (
        _streaming(0.5, stream_window=1, **streaming),
        _streaming(0.5, stream_window=0, **streaming),
    )
    assert windowed.drive_bytes < open_.drive_bytes and windowed.decode.step_s < open_.decode.step_s


def test_a_group_whose_kv_cache_the_device_cannot_hold_keeps_it_in_host_ram() -> None:
    """Mixtral-8x7B, 960 prompts of 512 tokens at bs 64 on an RTX 3090 with 256 GiB of RAM: on the device
    the cache caps the group at 4 batches; in host RAM (two device slots) the plan takes more, and says
    where the cache lives; a fixed home is kept."""
    from klotski_tier.core.plan.hardware import machine_named
    from klotski_tier.core.plan.shapes import model_shape

    machine = dataclasses.replace(machine_named("rtx3090-sata"), host_memory_bytes=256 * 2**30)
    request = PlanRequest(
        model_shape("Mixtral-8x7B"), machine, sequences=960, prompt_tokens=512, new_tokens=32, batch_size=64,
        hot_experts=2, max_batches=15,
    )  # fmt: skip
    free = make_plan(request)
    on_device = make_plan(dataclasses.replace(request, kv_home="device"))
    assert on_device.placement.kv_home == "device" and on_device.batches <= 4
    assert free.placement.kv_home == "host" and free.batches > 4
    assert free.decode_tokens_per_s > on_device.decode_tokens_per_s
    assert "lives in host RAM" in free.placement.describe()
    assert free.engine_options()["kv_home"] == "host"
    device_kv = free.memory[0].parts["KV cache"]
    kept = free.placement.kv_device_layers  # the first layers' cache, kept on the device
    assert device_kv == (2 + kept * free.batches) * 64 * (512 + 32) * free_kv_bytes_per_token_layer()


def free_kv_bytes_per_token_layer() -> int:
    from klotski_tier.core.plan.shapes import model_shape

    spec = model_shape("Mixtral-8x7B")
    return spec.kv_bytes_per_token() // spec.num_layers


def test_a_machine_whose_compute_predicts_zero_tokens_per_s_still_plans() -> None:
    """A step whose compute time overflows to infinity predicts 0 tokens/s; the reasons compare speeds
    without dividing by it."""
    glacial = ComputeRates(flops_per_s=1e-300, weight_bytes_per_s=1e-300, job_overhead_s=1e308)
    with np.errstate(over="ignore", invalid="ignore"):
        plan = _plan(machine=_machine(rates=glacial), sequences=8)
    assert plan.decode.tokens_per_s == 0 and "\n" not in plan.why


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"compression_ratio": 1e-308}, r"ratio 1e-308 is not a compressed store.s ratio .* 0.5..100"),
        ({"compression_ratio": float("nan")}, r"compression ratio nan is not a compressed store's ratio"),
        ({"compression_ratio": 1e6}, r"give one in 0.5..100"),
        ({"batch_size": 2**64 + 1}, r"plan: batch_size must be an integer in 1..65536"),
        ({"batches": 100_000}, r"plan: batches must be an integer in 1..4096, got 100000"),
        ({"sequences": 2**64 + 1}, r"plan: sequences must be an integer in 1..268435456"),
        ({"prompt_tokens": 2**64 + 1}, r"needs 18446744073709551649 positions but the model.s context"),
        ({"prompt_tokens": 2000, "new_tokens": 49}, r"lower --prompt-tokens or --max-new-tokens$"),
    ],
)  # fmt: skip
def test_a_request_out_of_range_is_one_line_before_planning(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        PlanRequest(SPEC, _machine(), **changes)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)
    PlanRequest(SPEC, _machine(), prompt_tokens=2000, new_tokens=48, compression_ratio=100.0)  # the limits
