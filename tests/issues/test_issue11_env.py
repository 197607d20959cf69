"""Least privilege for tasks (issue 11): a task, its health check and an ``exec`` call
get a minimal environment, never the whole environment of the server that starts them
(which holds secrets: ``CORRAL_TOKEN``, service credentials).

They get PATH, HOME and LANG, the variables an administrator passes through with
``--task-env``, their class's env and the ``CORRAL_*`` variables corral sets for them.
Before the fix, every task and exec call inherited all of the server's environment.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from corral.ports.taskenv import DEFAULT_LANG, DEFAULT_PATH, passed, task_environment
from tests.api.server import Server
from tests.conftest import ROOT
from tests.control.harness import PATIENCE
from tests.fake_tasks import PROGRAM
from tests.faults.processes import of_environment
from tests.faults.test_server_kill import state_of, transition, wait_for

# a task class may set PATH itself: its own wins over the server's
CLASS_PATH = "/usr/local/bin:/usr/bin:/bin:/class/only"
SLEEPER = f"""
name: sleeper
control: {{mode: basic}}
command:
  value: sleep
  arguments: ["600"]
  env: ["CLASS_VAR=from-the-class", "PATH={CLASS_PATH}"]
"""
DIRECT = """
name: direct
control: {mode: direct}
command:
  value: "{{ python }}"
  arguments: ["{{ workflow_dir }}/fake_task.py", good]
  env: ["CLASS_VAR=from-the-class"]
"""
WORKFLOW = """
name: leak
roles:
  - name: sleeper
    task: {load: sleeper}
  - name: direct
    task: {load: direct}
  - name: dump
    call:
      func: exec.Run('/bin/cp', '/proc/self/environ', '{{ workflow_dir }}/exec.env')
      trigger: after_CONFIGURE
      timeout: 60s
      critical: true
