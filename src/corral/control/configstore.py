"""The configuration store as a service: payloads and runtime entries, with who asks.

How this runs. Beside ``ControlService``, on the server's event loop, over the same
store. Reads and writes are short SQLite transactions, done on the loop as the service
does its own (a write through the journal's ``call``, which runs after any write still
waiting and refuses with 503 while the store fails). A render is the one long piece of
work: it runs in a worker thread (``asyncio.to_thread``), which reads the payloads it
needs (``configpayload.sources``, all at one revision) on a read-only connection of its
own (``SqliteStore.config_reader``: stored versions never change, so it reads what the
store would); at most ``max_renders`` at once, ``max_waiting`` more waiting, beyond that
refused (503), each stopped after ``render_time_limit`` seconds.

Who may do what: any token reads (payloads, history, keys, renders, runtime entries);
only an admin writes (403 otherwise, and nothing is stored). The writer recorded with
each version is the token's name, and each write is an event (``config`` or
``runtime``: the key, the revision and version, the actor; never the payload).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from corral.control.journal import STORE_ERRORS, StoreUnavailable
from corral.control.service import ControlService, Principal, ServiceError, an
from corral.templates.configpayload import (
    ConfigError,
    ConfigNotFound,
    ConfigTooLarge,
    RenderError,
    render,
    resolve,
    sources,
)

RENDER_TIME_LIMIT = 10.0  # seconds one render may take
T = TypeVar("T")


class ConfigStore:
    def __init__(
        self,
        service: ControlService,
        *,
        max_renders: int = 2,
        max_waiting: int = 16,
        render_time_limit: float = RENDER_TIME_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: what a render's time limit is measured with."""
        self.service = service
        self.store = service.store
        self.max_renders = max_renders
        self.max_waiting = max_waiting
        self.render_time_limit = render_time_limit
        self.clock = clock
        self._renders = asyncio.Semaphore(max_renders)
        self._waiting = 0

    # -- payloads ----------------------------------------------------------------------------------

    def get(self, key: str, who: Principal, *, revision: int | None = None) -> dict[str, Any]:
        """The payload of ``key`` and its version (at ``revision``, else now); 404 when
        it has none."""
        row = _checked(lambda: self.store.config_get(key, revision))
        if row is None:
            at = "" if revision is None else f" at revision {revision}"
            raise ServiceError(404, "No such key", f"no configuration payload at {key}{at}")
        return row

    def put(self, key: str, payload: str, who: Principal) -> dict[str, Any]:
        """A new version of ``key`` (admin); its revision, version, writer and time."""
        _admin(who, f"write configuration payload {key!r}")
        now = self.service.clock()
        revision = _checked(
            lambda: self.service.plane.journal.call(
                lambda: self.store.config_put(key, payload, who.name, now)
            )
        )
        row = self.store.config_get(key, revision)
        assert row is not None
        del row["payload"]
        self.service.record(
            {"kind": "config", "key": key, "revision": revision, "version": row["version"]},
            who.name,
        )
        return row

    def history(self, key: str, who: Principal) -> list[dict[str, Any]]:
        """Every version of ``key``, oldest first (no payloads); 404 when none."""
        rows = _checked(lambda: self.store.config_history(key))
        if not rows:
            raise ServiceError(404, "No such key", f"no configuration payload at {key}")
        return rows

    def keys(
        self, who: Principal, *, prefix: str = "", revision: int | None = None
    ) -> dict[str, Any]:
        """The keys under ``prefix`` at ``revision`` (else now), and that revision."""
        at = self._revision(revision)
        found = _checked(lambda: self.store.config_keys(prefix, at))
        return {"revision": at, "prefix": prefix, "keys": found}

    def resolve(
        self,
        component: str,
        run_type: str,
        role_name: str,
        entry_key: str,
        who: Principal,
        *,
        revision: int | None = None,
    ) -> str:
        """The key apricot's ResolveComponentQuery finds (404 when none)."""
        at = self._revision(revision)
        exists = _Exists(self.store, at)
        return _checked(lambda: resolve(component, run_type, role_name, entry_key, exists))

    async def render(
        self,
        key: str,
        variables: Mapping[str, str],
        who: Principal,
        *,
        revision: int | None = None,
    ) -> dict[str, Any]:
        """``key`` rendered with ``variables`` at ``revision`` (else now): ``key``,
        ``revision``, ``text`` and ``includes`` (the keys it read). 404 when there is no
        payload at ``key``; 422 with ``key`` and ``line`` for a template error."""
        at = self._revision(revision)
        if self._renders.locked() and self._waiting >= self.max_waiting:
            raise ServiceError(
                503, "Too many renders", f"{self.max_renders} renders are under way and "
                f"{self._waiting} more wait: try again later",
            )  # fmt: skip
        self._waiting += 1
        try:
            await self._renders.acquire()
        finally:
            self._waiting -= 1
        values = dict(variables)

        def work() -> tuple[str, dict[str, str]]:
            reader = self.store.config_reader()  # its own connection: this is another thread
            try:
                found = sources(key, lambda k: reader.payload(k, at))
            finally:
                reader.close()
            text = render(key, found.get, values, clock=self.clock,
                          time_limit=self.render_time_limit)  # fmt: skip
            return text, found

        job = asyncio.ensure_future(asyncio.to_thread(work))

        def done(j: asyncio.Future[Any]) -> None:
            self._renders.release()
            if not j.cancelled():
                j.exception()  # seen here when the request went away

        job.add_done_callback(done)
        text, found = await _checked_async(asyncio.shield(job))
        return {"key": key, "revision": at, "text": text, "includes": sorted(set(found) - {key})}

    def _revision(self, revision: int | None) -> int:
        """The revision asked for, or the current one; 422 for one not yet made."""
        current = self.store.config_revision()
        if revision is None:
            return current
        if revision < 0 or revision > current:
            raise ServiceError(
                422, "Bad revision", f"revision {revision} is after the current one, {current}"
            )
        return revision

    # -- runtime entries ---------------------------------------------------------------------------

    def runtime_get(self, component: str, key: str, who: Principal) -> dict[str, Any]:
        row = _checked(lambda: self.store.runtime_entry(component, key))
        if row is None:
            raise ServiceError(
                404, "No such entry", f"no runtime entry {key!r} of component {component!r}"
            )
        return row

    def runtime_set(self, component: str, key: str, value: str, who: Principal) -> dict[str, Any]:
        _admin(who, f"set runtime entry {component}/{key}")
        now = self.service.clock()
        _checked(
            lambda: self.service.plane.journal.call(
                lambda: self.store.runtime_set(component, key, value, who.name, now)
            )
        )
        self.service.record({"kind": "runtime", "component": component, "key": key}, who.name)
        return {"component": component, "key": key, "writer": who.name, "time": now}


