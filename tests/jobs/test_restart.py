"""Jobs and services across a kill -9 of `corral serve`: the second failures.

Each test drives a real server and its real node agent, kills the server at a moment
that a plain "kill it while it runs" would rarely hit (the agent or the server frozen
with SIGSTOP makes the moment certain), starts the next server on the same data, and
checks what ran, how often, and how it ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.api.server import Server
from tests.jobs.test_jobs_api import SERVER, until

PY = sys.executable
# a unit that notes each start, then waits for its gate file (if it has one)
WORK = (
    "import os, sys, time\n"
    "i = sys.argv[1]\n"
    "open('ran', 'a').write(i + ' ')\n"
    "gate = sys.argv[2] if len(sys.argv) > 2 else None\n"
    "while gate and not os.path.exists(gate): time.sleep(0.01)\n"
    "sys.exit(int(os.environ.get('EXIT_' + i, '0')))\n"
)


def workflows(tmp: Path, **files: str) -> Path:
    wf = tmp / "workflows"
    jobs = wf / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "work.py").write_text(WORK)
    (jobs / "server.py").write_text(SERVER)
    for name, text in files.items():
        (jobs / f"{name}.yaml").write_text(text)
    return wf


def ran(wf: Path) -> list[str]:
    path = wf / "jobs" / "ran"
    return sorted(path.read_text().split()) if path.exists() else []


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def kill_9(s: Server) -> None:
    assert s.proc is not None
    s.proc.kill()
    s.proc.wait()


def gone(pid: int) -> bool:
    try:
        return ") Z " in Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True


def job_of(c: httpx.Client, job: str) -> dict[str, Any]:
    got: dict[str, Any] = c.get(f"/api/jobs/{job}").json()
    return got


def ended(c: httpx.Client, job: str) -> dict[str, Any]:
    done: dict[str, Any] = until("the job's end", lambda: (j := job_of(c, job))["state"] in (
        "SUCCEEDED", "FAILED", "CANCELLED") and j)  # fmt: skip
    return done


def test_units_whose_launch_was_under_way_and_that_ended_meanwhile_run_once(
    tmp_path: Path,
) -> None:
    wf = workflows(tmp_path, quick=(
        f"kind: batch\nname: quick\narray: 3\nwants: {{cpu: 0.1}}\n"
        f"command: {{value: {PY}, arguments: [work.py, '{{{{ index }}}}']}}\n"))  # fmt: skip
    with Server(tmp_path / "data", "--workflows", str(wf), keep_agent=True) as s:
        admin = s.admin
        agent = s.agent_pid()
        assert agent is not None
        with s.client(admin) as c, frozen(agent):
            # the agent hears the launches only once the server is dead: the units are
            # STARTING in the store, with no pid, when it dies
            job = c.post("/api/jobs", json={"file": "quick"}).json()["id"]
            until("3 starting", lambda: job_of(c, job)["counts"].get("STARTING") == 3)
            kill_9(s)
        # the agent (thawed) runs them; they end while no server runs; it holds their exits
        until("3 runs", lambda: len(ran(wf)) == 3)
    with Server(tmp_path / "data", "--workflows", str(wf)) as s, s.client(admin) as c:
        assert ended(c, job)["state"] == "SUCCEEDED"
    assert ran(wf) == ["0", "1", "2"]  # each once: their held exits were heard


def test_exits_the_dead_server_never_read_are_said_again_by_the_agent(tmp_path: Path) -> None:
    wf = workflows(tmp_path, gated=(
        f"kind: batch\nname: gated\narray: 3\nwants: {{cpu: 0.1}}\n"
        f"command: {{value: {PY}, arguments: [work.py, '{{{{ index }}}}', gate]}}\n"))  # fmt: skip
    with Server(tmp_path / "data", "--workflows", str(wf), keep_agent=True) as s:
        admin = s.admin
        with s.client(admin) as c:
            job = c.post("/api/jobs", json={"file": "gated"}).json()["id"]
            until("3 running", lambda: job_of(c, job)["counts"].get("RUNNING") == 3)
            pids = [st["pid"] for st in job_of(c, job)["steps"]]
        assert s.proc is not None
        with frozen(s.proc.pid):  # it reads nothing more: the exits stay in its socket
            (wf / "jobs" / "gate").touch()
            for pid in pids:
                until(f"unit {pid} gone", lambda pid=pid: gone(pid))
            s.proc.kill()
        s.proc.wait()
    with Server(tmp_path / "data", "--workflows", str(wf)) as s, s.client(admin) as c:
        assert ended(c, job)["state"] == "SUCCEEDED"
        assert "queued again" not in s.log.read_text()
    assert ran(wf) == ["0", "1", "2"]  # none ran again


def test_a_unit_that_failed_for_good_stays_failed_and_a_dag_stays_stopped(
    tmp_path: Path,
) -> None:
    wf = workflows(tmp_path, flow=(
        "kind: dag\nname: flow\nfailure: stop\nsteps:\n"
        f"  - {{name: a, command: {{value: {PY}, arguments: [work.py, a],"
        " env: [EXIT_a=3]}}\n"
        f"  - {{name: b, needs: [a], command: {{value: {PY}, arguments: [work.py, b]}}}}\n"
        f"  - {{name: c, command: {{value: {PY}, arguments: [work.py, c, gate]}}}}\n"))  # fmt: skip
    with Server(tmp_path / "data", "--workflows", str(wf), keep_agent=True) as s:
        admin = s.admin
        with s.client(admin) as c:
            job = c.post("/api/jobs", json={"file": "flow"}).json()["id"]
            until("a failed, c running", lambda: (j := job_of(c, job))["counts"].get(
                "FAILED") == 1 and j["counts"].get("RUNNING") == 1)  # fmt: skip
        kill_9(s)
    with Server(tmp_path / "data", "--workflows", str(wf)) as s, s.client(admin) as c:
        (wf / "jobs" / "gate").touch()
        done = ended(c, job)
        assert done["state"] == "FAILED", done
        states = {st["name"]: st["state"] for st in done["steps"]}
        assert states == {"a": "FAILED", "b": "BLOCKED", "c": "SUCCEEDED"}, done
    assert ran(wf) == ["a", "c"]  # a not run again, b never (failure: stop)


def test_a_cancel_under_way_at_the_kill_still_cancels(tmp_path: Path) -> None:
    stubborn = (  # it ends on SIGTERM only once its gate is there
        "import os, signal, sys, time\n"
        "open('ran', 'a').write('s ')\n"
        "signal.signal(signal.SIGTERM, lambda *a: None)\n"
        "while not os.path.exists('gate'): time.sleep(0.01)\n"
    )
    wf = workflows(tmp_path, stubborn=(
        "kind: batch\nname: stubborn\nwants: {cpu: 0.1}\n"
        "retries: {count: 2, backoff: 100ms}\n"
        f"command: {{value: {PY}, arguments: [stubborn.py]}}\n"))  # fmt: skip
    (wf / "jobs" / "stubborn.py").write_text(stubborn)
    with Server(tmp_path / "data", "--workflows", str(wf), keep_agent=True) as s:
        admin = s.admin
        with s.client(admin) as c:
            job = c.post("/api/jobs", json={"file": "stubborn"}).json()["id"]
            until("running", lambda: job_of(c, job)["counts"].get("RUNNING") == 1)
            auth = {"Authorization": f"Bearer {admin}"}
            with httpx.Client(base_url=s.url, headers=auth, timeout=0.5) as quick, \
                    contextlib.suppress(httpx.TimeoutException):  # fmt: skip
                quick.delete(f"/api/jobs/{job}")  # (it answers once the unit ended: never)
            until("ending", lambda: job_of(c, job)["counts"].get("ENDING") == 1)
        kill_9(s)
    with Server(tmp_path / "data", "--workflows", str(wf)) as s, s.client(admin) as c:
        done = ended(c, job)  # its stop is ordered again, and ends it (SIGKILL after grace)
        assert done["state"] == "CANCELLED", done
    assert ran(wf) == ["s"]  # not tried again


def test_a_clean_stop_starts_no_replica_and_leaves_no_secret(tmp_path: Path) -> None:
    wf = workflows(tmp_path, web=(
        "kind: service\nname: web\nreplicas: 2\nwants: {cpu: 0.1, ports: 1}\n"
        "secrets: [pw]\n"
        f"command: {{value: {PY}, arguments: [server.py]}}\n"
        "health: {http: {path: /metrics}, interval: 200ms, timeout: 200ms}\n"))  # fmt: skip
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf)) as s, s.client(s.admin) as c:
        assert c.put("/api/secrets/pw", json={"value": "s3cr3t-value"}).status_code < 300
        assert c.post("/api/jobs", json={"file": "web"}).status_code == 201
        until("2 healthy", lambda: len(c.get("/api/catalog/web").json()) == 2)
        pids = [m["pid"] for m in c.get("/api/services/web").json()["members"]]
    # stopped with Ctrl-C: its replicas ended, none started in their place
    notes = [e for e in _events(data) if e.get("service") == "web"]
    stopped_at = max(i for i, e in enumerate(notes) if e.get("healthy") == 2)
    assert not [e for e in notes[stopped_at:] if "restart" in str(e.get("note"))], notes
    assert _replica_rows(data) == []
    for pid in pids:
        until(f"replica {pid} gone", lambda pid=pid: gone(pid))
    with sqlite3.connect(data / "corral.db") as db:
        mark = db.execute("SELECT value FROM meta WHERE key = 'service-mark'").fetchone()[0]
    assert list(Path("/dev/shm").glob(f"corral-secrets-svc-{mark}-*")) == []


def _events(data: Path) -> list[dict[str, Any]]:
    import json

    with sqlite3.connect(data / "corral.db") as db:
        return [json.loads(row[0]) for row in db.execute("SELECT body FROM events ORDER BY seq")]


def _replica_rows(data: Path) -> list[Any]:
    with sqlite3.connect(data / "corral.db") as db:
        return db.execute("SELECT * FROM service_replicas").fetchall()


def test_when_only_the_node_agent_dies_its_units_and_replicas_start_again(
    tmp_path: Path,
) -> None:
    wf = workflows(tmp_path, two=(
        f"kind: batch\nname: two\narray: 2\nwants: {{cpu: 0.1}}\n"
        f"command: {{value: {PY}, arguments: [work.py, '{{{{ index }}}}', gate]}}\n"), web=(
        "kind: service\nname: web\nreplicas: 1\nwants: {cpu: 0.1, ports: 1}\n"
        f"command: {{value: {PY}, arguments: [server.py]}}\n"
        "health: {http: {path: /metrics}, interval: 200ms, timeout: 200ms}\n"))  # fmt: skip
    with Server(tmp_path / "data", "--workflows", str(wf)) as s, s.client(s.admin) as c:
        job = c.post("/api/jobs", json={"file": "two"}).json()["id"]
        assert c.post("/api/jobs", json={"file": "web"}).status_code == 201
        until("2 running", lambda: job_of(c, job)["counts"].get("RUNNING") == 2)
        until("web healthy", lambda: len(c.get("/api/catalog/web").json()) == 1)
        first = c.get("/api/services/web").json()["members"][0]["pid"]
        agent = s.agent_pid()
        assert agent is not None
        os.kill(agent, signal.SIGKILL)  # its tasks die with it; the server lives on
        until("2 running again", lambda: len(ran(wf)) == 4)

        def healthy() -> list[int]:
            return [m["pid"] for m in c.get("/api/services/web").json()["members"]
                    if m["healthy"]]  # fmt: skip

        until("web healthy again", lambda: healthy() not in ([], [first]))
        (wf / "jobs" / "gate").touch()
        done = ended(c, job)
        assert done["state"] == "SUCCEEDED", done
        assert [st["attempt"] for st in done["steps"]] == [1, 1], done  # (not a try)
