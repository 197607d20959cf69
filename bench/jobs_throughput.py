"""Benchmark: 10,000 queued 1-second batch tasks through the job runner, local backend.

One array job of N instances (default 10,000), each a 1-second process, submitted at
once to a ``ControlPlane`` (local backend, SQLite store) whose one inventory node takes
``--concurrency`` of them at a time (default N: each wants 1 cpu, the node has N cpus),
so that the node never binds and the rate at which processes start is the bottleneck.
Figures: tasks/s from submission to the last completion the runner saw, and the start
latency of each task from when it became runnable (all N were queued, hence due, at
submission) to the moment its process was spawned (the backend's ``_spawn`` returned),
p50 / p99.

Printed beside **the spawn limit measured in the same run**: the same N commands started
by a plain loop making the same ``subprocess.Popen`` call as the local backend (argv,
minimal environment, stdin from /dev/null, output to /dev/null, a new session), at most
``--concurrency`` alive, reaped with ``waitpid`` as they end; no event loop, no corral.
That is the machine's ceiling for this way of starting processes: the local backend
cannot start them faster than the call it makes. The limit is measured before and after
corral and the faster one counts (the machine is noisy; ``--rounds R`` repeats limit,
corral, limit R times and prints the median ratio). The figure is the ratio corral /
limit of the end-to-end throughputs (1.0: corral costs nothing). Also printed
(``--no-backend`` skips it): the same N through ``LocalBackend.launch`` driven directly
(launch batches of what has room, exits from its reports), which splits corral's loss
between the backend and the runner.

Two commands (``--command``): ``python`` (``sys.executable -c "import time;
time.sleep(1)"``, whose start costs ~15-20 ms of cpu here, so the two cores bound it) and
``sleep`` (``/bin/sleep 1``: cheap to start, so the spawning process bounds it).

    python bench/jobs_throughput.py                        # both commands, N = 10,000
    python bench/jobs_throughput.py --n 2000 --command sleep
    python bench/jobs_throughput.py --deadline 900         # give up (exit 2) after 900 s
    python bench/jobs_throughput.py --command sleep --rounds 3 --no-backend
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from corral.backends.local import LocalBackend
from corral.control.plane import ControlPlane, install_child_watcher
from corral.jobs.units import Units, UnitSpec
from corral.model.inventory import Node
from corral.model.plan import Command, Resources
from corral.ports.backend import Launch, Report
from corral.ports.taskenv import task_environment
from corral.store.sqlite import SqliteStore

COMMANDS = {
    "python": [sys.executable, "-c", "import time; time.sleep(1)"],
    "sleep": ["/bin/sleep", "1"],
}
MAX_BATCH = 5000  # the runner's MAX_PASS: what one launch call of the direct driver holds


class Deadline(Exception):
    pass


@dataclass
class Figures:
    label: str
    n: int
    took: float  # first spawn (or submission) to the last completion
    starts: list[float]  # each spawn, seconds after the start
    cpu_self: float
    cpu_children: float
    failed: int = 0

    @property
    def rate(self) -> float:
        return self.n / self.took

    def pct(self, q: float) -> float:
        s = sorted(self.starts)
        return s[min(len(s) - 1, int(q * len(s)))]

    def line(self) -> str:
        spawn_rate = self.n / max(self.starts)
        return (
            f"{self.label:<22} {self.n:,} in {self.took:6.2f} s = {self.rate:7.1f} tasks/s "
            f"(spawned at {spawn_rate:7.1f}/s); start latency p50 {self.pct(0.5):6.2f} s, "
            f"p99 {self.pct(0.99):6.2f} s; cpu: this process {self.cpu_self:5.1f} s, "
            f"children {self.cpu_children:6.1f} s"
            + (f"; {self.failed} FAILED" if self.failed else "")
        )


def _cpu() -> tuple[float, float]:
    t = os.times()
    return t.user + t.system, t.children_user + t.children_system


def _kill_children() -> None:
    """End every child of this process (each leads its own session) and its group."""
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                ppid = next((ln.split()[1] for ln in f if ln.startswith("PPid:")), "")
        except OSError:
            continue
        if ppid == me:
            for kill in (os.killpg, os.kill):
                with contextlib.suppress(OSError):
                    kill(int(pid), signal.SIGKILL)


# -- the limit: a plain Popen loop ----------------------------------------------------


def limit(argv: Sequence[str], n: int, cap: int, cwd: str, deadline: float) -> Figures:
    env = task_environment()
    procs: dict[int, subprocess.Popen[bytes]] = {}
    starts: list[float] = []
    failed = 0
    c0, k0 = _cpu()
    t0 = time.perf_counter()

    def reap(block: bool) -> None:
        nonlocal failed
        flags = 0 if block else os.WNOHANG
        while procs:
            pid, status = os.waitpid(-1, flags)
            if pid == 0:
                return
            p = procs.pop(pid, None)
            if p is not None:
                p.returncode = os.waitstatus_to_exitcode(status)  # (no zombie left to poll)
                failed += p.returncode != 0
            flags = os.WNOHANG

    for _ in range(n):
        while len(procs) >= cap:
            reap(True)
        if time.perf_counter() > deadline:
            _kill_children()
            raise Deadline("the limit's loop")
        p = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        starts.append(time.perf_counter() - t0)
        procs[p.pid] = p
        reap(False)
    while procs:
        reap(True)
    took = time.perf_counter() - t0
    c1, k1 = _cpu()
    return Figures("limit (Popen loop)", n, took, starts, c1 - c0, k1 - k0, failed)


# -- corral: the job runner on the control plane ----------------------------------------


class TimedBackend(LocalBackend):
    """The local backend, noting when each process was spawned (for the latency)."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: dict[str, float] = {}

    def _spawn(self, spec: Launch, env: dict[str, str]) -> object:  # type: ignore[override]
        proc = super()._spawn(spec, env)
        self.spawned[spec.task_id] = time.perf_counter()
        return proc


