"""The HTTP API against a real server process on 127.0.0.1; nothing is mocked."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server import Server
from tests.faults.test_server_kill import wait_for

# The example pins its tasks to its hosts (machine_id): name simulated nodes.
ON_SIM = {"hosts": '["sim-000"]', "epn_hosts": '["sim-001", "sim-002"]'}


def tokens(s: Server) -> dict[str, str]:
    """An admin (the first token), and an operator, a second operator and a viewer."""
    out = {"admin": s.admin}
    with s.client(s.admin) as c:
        for name, role in [("op", "operator"), ("op2", "operator"), ("view", "viewer")]:
            r = c.post("/api/tokens", json={"role": role, "name": name})
            assert r.status_code == 201, r.text
            out[name] = r.json()["token"]
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with Server(tmp_path_factory.mktemp("api") / "data", "--backend", "sim") as s:
        s.tokens = tokens(s)  # type: ignore[attr-defined]
        yield s


def test_an_environment_through_its_life(server: Server) -> None:
    t = server.tokens  # type: ignore[attr-defined]
    with server.client(t["op"]) as c:
        r = c.post("/api/environments", json={"workflow": "datataking",
                                              "vars": {"detector": "ITS", **ON_SIM}})  # fmt: skip
        assert r.status_code == 201, r.text
        env = r.json()
        assert env["state"] == "STANDBY" and env["created_by"] == "op"
        for event, state in [("DEPLOY", "DEPLOYED"), ("CONFIGURE", "CONFIGURED"),
                             ("START_ACTIVITY", "RUNNING")]:  # fmt: skip
            r = c.post(f"/api/environments/{env['id']}/transitions", json={"event": event})
            assert r.status_code == 200 and r.json()["state"] == state, r.text
        got = c.get(f"/api/environments/{env['id']}").json()
        assert got["run_number"] >= 1 and got["tasks"] == {"RUNNING": 9}
        assert {"path": "datataking.flp-sim-000", "state": "RUNNING", "tasks": 3} in got["roles"]
        assert any(ch["to"] == "datataking.qc" or ch["from"] == "datataking.qc"
                   for ch in got["channels"])  # fmt: skip
        assert [x["actor"] for x in got["transitions"]] == ["op", "op", "op"]
        tasks = c.get("/api/tasks", params={"env": env["id"], "state": "RUNNING"}).json()
        assert len(tasks) == 9
        where = {x["path"]: x["node"] for x in tasks}
        assert where["datataking.flp-sim-000.readout"] == "sim-000"  # pinned by the template
        assert where["datataking.epn-sim-002.proc-1"] == "sim-002"
        assert where["datataking.dist"] == "sim-001"
        assert where["datataking.qc"].startswith("sim-")  # unconstrained: spread
        one = c.get(f"/api/tasks/{tasks[0]['id']}").json()
        assert one["path"] == tasks[0]["path"]
        # a transition the state does not allow: 409 with the reason
        r = c.post(f"/api/environments/{env['id']}/transitions", json={"event": "DEPLOY"})
        assert r.status_code == 409 and "not allowed in state RUNNING" in r.json()["detail"]
        runs = c.get("/api/runs", params={"env": env["id"]}).json()
        assert len(runs) == 1 and runs[0]["stopped"] is None
        r = c.delete(f"/api/environments/{env['id']}")
        assert r.status_code == 200 and r.json()["state"] == "DONE"
        events = c.get("/api/events", params={"env": env["id"]}).json()
        actors = {e.get("actor") for e in events if e["kind"] == "transition" and "src" in e}
        assert actors == {"op"}


def test_every_mutating_endpoint_needs_a_token_and_a_role(server: Server) -> None:
    t = server.tokens  # type: ignore[attr-defined]
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    bodies = {
        "/api/environments": {"workflow": "hello"},
        "/api/environments/{env_id}/transitions": {"event": "DEPLOY"},
        "/api/tokens": {"role": "viewer", "name": "x"},
        "/api/locks": {"detectors": ["TPC"], "action": "take"},
        "/api/workflows/validate": {"workflow": "hello"},
        "/api/workflows/render": {"workflow": "hello"},
    }
    mutating = [
        (path, method)
        for path, ops in spec["paths"].items()
        for method in ops
        if method in ("post", "put", "patch", "delete")
    ]
    assert len(mutating) >= 7
    for path, method in mutating:
        url = path.replace("{env_id}", "nosuch").replace("{token_id}", "nosuch")
        body = bodies.get(path)
        for token, status in [(None, 401), ("bogus", 401), (t["view"], 403)]:
            reads = path.startswith("/api/workflows/") or path == "/api/config/render"
            if reads and status == 403:
                continue  # validate and render only read: viewers may use them
            with server.client(token) as c:
                r = c.request(method.upper(), url, json=body)
            assert r.status_code == status, (method, path, token, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")


def test_bad_input_gets_a_4xx_that_says_what(server: Server) -> None:
    t = server.tokens  # type: ignore[attr-defined]
    with server.client(t["op"]) as c:
        r = c.post("/api/environments", json={"workflow": "../../etc/passwd"})
        assert r.status_code == 422 and "outside the workflows directory" in r.json()["detail"]
        r = c.post("/api/environments", json={"workflow": "nosuch"})
        assert r.status_code == 404
        r = c.post("/api/environments", json={"workflow": "datataking",
                                              "vars": {"hosts": "not json"}})  # fmt: skip
        assert r.status_code == 422
        assert any("datataking.yaml:" in e["message"] for e in r.json()["errors"])
        r = c.post("/api/environments", json={"workflow": "hello", "extra": 1})
        assert r.status_code == 422 and "extra" in r.json()["detail"]
        r = c.post("/api/environments/nosuch/transitions", json={"event": "LAUNCH"})
        assert r.status_code == 422 and "event" in r.json()["detail"]
        r = c.get("/api/tasks/garbage")
        assert r.status_code == 422
        r = c.get("/api/events/stream", headers={"Last-Event-ID": "abc"})
        assert r.status_code == 422
        r = c.post("/api/workflows/validate", json={"workflow": "datataking",
                                                    "vars": {"hosts": "[1"}})  # fmt: skip
        assert r.status_code == 200 and r.json()["ok"] is False and r.json()["errors"]


def test_an_environment_that_does_not_fit_is_refused_with_reasons(server: Server) -> None:
    t = server.tokens  # type: ignore[attr-defined]
    with server.client(t["op"]) as c:
        r = c.post("/api/environments", json={"workflow": "datataking",
                                              "vars": {"hosts": '["flp9"]'}})  # fmt: skip
        assert r.status_code == 409 and r.json()["title"] == "Does not fit"
        messages = [e["message"] for e in r.json()["errors"]]
        assert "datataking.flp-flp9.readout: no node with machine_id=flp9" in messages
        nodes = c.get("/api/nodes").json()
        assert len(nodes) == 10 and nodes[0]["name"] == "sim-000"
        assert {"cpu", "memory", "gpu", "ports", "tasks"} <= set(nodes[0]["allocated"])


def test_workflows_are_listed_rendered_and_offer_their_public_variables(server: Server) -> None:
    t = server.tokens  # type: ignore[attr-defined]
    with server.client(t["view"]) as c:
        names = [w["name"] for w in c.get("/api/workflows").json()]
        assert names == ["datataking", "hello"]
        public = {p["name"]: p for p in c.get("/api/workflows/datataking").json()["public"]}
        assert public["detector"]["widget"] == "comboBox" and "TPC" in public["detector"]["values"]
        plan = c.post("/api/workflows/render", json={"workflow": "datataking",
                      "vars": {"hosts": '["a","b"]'}}).json()  # fmt: skip
        assert len(plan["tasks"]) == 12


def test_detector_locks(server: Server) -> None:
    t = server.tokens  # type: ignore[attr-defined]
    op, op2, admin = (server.client(t[k]) for k in ("op", "op2", "admin"))
    try:
        r = op.post("/api/locks", json={"detectors": ["MCH"], "action": "take"})
        assert r.status_code == 200 and r.json()["MCH"]["holder"] == "op"
        r = op2.post("/api/environments", json={"workflow": "datataking",
                                                "vars": {"detector": "MCH"}})  # fmt: skip
        assert r.status_code == 423 and "locked by op" in r.json()["detail"]
        r = op.post("/api/environments", json={"workflow": "datataking",
                                               "vars": {"detector": "MCH", **ON_SIM}})  # fmt: skip
        assert r.status_code == 201, r.text
        env_id = r.json()["id"]
        r = op2.post(f"/api/environments/{env_id}/transitions", json={"event": "DEPLOY"})
        assert r.status_code == 423
        r = op2.post("/api/locks", json={"detectors": ["MCH"], "action": "release"})
        assert r.status_code == 409
        r = op2.post("/api/locks", json={"detectors": ["MCH"], "action": "release",
                                         "force": True})  # fmt: skip
        assert r.status_code == 403
        r = admin.post("/api/locks", json={"detectors": ["MCH"], "action": "release",
                                           "force": True})  # fmt: skip
        assert r.status_code == 200 and "MCH" not in r.json()
        r = op2.post(f"/api/environments/{env_id}/transitions", json={"event": "DEPLOY"})
        assert r.status_code == 200
        assert op2.delete(f"/api/environments/{env_id}").status_code == 200
    finally:
        for c in (op, op2, admin):
            c.close()


def test_a_detector_named_twice_is_one_lock(server: Server) -> None:
    """Issue 11: the same detector twice in one request answered 500 (a UNIQUE
    constraint in the store)."""
    with server.client(server.tokens["op"]) as op:  # type: ignore[attr-defined]
        r = op.post("/api/locks", json={"detectors": ["ZDC", "ZDC"], "action": "take"})
        assert r.status_code == 200 and r.json()["ZDC"]["holder"] == "op", r.text
        r = op.post("/api/locks", json={"detectors": ["ZDC", "ZDC"], "action": "release"})
        assert r.status_code == 200 and "ZDC" not in r.json(), r.text


def test_tokens_are_revoked(server: Server) -> None:
    t = server.tokens  # type: ignore[attr-defined]
    with server.client(t["admin"]) as c:
        made = c.post("/api/tokens", json={"role": "viewer", "name": "temp"}).json()
        with server.client(made["token"]) as v:
            assert v.get("/api/whoami").json() == {"id": made["id"], "name": "temp",
                                                    "role": "viewer"}  # fmt: skip
            assert c.delete(f"/api/tokens/{made['id']}").status_code == 200
            assert v.get("/api/whoami").status_code == 401
        listed = {x["id"]: x for x in c.get("/api/tokens").json()}
        assert listed[made["id"]]["revoked"] is not None
        assert "hash" not in listed[made["id"]]


def read_sse(url: str, token: str, last_id: int | None, stop: threading.Event,
             out: list[dict[str, Any]], limit: int) -> None:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"}
    if last_id is not None:
        headers["Last-Event-ID"] = str(last_id)
    try:
        with httpx.stream("GET", url + "/api/events/stream", headers=headers, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(json.loads(line[6:]))
                    if len(out) >= limit or stop.is_set():
                        return
    except httpx.HTTPError:
        if not stop.is_set():
            raise


def test_the_event_stream_is_live_and_resumes_without_gaps(server: Server) -> None:
    t = server.tokens  # type: ignore[attr-defined]
    with server.client(t["op"]) as c:
        first = c.get("/api/events", params={"limit": 10_000}).json()
        start = first[-1]["seq"]
        got: list[dict[str, Any]] = []
        stop = threading.Event()
        reader = threading.Thread(target=read_sse, args=(server.url, t["view"], start, stop,
                                                         got, 10**9), daemon=True)  # fmt: skip
        reader.start()
        env = c.post("/api/environments", json={"workflow": "hello"}).json()
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            c.post(f"/api/environments/{env['id']}/transitions", json={"event": event})
        c.delete(f"/api/environments/{env['id']}")
        stored = c.get("/api/events", params={"after": start, "limit": 10_000}).json()
        deadline = time.monotonic() + 60  # only stops a hung test
        while len(got) < len(stored) and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        assert [e["seq"] for e in got[: len(stored)]] == [e["seq"] for e in stored]
        assert [e["seq"] for e in stored] == list(range(start + 1, start + 1 + len(stored)))
        # resume from the middle: exactly the rest, no gap, no repeat
        middle = stored[len(stored) // 2]["seq"]
        rest: list[dict[str, Any]] = []
        read_sse(server.url, t["view"], middle, threading.Event(), rest,
                 len([e for e in stored if e["seq"] > middle]))  # fmt: skip
        assert [e["seq"] for e in rest] == [e["seq"] for e in stored if e["seq"] > middle]


def test_metrics(server: Server) -> None:
    with server.client() as anonymous:
        assert anonymous.get("/metrics").status_code == 401  # issue 11: a token is needed
    with server.client(server.tokens["view"]) as c:  # type: ignore[attr-defined]
        r = c.get("/metrics")
        assert r.status_code == 200
        text = r.text
    for family in ["corral_environments", "corral_tasks", "corral_transition_seconds_bucket",
                   "corral_events_total", "corral_api_request_seconds_bucket",
                   "corral_call_seconds_bucket"]:  # fmt: skip
        assert family in text, family


def test_task_logs_and_a_restart_keeps_every_record_and_every_task(tmp_path: Path) -> None:
    """A clean stop leaves the environment to the node agent; the next server takes it
    over as it is: RUNNING, the same process, the same run, every record kept."""
    data = tmp_path / "data"
    with Server(data, keep_agent=True) as s:
        with s.client(s.admin) as c:
            env = c.post(
                "/api/environments", json={"workflow": "hello", "vars": {"greeting": "hi there"}}
            ).json()
            for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
                c.post(f"/api/environments/{env['id']}/transitions", json={"event": event})
            task = c.get("/api/tasks", params={"env": env["id"]}).json()[0]
            deadline = time.monotonic() + 60  # only stops a hung test
            while time.monotonic() < deadline:
                log = c.get(f"/api/tasks/{task['id']}/log").json()
                if log["lines"]:
                    break
                time.sleep(0.05)
            assert log["lines"] == ["hi there"]
            run = c.get(f"/api/environments/{env['id']}").json()["run_number"]
            before = c.get("/api/events", params={"limit": 10_000}).json()
        admin = s.admin
    assert "keep running under the node agent" in s.output
    assert Path(f"/proc/{task['pid']}").exists(), "the task outlived the server"
    with Server(data) as s2:
        assert s2.admin == "", "the first admin token is printed only once"
        assert "re-attached to its 1 running tasks, RUNNING" in s2.log.read_text()
        with s2.client(admin) as c:
            envs = c.get("/api/environments").json()
            assert [e["state"] for e in envs] == ["RUNNING"] and envs[0]["id"] == env["id"]
            assert envs[0]["run_number"] == run and envs[0]["controlled"]
            [again] = c.get("/api/tasks", params={"env": env["id"]}).json()
            assert again["pid"] == task["pid"] and again["state"] == "RUNNING"
            after = c.get("/api/events", params={"limit": 10_000}).json()
            assert after[: len(before)] == before
            seqs = [e["seq"] for e in after]
            assert seqs == list(range(1, len(seqs) + 1))
            for event in ("STOP_ACTIVITY", "START_ACTIVITY"):  # it is driven as before
                r = c.post(f"/api/environments/{env['id']}/transitions", json={"event": event})
                assert r.status_code == 200, r.text
            assert r.json()["run_number"] == run + 1
            assert c.delete(f"/api/environments/{env['id']}").status_code == 200
    assert not Path(f"/proc/{task['pid']}").exists()


def test_after_a_crash_of_the_server_and_its_agent_the_restart_says_what_it_lost(
    tmp_path: Path,
) -> None:
    """kill -9 of the server re-attaches (the agent kept the task); kill -9 of the agent
    too takes the task with it: the restart finds it LOST, takes the environment over
    in ERROR, and RECOVER brings it back."""
    data = tmp_path / "data"
    s = Server(data, keep_agent=True)
    with s:
        with s.client(s.admin) as c:
            env = c.post("/api/environments", json={"workflow": "hello"}).json()
            for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
                c.post(f"/api/environments/{env['id']}/transitions", json={"event": event})
            pid = c.get("/api/tasks", params={"env": env["id"]}).json()[0]["pid"]
        assert s.proc is not None
        s.proc.kill()  # a crash: no teardown
        s.proc.wait()
        agent = s.agent_pid()
        assert agent is not None and Path(f"/proc/{pid}").exists(), "the agent keeps the task"
        os.kill(agent, signal.SIGKILL)  # the node agent dies too: its task with it
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the task ended with its agent")
    with Server(data) as s2:
        assert "was RUNNING" in s2.log.read_text()
        with s2.client(s.admin) as c:
            got = c.get(f"/api/environments/{env['id']}").json()
            assert got["state"] == "ERROR" and "restarted" in got["error"]
            assert got["controlled"], "taken over by the new server"
            [task] = c.get("/api/tasks", params={"env": env["id"], "node": "localhost"}).json()
            assert task["state"] == "LOST"
            assert c.get("/api/tasks", params={"node": "elsewhere"}).json() == []
            # taken over: RECOVER brings it back, with a new process
            r = c.post(f"/api/environments/{env['id']}/transitions", json={"event": "RECOVER"})
            assert r.status_code == 200 and r.json()["state"] == "DEPLOYED", r.text
            [task] = c.get("/api/tasks", params={"env": env["id"]}).json()
            assert task["state"] == "STANDBY" and task["pid"] not in (None, pid)
            assert c.delete(f"/api/environments/{env['id']}").status_code == 200


def test_priorities_through_the_api(tmp_path: Path) -> None:
    wf = tmp_path / "wf"
    (wf / "tasks").mkdir(parents=True)
    (wf / "work.yaml").write_text(
        "name: work\nroles:\n  - name: w-{{ i }}\n"
        "    for: {begin: '1', end: '3', var: i}\n    task: {load: worker}\n"
    )
    (wf / "tasks" / "worker.yaml").write_text(
        "name: worker\ncontrol: {mode: direct}\nwants: {cpu: 1}\ncommand: {value: /bin/w}\n"
    )
    inv = tmp_path / "nodes.yaml"
    inv.write_text("nodes:\n  - {name: n1, cpu: 4}\n")
    with Server(tmp_path / "data", "--backend", "sim", "--inventory", str(inv),
                "--workflows", str(wf)) as s, s.client(s.admin) as c:  # fmt: skip
        batch = c.post("/api/environments", json={"workflow": "work",
                       "vars": {"priority_class": "batch"}}).json()  # fmt: skip
        online = {"workflow": "work", "vars": {"priority_class": "online"}}
        assert c.post("/api/environments", json=online).status_code == 409
        dry = c.post("/api/environments", json={**online, "dry_run": True}).json()
        assert dry == {"dry_run": True, "fits": True, "evict": [batch["id"]], "protected": {}}
        r = c.post("/api/environments", json={**online, "preempt": True})
        assert r.status_code == 201 and r.json()["evicted"] == [batch["id"]]
        assert c.get(f"/api/environments/{batch['id']}").json()["state"] == "DONE"
        r = c.post("/api/environments", json={"workflow": "work",
                   "vars": {"priority_class": "batch"}, "preempt": True})  # fmt: skip
        assert r.status_code == 409 and r.json()["title"] == "Does not fit"
        r = c.post("/api/environments", json={"workflow": "work",
                   "vars": {"priority_class": "urgent"}})  # fmt: skip
        assert r.status_code == 422 and "priority_class 'urgent'" in r.json()["detail"]


def test_cordon_and_drain(tmp_path: Path) -> None:
    inv = tmp_path / "nodes.yaml"
    inv.write_text(
        "nodes:\n  - {name: a, cpu: 8, memory: 8000}\n  - {name: b, cpu: 8, memory: 8000}\n"
    )
    with Server(tmp_path / "data", "--backend", "sim", "--inventory", str(inv)) as s:
        t = tokens(s)
        with s.client(s.admin) as c, s.client(t["op"]) as op:
            pinned = {"workflow": "datataking", "vars": {"hosts": '["a"]', "epn_hosts": '["b"]'}}
            env = op.post("/api/environments", json=pinned).json()
            assert "id" in env, env
            assert op.post("/api/nodes/a/cordon", json={}).status_code == 403  # admins only
            assert c.post("/api/nodes/a/cordon", json={"cordoned": True}).json()["cordoned"]
            r = op.post("/api/environments", json=pinned)
            assert r.status_code == 409 and "a cordoned" in str(r.json()["errors"])
            dry = c.post("/api/nodes/a/drain", params={"dry_run": True}).json()
            assert dry["evict"] == [env["id"]]
            assert op.get(f"/api/environments/{env['id']}").json()["state"] == "STANDBY"
            assert c.post("/api/nodes/a/drain").json()["evict"] == [env["id"]]
            assert op.get(f"/api/environments/{env['id']}").json()["state"] == "DONE"
            assert c.post("/api/nodes/a/cordon", json={"cordoned": False}).status_code == 200
            assert op.post("/api/environments", json=pinned).status_code == 201
            assert c.post("/api/nodes/zz/drain").status_code == 404
            nodes = {n["name"]: n for n in c.get("/api/nodes").json()}
            on_a = c.get("/api/tasks", params={"node": "a", "state": "PENDING"}).json()
            assert nodes["a"]["cordoned"] is False
            assert nodes["a"]["allocated"]["tasks"] == len(on_a) >= 4  # flp chain + hook
            assert c.post("/api/nodes/b/cordon", json={"cordoned": True}).status_code == 200
    # a cordon outlives a restart of the server
    again = Server(tmp_path / "data", "--backend", "sim", "--inventory", str(inv))
    with again, again.client(s.admin) as c:
        nodes = {n["name"]: n for n in c.get("/api/nodes").json()}
        assert nodes["b"]["cordoned"] is True and nodes["a"]["cordoned"] is False
