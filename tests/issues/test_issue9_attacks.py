"""Issue 9, second round: what an attacker found in the fault handling, each pinned by
a test that failed before its fix."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from corral.control.environment import TransitionError
from corral.control.journal import StoreUnavailable
from corral.control.service import ControlService
from corral.templates import DictSources, expand
from tests.control.harness import Harness, run
from tests.faults import programs
from tests.faults.processes import of_environment
from tests.faults.rig import Rig
from tests.faults.rig import run as rig_run
from tests.faults.test_server_kill import transition, wait_for, workflows
from tests.issues.test_issue9 import THREE_BASIC, plan, to_running

ESCAPES = """
name: wf
roles:
  - {name: ok, task: {load: sleeper}}
  - {name: crash, task: {load: quitter, critical: false}, vars: {code: "3"}}
  - {name: done, task: {load: quitter, critical: false}, vars: {code: "0"}}
  - name: hook
    task: {load: quitter, trigger: after_START_ACTIVITY, timeout: 30s}
  - name: call
    call:
      func: "exec.Shell('setsid /bin/sleep 600 >/dev/null 2>&1 & exit 0')"
      trigger: after_START_ACTIVITY
"""
# leaves a process in a session of its own (waiting until it is there), then ends
QUITTER = """
name: quitter
control: {mode: basic}
command:
  shell: true
  value: >-
    m=$(mktemp -u); setsid sh -c "touch $m; exec /bin/sleep 600" &
    while [ ! -e $m ]; do sleep 0.01; done; rm -f $m; exit {{ code }}
"""


def test_destroy_ends_the_escapees_of_tasks_that_ended_hooks_and_calls(tmp_path: Path) -> None:
    files = {"wf.yaml": ESCAPES, "tasks/quitter.yaml": QUITTER, "tasks/sleeper.yaml":
             programs.SLEEPER}  # fmt: skip
    p = expand("wf.yaml", DictSources(files), global_defaults={"code": "0"})

    async def body(h: Harness) -> None:
        from corral.calls import Registry
        from corral.calls.builtin import ExecPlugin

        h.plane.calls = Registry({"exec": ExecPlugin()})
        env = h.create(p)
        await to_running(env)
        # crash, done and hook each left a setsid sleep behind; ok runs (the call's own
        # clean-up may end its sleep before destroy: then destroy has nothing to do for it)
        await h.until(lambda: len(of_environment(env.id)) >= 4)
        await h.until(lambda: env.by_path["wf.crash"].state == "ERROR")  # its exit, reported
        await h.plane.destroy(env.id)
        await h.until(lambda: not of_environment(env.id))

    run(tmp_path, body)


DEAD_SERVER = r"""
import asyncio, sys
from corral.backends.local import LocalBackend
from corral.control import recipes
from corral.control.plane import ControlPlane, install_child_watcher
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand
FILES = {"wf.yaml": "name: old\nroles:\n  - {name: a, task: {load: s}}\n",
         "tasks/s.yaml": "name: s\ncontrol: {mode: basic}\n"
                         "command: {value: /bin/sleep, arguments: ['600']}\n"}
