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
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from corral import __version__
from corral.api.metrics import Metrics
from corral.control.journal import StoreUnavailable
from corral.control.service import ControlService, Principal, ServiceError
from corral.web import STATIC

PROBLEM = "application/problem+json"
MAX_LOG_LINES = 10_000
MAX_INT = 2**62  # SQLite integers are 64-bit
QUEUE = 10_000


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkflowRequest(_Strict):
    workflow: str = Field(min_length=1, max_length=512, description="name in the workflows dir")
    vars: dict[str, Annotated[str, Field(max_length=65536)]] = Field(default_factory=dict)


class CreateRequest(WorkflowRequest):
    preempt: bool = Field(
        default=False, description="evict lower-priority environments if it takes that"
    )
    dry_run: bool = Field(default=False, description="only say what would be evicted")


class CordonRequest(_Strict):
    cordoned: bool = True


class TransitionRequest(_Strict):
    event: Literal[
        "DEPLOY", "CONFIGURE", "START_ACTIVITY", "STOP_ACTIVITY", "RESET", "EXIT", "GO_ERROR",
        "RECOVER",
    ]  # fmt: skip
    wait: bool = True


class TokenRequest(_Strict):
    role: Literal["viewer", "operator", "admin"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")


class LockRequest(_Strict):
    detectors: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=64
    )
    action: Literal["take", "release"]
    force: bool = False


async def caller(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    token: Annotated[str | None, Query(include_in_schema=False)] = None,
) -> Principal:
    """The token's owner, from ``Authorization: Bearer`` (or ``?token=`` for EventSource)."""
    raw = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ServiceError(401, "Unauthorized", "use Authorization: Bearer TOKEN")
        raw = value.strip()
    elif token:
        raw = token  # browsers' EventSource cannot set headers
    if not raw:
        raise ServiceError(401, "Unauthorized", "a token is needed: Authorization: Bearer TOKEN")
    service: ControlService = request.app.state.service
    who = service.authenticate(raw)
    if who is None:
        raise ServiceError(401, "Unauthorized", "unknown or revoked token")
    return who


def _needs(role: str) -> Callable[[Principal], Principal]:
    def check(who: Principal) -> Principal:
        if not who.can(role):
            raise ServiceError(403, "Forbidden", f"{who.name} is a {who.role}; this needs {role}")
        return who

    return check


_viewer, _operator, _admin = _needs("viewer"), _needs("operator"), _needs("admin")


async def viewer(who: Annotated[Principal, Depends(caller)]) -> Principal:
    return _viewer(who)


async def operator(who: Annotated[Principal, Depends(caller)]) -> Principal:
    return _operator(who)


async def admin(who: Annotated[Principal, Depends(caller)]) -> Principal:
    return _admin(who)


Viewer = Annotated[Principal, Depends(viewer)]
Operator = Annotated[Principal, Depends(operator)]
Admin = Annotated[Principal, Depends(admin)]


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM)


