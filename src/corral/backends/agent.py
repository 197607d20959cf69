"""The node agent: a node's tasks, owned by a process that outlives its controller.

How this runs. ``corral agent`` runs one ``Agent`` on an asyncio loop: a local backend
(the tasks are its children, each killed by the kernel if the agent dies) behind a
unix socket that only its own user may use (the peer's credentials are checked on
every connection, file socket or abstract). One controller at a time speaks to it: a
connection becomes the controller by saying ``hello`` (the data directory's lock keeps
a second corral server away; a connection that has not said hello is answered an
error and changes nothing). Each request (one node batch: a launch, a transition, a
stop ...) runs as its own asyncio task, so the batches of a step run together, and is
answered with its id; reports go out unasked, in batches, once the controller said
``resume`` (until then, and while no controller is connected, they wait in a bounded
buffer).

Fencing. The controller speaks at least every few hundred milliseconds (a ``ping``
when it has nothing else to say). When the agent has heard nothing from it for a
task's lease (its environment's ``lease``, else the agent's own, which the controller
sets in its hello), connected or not, it ends that task: a controller that lost touch
(crashed, partitioned, frozen) must not find a second copy of its tasks running when
it starts them again. With no controller and nothing left to run, the agent exits.

Exits said again. A report sent is not a report read: a controller killed -9 may
die with exits in its socket, unread. So the exits (and losses) sent to a controller
in the last ``REPLAY`` seconds are kept, and given again, first, to the next
controller that says hello with another ``session`` (a controller's process): what it
already knows it ignores (a unit or task that is not running, or runs another pid);
what its predecessor never read is not lost.

A new agent of a data directory first ends whatever a previous one left: the
descendants of its tasks (the kernel only ends the tasks themselves when an agent is
killed), found by the ``CORRAL_AGENT`` mark they inherit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import socket
import struct
import time
from typing import Any

from corral.backends import sweep, wire
from corral.backends.local import LocalBackend
from corral.ports.backend import Report

log = logging.getLogger("corral.agent")

VERSION = 1
DEFAULT_LEASE = 60.0  # seconds an agent waits for its controller before ending its tasks
MIN_LEASE = 1.0  # shorter, and a controller's ordinary pause would end the data taking
MAX_LEASE = 1e7  # (about four months)
PING = 0.25  # the controller speaks at least this often (seconds)
MAX_BUFFERED = 1_000_000  # reports kept while no controller listens (reconcile repairs more)
SETTLE = 10.0  # seconds an inventory waits for the orders a previous controller left
ORDERS = frozenset(("allocate", "launch", "transition", "stop", "release"))
REPLAY = 30.0  # seconds the exits sent to a controller are kept, to be said again
MAX_REPLAY = 100_000  # (and at most this many)
ENDS = frozenset(("exited", "lost"))


def socket_path(data_dir: str) -> str:
    """Where a data directory's agent listens: a file in it when the path is short
    enough for a unix socket, else an abstract socket named after the directory."""
    path = os.path.join(os.path.abspath(data_dir), "agent.sock")
    if len(path.encode()) < 100:
        return path
    digest = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:24]
    return "\0corral-agent-" + digest


def marker(data_dir: str) -> str:
    """The mark of the processes a data directory's agents start."""
    return hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:24]


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The user id of the process at the other end of a unix socket."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _, uid, _ = struct.unpack("3i", raw)
    return int(uid)


