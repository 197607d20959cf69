"""Benchmark: does a viewer's render of a big plan stall the server's event loop?

A real `corral serve` (simulated farm); one client renders a workflow of N tasks
(`POST /api/workflows/render`), another asks `GET /api/whoami` back to back meanwhile.
Prints the render's duration and the slowest whoami answer (each timed from when it
was sent, which is when it was due: the next is sent when the previous is answered),
and their ratio: the loop is free when the slowest answer is a small part of the render
(before the fix, the plan was turned into JSON on the loop: 150,000 tasks held every
request ~1.5 s; 1,000,000 tasks 11 s).

    python bench/render_stall.py [--tasks 150000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving import sim_server

MANY = """
name: many
defaults:
  workers: !public {value: "4", type: number}
roles:
  - name: "proc-{{ i }}"
    for: {begin: "1", end: "{{ workers }}", var: i}
    task: {load: worker}
"""
WORKER = """
name: worker
control: {mode: basic}
command: {value: /bin/sleep, arguments: ["600"], env: ["WORKER_ID={{ i }}"]}
"""


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=150_000)
    args = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {os.cpu_count()} cpus")
    with tempfile.TemporaryDirectory() as tmp:
        wf = os.path.join(tmp, "workflows")
        os.makedirs(os.path.join(wf, "tasks"))
        with open(os.path.join(wf, "many.yaml"), "w") as fh:
            fh.write(MANY)
        with open(os.path.join(wf, "tasks", "worker.yaml"), "w") as fh:
            fh.write(WORKER)
        async with sim_server(tmp, 10, wf) as (url, token, _):
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
                done = asyncio.Event()
                worst, polls = 0.0, 0

                async def poll() -> None:
                    nonlocal worst, polls
                    while not done.is_set():
                        t0 = time.perf_counter()
                        r = await c.get("/api/whoami")
                        assert r.status_code == 200
                        worst = max(worst, time.perf_counter() - t0)
                        polls += 1

                poller = asyncio.create_task(poll())
                t0 = time.perf_counter()
                r = await c.post(
                    "/api/workflows/render",
                    json={"workflow": "many", "vars": {"workers": str(args.tasks)}},
                )
                took = time.perf_counter() - t0
                done.set()
                await poller
                assert r.status_code == 200, r.text[:300]
                size = len(r.content)
    print(
        f"render of {args.tasks} tasks: {took:.2f} s, {size / 1e6:.0f} MB of JSON; "
        f"meanwhile {polls} whoami, the slowest {worst * 1000:.0f} ms "
        f"({worst / took:.1%} of the render)"
    )


if __name__ == "__main__":
    asyncio.run(main())
