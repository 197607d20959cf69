"""The jobs' tables in the embedded store (the same SQLite file as environments).

A job's row keeps its state and what it takes to run it again after a restart (its
path and directory; its file's text in a table of its own, written once: a row updated
at every change must stay small, since SQLite rewrites a row whole); a unit has a row
only once it has left the queue (a queued unit is a missing row), so a large array job
costs one row at submission.
Every write is one transaction for a whole batch of changes, with its events.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

from corral.store.sqlite import Event, SqliteStore

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, owner TEXT,
    priority_class TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
    source TEXT, workdir TEXT NOT NULL, units INTEGER NOT NULL,
    counts TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS job_texts(id TEXT PRIMARY KEY, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs(name, created);
CREATE TABLE IF NOT EXISTS job_units(
    job TEXT NOT NULL, idx INTEGER NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL,
    node TEXT, pid INTEGER, code INTEGER, reason TEXT, started REAL, ended REAL,
    PRIMARY KEY(job, idx)) WITHOUT ROWID;
"""


class UnitRow(NamedTuple):
    """A unit's stored state (a batch writes many: the cheapest record to make)."""

    idx: int
    state: str
    attempt: int
    node: str | None
    pid: int | None
    code: int | None
    reason: str | None
    started: float | None
    ended: float | None


class JobStore:
    """Jobs and units in ``store``'s file; written only by the job runner."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        store._db.executescript(SCHEMA)

    def create(self, row: dict[str, Any], events: Sequence[Event], now: float) -> list[Event]:
        with self.store._tx() as db:
            db.execute(
                "INSERT INTO jobs(id, name, kind, owner, priority_class, state, reason, source,"
                " workdir, units, counts, created, updated)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (row["id"], row["name"], row["kind"], row.get("owner"), row["priority_class"],
                 row["state"], row.get("reason"), row.get("source"), row["workdir"],
                 row["units"], json.dumps(row.get("counts") or {}), now, now),
            )  # fmt: skip
            db.execute("INSERT INTO job_texts(id, text) VALUES (?, ?)", (row["id"], row["text"]))
            return self.store._put_events(db, events, now)

    def write(
        self,
        jobs: Sequence[tuple[str, str, str | None, dict[str, int]]],
        units: Sequence[tuple[str, UnitRow]],
        events: Sequence[Event],
        now: float,
    ) -> list[Event]:
        """One batch: jobs' (id, state, reason, counts), units' rows, and events."""
        with self.store._tx() as db:
            if units:
                db.executemany(
                    "INSERT OR REPLACE INTO job_units(job, idx, state, attempt, node, pid, code,"
                    " reason, started, ended) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [(job, *u) for job, u in units],
                )
            if jobs:
                db.executemany(
                    "UPDATE jobs SET state = ?, reason = ?, counts = ?, updated = ? WHERE id = ?",
                    [(s, r, json.dumps(c), now, j) for j, s, r, c in jobs],
                )
            return self.store._put_events(db, events, now)

    def reset_units(self, job: str, idxs: Sequence[int]) -> None:
        """Forget these units' rows (they are queued again: a resumed job)."""
        with self.store._tx() as db:
            db.executemany(
                "DELETE FROM job_units WHERE job = ? AND idx = ?", [(job, i) for i in idxs]
            )

    # -- reads -------------------------------------------------------------------------

    def job(self, job_id: str) -> dict[str, Any] | None:
        cur = self.store._db.execute(
            "SELECT jobs.*, job_texts.text FROM jobs LEFT JOIN job_texts USING (id) "
            "WHERE jobs.id = ?", (job_id,),
        )  # fmt: skip
        row = cur.fetchone()
        return None if row is None else _row(cur, row)

    def jobs(
        self, *, unfinished: bool = False, name: str | None = None, texts: bool = False
    ) -> list[dict[str, Any]]:
        """Jobs, oldest first; with ``texts``, each with its file's text."""
        sql = ("SELECT jobs.*, job_texts.text FROM jobs LEFT JOIN job_texts USING (id)"
               if texts else "SELECT * FROM jobs")  # fmt: skip
        where: list[str] = []
        args: list[Any] = []
        if unfinished:
            where.append("state IN ('QUEUED', 'RUNNING')")
        if name is not None:
            where.append("name = ?")
            args.append(name)
        if where:
            sql += " WHERE " + " AND ".join(where)
        cur = self.store._db.execute(sql + " ORDER BY created, jobs.id", args)
        return [_row(cur, r) for r in cur.fetchall()]

    def units(self, job_id: str) -> list[dict[str, Any]]:
        cur = self.store._db.execute(
            "SELECT * FROM job_units WHERE job = ? ORDER BY idx", (job_id,)
        )
        return [_row(cur, r) for r in cur.fetchall()]


def _row(cur: Any, row: Sequence[Any]) -> dict[str, Any]:
    out = {d[0]: v for d, v in zip(cur.description, row, strict=True)}
    if "counts" in out:
        out["counts"] = json.loads(out["counts"] or "{}")
    return out
