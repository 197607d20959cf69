"""A small HTTP/1.1 client for the command line, on the standard library's sockets.

The client commands make one or a few requests to a control server and print the
answer; httpx (~170 ms to import) or even ``http.client`` (~40 ms: the email parser)
would cost more than the request itself. This is what they need and no more: a
request with a JSON body or query parameters, the answer read whole (Content-Length,
chunked, or until the server closes), or its lines as they come (the event stream).
One connection per request (``Connection: close``); https through ``ssl`` (imported
only then), checked against the system's CAs or the CA given. Proxies are not used:
the control server is reached directly.
"""

from __future__ import annotations

import json as jsonlib
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

if TYPE_CHECKING:
    import ssl

MAX_HEADER = 64 * 1024  # bytes of status line and headers
MAX_BODY = 64 << 20  # bytes of an answer read whole (a larger one is refused)
MAX_LINE = 1 << 20  # bytes of a line of a streamed answer
MAX_INTERIM = 10  # interim answers (100 Continue) before the real one
USER_AGENT = "corral-cli"


class HTTPError(Exception):
    """The request did not get an answer (the cause is chained)."""


class ConnectError(HTTPError):
    """The server could not be reached: refused, not resolved, TLS refused."""


class Response:
    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """Its body decoded; HTTPError when it is not JSON (a proxy's HTML page...)."""
        return loads(self.content)


def loads(data: bytes | str) -> Any:
    try:
        return jsonlib.loads(data)
    except (ValueError, RecursionError) as e:
        raise HTTPError(f"the answer is not JSON ({type(e).__name__}: {str(e)[:100]})") from None


class Stream:
    """An answer being read: its status and headers, then ``iter_lines`` or ``read``."""

    def __init__(
        self,
        status_code: int,
        headers: dict[str, str],
        body: Iterator[bytes],
        deadline: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self._body = body
        self.content = b""
        self.deadline = deadline  # (time.monotonic) by when ``read`` must have it all

    def read(self) -> bytes:
        """The whole body: at most MAX_BODY bytes, by the deadline (HTTPError)."""
        parts: list[bytes] = []
        size = 0
        for chunk in self._body:
            size += len(chunk)
            if size > MAX_BODY:
                raise HTTPError(f"the answer is larger than {MAX_BODY >> 20} MiB")
            if self.deadline is not None and time.monotonic() > self.deadline:
                raise HTTPError("the answer took too long to come")
            parts.append(chunk)
        self.content = b"".join(parts)
        return self.content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def iter_lines(self) -> Iterator[str]:
        pending = b""
        for chunk in self._body:
            pending += chunk
            if len(pending) > MAX_LINE and b"\n" not in pending:
                raise HTTPError(f"a line of the answer is longer than {MAX_LINE >> 20} MiB")
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if pending:
            yield pending.rstrip(b"\r").decode("utf-8", "replace")


def _query(params: Mapping[str, Any] | None) -> str:
    if not params:
        return ""
    pairs = []
    for k, v in params.items():
        if isinstance(v, bool):  # as httpx sends them
            v = "true" if v else "false"
        pairs.append((k, "" if v is None else str(v)))
    return "?" + urlencode(pairs)


class Client:
    """Requests to one server: ``base_url`` (``http://`` or ``https://``, with a path
    prefix if the server is behind one), the same headers on each."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = 300,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{base_url!r}: expected http://HOST[:PORT] or https://HOST[:PORT]")
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.https else 80
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.verify = verify

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: float | None = -1.0,
    ) -> Response:
        with self.stream(method, path, params=params, json=json, timeout=timeout) as s:
            s.read()
            return Response(s.status_code, s.headers, s.content)

    @contextmanager
    def stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        timeout: float | None = -1.0,
    ) -> Iterator[Stream]:
        """The answer, its body read as it is iterated; an ``HTTPError`` if there is
        none (``timeout`` -1: the client's)."""
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        body = b"" if json is None else jsonlib.dumps(json).encode()
        target = quote(self.prefix + path, safe="/:@!$&'()*+,;=-._~%") + _query(params)
        head = [
            f"{method} {target} HTTP/1.1",
            f"Host: {self.host_header}",
            f"User-Agent: {USER_AGENT}",
            "Accept: */*",
            "Accept-Encoding: identity",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        if json is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}")
        if json is not None:
            head.append("Content-Type: application/json")
        sock = self._connect(timeout)
        try:
            try:
                sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
                f = sock.makefile("rb")
                status, headers = _read_head(f)
            except OSError as e:
                raise HTTPError(f"no answer: {e}") from e
            no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
            deadline = None if timeout is None else time.monotonic() + timeout
            chunks: Iterator[bytes] = iter(()) if no_body else _checked(_body(f, headers))
            yield Stream(status, headers, chunks, deadline)
        finally:
            sock.close()

    def _connect(self, timeout: float | None) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as e:
            raise ConnectError(str(e)) from e
        if not self.https:
            return sock
        import ssl

        ctx = self.verify if isinstance(self.verify, ssl.SSLContext) else None
        if ctx is None:
            ctx = ssl.create_default_context()
            if self.verify is False:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        try:
            return ctx.wrap_socket(sock, server_hostname=self.host)
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise ConnectError(str(e)) from e


def _read_head(f: IO[bytes]) -> tuple[int, dict[str, str]]:
    for _ in range(MAX_INTERIM + 1):
        size = 0
        line = f.readline(MAX_HEADER)
        if not line:
            raise OSError("the server closed the connection without an answer")
        parts = line.decode("latin-1").split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise OSError(f"not an HTTP answer: {line[:100]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            line = f.readline(MAX_HEADER)
            size += len(line)
            if size > MAX_HEADER:
                raise OSError("the answer's headers are too long")
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 100:  # (an interim answer: the real one follows)
            return status, headers
    raise OSError(f"more than {MAX_INTERIM} interim answers")


def _checked(body: Iterator[bytes]) -> Iterator[bytes]:
    """The body, a failure to read it an ``HTTPError``."""
    try:
        yield from body
    except (OSError, ValueError) as e:
        raise HTTPError(f"the answer was cut: {e}") from e


def _body(f: IO[bytes], headers: dict[str, str]) -> Iterator[bytes]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = f.readline(1024)
            if not size_line:
                raise OSError("the answer was cut (chunked)")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size < 0 or size > MAX_BODY:
                raise OSError(f"a chunk of {size} bytes")
            if size == 0:
                while f.readline(MAX_HEADER) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            data = f.read(size)
            if len(data) < size:
                raise OSError("the answer was cut (chunked)")
            f.readline(2)
            yield data
    elif "content-length" in headers:
        left = int(headers["content-length"])
        if left < 0:
            raise OSError(f"Content-Length {left}")
        while left > 0:
            data = f.read(min(left, 1 << 16))
            if not data:
                raise OSError("the answer was cut")
            left -= len(data)
            yield data
    else:
        while True:
            data = f.read1(1 << 16) if hasattr(f, "read1") else f.read(1 << 16)
            if not data:
                return
            yield data


__all__ = ["Client", "ConnectError", "HTTPError", "Response", "Stream"]