class _Exists:
    """``key in exists``: whether ``key`` has a payload at a revision (what ``resolve``
    asks, without listing every key)."""

    def __init__(self, store: Any, revision: int) -> None:
        self.store = store
        self.revision = revision

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.store.config_get(key, self.revision) is not None


def _admin(who: Principal, what: str) -> None:
    if not who.can("admin"):
        raise ServiceError(403, "Forbidden", f"{who.name} is {an(who.role)}; to {what} needs admin")


def _error(e: ConfigError) -> ServiceError:
    if isinstance(e, ConfigNotFound):
        return ServiceError(404, "No such key", str(e))
    if isinstance(e, ConfigTooLarge):
        return ServiceError(413, "Payload too large", str(e))
    if isinstance(e, RenderError):
        return ServiceError(422, "Render failed", str(e), key=e.key, line=e.line)
    return ServiceError(422, "Bad configuration request", str(e))


def _checked(op: Callable[[], T]) -> T:
    """``op``, its ConfigError as the ServiceError it maps to, and a failing store as
    503."""
    try:
        return op()
    except ConfigError as e:
        raise _error(e) from None
    except StoreUnavailable as e:
        raise ServiceError(
            503, "Store unavailable", f"{e}; nothing was changed: try again"
        ) from None


async def _checked_async(job: asyncio.Future[T]) -> T:
    try:
        return await job
    except ConfigError as e:
        raise _error(e) from None
    except STORE_ERRORS as e:  # the render's own connection
        raise ServiceError(503, "Store unavailable", f"the store failed: {e}; try again") from None
