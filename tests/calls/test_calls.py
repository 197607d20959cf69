"""Call plugins for real: parsing, the entry points, processes, an HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from corral.calls import CallContext, CallError, Registry, parse_func
from corral.control.plane import install_child_watcher

CTX = CallContext("env1", "CONFIGURE", "before_CONFIGURE", "wf.dcs", "x", 7, {"detector": "TPC"})


def invoke(func: str, timeout: float = 60.0) -> Any:
    """Make a call; the timeout only ends a call that would hang."""

    async def main() -> Any:
        install_child_watcher()
        return await asyncio.wait_for(Registry().invoke(func, CTX), timeout)

    return asyncio.run(main())


def time_out(func: str, timeout: float) -> asyncio.Task[Any]:
    """Make a call that outlives its timeout: TimeoutError, at the earliest after the
    timeout. Returns the call's task, done by then (asyncio.wait_for waits for it)."""
    task: asyncio.Task[Any] | None = None

    async def main() -> None:
        nonlocal task
        install_child_watcher()
        task = asyncio.ensure_future(Registry().invoke(func, CTX))
        await asyncio.wait_for(task, timeout)

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert time.monotonic() - t0 >= timeout
    assert task is not None and task.done()
    return task


def left_behind(pidfile: Path) -> list[int]:
    """Processes of CTX's calls still there: the pid in pidfile, if it was written (even
    as a zombie), and any process whose environment names CTX's call."""
    needle = f"CORRAL_CALL_PATH={CTX.path}".encode()
    out = []
    if pidfile.exists() and Path(f"/proc/{int(pidfile.read_text())}").exists():
        out.append(int(pidfile.read_text()))
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        out.append(int(d))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return out


def test_parse_func() -> None:
    p = parse_func("test.Sleep(0.5)")
    assert (p.plugin, p.method, p.args) == ("test", "Sleep", (0.5,))
    p = parse_func("exec.Run('/bin/echo', \"hi\", 3, true, null)")
    assert p.args == ("/bin/echo", "hi", 3, True, None)
    assert parse_func("test.Noop()").args == ()
    for bad in ["test", "test.Noop", "Noop()", "test.Sleep(x)", "a.b.c()", "test.X(k=1)",
                "test.X([1])", "test.X(__import__('os'))"]:  # fmt: skip
        with pytest.raises(CallError, match="bad call"):
            parse_func(bad)


def test_the_registry_loads_the_entry_points_and_checks_calls() -> None:
    reg = Registry()
    assert {"test", "exec", "http"} <= set(reg.names())
    reg.check("test.Noop()")
    with pytest.raises(CallError, match=r"unknown plugin 'dcs'.*known: .*exec"):
        reg.check("dcs.PrepareForRun()")
    with pytest.raises(CallError, match=r"has no method 'Nap'.*Sleep"):
        reg.check("test.Nap()")


def test_test_plugin() -> None:
    assert invoke("test.Noop()") is None
    assert invoke("test.Echo('x')") == "x"
    with pytest.raises(CallError, match="dcs said no"):
        invoke("test.Fail('dcs said no')")
    with pytest.raises(CallError, match="takes 1 arguments"):
        invoke("test.Sleep()")
    # 60 s: a call that was not cancelled would end by itself, not cancelled
    assert time_out("test.Sleep(60)", 0.2).cancelled(), "the sleeping call was not cancelled"


def test_exec_plugin(tmp_path: Path) -> None:
    assert invoke(f"exec.Run('{sys.executable}', '-c', 'print(1)')") == "1"
    assert invoke("exec.Shell('echo $CORRAL_RUN_NUMBER $CORRAL_EVENT')") == "7 CONFIGURE"
    with pytest.raises(CallError, match=r"ended with status 3: oops"):
        invoke("exec.Shell('echo oops >&2; exit 3')")
    with pytest.raises(CallError, match="no such file"):
        invoke("exec.Run('/no/such/program')")
    pidfile = tmp_path / "pid"
    assert left_behind(pidfile) == []
    task = time_out(f"exec.Shell('echo $$ > {pidfile}; exec sleep 60')", 0.3)
    assert task.cancelled(), "the command was not cancelled"
    assert left_behind(pidfile) == [], "the timed-out command was not killed and reaped"


class Handler(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict[str, Any]]] = []
    release: ClassVar[threading.Event] = threading.Event()  # set when the test is over

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        if self.path == "/slow":
            Handler.release.wait(600)  # it answers only after the test: the client gives up
            return
        status = 500 if self.path == "/fail" else 200
        payload = b"dcs is down" if status == 500 else b'{"ok":true}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", 0))
        Handler.bodies.append(json.loads(self.rfile.read(n)))
        self._answer()

    def do_GET(self) -> None:
        self._answer()


@pytest.fixture
def server() -> Iterator[str]:
    Handler.release.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        Handler.release.set()
        srv.shutdown()
        srv.server_close()


def test_http_plugin(server: str) -> None:
    Handler.bodies.clear()
    assert invoke(f"http.Post('{server}/sor')") == '{"ok":true}'
    [body] = Handler.bodies
    assert body["environment_id"] == "env1" and body["run_number"] == 7
    assert body["variables"] == {"detector": "TPC"} and body["trigger"] == "before_CONFIGURE"
    assert invoke(f"http.Get('{server}/state')") == '{"ok":true}'
    with pytest.raises(CallError, match=r"status 500.*dcs is down"):
        invoke(f"http.Post('{server}/fail')")
    with pytest.raises(CallError, match="not an http"):
        invoke("http.Post('ftp://127.0.0.1/')")
    assert time_out(f"http.Post('{server}/slow')", 0.3).cancelled()


def test_http_connection_refused() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(CallError, match=f"127.0.0.1:{port}.*ConnectError"):
        invoke(f"http.Post('http://127.0.0.1:{port}/sor')")
