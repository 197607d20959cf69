"""``corral run`` and ``corral events``: an environment on this machine, from the shell.

``corral run`` starts an embedded control plane (the SQLite store in ``--data``, the
local backend), creates the environment from the template, drives it to RUNNING with
progress on every transition, prints the run number, and on Ctrl-C (or at the end of
``--for``) stops the run and tears everything down. Exit status: 0 when it ended as
asked, 1 when the template is wrong or the environment failed (the task, node and
reason are printed), 2 for a wrong command line.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from corral.cli.client import remote_events, server_options
from corral.cli.console import Lazy, progress
from corral.cli.hardening import private_process
from corral.cli.options import no_gc, parse_vars, var_option
from corral.cli.template import (
    TIME_LIMIT,
    builtin_defaults,
    call_plugin_option,
    count_tasks,
    load_site,
    parse_call_plugins,
    report,
    report_warnings,
)
from corral.lifecycle import task as tasksm

if TYPE_CHECKING:  # (imported where they are used: `corral events` needs none of them)
    import asyncio

    from corral.calls import Registry
    from corral.control.environment import Environment
    from corral.model.inventory import Node

out = Lazy()
err = Lazy(stderr=True)

PATH_TO = {
    "DEPLOYED": ("DEPLOY",),
    "CONFIGURED": ("DEPLOY", "CONFIGURE"),
    "RUNNING": ("DEPLOY", "CONFIGURE", "START_ACTIVITY"),
}
TASK_TARGET = {
    "DEPLOY": tasksm.STANDBY,
    "CONFIGURE": tasksm.CONFIGURED,
    "START_ACTIVITY": tasksm.RUNNING,
    "STOP_ACTIVITY": tasksm.CONFIGURED,
    "EXIT": tasksm.DONE,
    "RESET": tasksm.STANDBY,
}
DEFAULT_DATA = ".corral"


inventory_option = click.option(
    "--inventory",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="FILE",
    help="Nodes to place tasks on (YAML, docs/scheduling.md); default: the backend's own.",
)


priority_option = click.option(
    "--priority-class",
    "priority_classes",
    multiple=True,
    metavar="NAME=RANK",
    help="Priority classes to use instead of online=300 async=200 batch=100 (repeatable).",
)


task_env_option = click.option(
    "--task-env",
    "task_env",
    multiple=True,
    metavar="NAME",
    help="Pass this variable of this process's environment through to the tasks and "
    "exec calls (repeatable; they get only PATH, HOME, LANG, their class's env and "
    "corral's own otherwise).",
)


def parse_task_env(names: tuple[str, ...]) -> dict[str, str]:
    """The ``--task-env`` variables with their values here (a name not set here is
    said, and not passed), made what this process's exec calls get too."""
    for name in names:
        if not name or "=" in name or "\0" in name:
            raise click.BadParameter(
                f"{name!r}: expected a variable's name", param_hint="--task-env"
            )
        if name.startswith("CORRAL_"):  # the server's own (CORRAL_TOKEN) never reach tasks
            raise click.BadParameter(
                f"{name}: CORRAL_* variables are corral's own; tasks get theirs per task, "
                "never the server's",
                param_hint="--task-env",
            )
    from corral.ports import taskenv

    values = taskenv.passed(names)
    for name in sorted(set(names) - set(values)):
        err.print(f"[yellow]note[/]: --task-env {name}: not set here, so not passed to tasks")
    taskenv.set_default_passed(values)
    return values


def parse_priorities(pairs: tuple[str, ...]) -> dict[str, int] | None:
    if not pairs:
        return None
    out: dict[str, int] = {}
    for pair in pairs:
        name, eq, rank = pair.partition("=")
        if not eq or not name.strip() or not rank.strip().lstrip("-").isdigit():
            raise click.BadParameter(f"{pair!r}: expected NAME=RANK", param_hint="--priority-class")
        out[name.strip()] = int(rank)
    return out


def read_inventory(path: str | None) -> list[Node] | None:
    if path is None:
        return None
    from corral.store.inventory import InventoryError, load_inventory

    try:
        return load_inventory(path)
    except InventoryError as e:
        err.print(f"[bold red]error[/]: {e}")
        sys.exit(1)


data_option = click.option(
    "--data",
    default=DEFAULT_DATA,
    show_default=True,
    metavar="DIR",
    help="Data directory: the SQLite store and the tasks' logs.",
)


