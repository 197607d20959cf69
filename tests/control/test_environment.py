"""The controller driving real processes through the environment's life."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corral.control.environment import TransitionError
from corral.model.plan import Plan
from corral.templates import DictSources, expand
from tests.control.harness import Harness, plan_of, run
from tests.fake_tasks import alive, write_program

TWO = """
name: wf
roles:
  - name: a
    task: {load: fake}
  - name: b
    vars: {mode: "{{ b_mode }}"}
    task: {load: fake, critical: "{{ b_critical }}"}
defaults: {b_mode: good, b_critical: "true"}
"""

CHAIN = """
name: wf
roles:
  - name: src
    bind:
      - {name: out, type: push, addressing: ipc}
    task: {load: fake}
  - name: dst
    connect:
      - {name: in, type: pull, target: "wf.src:out"}
    task: {load: fake}
"""


def test_a_whole_life_with_two_runs(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO))
        for event, state in [
            ("DEPLOY", "DEPLOYED"),
            ("CONFIGURE", "CONFIGURED"),
            ("START_ACTIVITY", "RUNNING"),
        ]:
            assert await env.transition(event) == state
        assert env.counts() == {"RUNNING": 2}
        first = env.run_number
        assert first is not None
        pids = [t.pid for t in env.tasks]
        assert all(p and alive(p) for p in pids)
        await env.transition("STOP_ACTIVITY")
        await env.transition("START_ACTIVITY")
        assert env.run_number == first + 1
        await env.transition("STOP_ACTIVITY")
        await env.transition("RESET")
        assert env.state == "DEPLOYED" and env.counts() == {"STANDBY": 2}
        await env.transition("EXIT")
        assert env.state == "DONE" and env.counts() == {"DONE": 2}
        await h.until(lambda: not any(alive(p) for p in pids if p))
        stored = h.store.transitions(env.id)
        assert [t["event"] for t in stored] == [
            "DEPLOY",
            "CONFIGURE",
            "START_ACTIVITY",
            "STOP_ACTIVITY",
            "START_ACTIVITY",
            "STOP_ACTIVITY",
            "RESET",
            "EXIT",
        ]
        assert all(t["status"] == "DONE" and t["ended"] >= t["started"] for t in stored)
        assert [r["number"] for r in h.store.runs(env.id)] == [first, first + 1]
        assert h.store.environment(env.id)["state"] == "DONE"  # type: ignore[index]
        with pytest.raises(TransitionError, match="not allowed in state DONE"):
            await env.transition("DEPLOY")

    run(tmp_path, body)


def recording_plan(tmp: Path, workflow: str, cls: str) -> Plan:
    """A plan whose fake tasks (class ``fake``, given) write their CONFIGURE arguments to
    TMP/args.json.PATH: the file is named in the class's env (tasks inherit nothing
    else of this process's environment)."""
    cls += f"  env: ['CORRAL_ARGS_FILE={tmp / 'args.json'}']\n"
    return expand("wf.yaml", DictSources({"wf.yaml": workflow, "tasks/fake.yaml": cls}),
                  global_defaults={"python": sys.executable,
                                   "program": write_program(tmp)})  # fmt: skip


def test_channels_get_concrete_addresses_in_configure(tmp_path: Path) -> None:
    cls = ("name: fake\ncontrol: {mode: direct}\ncommand:\n"
           "  value: '{{ python }}'\n  arguments: ['{{ program }}', good]\n")  # fmt: skip
    plan = recording_plan(tmp_path, CHAIN.lstrip("\n"), cls)

    async def body(h: Harness) -> None:
        env = h.create(plan)
        await env.transition("DEPLOY")
        await env.transition("CONFIGURE")
        src_addr = env.addresses[("wf.src", "out")]
        assert src_addr.startswith("ipc://")
        src = json.loads((tmp_path / "args.json.wf.src").read_text())
        dst = json.loads((tmp_path / "args.json.wf.dst").read_text())
        assert src["environment_id"] == dst["environment_id"] == env.id
        assert src["task_path"] == "wf.src" and src["task_id"] == f"{env.id}:0"
        assert src["chans.out.method"] == "bind" and src["chans.out.type"] == "push"
        assert dst["chans.in.method"] == "connect" and dst["chans.in.type"] == "pull"
        assert src["chans.out.address"] == dst["chans.in.address"] == src_addr
        assert src["chans.out.transport"] == "zeromq"

    run(tmp_path, body)


