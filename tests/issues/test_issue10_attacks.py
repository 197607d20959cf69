"""What an attacker found in the node agent and the re-attach (issue 10); each test
failed before its fix.

- a task's descendants outlived a killed agent (the kernel ends only the task itself);
- any connection to the agent's socket took the server's place, before a word;
- another user could drive the agent (an abstract socket has no permissions);
- a restarted server's ``--agent-lease`` was ignored (the agent kept the first one's);
- a frozen server was never fenced (the lease counted from a disconnect only);
- an order under way at a crash went on in the agent after the re-attach, which then
  showed states the tasks no longer had.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from corral.backends import wire
from corral.backends.agent import socket_path
from corral.model.plan import Command
from corral.ports.backend import Launch
from tests.api.server import Server
from tests.faults import programs
from tests.faults.processes import of_environment
from tests.faults.test_server_kill import state_of, transition, wait_for

SHELL = """
name: shelly
control: {mode: basic}
command: {shell: true, value: "sleep 600; echo done"}
"""
SLOW = """
name: slow
defaults:
  program: "{{ workflow_dir }}/fault_task.py"
  marks: "{{ workflow_dir }}/marks"
  hold: ""
  delay: "2"
roles:
  - name: d-{{ i }}
    for: {begin: "1", end: "3", var: i}
    task: {load: fault}
"""


def workflows(tmp: Path) -> Path:
    d = tmp / "workflows"
    (d / "tasks").mkdir(parents=True)
    (d / "marks").mkdir()
    (d / "tasks" / "fault.yaml").write_text(programs.CLASS)
    (d / "tasks" / "shelly.yaml").write_text(SHELL)
    (d / "fault_task.py").write_text(programs.PROGRAM)
    (d / "slow.yaml").write_text(SLOW)
    (d / "shell.yaml").write_text("name: shell\nroles:\n  - {name: a, task: {load: shelly}}\n")
    return d


def marks(wf: Path, what: str) -> int:
    return len(list((wf / "marks").glob(f"*.{what}")))


def tasks_of(c: httpx.Client, env_id: str) -> list[dict[str, Any]]:
    return list(c.get("/api/tasks", params={"env": env_id}).json())


def to_running(c: httpx.Client, env_id: str) -> None:
    nxt = {"STANDBY": "DEPLOY", "DEPLOYED": "CONFIGURE", "CONFIGURED": "START_ACTIVITY"}
    while (state := state_of(c, env_id)["state"]) != "RUNNING":
        r = transition(c, env_id, nxt[state])
        assert r.status_code == 200, r.text


def test_descendants_of_a_task_end_when_its_killed_agent_is_replaced(tmp_path: Path) -> None:
    wf = workflows(tmp_path)
    with Server(tmp_path / "data", "--workflows", str(wf)) as s, s.client(s.admin) as c:
        env_id = c.post("/api/environments", json={"workflow": "shell"}).json()["id"]
        to_running(c, env_id)
        assert len(of_environment(env_id)) == 2  # the shell and its sleep
        agent = s.agent_pid()
        assert agent is not None
        os.kill(agent, signal.SIGKILL)
        wait_for(lambda: s.agent_pid() not in (None, agent), "the server started a new agent")
        wait_for(lambda: not of_environment(env_id), "the orphaned sleep ended by the new agent")
        wait_for(lambda: state_of(c, env_id)["state"] == "ERROR", "the environment in ERROR")
        r = transition(c, env_id, "RECOVER")
        assert r.status_code == 200, r.text
        to_running(c, env_id)
        assert len(of_environment(env_id)) == 2  # one copy, not two


def test_a_connection_that_did_not_say_hello_changes_nothing(tmp_path: Path) -> None:
    wf = workflows(tmp_path)
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf)) as s, s.client(s.admin) as c:
        env_id = c.post("/api/environments", json={"workflow": "slow"}).json()["id"]
        assert transition(c, env_id, "DEPLOY", wait=False).status_code == 200
        wait_for(lambda: marks(wf, "HELLO") == 3, "the DEPLOY under way")
        for junk in (b"this is not json\n", b'{"id": 1, "op": "end_leftovers", "args": '
                     b'{"envs": ["' + env_id.encode() + b'"]}}\n'):  # fmt: skip
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(socket_path(str(data)))
                sock.sendall(junk)
                sock.shutdown(socket.SHUT_WR)
                answer = sock.makefile("rb").read()
            assert not answer or b"say hello first" in answer, answer
        wait_for(lambda: state_of(c, env_id)["transitioning"] is None, "the DEPLOY ended")
        env = state_of(c, env_id)
        assert env["state"] == "DEPLOYED", env
        assert len(of_environment(env_id)) == 3
        assert transition(c, env_id, "CONFIGURE").status_code == 200


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root, to try as another user")  # fmt: skip
def test_only_the_agents_user_may_drive_it(tmp_path: Path) -> None:
    """Even on an abstract socket (a data directory whose path is too long for a file
    socket), which has no file permissions."""
    long = tmp_path / ("d" * 60) / ("e" * 60)
    stolen = tmp_path / "stolen"
    long.parent.mkdir()
    launch = Launch("x:0", "x", Command("/bin/sh", ("-c", f"id > {stolen}")), "basic")
    batch = {"node": "localhost", "timeout": 5, "slow_after": 5,
             "batch": wire.encode_launches([launch])}  # fmt: skip
    lines = [{"id": 1, "op": "hello", "args": {}}, {"id": 2, "op": "launch", "args": batch}]
    payload = "".join(json.dumps(m) + "\n" for m in lines).encode()
    attempt = f"""