"""


def workflows(tmp: Path) -> Path:
    d = tmp / "workflows"
    (d / "tasks").mkdir(parents=True)
    (d / "tasks" / "sleeper.yaml").write_text(SLEEPER)
    (d / "tasks" / "direct.yaml").write_text(DIRECT)
    (d / "leak.yaml").write_text(WORKFLOW)
    (d / "fake_task.py").write_text(PROGRAM)
    return d


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Secrets (and a variable to pass through) in the environment the server starts with."""
    values = {
        "CORRAL_TOKEN": "crl_" + secrets.token_hex(16),
        "CORRAL_CANARY_SECRET": "canary-" + secrets.token_hex(16),
        "SERVICE_PASSWORD": "pw-" + secrets.token_hex(16),
        "PASSED_VAR": "passed-" + secrets.token_hex(8),
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("UNSET_VAR", raising=False)
    return values


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def read_environ(path: Path) -> dict[str, str]:
    pairs = (item.decode().partition("=") for item in path.read_bytes().split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def check_minimal(env: dict[str, str], server: dict[str, str], *, extra: set[str]) -> None:
    """No secret of the server, by name or by value; PATH, HOME, LANG and the variable
    passed through; of the rest, only ``extra`` and corral's own per-child variables."""
    for name in ("CORRAL_TOKEN", "CORRAL_CANARY_SECRET", "SERVICE_PASSWORD"):
        assert name not in env, f"{name} leaked: {sorted(env)}"
        assert not any(server[name] in v for v in env.values()), f"{name}'s value leaked"
    assert env["HOME"] == (os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir)
    assert env["LANG"] == (os.environ.get("LANG") or DEFAULT_LANG)
    assert env["PASSED_VAR"] == server["PASSED_VAR"]
    assert "UNSET_VAR" not in env
    mine = {k for k in env if k.startswith("CORRAL_")}
    assert mine.isdisjoint(k for k in os.environ if k.startswith("CORRAL_")), mine
    assert set(env) - mine == {"PATH", "HOME", "LANG", "PASSED_VAR"} | extra, sorted(env)


def check_task(
    env: dict[str, str], server: dict[str, str], task: dict[str, str], env_id: str, *, agent: bool
) -> None:
    check_minimal(env, server, extra={"CLASS_VAR"})
    assert env["CLASS_VAR"] == "from-the-class"
    assert env["CORRAL_ENVIRONMENT_ID"] == env_id
    assert env["CORRAL_TASK_ID"] == task["id"]
    assert env["CORRAL_TASK_PATH"] == task["path"]
    want = {"CORRAL_ENVIRONMENT_ID", "CORRAL_TASK_ID", "CORRAL_TASK_PATH"}
    if agent:
        want.add("CORRAL_AGENT")  # the node agent's mark (the sweep finds descendants by it)
    if task["path"].endswith("direct"):
        want.add("CORRAL_CONTROL_FD")
        assert env["PATH"] == os.environ["PATH"]
    else:
        assert env["PATH"] == CLASS_PATH  # the class's own PATH wins
    assert {k for k in env if k.startswith("CORRAL_")} == want


def check_exec(env: dict[str, str], server: dict[str, str], env_id: str) -> None:
    check_minimal(env, server, extra=set())
    assert env["PATH"] == os.environ["PATH"]
    assert env["CORRAL_ENVIRONMENT_ID"] == env_id
    assert env["CORRAL_EVENT"] == "CONFIGURE"
    assert env["CORRAL_TRIGGER"] == "after_CONFIGURE"
    assert env["CORRAL_CALL_PATH"] == "leak.dump"


def test_tasks_and_exec_calls_of_a_server_get_a_minimal_environment(
    tmp_path: Path, secrets_env: dict[str, str]
) -> None:
    """`corral serve` (its tasks run under the node agent it starts)."""
    wf = workflows(tmp_path)
    args = ("--workflows", str(wf), "--task-env", "PASSED_VAR", "--task-env", "UNSET_VAR")
    with Server(tmp_path / "data", *args) as s, s.client(s.admin) as c:
        r = c.post("/api/environments", json={"workflow": "leak"})
        assert r.status_code in (200, 201), r.text
        env_id = r.json()["id"]
        for event in ("DEPLOY", "CONFIGURE"):
            r = transition(c, env_id, event)
            assert r.status_code == 200, r.text
        assert state_of(c, env_id)["state"] == "CONFIGURED"
        tasks = c.get("/api/tasks", params={"env": env_id}).json()
        assert sorted(t["path"] for t in tasks) == ["leak.direct", "leak.sleeper"]
        for t in tasks:
            assert t["pid"] in of_environment(env_id), t
            check_task(environ_of(t["pid"]), secrets_env, t, env_id, agent=True)
        check_exec(read_environ(wf / "exec.env"), secrets_env, env_id)


def test_tasks_and_exec_calls_of_corral_run_get_a_minimal_environment(
    tmp_path: Path, secrets_env: dict[str, str]
) -> None:
    """`corral run` (the local backend in its own process)."""
    wf = workflows(tmp_path)
    out = tmp_path / "run.log"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "run", str(wf / "leak.yaml"), "--data",
             str(tmp_path / "data"), "--until", "CONFIGURED", "--task-env", "PASSED_VAR"],
            stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    try:
        wait_for(lambda: "is CONFIGURED" in out.read_text() or proc.poll() is not None,
                 "the environment CONFIGURED")  # fmt: skip
        text = out.read_text()
        m = re.search(r"environment (\w+) is CONFIGURED", text)
        assert m is not None, text
        env_id = m.group(1)
        pids = of_environment(env_id)
        assert len(pids) == 2, text
        for pid in pids:
            env = environ_of(pid)
            task = {"id": env["CORRAL_TASK_ID"], "path": env["CORRAL_TASK_PATH"]}
            check_task(env, secrets_env, task, env_id, agent=False)
        check_exec(read_environ(wf / "exec.env"), secrets_env, env_id)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        proc.wait(PATIENCE)


def test_a_server_that_takes_over_a_running_agent_sets_what_its_tasks_get(
    tmp_path: Path, secrets_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent was started by the first server, with its environment; the second
    server's --task-env, with the second server's values, is what the tasks it starts
    get (told in its hello, as the lease is)."""
    wf = workflows(tmp_path)
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf), "--task-env", "PASSED_VAR",
                keep_agent=True) as s1, s1.client(s1.admin) as c:  # fmt: skip
        token = s1.admin
        first = c.post("/api/environments", json={"workflow": "leak"}).json()["id"]
        assert transition(c, first, "DEPLOY").status_code == 200
        agent = s1.agent_pid()
    assert agent is not None and of_environment(first)  # left running under the agent
    monkeypatch.setenv("OTHER_VAR", "other-" + secrets.token_hex(8))
    with Server(data, "--workflows", str(wf), "--task-env", "OTHER_VAR") as s2, \
            s2.client(token) as c:  # fmt: skip
        assert s2.agent_pid() == agent
        second = c.post("/api/environments", json={"workflow": "leak"}).json()["id"]
        assert transition(c, second, "DEPLOY").status_code == 200
        for t in c.get("/api/tasks", params={"env": second}).json():
            env = environ_of(t["pid"])
            assert env["OTHER_VAR"] == os.environ["OTHER_VAR"]
            assert "PASSED_VAR" not in env and "CORRAL_TOKEN" not in env
            assert env["CORRAL_TASK_ID"] == t["id"]


# -- the function -------------------------------------------------------------------------


def test_the_environment_of_a_child() -> None:
    server = {"PATH": "/srv/bin:/usr/bin", "HOME": "/home/srv", "LANG": "de_DE.UTF-8",
              "CORRAL_TOKEN": "crl_x", "LD_LIBRARY_PATH": "/opt/lib", "SECRET": "s"}  # fmt: skip
    env = task_environment(
        [("PATH", "/class/bin"), ("APP", "1"), ("CORRAL_TASK_ID", "forged")],
        [("CORRAL_TASK_ID", "e:0")],
        passed=passed(["LD_LIBRARY_PATH", "NOT_SET"], server),
        environ=server,
    )
    assert env == {
        "PATH": "/class/bin",  # the class's own wins over the server's
        "HOME": "/home/srv",
        "LANG": "de_DE.UTF-8",
        "LD_LIBRARY_PATH": "/opt/lib",  # passed through (--task-env); NOT_SET is not set
        "APP": "1",
        "CORRAL_TASK_ID": "e:0",  # corral's own win over the class's
    }


def test_the_defaults_when_the_server_has_no_path_home_or_lang() -> None:
    env = task_environment(environ={"CORRAL_TOKEN": "crl_x"})
    assert env == {
        "PATH": DEFAULT_PATH,
        "HOME": pwd.getpwuid(os.getuid()).pw_dir,
        "LANG": DEFAULT_LANG,
    }
    me = pwd.getpwuid(os.getuid())
    as_user = task_environment(environ={"HOME": "/elsewhere"}, user=me.pw_name)
    assert as_user["HOME"] == me.pw_dir  # a task run as a user gets that user's home
