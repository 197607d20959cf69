"""The Task base class: what a program overrides to obey the control protocol."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from corral.taskctl._protocol import STANDBY, encode


class Outbox:
    """Where a task's unsolicited events go: written at once, or held during a transition.

    Thread-safe: a line is written whole under a lock, so a thread of the task may post
    while the control loop answers.
    """

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self._write = write
        self._lock = threading.Lock()
        self._held: list[bytes] | None = None

    def post(self, message: dict[str, Any]) -> None:
        data = encode(message)
        with self._lock:
            if self._held is not None:
                self._held.append(data)
            else:
                self._write(data)

    def send(self, message: dict[str, Any]) -> None:
        """Write now, even while holding (the answer to the transition being run)."""
        data = encode(message)
        with self._lock:
            self._write(data)

    def hold(self) -> None:
        with self._lock:
            self._held = []

    def release(self) -> None:
        """Write what was held, in order, and stop holding."""
        with self._lock:
            held, self._held = self._held or [], None
            for data in held:
                self._write(data)


class Task:
    """A controlled task. Override the transitions you need; each default does nothing.

    A transition method gets the order's arguments (string keys and values). If it
    returns, the task enters the new state and the controller gets it as the answer; if
    it raises, the controller gets ``{"id":N,"error":"<ExceptionType>: <message>"}``
    and the state does not change.

    ``tick()`` is called over and over while the task is RUNNING, between control
    messages; it must return within about 20 ms (wait on your own input with a timeout,
    not forever). If it raises, an ERROR event is sent and it is not called again
    until the next START.

    Subclasses need not call ``Task.__init__``.
    """

    # defaults on the class, so that subclasses may skip Task.__init__
    _taskctl_state: str = STANDBY
    _taskctl_outbox: Outbox | None = None
    _taskctl_eos_sent: bool = False

    def configure(self, args: dict[str, str]) -> None:
        """STANDBY → CONFIGURED: open channels, read configuration."""

    def start(self, args: dict[str, str]) -> None:
        """CONFIGURED → RUNNING: ``args["run_number"]`` names the run."""

    def stop(self, args: dict[str, str]) -> None:
        """RUNNING → CONFIGURED: stop producing; the run is over."""

    def reset(self, args: dict[str, str]) -> None:
        """CONFIGURED → STANDBY: close what CONFIGURE opened."""

    def exit(self, args: dict[str, str]) -> None:
        """STANDBY or CONFIGURED → DONE: release everything; the process then ends."""

    def tick(self) -> None:
        """One slice of work while RUNNING; return within ~20 ms."""

    @property
    def state(self) -> str:
        """STANDBY, CONFIGURED, RUNNING or DONE. During a transition: the state before it."""
        return self._taskctl_state

    def end_of_stream(self) -> None:
        """Tell the controller this task has no more data to produce (once per run).

        Called inside a transition method, the event is sent right after the answer.
        """
        if self._taskctl_eos_sent:
            return
        self._taskctl_eos_sent = True
        self._post({"event": "END_OF_STREAM"})

    def error(self, message: str) -> None:
        """Tell the controller this task failed on its own; it marks the task ERROR."""
        self._post({"event": "ERROR", "error": str(message)})

    def _post(self, message: dict[str, Any]) -> None:
        box = self._taskctl_outbox
        if box is None:
            raise RuntimeError("this task is not controlled: call corral.taskctl.run(task)")
        box.post(message)
