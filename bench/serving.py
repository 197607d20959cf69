"""A real `corral serve` on the simulated farm, in a child process, for the benchmarks
that drive it through its API."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def sim_server(
    tmp: str, nodes: int, workflows: str, *extra: str
) -> AsyncIterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """Start it (data and log in ``tmp``), wait until it serves; yield its URL, its
    admin token and its process; stop it (SIGINT) at the end."""
    log = open(os.path.join(tmp, "server.log"), "w+")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "corral", "serve", "--data", os.path.join(tmp, "data"),
         "--listen", "127.0.0.1:0", "--backend", "sim", "--sim-nodes", str(nodes),
         "--workflows", workflows, *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        url = token = ""
        for _ in range(600):
            log.seek(0)
            text = log.read()
            m = re.search(r"serving on (http://[\d.:]+)", text)
            t = re.search(r"keep it\): (\S+)", text)
            if m and t:
                url, token = m.group(1), t.group(1)
                break
            if server.poll() is not None:
                raise SystemExit(f"the server ended: {text}")
            await asyncio.sleep(0.05)
        if not url:
            raise SystemExit("the server did not start within 30 s")
        yield url, token, server
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(120)
        log.close()
