"""The controller on a simulated farm: many nodes, failure injection, collections."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from corral.backends.sim import Fault, SimBackend
from corral.control.environment import TransitionError
from corral.control.plane import ControlPlane
from corral.lifecycle import task as tasksm
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand

FARM = """
name: farm
roles:
  - name: flp
    constraints:
      - {attribute: machine_id, value: sim-000}
    task: {load: proc}
  - name: "{{ host }}"
    for: {range: "{{ hosts }}", var: host, nmin: "{{ nmin }}"}
    constraints:
      - {attribute: machine_id, value: "{{ host }}"}
    roles:
      - name: proc-{{ i }}
        for: {begin: "1", end: "{{ per_node }}", var: i}
        task: {load: proc, critical: false}
"""
PROC = """
name: proc
control: {mode: direct}
command: {value: /usr/bin/o2-proc, arguments: ["--id={{ i }}"]}
"""
HOSTS = ["sim-000", "sim-001", "sim-002", "sim-003"]


def farm_plan(per_node: int = 5, nmin: int = 3) -> Any:
    return expand(
        "wf.yaml",
        DictSources({"wf.yaml": FARM, "tasks/proc.yaml": PROC}),
        variables={"hosts": json.dumps(HOSTS), "per_node": str(per_node), "nmin": str(nmin)},
        global_defaults={"i": "0"},
    )


def run(tmp: Path, backend: SimBackend, body: Any) -> None:
    async def main() -> None:
        store = SqliteStore(str(tmp / "corral.db"))
        plane = ControlPlane(store, backend)
        events: list[dict[str, Any]] = []
        plane.bus.subscribe(events.extend)
        try:
            await body(plane, events)
        finally:
            await plane.close()
            store.close()

    asyncio.run(main())


async def until(pred: Any, timeout: float = 60.0) -> None:
    """Wait for a condition (polled); the timeout only ends a test that would hang."""
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition never reached"
        await asyncio.sleep(0.005)


async def to_running(env: Any) -> None:
    for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
        await env.transition(event)


def test_tasks_land_on_their_nodes_and_reach_running(tmp_path: Path) -> None:
    async def body(plane: ControlPlane, events: list[dict[str, Any]]) -> None:
        env = plane.create(farm_plan())
        await to_running(env)
        assert env.counts() == {"RUNNING": 21}
        assert env.by_path["farm.sim-002.proc-3"].node == "sim-002"
        per_node = {e["node"] for e in events if e["kind"] == "task" and e["state"] == "RUNNING"}
        assert per_node == set(HOSTS)  # one batch (and event) per node

    run(tmp_path, SimBackend(HOSTS), body)


def test_a_task_dying_while_running_sends_the_environment_to_error(tmp_path: Path) -> None:
    backend = SimBackend(HOSTS, faults=[Fault("farm.flp", "die", at="RUNNING", after=0.05)])

    async def body(plane: ControlPlane, events: list[dict[str, Any]]) -> None:
        env = plane.create(farm_plan())
        await to_running(env)
        await until(lambda: env.state == "ERROR")
        assert "farm.flp on sim-000" in (env.error or "") and "SIGKILL" in (env.error or "")
        # the fault fired once: RECOVER relaunches it and a new run starts
        await env.transition("RECOVER")
        await env.transition("CONFIGURE")
        await env.transition("START_ACTIVITY")
        assert env.state == "RUNNING"

    run(tmp_path, backend, body)


def test_collections_honour_nmin(tmp_path: Path) -> None:
    backend = SimBackend(HOSTS)

    async def body(plane: ControlPlane, events: list[dict[str, Any]]) -> None:
        env = plane.create(farm_plan(nmin=3))
        await to_running(env)
        backend.lose_node("sim-003")  # one member of four lost: 3 >= nmin, still RUNNING
        lost = [t for t in env.tasks if t.node == "sim-003"]
        assert len(lost) == 5
        # the loss was seen (the collection is checked as the tasks fail), and tolerated
        await until(lambda: all(t.state in tasksm.FAILED for t in lost))
        assert all("node sim-003 lost" in (t.reason or "") for t in lost)
        assert env.state == "RUNNING"
        killed = env.by_path["farm.sim-001.proc-2"]
        backend.kill(killed.id)  # a second member: 2 < nmin
        await until(lambda: env.state == "ERROR")
        assert killed.state in tasksm.FAILED
        assert "fewer than nmin=3" in (env.error or "")

    run(tmp_path, backend, body)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("die", "killed by signal 9"),
        ("garbage", "not JSON"),
        ("error", "simulated error"),
        ("hang", "no answer to CONFIGURE within 0.3 s"),
    ],
)
def test_failure_injection_at_configure(tmp_path: Path, kind: str, message: str) -> None:
    backend = SimBackend(HOSTS, faults=[Fault("farm.flp", kind, at="CONFIGURE")])

    async def body(plane: ControlPlane, events: list[dict[str, Any]]) -> None:
        env = plane.create(farm_plan(), timeouts={"CONFIGURE": 0.3})
        await env.transition("DEPLOY")
        with pytest.raises(TransitionError, match=message):
            await env.transition("CONFIGURE")
        assert env.state == "ERROR"
        flp = env.by_path["farm.flp"]
        assert flp.state == "ERROR" and message.split()[0] in (flp.reason or "")
        if kind == "hang":
            assert any(e.get("status") == "SLOW" for e in events)

    run(tmp_path, backend, body)


def test_a_slow_answer_within_the_deadline_is_fine_and_reported_slow(tmp_path: Path) -> None:
    backend = SimBackend(HOSTS, faults=[Fault("farm.flp", "slow", at="CONFIGURE", after=1.2)])

    async def body(plane: ControlPlane, events: list[dict[str, Any]]) -> None:
        # the deadline is 2 s, so "slow" is reported after 1 s (half of it)
        env = plane.create(farm_plan(), timeouts={"CONFIGURE": 2.0})
        await env.transition("DEPLOY")
        await env.transition("CONFIGURE")
        assert env.state == "CONFIGURED"
        assert [e["task"] for e in events if e.get("status") == "SLOW"] == ["farm.flp"]

    run(tmp_path, backend, body)


def test_latencies_and_end_of_stream(tmp_path: Path) -> None:
    backend = SimBackend(HOSTS, transition_latency=0.05)

    async def body(plane: ControlPlane, events: list[dict[str, Any]]) -> None:
        env = plane.create(farm_plan(per_node=2))
        await to_running(env)
        for t in env.tasks:
            backend.emit(t.id, "end_of_stream")
        await until(lambda: env.state == "CONFIGURED" and env.transitioning is None)
        assert [e["status"] for e in events if e["kind"] == "run"] == ["STARTED", "STOPPED"]

    run(tmp_path, backend, body)
