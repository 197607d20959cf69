"""The control plane: environments, one backend, the store and the event bus together.

How this runs. One ``ControlPlane`` per control process, on one asyncio loop. It owns
the backend's report subscription and routes each list of reports to the
environments they concern (task ids are ``<environment id>:<index>``), in one call
per environment. It is the store's single writer, through its environments.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from corral.calls import Registry
from corral.control.environment import Environment
from corral.control.ledger import Ledger, PlacementError, priority_of, strategy_of
from corral.events.bus import EventBus
from corral.model.inventory import Node
from corral.model.plan import Plan
from corral.planning.placement import NoFit
from corral.planning.preemption import PRIORITY_CLASSES
from corral.ports.backend import Backend, Report
from corral.store.sqlite import SqliteStore


def new_environment_id() -> str:
    """A short, unique, URL-safe environment id (AliECS-style: 11 characters)."""
    raw = time.time_ns().to_bytes(8, "big")[-3:] + os.urandom(4)
    return base64.b32encode(raw).decode().rstrip("=").lower()[:11]


def install_child_watcher() -> None:
    """On 3.11, reap asyncio subprocesses through pidfd, not a thread per child.

    Call it from inside the running loop (3.12 and later do this by themselves).
    """
    if sys.version_info < (3, 12):  # pragma: no branch
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.get_event_loop_policy().set_child_watcher(watcher)


class ControlPlane:
    def __init__(
        self,
        store: SqliteStore,
        backend: Backend,
        *,
        calls: Registry | None = None,
        bus: EventBus | None = None,
        log_dir: str | None = None,
        clock: Callable[[], float] = time.time,
        inventory: Sequence[Node] | None = None,
        priority_classes: Mapping[str, int] | None = None,
    ) -> None:
        """``inventory``: the nodes to place on (an inventory file); by default the
        backend's own."""
        self.store = store
        self.backend = backend
        self.calls = calls if calls is not None else Registry()
        self.bus = bus if bus is not None else EventBus()
        self.log_dir = log_dir
        self.clock = clock
        self.environments: dict[str, Environment] = {}
        self.ledger = Ledger(inventory if inventory is not None else backend.nodes())
        known = {n.name for n in self.ledger.nodes}
        for name in json.loads(store.get_meta("cordoned") or "[]"):
            if name in known:  # cordons set through the API outlive a restart
                self.ledger.cordon(name, True)
        self.priority_classes = dict(priority_classes or PRIORITY_CLASSES)
        backend.subscribe(self._on_reports)

    def create(
        self,
        plan: Plan,
        *,
        env_id: str | None = None,
        source: str | None = None,
        timeouts: dict[str, float] | None = None,
        created_by: str | None = None,
    ) -> Environment:
        """Place the plan's tasks (all or none: PlacementError says why not), then
        create the environment in the store."""
        env_id = env_id or new_environment_id()
        _, priority = priority_of(plan, self.priority_classes)
        reservation = self.ledger.reserve(
            env_id, plan, seed=env_id, strategy=strategy_of(plan), priority=priority
        )
        env = Environment(
            env_id,
            plan,
            backend=self.backend,
            store=self.store,
            bus=self.bus,
            calls=self.calls,
            source=source,
            timeouts=timeouts,
            log_dir=self.log_dir,
            clock=self.clock,
            nodes=reservation.nodes,
            ports=reservation.ports,
        )
        env.created_by = created_by
        try:
            env.create()
        except BaseException:
            self.ledger.release(env_id)
            raise
        self.environments[env.id] = env
        return env

    async def create_preempting(
        self,
        plan: Plan,
        *,
        dry_run: bool = False,
        env_id: str | None = None,
        actor: str | None = None,
        **kw: Any,
    ) -> tuple[list[str], Environment | None]:
        """Create the environment, evicting lower-priority environments if it takes that.

        Returns the evicted environment ids and the new environment; with ``dry_run``,
        only what would be evicted (nothing changes). Eviction is per environment: its
        run is stopped and its processes ended with their grace period.
        """
        env_id = env_id or new_environment_id()
        cls, priority = priority_of(plan, self.priority_classes)
        result = self.ledger.preemption(
            plan, seed=env_id, priority=priority, strategy=strategy_of(plan)
        )
        if isinstance(result, NoFit):
            raise PlacementError(result)
        evict = list(result.evict)
        if dry_run:
            return evict, None
        for victim in evict:
            note = f"preempted by {env_id} ({cls} priority)"
            self.bus.publish(
                self.store.add_events(
                    [{"kind": "environment", "env": victim, "note": note, "actor": actor}],
                    self.clock(),
                )
            )
            if victim in self.environments:
                await self.destroy(victim, actor=actor or f"preemption for {env_id}")
        return evict, self.create(plan, env_id=env_id, created_by=actor, **kw)

    def cordon(self, node: str, on: bool = True) -> None:
        """Cordon (or uncordon) a node, and remember it across restarts."""
        self.ledger.cordon(node, on)
        names = sorted(n.name for n in self.ledger.nodes if n.cordoned)
        self.store.set_meta("cordoned", json.dumps(names))

    async def drain(
        self, node: str, *, dry_run: bool = False, actor: str | None = None
    ) -> list[str]:
        """Cordon the node and evict the environments with tasks on it (whole: they are
        gangs). Returns their ids; a dry run changes nothing."""
        victims = self.ledger.holders_on(node)  # KeyError-free: unknown nodes hold nothing
        if node not in {n.name for n in self.ledger.nodes}:
            raise KeyError(node)
        if dry_run:
            return victims
        self.cordon(node, True)
        for victim in victims:
            note = f"evicted: node {node} is drained"
            self.bus.publish(self.store.add_events(
                [{"kind": "environment", "env": victim, "note": note, "actor": actor}],
                self.clock(),
            ))  # fmt: skip
            if victim in self.environments:
                await self.destroy(victim, actor=actor)
        return victims

    async def destroy(self, env_id: str, *, actor: str | None = None) -> None:
        env = self.environments.get(env_id)
        if env is None:
            return
        await env.destroy(actor=actor)
        del self.environments[env_id]
        self.ledger.release(env_id)

    async def adopt_leftovers(self) -> list[str]:
        """At start: what a previous control process left unfinished.

        Re-attaching to running tasks comes later; until then their environments go to
        ERROR, their tasks to LOST, and the processes still running are ended. Returns
        one line per environment saying so.
        """
        notes = []
        for env in self.store.orphans():
            env_id = env["id"]
            pairs = [(f"{env_id}:{t['idx']}", t["pid"]) for t in env["tasks"]]
            ended = await self.backend.end_leftovers(pairs)
            reason = (
                "the control server restarted: its tasks are no longer watched "
                f"(re-attaching comes later); {ended} leftover processes ended"
            )
            ev = {
                "kind": "environment",
                "env": env_id,
                "state": "ERROR",
                "error": reason,
                "transition": "GO_ERROR",
            }
            lost = {
                "kind": "task",
                "env": env_id,
                "state": "LOST",
                "count": len(pairs),
                "tasks": [t["path"] for t in env["tasks"]],
                "reason": reason,
            }
            self.bus.publish(self.store.mark_lost(env_id, reason, self.clock(), [lost, ev]))
            notes.append(f"environment {env_id} ({env['name']}) was {env['state']}: {reason}")
        return notes

    async def close(self) -> None:
        """Destroy every environment, then close the backend."""
        for env_id in list(self.environments):
            await self.destroy(env_id)
        await self.backend.close()

    def _on_reports(self, reports: Sequence[Report]) -> None:
        per: dict[str, list[Report]] = {}
        for r in reports:
            env_id = r.task_id.partition(":")[0]
            per.setdefault(env_id, []).append(r)
        for env_id, rs in per.items():
            env = self.environments.get(env_id)
            if env is not None:
                env.on_reports(rs)
