"""The CLI's error boundary: the library's errors become one line on stderr and exit code 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from klotski_tier.core.errors import KlotskiError

T = TypeVar("T")


def report_errors(fn: Callable[..., T]) -> Callable[..., T]:
    """Turn :class:`KlotskiError` raised by ``fn`` into ``error: ...`` on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except KlotskiError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)

    return wrapper
