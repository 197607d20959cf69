"""The periodic jobs' table in the embedded store (the same SQLite file as jobs).

A periodic job's row keeps what it takes to schedule it again after a restart: its
file's text (``spec_text``, read again with ``corral.jobs.spec.load_job``), its
directory, its owner, and the scheduler's state as JSON (the cron state machine's
``Periodic.state()``, the run counter, and how its runs are submitted). The runs
themselves are jobs, in the jobs' tables. Written only by the periodic scheduler;
every write is one transaction, with its events.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from corral.store.sqlite import Event, SqliteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS periodic(
    name TEXT PRIMARY KEY, spec_text TEXT NOT NULL, workdir TEXT NOT NULL, owner TEXT,
    state TEXT NOT NULL DEFAULT '{}', updated REAL NOT NULL);
"""


class PeriodicRow(NamedTuple):
    """A periodic job as stored."""

    name: str
    spec_text: str
    workdir: str
    owner: str | None
    state: dict[str, Any] | None  # None: not readable (then the job starts afresh)
    updated: float


class PeriodicStore:
    """Periodic jobs in ``store``'s file; written only by the periodic scheduler."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        store._db.executescript(SCHEMA)

    def put(
        self,
        name: str,
        spec_text: str,
        workdir: str,
        owner: str | None,
        state: Mapping[str, Any],
        events: Sequence[Event],
        now: float,
    ) -> list[Event]:
        """Add a periodic job, or replace the one of that name (its state too)."""
        with self.store._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO periodic(name, spec_text, workdir, owner, state, updated)"
                " VALUES (?,?,?,?,?,?)",
                (name, spec_text, workdir, owner, json.dumps(dict(state)), now),
            )
            return self.store._put_events(db, events, now)

    def save(
        self, states: Mapping[str, Mapping[str, Any]], events: Sequence[Event], now: float
    ) -> list[Event]:
        """Periodic jobs' new states, by name (a name no longer stored is passed over),
        with events: one transaction for a whole wake of the scheduler."""
        with self.store._tx() as db:
            if states:
                db.executemany(
                    "UPDATE periodic SET state = ?, updated = ? WHERE name = ?",
                    [(json.dumps(dict(s)), now, n) for n, s in states.items()],
                )
            return self.store._put_events(db, events, now)

    def delete(self, name: str, events: Sequence[Event], now: float) -> list[Event]:
        with self.store._tx() as db:
            db.execute("DELETE FROM periodic WHERE name = ?", (name,))
            return self.store._put_events(db, events, now)

    # -- reads -------------------------------------------------------------------------

    def get(self, name: str) -> PeriodicRow | None:
        row = self.store._db.execute(
            "SELECT name, spec_text, workdir, owner, state, updated FROM periodic WHERE name = ?",
            (name,),
        ).fetchone()
        return None if row is None else _row(row)

    def all(self) -> list[PeriodicRow]:
        cur = self.store._db.execute(
            "SELECT name, spec_text, workdir, owner, state, updated FROM periodic ORDER BY name"
        )
        return [_row(r) for r in cur.fetchall()]


def _row(r: Sequence[Any]) -> PeriodicRow:
    try:
        state = json.loads(r[4] or "{}")
    except ValueError:
        state = None
    return PeriodicRow(
        str(r[0]), str(r[1]), str(r[2]), r[3], state if isinstance(state, dict) else None,
        float(r[5]),
    )  # fmt: skip
