"""A schema-driven fuzz of the HTTP API with schemathesis, as each role, against a real
``corral serve --backend sim``.

- ``test_each_operation_as_each_role``: every operation of ``/openapi.json``, as a
  viewer, an operator and an admin (schemathesis' examples, coverage and fuzzing
  phases). The examples are the document's own, plus the ids of a few environments,
  tasks and a token made for the run, so that the examples reach real things.
- ``test_create_control_destroy_in_parallel``: the state machine schemathesis builds
  from the document's links (create an environment, follow its id to transitions, its
  tasks, destroy...), as an operator and as an admin, while more threads
  (``CORRAL_SCHEMATHESIS_THREADS``, default 2) send transitions and destroys of the
  same environments at once.

Every answer is checked: no 5xx, the status and body as documented, and nothing that
the role may not do (``verdict``); afterwards, what the store recorded agrees. The
figures of each run (requests, environments created, transitions, tasks reached) are
counted, asserted (so that a run of 404s only fails) and printed (``pytest -s``).

``CORRAL_SCHEMATHESIS_EXAMPLES`` (default 20, about a minute on two cores): the
examples of each operation for each role (schemathesis' coverage phase adds its own
few dozen), and a third of the scenarios of each state machine (of ``STEPS`` steps at
most). The seed is fixed (``CORRAL_SCHEMATHESIS_SEED``; schemathesis derives each
operation's from it, the state machines start from it). ``CORRAL_SCHEMATHESIS_TRACE``
prints the state machines' steps.
"""

from __future__ import annotations

import copy
import os
import queue
import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, seed, settings
from hypothesis.errors import Flaky
from schemathesis import Case
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.server import Server

PROBLEM = "application/problem+json"

EXAMPLES = int(os.environ.get("CORRAL_SCHEMATHESIS_EXAMPLES", "20"))
SEED = int(os.environ.get("CORRAL_SCHEMATHESIS_SEED", "20261201"))
TRACE = bool(os.environ.get("CORRAL_SCHEMATHESIS_TRACE"))  # print the state machines' steps
STEPS = 10  # steps of a state machine's scenario at most
SCENARIOS = 3 * EXAMPLES  # of each state machine run
THREADS = int(os.environ.get("CORRAL_SCHEMATHESIS_THREADS", "2"))  # beside each state machine
# how long each call to a simulated node takes (s): transitions that last a while overlap
LATENCY = os.environ.get("CORRAL_SCHEMATHESIS_SIM_LATENCY", "0.005")
ROLES = ("viewer", "operator", "admin")
RANKS = ("nobody", *ROLES)  # "nobody": no token, or an unknown one
STREAM = "/api/events/stream"

