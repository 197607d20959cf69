"""The Ray backend: the nodes of a Ray cluster, each with a corral node agent actor.

How this runs. The controller is a Ray driver (``ray.init`` in namespace ``corral``).
Each alive Ray node gets one **detached, named** actor (``corral-agent-<node id>``),
pinned to it by node affinity (not soft) and holding no CPU. The actor is a node
agent: a local backend whose tasks are its child processes, each killed by the kernel
when the actor dies (``PR_SET_PDEATHSIG``). Every port call is one actor call per node
batch. Reports wait in the actor until the controller's poll for that node takes them
(one long-poll call in flight per node: no task or timer per task).

Nodes come from Ray: the alive nodes, their CPUs, memory and GPUs, and their labels
(``ray start --labels role=flp,detector=TPC``; a ``name`` label names the node, else
its address). A watcher asks Ray for the nodes a few times a second: a node that is
gone (or whose agent died) has its tasks reported LOST; a node that comes back does
not bring them back. Detection takes as long as Ray's health checks: tune them (see
docs/cluster.md) to about 1.5 s.

Agents outlive the controller: a new controller finds them by name and takes their
tasks over. An agent that hears nothing from a controller for its lease ends its
tasks (fencing: a node cut off from its controller must not run a second copy once
the controller starts them again elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from corral.backends import sweep, wire
from corral.backends.agent import (
    DEFAULT_LEASE,
    MAX_BUFFERED,
    MAX_LEASE,
    MIN_LEASE,
    dispatch,
    task_env_of,
)
from corral.backends.local import LocalBackend
from corral.model.inventory import Node
from corral.ports.backend import (
    ChannelRequest,
    Launch,
    NodeInfo,
    Order,
    Outcome,
    Report,
    ReportSink,
)

log = logging.getLogger("corral.ray")
NAMESPACE = "corral"
PORTS = (20000, 29999)  # the port range each node gives out
WATCH_EVERY = 0.25  # seconds between two looks at Ray's node table
POLL_WAIT = 1.0  # how long an agent holds a report poll open


class NodeAgentActor:
    """A node agent as a Ray actor (async: its calls share one event loop)."""

    def __init__(self, node: str, host: str, lease: float, marker: str | None = None) -> None:
        self.node = node
        self.host = host
        self.lease = lease
        self.marker = marker  # CORRAL_AGENT of its tasks: a new agent ends a dead one's
        self.swept = False
        self.backend: LocalBackend | None = None
        self.queue: list[Report] = []
        self.dropped = 0
        self.wake: asyncio.Event | None = None
        self.last = time.monotonic()
        self.fencer: asyncio.Task[None] | None = None

    def _ready(self) -> LocalBackend:
        if self.backend is None:  # in the actor's event loop, at the first call
            self.backend = LocalBackend(die_with_me=True, host=self.host, marker=self.marker)
            self.backend.subscribe(self._sink)
            self.wake = asyncio.Event()
            self.fencer = asyncio.ensure_future(self._fence())
        self.last = time.monotonic()
        return self.backend

    def _sink(self, reports: list[Report]) -> None:
        room = MAX_BUFFERED - len(self.queue)
        if room < len(reports):
            self.dropped += len(reports) - max(0, room)  # reconcile repairs what is lost
        self.queue.extend(reports[: max(0, room)])
        if self.wake is not None:
            self.wake.set()

    async def hello(
        self, lease: float | None = None, task_env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """A controller starts speaking (``lease``: its lease from now on; ``task_env``:
        the variables passed through to the tasks, ``--task-env``). The first hello of a
        new agent ends what a dead one on this node left behind (the descendants of its
        tasks)."""
        if not self.swept and self.marker is not None:
            self.swept = True
            left = await asyncio.to_thread(sweep.end, agents=(self.marker,))
            if left:
                log.warning("%d processes a previous agent left behind ended", left)
        backend = self._ready()
        if lease is not None and MIN_LEASE <= lease <= MAX_LEASE:
            self.lease = float(lease)
        passed = task_env_of({"task_env": task_env})
        if passed is not None:
            backend.task_env = passed
        return {"pid": os.getpid(), "node": self.node, "lease": self.lease}

    async def call(self, op: str, args: dict[str, Any]) -> Any:
        return await dispatch(self._ready(), op, args)

    async def poll(self, wait: float) -> list[list[Any]]:
        """The reports waiting, at once, or as soon as one comes (within ``wait``)."""
        self._ready()
        assert self.wake is not None
        if not self.queue:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait)
        reports, self.queue = self.queue, []
        self.last = time.monotonic()  # a controller held the poll open until now
        return wire.encode_reports(reports)

    async def shutdown(self) -> None:
        if self.backend is not None:
            await self.backend.close()
        if self.fencer is not None:
            self.fencer.cancel()

    async def _fence(self) -> None:
        while True:
            b = self.backend
            first = None if b is None else b.next_lease_end(self.lease)
            due = self.last + (first or self.lease) - time.monotonic()
            await asyncio.sleep(min(MIN_LEASE / 2, max(0.1, due)))  # a shorter lease may come
            if b is None:
                continue
            silent = time.monotonic() - self.last
            ended = await b.fence(silent, self.lease)
            if ended:
                log.warning("no controller for %.0f s: %d tasks whose lease ran out ended "
                            "(fencing)", silent, ended)  # fmt: skip


def node_info(n: dict[str, Any]) -> Node:
    """A Ray node (an entry of ``ray.nodes()``) as a corral node."""
    labels = {k: str(v) for k, v in (n.get("Labels") or {}).items() if not k.startswith("ray.io/")}
    res = n.get("Resources") or {}
    name = labels.pop("name", None) or str(n.get("NodeName") or n["NodeManagerAddress"])
    # where the node's tasks are reached (services' endpoints, health checks)
    labels.setdefault("address", str(n.get("NodeManagerAddress") or name))
    return Node(
        name,
        cpu=float(res.get("CPU", 0.0)),
        memory=int(res.get("memory", 0) // (1024 * 1024)),
        gpu=int(res.get("GPU", 0)),
        ports=PORTS,
        labels=tuple(sorted(labels.items())),
        pool=labels.get("pool", "default"),
    )


class RayBackend:
    """Tasks on the nodes of a Ray cluster; see the module doc."""

    name = "ray"

    def __init__(
        self,
        address: str,
        *,
        lease: float = DEFAULT_LEASE,
        namespace: str = NAMESPACE,
        task_env: Mapping[str, str] | None = None,
    ) -> None:
        """``task_env``: the variables (with this process's values) every node's agent
        passes through to its tasks (``--task-env``)."""
        self.address = address
        self.lease = lease
        self.task_env = dict(task_env or {})
        self.namespace = namespace
        self._sink: ReportSink | None = None
        self._nodes: dict[str, Node] = {}
        self._ids: dict[str, str] = {}  # node name -> Ray node id
        self._agents: dict[str, Any] = {}  # node name -> actor handle
        self._on: dict[str, set[str]] = {}  # node name -> task ids believed to run there
        self._gone: set[str] = set()  # nodes lost: their tasks were reported LOST
        self._polls: dict[str, asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._resumed = False
        self.on_nodes: Callable[[], None] | None = None  # the inventory changed

    # -- starting ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the cluster and find (or create) an agent on every alive node."""
        import ray  # only when this backend is used: an optional dependency

        if not ray.is_initialized():
            await asyncio.to_thread(
                ray.init, address=self.address, namespace=self.namespace,
                logging_level=logging.ERROR, log_to_driver=False,
            )  # fmt: skip
        await self._refresh()
        self._watch = asyncio.ensure_future(self._watch_nodes())

    async def _refresh(self) -> None:
        import ray

        table = await asyncio.to_thread(ray.nodes)
        changed = False
        # a node is known by its Ray node id: a dead entry under a name that a newer,
        # alive node took over (a node restarted with the same labels) says nothing
        for n in sorted(table, key=lambda n: bool(n.get("Alive"))):
            info = node_info(n)
            current = self._ids.get(info.name)
            if not n.get("Alive"):
                if current == n["NodeID"] and info.name not in self._gone:
                    self._lose(info.name, f"node {info.name} is gone (Ray: not alive)")
                continue
            if current == n["NodeID"]:
                continue  # known, alive (or lost and not brought back: a new id will come)
            self._nodes[info.name] = info
            self._ids[info.name] = n["NodeID"]
            self._gone.discard(info.name)
            self._polls.pop(info.name, None)
            self._agents[info.name] = await self._agent(info.name, n)
            changed = True
            if self._resumed:
                self._start_poll(info.name)
        if changed and self.on_nodes is not None:
            self.on_nodes()

    async def _agent(self, name: str, n: dict[str, Any]) -> Any:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor_class: Any = ray.remote(NodeAgentActor)
        handle = actor_class.options(
            name=f"corral-agent-{n['NodeID']}",
            namespace=self.namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(name, str(n["NodeManagerAddress"]), self.lease, f"{self.namespace}:{n['NodeID']}")
        await handle.hello.remote(self.lease, self.task_env)
        return handle

    # -- the port -----------------------------------------------------------------------------

    def nodes(self) -> Sequence[NodeInfo]:
        return [n for name, n in self._nodes.items() if name not in self._gone]

    def subscribe(self, sink: ReportSink) -> None:
        self._sink = sink

    async def _call(self, node: str, op: str, args: dict[str, Any]) -> Any:
        agent = self._agents.get(node)
        if agent is None or node in self._gone:
            raise ConnectionError(f"node {node} has no agent (it is gone, or not a Ray node)")
        return await agent.call.remote(op, args)

    async def allocate(
        self, node: str, env_id: str, channels: Sequence[ChannelRequest]
    ) -> list[str]:
        args = {"node": node, "env": env_id, "channels": wire.encode_channels(channels)}
        return [str(a) for a in await self._call(node, "allocate", args)]

    async def launch(
        self, node: str, batch: Sequence[Launch], timeout: float, slow_after: float
    ) -> list[Outcome]:
        self._on.setdefault(node, set()).update(x.task_id for x in batch)
        args = {"node": node, "batch": wire.encode_launches(batch), "timeout": timeout,
                "slow_after": slow_after}  # fmt: skip
        return wire.decode_outcomes(await self._call(node, "launch", args))

    async def transition(
        self, node: str, batch: Sequence[Order], timeout: float, slow_after: float
    ) -> list[Outcome]:
        args = {"node": node, "batch": wire.encode_orders(batch), "timeout": timeout,
                "slow_after": slow_after}  # fmt: skip
        return wire.decode_outcomes(await self._call(node, "transition", args))

    async def stop(self, node: str, task_ids: Sequence[str], grace: float) -> None:
        if node in self._gone or node not in self._agents:
            return  # nothing runs on a lost (or unknown) node: its agent went with it
        await self._call(node, "stop", {"node": node, "ids": list(task_ids), "grace": grace})

    async def release(self, node: str, env_id: str) -> None:
        if node in self._gone or node not in self._agents:
            return
        await self._call(node, "release", {"node": node, "env": env_id})
        self._on[node] = {t for t in self._on.get(node, set()) if not t.startswith(env_id + ":")}

    async def end_leftovers(self, env_ids: Sequence[str]) -> int:
        got = await asyncio.gather(
            *(self._call(n, "end_leftovers", {"envs": list(env_ids)}) for n in self._live()),
            return_exceptions=True,
        )
        return sum(g for g in got if isinstance(g, int))

    async def inventory(self) -> list[tuple[str, int, str | None]]:
        names = self._live()
        got = await asyncio.gather(
            *(self._call(n, "inventory", {}) for n in names), return_exceptions=True
        )
        out: list[tuple[str, int, str | None]] = []
        for name, g in zip(names, got, strict=True):
            if isinstance(g, BaseException):
                log.warning("inventory of node %s failed: %s", name, g)
                continue
            running = [(str(t), int(p), None if s is None else str(s)) for t, p, s in g]
            self._on[name] = {t for t, _, _ in running}
            out.extend(running)
        return out

    async def resume(self) -> None:
        """Start taking each agent's reports (after the control plane knows its tasks)."""
        self._resumed = True
        for name in self._live():
            self._start_poll(name)

    async def close(self) -> None:
        """Stop every agent (and so every task), then leave the cluster."""
        await self._stop_watching()
        for agent in list(self._agents.values()):
            with contextlib.suppress(Exception):
                await agent.shutdown.remote()
            with contextlib.suppress(Exception):
                import ray

                ray.kill(agent)
        await self._leave()

    async def detach(self) -> None:
        """Leave the cluster; the agents and their tasks run on (a restart)."""
        await self._stop_watching()
        await self._leave()

    async def _leave(self) -> None:
        import ray

        if ray.is_initialized():
            await asyncio.to_thread(ray.shutdown)

    async def _stop_watching(self) -> None:
        jobs = [*self._polls.values(), *([self._watch] if self._watch else [])]
        for job in jobs:
            job.cancel()
        for job in jobs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job
        self._polls.clear()

    # -- reports and node loss ------------------------------------------------------------------

    def _live(self) -> list[str]:
        return [n for n in self._agents if n not in self._gone]

    def _start_poll(self, name: str) -> None:
        old = self._polls.get(name)
        if old is None or old.done():
            self._polls[name] = asyncio.ensure_future(self._poll(name))

    async def _poll(self, name: str) -> None:
        agent = self._agents[name]
        while name not in self._gone:
            try:
                got = await agent.poll.remote(POLL_WAIT)
            except Exception as e:  # the actor died (and its tasks with it), or its node
                if name not in self._gone:
                    self._lose(name, f"the node agent on {name} died ({type(e).__name__})")
                return
            reports = wire.decode_reports(got)
            for r in reports:
                if r.kind == "exited":
                    self._on.get(name, set()).discard(r.task_id)
            if reports and self._sink is not None:
                self._sink(reports)

    def _lose(self, name: str, why: str) -> None:
        self._gone.add(name)
        lost = sorted(self._on.pop(name, set()))
        log.warning("%s: %d tasks lost", why, len(lost))
        if self.on_nodes is not None:
            self.on_nodes()
        if lost and self._sink is not None:
            self._sink([Report(t, "lost", why) for t in lost])

    async def _watch_nodes(self) -> None:
        while True:
            await asyncio.sleep(WATCH_EVERY)
            try:
                await self._refresh()
            except Exception:
                log.exception("watching Ray's nodes")
