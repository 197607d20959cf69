"""FairMQ control mode (issue 12, item 4): ``control: {mode: fairmq}`` drives a device
through FairMQ's own state machine.

Each of corral's transitions is a sequence of FairMQ transitions, sent one after
another over the task's control connection (docs/protocol.md, "FairMQ devices"):
CONFIGURE is INIT DEVICE, COMPLETE INIT, BIND, CONNECT, INIT TASK; START is RUN; STOP
is STOP; RESET is RESET TASK, RESET DEVICE; EXIT is END (after RESET's steps, from
READY). A failure at any step is said with the step and the device's state.

The environments here are real: a workflow directory on disk, expanded, run by the
control plane on the local backend with a SQLite store; the devices are
tests/fairmq_device.py on ``corral.taskctl.Device``, moving nothing but opening real
ZeroMQ sockets at BIND and CONNECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from corral.backends.local import LocalBackend
from corral.backends.sim import SimBackend
from corral.control.environment import Environment, TransitionError
from corral.control.plane import ControlPlane
from corral.model.plan import Command, Plan
from corral.ports.backend import Launch, Order
from corral.store.files import DiskSources
from corral.store.sqlite import SqliteStore
from corral.taskctl.fairmq import ERROR, IDLE, READY, RUNNING, Device, handle
from corral.templates import expand
from tests.api.server import Server
from tests.control.harness import PATIENCE, Harness, run
from tests.fake_tasks import alive
from tests.faults.processes import of_environment
from tests.faults.test_server_kill import state_of, transition

ROOT = Path(__file__).resolve().parents[2]
DEVICE = ROOT / "tests" / "fairmq_device.py"

DEVICE_CLASS = """\
name: device
control: {mode: fairmq}
defaults: {fail: "", exit: "", hang: ""}
properties:
  detector: TPC
command:
  value: "{{ python }}"
  arguments: ["{{ device }}", "--record={{ record }}", "--fail={{ fail }}",
              "--exit={{ exit }}", "--hang={{ hang }}"]
"""
WORKFLOW = """\
name: fmq
defaults: {sampler_fail: "", sampler_exit: "", sampler_hang: ""}
roles:
  - name: sampler
    bind:
      - {name: data, type: push, addressing: ipc}
    vars: {fail: "{{ sampler_fail }}", exit: "{{ sampler_exit }}", hang: "{{ sampler_hang }}"}
    task: {load: device}
  - name: sink
    connect:
      - {name: data, type: pull, target: "fmq.sampler:data"}
    task: {load: device}
