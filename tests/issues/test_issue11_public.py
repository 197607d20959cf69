"""Issue 11: which variables a caller may set. Each test failed before the fix.

Through the server, an operator sets only the variables a workflow declares ``!public``,
with a value of the declared type and, when the workflow lists them, one of its values;
an admin sets any; a viewer validates and renders with public variables only.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from corral.model.plan import PublicVar
from corral.templates.public import bad_values, refusals
from tests.api.server import Server

WORKFLOW = """
name: pub
defaults:
  detector: !public
    value: TST
    type: string
    values: [TST, ITS]
  rate: !public
    value: "50"
    type: number
  qc: !public
    value: "true"
    type: bool
  hosts: !public
    value: '["h1"]'
    type: list
  cmd: /bin/true
  n: "1"
roles:
  - name: "w-{{ h }}"
    for: {range: "{{ hosts }}", var: h}
    task: {load: sleeper}
  - name: "x-{{ i }}"
    for: {begin: "1", end: "{{ n }}", var: i}
    task: {load: sleeper}
"""
SLEEPER = """
name: sleeper
control: {mode: basic}
command: {value: "{{ cmd }}"}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("public")
    wf = tmp / "workflows"
    (wf / "tasks").mkdir(parents=True)
    (wf / "pub.yaml").write_text(WORKFLOW)
    (wf / "tasks" / "sleeper.yaml").write_text(SLEEPER)
    with Server(tmp / "data", "--backend", "sim", "--workflows", str(wf)) as s:
        tokens = {"admin": s.admin}
        with s.client(s.admin) as admin:
            for role in ("operator", "viewer"):
                r = admin.post("/api/tokens", json={"role": role, "name": f"a-{role}"})
                assert r.status_code == 201, r.text
                tokens[role] = r.json()["token"]
        yield s, tokens


def call(s: Server, token: str, path: str, variables: dict[str, str]) -> httpx.Response:
    with s.client(token) as c:
        return c.post(path, json={"workflow": "pub", "vars": variables})


@pytest.mark.parametrize(
    ("variables", "status", "reason"),
    [
        ({"cmd": "/bin/sh"}, 403, "variable 'cmd' is not public in this workflow"),
        ({"environment_id": "x"}, 403, "variable 'environment_id' is not public"),
        # refused before the expansion, which it would break (or make long)
        ({"n": "abc"}, 403, "variable 'n' is not public"),
        ({"hosts": '{"a": 1}'}, 422, "must be a JSON list"),
        ({"detector": "TPC"}, 422, "'TPC' is not one of TST, ITS"),
        ({"rate": "fast"}, 422, "variable 'rate': must be a number"),
        ({"rate": "nan"}, 422, "must be a finite number"),
        ({"qc": "maybe"}, 422, "must be true or false"),
    ],
)
def test_an_operator_sets_public_variables_only(
    server: tuple[Server, dict[str, str]], variables: dict[str, str], status: int, reason: str
) -> None:
    """Not public: 403 (only an admin may); public with a bad value: 422."""
    s, tokens = server
    for who, path in (("operator", "/api/environments"), ("viewer", "/api/workflows/render")):
        r = call(s, tokens[who], path, variables)
        assert r.status_code == status, r.text
        said = [r.json()["detail"]] + [e["message"] for e in r.json().get("errors", [])]
        assert any(reason in m for m in said), said
        offered = "may set only the public variables of this workflow (detector, hosts, qc, rate)"
        assert status != 403 or offered in r.json()["detail"], r.text


def test_public_values_pass_and_an_admin_sets_any(server: tuple[Server, dict[str, str]]) -> None:
    s, tokens = server
    good = {"detector": "ITS", "rate": "2.5", "qc": "no", "hosts": '["h1","h2"]'}
    r = call(s, tokens["operator"], "/api/environments", good)
    assert r.status_code == 201, r.text
    r = call(s, tokens["viewer"], "/api/workflows/render", good)
    assert r.status_code == 200 and len(r.json()["tasks"]) == 3  # 2 hosts, 1 x-
    r = call(s, tokens["viewer"], "/api/workflows/validate", good)
    assert r.status_code == 200 and r.json()["ok"]
    r = call(s, tokens["admin"], "/api/environments", {"cmd": "/bin/true", "rate": "x"})
    assert r.status_code == 201, r.text


def test_refusals_unit() -> None:
    public = [
        PublicVar("d", "A", values=("A", "B")),
        PublicVar("l", "[]", type="list", values=("x", "y")),
        PublicVar("m", "{}", type="map"),
    ]
    good = {"d": "B", "l": '["x","y"]', "m": '{"a":1}'}
    assert refusals(public, good) == [] and bad_values(public, good) == []
    assert bad_values(public, {"l": '["x","z"]'}) == ["variable 'l': 'z' is not one of x, y"]
    assert bad_values(public, {"m": "[]"}) == ["variable 'm': must be a JSON map, not '[]'"]
    assert refusals(public, {"zz": "1"}) == [
        "variable 'zz' is not public in this workflow: only an admin sets it"
    ]
