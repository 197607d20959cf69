"""What a `corral` command imports at start (issue 14, item 2), checked with
`python -X importtime`: what is named here is never imported, whatever the machine's
speed (the timings themselves are bench/cli_start.py's)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click

from tests.api.server import Server
from tests.conftest import ROOT

HEAVY = ("fastapi", "starlette", "uvicorn", "pydantic", "rich", "cel_expr_python", "httpx")
LIGHT = ("corral.cli.main", "corral.cli.options")  # what any command imports
CORE = ("corral.control", "corral.templates", "corral.api", "corral.store", "corral.backends")


def imported(*args: str, env: dict[str, str] | None = None) -> tuple[set[str], str]:
    """The modules `corral ARGS` imports, and what it printed on stdout."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "corral", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", r.stderr, re.M))
    assert "corral.cli.main" in names  # (the output is what this test expects)
    return names, r.stdout


def tops(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names} | {".".join(n.split(".")[:2]) for n in names}


def test_version_imports_no_command_and_nothing_heavy() -> None:
    names, out = imported("--version")
    assert out.startswith("corral, version ")
    assert not tops(names) & {*HEAVY, *CORE}, sorted(tops(names) & {*HEAVY, *CORE})
    assert not [n for n in names if n.startswith("corral.cli.") and n not in LIGHT]


def test_help_lists_every_command_without_importing_them() -> None:
    names, out = imported("--help")
    assert not [n for n in names if n.startswith("corral.cli.") and n not in LIGHT]
    from corral.cli.main import COMMANDS

    for name in COMMANDS:
        assert re.search(rf"^  {name} ", out, re.M), name


def test_the_help_summaries_are_the_commands_own() -> None:
    """`corral --help` shows the summaries kept in main.COMMANDS: each is the first
    sentence of its command's docstring."""
    from corral.cli.main import ATTRIBUTE, COMMANDS, cli

    for name, (modules, summary) in COMMANDS.items():
        for m in modules:
            importlib.import_module(m)
        command = getattr(importlib.import_module(modules[0]), ATTRIBUTE.get(name, name))
        assert isinstance(command, click.Command)
        assert command.get_short_help_str(limit=10_000) == summary, name
        ctx = click.Context(cli)
        assert cli.get_command(ctx, name) is command


def test_client_commands_import_neither_fastapi_nor_rich_nor_cel(tmp_path: Path) -> None:
    with Server(tmp_path / "data") as s:
        env = dict(os.environ, CORRAL_SERVER=s.url, CORRAL_TOKEN=s.admin)
        created = subprocess.run(
            [sys.executable, "-m", "corral", "env", "create", "hello"],
            capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        env_id = created.stdout.strip()
        names, out = imported("env", "list", env=env)
        assert not tops(names) & {*HEAVY, *CORE}, sorted(tops(names) & {*HEAVY, *CORE})
        assert "ssl" not in names  # (an http:// server: no TLS)
        header, row = out.splitlines()
        assert header.split() == ["id", "name", "state", "run_number", "tasks", "created_by"]
        assert row.split()[:3] == [env_id, "hello", "STANDBY"]
        names, out = imported("env", "list", "-o", "json", env=env)
        assert [e["id"] for e in json.loads(out)] == [env_id]
        assert not tops(names) & {*HEAVY, *CORE}
        # `corral job list` (its group's modules: job.py, flow.py, jobs_client.py)
        names, out = imported("job", "list", env=env)
        assert "corral.cli.jobs_client" in names and out.split() == [
            "id",
            "name",
            "kind",
            "owner",
            "state",
            "units",
            "counts",
            "created",
        ]
        assert not tops(names) & {*HEAVY, *CORE}, sorted(tops(names) & {*HEAVY, *CORE})
        # and the logs of its task, through the API
        names, _ = imported("logs", env_id, env=env)
        assert not tops(names) & {*HEAVY, *CORE}


def test_flow_and_job_help_import_no_fastapi() -> None:
    for args in (("flow", "run", "--help"), ("job", "run", "--help"), ("job", "--help")):
        names, _ = imported(*args)
        assert not tops(names) & {"fastapi", "starlette", "uvicorn", "corral.api"}, args


def test_run_imports_no_fastapi_nor_httpx(tmp_path: Path) -> None:
    """`corral run` pays for what runs an environment, not for the server's API or the
    http call plugin (imported at its first call)."""
    names, _ = imported(
        "run", os.path.join(ROOT, "examples", "hello.yaml"), "--data", str(tmp_path / "d"),
        "--until", "DEPLOYED", "--for", "0",
    )  # fmt: skip
    assert "corral.control.plane" in names
    assert not tops(names) & {"fastapi", "starlette", "uvicorn", "httpx", "corral.api"}