"""
CONFIGURE_STEPS = ["INIT DEVICE", "COMPLETE INIT", "BIND", "CONNECT", "INIT TASK"]
# every step, with corral's transition it belongs to
STEPS = [
    *(("CONFIGURE", s) for s in CONFIGURE_STEPS),
    ("START", "RUN"),
    ("STOP", "STOP"),
    ("RESET", "RESET TASK"),
    ("RESET", "RESET DEVICE"),
]
# the environment's transition for each of corral's task transitions, and before it
ENV_EVENT = {"CONFIGURE": "CONFIGURE", "START": "START_ACTIVITY", "STOP": "STOP_ACTIVITY",
             "RESET": "RESET"}  # fmt: skip
BEFORE = {
    "CONFIGURE": ["DEPLOY"],
    "START": ["DEPLOY", "CONFIGURE"],
    "STOP": ["DEPLOY", "CONFIGURE", "START_ACTIVITY"],
    "RESET": ["DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY"],
}


def plan_of(tmp: Path, **variables: str) -> Plan:
    wf = tmp / "workflows"
    (wf / "tasks").mkdir(parents=True, exist_ok=True)
    (wf / "tasks" / "device.yaml").write_text(DEVICE_CLASS)
    (wf / "fmq.yaml").write_text(WORKFLOW)
    defaults = {"python": sys.executable, "device": str(DEVICE), "record": str(tmp / "seen")}
    return expand(
        str(wf / "fmq.yaml"), DiskSources(), variables=variables, global_defaults=defaults
    )


def seen(tmp: Path, path: str) -> list[dict[str, Any]]:
    """The FairMQ transitions the device at ``path`` carried out, in order."""
    f = tmp / f"seen.{path}"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines()]


def steps_of(tmp: Path, path: str) -> list[str]:
    return [s["step"] for s in seen(tmp, path)]


async def gone(h: Harness, env: Environment, pids: list[int]) -> None:
    """Destroy the environment; then none of its processes is left."""
    await h.plane.destroy(env.id)
    await h.until(lambda: not any(alive(p) for p in pids))
    assert of_environment(env.id) == []


def test_a_fairmq_environment_lives_its_whole_life(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path))
        assert await env.transition("DEPLOY") == "DEPLOYED"
        assert env.counts() == {"STANDBY": 2}
        assert sorted(str(s) for _, _, s in await h.backend.inventory()) == ["STANDBY", "STANDBY"]
        assert await env.transition("CONFIGURE") == "CONFIGURED"
        assert sorted(str(s) for _, _, s in await h.backend.inventory()) == ["CONFIGURED"] * 2
        assert await env.transition("START_ACTIVITY") == "RUNNING"
        run_number = env.run_number
        assert env.counts() == {"RUNNING": 2}
        assert sorted(str(s) for _, _, s in await h.backend.inventory()) == ["RUNNING"] * 2
        assert await env.transition("STOP_ACTIVITY") == "CONFIGURED"
        assert await env.transition("RESET") == "DEPLOYED"
        assert env.counts() == {"STANDBY": 2}
        # EXIT from CONFIGURED: the device is reset first, then ended
        assert await env.transition("CONFIGURE") == "CONFIGURED"
        pids = [t.pid for t in env.tasks if t.pid]
        assert await env.transition("EXIT") == "DONE"
        assert env.counts() == {"DONE": 2}
        await h.until(lambda: not any(alive(p) for p in pids))
        assert of_environment(env.id) == []

        life = [*CONFIGURE_STEPS, "RUN", "STOP", "RESET TASK", "RESET DEVICE",
                *CONFIGURE_STEPS, "RESET TASK", "RESET DEVICE", "END"]  # fmt: skip
        for path in ("fmq.sampler", "fmq.sink"):
            assert steps_of(tmp_path, path) == life
        # CONFIGURE's arguments go with INIT DEVICE; START's with RUN; the rest get none
        sampler = seen(tmp_path, "fmq.sampler")
        init = sampler[0]["args"]
        assert init["task_path"] == "fmq.sampler" and init["detector"] == "TPC"
        assert init["chans.data.method"] == "bind" and init["chans.data.type"] == "push"
        sink_init = seen(tmp_path, "fmq.sink")[0]["args"]
        assert sink_init["chans.data.address"] == init["chans.data.address"]
        assert sink_init["chans.data.method"] == "connect"
        assert sampler[5] == {"step": "RUN", "args": {"environment_id": env.id,
                                                      "run_number": str(run_number)}}  # fmt: skip
        assert all(s["args"] is None for s in sampler if s["step"] not in ("INIT DEVICE", "RUN"))
        assert h.store.environment(env.id)["state"] == "DONE"  # type: ignore[index]

    run(tmp_path, body)


@pytest.mark.parametrize(("transition", "step"), STEPS, ids=[s for _, s in STEPS])
def test_a_failure_at_each_step_is_said_with_the_step(
    tmp_path: Path, transition: str, step: str
) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, sampler_fail=step))
        for event in BEFORE[transition]:
            await env.transition(event)
        pids = [t.pid for t in env.tasks if t.pid]
        with pytest.raises(TransitionError) as raised:
            await env.transition(ENV_EVENT[transition])
        said = f"{transition} failed at {step}: OSError: address in use (at {step}) "
        said += "(device state ERROR)"
        assert said in str(raised.value)
        assert env.state == "ERROR"
        sampler = env.by_path["fmq.sampler"]
        assert sampler.state == "ERROR" and said in (sampler.reason or "")
        [ev] = h.of("task", task="fmq.sampler", state="ERROR")
        assert said in ev["reason"]
        # the device went no further than the failing step
        assert steps_of(tmp_path, "fmq.sampler")[-1] == step
        [(_, _, state)] = [x for x in await h.backend.inventory() if x[0] == sampler.id]
        assert state == "ERROR"
        await gone(h, env, pids)

    run(tmp_path, body)


def test_a_device_that_exits_mid_sequence(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, sampler_exit="BIND"))
        await env.transition("DEPLOY")
        pids = [t.pid for t in env.tasks if t.pid]
        pid = env.by_path["fmq.sampler"].pid
        with pytest.raises(TransitionError) as raised:
            await env.transition("CONFIGURE")
        # said by the transition's outcome or by the exit's report, whichever came first
        said = f"CONFIGURE failed at BIND: process {pid} exited with status 3 "
        said += "(last device state INITIALIZED)"
        assert said in str(raised.value)
        assert env.state == "ERROR" and env.by_path["fmq.sampler"].state == "ERROR"
        assert steps_of(tmp_path, "fmq.sampler") == ["INIT DEVICE", "COMPLETE INIT", "BIND"]
        await gone(h, env, pids)

    run(tmp_path, body)


def test_a_device_that_hangs_misses_the_deadline_at_its_step(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, sampler_hang="CONNECT"), timeouts={"CONFIGURE": 1.0})
        await env.transition("DEPLOY")
        pids = [t.pid for t in env.tasks if t.pid]
        with pytest.raises(TransitionError) as raised:
            await env.transition("CONFIGURE")
        text = str(raised.value)
        assert "CONFIGURE failed at CONNECT: no answer within 1.0 s; process " in text
        assert "is alive (last device state BOUND)" in text
        assert env.state == "ERROR" and env.by_path["fmq.sampler"].state == "ERROR"
        assert env.by_path["fmq.sink"].state == "CONFIGURED"  # the other one went on
        slow = h.of("task", task="fmq.sampler", status="SLOW")
        assert slow and "no answer to CONNECT (a step of CONFIGURE)" in slow[0]["reason"]
        await gone(h, env, pids)

    run(tmp_path, body)


def test_through_a_node_agent_and_a_server_restart(tmp_path: Path) -> None:
    """Under ``corral serve`` the node agent runs the devices: the steps go through it,
    and a server killed while the devices are READY finds them CONFIGURED again."""
    wf = tmp_path / "workflows"
    (wf / "tasks").mkdir(parents=True)
    cls = DEVICE_CLASS.replace("{{ python }}", sys.executable).replace("{{ device }}", str(DEVICE))
    (wf / "tasks" / "device.yaml").write_text(cls.replace("{{ record }}", str(tmp_path / "seen")))
    (wf / "fmq.yaml").write_text(WORKFLOW)
    data = tmp_path / "data"
    with Server(data, "--workflows", str(wf), keep_agent=True) as s1:
        token = s1.admin
        with s1.client(token) as c:
            r = c.post("/api/environments", json={"workflow": "fmq"})
            assert r.status_code == 201, r.text
            env_id = r.json()["id"]
            for event in ("DEPLOY", "CONFIGURE"):
                assert transition(c, env_id, event).status_code == 200
            assert state_of(c, env_id)["state"] == "CONFIGURED"
        assert s1.proc is not None
        s1.proc.kill()
        s1.proc.wait()
    try:
        with Server(data, "--workflows", str(wf)) as s2, s2.client(token) as c:
            assert state_of(c, env_id)["state"] == "CONFIGURED"
            tasks = c.get("/api/tasks", params={"env": env_id}).json()
            assert {t["state"] for t in tasks} == {"CONFIGURED"}
            for event, state in [("START_ACTIVITY", "RUNNING"), ("STOP_ACTIVITY", "CONFIGURED"),
                                 ("RESET", "DEPLOYED")]:  # fmt: skip
                r = transition(c, env_id, event)
                assert r.status_code == 200, r.text
                assert state_of(c, env_id)["state"] == state
            assert c.delete(f"/api/environments/{env_id}").status_code == 200
        life = [*CONFIGURE_STEPS, "RUN", "STOP", "RESET TASK", "RESET DEVICE"]
        for path in ("fmq.sampler", "fmq.sink"):
            assert steps_of(tmp_path, path)[: len(life)] == life
    finally:
        for pid in of_environment(env_id):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not of_environment(env_id)


# -- the wire itself: a device written without corral.taskctl ---------------------------

RAW = r"""
import json, os, socket, sys
s = socket.socket(fileno=int(os.environ["CORRAL_CONTROL_FD"]))
f = s.makefile("rb")
record = open(sys.argv[1], "a")
def send(m):
    s.sendall((json.dumps(m) + "\n").encode())
