"""The example programs (examples/programs): a channel whose port is taken fails the
transition at once, saying why, instead of hanging until its deadline."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_a_taken_port_fails_configure_saying_so(tmp_path: Path) -> None:
    held = socket.socket()  # a program outside corral listens on the range's first port
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    inventory = tmp_path / "ports.yaml"
    inventory.write_text(
        f"nodes:\n  - name: localhost\n    cpu: 8\n    memory: 8000\n"
        f"    ports: {port}-{port + 50}\n"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-m", "corral", "run", "examples/datataking.yaml", "--data",
             str(tmp_path / "d"), "--inventory", str(inventory), "--until", "CONFIGURED",
             "--for", "0", "--timeout", "CONFIGURE=600"],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        held.close()
    assert r.returncode != 0, r.stderr
    # the task answered its error (not "no answer to CONFIGURE within 600 s")
    assert "Address already in use" in r.stderr, r.stderr
    assert "no answer to CONFIGURE" not in r.stderr, r.stderr
