"""Benchmark: expand a generated workflow of 350 hosts x 430 tasks (150,500 tasks).

Shaped like the EPN farm of seed talk 002: per host, 8 GPU pipelines of 53 processing
devices chained by channels (each binds ``out`` and connects to its predecessor's),
plus 6 host-level tasks; each device has its own vars, resolved per task. Prints
seconds and peak RSS beside the targets (<= 3 s, <= 500 MB).

    python bench/expand_150k.py [--hosts 350]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

from corral.store.files import DiskSources
from corral.templates import expand

DEVICES = 53
GPUS = 8
HOST_TASKS = 6


def generate(root: str, hosts: int) -> str:
    os.makedirs(os.path.join(root, "tasks"), exist_ok=True)
    names = [f"epn{i:03d}" for i in range(hosts)]
    lines = [
        "name: epn-farm",
        "description: generated benchmark workflow",
        "defaults:",
        f"  hosts: '{json.dumps(names)}'",
        f"  gpus: '{GPUS - 1}'",
        "  severity: info",
        "roles:",
        "  - name: epn-{{ host }}",
        "    for:",
        '      range: "{{ hosts }}"',
        "      var: host",
        f'      nmin: "{hosts * 9 // 10}"',
        "    constraints:",
        "      - attribute: machine_id",
        '        value: "{{ host }}"',
        "    roles:",
    ]
    for k in range(HOST_TASKS):
        lines += [
            f"      - name: service-{k}",
            "        task:",
            "          load: host-service",
        ]
    lines += [
        "      - name: gpu-{{ gpu }}",
        "        for:",
        '          begin: "0"',
        '          end: "{{ gpus }}"',
        "          var: gpu",
        "        roles:",
    ]
    for k in range(DEVICES):
        lines += [
            f"          - name: dev{k}",
            "            vars:",
            f'              device_id: "dev{k}-{{{{ host }}}}-{{{{ gpu }}}}"',
        ]
        if k > 0:
            lines += [
                "            connect:",
                "              - name: in",
                "                type: pull",
                f'                target: "{{{{ Parent().Path }}}}.dev{k - 1}:out"',
            ]
        lines += [
            "            task:",
            "              load: dpl-device",
        ]
    with open(os.path.join(root, "epn-farm.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "tasks", "dpl-device.yaml"), "w") as f:
        f.write(
            """name: dpl-device
control:
  mode: direct
wants:
  cpu: 0.1
  memory: 256
bind:
  - name: out
    type: push
    addressing: ipc
    transport: shmem
command:
  value: o2-dpl-device
  arguments:
    - "--id={{ device_id }}"
    - "--gpu={{ gpu }}"
    - "--severity={{ severity }}"
    - "--session={{ environment_id }}"
  env:
    - O2_ROLE={{ host }}
"""
        )
    with open(os.path.join(root, "tasks", "host-service.yaml"), "w") as f:
        f.write(
            """name: host-service
control:
  mode: basic
command:
  value: o2-service
  arguments: ["--host={{ host }}"]
"""
        )
    return os.path.join(root, "epn-farm.yaml")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=350)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = generate(d, args.hosts)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        plan = expand(path, DiskSources(), seed="bench")
        dt = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(plan.tasks)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        f"expanded {n} tasks on {args.hosts} hosts, {len(plan.binds)} binds, "
        f"{len(plan.connects)} connects"
    )
    print(f"time:     {dt:6.2f} s    (target <= 3 s)      {n / dt:,.0f} tasks/s")
    print(f"peak RSS: {rss:6.0f} MB   (target <= 500 MB)   before expansion: {rss0:.0f} MB")
    ok = dt <= 3.0 and rss <= 500
    print("within target" if ok else "OVER TARGET")


if __name__ == "__main__":
    main()
