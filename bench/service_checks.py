"""Benchmark: the cost of an idle service's health checks, for 1,000 replicas.

A service of N replicas (``/bin/sleep``: the replicas themselves cost nothing to watch),
each with an http health check on its own placed port, every 10 s (the default). One
helper process (not the control process) answers HTTP on every one of those ports.
Once every replica is healthy, the control process's own cpu time is measured over an
idle window: what the checks (and everything else the plane does while idle) cost.
Target: < 1% of a core.

    python bench/service_checks.py [REPLICAS] [WINDOW_SECONDS] [INTERVAL]

Run twice in one go: replicas whose servers keep connections open (HTTP/1.1: a check
reuses its replica's connection), then servers that close each one (a new connection
per check).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.backends.local import LocalBackend
from corral.control.plane import ControlPlane, install_child_watcher
from corral.jobs.spec import ServiceSpec, load_job
from corral.model.inventory import Node
from corral.store.sqlite import SqliteStore

FIRST_PORT = 24000

ANSWERER = r"""
import asyncio, sys
first, n = int(sys.argv[1]), int(sys.argv[2])
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CLOSE = sys.argv[3] == "close"
if CLOSE:
    ANSWER = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
class P(asyncio.Protocol):  # HTTP/1.1 keeps the connection open, as most servers do
    def connection_made(self, t):
        self.t = t
    def data_received(self, data):
        if b"\r\n\r\n" in data:
            self.t.write(ANSWER)
            if CLOSE:
                self.t.close()
async def main():
    loop = asyncio.get_running_loop()
    for p in range(first, first + n):
        await loop.create_server(P, "127.0.0.1", p, backlog=64)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main(n: int, window: float, interval: float, mode: str = "keep-alive") -> None:
    install_child_watcher()
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    answerer = subprocess.Popen(
        [sys.executable, "-c", ANSWERER, str(FIRST_PORT), str(n), mode], stdout=subprocess.PIPE
    )
    assert answerer.stdout is not None
    assert answerer.stdout.readline().strip() == b"ready"
    store = SqliteStore(str(tmp / "corral.db"))
    node = Node("n1", cpu=n, memory=10_000_000, ports=(FIRST_PORT, FIRST_PORT + n - 1))
    plane = ControlPlane(store, LocalBackend(), inventory=[node], log_dir=str(tmp / "logs"))
    text = (f"kind: service\nname: idle\nreplicas: {n}\nwants: {{cpu: 0.5, ports: 1}}\n"
            "command: {value: /bin/sleep, arguments: ['3600']}\n"
            f"health: {{http: {{path: /healthz}}, interval: {interval}s, timeout: 1s}}\n"
            )  # fmt: skip
    spec, diags = load_job("idle.yaml", text)
    assert not diags and isinstance(spec, ServiceSpec), diags
    sup = plane.services
    t0 = time.monotonic()
    sup.deploy(spec, text=text, workdir=str(tmp), owner="bench")
    deadline = t0 + 600
    while len(sup.endpoints("idle")) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(sup.endpoints('idle'))} of {n} healthy after 600 s")
        await asyncio.sleep(0.2)
    up = time.monotonic() - t0
    await asyncio.sleep(interval)  # let the start-up work settle
    c0, w0, k0 = cpu(), time.monotonic(), sup.checks_made
    await asyncio.sleep(window)
    c1, w1, k1 = cpu(), time.monotonic(), sup.checks_made
    share = (c1 - c0) / (w1 - w0)
    checks = k1 - k0
    print(f"[{mode}] {n} replicas healthy after {up:.1f} s; idle window {w1 - w0:.1f} s")
    print(f"health checks made: {checks} ({checks / (w1 - w0):.1f}/s, every {interval:g} s "
          "per replica)")  # fmt: skip
    print(
        f"control process cpu: {c1 - c0:.3f} s = {share * 100:.2f}% of a core "
        f"(target < 1%); {1e6 * (c1 - c0) / max(1, checks):.0f} us per check"
    )
    await plane.close()
    store.close()
    answerer.kill()
    answerer.wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    n = int(args[0]) if args else 1000
    window = float(args[1]) if len(args) > 1 else 60.0
    interval = float(args[2]) if len(args) > 2 else 10.0
    os.environ.setdefault("PYTHONHASHSEED", "0")
    # servers that keep connections open (HTTP/1.1, most of them), then servers that
    # close each one (HTTP/1.0): a new connection per check
    for mode in ("keep-alive", "close"):
        asyncio.run(main(n, window, interval, mode))
