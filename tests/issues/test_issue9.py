"""Issue 9: a dead task is never reported happy. One regression test per reported bug.

Each test failed on the code the issue was filed against; the names say what they pin.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.backends.sim import SimBackend
from corral.control.environment import TransitionError
from corral.control.plane import ControlPlane
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand
from tests.control.harness import Harness, run
from tests.fake_tasks import alive, write_program
from tests.faults.processes import marked

SLEEPER = """
name: sleeper
control: {mode: basic}
command: {value: /bin/sleep, arguments: ["600"]}
"""
FAKE = """
name: fake
control: {mode: direct}
command: {value: "{{ python }}", arguments: ["{{ program }}", "{{ mode }}"]}
"""
HOOK = """
name: hook
control: {mode: basic}
command: {value: /bin/sleep, arguments: ["600"]}
"""


def plan(tmp: Path, workflow: str, **variables: str) -> Any:
    files = {
        "wf.yaml": workflow,
        "tasks/sleeper.yaml": SLEEPER,
        "tasks/fake.yaml": FAKE,
        "tasks/hook.yaml": HOOK,
    }
    return expand(
        "wf.yaml",
        DictSources(files),
        variables=variables,
        global_defaults={"python": sys.executable, "program": write_program(tmp), "mode": "good"},
    )


THREE_BASIC = """
name: wf
roles:
  - {name: a, task: {load: sleeper}}
  - {name: b, task: {load: sleeper}}
  - {name: c, task: {load: sleeper}}
"""
THREE_DIRECT = THREE_BASIC.replace("sleeper", "fake")
MEMBERS = """
name: wf
roles:
  - {name: a, task: {load: sleeper}}
  - name: w-{{ i }}
    for: {begin: "1", end: "3", var: i, nmin: "3"}
    task: {load: sleeper, critical: false}
"""


async def to_running(env: Any) -> None:
    for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
        await env.transition(event)


@pytest.mark.parametrize(
    ("workflow", "victim"),
    [(THREE_BASIC, "wf.b"), (THREE_DIRECT, "wf.b"), (MEMBERS, "wf.w-2")],
    ids=["basic", "direct", "collection-member"],
)
def test_9_1_a_relaunched_task_death_is_detected(
    tmp_path: Path, workflow: str, victim: str
) -> None:
    """kill -9, RECOVER, kill -9 of the relaunched process: ERROR each time, and again."""

    async def body(h: Harness) -> None:
        env = h.create(plan(tmp_path, workflow))
        await to_running(env)
        t = env.by_path[victim]
        for round_ in range(3):
            pid = t.pid
            assert pid is not None and alive(pid)
            os.kill(pid, signal.SIGKILL)
            await h.until(lambda: env.state == "ERROR")
            assert t.state == "ERROR", f"round {round_}: the dead task is {t.state}"
            assert victim in (env.error or "")
            await env.transition("RECOVER")
            await env.transition("CONFIGURE")
            await env.transition("START_ACTIVITY")
            assert t.pid not in (None, pid)

    run(tmp_path, body)


FOR_ON_TASK = """
name: wf
roles:
  - name: w-{{ i }}
    for: {begin: "1", end: "20", var: i, nmin: "15"}
    task: {load: sleeper, critical: false}
"""


def test_9_2_nmin_holds_when_for_sits_on_the_task_role(tmp_path: Path) -> None:
    backend = SimBackend(1)

    async def main() -> None:
        store = SqliteStore(str(tmp_path / "corral.db"))
        plane = ControlPlane(store, backend)
        try:
            env = plane.create(plan(tmp_path, FOR_ON_TASK))
            await to_running(env)
            # the simulated backend reports a kill at once, in the same call
            for i in range(1, 6):  # 15 of 20 left: still enough
                backend.kill(env.by_path[f"wf.w-{i}"].id)
            assert env.state == "RUNNING"
            backend.kill(env.by_path["wf.w-6"].id)  # 14 < nmin
            assert env.state == "ERROR"
            assert "14 of 20 members healthy, fewer than nmin=15" in (env.error or "")
            assert "{{" not in (env.error or ""), env.error
        finally:
            await plane.close()
            store.close()

    asyncio.run(main())


HOOKED = """
name: wf
roles:
  - {name: a, task: {load: sleeper}}
  - name: h
    task: {load: hook, trigger: before_CONFIGURE, await: after_CONFIGURE, timeout: 600s}