# Who may do what (docs/api.md, "Endpoints"): the least role of each operation. A new
# operation must be added here (test_the_document fails until it is).
NEEDS = {
    ("GET", "/api/whoami"): "viewer",
    ("GET", "/api/workflows"): "viewer",
    ("GET", "/api/workflows/{name}"): "viewer",
    ("POST", "/api/workflows/validate"): "viewer",  # reads only
    ("POST", "/api/workflows/render"): "viewer",  # reads only
    ("GET", "/api/config"): "viewer",
    ("GET", "/api/job-files"): "viewer",
    ("POST", "/api/jobs"): "operator",
    ("GET", "/api/jobs"): "viewer",
    ("GET", "/api/jobs/{job_id}"): "viewer",
    ("DELETE", "/api/jobs/{job_id}"): "operator",
    ("POST", "/api/jobs/{job_id}/resume"): "operator",
    ("GET", "/api/jobs/{job_id}/log"): "viewer",
    ("GET", "/api/services"): "viewer",
    ("GET", "/api/services/{name}"): "viewer",
    ("GET", "/api/services/{name}/log"): "viewer",
    ("POST", "/api/services/{name}/scale"): "operator",
    ("DELETE", "/api/services/{name}"): "operator",
    ("GET", "/api/catalog"): "viewer",
    ("GET", "/api/periodic"): "viewer",
    ("DELETE", "/api/periodic/{name}"): "operator",
    ("GET", "/api/catalog/{name}"): "viewer",
    ("GET", "/api/sd/prometheus"): "viewer",
    ("GET", "/api/sd/traefik"): "viewer",
    ("GET", "/api/secrets"): "admin",
    ("PUT", "/api/secrets/{name}"): "admin",
    ("DELETE", "/api/secrets/{name}"): "admin",
    ("POST", "/api/config/render"): "viewer",  # reads only
    ("GET", "/api/config/{key}"): "viewer",
    ("PUT", "/api/config/{key}"): "admin",
    ("GET", "/api/config-history/{key}"): "viewer",
    ("GET", "/api/runtime/{component}/{key}"): "viewer",
    ("PUT", "/api/runtime/{component}/{key}"): "admin",
    ("POST", "/api/environments"): "operator",
    ("GET", "/api/environments"): "viewer",
    ("GET", "/api/environments/{env_id}"): "viewer",
    ("POST", "/api/environments/{env_id}/transitions"): "operator",
    ("DELETE", "/api/environments/{env_id}"): "operator",
    ("GET", "/api/tasks"): "viewer",
    ("GET", "/api/tasks/{task_id}"): "viewer",
    ("GET", "/api/tasks/{task_id}/log"): "viewer",
    ("GET", "/api/nodes"): "viewer",
    ("POST", "/api/nodes/{name}/cordon"): "admin",
    ("POST", "/api/nodes/{name}/drain"): "admin",
    ("GET", "/api/runs"): "viewer",
    ("GET", "/api/events"): "viewer",
    ("GET", STREAM): "viewer",
    ("GET", "/api/locks"): "viewer",
    ("POST", "/api/locks"): "operator",  # and admin with "force": true
    ("POST", "/api/tokens"): "admin",
    ("GET", "/api/tokens"): "admin",
    ("DELETE", "/api/tokens/{token_id}"): "admin",
    ("GET", "/metrics"): "viewer",
}
EXPANDING = {"/api/workflows/validate", "/api/workflows/render", "/api/environments"}

# Nodes named as the document's examples name them (the local backend's "localhost",
# and examples/inventory's "flp1"), with room for every environment of a run:
# examples/datataking.yaml places its tasks on "localhost" by default.
INVENTORY = """\
nodes:
  - {name: localhost, cpu: 100000, memory: 100000000, ports: 20000-60000}
  - {name: flp1, cpu: 100000, memory: 100000000, ports: 20000-60000}
"""


