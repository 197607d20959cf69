"""Benchmark: the API under load while a 10,000-task environment transitions.

A real `corral serve` (sim backend, 50 nodes) in a child process; this process holds
50 Server-Sent-Events subscribers and issues 500 reads per second (environment detail,
task pages, event pages, the environment list) while a driver takes a 10,000-task
environment through DEPLOY, CONFIGURE and START/STOP cycles, then destroys it.

It checks that every subscriber received every event exactly once, in order, and
that no request failed, and prints the read latency (p50, p99) and the event delivery
lag (from the event's commit to its arrival at a subscriber).

    python bench/api_load.py [--subscribers 50] [--rate 500] [--tasks 10000] [--cycles 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time

import httpx

from serving import sim_server
from sim_150k import CLASS, WORKFLOW  # the same farm: hosts x tasks pinned to them


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


FRAME = re.compile(rb'data: \{"seq":(\d+),"time":([\d.eE+-]+)')


async def open_http(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def read_head(r: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def subscriber(url: str, token: str, after: int, got: list[int], lags: list[float],
                     done: asyncio.Event, errors: list[str]) -> None:  # fmt: skip
    """A minimal SSE client on a raw connection (chunked transfer), so that the load
    generator itself stays cheap: it reads each frame's seq and commit time."""
    try:
        r, w = await open_http(url)
        w.write(f"GET /api/events/stream HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
                f"{token}\r\nLast-Event-ID: {after}\r\n\r\n".encode())  # fmt: skip
        status, _ = await read_head(r)
        if status != 200:
            errors.append(f"subscriber: HTTP {status}")
            return
        buf = b""
        while not done.is_set():
            size = int((await r.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                return
            buf += await r.readexactly(size + 2)
            frames = buf.split(b"\n\n")
            buf = frames.pop()
            now = time.time()
            for f in frames:
                m = FRAME.search(f)
                if m:
                    got.append(int(m.group(1)))
                    lags.append(now - float(m.group(2)))
        w.close()
    except Exception as e:  # counted, not raised: the benchmark reports errors
        if not done.is_set():
            errors.append(f"subscriber: {type(e).__name__}: {e}")


async def reader(url: str, token: str, env_id: list[str], rate: int, stop: asyncio.Event,
                 lat: list[float], errors: list[str]) -> int:  # fmt: skip
    """Open-loop reads at `rate` per second over 32 keep-alive connections (raw HTTP/1.1,
    bodies read by Content-Length and not parsed: the generator must stay cheap)."""
    tickets: asyncio.Queue[str | None] = asyncio.Queue()
    sent = 0

    async def worker() -> None:
        r, w = await open_http(url)
        while True:
            path = await tickets.get()
            if path is None:
                w.close()
                return
            t0 = time.perf_counter()
            try:
                w.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer "
                        f"{token}\r\n\r\n".encode())  # fmt: skip
                status, headers = await read_head(r)
                await r.readexactly(int(headers.get(b"content-length", b"0")))
                if status != 200:
                    errors.append(f"GET {path}: HTTP {status}")
            except Exception as e:
                errors.append(f"GET {path}: {type(e).__name__}: {e}")
                r, w = await open_http(url)
            lat.append(time.perf_counter() - t0)

    workers = [asyncio.ensure_future(worker()) for _ in range(32)]
    start = time.perf_counter()
    while not stop.is_set():
        eid = env_id[0] if env_id else None
        paths = ["/api/environments"]
        if eid:
            paths = [f"/api/environments/{eid}", f"/api/tasks?env={eid}&limit=100",
                     "/api/events?limit=100", "/api/environments"]  # fmt: skip
        tickets.put_nowait(paths[sent % len(paths)])
        sent += 1
        delay = start + sent / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    for _ in workers:
        tickets.put_nowait(None)
    await asyncio.gather(*workers)
    return sent


async def main(args: argparse.Namespace) -> None:
    nodes = 50
    per_node = args.tasks // nodes
    hosts = [f"sim-{i:03d}" for i in range(nodes)]
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "wf", "tasks"))
        with open(os.path.join(tmp, "wf", "farm.yaml"), "w") as f:
            f.write(WORKFLOW)
        with open(os.path.join(tmp, "wf", "tasks", "proc.yaml"), "w") as f:
            f.write(CLASS)
        wf = os.path.join(tmp, "wf")
        async with sim_server(tmp, nodes, wf) as (url, token, server):
            await run(url, token, hosts, per_node, args)
            with open(f"/proc/{server.pid}/stat") as st:
                fields = st.read().rsplit(")", 1)[1].split()
            tick = os.sysconf("SC_CLK_TCK")
            server_cpu = (int(fields[11]) + int(fields[12])) / tick
            print(f"cpu: server {server_cpu:.1f} s, load generator {time.process_time():.1f} s")


