"""The HTTP API: thin handlers over ``control.service.ControlService``.

How this runs. One FastAPI application on the server's event loop, beside the control
plane (uvicorn serves it in the same loop). Every handler and dependency is ``async``
so that it runs on that loop's thread: the store is only ever used from there (never
from FastAPI's thread pool), and handlers are short. Handlers validate input (pydantic models
at this edge only), check the caller's token and role, call the service and turn its
refusals into problem-details JSON (RFC 9457). The event stream is Server-Sent
Events: it replays the persisted events after ``Last-Event-ID`` (or ``?after=``), then
follows the live bus; a subscriber that falls behind is cut off and resumes from the
store on reconnect, so nothing is lost or repeated.

Every request passes ``BodyLimit`` first (a body over ``--max-body`` gets 413), and
every one that needs a token passes ``caller``, which refuses an address with too many
failed logins (429, see ``FailedLogins``) before it looks at the token.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from corral import __version__
from corral.api import jobs as jobs_api
from corral.api.auth import (
    Admin,
    FailedLogins,
    Operator,
    RateLimited,
    Viewer,
)
from corral.api.jobs import LogAfter, LogWhole
from corral.api.metrics import Metrics
from corral.control.configstore import ConfigStore
from corral.control.jobservice import JobService
from corral.control.journal import StoreUnavailable
from corral.control.service import ControlService, ServiceError
from corral.store.files import NotALog, read_lines
from corral.web import STATIC

PROBLEM = "application/problem+json"
MAX_LOG_LINES = 10_000
MAX_INT = 2**62  # SQLite integers are 64-bit
QUEUE = 10_000
MAX_BODY = 1 << 20  # bytes of a request's body, by default (``corral serve --max-body``)


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- OpenAPI examples and links ----------------------------------------------------------------
# Only the document: what a valid value looks like (the workflows of examples/, the shape
# of an environment's, a task's and a token's id) and which response supplies it (links),
# for people, generated clients and schema-driven fuzzers (tests/api/test_schemathesis.py).

EXAMPLE_ENV = "3kq2v7b1xza"  # an environment id: 11 characters of [0-9a-z]
EXAMPLE_TASK = f"{EXAMPLE_ENV}:0"  # a task id: ENVIRONMENT:INDEX
EXAMPLE_TOKEN = "62328389"  # a token id: 8 hex digits (never the secret)
WORKFLOWS = ["hello", "datataking"]  # the workflows of examples/
DETECTORS = ["TPC", "ITS"]
NODES = ["localhost", "flp1"]  # the local backend's node; one of examples/inventory's
STATES = ["RUNNING", "CONFIGURED", "ERROR", "DONE"]
ROLE_PATHS = ["datataking.flp-localhost", "datataking.qc"]  # roles of examples/datataking.yaml


def _op(name: str, path: str, method: str) -> str:
    """The operationId FastAPI gives a route (``fastapi.utils.generate_unique_id``),
    so that a link can name its target."""
    return re.sub(r"\W", "_", f"{name}{path}") + f"_{method}"


_GET_ENV = _op("environment", "/api/environments/{env_id}", "get")
_TRANSITION = _op("transition", "/api/environments/{env_id}/transitions", "post")
_DESTROY = _op("destroy", "/api/environments/{env_id}", "delete")
_TASKS = _op("tasks", "/api/tasks", "get")
_TASK = _op("task", "/api/tasks/{task_id}", "get")
_TASK_LOG = _op("task_log", "/api/tasks/{task_id}/log", "get")
_RUNS = _op("runs", "/api/runs", "get")
_EVENTS = _op("events", "/api/events", "get")
_WORKFLOW = _op("workflow", "/api/workflows/{name}", "get")
_VALIDATE = _op("validate", "/api/workflows/validate", "post")
_RENDER = _op("render", "/api/workflows/render", "post")
_CREATE = _op("create", "/api/environments", "post")
_REVOKE = _op("revoke_token", "/api/tokens/{token_id}", "delete")
_CONFIG_GET = _op("config_get", "/api/config/{key}", "get")
_CONFIG_HISTORY = _op("config_history", "/api/config-history/{key}", "get")
_CONFIG_RENDER = _op("config_render", "/api/config/render", "post")
CONFIG_KEYS = ["tpc/PHYSICS/flp1/readout", "tpc/ANY/any/readout", "common/ANY/any/header"]


def _link(
    operation: str, description: str, body: dict[str, Any] | None = None, **parameters: Any
) -> dict[str, Any]:
    """An OpenAPI link: ``parameters`` and ``body`` fill the target's request from this
    response (runtime expressions such as ``$response.body#/id``). ``body`` is the whole
    request body, as OpenAPI means it; ``x-schemathesis`` says so to schemathesis, which
    would otherwise merge it into a body it makes up (with variables a non-admin may not
    set)."""
    out: dict[str, Any] = {"operationId": operation, "description": description}
    if parameters:
        out["parameters"] = parameters
    if body is not None:
        out["requestBody"] = body
        out["x-schemathesis"] = {"merge_body": False}
    return out


def _environment_links(pointer: str, *names: str) -> dict[str, dict[str, Any]]:
    """The links named in ``names`` from an environment's id at ``pointer`` in a
    response (only a few per response: each is a path a fuzzer may take)."""
    ref = f"$response.body#{pointer}"
    links = {
        "GetEnvironment": _link(_GET_ENV, "the environment", env_id=ref),
        "Deploy": _link(_TRANSITION, "deploy it", {"event": "DEPLOY", "wait": True}, env_id=ref),
        "Transition": _link(_TRANSITION, "a transition of it", env_id=ref),
        "Destroy": _link(_DESTROY, "destroy it", env_id=ref),
        "Tasks": _link(_TASKS, "its tasks (the first page)", env=ref, offset="0"),
        "Runs": _link(_RUNS, "its runs", env=ref),
        "Events": _link(_EVENTS, "its events", env=ref),
    }
    return {name: links[name] for name in names}


def _workflow_links(pointer: str, *names: str) -> dict[str, dict[str, Any]]:
    """The links named in ``names`` from a workflow's name at ``pointer``."""
    ref = f"$response.body#{pointer}"
    links = {
        "GetWorkflow": _link(_WORKFLOW, "its public variables", name=ref),
        "Validate": _link(_VALIDATE, "validate it", {"workflow": ref}),
        "Render": _link(_RENDER, "render it", {"workflow": ref}),
        "CreateEnvironment": _link(_CREATE, "an environment of it", {"workflow": ref}),
    }
    return {name: links[name] for name in names}


def _task_links(pointer: str) -> dict[str, dict[str, Any]]:
    """The links from a task's id at ``pointer`` in a response."""
    ref = f"$response.body#{pointer}"
    return {
        "GetTask": _link(_TASK, "the task", task_id=ref),
        "TaskLog": _link(_TASK_LOG, "the end of its log", task_id=ref),
    }


def _ok(status: int, description: str, links: dict[str, dict[str, Any]]) -> dict[int | str, Any]:
    return {status: {"description": description, "links": links}}


def _problems(**statuses: str) -> dict[int | str, Any]:
    """Refusals an operation may answer besides the common ones (``create_app``):
    ``_problems(e404="no such environment")``."""
    return {int(k[1:]): {"model": Problem, "description": v} for k, v in statuses.items()}


EnvId = Annotated[str, Path(description="an environment's id", examples=[EXAMPLE_ENV])]
TaskId = Annotated[str, Path(description="a task's id: ENVIRONMENT:INDEX", examples=[EXAMPLE_TASK])]
ByEnv = Annotated[
    str | None, Query(description="only those of this environment", examples=[EXAMPLE_ENV])
]


class WorkflowRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"workflow": "hello"},
                {"workflow": "hello", "vars": {"greeting": "hi from the API"}},
                {"workflow": "datataking", "vars": {"detector": "TPC", "qc_enabled": "false"}},
            ]
        }
    )
    workflow: str = Field(
        min_length=1, max_length=512, description="name in the workflows dir", examples=WORKFLOWS
    )
    vars: dict[str, Annotated[str, Field(max_length=65536)]] = Field(
        default_factory=dict,
        description="variables (a non-admin only the workflow's `!public` ones)",
        examples=[{"greeting": "hi from the API"}, {"detector": "TPC"}],
    )


