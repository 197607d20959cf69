"""A task's log is the task's to write: whatever it puts in its place (a FIFO, a link
to a secret file, a link to /dev/zero), a log request answers at once, shows nothing
of another file, and never holds up the server; `corral logs --data` neither."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.api.server import Server
from tests.conftest import ROOT
from tests.jobs.test_jobs_api import until


def test_a_log_replaced_by_a_fifo_or_a_link_is_refused_at_once(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("not-for-viewers\n")
    with Server(tmp_path / "data") as s, s.client(s.admin) as c:
        env = c.post("/api/environments", json={"workflow": "hello"}).json()["id"]
        r = c.post(f"/api/environments/{env}/transitions", json={"event": "DEPLOY"})
        assert r.status_code == 200, r.text
        task = next(t for t in c.get("/api/tasks", params={"env": env}).json()
                    if t["path"] == "hello.greeter")  # fmt: skip
        url = f"/api/tasks/{task['id']}/log"
        log = Path(until("its log", lambda: c.get(url).json().get("lines") and
                         c.get(url).json()["path"]))  # fmt: skip
        log.unlink()
        os.mkfifo(log)  # nobody writes to it: opening it to read would wait forever
        r = c.get(url)
        assert r.status_code == 409 and "not a regular file" in r.json()["detail"], r.text
        assert c.get("/api/nodes").status_code == 200  # the server goes on
        for target in (secret, Path("/dev/zero")):
            log.unlink()
            log.symlink_to(target)
            r = c.get(url)
            assert r.status_code == 409 and "symbolic link" in r.json()["detail"], r.text
            assert "not-for-viewers" not in r.text
        # the same through `corral logs --data` on the server's data directory
        got = subprocess.run([sys.executable, "-m", "corral", "logs", env, "--data",
                              str(s.data)], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)  # fmt: skip
        assert "not-for-viewers" not in got.stdout + got.stderr
        assert "Traceback" not in got.stderr, got.stderr
        log.unlink()
        os.mkfifo(log)
        got = subprocess.run([sys.executable, "-m", "corral", "logs", env, "--data",
                              str(s.data)], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)  # fmt: skip
        assert "Traceback" not in got.stderr, got.stderr
