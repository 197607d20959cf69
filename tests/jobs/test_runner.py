"""The job runner on the local backend: real processes, a real SQLite file.

Batch jobs retry and end as their policy says; array jobs fill in their index; a
deadline ends a unit; the queue says why it waits and starts in priority, then FIFO
order with per-owner fairness; a DAG stops or goes on after a failure as told, and a
resumed DAG does not run again what succeeded.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from corral.backends.local import LocalBackend
from corral.control.plane import ControlPlane, install_child_watcher
from corral.jobs.spec import BatchSpec, DagSpec, load_job
from corral.jobs.units import Units, units_of
from corral.model.inventory import Node
from corral.store.sqlite import SqliteStore

PY = sys.executable
PATIENCE = float(
    os.environ.get("CORRAL_TEST_PATIENCE", "300")
)  # a hang fails the test instead of the whole suite


def job(path: Path, text: str) -> BatchSpec | DagSpec:
    path.write_text(text)
    spec, diags = load_job(str(path), text)
    assert not diags, diags
    assert isinstance(spec, BatchSpec | DagSpec)
    return spec


class Rig:
    def __init__(self, tmp: Path, cpus: float = 4.0) -> None:
        self.tmp = tmp
        self.store = SqliteStore(str(tmp / "corral.db"))
        self.backend = LocalBackend()
        node = Node("n1", cpu=cpus, memory=100_000, ports=(20000, 20099))
        self.plane = ControlPlane(
            self.store, self.backend, inventory=[node], log_dir=str(tmp / "logs")
        )
        self.runner = self.plane.jobs

    def submit(self, spec: BatchSpec | DagSpec, owner: str = "alice", **kw: Any) -> Any:
        units = units_of(spec)
        return self.runner.submit(
            units, name=spec.name, kind=spec.kind, text="", workdir=str(self.tmp),
            owner=owner, priority_class=spec.placement.priority_class, **kw,
        )  # fmt: skip

    async def wait(self, job: Any) -> str:
        state: str = await job.done
        return state

    async def until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await asyncio.sleep(0.01)


def with_rig(fn: Callable[[Rig, Path], Awaitable[None]]) -> Callable[[Path], None]:
    """A test body run on its own event loop with a fresh rig (closed afterwards)."""

    def test(tmp_path: Path) -> None:
        async def main() -> None:
            install_child_watcher()
            r = Rig(tmp_path)
            try:
                await asyncio.wait_for(fn(r, tmp_path), PATIENCE)
            finally:
                await r.plane.close()

        asyncio.run(main())

    test.__name__ = fn.__name__
    test.__doc__ = fn.__doc__
    return test


def script(tmp: Path, name: str, body: str) -> str:
    p = tmp / name
    p.write_text(body)
    return str(p)


@with_rig
async def test_batch_retries_then_succeeds(rig: Rig, tmp_path: Path) -> None:
    # fails twice (exit 3), then succeeds: the counter file says how many tries ran
    s = script(tmp_path, "flaky.py", (
        "import os, sys\n"
        "n = int(open('count').read()) if os.path.exists('count') else 0\n"
        "open('count', 'w').write(str(n + 1))\n"
        "sys.exit(0 if n >= 2 else 3)\n"
    ))  # fmt: skip
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: flaky
command: {{value: {PY}, arguments: [{s}]}}
retries: {{count: 3, backoff: 50ms}}
""",
    )
    j = rig.submit(spec)
    assert await rig.wait(j) == "SUCCEEDED"
    assert (tmp_path / "count").read_text() == "3"
    rows = rig.plane.jobs.store.units(j.id)
    assert rows[0]["state"] == "SUCCEEDED" and rows[0]["attempt"] == 3
    stored = rig.plane.jobs.store.job(j.id)
    assert stored is not None and stored["state"] == "SUCCEEDED"


@with_rig
async def test_batch_fails_when_retries_run_out(rig: Rig, tmp_path: Path) -> None:
    s = script(tmp_path, "bad.py", (
        "open('tries', 'a').write('x')\nraise SystemExit(5)\n"
    ))  # fmt: skip
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: bad
command: {{value: {PY}, arguments: [{s}]}}
retries: {{count: 2, backoff: 10ms}}
""",
    )
    j = rig.submit(spec)
    assert await rig.wait(j) == "FAILED"
    assert (tmp_path / "tries").read_text() == "xxx"  # the first try and two retries
    assert "exited with status 5" in (j.reason or ""), j.reason


@with_rig
async def test_success_exit_codes_count_as_success(rig: Rig, tmp_path: Path) -> None:
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: three
command: {{value: {PY}, arguments: ["-c", "raise SystemExit(3)"]}}
success_exit_codes: [0, 3]
""",
    )
    assert await rig.wait(rig.submit(spec)) == "SUCCEEDED"