import socket
s = socket.socket(socket.AF_UNIX)
s.connect({socket_path(str(long))!r})
try:
    s.sendall({payload!r})
    f = s.makefile("rb")
    print(f.readline().decode(), f.readline().decode())
except OSError as e:
    print("refused:", e)
"""
    with Server(long) as s:
        assert s.agent_pid() is not None
        out = subprocess.run(
            ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
             sys.executable, "-c", attempt],
            capture_output=True, text=True, timeout=60, cwd="/",
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert not stolen.exists(), out.stdout
        assert '"result"' not in out.stdout, out.stdout
    short = tmp_path / "short"
    with Server(short):
        mode = stat.S_IMODE(os.stat(socket_path(str(short))).st_mode)
        assert mode & 0o077 == 0, oct(mode)


def hello(data: Path) -> dict[str, Any]:
    """Say hello to the agent of ``data`` (as a server would) and return its answer."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(socket_path(str(data)))
        sock.sendall(json.dumps({"id": 1, "op": "hello", "args": {}}).encode() + b"\n")
        line = sock.makefile("rb").readline()
    return dict(json.loads(line)["result"])


def test_a_restarted_server_sets_the_agents_lease(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Server(data, "--agent-lease", "3", keep_agent=True) as s1:
        with s1.client(s1.admin) as c:
            env_id = c.post("/api/environments", json={"workflow": "hello"}).json()["id"]
            to_running(c, env_id)
        token = s1.admin
    assert hello(data)["lease"] == 3
    with Server(data, "--agent-lease", "120", keep_agent=True) as s2, s2.client(token) as c:
        assert state_of(c, env_id)["state"] == "RUNNING"
    assert hello(data)["lease"] == 120
    with Server(data) as s3, s3.client(token) as c:  # ends it all
        assert state_of(c, env_id)["state"] == "RUNNING"
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
    assert not of_environment(env_id)


def test_a_frozen_server_is_fenced(tmp_path: Path) -> None:
    """SIGSTOP: the connection stays open, the server says nothing: after the lease the
    agent ends the tasks; once thawed, the server shows them ended, not RUNNING."""
    with Server(tmp_path / "data", "--agent-lease", "2") as s, s.client(s.admin) as c:
        env_id = c.post("/api/environments", json={"workflow": "hello"}).json()["id"]
        to_running(c, env_id)
        assert s.proc is not None
        s.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not of_environment(env_id), "the tasks fenced")
        finally:
            s.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: state_of(c, env_id)["state"] == "ERROR", "the environment in ERROR")
        tasks = tasks_of(c, env_id)
        assert all(t["state"] not in ("RUNNING", "CONFIGURED") for t in tasks)
        assert any("fenced" in (t["reason"] or "") for t in tasks), tasks  # says why


def test_an_order_under_way_at_a_crash_is_awaited_by_the_re_attach(tmp_path: Path) -> None:
    wf = workflows(tmp_path)
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf), keep_agent=True) as s1:
        token = s1.admin
        with s1.client(token) as c:
            env_id = c.post("/api/environments", json={"workflow": "slow"}).json()["id"]
            for event in ("DEPLOY", "CONFIGURE"):
                assert transition(c, env_id, event).status_code == 200
            assert transition(c, env_id, "START_ACTIVITY", wait=False).status_code == 200
            wait_for(lambda: marks(wf, "START") == 3, "START reached the tasks")
        assert s1.proc is not None
        s1.proc.kill()
        s1.proc.wait()
    with Server(data, "--workflows", str(wf)) as s2, s2.client(token) as c:
        env = state_of(c, env_id)
        states = {t["state"] for t in tasks_of(c, env_id)}
        assert env["state"] == "RUNNING" and states == {"RUNNING"}, (env, states)
        assert env["run_number"] is not None
        assert transition(c, env_id, "STOP_ACTIVITY").status_code == 200
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
    assert not of_environment(env_id)


