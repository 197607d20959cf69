"""Fuzz every operation of the OpenAPI schema with hypothesis: no input gives a 5xx."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.server import Server

EXAMPLES = int(os.environ.get("CORRAL_FUZZ_EXAMPLES", "300"))

finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=4),
    max_leaves=12,
)  # fmt: skip
words = st.sampled_from(["hello", "datataking", "DEPLOY", "RUNNING", "take", "release",
                         "viewer", "admin", "TPC", "../x", "", "0", "-1", "9" * 30])  # fmt: skip
texts = words | st.text(max_size=40)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with Server(tmp_path_factory.mktemp("fuzz") / "data", "--backend", "sim") as s:
        with httpx.Client(base_url=s.url) as c:
            s.spec = c.get("/openapi.json").json()  # type: ignore[attr-defined]
        yield s


def bodies(schema_ref: dict[str, Any] | None, spec: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Bodies near the schema (its fields with odd values) and far from it."""
    if schema_ref is None:
        return st.none()
    ref = schema_ref.get("$ref", "")
    schema = spec["components"]["schemas"].get(ref.rsplit("/", 1)[-1], {})
    fields = list(schema.get("properties", {}))
    near = st.fixed_dictionaries({}, optional={f: texts | json_values for f in fields})
    return near | json_values


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_input_gives_a_server_error(server: Server, data: st.DataObject) -> None:
    spec = server.spec  # type: ignore[attr-defined]
    ops = sorted((p, m) for p, item in spec["paths"].items() for m in item)
    path, method = data.draw(st.sampled_from(ops))
    op = spec["paths"][path][method]
    url = path
    params: dict[str, str] = {}
    for param in op.get("parameters", []):
        value = data.draw(texts)
        if param["in"] == "path":
            url = url.replace("{" + param["name"] + "}", quote(value, safe="") or "x")
        elif param["in"] == "query" and data.draw(st.booleans()):
            params[param["name"]] = value
    body_schema = (
        op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    )
    body = data.draw(bodies(body_schema, spec))
    token = data.draw(st.sampled_from([server.admin, None, "nonsense"]))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if path.endswith("/stream"):
        headers["Last-Event-ID"] = data.draw(words)
        params["after"] = "999999999"  # the stream would follow forever: ask for the future
        # the status comes with the headers, sent at once (nothing has to arrive after
        # them); the timeout only ends a server that would hang
        with (
            httpx.Client(base_url=server.url, timeout=60) as c,
            c.stream(method.upper(), url, params=params, headers=headers) as r,
        ):
            assert r.status_code < 500, (method, url, params, r.read())
        return
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.request(method.upper(), url, params=params, json=body, headers=headers)
    assert r.status_code < 500, (method, url, params, body, r.text)