def create_app(service: ControlService, *, log_dir: str | None = None) -> FastAPI:
    app = FastAPI(
        title="corral",
        version=__version__,
        description="Control of an experiment's computing farm: workflows, environments, "
        "tasks, runs and events. Send `Authorization: Bearer TOKEN`.",
        responses={
            401: {"model": Problem, "description": "no or unknown token"},
            403: {"model": Problem, "description": "the token's role may not do this"},
            422: {"model": Problem, "description": "bad input"},
        },
    )
    metrics = Metrics(service)
    app.state.metrics = metrics
    app.state.service = service
    app.state.closing = False
    trees: dict[str, tuple[int, list[dict[str, Any]]]] = {}  # role trees by state version

    # -- errors as problem details ----------------------------------------------------------

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return problem(exc.status, exc.title, exc.detail, **exc.extra)

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

    # -- who, workflows ---------------------------------------------------------------------------

    @app.get("/api/whoami", tags=["auth"])
    async def whoami(who: Viewer) -> dict[str, str]:
        return {"id": who.id, "name": who.name, "role": who.role}

    @app.get("/api/workflows", tags=["workflows"])
    async def workflows(who: Viewer) -> list[dict[str, Any]]:
        return service.list_workflows()

    @app.get("/api/workflows/{name}", tags=["workflows"])
    async def workflow(name: str, who: Viewer) -> dict[str, Any]:
        plan, diags, _ = service.expand(name, {})
        public = [] if plan is None else [p.to_dict() for p in plan.public]
        return {"name": name, "public": public, "errors": [str(d) for d in diags]}

    @app.post("/api/workflows/validate", tags=["workflows"])
    async def validate(req: WorkflowRequest, who: Viewer) -> dict[str, Any]:
        plan, diags, _ = service.expand(req.workflow, req.vars)
        if plan is None:
            return {"ok": False, "errors": [str(d) for d in diags]}
        return {"ok": True, "errors": [], "tasks": len(plan.tasks), "calls": len(plan.calls)}

    @app.post("/api/workflows/render", tags=["workflows"])
    async def render(req: WorkflowRequest, who: Viewer) -> dict[str, Any]:
        plan, diags, _ = service.expand(req.workflow, req.vars)
        if plan is None:
            raise ServiceError(
                422, "Template errors", f"{len(diags)} errors", errors=[str(d) for d in diags]
            )
        return plan.to_dict()

    # -- environments ----

    @app.post("/api/environments", tags=["environments"], status_code=201)
    async def create(req: CreateRequest, who: Operator, response: Response) -> dict[str, Any]:
        if req.preempt or req.dry_run:
            evicted, env = await service.create_preempting(
                req.workflow, req.vars, who, dry_run=req.dry_run
            )
            if env is None:
                response.status_code = 200
                return {"dry_run": True, "fits": True, "evict": evicted}
            return dict(summary(env.id), evicted=evicted)
        env = service.create(req.workflow, req.vars, who)
        return summary(env.id)

    @app.get("/api/environments", tags=["environments"])
    async def environments(who: Viewer) -> list[dict[str, Any]]:
        return [summary(e["id"], e) for e in service.store.environments()]

    @app.get("/api/environments/{env_id}", tags=["environments"])
    async def environment(env_id: str, who: Viewer) -> dict[str, Any]:
        out = summary(env_id)
        live = service.plane.environments.get(env_id)
        if live is not None:
            cached = trees.get(env_id)
            if cached is None or cached[0] != live.version:
                for gone in [k for k in trees if k not in service.plane.environments]:
                    del trees[gone]  # environments that ended
                cached = trees[env_id] = (live.version, role_tree(live))
            out["roles"] = cached[1]
            out["channels"] = channels(live)
        out["transitions"] = service.store.transitions(env_id)
        return out

    @app.post("/api/environments/{env_id}/transitions", tags=["environments"])
    async def transition(env_id: str, req: TransitionRequest, who: Operator) -> dict[str, Any]:
        return await service.transition(env_id, req.event, who, wait=req.wait)

    @app.delete("/api/environments/{env_id}", tags=["environments"])
    async def destroy(env_id: str, who: Operator) -> dict[str, Any]:
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

    @app.get("/api/tasks", tags=["tasks"])
    async def tasks(
        who: Viewer,
        env: str | None = None,
        state: str | None = None,
        node: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
    ) -> list[dict[str, Any]]:
        return service.find_tasks(env=env, state=state, node=node, limit=limit, offset=offset)

    def one_task(task_id: str) -> dict[str, Any]:
        env, _, idx = task_id.partition(":")
        if not idx.isdigit() or len(idx) > 12:
            raise ServiceError(422, "Bad task id", f"{task_id!r}: expected ENVIRONMENT:INDEX")
        found = service.find_tasks(env=env, limit=1, offset=int(idx))
        if not found or found[0]["id"] != task_id:
            raise ServiceError(404, "No such task", f"no task {task_id!r}")
        return found[0]

    @app.get("/api/tasks/{task_id}", tags=["tasks"])
    async def task(task_id: str, who: Viewer) -> dict[str, Any]:
        return one_task(task_id)

    @app.get("/api/tasks/{task_id}/log", tags=["tasks"])
    async def task_log(
        task_id: str, who: Viewer, lines: Annotated[int, Query(ge=1, le=MAX_LOG_LINES)] = 100
    ) -> dict[str, Any]:
        t = one_task(task_id)
        if log_dir is None:
            raise ServiceError(404, "No logs", "this server keeps no task logs")
        path = os.path.join(log_dir, t["env"], t["path"] + ".log")
        return {"task": task_id, "path": path, "lines": tail(path, lines)}

    @app.get("/api/nodes", tags=["nodes"])
    async def nodes(who: Viewer) -> list[dict[str, Any]]:
        return service.plane.ledger.table()

    @app.post("/api/nodes/{name}/cordon", tags=["nodes"])
    async def cordon(name: str, req: CordonRequest, who: Admin) -> dict[str, Any]:
        try:
            service.plane.cordon(name, req.cordoned)
        except KeyError:
            raise ServiceError(404, "No such node", f"no node {name!r}") from None
        service.record({"kind": "node", "node": name, "cordoned": req.cordoned}, who.name)
        return {"node": name, "cordoned": req.cordoned}

    @app.post("/api/nodes/{name}/drain", tags=["nodes"])
    async def drain(name: str, who: Admin, dry_run: bool = False) -> dict[str, Any]:
        try:
            evicted = await service.plane.drain(name, dry_run=dry_run, actor=who.name)
        except KeyError:
            raise ServiceError(404, "No such node", f"no node {name!r}") from None
        return {"node": name, "dry_run": dry_run, "evict": evicted}

    @app.get("/api/runs", tags=["runs"])
    async def runs(who: Viewer, env: str | None = None) -> list[dict[str, Any]]:
        return service.store.runs(env)

    # -- events ----

    @app.get("/api/events", tags=["events"])
    async def events(
        who: Viewer,
        after: Annotated[int, Query(ge=0, le=MAX_INT)] = 0,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        env: str | None = None,
    ) -> list[dict[str, Any]]:
        return service.store.events(env=env, after=after, limit=limit)

    @app.get("/api/events/stream", tags=["events"], response_class=StreamingResponse)
    async def stream(
        request: Request,
        who: Viewer,
        after: Annotated[int | None, Query(ge=0, le=MAX_INT)] = None,
        env: str | None = None,
        last_event_id: Annotated[str | None, Header()] = None,
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

    @app.post("/api/tokens", tags=["auth"], status_code=201)
    async def create_token(req: TokenRequest, who: Admin) -> dict[str, str]:
        token_id, token = service.create_token(req.role, req.name, by=who.name)
        return {"id": token_id, "name": req.name, "role": req.role, "token": token}

    @app.get("/api/tokens", tags=["auth"])
    async def list_tokens(who: Admin) -> list[dict[str, Any]]:
        return service.store.tokens()

    @app.delete("/api/tokens/{token_id}", tags=["auth"])
    async def revoke_token(token_id: str, who: Admin) -> dict[str, str]:
        service.revoke_token(token_id, by=who.name)
        return {"id": token_id, "status": "revoked"}

    @app.get("/api/locks", tags=["locks"])
    async def locks(who: Viewer) -> dict[str, Any]:
        return service.store.locks()

    @app.post("/api/locks", tags=["locks"])
    async def lock(req: LockRequest, who: Operator) -> dict[str, Any]:
        if req.force and not who.can("admin"):
            raise ServiceError(403, "Forbidden", "only an admin may force-release a lock")
        service.lock(req.detectors, who, release=req.action == "release", force=req.force)
        return service.store.locks()

    # -- the web GUI ----------------------------------------------------------------------------

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC, "index.html"))

    # -- metrics ----

    @app.get("/metrics", tags=["metrics"], response_class=Response)
    async def prometheus(who: Viewer) -> Response:  # any token: what runs is not public
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


_frames: dict[int, bytes] = {}


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


def tail(path: str, lines: int) -> list[str]:
    """The last ``lines`` lines of a file, reading at most its last 1 MiB."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - (1 << 20)))
            data = fh.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    return text[-lines:]


def role_tree(env: Any) -> list[dict[str, Any]]:
    """The roles above the tasks (path prefixes), with their aggregated states, parents
    before children. Task roles themselves are the task list's business."""
    from corral.lifecycle.task import aggregate

    per: dict[str, list[tuple[str, bool]]] = {}
    for t in env.tasks:
        if t.hook:
            continue
        parts = t.spec.path.split(".")
        for i in range(1, len(parts)):
            per.setdefault(".".join(parts[:i]), []).append((t.state, t.spec.critical))
    return [
        {"path": path, "state": aggregate(states), "tasks": len(states)}
        for path, states in sorted(per.items())
    ]


def channels(env: Any) -> list[dict[str, Any]]:
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
