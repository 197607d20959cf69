"""The journal: every change is stored before it is announced, in order, even while the
store fails.

How this runs. On the control plane's event loop, one journal per store. A write is a
closure that runs one store transaction and returns the events it stored. ``write``
runs the writes still waiting, then the new one, and announces each one's events on
the bus once committed. When the store refuses one (a full disk, an I/O error, a lock
held too long), that write and every later one wait in the backlog, in order; they are
retried on the next write and by one timer with backoff. Nothing is lost or reordered,
event numbers stay gap-free (the store numbers events at commit), and the in-memory
state the controller acts on never waits for the disk.

``call`` is for a write whose result the caller needs at once (a transition's row, a
run number): it runs after the backlog, or raises ``StoreUnavailable`` and leaves
nothing queued, so the caller can refuse what it was about to do.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from corral.events.bus import EventBus

log = logging.getLogger("corral.journal")

T = TypeVar("T")
Write = Callable[[], Sequence[dict[str, Any]]]
STORE_ERRORS: tuple[type[BaseException], ...] = (sqlite3.Error, OSError)
RETRY_FIRST = 0.05
RETRY_MAX = 5.0


class StoreUnavailable(Exception):
    """The store refused a write; str() says why."""


class Journal:
    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._backlog: collections.deque[Write] = collections.deque()
        self._retry: asyncio.TimerHandle | None = None
        self._delay = RETRY_FIRST
        self.failures = 0  # store errors seen (a metric, and for tests)
        self.last_error: str | None = None

    @property
    def behind(self) -> int:
        """Writes waiting for the store."""
        return len(self._backlog)

    def write(self, op: Write) -> None:
        """Store (after whatever waits) and announce; never raises for a store error."""
        self._backlog.append(op)
        self.flush()

    def call(self, op: Callable[[], T]) -> T:
        """Run ``op`` now, after the backlog; raise StoreUnavailable if the store refuses.

        Whatever events ``op`` stores, the caller announces with ``publish``.
        """
        if not self.flush():
            raise StoreUnavailable(f"the store is failing: {self.last_error}")
        try:
            return op()
        except STORE_ERRORS as e:
            self._failed(e)
            raise StoreUnavailable(f"the store failed: {self.last_error}") from e

    def publish(self, events: Sequence[dict[str, Any]]) -> None:
        self.bus.publish(events)

    def flush(self) -> bool:
        """Run the backlog in order; True when nothing is left waiting."""
        while self._backlog:
            op = self._backlog[0]
            try:
                stored = op()
            except STORE_ERRORS as e:
                self._failed(e)
                self._schedule()
                return False
            except Exception:  # a bug in a write: drop it, loudly, rather than block all
                log.exception("a store write failed on a bug; dropped")
                self._backlog.popleft()
                continue
            self._backlog.popleft()
            self.bus.publish(stored)
        if self.last_error is not None:
            log.warning("the store works again; %d writes caught up", self.failures)
            self.last_error = None
        self._delay = RETRY_FIRST
        return True

    def close(self) -> None:
        """Try the backlog a last time; cancel the retry timer."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._backlog and not self.flush():
            log.error("%d writes never reached the store: %s", self.behind, self.last_error)
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def _failed(self, e: BaseException) -> None:
        self.failures += 1
        first = self.last_error is None
        self.last_error = f"{type(e).__name__}: {e}"
        if first:
            log.error("the store refused a write (%s); %d waiting", self.last_error, self.behind)

    def _schedule(self) -> None:
        if self._retry is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): the next write retries

        def again() -> None:
            self._retry = None
            self.flush()

        self._retry = loop.call_later(self._delay, again)
        self._delay = min(RETRY_MAX, self._delay * 2)
