"""``corral flow run|status`` and ``corral job run``: a DAG or a batch job on this machine.

``corral flow run FILE`` runs a Makeflow file unchanged (or a ``kind: dag`` job file)
with an embedded control plane, as ``corral run`` does for environments: the store and
the steps' logs in ``--data``, the local backend, the steps placed on this machine's
cpus (or an ``--inventory``). Progress is shown while it runs; a failed step is named
with its exit status and log. Run it again after a failure and it resumes: the steps
that succeeded (and whose outputs are still there) are not run again; ``--fresh``
runs everything. Ctrl-C stops the running steps and leaves the flow resumable.

Makeflow's rules run as Makeflow runs them: by ``/bin/sh -c``, in the current
directory. A YAML job runs in its file's directory.

Exit status: 0 the job succeeded, 1 it failed (or the file is wrong; every error is
printed as ``FILE:LINE``), 2 a wrong command line, 130 interrupted.

With a server (``--server`` or ``CORRAL_SERVER``), ``corral job run NAME`` submits the
server's job file NAME instead and follows it there (``corral.cli.jobs_client``);
``--local`` runs the file here all the same. ``corral flow run`` always runs here.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from corral.cli.client import output_option, server_options
from corral.cli.console import Lazy, escape, progress
from corral.cli.hardening import private_process
from corral.cli.job import job, read_job, report
from corral.cli.jobs_client import run_remote
from corral.cli.options import no_gc
from corral.cli.run import DEFAULT_DATA, parse_priorities, parse_task_env, read_inventory

if TYPE_CHECKING:  # (imported where they are used: the client commands need none of them)
    from corral.jobs.units import Units
    from corral.model.inventory import Node
    from corral.store.jobstore import JobStore

out = Lazy()
err = Lazy(stderr=True)


class Loaded:
    """A job read from its file, ready to submit."""

    def __init__(
        self, units: Units, name: str, kind: str, text: str, workdir: str, pclass: str
    ) -> None:
        self.units = units
        self.name = name
        self.kind = kind
        self.text = text
        self.workdir = workdir
        self.priority_class = pclass


def _is_makeflow(path: str, text: str) -> bool:
    if path.endswith((".makeflow", ".mf", ".jx")):
        return True
    return not any(line.startswith("kind:") for line in text.splitlines()[:200])


def load(path: str, failure: str | None) -> Loaded:
    """The job at ``path`` (a Makeflow file or a batch/dag job file); exits 1 with
    every error printed when it is wrong."""
    from corral.jobs.makeflow import MAX_FILE_CHARS, MakeflowError, parse
    from corral.jobs.spec import BatchSpec, DagSpec
    from corral.jobs.units import Units, units_of, units_of_makeflow

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_CHARS + 1)
        text = raw.decode("utf-8")
    except OSError as e:
        err.print(f"[bold red]error[/]: {escape(path)}: cannot read: {e.strerror or e}")
        sys.exit(1)
    except UnicodeDecodeError as e:
        err.print(f"[bold red]error[/]: {escape(path)}: not UTF-8 text (byte {e.start})")
        sys.exit(1)
    if _is_makeflow(path, text):
        try:
            mf = parse(text, path, dict(os.environ))
        except MakeflowError as e:
            for p in e.problems:
                err.print(f"[bold red]error[/]: {escape(str(p))}")
            sys.exit(1)
        name = os.path.splitext(os.path.basename(path))[0] or "flow"
        units = units_of_makeflow(mf, failure=failure or "stop")
        return Loaded(units, name, "makeflow", text, os.getcwd(), "batch")
    spec, diags = read_job(path)
    if spec is None:
        report(diags)
        sys.exit(1)
    if not isinstance(spec, BatchSpec | DagSpec):
        err.print(
            f"[bold red]error[/]: {escape(path)}: a {spec.kind} job does not run to an end; "
            "`corral job run` runs batch and dag jobs"
        )
        sys.exit(1)
    units = units_of(spec)
    if failure is not None and isinstance(spec, DagSpec):
        units = Units(units.specs, units.array, failure)
    workdir = os.path.dirname(os.path.abspath(path))
    return Loaded(units, spec.name, spec.kind, text, workdir, spec.placement.priority_class)


def _previous(store: JobStore, source: str) -> dict[str, Any] | None:
    """The last run of the file at ``source``, if any."""
    for row in reversed(store.jobs()):
        if row["source"] == source:
            return store.job(row["id"])  # (with its text)
    return None


def _units_of_text(row: dict[str, Any]) -> Units | None:
    """A previous run's units, from the text it ran (None: it no longer reads)."""
    from corral.jobs.makeflow import MakeflowError, parse
    from corral.jobs.spec import BatchSpec, DagSpec, load_job
    from corral.jobs.units import units_of, units_of_makeflow

    try:
        if row["kind"] == "makeflow":
            return units_of_makeflow(parse(row["text"], row["source"] or "", dict(os.environ)))
        spec, _ = load_job(row["source"] or "", row["text"])
    except (MakeflowError, ValueError):
        return None
    return units_of(spec) if isinstance(spec, BatchSpec | DagSpec) else None