async def main():
    install_child_watcher()
    plane = ControlPlane(SqliteStore(sys.argv[1]), LocalBackend())
    env = plane.create(expand("wf.yaml", DictSources(FILES)),
                       recipe=recipes.make("wf.yaml", FILES, {}, {}, "0"))
    for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
        await env.transition(event)
    print(env.id, flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def dead_server(tmp: Path) -> tuple[str, str]:
    """A control process that ran an environment to RUNNING, then was killed -9."""
    db = str(tmp / "data" / "corral.db")
    os.makedirs(tmp / "data", exist_ok=True)
    script = tmp / "dead_server.py"
    script.write_text(DEAD_SERVER)
    old = subprocess.Popen([sys.executable, str(script), db], stdout=subprocess.PIPE)
    assert old.stdout is not None
    env_id = old.stdout.readline().decode().strip()
    old.kill()
    old.wait()
    return db, env_id


def test_a_take_over_while_the_store_refuses_writes_shows_the_tasks_lost(
    tmp_path: Path,
) -> None:
    """The marking (LOST, ERROR) is queued, not stored: the taken-over environment must
    still be in ERROR with its tasks LOST, in memory and in the API's task list."""
    _, env_id = dead_server(tmp_path)

    async def body(rig: Rig) -> None:
        rig.store.counter.arm("mark_lost", 0)
        notes = await rig.plane.adopt_leftovers()
        assert rig.store.counter.fired == "mark_lost#0", notes
        env = rig.plane.environments[env_id]
        assert env.state == "ERROR" and {t.state for t in env.tasks} == {"LOST"}
        svc = ControlService(rig.plane, workflows=str(tmp_path))
        assert {t["state"] for t in svc.find_tasks(env=env_id)} == {"LOST"}
        assert {t["state"] for t in svc.find_tasks()} == {"LOST"}
        await rig.until(lambda: rig.plane.journal.behind == 0, "the store caught up")
        assert {t["state"] for t in rig.store.tasks(env_id)} == {"LOST"}
        await env.transition("RECOVER")  # and it is usable
        await rig.plane.destroy(env_id)
        await rig.check_destroyed(env)

    rig_run(tmp_path, body)


def test_while_the_store_lags_the_task_list_shows_a_dead_task_dead(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        env = rig.plane.create(plan(tmp_path, THREE_BASIC))
        await to_running(env)
        svc = ControlService(rig.plane, workflows=str(tmp_path))
        victim = env.by_path["wf.b"]
        n = rig.store.counter.calls.count("update_tasks")
        rig.store.counter.arm("update_tasks", n)  # the death's batch is refused
        os.kill(victim.pid or 0, signal.SIGKILL)
        await rig.until(lambda: victim.state == "ERROR", "the death seen")
        assert rig.store.counter.fired is not None
        [row] = svc.find_tasks(env=env.id, state="ERROR")
        assert row["path"] == "wf.b" and "SIGKILL" in row["reason"]
        assert not svc.find_tasks(env=env.id, state="RUNNING", node="localhost", offset=2)

    rig_run(tmp_path, body)


def test_cordon_and_tokens_answer_503_when_the_store_refuses(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        from corral.control.service import ServiceError

        svc = ControlService(rig.plane, workflows=str(tmp_path))
        rig.store.counter.arm("set_meta", 0)
        with pytest.raises(StoreUnavailable):
            rig.plane.cordon("localhost", True)
        assert not any(n.cordoned for n in rig.plane.ledger.nodes), "half applied"
        rig.store.counter.arm("add_token", 0)
        with pytest.raises(ServiceError) as e:
            svc.create_token("viewer", "v", by="admin")
        assert e.value.status == 503

    rig_run(tmp_path, body)


EARLY = r"""
import json, os, socket, time
s = socket.socket(fileno=int(os.environ["CORRAL_CONTROL_FD"]))
s.sendall(b'{"event": "ERROR", "error": "no calibration"}\n' if os.environ["HOW"] == "error"
          else b"[" * 100000 + b"\n")
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["error", "nested"])
def test_a_task_failing_before_its_hello_is_recovered_at_the_first_try(
    tmp_path: Path, how: str
) -> None:
    prog = tmp_path / "early.py"
    prog.write_text(EARLY)
    cls = (f"name: early\ncontrol: {{mode: direct}}\ncommand: {{value: {sys.executable}, "
           f"arguments: ['{prog}'], env: ['HOW={{{{ how }}}}']}}\n")  # fmt: skip
    files = {"wf.yaml": "name: wf\nroles:\n  - {name: e, task: {load: early}}\n",
             "tasks/early.yaml": cls}  # fmt: skip
    p = expand("wf.yaml", DictSources(files), variables={"how": how})

    async def body(h: Harness) -> None:
        env = h.create(p, timeouts={"DEPLOY": 60})
        with pytest.raises(TransitionError):
            await env.transition("DEPLOY")
        t = env.by_path["wf.e"]
        assert t.state == "ERROR" and (
            "no calibration" in (t.reason or "") or "protocol error" in (t.reason or "")
        ), t.reason
        first = t.pid
        assert first is not None, "its process is known, to be ended"
        with pytest.raises(TransitionError, match=r"no calibration|protocol error"):
            await env.transition("RECOVER")  # fails again the same way, not 'already running'
        assert "already running" not in (env.error or "")
        await h.until(lambda: first not in of_environment(env.id))

    run(tmp_path, body)


def test_tasks_left_unknown_by_a_backend_fault_end_in_error(tmp_path: Path) -> None:
    async def body(rig: Rig) -> None:
        env = rig.plane.create(plan(tmp_path, THREE_BASIC.replace("sleeper", "fake")))
        await env.transition("DEPLOY")
        rig.backend.counter.arm("transition", 0)
        with pytest.raises(TransitionError, match="backend failed"):
            await env.transition("CONFIGURE")
        await rig.check(env, "a backend fault")
        assert {t.state for t in env.tasks} == {"ERROR"}
        assert all("backend failed" in (t.reason or "") for t in env.tasks)

    rig_run(tmp_path, body)


GO_ERROR_HOOK = """
name: wf
roles:
  - {name: a, task: {load: sleeper}}
  - name: h
    task: {load: marker, trigger: GO_ERROR, timeout: 30s}
  - name: c
    call: {func: "exec.Shell('touch {{ where }}/destroyed')", trigger: before_DESTROY}
"""


def test_hooks_at_an_automatic_go_error_and_at_destroy_run(tmp_path: Path) -> None:
    files = {"wf.yaml": GO_ERROR_HOOK, "tasks/sleeper.yaml": programs.SLEEPER,
             "tasks/marker.yaml": "name: marker\ncontrol: {mode: basic}\ncommand: "
             "{shell: true, value: 'touch {{ where }}/go-error'}\n"}  # fmt: skip
    p = expand("wf.yaml", DictSources(files), global_defaults={"where": str(tmp_path)})

    async def body(h: Harness) -> None:
        from corral.calls import Registry
        from corral.calls.builtin import ExecPlugin

        h.plane.calls = Registry({"exec": ExecPlugin()})
        env = h.create(p)
        await to_running(env)
        os.kill(env.by_path["wf.a"].pid or 0, signal.SIGKILL)
        await h.until(lambda: (tmp_path / "go-error").exists())
        await h.plane.destroy(env.id)
        assert (tmp_path / "destroyed").exists()
        assert h.of("call", path="wf.c", status="DONE")

    run(tmp_path, body)


def test_one_unstartable_task_fails_alone(tmp_path: Path) -> None:
    files = {"wf.yaml": "name: wf\nroles:\n  - {name: a, task: {load: sleeper}}\n"
             "  - {name: b, task: {load: bad, critical: false}}\n",
             "tasks/sleeper.yaml": programs.SLEEPER,
             "tasks/bad.yaml": "name: bad\ncontrol: {mode: basic}\ncommand: "
             "{value: /bin/sleep, arguments: ['1'], user: no-such-user-here}\n"}  # fmt: skip
    p = expand("wf.yaml", DictSources(files))

    async def body(h: Harness) -> None:
        env = h.create(p)
        await env.transition("DEPLOY")
        assert env.by_path["wf.a"].state == "STANDBY"
        b = env.by_path["wf.b"]
        assert b.state == "ERROR" and "cannot start" in (b.reason or ""), b.reason

    run(tmp_path, body)


def test_delete_during_a_waiting_transition_answers_409(tmp_path: Path) -> None:
    from tests.api.server import Server

    wf = workflows(tmp_path, """
name: crash
defaults: {program: "{{ workflow_dir }}/fault_task.py", marks: "{{ workflow_dir }}/marks",
           hold: "HELLO", delay: "0"}
roles:
  - {name: slow, task: {load: fault}}
""")  # fmt: skip
    with Server(tmp_path / "data", "--workflows", str(wf)) as s, s.client(s.admin) as c:
        env_id = c.post("/api/environments", json={"workflow": "crash"}).json()["id"]
        answers: list[httpx.Response] = []

        async def both() -> None:
            async with httpx.AsyncClient(
                base_url=s.url, timeout=60, headers={"Authorization": f"Bearer {s.admin}"}
            ) as a:
                deploy = asyncio.ensure_future(
                    a.post(f"/api/environments/{env_id}/transitions", json={"event": "DEPLOY"})
                )
                await asyncio.to_thread(wait_for, lambda: bool(of_environment(env_id)), "up")
                answers.append(await a.delete(f"/api/environments/{env_id}"))
                answers.append(await deploy)  # fmt: skip

        asyncio.run(both())
        delete, deploy = answers
        assert delete.status_code == 200, delete.text
        assert deploy.status_code == 409 and "destroyed" in deploy.json()["detail"], deploy.text
        assert transition(c, env_id, "DEPLOY").status_code == 409  # it ended


def test_two_deletes_of_a_left_environment_at_once(tmp_path: Path) -> None:
    _, env_id = dead_server(tmp_path)

    async def body(rig: Rig) -> None:
        from corral.control.service import Principal

        rig.plane.left[env_id] = "test"
        svc = ControlService(rig.plane, workflows=str(tmp_path))
        who = Principal("t", "operator", "operator")
        await asyncio.gather(svc.destroy(env_id, who), svc.destroy(env_id, who))  # no 409
        assert not rig.plane.left
        await rig.until(lambda: not of_environment(env_id), "its leftovers ended")
        row = rig.store.environment(env_id)
        assert row is not None and row["state"] == "DONE"
        assert len([e for e in rig.store.events(env=env_id) if e.get("note", "").startswith(
            "destroyed")]) == 1  # fmt: skip

    rig_run(tmp_path, body)
