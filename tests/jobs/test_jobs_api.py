"""Jobs, services and the catalog through a real `corral serve` on 127.0.0.1.

Job files come from the server's jobs directory by name; operators submit, viewers
read; the catalog lists the healthy endpoints of services, also as Prometheus
``http_sd_configs`` target groups and Traefik's HTTP provider configuration. A real
Prometheus (Debian's package) discovers the replicas through corral and scrapes them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server import Server

PY = sys.executable
PATIENCE = 120.0  # only stops a hung test

SERVER = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"corral_test_replica_up 1\\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["CORRAL_PORT"])), H).serve_forever()
"""


def until(what: str, cond: Callable[[], Any]) -> Any:
    end = time.monotonic() + PATIENCE
    while time.monotonic() < end:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("jobs-api")
    wf = tmp / "workflows"
    jobs = wf / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "server.py").write_text(SERVER)
    (wf / "uses-web.yaml").write_text(
        "name: uses-web\nroles:\n  - name: client\n    task:\n      load: client\n"
    )
    (wf / "tasks").mkdir()
    (wf / "tasks" / "client.yaml").write_text(
        "name: client\ncontrol: {mode: basic}\ncommand:\n  value: /bin/echo\n"
        "  arguments: ['{{ service.Endpoints(\"web\") }}', '{{ service.Endpoints(\"nope\") }}']\n"
    )
    (jobs / "count.yaml").write_text(
        f"kind: batch\nname: count\narray: 3\nwants: {{cpu: 0.1}}\ncommand:\n  value: {PY}\n"
        "  arguments: ['-c', \"print('instance {{ index }}'); open('c{{ index }}', 'w')\"]\n"
    )
    (jobs / "qa.makeflow").write_text(
        "a.txt:\n\techo a > a.txt\nb.txt: a.txt\n\tcat a.txt a.txt > b.txt\n"
    )
    (jobs / "web.yaml").write_text(
        f"kind: service\nname: web\nreplicas: 2\nwants: {{cpu: 0.1, ports: 1}}\n"
        f"command: {{value: {PY}, arguments: [server.py]}}\n"
        "health: {http: {path: /metrics}, interval: 200ms, timeout: 200ms}\n"
    )
    (jobs / "hot.yaml").write_text(
        "kind: batch\nname: hot\npriority_class: online\ncommand: {value: /bin/true}\n"
    )
    (jobs / "broken.yaml").write_text("kind: batch\nname: broken\ncommand: {valu: x}\n")
    (jobs / "hourly.yaml").write_text(
        "kind: periodic\nname: hourly\nschedule: '@hourly'\n"
        "job: {kind: batch, command: {value: /bin/true}}\n"
    )
    (jobs / "latin1.yaml").write_bytes(b"kind: periodic\nname: caf\xe9\n")  # not UTF-8
    os.mkfifo(jobs / "fifo.yaml")  # a server that reads it would hang at its start
    (jobs / "dir.yaml").mkdir()
    (jobs / "secretive.yaml").write_text(
        "kind: batch\nname: secretive\nsecrets: [db-password]\ncommand:\n  value: /bin/sh\n"
        "  arguments: ['-c', 'cp \"$CORRAL_SECRETS_DIR/db-password\" got-secret.txt; "
        'echo "$CORRAL_SECRETS_DIR" > secret-dir.txt; echo copied\']\n'
    )
    (jobs / "no-such-secret.yaml").write_text(
        "kind: batch\nname: nosecret\nsecrets: [nope]\ncommand: {value: /bin/true}\n"
    )
    with Server(tmp / "data", "--workflows", str(wf)) as s:
        tokens = {"admin": s.admin}
        with s.client(s.admin) as c:
            for role in ("operator", "viewer"):
                r = c.post("/api/tokens", json={"role": role, "name": role})
                assert r.status_code == 201, r.text
                tokens[role] = r.json()["token"]
        yield s, tokens
        s.stop()