def test_kill_9_of_a_critical_task_goes_to_error_within_200ms(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO))
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            await env.transition(event)
        victim = env.by_path["wf.b"]
        old_pid = victim.pid
        assert old_pid is not None
        t0 = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        await h.until(lambda: env.state == "ERROR", 2)
        assert time.monotonic() - t0 < 0.2
        [ev] = h.of("environment", state="ERROR")
        assert "wf.b" in ev["error"] and "SIGKILL" in ev["error"] and "localhost" in ev["error"]
        [tev] = h.of("task", task="wf.b", state="ERROR")
        assert tev["node"] == "localhost" and "signal 9" in tev["reason"]
        assert h.store.environment(env.id)["state"] == "ERROR"  # type: ignore[index]
        # RECOVER: back to DEPLOYED with the dead task relaunched, then a new run
        first = h.store.runs(env.id)[-1]["number"]
        assert await env.transition("RECOVER") == "DEPLOYED"
        assert env.counts() == {"STANDBY": 2}
        assert victim.pid not in (None, old_pid) and alive(victim.pid)
        await env.transition("CONFIGURE")
        await env.transition("START_ACTIVITY")
        assert env.state == "RUNNING" and env.run_number == first + 1
        assert h.store.runs(env.id)[0]["stopped"] is not None

    run(tmp_path, body)


def test_a_task_that_never_answers_configure_fails_at_the_deadline(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        plan = plan_of(tmp_path, TWO, {"b_mode": "mute"})
        env = h.create(plan, timeouts={"CONFIGURE": 0.6})
        await env.transition("DEPLOY")
        t0 = time.monotonic()
        with pytest.raises(TransitionError, match="no answer to CONFIGURE within"):
            await env.transition("CONFIGURE")
        assert 0.55 < time.monotonic() - t0 < 1.5
        assert env.state == "ERROR"
        assert env.by_path["wf.b"].state == "ERROR"
        assert h.of("task", task="wf.b", status="SLOW"), "the slow task was reported as slow"

    run(tmp_path, body)


def test_garbage_on_the_control_socket(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO, {"b_mode": "garbage"}))
        await env.transition("DEPLOY")
        with pytest.raises(TransitionError, match="not JSON"):
            await env.transition("CONFIGURE")
        assert env.state == "ERROR"
        assert "protocol error" in (env.by_path["wf.b"].reason or "")
        # the controller is unaffected: a second environment runs fine beside it
        other = h.create(plan_of(tmp_path, TWO))
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            await other.transition(event)
        assert other.state == "RUNNING"

    run(tmp_path, body)


def test_a_non_critical_failure_is_reported_and_ignored(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO, {"b_mode": "fail", "b_critical": "false"}))
        await env.transition("DEPLOY")
        await env.transition("CONFIGURE")
        assert env.state == "CONFIGURED"
        [ev] = h.of("task", task="wf.b", state="ERROR")
        assert ev["critical"] is False and "no calibration" in ev["reason"]
        await env.transition("START_ACTIVITY")
        assert env.state == "RUNNING"

    run(tmp_path, body)


def test_the_run_stops_when_every_task_reported_end_of_stream(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO, {"b_mode": "eos"}), timeouts={})
        await env.transition("DEPLOY")
        await env.transition("CONFIGURE")
        await env.transition("START_ACTIVITY")
        # only b says END_OF_STREAM: the run goes on
        await h.until(lambda: bool(h.of("task", status="END_OF_STREAM")))
        assert env.state == "RUNNING"

    run(tmp_path, body)

    async def body2(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO, {"mode": "eos", "b_mode": "eos"}))
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            await env.transition(event)
        await h.until(lambda: env.state == "CONFIGURED" and env.transitioning is None)
        assert h.store.runs(env.id)[-1]["stopped"] is not None

    (tmp_path / "2").mkdir()
    run(tmp_path / "2", body2)


def test_an_end_of_stream_said_between_runs_does_not_stop_the_next(tmp_path: Path) -> None:
    """Found by an attacker (issue 12): a task that said END_OF_STREAM while no run was
    on (here while it configured; after a STOP alike) stopped the next run as soon as it
    started."""

    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO, {"mode": "eosconf", "b_mode": "eosconf"}))
        for event in ("DEPLOY", "CONFIGURE"):
            await env.transition(event)
        assert await env.transition("START_ACTIVITY") == "RUNNING"
        assert not env.taskset.all_end_of_stream()
        assert env.transitioning is None and env.state == "RUNNING"
        assert not [e for e in h.events if "automatic" in str(e.get("note", ""))]

    run(tmp_path, body)


