"""The local backend: tasks as child processes of this machine's control process.

How this runs. Everything happens on the asyncio event loop of the control process,
with no thread and no asyncio task per child:

- a child is spawned with ``subprocess.Popen`` (argv, no shell unless the task class
  says ``shell: true``) in a new session, so that its process group can be ended as a
  whole, with a minimal environment (``corral.ports.taskenv``: never this process's
  whole one); stdout and stderr go to its log file;
- a direct task also inherits one end of a Unix socketpair, named by
  ``CORRAL_CONTROL_FD``; the other end is registered with ``loop.add_reader``;
- so does a fairmq task, but it is driven through FairMQ's own state machine: each of
  corral's transitions is a sequence of FairMQ transitions (``FAIRMQ_STEPS``), sent one
  after another, each when the previous one's answer arrives (from that answer's
  handler: still one batch, one future and two timers for the whole node);
- the child's exit is seen through a pidfd (``os.pidfd_open``) registered with
  ``loop.add_reader``: it is reaped at once, never left a zombie, and any process it
  left in its group is killed (no orphans);
- a launch or transition batch is one ``_Batch`` with one future and at most two timers
  (the "slow" report and the deadline), however many tasks it holds.

So the cost per task is two registered file descriptors, and a batch of N tasks costs
N small writes plus one wakeup per answer.

Health checks of basic tasks run from one loop for the whole backend: it sleeps until
the next check is due, then starts the due ones (a short-lived process each, in its own
group, killed at its timeout). A task that fails as many checks in a row as it allows
is reported as an ``error``.

Every report names the process it is about (``pid``): a task relaunched by RECOVER is
a new process under the same task id. Ending a task ends its process group, then
every process that still carries its ``CORRAL_TASK_ID`` (``sweep``: a descendant
that left the group), in one scan per batch, off the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import heapq
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from corral.backends import sweep
from corral.backends.status import describe_status
from corral.model.plan import HealthCheck
from corral.ports.backend import (
    BUSY,
    FENCED,
    TASK_TRANSITIONS,
    ChannelRequest,
    Launch,
    NodeInfo,
    Order,
    Outcome,
    Report,
    ReportSink,
)
from corral.ports.taskenv import task_environment

MAX_LINE = 1 << 20  # the protocol's longest line: 1 MiB
# A task's messages cost the server's loop time, so a task may send at most a burst of
# MESSAGE_BURST messages, refilled at MESSAGE_RATE a second (an honest task sends a few
# per transition); past that it floods, and is failed. One wake-up reads at most
# READ_PER_WAKE bytes of one task, so that a flood shares the loop with everything else.
MESSAGE_RATE = 1000.0
MESSAGE_BURST = 10_000
READ_PER_WAKE = 1 << 18
NODE = "localhost"

# FairMQ's device state machine (FairMQ's fairmq/States.h and StateMachine.cxx): each
# of corral's transitions is a sequence of FairMQ transitions, each paired with the
# state the device is in once it (and the automatic transition that follows some of
# them: BINDING -> BOUND, CONNECTING -> DEVICE READY, ...) is done.
FAIRMQ_STEPS: dict[str, tuple[tuple[str, str], ...]] = {
    "CONFIGURE": (
        ("INIT DEVICE", "INITIALIZING DEVICE"),
        ("COMPLETE INIT", "INITIALIZED"),
        ("BIND", "BOUND"),
        ("CONNECT", "DEVICE READY"),
        ("INIT TASK", "READY"),
    ),
    "START": (("RUN", "RUNNING"),),
    "STOP": (("STOP", "READY"),),
    "RESET": (("RESET TASK", "DEVICE READY"), ("RESET DEVICE", "IDLE")),
    "EXIT": (("END", "EXITING"),),  # from READY, RESET's steps come first
}
# corral's state for a FairMQ state at rest; any other is said as FairMQ names it
FAIRMQ_STATES: dict[str, str] = {
    "IDLE": "STANDBY",
    "READY": "CONFIGURED",
    "RUNNING": "RUNNING",
    "EXITING": "DONE",
    "ERROR": "ERROR",
}
FAIRMQ_KNOWN = frozenset(
    {"IDLE", "INITIALIZING DEVICE", "INITIALIZED", "BINDING", "BOUND", "CONNECTING",
     "DEVICE READY", "INITIALIZING TASK", "READY", "RUNNING", "RESETTING TASK",
     "RESETTING DEVICE", "EXITING", "ERROR", "OK", "UNDEFINED"}
)  # fmt: skip
PROTOCOL_CONTROLS = ("direct", "fairmq")  # the controls that get a control connection


def fairmq_steps(transition: str, state: str | None) -> tuple[tuple[str, str], ...]:
    """The FairMQ transitions that carry out ``transition`` for a device in ``state``."""
    if transition == "EXIT" and state == "READY":
        return FAIRMQ_STEPS["RESET"] + FAIRMQ_STEPS["EXIT"]
    return FAIRMQ_STEPS[transition]


def argv_of(launch: Launch) -> list[str]:
    """The argument vector of a task: its command, or ``/bin/sh -c`` for shell tasks."""
    cmd = launch.command
    if cmd.shell:
        script = " ".join([cmd.value, *(shlex.quote(a) for a in cmd.arguments)])
        return ["/bin/sh", "-c", script]
    return [cmd.value, *cmd.arguments]


@dataclass(slots=True, eq=False)
class _Proc:
    """One child process and its control connection."""

    task_id: str
    path: str
    control: str
    popen: subprocess.Popen[bytes]
    pidfd: int
    sock: socket.socket | None
    buf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    next_id: int = 0
    # what the task owes us: (-1, "launch", batch) or (order id, transition, batch);
    # for a fairmq task the transition is the FairMQ one under way
    waiting: tuple[int, str, _Batch] | None = None
    # a fairmq task: corral's transition under way and the FairMQ steps left after the
    # one awaited (each with the state it leads to); the step awaited leads to ``expect``
    order: str | None = None
    steps: tuple[tuple[str, str], ...] = ()
    expect: str | None = None
    exited: int | None = None
    broken: bool = False  # protocol broken: we no longer listen to it
    ending: bool = False  # asked to end (EXIT answered, or stopped): EOF is expected
    state: str | None = None  # the last state the task confirmed (hello, answers): a
    # fairmq task's in FairMQ's words
    lease: float | None = None  # its environment's fencing lease (None: the agent's)
    note: str | None = None  # why it is being ended, said with its exit (fencing)
    budget: float = MESSAGE_BURST  # messages it may still send now (MESSAGE_RATE)
    refilled: float = 0.0  # loop time of the budget's last refill

    @property
    def pid(self) -> int:
        return self.popen.pid


def _said(p: _Proc) -> str:
    if p.state is None:
        return "LAUNCHING"
    if p.waiting is not None:
        return BUSY
    if p.control == "fairmq":
        return FAIRMQ_STATES.get(p.state, p.state)
    return p.state


def _failed(p: _Proc, step: str, why: str, state: str | None = None) -> str:
    """Why a transition failed: as said for a direct task; for a fairmq task, with the
    FairMQ step it failed at and the device's state (``state`` if it said one, else the
    last it confirmed)."""
    if p.control != "fairmq" or p.order is None:
        return why
    if state is not None:
        where = f"device state {state}"
    else:
        where = f"last device state {p.state or 'unknown'}"
    return f"{p.order} failed at {step}: {why} ({where})"


@dataclass(slots=True, eq=False)
class _Health:
    spec: HealthCheck
    due: float
    pid: int  # the process this check watches
    env: dict[str, str]  # the task's environment: the check runs with it
    fails: int = 0
    busy: bool = False


class _Batch:
    """One launch or transition batch: one future, two timers at most."""

    __slots__ = ("done", "outcomes", "pending", "positions", "timers", "what")

    def __init__(self, size: int, what: str, loop: asyncio.AbstractEventLoop) -> None:
        self.outcomes: list[Outcome | None] = [None] * size
        self.positions: dict[str, int] = {}
        self.pending = 0
        self.what = what
        self.done: asyncio.Future[None] = loop.create_future()
        self.timers: list[asyncio.TimerHandle] = []

    def resolve(self, task_id: str, outcome: Outcome) -> None:
        pos = self.positions.get(task_id)
        if pos is None or self.outcomes[pos] is not None:
            return
        self.outcomes[pos] = outcome
        self.pending -= 1
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)

    def set_now(self, pos: int, outcome: Outcome) -> None:
        self.outcomes[pos] = outcome


class LocalBackend:
    """Runs tasks as processes of this machine (the node ``localhost``)."""

    name = "local"

    def __init__(
        self,
        *,
        run_dir: str | None = None,
        host: str = "127.0.0.1",
        die_with_me: bool = False,
        marker: str | None = None,
        task_env: Mapping[str, str] | None = None,
    ) -> None:
        """``die_with_me``: each task is killed by the kernel when this process dies, even
        by SIGKILL (``PR_SET_PDEATHSIG``, set by util-linux's ``setpriv`` before the task
        execs): what a node agent that outlives its controller needs. The kernel ends
        only the task's own process: ``marker`` (``CORRAL_AGENT`` in every task's
        environment, inherited by its descendants) lets the next agent find and end
        the descendants that outlived a killed one.

        A task gets a minimal environment, never this process's whole one
        (``corral.ports.taskenv``): ``task_env`` holds the variables passed through to
        every task (``--task-env``; a node agent's controller sets them in its hello)."""
        self.marker = marker
        self.task_env: dict[str, str] = dict(task_env or {})
        self._loop: asyncio.AbstractEventLoop | None = None
        self._setpriv = shutil.which("setpriv") if die_with_me else None
        self._procs: dict[str, _Proc] = {}
        # the leases of the processes alive, counted (a few distinct values: fencing
        # asks for the shortest twice a second, never a walk over every task)
        self._leases: collections.Counter[float | None] = collections.Counter()
        self._sink: ReportSink | None = None
        self._queue: list[Report] = []
        self._flush_scheduled = False
        self._host = host
        self.host = host  # the address its tasks' ports are reached at
        self._own_run_dir = run_dir is None
        # ipc paths must stay under ~100 characters: keep them in a short directory
        self._given_run_dir = run_dir  # made when first needed (an ipc channel)
        self._run_dir: str | None = None
        self._ports: set[int] = set()
        self._reapers: dict[int, asyncio.Future[None]] = {}  # by pid
        self._health: dict[str, _Health] = {}
        self._health_loop: asyncio.Task[None] | None = None
        self._checks: set[asyncio.Task[None]] = set()  # health checks under way
        # basic tasks with a timeout: (deadline, task id, pid), one timer for them all
        self._deadlines: list[tuple[float, str, int, float]] = []
        self._deadline_timer: asyncio.TimerHandle | None = None

    def _rundir(self) -> str:
        if self._run_dir is None:
            self._run_dir = self._given_run_dir or tempfile.mkdtemp(prefix="corral-")
        return self._run_dir

    # -- the port -----------------------------------------------------------------

    def nodes(self) -> Sequence[NodeInfo]:
        """This machine: its cpus, memory and a port range. (Tasks placed on other node
        names, from an inventory file, run here too: virtual nodes for a laptop.)"""
        return [NodeInfo(NODE, cpu=float(os.cpu_count() or 1), memory=_memory_mb(),
                         ports=(20000, 29999))]  # fmt: skip

    def subscribe(self, sink: ReportSink) -> None:
        self._sink = sink

    async def allocate(
        self, node: str, env_id: str, channels: Sequence[ChannelRequest]
    ) -> list[str]:
        out: list[str] = []
        ipc_dir = os.path.join(self._rundir(), env_id)
        for n, ch in enumerate(channels):
            if ch.addressing == "ipc":
                os.makedirs(ipc_dir, exist_ok=True)
                out.append(f"ipc://{ipc_dir}/{n}-{ch.name}")
            else:
                out.append(f"tcp://{self._host}:{ch.port or self._free_port()}")
        return out

    async def launch(
        self, node: str, batch: Sequence[Launch], timeout: float, slow_after: float
    ) -> list[Outcome]:
        loop = self._bind_loop()
        b = _Batch(len(batch), "launch", loop)
        missing: dict[tuple[str, str], str | None] = {}  # (behind setpriv, told here)
        for pos, spec in enumerate(batch):
            old = self._procs.get(spec.task_id)
            if old is not None and old.exited is None:
                b.set_now(pos, Outcome(spec.task_id, error="already running", pid=old.pid))
                continue
            env = self._environment(spec)
            if self._setpriv is not None and not spec.command.shell:
                key = (spec.command.value, env["PATH"])
                why = missing.get(key, "")
                if why == "":
                    why = missing[key] = _not_runnable(spec, env["PATH"])
                if why is not None:
                    b.set_now(pos, Outcome(spec.task_id, error=why))
                    continue
            try:
                proc = self._spawn(spec, env)
            except OSError as e:
                b.set_now(pos, Outcome(spec.task_id, error=self._spawn_error(spec, e)))
                continue
            except (ValueError, KeyError, TypeError) as e:  # a NUL byte, an unknown user
                user = spec.command.user
                if isinstance(e, KeyError) and user and "getpwnam" in str(e):
                    why = f"cannot start it as user {user!r}: no such user on this node"
                else:
                    why = f"cannot start {argv_of(spec)[0]!r}: {type(e).__name__}: {e}"
                b.set_now(pos, Outcome(spec.task_id, error=why[:2000]))
                continue
            self._procs[spec.task_id] = proc
            proc.lease = spec.lease
            self._leases[spec.lease] += 1
            if spec.health is not None and spec.control == "basic":
                self._watch_health(spec.task_id, spec.health, proc.pid, env)
            if spec.timeout and spec.control == "basic":
                self._set_deadline(spec.task_id, proc.pid, spec.timeout)
            if proc.sock is None:
                b.set_now(pos, Outcome(spec.task_id, state="STANDBY", pid=proc.pid))
            else:
                b.positions[spec.task_id] = pos
                b.pending += 1
                proc.waiting = (-1, "launch", b)
            if pos % 64 == 63:
                await asyncio.sleep(0)  # let answers and exits in while spawning
        return await self._finish(b, timeout, slow_after)

    async def transition(
        self, node: str, batch: Sequence[Order], timeout: float, slow_after: float
    ) -> list[Outcome]:
        loop = self._bind_loop()
        b = _Batch(len(batch), "transition", loop)
        for pos, order in enumerate(batch):
            proc = self._procs.get(order.task_id)
            if proc is None:
                b.set_now(pos, Outcome(order.task_id, error="unknown task"))
                continue
            if proc.exited is not None:
                why = describe_status(proc.exited)
                b.set_now(pos, Outcome(order.task_id, error=f"process {why}"))
                continue
            if proc.sock is None or proc.broken:
                why = "it broke the protocol" if proc.broken else "it has no control connection"
                b.set_now(
                    pos, Outcome(order.task_id, error=f"cannot send {order.transition}: {why}")
                )
                continue
            if order.transition not in TASK_TRANSITIONS:
                b.set_now(pos, Outcome(order.task_id, error=f"no transition {order.transition}"))
                continue
            b.positions[order.task_id] = pos
            b.pending += 1
            if proc.control == "fairmq":
                (step, expect), *rest = fairmq_steps(order.transition, proc.state)
                proc.order, proc.steps = order.transition, tuple(rest)
                self._order(proc, step, order.args, b, expect)
            else:
                self._order(proc, order.transition, order.args, b)
        return await self._finish(b, timeout, slow_after)

    def _order(
        self,
        proc: _Proc,
        transition: str,
        args: Mapping[str, str],
        b: _Batch,
        expect: str | None = None,
    ) -> None:
        """Send one order (a fairmq task's: one FairMQ step, leading to ``expect``)."""
        proc.next_id += 1
        proc.waiting = (proc.next_id, transition, b)
        proc.expect = expect
        msg = {"id": proc.next_id, "transition": transition, "args": args}
        self._send(proc, (json.dumps(msg, separators=(",", ":")) + "\n").encode())

    async def stop(self, node: str, task_ids: Sequence[str], grace: float) -> None:
        loop = self._bind_loop()
        waits: list[asyncio.Future[None]] = []
        alive: list[_Proc] = []
        known: list[str] = []
        for tid in task_ids:
            proc = self._procs.get(tid)
            if proc is None:
                continue
            known.append(tid)
            if proc.exited is not None:
                continue
            alive.append(proc)
            fut = self._reapers.get(proc.pid)
            if fut is None:
                fut = self._reapers[proc.pid] = loop.create_future()
            waits.append(fut)
            proc.ending = True
            _killpg(proc.pid, signal.SIGTERM)
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            if pending:
                for proc in alive:
                    if proc.exited is None:
                        _killpg(proc.pid, signal.SIGKILL)
                await asyncio.wait(pending, timeout=max(5.0, grace))
        if known:  # descendants that left the group still carry the task's id
            await asyncio.to_thread(sweep.end, tasks=frozenset(known))

    async def release(self, node: str, env_id: str) -> None:
        """Forget the environment here: its ipc paths, its ended processes, and any
        process still carrying its id (a task's or a call's that escaped)."""
        if self._run_dir is not None:
            shutil.rmtree(os.path.join(self._run_dir, env_id), ignore_errors=True)
        prefix = f"{env_id}:"
        done = [t for t, p in self._procs.items() if t.startswith(prefix) and p.exited is not None]
        for tid in done:
            del self._procs[tid]
        await asyncio.to_thread(sweep.end, environments=frozenset((env_id,)))

    async def close(self) -> None:
        self._health.clear()
        self._deadlines.clear()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        for job in [*self._checks, *([self._health_loop] if self._health_loop else [])]:
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
        if self._procs:
            await self.stop(NODE, list(self._procs), 2.0)
        for proc in self._procs.values():
            self._forget(proc)
        self._procs.clear()
        self._leases.clear()
        if self._own_run_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    async def resume(self) -> None:
        return None  # in-process: no report ever waits for a controller

    async def fence(self, silent: float, default_lease: float) -> int:
        """A node agent has heard nothing from a controller for ``silent`` seconds: end
        every task whose lease (its environment's, else ``default_lease``) ran out.
        Returns how many are ended."""
        out = []
        for t, p in self._procs.items():
            lease = p.lease if p.lease is not None else default_lease
            if p.exited is None and silent >= lease:
                p.note = (f"{FENCED}its agent heard nothing from a controller for "
                          f"{silent:.1f} s (lease {lease:g} s)")  # fmt: skip
                out.append(t)
        if out:
            await self.stop(NODE, out, 2.0)
        return len(out)

    def next_lease_end(self, default_lease: float) -> float | None:
        """The shortest lease of a running task (None: nothing runs)."""
        if not self._leases:
            return None
        return min(default_lease if lease is None else lease for lease in self._leases)

    async def end_leftovers(self, env_ids: Sequence[str]) -> int:
        """SIGKILL what a previous control process left running for these environments:
        every process that carries one of their ids (a reused pid never does)."""
        if not env_ids:
            return 0
        return await asyncio.to_thread(sweep.end, environments=frozenset(env_ids))

    async def inventory(self) -> list[tuple[str, int, str | None]]:
        """The processes this backend runs now: (task id, pid, the state a direct task
        last confirmed, LAUNCHING before its hello, BUSY while an order waits for its
        answer, or None for a plain process). A fairmq task's FairMQ state is said as
        corral's (IDLE: STANDBY, READY: CONFIGURED, RUNNING, EXITING: DONE, ERROR), one
        between them as FairMQ names it (``BOUND``). For reconcile and re-attach."""
        return [
            (tid, p.pid, _said(p) if p.control in PROTOCOL_CONTROLS else None)
            for tid, p in self._procs.items()
            if p.exited is None
        ]

    # -- introspection (tests, `corral run`) -------------------------------------------

    def pid_of(self, task_id: str) -> int | None:
        proc = self._procs.get(task_id)
        return None if proc is None else proc.pid

    # -- spawning ---------------------------------------------------------------------

    def _environment(self, spec: Launch) -> dict[str, str]:
        """What the task's process inherits: the minimal environment, the variables
        passed through, its class's, and corral's own (its ids, the agent's mark)."""
        corral = spec.env if self.marker is None else (*spec.env, ("CORRAL_AGENT", self.marker))
        return task_environment(
            spec.command.env, corral, passed=self.task_env, user=spec.command.user
        )

    def _spawn(self, spec: Launch, env: dict[str, str]) -> _Proc:
        """Start the task's process with ``env`` (``_environment``; a direct task's
        control socket is added to it)."""
        ours: socket.socket | None = None
        theirs: socket.socket | None = None
        pass_fds: tuple[int, ...] = ()
        if spec.control in PROTOCOL_CONTROLS:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            env = {**env, "CORRAL_CONTROL_FD": str(theirs.fileno())}
            pass_fds = (theirs.fileno(),)
        log = None
        try:
            if spec.log_path:
                os.makedirs(os.path.dirname(spec.log_path), exist_ok=True)
                log = open(spec.log_path, "ab")  # noqa: SIM115 - handed to the child
            argv = argv_of(spec)
            if self._setpriv is not None:
                argv = [self._setpriv, "--pdeathsig", "KILL", "--", *argv]
            popen = subprocess.Popen(
                argv,
                env=env,
                cwd=spec.command.cwd or None,
                stdin=subprocess.DEVNULL,
                stdout=log if log is not None else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                pass_fds=pass_fds,
                start_new_session=True,
                user=spec.command.user or None,
            )
        except BaseException:
            if ours is not None:
                ours.close()
            raise
        finally:
            if log is not None:
                log.close()
            if theirs is not None:
                theirs.close()
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            # unwatched, it would run on unseen: end it (its group) before saying why
            _killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            if ours is not None:
                ours.close()
            raise
        proc = _Proc(spec.task_id, spec.path, spec.control, popen, pidfd, ours)
        loop = self._bind_loop()
        loop.add_reader(pidfd, self._on_exit, proc)
        if ours is not None:
            ours.setblocking(False)
            loop.add_reader(ours.fileno(), self._on_readable, proc)
        return proc

    @staticmethod
    def _spawn_error(spec: Launch, e: OSError) -> str:
        what = argv_of(spec)[0]
        if e.errno == errno.ENOENT:
            where = f" in {spec.command.cwd}" if spec.command.cwd else ""
            return f"cannot start {what!r}: no such file or directory{where}"
        if e.errno == errno.EACCES:
            return f"cannot start {what!r}: permission denied"
        return f"cannot start {what!r}: {e.strerror or e}"

    def _free_port(self) -> int:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((self._host, 0))
                port = int(s.getsockname()[1])
            if port not in self._ports:
                self._ports.add(port)
                return port
        raise OSError("no free tcp port found")

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    # -- batches ----------------------------------------------------------------------

    async def _finish(self, b: _Batch, timeout: float, slow_after: float) -> list[Outcome]:
        loop = self._bind_loop()
        if b.pending == 0:
            b.done.set_result(None)
        else:
            if 0 < slow_after < timeout:
                b.timers.append(loop.call_later(slow_after, self._report_slow, b, slow_after))
            b.timers.append(loop.call_later(max(0.0, timeout), self._expire, b, timeout))
        try:
            await b.done
        finally:
            for t in b.timers:
                t.cancel()
        return [o if o is not None else Outcome("?", error="lost outcome") for o in b.outcomes]

    def _pending_procs(self, b: _Batch) -> list[_Proc]:
        out = []
        for tid, pos in b.positions.items():
            if b.outcomes[pos] is None:
                proc = self._procs.get(tid)
                if proc is not None:
                    out.append(proc)
        return out

    def _report_slow(self, b: _Batch, after: float) -> None:
        reports = []
        for proc in self._pending_procs(b):
            if proc.waiting is None or proc.exited is not None:
                continue
            what = "hello" if proc.waiting[0] < 0 else f"answer to {proc.waiting[1]}"
            if proc.waiting[0] >= 0 and proc.control == "fairmq" and proc.order is not None:
                what += f" (a step of {proc.order})"
            reason = f"no {what} after {after:.1f} s; process {proc.pid} is alive"
            reports.append(Report(proc.task_id, "slow", reason, pid=proc.pid))
        self._emit(reports)

    def _expire(self, b: _Batch, timeout: float) -> None:
        for proc in self._pending_procs(b):
            if proc.waiting is None:
                continue
            if proc.waiting[0] < 0:
                why = (
                    f"no hello within {timeout:.1f} s (process {proc.pid} is alive; a "
                    f"{proc.control} task speaks corral's control protocol on "
                    "CORRAL_CONTROL_FD: docs/protocol.md)"
                )
            elif proc.control == "fairmq":
                why = f"no answer within {timeout:.1f} s; process {proc.pid} is alive"
                why = _failed(proc, proc.waiting[1], why)
            else:
                why = f"no answer to {proc.waiting[1]} within {timeout:.1f} s"
                why += f" (process {proc.pid} is alive)"
            proc.waiting = None
            b.resolve(proc.task_id, Outcome(proc.task_id, error=why, pid=proc.pid, timed_out=True))
        for tid, pos in list(b.positions.items()):
            if b.outcomes[pos] is None:
                b.resolve(tid, Outcome(tid, error=f"no answer within {timeout:.1f} s"))

    # -- the control connection ---------------------------------------------------------

    def _send(self, proc: _Proc, data: bytes) -> None:
        sock = proc.sock
        assert sock is not None
        if proc.out:
            proc.out += data
            return
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self._broken(proc, f"cannot write to its control connection: {e.strerror or e}")
            return
        if n < len(data):
            proc.out += data[n:]
            self._bind_loop().add_writer(sock.fileno(), self._on_writable, proc)

    def _on_writable(self, proc: _Proc) -> None:
        sock = proc.sock
        if sock is None:
            return
        try:
            n = sock.send(proc.out)
        except BlockingIOError:
            return
        except OSError as e:
            self._bind_loop().remove_writer(sock.fileno())
            self._broken(proc, f"cannot write to its control connection: {e.strerror or e}")
            return
        del proc.out[:n]
        if not proc.out:
            self._bind_loop().remove_writer(sock.fileno())

    def _on_readable(self, proc: _Proc, limit: int = READ_PER_WAKE) -> None:
        sock = proc.sock
        if sock is None or proc.broken:
            return
        now = self._bind_loop().time()
        proc.budget = min(MESSAGE_BURST, proc.budget + (now - proc.refilled) * MESSAGE_RATE)
        proc.refilled = now
        read = 0
        while read < limit:  # the rest at the next wake-up (the fd stays readable)
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                self._closed(proc, f"control connection failed: {e.strerror or e}")
                return
            if not data:
                self._closed(proc, "closed its control connection")
                return
            read += len(data)
            proc.buf += data
            while not proc.broken:
                nl = proc.buf.find(b"\n")
                if nl < 0:
                    if len(proc.buf) > MAX_LINE:
                        self._broken(proc, f"protocol error: a line longer than {MAX_LINE} bytes")
                    break
                line = bytes(proc.buf[:nl])
                del proc.buf[: nl + 1]
                if len(line) > MAX_LINE:
                    self._broken(proc, f"protocol error: a line longer than {MAX_LINE} bytes")
                    break
                if line.strip():
                    proc.budget -= 1
                    if proc.budget < 0:
                        self._broken(
                            proc,
                            f"protocol error: it sent more than {MESSAGE_BURST} messages at "
                            f"once or {MESSAGE_RATE:g} a second (a flood)",
                        )
                        break
                    self._on_message(proc, line)
            if proc.broken:
                return

    def _on_message(self, proc: _Proc, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError, RecursionError):
            shown = line[:80].decode("utf-8", "replace")
            self._broken(proc, f"protocol error: a message that is not JSON: {shown!r}")
            return
        if not isinstance(msg, dict):
            self._broken(proc, f"protocol error: a message that is not an object: {line[:80]!r}")
            return
        event = msg.get("event")
        if event is not None:
            if event == "END_OF_STREAM":
                self._emit([Report(proc.task_id, "end_of_stream", "END_OF_STREAM", pid=proc.pid)])
            elif event == "ERROR":
                why = (
                    "the task reported an error: "
                    + str(msg.get("error") or "no reason given")[:2000]
                )
                waiting, proc.waiting = proc.waiting, None
                failed = why
                if waiting is not None:  # what it owes us fails now, not at the deadline
                    failed = why if waiting[0] < 0 else _failed(proc, waiting[1], why)
                    waiting[2].resolve(
                        proc.task_id, Outcome(proc.task_id, error=failed, pid=proc.pid)
                    )
                # the report says the same as the outcome: whichever the controller hears
                # first is the task's reason
                self._emit([Report(proc.task_id, "error", failed, pid=proc.pid)])
            else:
                self._broken(proc, f"protocol error: unknown event {str(event)[:80]!r}")
            return
        waiting = proc.waiting
        if "id" not in msg:
            hello = "IDLE" if proc.control == "fairmq" else "STANDBY"  # a device starts IDLE
            if waiting is not None and waiting[0] < 0 and msg.get("state") == hello:
                proc.waiting = None
                proc.state = hello
                waiting[2].resolve(proc.task_id, Outcome(proc.task_id, "STANDBY", pid=proc.pid))
                return
            self._broken(proc, f"protocol error: unexpected message {line[:80]!r}")
            return
        mid = msg.get("id")
        if type(mid) is not int:  # true, 1.0: not an id (true == 1 in Python)
            self._broken(proc, f"protocol error: an id that is not an integer: {str(mid)[:40]!r}")
            return
        if waiting is None or mid != waiting[0]:
            if 0 < mid <= proc.next_id:
                return  # a late answer to an order whose deadline passed
            self._broken(proc, f"protocol error: answer to an unknown id {str(mid)[:40]!r}")
            return
        proc.waiting = None
        _, transition, b = waiting
        if proc.control == "fairmq":
            self._on_fairmq_answer(proc, msg, transition, b)
            return
        expected = TASK_TRANSITIONS[transition]
        if "error" in msg:
            why = str(msg.get("error"))[:2000]
            b.resolve(proc.task_id, Outcome(proc.task_id, error=f"{transition} failed: {why}"))
        elif msg.get("state") == expected:
            proc.ending = transition == "EXIT"
            proc.state = expected
            b.resolve(proc.task_id, Outcome(proc.task_id, expected))
        else:
            got = str(msg.get("state"))[:40]
            why = f"protocol error: answered {transition} with state {got!r}, expected {expected}"
            self._broken(proc, why, resolve=(b, why))

    def _on_fairmq_answer(self, proc: _Proc, msg: dict[str, object], step: str, b: _Batch) -> None:
        """A fairmq task answered the FairMQ step ``step``: send the next one, or resolve
        its order (done, or failed at this step)."""
        order = proc.order or "?"
        expect = proc.expect
        said = msg.get("state")
        state = said if isinstance(said, str) and said in FAIRMQ_KNOWN else None
        if said is not None and state is None:
            shown = str(said)[:40]
            why = f"protocol error: answered {step} with {shown!r}, which is no FairMQ state"
            failed = _failed(proc, step, why)
            self._broken(proc, why, resolve=(b, failed))
            return
        if "error" in msg:
            why = str(msg.get("error"))[:2000]
            if state is not None:
                proc.state = state
            b.resolve(proc.task_id, Outcome(proc.task_id, error=_failed(proc, step, why, state)))
            proc.order, proc.steps = None, ()
            return
        if state is None:
            why = f"protocol error: answered {step} with neither a state nor an error"
            self._broken(proc, why, resolve=(b, _failed(proc, step, why)))
            return
        proc.state = state
        if state != expect:
            why = f"the device went to {state}, not {expect}"
            b.resolve(proc.task_id, Outcome(proc.task_id, error=_failed(proc, step, why, state)))
            proc.order, proc.steps = None, ()
            return
        if proc.steps:
            (nxt, after), *rest = proc.steps
            proc.steps = tuple(rest)
            self._order(proc, nxt, {}, b, after)
            return
        proc.order = None
        proc.ending = order == "EXIT"
        b.resolve(proc.task_id, Outcome(proc.task_id, TASK_TRANSITIONS.get(order, order)))

    def _broken(self, proc: _Proc, why: str, resolve: tuple[_Batch, str] | None = None) -> None:
        """The task broke the protocol: stop listening, fail what it owes, report it."""
        proc.broken = True
        if proc.sock is not None:
            with contextlib.suppress(Exception):
                self._bind_loop().remove_reader(proc.sock.fileno())
        waiting, proc.waiting = proc.waiting, None
        failed = why
        if resolve is not None:
            resolve[0].resolve(proc.task_id, Outcome(proc.task_id, error=resolve[1]))
        elif waiting is not None:
            failed = why if waiting[0] < 0 else _failed(proc, waiting[1], why)
            waiting[2].resolve(proc.task_id, Outcome(proc.task_id, error=failed, pid=proc.pid))
        # the report says the same as the outcome: whichever the controller hears first
        # is the task's reason
        self._emit([Report(proc.task_id, "error", failed, pid=proc.pid)])

    def _closed(self, proc: _Proc, why: str) -> None:
        """EOF on the control connection: the process is ending, or broke off."""
        loop = self._bind_loop()
        if proc.sock is not None:
            loop.remove_reader(proc.sock.fileno())
            loop.remove_writer(proc.sock.fileno())
            proc.sock.close()
            proc.sock = None
        if proc.ending:
            return
        # The exit, if it comes, says more (its status); give it a moment.
        loop.call_later(0.2, self._closed_check, proc, why)

    def _closed_check(self, proc: _Proc, why: str) -> None:
        if proc.exited is None and not proc.broken:
            self._broken(proc, f"{why} while its process {proc.pid} is alive")

    # -- exits ------------------------------------------------------------------------

    def _on_exit(self, proc: _Proc) -> None:
        # Read what it said last (an EXIT answer comes just before the exit).
        if proc.sock is not None and not proc.broken:
            self._on_readable(proc, 1 << 62)  # all of it: there is no next wake-up
        # Kill what it left in its group before reaping (its pid cannot be reused yet).
        _killpg(proc.pid, signal.SIGKILL)
        code = proc.popen.poll()
        if code is None:
            return  # not yet (spurious wakeup)
        proc.exited = code
        self._leases[proc.lease] -= 1
        if not self._leases[proc.lease]:
            del self._leases[proc.lease]
        self._forget(proc)
        why = describe_status(code)
        waiting, proc.waiting = proc.waiting, None
        if waiting is not None:
            if waiting[0] < 0:
                failed = f"process {why} before its hello"
            elif proc.control == "fairmq":
                failed = _failed(proc, waiting[1], f"process {proc.pid} {why}")
            else:
                failed = f"process {why} during {waiting[1]}"
            waiting[2].resolve(proc.task_id, Outcome(proc.task_id, error=failed))
        fut = self._reapers.pop(proc.pid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)
        h = self._health.get(proc.task_id)
        if h is not None and h.pid == proc.pid:
            del self._health[proc.task_id]
        said = f"process {proc.pid} {why}" + ("" if proc.note is None else f": {proc.note}")
        if waiting is not None and waiting[0] >= 0 and proc.control == "fairmq":
            said = _failed(proc, waiting[1], said)  # what the batch says, at its step
        self._emit([Report(proc.task_id, "exited", said, code, proc.pid)])

    def _forget(self, proc: _Proc) -> None:
        loop = self._loop
        if proc.pidfd >= 0:
            if loop is not None:
                loop.remove_reader(proc.pidfd)
            os.close(proc.pidfd)
            proc.pidfd = -1
        if proc.sock is not None:
            if loop is not None:
                loop.remove_reader(proc.sock.fileno())
                loop.remove_writer(proc.sock.fileno())
            proc.sock.close()
            proc.sock = None

    # -- health checks ----------------------------------------------------------------

    def _set_deadline(self, task_id: str, pid: int, timeout: float) -> None:
        """A basic task with a timeout is ended when it runs longer (as AliECS's
        executor does), and its exit is said with the reason."""
        loop = self._bind_loop()
        heapq.heappush(self._deadlines, (loop.time() + timeout, task_id, pid, timeout))
        self._arm_deadlines(loop)

    def _arm_deadlines(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        if self._deadlines:
            self._deadline_timer = loop.call_at(self._deadlines[0][0], self._on_deadlines)

    def _on_deadlines(self) -> None:
        loop = self._bind_loop()
        self._deadline_timer = None
        now = loop.time()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, task_id, pid, timeout = heapq.heappop(self._deadlines)
            proc = self._procs.get(task_id)
            if proc is None or proc.pid != pid or proc.exited is not None:
                continue  # it ended in time, or a relaunch runs under that id now
            proc.note = f"ended: it ran longer than its timeout of {timeout:g} s"
            _killpg(proc.pid, signal.SIGKILL)
        self._arm_deadlines(loop)

    def _watch_health(self, task_id: str, spec: HealthCheck, pid: int, env: dict[str, str]) -> None:
        if not spec.command:
            return
        loop = self._bind_loop()
        self._health[task_id] = _Health(spec, loop.time() + spec.interval, pid, env)
        if self._health_loop is None or self._health_loop.done():
            self._health_loop = asyncio.ensure_future(self._run_health())

    async def _run_health(self) -> None:
        loop = self._bind_loop()
        while self._health:
            now = loop.time()
            due = [(tid, h) for tid, h in self._health.items() if h.due <= now and not h.busy]
            for tid, h in due:
                h.busy = True
                h.due = now + h.spec.interval
                job = asyncio.ensure_future(self._check(tid, h))
                self._checks.add(job)
                job.add_done_callback(self._checks.discard)
            # wake for the next due check, and at least 4 times a second (a check that
            # just finished may be due before the ones counted here)
            waits = [h.due for h in self._health.values() if not h.busy]
            await asyncio.sleep(max(0.01, min([*waits, now + 0.25]) - loop.time()))

    async def _check(self, task_id: str, h: _Health) -> None:
        why = None
        try:
            proc = await asyncio.create_subprocess_exec(
                *h.spec.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=h.env,
                start_new_session=True,
            )
        except OSError as e:
            why = f"cannot run {h.spec.command[0]!r}: {e.strerror or e}"
        else:
            try:
                _, err = await asyncio.wait_for(proc.communicate(), h.spec.timeout)
                if proc.returncode != 0:
                    tail = err.decode("utf-8", "replace").strip().splitlines()[-1:]
                    why = f"{describe_status(proc.returncode or 0)}" + (
                        f": {tail[0][:200]}" if tail else ""
                    )
            except TimeoutError:
                _killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                why = f"no answer within {h.spec.timeout:g} s"
            except asyncio.CancelledError:  # the backend is closing
                _killpg(proc.pid, signal.SIGKILL)
                raise
        h.busy = False
        if self._health.get(task_id) is not h:
            return  # the task ended (or was relaunched) meanwhile
        if why is None:
            h.fails = 0
            return
        h.fails += 1
        if h.fails >= h.spec.failures:
            del self._health[task_id]
            reason = f"health check failed {h.fails} times in a row: {why}"
            self._emit([Report(task_id, "error", reason, pid=h.pid)])

    # -- reports ----------------------------------------------------------------------

    def _emit(self, reports: list[Report]) -> None:
        if not reports:
            return
        self._queue.extend(reports)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._bind_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        reports, self._queue = self._queue, []
        if self._sink is not None and reports:
            self._sink(reports)


def _not_runnable(spec: Launch, search: str) -> str | None:
    """Why the task's program cannot be started, or None (it can, as far as we see);
    ``search``: the task's PATH."""
    value = spec.command.value
    if "/" not in value:
        found = shutil.which(value, path=search)
        return None if found else f"cannot start {value!r}: not found on PATH"
    path = value if os.path.isabs(value) else os.path.join(spec.command.cwd or ".", value)
    if not os.path.exists(path):
        where = f" in {spec.command.cwd}" if spec.command.cwd else ""
        return f"cannot start {value!r}: no such file or directory{where}"
    if not os.access(path, os.X_OK):
        return f"cannot start {value!r}: permission denied"
    return None


def _memory_mb() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 1024


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
