"""``klotski-tier config show``: the effective configuration, as TOML."""

from __future__ import annotations

from typing import Any

import click

from klotski_tier.cli.errors import OneLineUsageGroup, report_errors
from klotski_tier.cli.options import engine_flags, options_from_flags
from klotski_tier.core.memory import read_memory_limit
from klotski_tier.core.runtime.budgets import auto_note
from klotski_tier.core.runtime.config import AUTO, to_toml
from klotski_tier.core.runtime.run import check_plugins


@click.group(cls=OneLineUsageGroup)
def config() -> None:
    """Inspect configurations."""


@config.command()
@engine_flags
@report_errors
def show(**flags: Any) -> None:
    """Print the configuration that these flags (preset, file, overrides) give, as TOML; where a memory
    budget is "auto", say what it would be derived from."""
    options = options_from_flags(flags)
    check_plugins(options)  # what a run would refuse, show refuses too
    click.echo(to_toml(options), nl=False)
    if options.device_memory_bytes is None or options.host_memory_bytes is None:
        click.echo(f'# "{AUTO}" {auto_note(options, read_memory_limit())}')
