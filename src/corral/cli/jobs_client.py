"""Jobs, services and the catalog on a control server (docs/jobs.md#command-line).

``corral job list|show|logs|stop|scale|files`` and ``corral job run NAME`` with a
server, ``corral service list|show|scale|rm`` and ``corral catalog [NAME]``. The server,
token and CA come as for the other client commands (``--server`` or ``CORRAL_SERVER``,
``--token`` or ``CORRAL_TOKEN``, ``--ca-cert`` or ``CORRAL_CA_CERT``); listings print
tables, or JSON with ``-o json``.

``corral job run NAME`` submits the job file NAME of the server's jobs directory and
follows the job to its end: a progress bar (on a terminal), each failed step with its
reason as it fails, and the final state. Ctrl-C detaches (the job keeps running) and
says how to follow it again; ``--detach`` returns at once, printing the job's id. A
service job is deployed (or updated) and the command returns.

``corral job logs ID --follow`` re-reads the end of a step's log until the step (or the
job) ends, printing each line once: the newest line is held back until the next one is
written, it has not changed for a moment, or the step ends (a line written in two parts
far apart in time shows as two).

Exit codes: 0 done (``job run``: the job succeeded); 1 the server refused (its problem
detail is printed) or the job failed, was cancelled or was lost; 2 the command line is
wrong; 3 the server cannot be reached; 130 ``job run`` interrupted (detached).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import quote

import click

from corral.cli import http
from corral.cli.client import Api, err, fail, out, output_option, server_options, show, unreachable
from corral.cli.console import escape, progress
from corral.cli.job import job

MAX_LOG_LINES = 10_000  # the most lines the server returns at once
LIVE = ("QUEUED", "RUNNING")  # a job in any other state has ended (or was lost)
STEP_FINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "BLOCKED"})
SHOWN_STEPS = 50  # `job show` without --all lists at most this many steps
SHOWN_FAILURES = 10  # `job run` names at most this many failed steps


def _seg(x: str) -> str:
    """A job id or service name as one URL path segment."""
    return quote(x, safe="")


def _when(t: Any) -> str:
    if not isinstance(t, int | float) or isinstance(t, bool):
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _counts(counts: Any) -> str:
    if not isinstance(counts, dict):
        return "-"
    return ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()) if n) or "-"


def _json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def _problem(r: http.Response) -> str:
    """A refusal as ``Api.call`` prints it: the problem's title, status and detail."""
    try:
        body = r.json()
        msg = f"{body.get('title', 'error')} ({r.status_code}): {body.get('detail')}"
        for item in body.get("errors", [])[:20]:
            text = item.get("message", item) if isinstance(item, dict) else item
            msg += f"\n  {text}"
        return msg
    except (ValueError, AttributeError):
        return f"HTTP {r.status_code}: {r.text[:500]}"


def _request(api: Api, method: str, path: str, **kw: Any) -> http.Response:
    """The server's answer, whatever its status (exit 3 if it cannot be reached)."""
    try:
        return api.client.request(method, path, **kw)
    except http.HTTPError as e:
        fail(3, unreachable(api.server, e))


def _lookup(api: Api, path: str) -> tuple[Any | None, str]:
    """GET ``path``: its body, or ``(None, the problem)`` when it is not found; any other
    refusal is printed (exit 1)."""
    r = _request(api, "GET", path)
    if r.status_code == 404:
        return None, _problem(r)
    if r.status_code >= 400:
        fail(1, _problem(r))
    return r.json(), ""


# -- jobs ------------------------------------------------------------------------------------


@job.command("files")
@server_options
@output_option
def job_files(server: str, token: str, output: str) -> None:
    """List the server's job files (what `job run NAME` runs)."""
    rows = Api(server, token).call("GET", "/api/job-files")
    show(rows, ["name", "file"], output)


@job.command("list")
@click.option("--state", default=None, metavar="STATE",
              help="Only jobs in this state (QUEUED, RUNNING, SUCCEEDED, FAILED ...).")  # fmt: skip
