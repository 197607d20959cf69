"""kill -9 of `corral serve` at random points of DEPLOY, CONFIGURE, START_ACTIVITY and
destroy; after each restart: nothing of the environment runs on unwatched, it is in a
state an operator can act on (RECOVER works, destroy works), no transition stays
STARTED, the events have no gap, and a further restart adds nothing.

Every point is drawn from a seeded generator: the same points each run.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server import Server
from tests.control.harness import PATIENCE
from tests.faults import programs
from tests.faults.processes import of_environment

SLEEPERS = 30
WORKFLOW = f"""
name: crash
defaults:
  program: "{{{{ workflow_dir }}}}/fault_task.py"
  marks: "{{{{ workflow_dir }}}}/marks"
  hold: ""
  delay: "0.3"
roles:
  - name: s-{{{{ i }}}}
    for: {{begin: "1", end: "{SLEEPERS}", var: i}}
    task: {{load: sleeper}}
  - name: slow
    task: {{load: fault}}
"""
PHASES = ["DEPLOY", "CONFIGURE", "START_ACTIVITY", "destroy"]
BEFORE = {"DEPLOY": [], "CONFIGURE": ["DEPLOY"], "START_ACTIVITY": ["DEPLOY", "CONFIGURE"],
          "destroy": ["DEPLOY", "CONFIGURE", "START_ACTIVITY"]}  # fmt: skip
POINTS = [(phase, k) for phase in PHASES for k in range(2)]


def workflows(tmp: Path, workflow: str = WORKFLOW) -> Path:
    """A workflows directory with ``crash.yaml`` and the fault task program."""
    d = tmp / "workflows"
    (d / "tasks").mkdir(parents=True)
    (d / "marks").mkdir()
    (d / "crash.yaml").write_text(workflow)
    (d / "tasks" / "fault.yaml").write_text(programs.CLASS)
    (d / "tasks" / "sleeper.yaml").write_text(programs.SLEEPER)
    (d / "fault_task.py").write_text(programs.PROGRAM)
    return d


def wait_for(pred: Any, what: str) -> None:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < PATIENCE, f"never reached: {what}"
        time.sleep(0.02)


def transition(c: httpx.Client, env_id: str, event: str, *, wait: bool = True) -> httpx.Response:
    return c.post(f"/api/environments/{env_id}/transitions", json={"event": event, "wait": wait})


def state_of(c: httpx.Client, env_id: str) -> dict[str, Any]:
    r = c.get(f"/api/environments/{env_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def check_after_restart(c: httpx.Client, env_id: str, when: str) -> dict[str, Any]:
    env = state_of(c, env_id)
    assert env["state"] in ("ERROR", "DONE", "STANDBY"), f"{when}: {env['state']}"
    assert env["transitioning"] is None
    started = [t for t in env["transitions"] if t["status"] == "STARTED"]
    assert not started, f"{when}: transitions left STARTED: {started}"
    tasks = c.get("/api/tasks", params={"env": env_id, "limit": 1000}).json()
    alive = [t for t in tasks if t["state"] in ("LAUNCHING", "STANDBY", "CONFIGURED", "RUNNING")]
    assert not alive, f"{when}: tasks shown alive after the restart: {alive[:3]}"
    events = c.get("/api/events", params={"limit": 10_000}).json()
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), f"{when}: the events have gaps"
    # what the store says, the events say too: every transition and run that began ended
    mine = [e for e in events if e.get("env") == env_id]
    begun = [e["transition"] for e in mine if e["kind"] == "transition"
             and e.get("status") == "STARTED" and "step" not in e]  # fmt: skip
    ended = [e["transition"] for e in mine if e["kind"] == "transition"
             and e.get("status") in ("DONE", "FAILED") and "step" not in e
             and e["transition"] != "GO_ERROR"]  # fmt: skip
    assert sorted(begun) == sorted(ended), f"{when}: transitions never ended: {begun}, {ended}"
    runs = [e for e in mine if e["kind"] == "run"]
    assert sum(e["status"] == "STARTED" for e in runs) == sum(
        e["status"] == "STOPPED" for e in runs
    ), f"{when}: a run never stopped in the events: {runs}"
    if env["state"] == "ERROR":
        roles = {e["role"]: e["state"] for e in mine if e["kind"] == "role"}
        assert roles and "ERROR" in roles.values(), f"{when}: roles never said ERROR: {roles}"
    return env


@pytest.mark.parametrize(("phase", "k"), POINTS, ids=[f"{p}-{k}" for p, k in POINTS])
def test_kill_9_of_the_server(tmp_path: Path, phase: str, k: int) -> None:
    rnd = random.Random(f"{phase}-{k}")
    wf = workflows(tmp_path)
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf)) as s1:
        token = s1.admin
        with s1.client(token) as c:
            r = c.post("/api/environments", json={"workflow": "crash"})
            assert r.status_code == 201, r.text
            env_id = r.json()["id"]
            for event in BEFORE[phase]:
                assert transition(c, env_id, event).status_code == 200
            if phase == "destroy":
                # DELETE blocks until done: send it from a thread, kill meanwhile
                threading.Thread(
                    target=lambda: _quietly(lambda: c.delete(f"/api/environments/{env_id}")),
                    daemon=True,
                ).start()
            else:
                assert transition(c, env_id, phase, wait=False).status_code == 200
            time.sleep(rnd.uniform(0.0, 0.5))  # the random point of the phase (not a wait)
            assert s1.proc is not None
            s1.proc.kill()
            s1.proc.wait()
    when = f"kill -9 during {phase}"
    with Server(data, "--workflows", str(wf)) as s2, s2.client(token) as c:
        wait_for(lambda: not of_environment(env_id), f"{when}: no process of it left")
        env = check_after_restart(c, env_id, when)
        if env["state"] != "DONE":
            assert env["controlled"], f"{when}: not taken over: {s2.log.read_text()}"
            if env["state"] == "ERROR":
                r = transition(c, env_id, "RECOVER")
                assert r.status_code == 200, r.text
            for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
                if state_of(c, env_id)["state"] != "RUNNING":
                    if event == "DEPLOY" and state_of(c, env_id)["state"] != "STANDBY":
                        continue
                    r = transition(c, env_id, event)
                    assert r.status_code == 200, r.text
            assert state_of(c, env_id)["state"] == "RUNNING"
            assert len(of_environment(env_id)) >= SLEEPERS + 1
            r = c.delete(f"/api/environments/{env_id}")
            assert r.status_code == 200, r.text
            wait_for(lambda: not of_environment(env_id), f"{when}: destroyed after RECOVER")
        events = len(c.get("/api/events", params={"env": env_id, "limit": 10_000}).json())
    with Server(data, "--workflows", str(wf)) as s3, s3.client(token) as c:
        again = c.get("/api/events", params={"env": env_id, "limit": 10_000}).json()
        assert len(again) == events, f"{when}: a further restart added {again[events:]}"
        assert state_of(c, env_id)["state"] == "DONE"


def _quietly(fn: Any) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server was killed under the request
        fn()
