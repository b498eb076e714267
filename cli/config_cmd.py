"""``klotski-tier config show``: the effective configuration, as TOML."""

from __future__ import annotations

from typing import Any

import click

from klotski_tier.cli.errors import report_errors
from klotski_tier.cli.options import engine_flags, options_from_flags
from klotski_tier.core.runtime.config import to_toml


@click.group()
def config() -> None:
    """Inspect configurations."""


@config.command()
@engine_flags
@report_errors
def show(**flags: Any) -> None:
    """Print the configuration that these flags (preset, file, overrides) give, as TOML."""
    click.echo(to_toml(options_from_flags(flags)), nl=False)