class Fuzz:
    """The server, its tokens, what the workflows let a non-admin set, and the figures."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = server.url
        self.tokens = {"admin": server.admin}
        self.token_ids: set[str] = set()
        self.public: dict[str, set[str]] = {}
        self.lock = threading.Lock()
        # (test, role, method, path, status) -> requests; test: "property" or "stateful"
        self.counts: Counter[tuple[str, str, str, str, int]] = Counter()
        self.problems: list[str] = []  # found off the main thread

    def client(self, role: str) -> httpx.Client:
        return self.server.client(self.tokens[role])

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def role_of(self, headers: Any) -> str:
        """Whose token a request sent: a role, or "nobody" (none, or not a token of the
        run: schemathesis also tries requests without one)."""
        value = str(headers.get("Authorization", ""))
        for role, token in self.tokens.items():
            if value == f"Bearer {token}":
                return role
        return "nobody"

    def count(self, test: str, role: str, method: str, path: str, status: int) -> None:
        with self.lock:
            self.counts[(test, role, method.upper(), path, status)] += 1

    def figures(self, test: str, role: str) -> dict[str, int]:
        mine = [
            (m, p, s, v) for (t, r, m, p, s), v in self.counts.items() if (t, r) == (test, role)
        ]

        def n(method: str, path: str, ok: Callable[[int], bool] = lambda s: 200 <= s < 300) -> int:
            return sum(v for m, p, s, v in mine if m == method and p == path and ok(s))

        env = "/api/environments/{env_id}"
        return {
            "requests": sum(v for *_, v in mine),
            "2xx": sum(v for _, _, s, v in mine if 200 <= s < 300),
            "403": sum(v for _, _, s, v in mine if s == 403),
            "404": sum(v for _, _, s, v in mine if s == 404),
            "5xx": sum(v for _, _, s, v in mine if s >= 500),
            "environments created": n("POST", "/api/environments", lambda s: s == 201),
            "transitions 2xx": n("POST", env + "/transitions"),
            "transitions 409": n("POST", env + "/transitions", lambda s: s == 409),
            "destroys 2xx": n("DELETE", env),
            "environments read": n("GET", env),
            "task lists": n("GET", "/api/tasks"),
            "tasks read": n("GET", "/api/tasks/{task_id}"),
            "task logs read": n("GET", "/api/tasks/{task_id}/log"),
        }

    def verdict(self, role: str, method: str, path: str, body: Any, status: int) -> None:
        """Fails on a 5xx, and when ``role`` got a 2xx for what it may not do: an
        operation above its role, or what only an admin may do within one (a forced
        lock release; a variable the workflow does not declare ``!public``)."""
        assert status < 500, f"{method} {path} as {role}: {status}"
        if not 200 <= status < 300:
            return
        need = NEEDS[(method, path)]
        if (
            (method, path) == ("POST", "/api/locks")
            and isinstance(body, dict)
            and body.get("force")
        ):
            need = "admin"  # a forced release
        assert RANKS.index(role) >= RANKS.index(need), (
            f"{method} {path} answered {status} to a {role}; it needs {need}: {body!r}"
        )
        if role != "admin" and path in EXPANDING and method == "POST" and isinstance(body, dict):
            variables = body.get("vars")
            public = self.public.get(str(body.get("workflow")))
            if isinstance(variables, dict) and public is not None:
                hidden = set(variables) - public
                assert not hidden, (
                    f"{method} {path} answered {status} to a {role} that set the variables "
                    f"{sorted(hidden)}, which the workflow does not declare !public"
                )


def _live_examples(f: Fuzz) -> dict[str, list[str]]:
    """Environments (one deployed, one running, one to destroy), their tasks and a
    spare token, made for a run: their ids join the examples of the parameters so
    named (``_with_examples``)."""
    envs = []
    with f.client("admin") as admin:
        for workflow, until in [
            ("hello", "DEPLOY"),
            ("datataking", "START_ACTIVITY"),
            ("hello", ""),
        ]:
            r = admin.post("/api/environments", json={"workflow": workflow})
            assert r.status_code == 201, r.text
            envs.append(r.json()["id"])
            for event in ["DEPLOY", "CONFIGURE", "START_ACTIVITY"] if until else []:
                r = admin.post(f"/api/environments/{envs[-1]}/transitions", json={"event": event})
                assert r.status_code == 200, r.text
                if event == until:
                    break
        tasks = [t["id"] for e in envs for t in admin.get("/api/tasks", params={"env": e}).json()]
        # names are unique among active tokens: one per call
        spare = f"fuzz-spare-{len(envs)}-{os.urandom(3).hex()}"
        r = admin.post("/api/tokens", json={"role": "viewer", "name": spare})
        assert r.status_code == 201, r.text
    return {
        "env_id": envs[:2],
        "doomed": envs[2:],  # the example of DELETE (which would end the others first)
        "env": envs,
        "task_id": tasks[:3],
        "token_id": [r.json()["id"]],
    }


def _with_examples(doc: dict[str, Any], live: dict[str, list[str]]) -> dict[str, Any]:
    """The document with ``live`` added to the examples of the parameters so named."""
    doc = copy.deepcopy(doc)
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                name = param["name"]
                if (method, path) == ("delete", "/api/environments/{env_id}"):
                    name = "doomed"
                values = live.get(name)
                if values:
                    schema = param.setdefault("schema", {})
                    schema["examples"] = [*schema.get("examples", []), *values]
    return doc


def _config(url: str) -> SchemathesisConfig:
    return SchemathesisConfig.from_dict(
        {
            "base-url": url,
            "seed": SEED,
            "generation": {"max-examples": EXAMPLES, "deterministic": True, "database": "none"},
            "suppress-health-check": ["all"],
            "request-timeout": 60,
            "phases": {
                "stateful": {
                    "max-steps": STEPS,
                    # the document's links only, none inferred (GET /api/tokens ->
                    # DELETE /api/tokens/{id} would revoke the run's own tokens)
                    "inference": {"algorithms": []},
                    # valid data (the property tests send invalid data too): the steps
                    # go on from what earlier ones made, rather than from a refusal
                    "generation": {"mode": "positive"},
                }
            },
        }
    )


def _restore(f: Fuzz) -> None:
    """Undo what an admin's fuzz leaves in the way of the next: cordoned nodes, locks."""
    with f.client("admin") as admin:
        for node in admin.get("/api/nodes").json():
            if node["cordoned"]:
                r = admin.post(f"/api/nodes/{node['name']}/cordon", json={"cordoned": False})
                assert r.status_code == 200, r.text
        held = sorted(admin.get("/api/locks").json())
        for i in range(0, len(held), 64):  # at most 64 a request
            body = {"detectors": held[i : i + 64], "action": "release", "force": True}
            r = admin.post("/api/locks", json=body)
            assert r.status_code == 200, r.text