send({"state": "IDLE", "pid": os.getpid(), "protocol": 1})
after = {"INIT DEVICE": "INITIALIZING DEVICE", "COMPLETE INIT": "INITIALIZED",
         "BIND": "BOUND", "CONNECT": "DEVICE READY", "INIT TASK": "READY"}
for line in f:
    m = json.loads(line)
    record.write(line.decode()); record.flush()
    t = m["transition"]
    if t == sys.argv[2]:
        send({"id": m["id"], "state": sys.argv[3]})  # where it should not be
    else:
        send({"id": m["id"], "state": after[t]})
"""


def test_the_wire_and_a_device_in_the_wrong_state(tmp_path: Path) -> None:
    """The backend speaks the documented wire to a device written by hand: ids 1, 2, ...,
    FairMQ's names, CONFIGURE's arguments with INIT DEVICE only; an answer in a state
    other than the step's is a failure at that step, and the device is said to be there."""
    prog = tmp_path / "raw.py"
    prog.write_text(RAW)
    record = tmp_path / "orders"

    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        try:
            cmd = Command(sys.executable, (str(prog), str(record), "BIND", "INITIALIZED"))
            [out] = await b.launch("localhost", [Launch("e:0", "t", cmd, "fairmq")], PATIENCE, 5)
            assert out.ok and out.state == "STANDBY"
            assert [s for _, _, s in await b.inventory()] == ["STANDBY"]
            args = {"environment_id": "e", "chans.x.address": "ipc:///tmp/x"}
            orders = [Order("e:0", "CONFIGURE", args)]
            [out] = await b.transition("localhost", orders, PATIENCE, 5)
            assert out.error == (
                "CONFIGURE failed at BIND: the device went to INITIALIZED, not BOUND "
                "(device state INITIALIZED)"
            )
            sent = [json.loads(line) for line in record.read_text().splitlines()]
            assert sent == [
                {"id": 1, "transition": "INIT DEVICE", "args": args},
                {"id": 2, "transition": "COMPLETE INIT", "args": {}},
                {"id": 3, "transition": "BIND", "args": {}},
            ]
            # an intermediate state is said as FairMQ names it
            assert [s for _, _, s in await b.inventory()] == ["INITIALIZED"]
        finally:
            await b.close()

    asyncio.run(main())


