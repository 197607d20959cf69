"""Auth everywhere and the request-size limit (issue 11); each test failed before its fix.

- a token was checked by its digest's lookup only, never compared in constant time;
- failed logins were not limited: an address could guess tokens as fast as it liked;
- ``corral serve`` spoke plain HTTP only, and the client knew no CA to trust;
- a request body could be of any size.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from click.testing import CliRunner

from corral.api.app import MAX_BODY, create_app
from corral.api.auth import TOKEN_SHAPE, FailedLogins
from corral.backends.sim import SimBackend
from corral.cli.main import cli
from corral.control.plane import ControlPlane
from corral.control.service import ControlService, digest
from corral.store.sqlite import SqliteStore
from tests.api.server import Server
from tests.conftest import EXAMPLES, ROOT


def near_miss(token: str) -> str:
    """The token with its last character changed (still of a token's shape)."""
    return token[:-1] + ("A" if token[-1] != "A" else "B")


def in_process(tmp: Path, body: Callable[[ControlService], Awaitable[None]]) -> None:
    """Run ``body`` with a control service on a store in ``tmp`` (a simulated farm)."""

    async def main() -> None:
        store = SqliteStore(str(tmp / "corral.db"))
        service = ControlService(ControlPlane(store, SimBackend(2)), workflows=EXAMPLES)
        try:
            await body(service)
        finally:
            await service.close()
            store.close()

    asyncio.run(main())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


# -- 1. tokens: stored hashed, compared in constant time ------------------------------------


def test_tokens_are_stored_hashed_and_compared_with_compare_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    compared: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def recording(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    caplog.set_level("DEBUG")

    async def body(service: ControlService) -> None:
        admin = service.first_admin_token()
        assert admin is not None and TOKEN_SHAPE.fullmatch(admin)
        token_id, token = service.create_token("operator", "shifter", by="admin")
        assert TOKEN_SHAPE.fullmatch(token)  # what the rate limit counts as a guess
        who = service.authenticate(token)
        assert who is not None and (who.id, who.name, who.role) == (token_id, "shifter",
                                                                    "operator")  # fmt: skip
        assert compared == [(digest(token), digest(token))]  # after the lookup, in full
        compared.clear()
        assert service.authenticate(near_miss(token)) is None
        assert service.authenticate(token + "x") is None
        assert service.authenticate(token[:-1]) is None
        assert service.authenticate("") is None
        service.revoke_token(token_id, by="admin")
        assert service.authenticate(token) is None
        # neither the events nor the logs nor the store's files hold a token
        events = json.dumps(service.store.events(after=0, limit=1000))
        assert token not in events and admin not in events and token_id in events
        assert token not in caplog.text and admin not in caplog.text

    in_process(tmp_path, body)
    files = [p for p in tmp_path.iterdir() if p.name.startswith("corral.db")]
    stored = b"".join(p.read_bytes() for p in files)
    assert b"shifter" in stored  # what the store keeps is there, readable as bytes
    assert b"crl_" not in stored  # but no token, whole or in part


# -- 2. failed logins are limited per address -------------------------------------------------


def test_failed_logins_are_limited_per_address_without_an_oracle(tmp_path: Path) -> None:
    clock = Clock()
    logins = FailedLogins(clock=clock)

    async def body(service: ControlService) -> None:
        admin = service.first_admin_token()
        assert admin is not None
        bad = near_miss(admin)
        app = create_app(service, logins=logins)

        def client(host: str) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=app, client=(host, 40000))
            return httpx.AsyncClient(transport=transport, base_url="http://corral")

        async with client("10.0.0.1") as a, client("10.0.0.2") as b:
            for _ in range(10):
                r = await a.get("/api/whoami", headers=bearer(bad))
                assert r.status_code == 401, r.text
                clock.now += 1.0  # ten failures within ten seconds
            limited = await a.get("/api/whoami", headers=bearer(bad))
            assert limited.status_code == 429, limited.text
            assert limited.headers["content-type"].startswith("application/problem+json")
            assert limited.headers["Retry-After"] == "50"  # the first failure ages out at 60
            # no oracle: a valid token, or none, gets the very same answer
            valid = await a.get("/api/whoami", headers=bearer(admin))
            none = await a.get("/api/whoami")
            by_query = await a.get("/api/whoami", params={"token": admin})
            metrics = await a.get("/metrics", headers=bearer(admin))
            for r in (valid, none, by_query, metrics):
                assert (r.status_code, r.headers["Retry-After"], r.content) == (
                    429, "50", limited.content)  # fmt: skip
            # another address is not affected
            r = await b.get("/api/whoami", headers=bearer(admin))
            assert r.status_code == 200 and r.json()["role"] == "admin"
            assert (await b.get("/api/whoami", headers=bearer(bad))).status_code == 401
            # refused requests do not count: the limit ends when the window passes
            clock.now += 49.5
            r = await a.get("/api/whoami", headers=bearer(admin))
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            clock.now += 0.5
            r = await a.get("/api/whoami", headers=bearer(admin))
            assert r.status_code == 200, r.text
            # nine failures are left in the window: the next one limits again, until the
            # second one ages out; a success did not clear them
            assert (await a.get("/api/whoami", headers=bearer(bad))).status_code == 401
            r = await a.get("/api/whoami", headers=bearer(admin))
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            clock.now += 1.0
            assert (await a.get("/api/whoami", headers=bearer(admin))).status_code == 200
            # what can never be a token is refused, and is no guess: it does not count
            for _ in range(30):
                r = await b.get("/api/whoami", headers=bearer("nonsense"))
                assert r.status_code == 401
                r = await b.get("/api/whoami", headers={"Authorization": "Basic eDp5"})
                assert r.status_code == 401
            assert (await b.get("/api/whoami", headers=bearer(admin))).status_code == 200
        # an IPv6 host is counted by its /64: its other addresses share the limit
        async with client("2001:db8::1") as c6, client("2001:db8::2") as d6:
            for _ in range(10):
                assert (await c6.get("/api/whoami", headers=bearer(bad))).status_code == 401
            assert (await d6.get("/api/whoami", headers=bearer(admin))).status_code == 429
        async with client("2001:db8:0:1::1") as e6:
            assert (await e6.get("/api/whoami", headers=bearer(admin))).status_code == 200

    in_process(tmp_path, body)


def test_the_table_of_failed_logins_is_bounded() -> None:
    clock = Clock()
    logins = FailedLogins(limit=2, window=60, size=3, clock=clock)
    for i in range(1000):
        logins.failed(f"10.0.{i // 256}.{i % 256}")
        clock.now += 0.01
    assert len(logins) == 3  # the newest three; the oldest were forgotten
    assert logins.retry_after("10.0.0.0") is None
    logins.failed("10.0.3.231")
    assert logins.retry_after("10.0.3.231") == pytest.approx(60 - 0.01)
    assert len(logins) == 3
    clock.now += 61
    assert logins.retry_after("10.0.3.231") is None
    assert len(logins) == 2  # forgotten once its failures aged out


def test_a_real_server_limits_failed_logins_and_never_keeps_a_token(tmp_path: Path) -> None:
    with Server(tmp_path / "data", "--backend", "sim") as s:
        with s.client(s.admin) as c:
            made = c.post("/api/tokens", json={"role": "viewer", "name": "dash"}).json()
        token = made["token"]
        with httpx.Client(base_url=s.url, timeout=60) as c:
            # a token in the URL (the event stream's) would be in an access log
            with c.stream("GET", "/api/events/stream", params={"token": token, "after": "0"}) as r:
                assert r.status_code == 200
            events = c.get("/api/events", headers=bearer(token)).text
            assert made["id"] in events and token not in events
            for _ in range(10):
                r = c.get("/api/whoami", headers=bearer(near_miss(token)))
                assert r.status_code == 401, r.text
            r = c.get("/api/whoami", headers=bearer(near_miss(token)))
            assert r.status_code == 429, r.text
            assert 1 <= int(r.headers["Retry-After"]) <= 60
            assert r.json()["title"] == "Too many failed logins"
            # a valid token from this address is refused alike: no oracle
            for t in (token, s.admin):
                again = c.get("/api/whoami", headers=bearer(t))
                assert again.status_code == 429 and again.content == r.content
            # the server does not trust X-Forwarded-For to pick another address
            r = c.get("/api/whoami", headers={**bearer(s.admin), "X-Forwarded-For": "10.9.8.7"})
            assert r.status_code == 429
    assert token not in s.output
    for p in (tmp_path / "data").rglob("*"):
        if p.is_file():
            assert token.encode() not in p.read_bytes(), p


# -- 3. TLS -----------------------------------------------------------------------------------


def self_signed(d: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def corral(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**environ, **env})  # fmt: skip


def raw_http(url: str, request: bytes) -> bytes:
    """Send ``request`` as it is; what comes back until the server closes."""
    parts = urlsplit(url)
    got = b""
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(request)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    return got


def test_serve_over_tls_and_a_client_that_trusts_its_ca(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    other_cert, other_key = self_signed(tmp_path, "other")
    runner = CliRunner()
    data = str(tmp_path / "unused")
    # both or neither, readable, and a pair: said before anything starts
    r = runner.invoke(cli, ["serve", "--data", data, "--tls-cert", str(cert)])
    assert r.exit_code == 2 and "--tls-cert and --tls-key go together" in r.output
    r = runner.invoke(cli, ["serve", "--data", data, "--tls-key", str(key)])
    assert r.exit_code == 2 and "go together" in r.output
    r = runner.invoke(
        cli, ["serve", "--data", data, "--tls-cert", str(cert), "--tls-key", str(tmp_path / "no")]
    )
    assert r.exit_code == 2 and "cannot read" in r.output and "--tls-key" in r.output
    r = runner.invoke(
        cli, ["serve", "--data", data, "--tls-cert", str(cert), "--tls-key", str(other_key)]
    )
    assert r.exit_code == 2 and "not a PEM certificate and its private key" in r.output
    assert not os.path.exists(data)

    with Server(tmp_path / "data", "--backend", "sim", "--tls-cert", str(cert),
                   "--tls-key", str(key)) as s:  # fmt: skip
        assert s.url.startswith("https://127.0.0.1:")
        auth = {"CORRAL_SERVER": s.url, "CORRAL_TOKEN": s.admin}
        r = corral("token", "list", "-o", "json", "--ca-cert", str(cert), **auth)
        assert r.returncode == 0, r.stderr
        assert [t["name"] for t in json.loads(r.stdout)] == ["admin"]
        r = corral("token", "create", "--role", "viewer", "--name", "v", **auth,
                   CORRAL_CA_CERT=str(cert))  # fmt: skip
        assert r.returncode == 0 and r.stdout.startswith("crl_"), r.stderr
        r = corral("events", "-o", "json", **auth, CORRAL_CA_CERT=str(cert))
        assert r.returncode == 0 and '"CREATED"' in r.stdout, r.stderr
        # without the CA (or with another), it refuses, and says what to do
        for extra in ([], ["--ca-cert", str(other_cert)]):
            r = corral("token", "list", *extra, **auth)
            assert r.returncode == 3, r.stderr
            assert "TLS certificate is not trusted" in r.stderr and "--ca-cert" in r.stderr
        r = corral("token", "list", "--ca-cert", str(tmp_path / "nothing.pem"), **auth)
        assert r.returncode == 2 and "cannot use the CA certificate" in r.stderr
        # plain HTTP to the TLS port gets no data
        plain = s.url.replace("https://", "http://")
        got = raw_http(plain, f"GET /api/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                              f"Authorization: Bearer {s.admin}\r\n\r\n".encode())  # fmt: skip
        assert b"admin" not in got and b" 200 " not in got, got
        with pytest.raises(httpx.HTTPError):
            httpx.get(plain + "/api/whoami", headers=bearer(s.admin), timeout=30)


# -- 4. the request body limit ----------------------------------------------------------------


def test_a_body_over_the_limit_gets_413(tmp_path: Path) -> None:
    with Server(tmp_path / "data", "--backend", "sim", "--max-body", "4096") as s:
        head = (
            "POST /api/workflows/validate HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {s.admin}\r\nContent-Type: application/json\r\n"
        )
        # a Content-Length over the limit: refused before the body is sent
        got = raw_http(s.url, (head + "Content-Length: 1000000\r\n\r\n").encode())
        status, _, rest = got.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 413"), got
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b"content-type: application/problem+json" in headers.lower()
        problem = json.loads(body)
        assert problem["status"] == 413 and problem["title"] == "Request too large"
        assert "4096 bytes" in problem["detail"]
        # chunked, no Content-Length: the chunks are counted
        payload = b'{"workflow": "hello", "vars": {"x": "' + b"y" * 5000 + b'"}}'
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(payload[i : i + 1000]), payload[i : i + 1000])
            for i in range(0, len(payload), 1000)
        )
        got = raw_http(s.url, (head + "Transfer-Encoding: chunked\r\n\r\n").encode()
                       + chunks + b"0\r\n\r\n")  # fmt: skip
        assert got.startswith(b"HTTP/1.1 413"), got
        assert json.loads(got.partition(b"\r\n\r\n")[2])["title"] == "Request too large"
        # under the limit, chunked or not, it is served
        small = b'{"workflow": "hello", "vars": {"x": "' + b"y" * 1000 + b'"}}'
        with s.client(s.admin) as c:
            r = c.post("/api/workflows/validate", content=small,
                       headers={"Content-Type": "application/json"})  # fmt: skip
            assert r.status_code == 200 and r.json()["ok"], r.text
            r = c.post("/api/workflows/validate", content=iter([small[:500], small[500:]]),
                       headers={"Content-Type": "application/json"})  # fmt: skip
            assert r.status_code == 200 and r.json()["ok"], r.text
            assert c.get("/api/whoami").status_code == 200  # the server is fine


def test_the_default_body_limit_is_one_mebibyte(tmp_path: Path) -> None:
    async def body(service: ControlService) -> None:
        admin = service.first_admin_token()
        app = create_app(service)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://corral") as c:
            big = b'{"workflow": "' + b"x" * MAX_BODY + b'"}'
            r = await c.post("/api/workflows/validate", content=big, headers=bearer(admin))
            assert r.status_code == 413 and r.json()["detail"].endswith(f"{1 << 20} bytes")

            async def streamed() -> Any:
                for i in range(0, len(big), 65536):
                    yield big[i : i + 65536]

            r = await c.post("/api/workflows/validate", content=streamed(),
                             headers=bearer(admin))  # fmt: skip
            assert r.status_code == 413, r.text
            ok = json.dumps({"workflow": "hello", "vars": {"x": "y" * (MAX_BODY - 100)}})
            json_type = {"Content-Type": "application/json", **bearer(admin)}
            r = await c.post("/api/workflows/validate", content=ok, headers=json_type)
            assert r.status_code == 422 and "65536" in r.text  # read, then judged

    in_process(tmp_path, body)
