"""tcp channel ports come from the node's range that placement gives out, and go back
when the environment ends."""

from __future__ import annotations

import sys
from pathlib import Path

from corral.templates import DictSources, expand
from tests.control.harness import Harness, run
from tests.fake_tasks import write_program

WF = """
name: wf
roles:
  - name: src
    bind: [{name: out, type: push, addressing: tcp}, {name: mon, type: pub, addressing: tcp}]
    task: {load: fake}
  - name: dst
    connect: [{name: in, type: pull, target: "wf.src:out"}]
    task: {load: fake}
"""
FAKE = """
name: fake
control: {mode: direct}
wants: {ports: 1}
command: {value: "{{ python }}", arguments: ["{{ program }}", good]}
"""


def test_channel_ports_come_from_the_node_range_and_go_back(tmp_path: Path) -> None:
    plan = expand("wf.yaml", DictSources({"wf.yaml": WF, "tasks/fake.yaml": FAKE}),
                  global_defaults={"python": sys.executable,
                                   "program": write_program(tmp_path)})  # fmt: skip

    async def body(h: Harness) -> None:
        a = h.create(plan)
        b = h.create(plan)
        for env in (a, b):
            await env.transition("DEPLOY")
            await env.transition("CONFIGURE")
        lo, hi = h.plane.ledger.nodes[0].ports
        used: set[int] = set()
        for env in (a, b):
            ports = [int(addr.rsplit(":", 1)[1]) for addr in env.addresses.values()]
            assert len(ports) == 2 and all(lo <= p <= hi for p in ports), ports
            # the two binds take the task's first two ports; its own one comes after
            assert ports == list(env.ports[env.by_path["wf.src"].idx][:2])
            assert not used & set(ports), "two environments never share a port"
            used |= set(ports)
        held = set(h.plane.ledger.usage["localhost"].ports)
        assert used <= held
        await h.plane.destroy(a.id)
        assert not {int(x.rsplit(":", 1)[1]) for x in a.addresses.values()} & set(
            h.plane.ledger.usage["localhost"].ports
        ), "a destroyed environment's ports go back"

    run(tmp_path, body)
