"""``corral template ...`` as a user runs it: a real process, real files, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import EXAMPLES, ROOT

BROKEN = os.path.join(ROOT, "tests", "templates", "broken", "broken.yaml")


def corral(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_render_json_prints_the_plan() -> None:
    r = corral(
        "template", "render", "examples/datataking.yaml",
        "--var", 'hosts=["flp1","flp2"]', "-o", "json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert len(plan["tasks"]) == 12
    assert plan["variables"] == {"hosts": '["flp1","flp2"]'}
    stfb = next(t for t in plan["tasks"] if t["path"] == "datataking.flp-flp2.stfb")
    assert stfb["command"]["arguments"][0] == os.path.join(EXAMPLES, "programs", "relay.py")
    # stable for scripts: the same command prints the same bytes
    again = corral(
        "template", "render", "examples/datataking.yaml",
        "--var", 'hosts=["flp1","flp2"]', "-o", "json",
    )  # fmt: skip
    assert again.stdout == r.stdout


def test_render_yaml_and_table() -> None:
    r = corral("template", "render", "examples/hello.yaml", "-o", "yaml")
    assert r.returncode == 0 and "path: hello.greeter" in r.stdout
    r = corral("template", "render", "examples/hello.yaml")
    assert r.returncode == 0 and "hello.greeter" in r.stdout and "1 tasks, 1 calls" in r.stdout


def test_validate_reports_every_error_and_exits_1() -> None:
    r = corral("template", "validate", "examples/hello.yaml", BROKEN)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 10
    assert "✓ examples/hello.yaml" in r.stderr
    assert "10 errors" in r.stderr


def test_validate_good_files_exits_0() -> None:
    r = corral("template", "validate", "examples/hello.yaml", "examples/datataking.yaml")
    assert r.returncode == 0, r.stderr


def test_graph_is_dot() -> None:
    r = corral("template", "graph", "examples/datataking.yaml", "--var", 'hosts=["a"]')
    assert r.returncode == 0
    assert r.stdout.startswith('digraph "datataking" {')
    assert '"datataking.flp-a.readout" -> "datataking.flp-a.stfb" [label="readout"];' in r.stdout
    assert '"datataking.epn-localhost.proc-1" -> "datataking.qc" [label="qc→input"];' in r.stdout


def test_bad_arguments() -> None:
    r = corral("template", "render", "examples/hello.yaml", "--var", "novalue")
    assert r.returncode == 2 and "expected NAME=VALUE" in r.stderr
    r = corral("template", "render", "does/not/exist.yaml")
    assert r.returncode == 1 and "does/not/exist.yaml: no such file" in r.stderr
    r = corral("template", "render", "examples/hello.yaml", "-o", "xml")
    assert r.returncode == 2
