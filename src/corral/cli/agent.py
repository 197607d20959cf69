"""``corral agent``: the node agent of a data directory (``corral serve`` starts it).

It owns the tasks of this machine: a restart of the server leaves them running, and a
new server takes them over. It ends its tasks and exits when the server stops for
good, on SIGTERM or SIGINT, or when no server has connected for the lease (fencing).
Its tasks end with it, however it ends (the kernel kills them if it is killed).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click

from corral.backends.agent import DEFAULT_LEASE, MAX_LEASE, MIN_LEASE, Agent, marker, socket_path
from corral.backends.local import LocalBackend
from corral.cli.hardening import private_process
from corral.cli.run import Seconds, data_option
from corral.control.plane import install_child_watcher
from corral.store.lock import DataDirInUse, DataLock


@click.command("agent")
@data_option
@click.option(
    "--lease", type=Seconds(MIN_LEASE, MAX_LEASE), default=DEFAULT_LEASE, show_default=True,
    metavar="SECONDS",
    help="End every task when no server has spoken for this long (a server sets its own).",
)  # fmt: skip
def agent(data: str, lease: float) -> None:
    """Run the node agent of a data directory (`corral serve` starts it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    private_process()
    try:
        DataLock(data, "corral agent", name="agent.lock").acquire()
    except DataDirInUse as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(asyncio.run(_agent(data, lease)))


async def _agent(data: str, lease: float) -> int:
    install_child_watcher()
    backend = LocalBackend(die_with_me=True, marker=marker(data))
    a = Agent(backend, socket_path(data), lease=lease)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, a.stop)
    logging.getLogger("corral.agent").info("agent %s serving %s", sys.argv[0], data)
    await a.serve()
    return 0
