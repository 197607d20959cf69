"""``corral``: the command line. Thin: it parses arguments and prints; work is elsewhere.

Exit codes scripts can rely on: 0 success, 1 the input is wrong (template errors),
2 the command line is wrong (click's usage errors).

Each command's module is imported when that command runs, not before: ``corral
--version`` imports none, ``corral env list`` the client alone (no FastAPI, Rich, CEL
or control plane), ``corral run`` what runs an environment. ``corral --help`` lists the
commands from the one-line summaries below, importing none of them (a test checks
that each summary is its command's own).
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from corral import __version__
from corral.cli.options import no_gc

# name: (the modules that define it, in the order to import them; its summary)
COMMANDS: dict[str, tuple[tuple[str, ...], str]] = {
    "template": (("corral.cli.template",), "Check and show workflow templates."),
    "run": (("corral.cli.run",), "Run the workflow at PATH on this machine until Ctrl-C."),
    "events": (("corral.cli.run",), "Print the events, oldest first: from a server (--server "
               "or CORRAL_SERVER), or from the store in --data."),
    "logs": (("corral.cli.logs",), "Print the logs of an environment's tasks (-f: and what "
             "they write next), from a server or from --data."),
    "serve": (("corral.cli.serve",),
              "Run the control server: the HTTP API, the controller and the store."),
    "agent": (("corral.cli.agent",),
              "Run the node agent of a data directory (`corral serve` starts it)."),
    # `corral job`'s commands are in three modules: job.py defines the group
    "job": (("corral.cli.job", "corral.cli.flow", "corral.cli.jobs_client"),
            "Services, batch jobs, DAGs and periodic jobs: check, run, follow (docs/jobs.md)."),
    "flow": (("corral.cli.flow",),
             "Run DAG workflows: Makeflow files unchanged, or dag job files (docs/jobs.md)."),
    "secret": (("corral.cli.secret",),
               "Secrets for jobs: stored encrypted, never shown (docs/secrets.md)."),
    "env": (("corral.cli.client",), "Environments on a control server."),
    "task": (("corral.cli.client",), "Tasks on a control server."),
    "token": (("corral.cli.client",), "Access tokens (admin)."),
    "lock": (("corral.cli.client",), "Detector locks."),
    "node": (("corral.cli.client",), "Nodes: capacity, allocation and labels."),
    "config": (("corral.cli.config",),
               "Configuration payloads: versioned, rendered with Jinja2 (docs/config.md)."),
    "service": (("corral.cli.jobs_client",), "Services on a control server: deploy with "
                "`corral job run NAME`; list, scale, remove."),
    "catalog": (("corral.cli.jobs_client",),
                "The healthy endpoints of every service (or of the service NAME)."),
}  # fmt: skip
ATTRIBUTE = {"token": "token_group"}  # the command's object, where not its name


class LazyGroup(click.Group):
    """A group whose commands are imported when one is run (or its help is asked)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is not None or cmd_name not in COMMANDS:
            return found
        modules, _ = COMMANDS[cmd_name]
        with no_gc():
            for name in modules:
                importlib.import_module(name)
        command = getattr(importlib.import_module(modules[0]), ATTRIBUTE.get(cmd_name, cmd_name))
        assert isinstance(command, click.Command)
        self.add_command(command, cmd_name)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands and their summaries, without importing them."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        rows = [(name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit))
                for name in sorted(COMMANDS)]  # fmt: skip
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="corral")
def cli() -> None:
    """corral: one control system for an experiment's computing farm."""


def main() -> None:
    """``corral``: as click runs it, but Ctrl-C before a command handles it itself (while
    it starts, or in a prompt) ends with one line and exit status 130, not click's
    "Aborted!" and 1."""
    try:
        code = cli.main(standalone_mode=False)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as e:  # a bug, or an answer nothing expected: one line, not a trace
        if os.environ.get("CORRAL_DEBUG"):
            raise
        sys.stderr.write(f"error: {type(e).__name__}: {str(e)[:500]} (CORRAL_DEBUG=1 shows "
                         "where; please report it)\n")  # fmt: skip
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
