"""A real `corral serve` on 127.0.0.1, started as a child process for API tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from tests.conftest import ROOT


class Server:
    def __init__(self, data: Path, *args: str, keep_agent: bool = False) -> None:
        """``keep_agent``: leave the node agent (and the tasks) running at the end, for
        a test that starts the next server on the same data."""
        self.data = data
        self.args = args
        self.keep_agent = keep_agent
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.admin = ""
        self.output = ""

    def __enter__(self) -> Server:
        log = self.data.parent / f"{self.data.name}-server.log"
        self.log = log
        fh = open(log, "wb")
        self.fh = fh
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", "--data", str(self.data),
             "--listen", "127.0.0.1:0", "--workflows", os.path.join(ROOT, "examples"),
             *self.args],
            stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        end = time.monotonic() + 60  # only stops a hung test
        while time.monotonic() < end:
            text = log.read_text()
            m = re.search(r"serving on (https?://[\d.:]+)", text)  # https with --tls-cert
            if m:
                self.url = m.group(1)
                t = re.search(r"admin token \(shown once, keep it\): (\S+)", text)
                self.admin = t.group(1) if t else ""
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"server ended: {text}")
            time.sleep(0.05)
        raise AssertionError("server did not start: " + log.read_text())

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output = self.log.read_text()
        return self.proc.returncode

    def agent_pid(self) -> int | None:
        """The node agent the server started for its data directory (from its lock
        file), if it runs."""
        try:
            text = (self.data / "agent.lock").read_text()
        except FileNotFoundError:
            return None
        m = re.match(r"pid (\d+)", text)
        if m is None or not Path(f"/proc/{m.group(1)}").exists():
            return None
        return int(m.group(1))

    def stop_agent(self) -> None:
        """End the node agent (SIGTERM: it ends its tasks first) and wait for it."""
        pid = self.agent_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < end:
            stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}").exists() else ""
            if ") Z " in stat:
                break  # ended; reaped by its parent (init) soon
            time.sleep(0.02)

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if not self.keep_agent:
            self.stop_agent()
        self.fh.close()
