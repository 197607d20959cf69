"""The environment state machine as a transition table, and ``step``.

::

    STANDBY --DEPLOY--> DEPLOYED --CONFIGURE--> CONFIGURED --START_ACTIVITY--> RUNNING
                           ^                     |    ^                          |
                           +------RESET----------+    +-------STOP_ACTIVITY------+
    STANDBY | DEPLOYED | CONFIGURED --EXIT--> DONE
    any but DONE --GO_ERROR--> ERROR --RECOVER--> DEPLOYED

``step(state, event)`` returns the destination and the commands the controller
carries out for the core's own part of the transition (the hook calls around it
come from ``hooks.schedule``). Nothing here does I/O, reads a clock or allocates
a run number: those are the controller's effects.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.model import vocabulary

STANDBY = "STANDBY"
DEPLOYED = "DEPLOYED"
CONFIGURED = "CONFIGURED"
RUNNING = "RUNNING"
ERROR = "ERROR"
DONE = "DONE"

STATES: tuple[str, ...] = (STANDBY, DEPLOYED, CONFIGURED, RUNNING, ERROR, DONE)

TRANSITIONS: dict[tuple[str, str], str] = {
    (STANDBY, "DEPLOY"): DEPLOYED,
    (DEPLOYED, "CONFIGURE"): CONFIGURED,
    (CONFIGURED, "START_ACTIVITY"): RUNNING,
    (RUNNING, "STOP_ACTIVITY"): CONFIGURED,
    (CONFIGURED, "RESET"): DEPLOYED,
    (STANDBY, "EXIT"): DONE,
    (DEPLOYED, "EXIT"): DONE,
    (CONFIGURED, "EXIT"): DONE,
    (STANDBY, "GO_ERROR"): ERROR,
    (DEPLOYED, "GO_ERROR"): ERROR,
    (CONFIGURED, "GO_ERROR"): ERROR,
    (RUNNING, "GO_ERROR"): ERROR,
    (ERROR, "GO_ERROR"): ERROR,
    (ERROR, "RECOVER"): DEPLOYED,
}

# The events of the table: the vocabulary's, but DESTROY, which is not a transition
# (the controller tears an environment down from any state).
EVENTS: tuple[str, ...] = tuple(e for e in vocabulary.EVENTS if e != "DESTROY")


@dataclass(frozen=True, slots=True)
class Launch:
    """Start the environment's processes and wait until each is in STANDBY."""


@dataclass(frozen=True, slots=True)
class Transition:
    """Send a task transition (CONFIGURE, START, STOP, RESET, EXIT) to every task."""

    name: str


@dataclass(frozen=True, slots=True)
class CloseRun:
    """Record the end of the current run (when recovering; see also CLOSES_RUN)."""


@dataclass(frozen=True, slots=True)
class Terminate:
    """End every process that is still running (after EXIT, and when destroying)."""


@dataclass(frozen=True, slots=True)
class Recover:
    """Relaunch failed tasks; bring the others back to STANDBY (RECOVER)."""


Command = Launch | Transition | CloseRun | Terminate | Recover

_WORK: dict[str, tuple[Command, ...]] = {
    "DEPLOY": (Launch(),),
    "CONFIGURE": (Transition("CONFIGURE"),),
    "START_ACTIVITY": (Transition("START"),),
    "STOP_ACTIVITY": (Transition("STOP"),),
    "RESET": (Transition("RESET"),),
    "EXIT": (Transition("EXIT"), Terminate()),
    "GO_ERROR": (),
    "RECOVER": (CloseRun(), Recover()),
}


# As in AliECS, the run number exists for the whole of START_ACTIVITY and STOP_ACTIVITY:
# it is allocated before START_ACTIVITY's first step (its before_ calls read it) and
# recorded ended after STOP_ACTIVITY's last (its after_ calls read it too).
OPENS_RUN = frozenset({"START_ACTIVITY"})
CLOSES_RUN = frozenset({"STOP_ACTIVITY"})


class InvalidTransition(ValueError):
    """An event that the current state does not accept."""

    def __init__(self, state: str, event: str) -> None:
        allowed = sorted(e for (s, e) in TRANSITIONS if s == state)
        hint = f"; from {state} you can: {', '.join(allowed)}" if allowed else ""
        if event not in EVENTS:
            msg = f"unknown event {event!r} (events: {', '.join(EVENTS)})"
        else:
            msg = f"{event} is not allowed in state {state}{hint}"
        super().__init__(msg)
        self.state = state
        self.event = event


def allowed_events(state: str) -> list[str]:
    """The events ``state`` accepts, in the order of EVENTS."""
    return [e for e in EVENTS if (state, e) in TRANSITIONS]


def step(state: str, event: str) -> tuple[str, tuple[Command, ...]]:
    """The destination of ``event`` from ``state`` and the core's commands for it.

    Raises InvalidTransition when the table has no such entry.
    """
    dst = TRANSITIONS.get((state, event))
    if dst is None:
        raise InvalidTransition(state, event)
    return dst, _WORK[event]
