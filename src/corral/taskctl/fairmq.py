"""FairMQ devices in Python: FairMQ's state machine over corral's control connection.

A task class with ``control: {mode: fairmq}`` is driven through FairMQ's own device
state machine (docs/protocol.md, "FairMQ devices"): corral sends FairMQ's transitions
(``INIT DEVICE``, ``COMPLETE INIT``, ``BIND``, ...) one at a time, in the framing of the
task control protocol (one JSON object per line on the ``CORRAL_CONTROL_FD`` socket),
and the device answers each with the state it reached. A Python device subclasses
``Device``, overrides the steps it needs and calls ``sys.exit(run_device(MyDevice()))``.

The states and transitions are FairMQ's (fairmq/States.h, fairmq/StateMachine.cxx).
Transitions that FairMQ follows by an automatic one (``BIND``: BINDING, then BOUND) are
answered with the state after it. A step that raises sends the device to ERROR, as in
FairMQ: from there it answers every transition with an error, until corral ends it.

Concurrency is that of ``corral.taskctl.run``, whose loop (``corral.taskctl._loop``) this
module shares: everything happens in the thread that called ``run_device()``, which waits
with ``poll()`` on the control socket (timeout 0 while RUNNING with a ``conditional_run``,
else blocking); ``end_of_stream()`` and ``error()`` may be called from the device's own
threads.
"""

from __future__ import annotations

import socket
import sys
import traceback
from typing import Any, Final

from corral.taskctl._loop import ControlLoop, control_socket
from corral.taskctl._task import Outbox

IDLE: Final = "IDLE"
INITIALIZING_DEVICE: Final = "INITIALIZING DEVICE"
INITIALIZED: Final = "INITIALIZED"
BINDING: Final = "BINDING"
BOUND: Final = "BOUND"
CONNECTING: Final = "CONNECTING"
DEVICE_READY: Final = "DEVICE READY"
INITIALIZING_TASK: Final = "INITIALIZING TASK"
READY: Final = "READY"
RUNNING: Final = "RUNNING"
RESETTING_TASK: Final = "RESETTING TASK"
RESETTING_DEVICE: Final = "RESETTING DEVICE"
EXITING: Final = "EXITING"
ERROR: Final = "ERROR"

# FairMQ transition -> (the states it is valid in, the state it enters while the
# device's method runs, the state it answers once done: after FairMQ's automatic
# transition, if one follows)
FAIRMQ_TRANSITIONS: Final[dict[str, tuple[tuple[str, ...], str, str]]] = {
    "INIT DEVICE": ((IDLE,), INITIALIZING_DEVICE, INITIALIZING_DEVICE),
    "COMPLETE INIT": ((INITIALIZING_DEVICE,), INITIALIZING_DEVICE, INITIALIZED),
    "BIND": ((INITIALIZED,), BINDING, BOUND),
    "CONNECT": ((BOUND,), CONNECTING, DEVICE_READY),
    "INIT TASK": ((DEVICE_READY,), INITIALIZING_TASK, READY),
    "RUN": ((READY,), RUNNING, RUNNING),
    "STOP": ((RUNNING,), RUNNING, READY),
    "RESET TASK": ((READY,), RESETTING_TASK, DEVICE_READY),
    "RESET DEVICE": ((INITIALIZED, BOUND, DEVICE_READY), RESETTING_DEVICE, IDLE),
    "END": ((IDLE,), EXITING, EXITING),
}
# how a device winds down from a state when corral is gone or sends SIGTERM
_WIND_DOWN: Final[dict[str, str]] = {
    RUNNING: "STOP",
    READY: "RESET TASK",
    DEVICE_READY: "RESET DEVICE",
    BOUND: "RESET DEVICE",
    INITIALIZED: "RESET DEVICE",
    INITIALIZING_DEVICE: "COMPLETE INIT",
    IDLE: "END",
}


def _say(text: str) -> None:
    print(f"corral.taskctl.fairmq: {text}", file=sys.stderr, flush=True)


