"""``corral job``: the group of job commands, and ``corral job validate`` (check job files:
services, batch jobs, DAGs, periodic jobs; docs/jobs.md).

Running them: ``corral job run`` (cli/flow.py), and against a server ``corral job
list|show|logs|stop|scale`` (cli/jobs_client.py).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from corral.cli.console import Lazy, escape

if TYPE_CHECKING:  # (imported where they are used: the client commands need none of them)
    from corral.jobs.spec import JobSpec
    from corral.templates.diagnostics import Diagnostic

err = Lazy(stderr=True)


def read_job(path: str) -> tuple[JobSpec | None, list[Diagnostic]]:
    """A job file read (at most MAX_FILE_BYTES + 1 bytes: a larger one is refused) and
    checked; a periodic job's job named by file is read and checked too."""
    from corral.jobs.spec import BatchSpec, DagSpec, PeriodicSpec
    from corral.templates.diagnostics import Diagnostic

    spec, diags = _load(path)
    if isinstance(spec, PeriodicSpec) and spec.job_file is not None:
        target = os.path.join(os.path.dirname(path), spec.job_file)
        inner, inner_diags = _load(target)
        diags = list(inner_diags)
        if not os.path.isfile(target):
            diags = [Diagnostic(spec.job_loc, f"job {spec.job_file!r}: no such file")]
        elif inner is not None and not isinstance(inner, BatchSpec | DagSpec):
            diags.append(
                Diagnostic(
                    spec.job_loc,
                    f"job {spec.job_file!r} is a {inner.kind} job; a periodic job runs "
                    "a batch or dag job",
                )
            )
        if diags:
            return None, diags
    return spec, diags


def _load(path: str) -> tuple[JobSpec | None, list[Diagnostic]]:
    from corral.jobs.spec import MAX_FILE_BYTES, load_job
    from corral.templates.diagnostics import Diagnostic, Loc

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        return None, [Diagnostic(Loc(path), f"cannot read: {e.strerror or e}")]
    return load_job(path, data)


def report(diags: list[Diagnostic]) -> None:
    for d in diags:
        err.print(f"[bold red]error[/]: {escape(str(d))}", markup=True, emoji=False)
    n = len(diags)
    err.print(f"[red]{n} error{'s' if n != 1 else ''}[/]", markup=True)


def _validate_makeflow(path: str) -> bool:
    from corral.jobs.makeflow import MAX_FILE_CHARS, MakeflowError, parse

    try:
        with open(path, "rb") as f:
            text = f.read(MAX_FILE_CHARS + 1).decode("utf-8")
        mf = parse(text, path, dict(os.environ))
    except (OSError, UnicodeDecodeError) as e:
        err.print(f"[red]✗[/] {escape(path)}", markup=True)
        err.print(f"[bold red]error[/]: {escape(path)}: cannot read: {e}", markup=True)
        return False
    except MakeflowError as e:
        err.print(f"[red]✗[/] {escape(path)}", markup=True)
        for p in e.problems:
            err.print(f"[bold red]error[/]: {escape(str(p))}", markup=True)
        return False
    err.print(f"[green]✓[/] {escape(path)}: makeflow: {len(mf.rules)} rules, "
              f"{len(mf.outputs)} results", markup=True)  # fmt: skip
    return True


@click.group()
def job() -> None:
    """Services, batch jobs, DAGs and periodic jobs: check, run, follow (docs/jobs.md)."""


@job.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def validate(paths: tuple[str, ...]) -> None:
    """Check job files; print every error as FILE:LINE:COL: message (exit 1 on errors)."""
    from corral.jobs.spec import describe

    failed = 0
    for path in paths:
        if path.endswith((".makeflow", ".mf")):  # a Makeflow file (docs/makeflow.md)
            failed += not _validate_makeflow(path)
            continue
        spec, diags = read_job(path)
        if spec is None:
            failed += 1
            err.print(f"[red]✗[/] {escape(path)}", markup=True)
            report(diags)
        else:
            err.print(f"[green]✓[/] {escape(path)}: {escape(describe(spec))}", markup=True)
    if failed:
        sys.exit(1)
