"""kill -9 of a task in every state and during every transition, relaunched ones too:
the death is seen, the task is never shown alive, the environment fails (the task is
critical) or carries on (it is not), and RECOVER brings it back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from corral.control.environment import Environment, TransitionError
from corral.templates import DictSources, expand
from tests.faults import programs
from tests.faults.processes import marked
from tests.faults.rig import Rig, run

WORKFLOW = """
name: wf
roles:
  - {name: v, task: {load: "{{ victim_class }}", critical: "{{ critical }}"}}
  - {name: d, task: {load: fault}}
  - {name: s, task: {load: sleeper}}
"""
PATH = {"DEPLOYED": ["DEPLOY"], "CONFIGURED": ["DEPLOY", "CONFIGURE"],
        "RUNNING": ["DEPLOY", "CONFIGURE", "START_ACTIVITY"]}  # fmt: skip
# the transition in flight, the environment's state before it, and the task order
IN_FLIGHT = [
    ("DEPLOY", "STANDBY", "HELLO"),
    ("CONFIGURE", "DEPLOYED", "CONFIGURE"),
    ("START_ACTIVITY", "CONFIGURED", "START"),
    ("STOP_ACTIVITY", "RUNNING", "STOP"),
    ("RESET", "CONFIGURED", "RESET"),
    ("EXIT", "CONFIGURED", "EXIT"),
]


def plan(tmp: Path, *, victim: str, critical: bool, hold: str = "") -> Any:
    files = {
        "wf.yaml": WORKFLOW,
        "tasks/fault.yaml": programs.CLASS,
        "tasks/held.yaml": programs.CLASS.replace("name: fault", "name: held").replace(
            '"{{ hold }}"', '"{{ victim_hold }}"'
        ),
        "tasks/sleeper.yaml": programs.SLEEPER,
    }
    defaults = programs.defaults(tmp) | {"victim_hold": hold}
    variables = {"victim_class": victim, "critical": str(critical).lower()}
    return expand("wf.yaml", DictSources(files), variables=variables, global_defaults=defaults)


async def drive(env: Environment, events: list[str]) -> None:
    for e in events:
        await env.transition(e)


NEXT = {"STANDBY": "DEPLOY", "DEPLOYED": "CONFIGURE", "CONFIGURED": "START_ACTIVITY"}


async def drive_to(env: Environment, state: str) -> None:
    """From STANDBY or DEPLOYED on, to ``state`` (STANDBY: stay)."""
    for _ in range(4):
        if env.state == state or state == "STANDBY":
            return
        await env.transition(NEXT[env.state])
    assert env.state == state, env.state


async def kill_and_see(rig: Rig, env: Environment, critical: bool, when: str) -> None:
    t = env.by_path["wf.v"]
    pid = t.pid
    assert pid is not None, f"{when}: the victim has no process"
    before = env.state
    os.kill(pid, signal.SIGKILL)
    await rig.until(lambda: t.state == "ERROR", f"{when}: the victim reported ERROR")
    assert "SIGKILL" in (t.reason or ""), t.reason
    if critical:
        await rig.until(lambda: env.state == "ERROR", f"{when}: the environment in ERROR")
        assert "wf.v" in (env.error or "")
    else:
        assert env.state == before, f"{when}: a non-critical death changed {before}"
    await rig.check(env, when)


async def recover_to(rig: Rig, env: Environment, state: str) -> None:
    if env.state != "ERROR":
        await env.transition("GO_ERROR")
    await env.transition("RECOVER")
    await drive(env, PATH.get(state, [])[1:])
    assert env.state == (state if state != "STANDBY" else "DEPLOYED")
    await rig.check(env, f"RECOVER to {state}")


@pytest.mark.parametrize("victim", ["fault", "sleeper"], ids=["direct", "basic"])
@pytest.mark.parametrize("critical", [True, False], ids=["critical", "noncritical"])
def test_kill_9_in_every_state_and_after_every_recover(
    tmp_path: Path, victim: str, critical: bool
) -> None:
    """In DEPLOYED, CONFIGURED and RUNNING, each time of a process relaunched by the
    RECOVER before: five generations of the same task."""

    async def body(rig: Rig) -> None:
        env = rig.plane.create(plan(tmp_path, victim=victim, critical=critical))
        await drive(env, PATH["DEPLOYED"])
        for state in ("DEPLOYED", "CONFIGURED", "RUNNING", "RUNNING", "CONFIGURED"):
            if env.state != state:
                await recover_to(rig, env, state)
            await kill_and_see(rig, env, critical, f"kill -9 in {state}")
            await recover_to(rig, env, "RUNNING")
        await rig.plane.destroy(env.id)
        await rig.check_destroyed(env)

    run(tmp_path, body)


@pytest.mark.parametrize(("event", "state", "order"), IN_FLIGHT, ids=[e for e, _, _ in IN_FLIGHT])
def test_kill_9_during_every_transition(tmp_path: Path, event: str, state: str, order: str) -> None:
    """The victim holds the transition's order (never answers): kill -9 of it while the
    transition waits fails the transition at once, not at its deadline, and RECOVER
    relaunches it; then the same again, for the relaunched process."""

    async def body(rig: Rig) -> None:
        env = rig.plane.create(
            plan(tmp_path, victim="held", critical=True, hold=order),
            timeouts={event: 3600},  # only the death can end the wait
        )
        marks = tmp_path / "marks"
        for generation in range(2):
            ev = event
            if env.state == "ERROR":
                if order == "HELLO":
                    ev = "RECOVER"  # which waits for the relaunched victim's hello
                else:
                    await env.transition("RECOVER")
            if ev != "RECOVER":
                await drive_to(env, state)
            mark = marks / f"wf.v.{order}"
            mark.unlink(missing_ok=True)
            job = asyncio.ensure_future(env.transition(ev))
            await rig.until(mark.exists, f"{ev} reached the victim")
            victim = env.by_path["wf.v"]
            pid = victim.pid if order != "HELLO" else _pid_of(victim.id)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            when = f"kill -9 during {ev} (generation {generation})"
            if ev == "EXIT":
                # asked to end, it died: whether EXIT counts that a failure depends on
                # which news came first (the answer or the exit); either way it is over
                with contextlib.suppress(TransitionError):
                    await job
                assert env.state == "DONE" and victim.state in ("DONE", "ERROR")
                await rig.check_destroyed(env)
                return
            with pytest.raises(TransitionError):
                await job
            assert victim.state == "ERROR", f"{when}: the victim is {victim.state}"
            assert env.state == "ERROR", f"{when}: {env.state}"
            await rig.check(env, when)
        await rig.plane.destroy(env.id)
        await rig.check_destroyed(env)

    run(tmp_path, body)


def _pid_of(task_id: str) -> int:
    pids = marked(task_id)
    assert len(pids) == 1, pids
    return pids[0]