@server_options
@output_option
def job_list(state: str | None, server: str, token: str, output: str) -> None:
    """List the server's jobs: state, steps, owner, when submitted."""
    rows = Api(server, token).call("GET", "/api/jobs")
    if state:
        rows = [j for j in rows if str(j.get("state", "")).upper() == state.upper()]
    if output == "json":
        _json(rows)
        return
    rows = [dict(j, counts=_counts(j.get("counts")), created=_when(j.get("created")))
            for j in rows]  # fmt: skip
    show(rows, ["id", "name", "kind", "owner", "state", "units", "counts", "created"], output)


@job.command("show")
@click.argument("job_id", metavar="ID")
@click.option("--all", "all_steps", is_flag=True,
              help=f"List every step (else at most {SHOWN_STEPS}: those that did not "
                   "succeed, if any).")  # fmt: skip
@server_options
@output_option
def job_show(job_id: str, all_steps: bool, server: str, token: str, output: str) -> None:
    """Show a job and its steps (or, by its name, a service)."""
    api = Api(server, token)
    j, problem = _lookup(api, f"/api/jobs/{_seg(job_id)}")
    if j is None:
        svc, _ = _lookup(api, f"/api/services/{_seg(job_id)}")
        if svc is None:
            fail(1, f"{problem}; no service is named so either")
        _show_service(svc, output)
        return
    if output == "json":
        _json(j)
        return
    kind, pclass = escape(str(j.get("kind"))), escape(str(j.get("priority_class")))
    name, owner = escape(str(j.get("name"))), escape(str(j.get("owner")))
    out.print(f"[bold]{escape(j['id'])}[/] {name} ({kind}, owner {owner}, priority class "
              f"{pclass}): [bold]{escape(str(j['state']))}[/]")  # fmt: skip
    if j.get("reason"):
        out.print(f"  {escape(str(j['reason']))}")
    out.print(f"steps: {j.get('units')} ({_counts(j.get('counts'))}); submitted "
              f"{_when(j.get('created'))} UTC")  # fmt: skip
    if j.get("source"):
        out.print(f"file: {escape(str(j['source']))}")
    steps = j.get("steps") or []
    hidden = 0
    if not all_steps and len(steps) > SHOWN_STEPS:
        unfinished = [s for s in steps if s.get("state") != "SUCCEEDED"]
        picked = unfinished[:SHOWN_STEPS] or steps[:SHOWN_STEPS]
        hidden = len(steps) - len(picked)
        steps = sorted(picked, key=lambda s: int(s.get("index", 0)))
    rows = [{"step": s.get("index"), "name": s.get("name", s.get("index")), **s} for s in steps]
    if rows:
        show(rows, ["step", "name", "state", "attempt", "node", "reason"], "table")
    if hidden:
        out.print(f"... {hidden} more steps (--all lists them)")


@job.command("logs")
@click.argument("job_id", metavar="ID")
@click.option("--index", type=click.IntRange(0, 10_000_000), default=0, show_default=True,
              help="The step (array index, or DAG step number) whose log to print.")  # fmt: skip
@click.option("-n", "--lines", type=click.IntRange(1, MAX_LOG_LINES), default=100,
              show_default=True, help="How many of its last lines.")  # fmt: skip
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Then print its new lines as they are written, until the step ends.",
)
@click.option("--interval", type=click.FloatRange(0.1, 60), default=0.5, show_default=True,
              metavar="SECONDS", help="With --follow: how often the log is read.")  # fmt: skip
@server_options
def job_logs(job_id: str, index: int, lines: int, follow: bool, interval: float, server: str,
             token: str) -> None:  # fmt: skip
    """Print the end of a step's log (-f: and what follows)."""
    api = Api(server, token)
    path = f"/api/jobs/{_seg(job_id)}/log"
    if not follow:
        r = api.call("GET", path, params={"index": index, "lines": lines})
        _write(r["lines"])
        return
    try:
        _follow(api, job_id, index, lines, interval)
    except KeyboardInterrupt:
        sys.stdout.flush()


def _write(lines: list[str]) -> None:
    for line in lines:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()


