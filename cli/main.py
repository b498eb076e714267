"""The ``klotski-tier`` command: thin click commands that parse, call the library and print.

Every :class:`~klotski_tier.core.errors.KlotskiError` becomes one line on stderr and exit
code 1, with no traceback; every usage mistake (a bad option value, a missing argument, an unknown
option or command) one line ``error: ... (see 'klotski-tier CMD --help')`` and exit code 2
(:class:`OneLineUsageGroup`); SIGINT and SIGTERM stop a command cleanly with exit code 130 and 143
(:mod:`klotski_tier.cli.errors`), from the first line the console script runs
(:mod:`klotski_tier.cli.entry`).
"""

from __future__ import annotations

import logging
import sys

import click

from klotski_tier.cli.bench import bench
from klotski_tier.cli.config_cmd import config
from klotski_tier.cli.errors import OneLineUsageGroup, report_errors
from klotski_tier.cli.pack import pack, verify
from klotski_tier.cli.plan import plan
from klotski_tier.cli.replay import replay
from klotski_tier.cli.run import run
from klotski_tier.cli.simulate import simulate
from klotski_tier.cli.trace import trace

__all__ = ["main", "report_errors"]


@click.group("klotski-tier", cls=OneLineUsageGroup)
@click.version_option(package_name="klotski-tier")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug) on stderr.")
def main(verbose: int) -> None:
    """klotski-tier: run Mixture-of-Experts models larger than device memory."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


main.add_command(run)
main.add_command(config)
main.add_command(replay)
main.add_command(trace)
main.add_command(pack)
main.add_command(verify)
main.add_command(bench)
main.add_command(plan)
main.add_command(simulate)