def _key(units: Units, idx: int) -> tuple[Any, ...]:
    """What makes a step the same step in two versions of a file."""
    s = units.spec(idx)
    c = units.command(idx, "")
    name = units.name(idx).split("@", 1)[0]  # (a Makeflow rule's line may move)
    return (name, c.value, c.arguments, c.env, c.shell, c.cwd, s.outputs, s.inputs)


def _resumable(store: JobStore, job: Loaded, prev: dict[str, Any]) -> set[int]:
    """The steps a previous run of the file finished that need not run again: the same
    step (the same command, inputs and outputs, in the file as it is now), succeeded,
    its outputs still there, and every step it needs kept too (a step after one that
    changed runs again, as make would)."""
    from corral.control import runner as r

    before = job.units if prev["text"] == job.text else _units_of_text(prev)
    if before is None:
        return set()
    succeeded = {_key(before, u["idx"]) for u in store.units(prev["id"])
                 if u["state"] == r.SUCCEEDED and u["idx"] < before.count}  # fmt: skip
    units = job.units
    done: set[int] = set()
    grew = True
    while grew:  # a step is kept once every step it needs is kept
        grew = False
        for i in range(units.count):
            if i in done or _key(units, i) not in succeeded:
                continue
            spec = units.spec(i)
            if units.array is None and any(n not in done for n in spec.needs):
                continue
            if all(os.path.exists(os.path.join(job.workdir, o)) for o in spec.outputs):
                done.add(i)
                grew = True
    return done


_common = [
    click.option("--data", default=DEFAULT_DATA, show_default=True, metavar="DIR",
                 help="Data directory: the SQLite store and the steps' logs."),
    click.option("--inventory", metavar="FILE", default=None,
                 help="Nodes to place on (default: this machine's cpus and memory)."),
    click.option("--priority-class", "priority_classes", multiple=True, metavar="NAME=N",
                 help="A site priority class (repeatable)."),
    click.option("--task-env", "task_env", multiple=True, metavar="NAME",
                 help="Pass this variable of this shell to every step (repeatable)."),
    click.option("--fresh", is_flag=True,
                 help="Run every step, even those a previous run of this file finished."),
]  # fmt: skip


def common(f: Any) -> Any:
    for option in reversed(_common):
        f = option(f)
    return f


@click.group("flow")
def flow() -> None:
    """Run DAG workflows: Makeflow files unchanged, or dag job files (docs/jobs.md)."""


@flow.command("run")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--failure", type=click.Choice(["stop", "continue"]), default=None,
              help="After a step fails: start nothing new (stop, the default for Makeflow "
                   "files) or run what does not need it (continue).")  # fmt: skip
@common
def flow_run(path: str, failure: str | None, **kw: Any) -> None:
    """Run the Makeflow (or dag job) file PATH on this machine; resume a failed run."""
    run_job(path, failure, **kw)


@flow.command("status")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--data", default=DEFAULT_DATA, show_default=True, metavar="DIR")
def flow_status(path: str, data: str) -> None:
    """The last run of PATH: its state and each step's (from the store in --data)."""
    from corral.control import runner as r
    from corral.store.jobstore import JobStore
    from corral.store.sqlite import SqliteStore

    db = os.path.join(data, "corral.db")
    if not os.path.exists(db):
        err.print(f"[bold red]error[/]: no store in {escape(data)}")
        sys.exit(1)
    store = SqliteStore(db)
    jobs = JobStore(store)
    source = os.path.abspath(path)
    rows = [j for j in jobs.jobs() if j["source"] == source]
    if not rows:
        err.print(f"no run of {escape(path)} in {escape(data)}")
        sys.exit(1)
    row = rows[-1]
    counts = ", ".join(f"{n} {s}" for s, n in sorted(row["counts"].items()))
    out.print(f"{row['id']} {row['name']}: {row['state']} ({counts})")
    if row["reason"]:
        out.print(f"  {escape(row['reason'])}")
    for u in jobs.units(row["id"]):
        if u["state"] != r.SUCCEEDED:
            why = f": {u['reason']}" if u["reason"] else ""
            out.print(f"  step {u['idx']} {u['state']}{escape(why)}")
    store.close()


