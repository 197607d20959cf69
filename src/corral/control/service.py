"""The control service: what a long-lived server does, for the API to call.

How this runs. One ``ControlService`` on the server's event loop owns the control
plane (store, backend, bus), the workflows directory, the access tokens and the
detector locks. API handlers call its methods and never touch the store or the
backend themselves. Transitions run as asyncio tasks of their own (one per request,
not per task), so a request can start one and answer at once, or wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import itertools
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from corral.calls import CallError
from corral.control import heap, recipes
from corral.control.environment import Environment, TransitionError
from corral.control.journal import StoreUnavailable
from corral.control.ledger import PlacementError
from corral.control.plane import ControlPlane, new_environment_id
from corral.model.plan import Plan
from corral.store.files import DiskSources
from corral.templates import Diagnostic, check

ROLES = ("viewer", "operator", "admin")
log = logging.getLogger("corral.service")


class ServiceError(Exception):
    """A request the service refuses; ``status`` is the HTTP status it maps to."""

    def __init__(self, status: int, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a token's id, name and role."""

    id: str
    name: str
    role: str

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ControlService:
    def __init__(
        self,
        plane: ControlPlane,
        *,
        workflows: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.plane = plane
        self.store = plane.store
        self.workflows = os.path.abspath(workflows)
        self.clock = clock
        self._jobs: dict[str, asyncio.Task[str]] = {}

    # -- tokens ------------------------------------------------------------------------------

    def first_admin_token(self) -> str | None:
        """A new admin token when there is none at all (the first start), else None."""
        if self.store.tokens():
            return None
        return self.create_token("admin", "admin", by=None)[1]

    def create_token(self, role: str, name: str, *, by: str | None) -> tuple[str, str]:
        if role not in ROLES:
            raise ServiceError(
                422, "Bad role", f"role {role!r}: expected one of {', '.join(ROLES)}"
            )
        token = "crl_" + secrets.token_urlsafe(24)
        token_id = secrets.token_hex(4)
        now = self.clock()
        try:
            self.plane.journal.call(
                lambda: self.store.add_token(token_id, name, role, digest(token), now, by)
            )
        except StoreUnavailable as e:
            raise ServiceError(503, "Store unavailable", str(e)) from None
        self._record({"kind": "token", "status": "CREATED", "token": token_id, "role": role,
                      "name": name}, by)  # fmt: skip
        return token_id, token

    def revoke_token(self, token_id: str, *, by: str) -> None:
        now = self.clock()
        try:
            revoked = self.plane.journal.call(lambda: self.store.revoke_token(token_id, now))
        except StoreUnavailable as e:
            raise ServiceError(503, "Store unavailable", str(e)) from None
        if not revoked:
            raise ServiceError(404, "No such token", f"no active token {token_id!r}")
        self._record({"kind": "token", "status": "REVOKED", "token": token_id}, by)

    def authenticate(self, token: str | None) -> Principal | None:
        if not token:
            return None
        row = self.store.token_by_hash(digest(token))
        return None if row is None else Principal(row["id"], row["name"], row["role"])

    # -- locks -------------------------------------------------------------------------------

    def lock(self, detectors: list[str], who: Principal, *, release: bool, force: bool) -> None:
        held = self.store.locks()
        take: list[str] = []
        drop: list[str] = []
        for d in dict.fromkeys(detectors):  # each once, in the order given
            if not d or len(d) > 64:
                raise ServiceError(422, "Bad detector", f"detector name {d!r} is empty or too long")
            owner = held.get(d, {}).get("holder")
            if release:
                if owner is None:
                    continue
                if owner != who.name and not force:
                    raise ServiceError(
                        409, "Locked by another", f"detector {d} is locked by {owner}",
                        holder=owner,
                    )  # fmt: skip
                drop.append(d)
            elif owner is None:
                take.append(d)
            elif owner != who.name:
                raise ServiceError(
                    409, "Locked by another", f"detector {d} is locked by {owner}", holder=owner
                )
        if take or drop:
            ev = {"kind": "lock", "actor": who.name, "taken": take, "released": drop,
                  "forced": force}  # fmt: skip
            now = self.clock()
            try:
                stored = self.plane.journal.call(
                    lambda: self.store.set_locks(take, drop, who.name, now, [ev])
                )
            except StoreUnavailable as e:
                raise ServiceError(503, "Store unavailable", str(e)) from None
            self.plane.journal.publish(stored)

    def check_locks(self, detectors: list[str], who: Principal) -> None:
        held = self.store.locks()
        for d in detectors:
            owner = held.get(d, {}).get("holder")
            if owner is not None and owner != who.name:
                raise ServiceError(
                    423, "Detector locked", f"detector {d} is locked by {owner}", holder=owner
                )

    # -- workflows -----------------------------------------------------------------------------

    def workflow_path(self, name: str) -> str:
        """A workflow of the workflows directory, by name or relative path; never outside."""
        if not name or "\0" in name:
            raise ServiceError(422, "Bad workflow", "the workflow name is empty")
        rel = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
        path = os.path.realpath(os.path.join(self.workflows, rel))
        if not path.startswith(self.workflows + os.sep):
            raise ServiceError(422, "Bad workflow", f"{name!r} is outside the workflows directory")
        if not os.path.isfile(path):
            raise ServiceError(404, "No such workflow", f"no workflow {name!r} in {self.workflows}")
        return path

    def list_workflows(self) -> list[dict[str, Any]]:
        out = []
        for entry in sorted(os.listdir(self.workflows)):
            if entry.endswith((".yaml", ".yml")) and os.path.isfile(
                os.path.join(self.workflows, entry)
            ):
                out.append({"name": entry.rsplit(".", 1)[0], "file": entry})
        return out

    def expand(
        self, name: str, variables: dict[str, str], *, env_id: str = ""
    ) -> tuple[Plan | None, list[Diagnostic], str]:
        plan, diags, path, _ = self._expand(name, variables, env_id=env_id)
        return plan, diags, path

    def _expand(
        self, name: str, variables: dict[str, str], *, env_id: str = ""
    ) -> tuple[Plan | None, list[Diagnostic], str, str]:
        """The plan, the errors, the workflow's path and the recipe to expand it again."""
        path = self.workflow_path(name)
        defaults = {"python": sys.executable, "workflow_dir": os.path.dirname(path)}
        if env_id:
            defaults["environment_id"] = env_id
        seed = env_id or "0"
        sources = recipes.RecordingSources(DiskSources())
        with heap.building():  # a plan lives as long as its environment
            plan, diags = check(
                path, sources, variables=variables, global_defaults=defaults, seed=seed
            )
        recipe = recipes.make(path, sources.files, variables, defaults, seed)
        return plan, diags, path, recipe

    # -- environments ----------------------------------------------------------------------------

    def create(self, name: str, variables: dict[str, str], who: Principal) -> Environment:
        plan, env_id, recipe = self._checked_plan(name, variables, who)
        return self._placed(plan, lambda: self.plane.create(
            plan, env_id=env_id, source=self.workflow_path(name), created_by=who.name,
            recipe=recipe))  # fmt: skip

    async def create_preempting(
        self, name: str, variables: dict[str, str], who: Principal, *, dry_run: bool
    ) -> tuple[list[str], Environment | None]:
        """Create, evicting lower-priority environments if needed (their holders' locks
        are not checked: priority decides); a dry run only says what would go."""
        plan, env_id, recipe = self._checked_plan(name, variables, who)
        try:
            return await self.plane.create_preempting(
                plan, dry_run=dry_run, env_id=env_id, actor=who.name,
                source=self.workflow_path(name), recipe=recipe,
            )  # fmt: skip
        except ValueError as e:
            raise ServiceError(422, "Bad variable", str(e)) from None
        except PlacementError as e:
            raise _nofit(e, len(plan.tasks)) from None
        except StoreUnavailable as e:
            raise ServiceError(503, "Store unavailable", str(e)) from None

    def _placed(self, plan: Plan, make: Callable[[], Environment]) -> Environment:
        try:
            return make()
        except ValueError as e:  # a bad priority_class
            raise ServiceError(422, "Bad variable", str(e)) from None
        except PlacementError as e:
            raise _nofit(e, len(plan.tasks)) from None
        except StoreUnavailable as e:
            raise ServiceError(503, "Store unavailable", str(e)) from None

    def _checked_plan(
        self, name: str, variables: dict[str, str], who: Principal
    ) -> tuple[Plan, str, str]:
        env_id = new_environment_id()
        plan, diags, _, recipe = self._expand(name, variables, env_id=env_id)
        if plan is None:
            raise ServiceError(
                422, "Template errors", f"{len(diags)} errors in {name}",
                errors=[_diag(d) for d in diags],
            )  # fmt: skip
        problems = []
        for c in plan.calls:
            try:
                self.plane.calls.check(c.func)
            except CallError as e:
                problems.append({"message": f"call {c.path}: {e}", "role": c.path})
        if problems:
            raise ServiceError(422, "Bad calls", f"{len(problems)} bad calls", errors=problems)
        self.check_locks(detectors_of(plan), who)
        return plan, env_id, recipe

    def get(self, env_id: str) -> Environment:
        env = self.plane.environments.get(env_id)
        if env is None:
            why = self.plane.left.get(env_id)
            if why is not None:
                raise ServiceError(
                    409, "Not controlled", f"environment {env_id} was left by a previous "
                    f"server and is not run by this one ({why}); destroy it (DELETE) and "
                    "create it anew",
                )  # fmt: skip
            if self.store.environment(env_id) is not None:
                raise ServiceError(
                    409, "Not controlled", f"environment {env_id} is not run by this server "
                    "(it ended)",
                )  # fmt: skip
            raise ServiceError(404, "No such environment", f"no environment {env_id!r}")
        return env

    def find_tasks(
        self,
        *,
        env: str | None = None,
        state: str | None = None,
        node: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        """Tasks in (environment, index) order, a page at a time. Those of environments
        run here are as the controller knows them now, never older (while the store
        refuses writes, it lags); the others are as stored."""
        live = self.plane.environments

        def mine(e: Environment) -> Iterator[dict[str, Any]]:
            for t in e.tasks:
                if (state is None or t.state == state) and (node is None or t.node == node):
                    yield t.row(e.id)

        if env is not None:
            e = live.get(env)
            if e is None:
                return self.store.find_tasks(
                    env=env, state=state, node=node, limit=limit, offset=offset
                )
            return list(itertools.islice(mine(e), offset, offset + limit))
        stored = self.store.find_tasks(
            state=state, node=node, limit=offset + limit, exclude=sorted(live)
        )
        merged = heapq.merge(
            stored, *(mine(live[k]) for k in sorted(live)), key=lambda r: (r["env"], r["idx"])
        )
        return list(itertools.islice(merged, offset, offset + limit))

    async def transition(
        self, env_id: str, event: str, who: Principal, *, wait: bool
    ) -> dict[str, Any]:
        env = self.get(env_id)
        self.check_locks(detectors_of(env.plan), who)
        job = self._jobs.get(env_id)
        if job is not None and not job.done():
            raise ServiceError(
                409,
                "Busy",
                f"environment {env_id} is running {env.transitioning or 'a transition'}",
            )
        task = asyncio.ensure_future(env.transition(event.upper(), actor=who.name))
        # a failure is in the environment's state and events; nobody awaits a started job
        task.add_done_callback(_consumed)
        self._jobs[env_id] = task
        if not wait:
            await asyncio.sleep(0)
            if task.done() and task.exception() is not None:
                exc = task.exception()
                raise ServiceError(409, "Transition refused", str(exc), state=env.state)
            return {"id": env_id, "state": env.state, "transition": event.upper(), "started": True}
        await asyncio.wait([task])  # (a destroy may cancel the job: that is an answer)
        if task.cancelled():
            raise ServiceError(
                409, "Transition interrupted", f"{event.upper()} was interrupted: the "
                f"environment was destroyed meanwhile", state=env.state,
            )  # fmt: skip
        try:
            state = task.result()
        except TransitionError as e:
            raise ServiceError(409, "Transition failed", str(e), state=e.state) from None
        return {"id": env_id, "state": state, "transition": event.upper(), "run_number":
                env.run_number}  # fmt: skip

    async def destroy(self, env_id: str, who: Principal) -> None:
        if env_id in self.plane.left:  # a previous server's: end what it left, and it
            await self.plane.forget(env_id, actor=who.name)
            return
        if self.plane.destroying(env_id):  # a second destroy at once: the same one
            await self.plane.destroy(env_id, actor=who.name)
            return
        env = self.get(env_id)
        self.check_locks(detectors_of(env.plan), who)
        job = self._jobs.pop(env_id, None)
        if job is not None and not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransitionError):
                await job
        try:
            await self.plane.destroy(env_id, actor=who.name)
        except Exception as e:
            log.exception("destroying environment %s", env_id)
            raise ServiceError(
                503, "Destroy incomplete", f"destroying {env_id} failed ({type(e).__name__}: "
                f"{e}); it is still run by this server: try again",
            ) from None  # fmt: skip

    async def close(self) -> None:
        for job in self._jobs.values():
            job.cancel()
        await self.plane.close()

    async def detach(self) -> None:
        """Stop without ending the environments: their agents run them on."""
        for job in self._jobs.values():
            job.cancel()
        await self.plane.detach()

    def record(self, event: dict[str, Any], actor: str | None) -> None:
        """Store and announce an event about an action (who did what)."""
        self._record(event, actor)

    def _record(self, event: dict[str, Any], actor: str | None) -> None:
        if actor is not None:
            event["actor"] = actor
        self.plane.record(event)


def _consumed(job: asyncio.Task[str]) -> None:
    """A transition nobody waits for ended: its failure is in the environment's state
    and events; anything else is a bug, and is logged, never dropped silently."""
    if job.cancelled():
        return
    exc = job.exception()
    if exc is not None and not isinstance(exc, TransitionError):
        log.error("a transition ended on an unexpected error", exc_info=exc)


def detectors_of(plan: Plan) -> list[str]:
    """The detectors an environment uses: its ``detector``/``detectors`` variables
    (as the user set them, else the template's public default)."""
    public = {p.name: p.value for p in plan.public}
    out: list[str] = []
    for key in ("detector", "detectors"):
        value = plan.variables.get(key, public.get(key))
        if value:
            out.extend(d.strip() for d in value.replace(";", ",").split(",") if d.strip())
    return sorted(set(out))


def _nofit(e: PlacementError, total: int) -> ServiceError:
    return ServiceError(
        409, "Does not fit", f"{e.nofit.failed} of {total} tasks do not fit",
        errors=[{"task": t, "message": f"{t}: {why}"} for t, why in e.nofit.reasons],
    )  # fmt: skip


def _diag(d: Diagnostic) -> dict[str, Any]:
    return {"message": str(d)}
