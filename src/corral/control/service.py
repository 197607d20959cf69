"""The control service: what a long-lived server does, for the API to call.

How this runs. One ``ControlService`` on the server's event loop owns the control
plane (store, backend, bus), the workflows directory, the access tokens and the
detector locks. API handlers call its methods and never touch the store or the
backend themselves. Transitions run as asyncio tasks of their own (one per request,
not per task), so a request can start one and answer at once, or wait for it.

Template expansion (create, validate, render) is the one long piece of CPU work a
request asks for: it runs in a worker thread (``asyncio.to_thread``), at most
``max_expansions`` at once; more wait their turn, up to ``max_waiting``, and beyond
that are refused (503). So the loop keeps seeing failures and answering while a big
template expands.

Policy comes from what the server knows, never from what a caller says alone: the
detectors an environment uses are those of the nodes its tasks are placed on (their
``detector`` label), plus those its template files declare, plus those the caller's
variables name (a variable adds to the check, never removes); they are checked against
the locks once the placement is known and before anything is stored or launched, in
one synchronous step (no other request runs in between). The priority class is the one
the plan resolves to, limited per role (``role_priority``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from corral.calls import CallError
from corral.control import heap, recipes
from corral.control.environment import Environment, TransitionError
from corral.control.journal import StoreUnavailable
from corral.control.ledger import PlacementError, priority_of
from corral.control.plane import Admit, ControlPlane, new_environment_id
from corral.control.site import DplRunner, make_site, repository_of, with_store
from corral.model.plan import Plan, PublicVar
from corral.planning.preemption import PRIORITY_CLASSES
from corral.store.files import DiskSources
from corral.templates import Diagnostic, check
from corral.templates.public import bad_values, refusals
from corral.templates.public import declared as declared_public
from corral.templates.schema import PUBLIC_TAG
from corral.templates.services import RecordingSite, Site

ROLES = ("viewer", "operator", "admin")
# the highest priority class each role may create environments with (None: none);
# ``corral serve --role-priority ROLE=CLASS`` changes it
DEFAULT_ROLE_PRIORITY: Mapping[str, str | None] = {
    "viewer": None,
    "operator": "async",
    "admin": "online",
}
DETECTOR_KEYS = ("detector", "detectors")  # variables and node labels that name detectors
DETECTOR_NAME = re.compile(r"[A-Z0-9][A-Z0-9_-]{0,63}")  # a lockable name, in capitals
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
    """What the store keeps of a token: its SHA-256, in hex; never the token itself.

    A token is 192 random bits (``create_token``): no salt or slow hash is needed, as
    there is nothing to guess from a digest."""
    return hashlib.sha256(token.encode()).hexdigest()


RuntimeWrites = dict[tuple[str, str], str]  # runtime.Set of an expansion: (component, key) -> value


class ControlService:
    def __init__(
        self,
        plane: ControlPlane,
        *,
        workflows: str,
        clock: Callable[[], float] = time.time,
        role_priority: Mapping[str, str | None] | None = None,
        max_expansions: int = 2,
        max_waiting: int = 16,
        expansion_time_limit: float = 60.0,
        site_defaults: Mapping[str, str] | None = None,
        run_dpl: bool = False,
    ) -> None:
        """``role_priority``: the highest priority class per role (ValueError for a
        class the plane does not know), over DEFAULT_ROLE_PRIORITY. ``max_expansions``
        template expansions run at once (in threads); ``max_waiting`` more may wait.
        ``site_defaults``: what the site gives every template (under its own defaults);
        ``run_dpl``: dpl.Generate* may run DPL commands (``control.site``)."""
        self.plane = plane
        self.store = plane.store
        self.workflows = os.path.realpath(workflows)
        nested = os.path.join(self.workflows, "workflows")
        if os.path.isdir(nested):  # an AliECS repository: workflows/, tasks/, jit/
            self.workflows = nested
        self.clock = clock
        self._jobs: dict[str, asyncio.Task[str]] = {}
        self.priority_limits = priority_limits(plane.priority_classes, role_priority or {})
        self.max_expansions = max_expansions
        self.max_waiting = max_waiting
        self.expansion_time_limit = expansion_time_limit  # seconds one expansion may take
        self._expansions = asyncio.Semaphore(max_expansions)
        self._waiting = 0
        self._running = 0  # expansions in worker threads now
        self._declared: dict[str, dict[str, str]] = {}  # environment -> its template's detectors
        self.site_defaults = dict(site_defaults or {})
        self.run_dpl = run_dpl
        self._dpl_runners: dict[str, DplRunner] = {}  # by workflow repository
        # role trees of the environments run here: (the plan's, (state version, rows))
        self._trees: dict[str, tuple[RoleTree, tuple[int, list[dict[str, Any]]] | None]] = {}
        self._building: dict[str, asyncio.Future[RoleTree]] = {}
        plane.admit_moves = self._admit_moves

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
        if any(t["name"] == name and t["revoked"] is None for t in self.store.tokens()):
            # locks and events name a token's holder by its name: one name, one holder
            raise ServiceError(
                409, "Name taken", f"an active token is already named {name!r}: revoke it "
                "first, or choose another name", name=name,
            )  # fmt: skip
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
        """The holder of an active token, or None. The store finds the row by the token's
        digest (so its lookup's timing depends on a hash, not on the token); the digest
        found is then compared with ``hmac.compare_digest``, in constant time."""
        if not token:
            return None
        wanted = digest(token)
        row = self.store.token_by_hash(wanted)
        if row is None or not hmac.compare_digest(str(row["hash"]), wanted):
            return None
        return Principal(row["id"], row["name"], row["role"])

    # -- locks -------------------------------------------------------------------------------

    def lock(self, detectors: list[str], who: Principal, *, release: bool, force: bool) -> None:
        held = self.store.locks()
        take: list[str] = []
        drop: list[str] = []
        for d in dict.fromkeys(d.strip().upper() for d in detectors):  # each once, in order
            if not DETECTOR_NAME.fullmatch(d):
                raise ServiceError(
                    422, "Bad detector", f"detector name {d!r}: use 1 to 64 letters, digits, "
                    "'_' and '-' (names are compared in capitals)",
                )  # fmt: skip
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

    def check_locks(self, detectors: Mapping[str, str] | Iterable[str], who: Principal) -> None:
        """423 when one of these detectors is locked by someone else; with a mapping,
        the message says what uses the detector (its value)."""
        self._check_locks(detectors, who.name)

    def _check_locks(self, detectors: Mapping[str, str] | Iterable[str], name: str | None) -> None:
        held = self.store.locks()
        why = detectors if isinstance(detectors, Mapping) else {}
        for d in sorted(detectors):
            owner = held.get(d, {}).get("holder")
            if owner is not None and owner != name:
                use = why.get(d)
                detail = f"detector {d} is locked by {owner}" + (f": {use}" if use else "")
                raise ServiceError(
                    423, "Detector locked", detail, holder=owner, detector=d, used_by=use
                )

    def _node_detectors(self) -> dict[str, list[str]]:
        """The detectors of each node that has any (its ``detector``/``detectors`` label)."""
        out: dict[str, list[str]] = {}
        for n in self.plane.ledger.nodes:
            names = [d for key in DETECTOR_KEYS for d in detector_names(n.label(key) or "")]
            if names:
                out[n.name] = names
        return out

    def _uses(
        self, placed: Iterable[tuple[str, str]], plan: Plan, declared: Mapping[str, str]
    ) -> dict[str, str]:
        """The detectors an environment uses, each with what makes it use it: the nodes
        its tasks are placed on (``placed``: task path and node), what its template
        files declare, and what the caller's variables name."""
        labels = self._node_detectors()
        out: dict[str, str] = {}
        if labels:
            seen: set[str] = set()
            for path, node in placed:
                if node not in seen:
                    seen.add(node)
                    for d in labels.get(node, ()):
                        out.setdefault(d, f"task {path} runs on node {node} (detector {d})")
        for d, why in declared.items():
            out.setdefault(d, why)
        public = {p.name: p.value for p in plan.public}
        for key in DETECTOR_KEYS:
            value = plan.variables.get(key)
            why = f"the variable {key}={value} names it"
            if value is None and key in public:  # a public choice left at its default
                value = public[key]
                why = f"the variable {key} is {value} (its default)"
            if value:
                for d in detector_names(value):
                    out.setdefault(d, why)
        return out

    def uses(self, env: Environment) -> dict[str, str]:
        """The detectors an environment uses, where its tasks are now (see ``_uses``)."""
        declared = self._declared.get(env.id)
        if declared is None:
            declared = self._declared[env.id] = declared_of(env.recipe, env.plan)
        return self._uses(((t.spec.path, t.node) for t in env.tasks), env.plan, declared)

    def _admit_moves(self, env: Environment, moved: Sequence[tuple[str, str]]) -> None:
        """RECOVER moves tasks off lost nodes: 423 (the transition fails) when a new
        node's detector is locked by someone other than who asked for the RECOVER."""
        labels = self._node_detectors()
        uses: dict[str, str] = {}
        for path, node in moved:
            for d in labels.get(node, ()):
                uses.setdefault(d, f"task {path} would move to node {node} (detector {d})")
        if uses:
            self._check_locks(uses, env.actor)

    def _admission(self, who: Principal, declared: Mapping[str, str]) -> Admit:
        """What judges a placement: 423 when it uses a detector someone else locked."""

        def admit(plan: Plan, nodes: Sequence[str]) -> None:
            placed = zip((t.path for t in plan.tasks), nodes, strict=True)
            self.check_locks(self._uses(placed, plan, declared), who)

        return admit

    def _protected(self, who: Principal, priority: int) -> dict[str, str]:
        """The lower-priority environments a preemption by ``who`` may not evict, and
        why: those that use a detector locked by someone other than ``who``, and those
        whose owner holds the lock on a detector they use. An admin's preemption may
        evict anything of lower priority."""
        if who.can("admin"):
            return {}
        held = {d: str(row["holder"]) for d, row in self.store.locks().items()
                if row.get("holder") is not None}  # fmt: skip
        if not held:
            return {}
        out: dict[str, str] = {}
        for h in self.plane.ledger.holders():
            env = self.plane.environments.get(h.key)
            if h.priority >= priority or env is None or h.key in out:
                continue
            uses = self.uses(env)
            for d in sorted(uses):
                holder = held.get(d)
                if holder is not None and holder != who.name:
                    out[h.key] = f"it uses detector {d}, locked by {holder}: {uses[d]}"
                    break
                if holder is not None and holder == env.created_by:
                    out[h.key] = (f"its owner {holder} holds the lock on detector {d}, "
                                  f"which it uses: {uses[d]}")  # fmt: skip
                    break
        return out

    # -- priorities ----------------------------------------------------------------------------

    def check_priority(self, plan: Plan, who: Principal) -> tuple[str, int]:
        """The plan's priority class (as placement resolves it), if ``who`` may use it:
        403 when it is above the role's highest, 422 when there is no such class."""
        try:
            name, rank = priority_of(plan, self.plane.priority_classes)
        except ValueError as e:
            raise ServiceError(422, "Bad variable", str(e)) from None
        return self.check_class(name, rank, who)

    def check_class(self, name: str, rank: int, who: Principal) -> tuple[str, int]:
        """Priority class ``name`` (of rank ``rank``), if ``who`` may use it (else 403)."""
        limit = self.priority_limits.get(who.role)
        if limit is None or rank > limit[1]:
            highest = "none" if limit is None else f"{limit[0]} ({limit[1]})"
            raise ServiceError(
                403, "Priority not allowed", f"priority class {name} ({rank}) is not allowed "
                f"for {who.name}, {an(who.role)}: the highest {an(who.role)} may use is {highest}",
                priority_class=name, role=who.role,
                allowed=None if limit is None else limit[0],
            )  # fmt: skip
        return name, rank

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
        """Expand on the calling thread (blocks it; on the loop, prefer ``expand_async``)."""
        plan, diags, path, _, _, _ = self._expand(name, variables, env_id=env_id)
        return plan, diags, path

    async def expand_async(
        self, name: str, variables: dict[str, str], who: Principal
    ) -> tuple[Plan | None, list[Diagnostic], str]:
        """Expand in a worker thread (see ``_expanded``): the loop goes on meanwhile.
        Refused (403) when ``who`` may not set one of the variables."""
        # reads and parses the workflow's files: off the loop, like the expansion
        await asyncio.to_thread(self.precheck_variables, name, variables, who)
        plan, diags, path, _, _, _ = await self._expanded(name, variables)
        self.check_variables(plan, variables, who, path)
        return plan, diags, path

    def precheck_variables(self, name: str, variables: dict[str, str], who: Principal) -> None:
        """``check_variables`` before expanding, on what the workflow's file declares
        (without its includes, which may declare more: then only the types are
        checked), so that a refused variable costs no expansion."""
        if who.can("admin") or not variables:
            return
        public, where, includes = declared_public(self.workflow_path(name), DiskSources())
        self._refuse(public, {} if includes else variables, variables, who, where)

    def check_variables(
        self, plan: Plan | None, variables: dict[str, str], who: Principal, path: str
    ) -> None:
        """Only an admin sets variables the workflow does not declare ``!public`` (403),
        or public ones with a value not of their type or not among their values (422).
        For a template that did not expand, a variable none of its files declares (as
        far as they are known without expanding) is refused before its errors are said."""
        if who.can("admin") or not variables:
            return
        if plan is not None:
            self._refuse(plan.public, variables, variables, who)
            return
        public, where, _ = declared_public(path, DiskSources())
        self._refuse(public, variables, {}, who, where)

    @staticmethod
    def _refuse(
        public: Sequence[PublicVar],
        names: dict[str, str],
        values: dict[str, str],
        who: Principal,
        where: Mapping[str, str] | None = None,
    ) -> None:
        """403 for ``names`` not declared public, 422 for ``values`` not of their type."""
        problems = refusals(public, names)
        if problems:
            offered = ", ".join(sorted(p.name for p in public)) or "none"
            refused = ", ".join(n for n in names if n not in {p.name for p in public})
            raise ServiceError(
                403, "Variable not allowed",
                f"{who.name}, {an(who.role)}, may set only the public variables "
                f"of this workflow ({offered}), not {refused}; an admin may set any",
                errors=[{"message": p} for p in problems], role=who.role,
            )  # fmt: skip
        problems = bad_values(public, values, where or {})
        if problems:
            raise ServiceError(
                422, "Bad variable", f"{len(problems)} variables have values not allowed",
                errors=[{"message": p} for p in problems],
            )  # fmt: skip

    async def _expanded(
        self, name: str, variables: dict[str, str], *, env_id: str = ""
    ) -> tuple[Plan | None, list[Diagnostic], str, str, dict[str, str], RuntimeWrites]:
        """``_expand`` in a worker thread, at most ``max_expansions`` at once; up to
        ``max_waiting`` more wait for their turn, and beyond that it is refused (503).
        A request that goes away does not free its slot before its expansion ends."""
        self.workflow_path(name)  # a bad name is refused at once, without a turn
        if self._expansions.locked() and self._waiting >= self.max_waiting:
            raise ServiceError(
                503, "Too many expansions", f"{self.max_expansions} template expansions are "
                f"under way and {self._waiting} more wait: try again later",
            )  # fmt: skip
        self._waiting += 1
        try:
            await self._expansions.acquire()
        finally:
            self._waiting -= 1
        job = asyncio.ensure_future(asyncio.to_thread(self._expand, name, variables, env_id=env_id))
        self._running += 1

        def done(j: asyncio.Future[Any]) -> None:
            self._running -= 1
            self._expansions.release()
            if not j.cancelled():
                j.exception()  # seen here when the request went away
            if self._running == 0 and not gc.isenabled():
                # The expander and heap.building switch the collector off and back on
                # around their work; from two threads at once, a switch between one's
                # "is it on?" and its "off" can leave it off for good. Here (on the loop,
                # never inside a building step) with no expansion left, it must be on.
                gc.enable()

        job.add_done_callback(done)
        return await asyncio.shield(job)

    def _expand(
        self, name: str, variables: dict[str, str], *, env_id: str = ""
    ) -> tuple[Plan | None, list[Diagnostic], str, str, dict[str, str], RuntimeWrites]:
        """The plan, the errors, the workflow's path, the recipe to expand it again and
        the detectors its template files declare (see ``declared_detectors``)."""
        path = self.workflow_path(name)
        defaults = {
            **self.site_defaults,
            "python": sys.executable,
            "workflow_dir": os.path.dirname(path),
        }
        if env_id:
            defaults["environment_id"] = env_id
        seed = env_id or "0"
        sources = recipes.RecordingSources(DiskSources())
        inner = self._site(path)
        site = RecordingSite(inner)
        reader = self.store.config_reader()  # its own connection: this is a worker thread
        try:
            with_store(inner, reader)
            with heap.building():  # a plan lives as long as its environment
                plan, diags = check(
                    path, sources, variables=variables, global_defaults=defaults, seed=seed,
                    time_limit=self.expansion_time_limit, clock=time.monotonic, services=site,
                )  # fmt: skip
        finally:
            reader.close()
        recipe = recipes.make(path, sources.files, variables, defaults, seed, site.record)
        declared = declared_detectors(sources.files) if plan is not None else {}
        return plan, diags, path, recipe, declared, dict(inner.runtime_writes)

    def _runtime_writes(self, writes: RuntimeWrites, who: Principal) -> None:
        """runtime.Set of an environment's template, once the environment exists (a dry
        run or a refused create writes nothing); one transaction."""
        if not writes:
            return
        now = self.clock()

        def put() -> None:
            self.store.runtime_set_many(
                [(c, k, v) for (c, k), v in writes.items()], f"template ({who.name})", now
            )

        try:
            self.plane.journal.call(put)
        except (StoreUnavailable, ValueError) as e:  # the environment exists: said, not fatal
            log.warning("runtime.Set of a template not stored: %s", e)

    def _site(self, path: str) -> Site:
        """What the expansion of ``path`` reads of the site (``control.site``)."""
        runner = None
        if self.run_dpl:
            repo = repository_of(path)
            runner = self._dpl_runners.get(repo)
            if runner is None:
                runner = self._dpl_runners[repo] = DplRunner(repo)
        catalog = self.plane.services.snapshot  # replaced, never changed: safe in a thread
        return make_site(path, self.plane.ledger.nodes, run_dpl=runner, catalog=catalog)

    # -- environments ----------------------------------------------------------------------------

    async def create(self, name: str, variables: dict[str, str], who: Principal) -> Environment:
        """Expand (off the loop), check the priority class, place, check the detector
        locks against the placement, create: the last three with no await between."""
        c = await self._checked_plan(name, variables, who)
        env = self._placed(c.plan, lambda: self.plane.create(
            c.plan, env_id=c.env_id, source=c.path, created_by=who.name, recipe=c.recipe,
            admit=self._admission(who, c.declared)))  # fmt: skip
        self._declared[env.id] = c.declared
        self._runtime_writes(c.writes, who)
        return env

    async def create_preempting(
        self, name: str, variables: dict[str, str], who: Principal, *, dry_run: bool
    ) -> tuple[list[str], Environment | None, dict[str, str]]:
        """Create, evicting lower-priority environments if needed; a dry run only says
        what would go. Returns the evicted, the environment (None for a dry run) and the
        environments protected from eviction, with why: for anyone but an admin, those
        that use a detector someone other than the caller locked."""
        c = await self._checked_plan(name, variables, who)
        protected = self._protected(who, c.priority)  # (no await from here to the decision)
        try:
            evicted, env = await self.plane.create_preempting(
                c.plan, dry_run=dry_run, env_id=c.env_id, actor=who.name, source=c.path,
                recipe=c.recipe, protected=protected, admit=self._admission(who, c.declared),
            )  # fmt: skip
        except ValueError as e:
            raise ServiceError(422, "Bad variable", str(e)) from None
        except PlacementError as e:
            raise _nofit(e, len(c.plan.tasks), protected=protected) from None
        except StoreUnavailable as e:
            raise ServiceError(503, "Store unavailable", str(e)) from None
        if env is not None:
            self._declared[env.id] = c.declared
            self._runtime_writes(c.writes, who)
        return evicted, env, protected

    def _placed(self, plan: Plan, make: Callable[[], Environment]) -> Environment:
        try:
            return make()
        except ValueError as e:  # a bad priority_class
            raise ServiceError(422, "Bad variable", str(e)) from None
        except PlacementError as e:
            raise _nofit(e, len(plan.tasks)) from None
        except StoreUnavailable as e:
            raise ServiceError(503, "Store unavailable", str(e)) from None

    async def _checked_plan(self, name: str, variables: dict[str, str], who: Principal) -> _Checked:
        """The plan (expanded off the loop) and what goes with it; refused when its
        priority class is not the caller's to use, a call is unknown, or a detector its
        template or the caller's variables name is locked by someone else. The nodes'
        detectors are checked once the tasks are placed (``_admission``)."""
        if self.priority_limits.get(who.role) is None:  # no class at all: do not expand
            raise ServiceError(
                403, "Priority not allowed", f"{who.name}, {an(who.role)}, may use no priority "
                f"class: the highest {an(who.role)} may use is none", role=who.role, allowed=None,
            )  # fmt: skip
        # reads and parses the workflow's files: off the loop, like the expansion
        await asyncio.to_thread(self.precheck_variables, name, variables, who)
        env_id = new_environment_id()
        plan, diags, path, recipe, declared, writes = await self._expanded(
            name, variables, env_id=env_id
        )
        self.check_variables(plan, variables, who, path)
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
        _, rank = self.check_priority(plan, who)
        # what the template and the caller name, at once (the placement adds its nodes')
        self.check_locks(self._uses((), plan, declared), who)
        for gone in [k for k in self._declared if k not in self.plane.environments]:
            del self._declared[gone]  # (environments that ended since)
        return _Checked(plan, env_id, recipe, path, declared, rank, writes)

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

        if env is not None:
            e = live.get(env)
            if e is None:
                return self.store.find_tasks(
                    env=env, state=state, node=node, limit=limit, offset=offset
                )
            return list(itertools.islice(_matching(e, state, node, None), offset, offset + limit))
        stored = self.store.find_tasks(
            state=state, node=node, limit=offset + limit, exclude=sorted(live)
        )
        merged = heapq.merge(
            stored,
            *(_matching(live[k], state, node, None) for k in sorted(live)),
            key=lambda r: (r["env"], r["idx"]),
        )
        return list(itertools.islice(merged, offset, offset + limit))

    def task_page(
        self,
        env: str,
        *,
        state: str | None = None,
        node: str | None = None,
        role: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        """How many tasks of one environment match, and a page of them in index order:
        in ``state``, on ``node``, of ``role`` (the role itself, a task's, or any role
        above tasks). One pass over the tasks of an environment run here (~40 ms for
        150,000); an ended one is read from the store."""
        e = self.plane.environments.get(env)
        if e is not None:
            total = 0
            page: list[dict[str, Any]] = []
            end = offset + limit
            for t in _matching_tasks(e, state, node, role):
                if offset <= total < end:
                    page.append(t.row(env))
                total += 1
            return total, page
        if role is None and node is None:
            counts = self.store.task_states(env)
            total = counts.get(state, 0) if state is not None else sum(counts.values())
            return total, self.store.find_tasks(env=env, state=state, limit=limit, offset=offset)
        rows = self.store.find_tasks(env=env, state=state, node=node, limit=MAX_ROWS)
        if role is not None:
            below = role + "."
            rows = [r for r in rows if r["path"] == role or r["path"].startswith(below)]
        return len(rows), rows[offset : offset + limit]

    async def role_tree(
        self, env_id: str
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """The role tree of an environment run here, and its channels between roles (None
        for another): every role, its aggregated state and how many tasks it holds (see
        ``RoleTree``). The tree's shape is made once per environment, in a worker thread
        (~0.3 s for 150,000 tasks: the loop goes on meanwhile); its states once per
        change of state, when asked (~40 ms)."""
        for gone in [k for k in self._trees if k not in self.plane.environments]:
            del self._trees[gone]  # environments that ended
        e = self.plane.environments.get(env_id)
        if e is None:
            return None
        made = self._trees.get(env_id)
        if made is None or made[0].plan is not e.plan:
            building = self._building.get(env_id)
            if building is None:
                building = self._building[env_id] = asyncio.ensure_future(
                    asyncio.to_thread(RoleTree, e.plan)
                )
                building.add_done_callback(lambda _: self._building.pop(env_id, None))
            tree = await asyncio.shield(building)
            made = self._trees[env_id] = (tree, None)
            if self.plane.environments.get(env_id) is not e:
                return None  # it ended meanwhile
        tree, cached = made
        if cached is None or cached[0] != e.version:
            cached = (e.version, tree.rows(e.tasks))
            self._trees[env_id] = (tree, cached)
        return cached[1], tree.flows

    async def transition(
        self, env_id: str, event: str, who: Principal, *, wait: bool
    ) -> dict[str, Any]:
        env = self.get(env_id)
        self.check_locks(self.uses(env), who)
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
            if task.done() and task.cancelled():  # a destroy came first (exception() would raise)
                raise ServiceError(
                    409, "Transition interrupted", f"{event.upper()} was interrupted: the "
                    f"environment was destroyed meanwhile", state=env.state,
                )  # fmt: skip
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
        self.check_locks(self.uses(env), who)
        job = self._jobs.pop(env_id, None)
        if job is not None and not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, TransitionError):
                await job
        try:
            await self.plane.destroy(env_id, actor=who.name)
            self._declared.pop(env_id, None)
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


@dataclass(frozen=True, slots=True)
class _Checked:
    """A plan ready to place: its id, recipe, workflow path, the detectors its template
    declares (detector -> where) and its priority rank."""

    plan: Plan
    env_id: str
    recipe: str
    path: str
    declared: dict[str, str]
    priority: int
    writes: RuntimeWrites  # runtime.Set of the template: applied once the environment exists


def priority_limits(
    classes: Mapping[str, int], configured: Mapping[str, str | None]
) -> dict[str, tuple[str, int] | None]:
    """Each role's highest priority class (name, rank), or None for none. A configured
    class must be one of ``classes`` (ValueError); a default one a site's own classes
    lack stands for the highest of them at most as high as the standard class."""
    out: dict[str, tuple[str, int] | None] = {}
    for role in ROLES:
        if role in configured:
            name = configured[role]
            if name is not None and name not in classes:
                known = ", ".join(f"{k} ({v})" for k, v in classes.items())
                raise ValueError(f"{role}={name}: no priority class {name!r} (classes: {known})")
            out[role] = None if name is None else (name, classes[name])
            continue
        name = DEFAULT_ROLE_PRIORITY.get(role)
        if name is None:
            out[role] = None
        elif name in classes:
            out[role] = (name, classes[name])
        else:
            fits = [(rank, k) for k, rank in classes.items() if rank <= PRIORITY_CLASSES[name]]
            out[role] = None if not fits else (max(fits)[1], max(fits)[0])
    return out


def an(role: str) -> str:
    """``role`` with its article: "an operator", "a viewer"."""
    return ("an " if role[:1] in "aeiou" else "a ") + role


def detector_names(value: str) -> list[str]:
    """Detectors in a variable's or label's value: a comma (or semicolon) list, or a
    JSON list."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if isinstance(items, list):
            return [str(i).strip().upper() for i in items if str(i).strip()]
    return [d.strip().upper() for d in text.replace(";", ",").split(",") if d.strip()]


def declared_detectors(files: Mapping[str, str]) -> dict[str, str]:
    """The detectors template files declare, each with where: every ``detector`` or
    ``detectors`` variable that a ``defaults`` or ``vars`` mapping of any of the files
    (workflow, includes, task classes) sets to a literal value, unless it is ``!public``
    (then it is the user's choice, and its value, the caller's or its default, counts).
    A value computed by an expression is not known before expansion: the nodes the
    tasks land on speak for it."""
    out: dict[str, str] = {}
    for path in sorted(files):
        try:
            root = yaml.compose(files[path], Loader=yaml.CSafeLoader)
        except yaml.YAMLError:
            continue
        seen: set[int] = set()
        todo = [root] if root is not None else []
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                todo.extend(node.value)
            elif isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    todo.append(v)
                    if k.value not in ("defaults", "vars") or not isinstance(v, yaml.MappingNode):
                        continue
                    for name, value in v.value:
                        # a !public one is the user's choice: its value counts (_uses)
                        if name.value in DETECTOR_KEYS and value.tag != PUBLIC_TAG:
                            text = _literal(value)
                            for d in detector_names(text) if "{{" not in text else ():
                                out.setdefault(d, f"the template {os.path.basename(path)} "
                                               f"sets {name.value}={text}")  # fmt: skip
    return out


def _literal(node: yaml.Node) -> str:
    """A variable's value in a template file, as text: a scalar, a list (as JSON), or
    the ``value`` of a ``!public`` mapping."""
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    if isinstance(node, yaml.SequenceNode):
        return json.dumps([str(i.value) for i in node.value if isinstance(i, yaml.ScalarNode)])
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if k.value == "value":
                return _literal(v)
    return ""


def declared_of(recipe: str | None, plan: Plan) -> dict[str, str]:
    """What an environment's template declares (see ``declared_detectors``), from the
    files kept in its recipe; without one, its public ``detector`` defaults."""
    files: Any = None
    if recipe:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            files = json.loads(recipe).get("files")
    if isinstance(files, dict):
        return declared_detectors({str(k): str(v) for k, v in files.items()})
    out: dict[str, str] = {}
    for p in plan.public:
        if p.name in DETECTOR_KEYS:
            for d in detector_names(p.value):
                out.setdefault(d, f"the template sets {p.name}={p.value}")
    return out


# -- the role tree, and the task query -------------------------------------------------------

MAX_ROLE_ROWS = 1000  # rows of a role tree: the deepest roles are left out beyond
MAX_ROWS = 2**62  # no limit (the store's query takes one)


def _matching_tasks(
    e: Environment, state: str | None, node: str | None, role: str | None
) -> Iterator[Any]:
    """The tasks of a live environment in ``state``, on ``node``, of ``role``."""
    tasks: Iterable[Any] = e.tasks
    if role is not None:
        one = e.by_path.get(role)
        if one is not None:  # a task's own role
            tasks = (one,)
        else:
            below = role + "."
            tasks = (t for t in tasks if t.spec.path.startswith(below))
    for t in tasks:
        if (state is None or t.state == state) and (node is None or t.node == node):
            yield t


def _matching(
    e: Environment, state: str | None, node: str | None, role: str | None
) -> Iterator[dict[str, Any]]:
    for t in _matching_tasks(e, state, node, role):
        yield t.row(e.id)


class RoleTree:
    """The roles of an environment's plan: each role of a task or a call, and each role
    above them, depth first, siblings in the plan's order (its tasks', then its calls').

    Every role is listed, down to the depth at which the tree would pass
    ``MAX_ROLE_ROWS`` rows (150,000 task roles under a few hundred node roles: the node
    roles are listed); a listed role whose children are not says how many it has
    (``unlisted``); the task query finds its tasks by role. A row's ``state`` is
    aggregated over the tasks below it (``lifecycle.task.aggregate``), and ``tasks``
    counts them, hook tasks left out (as in the environment's counts) but in their own
    row; a role of calls only holds no task (state None).

    The shape is made once per plan (O(tasks)); ``rows`` aggregates the states of the
    moment in one pass over the tasks (~40 ms for 150,000), and ``flows`` is the channel
    graph between the listed roles, for a graph that collapses by role."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        under: dict[str, list[str]] = {}  # role -> its child roles, in the plan's order
        seen: set[str] = set()
        per_depth: dict[int, int] = {}
        for path in itertools.chain((t.path for t in plan.tasks), (c.path for c in plan.calls)):
            p = path
            while p and p not in seen:
                seen.add(p)
                parent = p.rpartition(".")[0]
                kids = under.get(parent)
                if kids is None:
                    kids = under[parent] = []
                kids.append(p)
                d = p.count(".") + 1
                per_depth[d] = per_depth.get(d, 0) + 1
                p = parent
        depth, listed = 1, per_depth.get(1, 0)
        while depth + 1 in per_depth and listed + per_depth[depth + 1] <= MAX_ROLE_ROWS:
            depth += 1
            listed += per_depth[depth]
        self.depth = depth  # the deepest roles listed
        self.paths: list[str] = []
        self.parent: list[int] = []  # the row of each row's parent (-1: none)
        self.unlisted: list[int] = []  # child roles not listed
        self.index: dict[str, int] = {}  # every role -> its row, or the row it is counted in
        stack: list[tuple[str, int]] = [(p, -1) for p in reversed(under.get("", []))]
        while stack:
            p, up = stack.pop()
            row = len(self.paths)
            self.paths.append(p)
            self.parent.append(up)
            self.index[p] = row
            kids = under.get(p, [])
            if p.count(".") + 1 < depth:
                self.unlisted.append(0)
                stack.extend((k, row) for k in reversed(kids))
                continue
            self.unlisted.append(len(kids))
            below = list(kids)
            while below:  # the roles under a row not listed count in it
                k = below.pop()
                self.index[k] = row
                more = under.get(k)
                if more:
                    below.extend(more)
        # each task's row: its own role's, or its deepest listed role's
        index = self.index
        self.task_row = [index[t.path] for t in plan.tasks]
        self.flows = self._flows(plan)

    def _flows(self, plan: Plan) -> list[dict[str, Any]]:
        """The channels between the listed roles: one edge per pair of rows (the way
        data flows, as the environment's ``channels`` say), with how many channels and
        of which types; channels to addresses outside the environment left out."""
        tasks = self.index  # (every role's path: the tasks' among them)
        pairs: dict[tuple[int, int], tuple[int, set[str]]] = {}
        for c in plan.connects:
            if c.bind_task is None or c.bind_task not in tasks or c.task not in tasks:
                continue
            a, b = (c.task, c.bind_task) if c.type in ("push", "pub") else (c.bind_task, c.task)
            key = (self.index[a], self.index[b])
            if key[0] == key[1]:
                continue
            n, types = pairs.get(key, (0, set()))
            types.add(c.type)
            pairs[key] = (n + 1, types)
        return [
            {"from": self.paths[a], "to": self.paths[b], "channels": n, "types": sorted(types)}
            for (a, b), (n, types) in pairs.items()
        ]

    def rows(self, tasks: Sequence[Any]) -> list[dict[str, Any]]:
        """The tree with the states of ``tasks`` (the environment's, in plan order)."""
        from corral.lifecycle.task import aggregate

        n = len(self.paths)
        pairs: list[dict[tuple[str, bool], int]] = [{} for _ in range(n)]
        hooks: dict[int, str] = {}  # a hook task's own row: its state
        for t, row in zip(tasks, self.task_row, strict=True):
            if t.hook:
                if self.paths[row] == t.spec.path:
                    hooks[row] = t.state
                continue
            d = pairs[row]
            key = (t.state, t.critical)
            d[key] = d.get(key, 0) + 1
        for row in range(n - 1, 0, -1):  # children come after their parent
            up = self.parent[row]
            if up >= 0:
                into = pairs[up]
                for key, k in pairs[row].items():
                    into[key] = into.get(key, 0) + k
        out = []
        for row, path in enumerate(self.paths):
            count = sum(pairs[row].values())
            if row in hooks:
                r: dict[str, Any] = {"path": path, "state": hooks[row], "tasks": 1}
            else:
                r = {"path": path, "state": aggregate(pairs[row]) if count else None,
                     "tasks": count}  # fmt: skip
            if self.unlisted[row]:
                r["unlisted"] = self.unlisted[row]
            out.append(r)
        return out


def _nofit(
    e: PlacementError, total: int, *, protected: Mapping[str, str] | None = None
) -> ServiceError:
    extra: dict[str, Any] = {} if protected is None else {"protected": dict(protected)}
    return ServiceError(
        409, "Does not fit", f"{e.nofit.failed} of {total} tasks do not fit",
        errors=[{"task": t, "message": f"{t}: {why}"} for t, why in e.nofit.reasons], **extra,
    )  # fmt: skip


def _diag(d: Diagnostic) -> dict[str, Any]:
    return {"message": str(d)}
