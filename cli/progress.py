"""Progress on stderr for long work: the demo build, reading and measuring many prompts, generation steps."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import click

MIB = 1024 * 1024
LONG_PASS_ITEMS = 100_000
"""A pass over fewer items (prompts read, prompts measured) takes about a second at most: no progress line."""


@contextmanager
def bytes_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done_bytes, total_bytes)`` callback drawing a bar on stderr while it is called."""
    bars: list[Any] = []  # the bar, once the total is known
    shown = [0]  # MiB drawn so far

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(click.progressbar(length=max(total // MIB, 1), label=label, file=sys.stderr))
            bars[0].__enter__()
        bars[0].update(done // MIB - shown[0])
        shown[0] = done // MIB

    try:
        yield update
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


@contextmanager
def items_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A ``progress(done_items, total_items)`` callback drawing a bar on stderr, for a pass of at least
    :data:`LONG_PASS_ITEMS` items only: a short one stays silent."""
    bars: list[Any] = []  # the bar, once a long total is known
    shown = [0]  # items drawn so far

    def update(done: int, total: int) -> None:
        if not bars and total >= LONG_PASS_ITEMS:
            bars.append(click.progressbar(length=total, label=label, file=sys.stderr))
            bars[0].__enter__()
        if bars:
            bars[0].update(done - shown[0])
            shown[0] = done

    try:
        yield update
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


class StepProgress:
    """A ``progress(phase, done, total)`` callback: one status line on stderr, redrawn in place."""

    def __init__(self) -> None:
        self._shown = False
        self._tty = sys.stderr.isatty()
        self._group = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == "prefill":
            self._group += 1
        line = f"group {self._group}: {phase} step {done}/{total}"
        if self._tty:
            click.echo(f"\r{line}\033[K", nl=False, err=True)
            self._shown = True
        elif phase == "prefill" or done == total:
            click.echo(line, err=True)

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._shown:
            click.echo("", err=True)
