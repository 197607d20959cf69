"""Issue 14, item 7: the role tree shows every role (the README's example workflow on the
sim backend, through `corral serve`, its API and `corral env show`); and the task query
the GUI pages through (offset/limit, state, role, node, with the total)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.api.server import Server

ON_SIM = {"hosts": '["sim-000"]', "epn_hosts": '["sim-001", "sim-002"]'}


def every_role(plan: dict[str, Any]) -> set[str]:
    """Every role of a rendered plan: the roles of its tasks and calls, and each role
    above them."""
    out: set[str] = set()
    for item in [*plan["tasks"], *plan["calls"]]:
        parts = item["path"].split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, Any]]:
    """A server on the sim backend with the example environment RUNNING."""
    with Server(tmp_path_factory.mktemp("roles") / "data", "--backend", "sim") as s:
        with s.client(s.admin) as c:
            wf = {"workflow": "datataking", "vars": ON_SIM}
            plan = c.post("/api/workflows/render", json=wf).json()
            r = c.post("/api/environments", json=wf)
            assert r.status_code == 201, r.text
            env = r.json()["id"]
            for event in ["DEPLOY", "CONFIGURE", "START_ACTIVITY"]:
                r = c.post(f"/api/environments/{env}/transitions", json={"event": event})
                assert r.status_code == 200, r.text
        yield s, env, plan


def test_the_role_tree_has_every_role(running: tuple[Server, str, Any]) -> None:
    s, env, plan = running
    with s.client(s.admin) as c:
        got = c.get(f"/api/environments/{env}").json()
    rows = {r["path"]: r for r in got["roles"]}
    assert set(rows) == every_role(plan)
    # the two the issue missed: task roles right under the top
    assert rows["datataking.dist"] == {"path": "datataking.dist", "state": "RUNNING", "tasks": 1}
    assert rows["datataking.qc"] == {"path": "datataking.qc", "state": "RUNNING", "tasks": 1}
    # the roles above tasks, as before
    assert rows["datataking"] == {"path": "datataking", "state": "RUNNING", "tasks": 9}
    assert rows["datataking.flp-sim-000"]["tasks"] == 3  # the hook task is not counted
    assert rows["datataking.flp-sim-000.readout"]["state"] == "RUNNING"
    # a hook task's role says the hook's own state; the roles of calls hold no task
    assert rows["datataking.flp-sim-000.log-run"]["tasks"] == 1
    assert rows["datataking.dcs"] == {"path": "datataking.dcs", "state": None, "tasks": 0}
    # depth first (each role right below its parent's other descendants), siblings in the
    # plan's order: the tasks' roles, then the calls'
    paths = [r["path"] for r in got["roles"]]
    assert paths[0] == "datataking"
    for before, p in itertools.pairwise(paths):
        parent = p.rpartition(".")[0]
        assert before == parent or before.startswith(parent + "."), (before, p)
    top = [p for p in paths if p.count(".") == 1]
    assert top == ["datataking.flp-sim-000", "datataking.dist", "datataking.epn-sim-001",
                   "datataking.epn-sim-002", "datataking.qc", "datataking.dcs", "datataking.odc",
                   "datataking.trg"]  # fmt: skip


def test_env_show_lists_every_role(running: tuple[Server, str, Any]) -> None:
    from corral.cli.main import cli

    s, env, plan = running
    result = CliRunner().invoke(
        cli, ["env", "show", env, "--server", s.url, "--token", s.admin, "-o", "json"]
    )
    assert result.exit_code == 0, result.output
    shown = {r["path"] for r in json.loads(result.output)[0]["roles"]}
    assert {"datataking.dist", "datataking.qc"} <= shown
    assert shown == every_role(plan)


def page(c: httpx.Client, env: str, **params: Any) -> tuple[int, list[dict[str, Any]]]:
    r = c.get("/api/tasks", params={"env": env, **params})
    assert r.status_code == 200, r.text
    return int(r.headers["X-Total-Count"]), r.json()


def test_the_task_query_pages_and_filters_by_state_role_and_node(
    running: tuple[Server, str, Any],
) -> None:
    s, env, _ = running
    with s.client(s.admin) as c:
        total, rows = page(c, env)
        assert total == 10 and len(rows) == 10  # 9 processes and the hook task
        total, rows = page(c, env, limit=3, offset=3)
        assert total == 10 and [r["idx"] for r in rows] == [3, 4, 5]
        total, rows = page(c, env, role="datataking.flp-sim-000")
        assert total == 4
        assert all(r["path"].startswith("datataking.flp-sim-000.") for r in rows)
        total, rows = page(c, env, role="datataking.flp-sim")  # a role, not a prefix of one
        assert total == 0 and rows == []
        total, rows = page(c, env, role="datataking.qc")  # a task's own role
        assert [r["path"] for r in rows] == ["datataking.qc"]
        total, rows = page(c, env, role="datataking", state="RUNNING", node="sim-002")
        assert total == len(rows) >= 2
        assert all(r["node"] == "sim-002" and r["state"] == "RUNNING" for r in rows)
        total, rows = page(c, env, role="datataking.epn-sim-002", limit=1)
        assert total == 2 and len(rows) == 1
        # a role names a role of one environment: alone, it is refused
        r = c.get("/api/tasks", params={"role": "datataking.dist"})
        assert r.status_code == 422 and "needs an environment" in r.json()["detail"]
        r = c.get("/api/tasks", params={"state": "RUNNING"})  # every environment's: no total
        assert r.status_code == 200 and len(r.json()) == 9 and "X-Total-Count" not in r.headers
        # an ended environment: from the store, the same answers
        assert c.delete(f"/api/environments/{env}").status_code == 200
        total, rows = page(c, env, role="datataking.flp-sim-000", limit=2)
        assert total == 4 and len(rows) == 2 and rows[0]["state"] == "DONE"
        total, rows = page(c, env, node="sim-002", offset=1)
        assert total == 2 and len(rows) == 1


def test_a_big_tree_lists_the_roles_down_to_where_it_would_pass_1000_rows() -> None:
    """1,200 task roles under 30 node roles: the node roles are listed, each saying how
    many roles it holds; every task is counted in its node's row; the channels between
    the listed roles are counted per pair."""
    from types import SimpleNamespace

    from corral.control.service import MAX_ROLE_ROWS, RoleTree
    from corral.templates import DictSources, expand

    files = {
        "wf.yaml": """
