"""Services on the local backend: real replica processes serving real HTTP on loopback.

A replica killed -9 is restarted with a growing backoff; a failing health check
restarts it; a rolling update with a broken version rolls back by itself, leaving the
old replicas untouched; scaling never restarts the replicas that stay; a sticky slot
comes back on its node; an online environment preempts batch work but never a
protected service.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.backends.local import LocalBackend
from corral.control.plane import ControlPlane, install_child_watcher
from corral.jobs.spec import ServiceSpec, load_job
from corral.model.inventory import Node
from corral.store.sqlite import SqliteStore

PY = sys.executable
PATIENCE = float(os.environ.get("CORRAL_TEST_PATIENCE", "300"))

SERVER = """
import http.server, os, sys
sick = os.environ.get("SICK", "")
version = os.environ.get("CORRAL_SERVICE_VERSION")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        bad = sick and os.path.exists(sick)
        self.send_response(500 if bad else 200)
        self.end_headers()
        self.wfile.write(version.encode())
    def log_message(self, *a):
        pass
if os.environ.get("BROKEN"):
    sys.exit(1)
http.server.HTTPServer(("127.0.0.1", int(os.environ["CORRAL_PORT"])), H).serve_forever()
"""


class Rig:
    def __init__(self, tmp: Path, nodes: list[Node]) -> None:
        self.tmp = tmp
        self.store = SqliteStore(str(tmp / "corral.db"))
        self.plane = ControlPlane(
            self.store, LocalBackend(), inventory=nodes, log_dir=str(tmp / "logs")
        )
        self.sup = self.plane.services
        self.server = tmp / "server.py"
        self.server.write_text(SERVER)

    def spec(self, body: str, name: str = "web") -> ServiceSpec:
        text = f"kind: service\nname: {name}\n" + body.replace("SERVER", str(self.server))
        spec, diags = load_job(str(self.tmp / f"{name}.yaml"), text)
        assert not diags, diags
        assert isinstance(spec, ServiceSpec)
        return spec

    def deploy(self, spec: ServiceSpec) -> Any:
        return self.sup.deploy(spec, text="", workdir=str(self.tmp), owner="ops")

    async def until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await asyncio.sleep(0.02)

    def running(self, name: str = "web") -> list[dict[str, Any]]:
        return [m for m in self.sup.show(name)["members"] if m["state"] == "RUNNING"]

    def pids(self, name: str = "web") -> dict[int, int]:
        return {m["slot"]: m["pid"] for m in self.running(name)}

    def notes(self, name: str = "web") -> list[str]:
        return [e.get("note", "") for e in self.store.events() if e.get("service") == name]


def with_rig(
    nodes: list[Node] | None = None,
) -> Callable[[Callable[[Rig], Awaitable[None]]], Callable[[Path], None]]:
    def wrap(fn: Callable[[Rig], Awaitable[None]]) -> Callable[[Path], None]:
        def test(tmp_path: Path) -> None:
            async def main() -> None:
                install_child_watcher()
                r = Rig(tmp_path, nodes or [Node("n1", cpu=8, memory=10_000,
                                                 ports=(21000, 21999))])  # fmt: skip
                try:
                    await asyncio.wait_for(fn(r), PATIENCE)
                finally:
                    await r.plane.close()

            asyncio.run(main())

        test.__name__ = fn.__name__
        return test

    return wrap


WEB = """
replicas: {n}
wants: {{cpu: 1, ports: 1}}
command: {{value: {py}, arguments: [SERVER], env: [{env}]}}
health:
  http: {{path: /healthz}}
  interval: 500ms
  timeout: 500ms     # (generous: a busy 2-core machine must not fail healthy replicas)
  threshold: 2