class CreateRequest(WorkflowRequest):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"workflow": "hello"},
                {"workflow": "datataking", "vars": {"detector": "TPC"}},
                {"workflow": "hello", "dry_run": True, "preempt": True},
            ]
        }
    )
    preempt: bool = Field(
        default=False, description="evict lower-priority environments if it takes that"
    )
    dry_run: bool = Field(default=False, description="only say what would be evicted")


class CordonRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"cordoned": True}]})
    cordoned: bool = True


class TransitionRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"event": "DEPLOY"},
                {"event": "CONFIGURE", "wait": True},
                {"event": "START_ACTIVITY", "wait": False},
            ]
        }
    )
    event: Literal[
        "DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY", "RESET", "EXIT", "GO_ERROR",
        "RECOVER",
    ]  # fmt: skip
    wait: bool = True


class TokenRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"role": "operator", "name": "shifter"}, {"role": "viewer", "name": "qc"}]
        }
    )
    role: Literal["viewer", "operator", "admin"]
    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$", examples=["shifter"]
    )


class LockRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"detectors": ["TPC"], "action": "take"},
                {"detectors": ["TPC", "ITS"], "action": "release"},
                {"detectors": ["TPC"], "action": "release", "force": True},
            ]
        }
    )
    detectors: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=64, examples=[DETECTORS]
    )
    action: Literal["take", "release"]
    force: bool = Field(default=False, description="release another's lock (admin)")


class ConfigPutRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"payload": '[readout]\nrate = {{ rate }}\n{% include "header" %}\n'},
                {"payload": "# a header\n"},
            ]
        }
    )
    payload: str = Field(
        description="the payload: text of at most 1 MiB (UTF-8), no NUL; a Jinja2 "
        "template when rendered",
        examples=["[readout]\nrate = {{ rate }}\n"],
    )


class ConfigRenderRequest(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"key": "tpc/ANY/any/readout", "vars": {"rate": "200"}},
                {"key": "common/ANY/any/header", "revision": 1},
            ]
        }
    )
    key: str = Field(min_length=1, max_length=512, examples=CONFIG_KEYS)
    vars: dict[str, Annotated[str, Field(max_length=65536)]] = Field(
        default_factory=dict, description="the template's variables", examples=[{"rate": "200"}]
    )
    revision: int | None = Field(
        default=None, ge=0, le=MAX_INT, description="as of this revision (default: now)",
        examples=[1],
    )  # fmt: skip