def test_a_hello_other_than_idle_is_a_protocol_error(tmp_path: Path) -> None:
    prog = tmp_path / "standby.py"
    prog.write_text(
        "import json, os, socket, time\n"
        "s = socket.socket(fileno=int(os.environ['CORRAL_CONTROL_FD']))\n"
        's.sendall(b\'{"state":"STANDBY"}\\n\')\n'
        "s.recv(1)\n"
    )

    async def main() -> None:
        b = LocalBackend(run_dir=str(tmp_path / "run"))
        try:
            cmd = Command(sys.executable, (str(prog),))
            [out] = await b.launch("localhost", [Launch("e:0", "t", cmd, "fairmq")], PATIENCE, 5)
            assert not out.ok and "protocol error: unexpected message" in (out.error or "")
        finally:
            await b.close()

    asyncio.run(main())


def test_the_sim_backend_runs_fairmq_tasks_like_direct_ones(tmp_path: Path) -> None:
    async def main() -> None:
        store_dir = tmp_path / "data"
        store = SqliteStore(str(store_dir / "corral.db"))
        plane = ControlPlane(store, SimBackend(), log_dir=str(store_dir / "logs"))
        try:
            env = plane.create(plan_of(tmp_path))
            for event, state in [("DEPLOY", "DEPLOYED"), ("CONFIGURE", "CONFIGURED"),
                                 ("START_ACTIVITY", "RUNNING"), ("STOP_ACTIVITY", "CONFIGURED"),
                                 ("RESET", "DEPLOYED"), ("EXIT", "DONE")]:  # fmt: skip
                assert await env.transition(event) == state
        finally:
            await plane.close()
            store.close()

    asyncio.run(main())


