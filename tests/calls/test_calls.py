"""Call plugins for real: parsing, the entry points, processes, an HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
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


def invoke(func: str, timeout: float = 10.0) -> Any:
    async def main() -> Any:
        install_child_watcher()
        return await asyncio.wait_for(Registry().invoke(func, CTX), timeout)

    return asyncio.run(main())


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
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        invoke("test.Sleep(5)", timeout=0.2)
    assert time.monotonic() - t0 < 0.3


def test_exec_plugin(tmp_path: Path) -> None:
    assert invoke(f"exec.Run('{sys.executable}', '-c', 'print(1)')") == "1"
    assert invoke("exec.Shell('echo $CORRAL_RUN_NUMBER $CORRAL_EVENT')") == "7 CONFIGURE"
    with pytest.raises(CallError, match=r"ended with status 3: oops"):
        invoke("exec.Shell('echo oops >&2; exit 3')")
    with pytest.raises(CallError, match="no such file"):
        invoke("exec.Run('/no/such/program')")
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        invoke(f"exec.Shell('echo $$ > {pidfile}; exec sleep 30')", timeout=0.3)
    assert time.monotonic() - t0 < 0.5
    pid = int(pidfile.read_text())
    assert not Path(f"/proc/{pid}").exists(), "the timed-out command was not killed"


class Handler(BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        if self.path == "/slow":
            time.sleep(3)
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
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
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
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        invoke(f"http.Post('{server}/slow')", timeout=0.3)
    assert time.monotonic() - t0 < 0.5


def test_http_connection_refused() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(CallError, match=f"127.0.0.1:{port}.*ConnectError"):
        invoke(f"http.Post('http://127.0.0.1:{port}/sor')")
