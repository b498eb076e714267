"""Where the planner puts the KV cache and the decode attention, and what it charges for them.

The issue's workload (Mixtral-8x7B, 960 prompts of 512 tokens, bs 64) on the Klotski evaluation's
RTX 3090 with 256 GiB of RAM: the cache lives in host RAM; streaming it through the device's slots
takes the link the weights come over, so attending over it on the host's cores predicts more tokens/s,
and the simulator (the engine's pipeline on a virtual clock) agrees. A cache host RAM cannot hold goes
to the drive, priced at the drive's rate.
"""

from __future__ import annotations

import dataclasses

import pytest

from klotski_tier.core.errors import ConfigError
from klotski_tier.core.plan.costmodel import CostModel
from klotski_tier.core.plan.hardware import machine_named
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.pipeline_model import Io, StepShape, layer_work, predict_step
from klotski_tier.core.plan.plan_types import PlanRequest
from klotski_tier.core.plan.planner import make_plan
from klotski_tier.core.plan.routing_model import RoutingModel
from klotski_tier.core.plan.shapes import model_shape
from klotski_tier.core.plan.simulate import SimConfig, simulate_workload

GIB = 2**30
SPEC = model_shape("Mixtral-8x7B")
ENV1 = dataclasses.replace(machine_named("rtx3090-sata"), name="env1", host_memory_bytes=256 * GIB)
WORKLOAD = {"sequences": 960, "prompt_tokens": 512, "new_tokens": 32}


def _request(machine: Machine = ENV1, **changes: object) -> PlanRequest:
    fields: dict[str, object] = {**WORKLOAD, "batch_size": 64, "hot_experts": 2, "max_batches": 15}
    fields.update(changes)
    return PlanRequest(SPEC, machine, **fields)  # type: ignore[arg-type]


def test_decode_attention_runs_over_the_cache_in_host_ram_where_that_predicts_more() -> None:
    free = make_plan(_request(hot_experts=None))
    streamed = make_plan(_request(hot_experts=free.hot_experts, kv_attention="device"))
    assert free.placement.kv_home == streamed.placement.kv_home == "host"
    assert free.placement.kv_attention == "host" and streamed.placement.kv_attention == "device"
    assert free.decode_tokens_per_s > 1.1 * streamed.decode_tokens_per_s
    words = free.placement.describe()
    assert "decode attention over it runs there, on the host's cores" in words
    assert f"{free.decode_tokens_per_s:.4g} decode tokens/s predicted, against" in words
    assert free.engine_options()["kv_attention"] == "host"
    assert [p.batches for p in free.sweep] == sorted({p.batches for p in free.sweep})  # one row per n


def test_the_planner_and_the_simulator_agree_on_attention_on_the_host() -> None:
    for attention in ("host", "device"):
        plan = make_plan(_request(batches=8, kv_attention=attention))
        config = SimConfig(
            SPEC, ENV1, batches=8, batch_size=64, hot_experts=2, kv_home="host", kv_attention=attention,
            eviction=plan.placement.eviction,
        )  # fmt: skip
        simulated = simulate_workload(config, **WORKLOAD, max_decode_steps=2).decode_tokens_per_s
        assert simulated == pytest.approx(plan.decode_tokens_per_s, rel=0.15), attention


def test_attention_on_the_host_is_refused_where_it_is_not_priced() -> None:
    with pytest.raises(ConfigError, match="computes on its CPU: its attention already runs on the host"):
        make_plan(_request(dataclasses.replace(ENV1, device="cpu", host_to_device_gbps=None),
                           kv_attention="host"))  # fmt: skip
    unknown = dataclasses.replace(ENV1, host_attention_gbps=None)
    with pytest.raises(ConfigError, match="host_attention_gbps is not known; set it in a hardware file"):
        make_plan(_request(unknown, kv_attention="host"))
    with pytest.raises(ConfigError, match="host_attention_gbps is not known"):
        simulate_workload(
            SimConfig(SPEC, unknown, batches=2, batch_size=4, kv_home="host", kv_attention="host"),
            sequences=8, prompt_tokens=8, new_tokens=2,
        )  # fmt: skip
    assert make_plan(_request(unknown)).placement.kv_attention == "device"  # not priced: not chosen


def test_host_attention_costs_grow_with_the_cache_it_reads() -> None:
    cost = CostModel(SPEC, ENV1)
    short, long = cost.host_attention_s(64, 100), cost.host_attention_s(64, 1000)
    assert short is not None and long is not None
    per_token = SPEC.kv_bytes_per_token() // SPEC.num_layers
    assert long - short == pytest.approx(64 * 900 * per_token / (ENV1.host_attention_gbps * 1e9))  # type: ignore[operator]
    assert CostModel(SPEC, dataclasses.replace(ENV1, host_attention_gbps=None)).host_attention_s(1, 1) is None


def test_a_cache_host_ram_cannot_hold_goes_to_the_drive_priced_at_its_rate() -> None:
    cost = CostModel(SPEC, ENV1)
    moved = 64 * 545 * SPEC.kv_bytes_per_token() // SPEC.num_layers
    assert cost.kv_copy_s(64, 544, "disk") - cost.kv_copy_s(64, 544, "host") == pytest.approx(
        ENV1.disk_seconds(moved)
    )
    small = make_plan(_request(host_memory_bytes=30 * GIB, batches=8))  # 8 batches: 34 GiB of cache
    assert small.placement.kv_home == "disk" and small.placement.kv_attention == "device"
    assert "lives in files on the drive" in small.placement.describe()
    in_ram = make_plan(_request(host_memory_bytes=60 * GIB, batches=8))
    assert small.decode_tokens_per_s < in_ram.decode_tokens_per_s


