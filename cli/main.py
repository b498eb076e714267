"""The ``klotski-tier`` command: thin click commands that parse, call the library and print.

Every :class:`~klotski_tier.core.errors.KlotskiError` becomes one line on stderr and exit
code 1, with no traceback; usage mistakes are click's (exit code 2).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click

from klotski_tier.cli.progress import StepProgress, bytes_progress
from klotski_tier.cli.prompts import gather_prompts
from klotski_tier.cli.report import format_metrics, format_outputs, output_record, result_record
from klotski_tier.core.demo import demo_model_dir, demo_prompts
from klotski_tier.core.engine import Engine, EngineOptions
from klotski_tier.core.errors import InputError, KlotskiError
from klotski_tier.core.sizes import parse_size

DEMO_DEVICE_MEMORY = "128MiB"
"""Device budget of the demo run: a fraction of the demo model, so experts must stream."""

T = TypeVar("T")


def report_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn the library's errors into one line on stderr and exit code 1."""

    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except KlotskiError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@click.group()
@click.version_option(package_name="klotski-tier")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) on stderr.")
def main(verbose: int) -> None:
    """klotski-tier: run Mixture-of-Experts models larger than device memory."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
@click.option(
    "--model", type=click.Path(path_type=Path), help="Hugging Face model directory (default: demo)."
)
@click.option("--prompt", "texts", multiple=True, help="A text prompt (repeatable).")
@click.option(
    "--prompts",
    "files",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A file of prompts: one per line, or JSONL (.jsonl) with a prompt or prompt_ids field.",
)
@click.option(
    "--prompt-ids", "id_lists", multiple=True, help='Token ids of a prompt, e.g. "1,2,3" (repeatable).'
)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batches",
    "-n",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Batches in a group sharing every loaded weight (Klotski's n).",
)
@click.option(
    "--batch-size", default=4, show_default=True, type=click.IntRange(min=1), help="Sequences per batch (bs)."
)
@click.option(
    "--device-memory",
    "device_text",
    metavar="SIZE",
    help=f"Device budget, e.g. 2GiB (default: unlimited; {DEMO_DEVICE_MEMORY} for the demo).",
)
@click.option(
    "--host-memory", "host_text", metavar="SIZE", help="Host RAM budget, e.g. 8GiB (default: unlimited)."
)
@click.option(
    "--hot-experts", type=click.IntRange(min=0), help="Experts prefetched per layer (default: top-k)."
)
@click.option("--device", help="cpu, cuda or cuda:N (default: cuda when present).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0), help="0 is greedy."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with outputs and metrics.")
@click.option(
    "--output", type=click.Path(path_type=Path), help="Write one JSON line per prompt to this file."
)
@report_errors
def run(
    model: Path | None,
    texts: tuple[str, ...],
    files: tuple[Path, ...],
    id_lists: tuple[str, ...],
    max_new_tokens: int,
    batches: int,
    batch_size: int,
    device_text: str | None,
    host_text: str | None,
    hot_experts: int | None,
    device: str | None,
    seed: int,
    temperature: float,
    as_json: bool,
    output: Path | None,
) -> None:
    """Generate with the Klotski pipeline under memory budgets."""
    device_memory = _optional_size(device_text, "--device-memory")
    host_memory = _optional_size(host_text, "--host-memory")
    if output is not None:
        check_writable(output)
    prompts = gather_prompts(texts, files, id_lists)
    if model is None:
        with bytes_progress("building demo model") as progress:
            model = demo_model_dir(progress=progress)
        if device_memory is None:
            device_memory = parse_size(DEMO_DEVICE_MEMORY)
        prompts = prompts or list(demo_prompts())
    if not prompts:
        raise InputError("no prompt given; use --prompt, --prompts or --prompt-ids")
    options = EngineOptions(
        batches=batches,
        batch_size=batch_size,
        device_memory_bytes=device_memory,
        host_memory_bytes=host_memory,
        hot_experts=hot_experts,
        device=device,
    )
    engine = Engine.load(model, options)
    with StepProgress() as progress:
        result = engine.generate(
            prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, progress=progress
        )
    if output is not None:
        with atomic_write(output) as handle:
            for index, out in enumerate(result.outputs):
                handle.write(json.dumps(output_record(index, out)) + "\n")
    if as_json:
        click.echo(json.dumps(result_record(result)))
        return
    for line in [*format_outputs(result), "", *format_metrics(result.metrics)]:
        click.echo(line)


def _optional_size(text: str | None, option: str) -> int | None:
    """Bytes of a size option, parsed here so a bad value is our one-line error, not click's usage."""
    return None if text is None else parse_size(text, what=option)


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output path whose directory is missing or that is a directory."""
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"--output {path} is a directory; name a file to write")
    if not directory.is_dir():
        raise InputError(f"--output {path}: directory {directory} does not exist; create it first")
    if not os.access(directory, os.W_OK):
        raise InputError(f"--output {path}: directory {directory} is not writable")


@contextmanager
def atomic_write(path: Path) -> Iterator[Any]:
    """Write ``path`` through a temporary file renamed into place; nothing is left on failure."""
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
        try:
            os.replace(temp, path)
        except OSError as exc:
            raise InputError(f"cannot write {path}: {exc.strerror}") from exc
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
