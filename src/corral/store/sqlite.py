"""The embedded store: one SQLite file in WAL mode, in the data directory.

It holds environments, their tasks, runs (with the run-number counter), transitions
with their timings, the numbered event log, the configuration payloads (every version,
numbered by a global revision) and the runtime key-value table. The controller is its single writer;
every method that changes state is one transaction, and callers hand it whole
batches (a node's tasks, a transition's events), never one row at a time.

Event sequence numbers are assigned here, inside the transaction that stores the
events, from the highest number on disk: they stay gap-free across restarts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from corral.templates.configpayload import (
    MAX_KEY,
    ConfigError,
    check_key,
    check_payload,
    check_prefix,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS environments(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, source TEXT, state TEXT NOT NULL,
    variables TEXT NOT NULL, run_number INTEGER, error TEXT,
    created REAL NOT NULL, updated REAL NOT NULL, created_by TEXT, recipe TEXT);
CREATE TABLE IF NOT EXISTS tasks(
    env TEXT NOT NULL, idx INTEGER NOT NULL, path TEXT NOT NULL, class TEXT NOT NULL,
    node TEXT NOT NULL, state TEXT NOT NULL, critical INTEGER NOT NULL,
    pid INTEGER, reason TEXT, since REAL, hook INTEGER NOT NULL DEFAULT 0, ports TEXT,
    PRIMARY KEY(env, idx)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs(
    number INTEGER PRIMARY KEY, env TEXT NOT NULL, started REAL NOT NULL, stopped REAL);
CREATE TABLE IF NOT EXISTS transitions(
    id INTEGER PRIMARY KEY, env TEXT NOT NULL, event TEXT NOT NULL, src TEXT NOT NULL,
    dst TEXT, status TEXT NOT NULL, started REAL NOT NULL, ended REAL, error TEXT,
    actor TEXT);
CREATE TABLE IF NOT EXISTS events(
    seq INTEGER PRIMARY KEY, time REAL NOT NULL, env TEXT, kind TEXT NOT NULL,
    body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_env ON events(env, seq);
CREATE TABLE IF NOT EXISTS tokens(
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL, created_by TEXT, revoked REAL);
CREATE TABLE IF NOT EXISTS locks(
    detector TEXT PRIMARY KEY, holder TEXT NOT NULL, taken REAL NOT NULL);
CREATE TABLE IF NOT EXISTS config(
    key TEXT NOT NULL, revision INTEGER NOT NULL UNIQUE, version INTEGER NOT NULL,
    payload TEXT NOT NULL, writer TEXT NOT NULL, time REAL NOT NULL,
    PRIMARY KEY(key, revision)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runtime(
    component TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, writer TEXT NOT NULL,
    time REAL NOT NULL, PRIMARY KEY(component, key)) WITHOUT ROWID;
"""


class TaskRow(NamedTuple):
    """A new task's row (a named tuple: an environment makes one per task)."""

    idx: int
    path: str
    task_class: str
    node: str
    state: str
    critical: bool
    hook: bool = False  # runs at a trigger of a transition, not with the environment
    ports: str | None = None  # the ports placement gave it, comma-separated


class TaskChange(NamedTuple):
    """A task's new state and reason; its pid when that changes (0: no process now).
    (A named tuple: a batch makes one per task, and these are the cheapest to make.)"""

    idx: int
    state: str
    pid: int | None = None
    reason: str | None = None


@dataclass(slots=True)
class TaskChanges:
    """A batch of task changes as the store takes them, at most one per task: ``plain``
    are new states with no reason and the same process (task indices by state: stored
    as runs of indices), ``detailed`` the others."""

    plain: dict[str, list[int]] = field(default_factory=dict)
    detailed: list[TaskChange] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.plain or self.detailed)

    @classmethod
    def of(cls, changes: Iterable[TaskChange]) -> TaskChanges:
        out = cls()
        for c in changes:
            if c.pid is None and c.reason is None:
                out.plain.setdefault(c.state, []).append(c.idx)
            else:
                out.detailed.append(c)
        return out


Event = dict[str, Any]


