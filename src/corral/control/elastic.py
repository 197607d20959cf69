"""Elastic pools: a pool of nodes that grows with the queue and shrinks when idle.

How this runs. One ``ElasticPools`` per control plane, on its event loop, with one
periodic timer for all pools (``period`` seconds). At each pass, for each pool:

- **Demand.** The queued job units (and pending service replicas) whose placement asks
  for this pool (``pool: NAME``) and that wait for room: their cpus, minus what the
  pool's nodes have free and what nodes already asked for will bring. Nodes are asked
  for (``Provider.request``) to cover the rest, never past ``max`` (nodes there and
  coming); ``min`` nodes are kept at all times.
- **Release.** A node of the pool that has held nothing for ``cooldown`` seconds is
  cordoned, then given back (``Provider.release``), while the pool keeps ``min``.
  Only nodes the provider made are ever released.

A ``Provider`` makes and removes nodes: ``SimulatedProvider`` makes virtual nodes of a
given shape after a delay (the local backend runs their tasks on this machine, as it
does for an inventory's nodes); ``RayProvider`` asks Ray's autoscaler for the
resources (``ray.autoscaler.sdk.request_resources``) where a cluster has one, and its
new nodes join through the backend as every Ray node does.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from corral.control.ledger import Ledger
from corral.control.runner import QUEUED, JobRunner
from corral.control.services import PENDING, ServiceSupervisor
from corral.model.inventory import Node
from corral.planning.placement import Usage

log = logging.getLogger("corral.elastic")


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """A pool that scales between ``min`` and ``max`` nodes of ``shape``."""

    name: str
    min: int
    max: int
    shape: Node  # the resources of one node (its name is a prefix)
    cooldown: float = 60.0  # seconds a node holds nothing before it is given back

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.max <= 10_000:
            raise ValueError(f"pool {self.name}: need 0 <= min <= max <= 10000")
        if self.shape.cpu <= 0:
            raise ValueError(f"pool {self.name}: a node needs cpus")


class Provider(Protocol):
    """Makes and removes a pool's nodes."""

    async def request(self, pool: PoolSpec, count: int) -> list[Node]:
        """Ask for ``count`` more nodes; returns those that are ready now (a provider
        whose nodes join later, through the backend, returns none)."""
        ...

    async def release(self, pool: PoolSpec, names: Sequence[str]) -> None: ...


class SimulatedProvider:
    """Virtual nodes of the pool's shape, ready after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.made = 0
        self.released: list[str] = []

    async def request(self, pool: PoolSpec, count: int) -> list[Node]:
        if self.delay:
            await asyncio.sleep(self.delay)
        out = []
        for _ in range(count):
            self.made += 1
            s = pool.shape
            out.append(Node(f"{s.name}-{self.made}", s.cpu, s.memory, s.gpu, s.ports, s.labels,
                            pool=pool.name))  # fmt: skip
        return out

    async def release(self, pool: PoolSpec, names: Sequence[str]) -> None:
        self.released += names


class RayProvider:
    """Ray's autoscaler: asks for the pool's bundles (``request_resources``); the nodes
    it starts join through the Ray backend's node list (they carry the pool's label
    as a Ray node resource or label, as the cluster's node types say)."""

    def __init__(self, request_resources: Callable[..., Any] | None = None) -> None:
        if request_resources is None:
            from ray.autoscaler.sdk import request_resources as rr  # the [ray] extra

            request_resources = rr
        self._request = request_resources
        self.wanted: dict[str, int] = {}

    async def request(self, pool: PoolSpec, count: int) -> list[Node]:
        self.wanted[pool.name] = self.wanted.get(pool.name, 0) + count
        self._ask(pool)
        return []

    async def release(self, pool: PoolSpec, names: Sequence[str]) -> None:
        self.wanted[pool.name] = max(0, self.wanted.get(pool.name, 0) - len(names))
        self._ask(pool)

    def _ask(self, pool: PoolSpec) -> None:
        bundle = {"CPU": pool.shape.cpu}
        if pool.shape.memory:
            bundle["memory"] = pool.shape.memory * 1024 * 1024
        self._request(bundles=[dict(bundle) for _ in range(self.wanted[pool.name])])


@dataclass
class _Pool:
    spec: PoolSpec
    made: set[str] = field(default_factory=set)  # nodes the provider made (releasable)
    coming: int = 0  # nodes asked for, not joined yet
    idle_since: dict[str, float] = field(default_factory=dict)
    asking: bool = False


