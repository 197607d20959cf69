"""Hook calls executed around real transitions: order, awaits, timeouts, failures."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from corral.calls import CallContext, CallError, Registry
from corral.calls.builtin import ExecPlugin, TestPlugin
from corral.control.environment import TransitionError
from tests.control.harness import Harness, plan_of, run


class Recorder:
    """A real plugin of our own that notes when each call starts and ends."""

    methods = frozenset({"Mark", "Slow", "Fail", "Until"})

    def __init__(self) -> None:
        self.log: list[str] = []

    async def call(self, method: str, args: tuple[object, ...], ctx: CallContext) -> str | None:
        name = str(args[0])
        self.log.append(f"start {name}")
        try:
            if method == "Slow":
                await asyncio.sleep(float(args[1]))  # type: ignore[arg-type]
            if method == "Until":  # runs until another call has started
                while f"start {args[1]}" not in self.log:
                    await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            self.log.append(f"cancelled {name}")
            raise
        self.log.append(f"end {name}")
        if method == "Fail":
            raise CallError(f"{name} refused")
        return None


def with_calls(calls: str, tasks: str = "") -> str:
    return f"""
name: wf
roles:
  - name: a
    task: {{load: fake}}
{tasks}
{calls}
"""


def call(name: str, func: str, trigger: str, *, wait: str = "", critical: bool = True,
         timeout: str = "60s") -> str:  # fmt: skip
    aw = f"\n      await: {wait}" if wait else ""
    return f"""
  - name: {name}
    call:
      func: "{func}"
      trigger: {trigger}{aw}
      timeout: {timeout}
      critical: {str(critical).lower()}"""


def harness_with(rec: Recorder) -> Any:
    def setup(h: Harness) -> None:
        h.plane.calls = Registry({"rec": rec, "test": TestPlugin(), "exec": ExecPlugin()})

    return setup


def marks(h: Harness) -> list[str]:
    """Call starts and task state batches, in the order their events were stored."""
    out = []
    for e in h.events:
        if e["kind"] == "call" and e["status"] == "STARTED":
            out.append(e["path"].split(".")[-1])
        elif e["kind"] == "task" and e["state"] == "CONFIGURED":
            out.append("TASKS")
    return out


def test_order_of_moments_and_weights(tmp_path: Path) -> None:
    rec = Recorder()
    calls = "".join(
        call(n, f"rec.Mark('{n}')", t)
        for n, t in [
            ("after", "after_CONFIGURE"),
            ("enter", "enter_CONFIGURED"),
            ("ev-plus", "CONFIGURE+3"),
            ("ev-minus", "CONFIGURE-1"),
            ("leave", "leave_DEPLOYED"),
            ("before-late", "before_CONFIGURE+100"),
            ("before-early", "before_CONFIGURE-5"),
            ("other", "before_START_ACTIVITY"),
        ]
    )

    async def body(h: Harness) -> None:
        harness_with(rec)(h)
        env = h.plane.create(plan_of(tmp_path, with_calls(calls)))
        await env.transition("DEPLOY")
        h.events.clear()
        await env.transition("CONFIGURE")
        assert marks(h) == [
            "before-early", "before-late", "leave", "ev-minus", "TASKS", "ev-plus", "enter",
            "after",
        ]  # fmt: skip
        assert "start other" not in rec.log
        steps = [e["step"] for e in h.events if e["kind"] == "transition" and "step" in e]
        assert steps == [
            "before_CONFIGURE-5", "before_CONFIGURE+100", "leave_DEPLOYED", "CONFIGURE-1",
            "TASKS", "CONFIGURE+3", "enter_CONFIGURED", "after_CONFIGURE",
        ]  # fmt: skip

    run(tmp_path, body)


def test_a_call_runs_from_its_trigger_to_its_await(tmp_path: Path) -> None:
    rec = Recorder()
    # long ends only once mark has started: it must be running across the task
    # transition and enter_CONFIGURED (if it were awaited earlier, it would time out)
    calls = call("long", "rec.Until('long', 'mark')", "before_CONFIGURE", wait="after_CONFIGURE-1")
    calls += call("mark", "rec.Mark('mark')", "enter_CONFIGURED")

    async def body(h: Harness) -> None:
        harness_with(rec)(h)
        env = h.plane.create(plan_of(tmp_path, with_calls(calls)))
        await env.transition("DEPLOY")
        assert await env.transition("CONFIGURE") == "CONFIGURED"
        # the long call ran across the task transition and enter_CONFIGURED
        assert rec.log.index("start long") < rec.log.index("start mark") < rec.log.index("end long")
        assert not h.of("call", status="TIMEOUT")

    run(tmp_path, body)


def test_a_call_past_its_timeout_is_cancelled(tmp_path: Path) -> None:
    rec = Recorder()
    calls = call("sor", "rec.Slow('sor', 3600)", "before_START_ACTIVITY", timeout="300ms")

    async def body(h: Harness) -> None:
        harness_with(rec)(h)
        env = h.plane.create(plan_of(tmp_path, with_calls(calls)))
        await env.transition("DEPLOY")
        await env.transition("CONFIGURE")
        t0 = time.monotonic()
        with pytest.raises(TransitionError, match=r"timed out after 0\.3 s"):
            await env.transition("START_ACTIVITY")
        assert time.monotonic() - t0 >= 0.3
        # the call itself was cancelled, not left sleeping
        await h.until(lambda: "cancelled sor" in rec.log)
        assert "end sor" not in rec.log
        # before the tasks moved: the transition is cancelled, the state unchanged
        assert env.state == "CONFIGURED" and env.counts() == {"CONFIGURED": 1}
        [ev] = h.of("call", status="TIMEOUT")
        assert ev["path"] == "wf.sor" and ev["duration"] >= 0.3
        # as in AliECS, the run number was given before the first step (the before_
        # calls read it); START failed before the tasks moved, so that run is over
        [r] = h.store.runs(env.id)
        assert r["number"] == 1 and r["stopped"] is not None
        assert env.run_number is None and "run_number" not in env.variables

    run(tmp_path, body)


def calls_alive(env_id: str, pidfile: Path) -> list[int]:
    """Processes of env_id's exec calls: the pid in pidfile, if it was written (even as a
    zombie), and any process whose environment names a call of env_id."""
    out = []
    if pidfile.exists() and Path(f"/proc/{int(pidfile.read_text())}").exists():
        out.append(int(pidfile.read_text()))
    mine = f"CORRAL_ENVIRONMENT_ID={env_id}".encode()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as fh:
                    names = fh.read().split(b"\0")
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if mine in names and any(n.startswith(b"CORRAL_CALL_PATH=") for n in names):
                out.append(int(d))
    return out


def test_an_exec_call_past_its_timeout_leaves_no_process(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec sleep 3600"
    calls = call("x", f"exec.Shell('{script}')", "before_CONFIGURE", timeout="300ms")

    async def body(h: Harness) -> None:
        env = h.plane.create(plan_of(tmp_path, with_calls(calls)))
        await env.transition("DEPLOY")
        with pytest.raises(TransitionError, match="timed out"):
            await env.transition("CONFIGURE")
        assert h.of("call", status="TIMEOUT")
        # (the pid file may not be written yet when the call is cut short: then the
        # process is found by its environment)
        await h.until(lambda: not calls_alive(env.id, pidfile))

    run(tmp_path, body)


def test_critical_failures_before_and_after_the_tasks(tmp_path: Path) -> None:
    rec = Recorder()
    before = call("dcs", "rec.Fail('dcs')", "before_CONFIGURE")
    after = call("trg", "rec.Fail('trg')", "after_START_ACTIVITY")

    async def body(h: Harness) -> None:
        harness_with(rec)(h)
        env = h.plane.create(plan_of(tmp_path, with_calls(before)))
        await env.transition("DEPLOY")
        with pytest.raises(TransitionError, match=r"critical call wf\.dcs failed: dcs refused"):
            await env.transition("CONFIGURE")
        assert env.state == "DEPLOYED" and env.counts() == {"STANDBY": 1}
        [t] = h.store.transitions(env.id)[-1:]
        assert t["status"] == "FAILED" and "dcs refused" in t["error"]

        env2 = h.plane.create(plan_of(tmp_path, with_calls(after)))
        for event in ("DEPLOY", "CONFIGURE"):
            await env2.transition(event)
        with pytest.raises(TransitionError, match="trg refused"):
            await env2.transition("START_ACTIVITY")
        assert env2.state == "ERROR"

    run(tmp_path, body)


def test_non_critical_failures_are_reported_and_ignored(tmp_path: Path) -> None:
    rec = Recorder()
    calls = call("eor", "rec.Fail('eor')", "before_CONFIGURE", critical=False)
    calls += call("bad", "nosuch.Thing()", "after_CONFIGURE", critical=False)

    async def body(h: Harness) -> None:
        harness_with(rec)(h)
        env = h.plane.create(plan_of(tmp_path, with_calls(calls)))
        await env.transition("DEPLOY")
        assert await env.transition("CONFIGURE") == "CONFIGURED"
        failed = {e["path"]: e["error"] for e in h.of("call", status="FAILED")}
        assert failed["wf.eor"] == "eor refused"
        assert "unknown plugin 'nosuch'" in failed["wf.bad"]

    run(tmp_path, body)


def test_hook_tasks_run_at_their_trigger(tmp_path: Path) -> None:
    tasks = """
  - name: hook
    task: {load: shell, trigger: after_START_ACTIVITY, timeout: 60s}
  - name: badhook
    task: {load: shell, trigger: after_STOP_ACTIVITY, timeout: 60s, critical: false}
    vars: {script: "exit 4"}
"""

    async def body(h: Harness) -> None:
        plan = plan_of(tmp_path, with_calls("", tasks), shell=True)
        env = h.plane.create(plan)
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            await env.transition(event)
        assert env.by_path["wf.hook"].state == "DONE"
        assert (tmp_path / "hook-ran").exists()
        await env.transition("STOP_ACTIVITY")
        assert env.state == "CONFIGURED"
        bad = env.by_path["wf.badhook"]
        assert bad.state == "ERROR" and "exited with status 4" in (bad.reason or "")

    run(tmp_path, body)
