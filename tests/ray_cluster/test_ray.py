"""corral on a real Ray cluster of four nodes on this machine (127.0.0.2-5, token auth):
placement by labels, data crossing nodes, a server restart that touches nothing, a
node lost. One cluster for the module (it takes a while to start); the node-loss test
runs last, as it takes a node away."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server import Server
from tests.conftest import EXAMPLES
from tests.faults.processes import of_environment
from tests.faults.test_server_kill import transition, wait_for
from tests.ray_cluster.cluster import RayCluster, ray_available

pytestmark = pytest.mark.skipif(not ray_available(), reason="ray is not installed")

HEAD = {"name": "flp1", "role": "flp"}  # 127.0.0.2
WORKERS = [
    {"name": "flp2", "role": "flp"},  # 127.0.0.3
    {"name": "epn1", "role": "epn"},  # 127.0.0.4
    {"name": "epn2", "role": "epn"},  # 127.0.0.5
]
SPREAD = """
name: spread
roles:
  - name: w-{{ i }}
    for: {begin: "1", end: "4", var: i}
    constraints: [{attribute: role, value: flp}]
    task: {load: sleeper}
"""
SLEEPER = (
    "name: sleeper\ncontrol: {mode: basic}\ncommand: {value: /bin/sleep, arguments: ['600']}\n"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    tmp = tmp_path_factory.mktemp("ray")
    c = RayCluster(tmp, HEAD, WORKERS)
    saved = {k: os.environ.get(k) for k in c.env}
    try:
        c.start()
        os.environ.update(c.env)  # the servers these tests start are Ray drivers
        yield c
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        c.stop()


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    wf = tmp_path / "wf"
    (wf / "tasks").mkdir(parents=True)
    (wf / "spread.yaml").write_text(SPREAD)
    (wf / "tasks" / "sleeper.yaml").write_text(SLEEPER)
    for f in Path(EXAMPLES).glob("*.yaml"):
        (wf / f.name).write_text(f.read_text())
    for f in Path(EXAMPLES, "tasks").glob("*.yaml"):
        (wf / "tasks" / f.name).write_text(f.read_text())
    os.symlink(Path(EXAMPLES, "programs"), wf / "programs")
    return wf


def serve(c: RayCluster, tmp: Path, wf: Path, **kw: Any) -> Server:
    return Server(tmp / "data", "--backend", "ray", "--ray-address", c.address,
                  "--workflows", str(wf), **kw)  # fmt: skip


def to_running(client: httpx.Client, env_id: str) -> None:
    for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
        r = transition(client, env_id, event)
        assert r.status_code == 200, r.text


DATATAKING = {"hosts": '["flp1","flp2"]', "epn_hosts": '["epn1","epn2"]', "epn_nmin": "1",
              "pipelines": "1", "readout_rate": "200"}  # fmt: skip


def test_nodes_come_from_ray_and_tasks_are_placed_by_labels(
    cluster: RayCluster, tmp_path: Path, workflows: Path
) -> None:
    with serve(cluster, tmp_path, workflows) as s, s.client(s.admin) as c:
        nodes = {n["name"]: n for n in c.get("/api/nodes").json()}
        assert set(nodes) == {"flp1", "flp2", "epn1", "epn2"}
        assert nodes["flp1"]["labels"]["role"] == "flp" and nodes["epn2"]["cpu"] == 2.0
        env_id = c.post("/api/environments", json={"workflow": "spread"}).json()["id"]
        to_running(c, env_id)
        tasks = c.get("/api/tasks", params={"env": env_id}).json()
        assert {t["node"] for t in tasks} == {"flp1", "flp2"}  # spread over the flp nodes
        assert all(t["pid"] in of_environment(env_id) for t in tasks)
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
        wait_for(lambda: not of_environment(env_id), "no process left after destroy")


def qc_counts(c: httpx.Client, env_id: str) -> int:
    [qc] = [t for t in c.get("/api/tasks", params={"env": env_id}).json()
            if t["path"].endswith(".qc")]  # fmt: skip
    lines = c.get(f"/api/tasks/{qc['id']}/log", params={"lines": 50}).json()["lines"]
    counts = [int(m.group(1)) for m in map(re.compile(r"messages=(\d+)").search, lines) if m]
    return max(counts, default=0)


def test_the_data_taking_example_runs_spread_over_four_nodes(
    cluster: RayCluster, tmp_path: Path, workflows: Path
) -> None:
    with serve(cluster, tmp_path, workflows) as s, s.client(s.admin) as c:
        r = c.post("/api/environments", json={"workflow": "datataking", "vars": DATATAKING})
        assert r.status_code == 201, r.text
        env_id = r.json()["id"]
        to_running(c, env_id)
        tasks = c.get("/api/tasks", params={"env": env_id}).json()
        on = {t["path"].split(".")[1]: t["node"] for t in tasks}
        assert on["flp-flp1"] == "flp1" and on["flp-flp2"] == "flp2"
        assert on["epn-epn1"] == "epn1" and on["epn-epn2"] == "epn2"
        # tcp channels carry their node's address: data crosses nodes
        env = c.get(f"/api/environments/{env_id}").json()
        tcp = {ch["address"] for ch in env["channels"] if ch["address"].startswith("tcp://")}
        assert any("127.0.0.4" in a for a in tcp), tcp  # the distributor, on epn1
        wait_for(lambda: qc_counts(c, env_id) > 0, "QC counts what arrives")
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
        wait_for(lambda: not of_environment(env_id), "no process left after destroy")


def test_kill_9_of_the_server_then_a_restart_touches_no_task(
    cluster: RayCluster, tmp_path: Path, workflows: Path
) -> None:
    with serve(cluster, tmp_path, workflows) as s1:
        token = s1.admin
        with s1.client(token) as c:
            env_id = c.post("/api/environments", json={"workflow": "spread"}).json()["id"]
            to_running(c, env_id)
            before = {t["id"]: t["pid"] for t in c.get("/api/tasks", params={"env": env_id})
                      .json()}  # fmt: skip
            run = c.get(f"/api/environments/{env_id}").json()["run_number"]
        assert s1.proc is not None
        s1.proc.kill()
        s1.proc.wait()
    assert set(of_environment(env_id)) == set(before.values()), "the agents keep the tasks"
    with serve(cluster, tmp_path, workflows) as s2, s2.client(token) as c:
        env = c.get(f"/api/environments/{env_id}").json()
        assert env["state"] == "RUNNING" and env["run_number"] == run and env["controlled"]
        after = {t["id"]: t["pid"] for t in c.get("/api/tasks", params={"env": env_id}).json()}
        assert after == before, "the same processes, re-attached"
        for event in ("STOP_ACTIVITY", "START_ACTIVITY"):
            assert transition(c, env_id, event).status_code == 200
        events = c.get("/api/events", params={"limit": 10_000}).json()
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
        wait_for(lambda: not of_environment(env_id), "no process left after destroy")


def test_a_lost_node_makes_its_tasks_lost_and_nmin_decides(
    cluster: RayCluster, tmp_path: Path, workflows: Path
) -> None:
    """Runs last: it takes a worker node away."""
    with serve(cluster, tmp_path, workflows) as s, s.client(s.admin) as c:
        r = c.post("/api/environments", json={"workflow": "datataking", "vars": DATATAKING})
        env_id = r.json()["id"]
        to_running(c, env_id)
        on_epn2 = [t for t in c.get("/api/tasks", params={"env": env_id}).json()
                   if t["node"] == "epn2"]  # fmt: skip
        assert on_epn2
        t0 = time.monotonic()
        cluster.kill_worker(2)  # epn2

        def lost() -> bool:
            got = c.get("/api/tasks", params={"env": env_id, "node": "epn2"}).json()
            return all(t["state"] == "LOST" for t in got)

        wait_for(lost, "the tasks of the lost node LOST")
        print(f"node loss seen in {time.monotonic() - t0:.2f} s")
        env = c.get(f"/api/environments/{env_id}").json()
        assert env["state"] == "RUNNING", "one of two EPNs may go (nmin 1)"
        events = c.get("/api/events", params={"env": env_id, "limit": 10_000}).json()
        assert any(e.get("state") == "LOST" and "epn2" in json.dumps(e) for e in events)
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
        wait_for(lambda: not of_environment(env_id), "no process left after destroy")


def test_after_a_node_is_lost_recover_places_its_tasks_elsewhere_and_the_inventory_follows(
    cluster: RayCluster, tmp_path: Path, workflows: Path
) -> None:
    """Runs after the node loss (epn2 is gone): a new server sees epn2's absence; the
    tasks of a node lost under it are placed elsewhere by RECOVER; a node that joins
    (under the lost one's name) is in the inventory at once and placed on."""
    with serve(cluster, tmp_path, workflows) as s, s.client(s.admin) as c:
        nodes = {n["name"]: n for n in c.get("/api/nodes").json()}
        assert "epn2" not in nodes or nodes["epn2"]["down"]
        r = c.post("/api/environments", json={"workflow": "datataking", "vars": {
            **DATATAKING, "epn_hosts": '["epn2"]'}})  # fmt: skip
        assert r.status_code == 409 and "epn2" in r.text, r.text  # nothing goes there now
        env_id = c.post("/api/environments", json={"workflow": "spread"}).json()["id"]
        to_running(c, env_id)
        tasks = c.get("/api/tasks", params={"env": env_id}).json()
        node = "flp2"  # a worker (the spread puts two of the four tasks there)
        assert any(t["node"] == node for t in tasks), tasks
        cluster.kill_worker(0)
        wait_for(lambda: c.get(f"/api/environments/{env_id}").json()["state"] == "ERROR",
                 "a lost critical task: ERROR")  # fmt: skip
        r = transition(c, env_id, "RECOVER")
        assert r.status_code == 200, r.text
        tasks = c.get("/api/tasks", params={"env": env_id}).json()
        assert all(t["node"] != node for t in tasks), "placed again, off the lost node"
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
        # a node joins under the name a lost one had: placed on, as any node
        cluster.add_worker({"name": "epn2", "role": "epn"}, "127.0.0.6")

        def epn2_up() -> bool:
            got = {n["name"]: n for n in c.get("/api/nodes").json()}
            return "epn2" in got and not got["epn2"]["down"]

        wait_for(epn2_up, "the joining node in the inventory")
        r = c.post("/api/environments", json={"workflow": "datataking", "vars": {
            **DATATAKING, "hosts": '["flp1"]', "epn_hosts": '["epn2"]'}})  # fmt: skip
        assert r.status_code == 201, r.text
        env_id = r.json()["id"]
        to_running(c, env_id)
        assert {t["node"] for t in c.get("/api/tasks", params={"env": env_id}).json()
                if ".epn-" in t["path"]} == {"epn2"}  # fmt: skip
        assert c.delete(f"/api/environments/{env_id}").status_code == 200


REPLICA = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(os.environ["CORRAL_ADDRESS"].encode())
    def log_message(self, *a):
        pass
http.server.HTTPServer((os.environ["CORRAL_ADDRESS"], int(os.environ["CORRAL_PORT"])),
                       H).serve_forever()
"""


def test_jobs_and_services_run_on_the_cluster(
    cluster: RayCluster, tmp_path: Path, workflows: Path
) -> None:
    import sys

    jobs = workflows / "jobs"
    jobs.mkdir()
    (jobs / "replica.py").write_text(REPLICA)
    (jobs / "epn-work.yaml").write_text(
        "kind: batch\nname: epn-work\narray: 4\nwants: {cpu: 1}\n"
        "constraints: [{attribute: role, value: epn}]\n"
        "command: {value: /bin/sh, arguments: ['-c', 'echo $CORRAL_JOB_INDEX']}\n"
    )
    (jobs / "flp-web.yaml").write_text(
        f"kind: service\nname: flp-web\nreplicas: 2\nwants: {{cpu: 0.5, ports: 1}}\n"
        "constraints: [{attribute: role, value: flp}]\n"
        f"command: {{value: {sys.executable}, arguments: [replica.py]}}\n"
        "health: {http: {path: /}, interval: 500ms, timeout: 500ms}\n"
        "restart: {initial: 200ms}\n"
    )
    with serve(cluster, tmp_path, workflows) as s, s.client(s.admin) as c:
        job = c.post("/api/jobs", json={"file": "epn-work"}).json()["id"]
        wait_for(lambda: c.get(f"/api/jobs/{job}").json()["state"] == "SUCCEEDED",
                 "the batch job done on the epn nodes")  # fmt: skip
        steps = c.get(f"/api/jobs/{job}").json()["steps"]
        assert {st["node"] for st in steps} <= {"epn1", "epn2"}
        assert c.post("/api/jobs", json={"file": "flp-web"}).status_code == 201
        wait_for(lambda: len(c.get("/api/catalog/flp-web").json()) == 2, "2 healthy replicas")
        eps = c.get("/api/catalog/flp-web").json()
        assert {e["node"] for e in eps} <= {"flp1", "flp2"}  # where the constraint says
        for e in eps:  # reached at its node's address, as the catalog says
            assert httpx.get(f"http://{e['address']}:{e['port']}/").text == e["address"]
        before = {m["slot"]: m["pid"] for m in c.get("/api/services/flp-web").json()["members"]}
        os.kill(before[0], 9)
        wait_for(lambda: {m["slot"]: m["pid"] for m in c.get("/api/services/flp-web").json()
                          ["members"] if m["healthy"]}.get(0) not in (None, before[0]),
                 "replica 0 restarted")  # fmt: skip
        assert c.delete("/api/services/flp-web").status_code == 200
