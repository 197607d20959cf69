"""`corral env|task|token|lock|events` against a real server, as a user runs them."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.api.server import Server
from tests.conftest import ROOT


def corral(server: Server, token: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CORRAL_SERVER=server.url)
    env.pop("CORRAL_TOKEN", None)
    if token:
        env["CORRAL_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)  # fmt: skip


def test_the_client_commands(tmp_path: Path) -> None:
    with Server(tmp_path / "data") as s:
        op = corral(s, s.admin, "token", "create", "--role", "operator", "--name", "shifter")
        assert op.returncode == 0, op.stderr
        op_token = op.stdout.strip()
        viewer = corral(s, s.admin, "token", "create", "--role", "viewer", "--name", "v").stdout
        r = corral(s, op_token, "env", "create", "hello", "--var", "greeting=from the cli")
        assert r.returncode == 0, r.stderr
        env_id = r.stdout.strip()
        for event in ("DEPLOY", "CONFIGURE", "START_ACTIVITY"):
            r = corral(s, op_token, "env", "control", env_id, event)
            assert r.returncode == 0, r.stderr
        assert "is RUNNING, run 1" in r.stdout
        r = corral(s, viewer.strip(), "env", "list", "-o", "json")
        [row] = json.loads(r.stdout)
        assert row["state"] == "RUNNING" and row["created_by"] == "shifter"
        r = corral(s, viewer.strip(), "env", "show", env_id)
        assert "RUNNING, run 1" in r.stdout and "tasks: RUNNING=1" in r.stdout
        r = corral(s, viewer.strip(), "task", "list", "--env", env_id)
        assert "hello.greeter" in r.stdout and "RUNNING" in r.stdout
        task_id = f"{env_id}:0"
        deadline = time.monotonic() + 60  # only stops a hung test
        while time.monotonic() < deadline:
            r = corral(s, viewer.strip(), "task", "logs", task_id)
            if r.stdout:
                break
            time.sleep(0.05)
        assert r.stdout == "from the cli\n"
        # a viewer may not control: exit 1 with the server's reason
        r = corral(s, viewer.strip(), "env", "control", env_id, "STOP_ACTIVITY")
        assert r.returncode == 1 and "Forbidden (403)" in r.stderr and "needs operator" in r.stderr
        r = corral(s, op_token, "lock", "take", "TPC")
        assert r.returncode == 0 and "shifter" in r.stdout
        r = corral(s, op_token, "events", "-o", "json", "--env", env_id)
        events = [json.loads(line) for line in r.stdout.splitlines()]
        assert any(e.get("actor") == "shifter" and e["kind"] == "transition" for e in events)
        r = corral(s, op_token, "env", "destroy", env_id)
        assert r.returncode == 0 and "DONE" in r.stdout
        # follow: the history, then live; stopped here by a timeout
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "events", "--follow", "--server", s.url,
             "--token", op_token], stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        try:
            corral(s, op_token, "env", "create", "hello")
            deadline = time.monotonic() + 60  # only stops a hung test
            seen = ""
            assert proc.stdout is not None
            while seen.count("note=created") < 2 and time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 0.2)
                if ready:
                    seen += os.read(proc.stdout.fileno(), 65536).decode()
            assert seen.count("note=created") == 2, seen
        finally:
            proc.kill()
            proc.wait()
    r = corral(s, op_token, "env", "list")
    assert r.returncode == 3 and "cannot reach" in r.stderr
    r = subprocess.run([sys.executable, "-m", "corral", "env", "list"], capture_output=True,
                       text=True, cwd=ROOT, env={k: v for k, v in os.environ.items()
                                                 if k != "CORRAL_SERVER"})  # fmt: skip
    assert r.returncode == 2 and "no server" in r.stderr
