"""Output files of the CLI: named by :data:`OUTPUT`, checked before any work, saved without losing a run.

The rule of what may be written and how lives in :mod:`klotski_tier.core.atomic`; this module gives
the commands its click type and :func:`save_all`, which tries every output at the end of a command
and says, in one line, what failed and what was saved.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any

import click

from klotski_tier.core import atomic
from klotski_tier.core.atomic import Inputs, atomic_open, output_path
from klotski_tier.core.demo.build import demo_model_path
from klotski_tier.core.errors import InputError, KlotskiError

__all__ = [
    "OUTPUT",
    "Inputs",
    "OutputPath",
    "Save",
    "atomic_write",
    "check_outputs",
    "keep_out_of_the_demo",
    "record_saved",
    "save_all",
    "saved_outputs",
]

Save = tuple[str, Path, Callable[[], None]]
"""One output to write at the end: its label (the option), its path, and the call that writes it."""


class OutputPath(click.ParamType):  # type: ignore[type-arg]
    """A file to write: a path that does not end in ``/``."""

    name = "file"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        if isinstance(value, Path):
            return value
        try:
            return output_path(str(value))
        except InputError as exc:
            self.fail(str(exc), param, ctx)


OUTPUT = OutputPath()


def check_outputs(
    targets: Mapping[str, Path | None],
    inputs: Inputs | None = None,
    *,
    directories: Collection[str] = (),
    updates: Mapping[str, str] | None = None,
) -> None:
    """:func:`klotski_tier.core.atomic.check_outputs`, and no output inside the built-in demo model's
    directory, whatever the command (:func:`keep_out_of_the_demo`)."""
    atomic.check_outputs(targets, inputs, directories=directories, updates=updates)
    keep_out_of_the_demo(targets)


def keep_out_of_the_demo(targets: Mapping[str, Path | None]) -> None:
    """Refuse an output inside the demo model's directory in the cache: a command that does not read the
    demo (``trace --png``, ``simulate --png``, ``pack``) would still destroy it for the next ``run``."""
    demo = Path(os.path.realpath(demo_model_path()))
    for label, path in targets.items():
        if path is not None and atomic.lies_within(path, demo):
            raise InputError(
                f"{label} {path} is inside the built-in demo model {demo}, which klotski-tier keeps in "
                "its cache; write it somewhere else"
            )


def atomic_write(path: Path) -> AbstractContextManager[IO[Any]]:
    """Write the text file ``path`` (see :mod:`klotski_tier.core.atomic`)."""
    return atomic_open(path, what="output")


_SAVED: list[str] = []
"""The outputs the running command has saved (``--output out.jsonl``), for its last line."""


def saved_outputs() -> list[str]:
    """The outputs saved so far by the running command, as ``LABEL PATH``."""
    return list(_SAVED)


def record_saved(label: str, path: Path) -> None:
    """Note that the running command saved its output ``label`` at ``path`` (:func:`save_all` does)."""
    _SAVED.append(f"{label} {path}")


def reset_saved() -> None:
    """Forget the outputs saved (a new command starts)."""
    _SAVED.clear()


def save_all(saves: Sequence[Save]) -> None:
    """Run every save, each whatever the others did; when any failed, one :class:`InputError` that
    names each failure (with what was kept instead, if the save said so) and what was saved."""
    failures: list[str] = []
    saved: list[str] = []
    for label, path, save in saves:
        try:
            save()
        except KlotskiError as exc:
            failures.append(str(exc))
        else:
            saved.append(f"{label} {path}")
            record_saved(label, path)
    if failures:
        kept = f"saved {', '.join(saved)}" if saved else "nothing else was saved"
        raise InputError("; ".join([*failures, kept]))