async def corral(argv: Sequence[str], n: int, cap: int, data: str, deadline: float) -> Figures:
    install_child_watcher()
    store = SqliteStore(os.path.join(data, "corral.db"))
    backend = TimedBackend()
    node = Node("n1", cpu=float(cap), memory=1_000_000)
    plane = ControlPlane(store, backend, inventory=[node], log_dir=None)
    one = UnitSpec("sleep1", Command(argv[0], tuple(argv[1:])), Resources(cpu=1.0))
    units = Units((one,), array=n)
    c0, k0 = _cpu()
    t0 = time.perf_counter()
    job = plane.jobs.submit(
        units, name="sleep1", kind="batch", text="", workdir=data, owner="bench"
    )
    assert job.done is not None
    try:
        state = await asyncio.wait_for(job.done, deadline - time.perf_counter())
    except TimeoutError:
        await plane.close()
        raise Deadline(f"corral: {dict(job.counts)}") from None
    took = time.perf_counter() - t0
    c1, k1 = _cpu()
    starts = [t - t0 for t in backend.spawned.values()]
    failed = job.counts.get("FAILED", 0)
    assert state == "SUCCEEDED" or failed, (state, job.reason)
    await plane.close()
    store.close()
    return Figures("corral (job runner)", n, took, starts, c1 - c0, k1 - k0, failed)


async def direct(argv: Sequence[str], n: int, cap: int, cwd: str, deadline: float) -> Figures:
    """The same N through LocalBackend.launch, no runner: a batch of what has room."""
    install_child_watcher()
    backend = TimedBackend()
    wake = asyncio.Event()
    state = {"running": 0, "finished": 0, "failed": 0}

    def sink(reports: list[Report]) -> None:
        for r in reports:
            if r.kind == "exited":
                state["running"] -= 1
                state["finished"] += 1
                state["failed"] += r.code != 0
        wake.set()

    backend.subscribe(sink)
    command = Command(argv[0], tuple(argv[1:]), cwd=cwd)
    c0, k0 = _cpu()
    t0 = time.perf_counter()
    sent = 0
    while state["finished"] < n:
        if time.perf_counter() > deadline:
            await backend.close()
            raise Deadline("the backend driver")
        room = min(cap - state["running"], n - sent, MAX_BATCH)
        if room <= 0:
            wake.clear()
            await asyncio.wait_for(wake.wait(), max(0.0, deadline - time.perf_counter()))
            continue
        batch = [
            Launch(f"b:{i}", f"sleep1[{i}]", command, "basic", (("CORRAL_TASK_ID", f"b:{i}"),))
            for i in range(sent, sent + room)
        ]
        sent += room
        state["running"] += room
        outs = await backend.launch("localhost", batch, 30.0, 30.0)
        bad = [o for o in outs if o.error is not None]
        assert not bad, bad[0].error
    took = time.perf_counter() - t0
    c1, k1 = _cpu()
    await backend.close()
    starts = [t - t0 for t in backend.spawned.values()]
    return Figures("LocalBackend.launch", n, took, starts, c1 - c0, k1 - k0, state["failed"])


