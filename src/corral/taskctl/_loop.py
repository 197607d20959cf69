"""What the direct control loop (``run``) and the FairMQ one (``run_device``) share.

``control_socket`` opens the control connection named by ``CORRAL_CONTROL_FD``.
``ControlLoop`` is the loop itself: the hello, the ``poll()`` on the control socket and on
a wakeup socket for SIGTERM, reading and framing of lines, the envelope of an order (a
JSON object with an integer id; anything else is a protocol error), work between
messages while the task is busy, and winding down on SIGTERM or EOF. A subclass says
what its state machine does: ``_attach``/``_detach`` (the task's side of the
connection), ``_order`` (one order), ``_busy``/``_work`` (work between messages) and
``_wind_down``. The concurrency model is described in ``corral.taskctl._run``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import FrameType
from typing import Any

from corral.taskctl._protocol import ENV_CONTROL_FD, MAX_LINE, PROTOCOL_VERSION, LineSplitter
from corral.taskctl._task import Outbox

_CHUNK = 1 << 16


def control_socket(say: Callable[[str], None], mode: str) -> socket.socket | None:
    """The control socket named by ``CORRAL_CONTROL_FD``, blocking and not inherited.

    None, after a message through ``say``, when the variable is unset or does not name a
    stream socket; ``mode`` is the control mode named in that message.
    """
    raw = os.environ.get(ENV_CONTROL_FD)
    if raw is None:
        say(
            f"{ENV_CONTROL_FD} is not set. This program is a corral task (control mode "
            f"'{mode}'): the corral controller starts it and passes its control socket's "
            f"file descriptor in {ENV_CONTROL_FD}. See docs/protocol.md."
        )
        return None
    try:
        fd = int(raw)
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as e:
        say(f"{ENV_CONTROL_FD}={raw!r} does not name an open socket: {e}")
        return None
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        say(f"{ENV_CONTROL_FD}={raw!r} is not a stream socket")
        return None
    sock.setblocking(True)
    os.set_inheritable(fd, False)  # processes this task starts must not hold the socket
    return sock


class ControlLoop(ABC):
    """One control connection, served until the last transition, EOF or SIGTERM."""

    def __init__(self, sock: socket.socket, say: Callable[[str], None]) -> None:
        self.sock = sock
        self.say = say
        self.lines = LineSplitter(MAX_LINE)
        self.gone = False  # the controller closed the connection
        self.terminating = False  # SIGTERM
        self.box = Outbox(self._write)

    # -- what a state machine says ------------------------------------------------------

    @abstractmethod
    def _attach(self) -> str:
        """Connect the task to this loop (state, outbox); the state to say hello with."""

    @abstractmethod
    def _detach(self) -> None:
        """Disconnect the task from this loop's outbox."""

    @abstractmethod
    def _order(self, mid: int, msg: dict[str, Any]) -> bool:
        """Carry out and answer the order ``msg`` with id ``mid``; True once the last
        transition (the process then ends) was answered."""

    @abstractmethod
    def _busy(self) -> bool:
        """Whether there is work to do between messages (then the wait does not block)."""

    @abstractmethod
    def _work(self) -> None:
        """One slice of that work."""

    @abstractmethod
    def _wind_down(self, why: str) -> None:
        """End the task's life on SIGTERM or EOF: it releases what it holds."""

    # -- output -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.gone = True

    def _protocol_error(self, why: str) -> None:
        self.say(f"protocol error: {why}")
        self.box.post({"event": "ERROR", "error": f"protocol error: {why}"})

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        restore = self._catch_sigterm(wake_w)
        try:
            state = self._attach()
            self.box.send({"state": state, "pid": os.getpid(), "protocol": PROTOCOL_VERSION})
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            poller.register(wake_r.fileno(), select.POLLIN)
            while True:
                if self.gone or self.terminating:
                    self._wind_down("SIGTERM" if self.terminating else "the controller is gone")
                    return 0
                busy = self._busy()
                for fd, _ in poller.poll(0 if busy else None):
                    if fd == wake_r.fileno():
                        with contextlib.suppress(OSError):
                            wake_r.recv(_CHUNK)
                    elif self._read():
                        return 0  # answered the last transition
                if busy and self._busy() and not (self.gone or self.terminating):
                    self._work()
        finally:
            restore()
            self._detach()
            wake_r.close()
            wake_w.close()

    def _catch_sigterm(self, wake_w: socket.socket) -> Callable[[], None]:
        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.terminating = True

        try:
            old_handler = signal.signal(signal.SIGTERM, on_sigterm)
            old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        except ValueError:  # not the main thread: leave signals alone
            return lambda: None

        def restore() -> None:
            signal.set_wakeup_fd(old_fd)
            signal.signal(signal.SIGTERM, old_handler)

        return restore

    def _read(self) -> bool:
        """Read one chunk and handle its complete lines; True once the last transition
        was answered."""
        try:
            data = self.sock.recv(_CHUNK)
        except InterruptedError:
            return False
        except OSError:
            data = b""
        if not data:
            self.gone = True
            return False
        for line in self.lines.feed(data):
            if line is None:
                self._protocol_error(f"a line longer than {MAX_LINE} bytes")
            elif line.strip() and self._message(line):
                return True
        return False

    def _message(self, line: bytes) -> bool:
        try:
            msg = json.loads(line)
        except ValueError:
            shown = line[:80].decode("utf-8", "replace")
            self._protocol_error(f"a message that is not JSON: {shown!r}")
            return False
        if not isinstance(msg, dict):
            self._protocol_error(f"a message that is not an object: {line[:80]!r}")
            return False
        mid = msg.get("id")
        if not isinstance(mid, int) or isinstance(mid, bool):
            self._protocol_error(f"a message without an integer id: {line[:80]!r}")
            return False
        return self._order(mid, msg)