def test_batch_and_makeflow_jobs_run_by_name(server: tuple[Server, dict[str, str]]) -> None:
    s, tokens = server
    jobs_dir = Path(s.data).parent / "workflows" / "jobs"
    with s.client(tokens["operator"]) as op, s.client(tokens["viewer"]) as viewer:
        assert {f["file"] for f in viewer.get("/api/job-files").json()} >= {
            "count.yaml", "qa.makeflow", "web.yaml"}  # fmt: skip
        r = op.post("/api/jobs", json={"file": "count"})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["owner"] == "operator" and job["units"] == 3
        done = until("the batch job", lambda: (j := viewer.get(f"/api/jobs/{job['id']}").json())
                     ["state"] in ("SUCCEEDED", "FAILED") and j)  # fmt: skip
        assert done["state"] == "SUCCEEDED", done
        assert [st["state"] for st in done["steps"]] == ["SUCCEEDED"] * 3
        log = viewer.get(f"/api/jobs/{job['id']}/log", params={"index": 2}).json()
        assert log["lines"] == ["instance 2"]
        assert all((jobs_dir / f"c{i}").exists() for i in range(3))  # ran in its directory
        r = op.post("/api/jobs", json={"file": "qa.makeflow"})
        assert r.status_code == 201, r.text
        mf = r.json()
        until("the makeflow", lambda: viewer.get(f"/api/jobs/{mf['id']}").json()["state"]
              == "SUCCEEDED")  # fmt: skip
        assert (jobs_dir / "b.txt").read_text() == "a\na\n"
        assert {j["id"] for j in viewer.get("/api/jobs").json()} >= {job["id"], mf["id"]}
        # viewers read, never submit; names stay inside the jobs directory
        assert viewer.post("/api/jobs", json={"file": "count"}).status_code == 403
        r = op.post("/api/jobs", json={"file": "../../etc/passwd"})
        assert r.status_code == 422 and "outside the jobs directory" in r.json()["detail"]
        assert op.post("/api/jobs", json={"file": "nope"}).status_code == 404
        assert op.post("/api/jobs", json={"file": "fifo"}).status_code == 404
        r = op.post("/api/jobs", json={"file": "latin1"})
        assert r.status_code == 422 and "cannot read" in r.json()["detail"], r.text
        r = op.post("/api/jobs", json={"file": "broken"})
        assert r.status_code == 422 and "broken.yaml:3:" in r.json()["detail"], r.text
        r = op.post("/api/jobs", json={"file": "hot"})  # online is above an operator's
        assert r.status_code == 403 and "priority class online" in r.json()["detail"]
        r = op.post("/api/jobs", json={"file": "count", "cmd": "rm -rf /"})
        assert r.status_code == 422
        assert viewer.get("/api/jobs/jnosuchjob1").status_code == 404
        r = op.post(f"/api/jobs/{job['id']}/resume")
        assert r.status_code == 409 and "only a failed or cancelled job" in r.json()["detail"]


