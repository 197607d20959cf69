"""Chaos: random SIGKILLs across RECOVER cycles. A dead task is never reported happy.

One environment of real processes on the local backend (a mix of direct tasks speaking
the control protocol and basic tasks that are plain ``/bin/sleep``; critical and
non-critical ones; a non-critical collection with ``nmin``) is brought to RUNNING. Each
cycle kills random live tasks with SIGKILL, one at a time (seeded), and waits for the
event on the bus that reports the victim in ERROR (or LOST): detection latency is that
event's arrival minus the kill, on one clock (``time.perf_counter``). The last kill of a
cycle hits a critical task when nothing has sent the environment to ERROR yet, so every
cycle ends with RECOVER -> CONFIGURE -> START_ACTIVITY: later cycles kill processes that
RECOVER relaunched. After teardown, /proc is searched for processes that still carry the
environment's id (orphans).

Targets: every kill detected (100 %), detection latency p99 <= 200 ms, no missed death
(no kill left unreported, no dead process shown LAUNCHING/STANDBY/CONFIGURED/RUNNING),
the environment in ERROR after every critical death, every RECOVER cycle done, no orphan.
Exit status 0 when all are met, 1 otherwise (2: bad arguments).

    python bench/chaos.py                      # 1,000 kills across 100 RECOVER cycles
    python bench/chaos.py --kills 100 --cycles 10 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.backends.local import LocalBackend
from corral.control.environment import Environment, TransitionError
from corral.control.plane import ControlPlane, install_child_watcher
from corral.model.plan import Plan
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand

if TYPE_CHECKING:  # (annotations only: the script also runs against older versions)
    from corral.control.tasks import RuntimeTask

# A direct task, written from docs/protocol.md: hello, answer orders, exit 0 on EXIT,
# on EOF and on SIGTERM.
PROGRAM = r"""
import json, os, signal, socket, sys
fd = os.environ.get("CORRAL_CONTROL_FD")
if fd is None:
    sys.stderr.write("chaos task: CORRAL_CONTROL_FD is unset (not started by corral)\n")
    sys.exit(2)
os.set_inheritable(int(fd), False)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
s = socket.socket(fileno=int(fd))
def send(m):
    s.sendall((json.dumps(m, separators=(",", ":")) + "\n").encode())
send({"state": "STANDBY", "pid": os.getpid(), "protocol": 1})
rules = {"CONFIGURE": (("STANDBY",), "CONFIGURED"), "START": (("CONFIGURED",), "RUNNING"),
         "STOP": (("RUNNING",), "CONFIGURED"), "RESET": (("CONFIGURED",), "STANDBY"),
         "EXIT": (("STANDBY", "CONFIGURED"), "DONE")}
state = "STANDBY"
for line in s.makefile("rb"):
    if not line.strip():
        continue
    m = json.loads(line)
    t = m.get("transition")
    if t not in rules:
        send({"id": m.get("id"), "error": f"no transition {t}"})
        continue
    valid, nxt = rules[t]
    if state not in valid:
        send({"id": m["id"], "error": f"cannot {t} in state {state}"})
        continue
    state = nxt
    send({"id": m["id"], "state": state})
    if t == "EXIT":
        sys.exit(0)
sys.exit(0)
"""

WORKFLOW = """
name: chaos
roles:
  - name: dc-{{ i }}
    for: {begin: "1", end: "{{ n_dc }}", var: i}
    task: {load: direct}
  - name: dn-{{ i }}
    for: {begin: "1", end: "{{ n_dn }}", var: i}
    task: {load: direct, critical: "false"}
  - name: bc-{{ i }}
    for: {begin: "1", end: "{{ n_bc }}", var: i}
    task: {load: sleeper}
  - name: bn-{{ i }}
    for: {begin: "1", end: "{{ n_bn }}", var: i}
    task: {load: sleeper, critical: "false"}
  - name: pool-{{ i }}
    for: {begin: "1", end: "{{ n_pool }}", var: i, nmin: "{{ pool_nmin }}"}
    task: {load: direct, critical: "false"}
"""
DIRECT_CLASS = """
name: direct
control: {mode: direct}
command:
  value: "{{ python }}"
  arguments: ["{{ program }}"]