name: wf
roles:
  - name: "n{{ h }}"
    for: {begin: "1", end: "30", var: h}
    roles:
      - name: "p{{ i }}"
        for: {begin: "1", end: "40", var: i}
        connect: [{name: in, type: pull, target: "::out"}]
        task: {load: proc, critical: false}
  - name: src
    task: {load: src}
""",
        "tasks/proc.yaml": "name: proc\ncontrol: {mode: direct}\ncommand: {value: /bin/true}\n",
        "tasks/src.yaml": "name: src\ncontrol: {mode: direct}\ncommand: {value: /bin/true}\n"
        "bind: [{name: out, type: push, addressing: tcp, global: out}]\n",
    }
    plan = expand("wf.yaml", DictSources(files))
    assert len(plan.tasks) == 1201 > MAX_ROLE_ROWS
    tree = RoleTree(plan)
    tasks = [
        SimpleNamespace(spec=s, hook=False, critical=s.critical, state="RUNNING")
        for s in plan.tasks
    ]
    tasks[5].state = "ERROR"
    rows = tree.rows(tasks)
    assert [r["path"] for r in rows[:3]] == ["wf", "wf.n1", "wf.n2"]
    assert len(rows) == 1 + 30 + 1
    assert rows[0] == {"path": "wf", "state": "RUNNING", "tasks": 1201}  # none critical failed
    assert rows[1] == {"path": "wf.n1", "state": "ERROR", "tasks": 40, "unlisted": 40}
    assert rows[2] == {"path": "wf.n2", "state": "RUNNING", "tasks": 40, "unlisted": 40}
    assert rows[-1] == {"path": "wf.src", "state": "RUNNING", "tasks": 1}
    flows = {(f["from"], f["to"]): (f["channels"], f["types"]) for f in tree.flows}
    assert len(flows) == 30 and flows[("wf.src", "wf.n7")] == (40, ["pull"])
