"""kill -9 of `corral serve` at random points of DEPLOY, CONFIGURE, START_ACTIVITY and
destroy. The node agent keeps the tasks; after each restart: the tasks still running
are re-attached, nothing of the environment runs that no task owns, no dead task is
shown alive, it is in a state an operator can act on (RECOVER works, destroy works),
no transition stays STARTED, the events have no gap, and a further restart adds nothing.

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
from tests.faults.processes import marked, of_environment

ALIVE = ("LAUNCHING", "STANDBY", "CONFIGURED", "RUNNING")

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
    assert env["transitioning"] is None
    started = [t for t in env["transitions"] if t["status"] == "STARTED"]
    assert not started, f"{when}: transitions left STARTED: {started}"
    tasks = c.get("/api/tasks", params={"env": env_id, "limit": 1000}).json()
    shown = {t["pid"] for t in tasks if t["state"] in ALIVE}
    for t in tasks:  # a task shown alive has its process, carrying its id
        if t["state"] in ALIVE:
            assert t["pid"] in marked(t["id"]), f"{when}: {t['path']} shown {t['state']}, dead"
    held = {t["pid"] for t in tasks if t["pid"] is not None}
    strays = [p for p in of_environment(env_id) if p not in held | shown]
    assert not strays, f"{when}: processes of the environment no task owns: {strays}"
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
    stopped = sum(e["status"] == "STOPPED" for e in runs)
    begun_runs = sum(e["status"] == "STARTED" for e in runs)
    assert begun_runs == stopped + (env["state"] == "RUNNING"), f"{when}: runs: {runs}"
    return env


@pytest.mark.parametrize(("phase", "k"), POINTS, ids=[f"{p}-{k}" for p, k in POINTS])
def test_kill_9_of_the_server(tmp_path: Path, phase: str, k: int) -> None:
    rnd = random.Random(f"{phase}-{k}")
    wf = workflows(tmp_path)
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf), keep_agent=True) as s1:
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
    alive = set(of_environment(env_id))  # the node agent keeps the tasks
    with Server(data, "--workflows", str(wf)) as s2, s2.client(token) as c:
        env = check_after_restart(c, env_id, when)
        if env["state"] != "DONE":
            assert env["controlled"], f"{when}: not taken over: {s2.log.read_text()}"
            kept = {t["pid"] for t in c.get("/api/tasks", params={"env": env_id}).json()}
            assert alive <= kept, f"{when}: running tasks not re-attached"
            if env["state"] == "ERROR":
                r = transition(c, env_id, "RECOVER")
                assert r.status_code == 200, r.text
            nxt = {"STANDBY": "DEPLOY", "DEPLOYED": "CONFIGURE", "CONFIGURED": "START_ACTIVITY"}
            for _ in range(3):
                state = state_of(c, env_id)["state"]
                if state == "RUNNING":
                    break
                r = transition(c, env_id, nxt[state])
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