"""


def test_9_7_hook_task_processes_end_with_a_cancelled_transition(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan(tmp_path, HOOKED))
        await env.transition("DEPLOY")
        job = asyncio.ensure_future(env.transition("CONFIGURE"))
        hook = env.by_path["wf.h"]
        await h.until(lambda: bool(marked(hook.id)))
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        await h.until(lambda: not marked(hook.id))
        assert env.transitioning is None
        assert hook.state not in ("LAUNCHING", "STANDBY", "CONFIGURED", "RUNNING")
        assert [t["status"] for t in h.store.transitions(env.id)] == ["DONE", "FAILED"]

    run(tmp_path, body)


ESCAPER = """
name: escaper
control: {mode: basic}
command:
  shell: true
  value: "setsid /bin/sleep 600 & exec /bin/sleep 600"
"""


def test_9_9_a_grandchild_that_escaped_with_setsid_is_ended(tmp_path: Path) -> None:
    files = {
        "wf.yaml": "name: wf\nroles:\n  - {name: e, task: {load: escaper}}\n",
        "tasks/escaper.yaml": ESCAPER,
    }
    p = expand("wf.yaml", DictSources(files))

    async def body(h: Harness) -> None:
        env = h.create(p)
        await to_running(env)
        tid = env.by_path["wf.e"].id
        await h.until(lambda: len(marked(tid)) == 2)  # the task and its escaped grandchild
        await h.plane.destroy(env.id)
        await h.until(lambda: not marked(tid))

    run(tmp_path, body)


def test_9_11_slow_text_says_no_answer(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        p = plan(tmp_path, THREE_DIRECT, mode="mute")
        env = h.create(p, timeouts={"CONFIGURE": 3})
        await env.transition("DEPLOY")
        with pytest.raises(TransitionError):
            await env.transition("CONFIGURE")
        slow = h.of("task", status="SLOW")
        assert slow and all("no answer to CONFIGURE" in e["reason"] for e in slow), slow

    run(tmp_path, body)


def test_9_11_a_lost_node_makes_its_tasks_lost(tmp_path: Path) -> None:
    backend = SimBackend(["n1", "n2"])
    wf = """
name: wf
roles:
  - name: w-{{ i }}
    for: {begin: "1", end: "4", var: i}
    task: {load: sleeper, critical: false}
"""

    async def main() -> None:
        store = SqliteStore(str(tmp_path / "corral.db"))
        plane = ControlPlane(store, backend)
        try:
            env = plane.create(plan(tmp_path, wf))
            await to_running(env)
            node = env.tasks[0].node
            backend.lose_node(node)  # reported at once, in the same call
            on = [t for t in env.tasks if t.node == node]
            assert on and all(t.state == "LOST" for t in on), [t.state for t in on]
            rows = [r for r in store.tasks(env.id) if r["node"] == node]
            assert {r["state"] for r in rows} == {"LOST"}
        finally:
            await plane.close()
            store.close()

    asyncio.run(main())


def test_9_11_failed_transitions_are_timed_in_the_metric(tmp_path: Path) -> None:
    from corral.api.metrics import Metrics

    class _Svc:
        def __init__(self, plane: ControlPlane) -> None:
            self.plane = plane

    async def body(h: Harness) -> None:
        metrics = Metrics(_Svc(h.plane))  # type: ignore[arg-type]
        env = h.create(plan(tmp_path, THREE_DIRECT, mode="crash"))
        await env.transition("DEPLOY")
        with pytest.raises(TransitionError):
            await env.transition("CONFIGURE")
        text = metrics.render()[0].decode()
        assert 'corral_transition_seconds_count{event="CONFIGURE",status="FAILED"} 1.0' in text

    run(tmp_path, body)


def test_9_6_two_destroys_at_once(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan(tmp_path, THREE_BASIC))
        await to_running(env)
        await asyncio.gather(h.plane.destroy(env.id), h.plane.destroy(env.id))
        assert env.state == "DONE" and env.id not in h.plane.environments

    run(tmp_path, body)


def test_9_5_an_unexpected_backend_exception_does_not_wedge(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan(tmp_path, THREE_DIRECT))
        await env.transition("DEPLOY")
        real = h.backend.transition

        async def broken(*a: Any, **kw: Any) -> Any:
            raise OSError(24, "Too many open files")

        h.backend.transition = broken  # type: ignore[method-assign]
        with pytest.raises(TransitionError, match="Too many open files"):
            await env.transition("CONFIGURE")
        h.backend.transition = real  # type: ignore[method-assign]
        assert env.transitioning is None and env.state == "ERROR"
        assert [t["status"] for t in h.store.transitions(env.id)] == ["DONE", "FAILED"]
        await env.transition("RECOVER")
        await to_running_from_deployed(env)
        os.kill(env.by_path["wf.a"].pid or 0, signal.SIGKILL)
        await h.until(lambda: env.state == "ERROR")

    run(tmp_path, body)


async def to_running_from_deployed(env: Any) -> None:
    await env.transition("CONFIGURE")
    await env.transition("START_ACTIVITY")


def test_9_5_pidfd_failure_does_not_leak_the_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import corral.backends.local as local

    def no_pidfd(pid: int, flags: int = 0) -> int:
        raise OSError(24, "Too many open files")

    async def body(h: Harness) -> None:
        env = h.create(plan(tmp_path, THREE_BASIC))
        monkeypatch.setattr(local.os, "pidfd_open", no_pidfd)
        with pytest.raises(TransitionError, match="Too many open files"):
            await env.transition("DEPLOY")
        monkeypatch.undo()
        await h.until(lambda: not any(marked(t.id) for t in env.tasks))
        assert env.state == "ERROR" and env.transitioning is None

    run(tmp_path, body)


def test_9_11_task_state_changes_follow_the_table() -> None:
    from corral.lifecycle import task as tasksm

    with pytest.raises(tasksm.IllegalTaskTransition):
        tasksm.next_state(tasksm.RUNNING, "RELAUNCH")
    assert tasksm.next_state(tasksm.ERROR, "RELAUNCH") == tasksm.PENDING
    assert tasksm.next_state(tasksm.RUNNING, "LOSE") == tasksm.LOST


CRASH_DEPLOY = """
name: crash
defaults: {program: "{{ workflow_dir }}/fault_task.py", marks: "{{ workflow_dir }}/marks",
           hold: "HELLO", delay: "0"}
