"""The control loop of a Python task: ``run(task)``.

Concurrency model. Everything happens in the one thread that called ``run()``; the library
starts no thread and needs no lock for the task's own state:

- the loop waits with ``poll()`` on the control socket and on a wakeup pipe for SIGTERM.
  While the task is RUNNING and overrides ``tick()``, the wait has timeout 0 and the loop
  calls ``tick()`` after each wait, so ``tick`` runs continuously between messages; it
  must itself wait on its input (timeouts of at most ~20 ms) and return, or control
  messages wait for it. Otherwise the wait blocks until a message or a signal comes;
- control bytes are read in chunks and cut into lines; a chunk may hold a partial line or
  several lines; each complete line is handled in order before the next wait;
- a transition method runs to its end before the next message is read: a slow method
  delays its own answer (the controller has a deadline per transition), never corrupts it;
- answers and events are written with a blocking ``sendall`` of one whole line;
  ``Task.end_of_stream()`` and ``Task.error()`` may also be called from the task's own
  threads (a lock keeps lines whole). Events posted during a transition method are sent
  right after that transition's answer;
- SIGTERM only sets a flag (and wakes the wait); at the next turn of the loop the task is
  wound down (STOP if RUNNING, then EXIT) and ``run()`` returns 0. EOF on the control
  socket (the controller is gone) is handled the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

from corral.taskctl._protocol import (
    DONE,
    ENV_CONTROL_FD,
    MAX_LINE,
    PROTOCOL_VERSION,
    RUNNING,
    STANDBY,
    TRANSITIONS,
    LineSplitter,
)
from corral.taskctl._task import Outbox, Task

_CHUNK = 1 << 16


def _say(text: str) -> None:
    print(f"corral.taskctl: {text}", file=sys.stderr, flush=True)


def run(task: Task) -> int:
    """Obey the controller until EXIT, EOF or SIGTERM; return the exit status.

    Use as ``sys.exit(run(MyTask()))``. Returns 2, after a message on stderr, when
    ``CORRAL_CONTROL_FD`` is unset or does not name a stream socket.
    """
    raw = os.environ.get(ENV_CONTROL_FD)
    if raw is None:
        _say(
            f"{ENV_CONTROL_FD} is not set. This program is a corral task (control mode "
            "'direct'): the corral controller starts it and passes its control socket's "
            f"file descriptor in {ENV_CONTROL_FD}. See docs/protocol.md."
        )
        return 2
    try:
        fd = int(raw)
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError) as e:
        _say(f"{ENV_CONTROL_FD}={raw!r} does not name an open socket: {e}")
        return 2
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        _say(f"{ENV_CONTROL_FD}={raw!r} is not a stream socket")
        return 2
    sock.setblocking(True)
    os.set_inheritable(fd, False)  # processes this task starts must not hold the socket
    try:
        return _Loop(task, sock).run()
    finally:
        sock.close()


class _Loop:
    def __init__(self, task: Task, sock: socket.socket) -> None:
        self.task = task
        self.sock = sock
        self.lines = LineSplitter(MAX_LINE)
        self.gone = False  # the controller closed the connection
        self.terminating = False  # SIGTERM
        self.box = Outbox(self._write)
        self.ticks = type(task).tick is not Task.tick
        self.tick_failed = False

    # -- output -------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.gone:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            self.gone = True

    def _answer(self, mid: int, **fields: Any) -> None:
        self.box.send({"id": mid, **fields})

    def _protocol_error(self, why: str) -> None:
        _say(f"protocol error: {why}")
        self.box.post({"event": "ERROR", "error": f"protocol error: {why}"})

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        restore = self._catch_sigterm(wake_w)
        try:
            task = self.task
            task._taskctl_state = STANDBY
            task._taskctl_eos_sent = False
            task._taskctl_outbox = self.box
            self.box.send({"state": STANDBY, "pid": os.getpid(), "protocol": PROTOCOL_VERSION})
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            poller.register(wake_r.fileno(), select.POLLIN)
            while True:
                if self.gone or self.terminating:
                    self._wind_down("SIGTERM" if self.terminating else "the controller is gone")
                    return 0
                ticking = self.ticks and not self.tick_failed and task.state == RUNNING
                for fd, _ in poller.poll(0 if ticking else None):
                    if fd == wake_r.fileno():
                        with contextlib.suppress(OSError):
                            wake_r.recv(_CHUNK)
                    elif self._read():
                        return 0  # answered EXIT
                if (
                    ticking
                    and task.state == RUNNING
                    and not self.tick_failed
                    and not (self.gone or self.terminating)
                ):
                    self._tick()
        finally:
            restore()
            self.task._taskctl_outbox = None
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
        """Read one chunk and handle its complete lines; True once EXIT was answered."""
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
        transition = msg.get("transition")
        args = msg.get("args", {})
        if not isinstance(transition, str) or transition not in TRANSITIONS:
            self._answer(mid, error=f"unknown transition {transition!r}")
            return False
        if not isinstance(args, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in args.items()
        ):
            self._answer(mid, error="args must be an object of string keys to string values")
            return False
        return self._transition(mid, transition, args)

    def _transition(self, mid: int, transition: str, args: dict[str, str]) -> bool:
        task = self.task
        valid_in, target = TRANSITIONS[transition]
        if task.state not in valid_in:
            self._answer(mid, error=f"cannot {transition} in state {task.state}")
            return False
        self.box.hold()
        try:
            try:
                getattr(task, transition.lower())(args)
            except Exception as e:
                traceback.print_exc()
                self._answer(mid, error=f"{type(e).__name__}: {e}")
                return False
            task._taskctl_state = target
            if transition == "START":
                task._taskctl_eos_sent = False
                self.tick_failed = False
            self._answer(mid, state=target)
        finally:
            self.box.release()
        if target == DONE:
            sys.stdout.flush()
            return True
        return False

    def _tick(self) -> None:
        try:
            self.task.tick()
        except Exception as e:
            traceback.print_exc()
            self.tick_failed = True
            self.box.post({"event": "ERROR", "error": f"{type(e).__name__}: {e}"})

    def _wind_down(self, why: str) -> None:
        """STOP if RUNNING, then EXIT: the task releases what it holds; errors are logged."""
        task = self.task
        _say(f"{why}: ending")
        args = {"environment_id": os.environ.get("CORRAL_ENVIRONMENT_ID", "")}
        steps = ["STOP", "EXIT"] if task.state == RUNNING else ["EXIT"]
        for transition in steps:
            if task.state not in TRANSITIONS[transition][0]:
                break
            try:
                getattr(task, transition.lower())(dict(args))
            except Exception:
                traceback.print_exc()
                return
            task._taskctl_state = TRANSITIONS[transition][1]
        sys.stdout.flush()