class SqliteStore:
    """The store on one SQLite file. Not thread-safe: one controller owns it."""

    def __init__(self, path: str) -> None:
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, mode=0o700, exist_ok=True)  # a new data directory: its user's
        with contextlib.suppress(FileExistsError):  # the store (token digests): 0600
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._migrate()
        row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
        self._seq = int(row[0])
        self._pending_seq: int | None = None  # numbers taken by the open transaction

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        """Add the columns later versions introduced to a store an older one created.
        (Tables a later version introduced, ``config`` and ``runtime``, are made by
        SCHEMA's ``CREATE TABLE IF NOT EXISTS``, run at every open.)"""
        added = {
            "environments": [("created_by", "TEXT"), ("recipe", "TEXT")],
            "transitions": [("actor", "TEXT")],
            "tasks": [("since", "REAL"), ("hook", "INTEGER NOT NULL DEFAULT 0"), ("ports", "TEXT")],
        }
        for table, cols in added.items():
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in cols:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    # -- writes: each one transaction ----------------------------------------------------

    def _tx(self) -> _Tx:
        return _Tx(self)

    def create_environment(
        self,
        env_id: str,
        name: str,
        source: str | None,
        variables: dict[str, str],
        tasks: Sequence[TaskRow],
        now: float,
        events: Sequence[Event] = (),
        created_by: str | None = None,
        recipe: str | None = None,
    ) -> list[Event]:
        """``recipe``: how to expand the plan again (JSON), so that a later control
        process can take the environment over."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO environments(id, name, source, state, variables, created, updated,"
                " created_by, recipe) VALUES (?, ?, ?, 'STANDBY', ?, ?, ?, ?, ?)",
                (env_id, name, source, json.dumps(variables, sort_keys=True), now, now,
                 created_by, recipe),
            )  # fmt: skip
            db.executemany(
                "INSERT INTO tasks(env, idx, path, class, node, state, critical, since, hook,"
                " ports) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (
                        env_id,
                        t.idx,
                        t.path,
                        t.task_class,
                        t.node,
                        t.state,
                        int(t.critical),
                        now,
                        int(t.hook),
                        t.ports,
                    )
                    for t in tasks
                ),
            )
            return self._put_events(db, events, now)

    def set_environment(
        self,
        env_id: str,
        state: str,
        now: float,
        *,
        error: str | None = None,
        events: Sequence[Event] = (),
    ) -> list[Event]:
        with self._tx() as db:
            db.execute(
                "UPDATE environments SET state=?, error=?, updated=? WHERE id=?",
                (state, error, now, env_id),
            )
            return self._put_events(db, events, now)

    def update_tasks(
        self,
        env_id: str,
        changes: TaskChanges | Sequence[TaskChange],
        now: float,
        events: Sequence[Event] = (),
    ) -> list[Event]:
        """Store a batch of task changes, compressed: one statement per run of indices
        for the plain ones; a changed process (pid 0: none any more) row by row."""
        batch = changes if isinstance(changes, TaskChanges) else TaskChanges.of(changes)
        with self._tx() as db:
            for state, idxs in batch.plain.items():
                db.executemany(
                    "UPDATE tasks SET state=?, reason=NULL, since=? "
                    "WHERE env=? AND idx BETWEEN ? AND ?",
                    ((state, now, env_id, lo, hi) for lo, hi in _runs(idxs)),
                )
            same = [c for c in batch.detailed if c.pid is None]
            if same:
                db.executemany(
                    "UPDATE tasks SET state=?, reason=?, since=? WHERE env=? AND idx=?",
                    ((c.state, c.reason, now, env_id, c.idx) for c in same),
                )
            if len(same) < len(batch.detailed):
                pids: dict[str, dict[int, int]] = {}  # new processes, no reason: by state
                rest = []
                for c in batch.detailed:
                    if c.pid is not None and c.reason is None:
                        pids.setdefault(c.state, {})[c.idx] = c.pid
                    elif c.pid is not None:
                        rest.append((c.state, c.pid, c.reason, now, env_id, c.idx))
                for state, of in pids.items():  # a statement per run of indices
                    db.executemany(
                        "UPDATE tasks SET state=?, reason=NULL, since=?, pid=NULLIF(json_extract("
                        "?, '$[' || (idx - ?) || ']'), 0) WHERE env=? AND idx BETWEEN ? AND ?",
                        (
                            (state, now, json.dumps([of[i] for i in range(lo, hi + 1)]), lo,
                             env_id, lo, hi)
                            for lo, hi in _runs(of)
                        ),
                    )  # fmt: skip
                db.executemany(
                    "UPDATE tasks SET state=?, pid=NULLIF(?, 0), reason=?, since=? "
                    "WHERE env=? AND idx=?",
                    rest,
                )
            return self._put_events(db, events, now)

    def open_run(
        self, env_id: str, now: float, events: Sequence[Event] = ()
    ) -> tuple[int, list[Event]]:
        """The next run number (monotonic across environments and restarts)."""
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='run_number'").fetchone()
            number = (int(row[0]) if row else 0) + 1
            db.execute(
                "INSERT INTO meta(key, value) VALUES ('run_number', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(number),),
            )
            db.execute(
                "INSERT INTO runs(number, env, started) VALUES (?, ?, ?)", (number, env_id, now)
            )
            db.execute(
                "UPDATE environments SET run_number=?, updated=? WHERE id=?", (number, now, env_id)
            )
            evs = [dict(e, run_number=number) for e in events]
            return number, self._put_events(db, evs, now)

    def close_run(
        self, env_id: str, number: int, now: float, events: Sequence[Event] = ()
    ) -> list[Event]:
        with self._tx() as db:
            db.execute(
                "UPDATE runs SET stopped=? WHERE number=? AND stopped IS NULL", (now, number)
            )
            db.execute("UPDATE environments SET run_number=NULL WHERE id=?", (env_id,))
            return self._put_events(db, events, now)

    def begin_transition(
        self, env_id: str, event: str, src: str, now: float, actor: str | None = None
    ) -> int:
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO transitions(env, event, src, status, started, actor) "
                "VALUES (?, ?, ?, 'STARTED', ?, ?)",
                (env_id, event, src, now, actor),
            )
            return int(cur.lastrowid or 0)

    def add_transition(
        self, env_id: str, event: str, src: str, dst: str, error: str | None, now: float
    ) -> None:
        """A transition that happened at once (GO_ERROR on a failure): one row, DONE."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO transitions(env, event, src, dst, status, started, ended, error) "
                "VALUES (?, ?, ?, ?, 'DONE', ?, ?, ?)",
                (env_id, event, src, dst, now, now, error),
            )

    def end_transition(
        self,
        tid: int,
        status: str,
        dst: str | None,
        error: str | None,
        now: float,
        events: Sequence[Event] = (),
    ) -> list[Event]:
        """A transition ends, with its events (one transaction: a crash never leaves
        one stored ended and not said so, or the other way round)."""
        with self._tx() as db:
            db.execute(
                "UPDATE transitions SET status=?, dst=?, error=?, ended=? WHERE id=?",
                (status, dst, error, now, tid),
            )
            return self._put_events(db, events, now)

    def add_events(self, events: Sequence[Event], now: float) -> list[Event]:
        with self._tx() as db:
            return self._put_events(db, events, now)

    def _put_events(
        self, db: sqlite3.Connection, events: Sequence[Event], now: float
    ) -> list[Event]:
        if not events:
            return []
        out = []
        seq = self._seq
        rows = []
        for e in events:
            seq += 1
            ev = {"seq": seq, "time": now, **e}
            out.append(ev)
            rows.append((seq, now, ev.get("env"), ev["kind"], json.dumps(ev, default=str)))
        db.executemany("INSERT INTO events(seq, time, env, kind, body) VALUES (?,?,?,?,?)", rows)
        self._pending_seq = seq
        return out

    # -- reads -------------------------------------------------------------------------

    def events(
        self, *, env: str | None = None, after: int = 0, limit: int | None = None
    ) -> list[Event]:
        sql = "SELECT body FROM events WHERE seq > ?"
        args: list[Any] = [after]
        if env is not None:
            sql += " AND env = ?"
            args.append(env)
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [json.loads(r[0]) for r in self._db.execute(sql, args)]

    def last_seq(self) -> int:
        return self._seq

    def environment(self, env_id: str) -> dict[str, Any] | None:
        cur = self._db.execute(
            "SELECT id, name, source, state, variables, run_number, error, created, updated, "
            "created_by FROM environments WHERE id=?",
            (env_id,),
        )
        row = cur.fetchone()
        if row is None:
            return None
        keys = ("id", "name", "source", "state", "variables", "run_number", "error")
        out = dict(zip(keys, row[:7], strict=True))
        out["variables"] = json.loads(out["variables"])
        out["created"], out["updated"], out["created_by"] = row[7], row[8], row[9]
        return out

    def environments(self) -> list[dict[str, Any]]:
        ids = [r[0] for r in self._db.execute("SELECT id FROM environments ORDER BY created")]
        return [e for e in (self.environment(i) for i in ids) if e is not None]

    def task_states(self, env_id: str) -> dict[str, int]:
        cur = self._db.execute(
            "SELECT state, COUNT(*) FROM tasks WHERE env=? GROUP BY state ORDER BY state",
            (env_id,),
        )
        return {s: int(n) for s, n in cur}

    def tasks(self, env_id: str) -> list[dict[str, Any]]:
        cur = self._db.execute(
            "SELECT idx, path, class, node, state, critical, pid, reason, hook, ports "
            "FROM tasks WHERE env=? ORDER BY idx",
            (env_id,),
        )
        keys = ("idx", "path", "class", "node", "state", "critical", "pid", "reason", "hook",
                "ports")  # fmt: skip
        return [dict(zip(keys, r, strict=True)) for r in cur]

    def find_tasks(
        self,
        *,
        env: str | None = None,
        state: str | None = None,
        node: str | None = None,
        limit: int = 1000,
        offset: int = 0,
        exclude: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Tasks by environment, state and node, in order, a page at a time; none of
        the environments in ``exclude``."""
        sql = "SELECT env, idx, path, class, node, state, critical, pid, reason, since FROM tasks"
        where: list[str] = []
        args: list[Any] = []
        for col, value in (("env", env), ("state", state), ("node", node)):
            if value is not None:
                where.append(f"{col}=?")
                args.append(value)
        if exclude:
            where.append(f"env NOT IN ({','.join('?' * len(exclude))})")
            args.extend(exclude)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY env, idx LIMIT ? OFFSET ?"
        args += [limit, offset]
        keys = (
            "env",
            "idx",
            "path",
            "class",
            "node",
            "state",
            "critical",
            "pid",
            "reason",
            "since",
        )
        out = []
        for r in self._db.execute(sql, args):
            d = dict(zip(keys, r, strict=True))
            d["id"] = f"{d['env']}:{d['idx']}"
            d["critical"] = bool(d["critical"])
            out.append(d)
        return out

    def runs(self, env_id: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT number, env, started, stopped FROM runs"
        args: tuple[str, ...] = ()
        if env_id is not None:
            sql += " WHERE env=?"
            args = (env_id,)
        cur = self._db.execute(sql + " ORDER BY number", args)
        return [dict(zip(("number", "env", "started", "stopped"), r, strict=True)) for r in cur]

    def transitions(self, env_id: str) -> list[dict[str, Any]]:
        cur = self._db.execute(
            "SELECT event, src, dst, status, started, ended, error, actor FROM transitions "
            "WHERE env=? ORDER BY id",
            (env_id,),
        )
        keys = ("event", "src", "dst", "status", "started", "ended", "error", "actor")
        return [dict(zip(keys, r, strict=True)) for r in cur]

    # -- tokens and locks ------------------------------------------------------------------

    def add_token(
        self, token_id: str, name: str, role: str, digest: str, now: float, by: str | None
    ) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO tokens(id, name, role, hash, created, created_by) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, name, role, digest, now, by),
            )

    def token_by_hash(self, digest: str) -> dict[str, Any] | None:
        row = self._db.execute(
            "SELECT id, name, role, hash FROM tokens WHERE hash=? AND revoked IS NULL", (digest,)
        ).fetchone()
        if row is None:
            return None
        return {"id": row[0], "name": row[1], "role": row[2], "hash": row[3]}

    def tokens(self) -> list[dict[str, Any]]:
        cur = self._db.execute(
            "SELECT id, name, role, created, created_by, revoked FROM tokens ORDER BY created"
        )
        keys = ("id", "name", "role", "created", "created_by", "revoked")
        return [dict(zip(keys, r, strict=True)) for r in cur]

    def revoke_token(self, token_id: str, now: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE tokens SET revoked=? WHERE id=? AND revoked IS NULL", (now, token_id)
            )
            return cur.rowcount > 0

    def locks(self) -> dict[str, dict[str, Any]]:
        cur = self._db.execute("SELECT detector, holder, taken FROM locks ORDER BY detector")
        return {d: {"holder": h, "taken": t} for d, h, t in cur}

    def set_locks(
        self, take: Sequence[str], release: Sequence[str], holder: str, now: float,
        events: Sequence[Event] = (),
    ) -> list[Event]:  # fmt: skip
        with self._tx() as db:
            db.executemany(
                "INSERT INTO locks(detector, holder, taken) VALUES (?, ?, ?)",
                ((d, holder, now) for d in take),
            )
            db.executemany("DELETE FROM locks WHERE detector=?", ((d,) for d in release))
            return self._put_events(db, events, now)

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (key, value),
            )

    # -- configuration and runtime entries -----------------------------------------------------
    # Payloads are versioned: every put adds a row, numbered by a global revision (one
    # counter for the whole store, so "as of revision R" is one consistent state of every
    # key) and by a version per key. Nothing is updated or deleted.

    def config_put(self, key: str, payload: str, writer: str, now: float) -> int:
        """Store a new version of ``key``; its revision (ConfigError for a bad key,
        payload or writer)."""
        check_key(key)
        check_payload(payload)
        _check_writer(writer)
        with self._tx() as db:
            row = db.execute(
                "SELECT (SELECT COALESCE(MAX(revision), 0) FROM config), "
                "(SELECT COALESCE(MAX(version), 0) FROM config WHERE key=?)",
                (key,),
            ).fetchone()
            revision, version = int(row[0]) + 1, int(row[1]) + 1
            db.execute(
                "INSERT INTO config(key, revision, version, payload, writer, time) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (key, revision, version, payload, writer, now),
            )
            return revision

    def config_get(self, key: str, revision: int | None = None) -> dict[str, Any] | None:
        """``key`` as it was at ``revision`` (now when None): ``key``, ``payload``,
        ``revision`` (the one that wrote it), ``version``, ``writer``, ``time``; None when
        it had no value then. ConfigError for a revision after the current one."""
        check_key(key)
        at = self._at(revision)
        row = self._db.execute(
            "SELECT revision, version, payload, writer, time FROM config "
            "WHERE key=? AND revision<=? ORDER BY revision DESC LIMIT 1",
            (key, at),
        ).fetchone()
        if row is None:
            return None
        keys = ("revision", "version", "payload", "writer", "time")
        return {"key": key, **dict(zip(keys, row, strict=True))}

    def config_history(self, key: str) -> list[dict[str, Any]]:
        """Every version of ``key``, oldest first: ``revision``, ``version``, ``writer``,
        ``time`` and ``size`` (bytes; ``config_get(key, revision)`` has the payload)."""
        check_key(key)
        cur = self._db.execute(
            "SELECT revision, version, writer, time, length(CAST(payload AS BLOB)) FROM config "
            "WHERE key=? ORDER BY revision",
            (key,),
        )
        keys = ("revision", "version", "writer", "time", "size")
        return [{"key": key, **dict(zip(keys, r, strict=True))} for r in cur]

    def config_keys(self, prefix: str = "", revision: int | None = None) -> list[str]:
        """The keys that start with ``prefix`` and had a value at ``revision`` (now when
        None), in order."""
        check_prefix(prefix)
        at = self._at(revision)
        # keys are ASCII: every key starting with the prefix sorts below prefix + U+10FFFF
        cur = self._db.execute(
            "SELECT DISTINCT key FROM config WHERE key >= ? AND key < ? AND revision <= ? "
            "ORDER BY key",
            (prefix, prefix + "\U0010ffff", at),
        )
        return [r[0] for r in cur]

    def config_reader(self) -> ConfigReader:
        """A reader of payloads on a connection of its own, for another thread."""
        return ConfigReader(self.path)

    def config_revision(self) -> int:
        """The current revision: that of the last put (0: none yet)."""
        return int(self._db.execute("SELECT COALESCE(MAX(revision), 0) FROM config").fetchone()[0])

    def _at(self, revision: int | None) -> int:
        current = self.config_revision()
        if revision is None:
            return current
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise ConfigError(f"a revision is a number from 0, not {revision!r}")
        if revision > current:
            raise ConfigError(f"revision {revision} is after the current one, {current}")
        return revision

    def runtime_get(self, component: str, key: str) -> str | None:
        """A runtime entry (AliECS's ``runtime.Get``): a value that changes as things run,
        not versioned."""
        return None if (row := self.runtime_entry(component, key)) is None else row["value"]

    def runtime_entry(self, component: str, key: str) -> dict[str, Any] | None:
        """A runtime entry with who wrote it and when: ``component``, ``key``, ``value``,
        ``writer``, ``time``."""
        component, key = runtime_id(component, key)
        row = self._db.execute(
            "SELECT value, writer, time FROM runtime WHERE component=? AND key=?",
            (component, key),
        ).fetchone()
        if row is None:
            return None
        return {"component": component, "key": key, "value": row[0], "writer": row[1],
                "time": row[2]}  # fmt: skip

    def runtime_set(self, component: str, key: str, value: str, writer: str, now: float) -> None:
        """Set a runtime entry (AliECS's ``runtime.Set``), replacing its value."""
        self.runtime_set_many([(component, key, value)], writer, now)

    def runtime_set_many(
        self, entries: Sequence[tuple[str, str, str]], writer: str, now: float
    ) -> None:
        """Set runtime entries (component, key, value), all or none: one transaction."""
        _check_writer(writer)
        rows = []
        for component, key, value in entries:
            component, key = runtime_id(component, key)
            check_payload(value, "value")
            rows.append((component, key, value, writer, now))
        with self._tx() as db:
            db.executemany(
                "INSERT INTO runtime(component, key, value, writer, time) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(component, key) DO UPDATE SET value=excluded.value, "
                "writer=excluded.writer, time=excluded.time",
                rows,
            )

    # -- a restart ---------------------------------------------------------------------------

    def unfinished(self) -> list[dict[str, Any]]:
        """Environments a previous control process left (not DONE), each with its
        ``recipe`` and the tasks it reported alive (``alive``: index, path, state)."""
        out = []
        for env in self.environments():
            if env["state"] == "DONE":
                continue
            env["recipe"] = self._db.execute(
                "SELECT recipe FROM environments WHERE id=?", (env["id"],)
            ).fetchone()[0]
            cur = self._db.execute(
                "SELECT idx, path, state FROM tasks WHERE env=? AND state IN "
                "('LAUNCHING', 'STANDBY', 'CONFIGURED', 'RUNNING')",
                (env["id"],),
            )
            env["alive"] = [{"idx": i, "path": pa, "state": st} for i, pa, st in cur]
            out.append(env)
        return out

    def mark_lost(
        self, env_id: str, reason: str, now: float, events: Sequence[Event]
    ) -> list[Event]:
        """A previous control process's environment: the tasks it reported alive are
        LOST, and it is in ERROR (an error it already had is kept), through a GO_ERROR
        transition; its run, if one was open, is stopped."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO transitions(env, event, src, dst, status, started, ended, error) "
                "SELECT id, 'GO_ERROR', state, 'ERROR', 'DONE', ?, ?, ? FROM environments "
                "WHERE id=?",
                (now, now, reason, env_id),
            )
            db.execute(
                "UPDATE tasks SET state='LOST', reason=?, pid=NULL, since=? WHERE env=? AND "
                "state IN ('LAUNCHING', 'STANDBY', 'CONFIGURED', 'RUNNING')",
                (reason, now, env_id),
            )
            db.execute(
                "UPDATE environments SET error=CASE WHEN state='ERROR' AND error IS NOT NULL "
                "THEN error ELSE ? END, state='ERROR', updated=?, run_number=NULL WHERE id=?",
                (reason, now, env_id),
            )
            db.execute("UPDATE runs SET stopped=? WHERE env=? AND stopped IS NULL", (now, env_id))
            return self._put_events(db, events, now)

    def interrupted(self) -> list[dict[str, Any]]:
        """Transitions a previous control process left STARTED."""
        cur = self._db.execute(
            "SELECT id, env, event, src, started FROM transitions WHERE status='STARTED'"
        )
        return [dict(zip(("id", "env", "event", "src", "started"), r, strict=True)) for r in cur]

    def end_interrupted(
        self, ids: Sequence[int], reason: str, now: float, events: Sequence[Event]
    ) -> list[Event]:
        """These transitions (left STARTED) end FAILED, with their events."""
        with self._tx() as db:
            db.executemany(
                "UPDATE transitions SET status='FAILED', error=?, ended=? WHERE id=?",
                ((reason, now, i) for i in ids),
            )
            return self._put_events(db, events, now)

    def forget(self, env_id: str, reason: str, now: float, events: Sequence[Event]) -> list[Event]:
        """An environment no control process runs any more ends DONE: its tasks that
        were not done or failed end DONE (``reason``), its run is closed."""
        with self._tx() as db:
            db.execute(
                "UPDATE tasks SET state='DONE', reason=?, pid=NULL, since=? WHERE env=? AND "
                "state NOT IN ('DONE', 'ERROR', 'LOST')",
                (reason, now, env_id),
            )
            db.execute(
                "UPDATE environments SET state='DONE', updated=?, run_number=NULL WHERE id=?",
                (now, env_id),
            )
            db.execute("UPDATE runs SET stopped=? WHERE env=? AND stopped IS NULL", (now, env_id))
            return self._put_events(db, events, now)

    def set_nodes(self, env_id: str, nodes: Sequence[tuple[int, str]]) -> None:
        """Tasks placed anew (an environment taken over after a restart)."""
        with self._tx() as db:
            db.executemany(
                "UPDATE tasks SET node=? WHERE env=? AND idx=?",
                ((node, env_id, idx) for idx, node in nodes),
            )


class ConfigReader:
    """Reads configuration payloads on its own read-only connection, so that a worker
    thread (a render) reads without touching the store's connection. Stored versions
    never change: what it reads at a revision is what the store reads there."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(
            f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True,
            check_same_thread=False,
        )  # fmt: skip
        self._db.execute("PRAGMA busy_timeout=5000")

    def payload(self, key: str, revision: int) -> str | None:
        """The payload of ``key`` at ``revision``, or None."""
        check_key(key)
        row = self._db.execute(
            "SELECT payload FROM config WHERE key=? AND revision<=? ORDER BY revision DESC LIMIT 1",
            (key, revision),
        ).fetchone()
        return None if row is None else str(row[0])

    def revision(self) -> int:
        """The configuration's current revision (0: nothing put yet)."""
        row = self._db.execute("SELECT COALESCE(MAX(revision), 0) FROM config").fetchone()
        return int(row[0])

    def runtime(self, component: str, key: str) -> str | None:
        """A runtime entry's value now, or None."""
        try:
            component, key = runtime_id(component, key)
        except ConfigError:
            return None
        row = self._db.execute(
            "SELECT value FROM runtime WHERE component=? AND key=?", (component, key)
        ).fetchone()
        return None if row is None else str(row[0])

    def close(self) -> None:
        self._db.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception.

    Event numbers taken inside become the store's only once the commit succeeded.
    """

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    def __enter__(self) -> sqlite3.Connection:
        self._store._pending_seq = None
        self._store._db.execute("BEGIN IMMEDIATE")
        return self._store._db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        store = self._store
        if exc_type is None:
            store._db.execute("COMMIT")
            if store._pending_seq is not None:
                store._seq = store._pending_seq
        else:
            store._db.execute("ROLLBACK")
        store._pending_seq = None


def _check_writer(writer: str) -> None:
    if not isinstance(writer, str) or not writer or len(writer) > MAX_KEY:
        raise ConfigError(f"the writer must be a name of 1 to {MAX_KEY} characters")


def runtime_id(component: str, key: str) -> tuple[str, str]:
    """A runtime entry's (component, key) as stored: AliECS keeps ``component/key`` as
    one path (``runtime.Get('trg/ltu', 'x')`` is ``trg/ltu/x``), so the component is its
    first part and the key the rest, however the caller split it."""
    check_key(component, "component")
    check_key(key)
    first, _, rest = f"{component}/{key}".partition("/")
    return first, rest


def _runs(idxs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted indices as (first, last) runs of consecutive numbers."""
    out: list[tuple[int, int]] = []
    for i in sorted(idxs):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out