def test_destroy_from_running_leaves_nothing(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO))
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            await env.transition(event)
        pids = [t.pid for t in env.tasks if t.pid]
        await h.plane.destroy(env.id)
        assert env.state == "DONE"
        assert not any(alive(p) for p in pids)
        assert h.store.runs(env.id)[-1]["stopped"] is not None

    run(tmp_path, body)


def test_events_are_numbered_without_gaps(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        env = h.create(plan_of(tmp_path, TWO))
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY"):
            await env.transition(event)
        stored = h.store.events()
        assert [e["seq"] for e in stored] == list(range(1, len(stored) + 1))
        assert [e["seq"] for e in h.events] == [e["seq"] for e in stored]
        kinds = {e["kind"] for e in stored}
        assert {"environment", "transition", "task", "run", "role"} <= kinds

    run(tmp_path, body)


C_CLASS = """
name: minimal-c
control: {mode: direct}
command: {value: "{{ binary }}"}
"""


def test_a_task_written_in_c_runs_through_the_whole_life(tmp_path: Path) -> None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:  # pragma: no cover - CI and these machines have gcc
        pytest.skip("no C compiler on this machine")
    binary = tmp_path / "minimal_task"
    src = Path(__file__).parents[2] / "examples" / "protocol" / "minimal_task.c"
    subprocess.run([cc, "-O2", "-o", str(binary), str(src)], check=True, timeout=60)
    files = {
        "wf.yaml": "name: wf\nroles:\n  - name: c\n    task: {load: minimal-c}\n",
        "tasks/minimal-c.yaml": C_CLASS,
    }
    plan = expand("wf.yaml", DictSources(files), global_defaults={"binary": str(binary)})

    async def body(h: Harness) -> None:
        env = h.create(plan)
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY", "EXIT"):
            await env.transition(event)
        assert env.state == "DONE"
        [exited] = [e for e in h.events if e["kind"] == "task" and e.get("state") == "DONE"]
        assert exited["tasks"] == ["wf.c"]

    run(tmp_path, body)


def test_tasks_get_the_ports_placement_gave_them(tmp_path: Path) -> None:
    cls = ("name: fake\ncontrol: {mode: direct}\nwants: {ports: 2}\ncommand:\n"
           "  value: '{{ python }}'\n  arguments: ['{{ program }}', good]\n")  # fmt: skip
    wf = "name: wf\nroles:\n" + "".join(f"  - name: {n}\n    task: {{load: fake}}\n" for n in "ab")
    plan = recording_plan(tmp_path, wf, cls)

    async def body(h: Harness) -> None:
        env = h.create(plan)
        await env.transition("DEPLOY")
        await env.transition("CONFIGURE")
        a = json.loads((tmp_path / "args.json.wf.a").read_text())["ports"].split(",")
        b = json.loads((tmp_path / "args.json.wf.b").read_text())["ports"].split(",")
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        assert all(20000 <= int(p) <= 29999 for p in a + b)

    run(tmp_path, body)


def test_a_basic_task_failing_its_health_check_sends_the_environment_to_error(
    tmp_path: Path,
) -> None:
    flag = tmp_path / "healthy"
    flag.write_text("yes")
    cls = (
        "name: svc\ncontrol: {mode: basic}\n"
        "command: {value: /bin/sleep, arguments: ['60']}\n"
        f"health: {{command: /bin/sh, arguments: ['-c', 'test -e {flag} || "
        "{ echo gone >&2; exit 1; }'], interval: 0.1s, timeout: 1s, failures: 2}\n"
    )
    wf = "name: wf\nroles:\n  - name: svc\n    task: {load: svc}\n"
    plan = expand("wf.yaml", DictSources({"wf.yaml": wf, "tasks/svc.yaml": cls}))

    async def body(h: Harness) -> None:
        env = h.create(plan)
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            await env.transition(event)
        await asyncio.sleep(0.5)  # several checks pass
        assert env.state == "RUNNING"
        flag.unlink()
        await h.until(lambda: env.state == "ERROR", 3)
        assert "health check failed 2 times in a row: exited with status 1: gone" in (
            env.error or ""
        )

    run(tmp_path, body)
