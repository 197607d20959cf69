"""``corral job|service|catalog`` against a real `corral serve` on 127.0.0.1.

The real command line (``python -m corral``) as a user runs it: a batch job run by
name to its end, its listing, its steps and its logs (the lines its instances
printed); a failed step named with its reason; a log followed while it is written,
each line once; a long job detached from with Ctrl-C and then stopped (its process
gone); a service deployed, scaled and found in the catalog; a viewer refused, a
wrong name, an unreachable server.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.server import Server
from tests.conftest import ROOT
from tests.jobs.test_jobs_api import until

PY = sys.executable
PATIENCE = 120.0  # only stops a hung test

WEB = """
import http.server, os
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"up\\n")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["CORRAL_PORT"])), H).serve_forever()
"""

SLOW = """
import os, sys, time
for i in range(10):
    print(f"line {i}", flush=True)
while not os.path.exists("go"):  # the test says when: once the follower has started
    time.sleep(0.02)
for i in range(10, 40):
    print(f"line {i}", flush=True)
    time.sleep(0.02)
sys.stdout.write("split-")
sys.stdout.flush()
time.sleep(0.3)
sys.stdout.write("line\\n")
for i in range(40, 60):
    print(f"line {i}", flush=True)
    time.sleep(0.02)
print("same", flush=True)
print("same", flush=True)
"""
SLOW_LINES = [*(f"line {i}" for i in range(40)), "split-line",
              *(f"line {i}" for i in range(40, 60)), "same", "same"]  # fmt: skip


Cli = Callable[..., subprocess.CompletedProcess[str]]


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports nothing listens on now."""
    rng = random.Random()
    for _ in range(200):
        low = rng.randrange(30_000, 60_000, n)
        socks = []
        try:
            for port in range(low, low + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return low
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise AssertionError("no free port range")


def env_of(server: str, token: str | None) -> dict[str, str]:
    env = dict(os.environ, CORRAL_SERVER=server, PYTHONPATH=os.pathsep.join(sys.path))
    env.pop("CORRAL_TOKEN", None)
    if token:
        env["CORRAL_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("job-cli")
    jobs = tmp / "workflows" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "web.py").write_text(WEB)
    (jobs / "slow.py").write_text(SLOW)
    (jobs / "count.yaml").write_text(
        f"kind: batch\nname: count\narray: 3\nwants: {{cpu: 0.1}}\ncommand:\n  value: {PY}\n"
        "  arguments: ['-c', \"[print('instance {{ index }} line', k) for k in range(3)]\"]\n"
    )
    (jobs / "fail.yaml").write_text(
        f"kind: batch\nname: fail\narray: 2\nwants: {{cpu: 0.1}}\ncommand:\n  value: {PY}\n"
        "  arguments: ['-c', \"print('try {{ index }}'); raise SystemExit(3 * {{ index }})\"]\n"
    )
    (jobs / "long.yaml").write_text(
        f"kind: batch\nname: long\nwants: {{cpu: 0.1}}\ncommand:\n  value: {PY}\n"
        "  arguments: ['-c', \"import os, time; open('long.pid', 'w').write(str(os.getpid()));"
        ' time.sleep(600)"]\n'
    )
    (jobs / "slow.yaml").write_text(
        f"kind: batch\nname: slow\nwants: {{cpu: 0.1}}\ncommand: {{value: {PY}, "
        "arguments: [slow.py]}\n"
    )
    # a name no other test's service has: a replica's process carries its service's
    # name, and a server ending its own replicas ends every process on this machine
    # that carries it (another test's server running at the same time included)
    (jobs / "clisvc.yaml").write_text(
        f"kind: service\nname: clisvc\nreplicas: 2\nwants: {{cpu: 0.1, ports: 1}}\n"
        f"command: {{value: {PY}, arguments: [web.py]}}\n"
        "health: {http: {path: /}, interval: 500ms, timeout: 500ms, threshold: 10}\n"
    )
    (jobs / "broken.yaml").write_text("kind: batch\nname: broken\ncommand: {valu: x}\n")
    # ports of their own: other tests' servers on this machine give out 20000 and up
    low = free_ports(20)
    (tmp / "inventory.yaml").write_text(
        f"nodes:\n  - {{name: localhost, cpu: 8, memory: 8000, ports: {low}-{low + 19}}}\n"
    )
    inventory = ("--inventory", str(tmp / "inventory.yaml"))
    with Server(tmp / "data", "--workflows", str(tmp / "workflows"), *inventory) as s:
        tokens = {"admin": s.admin}
        with s.client(s.admin) as c:
            for role in ("operator", "viewer"):
                r = c.post("/api/tokens", json={"role": role, "name": role})
                assert r.status_code == 201, r.text
                tokens[role] = r.json()["token"]
        yield s, tokens
        s.stop()


@pytest.fixture(scope="module")
def jobs_dir(server: tuple[Server, dict[str, str]]) -> Path:
    return Path(server[0].data).parent / "workflows" / "jobs"


def cli_for(server: tuple[Server, dict[str, str]], role: str) -> Cli:
    s, tokens = server

    def run(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, "-m", "corral", *args], capture_output=True, text=True,
                              timeout=PATIENCE, cwd=ROOT, env=env_of(s.url, tokens[role]),
                              **kw)  # fmt: skip

    return run


