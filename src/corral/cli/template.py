"""``corral template validate|render|graph``: check and show what a workflow expands to."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import click

from corral.cli.console import Lazy, escape, table
from corral.cli.options import parse_vars, var_option

if TYPE_CHECKING:  # (imported where they are used: `corral --version` needs none of them)
    from corral.calls.builtin import BridgePlugin
    from corral.model.inventory import Node
    from corral.model.plan import Plan
    from corral.templates import Diagnostic

TIME_LIMIT = 60.0  # seconds an expansion may take (docs/templates.md, Bounds)
MAX_SHOWN = 200  # tasks `template render` lists on a terminal (-o wide: all)

err = Lazy(stderr=True)


def builtin_defaults(path: str) -> dict[str, str]:
    """Global defaults this machine provides to every template."""
    return {
        "python": sys.executable,
        "workflow_dir": os.path.dirname(os.path.abspath(path)),
    }


@dataclass
class SiteOptions:
    """--defaults, --inventory and --run-dpl: what the site gives templates."""

    defaults: dict[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    run_dpl: bool = False
    store: str | None = None  # a data directory's corral.db: its configuration, runtime


def expand_file(
    path: str, variables: dict[str, str], seed: str, site: SiteOptions | None = None
) -> tuple[Plan | None, list[Diagnostic]]:
    from corral.control.site import DplRunner, make_site, repository_of, with_store
    from corral.store.files import DiskSources
    from corral.store.sqlite import ConfigReader
    from corral.templates import check

    site = site or SiteOptions()
    sources = DiskSources()
    runner = DplRunner(repository_of(path)) if site.run_dpl else None
    services = make_site(path, site.nodes, run_dpl=runner)
    reader = None if site.store is None else ConfigReader(site.store)
    try:
        if reader is not None:
            with_store(services, reader)
        plan, diags = check(
            path,
            sources,
            variables=variables,
            global_defaults={**site.defaults, **builtin_defaults(path)},
            seed=seed,
            time_limit=TIME_LIMIT,
            clock=time.monotonic,
            services=services,
        )
    finally:
        if reader is not None:
            reader.close()
    if plan is None and not diags and sources.problems:  # pragma: no cover - defensive
        return None, diags
    return plan, diags


def call_plugin_option(f: Callable[..., None]) -> Callable[..., None]:
    return click.option(
        "--call-plugin", "call_plugins", multiple=True, metavar="NAME=COMMAND",
        help="A call plugin that is a command: NAME.Method(args) runs COMMAND Method args, "
        "the variables as JSON on its stdin (repeatable; docs/calls.md).",
    )(f)  # fmt: skip


def parse_call_plugins(
    pairs: Iterable[str], passed: dict[str, str] | None = None
) -> dict[str, BridgePlugin]:
    from corral.calls.builtin import BridgePlugin

    out: dict[str, BridgePlugin] = {}
    for pair in pairs:
        name, eq, command = pair.partition("=")
        if not eq or not name.isidentifier() or not command.strip():
            raise click.BadParameter(f"{pair!r}: expected NAME=COMMAND", param_hint="--call-plugin")
        out[name] = BridgePlugin(os.path.abspath(command) if os.sep in command else command, passed)
    return out


def is_task_file(path: str) -> bool:
    """A task class, not a workflow: a file of a ``tasks/`` folder, or one whose top
    level has a ``command`` and no ``roles``."""
    if os.path.basename(os.path.dirname(os.path.abspath(path))) == "tasks":
        return True
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            node = yaml.compose(f.read(1 << 20), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return False  # said when it is checked as a workflow
    if not isinstance(node, yaml.MappingNode):
        return False
    keys = {k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return "command" in keys and "roles" not in keys


def check_task_file(path: str, variables: dict[str, str], site: SiteOptions) -> list[Diagnostic]:
    """A task class checked on its own: parsed, and its command, channels and health
    check expanded with the site defaults, the variables and placeholders for what a
    workflow would give (a variable a template must set is named in the errors)."""
    from corral.store.files import DiskSources
    from corral.templates.expansion import check_task_file as check_task_text

    return check_task_text(
        path, DiskSources(), variables=variables,
        global_defaults={**site.defaults, **builtin_defaults(path)},
    )  # fmt: skip


def report_warnings(plan: Plan) -> None:
    for w in plan.warnings:
        err.print(f"[yellow]warning[/]: {escape(w)}", markup=True, emoji=False)


def report(diags: list[Diagnostic]) -> None:
    for d in diags:
        err.print(f"[bold red]error[/]: {escape(str(d))}", markup=True, emoji=False)
    n = len(diags)
    err.print(f"[red]{n} error{'s' if n != 1 else ''}[/]", markup=True)


seed_option = click.option(
    "--seed", default="0", show_default=True, help="Seed for uid.New() and environment_id."
)


def site_options(f: Callable[..., None]) -> Callable[..., None]:
    """--defaults FILE, --inventory FILE, --run-dpl, --data DIR: the site a template
    expands at."""
    f = click.option(
        "--data", "store_dir", metavar="DIR", type=click.Path(file_okay=False),
        help="Read the configuration store and runtime table of this data directory "
        "(read-only), for config.* and runtime.*.",
    )(f)  # fmt: skip
    f = click.option(
        "--run-dpl", is_flag=True,
        help="Run the DPL commands dpl.Generate* name (with --dump-workflow) in the workflow "
        "repository; without it a DPL command is an error, a JSON description in jit/ works.",
    )(f)  # fmt: skip
    f = click.option(
        "--inventory", "inventory", metavar="FILE", type=click.Path(dir_okay=False),
        help="Nodes and their labels, for inventory.* (detector, cards).",
    )(f)  # fmt: skip
    f = click.option(
        "--defaults", "defaults_file", metavar="FILE", type=click.Path(dir_okay=False),
        help="Site defaults: a YAML file of name: value under every template's own.",
    )(f)  # fmt: skip
    return f


def load_site(
    defaults_file: str | None, inventory: str | None, run_dpl: bool, store_dir: str | None = None
) -> SiteOptions:
    from corral.control.site import load_defaults
    from corral.store.inventory import load_inventory

    try:
        defaults = load_defaults(defaults_file) if defaults_file else {}
        nodes = load_inventory(inventory) if inventory else []
    except ValueError as e:  # SiteError, InventoryError: they say file and line
        raise click.UsageError(str(e)) from None
    store = None
    if store_dir is not None:
        store = os.path.join(store_dir, "corral.db")
        if not os.path.isfile(store):
            raise click.UsageError(f"--data {store_dir}: no store there (no corral.db)")
    return SiteOptions(defaults, nodes, run_dpl, store)


@click.group()
def template() -> None:
    """Check and show workflow templates."""


@template.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False))
@var_option
@seed_option
@site_options
def validate(
    paths: tuple[str, ...],
    variables: tuple[str, ...],
    seed: str,
    defaults_file: str | None,
    inventory: str | None,
    run_dpl: bool,
    store_dir: str | None,
) -> None:
    """Check workflow templates; print every error as FILE:LINE:COL: message.

    A task class file (in a tasks/ folder, or with a command and no roles) is checked
    on its own."""
    user = parse_vars(variables)
    site = load_site(defaults_file, inventory, run_dpl, store_dir)
    failed = 0
    for path in paths:
        t0 = time.perf_counter()
        if is_task_file(path):
            diags = check_task_file(path, user, site)
            if diags:
                failed += 1
                err.print(f"[red]✗[/] {escape(path)}", markup=True)
                report(diags)
            else:
                err.print(f"[green]✓[/] {path}: a task class", markup=True)
            continue
        plan, diags = expand_file(path, user, seed, site)
        if plan is None:
            failed += 1
            err.print(f"[red]✗[/] {escape(path)}", markup=True)
            report(diags)
        else:
            report_warnings(plan)
            ms = (time.perf_counter() - t0) * 1000
            err.print(
                f"[green]✓[/] {path}: {count_tasks(plan)}, {len(plan.calls)} calls, "
                f"{len(plan.binds)} binds, {len(plan.connects)} connects ({ms:.0f} ms)",
                markup=True,
            )
    if failed:
        sys.exit(1)


@template.command()
@click.argument("path", type=click.Path(dir_okay=False))
@var_option
@seed_option
@site_options
@click.option(
    "-o", "--output", type=click.Choice(["json", "yaml", "table", "wide"]), default="table",
    show_default=True, help="Output format; json is stable for scripts. table fits a "
    "terminal's width (cells cut short; not when written to a pipe or a file); wide never "
    "cuts, and lists every task.",
)  # fmt: skip
def render(
    path: str,
    variables: tuple[str, ...],
    seed: str,
    output: str,
    defaults_file: str | None,
    inventory: str | None,
    run_dpl: bool,
    store_dir: str | None,
) -> None:
    """Expand a workflow and print its plan."""
    site = load_site(defaults_file, inventory, run_dpl, store_dir)
    plan = plan_or_exit(path, variables, seed, site)
    data = plan.to_dict()
    if output == "json":
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    elif output == "yaml":
        import yaml

        sys.stdout.write(yaml.safe_dump(data, sort_keys=True, allow_unicode=True))
    else:
        print_table(plan, wide=output == "wide" or not sys.stdout.isatty())


def count_tasks(plan: Plan) -> str:
    """The plan's tasks as ``corral run`` counts them: the processes an environment keeps
    running, and apart from them the hook tasks (run to their end at a transition)."""
    hooks = sum(1 for t in plan.tasks if t.control == "hook")
    n = len(plan.tasks) - hooks
    said = f"{n} tasks"  # (as "1 calls": scripts read these lines)
    if hooks:
        said += f" + {hooks} hook task{'s' if hooks != 1 else ''}"
    return said


def plan_or_exit(path: str, variables: tuple[str, ...], seed: str, site: SiteOptions) -> Plan:
    """The plan; or the errors said, and exit 1."""
    if is_task_file(path):
        err.print(
            f"[bold red]error[/]: {escape(path)} is a task class, not a workflow: "
            "`corral template validate` checks it on its own; render a workflow that loads it",
            markup=True,
        )
        sys.exit(1)
    plan, diags = expand_file(path, parse_vars(variables), seed, site)
    if plan is None:
        report(diags)
        sys.exit(1)
    report_warnings(plan)
    return plan


def print_table(plan: Plan, wide: bool = False) -> None:
    """The plan as tables. On a terminal (``wide`` false) Rich fits them to its width,
    cutting long cells, and at most MAX_SHOWN tasks are listed; ``wide`` (``-o wide``,
    and whenever the output is a pipe or a file) prints every cell whole, every task."""
    tasks = [
        [t.path, t.task_class, t.control, str(t.critical).lower(),
         " ".join([t.command.value, *t.command.arguments])]
        for t in (plan.tasks if wide else plan.tasks[:MAX_SHOWN])
    ]  # fmt: skip
    calls = [
        [c.path, c.func, str(c.trigger), str(c.await_), f"{c.timeout:g}s",
         str(c.critical).lower()]
        for c in plan.calls
    ]  # fmt: skip
    task_head = ["task", "class", "control", "critical", "command"]
    call_head = ["call", "func", "trigger", "await", "timeout", "critical"]
    summary = (
        f"{count_tasks(plan)}, {len(plan.calls)} calls, {len(plan.binds)} binds, "
        f"{len(plan.connects)} connects, {len(plan.collections)} collections"
    )
    if wide:
        sys.stdout.write(f"{plan.name}: {plan.description}\n")
        table(tasks, task_head)
        if calls:
            table(calls, call_head)
        sys.stdout.write(summary + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    out.print(f"[bold]{escape(plan.name)}[/]: {escape(plan.description)}")
    t = Table(*task_head)
    for row in tasks:
        t.add_row(*(escape(c) for c in row))
    out.print(t)
    if len(plan.tasks) > MAX_SHOWN:
        out.print(f"... and {len(plan.tasks) - MAX_SHOWN} more tasks (-o wide or -o json: all)")
    if calls:
        c = Table(*call_head)
        for row in calls:
            c.add_row(*(escape(x) for x in row))
        out.print(c)
    out.print(summary + " (-o wide: the cells whole)")


@template.command()
@click.argument("path", type=click.Path(dir_okay=False))
@var_option
@seed_option
@site_options
@click.option(
    "-o", "--output", type=click.Choice(["dot", "svg"]), default="dot", show_default=True,
    help="dot: Graphviz's DOT text (draw it with Graphviz's `dot -Tsvg`, which is not "
    "installed with corral); svg: an SVG picture laid out by corral itself (the grandalf "
    "library, installed with corral), nothing else needed.",
)  # fmt: skip
def graph(
    path: str,
    variables: tuple[str, ...],
    seed: str,
    output: str,
    defaults_file: str | None,
    inventory: str | None,
    run_dpl: bool,
    store_dir: str | None,
) -> None:
    """Print the tasks and channels as a graph: Graphviz DOT text, or an SVG picture.

    `corral template graph FILE -o svg > flow.svg` needs nothing else; the DOT text
    needs Graphviz (`... | dot -Tsvg > flow.svg`, with Graphviz's `dot` installed). A
    server's web GUI draws a running environment's graph too."""
    site = load_site(defaults_file, inventory, run_dpl, store_dir)
    plan = plan_or_exit(path, variables, seed, site)
    if output == "svg":
        from corral.cli.graph import MAX_SVG_TASKS, to_svg

        if len(plan.tasks) > MAX_SVG_TASKS:  # (its layout grows faster than the graph)
            err.print(f"[bold red]error[/]: {len(plan.tasks)} tasks: -o svg draws at most "
                      f"{MAX_SVG_TASKS}; use the DOT output with Graphviz, or the GUI's graph "
                      "(it collapses by role)")  # fmt: skip
            sys.exit(1)
        sys.stdout.write(to_svg(plan))
    else:
        sys.stdout.write(to_dot(plan))


def to_dot(plan: Plan) -> str:
    """Tasks are nodes, clustered by their parent role; each connect is an edge from the
    side that sends to the side that receives, labelled with the channel names."""

    def q(s: str) -> str:
        return json.dumps(s, ensure_ascii=False)

    lines = [f"digraph {q(plan.name)} {{", "  rankdir=LR;", "  node [shape=box, fontsize=10];"]
    groups: dict[str, list[str]] = {}
    for t in plan.tasks:
        parent = t.path.rpartition(".")[0]
        groups.setdefault(parent, []).append(t.path)
    for i, (parent, members) in enumerate(groups.items()):
        lines.append(f"  subgraph cluster_{i} {{ label={q(parent)};")
        for m in members:
            label = m.rpartition(".")[2]
            lines.append(f"    {q(m)} [label={q(label)}];")
        lines.append("  }")
    for c in plan.connects:
        other = c.bind_task
        other_chan = c.bind_name or ""
        if other is None:
            other = c.address or c.target
            lines.append(f"  {q(other)} [shape=ellipse];")
        sends = c.type in ("push", "pub")
        a, b = (c.task, other) if sends else (other, c.task)
        ends = (c.name, other_chan) if sends else (other_chan, c.name)
        label = ends[0] if ends[0] == ends[1] or not ends[1] else "→".join(ends)
        lines.append(f"  {q(a)} -> {q(b)} [label={q(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
