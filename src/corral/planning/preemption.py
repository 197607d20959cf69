"""Preemption: which lower-priority work to evict so that a request fits. Pure.

``plan_preemption(snapshot, request, holders, priority=..., seed=..., protected=...)``
evicts nothing when the request fits as it is. Otherwise it evicts holders of strictly
lower priority, lowest first (and, at one priority, the newest first), until the
request fits; then it gives back every evicted holder that turns out not to be needed.
Holders whose key is in ``protected`` (the caller decides which: e.g. environments on
another user's locked detector) are never evicted. The result is the eviction list and
the placement that follows it, or a NoFit when even evicting all the lower-priority work
that may be evicted leaves no room. A dry run is this function alone: what it says is
what the applier then does.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from corral.planning.placement import (
    Demand,
    NoFit,
    Placement,
    Request,
    Snapshot,
    Usage,
    place,
)

PRIORITY_CLASSES: Mapping[str, int] = {"online": 300, "async": 200, "batch": 100}


@dataclass(frozen=True, slots=True)
class Holder:
    """Work that holds resources: an environment's placed demands, with its priority."""

    key: str
    priority: int
    nodes: tuple[str, ...]
    ports: tuple[tuple[int, ...], ...]
    demands: tuple[Demand, ...]
    order: int = 0  # when it was placed: higher is newer


@dataclass(frozen=True, slots=True)
class Preemption:
    evict: tuple[str, ...]  # holder keys, in the order they are evicted
    placement: Placement


def without(snapshot: Snapshot, holders: Sequence[Holder]) -> Snapshot:
    """The snapshot as if these holders had given their resources back."""
    usage = dict(snapshot.used)
    for h in holders:
        for node, ports, d in zip(h.nodes, h.ports, h.demands, strict=True):
            u = usage.get(node, Usage())
            usage[node] = Usage(
                cpu=round(max(0.0, u.cpu - d.wants.cpu), 9),
                memory=max(0, u.memory - d.wants.memory),
                gpu=max(0, u.gpu - d.wants.gpu),
                tasks=max(0, u.tasks - 1),
                ports=u.ports - frozenset(ports),
            )
    return Snapshot(snapshot.nodes, usage, snapshot.version)


def plan_preemption(
    snapshot: Snapshot,
    request: Request,
    holders: Sequence[Holder],
    *,
    priority: int,
    seed: str = "0",
    protected: Collection[str] = (),
) -> Preemption | NoFit:
    first = place(snapshot, request, seed=seed)
    if isinstance(first, Placement):
        return Preemption((), first)
    below = [h for h in holders if h.priority < priority]
    lower = sorted((h for h in below if h.key not in protected),
                   key=lambda h: (h.priority, -h.order, h.key))  # fmt: skip
    kept = len(below) - len(lower)
    spared = f"; {kept} more protected from eviction" if kept else ""
    evicted: list[Holder] = []
    fitted: Placement | None = None
    for h in lower:
        evicted.append(h)
        result = place(without(snapshot, evicted), request, seed=seed)
        if isinstance(result, Placement):
            fitted = result
            break
    if fitted is None:
        if not lower:
            if not kept:
                return first
            note = f" (no lower-priority environment may be evicted: {kept} protected)"
            return NoFit(tuple((path, why + note) for path, why in first.reasons), first.failed)
        last = place(without(snapshot, lower), request, seed=seed)
        assert isinstance(last, NoFit)  # it did not fit with every one of them evicted
        note = f" (even with all {len(lower)} lower-priority environments evicted{spared})"
        return NoFit(tuple((path, why + note) for path, why in last.reasons), last.failed)
    # give back what is not needed, newest-evicted first
    for h in list(reversed(evicted[:-1])):
        trial = [x for x in evicted if x is not h]
        result = place(without(snapshot, trial), request, seed=seed)
        if isinstance(result, Placement):
            evicted = trial
            fitted = result
    return Preemption(tuple(h.key for h in evicted), fitted)