def popen(server: tuple[Server, dict[str, str]], role: str, *args: str) -> subprocess.Popen[str]:
    s, tokens = server
    return subprocess.Popen([PY, "-m", "corral", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env_of(s.url, tokens[role]))  # fmt: skip


def js(p: subprocess.CompletedProcess[str]) -> Any:
    """What a command printed with -o json (it succeeded)."""
    assert p.returncode == 0, (p.args, p.stdout, p.stderr)
    return json.loads(p.stdout)


def job_id_of(stderr: str) -> str:
    m = re.search(r"^job (\S+) \(", stderr, re.M)
    assert m, stderr
    return m.group(1)


def test_a_batch_job_runs_by_name_to_its_end(server: tuple[Server, dict[str, str]]) -> None:
    op, viewer = cli_for(server, "operator"), cli_for(server, "viewer")
    files = viewer("job", "files", "-o", "json")
    assert files.returncode == 0, files.stderr
    assert {f["name"] for f in json.loads(files.stdout)} >= {"count", "long", "clisvc"}
    assert "count.yaml" in viewer("job", "files").stdout
    p = op("job", "run", "count")
    assert p.returncode == 0, p.stderr
    job = job_id_of(p.stderr)
    assert f"job {job} SUCCEEDED: 3 succeeded" in p.stdout
    # listed, in a table and as JSON
    p = viewer("job", "list")
    assert p.returncode == 0 and job in p.stdout and "3 succeeded" in p.stdout
    rows = js(viewer("job", "list", "-o", "json", "--state", "succeeded"))
    [row] = [r for r in rows if r["id"] == job]
    assert row["name"] == "count" and row["owner"] == "operator" and row["units"] == 3
    # shown: its state, counts and steps
    p = viewer("job", "show", job)
    assert p.returncode == 0, p.stderr
    assert f"{job} count (batch, owner operator" in p.stdout and ": SUCCEEDED" in p.stdout
    assert "steps: 3 (3 succeeded)" in p.stdout
    steps = [line.split() for line in p.stdout.splitlines() if "count[" in line]
    assert [s[:3] for s in steps] == [["0", "count[0]", "SUCCEEDED"],
                                       ["1", "count[1]", "SUCCEEDED"],
                                       ["2", "count[2]", "SUCCEEDED"]], p.stdout  # fmt: skip
    shown = js(viewer("job", "show", job, "-o", "json"))
    assert [(s["index"], s["state"], s["attempt"]) for s in shown["steps"]] == [
        (0, "SUCCEEDED", 1), (1, "SUCCEEDED", 1), (2, "SUCCEEDED", 1)]  # fmt: skip
    # its logs: what each instance printed
    for i in range(3):
        p = viewer("job", "logs", job, "--index", str(i))
        assert p.returncode == 0 and p.stdout == "".join(
            f"instance {i} line {k}\n" for k in range(3)), p  # fmt: skip
    assert viewer("job", "logs", job, "--index", "1", "-n", "1").stdout == "instance 1 line 2\n"
    # following the log of a job that has ended prints it and returns
    p = viewer("job", "logs", job, "--index", "2", "--follow")
    assert p.returncode == 0 and p.stdout.count("instance 2 line") == 3, p


def test_a_failed_step_is_named_with_its_reason(server: tuple[Server, dict[str, str]]) -> None:
    op = cli_for(server, "operator")
    p = op("job", "run", "fail")
    assert p.returncode == 1, p
    job = job_id_of(p.stderr)
    assert re.search(r"failed: step 1 fail\[1\] \(attempt 1, node \S+\): .*3", p.stderr), p.stderr
    assert f"corral job logs {job} --index 1" in p.stderr
    assert f"job {job} FAILED: 1 failed, 1 succeeded" in p.stderr
    assert "failed: step 0" not in p.stderr
    assert op("job", "logs", job, "--index", "1").stdout == "try 1\n"
    p = op("job", "show", job)
    assert "FAILED" in p.stdout and re.search(r"1\s+fail\[1\]\s+FAILED\s+1", p.stdout), p.stdout


def test_a_log_is_followed_while_it_is_written(
    server: tuple[Server, dict[str, str]], jobs_dir: Path
) -> None:
    op = cli_for(server, "operator")
    (jobs_dir / "go").unlink(missing_ok=True)
    p = op("job", "run", "slow", "--detach")
    assert p.returncode == 0, p.stderr
    job = p.stdout.strip()
    assert re.fullmatch(r"[a-z0-9]+", job), p.stdout
    p = op("job", "logs", job, "--follow", "--index", "1")
    assert p.returncode == 1 and f"job {job} has 1 steps: --index 0 to 0" in p.stderr
    proc = popen(server, "operator", "job", "logs", job, "--follow", "-n", "10000",
                 "--interval", "0.1")  # fmt: skip
    watchdog = threading.Timer(PATIENCE, proc.kill)  # only stops a hung test
    watchdog.start()
    try:
        assert proc.stdout is not None
        first = [proc.stdout.readline().rstrip("\n") for _ in range(10)]
        assert first == SLOW_LINES[:10]  # while the job waits: it is being followed
        assert js(op("job", "show", job, "-o", "json"))["state"] == "RUNNING"
        (jobs_dir / "go").touch()
        out, err = proc.communicate()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert first + out.splitlines() == SLOW_LINES  # every line, once, whole
    assert op("job", "logs", job, "-n", "10000").stdout.splitlines() == SLOW_LINES
    assert js(op("job", "show", job, "-o", "json"))["state"] == "SUCCEEDED"


def test_a_long_job_is_detached_from_then_stopped(
    server: tuple[Server, dict[str, str]], jobs_dir: Path
) -> None:
    op, viewer = cli_for(server, "operator"), cli_for(server, "viewer")
    (jobs_dir / "long.pid").unlink(missing_ok=True)
    proc = popen(server, "operator", "job", "run", "long")
    try:
        pid = int(until("the long job's process", lambda: (jobs_dir / "long.pid").exists()
                        and (jobs_dir / "long.pid").read_text()))  # fmt: skip
        proc.send_signal(signal.SIGINT)  # Ctrl-C: detach, the job goes on
        out, err = proc.communicate(timeout=PATIENCE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    job = job_id_of(err)
    assert f"detached: job {job} goes on running" in err
    assert f"corral job logs {job} --follow" in err and f"corral job stop {job}" in err
    assert _alive(pid)
    assert js(viewer("job", "show", job, "-o", "json"))["state"] == "RUNNING"
    # a viewer may not stop it
    p = viewer("job", "stop", job)
    assert p.returncode == 1 and "Forbidden (403)" in p.stderr and "needs operator" in p.stderr
    p = op("job", "stop", job)
    assert p.returncode == 0, p.stderr
    assert f"job {job} is CANCELLED" in p.stdout
    until(f"process {pid} ended", lambda: not _alive(pid))
    shown = js(viewer("job", "show", job, "-o", "json"))
    assert shown["state"] == "CANCELLED" and shown["steps"][0]["state"] == "CANCELLED"
    assert "cancelled by operator" in (shown["reason"] or "") + shown["steps"][0]["reason"]


def test_a_service_is_deployed_scaled_and_in_the_catalog(
    server: tuple[Server, dict[str, str]],
) -> None:
    op, viewer = cli_for(server, "operator"), cli_for(server, "viewer")
    p = op("job", "run", "clisvc")
    assert p.returncode == 0, p.stderr
    assert "service clisvc deployed: 2 replicas, version 1" in p.stdout

    def endpoints(n: int) -> list[dict[str, Any]] | None:
        r = viewer("catalog", "clisvc", "-o", "json")
        assert r.returncode == 0, r.stderr
        eps: list[dict[str, Any]] = json.loads(r.stdout)
        return eps if len(eps) == n else None

    try:
        eps = until("2 healthy replicas", lambda: endpoints(2))
    except AssertionError:
        raise AssertionError(viewer("service", "show", "clisvc", "-o", "json").stdout) from None
    assert {e["address"] for e in eps} == {"127.0.0.1"}
    p = viewer("catalog")
    assert p.returncode == 0 and all(str(e["port"]) in p.stdout for e in eps), p.stdout
    assert js(viewer("catalog", "-o", "json"))["clisvc"] == eps
    p = viewer("job", "show", "clisvc")  # a service, by its name
    assert p.returncode == 0 and "service clisvc: RUNNING, 2 replicas wanted" in p.stdout, p
    # wanted, running, healthy (a replica may be restarting: wait for it)
    until("2 of 2 running and healthy", lambda: re.search(
        r"clisvc\s+RUNNING\s+2\s+2\s+2", viewer("service", "list").stdout))  # fmt: skip
    p = viewer("job", "scale", "clisvc", "3")
    assert p.returncode == 1 and "Forbidden (403)" in p.stderr
    p = op("job", "scale", "clisvc", "3")
    assert p.returncode == 0 and "service clisvc: scaled to 3 replicas" in p.stdout, p
    try:
        eps = until("3 healthy replicas", lambda: endpoints(3))
    except AssertionError:
        raise AssertionError(viewer("service", "show", "clisvc", "-o", "json").stdout) from None

    def pids() -> list[int] | None:
        shown = js(viewer("service", "show", "clisvc", "-o", "json"))
        got = [m["pid"] for m in shown["members"] if m["pid"] and m["state"] == "RUNNING"]
        return got if len(got) == 3 else None

    replicas = until("3 replicas running", pids)
    p = op("job", "stop", "clisvc")
    assert p.returncode == 1 and "clisvc is a service: `corral service rm clisvc`" in p.stderr
    p = op("service", "rm", "clisvc")
    assert p.returncode == 0 and "service clisvc removed" in p.stdout
    for pid in replicas:
        until(f"replica {pid} ended", lambda pid=pid: not _alive(pid))
    assert js(viewer("catalog", "-o", "json")) == {}
    p = viewer("service", "show", "clisvc")
    assert p.returncode == 1 and "No such service (404)" in p.stderr


def test_refusals_say_why(server: tuple[Server, dict[str, str]], tmp_path: Path) -> None:
    op, viewer = cli_for(server, "operator"), cli_for(server, "viewer")
    p = viewer("job", "run", "count")
    assert p.returncode == 1 and "Forbidden (403)" in p.stderr and "needs operator" in p.stderr
    p = op("job", "run", "nope")
    assert p.returncode == 1 and "No such job file (404): no job 'nope'" in p.stderr, p.stderr
    p = op("job", "run", "../../etc/passwd")
    assert p.returncode == 1 and "(422)" in p.stderr and "outside the jobs directory" in p.stderr
    p = op("job", "run", "broken")
    assert p.returncode == 1 and "Bad job (422)" in p.stderr and "broken.yaml:3:" in p.stderr
    p = viewer("job", "show", "jnosuchjob1")
    assert p.returncode == 1 and "No such job (404)" in p.stderr, p.stderr
    p = viewer("job", "logs", "jnosuchjob1")
    assert p.returncode == 1 and "No such job (404)" in p.stderr
    p = op("job", "scale", "nope", "2")
    assert p.returncode == 1 and "No such service (404)" in p.stderr
    # a file of this machine is not the server's: said so, with what to do
    here = tmp_path / "mine.yaml"
    here.write_text("kind: batch\nname: mine\ncommand: {value: /bin/true}\n")
    p = op("job", "run", str(here))
    assert p.returncode == 1 and "hint:" in p.stderr and "--local" in p.stderr
    # the command line: options for a run here are refused with a server (exit 2)
    p = op("job", "run", "count", "--data", str(tmp_path / "d"))
    assert p.returncode == 2 and "--data: only for a run on this machine" in p.stderr
    p = op("job", "scale", "clisvc", "-1")
    assert p.returncode == 2
    # an unreachable server
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for args in (["job", "list"], ["job", "run", "count"], ["job", "show", "x"],
                 ["job", "stop", "x"], ["catalog"]):  # fmt: skip
        p = op(*args, "--server", f"http://127.0.0.1:{port}")
        assert p.returncode == 3 and "cannot reach" in p.stderr, (args, p)


def test_without_a_server_job_run_runs_here(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(
        f"kind: batch\nname: b\nwants: {{cpu: 0.1}}\ncommand: {{value: {PY}, "
        "arguments: ['-c', \"open('done', 'w')\"]}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CORRAL_SERVER", "CORRAL_TOKEN")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    run = [PY, "-m", "corral", "job", "run"]
    p = subprocess.run([*run, "b.yaml", "--detach"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=PATIENCE)  # fmt: skip
    assert p.returncode == 2 and "--detach: only with a server" in p.stderr
    p = subprocess.run([*run, "b.yaml", "--data", "d"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=PATIENCE)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "done").exists() and "SUCCEEDED" in p.stdout
    # --local: here, even with a server named
    (tmp_path / "done").unlink()
    p = subprocess.run([*run, "b.yaml", "--data", "d", "--local", "--fresh"], cwd=tmp_path,
                       env=dict(env, CORRAL_SERVER="http://127.0.0.1:9"), capture_output=True,
                       text=True, timeout=PATIENCE)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "done").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().split(") ")[1].startswith("Z")
    except OSError:
        return False