class RuntimeSetRequest(_Strict):
    model_config = ConfigDict(json_schema_extra={"examples": [{"value": "42"}]})
    value: str = Field(description="text of at most 1 MiB (UTF-8), no NUL", examples=["42"])


class SecretPutRequest(_Strict):
    """A secret's value: ``value`` (text) or ``base64`` (any bytes), one of them."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"value": "hunter2"}, {"base64": "AAEC/w=="}]}
    )
    value: str | None = Field(
        default=None, max_length=65536, description="the value as text (stored as UTF-8)",
        examples=["hunter2"],
    )  # fmt: skip
    base64: str | None = Field(
        default=None, max_length=87384, description="the value as base64: any bytes",
        examples=["AAEC/w=="],
    )  # fmt: skip


ConfigKey = Annotated[
    str,
    Path(description="a key: parts of letters, digits, `_`, `-`, `.`, joined by `/`",
         examples=CONFIG_KEYS),
]  # fmt: skip
AtRevision = Annotated[
    int | None, Query(ge=0, le=MAX_INT, description="as of this revision (default: now)",
                      examples=[1])
]  # fmt: skip

Component = Annotated[str, Path(description="a component's name", examples=["tpc", "aliecs"])]

RuntimeKey = Annotated[
    str,
    Path(description="the entry's key (a key, as above)", examples=["last_run", "flp1/state"]),
]


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses a request whose body is larger than ``limit`` bytes: 413, problem details.

    A ``Content-Length`` over the limit is refused before any of the body is read; a
    body without one (chunked) is counted as the application reads it, and refused
    once past the limit (the application's own answer to the cut body is dropped).
    The connection is closed after a 413: the rest of the body is never read."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(413, "Request too large", f"the request body exceeds {self.limit} bytes")
        response.headers["Connection"] = "close"
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.strip().isdigit() and int(value) > self.limit:
                await self.refuse(scope, receive, send)
                return
        seen = 0
        over = started = refused = False

        async def counted() -> Message:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise BodyTooLarge(f"more than {self.limit} bytes")
            return message

        async def guarded(message: Message) -> None:
            nonlocal started, refused
            if refused:
                return
            if over and not started:
                refused = True
                await self.refuse(scope, receive, send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not over:
                raise
        if over and not started and not refused:
            await self.refuse(scope, receive, send)


def create_app(
    service: ControlService,
    *,
    log_dir: str | None = None,
    max_body: int = MAX_BODY,
    logins: FailedLogins | None = None,
) -> FastAPI:
    """``max_body``: the largest request body, in bytes; ``logins``: the table of failed
    logins (one with the default limits if not given)."""
    app = FastAPI(
        title="corral",
        version=__version__,
        description="Control of an experiment's computing farm: workflows, environments, "
        "tasks, runs and events. Send `Authorization: Bearer TOKEN`.",
        responses={
            400: {"model": Problem, "description": "the body cannot be read (not UTF-8 JSON)"},
            401: {"model": Problem, "description": "no or unknown token"},
            403: {"model": Problem, "description": "the token's role may not do this"},
            413: {"model": Problem, "description": "the request body is too large"},
            422: {"model": Problem, "description": "bad input"},
            429: {"model": Problem, "description": "too many failed logins: see Retry-After"},
            503: {
                "model": Problem,
                "description": "the store refuses writes for now, too many template expansions "
                "wait, or a destroy could not end everything: try again",
            },
        },
    )

    def openapi() -> dict[str, Any]:
        """The generated document, with the bearer token as its security scheme, and
        refusals as what they are: problem details (``problem``)."""
        if app.openapi_schema is None:
            doc = FastAPI.openapi(app)
            for item in doc["paths"].values():
                for op in item.values():
                    for status, answer in op.get("responses", {}).items():
                        content = answer.get("content", {})
                        if status[:1] in ("4", "5") and "application/json" in content:
                            content[PROBLEM] = content.pop("application/json")
            doc.setdefault("components", {})["securitySchemes"] = {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a token from `corral serve` (the first admin's) or "
                    "`POST /api/tokens`; the event stream also takes `?token=`",
                }
            }
            doc["security"] = [{"bearer": []}]
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    metrics = Metrics(service)
    app.state.metrics = metrics
    app.state.service = service
    app.state.logins = logins if logins is not None else FailedLogins()
    app.state.closing = False

    # -- errors as problem details ----------------------------------------------------------

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        response = problem(exc.status, exc.title, exc.detail, **exc.extra)
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(StoreUnavailable)
    async def _store(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return problem(503, "Store unavailable", f"{exc}; nothing was changed: try again")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"where": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{e['where']}: {e['message']}" for e in errors[:5])
        return problem(422, "Bad request", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, "HTTP error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover
        return problem(500, "Internal error", f"{type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def _timing(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.request(request.method, path, response.status_code, time.perf_counter() - t0)
        return response

    app.add_middleware(BodyLimit, limit=max_body)  # outermost: before anything reads

    # -- who, workflows ---------------------------------------------------------------------------

    @app.get("/api/whoami", tags=["auth"])
    async def whoami(who: Viewer) -> dict[str, str]:
        return {"id": who.id, "name": who.name, "role": who.role}

    @app.get(
        "/api/workflows", tags=["workflows"],
        responses=_ok(200, "the workflows",
                      _workflow_links("/0/name", "GetWorkflow", "CreateEnvironment")),
    )  # fmt: skip
    async def workflows(who: Viewer) -> list[dict[str, Any]]:
        return service.list_workflows()

    @app.get(
        "/api/workflows/{name}", tags=["workflows"],
        responses=_ok(200, "its public variables",
                      _workflow_links("/name", "Validate", "Render", "CreateEnvironment"))
        | _problems(e404="no such workflow"),
    )  # fmt: skip
    async def workflow(
        name: Annotated[str, Path(description="a workflow's name", examples=WORKFLOWS)],
        who: Viewer,
    ) -> dict[str, Any]:
        plan, diags, _ = await service.expand_async(name, {}, who)
        public = [] if plan is None else [p.to_dict() for p in plan.public]
        return {"name": name, "public": public, "errors": [str(d) for d in diags]}

    @app.post(
        "/api/workflows/validate", tags=["workflows"],
        responses=_problems(e404="no such workflow", e403="a variable only an admin may set"),
    )  # fmt: skip
    async def validate(req: WorkflowRequest, who: Viewer) -> dict[str, Any]:
        try:
            plan, diags, _ = await service.expand_async(req.workflow, req.vars, who)
        except ServiceError as e:
            if e.title != "Bad variable":
                raise
            # a value not of its variable's type is a problem to report, like the template's
            return {"ok": False, "errors": [x["message"] for x in e.extra.get("errors", [])]}
        if plan is None:
            return {"ok": False, "errors": [str(d) for d in diags]}
        return {"ok": True, "errors": [], "warnings": list(plan.warnings),
                "tasks": len(plan.tasks), "calls": len(plan.calls)}  # fmt: skip

    @app.post(
        "/api/workflows/render", tags=["workflows"], response_model=None,
        responses={
            200: {"description": "the plan (as `corral template render -o json`)",
                  "content": {"application/json": {"schema": {"type": "object"}}}},
            **_problems(e404="no such workflow", e403="a variable only an admin may set"),
        },
    )  # fmt: skip
    async def render(req: WorkflowRequest, who: Viewer) -> Response:
        plan, diags, _ = await service.expand_async(req.workflow, req.vars, who)
        if plan is None:
            raise ServiceError(
                422, "Template errors", f"{len(diags)} errors", errors=[str(d) for d in diags]
            )
        # A plan of 150,000 tasks is ~100 MB of JSON: made in a worker thread, and
        # encoded a slice at a time (each slice holds the GIL briefly), so the loop that
        # watches the tasks goes on meanwhile.
        body = await asyncio.to_thread(plan.to_dict)
        return StreamingResponse(json_chunks(body), media_type="application/json")

    # -- environments ----

    @app.post(
        "/api/environments", tags=["environments"], status_code=201,
        responses=_ok(201, "the environment", _environment_links(
            "/id", "GetEnvironment", "Deploy", "Transition", "Destroy", "Tasks", "Runs", "Events",
        ))
        | {200: {"description": "a dry run: what it would evict"}}
        | _problems(
            e404="no such workflow", e409="does not fit (per-task reasons in `errors`)",
            e423="a detector it uses is locked by someone else",
        ),
    )  # fmt: skip
    async def create(req: CreateRequest, who: Operator, response: Response) -> dict[str, Any]:
        if req.preempt or req.dry_run:
            evicted, env, protected = await service.create_preempting(
                req.workflow, req.vars, who, dry_run=req.dry_run
            )
            if env is None:
                response.status_code = 200
                return {"dry_run": True, "fits": True, "evict": evicted, "protected": protected}
            return dict(summary(env.id), evicted=evicted, protected=protected)
        env = await service.create(req.workflow, req.vars, who)
        return dict(summary(env.id), warnings=list(env.plan.warnings))

    @app.get(
        "/api/environments", tags=["environments"],
        responses=_ok(200, "every environment", _environment_links(
            "/0/id", "GetEnvironment", "Transition", "Destroy", "Tasks",
        )),
    )  # fmt: skip
    async def environments(who: Viewer) -> list[dict[str, Any]]:
        return [summary(e["id"], e) for e in service.store.environments()]

    @app.get(
        "/api/environments/{env_id}", tags=["environments"],
        responses=_ok(200, "the environment, its roles, channels and transitions",
                      _environment_links("/id", "Transition", "Destroy", "Tasks"))
        | _problems(e404="no such environment"),
    )  # fmt: skip
    async def environment(
        env_id: EnvId,
        who: Viewer,
        channels: Annotated[
            bool,
            Query(
                description="with every channel (false: only `flows`, the channels "
                "between roles, for a big environment)",
                examples=[True, False],
            ),
        ] = True,
    ) -> dict[str, Any]:
        tree = await service.role_tree(env_id)  # (None: not run here)
        out = summary(env_id)
        live = service.plane.environments.get(env_id)
        if live is not None and tree is not None:
            out["roles"], out["flows"] = tree
            if channels:
                out["channels"] = channel_list(live)
        out["transitions"] = service.store.transitions(env_id)
        return out

    @app.post(
        "/api/environments/{env_id}/transitions", tags=["environments"],
        responses=_ok(200, "its state after the transition (or at once, `wait: false`)",
                      _environment_links("/id", "GetEnvironment", "Transition", "Destroy", "Tasks"))
        | _problems(
            e404="no such environment", e409="not allowed now, failed, or busy",
            e423="a detector it uses is locked by someone else",
        ),
    )  # fmt: skip
    async def transition(env_id: EnvId, req: TransitionRequest, who: Operator) -> dict[str, Any]:
        return await service.transition(env_id, req.event, who, wait=req.wait)

    @app.delete(
        "/api/environments/{env_id}", tags=["environments"],
        responses=_ok(200, "the environment, ended",
                      _environment_links("/id", "GetEnvironment", "Tasks"))
        | _problems(
            e404="no such environment", e409="not run by this server (it ended)",
            e423="a detector it uses is locked by someone else",
        ),
    )  # fmt: skip
    async def destroy(env_id: EnvId, who: Operator) -> dict[str, Any]:
        await service.destroy(env_id, who)
        return summary(env_id)

    def summary(env_id: str, row: dict[str, Any] | None = None) -> dict[str, Any]:
        row = row or service.store.environment(env_id)
        if row is None:
            raise ServiceError(404, "No such environment", f"no environment {env_id!r}")
        live = service.plane.environments.get(env_id)
        return {
            "id": row["id"],
            "name": row["name"],
            "state": live.state if live else row["state"],
            "transitioning": live.transitioning if live else None,
            "run_number": live.run_number if live else row["run_number"],
            "error": live.error if live else row["error"],
            "created": row["created"],
            "created_by": row.get("created_by"),
            "controlled": live is not None,
            "tasks": live.counts() if live else service.store.task_states(env_id),
            "variables": row["variables"],
        }

    # -- tasks, runs ----

    @app.get(
        "/api/tasks", tags=["tasks"],
        responses=_ok(200, "a page of tasks (with `env`: how many match in the header "
                      "`X-Total-Count`)", _task_links("/0/id")),
    )  # fmt: skip
    async def tasks(
        who: Viewer,
        response: Response,
        env: ByEnv = None,
        state: Annotated[str | None, Query(description="in this state", examples=STATES)] = None,
        node: Annotated[str | None, Query(description="on this node", examples=NODES)] = None,
        role: Annotated[
            str | None,
            Query(
                description="of this role (a task's, or one above tasks); needs `env`",
                max_length=4096,
                examples=ROLE_PATHS,
            ),
        ] = None,
        limit: Annotated[int, Query(ge=1, le=10_000, examples=[100])] = 1000,
        offset: Annotated[int, Query(ge=0, le=MAX_INT, examples=[0])] = 0,
    ) -> list[dict[str, Any]]:
        if env is None:
            if role is not None:
                raise ServiceError(422, "Bad request", "a role filter needs an environment (env)")
            return service.find_tasks(state=state, node=node, limit=limit, offset=offset)
        total, page = service.task_page(
            env, state=state, node=node, role=role, limit=limit, offset=offset
        )
        response.headers["X-Total-Count"] = str(total)
        return page

    def one_task(task_id: str) -> dict[str, Any]:
        env, _, idx = task_id.partition(":")
        if not idx.isdigit() or len(idx) > 12:
            raise ServiceError(422, "Bad task id", f"{task_id!r}: expected ENVIRONMENT:INDEX")
        found = service.find_tasks(env=env, limit=1, offset=int(idx))
        if not found or found[0]["id"] != task_id:
            raise ServiceError(404, "No such task", f"no task {task_id!r}")
        return found[0]

    @app.get(
        "/api/tasks/{task_id}", tags=["tasks"],
        responses=_ok(200, "the task", {
            "TaskLog": _task_links("/id")["TaskLog"],
            "GetEnvironment": _link(_GET_ENV, "its environment", env_id="$response.body#/env"),
        })
        | _problems(e404="no such task"),
    )  # fmt: skip
    async def task(task_id: TaskId, who: Viewer) -> dict[str, Any]:
        return one_task(task_id)

    @app.get(
        "/api/tasks/{task_id}/log", tags=["tasks"],
        responses=_problems(e404="no such task, or this server keeps no logs"),
    )  # fmt: skip
    async def task_log(
        task_id: TaskId,
        who: Viewer,
        lines: Annotated[int, Query(ge=1, le=MAX_LOG_LINES, examples=[50])] = 100,
        after: LogAfter = None,
        whole: LogWhole = False,
    ) -> dict[str, Any]:
        t = one_task(task_id)
        if log_dir is None:
            raise ServiceError(404, "No logs", "this server keeps no task logs")
        path = os.path.join(log_dir, t["env"], t["path"] + ".log")
        return {"task": task_id, "path": path, **await tail(path, lines, after, whole)}

    @app.get("/api/nodes", tags=["nodes"])
    async def nodes(who: Viewer) -> list[dict[str, Any]]:
        return service.plane.ledger.table()

    @app.post("/api/nodes/{name}/cordon", tags=["nodes"], responses=_problems(e404="no such node"))
    async def cordon(
        name: Annotated[str, Path(description="a node's name", examples=NODES)],
        req: CordonRequest,
        who: Admin,
    ) -> dict[str, Any]:
        try:
            service.plane.cordon(name, req.cordoned)
        except KeyError:
            raise ServiceError(404, "No such node", f"no node {name!r}") from None
        service.record({"kind": "node", "node": name, "cordoned": req.cordoned}, who.name)
        return {"node": name, "cordoned": req.cordoned}

    @app.post("/api/nodes/{name}/drain", tags=["nodes"], responses=_problems(e404="no such node"))
    async def drain(
        name: Annotated[str, Path(description="a node's name", examples=NODES)],
        who: Admin,
        dry_run: Annotated[
            bool, Query(description="only say what it would evict", examples=[True])
        ] = False,
    ) -> dict[str, Any]:
        try:
            evicted = await service.plane.drain(name, dry_run=dry_run, actor=who.name)
        except KeyError:
            raise ServiceError(404, "No such node", f"no node {name!r}") from None
        return {"node": name, "dry_run": dry_run, "evict": evicted}

    @app.get("/api/runs", tags=["runs"])
    async def runs(who: Viewer, env: ByEnv = None) -> list[dict[str, Any]]:
        return service.store.runs(env)

    # -- events ----

    @app.get("/api/events", tags=["events"])
    async def events(
        who: Viewer,
        after: Annotated[int, Query(ge=0, le=MAX_INT, examples=[0])] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000, examples=[100])] = 1000,
        env: ByEnv = None,
        last: Annotated[
            bool,
            Query(
                description="the newest `limit` events instead of the oldest (still in order)",
                examples=[False, True],
            ),
        ] = False,
    ) -> list[dict[str, Any]]:
        if not last:
            return service.store.events(env=env, after=after, limit=limit)
        return newest_events(env, after, limit)

    def newest_events(env: str | None, after: int, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` events after ``after``: read back from the end in growing
        windows of sequence numbers, so that an environment's few recent events cost
        little whatever the store holds."""
        top = service.store.last_seq()
        window = 4 * limit
        while True:
            start = max(after, top - window)
            got = service.store.events(env=env, after=start)
            if len(got) >= limit or start == after:
                return got[-limit:]
            window *= 4

    @app.get("/api/events/stream", tags=["events"], response_class=StreamingResponse)
    async def stream(
        request: Request,
        who: Viewer,
        after: Annotated[int | None, Query(ge=0, le=MAX_INT, examples=[0])] = None,
        env: ByEnv = None,
        last_event_id: Annotated[
            str | None, Header(description="resume after this event", examples=["1234"])
        ] = None,
    ) -> StreamingResponse:
        start = after or 0
        if last_event_id is not None:
            if not last_event_id.strip().isdigit() or len(last_event_id.strip()) > 18:
                raise ServiceError(422, "Bad Last-Event-ID", f"{last_event_id!r} is not a number")
            start = int(last_event_id)
        return StreamingResponse(
            sse(request, start, env),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def sse(request: Request, after: int, env: str | None) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE)

        def listen(batch: Any) -> None:
            for e in batch:
                if env is None or e.get("env") == env:
                    try:
                        queue.put_nowait(e)
                    except asyncio.QueueFull:
                        # too slow: end the stream; the client resumes from the store
                        unsubscribe()
                        queue._queue.clear()  # type: ignore[attr-defined]
                        queue.put_nowait(None)
                        return

        unsubscribe = service.plane.bus.subscribe(listen)  # before the history: no gap
        last = after
        yield b"retry: 1000\n\n"
        try:
            while True:
                page = service.store.events(env=env, after=last, limit=1000)
                if not page:
                    break
                yield b"".join(frame(old) for old in page)  # one write per page
                last = page[-1]["seq"]
            quiet = 0.0
            while not app.state.closing and not await request.is_disconnected():
                try:
                    e: dict[str, Any] | None = await asyncio.wait_for(queue.get(), 0.5)
                except TimeoutError:
                    quiet += 0.5
                    if quiet >= 15.0:
                        quiet = 0.0
                        yield b": keep-alive\n\n"
                    continue
                quiet = 0.0
                # what else is waiting goes out in the same write
                batch = [e]
                while batch[-1] is not None and not queue.empty() and len(batch) < 1000:
                    batch.append(queue.get_nowait())
                chunk: list[bytes] = []
                for item in batch:
                    if item is None:
                        if chunk:
                            yield b"".join(chunk)
                        return
                    if item["seq"] > last:
                        chunk.append(frame(item))
                        last = item["seq"]
                if chunk:
                    yield b"".join(chunk)
        finally:
            unsubscribe()

    # -- tokens and locks ----

    @app.post(
        "/api/tokens", tags=["auth"], status_code=201,
        responses={
            **_ok(201, "the token, shown once", {
                "Revoke": _link(_REVOKE, "revoke it", token_id="$response.body#/id"),
            }),
            **_problems(e409="an active token already has that name"),
        },
    )  # fmt: skip
    async def create_token(req: TokenRequest, who: Admin) -> dict[str, str]:
        token_id, token = service.create_token(req.role, req.name, by=who.name)
        return {"id": token_id, "name": req.name, "role": req.role, "token": token}

    @app.get("/api/tokens", tags=["auth"])
    async def list_tokens(who: Admin) -> list[dict[str, Any]]:
        return service.store.tokens()

    @app.delete("/api/tokens/{token_id}", tags=["auth"], responses=_problems(e404="no such token"))
    async def revoke_token(
        token_id: Annotated[str, Path(description="a token's id", examples=[EXAMPLE_TOKEN])],
        who: Admin,
    ) -> dict[str, str]:
        service.revoke_token(token_id, by=who.name)
        return {"id": token_id, "status": "revoked"}

    @app.get("/api/locks", tags=["locks"])
    async def locks(who: Viewer) -> dict[str, Any]:
        return service.store.locks()

    @app.post(
        "/api/locks", tags=["locks"],
        responses=_problems(e409="a detector is locked by someone else (release: held by another)"),
    )  # fmt: skip
    async def lock(req: LockRequest, who: Operator) -> dict[str, Any]:
        if req.force and not who.can("admin"):
            raise ServiceError(403, "Forbidden", "only an admin may force-release a lock")
        service.lock(req.detectors, who, release=req.action == "release", force=req.force)
        return service.store.locks()

    # -- configuration (docs/config.md) ----

    config = ConfigStore(service)
    app.state.config = config
    key_links = {
        "GetPayload": _link(_CONFIG_GET, "the payload", key="$response.body#/key"),
        "History": _link(_CONFIG_HISTORY, "its versions", key="$response.body#/key"),
        "Render": _link(_CONFIG_RENDER, "render it", {"key": "$response.body#/key"}),
    }

    @app.get(
        "/api/config", tags=["config"],
        responses=_ok(200, "the keys, and the revision they are of", {
            "GetPayload": _link(_CONFIG_GET, "the first key's payload",
                                key="$response.body#/keys/0"),
        }),
    )  # fmt: skip
    async def config_keys(
        who: Viewer,
        prefix: Annotated[
            str, Query(max_length=513, description="only keys starting with this",
                       examples=["tpc/", "tpc/ANY/any/"])
        ] = "",
        revision: AtRevision = None,
    ) -> dict[str, Any]:  # fmt: skip
        return config.keys(who, prefix=prefix, revision=revision)

    @app.post(
        "/api/config/render", tags=["config"],
        responses=_problems(e404="no payload at the key (or at an included one's, named)",
                            e422="bad key, or the template failed (`key` and `line`)"),
    )  # fmt: skip
    async def config_render(req: ConfigRenderRequest, who: Viewer) -> dict[str, Any]:
        return await config.render(req.key, req.vars, who, revision=req.revision)

    @app.get(
        "/api/config/{key:path}", tags=["config"],
        responses=_ok(200, "the payload and its version",
                      {k: v for k, v in key_links.items() if k != "GetPayload"})
        | _problems(e404="no payload at this key (at that revision)"),
    )  # fmt: skip
    async def config_get(
        key: ConfigKey, who: Viewer, revision: AtRevision = None
    ) -> dict[str, Any]:
        return config.get(key, who, revision=revision)

    @app.put(
        "/api/config/{key:path}", tags=["config"],
        responses=_ok(200, "the new version: its revision and version", key_links),
    )  # fmt: skip
    async def config_put(key: ConfigKey, req: ConfigPutRequest, who: Admin) -> dict[str, Any]:
        return config.put(key, req.payload, who)

    @app.get(
        "/api/config-history/{key:path}", tags=["config"],
        responses=_problems(e404="no payload was ever at this key"),
    )  # fmt: skip
    async def config_history(key: ConfigKey, who: Viewer) -> list[dict[str, Any]]:
        return config.history(key, who)

    @app.get(
        "/api/runtime/{component}/{key:path}", tags=["config"],
        responses=_problems(e404="no such entry"),
    )  # fmt: skip
    async def runtime_get(component: Component, key: RuntimeKey, who: Viewer) -> dict[str, Any]:
        return config.runtime_get(component, key, who)

    @app.put("/api/runtime/{component}/{key:path}", tags=["config"])
    async def runtime_put(
        component: Component, key: RuntimeKey, req: RuntimeSetRequest, who: Admin
    ) -> dict[str, Any]:
        return config.runtime_set(component, key, req.value, who)

    # -- secrets (docs/secrets.md) ----
    # Admin only. A value goes in and never comes out: a put answers with the version,
    # listings and events carry names. ``corral serve`` sets ``app.state.secrets``.

    import base64
    import binascii

    from corral.store.secrets import MAX_VALUE, SecretError, SecretStore, check_name

    app.state.secrets = None

    def secret_store(name: str | None = None) -> SecretStore:
        found: SecretStore | None = app.state.secrets
        if found is None:
            raise ServiceError(503, "No secrets", "this server keeps no secrets (no key)")
        if name is not None:
            try:
                check_name(name)
            except SecretError as e:
                raise ServiceError(422, "Bad secret name", str(e)) from None
        return found

    def secret_value(req: SecretPutRequest) -> bytes:
        if (req.value is None) == (req.base64 is None):
            raise ServiceError(422, "Bad secret", "give the value as one of value or base64")
        try:
            if req.value is not None:
                value = req.value.encode("utf-8")
            else:
                value = base64.b64decode(req.base64 or "", validate=True)
        except UnicodeEncodeError:
            raise ServiceError(422, "Bad secret", "value is not UTF-8 text: send base64") from None
        except binascii.Error:
            raise ServiceError(422, "Bad secret", "base64 is not valid base64") from None
        if len(value) > MAX_VALUE:
            raise ServiceError(413, "Secret too large", f"a secret is at most {MAX_VALUE} bytes")
        return value

    @app.get("/api/secrets", tags=["secrets"], responses=_problems(e503="no key: no secrets"))
    async def secrets_list(who: Admin) -> list[dict[str, Any]]:
        return secret_store().names()

    @app.put(
        "/api/secrets/{name}", tags=["secrets"],
        responses=_problems(e413=f"the value is larger than {MAX_VALUE} bytes",
                            e503="no key: no secrets"),
    )  # fmt: skip
    async def secret_put(
        name: Annotated[str, Path(description="a secret's name", examples=["db-password"])],
        req: SecretPutRequest,
        who: Admin,
    ) -> dict[str, Any]:
        store = secret_store(name)
        value = secret_value(req)
        now = service.clock()
        try:
            version = service.plane.journal.call(lambda: store.put(name, value, who.name, now))
        except SecretError as e:
            raise ServiceError(422, "Bad secret", str(e)) from None
        service.record({"kind": "secret", "status": "PUT", "name": name, "version": version},
                       who.name)  # fmt: skip
        entry = store.get(name)
        assert entry is not None
        return entry

    @app.delete(
        "/api/secrets/{name}", tags=["secrets"],
        responses=_problems(e404="no such secret", e503="no key: no secrets"),
    )  # fmt: skip
    async def secret_remove(
        name: Annotated[str, Path(description="a secret's name", examples=["db-password"])],
        who: Admin,
    ) -> dict[str, str]:
        store = secret_store(name)
        if not service.plane.journal.call(lambda: store.remove(name)):
            raise ServiceError(404, "No such secret", f"no secret {name!r}")
        service.record({"kind": "secret", "status": "REMOVED", "name": name}, who.name)
        return {"name": name, "status": "removed"}

    # -- jobs, services and the catalog (api/jobs.py) ----

    app.state.jobs = JobService(service)
    jobs_api.mount(app, app.state.jobs, problems=_problems, tail=tail, log_dir=log_dir)

    # -- the web GUI ----------------------------------------------------------------------------

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC, "index.html"))

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:  # (browsers ask for it whatever the page says)
        return FileResponse(os.path.join(STATIC, "favicon.ico"), media_type="image/x-icon")

    # -- metrics ----

    @app.get("/metrics", tags=["metrics"], response_class=Response)
    async def prometheus(who: Viewer) -> Response:  # any token: what runs is not public
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