# -- the helper's state machine, without a process ---------------------------------------


class Recorder(Device):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def init_device(self, props: dict[str, str]) -> None:
        self.calls.append(f"init_device {props}")

    def bind(self) -> None:
        self.calls.append("bind")
        if self.properties.get("fail") == "bind":
            raise OSError("address in use")

    def run(self, args: dict[str, str]) -> None:
        self.calls.append(f"run {args['run_number']}")


def test_the_helper_follows_fairmqs_state_machine() -> None:
    d = Recorder()
    assert d.state == IDLE
    # not valid in IDLE: an error naming the state, nothing changes, no method runs
    assert handle(d, "RUN", {"run_number": "1"}) == {
        "error": "cannot RUN in state IDLE",
        "state": IDLE,
    }
    assert handle(d, "CONFIGURE", {}) == {"error": "unknown transition 'CONFIGURE'", "state": IDLE}
    assert handle(d, "INIT DEVICE", {"a": 1})["error"].startswith("args must be")
    assert d.state == IDLE and d.calls == []
    answers = [
        handle(d, t, a)["state"]
        for t, a in [
            ("INIT DEVICE", {"x": "1"}),
            ("COMPLETE INIT", {}),
            ("BIND", {}),
            ("CONNECT", {}),
            ("INIT TASK", {}),
            ("RUN", {"run_number": "7"}),
        ]
    ]
    assert answers == ["INITIALIZING DEVICE", "INITIALIZED", "BOUND", "DEVICE READY", READY,
                       RUNNING]  # fmt: skip
    assert d.calls == ["init_device {'x': '1'}", "bind", "run 7"]
    assert d.properties == {"x": "1"}
    assert handle(d, "END", {}) == {"error": "cannot END in state RUNNING", "state": RUNNING}
    for t, s in [("STOP", READY), ("RESET TASK", "DEVICE READY"), ("RESET DEVICE", IDLE),
                 ("END", "EXITING")]:  # fmt: skip
        assert handle(d, t, {}) == {"state": s}


def test_a_raising_step_sends_the_helper_to_error() -> None:
    d = Recorder()
    handle(d, "INIT DEVICE", {"fail": "bind"})
    handle(d, "COMPLETE INIT", {})
    assert handle(d, "BIND", {}) == {"error": "OSError: address in use", "state": ERROR}
    assert d.state == ERROR
    assert handle(d, "RESET DEVICE", {}) == {
        "error": "cannot RESET DEVICE in state ERROR",
        "state": ERROR,
    }