class LogReader:
    """A log followed through the API by offsets: each read asks for what was written
    after the end of the last one (the server says where that is), so no line is
    printed twice or missed, however alike the lines are. A last line not ended yet is
    printed once the log is final."""

    def __init__(self, api: Api, path: str, params: dict[str, Any] | None = None) -> None:
        self.api = api
        self.path = path
        self.params = dict(params or {})
        self.offset = 0

    def first(self, lines: int) -> list[str]:
        """Its last ``lines`` lines."""
        r = self.api.call("GET", self.path, params={**self.params, "lines": max(lines, 1)})
        self.offset = int(r.get("offset") or 0)
        got: list[str] = r["lines"]
        return got[-lines:] if lines else []

    def new(self, final: bool) -> list[str]:
        """What was written since (when ``final``: all of it, however much)."""
        out: list[str] = []
        while True:
            params = {**self.params, "after": self.offset, "whole": final}
            r = self.api.call("GET", self.path, params=params)
            out += r["lines"]
            moved = int(r.get("offset") or 0) != self.offset
            self.offset = int(r.get("offset") or 0)
            if not final or not moved:
                return out


def _follow(api: Api, job_id: str, index: int, lines: int, interval: float) -> None:
    job_path = f"/api/jobs/{_seg(job_id)}"
    log = LogReader(api, f"/api/jobs/{_seg(job_id)}/log", {"index": index})
    first = True
    while True:
        j = api.call("GET", job_path)
        if first and isinstance(j.get("units"), int) and index >= j["units"]:
            fail(1, f"job {job_id} has {j['units']} steps: --index 0 to {j['units'] - 1}")
        final = _step_ended(j, index)
        if first:
            _write(log.first(lines))
            first = False
            if final:
                _write(log.new(final=True))  # (a last line not ended yet)
        else:
            _write(log.new(final))
        if final:
            return
        time.sleep(interval)


def _step_ended(j: dict[str, Any], index: int) -> bool:
    if j.get("state") not in LIVE:
        return True
    steps = j.get("steps") or []
    if index < len(steps) and steps[index].get("index") == index:
        return steps[index].get("state") in STEP_FINAL
    return False


@job.command("stop")
@click.argument("job_id", metavar="ID")
@server_options
@output_option
def job_stop(job_id: str, server: str, token: str, output: str) -> None:
    """Stop a job: its running steps are ended, no more start. Operator."""
    api = Api(server, token)
    r = _request(api, "DELETE", f"/api/jobs/{_seg(job_id)}")
    if r.status_code == 404 and _lookup(api, f"/api/services/{_seg(job_id)}")[0] is not None:
        fail(1, f"{job_id} is a service: `corral service rm {job_id}` removes it, "
                f"`corral job scale {job_id} 0` stops its replicas")  # fmt: skip
    if r.status_code >= 400:
        fail(1, _problem(r))
    j = r.json()
    if output == "json":
        _json(j)
        return
    out.print(f"job {j['id']} is {j['state']} ({_counts(j.get('counts'))})")


@job.command("resume")
@click.argument("job_id", metavar="ID")
@server_options
@output_option
def job_resume(job_id: str, server: str, token: str, output: str) -> None:
    """Run a failed or cancelled job again: the steps that succeeded are not run again.
    Operator."""
    api = Api(server, token)
    r = _request(api, "POST", f"/api/jobs/{_seg(job_id)}/resume")
    if r.status_code >= 400:
        fail(1, _problem(r))
    j = r.json()
    if output == "json":
        _json(j)
        return
    out.print(f"job {j['id']} is {j['state']}: {j.get('reason') or ''} "
              f"(`corral job show {j['id']}`)")  # fmt: skip


# -- services ----------------------------------------------------------------------------------


def _show_service(s: dict[str, Any], output: str) -> None:
    if output == "json":
        _json(s)
        return
    members = s.get("members") or []
    running = sum(1 for m in members if m.get("state") == "RUNNING")
    healthy = sum(1 for m in members if m.get("healthy"))
    out.print(f"service [bold]{escape(s['name'])}[/]: [bold]{s.get('state')}[/], "
              f"{s.get('replicas')} replicas wanted, {running} running, {healthy} healthy; "
              f"version {s.get('version')}, owner {escape(str(s.get('owner')))}"
              + (", protected" if s.get("protected") else ""))  # fmt: skip
    if s.get("reason"):
        out.print(f"  {escape(str(s['reason']))}")
    rows = [dict(m, ports=",".join(str(p) for p in m.get("ports") or []) or "-",
                 healthy="yes" if m.get("healthy") else "no") for m in members]  # fmt: skip
    if rows:
        show(rows, ["slot", "replica", "version", "state", "node", "address", "ports", "pid",
                    "healthy", "restarts", "reason"], "table")  # fmt: skip