"""
SLEEPER_CLASS = """
name: sleeper
control: {mode: basic}
command:
  value: /bin/sleep
  arguments: ["86400"]
"""

ALIVE_STATES = ("LAUNCHING", "STANDBY", "CONFIGURED", "RUNNING")
TIMEOUTS = {
    "DEPLOY": 60.0,
    "CONFIGURE": 20.0,
    "START_ACTIVITY": 20.0,
    "STOP_ACTIVITY": 20.0,
    "EXIT": 20.0,
    "GO_ERROR": 10.0,
    "RECOVER": 60.0,
}
ENV_ERROR_WAIT = 0.5  # s after a critical death's detection (or miss) for ERROR to show
P99_TARGET_MS = 200.0
MAX_ATTEMPTS = 3  # tries to bring the environment back to RUNNING in one cycle


# -- the workflow ------------------------------------------------------------------------


def mix(tasks: int) -> dict[str, int]:
    """How many tasks of each kind: a fifth in the collection, the rest in four groups."""
    n_pool = max(2, tasks // 5)
    rest = tasks - n_pool
    quarter = rest // 4
    n = {
        "n_dc": quarter + rest % 4,
        "n_dn": quarter,
        "n_bc": quarter,
        "n_bn": quarter,
        "n_pool": n_pool,
        "pool_nmin": n_pool // 2 + 1,
    }
    return n


def make_plan(tmp: Path, tasks: int) -> Plan:
    program = tmp / "chaos_task.py"
    program.write_text(PROGRAM)
    files = {
        "wf.yaml": WORKFLOW,
        "tasks/direct.yaml": DIRECT_CLASS,
        "tasks/sleeper.yaml": SLEEPER_CLASS,
    }
    n = mix(tasks)
    plan = expand(
        "wf.yaml",
        DictSources(files),
        variables={k: str(v) for k, v in n.items()},
        global_defaults={"python": sys.executable, "program": str(program)},
    )
    return plan


# -- processes ---------------------------------------------------------------------------


def carries(pid: int, needle: bytes) -> bool:
    """True if process ``pid`` is alive (not a zombie) and has ``needle`` in its environ."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return needle in fh.read().split(b"\0")
    except (OSError, IndexError):
        return False