@with_rig
async def test_deadline_ends_a_unit(rig: Rig, tmp_path: Path) -> None:
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: slow
command: {{value: {PY}, arguments: ["-c", "import time; time.sleep(60)"]}}
deadline: 300ms
""",
    )
    j = rig.submit(spec)
    assert await rig.wait(j) == "FAILED"
    assert "timeout of 0.3 s" in (j.reason or ""), j.reason


@with_rig
async def test_array_job_fills_in_its_index(rig: Rig, tmp_path: Path) -> None:
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: arr
array: 12
wants: {{cpu: 0.5}}
command:
  value: {PY}
  arguments: ["-c", "open('out-{{{{ index }}}}', 'w').write('{{{{ index }}}}')"]
""",
    )
    j = rig.submit(spec)
    assert await rig.wait(j) == "SUCCEEDED"
    for i in range(12):
        assert (tmp_path / f"out-{i}").read_text() == str(i)
    assert j.counts == {"SUCCEEDED": 12}


@with_rig
async def test_queue_waits_with_a_reason_and_never_overcommits(rig: Rig, tmp_path: Path) -> None:
    # 4 cpus; each unit wants 3: one at a time. A unit records the others it saw.
    s = script(tmp_path, "one.py", (
        "import os, sys, time\n"
        "me = sys.argv[1]\n"
        "open(f'run-{me}', 'w').close()\n"
        "others = [f for f in os.listdir('.') if f.startswith('run-') and f != f'run-{me}']\n"
        "open(f'saw-{me}', 'w').write(','.join(others))\n"
        "time.sleep(0.2)\n"
        "os.remove(f'run-{me}')\n"
    ))  # fmt: skip
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: big
array: 3
wants: {{cpu: 3}}
command: {{value: {PY}, arguments: [{s}, "{{{{ index }}}}"]}}
""",
    )
    j = rig.submit(spec)
    await rig.until(lambda: j.reason is not None and "waiting" in j.reason)
    assert j.reason == "waiting: 3 cpus needed, 1 cpus free on n1", j.reason
    assert await rig.wait(j) == "SUCCEEDED"
    for i in range(3):
        assert (tmp_path / f"saw-{i}").read_text() == ""


@with_rig
async def test_a_unit_that_can_never_fit_says_so(rig: Rig, tmp_path: Path) -> None:
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: huge
wants: {{cpu: 64}}
command: {{value: {PY}, arguments: ["-c", "pass"]}}
""",
    )
    j = rig.submit(spec)
    await rig.until(lambda: j.reason is not None)
    assert j.reason == "waiting: 64 cpus needed, 4 cpus free on n1"
    await rig.runner.cancel(j.id, actor="test")
    assert await rig.wait(j) == "CANCELLED"


@with_rig
async def test_priority_then_fifo_then_fairness(rig: Rig, tmp_path: Path) -> None:
    # one cpu: units run one at a time; each appends its name to the order file
    rig.plane.ledger.nodes = (Node("n1", cpu=1.0, memory=1000),)
    gate = tmp_path / "gate"

    def spec(name: str, pclass: str = "batch", wait: bool = False) -> BatchSpec:
        code = (
            "import os, sys, time\n"
            + ("while not os.path.exists('gate'): time.sleep(0.01)\n" if wait else "")
            + f"open('order', 'a').write('{name} ')\n"
        )
        path = script(tmp_path, f"{name}.py", code)
        s = job(
            tmp_path / f"{name}.yaml",
            f"""
kind: batch
name: {name}
priority_class: {pclass}
command: {{value: {PY}, arguments: [{path}]}}
""",
        )
        assert isinstance(s, BatchSpec)
        return s

    blocker = rig.submit(spec("blocker", wait=True), owner="x")
    await rig.until(lambda: blocker.state == "RUNNING")
    # alice queues three, then bob one, then an async job: async first, then fairness
    # (bob has none running: his goes before alice's second), FIFO within an owner
    jobs = [rig.submit(spec(f"a{i}"), owner="alice") for i in range(3)]
    jobs.append(rig.submit(spec("b0"), owner="bob"))
    jobs.append(rig.submit(spec("urgent", "async"), owner="carol"))
    await asyncio.sleep(0)
    gate.touch()
    for j in [blocker, *jobs]:
        assert await rig.wait(j) == "SUCCEEDED"
    order = (tmp_path / "order").read_text().split()
    assert order[0] == "blocker" and order[1] == "urgent", order
    assert order.index("a0") < order.index("a1") < order.index("a2"), order
    assert order.index("b0") < order.index("a1"), order