restart: {{initial: 200ms, max: 5s, factor: 2, crash_loop: 3, reset_after: 30s}}
update: {{max_parallel: 1, healthy_for: 300ms, deadline: 20s}}
"""


def web(n: int = 1, env: str = "") -> str:
    return WEB.format(n=n, py=PY, env=env)


@with_rig()
async def test_a_replica_killed_9_is_restarted_with_backoff(rig: Rig) -> None:
    rig.deploy(rig.spec(web()))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 1)
    first = rig.pids()[0]
    os.kill(first, signal.SIGKILL)
    await rig.until(lambda: rig.pids().get(0) not in (None, first))
    second = rig.pids()[0]
    os.kill(second, signal.SIGKILL)
    await rig.until(lambda: rig.pids().get(0) not in (None, first, second))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 1)
    notes = [n for n in rig.notes() if n.startswith("restart")]
    assert notes[0].startswith("restart 1 in 0.2 s: process") and "signal 9" in notes[0], notes
    assert notes[1].startswith("restart 2 in 0.4 s"), notes  # the backoff grew
    ep = rig.sup.endpoints("web")[0]
    assert ep["address"] == "127.0.0.1" and 21000 <= ep["port"] <= 21999
    # the service said so: STARTING, RUNNING once healthy, DEGRADED while its replica
    # was down, RUNNING again
    await rig.until(lambda: rig.sup.services["web"].state == "RUNNING")
    rig.sup._flush()  # (written once per loop iteration: now)
    states = [(e["state"], e.get("note")) for e in rig.store.events()
              if e.get("service") == "web" and "state" in e]  # fmt: skip
    assert states[:3] == [("STARTING", "deployed: 1 replicas"),
                          ("RUNNING", "1 of 1 replicas healthy"),
                          ("DEGRADED", "0 of 1 replicas healthy")], states  # fmt: skip
    assert states[-1] == ("RUNNING", "1 of 1 replicas healthy"), states


@with_rig()
async def test_a_failing_health_check_restarts_the_replica(rig: Rig) -> None:
    sick = rig.tmp / "sick"
    rig.deploy(rig.spec(web(env=f'"SICK={sick}"')))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 1)
    first = rig.pids()[0]
    sick.touch()
    await rig.until(lambda: any("health check failed" in n for n in rig.notes()))
    sick.unlink()
    await rig.until(lambda: rig.pids().get(0) not in (None, first))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 1)
    note = next(n for n in rig.notes() if "health check failed" in n)
    assert "http health check failed 2 times in a row: answered 'HTTP/1.0 500" in note, note
    assert not os.path.exists(f"/proc/{first}") or _zombie(first)


@with_rig()
async def test_a_broken_update_rolls_back_by_itself(rig: Rig) -> None:
    rig.deploy(rig.spec(web(3)))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 3)
    before = rig.pids()
    rig.deploy(rig.spec(web(3, env='"BROKEN=1"')))  # version 2 exits at once
    await rig.until(lambda: rig.sup.services["web"].state == "ROLLED-BACK")
    svc = rig.sup.show("web")
    assert svc["version"] == 1
    assert "replica 0 of version 2 failed" in svc["reason"], svc["reason"]
    await rig.until(lambda: len(rig.running()) == 3)
    assert rig.pids() == before  # the old replicas were never touched
    assert all(m["version"] == 1 for m in rig.sup.show("web")["members"])
    states = [e.get("state") for e in rig.store.events() if e.get("service") == "web"]
    assert "UPDATING" in states and "ROLLING-BACK" in states and "ROLLED-BACK" in states


@with_rig()
async def test_a_good_update_replaces_one_replica_at_a_time(rig: Rig) -> None:
    rig.deploy(rig.spec(web(3)))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 3)
    seen_new = 0
    spec2 = rig.spec(web(3, env='"V=2"'))
    rig.deploy(spec2)
    while rig.sup.services["web"].state != "RUNNING" or rig.sup.services["web"].update:
        members = rig.sup.show("web")["members"]
        # never more than one new replica that is not yet ready beside the old ones
        starting = [m for m in members if m["version"] == 2 and not m["healthy"]]
        assert len(starting) <= 1, members
        seen_new = max(seen_new, sum(1 for m in members if m["version"] == 2))
        await asyncio.sleep(0.02)
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 3)
    assert {e["version"] for e in rig.sup.endpoints("web")} == {2}
    assert seen_new >= 1


@with_rig()
async def test_scaling_keeps_the_replicas_that_stay(rig: Rig) -> None:
    rig.deploy(rig.spec(web(2)))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 2)
    before = rig.pids()
    rig.sup.scale("web", 4)
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 4)
    after = rig.pids()
    assert {k: after[k] for k in before} == before
    rig.sup.scale("web", 1)
    await rig.until(lambda: len(rig.sup.show("web")["members"]) == 1)
    assert rig.pids() == {0: before[0]}
    for slot in (1, 2, 3):
        pid = after[slot]
        await rig.until(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or _zombie(pid))
    assert rig.plane.ledger.usage["n1"].cpu == 1


@with_rig([Node(f"n{i}", cpu=2, memory=1000, ports=(22000 + 100 * i, 22099 + 100 * i))
           for i in range(1, 4)])  # fmt: skip
async def test_a_sticky_replica_comes_back_to_its_node(rig: Rig) -> None:
    body = web(3) + "sticky: {cache_dir: /var/cache/x}\n"
    rig.deploy(rig.spec(body))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 3)
    nodes = {m["slot"]: m["node"] for m in rig.running()}
    assert len(set(nodes.values())) == 3  # spread
    for _ in range(2):
        pids = rig.pids()
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        await rig.until(lambda pids=pids: all(
            rig.pids().get(s) not in (None, p) for s, p in pids.items()))  # fmt: skip
        assert {m["slot"]: m["node"] for m in rig.running()} == nodes


@with_rig()
async def test_a_crash_loop_says_so(rig: Rig) -> None:
    rig.deploy(rig.spec(web(env='"BROKEN=1"').replace("initial: 200ms", "initial: 50ms")))
    await rig.until(lambda: rig.sup.services["web"].state == "CRASH-LOOP")
    why = rig.sup.services["web"].reason or ""
    assert why.startswith("crash-loop: replica 0 restarted 3 times in a row"), why
    assert "exited with status 1" in why


ONLINE_WF = """
name: data-taking
roles:
  - name: flp-{{ i }}
    for: {begin: "1", end: "2", var: i}
    task: {load: flp}
