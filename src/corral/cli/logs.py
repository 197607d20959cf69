"""``corral logs ENV [TASK] [-f]``: the logs of one environment's tasks.

With a server (``--server`` or ``CORRAL_SERVER``) they come through its API: the
environment's tasks (``GET /api/tasks?env=ENV``), then the end of each one's log
(``GET /api/tasks/{id}/log``). Without one they are read from the data directory of
``corral run`` (``--data``, default ``.corral``), where each task's output is written
to ``logs/ENV/TASK_PATH.log``. TASK narrows them: a task's full path, the end of it
(``qc``, ``flp1.readout``), its id, or a shell pattern (``*readout*``). With several
tasks, each line is prefixed with the task's path.

``-f`` then prints the lines as they are written, as ``tail -f`` does but for this
environment only: with a server until the environment is DONE (or Ctrl-C), from the
data directory until Ctrl-C (new tasks' logs are picked up as they appear). Exit
codes: 0 done (and after Ctrl-C); 1 no such environment or task, or no logs kept; 2
the command line is wrong; 3 the server cannot be reached.
"""

from __future__ import annotations

import fnmatch
import os
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

import click

from corral.cli.client import Api, fail, server_options

MAX_LINES = 10_000  # the most lines the server returns at once
FOLLOWED = 200  # -f follows at most this many tasks at once through a server
TAIL_BYTES = 1 << 20  # the end of a file read for its last lines


def matches(path: str, task_id: str, pattern: str | None) -> bool:
    """Whether the task at ``path`` (id ``task_id``) is one TASK names."""
    if pattern is None:
        return True
    return (
        pattern in (path, task_id)
        or path.endswith("." + pattern)
        or fnmatch.fnmatchcase(path, pattern)
        or fnmatch.fnmatchcase(path, "*." + pattern)
    )


class Printer:
    """Writes lines, each prefixed with its task's path when there are several tasks."""

    def __init__(self, paths: Iterable[str]) -> None:
        paths = list(paths)
        self.prefix = len(paths) > 1
        self.width = max((len(p) for p in paths), default=0)

    def write(self, path: str, lines: Iterable[str]) -> None:
        for line in lines:
            head = f"{path:<{self.width}} | " if self.prefix else ""
            sys.stdout.write(head + line + "\n")
        sys.stdout.flush()


@click.command("logs")
@click.argument("env_id", metavar="ENV")
@click.argument("task", required=False, metavar="[TASK]")
@click.option("-f", "--follow", is_flag=True,
              help="Then print the lines as they are written (with a server: until the "
                   "environment is DONE; else until Ctrl-C).")  # fmt: skip
@click.option("-n", "--lines", type=click.IntRange(0, MAX_LINES), default=20, show_default=True,
              help="How many of each task's last lines to print first.")  # fmt: skip
@click.option("--interval", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              metavar="SECONDS", help="With -f: how often the logs are read.")  # fmt: skip
@click.option("--data", default=".corral", show_default=True, metavar="DIR",
              help="Without a server: the data directory of `corral run`.")  # fmt: skip
@server_options
def logs(env_id: str, task: str | None, follow: bool, lines: int, interval: float, data: str,
         server: str | None, token: str | None) -> None:  # fmt: skip
    """Print the logs of an environment's tasks (-f: and what they write next), from a
    server or from --data.

    TASK: a task's path, the end of it (qc, flp1.readout), its id, or a shell pattern
    ('*readout*'); without it, every task's. Instead of `tail -f .corral/logs/*/...`,
    which follows every earlier environment's logs too."""
    try:
        if server:
            _remote(Api(server, token), env_id, task, follow, lines, interval)
        else:
            _local(data, env_id, task, follow, lines, interval)
    except KeyboardInterrupt:
        sys.stdout.flush()


# -- from the data directory of `corral run` ----------------------------------------------------


def _local(data: str, env_id: str, task: str | None, follow: bool, lines: int,
           interval: float) -> None:  # fmt: skip
    root = os.path.join(data, "logs")
    where = os.path.join(root, env_id)
    if os.sep in env_id or env_id in ("", ".", "..") or not os.path.isdir(where):
        known = _environments(root)
        hint = f"; the newest there: {', '.join(known[:5])}" if known else ""
        if not os.path.isdir(root):
            hint = f" (no {root}: is --data right? a server's: --server or CORRAL_SERVER)"
        fail(1, f"no logs of {env_id!r} in {root}{hint}")
    files = _files(where, env_id, task)
    if not files and not follow:
        said = f" of task {task!r}" if task else ""
        fail(1, f"no logs{said} in {where} (its tasks: {', '.join(_files(where, env_id, None))})")
    tails: dict[str, _Tail] = {}
    for path in files:
        tails[path] = _Tail(os.path.join(where, path + ".log"))
    printer = Printer(files)
    for path, t in tails.items():
        printer.write(path, t.last(lines))
    while follow:
        time.sleep(interval)
        for path in _files(where, env_id, task):
            if path not in tails:  # a task started since: from its start
                tails[path] = _Tail(os.path.join(where, path + ".log"), start=0)
                if not printer.prefix and len(tails) > 1:
                    printer = Printer(tails)
                else:
                    printer.width = max(printer.width, len(path))
        for path, t in tails.items():
            printer.write(path, t.new())