roles:
  - name: s-{{ i }}
    for: {begin: "1", end: "99", var: i}
    task: {load: sleeper}
  - {name: slow, task: {load: fault}}
"""


def test_9_3_a_server_crash_during_deploy_leaves_no_orphans(tmp_path: Path) -> None:
    """99 basic tasks and one direct task that never says hello: kill -9 of the server
    while DEPLOY waits for it. The node agent keeps the 100 processes; the restart
    re-attaches them (the one never ready is ERROR, its process known), and after
    destroy none is left. If the agent dies too, its tasks die with it."""
    from tests.api.server import Server
    from tests.faults.processes import of_environment
    from tests.faults.test_server_kill import transition, wait_for, workflows

    wf = workflows(tmp_path, CRASH_DEPLOY)
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf), keep_agent=True) as s1:
        token = s1.admin
        with s1.client(token) as c:
            env_id = c.post("/api/environments", json={"workflow": "crash"}).json()["id"]
            assert transition(c, env_id, "DEPLOY", wait=False).status_code == 200
            wait_for(lambda: len(of_environment(env_id)) == 100, "all 100 processes started")
            assert s1.proc is not None
            s1.proc.kill()
            s1.proc.wait()
    running = set(of_environment(env_id))
    assert len(running) == 100, "the node agent keeps them"
    with Server(data, "--workflows", str(wf)) as s2, s2.client(token) as c:
        assert "re-attached to its 100 running tasks, ERROR" in s2.log.read_text()
        tasks = c.get("/api/tasks", params={"env": env_id}).json()
        assert {t["pid"] for t in tasks} == running, "every process is owned by its task"
        assert {t["state"] for t in tasks if t["path"] != "crash.slow"} == {"STANDBY"}
        [slow] = [t for t in tasks if t["path"] == "crash.slow"]
        assert slow["state"] == "ERROR" and "before it was ready" in slow["reason"]
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
        wait_for(lambda: not of_environment(env_id), "destroy ended every process")


DEAD_SERVER = r"""
import asyncio, sys
from corral.backends.local import LocalBackend
from corral.control.plane import ControlPlane, install_child_watcher
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand
WF = "name: old\nroles:\n  - {name: a, task: {load: s}}\n  - {name: b, task: {load: s}}\n"
CLS = "name: s\ncontrol: {mode: basic}\ncommand: {value: /bin/sleep, arguments: ['600']}\n"
async def main():
    install_child_watcher()
    plane = ControlPlane(SqliteStore(sys.argv[1]), LocalBackend())
    env = plane.create(expand("wf.yaml", DictSources({"wf.yaml": WF, "tasks/s.yaml": CLS})))
    for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
        await env.transition(event)
    print(env.id, flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def test_9_4_an_environment_a_dead_server_left_can_be_destroyed(tmp_path: Path) -> None:
    """Created without a recipe (as by an older version), it cannot be taken over:
    destroying it ends its processes and marks it DONE; restarts add nothing."""
    import subprocess

    from tests.faults.processes import of_environment
    from tests.faults.test_server_kill import wait_for

    db = str(tmp_path / "corral.db")
    script = tmp_path / "dead_server.py"
    script.write_text(DEAD_SERVER)
    old = subprocess.Popen([sys.executable, str(script), db], stdout=subprocess.PIPE)
    assert old.stdout is not None
    env_id = old.stdout.readline().decode().strip()
    old.kill()  # kill -9: no teardown
    old.wait()
    assert len(of_environment(env_id)) == 2

    async def restart() -> tuple[ControlPlane, SqliteStore, list[str]]:
        from corral.backends.local import LocalBackend
        from corral.control.plane import install_child_watcher

        install_child_watcher()
        store = SqliteStore(db)
        plane = ControlPlane(store, LocalBackend())
        return plane, store, await plane.adopt_leftovers()

    async def first() -> None:
        plane, store, notes = await restart()
        try:
            assert env_id in plane.left and env_id not in plane.environments
            assert any("not taken over" in n for n in notes), notes
            wait_for(lambda: not of_environment(env_id), "the leftovers were ended")
            row = store.environment(env_id)
            assert row is not None and row["state"] == "ERROR" and "restarted" in row["error"]
            assert {t["state"] for t in store.tasks(env_id)} == {"LOST"}
            before = len(store.events(env=env_id))
            await plane.forget(env_id, actor="operator")
            assert store.environment(env_id)["state"] == "DONE"  # type: ignore[index]
            assert len(store.events(env=env_id)) == before + 1
        finally:
            await plane.close()
            store.close()

    asyncio.run(first())

    async def again() -> None:
        plane, store, notes = await restart()
        try:
            n = len(store.events(env=env_id))
            assert notes == [] and not plane.left
            assert len(store.events(env=env_id)) == n
        finally:
            await plane.close()
            store.close()

    asyncio.run(again())


def test_9_5_a_failing_store_shows_in_the_metrics_and_catches_up(tmp_path: Path) -> None:
    from corral.api.metrics import Metrics
    from tests.faults.rig import Rig
    from tests.faults.rig import run as rig_run

    class _Svc:
        def __init__(self, plane: ControlPlane) -> None:
            self.plane = plane

    async def body(rig: Rig) -> None:
        metrics = Metrics(_Svc(rig.plane))  # type: ignore[arg-type]
        env = rig.plane.create(plan(tmp_path, THREE_BASIC))
        rig.store.counter.arm("update_tasks", 0)  # the launch's first batch is refused
        await env.transition("DEPLOY")
        assert rig.store.counter.fired == "update_tasks#0"
        assert env.state == "DEPLOYED"  # the controller went on from memory
        text = metrics.render()[0].decode()
        assert "corral_store_errors_total 1.0" in text
        await rig.until(lambda: rig.plane.journal.behind == 0, "the store caught up")
        assert "corral_store_writes_waiting 0.0" in metrics.render()[0].decode()
        assert {t["state"] for t in rig.store.tasks(env.id)} == {"STANDBY"}
        await rig.check(env, "a refused write")

    rig_run(tmp_path, body)


def test_9_3_a_second_control_process_on_the_same_data_is_refused(tmp_path: Path) -> None:
    """Found by a new user: a second `corral run` (or `corral serve`) on a data directory
    in use took the first one's environment for a dead process's leftovers and ended it."""
    import subprocess

    from tests.cli.test_run_cli import Output, corral, start
    from tests.faults.processes import of_environment

    data = str(tmp_path / "data")
    first = start("run", "examples/hello.yaml", "--data", data)
    out = Output(first)
    try:
        env_id = out.wait_for(r"environment (\w+) \(hello\)", 60).group(1)
        out.wait_for(r"is RUNNING", 60)
        alive = of_environment(env_id)
        r = corral("run", "examples/hello.yaml", "--data", data, "--for", "0")
        assert r.returncode == 1, r.stderr
        assert "is in use by another control process" in r.stderr
        assert f"pid {first.pid}" in r.stderr
        r = corral("serve", "--data", data, "--listen", "127.0.0.1:0")
        assert r.returncode == 1 and "in use by another control process" in r.stderr
        assert of_environment(env_id) == alive, "the first one's tasks were touched"
        assert first.poll() is None
        r = corral("events", "--data", data)  # a reader needs no lock
        assert r.returncode == 0 and env_id in r.stdout
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(60)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
