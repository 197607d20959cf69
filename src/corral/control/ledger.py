"""The ledger: what every node has given out, and the single applier of placements.

How this runs. The control plane owns one ``Ledger``. ``reserve`` takes a snapshot,
asks ``planning.place`` (pure) for a whole-gang placement and commits it only if the
ledger did not change in between (its version); otherwise it places again, a bounded
number of times. So concurrent creations never overcommit a node: one wins, or both
fit, and a loser gets the per-task explanation. ``release`` gives an environment's
resources back when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import replace

from corral.model.inventory import Node
from corral.model.plan import Plan
from corral.planning.placement import (
    Demand,
    NoFit,
    Placement,
    Request,
    Snapshot,
    Usage,
    place,
    place_each,
)
from corral.planning.preemption import (
    PRIORITY_CLASSES,
    Holder,
    Preemption,
    plan_preemption,
    without,
)
from corral.templates import parse_duration


class PlacementError(Exception):
    """The environment does not fit; ``nofit`` says why, per task."""

    def __init__(self, nofit: NoFit) -> None:
        super().__init__(nofit.message())
        self.nofit = nofit


Reservation = Holder  # what an environment holds: its placed demands and priority


def channel_ports(plan: Plan) -> dict[str, int]:
    """How many ports each task needs for the tcp channels it binds."""
    out: dict[str, int] = {}
    for b in plan.binds:
        if b.addressing == "tcp":
            out[b.task] = out.get(b.task, 0) + 1
    return out


def demands_of(plan: Plan) -> list[Demand]:
    """A demand per task: its resources, plus a port per tcp channel it binds (so that
    channel ports come from the node's range too, and go back with the environment). A
    task property ``anti_affinity`` names its group (tasks of one group go to distinct
    nodes), e.g. ``anti_affinity: "{{ Parent().Path }}"``."""
    binds = channel_ports(plan)
    out = []
    for t in plan.tasks:
        group = None
        for key, value in t.properties:  # the last one wins, as in a dict
            if key == "anti_affinity":
                group = value or None
        wants = t.wants
        if binds.get(t.path):
            wants = replace(wants, ports=wants.ports + binds[t.path])
        out.append(Demand(t.path, wants, t.constraints, group))
    return out


def _setting(plan: Plan, name: str, default: str) -> str:
    public = {p.name: p.value for p in plan.public}
    return plan.variables.get(name, public.get(name, default))


def priority_of(plan: Plan, classes: Mapping[str, int] = PRIORITY_CLASSES) -> tuple[str, int]:
    """The environment's priority class (variable ``priority_class``; default batch)."""
    name = _setting(plan, "priority_class", "batch")
    if name not in classes:
        known = ", ".join(f"{k} ({v})" for k, v in classes.items())
        raise ValueError(f"priority_class {name!r} is not one of {known}")
    return name, classes[name]


MIN_LEASE, MAX_LEASE = 1.0, 1e7  # seconds (as a node agent takes them)


def lease_of(plan: Plan) -> float | None:
    """How long an agent keeps the environment's tasks without a controller (variable
    ``lease``: seconds or a duration like 5m); None: the agent's own lease."""
    value = _setting(plan, "lease", "")
    if not value:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(f"lease {value!r} is not a duration (e.g. 90s, 5m)") from None
    if not seconds <= MAX_LEASE:  # (nan too)
        raise ValueError(f"lease {value!r} is over {MAX_LEASE:g} seconds")
    if seconds < MIN_LEASE:
        raise ValueError(
            f"lease {value!r} is under {MIN_LEASE:g}s: an ordinary pause of the controller "
            "would end the tasks"
        )
    return seconds


def strategy_of(plan: Plan) -> str:
    """How to place (variable ``placement``): spread (the default) or pack."""
    value = _setting(plan, "placement", "spread")
    if value not in ("spread", "pack"):
        raise ValueError(f"placement {value!r} is not spread or pack")
    return value


class Ledger:
    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = tuple(nodes)
        self.usage: dict[str, Usage] = {}
        self.version = 0
        self.cursors: dict[str, int] = {}  # (see Snapshot.cursors; queued work only)
        self._held: dict[str, Reservation] = {}
        self._order = 0
        # called when room may have freed up (a release, an uncordon, new nodes): what
        # waits for room (queued job units, pending replicas) is placed again
        self.on_free: list[Callable[[], None]] = []

    def _freed(self) -> None:
        for listener in self.on_free:
            listener()

    def snapshot(self) -> Snapshot:
        return Snapshot(self.nodes, dict(self.usage), self.version)

    def reserve(
        self, key: str, plan: Plan, *, seed: str, strategy: str = "spread", priority: int = 0
    ) -> Reservation:
        request = Request(demands_of(plan), strategy)
        for _ in range(5):
            snap = self.snapshot()
            result = place(snap, request, seed=seed)
            if isinstance(result, NoFit):
                raise PlacementError(result)
            if self._commit(key, result, request, priority):
                return self._held[key]
        raise RuntimeError("the ledger kept changing while placing (5 attempts)")

    def preemption(
        self,
        plan: Plan,
        *,
        seed: str,
        priority: int,
        strategy: str = "spread",
        protected: Collection[str] = (),
    ) -> Preemption | NoFit:
        """What would have to be evicted for the plan to fit (pure: nothing changes).
        ``protected``: environments never to evict (with what was placed for them since)."""
        request = Request(demands_of(plan), strategy)
        spared = {k for k in self._held if k.partition("/")[0] in protected}
        return plan_preemption(
            self.snapshot(), request, list(self._held.values()), priority=priority, seed=seed,
            protected=spared,
        )  # fmt: skip

    def holders(self) -> list[Reservation]:
        """What each environment holds (and what was placed for it since), oldest first."""
        return sorted(self._held.values(), key=lambda h: h.order)

    def _commit(self, key: str, p: Placement, request: Request, priority: int = 0) -> bool:
        if p.version != self.version:
            return False  # placed against an old snapshot: place again
        self.usage = dict(p.usage)
        self.version += 1
        self._order += 1
        self._held[key] = Holder(
            key, priority, p.nodes, p.ports, tuple(request.demands), order=self._order
        )
        return True

    def hold(
        self,
        key: str,
        plan: Plan,
        nodes: Sequence[str],
        ports: Sequence[tuple[int, ...]],
        *,
        priority: int = 0,
    ) -> Reservation:
        """Book what an environment already holds, where it is (a take-over of running
        tasks): no placement, and nothing refused; an overcommit shows in the table."""
        request = Request(demands_of(plan), "spread")
        self._book(zip(nodes, ports, request.demands, strict=True))
        self._order += 1
        self._held[key] = Holder(key, priority, tuple(nodes), tuple(ports),
                                 tuple(request.demands), order=self._order)  # fmt: skip
        return self._held[key]

    def hold_each(
        self, items: Sequence[tuple[str, str, Demand, tuple[int, ...]]], *, priority: int = 0
    ) -> None:
        """Book what queued work already holds, each (key, node, demand, ports) where it
        runs (units and replicas taken over after a restart): no placement, nothing
        refused. One update for the whole batch."""
        if not items:
            return
        self._book((node, ports, d) for _, node, d, ports in items)
        for key, node, d, ports in items:
            self._order += 1
            self._held[key] = Holder(key, priority, (node,), (ports,), (d,), order=self._order)

    def _book(self, what: Iterable[tuple[str, tuple[int, ...], Demand]]) -> None:
        usage = dict(self.usage)
        for node, p, d in what:
            u = usage.get(node, Usage())
            usage[node] = Usage(
                cpu=round(u.cpu + d.wants.cpu, 9), memory=u.memory + d.wants.memory,
                gpu=u.gpu + d.wants.gpu, tasks=u.tasks + 1, ports=u.ports | frozenset(p),
            )  # fmt: skip
        self.usage = usage
        self.version += 1

    def reserve_more(
        self, key: str, demands: Sequence[Demand], *, seed: str, priority: int = 0
    ) -> Reservation:
        """Place some more tasks for a holder (tasks whose node was lost, relaunched by
        RECOVER): all or none, held with it (released with it)."""
        request = Request(list(demands), "spread")
        n = sum(1 for k in self._held if k.startswith(key + "/")) + 1
        sub = f"{key}/{n}"
        for _ in range(5):
            result = place(self.snapshot(), request, seed=f"{seed}/{n}")
            if isinstance(result, NoFit):
                raise PlacementError(result)
            if self._commit(sub, result, request, priority):
                return self._held[sub]
        raise RuntimeError("the ledger kept changing while placing (5 attempts)")

    def reserve_each(
        self, items: Sequence[tuple[str, Demand]], *, seed: str, priority: int = 0
    ) -> list[Reservation | str]:
        """Place queued work, each item on its own (not a gang): per item, what it now
        holds, or why it waits. One snapshot and one commit for the whole list."""
        if not items:
            return []
        # (queued work's ports go round each node's range: see Snapshot.cursors)
        snap = Snapshot(self.nodes, dict(self.usage), self.version, self.cursors)
        got = place_each(snap, [d for _, d in items], seed=seed)
        self.usage = dict(got.usage)
        self.cursors = {**self.cursors, **got.cursors}
        self.version += 1
        out: list[Reservation | str] = []
        for pos, ((key, demand), node) in enumerate(zip(items, got.nodes, strict=True)):
            if node is None:
                out.append(got.waiting[pos])
                continue
            self._order += 1
            h = Holder(key, priority, (node,), (got.ports[pos],), (demand,), order=self._order)
            self._held[key] = h
            out.append(h)
        return out

    def is_down(self, name: str) -> bool:
        return any(n.name == name and n.down for n in self.nodes)

    def release(self, key: str) -> None:
        """Give back what ``key`` holds (and what was placed for it since)."""
        gone = [self._held.pop(k) for k in list(self._held) if k == key or
                k.startswith(key + "/")]  # fmt: skip
        if not gone:
            return
        self.usage = dict(without(self.snapshot(), gone).used)
        self.version += 1
        self._freed()

    def release_each(self, keys: Collection[str]) -> None:
        """Give back what these queued-work holders hold (exact keys, no sub-holders):
        one update for the whole batch."""
        gone = [h for h in (self._held.pop(k, None) for k in keys) if h is not None]
        if gone:
            self.usage = dict(without(self.snapshot(), gone).used)
            self.version += 1
            self._freed()

    def cordon(self, name: str, on: bool = True) -> None:
        """A cordoned node takes no new tasks; what runs there stays."""
        for i, n in enumerate(self.nodes):
            if n.name == name:
                if n.cordoned != on:
                    nodes = list(self.nodes)
                    nodes[i] = replace(n, cordoned=on)
                    self.nodes = tuple(nodes)
                    self.version += 1
                    if not on:
                        self._freed()
                return
        raise KeyError(name)

    def update_nodes(self, alive: Sequence[Node]) -> None:
        """The backend's nodes changed: new ones join, those it no longer has are down
        (kept for what they held until it is released; nothing new goes there)."""
        by = {n.name: n for n in alive}
        out = []
        for n in self.nodes:
            new = by.pop(n.name, None)
            out.append(replace(n, down=True) if new is None else
                       replace(new, cordoned=n.cordoned, down=False))  # fmt: skip
        out.extend(by.values())
        if tuple(out) != self.nodes:
            self.nodes = tuple(out)
            self.version += 1
            self._freed()

    def add_nodes(self, nodes: Sequence[Node]) -> None:
        """New nodes join (an elastic pool grew); a name already known is replaced."""
        by = {n.name: n for n in nodes}
        kept = [n for n in self.nodes if n.name not in by]
        self.nodes = (*kept, *nodes)
        self.version += 1
        self._freed()

    def remove_node(self, name: str) -> None:
        """Forget a node that holds nothing (an elastic pool gave it back); ValueError
        when something is still placed there."""
        if any(name in h.nodes for h in self._held.values()):
            raise ValueError(f"node {name} still holds work")
        self.nodes = tuple(n for n in self.nodes if n.name != name)
        self.usage.pop(name, None)
        self.version += 1

    def holders_on(self, name: str) -> list[str]:
        """The environments with tasks on this node, oldest first."""
        held = sorted(self._held.values(), key=lambda h: h.order)
        return [h.key for h in held if name in h.nodes]

    def table(self) -> list[dict[str, object]]:
        """Each node's capacity, allocation and labels (for `corral node list`)."""
        out = []
        for n in self.nodes:
            u = self.usage.get(n.name, Usage())
            row = n.to_dict()
            row["allocated"] = {"cpu": u.cpu, "memory": u.memory, "gpu": u.gpu,
                                "ports": len(u.ports), "tasks": u.tasks}  # fmt: skip
            out.append(row)
        return out
