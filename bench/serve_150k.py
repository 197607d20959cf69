"""(e) 150,500 tasks through `corral serve` and its API, driven as a user drives them,
beside the in-process figure (b) of ``bench/agents_150k.py`` measured in the same run.

The server is a real `corral serve` in a child process (SQLite store in a temporary
directory, the ``sim`` backend with 350 nodes, 2 ms on every node call, as in (b)).
This process subscribes to the event stream (Server-Sent Events), then creates the
environment (the server expands the template: 150,500 tasks), and asks DEPLOY,
CONFIGURE and START_ACTIVITY, each answered when done. The figure is the time from
the create request to the moment the subscriber has received the end of
START_ACTIVITY: every event of the way went through the stream.

Target: <= 1.5 x (b). The template's expansion is part of a user's create but not of
(b) (whose plan is expanded beforehand): it is measured here too, in this process, and
printed, so that the ratio can be read both ways.

    python bench/serve_150k.py [NODES] [TASKS_PER_NODE]
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agents_150k import LATENCY, create_to_running, farm
from corral.templates import DictSources, expand
from serving import sim_server

DONE = re.compile(
    rb'"kind":"transition".*"transition":"START_ACTIVITY"|"transition":"START_ACTIVITY".*"kind":"transition"'
)


async def subscribe(url: str, token: str, seen: asyncio.Event, frames: list[int]) -> None:
    """A minimal SSE client on a raw connection (chunked transfer): counts the frames
    and sets ``seen`` at the end of START_ACTIVITY."""
    host, port = url.removeprefix("http://").split(":")
    r, w = await asyncio.open_connection(host, int(port), limit=1 << 24)
    w.write(f"GET /api/events/stream HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
            f"{token}\r\n\r\n".encode())  # fmt: skip
    head = await r.readuntil(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], head
    buf = b""
    while True:
        size = int((await r.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            return
        buf += await r.readexactly(size + 2)
        parts = buf.split(b"\n\n")
        buf = parts.pop()
        for f in parts:
            if b"data: " not in f:
                continue
            frames[0] += 1
            if b'"status":"DONE"' in f and DONE.search(f):
                seen.set()


async def through_server(nodes: int, per_node: int) -> dict[str, float]:
    _hosts, files, variables = farm(nodes, per_node)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        wf = os.path.join(tmp, "wf")
        os.makedirs(os.path.join(wf, "tasks"))
        for name, text in files.items():
            with open(os.path.join(wf, name.replace("wf.yaml", "farm.yaml")), "w") as f:
                f.write(text)
        async with sim_server(tmp, nodes, wf, "--sim-latency", str(LATENCY)) as (url, token, _):
            seen = asyncio.Event()
            frames = [0]
            sub = asyncio.ensure_future(subscribe(url, token, seen, frames))
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
                await asyncio.sleep(0.5)  # the subscriber is in
                t0 = time.perf_counter()
                r = await c.post("/api/environments", json={"workflow": "farm", "vars": variables})
                assert r.status_code == 201, r.text
                out["create"] = time.perf_counter() - t0
                env_id = r.json()["id"]
                for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
                    t = time.perf_counter()
                    r = await c.post(f"/api/environments/{env_id}/transitions",
                                     json={"event": event})  # fmt: skip
                    assert r.status_code == 200, r.text
                    out[event] = time.perf_counter() - t
                out["answered"] = time.perf_counter() - t0
                await asyncio.wait_for(seen.wait(), 600)
                out["streamed"] = time.perf_counter() - t0
                out["frames"] = frames[0]
                env = (await c.get(f"/api/environments/{env_id}")).json()
                assert env["state"] == "RUNNING", env["state"]
            sub.cancel()
    return out


async def main(nodes: int, per_node: int) -> int:
    n = nodes * per_node
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cpus; {nodes} simulated nodes "
          f"x {per_node} tasks = {n} tasks; {LATENCY * 1000:g} ms per node call")  # fmt: skip
    b = await create_to_running(nodes, per_node)
    print(f"(b) in-process, create -> RUNNING: {b:.2f} s")
    _, files, variables = farm(nodes, per_node)
    t = time.perf_counter()
    expand("wf.yaml", DictSources(files), variables=variables)
    x = time.perf_counter() - t
    print(f"    the template's expansion alone (not in (b)): {x:.2f} s")
    e = await through_server(nodes, per_node)
    steps = ", ".join(f"{k} {e[k]:.2f} s" for k in ("create", "DEPLOY", "CONFIGURE",
                                                    "START_ACTIVITY"))  # fmt: skip
    print(
        f"(e) through corral serve: {steps}; all answered {e['answered']:.2f} s; "
        f"the stream's subscriber had every event ({e['frames']:.0f}) at {e['streamed']:.2f} s"
    )
    ratio = e["streamed"] / b
    print(f"(e) / (b) = {ratio:.2f} (target <= 1.5); without the expansion: "
          f"{(e['streamed'] - x) / b:.2f}")  # fmt: skip
    ok = ratio <= 1.5
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    sys.exit(asyncio.run(main(args[0] if args else 350, args[1] if len(args) > 1 else 430)))
