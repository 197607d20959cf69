"""Faults in what issue 12 added to the control plane and the backends:

- a basic task's ``timeout`` lives in the node agent: a kill -9 of the server does not
  save the task from its deadline, and a restarted server finds it ended;
- the store refusing the write of a template's ``runtime.Set`` (a full disk): the
  environment is created all the same, nothing half-written is kept, and the next
  create writes again;
- a DPL command killed by a signal while it describes its workflow: the expansion fails
  with the reason, and nothing of it is left running.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from corral.control.service import ControlService, Principal
from corral.control.site import DplRunner
from corral.templates.services import ServiceError
from tests.api.server import Server
from tests.control.harness import PATIENCE
from tests.fake_tasks import alive
from tests.faults.rig import Rig
from tests.faults.rig import run as rig_run
from tests.faults.test_server_kill import state_of, transition

ADMIN = Principal("t0", "admin", "admin")


def test_a_basic_tasks_deadline_outlives_a_kill_9_of_the_server(tmp_path: Path) -> None:
    wf = tmp_path / "workflows"
    (wf / "tasks").mkdir(parents=True)
    (wf / "tasks" / "sleeper.yaml").write_text(
        "name: sleeper\ncommand: {value: /bin/sleep, arguments: ['3600']}\n"
    )
    (wf / "timed.yaml").write_text(
        "name: timed\nroles:\n"
        "  - {name: once, task: {load: sleeper, timeout: 2s, critical: false}}\n"
        "  - {name: long, task: {load: sleeper}}\n"
    )
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf), keep_agent=True) as s, s.client(s.admin) as c:
        env_id = c.post("/api/environments", json={"workflow": "timed"}).json()["id"]
        assert transition(c, env_id, "DEPLOY").status_code == 200
        admin = s.admin  # shown once, at the first start
        tasks = c.get("/api/tasks", params={"env": env_id}).json()
        pid = next(t["pid"] for t in tasks if t["path"] == "timed.once")
        assert s.proc is not None
        s.proc.kill()  # kill -9: no server watches the task when its deadline comes
        s.proc.wait()
        deadline = time.monotonic() + PATIENCE
        while alive(pid):  # wait for the agent to end it at its deadline
            assert time.monotonic() < deadline, "the deadline never fired"
            time.sleep(0.05)
    with Server(data, "--workflows", str(wf)) as s, s.client(admin) as c:
        r = c.get("/api/tasks", params={"env": env_id})
        assert r.status_code == 200, r.text
        tasks = {t["path"]: t for t in r.json()}
        assert tasks["timed.once"]["state"] not in ("STANDBY", "RUNNING", "CONFIGURED")
        assert tasks["timed.long"]["state"] == "STANDBY" and alive(tasks["timed.long"]["pid"])
        assert state_of(c, env_id)["transitioning"] is None
        assert c.delete(f"/api/environments/{env_id}").status_code == 200
        assert not alive(tasks["timed.long"]["pid"])


def test_a_refused_runtime_write_leaves_the_environment_created(tmp_path: Path) -> None:
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text("name: t\ncommand: {value: /bin/true}\n")
    (tmp_path / "rt.yaml").write_text(
        textwrap.dedent(
            """
            name: rt
            roles:
              - name: r
                vars: {noted: "{{ runtime.Set('corral', 'last', 'v1') }}"}
                task: {load: t}
            """
        )
    )

    async def body(rig: Rig) -> None:
        svc = ControlService(rig.plane, workflows=str(tmp_path))
        rig.store.counter.arm("runtime_set_many", 0)
        env = await svc.create("rt", {}, ADMIN)
        assert rig.store.counter.fired == "runtime_set_many#0"
        assert env.id in rig.plane.environments
        assert rig.store.runtime_get("corral", "last") is None  # all or nothing
        await svc.create("rt", {}, ADMIN)  # the store works again: written
        assert rig.store.runtime_get("corral", "last") == "v1"
        for e in list(rig.plane.environments):
            await rig.plane.destroy(e)

    rig_run(tmp_path, body)


def test_a_dpl_command_killed_by_a_signal_is_said_and_leaves_nothing(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    script = (
        f"sleep 3600 & echo $! >> {pidfile}; echo $$ >> {pidfile}; "
        f"kill -9 $$; {sys.executable} -c 'print(1)'"
    )
    runner = DplRunner(str(tmp_path))
    try:
        runner(script + " #", {})
    except ServiceError as e:
        assert "the DPL command failed" in str(e) and "-9" in str(e), e
    else:
        raise AssertionError("a killed command described a workflow")
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    for pid in pids:  # the shell, and the sleep it left in its group (SIGKILLed: it is
        end = time.monotonic() + PATIENCE  # gone once the kernel has delivered it)
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.01)
        assert not alive(pid), f"process {pid} of the command is left"