# -- the run ---------------------------------------------------------------------------


def run(name: str, n: int, cap: int, with_backend: bool, tmp: str, deadline: float,
        rounds: int) -> None:  # fmt: skip
    argv = COMMANDS[name]
    shown = " ".join(argv if name == "sleep" else ["python", *argv[1:2], repr(argv[2])])
    print(f"\n{n:,} tasks of `{shown}`, at most {cap:,} at once "
          f"(node n1: {cap:,} cpus, 1 each)")  # fmt: skip
    ratios = []
    for r in range(rounds):
        if rounds > 1:
            print(f"round {r + 1} of {rounds} (load average {os.getloadavg()[0]:.2f})")
        before = limit(argv, n, cap, tmp, deadline)
        before.label = "limit before (Popen)"
        print(before.line())
        data = os.path.join(tmp, f"{name}-{n}-{r}")
        got = asyncio.run(corral(argv, n, cap, data, deadline))
        print(got.line())
        if with_backend:
            print(asyncio.run(direct(argv, n, cap, tmp, deadline)).line())
        after = limit(argv, n, cap, tmp, deadline)
        after.label = "limit after (Popen)"
        print(after.line())
        best = max(before, after, key=lambda f: f.rate)
        ratios.append(got.rate / best.rate)
        print(
            f"=> corral {got.rate:.1f} tasks/s, the limit {best.rate:.1f} tasks/s: ratio "
            f"{ratios[-1]:.3f}; start latency p50/p99 corral {got.pct(0.5):.2f} / "
            f"{got.pct(0.99):.2f} s, limit {best.pct(0.5):.2f} / {best.pct(0.99):.2f} s "
            "(target: the ratio to the spawn limit, measured in this run)"
        )
        if got.failed or best.failed:
            print(f"!! failures: corral {got.failed}, limit {best.failed}")
    if rounds > 1:
        shown_ratios = ", ".join(f"{x:.3f}" for x in ratios)
        print(f"=> ratio over {rounds} rounds: median {statistics.median(ratios):.3f} "
              f"({shown_ratios})")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="tasks (default 10,000)")
    p.add_argument("--command", choices=["both", *COMMANDS], default="both")
    p.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="tasks alive at once, corral's node and the limit alike (default N)",
    )
    p.add_argument(
        "--no-backend", action="store_true", help="skip the LocalBackend.launch measurement"
    )
    p.add_argument("--rounds", type=int, default=1,
                   help="limit, corral, limit again this many times (a noisy machine)")  # fmt: skip
    p.add_argument("--deadline", type=float, default=1500.0,
                   help="seconds for the whole run; past it, stop and exit 2")  # fmt: skip
    a = p.parse_args()
    cap = a.concurrency or a.n
    deadline = time.perf_counter() + a.deadline

    def too_late(*_: object) -> None:  # the backstop: a loop that does not notice
        print(f"\n!! the global deadline ({a.deadline:g} s) passed: stopping", flush=True)
        _kill_children()
        os._exit(2)

    signal.signal(signal.SIGALRM, too_late)
    signal.alarm(int(a.deadline) + 30)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    print(f"python {sys.version.split()[0]} on {os.cpu_count()} cpus; open files {soft}; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    names = list(COMMANDS) if a.command == "both" else [a.command]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name in reversed(names):  # sleep first: quick
                run(name, a.n, cap, not a.no_backend, tmp, deadline, a.rounds)
        except Deadline as e:
            print(f"\n!! the global deadline ({a.deadline:g} s) passed during {e}: stopped")
            _kill_children()
            sys.exit(2)
    signal.alarm(0)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
