"""Issue 11: what a new user found trying the security features (each failed before).

- two active tokens could share a name, and locks are held by a name: the second
  released the first one's lock;
- a lock on ``tpc`` did not protect ``TPC``, and ``T P C;`` was a detector name;
- ``?token=`` was taken by every endpoint (a token in a URL ends up in logs);
- ``--task-env CORRAL_TOKEN`` passed the server's token to every task;
- the data directory and the store were readable by every local user.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.server import Server
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with Server(tmp_path_factory.mktemp("newuser") / "data", "--backend", "sim") as s:
        yield s


def test_token_names_are_unique_among_active_tokens(server: Server) -> None:
    with server.client(server.admin) as admin:
        r = admin.post("/api/tokens", json={"role": "operator", "name": "shift-leader"})
        assert r.status_code == 201, r.text
        first = r.json()
        r = admin.post("/api/tokens", json={"role": "operator", "name": "shift-leader"})
        assert r.status_code == 409 and "already named 'shift-leader'" in r.json()["detail"]
        assert admin.delete(f"/api/tokens/{first['id']}").status_code == 200
        r = admin.post("/api/tokens", json={"role": "operator", "name": "shift-leader"})
        assert r.status_code == 201, r.text  # once revoked, the name is free again


def test_detector_names_are_checked_and_compared_in_capitals(server: Server) -> None:
    with server.client(server.admin) as admin:
        t = admin.post("/api/tokens", json={"role": "operator", "name": "caps-op"}).json()
    with server.client(t["token"]) as op:
        r = op.post("/api/locks", json={"detectors": ["T P C;"], "action": "take"})
        assert r.status_code == 422 and "use 1 to 64 letters" in r.json()["detail"], r.text
        r = op.post("/api/locks", json={"detectors": ["tpc"], "action": "take"})
        assert r.status_code == 200 and "TPC" in r.json(), r.text
        r = op.post("/api/locks", json={"detectors": ["Tpc"], "action": "release"})
        assert r.status_code == 200 and "TPC" not in r.json(), r.text


def test_a_token_in_the_url_is_taken_by_the_event_stream_only(server: Server) -> None:
    with server.client() as anon:
        r = anon.get("/api/environments", params={"token": server.admin})
        assert r.status_code == 401 and "?token= is taken by" in r.json()["detail"]
        r = anon.post(
            "/api/locks",
            params={"token": server.admin},
            json={"detectors": ["ZDC"], "action": "take"},
        )
        assert r.status_code == 401
        with anon.stream(
            "GET", "/api/events/stream", params={"token": server.admin, "after": "0"}
        ) as s:
            assert s.status_code == 200


def test_the_data_directory_is_its_users_only(server: Server) -> None:
    assert stat.S_IMODE(os.stat(server.data).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(server.data / "corral.db").st_mode) == 0o600


def test_task_env_refuses_corrals_own_variables(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "corral", "run", "examples/hello.yaml", "--data",
         str(tmp_path / "d"), "--for", "0", "--task-env", "CORRAL_TOKEN"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, CORRAL_TOKEN="crl_secret"),
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "CORRAL_* variables are corral's own" in r.stderr
