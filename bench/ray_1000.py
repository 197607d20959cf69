"""Benchmark (a) on Ray: 1,000 real Python tasks spread over the 4 nodes of a Ray
cluster, DEPLOY -> CONFIGURE -> START_ACTIVITY, beside the spawn limit of the machine
measured in the same run (bench/local_transitions.py's: spawn as many children of the
same interpreter running the same program, wait for each hello, one JSON round trip
each, no corral). The cluster runs on this one machine (127.0.0.2-5, token auth), so
its 4 nodes share the machine's cores with the limit. Target: <= 1.25 x the limit.

    python bench/ray_1000.py [N]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tests.ray_cluster.cluster import RayCluster

from corral.backends.ray_engine import RayBackend
from corral.control.plane import ControlPlane, install_child_watcher
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand
from local_transitions import CLASS, PROGRAM, limit

WORKFLOW = """
name: bench
roles:
  - name: t-{{ i }}
    for: {begin: "1", end: "{{ n }}", var: i}
    task: {load: minimal}
"""
NODES = [{"name": "n2", "role": "w"}, {"name": "n3", "role": "w"}, {"name": "n4", "role": "w"}]


async def corral(n: int, program: str, data: str, address: str) -> tuple[float, dict[str, float]]:
    install_child_watcher()
    plan = expand(
        "wf.yaml", DictSources({"wf.yaml": WORKFLOW, "tasks/minimal.yaml": CLASS}),
        variables={"n": str(n)}, global_defaults={"python": sys.executable, "program": program},
    )  # fmt: skip
    backend = RayBackend(address)
    await backend.start()
    store = SqliteStore(os.path.join(data, "corral.db"))
    plane = ControlPlane(store, backend, log_dir=os.path.join(data, "logs"))
    await backend.resume()
    env = plane.create(plan)
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
        t = time.perf_counter()
        await env.transition(event, timeout=600)
        steps[event] = time.perf_counter() - t
    total = time.perf_counter() - t0
    assert env.counts() == {"RUNNING": n}, env.counts()
    nodes = {t.node for t in env.tasks}
    steps["nodes"] = len(nodes)
    await plane.close()
    store.close()
    return total, steps


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    with tempfile.TemporaryDirectory(prefix="corral-ray-bench-") as tmp:
        program = str(Path(tmp) / "task.py")
        Path(program).write_text(PROGRAM)
        cluster = RayCluster(Path(tmp), {"name": "n1", "role": "w"}, NODES)
        cluster.start()
        os.environ.update(cluster.env)
        try:
            before = limit(n, program)
            total, steps = asyncio.run(corral(n, program, tmp, cluster.address))
            after = limit(n, program)
        finally:
            cluster.stop()
    best = min(before, after)
    detail = " ".join(f"{k}={v:.2f}" for k, v in steps.items() if k != "nodes")
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cpus")
    print(f"{n} tasks over {steps['nodes']:.0f} Ray nodes: {total:.2f} s ({detail})")
    print(f"spawn limit: {before:.2f} s before, {after:.2f} s after; ratio {total / best:.2f} "
          f"(target <= 1.25)")  # fmt: skip


if __name__ == "__main__":
    main()
