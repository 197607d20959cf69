"""Benchmark (a): N real Python tasks through DEPLOY -> CONFIGURE -> START_ACTIVITY.

Printed beside the limit measured in the same run: spawn the same number of children
of the same interpreter running the same program, wait for each one's hello, and make
one JSON round trip with each (no corral involved: Popen, a socketpair each, one
selector). Target: corral <= 1.25 x that limit.

    python bench/local_transitions.py 200 1000
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from corral.backends.local import LocalBackend
from corral.control.plane import ControlPlane, install_child_watcher
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand

PROGRAM = r"""
import json, os, socket, sys
s = socket.socket(fileno=int(os.environ["CORRAL_CONTROL_FD"]))
s.sendall(b'{"state":"STANDBY"}\n')
answers = {"CONFIGURE": "CONFIGURED", "START": "RUNNING", "STOP": "CONFIGURED",
           "RESET": "STANDBY", "EXIT": "DONE"}
for line in s.makefile("rb"):
    m = json.loads(line)
    s.sendall((json.dumps({"id": m["id"], "state": answers[m["transition"]]}) + "\n").encode())
    if m["transition"] == "EXIT":
        sys.exit(0)
"""

WORKFLOW = """
name: bench
roles:
  - name: t-{{ i }}
    for: {begin: "1", end: "{{ n }}", var: i}
    task: {load: minimal}
"""
CLASS = """
name: minimal
control: {mode: direct}
command:
  value: "{{ python }}"
  arguments: ["{{ program }}"]
"""


def limit(n: int, program: str) -> float:
    """Spawn n children, wait for every hello, one JSON round trip each."""
    t0 = time.perf_counter()
    sel = selectors.DefaultSelector()
    procs = []
    socks = []
    for _ in range(n):
        ours, theirs = socket.socketpair()
        env = dict(os.environ, CORRAL_CONTROL_FD=str(theirs.fileno()))
        p = subprocess.Popen(
            [sys.executable, program],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        theirs.close()
        procs.append(p)
        socks.append(ours)
        sel.register(ours, selectors.EVENT_READ)
    lines = {s: 0 for s in socks}

    def collect(want: int) -> None:
        while any(v < want for v in lines.values()):
            for key, _ in sel.select(30):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                lines[sock] += sock.recv(65536).count(b"\n")

    collect(1)  # hellos
    msg = json.dumps({"id": 1, "transition": "CONFIGURE", "args": {}}).encode() + b"\n"
    for s in socks:
        s.sendall(msg)
    collect(2)
    took = time.perf_counter() - t0
    for s in socks:
        s.close()
    for p in procs:
        p.wait()
    return took


async def corral(n: int, program: str, data: str) -> tuple[float, dict[str, float]]:
    install_child_watcher()
    files = {"wf.yaml": WORKFLOW, "tasks/minimal.yaml": CLASS}
    plan = expand(
        "wf.yaml",
        DictSources(files),
        variables={"n": str(n)},
        global_defaults={"python": sys.executable, "program": program},
    )
    store = SqliteStore(os.path.join(data, "corral.db"))
    backend = LocalBackend()
    plane = ControlPlane(store, backend, log_dir=None)
    env = plane.create(plan)
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
        t = time.perf_counter()
        await env.transition(event)
        steps[event] = time.perf_counter() - t
    took = time.perf_counter() - t0
    assert env.counts() == {"RUNNING": n}, env.counts()
    await plane.close()
    store.close()
    return took, steps


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [200, 1000]
    with tempfile.TemporaryDirectory() as tmp:
        program = str(Path(tmp) / "minimal_task.py")
        Path(program).write_text(PROGRAM)
        print(f"python {sys.version.split()[0]} on {os.cpu_count()} cpus")
        for n in sizes:
            # the limit is measured before and after corral; the faster one counts
            before = limit(n, program)
            took, steps = asyncio.run(corral(n, program, os.path.join(tmp, f"d{n}")))
            base = min(before, limit(n, program))
            detail = " ".join(f"{k}={v:.2f}s" for k, v in steps.items())
            print(
                f"{n:>5} tasks: corral {took:.2f} s ({detail}); "
                f"limit {base:.2f} s; ratio {took / base:.2f} (target <= 1.25)"
            )


if __name__ == "__main__":
    main()
