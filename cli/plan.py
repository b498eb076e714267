"""``klotski-tier plan``: the n, bs, K and placement the planner picks for a model, a machine and a
workload, and why.

The model is a checkpoint or packed store (``--model``), a built-in or user shape (``--model-shape``,
``--shapes``), or else the demo (with ``run``'s demo device budget); the machine is ``this`` (the
``klotski-tier bench`` profile), a built-in or a user's hardware (``--hardware``, ``--hardware-file``);
routing comes from a recorded trace (``--trace``) or the parametric model. ``simulate`` takes the
same options: :func:`study_options` adds them, :func:`study_from_flags` turns them into a
:class:`Study`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.params import COMPRESSION_RATIO, NonEmptyPath, count, size, whole
from klotski_tier.cli.plan_report import format_plan, plan_record
from klotski_tier.cli.run import DEMO_DEVICE_MEMORY
from klotski_tier.core.model.spec import ModelSpec
from klotski_tier.core.observe.routing_trace import RoutingTrace
from klotski_tier.core.plan.autoplan import store_ratio
from klotski_tier.core.plan.hardware import load_hardware_file, machine_named
from klotski_tier.core.plan.machine import Machine
from klotski_tier.core.plan.plan_types import MAX_SEQUENCES
from klotski_tier.core.plan.planner import PlanRequest, make_plan
from klotski_tier.core.plan.routing_model import RouteSampler, RoutingModel, TraceRouting
from klotski_tier.core.plan.shapes import load_shapes_file, model_shape
from klotski_tier.core.runtime.config import ACTIVATION_HOMES, KV_ATTENTION, KV_HOMES
from klotski_tier.core.store.files import open_model
from klotski_tier.core.units import parse_size

F = TypeVar("F", bound=Callable[..., Any])

DEMO_NAME = "demo"  # the built-in shape studied when no model is named (as `run` runs the demo)
LOCAL_HARDWARE = "this"

_PATH = NonEmptyPath(path_type=Path, dir_okay=False)
# the planner's own workload defaults, named in the help texts
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(PlanRequest)}
_STUDY_FLAGS = [
    click.option("--model", type=NonEmptyPath(path_type=Path),
                 help="A checkpoint or packed store directory."),
    click.option("--model-shape", help="A built-in or --shapes model shape (see `simulate --list`)."),
    click.option("--hardware", default=LOCAL_HARDWARE, show_default=True,
                 help="A built-in or --hardware-file machine; this: the `klotski-tier bench` profile."),
    click.option("--profile", "profile_path", type=_PATH, help="Machine profile for --hardware this."),
    click.option("--shapes", "shapes_file", type=_PATH, help="A TOML file of [shape.NAME] tables."),
    click.option("--hardware-file", type=_PATH, help="A TOML file of [hardware.NAME] tables."),
    click.option("--device-memory", type=size(), metavar="SIZE",
                 help="Device budget (default: the machine's)."),
    click.option("--host-memory", type=size(), metavar="SIZE",
                 help="Host RAM budget (default: the machine's)."),
    click.option("--prompts", "sequences", metavar="N", type=whole(1, MAX_SEQUENCES),
                 help=f"Sequences to generate (default {_DEFAULTS['sequences']})."),
    click.option("--prompt-tokens", metavar="P", type=whole(min=1),
                 help=f"Tokens per prompt (default {_DEFAULTS['prompt_tokens']})."),
    click.option("--max-new-tokens", metavar="G", type=whole(min=1),
                 help=f"Tokens generated per sequence (default {_DEFAULTS['new_tokens']})."),
    click.option("--batch-size", metavar="BS", type=count("batch_size"),
                 help="Fix bs (sequences per batch)."),
    click.option("--hot-experts", metavar="K", type=whole(min=0),
                 help="Fix K (experts prefetched per layer)."),
    click.option("--trace", "trace_path", type=_PATH, help="Routing trace (npz, from run --record-routing)."),
    click.option("--compression-ratio", type=COMPRESSION_RATIO,
                 help="Blocks may be read from a compressed store of this ratio (raw / stored bytes)."),
    click.option("--kv-home", type=click.Choice(KV_HOMES),
                 help="Fix where the KV cache lives ([kv] home; default: the device where a group's cache "
                 "fits, else host RAM, else the drive, streamed through two device slots)."),
    click.option("--kv-attention", type=click.Choice(KV_ATTENTION),
                 help="Fix where decode attention runs ([kv] attention; default: where the cost model "
                 "predicts more tokens/s: the device, or the host's cores over a cache in host RAM)."),
    click.option("--activations-home", type=click.Choice(ACTIVATION_HOMES),
                 help="Fix where a prefill's residual streams wait between their jobs ([activations] home; "
                 "default: where more tokens/s are predicted)."),
    click.option("--kv-device-layers", metavar="M", type=count("kv_device_layers"),
                 help="Fix how many first layers keep their KV cache on the device while the rest lives away "
                 "([kv] device_layers; default: the planner's)."),
]  # fmt: skip


def study_options(fn: F) -> F:
    """Add the model, machine, budget and workload options to a click command."""
    for flag in reversed(_STUDY_FLAGS):
        fn = flag(fn)
    return fn


@dataclass(frozen=True)
class Study:
    """What to plan or simulate, from the command line."""

    model: str  # the directory, the shape's name, or "demo"
    spec: ModelSpec
    machine: Machine
    sampler: RouteSampler | None  # from --trace; None: the parametric model
    sequences: int | None  # --prompts as given (None: the request's default)
    request: PlanRequest


def study_from_flags(flags: dict[str, Any], **fixed: Any) -> Study:
    """Pop :func:`study_options`' flags; ``fixed`` are further :class:`PlanRequest` fields (e.g. batches)."""
    demo = flags["model"] is None and flags["model_shape"] is None
    model, spec, ratio = _model(flags.pop("model"), flags.pop("model_shape"), flags.pop("shapes_file"))
    hardware_file = flags.pop("hardware_file")
    user_hardware = load_hardware_file(hardware_file) if hardware_file is not None else None
    machine = machine_named(flags.pop("hardware"), flags.pop("profile_path"), user_hardware=user_hardware)
    sampler = _sampler(flags.pop("trace_path"), spec)
    device = _size(flags.pop("device_memory"), "--device-memory")
    if device is None and demo:
        device = parse_size(DEMO_DEVICE_MEMORY)
    given_ratio = flags.pop("compression_ratio")
    ratio = given_ratio or ratio
    given = {
        "sequences": flags.pop("sequences"),
        "prompt_tokens": flags.pop("prompt_tokens"),
        "new_tokens": flags.pop("max_new_tokens"),
        "batch_size": flags.pop("batch_size"),
        "hot_experts": flags.pop("hot_experts"),
        "device_memory_bytes": device,
        "host_memory_bytes": _size(flags.pop("host_memory"), "--host-memory"),
        "compression_ratio": ratio,
        "kv_home": flags.pop("kv_home"),
        "kv_attention": flags.pop("kv_attention"),
        "activations_home": flags.pop("activations_home"),
        "kv_device_layers": flags.pop("kv_device_layers"),
        **fixed,
    }
    routing = RoutingModel(sampler) if sampler is not None else None
    request = PlanRequest(spec, machine, routing, **{k: v for k, v in given.items() if v is not None})
    return Study(model, spec, machine, sampler, given["sequences"], request)


