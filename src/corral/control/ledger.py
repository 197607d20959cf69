"""The ledger: what every node has given out, and the single applier of placements.

How this runs. The control plane owns one ``Ledger``. ``reserve`` takes a snapshot,
asks ``planning.place`` (pure) for a whole-gang placement and commits it only if the
ledger did not change in between (its version); otherwise it places again, a bounded
number of times. So concurrent creations never overcommit a node: one wins, or both
fit, and a loser gets the per-task explanation. ``release`` gives an environment's
resources back when it ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from corral.model.inventory import Node
from corral.model.plan import Plan
from corral.planning.placement import Demand, NoFit, Placement, Request, Snapshot, Usage, place


class PlacementError(Exception):
    """The environment does not fit; ``nofit`` says why, per task."""

    def __init__(self, nofit: NoFit) -> None:
        super().__init__(nofit.message())
        self.nofit = nofit


@dataclass(frozen=True, slots=True)
class Reservation:
    nodes: tuple[str, ...]
    ports: tuple[tuple[int, ...], ...]
    demands: tuple[Demand, ...]


def demands_of(plan: Plan) -> list[Demand]:
    return [Demand(t.path, t.wants, t.constraints) for t in plan.tasks]


class Ledger:
    def __init__(self, nodes: Sequence[Node]) -> None:
        self.nodes = tuple(nodes)
        self.usage: dict[str, Usage] = {}
        self.version = 0
        self._held: dict[str, Reservation] = {}

    def snapshot(self) -> Snapshot:
        return Snapshot(self.nodes, dict(self.usage), self.version)

    def reserve(self, key: str, plan: Plan, *, seed: str, strategy: str = "spread") -> Reservation:
        request = Request(demands_of(plan), strategy)
        for _ in range(5):
            snap = self.snapshot()
            result = place(snap, request, seed=seed)
            if isinstance(result, NoFit):
                raise PlacementError(result)
            if self._commit(key, result, request):
                return self._held[key]
        raise RuntimeError("the ledger kept changing while placing (5 attempts)")

    def _commit(self, key: str, p: Placement, request: Request) -> bool:
        if p.version != self.version:
            return False  # placed against an old snapshot: place again
        self.usage = dict(p.usage)
        self.version += 1
        self._held[key] = Reservation(p.nodes, p.ports, tuple(request.demands))
        return True

    def release(self, key: str) -> None:
        r = self._held.pop(key, None)
        if r is None:
            return
        usage = dict(self.usage)
        for node, ports, d in zip(r.nodes, r.ports, r.demands, strict=True):
            u = usage.get(node, Usage())
            usage[node] = Usage(
                cpu=round(max(0.0, u.cpu - d.wants.cpu), 9),
                memory=max(0, u.memory - d.wants.memory),
                gpu=max(0, u.gpu - d.wants.gpu),
                tasks=max(0, u.tasks - 1),
                ports=u.ports - frozenset(ports),
            )
        self.usage = usage
        self.version += 1

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
