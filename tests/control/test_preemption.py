"""Priorities and preemption: online evicts batch, never the other way; dry runs are true."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.backends.sim import SimBackend
from corral.control.ledger import PlacementError
from corral.control.plane import ControlPlane
from corral.model.inventory import Node
from corral.model.plan import Resources
from corral.planning.placement import Demand, NoFit, Placement, Request, Snapshot, place
from corral.planning.preemption import Holder, Preemption, plan_preemption, without
from corral.store.sqlite import SqliteStore
from corral.templates import DictSources, expand

WF = """
name: "{{ priority_class }}-work"
roles:
  - name: w-{{ i }}
    for: {begin: "1", end: "{{ n }}", var: i}
    task: {load: worker}
"""
WORKER = """
name: worker
control: {mode: direct}
wants: {cpu: 1}
command: {value: /usr/bin/work}
"""


def plan(cls: str, n: int = 3) -> Any:
    return expand("wf.yaml", DictSources({"wf.yaml": WF, "tasks/worker.yaml": WORKER}),
                  variables={"priority_class": cls, "n": str(n)})  # fmt: skip


def run(tmp: Path, body: Any) -> None:
    async def main() -> None:
        store = SqliteStore(str(tmp / "corral.db"))
        plane = ControlPlane(store, SimBackend(["n1"]), inventory=[Node("n1", cpu=4)])
        try:
            await body(plane)
        finally:
            await plane.close()
            store.close()

    asyncio.run(main())


def test_online_evicts_batch_and_the_dry_run_said_so(tmp_path: Path) -> None:
    async def body(plane: ControlPlane) -> None:
        batch = plane.create(plan("batch"))
        for ev in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            await batch.transition(ev)
        with pytest.raises(PlacementError):
            plane.create(plan("online"))  # plain creation never evicts
        evict, none = await plane.create_preempting(plan("online"), dry_run=True)
        assert evict == [batch.id] and none is None
        assert batch.state == "RUNNING"  # a dry run changes nothing
        evicted, online = await plane.create_preempting(plan("online"))
        assert evicted == evict  # what the dry run said is what happened
        assert batch.state == "DONE" and online is not None
        assert plane.ledger.usage["n1"].cpu == 3
        notes = [e for e in plane.store.events(env=batch.id) if "preempted" in e.get("note", "")]
        assert notes and f"preempted by {online.id} (online priority)" == notes[0]["note"]

    run(tmp_path, body)


def test_batch_never_evicts_online(tmp_path: Path) -> None:
    async def body(plane: ControlPlane) -> None:
        online = plane.create(plan("online"))
        with pytest.raises(PlacementError) as e:
            await plane.create_preempting(plan("batch"))
        assert "(1 cpus before this environment" in str(e.value)
        with pytest.raises(PlacementError) as e:
            await plane.create_preempting(plan("async"))
        assert online.state == "STANDBY" and online.id in plane.environments
        with pytest.raises(ValueError, match="priority_class 'urgent'"):
            plane.create(plan("urgent"))

    run(tmp_path, body)


def test_only_what_is_needed_is_evicted(tmp_path: Path) -> None:
    async def body(plane: ControlPlane) -> None:
        a = plane.create(plan("batch", 1))
        b = plane.create(plan("async", 1))
        c = plane.create(plan("batch", 2))
        # 4 cpus taken; online wants 2: the two batch ones go before async, newest first,
        # and the one not needed is given back
        evict, _ = await plane.create_preempting(plan("online", 2), dry_run=True)
        assert evict == [c.id]
        assert {a.id, b.id, c.id} <= set(plane.environments)

    run(tmp_path, body)


# -- the pure part, as a property ---------------------------------------------------------------

holders_st = st.lists(
    st.tuples(st.sampled_from([100, 200, 300]), st.integers(1, 3)), min_size=0, max_size=5
)


@settings(max_examples=200, deadline=None)
@given(holders_st, st.integers(1, 6), st.sampled_from([100, 200, 300]))
def test_preemption_evicts_only_lower_priority_and_never_overcommits(
    held: list[tuple[int, int]], wanted: int, priority: int
) -> None:
    nodes = (Node("a", cpu=4), Node("b", cpu=4))
    snap = Snapshot(nodes)
    holders: list[Holder] = []
    for k, (prio, n) in enumerate(held):
        req = Request([Demand(f"h{k}.{j}", Resources(cpu=1)) for j in range(n)])
        p = place(snap, req)
        if not isinstance(p, Placement):
            continue
        snap = Snapshot(nodes, p.usage, snap.version + 1)
        holders.append(Holder(f"h{k}", prio, p.nodes, p.ports, tuple(req.demands), order=k))
    request = Request([Demand(f"new.{j}", Resources(cpu=1)) for j in range(wanted)])
    r = plan_preemption(snap, request, holders, priority=priority)
    by_key = {h.key: h for h in holders}
    if isinstance(r, NoFit):
        lower = [h for h in holders if h.priority < priority]
        assert isinstance(place(without(snap, lower), request), NoFit)
        return
    assert isinstance(r, Preemption)
    assert all(by_key[k].priority < priority for k in r.evict)
    for n in nodes:  # what the placement leaves used fits, with the evicted ones gone
        assert r.placement.usage[n.name].cpu <= n.cpu + 1e-9
    if r.evict:  # nothing evicted that was not needed: without the last one, no fit
        kept = [by_key[k] for k in r.evict[:-1]]
        assert isinstance(place(without(snap, kept), request), NoFit)


def test_pack_anti_affinity_and_own_priority_classes(tmp_path: Path) -> None:
    wf = """
name: wf
defaults: {placement: spread}
roles:
  - name: w-{{ i }}
    for: {begin: "1", end: "3", var: i}
    task: {load: worker}
"""
    spaced = WORKER.replace("wants: {cpu: 1}", "wants: {cpu: 1}\nproperties: {anti_affinity: ws}")

    def p(cls: str, placement: str, worker: str = WORKER) -> Any:
        return expand("wf.yaml", DictSources({"wf.yaml": wf, "tasks/worker.yaml": worker}),
                      variables={"priority_class": cls, "placement": placement})  # fmt: skip

    async def main() -> None:
        store = SqliteStore(str(tmp_path / "corral.db"))
        nodes = [Node(f"n{i}", cpu=4) for i in range(3)]
        plane = ControlPlane(store, SimBackend(["n0", "n1", "n2"]), inventory=nodes,
                             priority_classes={"urgent": 10, "batch": 1})  # fmt: skip
        try:
            packed = plane.create(p("batch", "pack"))
            assert len({t.node for t in packed.tasks}) == 1
            spread = plane.create(p("batch", "spread", spaced))
            assert len({t.node for t in spread.tasks}) == 3  # one per node: anti-affinity
            with pytest.raises(ValueError, match="priority_class 'online'"):
                plane.create(p("online", "spread"))  # not one of this server's classes
            with pytest.raises(ValueError, match="placement 'fill'"):
                plane.create(p("batch", "fill"))
            # urgent wants 3 tasks on distinct nodes; the packed node is full: evicting the
            # newest batch environment (spread) is enough
            evict, _ = await plane.create_preempting(p("urgent", "pack", spaced), dry_run=True)
            assert evict == [spread.id]
        finally:
            await plane.close()
            store.close()

    asyncio.run(main())
