"""The client commands against a server that answers what no corral server would (a
proxy's page, a redirect, an endless body, broken framing): one line that says what
went wrong, an exit status, bounded memory; never a traceback, never a hang."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import ROOT

OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
ANSWERS = {
    "html page": OK_HEAD + b"Content-Length: 15\r\n\r\n<html>hi</html>",
    "redirect": b"HTTP/1.1 302 Found\r\nLocation: https://127.0.0.1/\r\nContent-Length: 0\r\n\r\n",
    "error as a list": b"HTTP/1.1 400 Bad\r\nContent-Length: 5\r\n\r\n[1,2]",
    "negative length": OK_HEAD + b"Content-Length: -5\r\n\r\n",
    "huge chunk": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFF\r\nx",
    "endless continues": b"HTTP/1.1 100 Continue\r\n\r\n" * 50,
    "deep json": OK_HEAD + b"Content-Length: 200000\r\n\r\n" + b"[" * 100_000 + b"]" * 100_000,
    "endless body": OK_HEAD + b"\r\n",  # (then bytes until the client leaves)
}


@contextmanager
def fake_server(answer: bytes, endless: bool) -> Iterator[str]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(answer)
                    block = b"x" * 65536
                    while endless and not stop.is_set():
                        conn.sendall(block)
                except OSError:
                    pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        srv.close()


@pytest.mark.parametrize("case", sorted(ANSWERS))
def test_a_strange_answer_ends_in_one_line(case: str) -> None:
    with fake_server(ANSWERS[case], case == "endless body") as url:
        r = subprocess.run(
            [sys.executable, "-m", "corral", "env", "list", "--server", url, "--token", "crl_x"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
    assert r.returncode != 0, (case, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) <= 3, r.stderr


def test_a_token_with_stray_characters_is_refused_before_anything_is_sent() -> None:
    for token in ("crl_a\r\nX-Injected: 1", "crl_€"):
        r = subprocess.run(
            [sys.executable, "-m", "corral", "env", "list", "--server", "http://127.0.0.1:9",
             "--token", token], capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert r.returncode == 2 and "not a token" in r.stderr, r.stderr


def test_events_of_a_data_directory_whose_store_is_not_one(tmp_path: Path) -> None:
    data = tmp_path
    for content in (b"", b"garbage, not a database" * 10):
        (data / "corral.db").write_bytes(content)
        r = subprocess.run([sys.executable, "-m", "corral", "events", "--data", str(data)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
        assert r.returncode == 1 and "is not a corral store" in r.stderr, r.stderr
        assert (data / "corral.db").read_bytes() == content  # (not written to)
