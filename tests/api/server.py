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
    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.args = args
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
            m = re.search(r"serving on (http://[\d.:]+)", text)
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

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self.fh.close()
