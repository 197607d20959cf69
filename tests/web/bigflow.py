"""A workflow of 150,001 tasks in the shape of a data-taking farm, for the GUI at scale
(tests/web/test_gui_150k.py and bench/gui_150k.py), on the sim backend's nodes
sim-000 ... sim-299:

  bigflow.flps.<250 FLP nodes>.readout-1..499, .stfs   (stfs pushes to dist)
  bigflow.dist                                         (one distributor)
  bigflow.epns.<50 EPN nodes>.proc-1..500              (each pulls from dist)

250 x 500 + 1 + 50 x 500 = 150,001 tasks and 25,250 channels; the role tree lists 304
of its 150,304 roles: those down to the nodes' (the tasks' own are below, `unlisted`).
"""

from __future__ import annotations

import json
from pathlib import Path

NODES = 300  # --sim-nodes
FLPS, READOUTS, EPNS, PROCS = 250, 499, 50, 500
TASKS = FLPS * (READOUTS + 1) + 1 + EPNS * PROCS

WORKFLOW = """
name: bigflow
description: "150,001 tasks: readout on FLP nodes, a distributor, processing on EPN nodes"
roles:
  - name: flps
    roles:
      - name: "{{ host }}"
        for: {range: "{{ flp_hosts }}", var: host}
        constraints:
          - {attribute: machine_id, value: "{{ host }}"}
        roles:
          - name: readout-{{ i }}
            for: {begin: "1", end: "{{ readouts }}", var: i}
            task: {load: proc, critical: false}
          - name: stfs
            connect:
              - {name: output, type: push, target: "::stf-in"}
            task: {load: proc}
  - name: dist
    task: {load: dist}
  - name: epns
    roles:
      - name: "{{ host }}"
        for: {range: "{{ epn_hosts }}", var: host}
        constraints:
          - {attribute: machine_id, value: "{{ host }}"}
        roles:
          - name: proc-{{ i }}
            for: {begin: "1", end: "{{ procs }}", var: i}
            connect:
              - {name: input, type: pull, target: "::tf-out"}
            task: {load: proc, critical: false}
"""
PROC = """
name: proc
control: {mode: direct}
command: {value: /usr/bin/o2-proc}
"""
DIST = """
name: dist
control: {mode: direct}
bind:
  - {name: input, type: pull, addressing: tcp, global: stf-in}
  - {name: output, type: push, addressing: tcp, global: tf-out}
command: {value: /usr/bin/o2-dist}
"""


def write_workflows(folder: Path) -> dict[str, str]:
    """The workflow and its task classes in ``folder`` (a server's --workflows); the
    variables to create it with."""
    (folder / "tasks").mkdir(parents=True, exist_ok=True)
    (folder / "bigflow.yaml").write_text(WORKFLOW)
    (folder / "tasks" / "proc.yaml").write_text(PROC)
    (folder / "tasks" / "dist.yaml").write_text(DIST)
    hosts = [f"sim-{i:03d}" for i in range(FLPS + EPNS)]
    return {
        "flp_hosts": json.dumps(hosts[:FLPS]),
        "epn_hosts": json.dumps(hosts[FLPS:]),
        "readouts": str(READOUTS),
        "procs": str(PROCS),
    }