def process_alive(t: RuntimeTask) -> bool:
    """The task's recorded pid is a live process of this very task (not a reused pid)."""
    return t.pid is not None and carries(t.pid, f"CORRAL_TASK_ID={t.id}".encode())


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def sigkill_if(pid: int, needle: bytes) -> float | None:
    """SIGKILL process ``pid`` if it is alive and carries ``needle`` in its environ;
    race-free through a pidfd (held while checking, so the pid cannot be reused).
    Returns the time of the kill syscall, or None when not killed."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        if not carries(pid, needle):
            return None
        t0 = time.perf_counter()
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        return t0
    except OSError:
        return None
    finally:
        os.close(fd)


def kill(t: RuntimeTask) -> float | None:
    """SIGKILL the task's recorded process if it is still this task's live process."""
    if t.pid is None:
        return None
    return sigkill_if(t.pid, f"CORRAL_TASK_ID={t.id}".encode())


# -- what the bus says -------------------------------------------------------------------


@dataclass(slots=True)
class Verdict:
    state: str  # ERROR or LOST (detected), DONE (reported happy), or "" (nothing)
    at: float
    reason: str | None


class Watch:
    """Bus listener: resolves the wait for a victim's report, notes environment ERRORs."""

    def __init__(self, env_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.env_id = env_id
        self.loop = loop
        self.waiting: dict[str, asyncio.Future[Verdict]] = {}
        self.env_error_at: float | None = None

    def expect(self, path: str) -> asyncio.Future[Verdict]:
        fut: asyncio.Future[Verdict] = self.loop.create_future()
        self.waiting[path] = fut
        return fut

    def __call__(self, events: Sequence[dict[str, Any]]) -> None:
        now = time.perf_counter()
        for e in events:
            if e.get("env") != self.env_id:
                continue
            kind = e.get("kind")
            if kind == "environment" and e.get("state") == "ERROR":
                if self.env_error_at is None:
                    self.env_error_at = now
                continue
            if kind != "task":
                continue
            state = e.get("state")
            if state not in ("ERROR", "LOST", "DONE"):
                continue
            paths = [e["task"]] if "task" in e else list(e.get("tasks") or [])
            for p in paths:
                fut = self.waiting.get(p)
                if fut is not None and not fut.done():
                    # DONE is final for corral (news of a death changes nothing after
                    # it): a killed task reported DONE is a death reported happy.
                    fut.set_result(Verdict(str(state), now, e.get("reason")))


# -- the run -----------------------------------------------------------------------------


@dataclass
class Result:
    kills_asked: int
    cycles_asked: int
    tasks: int
    seed: int
    kills: int = 0
    detected: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    missed_kills: int = 0  # kills never reported ERROR/LOST
    missed_as_done: int = 0  # ... of which reported DONE
    missed_silent: int = 0  # ... of which nothing was reported within the give-up
    dead_shown_alive: int = 0  # other dead processes shown LAUNCHING..RUNNING
    kills_relaunched: int = 0  # kills of processes that RECOVER had relaunched
    missed_relaunched: int = 0
    kills_critical: int = 0
    env_not_error: int = 0  # critical deaths after which the environment was not ERROR
    env_error_ms: list[float] = field(default_factory=list)
    forced_go_error: int = 0  # cycles that ended without ERROR: GO_ERROR sent by us
    recovers: int = 0
    recover_failures: list[str] = field(default_factory=list)
    not_running_after_recover: int = 0
    recover_s: list[float] = field(default_factory=list)
    orphans: int = 0
    orphan_pids: list[int] = field(default_factory=list)
    deploy_s: float = 0.0
    teardown_s: float = 0.0
    wall_s: float = 0.0
    aborted: str | None = None
    examples: list[str] = field(default_factory=list)
    unseen: set[tuple[str, int | None]] = field(default_factory=set)  # missed processes

    def miss(self, text: str) -> None:
        if len(self.examples) < 8:
            self.examples.append(text)


def per_cycle(kills: int, cycles: int) -> list[int]:
    return [kills // cycles + (1 if i < kills % cycles else 0) for i in range(cycles)]


async def to_running(env: Environment, res: Result, watch: Watch) -> bool:
    """RECOVER (from ERROR) -> CONFIGURE -> START_ACTIVITY, with a few attempts."""
    t0 = time.perf_counter()
    for attempt in range(MAX_ATTEMPTS):
        try:
            if env.state != "ERROR":
                # Nothing sent it to ERROR (a missed critical death): GO_ERROR by hand,
                # so that the RECOVER path is taken every cycle.
                if attempt == 0:
                    res.forced_go_error += 1
                await env.transition("GO_ERROR")
            await env.transition("RECOVER")
            await env.transition("CONFIGURE")
            await env.transition("START_ACTIVITY")
        except TransitionError as e:
            res.recover_failures.append(str(e))
            continue
        watch.env_error_at = None
        res.recovers += 1
        res.recover_s.append(time.perf_counter() - t0)
        bad = [
            t for t in env.tasks if not t.hook and not (t.state == "RUNNING" and process_alive(t))
        ]
        if bad:
            res.not_running_after_recover += len(bad)
            res.miss(f"after RECOVER, not RUNNING with a live process: {bad[0].spec.path} "
                     f"({bad[0].state}, pid {bad[0].pid})")  # fmt: skip
        return True
    return False


def check_dead_shown_alive(env: Environment, res: Result) -> None:
    """A task shown alive whose process is dead is a missed death (each process counted
    once: the kills already counted as missed are in ``res.unseen``)."""
    for t in env.tasks:
        if t.hook or t.state not in ALIVE_STATES or process_alive(t):
            continue
        if (t.id, t.pid) in res.unseen:
            continue
        res.unseen.add((t.id, t.pid))
        res.dead_shown_alive += 1
        res.miss(f"{t.spec.path} shown {t.state} but its process {t.pid} is dead")


class Chaos:
    """One environment, killed at random, cycle after cycle."""

    def __init__(self, args: argparse.Namespace, env: Environment, res: Result) -> None:
        self.args = args
        self.env = env
        self.res = res
        self.watch = Watch(env.id, asyncio.get_running_loop())
        self.rng = random.Random(args.seed)
        self.pool = [t for t in env.tasks if t.member is not None]
        self.nmin = min((c.nmin for c in env.plan.collections), default=0)
        self.first_pid: dict[str, int | None] = {}
        # per cycle
        self.cycle = 0
        self.expect_error = False
        self.pool_killed = 0

    async def run(self) -> None:
        args, env, res = self.args, self.env, self.res
        deadline = time.perf_counter() + args.time_limit
        every = max(1, args.cycles // 10)
        t0 = time.perf_counter()
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            await env.transition(event)
        res.deploy_s = time.perf_counter() - t0
        self.first_pid = {t.id: t.pid for t in env.tasks}
        for cycle, k in enumerate(per_cycle(args.kills, args.cycles)):
            self.cycle = cycle + 1
            if time.perf_counter() > deadline:
                res.aborted = f"time limit of {args.time_limit:g} s reached in cycle {cycle + 1}"
                return
            self.expect_error = False
            self.pool_killed = 0
            done = tries = 0
            while done < k and tries < 3 * k:  # a victim may die on its own: try again
                tries += 1
                # the last kill of a cycle hits a critical task if nothing sent the
                # environment to ERROR yet: every cycle takes the RECOVER path
                done += await self.kill_one(critical_only=done == k - 1 and not self.expect_error)
            check_dead_shown_alive(env, res)
            if not await to_running(env, res, self.watch):
                res.aborted = (
                    f"could not bring the environment back to RUNNING in cycle {cycle + 1}"
                )
                return
            if not args.json and ((cycle + 1) % every == 0 or cycle + 1 == args.cycles):
                print(
                    f"  cycle {cycle + 1:>4}/{args.cycles}: kills {res.kills}, "
                    f"detected {res.detected}, missed {res.missed_kills + res.dead_shown_alive}",
                    file=sys.stderr,
                    flush=True,
                )
        check_dead_shown_alive(env, res)

    async def kill_one(self, *, critical_only: bool) -> int:
        """Kill one random live task and wait for its report; 1 if killed, else 0."""
        env, res, watch = self.env, self.res, self.watch
        live = [t for t in env.tasks if not t.hook and process_alive(t)]
        if critical_only:
            live = [t for t in live if t.spec.critical]
        if not live:
            return 0
        victim = self.rng.choice(live)
        path = victim.spec.path
        pid = victim.pid
        relaunched = pid != self.first_pid.get(victim.id)
        fut = watch.expect(path)
        t_kill = kill(victim)
        if t_kill is None:  # it died meanwhile, on its own
            watch.waiting.pop(path, None)
            return 0
        res.kills += 1
        res.kills_relaunched += relaunched
        res.kills_critical += victim.spec.critical
        fatal = victim.spec.critical  # should send the environment to ERROR
        if victim.member is not None:
            self.pool_killed += 1
            fatal = fatal or len(self.pool) - self.pool_killed < self.nmin
        try:
            verdict = await asyncio.wait_for(fut, self.args.give_up)
        except TimeoutError:
            verdict = Verdict("", time.perf_counter(), None)
        watch.waiting.pop(path, None)
        kind = "critical" if victim.spec.critical else "non-critical"
        again = ", relaunched by RECOVER" if relaunched else ""
        what = f"cycle {self.cycle}: {path} ({victim.spec.control}, {kind}{again})"
        if verdict.state in ("ERROR", "LOST"):
            res.detected += 1
            res.latencies_ms.append((verdict.at - t_kill) * 1000)
        else:
            res.missed_kills += 1
            res.missed_relaunched += relaunched
            res.unseen.add((victim.id, pid))
            if verdict.state == "DONE":
                res.missed_as_done += 1
                res.miss(f"{what}: SIGKILL reported DONE (reason {verdict.reason!r})")
            else:
                res.missed_silent += 1
                res.miss(f"{what}: no ERROR within {self.args.give_up:g} s (shown {victim.state})")
        if fatal:
            self.expect_error = True
            end = time.perf_counter() + ENV_ERROR_WAIT
            while env.state != "ERROR" and time.perf_counter() < end:
                await asyncio.sleep(0.002)
            if env.state != "ERROR":
                res.env_not_error += 1
                res.miss(f"{what}: environment still {env.state} after the death")
            elif watch.env_error_at is not None and watch.env_error_at >= t_kill:
                res.env_error_ms.append((watch.env_error_at - t_kill) * 1000)
        return 1


async def chaos(args: argparse.Namespace, tmp: Path, res: Result) -> None:
    install_child_watcher()
    plan = make_plan(tmp, args.tasks)
    store = SqliteStore(str(tmp / "data" / "corral.db"))
    backend = LocalBackend(run_dir=str(tmp / "run"))
    plane = ControlPlane(store, backend, log_dir=str(tmp / "data" / "logs"))
    env = plane.create(plan, timeouts=TIMEOUTS)
    run = Chaos(args, env, res)
    plane.bus.subscribe(run.watch)
    try:
        await run.run()
    finally:
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(plane.close(), 120)
        finally:
            store.close()
            res.teardown_s = time.perf_counter() - t0
            needle = f"CORRAL_ENVIRONMENT_ID={env.id}".encode()
            res.orphan_pids = [pid for pid in all_pids() if carries(pid, needle)]
            res.orphans = len(res.orphan_pids)
            for pid in res.orphan_pids:  # ours (they carry our environment's id): end them
                sigkill_if(pid, needle)


# -- figures -----------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def figures(res: Result) -> dict[str, Any]:
    lat = res.latencies_ms
    missed = res.missed_kills + res.dead_shown_alive
    p99 = pct(lat, 99)
    checks = {
        "kills": res.kills == res.kills_asked,
        "detected": res.kills > 0 and res.detected == res.kills,
        "p99": p99 is not None and p99 <= P99_TARGET_MS,
        "missed": missed == 0,
        "env_error": res.env_not_error == 0,
        "recovers": res.recovers == res.cycles_asked and not res.not_running_after_recover,
        "orphans": res.orphans == 0,
        "complete": res.aborted is None,
    }
    return {
        "machine": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {
            "kills": res.kills_asked,
            "cycles": res.cycles_asked,
            "tasks": res.tasks,
            "seed": res.seed,
        },
        "kills": res.kills,
        "kills_critical": res.kills_critical,
        "kills_relaunched": res.kills_relaunched,
        "detected": res.detected,
        "detected_pct": 100.0 * res.detected / res.kills if res.kills else 0.0,
        "latency_ms": {
            "p50": pct(lat, 50),
            "p90": pct(lat, 90),
            "p99": p99,
            "max": max(lat) if lat else None,
        },
        "env_error_latency_ms": {
            "p50": pct(res.env_error_ms, 50),
            "p99": pct(res.env_error_ms, 99),
        },
        "missed": missed,
        "missed_kills": res.missed_kills,
        "missed_reported_done": res.missed_as_done,
        "missed_no_report": res.missed_silent,
        "missed_relaunched": res.missed_relaunched,
        "dead_shown_alive": res.dead_shown_alive,
        "env_not_error_after_critical_death": res.env_not_error,
        "forced_go_error": res.forced_go_error,
        "recovers": res.recovers,
        "recover_failures": res.recover_failures[:5],
        "not_running_after_recover": res.not_running_after_recover,
        "recover_to_running_s": {
            "p50": pct(res.recover_s, 50),
            "max": max(res.recover_s) if res.recover_s else None,
        },
        "orphans": res.orphans,
        "orphan_pids": res.orphan_pids[:20],
        "deploy_s": res.deploy_s,
        "teardown_s": res.teardown_s,
        "wall_s": res.wall_s,
        "aborted": res.aborted,
        "examples": res.examples,
        "targets": checks,
        "ok": all(checks.values()),
    }


def report(f: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    c, t, lat = f["config"], f["targets"], f["latency_ms"]
    m = f["machine"]
    rows = [
        ("kills (SIGKILL)", f"{f['kills']}", f"{c['kills']}", t["kills"]),
        (
            "detected (ERROR/LOST event)",
            f"{f['detected']} ({f['detected_pct']:.1f} %)",
            "100 %",
            t["detected"],
        ),
        (
            "detection latency p50/p90/p99/max ms",
            f"{ms(lat['p50'])} / {ms(lat['p90'])} / {ms(lat['p99'])} / {ms(lat['max'])}",
            f"p99 <= {P99_TARGET_MS:g}",
            t["p99"],
        ),
        (
            "missed deaths",
            f"{f['missed']} ({f['missed_reported_done']} reported DONE, "
            f"{f['missed_no_report']} unreported, {f['dead_shown_alive']} dead shown alive)",
            "0",
            t["missed"],
        ),
        (
            "environment not ERROR after a critical death",
            f"{f['env_not_error_after_critical_death']}",
            "0",
            t["env_error"],
        ),
        (
            "RECOVER cycles",
            f"{f['recovers']} ({len(f['recover_failures'])} failed transitions, "
            f"{f['not_running_after_recover']} tasks not RUNNING after)",
            f"{c['cycles']}",
            t["recovers"],
        ),
        ("orphans after teardown", f"{f['orphans']}", "0", t["orphans"]),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    out = [
        f"chaos: {c['tasks']} tasks, {c['kills']} kills across {c['cycles']} RECOVER cycles, "
        f"seed {c['seed']}; {m['nproc']} cpus, Python {m['python']} ({m['platform']})",
        f"{'figure':<{w0}}  {'measured':<{w1}}  target",
    ]
    for name, got, want, ok in rows:
        out.append(f"{name:<{w0}}  {got:<{w1}}  {want:<10} {mark(ok)}")
    rel = f["kills_relaunched"]
    out.append(
        f"  of the kills: {f['kills_critical']} critical, {rel} of processes relaunched by "
        f"RECOVER ({f['missed_relaunched']} of those missed)"
    )
    env_lat = f["env_error_latency_ms"]
    out.append(
        f"  environment ERROR after a critical death: p50 {ms(env_lat['p50'])} ms, "
        f"p99 {ms(env_lat['p99'])} ms; GO_ERROR sent by hand in {f['forced_go_error']} cycles"
    )
    rec = f["recover_to_running_s"]
    rec_p50 = "-" if rec["p50"] is None else f"{rec['p50']:.2f}"
    rec_max = "-" if rec["max"] is None else f"{rec['max']:.2f}"
    out.append(
        f"  RECOVER -> RUNNING p50 {rec_p50} s, max {rec_max} s; "
        f"DEPLOY -> RUNNING {f['deploy_s']:.2f} s; teardown {f['teardown_s']:.2f} s; "
        f"wall time {f['wall_s']:.1f} s"
    )
    for e in f["recover_failures"]:
        out.append(f"  transition failed: {e}")
    if f["orphan_pids"]:
        out.append(f"  orphan pids (SIGKILLed now): {f['orphan_pids']}")
    if f["aborted"]:
        out.append(f"  ABORTED: {f['aborted']}")
    for e in f["examples"]:
        out.append(f"  e.g. {e}")
    out.append("all targets met" if f["ok"] else "TARGETS MISSED")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--kills", type=int, default=1000, help="SIGKILLs in all (default 1000)")
    ap.add_argument("--cycles", type=int, default=100, help="RECOVER cycles (default 100)")
    ap.add_argument("--tasks", type=int, default=40, help="tasks in the environment (40)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the victims' choice (1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    ap.add_argument("--give-up", type=float, default=5.0, help="s to wait for a death's report (5)")
    ap.add_argument("--time-limit", type=float, default=1800.0, help="s for all the cycles (1800)")
    args = ap.parse_args(argv)
    if args.tasks < 10:
        ap.error("--tasks must be at least 10")
    if not 1 <= args.cycles <= args.kills:
        ap.error("need 1 <= --cycles <= --kills (every cycle kills at least once)")
    if math.ceil(args.kills / args.cycles) > args.tasks:
        ap.error("more kills per cycle than tasks")
    if args.give_up <= 0 or args.time_limit <= 0:
        ap.error("--give-up and --time-limit must be positive")
    res = Result(args.kills, args.cycles, args.tasks, args.seed)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="corral-chaos-") as tmp:
        try:
            asyncio.run(chaos(args, Path(tmp), res))
        except (TransitionError, TimeoutError) as e:
            res.aborted = f"{type(e).__name__}: {e}"
    res.wall_s = time.perf_counter() - t0
    f = figures(res)
    print(json.dumps(f, indent=2) if args.json else report(f))
    return 0 if f["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
