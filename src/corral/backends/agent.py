"""The node agent: a node's tasks, owned by a process that outlives its controller.

How this runs. ``corral agent`` runs one ``Agent`` on an asyncio loop: a local backend
(the tasks are its children, each killed by the kernel if the agent dies) behind a
unix socket. One controller at a time speaks to it (the newest connection wins; the
data directory's lock keeps a second controller away). Each request (one node batch:
a launch, a transition, a stop ...) runs as its own asyncio task, so the batches of a
step run together, and is answered with its id; reports go out unasked, in batches.

While no controller is connected, the tasks run on and their reports wait in a
bounded buffer, sent when a controller connects again. If none comes back within the
lease, the agent ends every task (fencing: a controller that lost touch must not find
a second copy of its tasks running when it starts them again) and, having nothing
left to run, exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import time
from typing import Any

from corral.backends import wire
from corral.backends.local import LocalBackend
from corral.ports.backend import Report

log = logging.getLogger("corral.agent")

VERSION = 1
DEFAULT_LEASE = 60.0  # seconds an agent waits for its controller before ending its tasks
MAX_BUFFERED = 1_000_000  # reports kept while no controller listens (reconcile repairs more)


def socket_path(data_dir: str) -> str:
    """Where a data directory's agent listens: a file in it when the path is short
    enough for a unix socket, else an abstract socket named after the directory."""
    path = os.path.join(os.path.abspath(data_dir), "agent.sock")
    if len(path.encode()) < 100:
        return path
    digest = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:24]
    return "\0corral-agent-" + digest


class Agent:
    def __init__(self, backend: LocalBackend, path: str, *, lease: float = DEFAULT_LEASE) -> None:
        self.backend = backend
        self.path = path
        self.lease = lease
        self._writer: asyncio.StreamWriter | None = None
        self._buffer: collections.deque[Report] = collections.deque(maxlen=MAX_BUFFERED)
        self._lease_timer: asyncio.TimerHandle | None = None
        self._alone_since = time.monotonic()
        self._done = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._resumed = False
        backend.subscribe(self._on_reports)

    async def serve(self) -> None:
        """Listen until told to shut down, or until the lease ran out with no tasks."""
        if not self.path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._server = await asyncio.start_unix_server(
            self._client, path=self.path, limit=wire.MAX_FRAME
        )
        self._start_lease()  # a controller that started us connects at once
        try:
            await self._done.wait()
        finally:
            self._server.close()
            await self._server.wait_closed()
            await self.backend.close()
            if not self.path.startswith("\0"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def stop(self) -> None:
        """End every task and exit (SIGTERM, SIGINT)."""
        self._done.set()

    # -- the controller's connection ------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        old, self._writer = self._writer, writer
        if old is not None:
            log.warning("a new controller connected: the previous connection is dropped")
            old.close()
        if self._lease_timer is not None:
            self._lease_timer.cancel()
            self._lease_timer = None
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ConnectionError, ValueError) as e:  # ValueError: a line too long
                    log.error("the controller's connection failed: %s", e)
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
                job = asyncio.ensure_future(self._request(writer, msg))
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
        finally:
            if self._writer is writer:
                self._writer = None
                self._start_lease()
            writer.close()

    def _send(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        if writer.is_closing():
            return
        writer.write(wire.dumps(msg))

    async def _request(self, writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        try:
            result = await self._op(str(msg.get("op")), msg.get("args") or {})
        except wire.WireError as e:
            self._send(writer, {"id": rid, "error": f"bad request: {e}"})
        except Exception as e:  # the port's calls may raise: say so, keep serving
            log.exception("request %s failed", msg.get("op"))
            self._send(writer, {"id": rid, "error": f"{type(e).__name__}: {e}"})
        else:
            self._send(writer, {"id": rid, "result": result})
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _op(self, op: str, a: dict[str, Any]) -> Any:
        if op == "resume":  # the controller knows its tasks again: what waited, now
            if self._buffer:
                reports = list(self._buffer)
                self._buffer.clear()
                self._resumed = True
                self._on_reports(reports)
            self._resumed = True
            return None
        if op == "hello":
            self._resumed = False  # reports wait until the controller says resume
            return {"version": VERSION, "pid": os.getpid(), "lease": self.lease,
                    "nodes": wire.encode_nodes(self.backend.nodes())}  # fmt: skip
        if op == "shutdown":  # the controller stopped for good: nothing left to keep
            asyncio.get_running_loop().call_soon(self._done.set)
            return None
        return await dispatch(self.backend, op, a)

    # -- reports and the lease -------------------------------------------------------------

    def _on_reports(self, reports: list[Report]) -> None:
        w = self._writer
        if w is None or w.is_closing() or not self._resumed:
            self._buffer.extend(reports)
            return
        self._send(w, {"reports": wire.encode_reports(reports)})

    def _start_lease(self) -> None:
        if self._lease_timer is not None or self._done.is_set():
            return
        self._alone_since = time.monotonic()
        self._schedule_fence()

    def _schedule_fence(self) -> None:
        """Wake when the next task's lease runs out (or the agent's own, with none)."""
        first = self.backend.next_lease_end(self.lease)
        due = self._alone_since + (self.lease if first is None else first)
        delay = max(0.05, due - time.monotonic())
        self._lease_timer = asyncio.get_running_loop().call_later(delay, self._fence)

    def _fence(self) -> None:
        self._lease_timer = None
        if self._writer is not None:
            return
        job = asyncio.ensure_future(self._fence_tasks())
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _fence_tasks(self) -> None:
        silent = time.monotonic() - self._alone_since
        ended = await self.backend.fence(silent, self.lease)
        if ended:
            log.warning("no controller for %.0f s: %d tasks whose lease ran out ended "
                        "(fencing)", silent, ended)  # fmt: skip
        if self._writer is not None:
            return  # a controller came back meanwhile
        if self.backend.next_lease_end(self.lease) is None and silent >= self.lease:
            log.warning("no controller for %.0f s and no task left: exiting", silent)
            self._done.set()
            return
        self._schedule_fence()


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