DAG = """
kind: dag
name: flow
failure: {failure}
steps:
  - name: a
    command: {{value: {py}, arguments: [{step}, a]}}
    outputs: [a.out]
  - name: b
    command: {{value: {py}, arguments: [{step}, b]}}
    inputs: [a.out]
    outputs: [b.out]
  - name: c
    command: {{value: {py}, arguments: [{step}, c]}}
    inputs: [a.out]
    outputs: [c.out]
  - name: d
    command: {{value: {py}, arguments: [{step}, d]}}
    inputs: [b.out, c.out]
    outputs: [d.out]
  - name: e
    command: {{value: {py}, arguments: [{step}, e]}}
    outputs: [e.out]
"""

STEP = (
    "import os, sys\n"
    "me = sys.argv[1]\n"
    "open('ran', 'a').write(me + ' ')\n"
    "if os.path.exists('fail-' + me):\n"
    "    sys.exit(1)\n"
    "open(me + '.out', 'w').write(me)\n"
)


@with_rig
async def test_dag_stop_then_resume_skips_what_succeeded(rig: Rig, tmp_path: Path) -> None:
    step = script(tmp_path, "step.py", STEP)
    spec = job(tmp_path / "d.yaml", DAG.format(failure="stop", py=PY, step=step))
    (tmp_path / "fail-c").touch()
    j = rig.submit(spec)
    assert await rig.wait(j) == "FAILED"
    ran = (tmp_path / "ran").read_text().split()
    assert "d" not in ran and "c" in ran and "a" in ran
    states = {m.idx: m.state for m in j.members}
    assert states[2] == "FAILED" and states[3] == "BLOCKED"
    (tmp_path / "fail-c").unlink()
    (tmp_path / "ran").write_text("")
    rig.runner.resume(j.id)
    assert await rig.wait(j) == "SUCCEEDED"
    again = (tmp_path / "ran").read_text().split()
    assert "a" not in again and "c" in again and "d" in again
    assert set(again) <= {"b", "c", "d", "e"}
    assert (tmp_path / "d.out").read_text() == "d"


@with_rig
async def test_dag_continue_runs_what_does_not_depend_on_the_failure(
    rig: Rig, tmp_path: Path
) -> None:
    step = script(tmp_path, "step.py", STEP)
    spec = job(tmp_path / "d.yaml", DAG.format(failure="continue", py=PY, step=step))
    (tmp_path / "fail-b").touch()
    j = rig.submit(spec)
    assert await rig.wait(j) == "FAILED"
    ran = set((tmp_path / "ran").read_text().split())
    assert ran == {"a", "b", "c", "e"}
    assert j.members[3].state == "BLOCKED"
    assert "needs b" in (j.members[3].reason or "")


@with_rig
async def test_cancel_ends_running_units_and_leaves_nothing(rig: Rig, tmp_path: Path) -> None:
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: sleepy
array: 3
wants: {{cpu: 1}}
command: {{value: {PY}, arguments: ["-c", "import time; time.sleep(600)"]}}
""",
    )
    j = rig.submit(spec)
    await rig.until(lambda: j.counts.get("RUNNING") == 3)
    pids = [m.pid for m in j.members]
    await rig.runner.cancel(j.id, actor="tester")
    assert await rig.wait(j) == "CANCELLED"
    for pid in pids:
        assert pid is not None
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)
    assert rig.plane.ledger.usage["n1"].cpu == 0


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_units_of_an_array_share_one_spec(tmp_path: Path) -> None:
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: arr
array: 100000
command: {{value: {PY}, arguments: ["{{{{ index }}}}"]}}
""",
    )
    u = units_of(spec)
    assert isinstance(u, Units) and len(u.specs) == 1 and u.count == 100000
    assert u.command(99999, "/w").arguments == ("99999",)
    assert u.command(5, "/w").cwd == "/w"


ONLINE_WF = """
name: data-taking
roles:
  - name: flp-{{ i }}
    for: {begin: "1", end: "2", var: i}
    task: {load: flp}
"""
FLP = f"""
name: flp
control: {{mode: basic}}
wants: {{cpu: 1}}
command: {{value: {PY}, arguments: ["-c", "import time; time.sleep(600)"]}}
"""