def _actions(f: Fuzz) -> list[dict[str, Any]]:
    """Every stored event, oldest first."""
    out: list[dict[str, Any]] = []
    with f.client("admin") as admin:
        while True:
            after = out[-1]["seq"] if out else 0
            page = admin.get("/api/events", params={"after": after, "limit": 10_000}).json()
            if not page:
                return out
            out += page


def _stray_actions(f: Fuzz) -> list[dict[str, Any]]:
    """What the store says a role did that it may not: anything at all by the viewer;
    tokens, nodes or a forced lock release by the operator."""
    out = []
    for e in _actions(f):
        actor = e.get("actor")
        admin_only = e["kind"] in ("token", "node", "secret") or (
            e["kind"] == "lock" and e.get("forced")
        )
        if actor == "fuzz-viewer" or (actor == "fuzz-operator" and admin_only):
            out.append(e)
    return out


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    (tmp / "inventory.yaml").write_text(INVENTORY)
    args = ("--backend", "sim", "--inventory", str(tmp / "inventory.yaml"),
            "--sim-latency", LATENCY)  # fmt: skip
    with Server(tmp / "data", *args) as server:
        f = Fuzz(server)
        with f.client("admin") as admin:
            for role in ("viewer", "operator"):
                r = admin.post("/api/tokens", json={"role": role, "name": f"fuzz-{role}"})
                assert r.status_code == 201, r.text
                f.tokens[role] = r.json()["token"]
            f.token_ids = {t["id"] for t in admin.get("/api/tokens").json()}
            for w in admin.get("/api/workflows").json():
                public = admin.get(f"/api/workflows/{w['name']}").json()["public"]
                f.public[w["name"]] = {p["name"] for p in public}
        yield f


@pytest.fixture(scope="module")
def served(fuzz: Fuzz) -> dict[str, Any]:
    with httpx.Client(base_url=fuzz.url) as c:
        return dict(c.get("/openapi.json").json())


def nothing_a_role_may_not_do(f: Fuzz) -> Callable[[CheckContext, Response, Case], bool | None]:
    """The check of ``Fuzz.verdict``, for the role whose token the request sent."""

    def check(ctx: CheckContext, response: Response, case: Case) -> bool | None:
        role = f.role_of(response.request.headers)
        f.verdict(role, case.method.upper(), case.path, case.body, response.status_code)
        return None

    check.__name__ = "nothing_a_role_may_not_do"
    return check


def checks(f: Fuzz) -> list[Any]:
    return [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        nothing_a_role_may_not_do(f),
    ]


def _guard(f: Fuzz, case: Case) -> None:
    """The run's own tokens are never revoked (by an id from an example or a link)."""
    params = case.path_parameters or {}
    if case.path == "/api/tokens/{token_id}" and params.get("token_id") in f.token_ids:
        params["token_id"] = "00000000"


# -- the document ------------------------------------------------------------------------------


def test_the_document(fuzz: Fuzz, served: dict[str, Any]) -> None:
    """Valid OpenAPI (schemathesis loads and validates it); every operation has a role
    in NEEDS; every parameter and request body has examples; the links build a state
    machine that starts from creating environments and reaches what they make."""
    schema = schemathesis.openapi.from_url(f"{fuzz.url}/openapi.json", config=_config(fuzz.url))
    schema.validate()
    doc = served
    assert {(m.upper(), p) for p, item in doc["paths"].items() for m in item} == set(NEEDS)
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                assert param["schema"].get("examples"), (method, path, param["name"])
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None:
                name = body["schema"]["$ref"].rsplit("/", 1)[-1]
                assert doc["components"]["schemas"][name].get("examples"), (method, path)
            for status, answer in op["responses"].items():
                types = set(answer.get("content", {}))
                assert not types or (PROBLEM in types) == (status[0] in "45"), (path, status)
    machine = schema.as_state_machine()
    assert {"RANDOM__POST_api_environments", "RANDOM__GET_api_workflows"} <= machine.root_rules
    rules = set(vars(machine))
    for name in [
        "POST_api_environments___201_Deploy__POST_api_environments_env_id_transitions",
        "POST_api_environments___201_Destroy__DELETE_api_environments_env_id_",
        "POST_api_environments___201_Tasks__GET_api_tasks",
        "GET_api_tasks___200_GetTask__GET_api_tasks_task_id_",
        "GET_api_workflows_name___200_CreateEnvironment__POST_api_environments",
        "POST_api_tokens___201_Revoke__DELETE_api_tokens_token_id_",
    ]:
        assert name in rules, name