def _scale(name: str, replicas: int, server: str, token: str, output: str) -> None:
    s = Api(server, token).call("POST", f"/api/services/{_seg(name)}/scale",
                                json={"replicas": replicas})  # fmt: skip
    if output == "json":
        _json(s)
        return
    n = s["replicas"]
    out.print(f"service {escape(s['name'])}: scaled to {n} replica{'s' if n != 1 else ''}")
    err.print(f"follow it with: corral service show {s['name']}")


_replicas = click.argument("replicas", type=click.IntRange(0, 10_000), metavar="N")


@job.command("scale")
@click.argument("name", metavar="SERVICE")
@_replicas
@server_options
@output_option
def job_scale(name: str, replicas: int, server: str, token: str, output: str) -> None:
    """Run N replicas of a service (those that stay keep running). Operator."""
    _scale(name, replicas, server, token, output)


@click.group("service")
def service() -> None:
    """Services on a control server: deploy with `corral job run NAME`; list, scale, remove."""


@service.command("list")
@server_options
@output_option
def service_list(server: str, token: str, output: str) -> None:
    """List services: state, replicas wanted, running and healthy, version, owner."""
    rows = Api(server, token).call("GET", "/api/services")
    if output == "json":
        _json(rows)
        return
    table = []
    for s in rows:
        members = s.get("members") or []
        table.append(dict(
            s, running=sum(1 for m in members if m.get("state") == "RUNNING"),
            healthy=sum(1 for m in members if m.get("healthy")),
        ))  # fmt: skip
    show(table, ["name", "state", "replicas", "running", "healthy", "version", "owner", "reason"],
         "table")  # fmt: skip


@service.command("show")
@click.argument("name")
@server_options
@output_option
def service_show(name: str, server: str, token: str, output: str) -> None:
    """Show a service and its replicas: state, node, address, ports, pid, health."""
    _show_service(Api(server, token).call("GET", f"/api/services/{_seg(name)}"), output)


@service.command("scale")
@click.argument("name")
@_replicas
@server_options
@output_option
def service_scale(name: str, replicas: int, server: str, token: str, output: str) -> None:
    """Run N replicas of the service NAME (as `corral job scale`). Operator."""
    _scale(name, replicas, server, token, output)


@service.command("rm")
@click.argument("name")
@server_options
def service_rm(name: str, server: str, token: str) -> None:
    """Remove a service: its replicas are stopped and it is forgotten. Operator."""
    Api(server, token).call("DELETE", f"/api/services/{_seg(name)}")
    out.print(f"service {escape(name)} removed")


# -- the catalog -------------------------------------------------------------------------------


@click.command("catalog")
@click.argument("name", required=False)
@server_options
@output_option
def catalog(name: str | None, server: str, token: str, output: str) -> None:
    """The healthy endpoints of every service (or of the service NAME)."""
    api = Api(server, token)
    if name is None:
        every = api.call("GET", "/api/catalog")
        if output == "json":
            _json(every)
            return
        rows = [e for eps in every.values() for e in eps]
    else:
        rows = api.call("GET", f"/api/catalog/{_seg(name)}")
        if output == "json":
            _json(rows)
            return
    if not rows:
        err.print("no healthy endpoint" + (f" of {escape(name)}" if name else ""))
        return
    show(rows, ["service", "slot", "node", "address", "port", "version"], "table")


# -- job run with a server ---------------------------------------------------------------------