class Agent:
    def __init__(
        self,
        backend: LocalBackend,
        path: str,
        *,
        lease: float = DEFAULT_LEASE,
        uid: int | None = None,
    ) -> None:
        """``uid``: who may connect (default: this process's user)."""
        self.backend = backend
        self.path = path
        self.lease = lease
        self.uid = os.geteuid() if uid is None else uid
        self._writer: asyncio.StreamWriter | None = None  # the controller's connection
        self._buffer: collections.deque[Report] = collections.deque(maxlen=MAX_BUFFERED)
        self._lease_timer: asyncio.TimerHandle | None = None
        self._last_word = time.monotonic()  # when the controller last said anything
        self._done = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        # orders under way, by the connection that sent them (a re-attach waits for
        # those of a previous controller: their outcome is what the tasks' state is)
        self._orders: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._resumed = False
        # the exits sent to the controller, to be said again to the next (see the doc)
        self._sent: collections.deque[tuple[float, Report]] = collections.deque(maxlen=MAX_REPLAY)
        self._session: object = None  # the controller's, said in its hello
        backend.subscribe(self._on_reports)

    async def serve(self) -> None:
        """Listen until told to shut down, or until the lease ran out with no tasks."""
        if self.backend.marker is not None:
            left = await asyncio.to_thread(sweep.end, agents=(self.backend.marker,))
            if left:
                log.warning("%d processes a previous agent left behind ended", left)
        if not self.path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        mask = os.umask(0o177)  # the socket file: its user only (checked again per peer)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=self.path, limit=wire.MAX_FRAME
            )
        finally:
            os.umask(mask)
        self._heard()  # a controller that started us connects at once
        try:
            await self._done.wait()
        finally:
            if self._lease_timer is not None:
                self._lease_timer.cancel()
            self._server.close()
            await self._server.wait_closed()
            await self.backend.close()
            if not self.path.startswith("\0"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def stop(self) -> None:
        """End every task and exit (SIGTERM, SIGINT)."""
        self._done.set()

    # -- connections -----------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer)
        if uid is None or uid not in (self.uid, 0):
            log.error("a connection from user %s refused: only user %d may drive this agent",
                      uid, self.uid)  # fmt: skip
            writer.close()
            return
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ConnectionError, ValueError) as e:  # ValueError: a line too long
                    log.error("a connection failed: %s", e)
                    break
                except asyncio.CancelledError:
                    break  # shutting down (not re-raised: 3.11's streams would log it)
                if not line:
                    break
                try:
                    msg = wire.loads(line)
                except wire.WireError as e:
                    log.error("a request that does not decode (%s): connection closed", e)
                    break
                op = str(msg.get("op"))
                if writer is self._writer:
                    self._heard()
                elif op == "hello":
                    self._take(writer, msg.get("args") or {})
                else:  # not the controller: nothing it says changes anything
                    self._send(writer, {"id": msg.get("id"), "error": "say hello first"})
                    continue
                if op == "ping":
                    continue
                job = asyncio.ensure_future(self._request(writer, op, msg))
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
                if op in ORDERS:
                    self._orders[job] = writer
                    job.add_done_callback(self._orders.pop)
        finally:
            if self._writer is writer:
                self._writer = None
                log.warning("the controller's connection closed")
            writer.close()

    def _take(self, writer: asyncio.StreamWriter, args: dict[str, Any]) -> None:
        """A connection says hello: it is the controller from now on."""
        old, self._writer = self._writer, writer
        if old is not None:
            log.warning("a new controller said hello: the previous connection is dropped")
            old.close()
        self._resumed = False  # reports wait until the controller says resume
        session = args.get("session")
        if session is None or session != self._session:  # another controller process
            now = time.monotonic()
            again = [r for t, r in self._sent if now - t <= REPLAY]
            if again:
                log.info("%d exits sent to the previous controller are said again", len(again))
                self._buffer.extendleft(reversed(again))
            self._sent.clear()
        self._session = session
        lease = args.get("lease")
        if isinstance(lease, bool) or not isinstance(lease, int | float):
            lease = None
        if lease is not None and MIN_LEASE <= lease <= MAX_LEASE and lease != self.lease:
            log.info("the controller sets the lease to %g s (was %g s)", lease, self.lease)
            self.lease = float(lease)
        passed = task_env_of(args)
        if passed is not None and passed != self.backend.task_env:
            log.info("the controller passes these variables to the tasks: %s",
                     " ".join(sorted(passed)) or "none")  # fmt: skip
            self.backend.task_env = passed
        self._heard()

    def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        if writer.is_closing():
            return
        writer.write(wire.dumps(msg))

    async def _request(self, writer: asyncio.StreamWriter, op: str, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        try:
            result = await self._op(writer, op, msg.get("args") or {})
        except wire.WireError as e:
            self._send(writer, {"id": rid, "error": f"bad request: {e}"})
        except Exception as e:  # the port's calls may raise: say so, keep serving
            log.exception("request %s failed", op)
            self._send(writer, {"id": rid, "error": f"{type(e).__name__}: {e}"})
        else:
            self._send(writer, {"id": rid, "result": result})
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _op(self, writer: asyncio.StreamWriter, op: str, a: dict[str, Any]) -> Any:
        if op == "resume":  # the controller knows its tasks again: what waited, now
            if self._buffer:
                reports = list(self._buffer)
                self._buffer.clear()
                self._resumed = True
                self._on_reports(reports)
            self._resumed = True
            return None
        if op == "hello":
            return {"version": VERSION, "pid": os.getpid(), "lease": self.lease,
                    "nodes": wire.encode_nodes(self.backend.nodes())}  # fmt: skip
        if op == "shutdown":  # the controller stopped for good: nothing left to keep
            asyncio.get_running_loop().call_soon(self._done.set)
            return None
        if op == "inventory":  # after the orders a previous controller left under way
            earlier = [j for j, w in self._orders.items() if w is not writer]
            if earlier:  # (bounded: what still waits is said BUSY)
                log.info("inventory: waiting for %d orders of a previous controller",
                         len(earlier))  # fmt: skip
                await asyncio.wait(earlier, timeout=SETTLE)
        return await dispatch(self.backend, op, a)

    # -- reports and the lease -------------------------------------------------------------

    def _on_reports(self, reports: list[Report]) -> None:
        w = self._writer
        if w is None or w.is_closing() or not self._resumed:
            self._buffer.extend(reports)
            return
        self._send(w, {"reports": wire.encode_reports(reports)})
        now = time.monotonic()
        self._sent.extend((now, r) for r in reports if r.kind in ENDS)
        while self._sent and now - self._sent[0][0] > REPLAY:
            self._sent.popleft()

    def _heard(self) -> None:
        """The controller spoke (or, at start, is about to): the lease starts anew."""
        self._last_word = time.monotonic()
        if self._lease_timer is None and not self._done.is_set():
            self._schedule_fence()

    def _schedule_fence(self) -> None:
        """Wake when the next task's lease runs out (or the agent's own, with none), or
        sooner: a task with a shorter lease may come meanwhile."""
        first = self.backend.next_lease_end(self.lease)
        due = self._last_word + (self.lease if first is None else first)
        delay = min(MIN_LEASE / 2, max(0.05, due - time.monotonic()))
        self._lease_timer = asyncio.get_running_loop().call_later(delay, self._fence)

    def _fence(self) -> None:
        self._lease_timer = None
        silent = time.monotonic() - self._last_word
        first = self.backend.next_lease_end(self.lease)
        if silent < (self.lease if first is None else first):
            self._schedule_fence()  # heard from the controller since: not yet
            return
        job = asyncio.ensure_future(self._fence_tasks(silent))
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _fence_tasks(self, silent: float) -> None:
        for _ in range(3):  # what the controller said while we were stalled is read first
            await asyncio.sleep(0)
        silent = time.monotonic() - self._last_word
        ended = await self.backend.fence(silent, self.lease)
        if ended:
            whom = "no controller" if self._writer is None else "a silent controller"
            log.warning("%s for %.1f s: %d tasks whose lease ran out ended (fencing)",
                        whom, silent, ended)  # fmt: skip
        silent = time.monotonic() - self._last_word
        if (
            self._writer is None
            and self.backend.next_lease_end(self.lease) is None
            and silent >= self.lease
        ):
            log.warning("no controller for %.0f s and no task left: exiting", silent)
            self._done.set()
            return
        if self._lease_timer is None:
            self._schedule_fence()


def task_env_of(args: dict[str, Any]) -> dict[str, str] | None:
    """The variables a controller's hello passes through to the tasks (``--task-env``,
    with the server's values), or None when it says nothing of them (or nonsense)."""
    got = args.get("task_env")
    if not isinstance(got, dict):
        return None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in got.items()):
        return None
    return dict(got)


async def dispatch(b: LocalBackend, op: str, a: dict[str, Any]) -> Any:
    """One request of the agent protocol, on a node's local backend (whatever carries
    the requests: a unix socket, Ray actor calls)."""
    if op == "allocate":
        return await b.allocate(a["node"], a["env"], wire.decode_channels(a["channels"]))
    if op == "launch":
        outs = await b.launch(
            a["node"], wire.decode_launches(a["batch"]), a["timeout"], a["slow_after"]
        )
        return wire.encode_outcomes(outs)
    if op == "transition":
        outs = await b.transition(
            a["node"], wire.decode_orders(a["batch"]), a["timeout"], a["slow_after"]
        )
        return wire.encode_outcomes(outs)
    if op == "stop":
        await b.stop(a["node"], [str(t) for t in a["ids"]], float(a["grace"]))
        return None
    if op == "release":
        await b.release(a["node"], a["env"])
        return None
    if op == "end_leftovers":
        return await b.end_leftovers([str(e) for e in a["envs"]])
    if op == "inventory":
        return [list(x) for x in await b.inventory()]
    raise wire.WireError(f"unknown op {op!r}")