"""
FLP = f"""
name: flp
control: {{mode: basic}}
wants: {{cpu: 1}}
command: {{value: {PY}, arguments: ["-c", "import time; time.sleep(600)"]}}
"""


@with_rig([Node("n1", cpu=4, memory=10_000, ports=(21000, 21999))])
async def test_online_preempts_batch_but_not_a_protected_service(rig: Rig) -> None:
    from corral.jobs.spec import BatchSpec
    from corral.jobs.units import units_of
    from corral.templates import DictSources, expand

    # the node: a protected service (1 cpu), an unprotected one (1 cpu), batch (2 cpus)
    rig.deploy(rig.spec(web(1) + "protected: true\npriority_class: batch\n"))
    rig.deploy(rig.spec(web(1) + "priority_class: batch\n", name="other"))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 1)
    await rig.until(lambda: len(rig.sup.endpoints("other")) == 1)
    kept = rig.pids()
    done = rig.tmp / "go"
    work = rig.tmp / "work.py"
    work.write_text(f"import os, time\nwhile not os.path.exists({str(done)!r}): time.sleep(0.01)\n")
    text = f"kind: batch\nname: reco\narray: 2\ncommand: {{value: {PY}, arguments: [{work}]}}\n"
    spec, diags = load_job(str(rig.tmp / "reco.yaml"), text)
    assert not diags and isinstance(spec, BatchSpec), diags
    job = rig.plane.jobs.submit(units_of(spec), name="reco", kind="batch", text=text,
                                workdir=str(rig.tmp), owner="qa")  # fmt: skip
    await rig.until(lambda: job.counts.get("RUNNING") == 2)
    assert rig.plane.ledger.usage["n1"].cpu == 4  # full
    plan = expand("wf.yaml", DictSources({"wf.yaml": ONLINE_WF, "tasks/flp.yaml": FLP}),
                  variables={"priority_class": "online"})  # fmt: skip
    dry, _ = await rig.plane.create_preempting(plan, dry_run=True)
    web_id = rig.sup.services["web"].id
    assert web_id.startswith("svc-") and web_id.endswith("-web")
    assert not any(k.startswith(web_id + ":") for k in dry), dry
    evicted, env = await rig.plane.create_preempting(plan)
    assert env is not None and evicted == dry
    assert rig.pids() == kept  # the protected service is untouched
    assert rig.sup.show("web")["members"][0]["restarts"] == 0
    # the evicted batch work requeues and completes once the online run is over
    await env.transition("DEPLOY")
    await rig.plane.destroy(env.id)
    done.touch()
    assert await job.done == "SUCCEEDED"
    await rig.until(lambda: len(rig.sup.endpoints("other")) == 1)  # back too


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


@with_rig()
async def test_the_web_example_serves_behind_its_catalog(rig: Rig) -> None:
    import httpx

    from corral.control.jobservice import _host
    from tests.conftest import EXAMPLES

    path = os.path.join(EXAMPLES, "jobs", "web.yaml")
    spec, diags = load_job(path, Path(path).read_text())
    assert not diags and isinstance(spec, ServiceSpec), diags
    rig.sup.deploy(spec, text="", workdir=str(rig.tmp), owner="ops")
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 2)
    for e in rig.sup.endpoints("web"):
        url = f"http://{_host(e['address'])}:{e['port']}/"
        r = await asyncio.to_thread(httpx.get, url)
        assert r.status_code == 200


KEEPALIVE_SERVER = """
import asyncio, os
IDLE_CLOSE = float(os.environ.get("IDLE_CLOSE", "0"))  # close an idle connection, unsaid
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        with open(os.environ["CORRAL_SERVICE"] + "-connections", "a") as f:
            f.write("c")
    def data_received(self, data):
        if b"\\r\\n\\r\\n" in data:
            with open(os.environ["CORRAL_SERVICE"] + "-answers", "a") as f:
                f.write("a")
            self.t.write(ANSWER)
            if IDLE_CLOSE:
                asyncio.get_running_loop().call_later(IDLE_CLOSE, self.t.close)
