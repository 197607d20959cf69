"""Benchmark (b): 350 simulated nodes x 430 tasks (150,500) through create -> RUNNING.

The control plane is the real one (controller, SQLite store in a temporary directory,
events); only the nodes are simulated (the ``sim`` backend, zero latency), so this
measures corral's own cost. Targets on a 2-core machine: create -> RUNNING <= 10 s,
START_ACTIVITY alone <= 1 s, peak RSS <= 1.5 GB. The anchor: ODC+DDS takes 60-100 s
for ~150k tasks on 350 nodes.

    python bench/sim_150k.py [NODES] [TASKS_PER_NODE]
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
import time

from corral.backends.sim import SimBackend
from corral.control.plane import ControlPlane
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand

WORKFLOW = """
name: farm
roles:
  - name: "{{ host }}"
    for: {range: "{{ hosts }}", var: host}
    constraints:
      - {attribute: machine_id, value: "{{ host }}"}
    roles:
      - name: proc-{{ i }}
        for: {begin: "1", end: "{{ per_node }}", var: i}
        task: {load: proc}
"""
CLASS = """
name: proc
control: {mode: direct}
command:
  value: /usr/bin/o2-proc
  arguments: ["--id={{ i }}", "--host={{ host }}"]
"""


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main(nodes: int, per_node: int) -> None:
    hosts = [f"sim-{i:03d}" for i in range(nodes)]
    t = time.perf_counter()
    plan = expand(
        "wf.yaml",
        DictSources({"wf.yaml": WORKFLOW, "tasks/proc.yaml": CLASS}),
        variables={"hosts": json.dumps(hosts), "per_node": str(per_node)},
    )
    expand_s = time.perf_counter() - t
    n = len(plan.tasks)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(os.path.join(tmp, "corral.db"))
        backend = SimBackend(nodes=hosts)
        plane = ControlPlane(store, backend)
        steps: dict[str, float] = {}
        t0 = time.perf_counter()
        env = plane.create(plan)
        steps["create"] = time.perf_counter() - t0
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            t = time.perf_counter()
            await env.transition(event)
            steps[event] = time.perf_counter() - t
        total = time.perf_counter() - t0
        assert env.counts() == {"RUNNING": n}, env.counts()
        events = store.last_seq()
        t = time.perf_counter()
        await plane.close()
        teardown = time.perf_counter() - t
        store.close()
    detail = " ".join(f"{k}={v:.2f}s" for k, v in steps.items())
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cpus")
    print(f"expand: {n} tasks on {nodes} nodes in {expand_s:.2f} s (not counted below)")
    print(f"create -> RUNNING: {total:.2f} s (target <= 10 s): {detail}")
    print(f"START_ACTIVITY: {steps['START_ACTIVITY']:.2f} s (target <= 1 s)")
    print(f"peak RSS: {rss_mb():.0f} MB (target <= 1500 MB); {events} events stored")
    print(f"teardown (STOP, EXIT, end every task): {teardown:.2f} s")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    asyncio.run(main(args[0] if args else 350, args[1] if len(args) > 1 else 430))