@with_rig
async def test_online_preempts_batch_which_requeues_and_completes(rig: Rig, tmp_path: Path) -> None:
    from corral.templates import DictSources, expand

    # 4 cpus, 4 batch units of 1 cpu each: the node is full
    s = script(tmp_path, "work.py", (
        "import os, sys, time\n"
        "me = sys.argv[1]\n"
        "open(f'start-{me}', 'a').write(str(os.getpid()) + ' ')\n"
        "while not os.path.exists('release'): time.sleep(0.01)\n"
        "open(f'done-{me}', 'w').close()\n"
    ))  # fmt: skip
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: reco
array: 4
command: {{value: {PY}, arguments: [{s}, "{{{{ index }}}}"]}}
""",
    )
    j = rig.submit(spec)
    await rig.until(lambda: all((tmp_path / f"start-{i}").exists() for i in range(4)))
    plan = expand("wf.yaml", DictSources({"wf.yaml": ONLINE_WF, "tasks/flp.yaml": FLP}),
                  variables={"priority_class": "online"})  # fmt: skip
    evicted, env = await rig.plane.create_preempting(plan)
    assert env is not None and len(evicted) == 2
    assert all(k.startswith(j.id + ":") for k in evicted)
    await env.transition("DEPLOY")
    assert env.state == "DEPLOYED"
    # the evicted units wait (the online environment holds their cpus), the others run
    assert j.counts.get("RUNNING") == 2 and j.counts.get("QUEUED") == 2
    waiting = [m for m in j.members if m.state == "QUEUED"]
    assert all("preempted by " + env.id in (m.reason or "") for m in waiting)
    await asyncio.sleep(0)
    assert j.reason is not None and j.reason.startswith("waiting: 1 cpus needed, 0 cpus free")
    await rig.plane.destroy(env.id)
    await rig.until(lambda: j.counts.get("RUNNING") == 4)
    (tmp_path / "release").touch()
    assert await rig.wait(j) == "SUCCEEDED"
    for m in j.members:
        assert (tmp_path / f"done-{m.idx}").exists()
        started = (tmp_path / f"start-{m.idx}").read_text().split()
        assert len(started) == (2 if m.key in evicted else 1)
        assert m.attempt == 1  # an eviction is not a try


@with_rig
async def test_a_million_instance_array_is_made_while_the_loop_goes_on(
    rig: Rig, tmp_path: Path
) -> None:
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: huge
array: 1000000
wants: {{cpu: 100}}
command: {{value: {PY}, arguments: ["{{{{ index }}}}"]}}
""",
    )
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0)
    before = ticks
    j = await rig.runner.submit_large(
        units_of(spec), name="huge", kind="batch", text="", workdir=str(tmp_path), owner="a"
    )
    ticker.cancel()
    # its million units were made in a worker thread: the loop ran meanwhile (made on
    # the loop, not one tick would have passed)
    assert ticks - before > 1
    assert j.counts == {"QUEUED": 1_000_000} and len(j.members) == 1_000_000
    assert {u.job for u in j.members[::1000]} == {j}
    await rig.until(lambda: bool(j.reason))
    assert j.reason.startswith("waiting: 100 cpus needed"), j.reason
    await rig.runner.cancel(j.id)
    assert await rig.wait(j) == "CANCELLED"


@with_rig
async def test_a_unit_its_node_agent_fenced_is_queued_again_not_failed(
    rig: Rig, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    spec = job(
        tmp_path / "b.yaml",
        f"""
kind: batch
name: fenced
wants: {{cpu: 1}}
command: {{value: {PY}, arguments: ["-c", "import os, time\\nopen('ran', 'a').write('x')\\n\\
while not os.path.exists('{gate}'): time.sleep(0.01)"]}}
""",
    )
    j = rig.submit(spec)
    await rig.until(lambda: j.counts.get("RUNNING") == 1)
    first = j.members[0].pid
    ran = tmp_path / "ran"
    await rig.until(lambda: ran.exists() and ran.read_text() == "x")
    # what a node agent does when no control process spoke for the lease (the server
    # was down): it ends the process, saying why (no server runs meanwhile: nothing
    # starts on the node until the fence is done)
    rig.plane.ledger.cordon("n1")
    assert await rig.backend.fence(silent=10.0, default_lease=1.0) == 1
    await rig.until(lambda: j.counts.get("QUEUED") == 1)
    assert "fenced: " in (j.members[0].reason or "") and j.members[0].attempt == 0
    rig.plane.ledger.cordon("n1", False)
    await rig.until(lambda: j.members[0].pid not in (None, first))
    gate.touch()
    assert await rig.wait(j) == "SUCCEEDED", j.members[0].reason  # (a fence: not a try)
    assert j.members[0].attempt == 1
    assert ran.read_text() == "xx"
