"""The services' table in the embedded store (the same SQLite file as environments).

A service's row keeps what it takes to run it again after a restart: the text of the
version its replicas are made of, its directory, owner and number of replicas, with
its state. A replica has a row while its process runs (where, its ports and pid): the
next control process, after a kill -9 of this one, re-attaches the replicas that still
run. Every write is one transaction, with its events.
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
CREATE TABLE IF NOT EXISTS service_replicas(
    service TEXT NOT NULL, n INTEGER NOT NULL, slot INTEGER NOT NULL,
    version INTEGER NOT NULL, node TEXT NOT NULL, ports TEXT NOT NULL, pid INTEGER,
    PRIMARY KEY(service, n)) WITHOUT ROWID;
"""

Row = tuple[str, str, str, str, int, int, str, str | None]
# a replica whose process runs: (service, n, slot, version, node, ports, pid)
ReplicaRow = tuple[str, int, int, int, str, str, int | None]


class ServiceStore:
    """Services in ``store``'s file; written only by the service supervisor."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        store._db.executescript(SCHEMA)

    def write(
        self,
        rows: Sequence[Row],
        events: Sequence[Event],
        now: float,
        replicas: Sequence[ReplicaRow] = (),
        gone: Sequence[tuple[str, int]] = (),
    ) -> list[Event]:
        """Services' (name, text, workdir, owner, replicas, version, state, reason),
        the replicas that now run and those (service, n) that no longer do, and events,
        in one transaction."""
        with self.store._tx() as db:
            if gone:
                db.executemany("DELETE FROM service_replicas WHERE service = ? AND n = ?", gone)
            if replicas:
                db.executemany(
                    "INSERT OR REPLACE INTO service_replicas(service, n, slot, version, node,"
                    " ports, pid) VALUES (?,?,?,?,?,?,?)", replicas,
                )  # fmt: skip
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
            db.execute("DELETE FROM service_replicas WHERE service = ?", (name,))
        return []

    def replicas(self, name: str) -> list[dict[str, Any]]:
        """The service's replicas recorded running (by the previous control process)."""
        cur = self.store._db.execute(
            "SELECT n, slot, version, node, ports, pid FROM service_replicas WHERE service = ?"
            " ORDER BY n", (name,),
        )  # fmt: skip
        return [{"n": n, "slot": slot, "version": v, "node": node,
                 "ports": tuple(int(p) for p in ports.split(",") if p), "pid": pid}
                for n, slot, v, node, ports, pid in cur.fetchall()]  # fmt: skip

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
