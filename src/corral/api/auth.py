"""Who is calling: tokens, roles, and the limit on failed logins (the API's dependencies).

``Viewer``, ``Operator`` and ``Admin`` are the annotations a route takes its caller
with: the token (``Authorization: Bearer``, or ``?token=`` on the event stream only)
is checked, and the caller's role must be at least that one (403 otherwise). An address
with too many failed logins is refused (429) before its token is looked at.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Header, Query, Request

from corral.control.service import ControlService, Principal, ServiceError, an

STREAM_PATH = "/api/events/stream"  # the one path that takes ?token= (EventSource)
LOGIN_FAILURES = 10  # failed token checks from one address ...
LOGIN_WINDOW = 60.0  # ... within this many seconds, and it is refused for a while
LOGIN_ADDRESSES = 10_000  # addresses remembered at most (the oldest are forgotten)
# what ``ControlService.create_token`` makes: only a token of this shape can be valid,
# so only a refused token of this shape is a guess (and counts as a failed login)
TOKEN_SHAPE = re.compile(r"crl_[A-Za-z0-9_-]{32}")


class RateLimited(ServiceError):
    """429: too many failed logins from the caller's address; ``Retry-After`` says when
    to come back."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(
            429, "Too many failed logins",
            f"too many refused tokens from this address: try again in {self.retry_after} s",
        )  # fmt: skip


class FailedLogins:
    """The failed token checks of each client address, in memory, bounded.

    An address with ``limit`` failures within ``window`` seconds is limited until the
    oldest of them is ``window`` seconds old: so at most ``limit`` guesses a window.
    While it is limited, every request from it that needs a token is refused (429)
    before its token is looked at, a valid one too: the answer does not depend on the
    token, so a guesser learns nothing from it. A success does not clear the failures
    (one valid token must not buy more guesses at another). At most ``size`` addresses
    are remembered; beyond that, the one whose last failure is oldest is forgotten.
    """

    def __init__(
        self,
        limit: int = LOGIN_FAILURES,
        window: float = LOGIN_WINDOW,
        *,
        size: int = LOGIN_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window = window
        self.size = size
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None when it is not limited."""
        times = self._failures.get(address)
        if times is None:
            return None
        now = self.clock()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        if len(times) < self.limit:
            return None
        return times[0] + self.window - now

    def failed(self, address: str) -> None:
        times = self._failures.pop(address, None)
        if times is None:
            times = deque(maxlen=self.limit)
        times.append(self.clock())
        self._failures[address] = times  # the newest last
        while len(self._failures) > self.size:
            self._failures.popitem(last=False)


def client_address(request: Request) -> str:
    """Whom failed logins are counted against: the peer's address (an IPv6 one by its
    /64, what one host usually has)."""
    host = request.client.host if request.client else ""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host or "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:  # any local process may use any of 127.0.0.0/8 (or ::1): one host
        return "loopback"
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


async def caller(
    request: Request,
    # in the document as the security scheme ``bearer`` (see ``create_app``), not a parameter
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    token: Annotated[str | None, Query(include_in_schema=False)] = None,
) -> Principal:
    """The token's owner, from ``Authorization: Bearer`` (or ``?token=`` for EventSource).

    An address with too many failed logins is refused first, whatever its token (see
    ``FailedLogins``); a refused token of a real token's shape counts as a failure."""
    logins: FailedLogins = request.app.state.logins
    address = client_address(request)
    wait = logins.retry_after(address)
    if wait is not None:
        raise RateLimited(wait)
    raw = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ServiceError(401, "Unauthorized", "use Authorization: Bearer TOKEN")
        raw = value.strip()
    elif token:
        if request.url.path != STREAM_PATH:  # a token in a URL ends up in logs and history
            raise ServiceError(
                401, "Unauthorized", f"?token= is taken by {STREAM_PATH} only (browsers' "
                "EventSource cannot set headers): use Authorization: Bearer TOKEN",
            )  # fmt: skip
        raw = token  # browsers' EventSource cannot set headers
    if not raw:
        raise ServiceError(401, "Unauthorized", "a token is needed: Authorization: Bearer TOKEN")
    service: ControlService = request.app.state.service
    who = service.authenticate(raw)
    if who is None:
        if TOKEN_SHAPE.fullmatch(raw):
            logins.failed(address)
        raise ServiceError(401, "Unauthorized", "unknown or revoked token")
    return who


def _needs(role: str) -> Callable[[Principal], Principal]:
    def check(who: Principal) -> Principal:
        if not who.can(role):
            raise ServiceError(403, "Forbidden", f"{who.name} is {an(who.role)}; this needs {role}")
        return who

    return check


_viewer, _operator, _admin = _needs("viewer"), _needs("operator"), _needs("admin")


async def viewer(who: Annotated[Principal, Depends(caller)]) -> Principal:
    return _viewer(who)


async def operator(who: Annotated[Principal, Depends(caller)]) -> Principal:
    return _operator(who)


async def admin(who: Annotated[Principal, Depends(caller)]) -> Principal:
    return _admin(who)


Viewer = Annotated[Principal, Depends(viewer)]
Operator = Annotated[Principal, Depends(operator)]
Admin = Annotated[Principal, Depends(admin)]