# -- each operation, as each role ------------------------------------------------------------


@pytest.fixture(params=ROLES)
def role(request: pytest.FixtureRequest, fuzz: Fuzz) -> Iterator[str]:
    yield str(request.param)
    _restore(fuzz)


@pytest.fixture
def api_schema(fuzz: Fuzz, served: dict[str, Any], role: str) -> Any:
    """The served document, with examples that are real for this role's run."""
    doc = _with_examples(served, _live_examples(fuzz))
    return schemathesis.openapi.from_dict(doc, config=_config(fuzz.url))


@pytest.fixture(autouse=True)
def _node_id(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32.5 (``from_fixture``) reads ``Node._nodeid``, which pytest 9
    no longer has: give it the node's id (it only relabels the node with it)."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def _stream(f: Fuzz, role: str, case: Case) -> None:
    """The event stream follows forever: its status comes with the headers, then it
    is closed (the timeout only ends a server that would hang)."""
    kwargs = case.as_transport_kwargs(base_url=f.url, headers=f.auth(role))
    kwargs.pop("timeout", None)
    with requests.request(**kwargs, stream=True, timeout=60) as r:
        status = r.status_code
    f.count("property", role, case.method, case.path, status)
    f.verdict(f.role_of(kwargs.get("headers", {})), case.method.upper(), case.path, None, status)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
def test_each_operation_as_each_role(case: Case, fuzz: Fuzz, role: str) -> None:
    if case.path == STREAM:
        _stream(fuzz, role, case)
        return
    _guard(fuzz, case)
    response = case.call(headers=fuzz.auth(role), timeout=60)
    fuzz.count("property", role, case.method, case.path, response.status_code)
    case.validate_response(response, checks=checks(fuzz), headers=fuzz.auth(role))


def test_the_operations_reached_real_environments_and_tasks(fuzz: Fuzz) -> None:
    """What the roles' runs above did: real environments and tasks, not only 404s;
    and the store shows nothing done by a role that may not do it."""
    if not any(t == "property" for t, *_ in fuzz.counts):
        pytest.skip("test_each_operation_as_each_role did not run")
    for role in ROLES:
        figures = fuzz.figures("property", role)
        if not figures["requests"]:
            continue  # deselected
        print(f"\nproperty tests as {role}: {figures}")
        assert figures["5xx"] == 0
        assert figures["environments read"] >= 1, figures
        assert figures["tasks read"] >= 1, figures
        assert figures["task logs read"] >= 1, figures
        if role == "viewer":
            assert figures["403"] >= 1, figures
        else:
            assert figures["environments created"] >= 1, figures
            assert figures["transitions 2xx"] >= 1, figures
            assert figures["destroys 2xx"] >= 1, figures
    assert _stray_actions(fuzz) == []


# -- create, control, destroy: links, in parallel --------------------------------------------


class Chaos:
    """Threads that, for each environment the state machine creates, send at once
    a transition, a destroy or a read of it, as the same role: the same environments
    controlled from several places at a time. Bounded: one action per thread for each
    environment; they stop when told (``close``)."""

    ACTIONS = ("DEPLOY", "CONFIGURE", "START_ACTIVITY", "RESET", "EXIT", "destroy", "read")

    def __init__(self, f: Fuzz, role: str, workers: int = THREADS) -> None:
        self.f = f
        self.role = role
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.threads = [
            threading.Thread(target=self.work, args=(random.Random(SEED + i),), daemon=True)
            for i in range(workers)
        ]
        for t in self.threads:
            t.start()

    def feed(self, env: str) -> None:
        for _ in self.threads:
            self.queue.put(env)

    def close(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()

    def work(self, rng: random.Random) -> None:
        env_path = "/api/environments/{env_id}"
        with self.f.client(self.role) as c:
            while (env := self.queue.get()) is not None:
                action = rng.choice(self.ACTIONS)
                body: dict[str, Any] | None = None
                try:
                    if action == "destroy":
                        method, path = "DELETE", env_path
                        r = c.delete(f"/api/environments/{env}")
                    elif action == "read":
                        method, path = "GET", env_path
                        r = c.get(f"/api/environments/{env}")
                    else:
                        method, path = "POST", env_path + "/transitions"
                        body = {"event": action, "wait": rng.random() < 0.7}
                        r = c.post(f"/api/environments/{env}/transitions", json=body)
                    self.f.count("stateful", self.role, method, path, r.status_code)
                    self.f.verdict(self.role, method, path, body, r.status_code)
                except (httpx.HTTPError, AssertionError) as e:
                    with self.f.lock:
                        self.f.problems.append(f"{action} {env} as {self.role}: {e!r}")


@pytest.mark.parametrize("who", ["operator", "admin"])
def test_create_control_destroy_in_parallel(fuzz: Fuzz, who: str) -> None:
    """schemathesis' state machine from the document's links, as ``who``: it creates
    environments (from the workflows it lists, or from generated bodies), follows their
    ids to transitions, reads, their tasks and destroys; ``Chaos`` sends transitions and
    destroys of the same environments at the same time.

    The server's state steers the machine (which rules can run depends on what earlier
    steps got), so Hypothesis may find its generation "inconsistent" (``Flaky``) after
    a while: then the run goes on with the next seed, up to SCENARIOS scenarios in all.
    A failed check is never lost that way: it is kept (``failures``) and fails the test."""
    _restore(fuzz)
    schema = schemathesis.openapi.from_url(f"{fuzz.url}/openapi.json", config=_config(fuzz.url))
    if who != "admin":  # its refusals are the property tests' business: not a waste of steps
        schema = schema.exclude(path_regex="^/api/tokens")
    # the configuration store is its own state (tests/issues/test_issue12_config.py and the
    # property tests here): its steps would crowd out the environments' life
    schema = schema.exclude(path_regex="^/api/(config|runtime)")
    chaos = Chaos(fuzz, who)
    run_checks = checks(fuzz)
    auth = fuzz.auth(who)
    failures: list[str] = []
    scenarios = 0

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Case) -> None:
            _guard(fuzz, case)

        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"headers": auth, "timeout": 60}

        def after_call(self, response: Response, case: Case) -> None:
            super().after_call(response, case)
            fuzz.count("stateful", who, case.method, case.path, response.status_code)
            if TRACE:
                print(case.method, case.formatted_path, case.query, case.body, response.status_code)
            if (case.method.upper(), case.path, response.status_code) == (
                "POST", "/api/environments", 201,
            ):  # fmt: skip
                chaos.feed(response.json()["id"])

        def validate_response(
            self, response: Response, case: Case, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            try:
                case.validate_response(
                    response, checks=run_checks, headers=auth, transport_kwargs=kwargs or None,
                    recorder=self.recorder,
                )  # fmt: skip
            except Exception as e:
                failures.append(str(e))
                raise

        def teardown(self) -> None:
            nonlocal scenarios
            scenarios += 1
            super().teardown()

    runs = 0
    try:
        while scenarios < SCENARIOS:
            runs += 1
            assert runs <= 20, f"{scenarios} scenarios in {runs - 1} runs"
            try:
                seed(SEED + runs)(Workflow).run(
                    settings=settings(
                        max_examples=SCENARIOS - scenarios,
                        stateful_step_count=STEPS,
                        database=None,
                        deadline=None,
                        suppress_health_check=list(HealthCheck),
                    )
                )
            except Flaky:
                if failures:
                    raise
    finally:
        chaos.close()
    assert failures == []
    assert fuzz.problems == []
    figures = fuzz.figures("stateful", who)
    print(
        f"\nstate machine as {who} ({scenarios} scenarios, {runs} runs, {THREADS} more threads): "
        f"{figures}"
    )
    assert figures["5xx"] == 0
    assert figures["environments created"] >= 1, figures
    assert figures["transitions 2xx"] >= 1, figures
    assert figures["destroys 2xx"] >= 1, figures
    assert figures["tasks read"] >= 1, figures
    assert _stray_actions(fuzz) == []