def test_services_and_the_catalog(server: tuple[Server, dict[str, str]]) -> None:
    s, tokens = server
    with s.client(tokens["operator"]) as op, s.client(tokens["viewer"]) as viewer:
        r = op.post("/api/jobs", json={"file": "web"})
        assert r.status_code == 201, r.text
        eps = until("2 healthy replicas", lambda: len(
            e := viewer.get("/api/catalog/web").json()) == 2 and e)  # fmt: skip
        assert {e["address"] for e in eps} == {"127.0.0.1"}
        targets = sorted(f"127.0.0.1:{e['port']}" for e in eps)
        sd = viewer.get("/api/sd/prometheus").json()
        assert sd == [{"targets": targets, "labels": {"corral_service": "web",
                                                       "corral_node": eps[0]["node"]}}]  # fmt: skip
        tr = viewer.get("/api/sd/traefik").json()
        router = {"rule": "PathPrefix(`/web`)", "service": "web", "middlewares": ["web-strip"]}
        assert tr["http"]["routers"]["web"] == router
        assert tr["http"]["middlewares"] == {"web-strip": {"stripPrefix": {"prefixes": ["/web"]}}}
        log = viewer.get("/api/services/web/log", params={"slot": 0})
        assert log.status_code == 200 and log.json()["path"].endswith("/0.log")
        urls = sorted(x["url"] for x in tr["http"]["services"]["web"]["loadBalancer"]["servers"])
        assert urls == [f"http://{t}" for t in targets]
        for t in targets:  # what the catalog says answers
            assert httpx.get(f"http://{t}/metrics").text.startswith("corral_test_replica_up")
        metrics = viewer.get("/metrics").text
        assert 'corral_service_replicas{kind="healthy",service="web"} 2.0' in metrics
        assert 'corral_jobs{priority_class="batch",state="SUCCEEDED"}' in metrics
        # templates read the catalog: service.Endpoints("web") is its healthy endpoints
        r = viewer.post("/api/workflows/render", json={"workflow": "uses-web"})
        assert r.status_code == 200, r.text
        plan = r.json()
        args = plan["tasks"][0]["command"]["arguments"]
        assert sorted(args[0].split(",")) == targets
        assert args[1] == '{"error":"service.Endpoints: no service \'nope\'"}', args
        assert any("no service 'nope'" in w for w in plan.get("warnings", [])), plan
        before = {m["slot"]: m["pid"] for m in viewer.get("/api/services/web").json()["members"]}
        r = op.post("/api/services/web/scale", json={"replicas": 3})
        assert r.status_code == 200, r.text
        until("3 healthy replicas", lambda: len(viewer.get("/api/catalog/web").json()) == 3)
        after = {m["slot"]: m["pid"] for m in viewer.get("/api/services/web").json()["members"]}
        assert {k: after[k] for k in before} == before
        assert viewer.post("/api/services/web/scale", json={"replicas": 1}).status_code == 403
        assert op.post("/api/services/web/scale", json={"replicas": -1}).status_code == 422
        assert viewer.get("/api/services/nope").status_code == 404
        assert op.delete("/api/services/web").status_code == 200
        assert viewer.get("/api/catalog").json() == {}
        assert viewer.get("/api/sd/traefik").json() == {}
        for pid in after.values():
            until(f"replica {pid} ended", lambda pid=pid: not _alive(pid))


needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed"
)


@needs_prometheus
def test_prometheus_discovers_the_replicas_and_scrapes_them(
    server: tuple[Server, dict[str, str]], tmp_path: Path
) -> None:
    s, tokens = server
    with s.client(tokens["operator"]) as op:
        assert op.post("/api/jobs", json={"file": "web"}).status_code == 201
    with s.client(tokens["viewer"]) as viewer:
        eps = until("2 healthy replicas", lambda: len(
            e := viewer.get("/api/catalog/web").json()) == 2 and e)  # fmt: skip
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global: {{scrape_interval: 1s, scrape_timeout: 1s}}
scrape_configs:
  - job_name: corral-services
    http_sd_configs:
      - url: {s.url}/api/sd/prometheus
        refresh_interval: 1s
        authorization: {{type: Bearer, credentials: {tokens["viewer"]}}}
