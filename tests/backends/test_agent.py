"""The node agent: tasks that outlive their controller, re-attach, fencing, reconcile."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from corral.ports.backend import Report
from tests.api.server import Server
from tests.control.harness import Harness, run
from tests.faults.processes import of_environment
from tests.faults.test_server_kill import transition, wait_for
from tests.issues.test_issue9 import THREE_BASIC, THREE_DIRECT, plan, to_running


def test_kill_9_of_the_server_while_running_changes_nothing_for_the_tasks(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with Server(data, keep_agent=True) as s1:
        token = s1.admin
        with s1.client(token) as c:
            env_id = c.post("/api/environments", json={"workflow": "hello"}).json()["id"]
            for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
                assert transition(c, env_id, event).status_code == 200
            env = c.get(f"/api/environments/{env_id}").json()
            pids = {t["pid"] for t in c.get("/api/tasks", params={"env": env_id}).json()}
            seq = c.get("/api/events", params={"limit": 10_000}).json()[-1]["seq"]
        assert s1.proc is not None
        s1.proc.kill()
        s1.proc.wait()
    assert set(of_environment(env_id)) == pids
    with Server(data) as s2, s2.client(token) as c:
        again = c.get(f"/api/environments/{env_id}").json()
        assert again["state"] == "RUNNING" and again["run_number"] == env["run_number"]
        assert {t["pid"] for t in c.get("/api/tasks", params={"env": env_id}).json()} == pids
        for event in ("STOP_ACTIVITY", "START_ACTIVITY"):
            assert transition(c, env_id, event).status_code == 200
        events = c.get("/api/events", params={"limit": 10_000}).json()
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["seq"] > seq
        runs = [r["number"] for r in c.get("/api/runs", params={"env": env_id}).json()]
        assert runs == [env["run_number"], env["run_number"] + 1]  # never reused
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
    assert not of_environment(env_id)


def test_an_agent_without_a_server_for_its_lease_ends_its_tasks_and_exits(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with Server(data, "--agent-lease", "1", keep_agent=True) as s:
        with s.client(s.admin) as c:
            env_id = c.post("/api/environments", json={"workflow": "hello"}).json()["id"]
            assert transition(c, env_id, "DEPLOY").status_code == 200
        agent = s.agent_pid()
        assert s.proc is not None
        s.proc.kill()
        s.proc.wait()
    assert agent is not None and of_environment(env_id)
    wait_for(lambda: not of_environment(env_id), "fenced: the tasks ended after the lease")
    wait_for(lambda: not Path(f"/proc/{agent}/cmdline").exists()
             or not Path(f"/proc/{agent}/cmdline").read_bytes(), "the agent exited")  # fmt: skip
    assert "(fencing)" in (data / "agent.log").read_text()


def test_a_lost_report_is_repaired_by_reconcile(tmp_path: Path) -> None:
    """A death whose report never arrives is found by the next reconcile pass."""

    async def body(h: Harness) -> None:
        env = h.create(plan(tmp_path, THREE_DIRECT))
        await to_running(env)
        real = h.plane._on_reports
        dropped: list[Report] = []
        h.backend.subscribe(dropped.extend)  # the reports go nowhere: lost
        victim = env.by_path["wf.b"]
        os.kill(victim.pid or 0, signal.SIGKILL)
        await h.until(lambda: any(r.task_id == victim.id for r in dropped))
        assert victim.state == "RUNNING" and env.state == "RUNNING"  # not seen: lost
        h.backend.subscribe(real)
        h.plane.start_reconcile(0.05)
        await h.until(lambda: env.state == "ERROR")
        assert victim.state == "ERROR" and "found by reconcile" in (victim.reason or "")

    run(tmp_path, body)


def test_reconcile_ends_a_process_no_environment_owns(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan(tmp_path, THREE_BASIC))
        await to_running(env)
        pids = set(of_environment(env.id))
        # the controller forgets the environment (as if it ended here unseen)
        h.plane.environments.pop(env.id)
        assert await h.plane.reconcile() == 3
        await h.until(lambda: not of_environment(env.id))
        assert pids

    run(tmp_path, body)


def test_kill_9_of_the_agent_loses_its_tasks_at_once_and_a_new_agent_takes_over(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with Server(data, "--reconcile", "0") as s, s.client(s.admin) as c:  # no periodic pass
        env_id = c.post("/api/environments", json={"workflow": "hello"}).json()["id"]
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            assert transition(c, env_id, event).status_code == 200
        agent = s.agent_pid()
        assert agent is not None
        os.kill(agent, signal.SIGKILL)

        def lost() -> bool:
            return bool(c.get(f"/api/environments/{env_id}").json()["state"] == "ERROR")

        wait_for(lost, "the environment in ERROR")
        [task] = c.get("/api/tasks", params={"env": env_id}).json()
        assert task["state"] == "LOST" and "node agent died" in task["reason"]
        assert s.agent_pid() not in (None, agent), "a new agent was started"
        assert transition(c, env_id, "RECOVER").status_code == 200
        assert c.delete(f"/api/environments/{env_id}").status_code == 200


def test_each_environment_has_its_own_lease(tmp_path: Path) -> None:
    """An environment's `lease` variable: its tasks end that long after the server went
    away; another environment's run on (the agent's lease), and are re-attached."""
    data = tmp_path / "data"
    with Server(data, "--agent-lease", "600", keep_agent=True) as s1:
        token = s1.admin
        with s1.client(token) as c:
            short = c.post(
                "/api/environments", json={"workflow": "hello", "vars": {"lease": "1s"}}
            ).json()["id"]
            long = c.post("/api/environments", json={"workflow": "hello"}).json()["id"]
            for env_id in (short, long):
                to_running = ("DEPLOY", "CONFIGURE", "START_ACTIVITY")
                for event in to_running:
                    assert transition(c, env_id, event).status_code == 200
            bad = c.post("/api/environments", json={"workflow": "hello", "vars": {"lease": "soon"}})
            assert bad.status_code == 422 and "lease" in bad.text
        assert s1.proc is not None
        s1.proc.kill()
        s1.proc.wait()
    wait_for(lambda: not of_environment(short), "the short lease ran out: its tasks ended")
    assert of_environment(long), "the other environment runs on"
    with Server(data) as s2, s2.client(token) as c:
        assert c.get(f"/api/environments/{long}").json()["state"] == "RUNNING"
        got = c.get(f"/api/environments/{short}").json()
        assert got["state"] == "ERROR", got
        for env_id in (short, long):
            assert c.delete(f"/api/environments/{env_id}").status_code == 200