def _model(
    directory: Path | None, shape: str | None, shapes_file: Path | None
) -> tuple[str, ModelSpec, float | None]:
    """(name, spec, compression ratio of a compressed store) of the model the flags name."""
    if directory is not None and shape is not None:
        raise click.UsageError("give --model DIR or --model-shape NAME, not both")  # exit 2, one line
    if directory is not None:
        files = open_model(directory)
        return str(directory), files.spec, store_ratio(files.store)
    user_shapes = load_shapes_file(shapes_file) if shapes_file is not None else None
    name = shape if shape is not None else DEMO_NAME
    return name, model_shape(name, user_shapes), None


def _sampler(path: Path | None, spec: ModelSpec) -> RouteSampler | None:
    if path is None:
        return None
    trace = RoutingTrace.load(path)
    trace.check_model(spec)
    return TraceRouting(trace)


def _size(value: int | str | None, option: str) -> int | None:
    return None if value is None else parse_size(value, what=option)


@click.command("plan")
@study_options
@click.option(
    "--batches", "-n", metavar="N", type=count("batches"), help="Fix n (default: the planner's choice)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@report_errors
def plan(batches: int | None, as_json: bool, **flags: Any) -> None:
    """Choose n, bs, K and placement for a model on a machine, and explain the choice.

    Each deadline (4)-(7) is shown with its two sides and slack, the predicted step split into
    compute and bubbles, throughput, memory per tier against its budget, and what would relax the
    binding deadline. Without --model or --model-shape: the demo model with run's demo budget.
    """
    study = study_from_flags(flags, batches=batches)
    chosen = make_plan(study.request)
    if as_json:
        click.echo(json.dumps(plan_record(chosen, study.request, study.model, study.machine)))
        return
    for line in format_plan(chosen, study.request, study.model, study.machine):
        click.echo(line)