""")
    with open(tmp_path / "prometheus.log", "wb") as log:
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )  # fmt: skip
    try:
        api = f"http://127.0.0.1:{port}/api/v1"

        def scraped() -> list[dict[str, Any]] | None:
            try:
                active = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
            except (httpx.HTTPError, ValueError, KeyError):
                return None
            up = [t for t in active if t["health"] == "up"]
            return up if len(up) == 2 else None

        up = until("prometheus scraping both replicas", scraped)
        assert sorted(t["labels"]["instance"] for t in up) == sorted(
            f"127.0.0.1:{e['port']}" for e in eps)  # fmt: skip
        assert {t["labels"]["corral_service"] for t in up} == {"web"}

        def queried() -> list[Any] | None:
            q = httpx.get(
                f"{api}/query", params={"query": 'corral_test_replica_up{corral_service="web"}'}
            )
            result = q.json()["data"]["result"]
            return result if len(result) == 2 else None

        assert {r["value"][1] for r in until("the scraped series", queried)} == {"1"}
    finally:
        prom.send_signal(signal.SIGTERM)
        try:
            prom.wait(30)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        with s.client(tokens["operator"]) as op:
            op.delete("/api/services/web")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().split(") ")[1].startswith("Z")
    except OSError:
        return False


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SECRET = "s3cr3t-4f9e1c7b-never-print-me"


def test_a_secret_is_nowhere_but_in_the_jobs_file(server: tuple[Server, dict[str, str]]) -> None:
    s, tokens = server
    jobs_dir = Path(s.data).parent / "workflows" / "jobs"
    answers: list[str] = []
    with s.client(tokens["admin"]) as admin, s.client(tokens["operator"]) as op:
        r = admin.put("/api/secrets/db-password", json={"value": SECRET})
        assert r.status_code == 200, r.text
        answers.append(r.text)
        r = op.post("/api/jobs", json={"file": "secretive"})
        assert r.status_code == 201, r.text
        answers.append(r.text)
        job = r.json()["id"]
        done = until("the job", lambda: (j := op.get(f"/api/jobs/{job}")).json()["state"]
                     in ("SUCCEEDED", "FAILED") and j)  # fmt: skip
        answers.append(done.text)
        assert done.json()["state"] == "SUCCEEDED", done.text
        answers += [op.get(p).text for p in ("/api/jobs", "/api/events", f"/api/jobs/{job}/log")]
        answers.append(admin.get("/api/secrets").text)
        # a job that names a secret nobody put is refused when it is submitted
        r = op.post("/api/jobs", json={"file": "no-such-secret"})
        assert r.status_code == 422 and "its secrets: no secret 'nope'" in r.text, r.text
    assert (jobs_dir / "got-secret.txt").read_text() == SECRET  # the job had it
    secret_dir = (jobs_dir / "secret-dir.txt").read_text().strip()
    assert secret_dir.startswith("/dev/shm/corral-secrets-")
    until("its secrets' directory removed", lambda: not os.path.exists(secret_dir))
    needle = SECRET.encode()
    for text in answers:
        assert SECRET not in text
    found = []
    for root in (s.data, Path(s.log)):
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for p in paths:
            if needle in p.read_bytes():
                found.append(str(p))
    for pid in (s.proc.pid, s.agent_pid()):  # the server's and its node agent's
        assert pid is not None
        for part in ("environ", "cmdline"):
            if needle in Path(f"/proc/{pid}/{part}").read_bytes():
                found.append(f"/proc/{pid}/{part}")
    others = [p for p in jobs_dir.iterdir() if p.is_file() and needle in p.read_bytes()]
    assert found == [] and others == [jobs_dir / "got-secret.txt"], (found, others)
    leftovers = [p for p in Path("/dev/shm").glob("corral-secrets-*") if needle in b"".join(
        f.read_bytes() for f in p.iterdir() if f.is_file())]  # fmt: skip
    assert leftovers == []


def test_after_a_kill_9_of_the_server_its_jobs_and_services_are_re_attached(
    tmp_path: Path,
) -> None:
    wf = tmp_path / "workflows"
    jobs = wf / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "server.py").write_text(SERVER)
    (jobs / "work.py").write_text(
        "import os, sys, time\n"
        "i = sys.argv[1]\n"
        "open('ran', 'a').write(i + ' ')\n"
        "while i != '0' and not os.path.exists('gate-' + i): time.sleep(0.01)\n"
        "open('done-' + i, 'w').close()\n"
    )
    (jobs / "three.yaml").write_text(
        f"kind: batch\nname: three\narray: 3\nwants: {{cpu: 0.1}}\n"
        f"command: {{value: {PY}, arguments: [work.py, '{{{{ index }}}}']}}\n"
    )
    (jobs / "web.yaml").write_text(
        f"kind: service\nname: web\nreplicas: 2\nwants: {{cpu: 0.1, ports: 1}}\n"
        f"command: {{value: {PY}, arguments: [server.py]}}\n"
        "health: {http: {path: /metrics}, interval: 200ms, timeout: 200ms}\n"
    )
    first = Server(tmp_path / "data", "--workflows", str(wf), keep_agent=True)
    with first as s:
        admin = s.admin  # (a second server on the same data prints none: it has one)
        with s.client(admin) as c:
            job = c.post("/api/jobs", json={"file": "three"}).json()["id"]
            assert c.post("/api/jobs", json={"file": "web"}).status_code == 201
            until("instance 0 done and 1, 2 running", lambda: (jobs / "done-0").exists() and (
                c.get(f"/api/jobs/{job}").json()["counts"].get("RUNNING") == 2))  # fmt: skip
            until("2 healthy replicas", lambda: len(c.get("/api/catalog/web").json()) == 2)
            before = c.get("/api/services/web").json()["members"]
            pids = {st["index"]: st["pid"] for st in c.get(f"/api/jobs/{job}").json()["steps"]}
        assert s.proc is not None
        s.proc.kill()  # kill -9: no teardown
        s.proc.wait()
    (jobs / "gate-1").touch()  # instance 1 ends while no server watches it
    until("instance 1 done", lambda: (jobs / "done-1").exists())
    second = Server(tmp_path / "data", "--workflows", str(wf), keep_agent=True)
    with second as s:
        log = s.log.read_text()
        assert (
            f"job {job} (three) re-attached: 1 of 3 units had succeeded, 1 still ran, "
            "1 whose processes are gone (their node agent may hold their exits)" in log
        ), log
        assert "service web re-attached to its 2 running replicas (of 2)" in log, log
        with s.client(admin) as c:
            # instance 1's exit, held by the node agent, is taken in; 2 runs on, same process
            until("1 succeeded", lambda: c.get(f"/api/jobs/{job}").json()["counts"]
                  .get("SUCCEEDED") == 2)  # fmt: skip
            got = c.get(f"/api/jobs/{job}").json()
            step2 = next(st for st in got["steps"] if st["index"] == 2)
            assert step2["state"] == "RUNNING" and step2["pid"] == pids[2], got
            until("the service healthy", lambda: len(c.get("/api/catalog/web").json()) == 2)
        assert s.proc is not None
        s.proc.kill()  # and again: what this one took over, the next one takes over
        s.proc.wait()
    third = Server(tmp_path / "data", "--workflows", str(wf))
    with third as s:
        log = s.log.read_text()
        assert f"job {job} (three) re-attached: 2 of 3 units had succeeded, 1 still ran" in log
        assert "service web re-attached to its 2 running replicas (of 2)" in log, log
        with s.client(admin) as c:
            (jobs / "gate-2").touch()
            done = until("the job", lambda: (j := c.get(f"/api/jobs/{job}").json())["state"]
                         in ("SUCCEEDED", "FAILED") and j)  # fmt: skip
            assert done["state"] == "SUCCEEDED", done
            until("the service healthy", lambda: len(c.get("/api/catalog/web").json()) == 2)
            after = c.get("/api/services/web").json()["members"]
            assert [(m["slot"], m["pid"], m["ports"]) for m in after] == [
                (m["slot"], m["pid"], m["ports"]) for m in before], (before, after)  # fmt: skip
            assert all(m["restarts"] == 0 for m in after), after
    ran = (jobs / "ran").read_text().split()
    assert sorted(ran) == ["0", "1", "2"]  # each ran once: nothing ran again


def test_when_the_node_agent_died_too_the_units_it_ran_are_queued_again(
    tmp_path: Path,
) -> None:
    wf = tmp_path / "workflows"
    jobs = wf / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "work.py").write_text(
        "import os, sys, time\n"
        "open('ran', 'a').write(sys.argv[1] + ' ')\n"
        "while not os.path.exists('gate'): time.sleep(0.01)\n"
    )
    (jobs / "two.yaml").write_text(
        f"kind: batch\nname: two\narray: 2\nwants: {{cpu: 0.1}}\n"
        f"command: {{value: {PY}, arguments: [work.py, '{{{{ index }}}}']}}\n"
    )
    with Server(tmp_path / "data", "--workflows", str(wf), keep_agent=True) as s:
        admin = s.admin
        with s.client(admin) as c:
            job = c.post("/api/jobs", json={"file": "two"}).json()["id"]
            until("2 running", lambda: c.get(f"/api/jobs/{job}").json()["counts"]
                  .get("RUNNING") == 2)  # fmt: skip
        agent = s.agent_pid()
        assert s.proc is not None and agent is not None
        s.proc.kill()
        s.proc.wait()
        os.kill(agent, signal.SIGKILL)  # its tasks die with it; nobody holds their exits
        until("the agent gone", lambda: not Path(f"/proc/{agent}").exists()
              or ") Z " in Path(f"/proc/{agent}/stat").read_text())  # fmt: skip
    with Server(tmp_path / "data", "--workflows", str(wf)) as s:
        log = s.log.read_text()
        assert f"job {job}: 2 units its process ended while no control process watched it, " \
            "unheard: queued again" in log, log  # fmt: skip
        with s.client(admin) as c:
            until("2 running again", lambda: c.get(f"/api/jobs/{job}").json()["counts"]
                  .get("RUNNING") == 2)  # fmt: skip
            (jobs / "gate").touch()
            done = until("the job", lambda: (j := c.get(f"/api/jobs/{job}").json())["state"]
                         in ("SUCCEEDED", "FAILED") and j)  # fmt: skip
            # (not counted as a try: with no retries (the default), it still succeeds)
            assert done["state"] == "SUCCEEDED", done
            assert [st["attempt"] for st in done["steps"]] == [1, 1], done
    assert sorted((jobs / "ran").read_text().split()) == ["0", "0", "1", "1"]


def test_serve_with_an_elastic_pool_runs_its_jobs_on_new_nodes(tmp_path: Path) -> None:
    wf = tmp_path / "workflows"
    (wf / "jobs").mkdir(parents=True)
    (wf / "jobs" / "qa.yaml").write_text(
        "kind: batch\nname: qa\narray: 4\npool: qa\nwants: {cpu: 1}\n"
        "command: {value: /bin/sh, arguments: ['-c', 'echo on $CORRAL_JOB_INDEX']}\n"
    )
    bad = subprocess.run([sys.executable, "-m", "corral", "serve", "--pool", "qa=3:1:2"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "need 0 <= min <= max" in bad.stderr
    args = ("--workflows", str(wf), "--pool", "qa=0:2:1", "--pool-cooldown", "0.5")
    with Server(tmp_path / "data", *args) as s, s.client(s.admin) as c:
        job = c.post("/api/jobs", json={"file": "qa"}).json()["id"]
        done = until("the job", lambda: (j := c.get(f"/api/jobs/{job}").json())["state"]
                     in ("SUCCEEDED", "FAILED") and j)  # fmt: skip
        assert done["state"] == "SUCCEEDED", done
        assert {st["node"] for st in done["steps"]} <= {"qa-1", "qa-2"}
        until("the pool's nodes given back", lambda: not any(
            n["pool"] == "qa" for n in c.get("/api/nodes").json()))  # fmt: skip
        notes = [e.get("note", "") for e in c.get("/api/events").json() if e["kind"] == "pool"]
        assert notes[0].startswith("asking for 2 nodes"), notes
        assert any(n.startswith("released") for n in notes), notes


def test_a_failed_job_resumes_on_the_next_server(tmp_path: Path) -> None:
    wf = tmp_path / "workflows"
    jobs = wf / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "flow.makeflow").write_text(
        "a.txt:\n\techo a >> ran; echo A > a.txt\n"
        "b.txt: a.txt\n\techo b >> ran; test -e go && cp a.txt b.txt\n"
    )
    with Server(tmp_path / "data", "--workflows", str(wf)) as s:
        admin = s.admin
        with s.client(admin) as c:
            job = c.post("/api/jobs", json={"file": "flow.makeflow"}).json()["id"]
            until("the failure", lambda: c.get(f"/api/jobs/{job}").json()["state"] == "FAILED")
    (jobs / "go").touch()
    with Server(tmp_path / "data", "--workflows", str(wf)) as s, s.client(admin) as c:
        r = c.post(f"/api/jobs/{job}/resume")
        assert r.status_code == 200, r.text
        until("the job", lambda: c.get(f"/api/jobs/{job}").json()["state"] == "SUCCEEDED")
        assert c.post("/api/jobs/jnosuchjob9/resume").status_code == 404
        r = c.post(f"/api/jobs/{job}/resume")
        assert r.status_code == 409, r.text
    assert (jobs / "ran").read_text().split() == ["a", "b", "b"]  # a ran once


def test_periodic_jobs_are_listed_and_unscheduled(server: tuple[Server, dict[str, str]]) -> None:
    s, tokens = server
    with s.client(tokens["operator"]) as op, s.client(tokens["viewer"]) as viewer:
        listed = viewer.get("/api/periodic").json()
        assert [p["name"] for p in listed] == ["hourly"]
        assert listed[0]["schedule"] == "@hourly" and listed[0]["next_fire"] > time.time()
        assert viewer.delete("/api/periodic/hourly").status_code == 403
        assert op.delete("/api/periodic/hourly").status_code == 200
        assert viewer.get("/api/periodic").json() == []
        assert op.delete("/api/periodic/hourly").status_code == 404