_frames: dict[int, bytes] = {}


JSON_SLICE = 500  # list items encoded at once by ``json_chunks``


def json_chunks(value: Any) -> Iterator[bytes]:
    """``value`` as compact JSON, in pieces: long lists a slice of items at a time
    (Starlette runs a plain iterator in worker threads, one piece per step)."""
    if isinstance(value, dict):
        yield b"{"
        for i, (k, v) in enumerate(value.items()):
            yield (("," if i else "") + json.dumps(k) + ":").encode()
            yield from json_chunks(v)
        yield b"}"
    elif isinstance(value, list) and len(value) > JSON_SLICE:
        yield b"["
        for j in range(0, len(value), JSON_SLICE):
            part = json.dumps(value[j : j + JSON_SLICE], separators=(",", ":"))[1:-1]
            yield (("," if j else "") + part).encode()
        yield b"]"
    else:
        yield json.dumps(value, separators=(",", ":")).encode()


def frame(e: dict[str, Any]) -> bytes:
    """An event as one SSE frame; encoded once however many subscribers send it."""
    seq = e["seq"]
    out = _frames.get(seq)
    if out is None:
        data = json.dumps(e, separators=(",", ":"), default=str)
        out = f"id: {seq}\nevent: {e['kind']}\ndata: {data}\n\n".encode()
        if len(_frames) >= 4096:  # keep the newest few thousand
            for old in sorted(_frames)[:1024]:
                del _frames[old]
        _frames[seq] = out
    return out


