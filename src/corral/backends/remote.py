"""The Backend port spoken to a node agent over a unix socket (``corral agent``).

How this runs. On the controller's event loop: one connection, one reader task. A
call sends one request line (a node's whole batch) and waits for the answer with the
same id; the reader resolves the answers and hands report batches to the sink, in the
order they arrive. Nothing here runs per task.

If the connection breaks, the calls under way fail (their transition fails, its tasks
are marked failed and their processes ended when it can be), and the next call tries
to connect again. ``on_reconnect`` lets the control plane reconcile then: a report
sent while nobody listened may be lost, and the agent may be a new one (the old one
died, and its tasks with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from corral.backends import agent, wire
from corral.ports.backend import (
    ChannelRequest,
    Launch,
    NodeInfo,
    Order,
    Outcome,
    ReportSink,
)

log = logging.getLogger("corral.remote")
CALL_MARGIN = 30.0  # beyond a call's own deadline, how long its answer may take
PING = 0.25  # seconds between the words a controller says to its agent at least


class AgentUnavailable(ConnectionError):
    """The node agent cannot be reached; str() says why."""


class AgentBackend:
    """Tasks run by a node agent process; see the module doc."""

    name = "local"

    def __init__(
        self,
        path: str,
        *,
        start: Callable[[], None] | None = None,
        lease: float | None = None,
        ping: float = PING,
        task_env: Mapping[str, str] | None = None,
    ) -> None:
        """``path``: the agent's socket. ``start``: starts an agent when none answers.
        ``lease``: the agent's lease (fencing) from now on. ``ping``: how often to speak
        when there is nothing else to say (the agent's lease counts from the last word).
        ``task_env``: the variables (with their values) the agent passes through to its
        tasks from now on (``--task-env``; None: whatever it passes already)."""
        self.path = path
        self._start = start
        self.lease = lease
        self.task_env = None if task_env is None else dict(task_env)
        self._ping_every = ping
        self._pinging: asyncio.Task[None] | None = None
        self._sink: ReportSink | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        # this controller process (its hello says it: a node agent gives the exits it
        # sent to another one again, see backends.agent)
        self.session = os.urandom(8).hex()
        self._nodes: list[NodeInfo] = []
        self._lock = asyncio.Lock()
        self.agent_pid: int | None = None
        self.on_reconnect: Callable[[bool], None] | None = None  # arg: a new agent
        self._connected_once = False
        self._closing = False
        self._again: asyncio.Task[None] | None = None

    # -- connection ------------------------------------------------------------------------

    async def connect(self, *, timeout: float = 30.0) -> None:
        """Connect (starting an agent if none answers and ``start`` was given)."""
        async with self._lock:
            if self._writer is not None and not self._writer.is_closing():
                return
            deadline = time.monotonic() + timeout
            next_start = 0.0
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        self.path, limit=wire.MAX_FRAME
                    )
                except (FileNotFoundError, ConnectionRefusedError) as e:
                    if self._start is None:
                        raise AgentUnavailable(f"no node agent at {self.path!r}: {e}") from None
                    if time.monotonic() >= next_start:  # again while a previous agent
                        self._start()  # ends (it holds the lock: the new one gives up)
                        next_start = time.monotonic() + 1.0
                    if time.monotonic() > deadline:
                        raise AgentUnavailable(
                            f"the node agent did not start within {timeout:g} s"
                        ) from None
                    await asyncio.sleep(0.02)
                    continue
                uid = agent.peer_uid(writer)
                if uid is None or uid not in (os.geteuid(), 0):
                    writer.close()  # a listener of another user poses as our agent
                    raise AgentUnavailable(
                        f"the node agent socket {self.path!r} is held by user {uid}, not "
                        f"by this user ({os.geteuid()}): refusing to use it"
                    )
                break
            self._reader, self._writer = reader, writer
            self._reading = asyncio.ensure_future(self._read(reader))
            said: dict[str, Any] = {"session": self.session}
            if self.lease is not None:
                said["lease"] = self.lease
            if self.task_env is not None:
                said["task_env"] = self.task_env
            hello = await self._request("hello", said)
            before = self.agent_pid
            self.agent_pid = int(hello["pid"])
            self._nodes = wire.decode_nodes(hello["nodes"])
            again = self._connected_once
            self._connected_once = True
            if self._pinging is None or self._pinging.done():
                self._pinging = asyncio.ensure_future(self._ping())
        if again and self.on_reconnect is not None:
            self.on_reconnect(before != self.agent_pid)

    async def _ping(self) -> None:
        """Speak at least every ``ping`` seconds while connected: the agent fences a
        silent controller (a frozen or cut-off one) after the lease."""
        line = wire.dumps({"op": "ping"})
        while not self._closing:
            await asyncio.sleep(self._ping_every)
            writer = self._writer
            if writer is not None and not writer.is_closing():
                writer.write(line)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why = "the node agent closed the connection"
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                msg = wire.loads(line)
                if "reports" in msg:
                    if self._sink is not None:
                        self._sink(wire.decode_reports(msg["reports"]))
                    continue
                fut = self._pending.pop(int(msg.get("id", -1)), None)
                if fut is None or fut.done():
                    continue
                if "error" in msg:
                    fut.set_exception(RuntimeError(f"the node agent: {msg['error']}"))
                else:
                    fut.set_result(msg.get("result"))
        except (ConnectionError, ValueError, wire.WireError) as e:
            why = f"the connection to the node agent failed: {e}"
        finally:
            self._broken(why)

    def _broken(self, why: str) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(AgentUnavailable(why))
        if not self._closing:  # (at a stop, the agent closing the connection is expected)
            log.warning("%s", why)
        if not self._closing and self._start is not None:
            # at once, not at the next call: if the agent died, its tasks died with it
            self._again = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.05
        for _ in range(20):
            try:
                await self.connect()
                return
            except (AgentUnavailable, OSError) as e:
                log.warning("reconnecting to the node agent: %s", e)
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)
        log.error("the node agent cannot be reached; the next call tries again")

    async def _request(self, op: str, args: dict[str, Any], timeout: float = 60.0) -> Any:
        writer = self._writer
        if writer is None or writer.is_closing():
            raise AgentUnavailable("not connected to the node agent")
        self._next += 1
        rid = self._next
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        writer.write(wire.dumps({"id": rid, "op": op, "args": args}))
        await writer.drain()
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    async def _call(self, op: str, args: dict[str, Any], timeout: float = 60.0) -> Any:
        if self._writer is None or self._writer.is_closing():
            await self.connect()
        return await self._request(op, args, timeout)

    # -- the port --------------------------------------------------------------------------

    def nodes(self) -> Sequence[NodeInfo]:
        return list(self._nodes)

    def subscribe(self, sink: ReportSink) -> None:
        self._sink = sink

    async def allocate(
        self, node: str, env_id: str, channels: Sequence[ChannelRequest]
    ) -> list[str]:
        got = await self._call(
            "allocate", {"node": node, "env": env_id, "channels": wire.encode_channels(channels)}
        )
        return [str(a) for a in got]

    async def launch(
        self, node: str, batch: Sequence[Launch], timeout: float, slow_after: float
    ) -> list[Outcome]:
        return await self._batch("launch", node, wire.encode_launches(batch), timeout, slow_after)

    async def transition(
        self, node: str, batch: Sequence[Order], timeout: float, slow_after: float
    ) -> list[Outcome]:
        encoded = wire.encode_orders(batch)
        return await self._batch("transition", node, encoded, timeout, slow_after)

    async def _batch(
        self, op: str, node: str, encoded: Any, timeout: float, slow_after: float
    ) -> list[Outcome]:
        """A node's batch that answers an outcome per task, within its deadline."""
        args = {"node": node, "batch": encoded, "timeout": timeout, "slow_after": slow_after}
        return wire.decode_outcomes(await self._call(op, args, timeout + CALL_MARGIN))

    async def stop(self, node: str, task_ids: Sequence[str], grace: float) -> None:
        args = {"node": node, "ids": list(task_ids), "grace": grace}
        await self._call("stop", args, grace + 5.0 + CALL_MARGIN)

    async def release(self, node: str, env_id: str) -> None:
        await self._call("release", {"node": node, "env": env_id})

    async def end_leftovers(self, env_ids: Sequence[str]) -> int:
        return int(await self._call("end_leftovers", {"envs": list(env_ids)}))

    async def resume(self) -> None:
        await self._call("resume", {})

    async def inventory(self) -> list[tuple[str, int, str | None]]:
        got = await self._call("inventory", {})
        return [(str(t), int(p), None if s is None else str(s)) for t, p, s in got]

    async def close(self) -> None:
        """The controller stops for good: the agent ends every task and exits."""
        self._closing = True
        with contextlib.suppress(Exception):
            await self._call("shutdown", {}, 10.0)
        await self.detach()

    async def detach(self) -> None:
        """Drop the connection; the agent and its tasks run on (for tests: a crash)."""
        self._closing = True
        if self._again is not None:
            self._again.cancel()
        if self._pinging is not None:
            self._pinging.cancel()
        if self._writer is not None:
            self._writer.close()
        if self._reading is not None:
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reading


# what a node agent started by a server keeps of the server's environment
AGENT_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV")


def start_agent(data_dir: str, *, lease: float | None = None) -> Callable[[], None]:
    """A function that starts ``corral agent`` for ``data_dir``, detached from the caller
    (its own session; output in DATA/agent.log), so that it outlives it."""

    def start() -> None:
        os.makedirs(data_dir, exist_ok=True)
        argv = [sys.executable, "-m", "corral", "agent", "--data", data_dir]
        if lease is not None:
            argv += ["--lease", str(lease)]
        # `setsid -f` forks the agent off and returns: the agent is not our child, so
        # it is nobody's zombie and a crash of ours is no concern of its
        # The agent gets what it needs to run, never the server's secrets (its tasks
        # are its children, of the same user): the --task-env values come in hello.
        env = {k: os.environ[k] for k in AGENT_ENV if k in os.environ}
        with open(os.path.join(data_dir, "agent.log"), "ab") as out:
            subprocess.run(
                ["setsid", "-f", *argv], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, close_fds=True, check=True, timeout=30, env=env,
            )  # fmt: skip

    return start