def run_remote(name: str, server: str, token: str | None, detach: bool, output: str,
               interval: float = 0.5) -> NoReturn:  # fmt: skip
    """``corral job run NAME`` with a server: submit the job file NAME and follow it."""
    api = Api(server, token)
    try:
        r = _request(api, "POST", "/api/jobs", json={"file": name})
    except KeyboardInterrupt:
        err.print(f"interrupted while submitting {escape(name)}: it may have been submitted "
                  "all the same (`corral job list` says)")  # fmt: skip
        sys.exit(130)
    if r.status_code >= 400:
        msg = _problem(r)
        if r.status_code in (404, 422) and os.path.isfile(name):
            msg += (f"\nhint: {name} is a file here, but a server runs the files of its own "
                    "jobs directory (`corral job files`); add --local to run it on this "
                    "machine")  # fmt: skip
        fail(1, msg)
    j = r.json()
    if j.get("kind") == "service":
        if output == "json":
            _json(j)
        else:
            out.print(f"service {escape(j['name'])} deployed: {j.get('replicas')} replicas, "
                      f"version {j.get('version')}")  # fmt: skip
            err.print(f"follow it with: corral service show {j['name']}")
        sys.exit(0)
    if detach:
        if output == "json":
            _json(j)
        else:
            out.print(j["id"])
        sys.exit(0)
    err.print(f"job [bold]{escape(j['id'])}[/] ({escape(str(j.get('name')))}): "
              f"{j.get('units')} steps")  # fmt: skip
    try:
        final = _follow_job(api, j, interval)
    except KeyboardInterrupt:
        if err.is_terminal:
            err.print()  # (off the progress bar's line)
        err.print(f"detached: job {j['id']} goes on running; follow it again with "
                  f"`corral job show {j['id']}` or `corral job logs {j['id']} --follow`, "
                  f"stop it with `corral job stop {j['id']}`")  # fmt: skip
        sys.exit(130)
    if output == "json":
        _json(final)
    else:
        summary = _counts(final.get("counts"))
        ok = final["state"] == "SUCCEEDED"
        line = f"job {final['id']} {final['state']}: {summary}"
        if final.get("reason") and not ok:
            line += f" ({escape(str(final['reason']))})"
        (out if ok else err).print(line)
    sys.exit(0 if final["state"] == "SUCCEEDED" else 1)


def _follow_job(api: Api, j: dict[str, Any], interval: float) -> dict[str, Any]:
    """Poll the job until it ends: a progress bar on a terminal, each failed step once."""
    path = f"/api/jobs/{_seg(j['id'])}"
    reported: set[int] = set()
    state = j.get("state")
    total = int(j.get("units") or 0)
    bars = progress(err, transient=True, disable=not err.is_terminal)
    started = time.monotonic()
    with bars:
        bar = bars.add_task("submitted", total=total)
        while True:
            j = api.call("GET", path)
            c = {k: int(v) for k, v in (j.get("counts") or {}).items()}
            ended = sum(c.get(s, 0) for s in STEP_FINAL)
            desc = f"{c.get('RUNNING', 0)} running, {c.get('QUEUED', 0)} queued"
            if j.get("state") == "QUEUED" and j.get("reason"):
                desc += f" ({j['reason']})"
            bars.update(bar, completed=ended, description=escape(desc))
            if j.get("state") != state and not err.is_terminal and j.get("state") in LIVE:
                err.print(f"job {j['id']} {j.get('state')}")
            state = j.get("state")
            _report_failures(j, reported, bars.console.print, final=state not in LIVE)
            if state not in LIVE:
                return j
            # a longer wait the longer it runs: at most 4 reads a second, at least 1 each 5 s
            elapsed = time.monotonic() - started
            time.sleep(min(max(interval, elapsed / 60), 5.0))


def _report_failures(j: dict[str, Any], reported: set[int], say: Callable[[str], None],
                     final: bool) -> None:  # fmt: skip
    failed = [s for s in j.get("steps") or [] if s.get("state") == "FAILED"]
    for s in failed:
        idx = int(s.get("index", 0))
        if idx in reported:
            continue
        if len(reported) >= SHOWN_FAILURES:
            break
        reported.add(idx)
        say(f"[bold red]failed[/]: step {idx} {escape(str(s.get('name', idx)))} "
            f"(attempt {s.get('attempt')}, node {s.get('node') or '-'}): "
            f"{escape(str(s.get('reason') or 'failed'))} "
            f"(log: corral job logs {j['id']} --index {idx})")  # fmt: skip
    if final:
        more = len(failed) - len(reported)
        if more > 0:
            say(f"... and {more} more failed steps (corral job show {j['id']})")
