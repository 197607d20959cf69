"""The wire format of the task control protocol (docs/protocol.md): constants and framing."""

from __future__ import annotations

import json
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
MAX_LINE: Final = 1 << 20  # the longest line either side accepts, newline excluded
ENV_CONTROL_FD: Final = "CORRAL_CONTROL_FD"

STANDBY: Final = "STANDBY"
CONFIGURED: Final = "CONFIGURED"
RUNNING: Final = "RUNNING"
DONE: Final = "DONE"

# transition -> (the states it is valid in, the state it leads to)
TRANSITIONS: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    "CONFIGURE": ((STANDBY,), CONFIGURED),
    "START": ((CONFIGURED,), RUNNING),
    "STOP": ((RUNNING,), CONFIGURED),
    "RESET": ((CONFIGURED,), STANDBY),
    "EXIT": ((STANDBY, CONFIGURED), DONE),
}


def encode(message: dict[str, Any]) -> bytes:
    """One message as one compact line of JSON, newline-terminated."""
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


class LineSplitter:
    """Cuts a byte stream into lines; a line longer than MAX_LINE is dropped and reported.

    ``feed`` returns the complete lines found so far (without their newline) and, for each
    line that was too long, ``None`` in its place; a partial line is kept for the next call.
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._limit = limit
        self._skipping = False  # inside a line already reported as too long

    def feed(self, data: bytes) -> list[bytes | None]:
        self._buf += data
        out: list[bytes | None] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self._limit:
                    if not self._skipping:
                        out.append(None)
                    self._skipping = True
                    self._buf.clear()
                return out
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if self._skipping:
                self._skipping = False  # the end of the overlong line
            elif len(line) > self._limit:
                out.append(None)
            else:
                out.append(line)
