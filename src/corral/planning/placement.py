"""Placement: which node runs each task. A pure function of a snapshot and a request.

``place(snapshot, request, *, seed)`` returns a ``Placement`` (a node and ports for
every task, and the usage it leads to) or a ``NoFit`` that explains, per task, why it
does not fit. It is a gang decision: every task is placed, or none. The caller (the
applier in control/) commits a placement only against the snapshot it was computed
from, and asks again otherwise, so two placements never overcommit a node.

How it stays fast at 150,000 tasks: tasks with the same constraints share one filtered
candidate list (computed once); each candidate list keeps a lazy heap of its nodes by
preference (spread: most free cpu, then fewest tasks; pack: the fullest that fits),
so a task costs a few heap operations, not a scan of every node. Ties are broken by a
node order derived from the seed: the same seed gives the same placement.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.model.inventory import Node
from corral.model.plan import Constraint, Resources
from corral.model.regex import compile_regex

NO_RESOURCES = Resources()
MAX_REASONS = 1000


@dataclass(frozen=True, slots=True)
class Usage:
    """What is taken on a node: resources, tasks, and the ports given out."""

    cpu: float = 0.0
    memory: int = 0
    gpu: int = 0
    tasks: int = 0
    ports: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class Demand:
    """One task to place. Tasks of one ``group`` go to distinct nodes (anti-affinity)."""

    path: str
    wants: Resources = NO_RESOURCES
    constraints: tuple[Constraint, ...] = ()
    group: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    nodes: tuple[Node, ...]
    used: Mapping[str, Usage] = field(default_factory=dict)
    version: int = 0
    # per node, the port its next search starts from (else its range's first): queued
    # work goes round the range, so a port that something outside took is not given
    # again at once to the replica that just failed on it
    cursors: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Request:
    demands: Sequence[Demand]
    strategy: str = "spread"  # spread | pack


@dataclass(frozen=True, slots=True)
class Placement:
    nodes: tuple[str, ...]  # per demand, in order
    ports: tuple[tuple[int, ...], ...]  # per demand
    usage: Mapping[str, Usage]  # every node's usage once this placement is applied
    version: int  # the snapshot's version it was computed from


@dataclass(frozen=True, slots=True)
class NoFit:
    reasons: tuple[tuple[str, str], ...]  # (task path, why), at most MAX_REASONS
    failed: int  # how many tasks did not fit

    def message(self, limit: int = 5) -> str:
        lines = [f"{path}: {why}" for path, why in self.reasons[:limit]]
        more = self.failed - len(lines)
        if more > 0:
            lines.append(f"... and {more} more tasks")
        return f"{self.failed} tasks do not fit:\n  " + "\n  ".join(lines)


def matches(node: Node, c: Constraint) -> bool:
    """Does the node satisfy the constraint (equals, regex, or in a comma list)?"""
    value = node.label(c.attribute)
    if value is None:
        return False
    if c.operator == "equals":
        return value == c.value
    if c.operator == "regex":
        return _regex(c.value).fullmatch(value) is not None
    if c.operator == "in":
        return value in {v.strip() for v in c.value.split(",")}
    return False


_REGEX_CACHE: dict[str, Any] = {}
_REGEX_CACHE_SIZE = 1024  # patterns may come from callers: the cache is bounded


class _Never:
    """A broken pattern: matches nothing."""

    def fullmatch(self, value: str) -> None:
        return None


def _regex(pattern: str) -> Any:
    """The compiled pattern, in RE2: linear time in the value, whatever the pattern (a
    caller's pattern cannot backtrack for minutes on the loop that places tasks)."""
    r = _REGEX_CACHE.get(pattern)
    if r is None:
        if len(_REGEX_CACHE) >= _REGEX_CACHE_SIZE:
            _REGEX_CACHE.clear()
        r = compile_regex(pattern)
        _REGEX_CACHE[pattern] = _Never() if r is None else r
        r = _REGEX_CACHE[pattern]
    return r


def describe(c: Constraint) -> str:
    op = {"equals": "=", "regex": "~", "in": " in "}.get(c.operator, f" {c.operator} ")
    return f"{c.attribute}{op}{c.value}"


class _State:
    """Mutable free resources of every node during one placement."""

    def __init__(self, snapshot: Snapshot, seed: str) -> None:
        self.nodes = snapshot.nodes
        n = len(self.nodes)
        self.order = _seeded_order(self.nodes, seed)
        self.cpu = [0.0] * n
        self.mem = [0] * n
        self.gpu = [0] * n
        self.tasks = [0] * n
        self.ports: list[set[int] | None] = [None] * n  # taken ports, copied on first use
        self.port_cursor = [0] * n
        self.base = [snapshot.used.get(node.name, Usage()) for node in self.nodes]
        for i, node in enumerate(self.nodes):
            u = self.base[i]
            self.cpu[i] = node.cpu - u.cpu
            self.mem[i] = node.memory - u.memory
            self.gpu[i] = node.gpu - u.gpu
            self.tasks[i] = u.tasks
            lo, hi = node.ports
            at = snapshot.cursors.get(node.name, lo)
            self.port_cursor[i] = at if lo <= at <= hi else lo

    def free_ports(self, i: int) -> int:
        taken = self.ports[i]
        used = taken if taken is not None else self.base[i].ports
        return self.nodes[i].port_count - len(used)

    def fits(self, i: int, w: Resources) -> bool:
        return (
            self.cpu[i] + 1e-9 >= w.cpu
            and self.mem[i] >= w.memory
            and self.gpu[i] >= w.gpu
            and (w.ports == 0 or self.free_ports(i) >= w.ports)
        )

    def take(self, i: int, w: Resources) -> tuple[int, ...]:
        self.cpu[i] -= w.cpu
        self.mem[i] -= w.memory
        self.gpu[i] -= w.gpu
        self.tasks[i] += 1
        if not w.ports:
            return ()
        taken = self.ports[i]
        if taken is None:
            taken = self.ports[i] = set(self.base[i].ports)
        lo, hi = self.nodes[i].ports
        out: list[int] = []
        p = self.port_cursor[i]
        while len(out) < w.ports:
            if p > hi:
                p = lo
            if p not in taken:
                taken.add(p)
                out.append(p)
            p += 1
        self.port_cursor[i] = p
        return tuple(out)

    def cursors(self) -> dict[str, int]:
        """Where each node's next port search starts (the nodes that gave ports)."""
        return {node.name: self.port_cursor[i] for i, node in enumerate(self.nodes)
                if self.ports[i] is not None}  # fmt: skip

    def usage(self) -> dict[str, Usage]:
        out = {}
        for i, node in enumerate(self.nodes):
            taken = self.ports[i]
            out[node.name] = Usage(
                cpu=round(node.cpu - self.cpu[i], 9),
                memory=node.memory - self.mem[i],
                gpu=node.gpu - self.gpu[i],
                tasks=self.tasks[i],
                ports=self.base[i].ports if taken is None else frozenset(taken),
            )
        return out


class _Candidates:
    """The nodes one constraint set allows, with a lazy heap by preference.

    The heap holds one live entry per node (older ones are dropped when they surface,
    by their version); an entry whose key went out of date because another candidate
    list used the node is re-keyed in place.
    """

    __slots__ = ("heap", "nodes", "pack", "version")

    def __init__(self, nodes: list[int], st: _State, pack: bool) -> None:
        self.nodes = nodes
        self.pack = pack
        self.version = dict.fromkeys(nodes, 0)
        self.heap = [(*self._key(i, st), i, 0) for i in nodes]
        heapq.heapify(self.heap)

    def _key(self, i: int, st: _State) -> tuple[float, int, int]:
        if self.pack:  # the fullest node first: least free cpu, most tasks
            return (st.cpu[i], -st.tasks[i], st.order[i])
        return (-st.cpu[i], st.tasks[i], st.order[i])  # spread: most free, fewest tasks

    def choose(self, st: _State, w: Resources, avoid: set[int] | None) -> int | None:
        """The preferred node that fits; None if none does."""
        skipped = []
        found = None
        heap = self.heap
        while heap:
            k0, k1, k2, i, ver = heap[0]
            if ver != self.version[i]:
                heapq.heappop(heap)  # superseded by a newer entry
                continue
            current = self._key(i, st)
            if current != (k0, k1, k2):  # another candidate list used this node
                heapq.heapreplace(heap, (*current, i, ver))
                continue
            if (avoid is None or i not in avoid) and st.fits(i, w):
                found = i
                break
            skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def update(self, i: int, st: _State) -> None:
        ver = self.version[i] + 1
        self.version[i] = ver
        heapq.heappush(self.heap, (*self._key(i, st), i, ver))


def _seeded_order(nodes: Sequence[Node], seed: str) -> list[int]:
    ranked = sorted(
        range(len(nodes)),
        key=lambda i: hashlib.blake2b(f"{seed}\0{nodes[i].name}".encode(), digest_size=8).digest(),
    )
    order = [0] * len(nodes)
    for rank, i in enumerate(ranked):
        order[i] = rank
    return order


def place(snapshot: Snapshot, request: Request, *, seed: str = "0") -> Placement | NoFit:
    """Place every demand, or explain why not (see the module doc)."""
    st = _State(snapshot, seed)
    pack = request.strategy == "pack"
    by_name = {node.name: i for i, node in enumerate(snapshot.nodes)}
    eligible: dict[tuple[Constraint, ...], _Candidates] = {}
    groups: dict[str, set[int]] = {}
    chosen: list[int] = []
    ports: list[tuple[int, ...]] = []
    reasons: list[tuple[str, str]] = []
    failed = 0
    for d in request.demands:
        cands = eligible.get(d.constraints)
        if cands is None:
            idx = _filter(snapshot.nodes, d.constraints, by_name)
            cands = eligible[d.constraints] = _Candidates(idx, st, pack)
        avoid = groups.get(d.group) if d.group is not None else None
        i = cands.choose(st, d.wants, avoid)
        if i is None:
            failed += 1
            if len(reasons) < MAX_REASONS:
                reasons.append((d.path, _explain(snapshot.nodes, st, d, cands, avoid)))
            chosen.append(-1)
            ports.append(())
            continue
        ports.append(st.take(i, d.wants))
        cands.update(i, st)
        if d.group is not None:
            groups.setdefault(d.group, set()).add(i)
        chosen.append(i)
    if failed:
        return NoFit(tuple(reasons), failed)
    names = tuple(snapshot.nodes[i].name for i in chosen)
    return Placement(names, tuple(ports), st.usage(), snapshot.version)


def _filter(
    nodes: Sequence[Node], constraints: tuple[Constraint, ...], by_name: dict[str, int]
) -> list[int]:
    # a pin to one machine is the common case: no scan
    for c in constraints:
        if c.operator == "equals" and c.attribute in ("machine_id", "hostname"):
            i = by_name.get(c.value)
            if i is None:
                return []
            node = nodes[i]
            ok = node.schedulable and all(matches(node, x) for x in constraints)
            return [i] if ok else []
    return [
        i
        for i, node in enumerate(nodes)
        if node.schedulable and all(matches(node, c) for c in constraints)
    ]


def _explain(
    nodes: Sequence[Node], st: _State, d: Demand, cands: _Candidates, avoid: set[int] | None
) -> str:
    where = " and ".join(describe(c) for c in d.constraints) or "any labels"
    w = d.wants
    need = _resources(w.cpu, w.memory, w.gpu, w.ports)
    if not cands.nodes:
        off = [
            f"{n.name} {'down' if n.down else 'cordoned'}"
            for n in nodes
            if not n.schedulable and all(matches(n, c) for c in d.constraints)
        ]
        if off:
            return f"no schedulable node with {where}: {', '.join(off[:5])}"
        return f"no node with {where}"
    if avoid and all(i in avoid for i in cands.nodes):
        return (
            f"all {len(cands.nodes)} nodes with {where} already run a task of "
            f"{d.group} (anti-affinity)"
        )

    best = _closest(st, cands.nodes, w)
    have = _resources(st.cpu[best], st.mem[best], st.gpu[best], st.free_ports(best), like=w)
    node, base = nodes[best], st.base[best]
    before = _resources(
        node.cpu - base.cpu,
        node.memory - base.memory,
        node.gpu - base.gpu,
        node.port_count - len(base.ports),
        like=w,
    )
    also = f" ({before} before this environment's other tasks)" if before != have else ""
    return f"no node with {where} and {need} free; closest: {node.name} has {have} free{also}"


def _closest(st: _State, candidates: Sequence[int], w: Resources) -> int:
    """The candidate node that misses the least of what ``w`` asks (relative)."""

    def shortfall(i: int) -> float:
        gaps = [
            (w.cpu - st.cpu[i]) / w.cpu if w.cpu else 0.0,
            (w.memory - st.mem[i]) / w.memory if w.memory else 0.0,
            (w.gpu - st.gpu[i]) / w.gpu if w.gpu else 0.0,
            (w.ports - st.free_ports(i)) / w.ports if w.ports else 0.0,
        ]
        return max(gaps)

    return min(candidates, key=lambda i: (shortfall(i), st.order[i]))


def _resources(cpu: float, memory: int, gpu: int, ports: int, like: Resources | None = None) -> str:
    """'4 cpus, 512 MB'; with ``like``, the kinds that one asks for (cpus always)."""
    want = like or Resources(cpu, memory, gpu, ports)
    parts = [f"{cpu:g} cpus"]
    if want.memory:
        parts.append(f"{memory} MB")
    if want.gpu:
        parts.append(f"{gpu} gpus")
    if want.ports:
        parts.append(f"{ports} ports")
    return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class EachPlacement:
    """Independent placements (a queue of batch work, not a gang): per demand, its node
    (None: it waits) and ports, and why each one that waits does not fit."""

    nodes: tuple[str | None, ...]
    ports: tuple[tuple[int, ...], ...]
    waiting: Mapping[int, str]  # demand position -> why it does not fit now
    usage: Mapping[str, Usage]
    version: int
    cursors: Mapping[str, int] = field(default_factory=dict)  # (see Snapshot)


def place_each(
    snapshot: Snapshot, demands: Sequence[Demand], *, seed: str = "0", strategy: str = "spread"
) -> EachPlacement:
    """Place each demand on its own, in order, where it fits now; the others wait.

    Once a shape (constraints, resources, group) fails, later demands of the same shape
    are not tried again in this pass (nothing was freed meanwhile): a long queue of one
    array job costs one failed search, not one per instance."""
    st = _State(snapshot, seed)
    pack = strategy == "pack"
    by_name = {node.name: i for i, node in enumerate(snapshot.nodes)}
    eligible: dict[tuple[Constraint, ...], _Candidates] = {}
    groups: dict[str, set[int]] = {}
    failed: dict[tuple[tuple[Constraint, ...], Resources, str | None], str] = {}
    nodes: list[str | None] = []
    ports: list[tuple[int, ...]] = []
    waiting: dict[int, str] = {}
    for pos, d in enumerate(demands):
        shape = (d.constraints, d.wants, d.group)
        why = failed.get(shape)
        if why is None:
            cands = eligible.get(d.constraints)
            if cands is None:
                idx = _filter(snapshot.nodes, d.constraints, by_name)
                cands = eligible[d.constraints] = _Candidates(idx, st, pack)
            avoid = groups.get(d.group) if d.group is not None else None
            i = cands.choose(st, d.wants, avoid)
            if i is not None:
                ports.append(st.take(i, d.wants))
                cands.update(i, st)
                if d.group is not None:
                    groups.setdefault(d.group, set()).add(i)
                nodes.append(snapshot.nodes[i].name)
                continue
            why = failed[shape] = _waiting(snapshot.nodes, st, d, cands, avoid)
        waiting[pos] = why
        nodes.append(None)
        ports.append(())
    return EachPlacement(
        tuple(nodes), tuple(ports), waiting, st.usage(), snapshot.version, st.cursors()
    )


def _waiting(
    nodes: Sequence[Node], st: _State, d: Demand, cands: _Candidates, avoid: set[int] | None
) -> str:
    """Why a queued demand waits, short: ``12 cpus needed, 4 free (on n1)``."""
    if not cands.nodes or (avoid and all(i in avoid for i in cands.nodes)):
        return _explain(nodes, st, d, cands, avoid)
    w = d.wants
    best = _closest(st, cands.nodes, w)
    need = _resources(w.cpu, w.memory, w.gpu, w.ports)
    have = _resources(st.cpu[best], st.mem[best], st.gpu[best], st.free_ports(best), like=w)
    more = "" if len(cands.nodes) == 1 else f", the closest of {len(cands.nodes)} nodes"
    return f"{need} needed, {have} free on {nodes[best].name}{more}"
