"""The control loop of a Python task: ``run(task)``.

Concurrency model. Everything happens in the one thread that called ``run()``; the library
starts no thread and needs no lock for the task's own state:

- the loop waits with ``poll()`` on the control socket and on a wakeup socket for SIGTERM.
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

The loop's machinery, shared with the FairMQ loop, is ``corral.taskctl._loop``; this
module adds the direct protocol's state machine (docs/protocol.md).
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from typing import Any

from corral.taskctl._loop import ControlLoop, control_socket
from corral.taskctl._protocol import DONE, RUNNING, STANDBY, TRANSITIONS
from corral.taskctl._task import Task


def _say(text: str) -> None:
    print(f"corral.taskctl: {text}", file=sys.stderr, flush=True)


def run(task: Task) -> int:
    """Obey the controller until EXIT, EOF or SIGTERM; return the exit status.

    Use as ``sys.exit(run(MyTask()))``. Returns 2, after a message on stderr, when
    ``CORRAL_CONTROL_FD`` is unset or does not name a stream socket.
    """
    sock = control_socket(_say, "direct")
    if sock is None:
        return 2
    try:
        return _Loop(task, sock).run()
    finally:
        sock.close()


class _Loop(ControlLoop):
    def __init__(self, task: Task, sock: socket.socket) -> None:
        super().__init__(sock, _say)
        self.task = task
        self.ticks = type(task).tick is not Task.tick
        self.tick_failed = False

    def _answer(self, mid: int, **fields: Any) -> None:
        self.box.send({"id": mid, **fields})

    def _attach(self) -> str:
        task = self.task
        task._taskctl_state = STANDBY
        task._taskctl_eos_sent = False
        task._taskctl_outbox = self.box
        return STANDBY

    def _detach(self) -> None:
        self.task._taskctl_outbox = None

    def _busy(self) -> bool:
        return self.ticks and not self.tick_failed and self.task.state == RUNNING

    def _order(self, mid: int, msg: dict[str, Any]) -> bool:
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

    def _work(self) -> None:
        """One ``tick()``; if it raises, an ERROR event, and no more ticks until START."""
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
