"""``corral``: the command line. Thin: it parses arguments and prints; work is elsewhere.

Exit codes scripts can rely on: 0 success, 1 the input is wrong (template errors),
2 the command line is wrong (click's usage errors).
"""

from __future__ import annotations

import click

from corral import __version__
from corral.cli.agent import agent
from corral.cli.client import env, lock, node, task, token_group
from corral.cli.config import config
from corral.cli.flow import flow
from corral.cli.job import job
from corral.cli.jobs_client import catalog, service
from corral.cli.run import events, run
from corral.cli.secret import secret
from corral.cli.serve import serve
from corral.cli.template import template


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="corral")
def cli() -> None:
    """corral: one control system for an experiment's computing farm."""


cli.add_command(template)
cli.add_command(run)
cli.add_command(events)
cli.add_command(serve)
cli.add_command(agent)
cli.add_command(job)
cli.add_command(flow)
cli.add_command(secret)
for group in (env, task, token_group, lock, node, config, service, catalog):
    cli.add_command(group)


def main() -> None:
    cli()


if __name__ == "__main__":  # pragma: no cover
    main()