async def tail(
    path: str, lines: int, after: int | None = None, whole: bool = False
) -> dict[str, Any]:
    """A log's ``lines`` (its last ``lines``, or those after byte ``after``: see
    store.files.read_lines) and the ``offset`` to ask from next, read in a worker
    thread (at most 1 MiB; a log that is not a regular file is refused: a task may
    replace it by a FIFO, or a link to anything)."""
    try:
        got, offset = await asyncio.to_thread(read_lines, path, after, lines, whole)
        return {"lines": got, "offset": offset}
    except NotALog as e:
        raise ServiceError(409, "Log unreadable", f"not shown: {e}") from None
    except OSError as e:
        raise ServiceError(409, "Log unreadable", f"cannot read it: {e.strerror}") from None


def channel_list(env: Any) -> list[dict[str, Any]]:
    """The channel graph, an edge per connect, pointing the way data flows: from the
    pushing or publishing side to the pulling or subscribing one."""
    out = []
    for c in env.plan.connects:
        bound = c.bind_task or c.address
        sends = c.type in ("push", "pub")
        out.append(
            {
                "from": c.task if sends else bound,
                "from_channel": c.name if sends else c.bind_name,
                "to": bound if sends else c.task,
                "to_channel": c.bind_name if sends else c.name,
                "type": c.type,
                "address": env.addresses.get((c.bind_task, c.bind_name), c.address),
            }
        )
    return out