async def run(url: str, token: str, hosts: list[str], per_node: int,
              args: argparse.Namespace) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
        start_seq = max([e["seq"] for e in (await c.get("/api/events?limit=10000")).json()] or [0])
        done = asyncio.Event()
        stop = asyncio.Event()
        errors: list[str] = []
        got: list[list[int]] = [[] for _ in range(args.subscribers)]
        lags: list[float] = []
        subs = [
            asyncio.ensure_future(subscriber(url, token, start_seq, got[i], lags, done, errors))
            for i in range(args.subscribers)
        ]
        await asyncio.sleep(1.0)
        lat: list[float] = []
        env_box: list[str] = []
        rd = asyncio.ensure_future(reader(url, token, env_box, args.rate, stop, lat, errors))
        t0 = time.perf_counter()
        r = await c.post("/api/environments", json={"workflow": "farm", "vars": {
            "hosts": json.dumps(hosts), "per_node": str(per_node)}})  # fmt: skip
        assert r.status_code == 201, r.text
        env_id = r.json()["id"]
        env_box.append(env_id)
        timings: dict[str, list[float]] = {}
        events = ["DEPLOY", "CONFIGURE"]
        for _ in range(args.cycles):
            events += ["START_ACTIVITY", "STOP_ACTIVITY"]
        for ev in events:
            t = time.perf_counter()
            r = await c.post(f"/api/environments/{env_id}/transitions", json={"event": ev})
            assert r.status_code == 200, r.text
            timings.setdefault(ev, []).append(time.perf_counter() - t)
        t = time.perf_counter()
        assert (await c.delete(f"/api/environments/{env_id}")).status_code == 200
        timings["destroy"] = [time.perf_counter() - t]
        driven = time.perf_counter() - t0
        stop.set()
        sent = await rd
        final = max(e["seq"] for e in (await c.get(f"/api/events?after={start_seq}&limit=10000"))
                    .json())  # fmt: skip
        deadline = time.monotonic() + 30
        while any((g[-1] if g else 0) < final for g in got) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        done.set()
        for s in subs:
            s.cancel()
        await asyncio.gather(*subs, return_exceptions=True)
    want = list(range(start_seq + 1, final + 1))
    bad = [i for i, g in enumerate(got) if g[: len(want)] != want]
    dups = sum(len(g) - len(set(g)) for g in got)
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cpus")
    print(f"environment: {per_node * len(hosts)} tasks on {len(hosts)} sim nodes; "
          + ", ".join(f"{k} {statistics.mean(v):.2f}s" for k, v in timings.items()))  # fmt: skip
    print(f"driven for {driven:.1f} s; reads sent {sent} ({sent / driven:.0f}/s, target "
          f"{args.rate}/s); read latency p50 {pct(lat, 50) * 1000:.1f} ms, "
          f"p99 {pct(lat, 99) * 1000:.1f} ms")  # fmt: skip
    print(
        f"events: {len(want)} per subscriber x {args.subscribers} subscribers; "
        f"subscribers missing or misordered: {len(bad)}; duplicates: {dups}; "
        f"delivery lag p50 {pct(lags, 50) * 1000:.1f} ms, p99 {pct(lags, 99) * 1000:.1f} ms"
    )
    print(f"errors: {len(errors)}" + ("".join("\n  " + e for e in errors[:10])))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--subscribers", type=int, default=50)
    p.add_argument("--rate", type=int, default=500)
    p.add_argument("--tasks", type=int, default=10_000)
    p.add_argument("--cycles", type=int, default=10)
    asyncio.run(main(p.parse_args()))