class Device:
    """A FairMQ device. Override the steps you need; each default does nothing.

    A step method returning means success: the device enters the transition's state and
    corral gets it as the answer. Raising sends the device to ERROR, and corral gets
    ``{"id":N,"error":"<ExceptionType>: <message>","state":"ERROR"}``. During a step,
    ``state`` is the state FairMQ is in while it runs (BINDING during ``bind``).

    ``conditional_run()`` is called over and over while RUNNING, between control
    messages; it must return within about 20 ms. Returning False ends the run's data:
    the device sends END_OF_STREAM and it is not called again until the next RUN. If it
    raises, an ERROR event is sent and the device goes to ERROR.

    Subclasses need not call ``Device.__init__``.
    """

    _fairmq_state: str = IDLE
    _fairmq_outbox: Outbox | None = None
    _fairmq_eos_sent: bool = False
    properties: dict[str, str] = {}  # noqa: RUF012 - replaced, never changed in place

    def init_device(self, props: dict[str, str]) -> None:
        """INIT DEVICE (IDLE → INITIALIZING DEVICE): the device's configuration, which
        corral sends with it: channels (``chans.NAME.*``, see ``channels``), ``ports``,
        the task template's properties. Also kept as ``self.properties``."""

    def complete_init(self) -> None:
        """COMPLETE INIT (→ INITIALIZED): the configuration is complete; FairMQ's Init()."""

    def bind(self) -> None:
        """BIND (INITIALIZED → BINDING → BOUND): bind the channels that bind."""

    def connect(self) -> None:
        """CONNECT (BOUND → CONNECTING → DEVICE READY): connect the others."""

    def init_task(self) -> None:
        """INIT TASK (DEVICE READY → INITIALIZING TASK → READY): FairMQ's InitTask()."""

    def run(self, args: dict[str, str]) -> None:
        """RUN (READY → RUNNING): ``args["run_number"]`` names the run; FairMQ's PreRun()."""

    def conditional_run(self) -> bool:
        """One slice of work while RUNNING; False when there is no more data."""
        return True

    def stop(self) -> None:
        """STOP (RUNNING → READY): the run is over; FairMQ's PostRun()."""

    def reset_task(self) -> None:
        """RESET TASK (READY → RESETTING TASK → DEVICE READY): undo ``init_task``."""

    def reset_device(self) -> None:
        """RESET DEVICE (→ RESETTING DEVICE → IDLE): close the channels."""

    def end(self) -> None:
        """END (IDLE → EXITING): release everything; the process then ends."""

    @property
    def state(self) -> str:
        """The device's FairMQ state."""
        return self._fairmq_state

    def end_of_stream(self) -> None:
        """Tell corral this device has no more data to produce (once per run)."""
        if self._fairmq_eos_sent:
            return
        self._fairmq_eos_sent = True
        self._post({"event": "END_OF_STREAM"})

    def error(self, message: str) -> None:
        """Tell corral this device failed on its own; it marks the task ERROR."""
        self._post({"event": "ERROR", "error": str(message)})

    def _post(self, message: dict[str, Any]) -> None:
        box = self._fairmq_outbox
        if box is None:
            raise RuntimeError("this device is not controlled: call run_device(device)")
        box.post(message)

    def _step(self, transition: str, args: dict[str, str]) -> None:
        """Run the device's method for one FairMQ transition."""
        if transition == "INIT DEVICE":
            self.properties = dict(args)
            self.init_device(dict(args))
        elif transition == "RUN":
            self._fairmq_eos_sent = False
            self.run(dict(args))
        else:
            getattr(self, transition.lower().replace(" ", "_"))()


def handle(device: Device, transition: object, args: object) -> dict[str, Any]:
    """Carry out one FairMQ transition on ``device``: the answer's fields (without id).

    ``{"state": S}`` on success; ``{"error": why, "state": S}`` otherwise, with the state
    the device is in: unchanged for a transition that is unknown or not valid in its
    state (``cannot RUN in state IDLE``), ERROR when its method raised.
    """
    state = device._fairmq_state
    if not isinstance(transition, str) or transition not in FAIRMQ_TRANSITIONS:
        return {"error": f"unknown transition {transition!r}", "state": state}
    if not isinstance(args, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in args.items()
    ):
        return {"error": "args must be an object of string keys to string values", "state": state}
    valid_in, during, target = FAIRMQ_TRANSITIONS[transition]
    if state not in valid_in:
        return {"error": f"cannot {transition} in state {state}", "state": state}
    device._fairmq_state = during
    try:
        device._step(transition, args)
    except Exception as e:
        traceback.print_exc()
        device._fairmq_state = ERROR
        return {"error": f"{type(e).__name__}: {e}", "state": ERROR}
    device._fairmq_state = target
    return {"state": target}


def run_device(device: Device) -> int:
    """Obey corral until END, EOF or SIGTERM; return the exit status.

    Use as ``sys.exit(run_device(MyDevice()))``. Returns 2, after a message on stderr,
    when ``CORRAL_CONTROL_FD`` is unset or does not name a stream socket.
    """
    sock = control_socket(_say, "fairmq")
    if sock is None:
        return 2
    try:
        return _Loop(device, sock).run()
    finally:
        sock.close()


class _Loop(ControlLoop):
    def __init__(self, device: Device, sock: socket.socket) -> None:
        super().__init__(sock, _say)
        self.device = device
        self.runs = type(device).conditional_run is not Device.conditional_run
        self.run_over = False  # conditional_run said no more, or raised, in this run

    def _attach(self) -> str:
        device = self.device
        device._fairmq_state = IDLE
        device._fairmq_eos_sent = False
        device._fairmq_outbox = self.box
        return IDLE

    def _detach(self) -> None:
        self.device._fairmq_outbox = None

    def _busy(self) -> bool:
        return self.runs and not self.run_over and self.device.state == RUNNING

    def _order(self, mid: int, msg: dict[str, Any]) -> bool:
        self.box.hold()
        try:
            answer = handle(self.device, msg.get("transition"), msg.get("args", {}))
            if msg.get("transition") == "RUN" and "error" not in answer:
                self.run_over = False
            self.box.send({"id": mid, **answer})
        finally:
            self.box.release()
        if answer.get("state") == EXITING and "error" not in answer:
            sys.stdout.flush()
            return True
        return False

    def _work(self) -> None:
        """One ``conditional_run()``: False ends the run's data, raising sends to ERROR."""
        device = self.device
        try:
            more = device.conditional_run()
        except Exception as e:
            traceback.print_exc()
            self.run_over = True
            device._fairmq_state = ERROR
            self.box.post({"event": "ERROR", "error": f"{type(e).__name__}: {e}"})
            return
        if not more:
            self.run_over = True
            device.end_of_stream()

    def _wind_down(self, why: str) -> None:
        """Step down to EXITING (STOP, RESET TASK, RESET DEVICE, END, as the state asks),
        so that the device releases what it holds; a failing step is logged and ends it."""
        device = self.device
        _say(f"{why}: ending")
        for _ in range(len(_WIND_DOWN) + 1):
            transition = _WIND_DOWN.get(device.state)
            if transition is None:
                break
            if "error" in handle(device, transition, {}):
                break
        sys.stdout.flush()