def run_job(
    path: str,
    failure: str | None,
    data: str,
    inventory: str | None,
    priority_classes: tuple[str, ...],
    task_env: tuple[str, ...],
    fresh: bool,
) -> None:
    """Run the job file at ``path`` here and exit with its status (130: Ctrl-C)."""
    try:
        code = _run_job(path, failure, data, inventory, priority_classes, task_env, fresh)
    except KeyboardInterrupt:  # (before its own handling of Ctrl-C is in place)
        err.print(f"interrupted before {escape(path)} started: no step ran")
        code = 130
    sys.exit(code)


def _run_job(
    path: str,
    failure: str | None,
    data: str,
    inventory: str | None,
    priority_classes: tuple[str, ...],
    task_env: tuple[str, ...],
    fresh: bool,
) -> int:
    with no_gc():  # (what _run needs, imported now)
        import asyncio

        import corral.backends.local
        import corral.control.plane
        import corral.jobs.makeflow
        import corral.jobs.spec
        import corral.store.sqlite  # noqa: F401
        from corral.store.lock import DataDirInUse, DataLock

    private_process()
    job = load(path, failure)
    nodes = read_inventory(inventory)
    classes = parse_priorities(priority_classes)
    passed = parse_task_env(task_env)
    try:
        DataLock(data, f"corral flow run {path}").acquire()
    except DataDirInUse as e:
        err.print(f"[bold red]error[/]: {e}")
        sys.exit(1)
    return asyncio.run(_run(job, os.path.abspath(path), data, nodes, classes, passed, fresh))


