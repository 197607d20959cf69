"""The services' table in the embedded store (the same SQLite file as environments).

A service's row keeps what it takes to run it again after a restart: the text of the
version its replicas are made of, its directory, owner and number of replicas, with
its state. Replicas are not stored: they are processes, started again by the next
control process. Every write is one transaction, with its events.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from corral.store.sqlite import Event, SqliteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS services(
    name TEXT PRIMARY KEY, text TEXT NOT NULL, workdir TEXT NOT NULL, owner TEXT,
    replicas INTEGER NOT NULL, version INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL DEFAULT 'RUNNING', reason TEXT, updated REAL NOT NULL);
"""

Row = tuple[str, str, str, str, int, int, str, str | None]


class ServiceStore:
    """Services in ``store``'s file; written only by the service supervisor."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        store._db.executescript(SCHEMA)

    def write(self, rows: Sequence[Row], events: Sequence[Event], now: float) -> list[Event]:
        """Services' (name, text, workdir, owner, replicas, version, state, reason) and
        events, in one transaction."""
        with self.store._tx() as db:
            db.executemany(
                "INSERT INTO services(name, text, workdir, owner, replicas, version, state,"
                " reason, updated) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET"
                " text = excluded.text, workdir = excluded.workdir, owner = excluded.owner,"
                " replicas = excluded.replicas, version = excluded.version,"
                " state = excluded.state, reason = excluded.reason, updated = excluded.updated",
                [(*r, now) for r in rows],
            )
            return self.store._put_events(db, events, now)

    def save(self, name: str, text: str, workdir: str, owner: str, replicas: int) -> list[Event]:
        with self.store._tx() as db:
            db.execute(
                "UPDATE services SET text = ?, workdir = ?, owner = ?, replicas = ? "
                "WHERE name = ?", (text, workdir, owner, replicas, name),
            )  # fmt: skip
        return []

    def remove(self, name: str) -> list[Event]:
        with self.store._tx() as db:
            db.execute("DELETE FROM services WHERE name = ?", (name,))
        return []

    def mark(self) -> str:
        """A random mark of this store, made once: the replicas' task ids carry it."""
        with self.store._tx() as db:  # made once, when the store is opened first
            db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('service-mark', ?)",
                       (secrets.token_hex(3),))  # fmt: skip
            row = db.execute("SELECT value FROM meta WHERE key = 'service-mark'").fetchone()
        return str(row[0])

    def services(self) -> list[dict[str, Any]]:
        cur = self.store._db.execute("SELECT * FROM services ORDER BY name")
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
