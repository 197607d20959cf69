"""Placement: examples that read like the docs, and properties that must always hold."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.model.inventory import Node
from corral.model.plan import Constraint, Resources
from corral.planning.placement import (
    Demand,
    NoFit,
    Placement,
    Request,
    Snapshot,
    Usage,
    matches,
    place,
)


def flp(name: str, cpu: float = 8, **kw: object) -> Node:
    return Node(name, cpu=cpu, memory=16_000, ports=(40000, 40009),
                labels=(("role", "flp"), ("detector", "TPC")), **kw)  # type: ignore[arg-type]  # fmt: skip


def epn(name: str) -> Node:
    return Node(name, cpu=64, memory=512_000, gpu=8, labels=(("role", "epn"),), pool="async")


def test_constraints_equal_regex_and_comma_lists() -> None:
    n = flp("flp7")
    assert matches(n, Constraint("role", "flp"))
    assert matches(n, Constraint("machine_id", "flp7"))
    assert matches(n, Constraint("hostname", "flp[0-9]+", "regex"))
    assert not matches(n, Constraint("hostname", "flp", "regex"))  # a whole match
    assert matches(n, Constraint("detector", "ITS, TPC", "in"))
    assert not matches(n, Constraint("detector", "ITS,MCH", "in"))
    assert not matches(n, Constraint("nosuchlabel", "x"))
    assert not matches(n, Constraint("role", "(", "regex"))  # a broken pattern matches nothing


def test_pins_resources_ports_and_spread() -> None:
    nodes = (flp("flp1"), flp("flp2"), epn("epn1"))
    demands = [
        Demand("wf.readout", Resources(cpu=2, ports=2), (Constraint("machine_id", "flp2"),)),
        *(
            Demand(f"wf.proc-{i}", Resources(cpu=1, gpu=1), (Constraint("role", "epn"),))
            for i in range(8)
        ),
        *(Demand(f"wf.mon-{i}", Resources(cpu=1), (Constraint("role", "flp"),)) for i in range(4)),
    ]
    p = place(Snapshot(nodes), Request(demands))
    assert isinstance(p, Placement)
    assert p.nodes[0] == "flp2" and p.ports[0] == (40000, 40001)
    assert set(p.nodes[1:9]) == {"epn1"}
    # spread by free cpu: the readout's 2 cpus on flp2 count, so flp1 takes three monitors
    assert Counter(p.nodes[9:]) == {"flp1": 3, "flp2": 1}
    assert p.usage["flp1"].cpu == p.usage["flp2"].cpu == 3
    assert p.usage["epn1"].gpu == 8 and p.usage["epn1"].tasks == 8


def test_pack_fills_one_node_first() -> None:
    nodes = (flp("a", cpu=4), flp("b", cpu=4))
    p = place(Snapshot(nodes), Request([Demand(f"t{i}", Resources(cpu=1)) for i in range(4)],
                                       strategy="pack"))  # fmt: skip
    assert isinstance(p, Placement) and len(set(p.nodes)) == 1


def test_anti_affinity_within_a_group() -> None:
    nodes = (flp("a"), flp("b"), flp("c"))
    ds = [Demand(f"qc{i}", Resources(cpu=1), group="wf.qc") for i in range(3)]
    p = place(Snapshot(nodes), Request(ds))
    assert isinstance(p, Placement) and sorted(p.nodes) == ["a", "b", "c"]
    nofit = place(Snapshot(nodes), Request([*ds, Demand("qc3", Resources(cpu=1), group="wf.qc")]))
    assert isinstance(nofit, NoFit)
    assert nofit.reasons == (("qc3", "all 3 nodes with any labels already run a task of wf.qc "
                                     "(anti-affinity)"),)  # fmt: skip


def test_no_fit_explains_itself_per_task() -> None:
    nodes = (flp("flp1", cpu=8), flp("flp7", cpu=8), epn("epn1"))
    used = {"flp1": Usage(cpu=7), "flp7": Usage(cpu=6)}
    ds = [
        Demand("wf.big", Resources(cpu=4), (Constraint("role", "flp"),)),
        Demand("wf.ok", Resources(cpu=1), (Constraint("role", "epn"),)),
        Demand("wf.pinned", Resources(cpu=1), (Constraint("machine_id", "flp9"),)),
    ]
    r = place(Snapshot(nodes, used), Request(ds))
    assert isinstance(r, NoFit) and r.failed == 2
    assert dict(r.reasons) == {
        "wf.big": "no node with role=flp and 4 cpus free; closest: flp7 has 2 cpus free",
        "wf.pinned": "no node with machine_id=flp9",
    }
    cordoned = (flp("flp1", cordoned=True),)
    r = place(Snapshot(cordoned), Request([Demand("x", constraints=(Constraint("role", "flp"),))]))
    assert isinstance(r, NoFit) and "flp1 cordoned" in r.reasons[0][1]


# -- properties -------------------------------------------------------------------------------

node_st = st.builds(
    lambda i, cpu, mem, gpu, nports, role: Node(
        f"n{i}", cpu=cpu, memory=mem, gpu=gpu, ports=(30000, 30000 + nports - 1),
        labels=(("role", role),),
    ),
    st.integers(0, 10**6), st.integers(0, 16), st.integers(0, 4096), st.integers(0, 4),
    st.integers(0, 6), st.sampled_from(["flp", "epn", "qc"]),
)  # fmt: skip
nodes_st = st.lists(node_st, min_size=1, max_size=8, unique_by=lambda n: n.name).map(tuple)
constraint_st = st.one_of(
    st.builds(Constraint, st.just("role"), st.sampled_from(["flp", "epn", "qc"])),
    st.builds(Constraint, st.just("role"), st.sampled_from(["flp,epn", "qc, flp"]), st.just("in")),
    st.builds(Constraint, st.just("machine_id"), st.sampled_from(["n1", "n2", "n3"])),
    st.builds(Constraint, st.just("hostname"), st.sampled_from(["n[0-9]", "n1.*"]),
              st.just("regex")),
)  # fmt: skip
demand_st = st.builds(
    Demand,
    st.text("abc", min_size=1, max_size=4),
    st.builds(Resources, st.integers(0, 6).map(float), st.integers(0, 2048), st.integers(0, 2),
              st.integers(0, 3)),
    st.lists(constraint_st, max_size=2).map(tuple),
    st.sampled_from([None, None, "g1", "g2"]),
)  # fmt: skip
request_st = st.builds(Request, st.lists(demand_st, max_size=25),
                       st.sampled_from(["spread", "pack"]))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(nodes_st, request_st, st.text(max_size=3))
def test_never_overcommits_never_violates_a_constraint_and_places_the_whole_gang(
    nodes: tuple[Node, ...], req: Request, seed: str
) -> None:
    r = place(Snapshot(nodes), req, seed=seed)
    by = {n.name: n for n in nodes}
    if isinstance(r, NoFit):
        assert r.failed >= 1 and r.reasons
        return
    assert len(r.nodes) == len(req.demands)  # the whole gang
    total: dict[str, list[float]] = {n.name: [0.0, 0, 0, 0] for n in nodes}
    seen_ports: dict[str, set[int]] = {n.name: set() for n in nodes}
    groups: dict[str, set[str]] = {}
    for d, name, ports in zip(req.demands, r.nodes, r.ports, strict=True):
        node = by[name]
        assert all(matches(node, c) for c in d.constraints)
        t = total[name]
        t[0] += d.wants.cpu
        t[1] += d.wants.memory
        t[2] += d.wants.gpu
        assert len(ports) == d.wants.ports
        for p in ports:
            assert node.ports[0] <= p <= node.ports[1] and p not in seen_ports[name]
            seen_ports[name].add(p)
        if d.group:
            assert name not in groups.setdefault(d.group, set())
            groups[d.group].add(name)
    for name, (cpu, mem, gpu, _) in total.items():
        node = by[name]
        assert cpu <= node.cpu + 1e-9 and mem <= node.memory and gpu <= node.gpu
        assert r.usage[name].ports == frozenset(seen_ports[name])


@settings(max_examples=100, deadline=None)
@given(nodes_st, request_st, st.text(max_size=3))
def test_the_same_seed_gives_the_same_placement(
    nodes: tuple[Node, ...], req: Request, seed: str
) -> None:
    assert place(Snapshot(nodes), req, seed=seed) == place(Snapshot(nodes), req, seed=seed)


@settings(max_examples=100, deadline=None)
@given(nodes_st, request_st, request_st)
def test_placements_applied_in_turn_never_overcommit(
    nodes: tuple[Node, ...], a: Request, b: Request
) -> None:
    """The applier's loop: place A, apply its usage, place B on what is left."""
    first = place(Snapshot(nodes), a)
    used = first.usage if isinstance(first, Placement) else {}
    second = place(Snapshot(nodes, used, version=1), b)
    if isinstance(second, Placement):
        for n in nodes:
            u = second.usage[n.name]
            assert u.cpu <= n.cpu + 1e-9 and u.memory <= n.memory and u.gpu <= n.gpu
            assert len(u.ports) <= n.port_count
