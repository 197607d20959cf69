"""examples/c-task: the C task of examples/protocol/ built with the example's script and
run as its workflow, as a user does, on the local backend with real processes; and the
same task in C++ and Go (examples/protocol/, docs/protocol.md "Writing a task in C++ or
Go") run in its place.

Each test needs its compiler: `cc` for the C task (Debian: gcc), `c++` with the
nlohmann/json header for the C++ one (g++, nlohmann-json3-dev), `go` for the Go one
(golang-go); without it the test is skipped, saying what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from corral.store.files import DiskSources
from corral.templates import expand
from tests.conftest import EXAMPLES, ROOT
from tests.control.harness import Harness, run
from tests.fake_tasks import alive

EXAMPLE = Path(EXAMPLES, "c-task")
WORKFLOW = EXAMPLE / "c-task.yaml"
PATH = "c-task.minimal"  # the task's role path
LIFE = ["LAUNCHING", "STANDBY", "CONFIGURED", "RUNNING", "CONFIGURED", "DONE"]

needs_cc = pytest.mark.skipif(
    shutil.which("cc") is None,
    reason="no C compiler: `cc` is not on PATH (Debian: apt-get install gcc), so "
    "examples/c-task/build cannot build examples/protocol/minimal_task.c",
)


def build(tmp: Path) -> Path:
    """Build the task with the example's own script, into TMP (not into examples/)."""
    binary = tmp / "minimal_task"
    r = subprocess.run(["sh", str(EXAMPLE / "build"), str(binary)], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, CC="cc"))  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert binary.is_file() and os.access(binary, os.X_OK)
    return binary


def run_the_example(tmp: Path, binary: Path) -> str:
    """The example workflow with BINARY as its task, through DEPLOY, CONFIGURE,
    START_ACTIVITY, STOP_ACTIVITY and destroy; returns the task's log."""
    plan = expand(str(WORKFLOW), DiskSources(), variables={"c_task": str(binary)},
                  global_defaults={"python": sys.executable})  # fmt: skip
    [task] = plan.tasks
    assert (task.path, task.control, task.command.value) == (PATH, "direct", str(binary))
    log = ""

    async def body(h: Harness) -> None:
        nonlocal log
        env = h.create(plan)
        for event, state in [("DEPLOY", "DEPLOYED"), ("CONFIGURE", "CONFIGURED"),
                             ("START_ACTIVITY", "RUNNING")]:  # fmt: skip
            assert await env.transition(event) == state
        [rt] = env.tasks
        assert rt.state == "RUNNING" and rt.pid and alive(rt.pid)
        pid = rt.pid
        assert await env.transition("STOP_ACTIVITY") == "CONFIGURED"
        await h.plane.destroy(env.id)  # from CONFIGURED: EXIT, answered DONE, then exit 0
        assert env.state == "DONE" and rt.state == "DONE"
        await h.until(lambda: not alive(pid))
        assert [e["state"] for e in h.of("task") if PATH in e["tasks"]] == LIFE
        assert not [e for e in h.events if e.get("error") or e.get("state") == "ERROR"]
        log = (tmp / "data" / "logs" / env.id / f"{PATH}.log").read_text()

    run(tmp, body)
    return log


@needs_cc
def test_the_c_task_runs_through_configure_start_stop_and_destroy(tmp_path: Path) -> None:
    log = run_the_example(tmp_path, build(tmp_path))
    hello = re.search(r'minimal_task: says \{"state":"STANDBY","pid":(\d+),"protocol":1\}', log)
    assert hello, log
    for answer in ['{"id":1,"state":"CONFIGURED"}', '{"id":2,"state":"RUNNING"}',
                   '{"id":3,"state":"CONFIGURED"}', '{"id":4,"state":"DONE"}']:  # fmt: skip
        assert f"minimal_task: says {answer}" in log, log


@needs_cc
def test_corral_run_of_the_example(tmp_path: Path) -> None:
    """What the README says: build, then `corral run` (here with --for 0: up to RUNNING,
    then stop and tear down at once)."""
    binary = build(tmp_path)
    data = str(tmp_path / "data")
    corral = [sys.executable, "-m", "corral"]
    r = subprocess.run([*corral, "run", str(WORKFLOW), "--var", f"c_task={binary}",
                        "--data", data, "--for", "0"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([*corral, "events", "--data", data, "-o", "json"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["state"] for e in events if e["kind"] == "task" and PATH in e["tasks"]] == LIFE
    envs = [e["state"] for e in events if e["kind"] == "environment" and "transition" in e]
    assert envs == ["DEPLOYED", "CONFIGURED", "RUNNING", "CONFIGURED", "DONE"], envs
    runs = [(e["run_number"], e["status"]) for e in events if e["kind"] == "run"]
    assert runs == [(1, "STARTED"), (1, "STOPPED")]


def test_the_build_script_says_what_to_do_without_a_compiler(tmp_path: Path) -> None:
    out = tmp_path / "minimal_task"
    r = subprocess.run(["sh", str(EXAMPLE / "build"), str(out)], capture_output=True,
                       text=True, timeout=60,
                       env=dict(os.environ, CC=str(tmp_path / "no-such-cc")))  # fmt: skip
    assert r.returncode == 1 and not out.exists()
    assert "no C compiler" in r.stderr and "apt-get install gcc" in r.stderr
    assert "--var c_task=" in r.stderr


PROTOCOL = Path(EXAMPLES, "protocol")


def test_the_cpp_task_runs_in_the_example(tmp_path: Path) -> None:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler (c++ or g++; Debian: g++) for minimal_task.cpp")
    binary = tmp_path / "minimal_task"
    r = subprocess.run([cxx, "-std=c++17", "-Wall", "-o", str(binary),
                        str(PROTOCOL / "minimal_task.cpp")],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    if r.returncode != 0 and "nlohmann/json.hpp" in r.stderr:
        pytest.skip("no nlohmann/json header for minimal_task.cpp (Debian: nlohmann-json3-dev)")
    assert r.returncode == 0, r.stderr
    run_the_example(tmp_path, binary)


def test_the_go_task_runs_in_the_example(tmp_path: Path) -> None:
    go = shutil.which("go")
    if go is None:
        pytest.skip("no Go toolchain (go; Debian: golang-go) for minimal_task.go")
    binary = tmp_path / "minimal_task"
    env = dict(os.environ)
    if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = str(tmp_path / "gocache")  # go needs a build cache somewhere
    r = subprocess.run([go, "build", "-o", str(binary), str(PROTOCOL / "minimal_task.go")],
                       cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    run_the_example(tmp_path, binary)