def _environments(root: str) -> list[str]:
    """The environments (and jobs) with logs in ``root``, the newest first."""
    try:
        names = [e for e in os.scandir(root) if e.is_dir()]
    except OSError:
        return []
    return [e.name for e in sorted(names, key=lambda e: e.stat().st_mtime, reverse=True)]


def _files(where: str, env_id: str, task: str | None) -> list[str]:
    """The task paths with a log in ``where`` that TASK names, sorted."""
    try:
        names = os.listdir(where)
    except OSError:
        return []
    paths = sorted(n[: -len(".log")] for n in names if n.endswith(".log"))
    return [p for p in paths if matches(p, f"{env_id}:{p}", task)]


class _Tail:
    """One log file read as ``tail -f`` reads it: its last lines, then what is added
    (a line is printed once it ends; a file cut shorter is read again from its start)."""

    def __init__(self, path: str, start: int | None = None) -> None:
        self.path = path
        self.offset = start
        self.pending = b""

    def last(self, n: int) -> list[str]:
        from corral.store.files import open_log, read_log  # (a local read only)

        try:  # (a regular file only: never a FIFO, nor a link to anything)
            fd = open_log(self.path)
            try:
                size = os.fstat(fd).st_size
                data = read_log(fd, max(0, size - TAIL_BYTES), TAIL_BYTES)
            finally:
                os.close(fd)
        except OSError:
            self.offset = 0
            return []
        end = data.rfind(b"\n") + 1  # a line still being written: printed when it ends
        self.pending = data[end:]
        self.offset = size
        text = data[:end].decode("utf-8", "replace").splitlines()
        return text[-n:] if n else []

    def new(self) -> list[str]:
        from corral.store.files import open_log, read_log

        try:
            fd = open_log(self.path)
            try:
                size = os.fstat(fd).st_size
                if self.offset is None or size < self.offset:  # truncated: again
                    self.offset, self.pending = 0, b""
                # (at most MAX_LOG_READ a call: a log growing faster is caught up
                # over the next calls, in bounded memory)
                data = read_log(fd, self.offset)
            finally:
                os.close(fd)
        except OSError:
            return []
        self.offset += len(data)
        data = self.pending + data
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) > TAIL_BYTES:  # a line that never ends: shown in parts
            end = len(data)
        self.pending = data[end:]
        return data[:end].decode("utf-8", "replace").splitlines()


# -- through a server's API ----------------------------------------------------------------------


def _seg(x: str) -> str:
    return quote(x, safe="")


def _tasks(api: Api, env_id: str) -> list[dict[str, Any]]:
    api.call("GET", f"/api/environments/{_seg(env_id)}")  # (exit 1 if there is none)
    rows: list[dict[str, Any]] = []
    while True:
        params = {"env": env_id, "limit": MAX_LINES, "offset": len(rows)}
        page = api.call("GET", "/api/tasks", params=params)
        rows += page
        if len(page) < MAX_LINES:
            return rows


def _remote(api: Api, env_id: str, task: str | None, follow: bool, lines: int,
            interval: float) -> None:  # fmt: skip
    from corral.cli.jobs_client import LogReader

    rows = [t for t in _tasks(api, env_id) if matches(t["path"], t["id"], task)]
    if not rows:
        fail(1, f"environment {env_id} has no task {task!r}" if task else
             f"environment {env_id} has no tasks")  # fmt: skip
    if follow and len(rows) > FOLLOWED:
        fail(1, f"{len(rows)} tasks: -f follows at most {FOLLOWED} at once; name a TASK "
                "(a role's tasks: 'ROLE.*')")  # fmt: skip
    printer = Printer(t["path"] for t in rows)
    readers = {t["id"]: LogReader(api, f"/api/tasks/{_seg(t['id'])}/log") for t in rows}
    for t in rows:
        printer.write(t["path"], readers[t["id"]].first(lines))
    while follow:
        time.sleep(interval)
        state = api.call("GET", f"/api/environments/{_seg(env_id)}").get("state")
        final = state == "DONE"
        for t in rows:
            printer.write(t["path"], readers[t["id"]].new(final))
        if final:
            return