def _parse_timeouts(pairs: tuple[str, ...]) -> dict[str, float]:
    outd: dict[str, float] = {}
    for pair in pairs:
        k, eq, v = pair.partition("=")
        try:
            outd[k.strip().upper()] = float(v)
        except ValueError:
            raise click.BadParameter(
                f"{pair!r}: expected EVENT=SECONDS", param_hint="--timeout"
            ) from None
        if not eq or outd[k.strip().upper()] <= 0:
            raise click.BadParameter(
                f"{pair!r}: expected EVENT=SECONDS > 0", param_hint="--timeout"
            )
    return outd


class Seconds(click.FloatRange):
    """A number of seconds: a finite number within the range (``nan`` and ``inf`` pass
    a plain FloatRange)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        got = super().convert(value, param, ctx)
        if not math.isfinite(got):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return got


@click.command("run")
@click.argument("path", type=click.Path(dir_okay=False))
@var_option
@data_option
@click.option(
    "--until",
    type=click.Choice(list(PATH_TO)),
    default="RUNNING",
    show_default=True,
    help="Drive the environment to this state.",
)
@click.option(
    "--for",
    "duration",
    type=Seconds(min=0),
    default=None,
    metavar="SECONDS",
    help="Stay this long, then stop and tear down (default: until Ctrl-C).",
)
@click.option(
    "--timeout",
    "timeouts",
    multiple=True,
    metavar="EVENT=SECONDS",
    help="Deadline of a transition, e.g. CONFIGURE=5 (repeatable).",
)
@inventory_option
@priority_option
@task_env_option
@click.option(
    "--defaults", "defaults_file", metavar="FILE", type=click.Path(dir_okay=False),
    help="Site defaults: a YAML file of name: value under every template's own.",
)  # fmt: skip
@click.option("--run-dpl", is_flag=True, help="dpl.Generate* may run DPL commands.")
@call_plugin_option
def run(
    path: str,
    variables: tuple[str, ...],
    data: str,
    until: str,
    duration: float | None,
    timeouts: tuple[str, ...],
    inventory: str | None,
    priority_classes: tuple[str, ...],
    task_env: tuple[str, ...],
    defaults_file: str | None,
    run_dpl: bool,
    call_plugins: tuple[str, ...],
) -> None:
    """Run the workflow at PATH on this machine until Ctrl-C."""
    with no_gc():
        import asyncio

        from corral.backends.local import LocalBackend  # noqa: F401  (for _run)
        from corral.calls import CallError, Registry
        from corral.control import recipes
        from corral.control.plane import new_environment_id
        from corral.control.site import DplRunner, make_site, repository_of
        from corral.store.files import DiskSources
        from corral.store.lock import DataDirInUse, DataLock
        from corral.templates import check
        from corral.templates.services import RecordingSite

    private_process()  # its environment is not its tasks' to read
    passed = parse_task_env(task_env)
    user = parse_vars(variables)
    limits = _parse_timeouts(timeouts)
    nodes = read_inventory(inventory)
    classes = parse_priorities(priority_classes)
    env_id = new_environment_id()
    gdefaults = {**load_site(defaults_file, None, run_dpl).defaults, **builtin_defaults(path)}
    gdefaults["environment_id"] = env_id
    sources = recipes.RecordingSources(DiskSources())
    runner = DplRunner(repository_of(path), passed=passed) if run_dpl else None
    site = RecordingSite(make_site(path, nodes or [], run_dpl=runner))
    plan, diags = check(
        path, sources, variables=user, global_defaults=gdefaults, seed=env_id,
        time_limit=TIME_LIMIT, clock=time.monotonic, services=site,
    )  # fmt: skip
    if plan is None:
        report(diags)
        sys.exit(1)
    report_warnings(plan)
    problems = []
    registry = Registry(extra=parse_call_plugins(call_plugins, passed))
    for call in plan.calls:
        try:
            registry.check(call.func)
        except CallError as e:
            problems.append(f"call {call.path}: {e}")
    if problems:
        for p in problems:
            err.print(f"[bold red]error[/]: {p}")
        sys.exit(1)
    try:  # one control process per data directory, for as long as this one runs
        DataLock(data, f"corral run {path}").acquire()
    except DataDirInUse as e:
        err.print(f"[bold red]error[/]: {e}")
        sys.exit(1)
    code = asyncio.run(
        _run(
            plan,
            env_id,
            os.path.abspath(path),
            data,
            until,
            duration,
            limits,
            registry,
            nodes,
            classes,
            recipes.make(path, sources.files, user, gdefaults, env_id, site.record),
            passed,
        )
    )
    sys.exit(code)


async def _run(
    plan: Any,
    env_id: str,
    source: str,
    data: str,
    until: str,
    duration: float | None,
    timeouts: dict[str, float],
    registry: Registry,
    nodes: list[Node] | None,
    classes: dict[str, int] | None = None,
    recipe: str | None = None,
    task_env: dict[str, str] | None = None,
) -> int:
    import asyncio

    from corral.backends.local import LocalBackend
    from corral.control.environment import TransitionError
    from corral.control.journal import StoreUnavailable
    from corral.control.ledger import PlacementError
    from corral.control.plane import ControlPlane, install_child_watcher
    from corral.store.sqlite import SqliteStore

    install_child_watcher()
    loop = asyncio.get_running_loop()
    store = SqliteStore(os.path.join(data, "corral.db"))
    backend = LocalBackend(task_env=task_env)
    logs = os.path.join(os.path.abspath(data), "logs")
    plane = ControlPlane(
        store, backend, calls=registry, log_dir=logs, inventory=nodes, priority_classes=classes
    )
    # what a `corral run` that died left here is ended (a server would take it over)
    for note in await plane.adopt_leftovers(take_over=False):
        err.print(f"[yellow]note[/]: {note}")
    try:
        env = plane.create(plan, env_id=env_id, source=source, timeouts=timeouts, recipe=recipe)
    except (PlacementError, ValueError, StoreUnavailable) as e:
        err.print(f"[bold red]error[/]: the environment cannot be placed: {e}")
        await plane.close()
        store.close()
        return 1
    err.print(
        f"environment [bold]{env.id}[/] ({plan.name}): {count_tasks(plan)}, "
        f"{len(plan.calls)} calls; logs in {os.path.join(data, 'logs', env.id)} "
        f"(`corral logs {env.id} -f{'' if data == DEFAULT_DATA else ' --data ' + data}`)"
    )
    notes = _Notes(env)
    plane.bus.subscribe(notes.on_events)
    interrupted = asyncio.Event()
    main = asyncio.current_task()
    assert main is not None
    driving = True

    def on_signal() -> None:
        interrupted.set()
        if driving:
            main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    code = 0
    try:
        try:
            for event in PATH_TO[until]:
                await _transition(env, event)
            driving = False
            if env.run_number is not None:
                out.print(f"run number [bold]{env.run_number}[/] is RUNNING")
            else:
                out.print(f"environment {env.id} is {env.state}")
            err.print("press Ctrl-C to stop" + (f" (or wait {duration:g} s)" if duration else ""))
            code = await _watch(env, interrupted, duration, running=until == "RUNNING")
        except TransitionError as e:
            err.print(f"[bold red]error[/]: {e}")
            code = 1
        except asyncio.CancelledError:
            if not interrupted.is_set():
                raise
            err.print("interrupted")
        err.print("tearing down ...")
        driving = False
        try:
            await plane.close()
        except Exception as e:  # report, still exit
            err.print(f"[bold red]error[/] while tearing down: {e}")
            code = code or 1
        left = [t for t in env.tasks if t.state in tasksm.ALIVE]
        err.print(f"environment {env.id} is {env.state}; {len(left)} tasks alive")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        store.close()
    return code


async def _transition(env: Environment, event: str) -> None:
    import asyncio

    target = TASK_TARGET.get(event)
    total = sum(1 for t in env.tasks if not t.hook)
    if not err.is_terminal:
        err.print(f"{event} ...")
        await env.transition(event)
        err.print(f"{event} done: {env.state}; tasks {_counts(env)}")
        return
    with progress(
        err, "{task.description:<15}", "{task.fields[counts]}", transient=False
    ) as progress_bar:
        bar = progress_bar.add_task(event, total=total, counts="")
        job = asyncio.ensure_future(env.transition(event))
        while not job.done():
            done = sum(1 for t in env.tasks if t.state == target and not t.hook)
            progress_bar.update(bar, completed=done, counts=_counts(env))
            await asyncio.wait([job], timeout=0.1)
        progress_bar.update(
            bar, completed=total if job.exception() is None else None, counts=_counts(env)
        )
        job.result()


async def _watch(
    env: Environment, interrupted: asyncio.Event, duration: float | None, *, running: bool
) -> int:
    """Wait for Ctrl-C, the end of --for, a failure, or (when driven to RUNNING) the run
    stopping by itself; CONFIGURED with no run is where --until CONFIGURED stays."""
    import asyncio

    loop = asyncio.get_running_loop()
    end = None if duration is None else loop.time() + duration
    while True:
        if interrupted.is_set():
            return 0
        if env.state == "ERROR":
            err.print(f"[bold red]error[/]: environment {env.id} is in ERROR: {env.error}")
            return 1
        if (
            running
            and env.state == "CONFIGURED"
            and env.transitioning is None
            and env.run_number is None
        ):
            err.print("the run stopped: every task reported END_OF_STREAM")
            return 0
        if end is not None and loop.time() >= end:
            return 0
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(interrupted.wait(), 0.1)


def _counts(env: Environment) -> str:
    c = env.counts()
    return " ".join(f"{k}={v}" for k, v in sorted(c.items()))


class _Notes:
    """Prints what a person should see: failures, slow tasks, calls that failed."""

    def __init__(self, env: Environment) -> None:
        self.env = env

    def on_events(self, events: Any) -> None:
        for e in events:
            kind = e.get("kind")
            if kind == "task" and e.get("status") == "SLOW":
                err.print(f"[yellow]slow[/]: task {e['task']} on {e['node']}: {e['reason']}")
            elif kind == "task" and e.get("state") in (tasksm.ERROR, tasksm.LOST):
                crit = "" if e.get("critical", True) else " (non-critical)"
                err.print(
                    f"[red]task failed[/]{crit}: {e.get('task')} on {e.get('node')}: "
                    f"{e.get('reason')}"
                )
            elif kind == "call" and e.get("status") in ("FAILED", "TIMEOUT"):
                crit = "" if e.get("critical") else " (non-critical)"
                err.print(f"[red]call failed[/]{crit}: {e['path']} {e['func']}: {e.get('error')}")
            elif kind == "run" and e.get("status") == "STOPPED":
                err.print(f"run {e.get('run_number')} stopped")


@click.command("events")
@data_option
@server_options
@click.option("--env", "env_id", default=None, help="Only this environment's events.")
@click.option("--after", type=click.IntRange(min=0), default=0, help="Only events after this seq.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new events (with a server).")
@click.option(
    "-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="text: one line per event, its time in this machine's local time; json: one JSON "
    "object per line, its time in seconds since the epoch (for scripts).",
)  # fmt: skip
def events(
    data: str,
    server: str | None,
    token: str | None,
    env_id: str | None,
    after: int,
    follow: bool,
    output: str,
) -> None:
    """Print the events, oldest first: from a server (--server or CORRAL_SERVER), or
    from the store in --data.

    Each line: the event's number, its local time, the environment, the kind and the
    rest of it as key=value."""
    if server:
        remote_events(server, token, env_id, after, follow, output, _format_event)
        return
    if follow:
        raise click.UsageError("--follow needs a server (--server or CORRAL_SERVER)")
    db = os.path.join(data, "corral.db")
    if not os.path.exists(db):
        err.print(f"[bold red]error[/]: no store at {db} (is --data right?)")
        sys.exit(1)
    try:  # (read only: never made, nor written to, by reading its events)
        with open(db, "rb") as f:
            is_store = f.read(16) == b"SQLite format 3\0"
    except OSError as why:
        is_store, db = False, f"{db} ({why.strerror})"
    if not is_store:
        err.print(f"[bold red]error[/]: {db} is not a corral store")
        sys.exit(1)
    import sqlite3

    from corral.store.sqlite import SqliteStore

    try:
        store = SqliteStore(db)
    except sqlite3.Error as why:
        err.print(f"[bold red]error[/]: cannot read the store {db}: {why}")
        sys.exit(1)
    try:
        for e in store.events(env=env_id, after=after):
            if output == "json":
                sys.stdout.write(json.dumps(e, sort_keys=True) + "\n")
            else:
                sys.stdout.write(_format_event(e) + "\n")
    finally:
        store.close()


def _format_event(e: dict[str, Any]) -> str:
    skip = {"seq", "time", "kind", "env", "tasks"}
    rest = " ".join(f"{k}={v}" for k, v in e.items() if k not in skip)
    if "tasks" in e and isinstance(e["tasks"], list):
        shown = e["tasks"][:3]
        more = f" +{len(e['tasks']) - 3}" if len(e["tasks"]) > 3 else ""
        rest += f" tasks={','.join(shown)}{more}"
    return f"{e['seq']:>7} {local_time(e['time'])} {e.get('env') or '-':<11} {e['kind']:<11} {rest}"


def local_time(t: Any) -> str:
    """Seconds since the epoch as this machine's local time, to the millisecond."""
    if not isinstance(t, int | float) or isinstance(t, bool):
        return str(t)
    try:
        whole = time.localtime(int(t))
    except (OverflowError, OSError, ValueError):
        return str(t)
    ms = min(round((t - int(t)) * 1000), 999)
    return time.strftime("%Y-%m-%d %H:%M:%S", whole) + f".{ms:03d}"
