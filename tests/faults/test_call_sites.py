"""A fault at every call site, in turn: each backend call and each store write of an
environment's whole life fails once (OSError, a full disk), and the invariants hold
after every step.

A life: DEPLOY, CONFIGURE, START_ACTIVITY; kill -9 of a task; RECOVER to RUNNING again;
STOP_ACTIVITY; destroy. When a step fails because of the fault, the test does what an
operator would (RECOVER an ERROR, retry a refused transition) and goes on.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from corral.control.environment import Environment, TransitionError
from corral.templates import DictSources, expand
from tests.faults import programs
from tests.faults.rig import FaultyBackend, FaultyStore, Rig, run

WORKFLOW = """
name: wf
roles:
  - name: a
    bind: [{name: out, type: push, addressing: ipc}]
    task: {load: fault}
  - {name: b, task: {load: sleeper}}
  - name: c
    connect: [{name: in, type: pull, target: "wf.a:out"}]
    task: {load: fault, critical: false}
  - name: h
    task: {load: hook, trigger: before_START_ACTIVITY, timeout: 30s}
"""
HOOK = "name: hook\ncontrol: {mode: basic}\ncommand: {value: /bin/true}\n"

NEXT = {"STANDBY": "DEPLOY", "DEPLOYED": "CONFIGURE", "CONFIGURED": "START_ACTIVITY",
        "ERROR": "RECOVER"}  # fmt: skip


def plan(tmp: Path) -> Any:
    files = {
        "wf.yaml": WORKFLOW,
        "tasks/fault.yaml": programs.CLASS,
        "tasks/sleeper.yaml": programs.SLEEPER,
        "tasks/hook.yaml": HOOK,
    }
    return expand("wf.yaml", DictSources(files), global_defaults=programs.defaults(tmp))


async def to_running(rig: Rig, env: Environment) -> None:
    """Drive to RUNNING as an operator would, through failures (bounded)."""
    for _ in range(12):
        if env.state == "RUNNING":
            return
        event = NEXT[env.state]
        with contextlib.suppress(TransitionError):
            await env.transition(event)
        await rig.check(env, event)
    raise AssertionError(f"never RUNNING: {env.state} ({env.error})")


async def life(rig: Rig, tmp: Path) -> None:
    env = None
    for _ in range(3):  # creation itself may be refused by a store fault: retry
        try:
            env = rig.plane.create(plan(tmp))
            break
        except Exception as e:
            assert "(injected)" in str(e), e
    assert env is not None
    await rig.check(env, "create")
    await to_running(rig, env)
    victim = env.by_path["wf.a"]
    assert victim.pid is not None
    os.kill(victim.pid, signal.SIGKILL)
    await rig.until(lambda: env.state == "ERROR", "ERROR after a critical kill -9")
    await rig.check(env, "kill -9")
    await to_running(rig, env)
    relaunched = env.by_path["wf.a"].pid
    assert relaunched is not None
    os.kill(relaunched, signal.SIGKILL)  # the second failure: of a relaunched task
    await rig.until(lambda: env.state == "ERROR", "ERROR after a second kill -9")
    await rig.check(env, "kill -9 of a relaunched task")
    await to_running(rig, env)
    with contextlib.suppress(TransitionError):
        await env.transition("STOP_ACTIVITY")
    await rig.check(env, "STOP_ACTIVITY")
    for _ in range(3):  # a destroy that failed on the fault is tried again
        try:
            await rig.plane.destroy(env.id)
            break
        except OSError as e:
            assert "(injected)" in str(e), e
    await rig.check_destroyed(env)


def _count(tmp: Path, kind: str) -> dict[str, int]:
    counts: dict[str, int] = {}

    async def body(rig: Rig) -> None:
        await life(rig, tmp)
        calls = rig.backend.counter.calls if kind == "backend" else rig.store.counter.calls
        for c in calls:
            counts[c] = counts.get(c, 0) + 1

    run(tmp, body)
    return counts


def _in_turn(tmp: Path, kind: str, method: str) -> None:
    """Fail the k-th call of ``method`` in a life, for every k a fault-free life makes.

    Whether a life's last calls happen can depend on timing (an exit reported before
    or after the next step); a run that never reached its call is run again, a
    bounded number of times, so that every call site does fail once."""
    base = tmp / "base"
    base.mkdir()
    n = _count(base, kind).get(method, 0)
    assert n > 0, f"a life never calls {method}: the test would prove nothing"
    for k in range(n):
        fired = None
        for attempt in range(5):
            where = tmp / f"{method}-{k}-{attempt}"
            where.mkdir()

            async def body(rig: Rig, k: int = k, where: Path = where) -> None:
                nonlocal fired
                counter = rig.backend.counter if kind == "backend" else rig.store.counter
                counter.arm(method, k)
                await life(rig, where)
                fired = counter.fired

            run(where, body)
            if fired is not None:
                break
        assert fired == f"{method}#{k}", f"no life reached {method}#{k}"


@pytest.mark.parametrize("method", FaultyBackend.METHODS)
def test_a_backend_call_fails_in_turn(tmp_path: Path, method: str) -> None:
    _in_turn(tmp_path, "backend", method)


@pytest.mark.parametrize("method", FaultyStore.WRITES)
def test_a_store_write_fails_in_turn(tmp_path: Path, method: str) -> None:
    _in_turn(tmp_path, "store", method)