def test_the_caches_copies_share_the_weights_channel_in_the_step_model() -> None:
    cost = CostModel(SPEC, ENV1)
    shape = StepShape.decode(cost, 8, 64, 528)
    routing = RoutingModel.default_for(SPEC)
    work = layer_work(routing.loads(shape.tokens), 2, cost)
    io = Io(attn=0.01, gate=0.001, expert=0.014, embed=0.0, head=0.0)
    copy = cost.kv_copy_s(64, 528)
    apart = predict_step(dataclasses.replace(shape, kv_s=copy), 2, work, io, window=8)
    shared = predict_step(dataclasses.replace(shape, kv_s=copy, kv_channel_s=copy), 2, work, io, window=8)
    assert shared.step_s > apart.step_s
    assert shared.io_busy_s == pytest.approx(apart.io_busy_s + SPEC.num_layers * 8 * copy, rel=1e-6)


def test_a_prefills_residuals_leave_the_device_where_that_buys_more_batches() -> None:
    """Prompts of 2048 tokens and 256 generated: a prefill's residual streams of 64 sequences take
    1 GiB a batch on the device; in host RAM (two device slots) more batches fit and decode faster,
    worth their copies in prefill; the plan says so, counts them in host RAM, and the simulator agrees."""
    request = _request(prompt_tokens=2048, new_tokens=256, hot_experts=None)
    free = make_plan(request)
    on_device = make_plan(dataclasses.replace(request, activations_home="device"))
    assert free.placement.activations_home == "host" and on_device.placement.activations_home == "device"
    assert free.batches > on_device.batches
    assert free.decode_tokens_per_s > 1.05 * on_device.decode_tokens_per_s
    assert "a prefill's residual streams wait in host RAM" in free.placement.describe()
    residuals = free.batches * 64 * 2048 * SPEC.hidden_size * SPEC.dtype.itemsize
    assert free.memory[1].parts["activations"] == residuals
    assert free.engine_options()["activations_home"] == "host"
    config = SimConfig(
        SPEC, ENV1, batches=free.batches, batch_size=64, hot_experts=free.hot_experts,
        kv_home=free.placement.kv_home, kv_attention=free.placement.kv_attention, activations_home="host",
        kv_device_layers=free.placement.kv_device_layers, eviction=free.placement.eviction,
    )  # fmt: skip
    simulated = simulate_workload(config, sequences=free.batches * 64, prompt_tokens=2048, new_tokens=256,
                                  max_decode_steps=2)  # fmt: skip
    assert simulated.decode_tokens_per_s == pytest.approx(free.decode_tokens_per_s, rel=0.15)
    assert simulated.prefill.peak_device_bytes <= ENV1.device_memory_bytes


def test_a_prefills_residuals_stay_on_the_device_where_their_copies_cost_more_than_they_buy() -> None:
    """The same prompts with 32 tokens generated: the prefill's copies would cost each generated token
    more than the larger group saves."""
    plan = make_plan(_request(prompt_tokens=2048, hot_experts=None))
    assert plan.placement.activations_home == "device"


def test_residuals_stay_on_the_device_where_leaving_it_buys_nothing() -> None:
    plan = make_plan(_request(batches=2))  # two batches: room to spare on the device
    assert plan.placement.activations_home == "device"


def test_the_first_layers_cache_stays_on_the_device_where_there_is_room_for_it() -> None:
    """The issue's group: beside two slots and the activations the device has room for a few layers'
    cache of all 15 batches; those layers need no copies and no host attention, and the plan keeps them
    there where that predicts more tokens/s; the simulator runs the same placement."""
    request = _request(hot_experts=None)
    free = make_plan(request)
    streamed = make_plan(dataclasses.replace(request, kv_device_layers=0))
    layers = free.placement.kv_device_layers
    assert 0 < layers < SPEC.num_layers and streamed.placement.kv_device_layers == 0
    assert free.decode_tokens_per_s > streamed.decode_tokens_per_s
    kept = "layer" if layers == 1 else f"{layers} layers"
    assert f"the KV cache of the first {kept} stays on the device" in free.placement.describe()
    per_layer = free.batches * 64 * (512 + 32) * SPEC.kv_bytes_per_token() // SPEC.num_layers
    slots = 2 * per_layer // free.batches
    assert free.memory[0].parts["KV cache"] == slots + layers * per_layer
    assert free.memory[1].parts["KV cache"] == (SPEC.num_layers - layers) * per_layer
    assert free.memory[0].fits and free.engine_options()["kv_device_layers"] == layers
    config = SimConfig(
        SPEC, ENV1, batches=free.batches, batch_size=64, hot_experts=free.hot_experts,
        kv_home=free.placement.kv_home, kv_attention=free.placement.kv_attention,
        activations_home=free.placement.activations_home, kv_device_layers=layers,
        eviction=free.placement.eviction,
    )  # fmt: skip
    simulated = simulate_workload(config, **WORKLOAD, max_decode_steps=2)
    assert simulated.decode_tokens_per_s == pytest.approx(free.decode_tokens_per_s, rel=0.15)
    assert simulated.decode.peak_device_bytes <= ENV1.device_memory_bytes