def test_the_helper_over_a_socketpair_answers_invalid_transitions(tmp_path: Path) -> None:
    """The example device as a process: hello IDLE, an invalid transition answered with
    an error naming the state, then FairMQ's transitions, then END and exit 0."""
    ours, theirs = socket.socketpair()
    env = {**os.environ, "CORRAL_CONTROL_FD": str(theirs.fileno()), "CORRAL_TASK_PATH": "p"}
    proc = subprocess.Popen(
        [sys.executable, str(DEVICE), f"--record={tmp_path / 'seen'}"],
        env=env,
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    f = ours.makefile("rwb", buffering=0)
    try:
        ours.settimeout(PATIENCE)
        hello = json.loads(f.readline())
        assert hello["state"] == "IDLE" and hello["pid"] == proc.pid and hello["protocol"] == 1
        orders = [("BIND", {"id": 1, "error": "cannot BIND in state IDLE", "state": "IDLE"}),
                  ("INIT DEVICE", {"id": 2, "state": "INITIALIZING DEVICE"}),
                  ("COMPLETE INIT", {"id": 3, "state": "INITIALIZED"}),
                  ("RESET DEVICE", {"id": 4, "state": "IDLE"}),
                  ("END", {"id": 5, "state": "EXITING"})]  # fmt: skip
        for n, (t, answer) in enumerate(orders, 1):
            f.write((json.dumps({"id": n, "transition": t, "args": {}}) + "\n").encode())
            assert json.loads(f.readline()) == answer
        assert proc.wait(PATIENCE) == 0
        assert steps_of(tmp_path, "p") == ["INIT DEVICE", "COMPLETE INIT", "RESET DEVICE", "END"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        f.close()
        ours.close()


def test_the_helper_steps_down_to_exiting_on_sigterm(tmp_path: Path) -> None:
    """A RUNNING device told SIGTERM releases what it holds, step by step, and exits 0."""
    ours, theirs = socket.socketpair()
    env = {**os.environ, "CORRAL_CONTROL_FD": str(theirs.fileno()), "CORRAL_TASK_PATH": "p"}
    proc = subprocess.Popen(
        [sys.executable, str(DEVICE), f"--record={tmp_path / 'seen'}"],
        env=env,
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    f = ours.makefile("rwb", buffering=0)
    try:
        ours.settimeout(PATIENCE)
        assert json.loads(f.readline())["state"] == "IDLE"
        up = [*CONFIGURE_STEPS, "RUN"]
        for n, t in enumerate(up, 1):
            f.write((json.dumps({"id": n, "transition": t, "args": {}}) + "\n").encode())
            assert "error" not in json.loads(f.readline())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(PATIENCE) == 0
        down = ["STOP", "RESET TASK", "RESET DEVICE", "END"]
        assert steps_of(tmp_path, "p") == [*up, *down]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        f.close()
        ours.close()


RAW_DEVICE = r"""
import json, os, socket, sys, threading
s = socket.socket(fileno=int(os.environ["CORRAL_CONTROL_FD"]))
f = s.makefile("rb")
say = lambda m: s.sendall((json.dumps(m) + "\n").encode())
say({"state": "IDLE", "pid": os.getpid(), "protocol": 1})
states = {"INIT DEVICE": "INITIALIZING DEVICE", "COMPLETE INIT": "INITIALIZED",
          "BIND": "BOUND", "CONNECT": "DEVICE READY", "INIT TASK": "READY"}
for line in f:
    m = json.loads(line)
    if m["transition"] == sys.argv[1]:  # an ERROR event at this step, and no answer
        say({"event": "ERROR", "error": "calibration lost"})
        threading.Event().wait()
    say({"id": m["id"], "state": states[m["transition"]]})
"""


def test_an_error_event_at_a_step_is_said_with_it_whichever_word_comes_first(
    tmp_path: Path,
) -> None:
    """Found by an attacker: an ERROR event's report carried no step, and whichever of
    it and the failed order reached the controller first became the task's reason. Two
    devices, three times: each time, each says its step."""
    device = tmp_path / "raw_device.py"
    device.write_text(RAW_DEVICE)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "raw.yaml").write_text(
        "name: raw\ncontrol: {mode: fairmq}\n"
        "command: {value: '{{ python }}', arguments: ['{{ device }}', '{{ step }}']}\n"
    )
    (tmp_path / "wf.yaml").write_text(
        "name: wf\nroles:\n"
        "  - {name: a, vars: {step: BIND}, task: {load: raw}}\n"
        "  - {name: b, vars: {step: CONNECT}, task: {load: raw}}\n"
    )
    defaults = {"python": sys.executable, "device": str(device)}
    plan = expand(str(tmp_path / "wf.yaml"), DiskSources(), global_defaults=defaults)

    async def body(h: Harness) -> None:
        for _ in range(3):
            env = h.create(plan)
            await env.transition("DEPLOY")
            pids = [t.pid for t in env.tasks if t.pid]
            with pytest.raises(TransitionError):
                await env.transition("CONFIGURE")
            for path, step in (("wf.a", "BIND"), ("wf.b", "CONNECT")):
                t = env.by_path[path]
                said = f"CONFIGURE failed at {step}: the task reported an error: calibration lost"
                assert t.state == "ERROR" and said in (t.reason or ""), t.reason
            await gone(h, env, pids)

    run(tmp_path, body)
