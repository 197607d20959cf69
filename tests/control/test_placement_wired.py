"""Placement wired into environment creation: the ledger as single applier, inventories."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from corral.control.ledger import Ledger, PlacementError
from corral.model.inventory import Node
from corral.model.plan import Resources
from corral.planning.placement import Demand, Request, place
from corral.store.inventory import InventoryError, load_inventory
from corral.templates import DictSources, expand
from tests.api.server import Server

BIG = """
name: big
roles:
  - name: w-{{ i }}
    for: {begin: "1", end: "3", var: i}
    task: {load: worker}
"""
WORKER = """
name: worker
control: {mode: basic}
wants: {cpu: 1, memory: 100}
command: {value: /bin/sleep, arguments: ["60"]}
"""


def big_plan() -> object:
    return expand("wf.yaml", DictSources({"wf.yaml": BIG, "tasks/worker.yaml": WORKER}))


def test_the_applier_refuses_a_placement_made_on_an_old_snapshot() -> None:
    ledger = Ledger([Node("n1", cpu=4, memory=1000)])
    stale = ledger.snapshot()
    first = ledger.reserve("a", big_plan(), seed="a")  # type: ignore[arg-type]
    assert first.nodes == ("n1", "n1", "n1")
    # a placement computed before that reservation would overcommit: it is refused ...
    late = place(stale, Request([Demand(f"t{i}", Resources(cpu=1)) for i in range(3)]))
    assert not ledger._commit("b", late, Request([]))  # type: ignore[arg-type]
    # ... and placing again against the newest state explains why it does not fit
    with pytest.raises(PlacementError) as e:
        ledger.reserve("b", big_plan(), seed="b")  # type: ignore[arg-type]
    assert "closest: n1 has 0 cpus, 600 MB free (1 cpus, 700 MB before this" in str(e.value)
    ledger.release("a")
    assert ledger.reserve("b", big_plan(), seed="b").nodes == ("n1", "n1", "n1")  # type: ignore[arg-type]


def test_inventory_files(tmp_path: Path) -> None:
    inv = tmp_path / "nodes.yaml"
    inv.write_text(
        "nodes:\n  - {name: a, cpu: 4, memory: 100, ports: 100-109, labels: {role: flp}}\n"
        "  - {name: b, cpu: 2, pool: async, cordoned: true}\n"
    )
    a, b = load_inventory(str(inv))
    assert a.port_count == 10 and a.label("role") == "flp" and b.cordoned and b.pool == "async"
    for text, message in [
        ("nodes: [{name: a, cpus: 4}]", "unknown field 'cpus'"),
        ("nodes: [{name: a}, {name: a}]", "appears twice"),
        ("nodes: [{name: a, ports: 10-1}]", "a range like 20000-29999"),
        ("nodes: [{name: a, cpu: -1}]", "must be a number >= 0"),
        ("nodes: {}", "a list `nodes`"),
    ]:
        inv.write_text(text)
        with pytest.raises(InventoryError, match=message):
            load_inventory(str(inv))


def test_two_creations_compete_for_the_same_node(tmp_path: Path) -> None:
    """Two operators create the same 3-cpu environment at once on a 4-cpu farm: exactly
    one wins; the loser is told which task does not fit and why."""
    wf = tmp_path / "wf"
    (wf / "tasks").mkdir(parents=True)
    (wf / "big.yaml").write_text(BIG)
    (wf / "tasks" / "worker.yaml").write_text(WORKER)
    inv = tmp_path / "nodes.yaml"
    inv.write_text("nodes:\n  - {name: n1, cpu: 4, memory: 1000}\n")
    with Server(tmp_path / "data", "--backend", "sim", "--inventory", str(inv),
                "--workflows", str(wf)) as s:  # fmt: skip
        results: list[tuple[int, dict[str, object]]] = []
        barrier = threading.Barrier(2, timeout=60)

        def create() -> None:
            with s.client(s.admin) as c:
                barrier.wait()
                r = c.post("/api/environments", json={"workflow": "big"})
                results.append((r.status_code, r.json()))

        threads = [threading.Thread(target=create) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)  # only stops a hung test
        assert not any(t.is_alive() for t in threads), "a creation never answered"
        codes = sorted(code for code, _ in results)
        assert codes == [201, 409], results
        loser = next(body for code, body in results if code == 409)
        assert loser["title"] == "Does not fit"
        assert "closest: n1 has 0 cpus, 600 MB free (1 cpus, 700 MB before this" in str(
            loser["errors"]
        )
        with s.client(s.admin) as c:
            [n1] = c.get("/api/nodes").json()
            assert n1["allocated"]["cpu"] == 3 and n1["allocated"]["tasks"] == 3
            winner = next(body for code, body in results if code == 201)
            c.delete(f"/api/environments/{winner['id']}")
            [n1] = c.get("/api/nodes").json()
            assert n1["allocated"]["cpu"] == 0  # given back when it ended
