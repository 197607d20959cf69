"""Benchmark: placement throughput, 150,000 tasks on 350 nodes and on 5,000 nodes.

Pure placement (planning.placement.place), one core, from a snapshot and a request to
a Placement. Three shapes:
- pinned: the EPN farm of seed talk 002, each task pinned to its host (machine_id),
  430 tasks a node on 350 nodes;
- spread by label: every task constrained to role=epn, spread over 350 nodes;
- spread on 5,000 nodes (Kubernetes' documented maximum cluster size), by label.
Target: >= 50,000 tasks placed per second on one core. Anchors: kube-scheduler 50-100
pods/s; YuniKorn ~830 pods/s; Nomad's C1M 3,750 containers/s.

    python bench/placement.py
"""

from __future__ import annotations

import os
import sys
import time

from corral.model.inventory import Node
from corral.model.plan import Constraint, Resources
from corral.planning.placement import Demand, Placement, Request, Snapshot, place

WANTS = Resources(cpu=0.1, memory=256, gpu=0, ports=1)


def nodes(n: int) -> tuple[Node, ...]:
    return tuple(
        Node(f"epn{i:04d}", cpu=128, memory=1_000_000, gpu=8, ports=(20000, 29999),
             labels=(("role", "epn"), ("pool", "sync" if i % 2 else "async")))
        for i in range(n)
    )  # fmt: skip


def run(label: str, snapshot: Snapshot, demands: list[Demand]) -> None:
    t = time.perf_counter()
    p = place(snapshot, Request(demands), seed="bench")
    took = time.perf_counter() - t
    assert isinstance(p, Placement), p
    used = sum(1 for u in p.usage.values() if u.tasks)
    rate = len(demands) / took
    print(f"{label:<34} {len(demands):>7} tasks on {used:>4} nodes: {took:.2f} s, "
          f"{rate:,.0f} tasks/s (target >= 50,000)")  # fmt: skip


def main() -> None:
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cpus (placement uses one)")
    farm = nodes(350)
    role = (Constraint("role", "epn"),)
    pinned = [
        Demand(f"farm.{n.name}.proc-{j}", WANTS, (Constraint("machine_id", n.name),))
        for n in farm
        for j in range(430)
    ]
    run("pinned to hosts, 350 nodes", Snapshot(farm), pinned)
    spread = [Demand(f"farm.proc-{j}", WANTS, role) for j in range(150_500)]
    run("spread by label, 350 nodes", Snapshot(farm), spread)
    big = nodes(5000)
    run("spread by label, 5,000 nodes", Snapshot(big), spread)
    groups = [Demand(f"farm.g{j % 5000}.t{j}", WANTS, role, group=f"g{j // 5000}")
              for j in range(150_000)]  # fmt: skip
    run("anti-affinity groups, 5,000 nodes", Snapshot(big), groups)


if __name__ == "__main__":
    main()