class ElasticPools:
    def __init__(
        self,
        ledger: Ledger,
        runner: JobRunner,
        services: ServiceSupervisor,
        provider: Provider,
        pools: Sequence[PoolSpec],
        *,
        period: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        record: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.runner = runner
        self.services = services
        self.provider = provider
        self.pools = {p.name: _Pool(p) for p in pools}
        self.period = period
        self.clock = clock
        self.record = record or (lambda ev: None)
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Future[Any]] = set()
        self.high_water: dict[str, int] = dict.fromkeys(self.pools, 0)  # most nodes at once

    def start(self) -> None:
        async def loop() -> None:
            while True:
                try:
                    await self.tick()
                except Exception:
                    log.exception("elastic pools: a pass failed")
                await asyncio.sleep(self.period)

        self._task = asyncio.ensure_future(loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for j in list(self._jobs):
            j.cancel()

    def nodes_of(self, pool: str) -> list[Node]:
        return [n for n in self.ledger.nodes if n.pool == pool and not n.down]

    def waiting_cpus(self, pool: str) -> float:
        """The cpus of the queued units and pending replicas that ask for ``pool``."""
        want = 0.0
        for owners in self.runner._queue.values():
            for q in owners.values():
                for u in q:
                    if u.state != QUEUED or u.deps or u.job.stopping:
                        continue
                    s = u.job.units.spec(u.idx)
                    if any(c.attribute == "pool" and c.value == pool for c in s.constraints):
                        want += s.wants.cpu
        for svc in self.services.services.values():
            if svc.spec.placement.pool != pool:
                continue
            for r in svc.members.values():
                if r.state == PENDING:
                    want += max(svc.versions[r.version].placement.wants.cpu, 1.0)
        return want

    async def tick(self) -> None:
        """One pass over every pool (see the module doc)."""
        now = self.clock()
        for p in self.pools.values():
            nodes = self.nodes_of(p.spec.name)
            self.high_water[p.spec.name] = max(self.high_water[p.spec.name], len(nodes))
            self._grow(p, nodes)
            await self._shrink(p, nodes, now)

    def _grow(self, p: _Pool, nodes: list[Node]) -> None:
        if p.asking:
            return
        spec = p.spec
        free = sum(n.cpu - self.ledger.usage.get(n.name, Usage()).cpu
                   for n in nodes if n.schedulable)  # fmt: skip
        need = self.waiting_cpus(spec.name) - free - p.coming * spec.shape.cpu
        count = max(0, math.ceil(need / spec.shape.cpu - 1e-9))
        count = max(count, spec.min - len(nodes) - p.coming)
        count = min(count, spec.max - len(nodes) - p.coming)
        if count <= 0:
            return
        p.asking = True
        p.coming += count
        why = f"{self.waiting_cpus(spec.name):g} cpus wait, {free:g} free"
        self.record({"kind": "pool", "pool": spec.name, "note": f"asking for {count} nodes "
                     f"({why})", "nodes": len(nodes)})  # fmt: skip

        async def ask() -> None:
            try:
                got = await self.provider.request(spec, count)
                for n in got:
                    p.made.add(n.name)
                self._join(got)
                if got:
                    p.coming -= len(got)
            except Exception as e:
                p.coming -= count
                self.record({"kind": "pool", "pool": spec.name, "note": f"request failed: {e}"})
            finally:
                p.asking = False

        job = asyncio.ensure_future(ask())
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    def _join(self, nodes: Sequence[Node]) -> None:
        if nodes:
            self.ledger.add_nodes(nodes)

    async def _shrink(self, p: _Pool, nodes: list[Node], now: float) -> None:
        spec = p.spec
        busy = {n for h in self.ledger.holders() for n in h.nodes}
        keep = len(nodes)
        gone: list[str] = []
        for n in sorted(nodes, key=lambda n: n.name, reverse=True):
            if n.name not in p.made or n.name in busy:
                p.idle_since.pop(n.name, None)
                continue
            since = p.idle_since.setdefault(n.name, now)
            if now - since >= spec.cooldown and keep > spec.min:
                gone.append(n.name)
                keep -= 1
        if not gone:
            return
        for name in gone:
            self.ledger.cordon(name, True)
        await self.provider.release(spec, gone)
        for name in gone:
            self.ledger.remove_node(name)
            p.made.discard(name)
            p.idle_since.pop(name, None)
        self.record({"kind": "pool", "pool": spec.name, "released": gone,
                     "note": f"released {len(gone)} idle nodes (idle {spec.cooldown:g} s)",
                     "nodes": keep})  # fmt: skip