async def main():
    await asyncio.get_running_loop().create_server(P, "127.0.0.1", int(os.environ["CORRAL_PORT"]))
    await asyncio.Event().wait()
asyncio.run(main())
"""


@with_rig()
async def test_http_checks_keep_their_connection_and_survive_a_server_closing_it(
    rig: Rig,
) -> None:
    (rig.tmp / "ka.py").write_text(KEEPALIVE_SERVER)
    body = (
        web()
        .replace("SERVER", str(rig.tmp / "ka.py"))
        .replace("interval: 500ms", "interval: 100ms")
    )
    body = body.replace("timeout: 500ms", "timeout: 100ms")
    rig.deploy(rig.spec(body, name="ka"))
    rig.deploy(rig.spec(body.replace("env: []", 'env: ["IDLE_CLOSE=0.02"]'), name="stale"))
    for name in ("ka", "stale"):
        await rig.until(lambda name=name: len(rig.sup.endpoints(name)) == 1)

    def count(what: str) -> int:
        path = rig.tmp / what
        return len(path.read_text()) if path.exists() else 0

    await rig.until(lambda: count("ka-answers") >= 20 and count("stale-answers") >= 20)
    shown = {n: rig.sup.show(n)["members"][0] for n in ("ka", "stale")}
    assert all(m["restarts"] == 0 and m["healthy"] for m in shown.values()), shown
    # the keep-alive replica answered over one connection; the stale one closed each
    # connection while idle: each check found it closed, and made it again on a new one
    assert count("ka-connections") == 1, count("ka-connections")
    assert count("stale-connections") >= count("stale-answers") - 1
    assert not [n for n in rig.notes("stale") if "health check failed" in n]


@with_rig([Node("n1", cpu=2, memory=10_000, ports=(21000, 21999))])
async def test_room_a_service_gives_back_starts_what_waits(rig: Rig) -> None:
    from corral.jobs.spec import BatchSpec
    from corral.jobs.units import units_of

    rig.deploy(rig.spec(web(2)))  # 2 cpus: the node is full
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 2)
    text = "kind: batch\nname: b\nwants: {cpu: 1}\ncommand: {value: /bin/true}\n"
    spec, diags = load_job(str(rig.tmp / "b.yaml"), text)
    assert not diags and isinstance(spec, BatchSpec)
    job = rig.plane.jobs.submit(units_of(spec), name="b", kind="batch", text=text,
                                workdir=str(rig.tmp), owner="qa")  # fmt: skip
    await rig.until(lambda: job.reason is not None and "waiting" in job.reason)
    rig.sup.scale("web", 1)  # gives a cpu back: the job starts, nothing else asked
    assert await job.done == "SUCCEEDED"
    # and the other way: a replica waiting for room starts when a job's room frees
    gate = rig.tmp / "gate"
    hold = text.replace("/bin/true}", f"/bin/sh, arguments: ['-c', 'while [ ! -e {gate} ]; do "
                        "sleep 0.01; done']}")  # fmt: skip
    spec2, diags = load_job(str(rig.tmp / "hold.yaml"), hold)
    assert not diags and isinstance(spec2, BatchSpec), diags
    holder = rig.plane.jobs.submit(units_of(spec2), name="hold", kind="batch", text=hold,
                                   workdir=str(rig.tmp), owner="qa")  # fmt: skip
    await rig.until(lambda: holder.state == "RUNNING")
    rig.sup.scale("web", 2)  # one cpu free: the second replica waits
    await rig.until(lambda: any((m["reason"] or "").startswith("waiting")
                                for m in rig.sup.show("web")["members"]))  # fmt: skip
    gate.touch()
    assert await holder.done == "SUCCEEDED"
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 2)


@with_rig()
async def test_a_replica_that_restarts_forever_never_overflows_its_backoff(rig: Rig) -> None:
    body = web(env='"BROKEN=1"').replace(
        "restart: {initial: 200ms, max: 5s, factor: 2, crash_loop: 3, reset_after: 30s}",
        "restart: {initial: 1ms, max: 2ms, factor: 100, crash_loop: 3, reset_after: 30s}",
    )
    rig.deploy(rig.spec(body.replace("command: {value: " + PY + ", arguments: [SERVER]",
                                     "command: {value: /bin/false")))  # fmt: skip
    # past 156 restarts in a row, 100 ** restarts no longer fits a float
    await rig.until(lambda: any(n.startswith("restart 200 ") for n in rig.notes()))
    assert rig.sup.services["web"].state == "CRASH-LOOP"


SLOW_FIRST = """
import http.server, os, time
first = [True]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if first[0]:
            first[0] = False
            time.sleep(1.5)  # longer than the check's interval
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["CORRAL_PORT"])), H).serve_forever()
"""


@with_rig()
async def test_checks_go_on_after_one_that_outlived_its_interval(rig: Rig) -> None:
    (rig.tmp / "slow.py").write_text(SLOW_FIRST)
    body = web().replace("SERVER", str(rig.tmp / "slow.py"))
    body = body.replace("interval: 500ms", "interval: 1s").replace("timeout: 500ms", "timeout: 1s")
    rig.deploy(rig.spec(body))
    await rig.until(lambda: len(rig.sup.endpoints("web")) == 1)
    before = rig.sup.checks_made
    await rig.until(lambda: rig.sup.checks_made >= before + 3)  # still checked


def _listener() -> Any:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


_taken = _listener()  # a port something outside corral listens on (for the next test)
_TAKEN_PORT = _taken.getsockname()[1]


@with_rig([Node("n1", cpu=8, memory=10_000, ports=(_TAKEN_PORT, _TAKEN_PORT + 50))])
async def test_a_replica_whose_port_is_taken_outside_gets_another_one(r: Rig) -> None:
    # the node's first port is held by a process corral does not know: the replica
    # given it fails to listen; the one started in its place gets the next port, not
    # the same one again (no crash loop on a port it can never have)
    try:
        r.deploy(r.spec(web(1)))
        await r.until(lambda: any(m["healthy"] for m in r.running()))
        member = r.running()[0]
        assert member["ports"] != [_TAKEN_PORT] and member["restarts"] == 1, member
        assert any("restart 1" in n for n in r.notes()), r.notes()
    finally:
        _taken.close()