def test_a_stalled_agent_does_not_fence_a_controller_that_spoke(tmp_path: Path) -> None:
    """The agent alone stalls longer than the lease (stopped, starved of CPU): the
    controller's words wait in its socket; they are read before it judges silence."""
    with Server(tmp_path / "data", "--agent-lease", "1") as s, s.client(s.admin) as c:
        env_id = c.post("/api/environments", json={"workflow": "hello"}).json()["id"]
        to_running(c, env_id)
        pids = set(of_environment(env_id))
        agent = s.agent_pid()
        assert agent is not None
        os.kill(agent, signal.SIGSTOP)
        try:
            time.sleep(2.5)  # the fault: an agent that does not run for 2.5 leases
        finally:
            os.kill(agent, signal.SIGCONT)
        r = transition(c, env_id, "STOP_ACTIVITY")  # answered once the agent runs again
        assert r.status_code == 200, r.text
        assert set(of_environment(env_id)) == pids
        assert state_of(c, env_id)["state"] == "CONFIGURED"


@pytest.mark.parametrize("value", ["nan", "inf", "0.5", "2e7"])
def test_a_lease_must_be_a_finite_number_of_seconds_in_range(value: str, tmp_path: Path) -> None:
    for argv in (["serve", "--agent-lease", value], ["agent", "--lease", value]):
        r = subprocess.run(
            [sys.executable, "-m", "corral", *argv, "--data", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2 and "lease" in r.stderr, r.stderr
        assert not (tmp_path / "data").exists()  # refused before anything is made


def test_a_crash_during_the_re_attach_keeps_the_transition_under_way(tmp_path: Path) -> None:
    """A server crashes during STOP_ACTIVITY; the next one crashes while its re-attach
    waits for that order; the third still knows a transition was under way and goes
    where the tasks went (CONFIGURED, the run closed), not back to RUNNING."""
    wf = workflows(tmp_path)
    (wf / "slow.yaml").write_text(SLOW.replace('delay: "2"', 'delay: "3"'))
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf), keep_agent=True) as s1:
        token = s1.admin
        with s1.client(token) as c:
            env_id = c.post("/api/environments", json={"workflow": "slow"}).json()["id"]
            to_running(c, env_id)
            assert transition(c, env_id, "STOP_ACTIVITY", wait=False).status_code == 200
            wait_for(lambda: marks(wf, "STOP") == 3, "STOP reached the tasks")
        assert s1.proc is not None
        s1.proc.kill()
        s1.proc.wait()
    log = data / "agent.log"
    seen = log.read_text().count("waiting for")
    s2 = subprocess.Popen(  # killed while its re-attach waits: it never serves
        [sys.executable, "-m", "corral", "serve", "--data", str(data), "--listen",
         "127.0.0.1:0", "--workflows", str(wf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: log.read_text().count("waiting for") > seen, "the re-attach waits")
    finally:
        s2.kill()
        s2.wait()
    with Server(data, "--workflows", str(wf)) as s3, s3.client(token) as c:
        env = state_of(c, env_id)
        states = {t["state"] for t in tasks_of(c, env_id)}
        assert states == {"CONFIGURED"}, states
        assert env["state"] == "CONFIGURED" and env["run_number"] is None, env
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
    assert not of_environment(env_id)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root, to try as another user")  # fmt: skip
def test_a_server_refuses_an_agent_socket_another_user_holds(tmp_path: Path) -> None:
    """An abstract socket has no owner: another user can bind the name before the
    agent does. The server checks who listens, and says so, rather than sending its
    tasks there."""
    long = tmp_path / ("d" * 60) / ("e" * 60)
    long.parent.mkdir()
    squat = f"""
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind({socket_path(str(long))!r})
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
"""
    impostor = subprocess.Popen(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
         sys.executable, "-c", squat],
        stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    try:
        assert impostor.stdout is not None and impostor.stdout.readline() == "listening\n"
        with pytest.raises(AssertionError, match="held by user"), Server(long):
            pass
    finally:
        impostor.kill()
        impostor.wait()