async def _run(
    job: Loaded,
    source: str,
    data: str,
    nodes: list[Node] | None,
    classes: dict[str, int] | None,
    passed: dict[str, str],
    fresh: bool,
) -> int:
    import asyncio

    from corral.control.plane import install_child_watcher

    install_child_watcher()
    loop = asyncio.get_running_loop()
    # Ctrl-C (or SIGTERM) from now on: before the job is submitted, nothing starts; after,
    # its running steps are stopped and the flow can be resumed
    interrupted = False
    stopping: list[asyncio.Future[Any]] = []
    submitted: list[Callable[[], Awaitable[Any]]] = []  # how to stop the job, once it is

    def on_signal() -> None:
        nonlocal interrupted
        interrupted = True
        if submitted and not stopping:
            stopping.append(asyncio.ensure_future(submitted[0]()))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        return await _submit_and_follow(
            job, source, data, nodes, classes, passed, fresh, submitted, lambda: interrupted
        )
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _submit_and_follow(
    job: Loaded,
    source: str,
    data: str,
    nodes: list[Node] | None,
    classes: dict[str, int] | None,
    passed: dict[str, str],
    fresh: bool,
    submitted: list[Callable[[], Awaitable[Any]]],
    interrupted: Callable[[], bool],
) -> int:
    import asyncio

    from corral.backends.local import LocalBackend
    from corral.control import runner as r
    from corral.control.journal import StoreUnavailable
    from corral.control.plane import ControlPlane
    from corral.store.sqlite import SqliteStore

    store = SqliteStore(os.path.join(data, "corral.db"))
    logs = os.path.join(os.path.abspath(data), "logs")
    plane = ControlPlane(
        store, LocalBackend(task_env=passed), log_dir=logs, inventory=nodes,
        priority_classes=classes,
    )  # fmt: skip
    for note in await plane.adopt_leftovers(take_over=False):
        err.print(f"[yellow]note[/]: {note}")
    # steps a `corral flow run` that died left running are ended before anything starts
    # again (a resumed step must not run beside its old self)
    left = [row["id"] for row in plane.jobs.store.jobs(unfinished=True)]
    if left:
        ended = await plane.backend.end_leftovers(left)
        if ended:
            err.print(f"[yellow]note[/]: {ended} steps a previous run left running are ended")
    done: set[int] = set()
    prev = None if fresh else _previous(plane.jobs.store, source)
    # a flow picks up from its last run, as make does (a batch job after a failure only)
    if prev is not None and (job.kind != "batch" or prev["state"] != r.SUCCEEDED):
        done = _resumable(plane.jobs.store, job, prev)
        if done:
            err.print(f"resuming {prev['id']}: {len(done)} of {job.units.count} steps "
                      "already done (--fresh runs them again)")  # fmt: skip
    if interrupted():
        await plane.close()
        store.close()
        err.print(f"interrupted before {escape(job.name)} started: no step ran; run the same "
                  "command again to run it")  # fmt: skip
        return 130
    try:
        j = plane.jobs.submit(
            job.units, name=job.name, kind=job.kind, text=job.text, workdir=job.workdir,
            owner=os.environ.get("USER", "") or "local", priority_class=job.priority_class,
            source=source, done=done,
        )  # fmt: skip
    except (ValueError, StoreUnavailable) as e:
        err.print(f"[bold red]error[/]: {e}")
        await plane.close()
        store.close()
        return 1
    submitted.append(lambda: plane.jobs.cancel(j.id, actor="Ctrl-C"))
    err.print(f"job [bold]{j.id}[/] ({escape(job.name)}): {job.units.count} steps; "
              f"logs in {os.path.join(data, 'logs', j.id)}")  # fmt: skip
    if interrupted():  # (Ctrl-C while it was submitted)
        await plane.jobs.cancel(j.id, actor="Ctrl-C")
    bars = progress(err, transient=True, disable=not err.is_terminal)
    assert j.done is not None
    with bars:
        bar = bars.add_task("steps", total=job.units.count)
        while not j.done.done():
            await asyncio.wait([j.done], timeout=0.25)
            c = j.counts
            bars.update(
                bar, completed=c[r.SUCCEEDED] + c[r.FAILED] + c[r.BLOCKED],
                description=f"{c[r.RUNNING]} running, {c[r.QUEUED]} queued",
            )  # fmt: skip
    state = j.done.result()
    c = j.counts
    summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(c.items()) if n)
    if interrupted():
        await plane.close()
        store.close()
        err.print(f"interrupted: job {j.id} ({escape(job.name)}) stopped ({summary}); run "
                  "the same command again to resume (the steps that succeeded do not run "
                  "again)")  # fmt: skip
        return 130
    failed = [u for u in j.members if u.state == r.FAILED]
    for u in failed[:10]:
        log_path = os.path.join(data, "logs", j.id, f"{u.idx}.log")
        err.print(f"[bold red]failed[/]: {escape(j.units.name(u.idx))}: "
                  f"{escape(u.reason or '')} (log: {log_path})")  # fmt: skip
    if len(failed) > 10:
        err.print(f"... and {len(failed) - 10} more failed steps")
    (out if state == r.SUCCEEDED else err).print(f"job {j.id} {state}: {summary}")
    await plane.close()
    store.close()
    return 0 if state == r.SUCCEEDED else 1


LOCAL_ONLY = ("data", "inventory", "priority_classes", "task_env", "fresh")


@job.command("run")
@click.argument("name_or_file", metavar="NAME_OR_FILE")
@click.option(
    "--detach",
    is_flag=True,
    help="With a server: return once the job is submitted, printing its id.",
)
@click.option(
    "--local", is_flag=True, help="Run the file on this machine even when CORRAL_SERVER is set."
)
@common
@server_options
@output_option
def job_run(name_or_file: str, detach: bool, local: bool,
            server: str | None, token: str | None, output: str, **kw: Any) -> None:  # fmt: skip
    """Run a job to its end: on the server, or on this machine.

    With a server (--server or CORRAL_SERVER): submit the job file NAME of the server's
    jobs directory and follow it (Ctrl-C detaches; a service is deployed and the
    command returns). Without one (or with --local): run the batch or dag job file on
    this machine with an embedded control plane, as `corral flow run` does. Exit 0: the
    job succeeded; 1: it failed (or was refused); 130: interrupted.
    """
    if server and not local:
        ctx = click.get_current_context()
        given = [p.opts[0] for p in ctx.command.params
                 if p.name in LOCAL_ONLY and p.name is not None
                 and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]  # fmt: skip
        if given:
            raise click.UsageError(
                f"{', '.join(given)}: only for a run on this machine, but the job goes to "
                f"{server} (--server, CORRAL_SERVER); add --local to run the file here"
            )
        run_remote(name_or_file, server, token, detach, output)
    if detach:
        raise click.UsageError("--detach: only with a server (--server, CORRAL_SERVER)")
    if output != "table":
        raise click.UsageError("-o json: only with a server (--server, CORRAL_SERVER)")
    run_job(name_or_file, None, **kw)
